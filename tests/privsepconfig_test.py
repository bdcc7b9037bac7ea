"""The privsep daemon's configuration file (privsepconfig.py)."""

import configparser
import os

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import privsepconfig


@pytest.fixture
def cfg(tmp_path):
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    cfg.connector_override = "tests.fakebrick"
    return cfg


def read(path):
    parser = configparser.ConfigParser()
    parser.read(path)
    return parser


def test_config_file_configures_os_brick_and_our_section(cfg):
    path = privsepconfig.write_config(cfg)
    parser = read(path)
    assert parser["oslo_concurrency"]["lock_path"] == cfg.brick_lock_dir
    assert os.path.isdir(cfg.brick_lock_dir)
    section = parser[privsepconfig.SECTION]
    assert section["connector_override"] == "tests.fakebrick"
    # Every operation the agent may run at once has a daemon thread
    # (oslo.privsep's default would be the CPU count).
    assert int(section["thread_pool_size"]) > cfg.max_operations


def test_config_file_holds_every_udev_setting_the_daemon_reads(cfg):
    cfg.udev_owner = "qemu:kvm"
    cfg.rbd_dir = "/dev/rbd-elsewhere"
    section = read(privsepconfig.write_config(cfg))[privsepconfig.SECTION]
    for key in privsepconfig.UDEV_KEYS:
        assert section[key] == getattr(cfg, key)


def test_os_brick_lock_path_is_made_and_kept_0700(cfg):
    # Anyone who can open an os-brick lock file can lock it (a shared
    # lock needs read access only) and hang every attach of its kind.
    privsepconfig.write_config(cfg)
    assert os.stat(cfg.brick_lock_dir).st_mode & 0o777 == 0o700
    os.chmod(cfg.brick_lock_dir, 0o755)
    privsepconfig.write_config(cfg)
    assert os.stat(cfg.brick_lock_dir).st_mode & 0o777 == 0o700
    assert privsepconfig.private_dir(cfg.brick_lock_dir) is False
