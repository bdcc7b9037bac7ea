"""Who writes the udev rules (udevwriter.py): the service itself when it
is root and may write the rules directory, else the privsep daemon.
What each writer does is proven end to end in nonroot_test (the daemon)
and service_test (the service)."""

import os

import pytest

from vdsm_managedvolume import udevwriter

pytestmark = pytest.mark.root


def test_udev_writer_auto_is_the_service_for_root(host_cfg):
    assert udevwriter.choose(host_cfg) == "service"


def test_udev_writer_auto_is_the_daemon_when_not_root(host_cfg,
                                                      monkeypatch):
    monkeypatch.setattr(udevwriter.os, "geteuid", lambda: 36)
    assert udevwriter.choose(host_cfg) == "daemon"


def test_udev_writer_auto_is_the_daemon_when_rules_dir_is_not_writable(
        host_cfg, monkeypatch):
    real = os.access
    monkeypatch.setattr(
        udevwriter.os, "access",
        lambda p, mode: False if mode & os.W_OK else real(p, mode))
    assert udevwriter.choose(host_cfg) == "daemon"


@pytest.mark.parametrize("value, expected", [
    ("service", "service"), ("daemon", "daemon"), ("Daemon", "daemon")])
def test_udev_writer_can_be_forced(host_cfg, value, expected):
    host_cfg.udev_writer = value
    assert udevwriter.choose(host_cfg) == expected
