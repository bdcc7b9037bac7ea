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


def test_no_file_cites_a_note_outside_the_tree():
    """Comments and docs state a fact or cite docs/ (dependencies.md holds
    what the code relies on), never a note a maintainer does not have."""
    word = "CONTRACT"      # spelled apart so that this file does not match
    found = []
    for top in ("vdsm_managedvolume", "tests", "docs", "hooks", "bench",
                "scripts", "data"):
        for base, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                path = os.path.join(base, name)
                if path == os.path.abspath(__file__):
                    continue
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if word in text:
                    found.append(os.path.relpath(path, REPO))
    with open(os.path.join(REPO, "README.md")) as f:
        if word in f.read():
            found.append("README.md")
    assert found == []


def test_tree_tracks_no_venv_state_or_build_output():
    """A worktree's ``.venv`` symlink once got committed (``.venv/`` in
    .gitignore matches only a directory): checking it out replaced the
    venv of every other checkout with a link.  Nothing local is tracked."""
    if not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "ls-files"], cwd=REPO,
                         stdout=subprocess.PIPE, universal_newlines=True,
                         check=True)
    local = (".venv", ".state", "build", "dist", ".pytest_cache",
             ".ruff_cache")
    tracked = [p for p in res.stdout.splitlines()
               if p.split("/")[0] in local or p.endswith(".pyc")
               or "/__pycache__/" in "/" + p]
    assert tracked == []
    for name in (".venv", ".state"):
        res = subprocess.run(["git", "check-ignore", "-q", "--no-index",
                              name], cwd=REPO, check=False)
        assert res.returncode == 0, ".gitignore must ignore a {} link".format(
            name)
