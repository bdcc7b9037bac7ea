"""The tree passes its linters, so that a plain pytest run catches what
``make lint`` (run by ``make check``) would.

ruff's settings are ``[tool.ruff]`` in pyproject.toml (pyflakes,
pycodestyle, syntax and annotations Python 3.9 cannot run); vermin's are
``[vermin]`` in setup.cfg (nothing of the standard library newer than 3.9,
the interpreter of EL9, where vdsm and RDO's os-brick run).
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _run(tool, *args):
    path = os.path.join(BIN, tool)
    if not os.path.exists(path):
        pytest.fail("{} is not installed in {}: run `make venv` (it is in "
                    "the test extra)".format(tool, BIN))
    res = subprocess.run([path] + list(args), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, check=False)
    assert res.returncode == 0, res.stdout


def test_ruff_finds_nothing():
    _run("ruff", "check", "--no-cache", ".")


def test_package_and_hook_need_nothing_newer_than_python_3_9():
    _run("vermin", "vdsm_managedvolume", "hooks")
