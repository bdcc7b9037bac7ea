"""workers.Pool: threads started when needed, bounded, one woken per job."""

import threading

import pytest

from vdsm_managedvolume import workers

from . import agentutil


def test_pool_starts_threads_when_needed_and_refuses_beyond_its_bound():
    pool = workers.Pool(4, 0, name="lazy-pool")
    release = threading.Event()
    started = threading.Semaphore(0)

    def job():
        started.release()
        release.wait(30)

    try:
        assert _threads("lazy-pool") == 0
        for _ in range(4):
            assert pool.submit(job)
        for _ in range(4):      # all four run at once
            assert started.acquire(timeout=30)
        assert _threads("lazy-pool") == 4
        assert not pool.submit(job)     # refused, not queued
        release.set()
        agentutil.wait_for(lambda: pool.pending == 0)
        release.clear()
        assert pool.submit(job)
        assert started.acquire(timeout=30)
        assert _threads("lazy-pool") == 4   # an idle thread took it
    finally:
        release.set()
        pool.stop()


def test_pool_job_handed_off_later_runs_only_once_handed():
    # The I/O thread wakes a worker at the end of its round, not while it
    # still holds the interpreter lock (Server._hand_off).
    pool = workers.Pool(2, 0, name="handoff-pool")
    ran = threading.Event()
    handoff = []
    try:
        assert pool.submit(ran.set, handoff)
        assert pool.pending == 1        # accepted: counted at once
        assert not ran.wait(0.2)
        [(put, job)] = handoff
        put(job)
        assert ran.wait(30)
        agentutil.wait_for(lambda: pool.pending == 0)
    finally:
        pool.stop()


def test_pool_queues_at_most_max_queue_behind_its_workers():
    pool = workers.Pool(1, 2, name="queue-pool")
    release = threading.Event()
    ran = []

    def job():
        release.wait(30)
        ran.append(1)

    try:
        assert [pool.submit(job) for _ in range(4)] == [True, True, True,
                                                        False]
        release.set()
        agentutil.wait_for(lambda: len(ran) == 3)
        assert _threads("queue-pool") == 1
    finally:
        release.set()
        pool.stop()


def test_pool_wakes_no_thread_but_the_one_that_runs_a_job():
    # A pool keeps its threads: after a mass start dozens wait.  A job
    # must wake one of them, the one that runs it, and the one that ran
    # the last job first (queue.SimpleQueue woke them in turn, and a
    # second one for nothing at every job).  The job answers as a job
    # of the agent does, by the callable it returns (run once the pool
    # counts the thread as coming back), so the next job goes to the
    # same thread whatever the scheduling (review-perf11 L3).
    pool = workers.Pool(8, 0, name="wake-pool")
    barrier = threading.Barrier(9)
    done = threading.Event()
    runners = []

    def job():
        runners.append(threading.get_native_id())
        return done.set

    def run(jobs):
        for _ in range(jobs):
            done.clear()
            assert pool.submit(job)
            assert done.wait(30)
        agentutil.wait_for(lambda: pool.pending == 0)

    try:
        for _ in range(8):      # eight threads
            assert pool.submit(lambda: barrier.wait(30))
        barrier.wait(30)
        run(10)                 # all of them waiting by now
        threads = [t.native_id for t in threading.enumerate()
                   if t.name.startswith("wake-pool-")]
        assert len(threads) == 8
        before = {tid: _switches(tid) for tid in threads}
        del runners[:]
        run(50)
        assert len(set(runners)) == 1, set(runners)
        woken = [tid for tid in threads if tid not in runners
                 and _switches(tid) != before[tid]]
        assert woken == []
    finally:
        pool.stop()


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_pool_runs_jobs_after_a_job_ended_its_thread():
    # A BaseException ends a pool thread (as SimpleQueue's did): the job
    # it would have come back for goes to another thread.
    pool = workers.Pool(3, 0, name="gone-pool")
    barrier = threading.Barrier(4)
    ran = threading.Event()

    def end_thread():
        raise SystemExit

    try:
        for _ in range(3):
            assert pool.submit(lambda: barrier.wait(30))
        barrier.wait(30)
        agentutil.wait_for(lambda: pool.pending == 0)
        assert pool.submit(end_thread)
        agentutil.wait_for(lambda: _threads("gone-pool") == 2)
        for _ in range(3):
            ran.clear()
            assert pool.submit(ran.set)
            assert ran.wait(30)
    finally:
        pool.stop()


def test_pool_runs_every_job_of_a_burst_once():
    pool = workers.Pool(4, 100, name="burst-pool")
    ran = []
    lock = threading.Lock()

    def job(n):
        with lock:
            ran.append(n)

    try:
        for n in range(100):
            assert pool.submit(lambda n=n: job(n))
        agentutil.wait_for(lambda: len(ran) == 100)
        assert sorted(ran) == list(range(100))
        assert _threads("burst-pool") <= 4
    finally:
        pool.stop()
    agentutil.wait_for(lambda: _threads("burst-pool") == 0)


# Private helpers

def _threads(name):
    """The live threads of the pool named ``name``."""
    return len([t for t in threading.enumerate()
                if t.name.startswith(name + "-") and t.is_alive()])


def _switches(tid):
    """Voluntary context switches of this process's thread ``tid``."""
    with open("/proc/self/task/{}/status".format(tid)) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches for {}".format(tid))


def test_pool_threads_are_daemon_threads_unless_asked_otherwise():
    # The privsep daemon's pool: the interpreter waits at exit for its
    # threads and for the threads they start (they inherit it), as it did
    # for oslo.privsep's executor.
    seen = {}
    done = threading.Event()

    def job(name):
        child = threading.Thread(target=lambda: None)
        seen[name] = (threading.current_thread().daemon, child.daemon)
        done.set()

    for name, daemon in (("daemon-pool", True), ("kept-pool", False)):
        pool = workers.Pool(1, 0, name=name, daemon=daemon)
        done.clear()
        assert pool.submit(lambda name=name: job(name))
        assert done.wait(30)
        pool.stop()
        pool.join()
    assert seen == {"daemon-pool": (True, True),
                    "kept-pool": (False, False)}


def test_pool_that_cannot_start_a_thread_raises_and_stays_as_it_was(
        monkeypatch):
    # RuntimeError: can't start new thread (a cgroup's pids.max, a
    # mass start's threads): the job is not queued, nothing counts it,
    # and stop() and join() end the threads that did start.
    pool = workers.Pool(2, 0, name="nostart-pool", daemon=False)
    release = threading.Event()
    started = threading.Event()
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "nostart-pool-1":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    def job():
        started.set()
        release.wait(30)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        assert pool.submit(job)
        assert started.wait(30)
        with pytest.raises(RuntimeError):
            pool.submit(job)
        assert pool.pending == 1
        assert _threads("nostart-pool") == 1
        monkeypatch.setattr(threading.Thread, "start", real_start)
        started.clear()
        assert pool.submit(job)     # a thread can be started again
        assert started.wait(30)
        assert pool.pending == 2
    finally:
        release.set()
        pool.stop()
        pool.join()
    assert pool.pending == 0
