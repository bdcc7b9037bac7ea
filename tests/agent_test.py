"""The agent process's own pieces, in process: the control socket the
after_get_caps hook reads (served in the STOMP server's loop, as the
process wires it) and the command line's helpers.

The process itself (signals, the agent lock, sd_notify, the real service)
is driven as ``managedvolume-agent`` in agent_process_test.py; the wire in
stompserver_test.py.
"""

import json
import os
import socket
import threading

import pytest

from vdsm_managedvolume import agent
from vdsm_managedvolume import errors

from . import agentutil


# The control socket (read by the after_get_caps hook)

def _read_control(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def test_control_socket_answers_connector_info(tmp_path):
    info = {"initiator": "iqn.1994-05.com.redhat:x", "multipath": True}
    cfg = agentutil.make_config(tmp_path / "state")
    cfg.state_run_dir = str(tmp_path / "run")
    run = agentutil.Running(cfg, agentutil.StubDispatcher(),
                            connector_info=lambda: info)
    try:
        assert oct(os.stat(cfg.socket_path).st_mode & 0o777) == "0o666"
        assert _read_control(cfg.socket_path) == {"connector_info": info}
    finally:
        run.stop()
    assert not os.path.exists(cfg.socket_path)


def test_control_socket_answers_empty_when_info_is_slow(tmp_path):
    release = threading.Event()

    def slow():
        release.wait(30)
        return {"late": True}

    cfg = agentutil.make_config(tmp_path / "state")
    cfg.state_run_dir = str(tmp_path / "run")
    run = agentutil.Running(cfg, agentutil.StubDispatcher(),
                            connector_info=slow)
    try:
        assert _read_control(cfg.socket_path) == {}
        release.set()
    finally:
        release.set()
        run.stop()


def test_connector_info_without_a_thread_gives_the_last_value_and_retries(
        monkeypatch):
    # A thread the system refuses (TasksMax) must not leave a fetch
    # "running" for good: every later call would wait its timeout for it.
    values = iter([{"n": 1}, {"n": 2}])
    info = agent._ConnectorInfo(lambda: next(values))
    assert info.get(10) == {"n": 1}
    real_start = threading.Thread.start

    def refused(thread):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    assert info.get(10) == {"n": 1}
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert info.get(10) == {"n": 2}


def test_control_socket_answers_empty_without_os_brick(tmp_path):
    def unsupported():
        raise errors.NotSupported("no os_brick")

    cfg = agentutil.make_config(tmp_path / "state")
    cfg.state_run_dir = str(tmp_path / "run")
    run = agentutil.Running(cfg, agentutil.StubDispatcher(),
                            connector_info=unsupported)
    try:
        assert _read_control(cfg.socket_path) == {}
    finally:
        run.stop()


# Small helpers of the command line

@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:54321", ("127.0.0.1", 54321)),
    ("[::1]:0", ("::1", 0)),
    ("[::]:54321", ("::", 54321)),
    ("localhost:1", ("localhost", 1)),
    (":54321", ("", 54321)),
])
def test_parse_listen(value, expected):
    assert agent.parse_listen(value) == expected


@pytest.mark.parametrize("value", ["::1:80", "127.0.0.1", "h:port",
                                   "[::1]80", "h:70000"])
def test_parse_listen_refuses_garbage(value):
    with pytest.raises(ValueError):
        agent.parse_listen(value)


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
    ("localhost", True), ("::", False), ("0.0.0.0", False),
    ("", False), ("10.0.0.1", False), ("example.com", False),
])
def test_is_loopback(host, expected):
    assert agent.is_loopback(host) is expected


def test_help_says_how_to_stop_it_and_shows_examples(capsys):
    with pytest.raises(SystemExit) as e:
        agent._parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if len(line) > 79] == []
    for option in ("--config", "--state-dir", "--listen", "--insecure"):
        assert option in out
    assert "SIGTERM or Ctrl-C" in out and "SIGHUP" in out
    examples = [line.split("#")[0].split()[1:] for line in out.splitlines()
                if line.startswith("  managedvolume-agent ")]
    assert len(examples) >= 2
    for argv in examples:
        agent._parse_args(argv)     # each example is valid syntax


def test_the_agent_lock_held_is_told_from_a_lock_file_that_cannot_open(
        tmp_path):
    # Only the first keeps a second agent's lines out of the log (its
    # 'Cannot start' goes to its own stderr); the second is this agent's
    # own trouble, logged (review-safety13b L6).
    cfg = agentutil.make_config(tmp_path / "state")
    fd = agent._lock_agent(cfg)
    try:
        with pytest.raises(errors.AgentRunning) as e:
            agent._lock_agent(cfg)
        assert "another managedvolume-agent (pid {}) is running".format(
            os.getpid()) in str(e.value)
    finally:
        os.close(fd)
    blocked = agentutil.make_config(tmp_path / "other")
    os.makedirs(os.path.dirname(blocked.state_run_dir), exist_ok=True)
    with open(blocked.state_run_dir, "w"):
        pass
    with pytest.raises(errors.ConfigError) as e:
        agent._lock_agent(blocked)
    assert not isinstance(e.value, errors.AgentRunning)
