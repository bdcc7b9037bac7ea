"""Shared pytest configuration.

Fixtures live beside the area they serve, in ``tests/*_fixtures.py``, and
are registered here so that every test module sees them.
"""

import os

import logging

import pytest

from vdsm_managedvolume import log

pytest_plugins = [
    "tests.host_fixtures",
    "tests.rpc_fixtures",
    "tests.engine_fixtures",
]

IS_ROOT = os.geteuid() == 0


def pytest_configure(config):
    # Privsep daemons fork away from their helper; adopt them so that the
    # ones the tests kill are reaped here, not left as zombies.
    from vdsm_managedvolume import privileged
    privileged.become_subreaper()
    if IS_ROOT:
        # What runs killed before their finalizers ran left.
        from . import leftovers
        # Agents and privsep daemons whose lifelines were killed too
        # (first: they may hold the loop devices open).
        for pid, cmdline in leftovers.stop_stale_agents():
            print("killed {} of a test run that is over ({})".format(
                pid, cmdline[:200]))
        for device, backing in leftovers.detach_stale_loop_devices():
            print("detached {} of a test run that is over ({})".format(
                device, backing))


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (loop devices, privsep)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    # Collect adopted daemons that ended during the session (killed by
    # crash tests in child processes) before we exit and hand them to a
    # PID 1 that may not reap.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture
def log_lines():
    """(logger, lines): a logger whose formatted lines, passed through
    the package's filter (flow id, masking), are collected in lines."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    keep = Keep()
    keep.setFormatter(logging.Formatter(log.FORMAT))
    log.install_filter(keep)
    logger = logging.getLogger("tests.log_lines")
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, lines
    logger.removeHandler(keep)
    logger.propagate = True
