"""The sudo boundary: what user vdsm can make the root privsep daemon do.

Inside vdsm the service runs as user vdsm and starts the daemon with
``sudo privsep-helper ...`` (data/sudoers).  The boundary holds when:

- the sudoers command is exact (a ``*`` would match extra arguments,
  which privsep-helper acts on before any code of ours runs) and is the
  very argv the non-root Brick builds;
- the daemon's configuration file is root's, and a non-root service never
  writes it (it refuses to start a daemon without a safe one);
- the daemon refuses to serve when started otherwise (more arguments, a
  file or directory that is not root's, a connector override or oslo
  environment options under sudo);
- daemon starts on the fixed socket path are serialized (flock), so
  vdsmd and managedvolume-tool starting at once both get a daemon.

How: the pieces are proven one by one (the sudoers text against the argv;
privsep-helper run directly as root with bad argv, files and environment;
the non-root checks with a faked uid).  Then the whole: a process running
as ``nobody`` starts its daemon through the real sudo, with the shipped
rule (user and paths substituted) bind-mounted over /etc/sudoers in a
private mount namespace: nothing on the host changes.  Skipped where sudo
or unshare is missing.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import privileged
from vdsm_managedvolume import privsep
from vdsm_managedvolume import privsepconfig

from .host_fixtures import REPO

pytestmark = pytest.mark.root

SUDOERS = os.path.join(REPO, "data", "sudoers")
NOBODY = 65534


def sudoers_command(path=SUDOERS):
    """The MANAGEDVOLUME_PRIVSEP Cmnd_Alias as an argv."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    return re.search(r"^Cmnd_Alias MANAGEDVOLUME_PRIVSEP = (.*)$", text,
                     re.M).group(1).split()


def root_env():
    """Our environment without sudo's variables (``sudo make check``):
    each test says whether the helper runs "under sudo"."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SUDO_")}


@pytest.fixture
def state(tmp_path):
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    privsepconfig.write_config(cfg)
    return cfg


# (a) The sudoers rule is the exact argv a non-root Brick runs

def test_sudoers_command_is_exactly_what_a_non_root_brick_runs(monkeypatch):
    monkeypatch.setattr(privileged.os, "geteuid", lambda: 36)
    monkeypatch.setattr(privileged, "_privsep_helper",
                        lambda: "/usr/bin/privsep-helper")
    cmd = privileged.helper_command(config.Config())
    assert cmd == ["sudo"] + sudoers_command()


def test_sudoers_command_has_no_wildcard():
    # In sudoers "*" matches spaces too: any number of extra arguments.
    for arg in sudoers_command():
        assert not set(arg) & set("*?[]\\"), arg


def test_sudoers_names_the_default_paths():
    cmd = sudoers_command()
    cfg = config.Config()
    assert cmd[cmd.index("--config-file") + 1] == cfg.privsep_config
    assert cmd[cmd.index("--privsep_sock_path") + 1] == \
        "/run/vdsm/managedvolume/privsep.sock" == cfg.privsep_sock_path
    assert cmd[cmd.index("--privsep_context") + 1] == privsep.CONTEXT


def test_vdsm_python_finds_the_helper_the_rule_names(monkeypatch):
    monkeypatch.setattr(privileged.sys, "executable", "/usr/bin/python3")
    real = os.access
    monkeypatch.setattr(privileged.os, "access", lambda p, m: (
        p == "/usr/bin/privsep-helper" or real(p, m)))
    assert privileged._privsep_helper() == sudoers_command()[0]


def test_sudoers_resets_environment_and_home_for_the_command():
    with open(SUDOERS) as f:
        text = f.read()
    assert re.search(r"^Defaults!MANAGEDVOLUME_PRIVSEP env_reset, "
                     r"always_set_home$", text, re.M)
    assert re.search(r"^Defaults:vdsm !requiretty$", text, re.M)


def test_sudoers_is_valid_for_visudo():
    visudo = shutil.which("visudo")
    if visudo is None:
        pytest.skip("visudo not installed")
    subprocess.run([visudo, "-c", "-q", "-f", SUDOERS], check=True)


# (b) The daemon refuses to serve an unsafe start

class Helper:
    """privsep-helper run directly as root, with a socket listening where
    it would connect: what it printed, its exit code, and whether it
    connected (served)."""

    def __init__(self, tmp_path):
        self.sock_path = str(tmp_path / "p.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.sock_path)
        self.listener.listen(1)

    def argv(self, config_file):
        return [privileged._privsep_helper(), "--config-file", config_file,
                "--privsep_context", privsep.CONTEXT,
                "--privsep_sock_path", self.sock_path]

    def run(self, argv, env=None):
        # A file, not a pipe: a daemon that started keeps it open.
        with tempfile.TemporaryFile("w+") as f:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=f,
                               stderr=subprocess.STDOUT, timeout=60,
                               env=dict(root_env(), **(env or {})))
            f.seek(0)
            output = f.read()
        self.listener.settimeout(0)
        try:
            conn, _ = self.listener.accept()
            conn.close()     # the daemon ends on EOF
            served = True
        except BlockingIOError:
            served = False
        return p.returncode, output, served

    def close(self):
        self.listener.close()


@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path)
    yield h
    h.close()


def refused(helper, argv, env=None):
    rc, out, served = helper.run(argv, env)
    assert not served, out
    assert rc == privsep.EXIT_REFUSED, out
    return out.split("refuses to start: ", 1)[1].splitlines()[0]


def test_daemon_serves_a_safe_start(helper, state):
    # The control: the same harness sees a daemon that serves.
    rc, out, served = helper.run(helper.argv(state.privsep_config))
    assert served, out
    assert rc == 0


def test_daemon_refuses_a_config_file_owned_by_another_user(helper, state):
    os.chown(state.privsep_config, 36, 36)
    assert "belongs to uid 36, not root" in refused(
        helper, helper.argv(state.privsep_config))


def test_daemon_refuses_a_group_writable_config_file(helper, state):
    os.chmod(state.privsep_config, 0o664)
    assert "writable by group or others (mode 0664)" in refused(
        helper, helper.argv(state.privsep_config))


def test_daemon_refuses_a_config_file_in_a_directory_of_another_user(
        helper, state):
    # Its owner could rename another file over it.
    os.chown(state.state_run_dir, 36, 36)
    reason = refused(helper, helper.argv(state.privsep_config))
    assert "in directory {}, which belongs to uid 36".format(
        state.state_run_dir) in reason


def test_daemon_refuses_a_config_file_in_a_world_writable_directory(
        helper, state):
    os.chmod(state.state_run_dir, 0o1777)
    assert "writable by group or others" in refused(
        helper, helper.argv(state.privsep_config))


def test_daemon_refuses_a_symlinked_config_file(helper, state, tmp_path):
    link = str(tmp_path / "link.conf")
    os.symlink(state.privsep_config, link)
    assert "is not a regular file" in refused(helper, helper.argv(link))


def test_daemon_refuses_a_second_config_file(helper, state, tmp_path):
    other = tmp_path / "other.conf"
    other.write_text("[managedvolume_privileged]\nudev_rules_dir = /etc\n")
    argv = helper.argv(state.privsep_config) + ["--config-file", str(other)]
    assert "--config-file given more than once" in refused(helper, argv)


def test_daemon_refuses_a_config_dir(helper, state, tmp_path):
    d = tmp_path / "conf.d"
    d.mkdir()
    argv = helper.argv(state.privsep_config) + ["--config-dir", str(d)]
    assert "unexpected argument '--config-dir'" in refused(helper, argv)


def test_daemon_refuses_default_config_dirs_under_home(helper, state,
                                                       tmp_path):
    # oslo.config reads ~/.privsep/privsep.conf.d even with --config-file:
    # why the sudoers rule sets always_set_home.
    d = tmp_path / "home" / ".privsep" / "privsep.conf.d"
    d.mkdir(parents=True)
    (d / "x.conf").write_text("[DEFAULT]\n")
    reason = refused(helper, helper.argv(state.privsep_config),
                     env={"HOME": str(tmp_path / "home")})
    assert "configuration directories read: {}".format(d) in reason


def test_log_file_argument_acts_before_the_daemon_can_refuse(
        helper, state, tmp_path):
    # oslo.log opened the file (as root) before any code of ours ran: a
    # daemon-side check cannot stop this, the exact sudoers command does.
    log = tmp_path / "anywhere.log"
    argv = helper.argv(state.privsep_config) + ["--log-file", str(log)]
    assert "unexpected argument '--log-file'" in refused(helper, argv)
    assert log.exists()


def test_daemon_refuses_connector_override_under_sudo(helper, state):
    state.connector_override = "tests.fakebrick"
    privsepconfig.write_config(state)
    argv = helper.argv(state.privsep_config)
    # SUDO_UID 0: the caller owns the socket (this test, root).
    assert "connector_override = tests.fakebrick under sudo" in refused(
        helper, argv, env={"SUDO_UID": "0"})
    # Without sudo (root, tests) the override works.
    rc, out, served = helper.run(argv)
    assert served, out


def test_daemon_refuses_oslo_environment_options_under_sudo(helper, state):
    env = {"SUDO_UID": "0",
           "OS_MANAGEDVOLUME_PRIVILEGED__UDEV_RULES_DIR": "/etc/cron.d"}
    assert "environment variables set options: " \
        "OS_MANAGEDVOLUME_PRIVILEGED__UDEV_RULES_DIR" in refused(
            helper, helper.argv(state.privsep_config), env=env)


def test_daemon_refuses_a_socket_of_another_user_under_sudo(helper, state):
    assert "not to the sudo caller 36" in refused(
        helper, helper.argv(state.privsep_config), env={"SUDO_UID": "36"})


def test_brick_reports_the_daemons_reason(state, monkeypatch):
    # Root rewrites the file at each start: keep the spoiled one.
    monkeypatch.setattr(privsepconfig, "write_config",
                        lambda cfg: cfg.privsep_config)
    os.chmod(state.privsep_config, 0o666)
    with pytest.raises(errors.HelperFailed) as e:
        privileged.Brick(state).connector_properties()
    message = str(e.value)
    assert "exited with code {}".format(privsep.EXIT_REFUSED) in message
    assert "refuses to start: configuration file {} is writable by group " \
        "or others (mode 0666)".format(state.privsep_config) in message


# (c) A non-root service never writes the daemon's configuration

@pytest.fixture
def as_vdsm(monkeypatch):
    monkeypatch.setattr(privileged.os, "geteuid", lambda: 36)


def test_non_root_refuses_a_missing_config(state, as_vdsm):
    os.unlink(state.privsep_config)
    with pytest.raises(errors.HelperFailed) as e:
        privileged.Brick(state).connector_properties()
    message = str(e.value)
    assert state.privsep_config + " does not exist" in message
    assert "run 'managedvolume-tool configure' as root" in message
    assert not os.path.exists(state.privsep_config)


@pytest.mark.parametrize("spoil, reason", [
    (lambda c: os.chown(c.privsep_config, 36, 36),
     "belongs to uid 36, not root"),
    (lambda c: os.chmod(c.privsep_config, 0o646),
     "writable by group or others (mode 0646)"),
    (lambda c: os.chown(c.state_run_dir, 36, 36),
     "which belongs to uid 36"),
])
def test_non_root_refuses_an_unsafe_config_and_leaves_it_alone(
        state, as_vdsm, spoil, reason):
    spoil(state)
    before = os.stat(state.privsep_config)
    with pytest.raises(errors.HelperFailed) as e:
        privileged.Brick(state).connector_properties()
    assert reason in str(e.value)
    assert "managedvolume-tool configure" in str(e.value)
    after = os.stat(state.privsep_config)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino,
                                                 before.st_mtime_ns)


def test_non_root_warns_when_the_config_is_stale(state, as_vdsm, caplog):
    state.udev_rules_dir = "/elsewhere"
    state.helper_command = "/bin/false"
    with pytest.raises(errors.HelperFailed):
        privileged.Brick(state).connector_properties()
    assert "run 'managedvolume-tool configure' as root to update it" in \
        caplog.text
    with open(state.privsep_config) as f:
        assert "/elsewhere" not in f.read()


def test_root_rewrites_the_config_at_each_start(state):
    os.chmod(state.privsep_config, 0o666)
    state.helper_command = "/bin/false"
    with pytest.raises(errors.HelperFailed):
        privileged.Brick(state).connector_properties()
    st = os.stat(state.privsep_config)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)


# (d) Daemon starts on the fixed socket path are serialized

START = """
import json, logging, sys
from vdsm_managedvolume import config, privileged
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cfg = config.with_state_dir(config.Config(), sys.argv[1])
b = privileged.Brick(cfg)
b._running_daemon()
print(json.dumps({"pid": b.daemon_pid()}), flush=True)
sys.stdin.read()      # keep the daemon until told
b.stop()
"""


@pytest.mark.slow
def test_two_processes_starting_at_once_both_get_a_daemon(state):
    lock = os.open(state.privsep_lock_file, os.O_RDONLY | os.O_CREAT, 0o644)
    procs = []
    try:
        # Hold the lock: both must wait for it, then start one by one.
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", START, state.state_dir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, cwd=REPO))
        waiting = [_read_until(p.stderr, "Waiting for another process")
                   for p in procs]
        assert all(waiting)
        fcntl.flock(lock, fcntl.LOCK_UN)
        pids = [json.loads(p.stdout.readline())["pid"] for p in procs]
        assert len(set(pids)) == 2 and None not in pids
        # Both daemons run at once; the socket path is free again.
        assert all(os.path.exists("/proc/{}".format(pid)) for pid in pids)
        assert not os.path.exists(state.privsep_sock_path)
    finally:
        os.close(lock)
        for p in procs:
            p.communicate("", timeout=60)
    assert [p.returncode for p in procs] == [0, 0]


def _read_until(stream, text):
    for line in stream:
        if text in line:
            return True
    return False


def test_start_fails_cleanly_when_another_process_holds_the_lock(state):
    os.makedirs(state.state_run_dir, exist_ok=True)
    lock = os.open(state.privsep_lock_file, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        b = privileged.Brick(state)
        b.start_timeout = 0.3
        with pytest.raises(errors.HelperFailed, match="another process"):
            b.connector_properties()
        assert b.daemon_pid() is None
    finally:
        os.close(lock)


def test_socket_is_bound_private_and_unlinked_after_the_start(state):
    seen = {}

    def spy(listener, proc, deadline, output, cmd):
        st = os.lstat(state.privsep_sock_path)
        seen["mode"] = stat.S_IMODE(st.st_mode)
        return accept(listener, proc, deadline, output, cmd)

    accept = privileged._accept
    state.helper_command = "/bin/false"
    privileged._accept = spy
    try:
        with pytest.raises(errors.HelperFailed):
            privileged.Brick(state).connector_properties()
    finally:
        privileged._accept = accept
    assert seen == {"mode": 0o600}
    assert not os.path.lexists(state.privsep_sock_path)


def test_a_symlinked_state_run_dir_is_refused(tmp_path):
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    cfg.privsep_config = str(tmp_path / "privsep.conf")
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.makedirs(os.path.dirname(cfg.state_run_dir))
    os.symlink(target, cfg.state_run_dir)
    with pytest.raises(errors.HelperFailed, match="privsep socket"):
        privileged.Brick(cfg).connector_properties()
    assert os.listdir(target) == []


# The whole: nobody, the real sudo, the shipped rule

E2E = r"""
import json, os, subprocess, sys
import msgpack, oslo_privsep.comm  # what the child imports lazily
from vdsm_managedvolume import config, privileged

base, sudoers, device, ours, theirs = sys.argv[1:6]
subprocess.run(["mount", "--bind", sudoers, "/etc/sudoers"], check=True)
if ours != theirs:
    # The package sudo's python imports (sudo resets PYTHONPATH: the
    # venv's install, another tree's in a clone) becomes this tree's.
    subprocess.run(["mount", "--bind", ours, theirs], check=True)
cfg = config.with_state_dir(config.Config(), os.path.join(base, "state"))
cfg.privsep_config = os.path.join(base, "etc", "privsep.conf")
cfg.root_helper = "sudo -n"
r, w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    out = {}
    try:
        os.close(go_w)
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        b = privileged.Brick(cfg)
        info = {"driver_volume_type": "local",
                "data": {"device_path": device}}
        out["attachment"] = b.connect(info)
        b.disconnect(info, out["attachment"])
        dpid = b.daemon_pid()
        out["daemon_pid"] = dpid
        # The parent (root) looks at the daemon's environment meanwhile.
        os.write(w, "{}\n".format(dpid).encode())
        os.read(go_r, 1)
        with open("/proc/{}/status".format(dpid)) as f:
            out["daemon_uid"] = [l.split()[1] for l in f
                                 if l.startswith("Uid:")][0]
        out["cmd"] = privileged.helper_command(cfg)
        extra = out["cmd"] + ["--log-file", os.path.join(base, "x.log")]
        p = subprocess.run(extra, capture_output=True, text=True)
        out["extra_rc"] = p.returncode
        out["extra_err"] = p.stderr
        b.stop()
    except BaseException as e:
        import traceback
        out["error"] = "".join(traceback.format_exception(e))
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
os.close(go_r)
environ = {}
with os.fdopen(r) as f:
    line = f.readline()
    if line.strip().isdigit():
        with open("/proc/{}/environ".format(line.strip()), "rb") as e:
            for item in e.read().split(b"\0"):
                k, _, v = item.decode().partition("=")
                if k in ("SUDO_UID", "HOME", "PYTHONPATH"):
                    environ[k] = v
    os.write(go_w, b"x")
    data = f.read() if not line.startswith("{") else line + f.read()
os.waitpid(pid, 0)
out = json.loads(data)
out["daemon_environ"] = environ
print(json.dumps(out))
"""


def package_under_sudo():
    """The package directory privsep-helper imports under sudo, which
    resets PYTHONPATH: the venv's install, in a clone whose venv is an
    editable install of another tree that tree's."""
    with open(privileged._privsep_helper()) as f:
        python = f.readline()[2:].split()[0]
    return subprocess.check_output(
        [python, "-c", "import os, vdsm_managedvolume as m; "
         "print(os.path.realpath(os.path.dirname(m.__file__)))"],
        env={"PATH": os.environ.get("PATH", "")}, cwd="/",
        text=True).strip()


@pytest.mark.slow
def test_nobody_starts_the_daemon_through_real_sudo_with_the_shipped_rule(
        tmp_path):
    for tool in ("sudo", "unshare", "losetup", "mount"):
        if shutil.which(tool) is None:
            pytest.skip("{} not installed".format(tool))
    # The daemon must run this tree's code: another tree's would not be
    # what is tested, and would refuse us if it spoke another privsep
    # protocol (privsep.py, "Versions").
    ours = os.path.realpath(os.path.join(REPO, "vdsm_managedvolume"))
    theirs = package_under_sudo()
    base = os.path.realpath(subprocess.check_output(
        ["mktemp", "-d", "/tmp/mv-sudo-XXXX"]).decode().strip())
    device = None
    try:
        os.chmod(base, 0o755)
        # What configure does: the daemon's configuration root's, the run
        # directories the service user's.
        cfg = config.with_state_dir(config.Config(),
                                    os.path.join(base, "state"))
        cfg.privsep_config = os.path.join(base, "etc", "privsep.conf")
        privsepconfig.write_config(cfg)
        for d in (os.path.join(base, "state"),
                  os.path.dirname(cfg.state_run_dir), cfg.state_run_dir,
                  cfg.lock_dir, cfg.brick_lock_dir):
            os.makedirs(d, exist_ok=True)
            os.chown(d, NOBODY, NOBODY)

        # The shipped rule for user nobody, with this tree's helper and
        # paths, as the only sudoers content.
        with open(SUDOERS) as f:
            rule = f.read()
        rule = re.sub(r"^Defaults:vdsm ", "Defaults:nobody ", rule,
                      flags=re.M)
        rule = re.sub(r"^vdsm ", "nobody ", rule, flags=re.M)
        for old, new in (
                ("/usr/bin/privsep-helper", privileged._privsep_helper()),
                (config.Config().privsep_config, cfg.privsep_config),
                (config.Config().privsep_sock_path, cfg.privsep_sock_path)):
            assert old in rule
            rule = rule.replace(old, new)
        sudoers = os.path.join(base, "sudoers")
        with open(sudoers, "w") as f:
            f.write("root ALL=(ALL:ALL) ALL\n" + rule)
        os.chmod(sudoers, 0o440)

        backing = tmp_path / "backing"
        with open(backing, "wb") as f:
            f.truncate(1024**2)
        device = subprocess.check_output(
            ["losetup", "-f", "--show", str(backing)]).decode().strip()

        p = subprocess.run(
            ["unshare", "-m", "--propagation", "private", sys.executable,
             "-c", E2E, base, sudoers, device, ours, theirs],
            capture_output=True, text=True, cwd=REPO, timeout=120)
        if p.returncode != 0 and "unshare failed" in p.stderr:
            pytest.skip("no mount namespaces here: " + p.stderr.strip())
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert "error" not in out, out.get("error")

        assert out["attachment"] == {"type": "local", "path": device}
        assert out["daemon_uid"] == "0"
        # Started by sudo (so the daemon ran its sudo checks and passed
        # them), with sudo's clean environment.
        assert out["daemon_environ"] == {"SUDO_UID": str(NOBODY),
                                         "HOME": "/root"}
        assert out["cmd"] == ["sudo", "-n"] + sudoers_command(sudoers)
        # One argument more and sudo says no: nothing ran as root.
        assert out["extra_rc"] != 0
        assert "password is required" in out["extra_err"] or \
            "not allowed" in out["extra_err"], out["extra_err"]
        assert not os.path.exists(os.path.join(base, "x.log"))
        # The service user never touched the daemon's configuration.
        st = os.stat(cfg.privsep_config)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    finally:
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_threads_of_one_process_serialize_on_the_lock_too(state):
    # Threads of one process take the flock on their own open file
    # descriptions: they serialize like processes do.
    state.helper_command = "/bin/false"
    errs = []

    def start():
        try:
            privileged.Brick(state).connector_properties()
        except errors.HelperFailed as e:
            errs.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errs) == 4
    assert all("exited with code 1" in e for e in errs), errs
