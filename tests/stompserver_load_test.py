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
def test_a_request_no_thread_can_run_is_refused_933_and_the_server_goes_on(
        serve, real_service, monkeypatch):
    # Pool.submit raises when the system refuses a thread (TasksMax): the
    # I/O thread answers that request and goes on serving.
    run = serve(workers=2, max_operations=4)
    pool = run.server._operations
    real_submit = pool.submit

    def no_thread(fn, handoff=None):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(pool, "submit", no_thread)
    with run.raw() as client:
        client.connect()
        client.subscribe()
        vol_id = new_id()
        attach = agentutil.request(
            "ManagedVolume.attach_volume",
            {"vol_id": vol_id,
             "connection_info": iscsi_connection(real_service.cfg)})
        _, refused = client.call(attach)
        assert refused["error"]["code"] == errors.NoThread.code == 933
        assert "cannot start a worker thread" in refused["error"]["message"]
        _, info = client.call(agentutil.request(
            "ManagedVolume.volumes_info", {"vol_ids": [vol_id]}))
        assert info["result"] == []
        monkeypatch.setattr(pool, "submit", real_submit)
        _, attached = client.call(attach)
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

