"""The real ``managedvolume-agent`` console script, as a process.

Each agent runs with ``--state-dir`` in a temporary directory, its own
config file (``connector_override = tests.fakebrick``: fake iSCSI volumes
in the privsep daemon, the real os-brick for ``local``), and a
NOTIFY_SOCKET on which the test hears READY=1 (with the port) and
STOPPING=1, as systemd would.  One agent serves most tests of the module
(its privsep daemon costs seconds); the tests that kill or restart an agent
start their own.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import uuid

import pytest

from vdsm_managedvolume import agent
from vdsm_managedvolume import errors
from vdsm_managedvolume import pki
from vdsm_managedvolume import stompclient

from . import agentutil
from . import fakebrick
from . import lifeline
from .agentutil import Raw, send_bytes
from .host_fixtures import iscsi_connection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(os.path.dirname(sys.executable), "managedvolume-agent")
BLANK = "00000000-0000-0000-0000-000000000000"

_benchutil = agentutil.bench_module("benchutil")

# The agent's privsep daemon runs as root, without sudo.
pytestmark = pytest.mark.root


class AgentProcess:
    """A ``managedvolume-agent`` subprocess with its own state dir."""

    def __init__(self, base, insecure=False, env=None, extra_config="",
                 argv_prefix=(), shutdown_timeout=30, new_session=False,
                 agent_config=""):
        self.base = str(base)
        # Runs the agent under another command (flowengine: its own
        # hostname in a UTS namespace).
        self.argv_prefix = list(argv_prefix)
        self.state_dir = os.path.join(self.base, "state")
        self.fakebrick_dir = os.path.join(self.base, "fakebrick")
        self.dev = types.SimpleNamespace(
            multipath_dir=os.path.join(self.base, "dev", "mapper"),
            rbd_dir=os.path.join(self.base, "dev", "rbd"))
        os.makedirs(self.fakebrick_dir, exist_ok=True)
        self.udevadm = os.path.join(self.base, "udevadm")
        with open(self.udevadm, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(self.udevadm, 0o755)
        self.config_file = os.path.join(self.base, "managedvolume.conf")
        with open(self.config_file, "w") as f:
            f.write(
                "[paths]\n"
                "multipath_dir = {dev.multipath_dir}\n"
                "rbd_dir = {dev.rbd_dir}\n"
                "[volumes]\n"
                "udevadm = {udevadm}\n"
                "lock_timeout = 60\n"
                "[privsep]\n"
                "connector_override = tests.fakebrick\n"
                "timeout = 60\n"
                "[agent]\n"
                "handshake_timeout = 5\n"
                "idle_timeout = 2\n"
                "max_frame = 65536\n"
                "shutdown_timeout = {shutdown_timeout}\n"
                "{agent_config}"
                "[logging]\n"
                "log_level = DEBUG\n".format(
                    dev=self.dev, udevadm=self.udevadm,
                    shutdown_timeout=shutdown_timeout,
                    agent_config=agent_config)
                + extra_config)
        self.insecure = insecure
        # A process group of its own, as a shell gives a foreground job:
        # the test may signal the group as a terminal's Ctrl-C does.
        self.new_session = new_session
        self.extra_env = env or {}
        self.notify_path = os.path.join(self.base, "notify")
        self.log_file = os.path.join(self.state_dir, "log", "agent.log")
        self.proc = None
        self._lifeline = None
        self.port = None

    def start(self, timeout=90, ready=True):
        """Start the agent; unless ``ready`` is false, wait for its
        READY=1 (its port then in ``self.port``)."""
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.notify.bind(self.notify_path)
        env = dict(os.environ)
        env.update({
            "NOTIFY_SOCKET": self.notify_path,
            fakebrick.ENV_DIR: self.fakebrick_dir,
            "PYTHONPATH": REPO,
        })
        env.pop("MANAGEDVOLUME_CONFIG", None)
        env.update(self.extra_env)
        cmd = self.argv_prefix + [AGENT, "--config", self.config_file,
                                  "--state-dir", self.state_dir,
                                  "--listen", "127.0.0.1:0"]
        if self.insecure:
            cmd.append("--insecure")
        self._cut_lifeline()
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO,
                                     stderr=subprocess.PIPE,
                                     start_new_session=self.new_session)
        self._lifeline = lifeline.watch(self.proc, self.state_dir)
        if not ready:
            return self
        message = self.wait_notify("READY=1", timeout)
        status = [line for line in message.splitlines()
                  if line.startswith("STATUS=Listening on ")][0]
        self.port = int(status.rpartition(":")[2])
        self.cfg = agentutil.make_config(self.state_dir)
        return self

    def wait_notify(self, what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise AssertionError("agent did not notify {}; rc={} "
                                     "stderr={}".format(
                                         what, self.proc.poll(),
                                         self.stderr()))
            self.notify.settimeout(min(remaining, 1.0))
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            if what in message.splitlines():
                return message

    def stderr(self):
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    @property
    def client_context(self):
        if self.insecure:
            return None
        return pki.dev_client_context(self.cfg)

    def client(self, timeout=60):
        return stompclient.Client("localhost", self.port,
                                  self.client_context, timeout=timeout)

    def raw(self):
        return Raw(("127.0.0.1", self.port), self.client_context)

    def log(self):
        with open(self.log_file) as f:
            return f.read()

    def stop(self, signo=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signo)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.notify.close()
        self.proc.stderr.close()
        self._cut_lifeline()
        return rc

    def _cut_lifeline(self):
        """The agent ended: its lifeline ends what it left (its privsep
        daemons), and is waited for, so that it cannot take the daemon
        of an agent started next on the same state dir for one."""
        watcher, self._lifeline = self._lifeline, None
        if watcher is not None:
            lifeline.cut(watcher)


@pytest.fixture(scope="module")
def agent_proc(tmp_path_factory):
    agent = AgentProcess(tmp_path_factory.mktemp("agent")).start()
    yield agent
    assert agent.stop() == 0


def new_id():
    return str(uuid.uuid4())


def iscsi(agent, **knobs):
    return iscsi_connection(agent.dev, **knobs)


def attach_held(agent, vol_id, conn):
    """An attach over ``agent``'s wire in a thread of its own
    (``agentutil.Held``): one the fake array holds, or a stop cuts."""
    def attach():
        with agent.client(timeout=120) as c:
            return c.call("ManagedVolume.attach_volume",
                          {"vol_id": vol_id, "connection_info": conn})
    return agentutil.Held(attach)


def connected_keys(agent):
    d = os.path.join(agent.fakebrick_dir, "connected")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def all_volumes(client):
    return client.call("ManagedVolume.volumes_info", {"vol_ids": []})


# The verbs through the real service

def test_attach_info_detach_of_fake_iscsi_volume(agent_proc):
    vol_id = new_id()
    conn = iscsi(agent_proc)
    key = conn["data"]["fake_key"]
    with agent_proc.client() as c:
        result = c.call("ManagedVolume.attach_volume",
                        {"vol_id": vol_id, "connection_info": conn})
        assert result["vol_id"] == vol_id
        assert result["path"].startswith(agent_proc.dev.multipath_dir)
        assert os.path.islink(result["managed_path"])
        assert key in connected_keys(agent_proc)

        [info] = c.call("ManagedVolume.volumes_info", {"vol_ids": [vol_id]})
        assert info["path"] == result["path"]
        assert info["exists"] is True
        assert info["connection_info"]["data"]["auth_password"] != \
            conn["data"]["auth_password"]

        with pytest.raises(errors.AlreadyAttached):
            c.call("ManagedVolume.attach_volume",
                   {"vol_id": vol_id, "connection_info": conn})

        assert c.call("ManagedVolume.detach_volume",
                      {"vol_id": vol_id}) is True
        assert key not in connected_keys(agent_proc)
        assert c.call("ManagedVolume.volumes_info",
                      {"vol_ids": [vol_id]}) == []
        # Detaching what is not attached is success.
        assert c.call("ManagedVolume.detach_volume",
                      {"vol_id": vol_id}) is True


def test_params_as_array_in_schema_order(agent_proc):
    vol_id = new_id()
    with agent_proc.client() as c:
        c.call("ManagedVolume.attach_volume", [vol_id, iscsi(agent_proc)])
        assert c.call("ManagedVolume.detach_volume", [vol_id]) is True


def test_attach_detach_real_local_volume(agent_proc, tmp_path):
    from .host_fixtures import LoopDevice
    loop = LoopDevice(str(tmp_path / "backing.img"))
    try:
        vol_id = new_id()
        conn = {"driver_volume_type": "local",
                "data": {"device_path": loop.path}}
        with agent_proc.client() as c:
            result = c.call("ManagedVolume.attach_volume",
                            {"vol_id": vol_id, "connection_info": conn})
            assert result["path"] == loop.path
            assert result["attachment"]["type"] == "local"
            assert os.path.realpath(result["managed_path"]) == loop.path
            assert c.call("ManagedVolume.detach_volume",
                          {"vol_id": vol_id}) is True
            assert not os.path.lexists(result["managed_path"])
    finally:
        loop.detach()


def test_flow_id_is_in_the_log_lines_of_the_call_and_secrets_are_not(
        agent_proc):
    vol_id = new_id()
    conn = iscsi(agent_proc)
    flow = "flow-" + uuid.uuid4().hex[:8]
    with agent_proc.client() as c:
        c.call("ManagedVolume.attach_volume",
               {"vol_id": vol_id, "connection_info": conn}, flow_id=flow)
        c.call("ManagedVolume.detach_volume", {"vol_id": vol_id},
               flow_id=flow)
    text = agent_proc.log()
    lines = [line for line in text.splitlines() if vol_id in line]
    assert lines
    assert all("[flow={}]".format(flow) in line for line in lines), lines
    assert conn["data"]["auth_password"] not in text


def test_caps_reach_the_wire_and_the_control_socket(agent_proc):
    with agent_proc.client() as c:
        caps = c.call("Host.getCapabilities", {})
    assert "initiator" in caps["connector_info"] or \
        "host" in caps["connector_info"]
    # The hook's path: one JSON line on the control socket.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(agent_proc.cfg.socket_path)
        line = s.makefile().readline()
    assert json.loads(line) == {"connector_info": caps["connector_info"]}


# Bad input: an error each, the agent keeps serving, the store unchanged

def test_bad_input_gets_its_error_and_leaves_the_store_unchanged(
        agent_proc):
    vol_id = new_id()
    with agent_proc.client() as c:
        c.call("ManagedVolume.attach_volume",
               {"vol_id": vol_id, "connection_info": iscsi(agent_proc)})
        before = all_volumes(c)

        with agent_proc.raw() as r:
            r.send(b"SEND\ndestination:x\n\n\0")        # before CONNECT
            assert r.eof()[0].command == "ERROR"
        with agent_proc.raw() as r:
            r.connect()
            r.send(b"SUBSCRIBE\ndestination:a\\qb\nid:1\n\n\0")
            assert "undefined escape" in r.eof()[0].headers["message"]
        with agent_proc.raw() as r:
            r.connect()
            r.send(send_bytes("x" * 70000, "q"))
            assert "frame too large" in r.eof()[0].headers["message"]
        with agent_proc.raw() as r:
            r.connect()
            r.subscribe()
            assert r.call("[{oops")[1]["error"]["code"] == -32700

        with pytest.raises(errors.InvalidParams) as e:
            c.call("ManagedVolume.attach_volume",
                   {"vol_id": 42, "connection_info": iscsi(agent_proc)})
        assert "vol_id" in str(e.value)
        with pytest.raises(errors.InvalidParams) as e:
            c.call("ManagedVolume.attach_volume",
                   {"vol_id": new_id(), "connection_info": "nope"})
        assert "connection_info" in str(e.value)
        with pytest.raises(errors.InvalidParams):
            c.call("ManagedVolume.volumes_info", {"vol_ids": "not-a-list"})
        with pytest.raises(errors.MethodNotFound):
            c.call("ManagedVolume.format_disk", {})

        assert all_volumes(c) == before
        assert c.call("ManagedVolume.detach_volume",
                      {"vol_id": vol_id}) is True


def test_client_that_never_sends_connect_is_dropped(agent_proc):
    with agent_proc.raw() as r:
        [error] = r.eof(timeout=30)
    assert "no CONNECT frame" in error.headers["message"]


def test_client_without_certificate_is_refused(agent_proc):
    ctx = pki.client_context(agent_proc.cfg.ca_file)
    with pytest.raises((OSError, stompclient.ClientError)):
        with stompclient.Client("localhost", agent_proc.port, ctx,
                                timeout=10) as c:
            c.call("ManagedVolume.volumes_info", {})


# Concurrency

def test_16_clients_attach_and_detach_distinct_volumes(agent_proc):
    failures = []
    vol_ids = [new_id() for _ in range(16)]

    def work(vol_id):
        try:
            with agent_proc.client(timeout=120) as c:
                c.call("ManagedVolume.attach_volume",
                       {"vol_id": vol_id,
                        "connection_info": iscsi(agent_proc)})
                c.call("ManagedVolume.detach_volume", {"vol_id": vol_id})
        except Exception as e:
            failures.append((vol_id, e))

    threads = [threading.Thread(target=work, args=(v,)) for v in vol_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    with agent_proc.client() as c:
        assert c.call("ManagedVolume.volumes_info",
                      {"vol_ids": vol_ids}) == []


def test_8_clients_racing_on_one_volume_one_wins(agent_proc):
    vol_id = new_id()
    conn = iscsi(agent_proc)
    outcomes = []
    start = threading.Barrier(8)

    def work():
        with agent_proc.client(timeout=120) as c:
            start.wait()
            try:
                c.call("ManagedVolume.attach_volume",
                       {"vol_id": vol_id, "connection_info": conn})
                outcomes.append("attached")
            except errors.Error as e:
                outcomes.append(e.code)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [927] * 7 + ["attached"]
    with agent_proc.client() as c:
        c.call("ManagedVolume.detach_volume", {"vol_id": vol_id})


# Life cycle

def test_sigterm_waits_for_in_flight_attach_then_exits_0(tmp_path):
    agent = AgentProcess(tmp_path, insecure=True).start()
    vol_id = new_id()
    conn = iscsi(agent, fake_sleep=3)
    attach = attach_held(agent, vol_id, conn)
    try:
        agentutil.wait_for(lambda: "connect-start " + conn["data"][
            "fake_key"] in fakebrick.calls(agent.fakebrick_dir))
        agent.proc.send_signal(signal.SIGTERM)
        agent.wait_notify("STOPPING=1")
        attach.join(120)
        assert (attach.result or {}).get("vol_id") == vol_id, attach.error
        assert agent.proc.wait(60) == 0
        assert not os.path.exists(agent.cfg.socket_path)
    finally:
        agent.stop(signal.SIGKILL)


def test_sigterm_with_a_stuck_call_exits_within_shutdown_timeout(tmp_path):
    # The drain and the service's close share one bound: the documented
    # shutdown_timeout, not twice it (plus the daemon's own wait).  The
    # stuck attach stays recorded for the next start's reconcile.
    agent = AgentProcess(tmp_path, insecure=True, shutdown_timeout=3)
    agent.start()
    vol_id = new_id()
    conn = iscsi(agent, fake_sleep=120)
    attach_held(agent, vol_id, conn)
    try:
        agentutil.wait_for(lambda: "connect-start " + conn["data"][
            "fake_key"] in fakebrick.calls(agent.fakebrick_dir))
        agent.proc.send_signal(signal.SIGTERM)
        # systemd is told to wait for the whole stop: shutdown_timeout, the
        # last flush (1 s), a late back end's margin and kill (2 x 5 s),
        # the exit (4 s); beyond the unit's TimeoutStopSec= it extends it.
        assert "EXTEND_TIMEOUT_USEC=18000000" in agent.wait_notify(
            "STOPPING=1").splitlines()
        # Liveness, not a measurement: before, this took 3 + 3 + 10 s.
        assert agent.proc.wait(12) == 0
        text = agent.log()
        assert "1 operations still running after 3.0 seconds; exiting " \
            "anyway" in text
        assert "Agent stopped" in text
    finally:
        agent.stop(signal.SIGKILL)

    agent = AgentProcess(tmp_path, insecure=True).start()
    try:
        assert "Reconcile {} (attaching): rollback -> done".format(
            vol_id) in agent.log()
    finally:
        assert agent.stop() == 0


def test_second_agent_on_the_same_state_refuses_naming_the_first(
        agent_proc):
    p = subprocess.run(
        [AGENT, "--config", agent_proc.config_file, "--state-dir",
         agent_proc.state_dir, "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO))
    # Exit 1: the unit restarts it (the first may be stopping).
    assert p.returncode == 1
    # On its own stderr only: the first one's log file (the same file,
    # for the same state) has none of the refused one's lines.
    text = agent_proc.log()
    assert "Cannot start" not in text
    assert text.count("vdsm-managedvolume agent") == 1
    assert "managedvolume-agent: Cannot start: " in p.stderr
    assert "another managedvolume-agent (pid {}) is running".format(
        agent_proc.proc.pid) in p.stderr
    # It never got far enough to touch the first one's socket.
    assert os.path.exists(agent_proc.cfg.socket_path)
    with agent_proc.client() as c:
        assert isinstance(c.call("ManagedVolume.volumes_info", {}), list)


def test_ctrl_c_at_the_terminal_stops_agent_and_daemon_cleanly(tmp_path):
    # make run, then Ctrl-C: the terminal sends SIGINT to the whole
    # foreground process group.  The privsep daemon must not die of it
    # (a CRITICAL KeyboardInterrupt traceback); the agent stops it.
    agent = AgentProcess(tmp_path, new_session=True).start()
    try:
        agentutil.wait_for(lambda: "privsep daemon pid" in agent.log()
                           and "ready in" in agent.log())
        os.killpg(agent.proc.pid, signal.SIGINT)
        assert agent.proc.wait(60) == 0
        text = agent.log()
        assert "Received SIGINT" in text and "Agent stopped" in text
        assert "CRITICAL" not in text and "KeyboardInterrupt" not in text
    finally:
        agent.stop(signal.SIGKILL)


def test_restart_reconciles_before_serving(tmp_path):
    # The agent dies (SIGKILL, as a crash or fence would) between connect
    # and the journal update; the next agent must undo the attach before
    # it answers anybody.
    agent = AgentProcess(tmp_path, env={
        "MANAGEDVOLUME_CRASH_AT": "attach.after_connect"}).start()
    vol_id = new_id()
    # What the connect returned dies with the agent: the reconcile can
    # only disconnect without it.
    conn = iscsi(agent, fake_blind_disconnect=True)
    key = conn["data"]["fake_key"]
    try:
        with pytest.raises((OSError, stompclient.ClientError)):
            with agent.client(timeout=60) as c:
                c.call("ManagedVolume.attach_volume",
                       {"vol_id": vol_id, "connection_info": conn})
        # The service runs in the agent's back end (hop.py), which the
        # crash kills: the agent exits 1 as if it had crashed (its
        # connections closed without answers; systemd restarts it).
        assert agent.proc.wait(60) == 1
        assert "ended unasked (killed by SIGKILL)" in agent.log()
    finally:
        agent.stop(signal.SIGKILL)
    assert key in connected_keys(agent)        # the leak vdsm would keep

    agent = AgentProcess(tmp_path).start()
    try:
        # READY means serving: the reconcile already happened.
        assert key not in connected_keys(agent)
        with agent.client() as c:
            assert c.call("ManagedVolume.volumes_info",
                          {"vol_ids": [vol_id]}) == []
        text = agent.log()
        assert text.rindex("Reconcile " + vol_id) < \
            text.rindex("Listening on")
    finally:
        assert agent.stop() == 0


def kill_agent_and_daemon(agent):
    """SIGKILL the agent and its privsep daemon, as a fence would."""
    pids = [int(p) for p in re.findall(r"privsep daemon pid (\d+) ready",
                                        agent.log())]
    agent.stop(signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        agentutil.wait_for(lambda: not os.path.exists(
            "/proc/{}/status".format(pid)) or "State:\tZ" in open(
                "/proc/{}/status".format(pid)).read(), timeout=30)


def test_fence_reboot_reattach_is_a_first_attach_detach_leaves_nothing(
        tmp_path):
    # oVirt/vdsm#433 with the real agent, privsep daemon and os-brick's
    # local connector on a real loop device that "came back at boot".
    from vdsm_managedvolume import boot
    from vdsm_managedvolume import udev
    from .host_fixtures import LoopDevice
    boot_file = tmp_path / "boot_id"
    boot_file.write_text(new_id() + "\n")
    env = {boot.ENV_FILE: str(boot_file)}
    base = tmp_path / "host"
    loop = LoopDevice(str(tmp_path / "volume.img"))
    vol_id = new_id()
    attach = {"vol_id": vol_id, "connection_info": {
        "driver_volume_type": "local", "data": {"device_path": loop.path}}}
    agent = AgentProcess(base, env=env).start()
    try:
        with agent.client() as c:
            first = c.call("ManagedVolume.attach_volume", attach)
        rule = udev.rule_path(agent.cfg.udev_rules_dir, BLANK, vol_id)
        link = first["managed_path"]

        # Same boot (agent killed and restarted): link kept, 927.
        kill_agent_and_daemon(agent)
        agent = AgentProcess(base, env=env).start()
        with agent.client() as c:
            info, = c.call("ManagedVolume.volumes_info", [[vol_id]])
            assert info["stale"] is False
            assert os.readlink(link) == loop.path
            with pytest.raises(errors.AlreadyAttached):
                c.call("ManagedVolume.attach_volume", attach)

        # Fenced and rebooted: both processes die, /run is emptied, a new
        # boot id; the loop device is back.
        kill_agent_and_daemon(agent)
        run_dir = os.path.dirname(link)
        for name in os.listdir(run_dir):
            os.unlink(os.path.join(run_dir, name))
        boot_file.write_text(new_id() + "\n")
        # The start detaches the record of the earlier boot (nothing else
        # would if the engine restarted the VM elsewhere), in a thread once
        # the agent serves (Service.start): os-brick's local connector
        # leaves the device alone.
        agent = AgentProcess(base, env=env).start()
        agentutil.wait_for(lambda: "detach-stale -> done (made in another "
                           "boot)" in agent.log())
        assert not os.path.lexists(link) and not os.path.exists(rule)
        assert loop.path and os.path.exists(loop.path)
        with agent.client() as c:
            assert c.call("ManagedVolume.volumes_info", [[vol_id]]) == []

            second = c.call("ManagedVolume.attach_volume", attach)

            assert second == first
            assert os.readlink(link) == loop.path
            assert os.path.exists(rule)
            info, = c.call("ManagedVolume.volumes_info", [[vol_id]])
            assert info["stale"] is False

            assert c.call("ManagedVolume.detach_volume",
                          {"vol_id": vol_id}) is True
            assert c.call("ManagedVolume.volumes_info", [[]]) == []
        assert not os.path.lexists(link)
        assert not os.path.exists(rule)
        assert udev.list_rules(agent.cfg) == []
        assert os.listdir(run_dir) == []
    finally:
        agent.stop()
        loop.detach()


def test_sighup_reopens_the_log_file(agent_proc):
    os.rename(agent_proc.log_file, agent_proc.log_file + ".1")
    agent_proc.proc.send_signal(signal.SIGHUP)
    agentutil.wait_for(lambda: os.path.exists(agent_proc.log_file))
    agentutil.wait_for(lambda: "Log file reopened" in agent_proc.log())


# The command line

def test_insecure_is_refused_on_a_non_loopback_address(tmp_path):
    p = subprocess.run([AGENT, "--state-dir", str(tmp_path), "--insecure",
                        "--listen", "[::]:0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "--insecure" in p.stderr and "loopback" in p.stderr


def test_invalid_listen_is_a_usage_error(tmp_path):
    p = subprocess.run([AGENT, "--state-dir", str(tmp_path), "--listen",
                        "::1:80"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert "brackets" in p.stderr


def _start_refused(tmp_path, conf_text, *argv):
    conf = tmp_path / "mv.conf"
    conf.write_text(conf_text)
    state = tmp_path / "state"
    # Relative, as an admin types it: the message names it so.
    p = subprocess.run([AGENT, "--config", "mv.conf", "--state-dir",
                        str(state), *argv], capture_output=True, text=True,
                       timeout=60, cwd=str(tmp_path))
    return p, state


@pytest.mark.parametrize("conf_text, argv, message", [
    ("", ["--listen", "nosuchhost.invalid:5000"],
     "--listen nosuchhost.invalid:5000: listen = 'nosuchhost.invalid' "
     "cannot be resolved"),
    ("[agent]\nlisten = nosuchhost.invalid\n", [],
     "mv.conf [agent]: listen = 'nosuchhost.invalid' cannot be resolved"),
    ("[agent]\nlisten = 127.0.0.1\nport = 70000\n", [],
     "mv.conf [agent]: port = 70000 is out of range (0-65535)"),
    ("[logging]\nlog_file = /dev/null/x/agent.log\n",
     ["--listen", "127.0.0.1:0"],
     "mv.conf [logging]: log_file = '/dev/null/x/agent.log': its "
     "directory cannot be created"),
    ("[logging]\nlog_config = /nonexistent/logger.conf\n",
     ["--listen", "127.0.0.1:0"],
     "mv.conf [logging]: log_config = '/nonexistent/logger.conf' cannot "
     "be read"),
    ("[logging]\nlog_config = /etc/hostname\n",
     ["--listen", "127.0.0.1:0"],
     "mv.conf [logging]: log_config = '/etc/hostname' cannot be read"),
    ("[volumes]\nudev_writer = bogus\n", ["--listen", "127.0.0.1:0"],
     "mv.conf [volumes]: udev_writer = 'bogus' is not one of auto, "
     "service, daemon"),
    ("[logging]\nlog_config = logger.ini\n", ["--listen", "127.0.0.1:0"],
     "mv.conf [logging]: log_config = 'logger.ini': cannot set up "
     "logging: ModuleNotFoundError"),
])
def test_a_configuration_mistake_is_one_line_and_touches_no_state(
        tmp_path, conf_text, argv, message):
    # A handler class that does not exist: found only by logging itself.
    (tmp_path / "logger.ini").write_text(
        "[loggers]\nkeys = root\n[handlers]\nkeys = h\n"
        "[formatters]\nkeys =\n[logger_root]\nhandlers = h\n"
        "[handler_h]\nclass = NoSuchHandler\nargs = ()\n")
    p, state = _start_refused(tmp_path, conf_text, *argv)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(
        "managedvolume-agent: Configuration error: " + message), p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert not state.exists()


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "mv.conf").write_bytes(b"# modifi\xe9\n")
    p = subprocess.run([AGENT, "--config", "mv.conf", "--state-dir",
                        str(tmp_path / "state")], capture_output=True,
                       text=True, timeout=60, cwd=str(tmp_path))
    assert p.returncode == 2
    assert p.stderr == ("managedvolume-agent: Configuration error: cannot "
                        "read mv.conf: not UTF-8 (byte 0xe9 on line 1)\n")


def test_a_state_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    p = subprocess.run([AGENT, "--state-dir", str(tmp_path / "file" / "s"),
                        "--listen", "127.0.0.1:0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith(
        "managedvolume-agent: Configuration error: --state-dir ")
    assert "is not a directory" in p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr


def test_a_port_in_use_is_found_before_the_journal_is_opened(tmp_path):
    # vdsmd holds the port: the agent must refuse before it creates,
    # migrates or reconciles the journal.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        p, state = _start_refused(
            tmp_path, "", "--listen", "127.0.0.1:{}".format(port))
    # Exit 1, restarted: a port may be held for a while only (an
    # outgoing connection's ephemeral port; vdsmd stopping).
    assert p.returncode == 1
    assert "cannot listen on 127.0.0.1:{}".format(port) in p.stderr
    assert "Traceback" not in p.stderr
    cfg = agentutil.make_config(str(state))
    assert not os.path.exists(cfg.db_path)
    assert not os.path.exists(os.path.join(str(state), "pki"))


def test_help_documents_the_exit_statuses_and_files():
    p = subprocess.run([AGENT, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0
    assert "\nexit status:\n" in p.stdout
    for code in (agent.EXIT_OK, agent.EXIT_FAILED, agent.EXIT_CONFIG):
        assert "\n  {}  ".format(code) in p.stdout
    assert "RestartPreventExitStatus={}".format(agent.EXIT_CONFIG) in \
        p.stdout
    assert "/etc/vdsm/managedvolume.conf" in p.stdout.split("files:")[1]


def test_version():
    from vdsm_managedvolume import __version__
    p = subprocess.run([AGENT, "--version"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    assert __version__ in p.stdout


def test_an_upgrade_under_a_running_agent_is_926_until_its_restart(
        tmp_path):
    # The agent runs a copy of the package; "the RPM" then replaces its
    # privileged calls (another privsep protocol) while it runs, and its
    # daemon dies: the daemon it starts runs the new files.  Nothing is
    # called with the old arguments: 926 naming both protocols, until
    # the agent is restarted on the new files (privsep.py, "Versions").
    import shutil
    site = tmp_path / "site"
    pkg = site / "vdsm_managedvolume"
    shutil.copytree(os.path.join(REPO, "vdsm_managedvolume"), str(pkg),
                    ignore=shutil.ignore_patterns("__pycache__"))
    from vdsm_managedvolume import privsep
    agent = AgentProcess(tmp_path / "agent", env={
        "PYTHONPATH": os.pathsep.join([str(site), REPO])}).start()
    try:
        with agent.client() as c:
            c.call("ManagedVolume.attach_volume",
                   {"vol_id": new_id(), "connection_info": iscsi(agent)})
        [daemon] = set(re.findall(r"privsep daemon pid (\d+) ready in",
                                  agent.log()))
        for name in ("privsep.py", "brick.py"):
            path = pkg / name
            path.write_text(path.read_text().replace(
                "\nPROTOCOL = {}\n".format(privsep.PROTOCOL),
                "\nPROTOCOL = {}\n".format(privsep.PROTOCOL + 1)))
        os.kill(int(daemon), signal.SIGKILL)
        # Gone before the call (a zombie counts)...
        agentutil.wait_for(lambda: _gone(int(daemon)))
        # ...but the agent may not have read its end yet: a call sent to
        # the dead daemon's channel fails as cut by its death (926,
        # "died during connect": its record is kept for reconcile).  The
        # next call starts the daemon of the new files.
        for _ in range(3):
            conn = iscsi(agent)
            with agent.client() as c:
                with pytest.raises(errors.HelperFailed) as e:
                    c.call("ManagedVolume.attach_volume",
                           {"vol_id": new_id(), "connection_info": conn})
            assert e.value.code == 926
            if "died during" not in str(e.value):
                break
        assert "speaks privsep protocol {} (vdsm-managedvolume".format(
            privsep.PROTOCOL + 1) in str(e.value)
        # The agent's back end (hop.py) runs the service.
        assert "managedvolume-agent (pid {}) speaks privsep protocol " \
            "{}".format(back_pid(agent), privsep.PROTOCOL) in str(e.value)
        assert "restart managedvolume-agent" in str(e.value)
        assert conn["data"]["fake_key"] not in connected_keys(agent)
        assert "until it is restarted" in agent.log()
        assert agent.stop() == 0
        agent.start()
        with agent.client() as c:
            assert c.call("ManagedVolume.attach_volume",
                          {"vol_id": new_id(),
                           "connection_info": iscsi(agent)})["path"]
    finally:
        agent.stop()


def back_pid(agent):
    """The pid of ``agent``'s back end (hop.py): its child running the
    same program."""
    pids = back_pids(agent)
    if not pids:
        raise AssertionError("no back end among {}'s children".format(
            agent.proc.pid))
    return pids[0]


def back_pids(agent):
    """``agent``'s children running the same program as it: its back end
    when it runs in two processes, none in one."""
    return _benchutil.same_program_children(agent.proc.pid)


def _gone(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
