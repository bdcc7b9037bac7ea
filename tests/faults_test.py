"""Crash points (faults.py): armed by the environment a process starts
with."""

import os
import signal
import subprocess
import sys

from vdsm_managedvolume import faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys
from vdsm_managedvolume import faults
faults.crash_point("test.not_armed")
print("passed", flush=True)
faults.crash_point("test.armed")
print("survived", flush=True)
"""


def test_a_process_started_with_a_point_armed_dies_there_only():
    env = dict(os.environ, PYTHONPATH=REPO)
    env[faults.ENV] = "test.other,test.armed"
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env,
                          stdout=subprocess.PIPE, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.decode() == "passed\n"


def test_no_point_is_armed_without_the_variable():
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(faults.ENV, None)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env,
                          stdout=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.decode() == "passed\nsurvived\n"


def test_rearm_reads_a_changed_environment(monkeypatch):
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv(faults.ENV, "test.armed")
    try:
        # Read when the module was imported: not armed yet.
        faults.crash_point("test.armed")
        assert killed == []
        faults.rearm()
        faults.crash_point("test.not_armed")
        assert killed == []
        faults.crash_point("test.armed")
        assert killed == [signal.SIGKILL]
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.rearm()
    faults.crash_point("test.armed")
    assert killed == [signal.SIGKILL]
