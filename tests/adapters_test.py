"""Vendor adapters: a real entry point, checked here, loaded in the daemon.

The module installs a tiny distribution ("acme-adapter", a dist-info with
entry_points.txt and a module) into a temporary directory that is on
sys.path of this process and on PYTHONPATH of the privsep daemon - the
same thing ``pip install`` of a vendor package does.
"""

import json
import os

import pytest

from vdsm_managedvolume import adapters
from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import privileged
from vdsm_managedvolume import service

from tests import fakebrick

SECRET = "adapter-s3cret"

ADAPTER_MODULE = '''
"""A vendor connector, as a vendor would ship it."""
import json
import os


class Connector:

    def __init__(self, root_helper, **kwargs):
        self.root_helper = root_helper
        self.kwargs = kwargs

    def connect_volume(self, data):
        if data.get("fail"):
            raise RuntimeError("acme login failed: password=%s"
                               % data.get("password"))
        with open(data["record"], "w") as f:
            json.dump({"pid": os.getpid(), "uid": os.getuid(),
                       "root_helper": self.root_helper,
                       "kwargs": self.kwargs, "data": data}, f)
        return {"type": "block", "path": "/dev/acme/" + data["volume"],
                "acme_ids": ("a", "b")}

    def disconnect_volume(self, data, device_info):
        with open(data["record"] + ".disconnected", "w") as f:
            json.dump({"device_info": device_info}, f)


def factory(root_helper, **kwargs):
    return Connector(root_helper, **kwargs)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site directory holding the installed "acme-adapter" package."""
    d = tmp_path_factory.mktemp("site")
    (d / "acme_adapter.py").write_text(ADAPTER_MODULE)
    info = d / "acme_adapter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-adapter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[{}]\nacme = acme_adapter:factory\n".format(adapters.GROUP))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(d))
        path = os.environ.get("PYTHONPATH")
        mp.setenv("PYTHONPATH",
                  str(d) + (os.pathsep + path if path else ""))
        yield d


@pytest.fixture(scope="module")
def brick(site, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    cfg = config.with_state_dir(config.Config(), str(state))
    cfg.connector_override = "tests.fakebrick"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fakebrick.ENV_DIR, str(state / "fake"))
        b = privileged.Brick(cfg)
        yield b
        b.stop()


def acme(tmp_path, **data):
    data.setdefault("volume", "vol-1")
    data.setdefault("record", str(tmp_path / "record.json"))
    return {"driver_volume_type": "iscsi", "adapter": "acme", "data": data}


# Checking names (no daemon)

def test_installed_lists_registered_adapters(site):
    assert "acme" in adapters.installed()


def test_check_accepts_no_adapter_and_installed_ones(site):
    adapters.check(None)
    adapters.check("")
    adapters.check("acme")


def test_unknown_adapter_is_934_listing_the_installed_ones(site):
    with pytest.raises(errors.UnknownAdapter) as e:
        adapters.check("nope")
    assert e.value.code == 934
    assert "'nope'" in str(e.value)
    assert "acme" in str(e.value)
    assert adapters.GROUP in str(e.value)


def test_unknown_adapter_with_none_installed_says_none(monkeypatch):
    monkeypatch.setattr(adapters, "_entry_points", lambda: [])
    with pytest.raises(errors.UnknownAdapter) as e:
        adapters.check("acme")
    assert "installed: none" in str(e.value)


def test_load_returns_the_factory(site):
    factory = adapters.load("acme")
    assert factory.__module__ == "acme_adapter"


# Through the daemon

@pytest.mark.root
def test_adapter_connects_in_the_privileged_daemon(brick, tmp_path):
    info = acme(tmp_path)
    att = brick.connect(info)
    assert att == {"type": "block", "path": "/dev/acme/vol-1",
                   "acme_ids": ["a", "b"]}
    with open(tmp_path / "record.json") as f:
        record = json.load(f)
    assert record["pid"] == brick.daemon_pid()
    assert record["uid"] == 0
    assert record["kwargs"]["protocol"] == "iscsi"
    assert record["kwargs"]["use_multipath"] is True

    brick.disconnect(info, att)
    with open(str(tmp_path / "record.json") + ".disconnected") as f:
        assert json.load(f)["device_info"] == att


@pytest.mark.root
def test_adapter_wins_over_the_connector_override(brick, tmp_path):
    # tests.fakebrick would fake iscsi; the adapter is asked instead.
    att = brick.connect(acme(tmp_path, volume="vol-2"))
    assert att["path"] == "/dev/acme/vol-2"
    brick.disconnect(acme(tmp_path, volume="vol-2"), att)


@pytest.mark.root
def test_adapter_error_is_helper_failed_with_secret_masked(brick, tmp_path):
    with pytest.raises(errors.HelperFailed) as e:
        brick.connect(acme(tmp_path, fail=True, password=SECRET))
    assert "acme login failed" in str(e.value)
    assert SECRET not in str(e.value)


@pytest.mark.root
def test_unknown_adapter_fails_before_starting_the_daemon(tmp_path):
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    cfg.connector_override = "tests.fakebrick"
    b = privileged.Brick(cfg)
    svc = service.Service(cfg, brick=b)
    svc.open()
    info = {"driver_volume_type": "iscsi", "adapter": "no-such-vendor",
            "data": {"fake_key": "adapter"}}
    try:
        with pytest.raises(errors.UnknownAdapter) as e:
            svc.attach_volume("9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10", info)
    finally:
        svc.close()
        pid = b.daemon_pid()
        b.stop()
    assert e.value.code == 934
    assert "no-such-vendor" in str(e.value)
    assert pid is None
    assert not os.path.exists(cfg.privsep_config_file)


@pytest.mark.root
def test_adapter_missing_in_the_daemon_is_934(brick, tmp_path, monkeypatch):
    # Installed here but not where the daemon looks (e.g. removed between
    # the check and the connect).
    real = adapters._entry_points

    class Ghost:
        name = "ghost"

    monkeypatch.setattr(adapters, "_entry_points",
                        lambda: list(real()) + [Ghost()])
    info = acme(tmp_path)
    info["adapter"] = "ghost"
    with pytest.raises(errors.UnknownAdapter) as e:
        brick.connect(info)
    assert "acme" in str(e.value)


def test_entry_point_group_is_documented():
    assert adapters.GROUP in adapters.__doc__
    assert "factory(root_helper" in adapters.__doc__

