"""The data plane's run queue: at most ``slots`` operation threads run
Python at once, a thread gives its slot back around every wait, and no
wait can deadlock.

The deadlock tests use real parts: the service, its journal and volume
locks, the privsep daemon running the fake iSCSI connector
(tests/fakebrick.py), each operation run in a thread holding a slot of one
gate as the agent's operation threads do.  Attaches held in the connector
wait on a barrier file (``fake_wait``), so nothing depends on how fast
this machine is; a deadlock shows as a thread still alive after a bound
of a minute, never as a slow test.
"""

import json
import os
import signal
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import gate
from vdsm_managedvolume import jsonrpc
from vdsm_managedvolume import locking
from vdsm_managedvolume import service
from vdsm_managedvolume import workers

from . import agentutil
from . import fakebrick
from .host_fixtures import iscsi_connection, make_cfg, new_id

# How long a thread may take before we call it deadlocked.
BOUND = 60


# The gate itself

def test_one_slot_lets_one_thread_hold_it_at_a_time():
    g = gate.Gate(1)
    inside = threading.Event()
    leave = threading.Event()
    second = threading.Event()

    def first():
        with g.hold():
            inside.set()
            leave.wait(BOUND)

    def other():
        with g.hold():
            second.set()

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert inside.wait(BOUND)
    threads.append(threading.Thread(target=other))
    threads[1].start()
    assert not second.wait(0.2)     # it waits for the slot...
    leave.set()
    assert second.wait(BOUND)       # ...and gets it once the first left
    _join(threads)


def test_two_slots_let_two_threads_hold_them_at_once_not_three():
    g = gate.Gate(2)
    both = threading.Barrier(2, timeout=BOUND)
    leave = threading.Event()
    third = threading.Event()

    held = threading.Semaphore(0)

    def holder():
        with g.hold():
            both.wait()
            held.release()
            leave.wait(BOUND)

    def other():
        with g.hold():
            third.set()

    threads = [threading.Thread(target=holder) for _ in range(2)]
    for t in threads:
        t.start()
    # Both slots taken before the third thread asks (else it could get
    # one first).
    assert held.acquire(timeout=BOUND) and held.acquire(timeout=BOUND)
    threads.append(threading.Thread(target=other))
    threads[-1].start()
    assert not third.wait(0.2)
    leave.set()
    assert third.wait(BOUND)
    _join(threads)


def test_released_gives_the_slot_to_another_thread_and_takes_it_back():
    g = gate.Gate(1)
    waiting = threading.Event()
    done_waiting = threading.Event()
    states = []

    def operation():
        with g.hold():
            states.append(gate.holding())
            with gate.released():
                states.append(gate.holding())
                waiting.set()
                done_waiting.wait(BOUND)
            states.append(gate.holding())

    t = threading.Thread(target=operation)
    t.start()
    assert waiting.wait(BOUND)
    # The slot is free while the operation waits: another thread takes it.
    got = threading.Event()
    leave = threading.Event()

    def other():
        with g.hold():
            got.set()
            leave.wait(BOUND)

    threads = [t, threading.Thread(target=other)]
    threads[1].start()
    assert got.wait(BOUND)
    # The operation's wait ends, but it runs on only once the slot is
    # free again.
    done_waiting.set()
    t.join(0.2)
    assert t.is_alive() and len(states) == 2
    leave.set()
    _join(threads)
    assert states == [True, False, True]


def test_released_is_a_no_op_in_a_thread_holding_no_slot():
    # In-vdsm mode: vdsm's threads call the API holding no slot; the
    # waits inside must not give away a slot that is not theirs.
    g = gate.Gate(1)
    inside = threading.Event()
    leave = threading.Event()

    def holder():
        with g.hold():
            inside.set()
            leave.wait(BOUND)

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(BOUND)
    assert not gate.holding()
    with gate.released():
        assert g._slots.locked()    # still the holder's
    assert g._slots.locked()
    leave.set()
    _join([t])
    assert not g._slots.locked()


def test_nested_hold_and_released_take_and_give_one_slot():
    g = gate.Gate(1)
    with g.hold():
        with g.hold():
            assert gate.holding()
        assert gate.holding() and g._slots.locked()
        with gate.released():
            with gate.released():
                assert not g._slots.locked()
            assert not gate.holding() and not g._slots.locked()
        assert gate.holding() and g._slots.locked()
    assert not gate.holding() and not g._slots.locked()


def test_a_slot_holder_that_raises_gives_its_slot_back():
    g = gate.Gate(1)
    with pytest.raises(RuntimeError):
        with g.hold():
            with gate.released():
                raise RuntimeError("failed while waiting")
    assert not gate.holding() and not g._slots.locked()
    with pytest.raises(RuntimeError):
        with g.hold():
            raise RuntimeError("failed while running")
    assert not gate.holding() and not g._slots.locked()


def test_pool_jobs_hold_a_slot_and_a_failing_job_gives_it_back():
    g = gate.Gate(1)
    pool = workers.Pool(2, 0, name="gated-pool", gate=g)
    seen = []
    done = threading.Event()

    def boom():
        raise RuntimeError("job exploded")

    def job():
        seen.append(gate.holding())
        done.set()

    try:
        assert pool.submit(boom)
        agentutil.wait_for(lambda: pool.pending == 0)
        assert pool.submit(job)
        assert done.wait(BOUND)
        assert seen == [True]
        agentutil.wait_for(lambda: pool.pending == 0)
        assert not g._slots.locked()
    finally:
        pool.stop()


def test_pool_delivers_an_answer_holding_the_slot_its_job_held():
    # Given back before, the operation it woke and this thread writing
    # the answer would pass the interpreter lock to each other.
    g = gate.Gate(1)
    pool = workers.Pool(2, 0, name="gated-pool", gate=g)
    seen = []
    done = threading.Event()

    def deliver():
        seen.append((gate.holding(), pool.pending))
        done.set()

    try:
        assert pool.submit(lambda: deliver)
        assert done.wait(BOUND)
        # The pool's own slot is free already: a client's next operation
        # sent on reading the answer is not refused.
        assert seen == [(True, 0)]
        agentutil.wait_for(lambda: not g._slots.locked())
    finally:
        pool.stop()


def test_a_gate_needs_a_slot():
    with pytest.raises(ValueError):
        gate.Gate(0)


# No deadlock, real parts

@pytest.mark.root
def test_same_volume_second_operation_waits_slotless_while_first_in_privsep(
        real_service, tmp_path):
    # The attach holds the volume's lock inside a slow privsep call; the
    # detach of the same volume waits for that lock.  Both must have
    # given their slot back: an operation on another volume runs to its
    # end meanwhile, and then both finish.
    svc = real_service
    g = gate.Gate(1)
    release = str(tmp_path / "release")
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_wait=release)
    key = ci["data"]["fake_key"]
    results = {}
    first = _holding(g, results, "attach",
                     lambda: svc.attach_volume(vol_id, ci))
    agentutil.wait_for(lambda: "connect-start " + key in fakebrick.calls())
    second = _holding(g, results, "detach",
                      lambda: svc.detach_volume(vol_id))
    lock_path = locking.lock_path(svc.cfg.lock_dir, vol_id)
    agentutil.wait_for(lambda: _lock_users(lock_path) == 2)

    other_id = new_id()
    other = _holding(g, results, "other", lambda: (
        svc.attach_volume(other_id, iscsi_connection(svc.cfg)),
        svc.detach_volume(other_id)))
    _join([other])
    assert not isinstance(results["other"], Exception), results
    assert first.is_alive() and second.is_alive()

    with open(release, "w"):
        pass
    _join([first, second])
    assert results["attach"]["vol_id"] == vol_id
    assert results["detach"]["vol_id"] == vol_id
    assert key not in fakebrick.connected()


@pytest.mark.root
@pytest.mark.slow
def test_privsep_daemon_restart_while_eight_operations_wait(
        tmp_path, real_fakebrick_dir):
    # Eight attaches wait in the connector, each holding the volume's
    # lock; their daemon dies.  Each rollback asks a new daemon to
    # disconnect: one thread starts it under the client's lock while
    # seven wait for that lock, all without a slot.  Then a new round of
    # eight runs on the new daemon.
    cfg = make_cfg(tmp_path)
    svc = service.Service(cfg)      # its own daemon: killed below
    svc.start()
    try:
        g = gate.Gate(1)
        release = str(tmp_path / "release")
        conns = {new_id(): iscsi_connection(cfg, fake_wait=release)
                 for _ in range(8)}
        results = {}
        threads = [_holding(g, results, vol_id,
                            lambda v=vol_id, c=ci: svc.attach_volume(v, c))
                   for vol_id, ci in conns.items()]
        started = {"connect-start " + ci["data"]["fake_key"]
                   for ci in conns.values()}
        agentutil.wait_for(lambda: started <= set(fakebrick.calls()))
        old_pid = svc._brick.daemon_pid()
        os.kill(old_pid, signal.SIGKILL)
        _join(threads)
        assert {type(r) for r in results.values()} == {errors.HelperFailed}
        assert svc._brick.daemon_pid() not in (None, old_pid)
        assert svc.volumes_info(list(conns)) == []  # rolled back
        with open(release, "w"):
            pass

        results.clear()
        threads = [_holding(g, results, vol_id, lambda v=vol_id: (
            svc.attach_volume(v, iscsi_connection(cfg)),
            svc.detach_volume(v))) for vol_id in conns]
        _join(threads)
        assert not [r for r in results.values() if isinstance(r, Exception)]
    finally:
        svc.close()


@pytest.mark.root
def test_agent_stops_with_gated_operations_in_flight(real_service,
                                                      tmp_path):
    # Eight attaches wait in the connector when the stop begins: the
    # drain waits for them, they finish (each taking its slot back), and
    # the server stops.  Nothing in the stop needs a slot.
    cfg = agentutil.make_config(tmp_path / "agent", max_operations=8)
    run = agentutil.Running(cfg, jsonrpc.Dispatcher(real_service))
    release = str(tmp_path / "release")
    volumes = {}
    try:
        volumes.update(agentutil.blocked_attaches(run, real_service, release,
                                                  8, timeout=BOUND))
        stopper = threading.Thread(target=run.stop, args=(BOUND,))
        stopper.start()
        agentutil.wait_for(run.server._stopping.is_set)
        with open(release, "w"):
            pass
        for key, (vol_id, client) in volumes.items():
            reply = json.loads(client.frame().body)
            assert reply["result"]["vol_id"] == vol_id
            assert key in fakebrick.connected()
        _join([stopper])
    finally:
        for _, client in volumes.values():
            client.close()
        run.stop()
    # In-vdsm mode: this thread holds no slot; the service works as ever.
    for key, (vol_id, _) in volumes.items():
        real_service.detach_volume(vol_id)
        assert key not in fakebrick.connected()


@pytest.mark.root
def test_a_thread_holding_no_slot_never_waits_for_the_gate(real_service):
    # vdsm calls the API in its own threads: a slot held elsewhere (here
    # forever) must not stop them.
    g = gate.Gate(1)
    inside = threading.Event()
    leave = threading.Event()

    def holder():
        with g.hold():
            inside.set()
            leave.wait(BOUND)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(BOUND)
        vol_id = new_id()
        real_service.attach_volume(vol_id, iscsi_connection(real_service.cfg))
        real_service.detach_volume(vol_id)
    finally:
        leave.set()
        _join([t])


# Private helpers

def _holding(g, results, name, func):
    """Run ``func`` in a thread holding a slot of ``g``, as an operation
    thread of the agent does; its result or exception goes to
    ``results[name]``."""
    def run():
        with g.hold():
            try:
                results[name] = func()
            except Exception as e:
                results[name] = e

    t = threading.Thread(target=run, name="operation-" + str(name),
                         daemon=True)
    t.start()
    return t


def _join(threads):
    for t in threads:
        t.join(BOUND)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, "deadlocked: {}".format(alive)


def _lock_users(path):
    """Threads holding or waiting for the volume lock at ``path``."""
    with locking._registry_lock:
        entry = locking._thread_locks.get(path)
        return entry[1] if entry else 0
