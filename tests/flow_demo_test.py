"""docs/flow-demo.sh (tests/flowdemo.py): a newcomer runs it as is.

The flow itself is asserted in flows_test.py; here the script as a user
runs it: readable steps, the hosts' journals, the check, and nothing left.
"""

import os
import shutil
import subprocess

import pytest

from .engine_fixtures import ROOT

DEMO = os.path.join(ROOT, "docs", "flow-demo.sh")


def test_demo_without_a_venv_stops_at_once_saying_make_venv(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copy(DEMO, tmp_path / "docs")
    proc = subprocess.run(["bash", str(tmp_path / "docs" / "flow-demo.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "run 'make venv' first" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.root
@pytest.mark.slow
def test_demo_migrates_a_vm_and_leaves_no_loop_device():
    if os.geteuid() != 0:
        pytest.skip("the demo needs root (loop devices)")
    env = dict(os.environ, MANAGEDVOLUME_ENGINE_COLD="1")
    proc = subprocess.run(["bash", DEMO], capture_output=True, text=True,
                          env=env, timeout=600)
    out = proc.stdout
    # The script ignores the caller's MANAGEDVOLUME_* settings.
    assert "connector host 'host-a'" in out, out + proc.stderr
    assert "engine  -> host-b  attach_volume disk1" in out
    assert "engine  -> host-a  detach_volume disk1" in out
    assert "journal of host-a: nothing\n  journal of host-b: disk1\n" in out
    assert "vm1 reads b'hello from vm1, written on host-a' on host-b" in out
    assert "  all agree\n" in out
    assert "loop devices left: 0\n" in out
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.endswith("nothing left behind\n")
