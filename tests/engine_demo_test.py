"""docs/engine-demo.sh: it says what is missing, and proves it cleaned up.

The chain itself is asserted step by step in engine_e2e_test.py; here the
script as a user runs it.
"""

import os
import shutil
import subprocess

import pytest

from .engine_fixtures import ROOT

DEMO = os.path.join(ROOT, "docs", "engine-demo.sh")


def test_demo_without_a_venv_stops_at_once_saying_make_venv(tmp_path):
    # The script finds the venv next to itself: a tree without .venv.
    (tmp_path / "docs").mkdir()
    shutil.copy(DEMO, tmp_path / "docs")
    proc = subprocess.run(["bash", str(tmp_path / "docs" / "engine-demo.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "run 'make venv' first" in proc.stderr
    assert "No such file or directory" not in proc.stderr
    assert proc.stdout == ""    # not one step started


@pytest.mark.root
@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_leaves_no_loop_device():
    if os.geteuid() != 0:
        pytest.skip("the demo needs root (loop devices)")
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("MANAGEDVOLUME_"):
            del env[name]
    proc = subprocess.run(["bash", DEMO], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hello from the demo" in proc.stdout
    assert "volumes left: 0\nloop devices left: 0\n" in proc.stdout
    assert proc.stdout.endswith("demo done: nothing left behind\n")


@pytest.mark.root
@pytest.mark.slow
def test_demo_failure_says_why_and_keeps_its_logs():
    # set -e used to end the script inside $(...) before its error line,
    # and the cleanup deleted the log that said why.
    if os.geteuid() != 0:
        pytest.skip("the demo needs root (loop devices)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MANAGEDVOLUME_")}
    proc = subprocess.run(["bash", DEMO, "postgresql://nobody@127.0.0.1:1/x"],
                          capture_output=True, text=True, env=env,
                          timeout=600)
    kept = [line for line in proc.stderr.splitlines()
            if "logs kept in" in line]
    try:
        assert proc.returncode != 0
        assert "engine-demo: create_volume failed (exit 1): error:" in \
            proc.stderr, proc.stderr[-3000:]
        assert "127.0.0.1" in proc.stderr     # the reason: that database
        assert kept, proc.stderr[-3000:]
        work = kept[0].split("logs kept in ")[1].rstrip(":")
        for log in ("service.log", "agent/log/agent.log"):
            assert os.path.isfile(os.path.join(work, log))
            assert os.path.join(work, log) in proc.stderr
        assert not os.path.exists(os.path.join(work, "volumes"))
    finally:
        for line in kept:
            shutil.rmtree(line.split("logs kept in ")[1].rstrip(":"),
                          ignore_errors=True)
