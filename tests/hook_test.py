"""The after_get_caps hook, run exactly as vdsm runs it.

vdsm writes the caps to a temp file, runs the executable with
``_hook_json`` naming it (as user vdsm), and reads the file back.  Here:
the same, with the system python of the shebang (not the venv, which holds
our package: the hook must need only the standard library), a clean
environment, and a fake or real agent behind the control socket.
"""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading

import pytest

from vdsm_managedvolume import config

from tests.rpc_fixtures import CONNECTOR_INFO

HOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "hooks",
                    "after_get_caps", "50_managedvolume")

CAPS = {"kvmEnabled": "true", "version_name": "Snow Man",
        "storage_domain_versions": "3,4,5", "cpuCores": "2"}


@pytest.fixture
def host(tmp_path):
    """A host layout: config file naming a state_run_dir, a caps file."""
    return Host(str(tmp_path))


class Host:

    def __init__(self, root):
        self.root = root
        self.run_dir = os.path.join(root, "run", "managedvolume")
        os.makedirs(self.run_dir)
        self.config_file = os.path.join(root, "managedvolume.conf")
        with open(self.config_file, "w") as f:
            f.write("[paths]\nstate_run_dir = {}\n".format(self.run_dir))
        self.cfg = config.load(self.config_file)
        self.caps_file = os.path.join(root, "caps.json")
        self.write_caps(CAPS)

    def write_caps(self, caps):
        with open(self.caps_file, "w") as f:
            json.dump(caps, f)

    def read_caps(self):
        with open(self.caps_file) as f:
            return json.load(f)

    def write_cache(self, info):
        with open(self.cfg.connector_info_cache, "w") as f:
            json.dump(info, f)

    def run(self, user=None, env=None):
        """Run the hook as vdsm does; return (rc, stdout, stderr)."""
        environ = {"PATH": "/usr/bin:/bin", "_hook_json": self.caps_file,
                   "MANAGEDVOLUME_CONFIG": self.config_file}
        environ.update(env or {})
        cmd = [HOOK]
        if user:
            cmd = ["setpriv", "--reuid", str(user), "--regid", str(user),
                   "--clear-groups", "--"] + cmd
        p = subprocess.run(cmd, env=environ, capture_output=True,
                           timeout=60, cwd="/")
        return p.returncode, p.stdout.decode(), p.stderr.decode()


class FakeAgent:
    """A control socket answering with ``reply`` (bytes), or never."""

    def __init__(self, path, reply=None, hang=False):
        self.path = path
        self.reply = reply
        self.hang = hang
        self.release = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.hang:
                    self.release.wait(30)
                else:
                    conn.sendall(self.reply)

    def close(self):
        self.release.set()
        self.sock.close()
        os.unlink(self.path)


@pytest.fixture
def fake_agent(host):
    agents = []

    def start(reply=None, hang=False):
        agent = FakeAgent(host.cfg.socket_path, reply, hang)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()


def test_hook_is_executable_and_runs_system_python():
    assert os.access(HOOK, os.X_OK)
    with open(HOOK) as f:
        assert f.readline() == "#!/usr/bin/python3\n"


def test_hook_paths_agree_with_config(host):
    hook = load_hook()
    os.environ["MANAGEDVOLUME_CONFIG"] = host.config_file
    try:
        run_dir = hook.find_state_run_dir()
    finally:
        del os.environ["MANAGEDVOLUME_CONFIG"]
    assert os.path.join(run_dir, hook.SOCKET_NAME) == host.cfg.socket_path
    assert os.path.join(run_dir, hook.CACHE_NAME) == (
        host.cfg.connector_info_cache)
    defaults = config.Config()
    assert hook.DEFAULT_CONFIG_FILE == config.DEFAULT_CONFIG_FILE
    assert hook.ENV_CONFIG_FILE == config.ENV_CONFIG_FILE
    assert hook.DEFAULT_STATE_RUN_DIR == defaults.state_run_dir
    assert os.path.join(hook.DEFAULT_STATE_RUN_DIR, hook.SOCKET_NAME) == (
        defaults.socket_path)


def test_adds_connector_info_from_agent(host, fake_agent):
    fake_agent(json.dumps({"connector_info": CONNECTOR_INFO}).encode()
               + b"\n")
    rc, out, err = host.run()
    assert rc == 0
    assert host.read_caps() == dict(CAPS, connector_info=CONNECTOR_INFO)
    assert err == ""


def test_replaces_vdsm_own_connector_info(host, fake_agent):
    host.write_caps(dict(CAPS, connector_info={"initiator": "old"}))
    fake_agent(json.dumps({"connector_info": CONNECTOR_INFO}).encode()
               + b"\n")
    host.run()
    assert host.read_caps()["connector_info"] == CONNECTOR_INFO


def test_agent_down_uses_cache(host):
    host.write_cache(CONNECTOR_INFO)
    rc, out, err = host.run()
    assert rc == 0
    assert host.read_caps()["connector_info"] == CONNECTOR_INFO


def test_agent_not_knowing_yet_uses_cache(host, fake_agent):
    fake_agent(b"{}\n")
    host.write_cache(CONNECTOR_INFO)
    host.run()
    assert host.read_caps()["connector_info"] == CONNECTOR_INFO


@pytest.mark.parametrize("reply", [b"garbage\n", b"[1]\n",
                                   b'{"connector_info": 5}\n', b""])
def test_bad_agent_reply_uses_cache(host, fake_agent, reply):
    fake_agent(reply)
    host.write_cache(CONNECTOR_INFO)
    rc, _, _ = host.run()
    assert rc == 0
    assert host.read_caps()["connector_info"] == CONNECTOR_INFO


def test_hanging_agent_does_not_block_caps(host, fake_agent):
    fake_agent(hang=True)
    host.write_cache(CONNECTOR_INFO)
    # subprocess timeout in run() is the guard; the hook gives up after 2 s.
    rc, _, err = host.run()
    assert rc == 0
    assert host.read_caps()["connector_info"] == CONNECTOR_INFO


def test_nothing_known_leaves_caps_untouched(host):
    with open(host.caps_file, "rb") as f:
        before = f.read()
    rc, out, err = host.run()
    assert rc == 0
    with open(host.caps_file, "rb") as f:
        assert f.read() == before
    assert "connector_info not added" in err
    assert "agent socket" in err


def test_empty_cache_leaves_caps_untouched(host):
    host.write_cache({})
    rc, _, err = host.run()
    assert rc == 0
    assert host.read_caps() == CAPS
    assert "holds no connector info" in err


def test_invalid_caps_file_left_alone(host, fake_agent):
    fake_agent(json.dumps({"connector_info": CONNECTOR_INFO}).encode()
               + b"\n")
    with open(host.caps_file, "w") as f:
        f.write("not json")
    rc, _, err = host.run()
    assert rc == 0
    with open(host.caps_file) as f:
        assert f.read() == "not json"
    assert "connector_info not added" in err


def test_without_hook_json_exits_0(host):
    rc, _, err = host.run(env={"_hook_json": ""})
    assert rc == 0
    assert "_hook_json" in err


@pytest.mark.parametrize("content", [
    b"this is [not ini",
    b"# modifi\xe9 (Latin-1: not UTF-8)\n[paths]\n",
])
def test_unreadable_config_falls_back_to_default(host, content):
    with open(host.config_file, "wb") as f:
        f.write(content)
    rc, _, err = host.run()
    assert rc == 0
    assert host.read_caps() == CAPS
    assert "cannot read" in err
    assert "Traceback" not in err


def test_default_config_missing_means_vdsm_paths(host):
    hook = load_hook()
    os.environ["MANAGEDVOLUME_CONFIG"] = os.path.join(host.root, "nope")
    try:
        assert hook.find_state_run_dir() == "/run/vdsm/managedvolume"
    finally:
        del os.environ["MANAGEDVOLUME_CONFIG"]


def test_with_real_agent_control_socket(host):
    from tests import agentutil
    cfg = agentutil.make_config(os.path.join(host.root, "state"))
    cfg.state_run_dir = host.run_dir
    running = agentutil.Running(cfg, agentutil.StubDispatcher(),
                                connector_info=lambda: CONNECTOR_INFO)
    try:
        rc, _, err = host.run()
    finally:
        running.stop()
    assert rc == 0, err
    assert host.read_caps()["connector_info"] == CONNECTOR_INFO


@pytest.mark.root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv")
def test_runs_as_unprivileged_user():
    # vdsm runs hooks as user vdsm: no root needed.  The layout must be
    # reachable by that user (pytest's tmp dirs are root-only).
    root = tempfile.mkdtemp(prefix="mv-hook-")
    try:
        os.chmod(root, 0o755)
        host = Host(root)
        for d in (os.path.join(root, "run"), host.run_dir):
            os.chmod(d, 0o755)
        os.chmod(host.config_file, 0o644)
        os.chown(host.caps_file, 65534, 65534)
        agent = FakeAgent(host.cfg.socket_path, json.dumps(
            {"connector_info": CONNECTOR_INFO}).encode() + b"\n")
        try:
            rc, _, err = host.run(user=65534)
        finally:
            agent.close()
        assert rc == 0, err
        assert host.read_caps()["connector_info"] == CONNECTOR_INFO

        # The agent down: the cache file (0644) is readable too.
        host.write_caps(CAPS)
        os.chown(host.caps_file, 65534, 65534)
        host.write_cache(CONNECTOR_INFO)
        os.chmod(host.cfg.connector_info_cache, 0o644)
        rc, _, err = host.run(user=65534)
        assert rc == 0, err
        assert host.read_caps()["connector_info"] == CONNECTOR_INFO
    finally:
        shutil.rmtree(root)


# Private helpers

def load_hook():
    loader = importlib.machinery.SourceFileLoader("hook_50_managedvolume",
                                                  HOOK)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
