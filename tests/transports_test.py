"""One class per driver_volume_type: the factory, vdsm's path rules, the
local device check."""

import os

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import transports
from vdsm_managedvolume.transports import base

VOL = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"


@pytest.fixture
def cfg(tmp_path):
    return config.with_state_dir(config.Config(), str(tmp_path / "state"))


def test_each_type_with_a_rule_of_its_own_has_a_class():
    assert transports.names() == ["fibre_channel", "iscsi", "local", "rbd"]
    for name in transports.names():
        assert transports.get(name).name == name


@pytest.mark.parametrize("name", ["nvmeof", "lightos", "storpool", "x"])
def test_other_types_get_the_default_transport(name):
    assert type(transports.get(name)) is base.Transport


@pytest.mark.parametrize("name", ["iscsi", "fibre_channel"])
def test_scsi_path_is_the_multipath_device(cfg, name):
    attachment = {"type": "block", "path": "/dev/dm-3",
                  "multipath_id": "36001405abc", "scsi_wwn": "36001405abc"}
    path = transports.get(name).path(
        cfg, VOL, {"driver_volume_type": name, "data": {}}, attachment)
    assert path == os.path.join(cfg.multipath_dir, "36001405abc")


@pytest.mark.parametrize("name", ["iscsi", "fibre_channel"])
def test_scsi_without_multipath_id_is_928(cfg, name):
    with pytest.raises(errors.UnsupportedDevice) as e:
        transports.get(name).path(
            cfg, VOL, {"driver_volume_type": name, "data": {}},
            {"type": "block", "path": "/dev/sdb"})
    assert e.value.code == 928
    assert name in str(e.value)


def test_rbd_path_is_pool_and_volume_under_rbd_dir(cfg):
    ci = {"driver_volume_type": "rbd", "data": {"name": "pool/volume-1"}}
    path = transports.get("rbd").path(
        cfg, VOL, ci, {"type": "block", "path": "/dev/rbd0"})
    assert path == os.path.join(cfg.rbd_dir, "pool", "volume-1")


def test_default_path_is_the_attachment_path(cfg):
    ci = {"driver_volume_type": "nvmeof", "data": {}}
    assert transports.get("nvmeof").path(
        cfg, VOL, ci, {"path": "/dev/nvme0n3"}) == "/dev/nvme0n3"
    with pytest.raises(errors.HelperFailed, match="no device path"):
        transports.get("nvmeof").path(cfg, VOL, ci, {"type": "block"})


def test_local_refuses_what_is_not_a_block_device_naming_the_field(
        cfg, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    ci = {"driver_volume_type": "local", "data": {"device_path": str(f)}}
    with pytest.raises(errors.InvalidParams,
                       match="connection_info.data.device_path"):
        transports.get("local").check(cfg, ci)


def test_other_types_have_no_checks_of_their_own(cfg):
    transports.get("iscsi").check(
        cfg, {"driver_volume_type": "iscsi", "data": {}})


def test_identity_of_a_file_is_none(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert transports.get("iscsi").identity(str(f)) is None
