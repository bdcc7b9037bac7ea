"""The standalone agent in two processes (``hop.py``).

The hop's units run both ends in this process (a socketpair, the back's
threads): ids, interleaving, big frames, errors and results that make
the same wire bytes as one process, secrets never in its log lines.
The rest runs the real ``managedvolume-agent`` (``agent_process_test
.AgentProcess``): the control plane beside 32 slow attaches, the two
processes living and dying as one, SIGHUP, the busy code, a clean stop.
"""

import json
import logging
import marshal
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import hop
from vdsm_managedvolume import jsonrpc

from . import agentutil
from . import fakebrick
from .agent_process_test import (AgentProcess, attach_held, back_pid,
                                 back_pids, connected_keys, iscsi, new_id)


# The hop, both ends here

class FakeService:
    """The Service methods the front calls; ``behaviour[name]`` decides
    what each does (a callable of the call's args)."""

    def __init__(self, **behaviour):
        self.behaviour = behaviour
        self.cfg = config.Config()

    def _do(self, name, *args):
        return self.behaviour[name](*args)

    def attach_volume(self, vol_id, connection_info, sd_id=hop.validate
                      .BLANK_UUID):
        return self._do("attach_volume", vol_id, connection_info, sd_id)

    def detach_volume(self, vol_id, sd_id=hop.validate.BLANK_UUID):
        return self._do("detach_volume", vol_id, sd_id)

    def extend_volume(self, vol_id, sd_id=hop.validate.BLANK_UUID,
                      new_size=None):
        return self._do("extend_volume", vol_id, sd_id, new_size)

    def volumes_info(self, vol_ids=(), include_secrets=False):
        return self._do("volumes_info", vol_ids, include_secrets)

    def connector_info(self, refresh=False, stale_ok=False):
        return self._do("connector_info", refresh, stale_ok)

    def caps(self):
        return {"connector_info": {"host": "h"}}

    def connector_info_age(self):
        return 1.25

    def close(self, timeout=None):
        pass


class Hop:
    """Both ends of a hop in this process."""

    def __init__(self, service, **cfg_overrides):
        cfg = config.Config()
        for key, value in cfg_overrides.items():
            setattr(cfg, key, value)
        self.front_sock, back_sock = socket.socketpair()
        self._wake_r, wake_w = socket.socketpair()
        self.back = hop.Back(cfg, back_sock, service, wake_w)
        self.client = hop.Client(self.front_sock, os.getpid())
        self.back.start()
        assert self.client.read_ready() == os.getpid()
        self.proxy = hop.Proxy(self.client, cfg)

    def close(self):
        try:
            self.client.send("close", (5,))
        except OSError:
            pass        # broken(): the back stops at its EOF
        assert self.back.done.wait(10)
        self.client.close()


@pytest.fixture
def make_hop():
    hops = []

    def make(service, **kw):
        h = Hop(service, **kw)
        hops.append(h)
        return h

    yield make
    for h in hops:
        h.close()


def test_calls_in_flight_at_once_each_get_their_own_answer(make_hop):
    # Answers come back in another order than the calls went: each caller
    # gets its own (ids), whoever of them read it.
    def volumes_info(vol_ids, include_secrets):
        time.sleep(0.001 * (20 - int(vol_ids[0])))
        return [{"vol_id": vol_ids[0]}]

    h = make_hop(FakeService(volumes_info=volumes_info))
    results = {}

    def call(i):
        results[i] = h.proxy.volumes_info([str(i)])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: [{"vol_id": str(i)}] for i in range(20)}


def test_big_frames_cross_whole(make_hop):
    big = [{"vol_id": str(i), "path": "x" * 1000} for i in range(5000)]
    h = make_hop(FakeService(volumes_info=lambda ids, s: big))
    results = []
    threads = [threading.Thread(
        target=lambda: results.append(h.proxy.volumes_info([])))
        for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [big] * 4


def test_values_cross_as_they_are(make_hop):
    # What msgpack cannot carry as such: lone surrogates (a JSON \ud800),
    # ints beyond 64 bits; tuples stay tuples; subclasses go as their
    # plain type.
    value = {"s": "a\ud800b", "n": 1 << 100, "neg": -(1 << 70),
             "t": (1, 2.5, None, True), "f": float("inf")}
    seen = []

    def attach(vol_id, connection_info, sd_id):
        seen.append(connection_info)
        return value

    h = make_hop(FakeService(attach_volume=attach))
    assert h.proxy.attach_volume("v", {"x": "\udfff", "big": 1 << 65}) \
        == value
    assert seen == [{"x": "\udfff", "big": 1 << 65}]
    plain = marshal.loads(hop.encode({"a": type("S", (str,), {})("x")}))
    assert plain == {"a": "x"} and type(plain["a"]) is str


def test_getcapabilities_is_one_hop(make_hop):
    calls = []
    h = make_hop(FakeService())
    original = h.client.call

    def counted(method, args):
        calls.append(method)
        return original(method, args)

    h.client.call = counted
    from vdsm_managedvolume import api
    caps = api.get_caps(h.proxy)
    assert caps["connector_info"] == {"host": "h"}
    assert caps["managedvolume"]["connector_info_age"] == 1.2
    assert calls == ["caps"]


ERRORS = [
    errors.AlreadyAttached("volume v is attached with other \ud800 info"),
    errors.NotSupported("no os-brick"),
    errors.HelperTimeout("privsep call timed out after 120 s"),
    errors.StoreError("journal: disk I/O error"),
    errors.InvalidParams("vol_id {!r}: not a UUID".format("x\udc80y")),
    KeyError("auth_password=s3cr3tpassw0rd"),
    ValueError("a value\nover lines"),
    # Builtins whose constructors want more than a message.
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    subprocess.CalledProcessError(5, ["iscsiadm", "-m", "node"]),
    json.JSONDecodeError("Expecting value", "x", 0),
]


@pytest.mark.parametrize("error", ERRORS,
                         ids=[type(e).__name__ for e in ERRORS])
def test_errors_are_the_wire_bytes_of_one_process(make_hop, error):
    def fail(*args):
        raise error

    service = FakeService(attach_volume=fail)
    h = make_hop(service)
    request = json.dumps({
        "jsonrpc": "2.0", "id": "r1", "method":
        "ManagedVolume.attach_volume", "params": {
            "vol_id": "6c6e8a5e-7d3b-4b59-9b7a-2f8d3c3e1a01",
            "connection_info": {"driver_volume_type": "iscsi",
                                "data": {"auth_password": "s3cr3t"}}}})
    one = jsonrpc.Dispatcher(service).handle(request.encode())
    two = jsonrpc.Dispatcher(h.proxy).handle(request.encode())
    assert two == one
    assert b"s3cr3t" not in two


def test_results_are_the_wire_bytes_of_one_process(make_hop):
    result = {"vol_id": "6c6e8a5e-7d3b-4b59-9b7a-2f8d3c3e1a01",
              "path": "/dev/mapper/\ud800x", "size": 1 << 80,
              "attachment": {"auth_password": "s3cr3t", "scsi_wwn": "36"},
              "managed_path": "/run/vdsm/managedvolumes/x"}
    service = FakeService(attach_volume=lambda *a: result,
                          volumes_info=lambda ids, s: [result])
    h = make_hop(service)
    for method, params in (
            ("ManagedVolume.attach_volume",
             {"vol_id": result["vol_id"],
              "connection_info": {"driver_volume_type": "iscsi",
                                  "data": {}}}),
            ("ManagedVolume.volumes_info", {"vol_ids": []}),
            ("Host.getCapabilities", {})):
        request = json.dumps({"jsonrpc": "2.0", "id": "r1",
                              "method": method, "params": params})
        one = jsonrpc.Dispatcher(service).handle(request.encode())
        two = jsonrpc.Dispatcher(h.proxy).handle(request.encode())
        assert two == one, method
        if method != "ManagedVolume.volumes_info":
            # (volumes_info's results are the service's to mask.)
            assert b"s3cr3t" not in two


def test_frames_are_never_logged(make_hop, caplog):
    secret = "chap-secret-4f1d2a"

    def attach(vol_id, connection_info, sd_id):
        raise RuntimeError("boom")

    h = make_hop(FakeService(attach_volume=attach,
                             volumes_info=lambda ids, s: [{"p": secret}]))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError):
        h.proxy.attach_volume("v", {"data": {"auth_password": secret}})
    assert h.proxy.volumes_info([], True) == [{"p": secret}]
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in (record.exc_text or "")


def test_a_back_that_ends_fails_the_calls_in_flight_and_new_ones(make_hop):
    started = threading.Event()
    release = threading.Event()

    def slow(*args):
        started.set()
        release.wait(10)
        return {}

    h = make_hop(FakeService(attach_volume=slow))
    failure = []

    def call():
        try:
            h.proxy.attach_volume("v", {})
        except errors.InternalError as e:
            failure.append(e)

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(10)
    h.client.broken()
    t.join(10)
    release.set()
    assert failure and failure[0].code == -32603
    assert "outcome of this call is unknown" in str(failure[0])
    with pytest.raises(hop.BackEnded):
        h.proxy.volumes_info([])


def test_control_calls_never_wait_behind_operations(make_hop):
    # Every operation thread of the back busy: a control call still runs.
    release = threading.Event()
    h = make_hop(FakeService(attach_volume=lambda *a: release.wait(30),
                             volumes_info=lambda ids, s: []),
                 max_operations=4, workers=2)
    threads = [threading.Thread(target=h.proxy.attach_volume,
                                args=("v", {})) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert h.proxy.volumes_info([]) == []
        assert all(t.is_alive() for t in threads)
    finally:
        release.set()
        for t in threads:
            t.join(30)


# The agent in two processes

def started(agent):
    """Connects the fake array began."""
    return sum(line.startswith("connect-start ")
               for line in fakebrick.calls(agent.fakebrick_dir))


def gone(pid):
    try:
        with open("/proc/{}/status".format(pid)) as f:
            return "State:\tZ" in f.read()
    except FileNotFoundError:
        return True


@pytest.mark.root
def test_control_plane_answers_while_32_attaches_wait_at_the_array(
        tmp_path):
    agent = AgentProcess(tmp_path, insecure=True).start()
    try:
        conns = [iscsi(agent, fake_sleep=5) for _ in range(32)]
        attaches = [attach_held(agent, new_id(), c) for c in conns]
        agentutil.wait_for(lambda: started(agent) >= 32)
        with agent.client() as c:
            caps = c.call("Host.getCapabilities", {})
            infos = c.call("ManagedVolume.volumes_info", {})
        # Answered while every attach still waits at the array.
        assert all(a.thread.is_alive() for a in attaches)
        assert "connector_info" in caps
        assert len(infos) == 32
        for a in attaches:
            assert a.join(120).result, a.error
    finally:
        assert agent.stop() == 0


@pytest.mark.root
def test_a_killed_back_end_stops_the_agent_with_exit_1(tmp_path):
    agent = AgentProcess(tmp_path, insecure=True).start()
    try:
        pid = back_pid(agent)
        os.kill(pid, signal.SIGKILL)
        assert agent.proc.wait(60) == 1
        text = agent.log()
        assert "The back end (pid {}) ended unasked (killed by SIGKILL): " \
            "the agent exits, as if it had crashed".format(pid) in text
        assert not os.path.exists(agent.cfg.socket_path)
    finally:
        agent.stop(signal.SIGKILL)


@pytest.mark.root
def test_a_killed_agent_takes_its_back_end_and_the_restart_reconciles(
        tmp_path):
    agent = AgentProcess(tmp_path, insecure=True).start()
    vol_id = new_id()
    conn = iscsi(agent, fake_sleep=60, fake_blind_disconnect=True)
    key = conn["data"]["fake_key"]
    attach_held(agent, vol_id, conn)
    try:
        agentutil.wait_for(lambda: "connect-start " + key in
                           fakebrick.calls(agent.fakebrick_dir))
        pid = back_pid(agent)
        agent.proc.kill()
        assert agent.proc.wait(60) == -signal.SIGKILL
        # PR_SET_PDEATHSIG: the kernel kills the back with the front.
        agentutil.wait_for(lambda: gone(pid), timeout=30)
    finally:
        agent.stop(signal.SIGKILL)
    # Started at once: the lock may still be the dying back's for a
    # moment (the agent retries it).
    agent = AgentProcess(tmp_path, insecure=True).start()
    try:
        assert "Reconcile {} (attaching): rollback".format(vol_id) \
            in agent.log()
        assert key not in connected_keys(agent)
    finally:
        assert agent.stop() == 0


@pytest.mark.root
def test_sighup_reopens_the_log_in_both_processes_at_every_start(
        tmp_path):
    # A signal lands in any thread of a process; the main thread, which
    # runs the Python handler, must wake for it (it missed 1 reopen in
    # 6-10 starts when it slept in a lock).
    for i in range(10):
        agent = AgentProcess(tmp_path / str(i), insecure=True).start()
        try:
            os.rename(agent.log_file, agent.log_file + ".1")
            agent.proc.send_signal(signal.SIGHUP)
            agentutil.wait_for(lambda: os.path.exists(agent.log_file)
                               and agent.log().count(
                                   "Log file reopened (SIGHUP)") == 2,
                               timeout=30)
            text = agent.log()
            assert "(MainThread) [managedvolume.agent]" in text
            assert "(back) [managedvolume.hop]" in text
        finally:
            assert agent.stop() == 0


@pytest.mark.root
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_signals_while_the_back_end_starts(tmp_path, stop):
    # The back end's start reconciles; storage trouble can hold it.
    # Meanwhile SIGHUP reopens the log in both processes (it killed the
    # agent: its default action), and SIGTERM or SIGINT stops the agent:
    # the back end closes once its start ended, exit 0, never READY=1
    # (review16 L5).
    barrier = str(tmp_path / "barrier")
    agent = AgentProcess(tmp_path, insecure=True).start()
    vol_id = new_id()
    conn = iscsi(agent, fake_sleep=60, fake_blind_disconnect=True,
                 fake_wait_disconnect=barrier)
    key = conn["data"]["fake_key"]
    attach_held(agent, vol_id, conn)
    try:
        agentutil.wait_for(lambda: "connect-start " + key in
                           fakebrick.calls(agent.fakebrick_dir))
    finally:
        agent.stop(signal.SIGKILL)
    # Its reconcile rolls the attach back: the disconnect waits for the
    # barrier.
    agent = AgentProcess(tmp_path, insecure=True).start(ready=False)
    try:
        agentutil.wait_for(lambda: "disconnect-start " + key in
                           fakebrick.calls(agent.fakebrick_dir))
        os.rename(agent.log_file, agent.log_file + ".1")
        agent.proc.send_signal(signal.SIGHUP)
        agentutil.wait_for(lambda: os.path.exists(agent.log_file) and
                           "Log file reopened (SIGHUP)" in agent.log())
        agent.proc.send_signal(stop)
        message = agent.wait_notify("STOPPING=1")
        assert "READY=1" not in message.splitlines()
        assert "Received {} before serving: stopping".format(
            stop.name) in agent.log()
        assert agent.proc.poll() is None    # until the start ends
        with open(barrier, "w"):
            pass
        assert agent.proc.wait(60) == 0
        text = agent.log()
        assert "Reconcile {} (attaching): rollback".format(vol_id) in text
        assert "Agent stopped before serving" in text
        assert "Listening on" not in text
        assert text.count("Log file reopened (SIGHUP)") == 2
        assert key not in connected_keys(agent)
    finally:
        agent.stop(signal.SIGKILL)


@pytest.mark.root
def test_the_busy_code_at_the_limit(tmp_path):
    agent = AgentProcess(tmp_path, insecure=True,
                         agent_config="max_operations = 2\n")
    agent.start()
    try:
        conns = [iscsi(agent, fake_sleep=3) for _ in range(2)]
        attaches = [attach_held(agent, new_id(), c) for c in conns]
        agentutil.wait_for(lambda: started(agent) >= 2)
        with agent.client() as c:
            with pytest.raises(errors.AgentBusy) as e:
                c.call("ManagedVolume.attach_volume",
                       {"vol_id": new_id(),
                        "connection_info": iscsi(agent)})
            assert e.value.code == 933
        for a in attaches:
            a.join(60)
    finally:
        assert agent.stop() == 0


@pytest.mark.root
def test_sigterm_stops_both_within_shutdown_timeout(tmp_path):
    agent = AgentProcess(tmp_path, insecure=True, shutdown_timeout=3)
    agent.start()
    conn = iscsi(agent, fake_sleep=120)
    attach_held(agent, new_id(), conn)     # cut by the stop
    try:
        agentutil.wait_for(lambda: "connect-start " + conn["data"][
            "fake_key"] in fakebrick.calls(agent.fakebrick_dir))
        pid = back_pid(agent)
        agent.proc.send_signal(signal.SIGTERM)
        # Liveness, not a measurement.
        assert agent.proc.wait(20) == 0
        assert gone(pid)
        assert "Agent stopped" in agent.log()
    finally:
        agent.stop(signal.SIGKILL)


@pytest.mark.root
def test_one_process_on_request(tmp_path):
    agent = AgentProcess(tmp_path, insecure=True,
                         agent_config="processes = 1\n").start()
    try:
        assert back_pids(agent) == []
        with agent.client() as c:
            assert "managedvolume" in c.call("Host.getCapabilities", {})
        assert "Back end started" not in agent.log()
    finally:
        assert agent.stop() == 0


def test_processes_is_1_or_2(tmp_path):
    path = tmp_path / "managedvolume.conf"
    path.write_text("[agent]\nprocesses = 3\n")
    with pytest.raises(errors.ConfigError, match="processes = 3 is not 1 "
                       "or 2"):
        config.load(str(path))


@pytest.mark.root
def test_a_back_end_that_cannot_start_stops_the_agent_at_once(tmp_path):
    # The journal cannot be opened (a directory where the file goes): the
    # back end says why and exits 1; the agent exits with it, without
    # waiting for anything, and never says READY=1.
    agent = AgentProcess(tmp_path, insecure=True)
    os.makedirs(os.path.join(agent.state_dir, "lib", "managedvolume.db"))
    with pytest.raises(AssertionError, match="did not notify READY=1; "
                       "rc=1") as e:
        agent.start(timeout=60)
    try:
        # One line on stderr, the back end's.
        assert str(e.value).count("managedvolume-agent: ") == 1
        text = agent.log()
        assert "(back) [managedvolume.hop] [flow=-] Cannot start: " in text
        assert "failed to start (exit status 1)" in text
        assert "Listening on" not in text
    finally:
        agent.stop()
