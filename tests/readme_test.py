"""The README's commands, run as a newcomer types them.

The loop-device walk-through (attach, write and read the managed_path,
list, grow, extend, detach) runs with bash in a directory laid out like
the source tree (``.venv`` and ``.state`` links) against the real agent
with its development PKI; only the port differs from ``make run``'s.
"""

import json
import os
import subprocess
import sys

import pytest

from .agent_process_test import AgentProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.dirname(os.path.dirname(sys.executable))

pytestmark = pytest.mark.root


def readme_block(after):
    """The first indented block after the paragraph starting ``after``."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def test_readme_loop_device_walk_through_runs_as_written(tmp_path):
    script = readme_block("On a machine without iSCSI, a loop device")
    agent = AgentProcess(tmp_path / "agent").start()
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink(VENV, str(tree / ".venv"))
    os.symlink(agent.state_dir, str(tree / ".state"))
    # make run's agent is on 54321; this one on its own port.
    script = script.replace(
        "managedvolume-client --state-dir .state",
        "managedvolume-client --state-dir .state -p {}".format(agent.port))
    # mktemp -d: under tmp_path, so that a failed run's loop device is
    # found and detached.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    try:
        p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script],
                           cwd=str(tree), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        out = p.stdout
        assert '"managed_path":' in out
        assert "\nhello\n" in out
        assert "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10  attached  local" in out
        assert '"size": 2147483648' in out
        assert out.rstrip().endswith("true")
        with agent.client() as c:
            assert c.call("ManagedVolume.volumes_info", {}) == []
        assert _loops_under(tmp_path) == []
    finally:
        for dev in _loops_under(tmp_path):
            subprocess.run(["losetup", "-d", dev], check=False)
        agent.stop()


def _loops_under(path):
    out = subprocess.run(["losetup", "--json", "-l"], stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devices
            if (d.get("back-file") or "").startswith(str(path) + os.sep)]
