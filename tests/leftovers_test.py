"""A killed test run leaves nothing running, and the next run detaches
its loop devices and stops what a killed watchdog left (tests/leftovers.py,
tests/lifeline.py, scripts/pgcluster.sh run)."""

import glob
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from . import engine_fixtures
from . import leftovers
from .agent_process_test import AgentProcess
from .agentutil import wait_for
from .host_fixtures import LoopDevice


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.root
@pytest.mark.parametrize("owner, stale", [
    ("none", True), ("dead", True), ("reused", True), ("alive", False)])
def test_a_loop_device_is_stale_when_the_run_of_its_base_temp_is_over(
        tmp_path, owner, stale):
    basetemp = tmp_path / "pytest-of-someone" / "pytest-7"
    (basetemp / "test_x0").mkdir(parents=True)
    lock = basetemp / ".lock"
    if owner == "dead":
        lock.write_text(str(_dead_pid()))
    elif owner == "reused":
        # Our pid, written before we started: another process's.
        lock.write_text(str(os.getpid()))
        os.utime(lock, (0, 0))
    elif owner == "alive":
        lock.write_text(str(os.getpid()))
    dev = LoopDevice(str(basetemp / "test_x0" / "backing"))
    try:
        found = (dev.path, dev.backing) in leftovers.stale_loop_devices(
            root=str(tmp_path))
        assert found == stale
        # Under this run's own base temp dir, which another run starting
        # now (several run at once on this machine) must not take for a
        # run that is over: it would detach the device under this test.
        assert (dev.path, dev.backing) not in \
            leftovers.stale_loop_devices()
    finally:
        dev.detach()


@pytest.mark.root
def test_a_stale_loop_device_bound_again_meanwhile_is_not_detached(
        tmp_path):
    # Found stale, then detached by another run and bound by a third to
    # its own file on the same minor before this run's detach: that
    # device is the third run's, and stays.  A stale one still bound to
    # its file is detached.
    basetemp = tmp_path / "pytest-of-someone" / "pytest-7"
    (basetemp / "test_x0").mkdir(parents=True)
    dev = LoopDevice(str(basetemp / "test_x0" / "backing"))
    other = LoopDevice(str(basetemp / "test_x0" / "other"))
    try:
        stale = leftovers.stale_loop_devices(root=str(tmp_path))
        assert (dev.path, dev.backing) in stale
        assert (other.path, other.backing) in stale
        live = tmp_path / "live"
        dev.reattach(str(live))
        done = leftovers.detach_loop_devices(
            [(dev.path, str(basetemp / "test_x0" / "backing")),
             (other.path, other.backing)])
        assert done == [(other.path, other.backing)]
        assert dev.current_backing() == str(live)
        assert other.current_backing() != other.backing
    finally:
        dev.detach()
        other.detach()


@pytest.mark.root
def test_a_loop_device_outside_a_pytest_base_temp_is_never_stale(tmp_path):
    (tmp_path / "enginejava-x").mkdir()
    dev = LoopDevice(str(tmp_path / "enginejava-x" / "volume.img"))
    try:
        assert dev.path not in [d for d, _ in leftovers.stale_loop_devices()]
    finally:
        dev.detach()


# A test run that starts an agent, prints its pid and its privsep
# daemons' and waits to be killed.
RUN_AGENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests import leftovers
from tests.agent_process_test import AgentProcess
agent = AgentProcess(sys.argv[2]).start()
deadline = time.monotonic() + 30
while not leftovers.privsep_daemons(agent.state_dir):
    assert time.monotonic() < deadline, "no privsep daemon"
    time.sleep(0.05)
daemons = leftovers.privsep_daemons(agent.state_dir)
print(" ".join(str(p) for p in [agent.proc.pid] + daemons), flush=True)
time.sleep(600)
"""


def _gone(pids):
    return all(engine_fixtures.process_state(p) in (None, "Z") for p in pids)


@pytest.mark.root
def test_an_agent_ends_with_the_test_run_that_started_it(tmp_path):
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_AGENT, engine_fixtures.ROOT,
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in run.stdout.readline().split()]
        assert pids, "the run did not start its agent"
        run.send_signal(signal.SIGKILL)
        run.wait()
        wait_for(lambda: _gone(pids), timeout=30)
    finally:
        run.kill()
        run.wait()


@pytest.fixture
def short_root():
    """A temp root of a short path: the agent's sockets' paths must fit
    in sun_path (108 bytes), and tmp_path's do not."""
    root = tempfile.mkdtemp(prefix="leftovers-")
    yield pathlib.Path(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.root
@pytest.mark.parametrize("owner", ["dead", "alive"])
def test_the_next_run_kills_the_agents_of_a_run_that_is_over(
        short_root, owner):
    basetemp = short_root / "pytest-of-x" / "pytest-7"
    basetemp.mkdir(parents=True)
    (basetemp / ".lock").write_text(
        str(_dead_pid() if owner == "dead" else os.getpid()))
    agent = AgentProcess(basetemp / "a").start()
    try:
        # Its watchdog killed with the run (tests/lifeline.py).
        agent._lifeline.kill()
        agent._lifeline.wait()
        agent._lifeline = None
        wait_for(lambda: leftovers.privsep_daemons(agent.state_dir),
                 timeout=30)
        pids = [agent.proc.pid] + leftovers.privsep_daemons(agent.state_dir)

        stale = leftovers.stop_stale_agents(root=str(short_root))
        if owner == "dead":
            # The agent and its daemon (the helper it forked from may
            # still be there, or be gone already).
            found = {p for p, _ in stale}
            assert agent.proc.pid in found and found - {agent.proc.pid}
            wait_for(lambda: _gone(pids) and not leftovers.privsep_daemons(
                agent.state_dir), timeout=30)
        else:
            assert stale == []
            assert not _gone(pids)
        # Never those of a run going on (this one, for another run).
        assert not {p for p, _ in leftovers.stale_agents()} & set(pids)
    finally:
        agent.stop()


RUN_CLUSTER = """
import subprocess, sys, time
proc = subprocess.Popen(["bash", sys.argv[1], "run"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True,
                        start_new_session=True)
for line in proc.stdout:
    if line.startswith("PGCLUSTER_DIR="):
        print(line.split("=", 1)[1].strip(), flush=True)
    if line.strip() == "PGCLUSTER_READY":
        break
time.sleep(600)
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_a_cluster_stops_when_the_run_holding_it_is_killed(tmp_path):
    if subprocess.run(["bash", engine_fixtures.PGCLUSTER, "bindir"],
                      capture_output=True).returncode != 0:
        pytest.skip("postgresql binaries not installed")
    env = dict(os.environ, PGCLUSTER_PASSWORD="pw")
    env.pop("TMPDIR", None)
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_CLUSTER, engine_fixtures.PGCLUSTER],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        directory = run.stdout.readline().strip()
        assert directory.startswith("/tmp/pgcluster.")
        with open(os.path.join(directory, "data", "postmaster.pid")) as f:
            postmaster = int(f.readline())
        with open(os.path.join(directory, "owner")) as f:
            assert int(f.read()) == run.pid
        run.send_signal(signal.SIGKILL)
        run.wait()
        wait_for(lambda: not os.path.exists(directory), timeout=60)
        assert engine_fixtures.process_state(postmaster) in (None, "Z")
    finally:
        run.kill()
        run.wait()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_cluster_names_its_owner_before_it_starts(short_root):
    """A run killed while its cluster starts leaves a cluster the next
    test run can tell is a dead run's (leftovers.stale_pg_clusters needs
    its owner file)."""
    if subprocess.run(["bash", engine_fixtures.PGCLUSTER, "bindir"],
                      capture_output=True).returncode != 0:
        pytest.skip("postgresql binaries not installed")
    os.chmod(short_root, 0o755)        # the server runs as postgres
    env = dict(os.environ, PGCLUSTER_PASSWORD="pw", TMPDIR=str(short_root))
    run = subprocess.Popen(["bash", engine_fixtures.PGCLUSTER, "run"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           env=env, start_new_session=True)
    try:
        pid_files = str(short_root / "pgcluster.*" / "data" /
                        "postmaster.pid")
        wait_for(lambda: glob.glob(pid_files), timeout=120)
        directory = os.path.dirname(os.path.dirname(glob.glob(pid_files)[0]))
        with open(os.path.join(directory, "owner")) as f:
            assert int(f.read()) == os.getpid()
        run.stdin.close()
        assert run.wait(120) == 0
        assert not os.path.exists(directory)
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait()
