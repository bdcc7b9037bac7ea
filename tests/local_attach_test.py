"""The real thing: os-brick's local connector, through the real privsep
daemon, on a real loop device."""

import os
import subprocess

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import service
from vdsm_managedvolume import udev

from .host_fixtures import is_symlink, make_cfg, new_id

pytestmark = [pytest.mark.root, pytest.mark.slow]

SD = "7a0f54c5-0d43-4a0c-8a0e-3a1c54d3e4a9"
BLOCK = 4096


@pytest.fixture
def local_service(tmp_path, real_brick, real_fakebrick_dir):
    # The real udevadm: a change event on a real loop device.
    cfg = make_cfg(tmp_path, udevadm="/usr/bin/udevadm")
    svc = service.Service(cfg, brick=real_brick)
    svc.start()
    yield svc
    svc.close()


def test_local_attach_write_through_managed_path_and_detach(
        local_service, loop_device):
    svc = local_service
    vol_id = new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}

    res = svc.attach_volume(vol_id, ci, SD)

    assert res["path"] == loop_device.path
    assert res["attachment"]["type"] == "local"
    assert res["attachment"]["path"] == loop_device.path
    link = os.path.join(svc.cfg.run_dir, "{}_{}".format(SD, vol_id))
    assert res["managed_path"] == link
    assert os.readlink(link) == loop_device.path
    rule = udev.rule_path(svc.cfg.udev_rules_dir, SD, vol_id)
    with open(rule) as f:
        assert f.read() == 'KERNEL=="{}", ATTR{{loop/backing_file}}=="{}", ' \
            'RUN+="/usr/bin/chown vdsm:qemu $env{{DEVNAME}}"\n'.format(
                os.path.basename(loop_device.path), loop_device.backing)
    info, = svc.volumes_info([vol_id])
    assert info["exists"] is True

    pattern = os.urandom(BLOCK) * 4
    fd = os.open(res["managed_path"], os.O_WRONLY)
    try:
        os.pwrite(fd, pattern, BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(loop_device.path, os.O_RDONLY)
    try:
        assert os.pread(fd, len(pattern), BLOCK) == pattern
    finally:
        os.close(fd)
    with open(loop_device.backing, "rb") as f:
        f.seek(BLOCK)
        assert f.read(len(pattern)) == pattern

    svc.detach_volume(vol_id, SD)

    assert not is_symlink(link)
    assert not os.path.exists(rule)
    assert svc.volumes_info([vol_id]) == []
    # The local connector does not own the device: it is still there.
    assert os.path.exists(loop_device.path)


def test_local_attach_twice_is_927_and_reattach_after_reboot_works(
        local_service, loop_device):
    from vdsm_managedvolume import errors
    svc = local_service
    vol_id = new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    first = svc.attach_volume(vol_id, ci)
    with pytest.raises(errors.AlreadyAttached):
        svc.attach_volume(vol_id, ci)
    os.unlink(first["managed_path"])     # the run dir is a tmpfs
    assert svc.attach_volume(vol_id, ci) == first
    svc.detach_volume(vol_id)
    assert svc.volumes_info() == []


def test_local_attach_of_a_missing_device_fails_and_records_nothing(
        local_service, tmp_path):
    # os-brick's local connector returns whatever path it is given: the
    # path is checked before anything happens.
    svc = local_service
    vol_id = new_id()
    missing = str(tmp_path / "no-such-device")
    ci = {"driver_volume_type": "local", "data": {"device_path": missing}}

    with pytest.raises(errors.InvalidParams, match="does not exist") as e:
        svc.attach_volume(vol_id, ci, SD)
    assert e.value.name == "connection_info.data.device_path"

    assert svc.volumes_info([vol_id]) == []
    assert os.listdir(svc.cfg.run_dir) == []
    assert not os.path.exists(
        udev.rule_path(svc.cfg.udev_rules_dir, SD, vol_id))


def test_failed_fc_connect_whose_disconnect_fails_too_leaves_no_record(
        local_service):
    # Through the real daemon: os-brick's error comes back answered (the
    # connect returned), so a rollback that fails the same way forgets.
    svc = local_service
    vol_id = new_id()
    ci = {"driver_volume_type": "fibre_channel",
          "data": {"target_wwn": ["500143802426baf4"], "target_lun": 1,
                   "fake_key": "fc-" + vol_id[:8],
                   "fake_fail": "No FC HBA found",
                   "fake_fail_disconnect": "No FC HBA found"}}
    with pytest.raises(errors.HelperFailed, match="No FC HBA found"):
        svc.attach_volume(vol_id, ci, SD)
    assert svc.volumes_info([vol_id]) == []
    svc.detach_volume(vol_id, SD)


def test_record_the_channel_cannot_carry_is_forgotten_by_detach(
        local_service):
    svc = local_service
    vol_id = new_id()
    ci = {"driver_volume_type": "fibre_channel",
          "data": {"target_wwn": ["5001438\udc80"], "target_lun": 2 ** 64}}
    svc._db().add_volume(vol_id, SD, ci)
    svc.detach_volume(vol_id, SD)
    assert svc.volumes_info([vol_id]) == []


def test_local_extend_sees_the_grown_loop_device_and_keeps_the_data(
        local_service, loop_device):
    svc = local_service
    vol_id = new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    old = os.path.getsize(loop_device.backing)
    res = svc.attach_volume(vol_id, ci, SD)
    assert svc.volumes_info([vol_id])[0]["size"] == old

    pattern = os.urandom(BLOCK)
    fd = os.open(res["managed_path"], os.O_RDWR)
    try:
        os.pwrite(fd, pattern, old - BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)

    # What the storage does: grow the backing file, make the loop device
    # see it (the file driver's extend_volume does the same).
    with open(loop_device.backing, "r+b") as f:
        f.truncate(2 * old)
    subprocess.run(["losetup", "-c", loop_device.path], check=True)

    # os-brick's LocalConnector.extend_volume runs blockdev --getsize64
    # in the daemon; the service reads the device's size itself.
    out = svc.extend_volume(vol_id, SD, 2 * old)
    assert out == {"vol_id": vol_id, "path": loop_device.path,
                   "size": 2 * old}
    assert svc.volumes_info([vol_id])[0]["size"] == 2 * old

    fd = os.open(res["managed_path"], os.O_RDWR)
    try:
        assert os.pread(fd, BLOCK, old - BLOCK) == pattern
        past = os.urandom(BLOCK)
        os.pwrite(fd, past, old + BLOCK)
        os.fsync(fd)
        assert os.pread(fd, BLOCK, old + BLOCK) == past
    finally:
        os.close(fd)

    # Asking for more than the storage gave: 926 naming both sizes.
    with pytest.raises(errors.ExtendIncomplete) as e:
        svc.extend_volume(vol_id, SD, 3 * old)
    assert str(2 * old) in str(e.value) and str(3 * old) in str(e.value)
    assert svc.volumes_info([vol_id])[0]["size"] == 2 * old
    svc.detach_volume(vol_id, SD)


def test_loop_minor_reused_for_another_file_is_never_reattached_or_chowned(
        local_service, loop_device, tmp_path):
    # The class of Nova's OSSA-2023-003: the name stays, the device is
    # another one.
    svc = local_service
    vol_id = new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    res = svc.attach_volume(vol_id, ci, SD)
    rule = udev.rule_path(svc.cfg.udev_rules_dir, SD, vol_id)
    other = str(tmp_path / "other.img")
    loop_device.reattach(other)

    info, = svc.volumes_info([vol_id])
    assert info["stale"] is True
    assert other in info["stale_reason"]
    with pytest.raises(errors.DeviceChanged):
        svc.attach_volume(vol_id, ci, SD)
    entry, = svc.reconcile()
    assert entry["action"] == "remove-stale-link+rule"
    assert not os.path.exists(rule)
    assert not is_symlink(res["managed_path"])

    svc.detach_volume(vol_id, SD)

    assert svc.volumes_info() == []
    assert not os.path.exists(rule)
    assert loop_device.current_backing() == other
