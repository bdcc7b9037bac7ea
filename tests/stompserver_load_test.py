"""The server under load: the data plane runs operations at once, bounded,
and never holds up the control plane.

Real parts: the STOMP server, the JSON-RPC dispatcher, the service and
its journal, the session's privsep daemon running the fake iSCSI
connector (tests/fakebrick.py).  Each blocked attach waits in the
connector on a barrier file (``fake_wait``): the tests learn that calls
are inside the connector from its "connect-start" lines and release them
by creating the file, so nothing depends on how fast this machine is.
"""

import json
import os
import socket
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import jsonrpc
from vdsm_managedvolume import stompserver

from . import agentutil
from . import fakebrick
from .host_fixtures import iscsi_connection, new_id

@pytest.fixture
def serve(tmp_path, real_service):
    """serve(**cfg) -> a running agent over ``real_service``."""
    started = []

    def start(**overrides):
        cfg = agentutil.make_config(tmp_path / "agent", **overrides)
        run = agentutil.Running(
            cfg, jsonrpc.Dispatcher(real_service),
            connector_info=lambda: real_service.connector_info(
                stale_ok=True))
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()


@pytest.mark.root
def test_attaches_of_distinct_volumes_run_at_once_while_control_answers(
        serve, real_service, tmp_path):
    run = serve(workers=2, max_operations=16)
    release = str(tmp_path / "release")
    volumes = agentutil.blocked_attaches(run, real_service, release, count=12)
    # All twelve are inside the connector at the same time: more than the
    # control plane's two workers, more than the CPU count.
    with run.raw() as control:
        control.connect()
        control.subscribe()
        _, caps = control.call(agentutil.request("Host.getCapabilities"))
        assert "connector_info" in caps["result"]
        _, info = control.call(agentutil.request(
            "ManagedVolume.volumes_info", {"vol_ids": []}))
        recorded = {v["vol_id"] for v in info["result"]}
        assert {vol_id for vol_id, _ in volumes.values()} <= recorded
        # Plain STOMP verbs too: a receipt comes back at once.
        control.send(b"SUBSCRIBE\ndestination:other\nid:sub-2\n"
                     b"receipt:r-1\n\n\0")
        assert control.frame().headers["receipt-id"] == "r-1"
    # And the after_get_caps hook's control socket.
    with socket.socket(socket.AF_UNIX) as hook:
        hook.settimeout(10)
        hook.connect(run.cfg.socket_path)
        line = json.loads(hook.makefile("rb").readline())
    assert line["connector_info"] == caps["result"]["connector_info"]
    _release_and_check(volumes, release)


@pytest.mark.root
def test_an_operation_beyond_max_operations_is_refused_at_once(
        serve, real_service, tmp_path):
    run = serve(workers=2, max_operations=2)
    release = str(tmp_path / "release")
    volumes = agentutil.blocked_attaches(run, real_service, release, count=2)
    with run.raw() as other:
        other.connect()
        other.subscribe()
        vol_id = new_id()
        _, busy = other.call(agentutil.request(
            "ManagedVolume.attach_volume",
            {"vol_id": vol_id,
             "connection_info": iscsi_connection(real_service.cfg)}))
        assert busy["error"]["code"] == errors.TooManyOperations.code == 933
        assert "max_operations" in busy["error"]["message"]
        _, detach = other.call(agentutil.request(
            "ManagedVolume.detach_volume", {"vol_id": vol_id}))
        assert detach["error"]["code"] == 933
        # Nothing of the refused attach reached the host or the journal.
        _, info = other.call(agentutil.request(
            "ManagedVolume.volumes_info", {"vol_ids": [vol_id]}))
        assert info["result"] == []
        # The control plane is not part of the limit.
        _, caps = other.call(agentutil.request("Host.getCapabilities"))
        assert "result" in caps
    _release_and_check(volumes, release)
    # The slots are free again.
    with run.raw() as client:
        client.connect()
        client.subscribe()
        vol_id = new_id()
        _, attached = client.call(agentutil.request(
            "ManagedVolume.attach_volume",
            {"vol_id": vol_id,
             "connection_info": iscsi_connection(real_service.cfg)}))
        assert attached["result"]["vol_id"] == vol_id
        _, detached = client.call(agentutil.request(
            "ManagedVolume.detach_volume", {"vol_id": vol_id}))
        assert detached["result"] is True


@pytest.mark.root
def test_a_second_operation_on_one_volume_waits_for_its_lock(
        serve, real_service, tmp_path):
    run = serve(max_operations=8)
    release = str(tmp_path / "release")
    volumes = agentutil.blocked_attaches(run, real_service, release, count=1)
    (key, (vol_id, client)), = volumes.items()
    client.send(agentutil.send_bytes(agentutil.request(
        "ManagedVolume.detach_volume", {"vol_id": vol_id},
        request_id="detach"), "reply-queue"))
    with open(release, "w"):
        pass
    replies = {}
    for _ in range(2):
        frame = client.frame()
        body = json.loads(frame.body)
        replies[body["id"]] = body
    client.close()
    # The detach ran after the attach, under the volume's lock.
    assert replies[vol_id]["result"]["vol_id"] == vol_id
    assert replies["detach"]["result"] is True
    assert key not in fakebrick.connected()


def test_operations_run_one_at_a_time_and_control_never_waits_for_them(
        tmp_path):
    # An operation holding its run slot (``gate``) while it computes
    # (the stub's "wait" gives nothing back) holds up the next operation,
    # never a control request nor the hook's control socket.
    class Stub(agentutil.StubDispatcher):
        def is_operation(self, body):
            return b'"sleep"' not in body

    stub = Stub()
    cfg = agentutil.make_config(tmp_path / "agent", max_operations=4)
    run = agentutil.Running(cfg, stub,
                            connector_info=lambda: {"initiator": "iqn.x"})
    try:
        with run.raw() as first, run.raw() as second, \
                run.raw() as control:
            for client in (first, second, control):
                client.connect()
                client.subscribe()
            first.send(agentutil.send_bytes(agentutil.request("wait"),
                                            "reply-queue"))
            assert stub.started.acquire(timeout=30)
            second.send(agentutil.send_bytes(agentutil.request(
                "echo", {"n": 2}), "reply-queue"))
            agentutil.wait_for(lambda: run.server._operations.pending == 2)
            _, answer = control.call(agentutil.request(
                "sleep", {"seconds": 0}))
            assert answer["result"] is True
            # Nor does the after_get_caps hook's control socket wait.
            with socket.socket(socket.AF_UNIX) as hook:
                hook.settimeout(10)
                hook.connect(run.cfg.socket_path)
                line = json.loads(hook.makefile("rb").readline())
            assert line["connector_info"] == {"initiator": "iqn.x"}
            # The second operation has not started: it waits for the slot.
            assert len(stub.bodies) == 2
            stub.release.set()
            assert json.loads(first.frame().body)["result"] is True
            reply = json.loads(second.frame().body)
            assert reply["result"]["params"] == {"n": 2}
    finally:
        stub.release.set()
        run.stop()


def test_pool_starts_threads_when_needed_and_refuses_beyond_its_bound():
    pool = stompserver.Pool(4, 0, name="lazy-pool")
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
    pool = stompserver.Pool(2, 0, name="handoff-pool")
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
    pool = stompserver.Pool(1, 2, name="queue-pool")
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
    # second one for nothing at every job).
    pool = stompserver.Pool(8, 0, name="wake-pool")
    barrier = threading.Barrier(9)
    done = threading.Event()
    runners = []

    def job():
        runners.append(threading.get_native_id())
        done.set()

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
        assert len(set(runners)) <= 3, set(runners)
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
    pool = stompserver.Pool(3, 0, name="gone-pool")
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
    pool = stompserver.Pool(4, 100, name="burst-pool")
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


def _release_and_check(volumes, release):
    with open(release, "w"):
        pass
    for key, (vol_id, client) in volumes.items():
        frame = client.frame()
        reply = json.loads(frame.body)
        assert reply["id"] == vol_id
        assert reply["result"]["vol_id"] == vol_id
        assert key in fakebrick.connected()
        client.send(agentutil.send_bytes(agentutil.request(
            "ManagedVolume.detach_volume", {"vol_id": vol_id}),
            "reply-queue"))
        assert json.loads(client.frame().body)["result"] is True
        client.close()
        assert key not in fakebrick.connected()
    os.unlink(release)


def _switches(tid):
    """Voluntary context switches of this process's thread ``tid``."""
    with open("/proc/self/task/{}/status".format(tid)) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches for {}".format(tid))
