"""Shared pytest configuration.

Fixtures live beside the area they serve, in ``tests/*_fixtures.py``, and
are registered here so that every test module sees them.
"""

import os

import pytest

pytest_plugins = [
    "tests.host_fixtures",
    "tests.rpc_fixtures",
    "tests.engine_fixtures",
]

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (loop devices, privsep)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
