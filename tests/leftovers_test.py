"""A killed test run leaves nothing running, and the next run detaches
its loop devices (tests/leftovers.py, scripts/pgcluster.sh run)."""

import os
import signal
import subprocess
import sys

import pytest

from . import engine_fixtures
from . import leftovers
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
        found = (dev.path, dev.backing) in leftovers.stale_loop_devices()
        assert found == stale
    finally:
        dev.detach()


@pytest.mark.root
def test_a_loop_device_outside_a_pytest_base_temp_is_never_stale(tmp_path):
    (tmp_path / "enginejava-x").mkdir()
    dev = LoopDevice(str(tmp_path / "enginejava-x" / "volume.img"))
    try:
        assert dev.path not in [d for d, _ in leftovers.stale_loop_devices()]
    finally:
        dev.detach()


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
