"""Worker threads that wake one at a time.

``Pool`` runs jobs in up to ``workers`` threads, started when first
needed and kept, and wakes at most one thread per job: the one that
runs it.  The agent's two STOMP pools (``stompserver``: the control
plane's workers and the data plane's operations) and the privsep
daemon's calls (``brick``, in place of oslo.privsep's
``concurrent.futures.ThreadPoolExecutor``) run on it.

Why not ``queue.SimpleQueue`` (and the ThreadPoolExecutor built on it):
its ``put`` releases a lock that the waiting ``get`` calls take in turn,
and the waiter it wakes gives it back on its way out, waking the next
waiter for nothing.  A pool keeps its threads, and a mass start leaves
dozens waiting: from then on every job woke two threads, the woken ones
in turn, each taking the interpreter lock on its way.  Here a job goes
to the thread that has just finished one and is coming back (it takes
it without sleeping), else to the thread that began waiting last (its
stack and caches still warm), woken by a lock of its own.
"""

import collections
import logging
import threading

LOG = logging.getLogger("managedvolume.workers")


class Pool:
    """Up to ``workers`` threads, started when first needed and kept; at
    most ``max_queue`` requests wait for one (0: a request runs at once or
    is refused).  A job may return a callable: it runs after the job's
    slot was given back (delivering the answer).  With a ``gate``
    (``gate.Gate``), each job and its callable run holding one of its
    slots.  ``daemon``: whether the threads are daemon threads (those
    the interpreter does not wait for at exit; threads they start
    inherit it).

    A job wakes one thread at most, the one that runs it: it is left to
    a thread that has just finished a job and is coming back for another
    (each such thread takes one), else given to the thread that began
    waiting last.  queue.SimpleQueue, used before, woke a second thread
    for nothing whenever two or more waited (its ``get`` gives back the
    lock ``put`` released, which wakes the next waiter: it finds nothing
    and sleeps again), and the threads in turn.  A pool keeps its
    threads, and a mass start leaves dozens waiting: from then on each
    request woke two, each taking the interpreter lock in its turn on
    the agent's one CPU (one caller's attach+detach: 25 context switches
    in the agent instead of 11); and the thread woken while the one
    that had answered was on its way back only waited for the run
    queue's slot, which that one holds until its answer is written.
    """

    def __init__(self, workers, max_queue, name="worker", gate=None,
                 daemon=True):
        self.workers = max(1, workers)
        self.max_queue = max(0, max_queue)
        self.name = name
        self.daemon = daemon
        self._gate = gate
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = 0          # threads waiting for a job, not reserved
        self._waiting = 0       # jobs queued that no thread is reserved for
        self._threads = []
        # Under _lock: jobs no thread took yet; the threads waiting for
        # one (_Parked, the last to wait last); the threads coming back.
        self._jobs = collections.deque()
        self._parked = []
        self._returning = 0

    def submit(self, fn, handoff=None):
        """Queue ``fn``; False when every worker is busy and the queue full.
        Raises what starting a thread raised, ``fn`` not queued.

        handoff: a list: ``(put, fn)`` is appended to it instead of
        waking a worker now; the caller calls ``put(fn)`` soon (the I/O
        thread: at the end of its round, ``Server._hand_off``).
        """
        with self._lock:
            if self._pending >= self.workers + self.max_queue:
                return False
            self._pending += 1
            if self._idle:
                self._idle -= 1     # that thread takes this job
            elif len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._run, daemon=self.daemon,
                    name="{}-{}".format(self.name, len(self._threads)))
                self._threads.append(thread)
                try:
                    thread.start()
                except BaseException:
                    # (RuntimeError: can't start new thread.)  Nothing
                    # was queued: the pool is as before the call, and
                    # stop() and join() do not count on that thread.
                    self._threads.pop()
                    self._pending -= 1
                    raise
            else:
                self._waiting += 1
        if handoff is None:
            self._put(fn)
        else:
            handoff.append((self._put, fn))
        return True

    @property
    def pending(self):
        """Requests running or waiting."""
        return self._pending

    def stop(self):
        """End every thread once the jobs already queued have run."""
        with self._lock:
            count = len(self._threads)
        for _ in range(count):
            self._put(None)

    def join(self):
        """Wait for the threads ``stop`` ended (and their jobs)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def _put(self, fn):
        with self._lock:
            if not self._parked or len(self._jobs) < self._returning:
                self._jobs.append(fn)
                return
            parked = self._parked.pop()
            parked.job = fn
        parked.wake.release()

    def _run(self):
        parked = _Parked()
        back = False
        try:
            while True:
                with self._lock:
                    if back:
                        self._returning -= 1
                        back = False
                    if self._jobs:
                        fn = self._jobs.popleft()
                    else:
                        self._parked.append(parked)
                        fn = parked
                if fn is parked:
                    parked.wake.acquire()
                    fn, parked.job = parked.job, None
                if fn is None:
                    return
                back = True
                if self._gate is None:
                    self._run_job(fn)
                else:
                    # The answer is delivered holding the gate's slot
                    # too: given back first, the next operation woken by
                    # it and this thread writing the answer would pass
                    # the interpreter lock to each other (gate.py: the
                    # connection's lock is never waited for,
                    # Connection.write).
                    with self._gate.hold():
                        self._run_job(fn)
        finally:
            if back:
                self._gone()

    def _gone(self):
        """A thread ended by a job's BaseException is not coming back:
        the job left to it goes to a waiting thread."""
        with self._lock:
            self._returning -= 1
            parked = None
            if self._parked and len(self._jobs) > self._returning:
                parked = self._parked.pop()
                parked.job = self._jobs.popleft()
        if parked is not None:
            parked.wake.release()

    def _run_job(self, fn):
        after = None
        try:
            after = fn()
        except Exception:
            LOG.exception("Worker job failed")
        finally:
            with self._lock:
                self._pending -= 1
                if self._waiting:
                    self._waiting -= 1  # the next get() takes it
                else:
                    self._idle += 1
                self._returning += 1    # this thread takes the next job
        if callable(after):
            try:
                after()
            except Exception:
                LOG.exception("Worker job failed")


class _Parked:
    """A pool thread waiting for a job: ``wake`` is released once
    ``job`` was given to it."""

    __slots__ = ("wake", "job")

    def __init__(self):
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job = None
