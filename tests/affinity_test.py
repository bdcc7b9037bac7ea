"""Where the agent and the privsep daemon run (affinity.py).

vdsm pins itself to one core by default and runs its commands on every
CPU; the agent does the same, and a daemon started from a pinned agent or
from inside vdsm must not inherit that core.  The daemon tests start a
real privsep daemon from a thread pinned to one CPU, as vdsm's threads
are; the agent test starts the real agent.
"""

import concurrent.futures
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types

import pytest

from vdsm_managedvolume import affinity
from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import privileged

from tests import fakebrick
from tests.agent_process_test import AgentProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vdsm_config(cpu_affinity):
    """A stand-in for vdsm.common.config holding ``[vars] cpu_affinity``."""
    module = types.ModuleType("vdsm.common.config")
    module.config = types.SimpleNamespace(
        get=lambda section, key: {("vars", "cpu_affinity"): cpu_affinity}[
            (section, key)])
    return module


# Every CPU the host's init may use: where a daemon started inside a
# pinned vdsm goes.
HOST = sorted(os.sched_getaffinity(1))


@pytest.mark.parametrize("vdsm, setting, expected", [
    # Standalone: auto leaves the daemon on the agent's CPUs.
    (None, "auto", None),
    # Inside a vdsm that pins itself (its default, "auto", or a list):
    # every CPU, as vdsm runs its own commands.
    ("auto", "auto", HOST),
    ("1", "auto", HOST),
    # Inside a vdsm that does not pin itself: the daemon keeps vdsm's.
    ("", "auto", None),
    # Said in our file: wins, inside vdsm or not.
    ("auto", "", None),
    (None, "0", [0]),
    ("auto", "0-1,3", [0, 1, 3]),
])
def test_daemon_cpus(monkeypatch, vdsm, setting, expected):
    if vdsm is None:
        monkeypatch.delitem(sys.modules, "vdsm.common.config", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "vdsm.common.config",
                            _vdsm_config(vdsm))
    assert affinity.daemon_cpus(setting) == expected


def test_a_daemon_of_a_pinned_agent_gets_the_cpus_the_agent_had(
        monkeypatch):
    monkeypatch.delitem(sys.modules, "vdsm.common.config", raising=False)
    monkeypatch.setattr(affinity, "_before_pin", [2, 3, 4])
    assert affinity.daemon_cpus("auto") == [2, 3, 4]
    assert affinity.daemon_cpus("") is None
    assert affinity.daemon_cpus("7") == [7]


@pytest.mark.parametrize("setting, allowed, expected", [
    # vdsm's pick: the second CPU, the first when there is one.
    ("auto", [0, 1, 2, 3], [1]),
    ("auto", [4, 6, 9], [6]),
    ("auto", [3], None),
    ("", [0, 1], None),
    ("0,2-3", [0, 1], [0, 2, 3]),
])
def test_agent_cpus(setting, allowed, expected):
    assert affinity.agent_cpus(setting, allowed) == expected


def test_a_vdsm_without_the_option_leaves_the_daemon_on_its_cpus(
        monkeypatch):
    module = types.ModuleType("vdsm.common.config")

    def get(section, key):
        raise KeyError(key)     # configparser.NoOptionError, in vdsm < 4.20

    module.config = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "vdsm.common.config", module)
    assert affinity.daemon_cpus("auto") is None


def _find_vdsm():
    loader = importlib.machinery.SourceFileLoader(
        "vdsm_client_script", os.path.join(REPO, "scripts", "vdsm-client"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    script = importlib.util.module_from_spec(spec)
    loader.exec_module(script)
    return script.find_vdsm()


def test_inside_vdsm_with_its_own_configuration_module():
    # vdsm's real vdsm.common.config (../shared/vdsm), with its defaults
    # (no /etc/vdsm/vdsm.conf here): cpu_affinity "auto", vdsm pinned.
    vdsm = _find_vdsm()
    if vdsm is None:
        pytest.skip("vdsm's lib not found (../shared/vdsm or "
                    "$MANAGEDVOLUME_VDSM)")
    if os.path.exists("/etc/vdsm/vdsm.conf"):
        pytest.skip("a vdsm configuration here may set cpu_affinity")
    code = ("import vdsm.common.config\n"
            "from vdsm_managedvolume import affinity, config\n"
            "print(affinity.daemon_cpus(config.Config()"
            ".daemon_cpu_affinity))\n")
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, stdout=subprocess.PIPE,
        universal_newlines=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.join(vdsm, "lib"), REPO]))).stdout
    assert out.strip() == str(HOST)


KEYS = [("agent", "cpu_affinity"), ("privsep", "daemon_cpu_affinity")]


@pytest.mark.parametrize("section, key", KEYS)
@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), (" AUTO ", "auto"), ("", ""), ("0-3,8", "0-3,8"),
])
def test_config_takes_auto_empty_or_a_cpu_list(tmp_path, section, key, value,
                                               expected):
    path = tmp_path / "managedvolume.conf"
    path.write_text("[{}]\n{} = {}\n".format(section, key, value))
    assert getattr(config.load(str(path)), key) == expected


@pytest.mark.parametrize("section, key", KEYS)
@pytest.mark.parametrize("value", ["all", "1_0", "3-1", "0,,1", "-1",
                                   "0-8192", "0x1"])
def test_config_refuses_what_is_no_cpu_list(tmp_path, section, key, value):
    path = tmp_path / "managedvolume.conf"
    path.write_text("[{}]\n{} = {}\n".format(section, key, value))
    with pytest.raises(errors.ConfigError) as e:
        config.load(str(path))
    assert "{} = {!r}".format(key, value) in str(e.value)
    assert "{} [{}]".format(path, section) in str(e.value)


# A real daemon, started from a pinned thread

def _thread_cpus(pid):
    """{tid: (CPU, ...)} of every thread of ``pid``, from the kernel's
    Cpus_allowed_list."""
    cpus = {}
    for tid in os.listdir("/proc/{}/task".format(pid)):
        with open("/proc/{}/task/{}/status".format(pid, tid)) as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    cpus[tid] = tuple(affinity.cpu_list(
                        line.split(":", 1)[1]))
    return cpus


@pytest.fixture
def pinned(monkeypatch, tmp_path):
    """This thread pinned to its first CPU (as vdsm's threads are to
    theirs) while the test starts a daemon: (that CPU, every CPU it may
    use), tuples."""
    if os.geteuid() != 0:
        pytest.skip("the privsep daemon needs root")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs to tell them apart")
    monkeypatch.setenv(fakebrick.ENV_DIR, str(tmp_path / "fakebrick"))
    os.sched_setaffinity(0, allowed[:1])
    try:
        yield tuple(allowed[:1]), tuple(allowed)
    finally:
        os.sched_setaffinity(0, allowed)


def test_the_agents_udevadm_runs_where_the_daemon_runs(monkeypatch,
                                                       tmp_path):
    # vdsm runs every command it starts on every CPU, never on its own
    # pinned core; the agent's udevadm trigger (where sysfs cannot be
    # written: not a device here) runs where its daemon and the daemon's
    # commands run, the CPUs the agent had before pinning itself.
    from vdsm_managedvolume import udev
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs to tell them apart")
    seen = tmp_path / "cpus"
    udevadm = tmp_path / "udevadm"
    udevadm.write_text("#!/bin/sh\ngrep Cpus_allowed_list /proc/self/status"
                       " >'{}'\n".format(seen))
    udevadm.chmod(0o755)
    cfg = config.Config()
    cfg.udevadm = str(udevadm)
    monkeypatch.setattr(affinity, "_before_pin", allowed)
    os.sched_setaffinity(0, allowed[:1])
    try:
        assert udev.trigger(cfg, str(udevadm)) is True
        assert sorted(os.sched_getaffinity(0)) == allowed[:1]
    finally:
        os.sched_setaffinity(0, allowed)
    assert seen.read_text().split(":")[1].strip() == affinity.text(allowed)


def _brick(tmp_path, cpu_affinity):
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    cfg.connector_override = "tests.fakebrick"
    cfg.daemon_cpu_affinity = cpu_affinity
    return privileged.Brick(cfg)


@pytest.mark.root
def test_a_daemon_told_its_cpus_leaves_its_callers_core(pinned, tmp_path):
    one, every = pinned
    brick = _brick(tmp_path, ",".join(map(str, every)))
    try:
        # Calls at once: the pool makes threads; each inherits the CPUs,
        # and so does a command one of them starts.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: brick.connector_properties(), range(8)))
        threads = _thread_cpus(brick.daemon_pid())
        assert len(threads) > 2
        assert set(threads.values()) == {every}
        # ...and the thread that started it is back on its one CPU.
        assert tuple(sorted(os.sched_getaffinity(0))) == one
    finally:
        brick.stop()


@pytest.mark.root
def test_a_daemon_told_nothing_keeps_its_callers_cpus(pinned, tmp_path):
    one, every = pinned
    brick = _brick(tmp_path, "")
    try:
        brick.connector_properties()
        assert set(_thread_cpus(brick.daemon_pid()).values()) == {one}
    finally:
        brick.stop()


@pytest.mark.root
def test_cpus_the_kernel_refuses_leave_the_daemon_serving(pinned, tmp_path):
    # CPU 8191 exists on no machine here: the kernel refuses the set,
    # the daemon says so and serves on its caller's CPU.
    one, every = pinned
    if 8191 in every:
        pytest.skip("this machine has a CPU 8191")
    brick = _brick(tmp_path, "8191")
    try:
        assert brick.connector_properties()
        assert set(_thread_cpus(brick.daemon_pid()).values()) == {one}
    finally:
        brick.stop()


@pytest.mark.root
def test_the_agent_pins_itself_as_vdsm_does_and_its_daemon_does_not(
        tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs to tell them apart")
    agent = AgentProcess(tmp_path, insecure=True).start()
    try:
        with agent.client() as c:
            assert "connector_info" in c.call("Host.getCapabilities", {})
        # Every thread of the agent's back end (the service) on the
        # second CPU ([agent] cpu_affinity = auto), of its front end (the
        # wire: workers, I/O loop) on the CPUs the host's init may use
        # but the back end's: all of them, or the first where the host
        # set CPUs aside ([agent] front_cpu_affinity = auto)...
        from .agent_process_test import back_pid
        assert set(_thread_cpus(back_pid(agent)).values()) == \
            {tuple(allowed[1:2])}
        front = [c for c in affinity.host_cpus() if c in allowed
                 and c != allowed[1]]
        set_aside = set(affinity.online_cpus()) - set(affinity.host_cpus())
        if set_aside:
            front = front[:1]
        assert set(_thread_cpus(agent.proc.pid).values()) == \
            {tuple(front)}
        # ...its privsep daemon, on every CPU the agent had.
        marker = agent.state_dir + "/run/managedvolume/privsep"
        daemons = [int(p) for p in os.listdir("/proc") if p.isdigit()
                   and marker in _cmdline(p)]
        assert len(daemons) == 1
        assert set(_thread_cpus(daemons[0]).values()) == {tuple(allowed)}
        assert "Running on CPUs {} ([agent] cpu_affinity = auto)".format(
            allowed[1]) in agent.log()
        assert "Front end on CPUs {}, back end on CPUs {} ([agent] " \
            "front_cpu_affinity = auto)".format(
                affinity.text(front), allowed[1]) in agent.log()
        if set_aside:
            reason = "the front end takes the first of them"
        elif len(front) == 1:
            reason = "the front end takes the one the back end does not use"
        else:
            reason = "the front end is not pinned to one"
        assert reason in agent.log()
    finally:
        agent.stop()


def _cmdline(pid):
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def test_a_refused_cpu_list_for_udevadm_warns_once_per_process(
        monkeypatch, tmp_path, caplog):
    # The udevadm fallback runs at every trigger: a CPU list the kernel
    # refuses (outside the agent's cpuset since a cgroup change) is a
    # WARNING once, then DEBUG (review-fix9 hostfix-L3); the command
    # still runs, on the thread's own CPUs.
    import logging
    from vdsm_managedvolume import udev
    if 8191 in os.sched_getaffinity(0):
        pytest.skip("this machine has a CPU 8191")
    ran = tmp_path / "ran"
    udevadm = tmp_path / "udevadm"
    udevadm.write_text("#!/bin/sh\necho x >>'{}'\n".format(ran))
    udevadm.chmod(0o755)
    cfg = config.Config()
    cfg.udevadm = str(udevadm)
    cfg.daemon_cpu_affinity = "8191"
    monkeypatch.setattr(affinity, "_refused", set())
    caplog.set_level(logging.DEBUG, logger=affinity.log.name)
    for _ in range(3):
        assert udev.trigger(cfg, str(udevadm)) is True
    refused = [r for r in caplog.records
               if r.getMessage().startswith("Cannot start udevadm on CPUs")]
    assert [r.levelno for r in refused] == [
        logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert ran.read_text().count("x") == 3


def test_the_front_end_runs_on_a_cpu_of_its_own(monkeypatch):
    # [agent] front_cpu_affinity: empty = the back end's own (None); a
    # list = those CPUs; auto (below) = CPUs the back end (this process,
    # pinned) does not use.
    monkeypatch.setattr(affinity, "host_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(affinity, "online_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(affinity, "_before_pin", [0, 1, 2, 3])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert affinity.front_cpus("") is None
    assert affinity.front_cpus("0,3") == [0, 3]
    # One CPU, or an agent not pinned: nowhere else to go.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert affinity.front_cpus("auto") is None
    monkeypatch.setattr(affinity, "_before_pin", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert affinity.front_cpus("auto") is None


def test_auto_pins_the_front_end_to_a_housekeeping_cpu_only(monkeypatch):
    # pid 1 may not use every online CPU (systemd's CPUAffinity=, tuned's
    # cpu-partitioning): the admin set CPUs 0-1 aside for the host; the
    # front end takes the first the back end (on 1) does not use.
    monkeypatch.setattr(affinity, "online_cpus", lambda: list(range(8)))
    monkeypatch.setattr(affinity, "host_cpus", lambda: [0, 1])
    monkeypatch.setattr(affinity, "_before_pin", [0, 1])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert affinity.front_cpus("auto") == [0]
    # ...never one the agent could not use before it pinned itself.
    monkeypatch.setattr(affinity, "host_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(affinity, "_before_pin", [1, 2, 3])
    assert affinity.front_cpus("auto") == [2]
    # Every online CPU is pid 1's: ovirt-engine may give any of them but
    # vdsm's to a dedicated-CPU VM (CPU 0 first), so the front end is
    # pinned to none, it runs on every CPU but the back end's.
    monkeypatch.setattr(affinity, "online_cpus", lambda: list(range(8)))
    monkeypatch.setattr(affinity, "host_cpus", lambda: list(range(8)))
    monkeypatch.setattr(affinity, "_before_pin", list(range(8)))
    assert affinity.front_cpus("auto") == [0, 2, 3, 4, 5, 6, 7]
    # A unit's CPUAffinity= bounds it.
    monkeypatch.setattr(affinity, "_before_pin", [4, 5, 6])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert affinity.front_cpus("auto") == [4, 6]
    # Two CPUs, none set aside (this machine): the other one.
    monkeypatch.setattr(affinity, "online_cpus", lambda: [0, 1])
    monkeypatch.setattr(affinity, "host_cpus", lambda: [0, 1])
    monkeypatch.setattr(affinity, "_before_pin", [0, 1])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert affinity.front_cpus("auto") == [0]


def test_online_cpus_are_the_kernels(monkeypatch, tmp_path):
    with open(affinity.ONLINE) as f:
        assert affinity.text(affinity.online_cpus()) == f.read().strip()
    assert set(affinity.host_cpus()) <= set(affinity.online_cpus())
    # Unreadable: pid 1's (auto then pins the front end to no CPU).
    monkeypatch.setattr(affinity, "ONLINE", str(tmp_path / "missing"))
    assert affinity.online_cpus() == affinity.host_cpus()
