"""The service's logic over the in-process fake brick (fast), plus the
secret-masking proof over the real privsep daemon."""

import json
import logging
import os
import re
import stat
import threading
import time
from time import monotonic as time_now
from time import sleep as time_sleep

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import locking
from vdsm_managedvolume import log as mvlog
from vdsm_managedvolume import mask
from vdsm_managedvolume import service
from vdsm_managedvolume import udev
from vdsm_managedvolume import validate

from . import agentutil
from . import fakebrick
from .host_fixtures import (LoopDevice, iscsi_connection, is_symlink,
                            make_cfg, new_boot, new_id, rbd_connection,
                            udevadm_calls)

SD = "2d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"


def link_of(svc, vol_id, sd_id=validate.BLANK_UUID):
    return os.path.join(svc.cfg.run_dir, "{}_{}".format(sd_id, vol_id))


def rule_of(svc, vol_id, sd_id=validate.BLANK_UUID):
    return udev.rule_path(svc.cfg.udev_rules_dir, sd_id, vol_id)


def records(svc):
    return svc._db().volumes()


# Attach

def test_attach_iscsi_resolves_multipath_links_and_writes_rule(
        inproc_service):
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg)
    res = svc.attach_volume(vol_id, ci, SD)
    mpath = res["attachment"]["multipath_id"]
    path = os.path.join(svc.cfg.multipath_dir, mpath)
    assert res == {"vol_id": vol_id, "path": path,
                   "attachment": res["attachment"],
                   "managed_path": link_of(svc, vol_id, SD)}
    assert os.readlink(res["managed_path"]) == path
    with open(rule_of(svc, vol_id, SD)) as f:
        assert f.read() == (
            'SYMLINK=="mapper/{}", RUN+="/usr/bin/chown vdsm:qemu '
            '$env{{DEVNAME}}"\n'.format(mpath))
    assert udevadm_calls(svc.cfg) == ["trigger --action=change " + path]
    rec, = records(svc)
    assert rec["state"] == "attached"
    assert rec["multipath_id"] == mpath
    assert svc._db().owns_multipath(mpath)
    assert ci["data"]["fake_key"] in fakebrick.connected()


def test_attach_rbd_uses_pool_and_volume_name(inproc_service):
    svc = inproc_service
    ci = rbd_connection(svc.cfg, name="pool1/vol-a" + new_id()[:8])
    res = svc.attach_volume(new_id(), ci)
    assert res["path"] == os.path.join(svc.cfg.rbd_dir, ci["data"]["name"])
    assert os.path.exists(res["managed_path"])


def test_attach_local_uses_the_attachment_path(inproc_service, loop_device):
    svc = inproc_service
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    res = svc.attach_volume(new_id(), ci)
    assert res["path"] == loop_device.path
    assert os.readlink(res["managed_path"]) == loop_device.path


def test_attach_stats_the_device_once_after_connect(
        inproc_service, loop_device, monkeypatch):
    # One look before anything (the local in-use check: the lstat that
    # finds the path is no link is its stat too), one stat after the
    # connect for its existence, identity, size and the udev trigger,
    # and the lstat of the udev rule's match (a link or a kernel name).
    svc = inproc_service
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    stats = []
    real_stat, real_lstat = os.stat, os.lstat

    def stat(path, *args, **kw):
        if path == loop_device.path:
            stats.append("stat")
        return real_stat(path, *args, **kw)

    def lstat(path, *args, **kw):
        if path == loop_device.path:
            stats.append("lstat")
        return real_lstat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    vol_id = new_id()
    svc.attach_volume(vol_id, ci)
    assert stats == ["lstat", "stat", "lstat"]
    rec = svc._db().get_volume(vol_id)
    st = real_stat(loop_device.path)
    assert rec["identity"]["dev"] == "{}:{}".format(
        os.major(st.st_rdev), os.minor(st.st_rdev))
    assert rec["size"] == os.path.getsize(loop_device.backing)


def test_uppercase_ids_are_normalised(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    res = svc.attach_volume(vol_id.upper(), iscsi_connection(svc.cfg),
                            SD.upper())
    assert res["vol_id"] == vol_id
    assert res["managed_path"] == link_of(svc, vol_id, SD)
    svc.detach_volume(vol_id.upper(), SD)
    assert records(svc) == []


def test_iscsi_without_multipath_is_928_and_disconnected(inproc_service):
    svc = inproc_service
    ci = iscsi_connection(svc.cfg, fake_no_multipath=True)
    with pytest.raises(errors.UnsupportedDevice) as e:
        svc.attach_volume(new_id(), ci)
    assert e.value.code == 928
    assert fakebrick.connected() == []
    assert fakebrick.calls()[-1] == "disconnect " + ci["data"]["fake_key"]
    assert records(svc) == []
    assert os.listdir(svc.cfg.run_dir) == []


@pytest.mark.parametrize("vol_id, ci, sd_id, name", [
    ("../x", {"driver_volume_type": "iscsi", "data": {}}, SD, "vol_id"),
    (new_id(), {"driver_volume_type": "iscsi", "data": {}}, "../../etc",
     "sd_id"),
    (new_id(), {"driver_volume_type": "iscsi"}, SD, "connection_info.data"),
    (new_id(), "iscsi", SD, "connection_info"),
])
def test_invalid_params_fail_before_any_side_effect(
        inproc_service, inproc_brick, vol_id, ci, sd_id, name):
    with pytest.raises(errors.InvalidParams) as e:
        inproc_service.attach_volume(vol_id, ci, sd_id)
    assert e.value.name == name
    assert inproc_brick.calls == []
    assert records(inproc_service) == []
    assert not os.path.exists(inproc_service.cfg.udev_rules_dir)


@pytest.mark.parametrize("dvt, data, name", [
    ("iscsi", {"target_iqn": "iqn.2026-11.org.example:v", "target_lun": 1},
     "connection_info.data.target_portal"),
    ("fibre_channel", {"target_lun": 1}, "connection_info.data.target_wwn"),
    ("nvmeof", {"target_nqn": "nqn.2026-11.x:v",
                "portals": [["192.0.2.3", 4420]]},
     "connection_info.data.portals[0]"),
    ("lightos", {"subsysnqn": "nqn.x"}, "connection_info.data.uuid"),
    ("storpool", {"client_id": 1, "volume": "v", "access_mode": "rwx"},
     "connection_info.data.access_mode"),
    ("rbd", {"name": "../../etc/passwd"}, "connection_info.data.name"),
])
def test_fields_the_connector_needs_are_checked_before_any_side_effect(
        inproc_service, inproc_brick, dvt, data, name):
    with pytest.raises(errors.InvalidParams) as e:
        inproc_service.attach_volume(
            new_id(), {"driver_volume_type": dvt, "data": data}, SD)
    assert e.value.name == name
    assert inproc_brick.calls == []
    assert records(inproc_service) == []
    assert not os.path.exists(inproc_service.cfg.udev_rules_dir)


def test_disallowed_driver_type_is_930_before_connecting(
        inproc_service, inproc_brick):
    inproc_service.cfg.allowed_types = ("rbd",)
    with pytest.raises(errors.UnsupportedDriverType) as e:
        inproc_service.attach_volume(new_id(),
                                     iscsi_connection(inproc_service.cfg))
    assert e.value.code == 930
    assert inproc_brick.calls == []
    assert records(inproc_service) == []


def test_unknown_adapter_fails_before_connecting(inproc_service,
                                                  inproc_brick):
    ci = iscsi_connection(inproc_service.cfg)
    ci["adapter"] = "nosuch"
    with pytest.raises(errors.UnknownAdapter):
        inproc_service.attach_volume(new_id(), ci)
    assert inproc_brick.calls == []
    assert records(inproc_service) == []


def test_attach_twice_is_927(inproc_service):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(inproc_service.cfg)
    svc.attach_volume(vol_id, ci)
    with pytest.raises(errors.AlreadyAttached) as e:
        svc.attach_volume(vol_id, ci)
    assert e.value.code == 927


def test_attach_with_other_connection_info_is_929(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    with pytest.raises(errors.ConnectionMismatch) as e:
        svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    assert e.value.code == 929


def test_reattach_after_reboot_emptied_run_dir_succeeds(inproc_service):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    os.unlink(first["managed_path"])          # /run is a tmpfs
    second = svc.attach_volume(vol_id, ci, SD)
    assert second == first
    assert os.readlink(second["managed_path"]) == second["path"]


def test_reattach_after_device_vanished_reconnects(inproc_service):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci)
    # A reboot: the device and the connection are gone, the row stays.
    fakebrick.get_connector("iscsi", ci, None).disconnect_volume(
        ci["data"], first["attachment"])
    assert not os.path.exists(first["path"])
    assert svc.reconcile(apply=False) == [
        {"vol_id": vol_id, "state": "attached", "action": "stale",
         "result": "kept", "reason": "device gone"}]
    info, = svc.volumes_info([vol_id])
    assert info["exists"] is False
    assert info["stale"] is True
    assert info["stale_reason"] == "device gone"
    assert info["this_boot"] is True     # still the engine's attachment
    second = svc.attach_volume(vol_id, ci)
    assert os.path.exists(second["path"])
    assert ci["data"]["fake_key"] in fakebrick.connected()
    assert svc.volumes_info([vol_id])[0]["exists"] is True


def attached_iscsi(svc):
    """(vol_id, connection_info, attach's result) of a new iSCSI volume
    attached on ``svc``."""
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    return vol_id, ci, svc.attach_volume(vol_id, ci)


def attached_rbd(svc):
    """(vol_id, connection_info, attach's result) of a new RBD volume
    attached on ``svc``."""
    vol_id, ci = new_id(), rbd_connection(svc.cfg)
    return vol_id, ci, svc.attach_volume(vol_id, ci)


def raising(error):
    """A stand-in for a brick or service call that raises ``error``."""
    def call(*args, **kwargs):
        raise error
    return call


def links_fail(svc, monkeypatch):
    """The run link of any attach from now on cannot be made (ENOSPC)."""
    monkeypatch.setattr(svc, "_add_link",
                        raising(OSError(28, "No space left on device")))


def test_an_attach_refused_for_a_daemon_of_another_protocol_leaves_no_record(
        inproc_service, inproc_brick, monkeypatch):
    # The client refuses a daemon of another privsep protocol before
    # sending it anything (privileged.Brick): nothing of the attach
    # reached the host.  Before, the rollback's disconnect was refused
    # the same way and the record stayed 'attaching' until the process
    # restarted (review-safety14 M2).  A record that was there before
    # the attach stays: its earlier connection may still exist.
    svc = inproc_service
    mismatch = errors.DaemonMismatch(
        pid=7, theirs="privsep protocol 3 (...)",
        ours="privsep protocol 2 (...)", process="vdsmd", process_pid=6)
    working = inproc_brick.connect, inproc_brick.disconnect

    def refusing(refused):
        for name, call in zip(("connect", "disconnect"), working):
            monkeypatch.setattr(inproc_brick, name,
                                raising(mismatch) if refused else call)

    refusing(True)
    vol_id = new_id()
    with pytest.raises(errors.DaemonMismatch) as e:
        svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    assert e.value.code == 926
    assert records(svc) == []
    # Over a record of an earlier attach whose device went: kept.
    refusing(False)
    first = svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    os.unlink(first["path"])
    refusing(True)
    with pytest.raises(errors.DaemonMismatch):
        svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    assert [r["vol_id"] for r in records(svc)] == [vol_id]


# A privsep daemon that cannot start (real helper, real daemon)

# A privsep helper that exits at once without starting a daemon: what a
# host shows when sudo refuses the rule or privsep-helper is broken.
BROKEN_HELPER = "sh -c 'echo sudo: a password is required >&2; exit 1' --"


@pytest.fixture
def own_daemon_service(tmp_path, real_fakebrick_dir):
    """A started Service over a privileged.Brick of its own (the session's
    daemon is shared): its tests change how its daemon starts."""
    if os.geteuid() != 0:
        pytest.skip("the privsep daemon needs root")
    from vdsm_managedvolume import privileged
    cfg = make_cfg(tmp_path)
    brick = privileged.Brick(cfg)
    svc = service.Service(cfg, brick=brick)
    svc.start()
    yield svc
    svc.close()
    brick.stop()


def fake_calls(key):
    return [c for c in fakebrick.calls() if c.endswith(" " + key)]


@pytest.mark.root
@pytest.mark.parametrize("helper", ["exits", "refused", "hangs"])
def test_an_attach_no_privsep_daemon_could_start_for_leaves_no_record(
        own_daemon_service, tmp_path, monkeypatch, helper):
    # No daemon got the connect: the helper exited at once (sudo's
    # refusal, a broken privsep-helper), the daemon refused to start
    # (its files of two versions, mid-upgrade), or the helper never
    # connected within the start bound.  Nothing reached the host: the
    # record the attach wrote goes, without a disconnect.  Before, the
    # rollback took it for a connect that may have connected, its
    # disconnect failed the same way, and the record stayed 'attaching'
    # until a later detach or reconcile (safety14's note).
    svc = own_daemon_service
    brick = svc._brick
    if helper == "exits":
        svc.cfg.helper_command = BROKEN_HELPER
        reason = "exited with code 1 without starting the daemon"
    elif helper == "refused":
        from vdsm_managedvolume import privsep
        pkg = tmp_path / "tree" / "vdsm_managedvolume"
        import shutil
        shutil.copytree(os.path.dirname(privsep.__file__), str(pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
        path = pkg / "privsep.py"
        path.write_text(path.read_text().replace(
            "\nPROTOCOL = {}\n".format(privsep.PROTOCOL),
            "\nPROTOCOL = {}\n".format(privsep.PROTOCOL + 1)))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(pkg.parent)] + [p for p in os.environ.get(
                "PYTHONPATH", "").split(os.pathsep) if p]))
        reason = "its files are of two versions"
    else:
        svc.cfg.helper_command = "sh -c 'exec sleep 60' --"
        monkeypatch.setattr(brick, "start_timeout", 1.0)
        reason = "did not start the daemon within the start bound"
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    with pytest.raises(errors.HelperFailed) as e:
        svc.attach_volume(vol_id, ci)
    assert e.value.code == 926
    assert reason in str(e.value)
    assert e.value.unsent
    assert records(svc) == []
    assert fake_calls(ci["data"]["fake_key"]) == []
    assert brick.daemon_pid() is None


@pytest.mark.root
def test_a_record_there_before_an_attach_no_daemon_started_for_stays(
        own_daemon_service):
    # Its earlier connection may exist: the record stays for a detach,
    # and that detach, not sent either, keeps it though its device is
    # gone (it did not answer that the connection is over).
    svc = own_daemon_service
    brick = svc._brick
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci)
    brick.stop()
    os.unlink(first["path"])
    svc.cfg.helper_command = BROKEN_HELPER
    with pytest.raises(errors.HelperFailed):
        svc.attach_volume(vol_id, ci)
    [rec] = records(svc)
    assert rec["state"] == "attaching"
    with pytest.raises(errors.HelperFailed):
        svc.detach_volume(vol_id)
    [rec] = records(svc)
    assert rec["state"] == "detaching"
    svc.cfg.helper_command = ""
    svc.detach_volume(vol_id)
    assert records(svc) == []
    assert ci["data"]["fake_key"] not in fakebrick.connected()


@pytest.mark.root
def test_a_connect_whose_daemon_died_keeps_its_record_when_none_starts(
        own_daemon_service):
    # The connect reached the daemon, which was killed inside it: it may
    # have connected.  The rollback's disconnect finds no daemon that
    # can start (the helper now exits at once): the record stays
    # 'attaching', connecting, for a detach or reconcile, which
    # disconnects it once a daemon starts again.
    import signal
    svc = own_daemon_service
    brick = svc._brick
    up = new_id()
    svc.attach_volume(up, iscsi_connection(svc.cfg))    # a daemon up
    svc.detach_volume(up)
    pid = brick.daemon_pid()
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_sleep=60)
    key = ci["data"]["fake_key"]
    attach = agentutil.Held(svc.attach_volume, vol_id, ci)
    try:
        deadline = time_now() + 30
        while "connect-start " + key not in fakebrick.calls():
            assert time_now() < deadline
            time_sleep(0.05)
        svc.cfg.helper_command = BROKEN_HELPER
        os.kill(pid, signal.SIGKILL)
    finally:
        attach.join(60)
    error = attach.error
    assert type(error) is errors.HelperFailed
    assert "privsep daemon {} died during connect".format(pid) in str(error)
    assert not error.unsent
    [rec] = records(svc)
    assert (rec["state"], rec["connecting"]) == ("attaching", True)
    assert fake_calls(key) == ["connect-start " + key]
    svc.cfg.helper_command = ""
    svc.detach_volume(vol_id)
    assert records(svc) == []
    assert "disconnect-start " + key in fakebrick.calls()


def test_a_failed_reattach_leaves_a_device_in_use_as_it_was(
        inproc_service, inproc_brick, monkeypatch):
    # Attached in this boot, its managed link gone, its device there: a
    # re-attach connects again.  When that connect fails, a VM may still
    # be using the device (qemu opened it before the link went): nothing
    # is disconnected, its udev rule stays (qemu's ownership), and the
    # record is 'attached' as before.  It used to roll back: a disconnect
    # (multipath flush, iSCSI logout) under the running VM.
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)
    before = records(svc)
    rules = os.listdir(svc.cfg.udev_rules_dir)
    os.unlink(first["managed_path"])
    portal_down = raising(errors.ConnectorFailed("portal down"))
    connect = inproc_brick.connect
    monkeypatch.setattr(inproc_brick, "connect", portal_down)
    calls = len(inproc_brick.calls)
    with pytest.raises(errors.ConnectorFailed):
        svc.attach_volume(vol_id, ci)
    assert inproc_brick.calls[calls:] == []
    assert ci["data"]["fake_key"] in fakebrick.connected()
    assert os.listdir(svc.cfg.udev_rules_dir) == rules
    after = records(svc)
    for rec in before + after:
        rec.pop("updated", None)
    assert after == before
    # A detach then ends it, with what its connect returned.
    monkeypatch.setattr(inproc_brick, "connect", connect)
    svc.detach_volume(vol_id)
    assert inproc_brick.calls[-1] == ("disconnect", ci, first["attachment"])
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert records(svc) == []


def test_a_cut_reattach_of_a_live_volume_makes_its_detach_wait_for_logins(
        inproc_service, inproc_brick, monkeypatch):
    # The record stays 'attached', but the connect cut at its deadline
    # may have left a login running (store.py, connecting): its detach,
    # and that of a later successful re-attach (which does not tell that
    # the earlier login ended), asks the daemon to wait for the logins
    # an earlier daemon left.  One whose connect completed does not
    # (review-safety10 M-2).
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)
    assert records(svc)[0]["connecting"] is False
    asked = []
    disconnect = inproc_brick.disconnect

    def recording(connection_info, attachment, connecting=True):
        asked.append(connecting)
        return disconnect(connection_info, attachment, connecting)

    monkeypatch.setattr(inproc_brick, "disconnect", recording)
    os.unlink(first["managed_path"])
    connect = inproc_brick.connect
    monkeypatch.setattr(inproc_brick, "connect", raising(
        errors.HelperTimeout(operation="connect", timeout=1.0)))
    with pytest.raises(errors.HelperTimeout):
        svc.attach_volume(vol_id, ci)
    [rec] = records(svc)
    assert (rec["state"], rec["connecting"]) == ("attached", True)
    monkeypatch.setattr(inproc_brick, "connect", connect)
    svc.attach_volume(vol_id, ci)
    assert records(svc)[0]["connecting"] is True
    svc.detach_volume(vol_id)
    assert asked == [True]
    svc.attach_volume(vol_id, ci)
    svc.detach_volume(vol_id)
    assert asked == [True, False]


def test_a_failed_reattach_over_a_device_gone_ends_the_earlier_connection(
        inproc_service, inproc_brick, monkeypatch):
    # Attached in this boot, its device gone (not its connection: the
    # fake's record of it stays): no VM can be using it.  A failed
    # re-attach rolls back, ending the connection the first attach made
    # with what that connect returned (os-brick's disconnect needs it).
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)
    os.unlink(first["path"])
    portal_down = raising(errors.ConnectorFailed("portal down"))
    monkeypatch.setattr(inproc_brick, "connect", portal_down)
    with pytest.raises(errors.ConnectorFailed):
        svc.attach_volume(vol_id, ci)
    assert inproc_brick.calls[-1] == ("disconnect", ci, first["attachment"])
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert records(svc) == []


@pytest.mark.parametrize("cut", [
    errors.HelperTimeout(operation="disconnect", timeout=120),
    errors.HelperFailed("privsep daemon 42 died during disconnect"),
])
def test_a_detach_cut_after_its_device_went_keeps_the_record(
        inproc_service, inproc_brick, monkeypatch, cut):
    # The disconnect flushed the multipath map (the device is gone) and
    # was cut at its deadline, or by the daemon's death, before the
    # paths and sessions went: the record stays 'detaching' for the next
    # detach to finish.  It was forgotten ("its device is gone").
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)

    def flushed_then_cut(connection_info, attachment, connecting=True):
        os.unlink(first["path"])
        raise cut

    disconnect = inproc_brick.disconnect
    monkeypatch.setattr(inproc_brick, "disconnect", flushed_then_cut)
    with pytest.raises(type(cut)):
        svc.detach_volume(vol_id)
    [rec] = records(svc)
    assert rec["state"] == "detaching"
    monkeypatch.setattr(inproc_brick, "disconnect", disconnect)
    svc.detach_volume(vol_id)
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert records(svc) == []


def test_a_disconnect_that_answers_after_its_device_went_forgets_it(
        inproc_service, inproc_brick, monkeypatch):
    # The connector ended with its error and the device is gone: nothing
    # left to end, the record goes (as before).
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)

    def gone(connection_info, attachment, connecting=True):
        os.unlink(first["path"])
        raise errors.ConnectorFailed("no such device")

    monkeypatch.setattr(inproc_brick, "disconnect", gone)
    svc.detach_volume(vol_id)
    assert records(svc) == []


def test_a_failed_reattach_after_a_late_step_leaves_the_device_too(
        inproc_service, inproc_brick, monkeypatch):
    # The connect worked again, the managed link cannot be made: the
    # same (the connection is the one the VM uses).
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)
    os.unlink(first["managed_path"])
    no_link = raising(OSError(28, "No space left on device"))
    monkeypatch.setattr(svc, "_add_link", no_link)
    calls = len(inproc_brick.calls)
    with pytest.raises(OSError):
        svc.attach_volume(vol_id, ci)
    assert [c[0] for c in inproc_brick.calls[calls:]] == ["connect"]
    assert ci["data"]["fake_key"] in fakebrick.connected()
    [rec] = records(svc)
    assert rec["state"] == "attached"
    assert rec["attachment"] == first["attachment"]


def test_a_failed_reattach_under_another_sd_id_leaves_the_device_too(
        inproc_service, inproc_brick, monkeypatch):
    # The same, the attach again naming another storage domain: the
    # record keeps its sd_id, its udev rule (qemu's ownership) and its
    # connection.  It used to lose its rule before the connect and be
    # rolled back after it: a disconnect under the running VM.
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    before = records(svc)
    os.unlink(first["managed_path"])
    monkeypatch.setattr(inproc_brick, "connect",
                        raising(errors.ConnectorFailed("portal down")))
    calls = len(inproc_brick.calls)
    with pytest.raises(errors.ConnectorFailed):
        svc.attach_volume(vol_id, ci)
    assert inproc_brick.calls[calls:] == []
    assert ci["data"]["fake_key"] in fakebrick.connected()
    assert os.listdir(svc.cfg.udev_rules_dir) == [
        os.path.basename(rule_of(svc, vol_id, SD))]
    after = records(svc)
    for rec in before + after:
        rec.pop("updated", None)
    assert after == before


def test_a_reattach_under_another_sd_id_failing_late_keeps_the_old_rule(
        inproc_service, inproc_brick, monkeypatch):
    # The connect and the new rule worked, the new link cannot be made:
    # the new rule goes, the old one (the record's) stays.
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    os.unlink(first["managed_path"])
    links_fail(svc, monkeypatch)
    with pytest.raises(OSError):
        svc.attach_volume(vol_id, ci)
    assert ci["data"]["fake_key"] in fakebrick.connected()
    assert os.listdir(svc.cfg.udev_rules_dir) == [
        os.path.basename(rule_of(svc, vol_id, SD))]
    [rec] = records(svc)
    assert (rec["state"], rec["sd_id"]) == ("attached", SD)
    assert rec["attachment"] == first["attachment"]
    # The next start makes its link again, under its sd_id.
    monkeypatch.undo()
    assert [(e["action"], e["result"]) for e in svc.reconcile()] == [
        ("recreate-link", "done")]
    assert os.readlink(link_of(svc, vol_id, SD)) == first["path"]


def test_a_failed_attach_over_an_interrupted_rollback_ends_its_connection(
        inproc_service, inproc_brick, monkeypatch):
    # A record of this boot left 'attaching' with its attachment (a
    # rollback whose disconnect failed): a failed attach again ends that
    # connection with what its connect returned (fdb4cb5).
    svc = inproc_service
    vol_id, ci, first = attached_iscsi(svc)
    svc._db().update_volume(vol_id, state="attaching", managed_path=None)
    os.unlink(first["managed_path"])
    monkeypatch.setattr(inproc_brick, "connect",
                        raising(errors.ConnectorFailed("portal down")))
    with pytest.raises(errors.ConnectorFailed):
        svc.attach_volume(vol_id, ci)
    assert inproc_brick.calls[-1] == ("disconnect", ci, first["attachment"])
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert records(svc) == []


@pytest.mark.root
def test_an_rbd_reattach_deletes_the_ceph_conf_no_record_names(
        real_service):
    # os-brick writes a ceph conf holding the keyring at every connect
    # and deletes only the one a disconnect is given: the earlier
    # attachment's, which the record no longer names, is deleted by the
    # daemon.  It stayed in /tmp, one per re-attach.
    svc = real_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["managed_path"])
    second = svc.attach_volume(vol_id, ci)
    assert second["attachment"]["conf"] != first["attachment"]["conf"]
    assert fakebrick.confs() == [
        os.path.basename(second["attachment"]["conf"])]
    svc.detach_volume(vol_id)
    assert fakebrick.confs() == []


def test_a_rollback_kept_by_an_earlier_login_says_so_without_traceback(
        inproc_service, inproc_brick, monkeypatch, caplog):
    # The rollback's disconnect is not run while a login an earlier
    # connect left still runs (EarlierConnectRunning): the record stays
    # 'attaching', and the log says why in one WARNING line, not a
    # traceback at ERROR (review-safety10 L-5).
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    monkeypatch.setattr(inproc_brick, "connect", raising(
        errors.HelperFailed("privsep daemon 1 died during connect")))
    monkeypatch.setattr(inproc_brick, "disconnect", raising(
        errors.EarlierConnectRunning(
            operation="disconnect", timeout=1.0,
            running="an earlier connect of this connection still runs "
            "(iscsiadm --login pid 7, running for 9 s)")))
    with pytest.raises(errors.HelperFailed):
        svc.attach_volume(vol_id, ci)
    [rec] = records(svc)
    assert rec["state"] == "attaching"
    [line] = [r for r in caplog.records
              if "during cleanup" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.exc_info is None
    assert "iscsiadm --login pid 7" in line.getMessage()


def test_a_kept_record_whose_retried_disconnect_fails_otherwise_is_left(
        inproc_service, inproc_brick, monkeypatch, caplog):
    # A record kept while an earlier connect's login runs is tried
    # again (service.RETRY_KEPT) only while its disconnect answers that
    # (nothing run, cheap).  Once the disconnect runs and fails
    # otherwise (a command hung on the sick storage: the daemon holds
    # os-brick's host-wide lock until it is killed), it is not repeated
    # on its own; a WARNING says what to do (review-safety11 M-1).
    svc = inproc_service
    monkeypatch.setattr(service, "RETRY_KEPT", 0.05)
    vol_id, ci, first = attached_iscsi(svc)
    tried = []

    def disconnect(connection_info, attachment, connecting=True):
        tried.append(connecting)
        if len(tried) <= 2:
            raise errors.EarlierConnectRunning(
                operation="disconnect", timeout=1.0,
                running="an earlier connect of this connection still runs "
                "(iscsiadm --login pid 7, running for 9 s)")
        raise errors.HelperTimeout(operation="disconnect", timeout=1.0)

    monkeypatch.setattr(inproc_brick, "disconnect", disconnect)
    with pytest.raises(errors.EarlierConnectRunning):
        svc.detach_volume(vol_id)
    deadline = time.monotonic() + 30
    while not any("is not tried again on its own" in r.getMessage()
                  for r in caplog.records):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while svc._kept_thread is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(tried) == 3
    [rec] = records(svc)
    assert rec["state"] == "detaching"


@pytest.mark.root
def test_an_rbd_detach_finding_its_device_gone_deletes_its_ceph_conf(
        real_service):
    # os-brick's disconnect deletes the conf it is given only after it
    # unmapped the device ("rbd showmapped" found it): a device already
    # gone left the keyring in /tmp (review-fix9 hostfix-L1).
    svc = real_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["path"])                 # the device is gone
    svc.detach_volume(vol_id)
    assert records(svc) == []
    assert not os.path.exists(first["attachment"]["conf"])
    assert fakebrick.confs() == []


@pytest.mark.root
def test_an_rbd_detach_cut_before_its_record_went_leaves_no_ceph_conf(
        real_service, monkeypatch):
    # The conf a detach finding the device gone deletes goes before the
    # record: cut between them (a crash, a journal error), the record
    # stays for the next detach, which clears it; not a conf no record
    # names, which the start's sweep finds only while another record
    # holds its keyring (none when it was the host's last RBD volume;
    # review-safety10 L-3).
    svc = real_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["path"])                 # the device is gone
    monkeypatch.setattr(svc._db(), "remove_volume", raising(
        errors.StoreError("disk I/O error")))
    with pytest.raises(errors.StoreError):
        svc.detach_volume(vol_id)
    assert not os.path.exists(first["attachment"]["conf"])
    [rec] = records(svc)
    assert rec["state"] == "detaching"
    monkeypatch.undo()
    svc.detach_volume(vol_id)
    assert records(svc) == []
    assert fakebrick.confs() == []


@pytest.mark.root
def test_a_failed_rbd_reattach_over_a_gone_device_deletes_both_confs(
        real_service, monkeypatch):
    # Attached in this boot, its device gone: attached again, the
    # connect writes a new conf and the attach then fails.  The rollback
    # disconnects with the new one (os-brick deletes it) and forgets the
    # record: the earlier one, named by nobody now, is deleted too
    # (review-fix9 hostfix-L1 (1)).
    svc = real_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["path"])
    links_fail(svc, monkeypatch)
    with pytest.raises(OSError):
        svc.attach_volume(vol_id, ci)
    assert records(svc) == []
    assert fakebrick.confs() == []
    assert not os.path.exists(first["attachment"]["conf"])


@pytest.mark.root
def test_the_start_deletes_old_ceph_confs_holding_its_keyrings_named_by_none(
        real_service, real_brick):
    # What no follow-up of the service could delete (a crash between a
    # re-attach's record update and its delete, a connect cut after
    # os-brick wrote its conf): the next start deletes the confs in the
    # temp dir that hold a keyring of one of its records, that no record
    # names, and that are older than any connect in flight could be;
    # another program's (another keyring), a young one and the record's
    # own stay (review-fix9 hostfix-L1).
    import tempfile
    svc = real_service
    keyring = "[client.sweep]\n\tkey = AQB{}==".format(new_id())
    vol_id = new_id()
    ci = rbd_connection(svc.cfg, keyring=keyring)
    first = svc.attach_volume(vol_id, ci)
    old = time.time() - svc.cfg.timeout - service.CONF_SWEEP_MARGIN - 60

    def conf(text, mtime):
        fd, path = tempfile.mkstemp(prefix="brickrbd_")
        with os.fdopen(fd, "w") as f:
            f.write("[global]\nmon_host = 192.0.2.2:6789\n" + text + "\n")
        os.utime(path, (mtime, mtime))
        return path

    orphan = conf(keyring, old)
    young = conf(keyring, time.time())
    other = conf("[client.other]\n\tkey = AQBother{}==".format(new_id()),
                 old)
    named = first["attachment"]["conf"]
    os.utime(named, (old, old))
    try:
        again = service.Service(svc.cfg, brick=real_brick)
        again.start()
        again.close()
        assert not os.path.exists(orphan)
        assert os.path.exists(young) and os.path.exists(other)
        assert os.path.exists(named)
        svc.detach_volume(vol_id)
        assert not os.path.exists(named)
    finally:
        for path in (orphan, young, other):
            if os.path.exists(path):
                os.unlink(path)


def test_an_rbd_reattach_keeping_the_volume_deletes_its_new_ceph_conf(
        inproc_service, inproc_brick, monkeypatch):
    # The volume stays attached as it was: the conf the connect made
    # again wrote is nobody's; the record's own stays, and the detach
    # (rbd unmap) takes it.
    svc = inproc_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["managed_path"])
    links_fail(svc, monkeypatch)
    with pytest.raises(OSError):
        svc.attach_volume(vol_id, ci)
    [rec] = records(svc)
    assert rec["attachment"] == first["attachment"]
    assert fakebrick.confs() == [
        os.path.basename(first["attachment"]["conf"])]
    monkeypatch.undo()
    svc.detach_volume(vol_id)
    assert fakebrick.confs() == []
    assert fakebrick.connected() == []


def test_an_rbd_reattach_whose_record_cannot_be_put_back_keeps_its_conf(
        inproc_service, inproc_brick, monkeypatch):
    # The volume stays attached; putting its record back as it was
    # fails, so the record may name the conf the connect made again
    # wrote: that one stays (the conf the record does not name goes).
    # Before, it was deleted before the record was put back, and a
    # record naming a deleted conf was left.
    svc = inproc_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["managed_path"])
    links_fail(svc, monkeypatch)
    db = svc._db()
    update = db.update_volume

    def failing_put_back(vol_id, durable=True, **fields):
        if fields.get("attachment") == first["attachment"]:
            raise errors.StoreError("disk I/O error")
        return update(vol_id, durable=durable, **fields)

    monkeypatch.setattr(db, "update_volume", failing_put_back)
    with pytest.raises(OSError):
        svc.attach_volume(vol_id, ci)
    [rec] = records(svc)
    assert rec["attachment"] != first["attachment"]
    assert fakebrick.confs() == [os.path.basename(rec["attachment"]["conf"])]
    monkeypatch.undo()
    svc.detach_volume(vol_id)
    assert fakebrick.confs() == []
    assert fakebrick.connected() == []


def test_stale_record_with_other_connection_info_is_replaced(
        inproc_service):
    svc = inproc_service
    vol_id, old = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, old)
    fakebrick.get_connector("iscsi", old, None).disconnect_volume(
        old["data"], first["attachment"])
    new = iscsi_connection(svc.cfg)
    svc.attach_volume(vol_id, new)
    rec, = records(svc)
    assert rec["connection_info"] == new
    assert fakebrick.connected() == [new["data"]["fake_key"]]


def test_reattach_with_another_sd_moves_link_and_rule(
        inproc_service, monkeypatch):
    # The old rule (qemu's ownership of a device a VM may use) goes only
    # once the new rule and link exist.
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    os.unlink(first["managed_path"])
    add_link = svc._add_link
    rules_then = []

    def add_link_seeing_rules(*args):
        rules_then.append(sorted(os.listdir(svc.cfg.udev_rules_dir)))
        return add_link(*args)

    monkeypatch.setattr(svc, "_add_link", add_link_seeing_rules)
    second = svc.attach_volume(vol_id, ci)
    assert rules_then == [sorted(os.path.basename(rule_of(svc, vol_id, sd))
                                 for sd in (SD, validate.BLANK_UUID))]
    assert second["managed_path"] == link_of(svc, vol_id)
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    assert os.path.exists(rule_of(svc, vol_id))
    assert not os.path.lexists(link_of(svc, vol_id, SD))
    [rec] = records(svc)
    assert (rec["state"], rec["sd_id"]) == ("attached", validate.BLANK_UUID)
    assert svc.reconcile() == []


def test_a_link_pointing_elsewhere_is_replaced_and_a_lost_run_dir_made_again(
        inproc_service):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    path = svc.attach_volume(vol_id, ci)["path"]
    link = link_of(svc, vol_id)
    os.unlink(link)
    os.symlink("/dev/null", link)
    assert svc.attach_volume(vol_id, ci)["managed_path"] == link
    assert os.readlink(link) == path
    assert os.listdir(svc.cfg.run_dir) == [os.path.basename(link)]

    svc.detach_volume(vol_id)
    os.rmdir(svc.cfg.run_dir)
    other = svc.attach_volume(new_id(), iscsi_connection(svc.cfg))
    assert os.readlink(other["managed_path"]) == other["path"]


def test_connect_failure_rolls_back_and_records_nothing(inproc_service):
    svc = inproc_service
    ci = iscsi_connection(svc.cfg, fake_fail="Login refused")
    with pytest.raises(errors.HelperFailed, match="Login refused"):
        svc.attach_volume(new_id(), ci)
    assert records(svc) == []
    assert fakebrick.connected() == []
    assert fakebrick.calls()[-1].startswith("disconnect ")


def test_failed_rollback_keeps_attaching_row_for_reconcile(
        inproc_service, monkeypatch):
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_fail_disconnect="logout failed")

    def fail_link(*a):
        raise OSError("run dir is read-only")

    monkeypatch.setattr(svc, "_add_link", fail_link)
    with pytest.raises(OSError, match="read-only"):
        svc.attach_volume(vol_id, ci)
    rec, = records(svc)
    assert rec["state"] == "attaching"
    assert rec["attachment"]["multipath_id"]
    assert not os.path.exists(rule_of(svc, vol_id))

    # Still failing: reconcile reports it and keeps the row.
    entry, = svc.reconcile()
    assert entry["action"] == "rollback"
    assert entry["result"].startswith("failed")
    assert records(svc)[0]["state"] == "detaching"

    # Once the storage answers again, reconcile converges.
    del ci["data"]["fake_fail_disconnect"]
    svc._db().update_volume(vol_id, connection_info=ci)
    entry, = svc.reconcile()
    assert entry["result"] == "done"
    assert records(svc) == []
    assert fakebrick.connected() == []


# Detach

def test_detach_removes_link_rule_connection_and_record(inproc_service):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    res = svc.attach_volume(vol_id, ci, SD)
    assert svc.detach_volume(vol_id, SD) == {
        "vol_id": vol_id, "path": res["path"], "was": "attached"}
    assert not is_symlink(res["managed_path"])
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    assert fakebrick.connected() == []
    assert records(svc) == []


def test_detach_of_unknown_volume_is_success(inproc_service, inproc_brick):
    before = sorted(os.listdir(inproc_service.cfg.lock_dir))
    for _ in range(3):
        inproc_service.detach_volume(new_id())
    assert inproc_brick.calls == []
    # No lock file for ids never seen here: lock files are never removed.
    assert sorted(os.listdir(inproc_service.cfg.lock_dir)) == before


def test_detach_of_a_record_of_another_boot_takes_its_lock(inproc_service):
    # tmpfs lost the lock file at the reboot; the record still counts.
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, iscsi_connection(svc.cfg), SD)
    os.unlink(locking.lock_path(svc.cfg.lock_dir, vol_id))
    svc.cfg.lock_timeout = 0.05
    with locking.volume_lock(svc.cfg.lock_dir, vol_id, 1):
        with pytest.raises(errors.VolumeBusy):
            svc.detach_volume(vol_id)
    svc.detach_volume(vol_id)
    assert records(svc) == []


def test_detach_uses_the_recorded_sd_id(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    res = svc.attach_volume(vol_id, iscsi_connection(svc.cfg), SD)
    svc.detach_volume(vol_id)   # blank sd_id
    assert not is_symlink(res["managed_path"])
    assert records(svc) == []


def test_detach_failure_with_device_present_keeps_detaching_row(
        inproc_service):
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_fail_disconnect="device busy")
    svc.attach_volume(vol_id, ci)
    with pytest.raises(errors.HelperFailed, match="device busy"):
        svc.detach_volume(vol_id)
    rec, = records(svc)
    assert rec["state"] == "detaching"
    assert not is_symlink(link_of(svc, vol_id))
    # An attach now finishes the detach first, which still fails.
    with pytest.raises(errors.HelperFailed):
        svc.attach_volume(vol_id, ci)


def test_detach_of_vanished_device_succeeds_even_if_disconnect_fails(
        inproc_service):
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_fail_disconnect="no session")
    res = svc.attach_volume(vol_id, ci)
    os.unlink(res["path"])        # the device is gone (reboot)
    svc.detach_volume(vol_id)
    assert records(svc) == []


# Extend

GiB = 1024**3


def fc_connection(cfg, key):
    return {"driver_volume_type": "fibre_channel",
            "data": {"target_wwn": ["500a0981" + key[-8:]], "target_lun": 2,
                     "fake_key": key, "fake_dev_dir": cfg.multipath_dir}}


def attached_at(svc, make, size):
    """Attach a fake volume the storage gives ``size`` bytes; return
    (vol_id, connection_info, fake key, attach result)."""
    vol_id = new_id()
    ci = make(svc.cfg)
    key = fakebrick.get_connector(
        ci["driver_volume_type"], ci, "sudo").key(ci["data"])
    fakebrick.set_array_size(key, size)
    return vol_id, ci, key, svc.attach_volume(vol_id, ci, SD)


@pytest.mark.parametrize("make", [
    iscsi_connection,
    lambda cfg: fc_connection(cfg, "k-" + new_id()[:12]),
    rbd_connection,
], ids=["iscsi", "fibre_channel", "rbd"])
def test_extend_rescans_and_records_the_size_the_device_now_has(
        inproc_service, inproc_brick, make):
    svc = inproc_service
    vol_id, ci, key, res = attached_at(svc, make, GiB)
    info, = svc.volumes_info([vol_id])
    assert info["size"] == GiB                # read at attach
    fakebrick.set_array_size(key, 2 * GiB)    # the storage grew it
    assert os.path.getsize(res["path"]) == GiB  # not seen before a rescan
    out = svc.extend_volume(vol_id, SD, 2 * GiB)
    assert out == {"vol_id": vol_id, "path": res["path"], "size": 2 * GiB}
    assert os.path.getsize(res["path"]) == 2 * GiB
    assert inproc_brick.calls[-1] == ("extend", ci)
    assert "extend " + key in fakebrick.calls()
    info, = svc.volumes_info([vol_id])
    assert info["size"] == 2 * GiB
    rec, = records(svc)
    assert (rec["state"], rec["size"], rec["extending"]) == (
        "attached", 2 * GiB, None)
    assert svc.reconcile() == []


def test_extend_without_new_size_reports_whatever_the_device_has(
        inproc_service):
    svc = inproc_service
    vol_id, _, key, res = attached_at(svc, iscsi_connection, GiB)
    assert svc.extend_volume(vol_id)["size"] == GiB
    fakebrick.set_array_size(key, 3 * GiB)
    assert svc.extend_volume(vol_id)["size"] == 3 * GiB
    # Idempotent: again is the same answer.
    assert svc.extend_volume(vol_id)["size"] == 3 * GiB


def test_extend_still_smaller_than_new_size_is_926_naming_both_sizes(
        inproc_service):
    svc = inproc_service
    vol_id, _, key, res = attached_at(svc, iscsi_connection, GiB)
    fakebrick.set_array_size(key, GiB + 4096)    # grown, not enough
    with pytest.raises(errors.ExtendIncomplete) as e:
        svc.extend_volume(vol_id, new_size=2 * GiB)
    assert e.value.code == 926
    msg = str(e.value)
    assert str(GiB + 4096) in msg and str(2 * GiB) in msg
    assert vol_id in msg and res["path"] in msg
    rec, = records(svc)
    # The journal keeps the last size seen; the volume stays attached.
    assert (rec["state"], rec["size"], rec["extending"]) == (
        "attached", GiB + 4096, None)


def test_extend_of_unknown_volume_is_not_attached_and_rescans_nothing(
        inproc_service, inproc_brick):
    vol_id = new_id()
    with pytest.raises(errors.NotAttached) as e:
        inproc_service.extend_volume(vol_id, new_size=GiB)
    assert e.value.code == -32602
    assert "vol_id" in str(e.value) and vol_id in str(e.value)
    assert "not attached on this host (no record)" in str(e.value)
    assert inproc_brick.calls == []


@pytest.mark.parametrize("damage, reason", [
    ("reboot", "managed link is missing"),
    ("new-boot", r"stale \(made in another boot\)"),
    ("device", "is gone"),
    ("attaching", "'attaching'"),
    ("detaching", "'detaching'"),
])
def test_extend_of_a_volume_not_live_here_rescans_nothing(
        inproc_service, inproc_brick, damage, reason):
    svc = inproc_service
    vol_id, _, key, res = attached_at(svc, iscsi_connection, GiB)
    if damage == "reboot":
        # tmpfs run dir emptied: the record is from another boot, the
        # same path may name another device now.
        os.unlink(res["managed_path"])
    elif damage == "new-boot":
        new_boot(svc.cfg)           # even with a link left behind
    elif damage == "device":
        os.unlink(res["path"])
    else:
        svc._db().update_volume(vol_id, state=damage)
    del inproc_brick.calls[:]
    with pytest.raises(errors.NotAttached, match=reason):
        svc.extend_volume(vol_id, SD)
    assert inproc_brick.calls == []
    assert "extend-start " + key not in fakebrick.calls()
    rec, = records(svc)
    assert rec["extending"] is None and rec["size"] == GiB


def test_an_extend_in_before_a_detach_that_locks_first_rescans_nothing(
        inproc_service, inproc_brick, monkeypatch):
    # The host step of an extend on a migration's source and
    # reportCompleted's detach there (docs/flows.md, "A disk grown on a
    # migration's source while it is detached there"): the extend comes
    # in while the volume is attached, and the detach takes the volume's
    # lock before it.  The extend reads the record under the lock: it
    # finds nothing attached and never rescans a device the detach
    # disconnected.  Read before the lock, the record said attached.
    svc = inproc_service
    vol_id, _, key, res = attached_at(svc, iscsi_connection, GiB)
    fakebrick.set_array_size(key, 2 * GiB)
    at_lock, go = threading.Event(), threading.Event()
    locked = svc._locked

    def extend_waits_at_the_lock(vol, timeout=None):
        if threading.current_thread().name == "extend":
            at_lock.set()
            assert go.wait(30)
        return locked(vol, timeout)

    monkeypatch.setattr(svc, "_locked", extend_waits_at_the_lock)
    outcome = []

    def extend():
        try:
            outcome.append(svc.extend_volume(vol_id, SD, 2 * GiB))
        except errors.Error as e:
            outcome.append(e)

    thread = threading.Thread(target=extend, name="extend")
    thread.start()
    try:
        assert at_lock.wait(30)
        assert records(svc)[0]["state"] == "attached"
        del inproc_brick.calls[:]
        svc.detach_volume(vol_id, SD)
    finally:
        go.set()
        thread.join(30)
    error, = outcome
    assert isinstance(error, errors.NotAttached), error
    assert "no record" in str(error)
    assert [c[0] for c in inproc_brick.calls] == ["disconnect"]
    assert "extend-start " + key not in fakebrick.calls()
    assert records(svc) == []


def test_extend_failure_records_the_size_seen_and_clears_the_mark(
        inproc_service):
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_fail_extend="rescan refused")
    svc.attach_volume(vol_id, ci)
    with pytest.raises(errors.HelperFailed, match="rescan refused"):
        svc.extend_volume(vol_id)
    rec, = records(svc)
    assert (rec["state"], rec["size"], rec["extending"]) == (
        "attached", 0, None)


def test_extend_validates_params_before_anything(inproc_service,
                                                 inproc_brick):
    svc = inproc_service
    vol_id, _, _, _ = attached_at(svc, iscsi_connection, GiB)
    del inproc_brick.calls[:]
    for kwargs, name in [({"vol_id": "../x"}, "vol_id"),
                         ({"sd_id": "x"}, "sd_id"),
                         ({"new_size": 0}, "new_size"),
                         ({"new_size": -1}, "new_size"),
                         ({"new_size": True}, "new_size"),
                         ({"new_size": "2G"}, "new_size"),
                         ({"new_size": 2**63}, "new_size")]:
        args = dict({"vol_id": vol_id}, **kwargs)
        with pytest.raises(errors.InvalidParams) as e:
            svc.extend_volume(**args)
        assert e.value.name == name
    assert inproc_brick.calls == []


def test_extend_with_another_sd_id_uses_the_record(inproc_service):
    svc = inproc_service
    vol_id, _, key, res = attached_at(svc, iscsi_connection, GiB)
    fakebrick.set_array_size(key, 2 * GiB)
    assert svc.extend_volume(vol_id)["size"] == 2 * GiB   # blank sd_id
    assert os.readlink(link_of(svc, vol_id, SD)) == res["path"]


def test_reconcile_records_the_size_after_an_interrupted_extend(
        inproc_service):
    svc = inproc_service
    vol_id, _, key, res = attached_at(svc, iscsi_connection, GiB)
    # As a crash between the rescan and the journal update leaves it.
    svc._db().update_volume(vol_id, extending=2 * GiB)
    fakebrick.set_array_size(key, 2 * GiB)
    fakebrick.get_connector("iscsi", None, "sudo").extend_volume(
        iscsi_connection(svc.cfg, key=key)["data"])
    plan = svc.reconcile(apply=False)
    assert plan == [{"vol_id": vol_id, "state": "attached",
                     "action": "record-size", "result": "planned"}]
    assert records(svc)[0]["extending"] == 2 * GiB
    assert svc.reconcile()[0]["result"] == "done"
    rec, = records(svc)
    assert (rec["size"], rec["extending"]) == (2 * GiB, None)
    assert svc.reconcile() == []


def test_reconcile_records_the_size_and_recreates_a_lost_link_at_once(
        inproc_service):
    svc = inproc_service
    vol_id, _, _, res = attached_at(svc, iscsi_connection, GiB)
    svc._db().update_volume(vol_id, extending=0)
    os.unlink(res["managed_path"])
    plan = svc.reconcile(apply=False)
    assert [e["action"] for e in plan] == ["record-size+recreate-link"]
    assert svc.reconcile()[0]["result"] == "done"
    rec, = records(svc)
    assert (rec["size"], rec["extending"]) == (GiB, None)
    assert os.readlink(res["managed_path"]) == res["path"]
    assert svc.reconcile() == []


def test_reconcile_after_an_interrupted_extend_of_a_gone_device_keeps_size(
        inproc_service):
    svc = inproc_service
    vol_id, _, _, res = attached_at(svc, iscsi_connection, GiB)
    svc._db().update_volume(vol_id, extending=0)
    os.unlink(res["path"])
    assert [e["action"] for e in svc.reconcile()] == ["stale"]
    rec, = records(svc)
    assert (rec["size"], rec["extending"]) == (GiB, None)


def test_reattach_reads_the_size_again(inproc_service):
    svc = inproc_service
    vol_id, ci, key, res = attached_at(svc, iscsi_connection, GiB)
    os.unlink(res["managed_path"])            # after a reboot
    fakebrick.set_array_size(key, 5 * GiB)
    svc.attach_volume(vol_id, ci, SD)
    assert svc.volumes_info([vol_id])[0]["size"] == 5 * GiB


# volumes_info

def test_volumes_info_masks_secrets_unless_asked(inproc_service):
    svc = inproc_service
    a, b = sorted([new_id(), new_id()])
    ci = iscsi_connection(svc.cfg)
    secret = ci["data"]["auth_password"]
    svc.attach_volume(b, ci)
    svc.attach_volume(a, rbd_connection(svc.cfg))
    info = svc.volumes_info()
    assert [i["vol_id"] for i in info] == [a, b]
    assert secret not in json.dumps(info)
    assert "AQBsecret" not in json.dumps(info)
    assert info[1]["connection_info"]["data"]["auth_username"] == "chapuser"
    assert set(info[1]) == {"vol_id", "connection_info", "path",
                            "attachment", "managed_path", "exists", "size",
                            "stale", "this_boot"}
    assert info[1]["exists"] is True
    assert info[1]["stale"] is False
    assert info[1]["this_boot"] is True
    with pytest.raises(errors.InvalidParams) as e:
        svc.volumes_info([b], include_secrets=True)
    assert e.value.name == "include_secrets"
    assert "[volumes] remote_secrets" in str(e.value)
    svc.cfg.remote_secrets = True
    full = svc.volumes_info([b], include_secrets=True)
    assert full[0]["connection_info"] == ci
    assert svc.volumes_info([new_id()]) == []


def test_volumes_info_of_attaching_row_has_no_path(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    svc._db().add_volume(vol_id, SD, {"driver_volume_type": "iscsi",
                                      "data": {}}, boot_id=svc._boot())
    info, = svc.volumes_info([vol_id])
    assert info == {"vol_id": vol_id, "connection_info": {
        "driver_volume_type": "iscsi", "data": {}}, "stale": False,
        "this_boot": True}


def test_volumes_info_validates_ids(inproc_service):
    with pytest.raises(errors.InvalidParams, match="vol_ids"):
        inproc_service.volumes_info(["../x"])


# Boots: a record from another boot is never attached (oVirt/vdsm#433)

def calls_named(brick, name):
    return [c for c in brick.calls if c[0] == name]


def test_records_carry_the_boot_they_were_made_in(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    rec, = records(svc)
    with open(svc.cfg.boot_id_file) as f:
        assert rec["boot_id"] == f.read().strip()


def test_restart_in_the_same_boot_keeps_links_and_a_second_attach_is_927(
        host_cfg, inproc_brick):
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    vol_id, ci = new_id(), iscsi_connection(host_cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    svc.close()
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()                          # agent or vdsmd restarted
    try:
        assert svc.reconcile(apply=False) == []
        assert os.readlink(first["managed_path"]) == first["path"]
        assert svc.volumes_info([vol_id])[0]["stale"] is False
        with pytest.raises(errors.AlreadyAttached):
            svc.attach_volume(vol_id, ci, SD)
    finally:
        svc.close()


def test_record_of_another_boot_is_stale_and_reconcile_detaches_it(
        inproc_service, inproc_brick):
    # The device came back at boot (DRBD, FC, a local disk): vdsm#433.
    # The engine detaches only on the host its VM device names: after a
    # fence and a restart elsewhere, never here.
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    new_boot(svc.cfg)                    # a run dir that is not tmpfs
    info, = svc.volumes_info([vol_id])
    assert info["exists"] is True
    assert info["stale"] is True
    assert info["stale_reason"] == "made in another boot"
    assert info["this_boot"] is False

    assert svc.reconcile(apply=False) == [
        {"vol_id": vol_id, "state": "attached", "action": "detach-stale",
         "result": "planned", "reason": "made in another boot"}]
    assert calls_named(inproc_brick, "disconnect") == []
    assert svc.reconcile() == [
        {"vol_id": vol_id, "state": "attached", "action": "detach-stale",
         "result": "done", "reason": "made in another boot"}]
    disconnect, = calls_named(inproc_brick, "disconnect")
    assert disconnect[2] == first["attachment"]
    assert fakebrick.connected() == []
    assert records(svc) == []
    assert not is_symlink(first["managed_path"])
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    assert svc.reconcile() == []


def test_a_record_of_another_boot_whose_detach_fails_stays_attachable(
        inproc_service, inproc_brick):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    new_boot(svc.cfg, empty_run_dir=True)
    disconnect = inproc_brick.disconnect

    def fail(*args):
        raise errors.HelperFailed("map in use")

    inproc_brick.disconnect = fail
    entry, = svc.reconcile()
    assert (entry["action"], entry["result"]) == (
        "detach-stale", "failed: Managed volume helper failed: map in use")
    # Kept as it was: stale, of its boot, without its link and rule.
    rec, = records(svc)
    assert (rec["state"], rec["managed_path"]) == ("attached", None)
    assert rec["boot_id"] != svc._boot()
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    # The engine starts the VM here: a first attach, as before.
    del inproc_brick.calls[:]
    assert svc.attach_volume(vol_id, ci, SD) == first
    assert [c[0] for c in inproc_brick.calls] == ["connect"]
    assert svc.volumes_info([vol_id])[0]["stale"] is False

    # Not attached again: the next reconcile tries again; --force forgets.
    inproc_brick.disconnect = disconnect
    svc.detach_volume(vol_id, SD)
    svc.attach_volume(vol_id, ci, SD)
    new_boot(svc.cfg, empty_run_dir=True)
    inproc_brick.disconnect = fail
    assert svc.reconcile()[0]["result"].startswith("failed: ")
    assert [r["vol_id"] for r in records(svc)] == [vol_id]
    entry, = svc.reconcile(force=True)
    assert (entry["action"], entry["result"]) == (
        "detach-stale", "forgotten: Managed volume helper failed: map in use")
    assert records(svc) == []


@pytest.mark.parametrize("state", ["attached", "attaching", "detaching"])
def test_start_leaves_the_records_of_an_earlier_boot_to_a_thread(
        state, host_cfg, inproc_brick):
    # After a fence, each such record's detach is a privsep call that
    # unreachable storage may hold for [privsep] timeout: the agent (and
    # vdsm's first call) must answer meanwhile (agent.py, api.py).  So
    # too for an attach or a detach the fence cut.
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    vol_id, ci = new_id(), iscsi_connection(host_cfg)
    svc.attach_volume(vol_id, ci, SD)
    svc._db().update_volume(vol_id, state=state)
    svc.close()
    new_boot(host_cfg, empty_run_dir=True)
    release, entered = threading.Event(), threading.Event()
    disconnect = inproc_brick.disconnect

    def slow(*args):
        entered.set()
        assert release.wait(30)
        return disconnect(*args)

    inproc_brick.disconnect = slow
    svc = service.Service(host_cfg, brick=inproc_brick)
    try:
        svc.start(defer_detach_stale=True)
        assert not entered.is_set()
        info, = svc.volumes_info([vol_id])
        assert (info["stale"], info["stale_reason"]) == (
            True, "made in another boot")
        t = svc.detach_stale_later()
        assert entered.wait(30)
        assert svc.volumes_info([vol_id])[0]["stale"] is True  # answers
        release.set()
        t.join(30)
        assert not t.is_alive()
        assert records(svc) == []
        assert fakebrick.connected() == []
    finally:
        release.set()
        inproc_brick.disconnect = disconnect
        svc.close()


def test_start_after_a_reboot_does_not_recreate_links_of_the_old_boot(
        host_cfg, inproc_brick):
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    vol_id, ci = new_id(), iscsi_connection(host_cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    svc.close()
    new_boot(host_cfg, empty_run_dir=True)
    os.unlink(rule_of(svc, vol_id, SD))
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    try:
        assert not is_symlink(first["managed_path"])
        assert not os.path.exists(rule_of(svc, vol_id, SD))
        assert records(svc) == []        # detached at start
    finally:
        svc.close()


def test_reattach_over_a_record_of_another_boot_is_a_first_attach(
        inproc_service, inproc_brick):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    boot_id = new_boot(svc.cfg, empty_run_dir=True)
    del inproc_brick.calls[:]

    # The engine is first (reconcile would have detached the record).
    second = svc.attach_volume(vol_id, ci, SD)

    assert second == first
    assert [c[0] for c in inproc_brick.calls
            if c[0] in ("connect", "disconnect")] == ["connect"]
    assert os.readlink(second["managed_path"]) == second["path"]
    assert os.path.exists(rule_of(svc, vol_id, SD))
    rec, = records(svc)
    assert (rec["boot_id"], rec["state"]) == (boot_id, "attached")
    assert svc.volumes_info([vol_id])[0]["stale"] is False
    with pytest.raises(errors.AlreadyAttached):
        svc.attach_volume(vol_id, ci, SD)


def test_reattach_over_another_boot_forgets_the_old_attachment_first(
        inproc_service, inproc_brick):
    # If the attach fails and its undo too, the 'attaching' record left
    # for reconcile must not name the old boot's devices (another volume
    # may have them now).
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    svc.attach_volume(vol_id, ci)
    new_boot(svc.cfg, empty_run_dir=True)

    def fail(*args):
        raise errors.HelperFailed("storage unreachable")

    inproc_brick.connect = inproc_brick.disconnect = fail
    with pytest.raises(errors.HelperFailed):
        svc.attach_volume(vol_id, ci)
    rec, = records(svc)
    assert rec["state"] == "attaching"
    assert (rec["attachment"], rec["path"], rec["identity"]) == (
        None, None, None)
    assert rec["boot_id"] == svc._boot()


def test_detach_of_a_record_of_another_boot_replays_its_disconnect(
        inproc_service, inproc_brick):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    first = svc.attach_volume(vol_id, ci, SD)
    new_boot(svc.cfg, empty_run_dir=True)
    svc.detach_volume(vol_id, SD)
    disconnect, = calls_named(inproc_brick, "disconnect")
    assert disconnect[2] == first["attachment"]
    assert fakebrick.connected() == []
    assert records(svc) == []
    assert not os.path.exists(rule_of(svc, vol_id, SD))


def test_record_without_a_boot_is_of_this_boot_while_its_link_exists(
        inproc_service):
    # Rows from vdsm or an older version: judged as vdsm PR #483 does.
    svc = inproc_service
    kept, lost = sorted([new_id(), new_id()])
    res = {}
    for vol_id in (kept, lost):
        res[vol_id] = svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
        svc._db().update_volume(vol_id, boot_id=None, identity=None)
    os.unlink(res[lost]["managed_path"])
    os.unlink(rule_of(svc, kept))
    assert [i["stale"] for i in svc.volumes_info()] == [False, True]
    plan = svc.reconcile(apply=False)
    assert [(e["vol_id"], e["action"]) for e in plan] == [
        (kept, "adopt+recreate-rule"), (lost, "remove-stale-rule")]
    svc.reconcile()
    rec = {r["vol_id"]: r for r in records(svc)}
    assert os.path.exists(rule_of(svc, kept))
    assert rec[kept]["boot_id"] == svc._boot()
    assert rec[kept]["identity"] is None        # a file, not a device
    assert rec[lost]["boot_id"] is None
    assert svc.reconcile() == [
        {"vol_id": lost, "state": "attached", "action": "stale",
         "result": "kept", "reason": "made in an unknown boot (recorded "
         "before boots were) and its managed link is gone"}]


def test_unreadable_boot_id_fails_the_start_naming_the_file(
        host_cfg, inproc_brick):
    host_cfg.boot_id_file = os.path.join(host_cfg.state_dir, "no-such")
    svc = service.Service(host_cfg, brick=inproc_brick)
    with pytest.raises(errors.ConfigError, match="no-such.*boot_id_file"):
        svc.start()


# Device identity: never disconnect or chown another device (the class of
# Nova's OSSA-2023-003).  Fake iSCSI volumes whose "device" is a real loop
# device, and a fake sysfs tree for WWNs.

@pytest.fixture
def loop(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    dev = LoopDevice(str(tmp_path / "a.img"))
    yield dev
    dev.detach()


def reuse_minor(loop, backing):
    """Detach ``loop`` and attach ``backing`` on the same minor."""
    loop.reattach(backing)


def loop_iscsi(cfg, loop):
    return iscsi_connection(cfg, fake_device=loop.path)


@pytest.mark.root
def test_attach_records_the_device_identity(inproc_service, loop):
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, loop_iscsi(svc.cfg, loop))
    rec, = records(svc)
    st = os.stat(loop.path)
    assert rec["identity"]["dev"] == "{}:{}".format(
        os.major(st.st_rdev), os.minor(st.st_rdev))
    assert rec["identity"]["backing"] == loop.backing


@pytest.mark.root
def test_detach_never_disconnects_a_loop_minor_reused_for_another_file(
        inproc_service, inproc_brick, loop, tmp_path, caplog):
    svc = inproc_service
    vol_id, ci = new_id(), loop_iscsi(svc.cfg, loop)
    res = svc.attach_volume(vol_id, ci, SD)
    reuse_minor(loop, str(tmp_path / "b.img"))
    info, = svc.volumes_info([vol_id])
    assert info["stale"] is True
    assert info["stale_reason"].startswith("device changed: backing ")
    del inproc_brick.calls[:]

    with caplog.at_level(logging.ERROR, logger="managedvolume.service"):
        svc.detach_volume(vol_id, SD)

    assert calls_named(inproc_brick, "disconnect") == []
    assert ci["data"]["fake_key"] in fakebrick.connected()
    assert records(svc) == []
    assert not is_symlink(res["managed_path"])
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    msg, = [r.getMessage() for r in caplog.records]
    assert "Not disconnecting volume {}".format(vol_id) in msg
    assert str(tmp_path / "b.img") in msg and "end it by hand" in msg


@pytest.mark.root
def test_reattach_over_a_changed_device_is_929_and_touches_nothing(
        inproc_service, inproc_brick, loop, tmp_path):
    svc = inproc_service
    vol_id, ci = new_id(), loop_iscsi(svc.cfg, loop)
    res = svc.attach_volume(vol_id, ci, SD)
    reuse_minor(loop, str(tmp_path / "b.img"))
    del inproc_brick.calls[:]
    before = records(svc)

    with pytest.raises(errors.DeviceChanged) as e:
        svc.attach_volume(vol_id, ci, SD)

    assert e.value.code == 929
    assert "detach the volume" in str(e.value).lower()
    assert inproc_brick.calls == []
    assert records(svc) == before
    # Detach forgets it without touching the device; attach works again.
    svc.detach_volume(vol_id, SD)
    assert calls_named(inproc_brick, "disconnect") == []
    assert svc.attach_volume(vol_id, ci, SD)["path"] == res["path"]


@pytest.mark.root
def test_reattach_over_a_device_in_use_returning_another_is_929_keeping_it(
        inproc_service, inproc_brick, loop, tmp_path, monkeypatch, caplog):
    # Attached in this boot, its device there (only its managed link
    # gone), and the connect made again returns another device: 929.
    # The volume stays attached as it was (a VM may be using its
    # device); the returned device is left connected and not recorded,
    # and the log says so and names it: it may be another's.
    svc = inproc_service
    vol_id = new_id()
    ci = {"driver_volume_type": "local", "data": {"device_path": loop.path}}
    first = svc.attach_volume(vol_id, ci, SD)
    before = records(svc)
    rules = os.listdir(svc.cfg.udev_rules_dir)
    os.unlink(first["managed_path"])
    other = LoopDevice(str(tmp_path / "other.img"))
    try:
        def returns_other(connection_info):
            inproc_brick.calls.append(("connect", connection_info))
            return {"type": "local", "path": other.path}

        monkeypatch.setattr(inproc_brick, "connect", returns_other)
        writes = []
        update = svc._db().update_volume

        def seen_update(vol_id, **fields):
            writes.append(fields.get("path"))
            return update(vol_id, **fields)

        monkeypatch.setattr(svc._db(), "update_volume", seen_update)
        with caplog.at_level(logging.WARNING, logger="managedvolume.service"):
            with pytest.raises(errors.OtherDeviceReturned) as e:
                svc.attach_volume(vol_id, ci, SD)
        assert e.value.code == 929
        # Not "detach the volume": that would end the device in use.
        assert "stays attached as it was" in str(e.value)
        assert "Detach" not in str(e.value)
        assert other.path not in writes         # never recorded
        after = records(svc)
        for rec in before + after:
            rec.pop("updated", None)
        assert after == before
        assert os.listdir(svc.cfg.udev_rules_dir) == rules
        assert calls_named(inproc_brick, "disconnect") == []
        assert other.current_backing() == other.backing
        left, = [r.getMessage() for r in caplog.records
                 if "by hand" in r.getMessage()]
        assert other.path in left and "not recorded" in left
        assert loop.path in left
        # The volume's own connection is the record's: a detach ends it.
        monkeypatch.undo()
        svc.detach_volume(vol_id, SD)
        assert inproc_brick.calls[-1] == (
            "disconnect", ci, first["attachment"])
    finally:
        other.detach()


@pytest.mark.root
def test_reconcile_does_not_rewrite_the_rule_of_a_changed_device(
        inproc_service, loop, tmp_path):
    svc = inproc_service
    vol_id = new_id()
    res = svc.attach_volume(vol_id, loop_iscsi(svc.cfg, loop), SD)
    reuse_minor(loop, str(tmp_path / "b.img"))
    os.unlink(rule_of(svc, vol_id, SD))       # udev would chown with it
    entry, = svc.reconcile()
    assert (entry["action"], entry["result"]) == (
        "remove-stale-link", "done")
    assert entry["reason"].startswith("device changed")
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    assert not is_symlink(res["managed_path"])


@pytest.mark.root
def test_a_loop_minor_reused_in_another_boot_is_told_by_its_backing_file(
        inproc_service, inproc_brick, loop, tmp_path):
    # After a reboot what is at the recorded path is not judged (a kernel
    # name may be another volume's by now): the volume is connected, and
    # the device the connect returns is compared.  Here that is the
    # reused minor, another file: never linked, chowned nor disconnected.
    svc = inproc_service
    vol_id, ci = new_id(), loop_iscsi(svc.cfg, loop)
    res = svc.attach_volume(vol_id, ci, SD)
    new_boot(svc.cfg, empty_run_dir=True)
    reuse_minor(loop, str(tmp_path / "b.img"))
    del inproc_brick.calls[:]
    with pytest.raises(errors.DeviceChanged,
                       match="backing " + str(tmp_path / "b.img")):
        svc.attach_volume(vol_id, ci, SD)
    assert len(calls_named(inproc_brick, "connect")) == 1
    assert calls_named(inproc_brick, "disconnect") == []
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    assert not is_symlink(res["managed_path"])
    info, = svc.volumes_info([vol_id])
    assert info["stale_reason"].startswith("device changed: backing ")
    # Refused until the admin's detach, which leaves the device alone.
    with pytest.raises(errors.DeviceChanged):
        svc.attach_volume(vol_id, ci, SD)
    svc.detach_volume(vol_id, SD)
    assert len(calls_named(inproc_brick, "connect")) == 1
    assert calls_named(inproc_brick, "disconnect") == []
    assert records(svc) == []
    assert loop.current_backing() == str(tmp_path / "b.img")


def nvme_by_kernel_name(cfg, nqn, namespace):
    """An NVMe-oF connection whose (fake) device path is a kernel name
    given at connect: the name of the loop device the link ``namespace``
    points at then (fakebrick's ``fake_kernel_name``)."""
    return {"driver_volume_type": "nvmeof",
            "data": {"target_nqn": nqn,
                     "portals": [["192.0.2.9", "4420", "tcp"]],
                     "fake_dev_dir": os.path.join(
                         os.path.dirname(cfg.multipath_dir), "nvme"),
                     "fake_device": namespace, "fake_kernel_name": True}}


@pytest.mark.root
def test_nvme_reattach_after_reboot_when_its_old_name_was_reused(
        inproc_service, inproc_brick, loop, tmp_path):
    # A fence and an HA restart: in the new boot the namespace that
    # connects first takes the kernel name (/dev/nvmeXnY) another
    # volume's record holds; that volume's re-attach is a first attach.
    svc = inproc_service
    ns_a, ns_b = str(tmp_path / "ns-a"), str(tmp_path / "ns-b")
    os.symlink(loop.path, ns_a)
    a, b = new_id(), new_id()
    ci_a = nvme_by_kernel_name(svc.cfg, "nqn.2026-12.io.example:a", ns_a)
    ci_b = nvme_by_kernel_name(svc.cfg, "nqn.2026-12.io.example:b", ns_b)
    old = svc.attach_volume(a, ci_a, SD)
    backing_a = loop.backing
    new_boot(svc.cfg, empty_run_dir=True)
    reuse_minor(loop, str(tmp_path / "b.img"))      # namespace B
    os.symlink(loop.path, ns_b)
    moved = LoopDevice(backing_a)                   # namespace A
    try:
        os.unlink(ns_a)
        os.symlink(moved.path, ns_a)
        assert svc.attach_volume(b, ci_b, SD)["path"] == old["path"]
        del inproc_brick.calls[:]

        new = svc.attach_volume(a, ci_a, SD)

        assert new["path"] == os.path.join(
            os.path.dirname(old["path"]), os.path.basename(moved.path))
        assert os.readlink(new["managed_path"]) == new["path"]
        assert calls_named(inproc_brick, "disconnect") == []
        info = {i["vol_id"]: i for i in svc.volumes_info()}
        assert not info[a]["stale"] and not info[b]["stale"]
        rec = {r["vol_id"]: r for r in records(svc)}
        assert rec[a]["identity"]["backing"] == backing_a
        assert os.path.exists(rule_of(svc, b, SD))
        svc.detach_volume(a, SD)
        assert loop.current_backing() == str(tmp_path / "b.img")
        assert [r["vol_id"] for r in records(svc)] == [b]
        svc.detach_volume(b, SD)
    finally:
        moved.detach()


@pytest.mark.root
def test_reconcile_never_disconnects_a_reused_device_of_another_boot(
        inproc_service, inproc_brick, loop, tmp_path):
    svc = inproc_service
    vol_id, ci = new_id(), loop_iscsi(svc.cfg, loop)
    svc.attach_volume(vol_id, ci)
    new_boot(svc.cfg, empty_run_dir=True)
    reuse_minor(loop, str(tmp_path / "b.img"))
    entry, = svc.reconcile()
    assert (entry["action"], entry["result"]) == ("detach-stale", "done")
    assert calls_named(inproc_brick, "disconnect") == []
    assert records(svc) == []


@pytest.fixture
def fake_sys(tmp_path, monkeypatch):
    """A sysfs tree for block devices: write(dev, name, value)."""
    from vdsm_managedvolume import devices
    root = tmp_path / "sys-dev-block"
    monkeypatch.setattr(devices, "SYS_DEV_BLOCK", str(root))

    def write(path, name, value):
        st = os.stat(path)
        f = root / "{}:{}".format(os.major(st.st_rdev), os.minor(st.st_rdev))
        (f / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        (f / name).write_text(value + "\n")
    return write


@pytest.mark.root
def test_wwn_tells_a_reused_device_apart_in_any_boot(
        inproc_service, inproc_brick, loop, fake_sys):
    svc = inproc_service
    vol_id, ci = new_id(), loop_iscsi(svc.cfg, loop)
    fake_sys(loop.path, "device/wwid", "naa.6001405aaaaaaaaaaaaaaaaaaaaaaaaa")
    svc.attach_volume(vol_id, ci, SD)
    assert records(svc)[0]["identity"]["wwn"] == \
        "naa.6001405aaaaaaaaaaaaaaaaaaaaaaaaa"

    # Another boot, same LUN back (its dm/sd numbers may differ): taken
    # over as a first attach.
    new_boot(svc.cfg, empty_run_dir=True)
    svc.attach_volume(vol_id, ci, SD)

    # Same boot, another LUN behind the name: not disconnected.
    fake_sys(loop.path, "device/wwid", "naa.6001405bbbbbbbbbbbbbbbbbbbbbbbbb")
    del inproc_brick.calls[:]
    with pytest.raises(errors.DeviceChanged, match="wwn naa.6001405bbb"):
        svc.attach_volume(vol_id, ci, SD)
    svc.detach_volume(vol_id, SD)
    assert calls_named(inproc_brick, "disconnect") == []
    assert ci["data"]["fake_key"] in fakebrick.connected()


@pytest.mark.root
def test_detach_leaves_alone_a_device_attached_as_another_volume(
        inproc_service, inproc_brick, loop):
    # Before a reboot volume A had the loop device; after it volume B.
    svc = inproc_service
    a, b = new_id(), new_id()
    local = {"driver_volume_type": "local",
             "data": {"device_path": loop.path}}
    svc.attach_volume(a, local)
    new_boot(svc.cfg, empty_run_dir=True)
    svc.attach_volume(b, local)
    del inproc_brick.calls[:]
    svc.detach_volume(a)
    assert calls_named(inproc_brick, "disconnect") == []
    assert [r["vol_id"] for r in records(svc)] == [b]
    assert os.path.exists(rule_of(svc, b))


# Reconcile

@pytest.mark.root
@pytest.mark.parametrize("guarded", [True, False])
def test_reconcile_removes_the_bare_kernel_name_rule_of_a_vanished_device(
        tmp_path, inproc_brick, loop, guarded):
    # A bare KERNEL== rule (vdsm's) names whatever the kernel calls that
    # next (NVMe's nvmeXnY): removed.  Ours is guarded by the device's
    # own attribute (udev.py): kept, so that when the device comes back
    # it gets its owner again, and re-attach (927) finds it.  A SYMLINK==
    # one (test_reattach_after_device_vanished_reconnects) names the
    # volume's own link and is kept.
    node = "/dev/mvtest-" + new_id()[:8]
    cfg = make_cfg(tmp_path, local_devices=(node,))
    svc = service.Service(cfg, brick=inproc_brick)
    svc.start()
    st = os.stat(loop.path)
    os.mknod(node, 0o600 | stat.S_IFBLK, st.st_rdev)
    try:
        vol_id = new_id()
        res = svc.attach_volume(vol_id, {"driver_volume_type": "local",
                                         "data": {"device_path": node}}, SD)
        rule = rule_of(svc, vol_id, SD)
        with open(rule) as f:
            text = f.read()
        assert text.startswith('KERNEL=="{}", ATTR{{'.format(node[5:]))
        if not guarded:                 # as vdsm writes it
            with open(rule, "w") as f:
                f.write(re.sub(r'ATTR\{[^}]*\}=="[^"]*", ', "", text))
        os.unlink(node)                         # the device is gone
        assert svc.volumes_info([vol_id])[0]["stale_reason"] == \
            "device gone"
        entry, = svc.reconcile()
        assert os.readlink(res["managed_path"]) == node
        assert records(svc)[0]["state"] == "attached"
        if not guarded:
            assert (entry["action"], entry["result"], entry["reason"]) == (
                "remove-stale-rule", "done", "device gone")
            assert not os.path.exists(rule)
            return
        assert (entry["action"], entry["result"], entry["reason"]) == (
            "stale", "kept", "device gone")
        os.mknod(node, 0o600 | stat.S_IFBLK, st.st_rdev)     # back
        with pytest.raises(errors.AlreadyAttached):
            svc.attach_volume(vol_id, {"driver_volume_type": "local",
                                       "data": {"device_path": node}}, SD)
        with open(rule) as f:
            assert f.read() == text
    finally:
        if os.path.lexists(node):
            os.unlink(node)
        svc.close()


def test_reconcile_recreates_missing_link_and_rule(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    res = svc.attach_volume(vol_id, iscsi_connection(svc.cfg), SD)
    os.unlink(res["managed_path"])
    os.unlink(rule_of(svc, vol_id, SD))
    plan = svc.reconcile(apply=False)
    assert plan == [{"vol_id": vol_id, "state": "attached",
                     "action": "recreate-link+rule", "result": "planned"}]
    assert not is_symlink(res["managed_path"])
    assert svc.reconcile()[0]["result"] == "done"
    assert os.readlink(res["managed_path"]) == res["path"]
    assert os.path.exists(rule_of(svc, vol_id, SD))
    assert svc.reconcile() == []


def test_reconcile_rewrites_a_torn_rule(inproc_service):
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, iscsi_connection(svc.cfg))
    open(rule_of(svc, vol_id), "w").close()
    entry, = svc.reconcile()
    assert entry["action"] == "recreate-rule"
    with open(rule_of(svc, vol_id)) as f:
        assert f.read().startswith('SYMLINK=="mapper/')


def test_reconcile_removes_orphan_links_rules_and_temp_files(
        inproc_service):
    svc = inproc_service
    vol_id = new_id()
    orphan_link = link_of(svc, vol_id, SD)
    os.symlink("/dev/null", orphan_link)
    udev.add_rule(svc.cfg, SD, vol_id, "/dev/loop7")
    tmp_link = os.path.join(svc.cfg.run_dir, ".{}_{}.tmp".format(SD, vol_id))
    os.symlink("/dev/null", tmp_link)
    foreign = os.path.join(svc.cfg.run_dir, "not-ours")
    open(foreign, "w").close()

    plan = svc.reconcile(apply=False)
    assert sorted(e["action"] for e in plan) == [
        "remove-link", "remove-rule", "remove-temp-link"]
    assert is_symlink(orphan_link)
    svc.reconcile()
    assert os.listdir(svc.cfg.run_dir) == ["not-ours"]
    assert udev.list_rules(svc.cfg) == []
    assert svc.reconcile() == []


def test_reconcile_leaves_temp_files_of_a_running_attach_alone(
        inproc_service):
    from vdsm_managedvolume import locking
    svc = inproc_service
    vol_id = new_id()
    tmp_link = os.path.join(svc.cfg.run_dir, ".{}_{}.tmp".format(SD, vol_id))
    os.symlink("/dev/null", tmp_link)
    with locking.volume_lock(svc.cfg.lock_dir, vol_id, 1):
        entry, = svc.reconcile()
        assert entry["result"] == "busy"
        assert is_symlink(tmp_link)
    assert svc.reconcile()[0]["result"] == "done"
    assert not is_symlink(tmp_link)


def test_start_reconciles(host_cfg, inproc_brick):
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    vol_id, ci = new_id(), iscsi_connection(host_cfg)
    svc.attach_volume(vol_id, ci)
    svc._db().update_volume(vol_id, state="attaching")
    svc.close()
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    try:
        assert records(svc) == []
        assert fakebrick.connected() == []
    finally:
        svc.close()


def test_closed_service_refuses_calls(host_cfg, inproc_brick):
    svc = service.Service(host_cfg, brick=inproc_brick)
    with pytest.raises(errors.StoreClosed):
        svc.volumes_info()


# Secrets never reach the logs (real daemon: its errors and log lines too)

def test_attach_and_detach_outcomes_name_volume_and_path_not_connection_info(
        inproc_service, monkeypatch, caplog):
    # connection_info is in the call's START line (api.py), masked once
    # there: the service's lines do not mask or repeat it.
    masked = []
    real = mask.mask

    def counting(obj, _depth=0):
        if _depth == 0 and isinstance(obj, dict) and \
                "driver_volume_type" in obj:
            masked.append(obj)
        return real(obj, _depth)

    monkeypatch.setattr(mask, "mask", counting)
    ci = iscsi_connection(inproc_service.cfg)
    vol_id = new_id()
    with caplog.at_level(logging.DEBUG, logger="managedvolume.service"):
        res = inproc_service.attach_volume(vol_id, ci)
        inproc_service.detach_volume(vol_id)
    assert masked == []
    lines = [(r.levelname, r.getMessage()) for r in caplog.records
             if vol_id in r.getMessage()]
    assert lines == [
        ("DEBUG", "Attaching volume {} sd_id={}".format(
            vol_id, validate.BLANK_UUID)),
        ("DEBUG", "Attached volume {} path={} managed_path={}".format(
            vol_id, res["path"], res["managed_path"])),
        ("DEBUG", "Detaching volume {} (attached)".format(vol_id)),
        ("DEBUG", "Detached volume {} path={} (was attached)".format(
            vol_id, res["path"])),
    ]
    assert ci["data"]["target_iqn"] not in caplog.text


@pytest.mark.root
@pytest.mark.slow
def test_secrets_never_in_logs_of_attach_extend_and_their_failures(
        real_service):
    svc = real_service
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    # A plain handler: no masking filter, so only what the code itself
    # masks is proven.  Then the production handler (with the filter).
    plain = Keep(logging.DEBUG)
    plain.setFormatter(logging.Formatter("%(name)s %(message)s"))
    filtered = Keep(logging.DEBUG)
    filtered.setFormatter(logging.Formatter(mvlog.FORMAT))
    mvlog.install_filter(filtered)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(filtered)
    logging.getLogger("managedvolume").addHandler(plain)
    try:
        with mvlog.flow("secret-flow"):
            ci = iscsi_connection(svc.cfg)
            vol_id = new_id()
            svc.attach_volume(vol_id, ci)
            svc.extend_volume(vol_id)
            svc.volumes_info()
            svc.detach_volume(vol_id)
            bad = iscsi_connection(svc.cfg, fake_fail=True)
            with pytest.raises(errors.HelperFailed) as e:
                svc.attach_volume(new_id(), bad)
            bad_extend = iscsi_connection(svc.cfg, fake_fail_extend=True)
            vol_id = new_id()
            svc.attach_volume(vol_id, bad_extend)
            with pytest.raises(errors.HelperFailed) as e2:
                svc.extend_volume(vol_id)
            svc.detach_volume(vol_id)
    finally:
        root.removeHandler(filtered)
        root.setLevel(old_level)
        logging.getLogger("managedvolume").removeHandler(plain)
    text = "\n".join(lines)
    assert "Attaching volume" in text
    assert "Extending volume" in text and "Rescan failed" in text
    for secret in (ci["data"]["auth_password"], bad["data"]["auth_password"],
                   bad_extend["data"]["auth_password"]):
        assert secret not in text
        assert secret not in str(e.value)
        assert secret not in str(e2.value)
    assert "chapuser" in text


# Review of the contract's corners

def test_close_waits_for_a_running_attach_and_refuses_new_calls(
        host_cfg, inproc_brick):
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    vol_id = new_id()
    ci = iscsi_connection(host_cfg, fake_sleep=0.5)
    attach = agentutil.Held(svc.attach_volume, vol_id, ci)
    deadline = time_now() + 10
    while "connect-start " + ci["data"]["fake_key"] not in fakebrick.calls():
        assert time_now() < deadline
        time_sleep(0.01)
    svc.close()
    attach.join(10)
    # The attach finished and was recorded before the journal closed.
    assert attach.error is None
    assert attach.result["vol_id"] == vol_id
    for call in (lambda: svc.attach_volume(new_id(), ci),
                 lambda: svc.detach_volume(vol_id),
                 lambda: svc.volumes_info(),
                 lambda: svc.reconcile()):
        with pytest.raises(errors.StoreClosed):
            call()
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    try:
        rec, = records(svc)
        assert rec["state"] == "attached"
    finally:
        svc.close()


def test_close_gives_up_waiting_after_its_timeout(host_cfg, inproc_brick):
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    ci = iscsi_connection(host_cfg, fake_sleep=1.0)
    vol_id = new_id()
    attach = agentutil.Held(svc.attach_volume, vol_id, ci)
    deadline = time_now() + 10
    while "connect-start " + ci["data"]["fake_key"] not in fakebrick.calls():
        assert time_now() < deadline
        time_sleep(0.01)
    svc.close(timeout=0.1)
    attach.join(10)
    # Cut between connect and journal: it failed and its record stays
    # 'attaching' for reconcile, which disconnects it.
    assert isinstance(attach.error, errors.StoreClosed)
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    try:
        assert records(svc) == []
        assert ci["data"]["fake_key"] not in fakebrick.connected()
    finally:
        svc.close()


def test_detach_of_an_attaching_record_disconnects_and_forgets_it(
        inproc_service):
    # A crash between connect and the journal update: the record has no
    # path, but the device may be connected (vdsm leaked it).  What the
    # connect returned is lost: the disconnect goes without device_info.
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_blind_disconnect=True)
    fakebrick.get_connector("iscsi", ci, None).connect_volume(ci["data"])
    svc._db().add_volume(vol_id, SD, ci)
    assert records(svc)[0]["state"] == "attaching"
    svc.detach_volume(vol_id, SD)
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert records(svc) == []


def test_detach_with_another_sd_id_cleans_the_recorded_and_given_names(
        inproc_service):
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg)
    res = svc.attach_volume(vol_id, ci, SD)
    stray = link_of(svc, vol_id)               # blank sd_id
    os.symlink(res["path"], stray)
    udev.add_rule(svc.cfg, validate.BLANK_UUID, vol_id, res["path"])
    svc.detach_volume(vol_id)                  # blank sd_id
    for path in (res["managed_path"], stray):
        assert not is_symlink(path)
    assert udev.list_rules(svc.cfg) == []
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert records(svc) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_connection_info_with_nan_or_infinity_is_invalid_params(
        inproc_service, inproc_brick, value):
    # json.dumps would write NaN (not JSON) to the journal and the wire,
    # and NaN != NaN would turn a repeated attach into 929.
    ci = iscsi_connection(inproc_service.cfg, target_lun=value)
    with pytest.raises(errors.InvalidParams) as e:
        inproc_service.attach_volume(new_id(), ci)
    assert e.value.name == "connection_info.data.target_lun"
    assert inproc_brick.calls == []
    assert records(inproc_service) == []


def test_connection_info_larger_than_64_kib_is_invalid_params(
        inproc_service, inproc_brick):
    ci = iscsi_connection(inproc_service.cfg,
                          padding="x" * validate.MAX_CONNECTION_INFO)
    with pytest.raises(errors.InvalidParams) as e:
        inproc_service.attach_volume(new_id(), ci)
    assert e.value.name == "connection_info"
    assert str(validate.MAX_CONNECTION_INFO) in str(e.value)
    assert inproc_brick.calls == []
    assert records(inproc_service) == []


def test_connection_info_just_under_the_limit_attaches(inproc_service):
    ci = iscsi_connection(inproc_service.cfg)
    size = len(json.dumps(ci).encode())
    ci["data"]["padding"] = "x" * (
        validate.MAX_CONNECTION_INFO - size - len(', "padding": ""'))
    assert len(json.dumps(ci).encode()) == validate.MAX_CONNECTION_INFO
    inproc_service.attach_volume(new_id(), ci)


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "pool", "pool/../image", "/pool/image",
    "pool/image/", "pool/im age", 'pool/x", RUN+="evil', None, 7,
    "a/b/c/d"])
def test_rbd_name_that_is_not_pool_slash_image_is_invalid_params(
        inproc_service, inproc_brick, name):
    ci = rbd_connection(inproc_service.cfg)
    ci["data"]["name"] = name
    with pytest.raises(errors.InvalidParams) as e:
        inproc_service.attach_volume(new_id(), ci)
    assert e.value.name == "connection_info.data.name"
    assert inproc_brick.calls == []


def test_rbd_name_with_a_namespace_is_refused_before_anything_happens(
        inproc_service, inproc_brick):
    # os-brick 7's RBDConnector splits data.name into exactly two parts at
    # connect and at disconnect: refused at the door, nothing recorded.
    ci = rbd_connection(inproc_service.cfg,
                        name="pool/ns1/volume-" + new_id()[:8])
    vol_id = new_id()
    with pytest.raises(errors.InvalidParams) as e:
        inproc_service.attach_volume(vol_id, ci)
    assert e.value.name == "connection_info.data.name"
    assert inproc_service.volumes_info([vol_id]) == []
    assert inproc_brick.calls == []


# Records nothing can clear (issue: surrogates, 64-bit, failed FC connects)

def test_failed_connect_whose_disconnect_fails_too_leaves_no_record(
        inproc_service, fakebrick_dir):
    # A host without FC HBAs (or an NVMe initiator) fails the connect and
    # the rollback's disconnect alike, forever: the connect returned an
    # error, nothing is known to be connected, nothing is kept.
    svc = inproc_service
    for dvt, target in (("fibre_channel", {"target_wwn": ["50014380"],
                                           "target_lun": 1}),
                        ("nvmeof", {"target_nqn": "nqn.2026-11.x:" +
                                    new_id(),
                                    "portals": [["192.0.2.3", 4420,
                                                 "tcp"]]})):
        ci = {"driver_volume_type": dvt,
              "data": dict(target, fake_fail="no HBA found",
                           fake_fail_disconnect="no HBA found")}
        vol_id = new_id()
        with pytest.raises(errors.HelperFailed, match="no HBA found") as e:
            svc.attach_volume(vol_id, ci)
        assert e.value.code == 926
        assert svc.volumes_info([vol_id]) == []
        svc.detach_volume(vol_id)
        assert svc.reconcile() == []


def test_timed_out_connect_whose_disconnect_fails_keeps_its_record(
        inproc_service, inproc_brick, monkeypatch):
    # A connect that timed out may have connected: the record stays for
    # reconcile (and for reconcile --apply --force).
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg, fake_fail_disconnect="logout failed")

    def timeout(connection_info):
        raise errors.HelperTimeout(operation="connect", timeout=1)

    monkeypatch.setattr(inproc_brick, "connect", timeout)
    with pytest.raises(errors.HelperTimeout):
        svc.attach_volume(vol_id, ci)
    rec, = records(svc)
    assert rec["state"] == "attaching"

    entry, = svc.reconcile(apply=True)
    assert entry["result"].startswith("failed: ")
    entry, = svc.reconcile(apply=True, force=True)
    assert entry["action"] == "detach"
    assert entry["result"] == "forgotten: " + entry["result"][11:]
    assert "logout failed" in entry["result"]
    assert records(svc) == []


def test_record_whose_connection_info_cannot_be_sent_is_forgotten(
        inproc_service, caplog):
    # Journaled before validation refused lone surrogates: the privsep
    # channel cannot carry it, so its connect never reached the daemon
    # and nothing is connected.  Detach forgets it with a warning.
    svc = inproc_service
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg)
    ci["data"]["target_iqn"] = "iqn.2026-11.x:\ud800"
    svc._db().add_volume(vol_id, validate.BLANK_UUID, ci)

    with caplog.at_level(logging.WARNING):
        svc.detach_volume(vol_id)
    assert records(svc) == []
    assert "cannot be sent to the privsep daemon" in caplog.text

    svc._db().add_volume(vol_id, validate.BLANK_UUID, ci)
    entry, = svc.reconcile(apply=True)
    assert (entry["action"], entry["result"]) == ("rollback", "done")
    assert records(svc) == []


@pytest.mark.parametrize("data, field", [
    ({"target_iqn": "iqn\ud800"}, "connection_info.data.target_iqn"),
    ({"target_lun": 2 ** 64}, "connection_info.data.target_lun"),
    ({"target_lun": float("inf")}, "connection_info.data.target_lun"),
])
def test_attach_of_what_the_channel_cannot_carry_changes_nothing(
        inproc_service, inproc_brick, data, field):
    svc = inproc_service
    ci = iscsi_connection(svc.cfg)
    ci["data"].update(data)
    with pytest.raises(errors.InvalidParams) as e:
        svc.attach_volume(new_id(), ci)
    assert e.value.code == -32602 and e.value.name == field
    assert records(svc) == []
    assert inproc_brick.calls == []


# Local devices: only block devices in local_devices the host does not use

@pytest.mark.parametrize("path, reason", [
    ("/etc/shadow", "is not a block device"),
    ("/dev/console", "is not a block device"),
    ("/dev/kmsg", "is not a block device"),
    ("/dev/tty", "is not a block device"),
    ("/dev/null", "is not a block device"),
    ("/", "is not a block device"),
    ("/proc/self/fd/0", "is not a block device"),
    ("/sys/block", "is not a block device"),
    ("/dev/no-such-device", "does not exist"),
    ("dev/loop0", "is not an absolute path"),
    ("/dev/../etc/passwd", "is not a normalised path"),
    ("/dev/loop0\0", "NUL"),
    (None, "expected a device path"),
])
def test_local_attach_refuses_what_is_not_a_block_device(
        inproc_service, inproc_brick, path, reason):
    svc = inproc_service
    vol_id = new_id()
    data = {} if path is None else {"device_path": path}
    with pytest.raises(errors.InvalidParams) as e:
        svc.attach_volume(vol_id, {"driver_volume_type": "local",
                                   "data": data}, SD)
    assert e.value.name == "connection_info.data.device_path"
    assert reason in str(e.value)
    assert inproc_brick.calls == [] and records(svc) == []
    assert not os.path.exists(rule_of(svc, vol_id, SD))
    assert not is_symlink(link_of(svc, vol_id, SD))


def test_local_attach_refuses_a_link_to_a_file(inproc_service, tmp_path):
    link = tmp_path / "disk"
    link.symlink_to("/etc/passwd")
    with pytest.raises(errors.InvalidParams,
                       match=r"-> /etc/passwd\) is not a block device"):
        inproc_service.attach_volume(new_id(), {
            "driver_volume_type": "local",
            "data": {"device_path": str(link)}})


@pytest.mark.root
def test_local_block_device_outside_local_devices_is_refused(
        host_cfg, inproc_brick, loop_device, tmp_path):
    # Outside --state-dir mode loop devices are not allowed by default;
    # a link in an allowed directory to one is allowed once configured.
    host_cfg.state_dir = ""
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    try:
        ci = {"driver_volume_type": "local",
              "data": {"device_path": loop_device.path}}
        with pytest.raises(errors.InvalidParams,
                           match="local_devices allows /dev/drbd"):
            svc.attach_volume(new_id(), ci)
        assert records(svc) == []

        by_res = tmp_path / "by-res" / "r0"
        by_res.mkdir(parents=True)
        (by_res / "0").symlink_to(loop_device.path)
        host_cfg.local_devices = (str(tmp_path / "by-res") + "/*",)
        ci["data"]["device_path"] = str(by_res / "0")
        res = svc.attach_volume(new_id(), ci)
        assert os.path.realpath(res["path"]) == loop_device.path
    finally:
        svc.close()


# One device, one volume

@pytest.mark.root
def test_second_volume_on_an_attached_device_is_927(
        inproc_service, loop_device):
    svc = inproc_service
    first, second = new_id(), new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    svc.attach_volume(first, ci)
    with pytest.raises(errors.AlreadyAttached) as e:
        svc.attach_volume(second, ci)
    assert e.value.code == 927
    assert first in str(e.value) and "shared_devices" in str(e.value)
    assert [r["vol_id"] for r in records(svc)] == [first]

    svc.cfg.shared_devices = True
    svc.attach_volume(second, ci)
    assert len(records(svc)) == 2


@pytest.mark.root
def test_detaching_one_of_two_volumes_sharing_a_device_is_no_error(
        inproc_service, inproc_brick, loop_device, caplog):
    # [volumes] shared_devices: the device stays connected for the other
    # volume, and that is what the log says (not that it belongs to
    # something else); the last volume's detach disconnects it.
    svc = inproc_service
    svc.cfg.shared_devices = True
    first, second = new_id(), new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}
    svc.attach_volume(first, ci)
    svc.attach_volume(second, ci)
    del inproc_brick.calls[:]
    with caplog.at_level(logging.INFO, logger="managedvolume.service"):
        svc.detach_volume(first)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "belongs to something else" not in caplog.text
    assert "Not disconnecting volume {}: its device {} is shared with " \
        "volume {}".format(first, loop_device.path, second) in caplog.text
    assert calls_named(inproc_brick, "disconnect") == []
    assert [r["vol_id"] for r in records(svc)] == [second]
    assert os.path.exists(rule_of(svc, second))

    svc.detach_volume(second)
    assert len(calls_named(inproc_brick, "disconnect")) == 1
    assert records(svc) == []


@pytest.mark.root
def test_device_found_by_another_connect_is_not_disconnected(
        inproc_service, loop_device):
    # Two iSCSI connections leading to one device: the second attach is
    # refused and must not disconnect what the first volume uses.
    svc = inproc_service
    first, second = new_id(), new_id()
    ci1 = iscsi_connection(svc.cfg, fake_device=loop_device.path)
    ci2 = iscsi_connection(svc.cfg, fake_device=loop_device.path)
    svc.attach_volume(first, ci1)
    with pytest.raises(errors.DeviceAttached):
        svc.attach_volume(second, ci2)
    assert ci1["data"]["fake_key"] in fakebrick.connected()
    assert not any(c.startswith("disconnect") for c in fakebrick.calls())
    assert [r["vol_id"] for r in records(svc)] == [first]
    assert os.path.exists(svc.volumes_info([first])[0]["path"])


def _attach_lines(caplog, vol_id):
    return [(r.levelname, r.getMessage().split(":")[0])
            for r in caplog.records
            if r.getMessage().startswith("Attaching volume " + vol_id)]


def test_an_attach_refused_for_the_callers_mistake_is_a_warning(
        inproc_service, loop_device, monkeypatch, caplog):
    # 927 (the device attached as another volume) and -32602 (a
    # parameter the connector refused) are the caller's mistakes, not
    # the host's failures: WARNING, not ERROR.  A failure stays ERROR.
    svc = inproc_service
    first, second = new_id(), new_id()
    svc.attach_volume(first, iscsi_connection(
        svc.cfg, fake_device=loop_device.path))
    with caplog.at_level(logging.INFO, logger="managedvolume.service"):
        with pytest.raises(errors.DeviceAttached):
            svc.attach_volume(second, iscsi_connection(
                svc.cfg, fake_device=loop_device.path))
        assert _attach_lines(caplog, second) == [
            ("WARNING", "Attaching volume {} failed".format(second))]

        refused, failed = new_id(), new_id()
        real = svc._brick.connect

        def refusing(connection_info):
            raise errors.InvalidParams(name="connection_info.data",
                                       reason="refused by the connector")

        monkeypatch.setattr(svc._brick, "connect", refusing)
        with pytest.raises(errors.InvalidParams):
            svc.attach_volume(refused, iscsi_connection(svc.cfg))
        assert _attach_lines(caplog, refused) == [
            ("WARNING", "Attaching volume {} failed".format(refused))]

        monkeypatch.setattr(svc._brick, "connect", real)
        with pytest.raises(errors.HelperFailed):
            svc.attach_volume(failed, iscsi_connection(svc.cfg,
                                                       fake_fail=True))
        assert _attach_lines(caplog, failed) == [
            ("ERROR", "Attaching volume {} failed".format(failed))]


def test_failed_connect_names_the_missing_initiator_command(
        inproc_service, tmp_path, monkeypatch):
    # os-brick without iscsiadm says "Unable to find target portal"; the
    # cause is the missing command.
    from vdsm_managedvolume import hosttools
    monkeypatch.setattr(hosttools, "SEARCH_PATH", (str(tmp_path),))
    monkeypatch.setenv("PATH", str(tmp_path))
    svc = inproc_service
    ci = iscsi_connection(svc.cfg, fake_fail="Unable to find target portal")
    with pytest.raises(errors.HelperFailed) as e:
        svc.attach_volume(new_id(), ci)
    assert e.value.code == 926
    assert "Unable to find target portal (iscsiadm, multipath, multipathd " \
        "not installed on this host (iscsi needs them: install " \
        "iscsi-initiator-utils or open-iscsi" in str(e.value)
    assert records(svc) == []


# A corrupt record (store._decoded)

@pytest.mark.parametrize("column, text", [
    ("connection_info", "{not json"), ("connection_info", '"str"'),
    ("attachment", '"str"'), ("identity", "[1]")])
def test_a_corrupt_record_is_stale_refused_clearly_and_start_goes_on(
        host_cfg, inproc_brick, column, text):
    # It stopped the agent from starting ("corrupt JSON in a record",
    # naming no volume); JSON of the wrong type made detach -32603.
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    bad, good = new_id(), new_id()
    first = svc.attach_volume(bad, iscsi_connection(host_cfg), SD)
    svc.attach_volume(good, iscsi_connection(host_cfg), SD)
    svc._db()._write("UPDATE volumes SET {} = ? WHERE vol_id = ?".format(
        column), (text, bad))
    svc.close()

    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()                          # the agent starts
    try:
        infos = {i["vol_id"]: i for i in svc.volumes_info()}
        assert infos[good]["stale"] is False
        assert infos[bad]["stale"] is True
        assert infos[bad]["stale_reason"].startswith(
            "corrupt record: " + column)
        for call in (lambda: svc.detach_volume(bad, SD),
                     lambda: svc.attach_volume(
                         bad, iscsi_connection(host_cfg), SD)):
            with pytest.raises(errors.CorruptRecord) as e:
                call()
            assert e.value.code == 935
            assert bad in str(e.value) and column in str(e.value)
            assert "reconcile --apply --force" in str(e.value)
        with pytest.raises(errors.NotAttached, match="corrupt record"):
            svc.extend_volume(bad, SD)
        assert [r["vol_id"] for r in records(svc)] == sorted([bad, good])

        entry, = svc.reconcile(apply=True, force=True)
        assert (entry["vol_id"], entry["action"], entry["result"]) == (
            bad, "forget", "forgotten: corrupt record")
        assert [r["vol_id"] for r in records(svc)] == [good]
        assert not is_symlink(first["managed_path"])
        assert not os.path.exists(rule_of(svc, bad, SD))
        svc.detach_volume(bad, SD)       # nothing recorded: done
    finally:
        svc.close()


# Fsyncs: one per attach+detach (store.py, "Commits and fsyncs"); what a
# power loss at each step leaves is tests/crash_test.py's.

def _synced_commits(svc, monkeypatch):
    """The commits of ``svc``'s journal made with an fsync, each a list
    of the statements' first words."""
    synced = []
    db = svc._db()
    commit = db._commit

    def counting(batch):
        if any(job.durable for job in batch):
            synced.append([job.sql.split()[0] for job in batch])
        return commit(batch)

    monkeypatch.setattr(db, "_commit", counting)
    return synced


@pytest.mark.root
@pytest.mark.parametrize("transport,synced", [
    # A local device: the intent only.
    ("local", [["INSERT"]]),
    # Any other: what connect made too, before its rule and link; what a
    # power loss must not take from its record: the attachment disconnect
    # needs, the multipath_id vdsm hides (transports.base).
    ("iscsi", [["INSERT"], ["UPDATE"]]),
])
def test_an_attach_and_detach_sync_what_a_power_loss_needs(
        transport, synced, inproc_service, loop, monkeypatch):
    svc = inproc_service
    vol_id = new_id()
    ci = (loop_iscsi(svc.cfg, loop) if transport == "iscsi" else
          {"driver_volume_type": "local", "data": {"device_path": loop.path}})
    seen = _synced_commits(svc, monkeypatch)
    svc.attach_volume(vol_id, ci)
    svc.detach_volume(vol_id)
    assert seen == synced
    assert records(svc) == []


@pytest.mark.root
def test_a_detach_syncs_its_intent_for_a_record_of_an_unknown_boot(
        inproc_service, loop, monkeypatch):
    # Reconcile keeps such a record ('attached', no boot) instead of
    # detaching it after a host crash: its 'detaching' must be synced.
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, loop_iscsi(svc.cfg, loop))
    svc._db().update_volume(vol_id, boot_id=None)
    synced = _synced_commits(svc, monkeypatch)
    svc.detach_volume(vol_id)
    assert synced == [["UPDATE"]]
    assert records(svc) == []


@pytest.mark.parametrize("again", ["other connection", "detach left"])
def test_an_attach_held_by_an_earlier_records_running_connect_is_931_kept(
        inproc_service, inproc_brick, monkeypatch, again):
    # An attach must first detach the volume's earlier record (another
    # connection_info, or a detach left unfinished) whose cut connect
    # left a login running: the disconnect is not run.  The attach fails
    # with DetachFirst (931) saying so, the journal keeps the earlier
    # record as the refused detach left it and nothing of this attach,
    # and the record is tried again every RETRY_KEPT until the login
    # ended.  Before, it failed with "Privileged disconnect not run" and
    # the record stayed until someone detached it by hand.
    svc = inproc_service
    monkeypatch.setattr(service, "RETRY_KEPT", 0.05)
    vol_id, old = new_id(), iscsi_connection(svc.cfg)
    connect, disconnect = inproc_brick.connect, inproc_brick.disconnect
    # Cut at its deadline, and so was its rollback's disconnect (a
    # daemon killed at the deadline): the record stays 'attaching', not
    # kept for retries (nothing said a login still runs).
    monkeypatch.setattr(inproc_brick, "connect", raising(
        errors.HelperTimeout(operation="connect", timeout=1.0)))
    monkeypatch.setattr(inproc_brick, "disconnect", raising(
        errors.HelperTimeout(operation="disconnect", timeout=1.0)))
    with pytest.raises(errors.HelperTimeout):
        svc.attach_volume(vol_id, old)
    monkeypatch.setattr(inproc_brick, "connect", connect)
    inproc_brick.calls.clear()
    if again == "detach left":
        svc._db().update_volume(vol_id, state="detaching")
    [before] = records(svc)
    assert before["connecting"] and vol_id not in svc._kept
    login = threading.Event()
    tried = []

    def held(connection_info, attachment, connecting=True):
        tried.append(connection_info)
        if not login.is_set():
            raise errors.EarlierConnectRunning(
                operation="disconnect", timeout=1.0,
                running="an earlier connect of this connection still runs "
                "(iscsiadm --login pid 7, running for 9 s)")
        return disconnect(connection_info, attachment, connecting)

    monkeypatch.setattr(inproc_brick, "disconnect", held)
    new = old if again == "detach left" else iscsi_connection(svc.cfg)
    with pytest.raises(errors.DetachFirst) as e:
        svc.attach_volume(vol_id, new, sd_id=SD)
    assert e.value.code == 931
    message = str(e.value)
    assert vol_id in message
    assert "'{}', iscsi, sd_id {}, made in this boot".format(
        before["state"], validate.BLANK_UUID) in message
    assert "iscsiadm --login pid 7" in message
    assert "detaches it again every" in message
    assert "chap-secret" not in message
    [rec] = records(svc)
    assert {k: v for k, v in rec.items() if k not in ("state", "updated")} \
        == {k: v for k, v in before.items() if k not in ("state", "updated")}
    assert rec["state"] == "detaching"
    assert [c for c in inproc_brick.calls if c[0] == "connect"] == []
    assert tried == [old]
    # Kept: tried again (refused, nothing run) until the login ended.
    deadline = time.monotonic() + 30
    while len(tried) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert records(svc)
    login.set()
    while records(svc) or svc._kept_thread is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert svc.attach_volume(vol_id, new, sd_id=SD)["path"]


def test_a_failed_rbd_reattach_deletes_both_confs_before_forgetting_it(
        inproc_service, inproc_brick, monkeypatch):
    # The rollback of a failed attach again over a record whose device
    # went deletes the ceph confs of both connects (the first attach's,
    # the one this connect wrote) before it forgets the record: a crash
    # between the two then leaves a record naming them (the next detach
    # or reconcile clears it), never confs holding the keyring that no
    # record names.  Before, they were deleted after the record went.
    svc = inproc_service
    vol_id, ci, first = attached_rbd(svc)
    os.unlink(first["path"])
    links_fail(svc, monkeypatch)
    db = svc._db()
    remove = db.remove_volume
    left = []

    def remove_volume(vol_id, durable=True):
        left.append(fakebrick.confs())
        return remove(vol_id, durable=durable)

    monkeypatch.setattr(db, "remove_volume", remove_volume)
    with pytest.raises(OSError):
        svc.attach_volume(vol_id, ci)
    assert left == [[]]
    assert records(svc) == []
    assert not os.path.exists(first["attachment"]["conf"])


def ceph_conf(keyring, mtime):
    """A ceph conf holding ``keyring`` as os-brick's RBD connector writes
    it (tempfile.mkstemp("brickrbd_")), last written at ``mtime``."""
    import tempfile
    fd, path = tempfile.mkstemp(prefix="brickrbd_")
    with os.fdopen(fd, "w") as f:
        f.write("[global]\nmon_host = 192.0.2.2:6789\n" + keyring + "\n")
    os.utime(path, (mtime, mtime))
    return path


def old_enough(svc):
    """An mtime the sweeps judge: older than any connect in flight."""
    return time.time() - svc.cfg.timeout - service.CONF_SWEEP_MARGIN - 60


def fake_clock(svc):
    """Put a fake clock (a one-item list: now) in ``svc``'s scheduler."""
    now = [time_now()]
    svc._later.clock = lambda: now[0]
    return now


def new_keyring():
    return "[client.sweep]\n\tkey = AQB{}==".format(new_id())


@pytest.fixture
def ceph_confs():
    """``ceph_conf`` for a test: what the sweeps left is removed after
    it."""
    made = []

    def make(keyring, mtime):
        made.append(ceph_conf(keyring, mtime))
        return made[-1]

    yield make
    for path in made:
        if os.path.exists(path):
            os.unlink(path)


def time_passes(svc, now, until, *confs):
    """Time goes by until ``until`` on ``svc``'s fake clock (``now``):
    ``confs`` are old enough to judge then, and the sweeps due by then
    have run."""
    old = old_enough(svc)
    for path in confs:
        os.utime(path, (old, old))
    now[0] = until
    assert svc._later.settle(30)


def keyring_sweeps(svc, keyring):
    """When ``keyring``'s pending sweeps are due."""
    return [d for d, k in svc._later.pending() if k == ("keyring", keyring)]


def test_a_ceph_conf_too_young_at_start_is_looked_at_again_once_old(
        inproc_service, inproc_brick, ceph_confs):
    # The start's sweep cannot judge a conf younger than any connect in
    # flight could be: it is looked at again once old enough (one
    # scheduler thread), then deleted if still named by no record.
    # Before, it was skipped until the next start.
    svc = inproc_service
    keyring = new_keyring()
    vol_id = new_id()
    svc.attach_volume(vol_id, rbd_connection(svc.cfg, keyring=keyring))
    young = ceph_confs(keyring, time.time())
    again = service.Service(svc.cfg, brick=inproc_brick)
    try:
        again.start()
        assert os.path.exists(young)
        [due] = [d for d, k in again._later.pending()
                 if k[:2] == ("conf", young)]
        now = fake_clock(again)
        assert due - now[0] <= svc.cfg.timeout + service.CONF_SWEEP_MARGIN + 1
        time_passes(again, now, due, young)
        assert not os.path.exists(young)
        assert [k for _, k in again._later.pending()
                if k[:2] == ("conf", young)] == []
    finally:
        again.close()


def test_the_conf_a_cut_rbd_connect_writes_after_its_record_went_is_swept(
        inproc_service, inproc_brick, monkeypatch, ceph_confs):
    # A connect cut at its deadline may still write its ceph conf after
    # the rollback forgot its record, under a name nobody learns: its
    # keyring is swept [privsep] timeout + 61 s after the record went,
    # by the one scheduler thread that holds every pending sweep (a
    # second cut connect of the same keyring pushes it back, adding no
    # thread).  Before, that conf stayed until a start with a record
    # holding the keyring.
    svc = inproc_service
    now = fake_clock(svc)
    keyring = new_keyring()
    monkeypatch.setattr(inproc_brick, "connect", raising(
        errors.HelperTimeout(operation="connect", timeout=1.0)))
    vol_id = new_id()
    ci = rbd_connection(svc.cfg, keyring=keyring)
    with pytest.raises(errors.HelperTimeout):
        svc.attach_volume(vol_id, ci)
    assert records(svc) == []
    late = ceph_confs(keyring, time.time())
    wait = svc.cfg.timeout + service.CONF_SWEEP_MARGIN + 1
    assert keyring_sweeps(svc, keyring) == [now[0] + wait]
    thread = svc._later._thread
    assert thread.is_alive() and thread.name == "conf-sweeps"
    now[0] += 10
    with pytest.raises(errors.HelperTimeout):
        svc.attach_volume(new_id(), rbd_connection(svc.cfg, keyring=keyring))
    assert keyring_sweeps(svc, keyring) == [now[0] + wait]
    assert svc._later._thread is thread
    now[0] += wait - 1
    assert svc._later.settle(30)
    assert os.path.exists(late)         # not yet
    time_passes(svc, now, now[0] + 1, late)
    assert not os.path.exists(late)


def test_a_sweep_never_deletes_the_conf_of_an_attach_in_flight(
        inproc_service, inproc_brick, monkeypatch):
    # An RBD attach whose connect wrote its conf but whose record does
    # not name it yet: a sweep running then leaves it alone, whatever
    # its age says (here a clock stepped forward makes it look older
    # than any connect), and looks at it again later, when the record
    # names it.  Before, the sweep deleted it (the keyring a record
    # holds, named by none) and the attach recorded a conf gone.
    svc = inproc_service
    keyring = new_keyring()
    connected, go, written = threading.Event(), threading.Event(), []
    connect = inproc_brick.connect

    def held(connection_info):
        attachment = connect(connection_info)
        old = old_enough(svc)
        os.utime(attachment["conf"], (old, old))
        written.append(attachment["conf"])
        connected.set()
        go.wait(30)
        return attachment

    monkeypatch.setattr(inproc_brick, "connect", held)
    vol_id = new_id()
    ci = rbd_connection(svc.cfg, keyring=keyring)
    result = {}
    t = threading.Thread(
        target=lambda: result.update(svc.attach_volume(vol_id, ci)))
    t.start()
    try:
        assert connected.wait(30)
        svc._sweep_confs()
        [conf] = written
        assert os.path.exists(conf)
        [due] = [d for d, k in svc._later.pending() if k[:2] == ("conf", conf)]
    finally:
        go.set()
        t.join(30)
    assert result["attachment"]["conf"] == conf
    time_passes(svc, fake_clock(svc), due)
    assert os.path.exists(conf)             # named now
    svc.detach_volume(vol_id)
    assert not os.path.exists(conf)


@pytest.mark.parametrize("then, error", [
    ("detach", errors.HelperFailed(
        "privsep daemon 1 died during delete_rbd_conf")),
    ("attach again", errors.HelperTimeout(operation="delete_rbd_conf",
                                          timeout=1.0)),
])
def test_a_ceph_conf_the_daemon_could_not_delete_is_swept_later(
        inproc_service, inproc_brick, monkeypatch, then, error):
    # A detach, or an attach again over the record, finding the device
    # gone deletes the earlier conf through the daemon; when that fails
    # (the daemon cut or down) the conf, named by no record now, is
    # swept with its keyring later instead of waiting for a start with a
    # record holding that keyring (attach again: review-safety13a L1).
    svc = inproc_service
    now = fake_clock(svc)
    keyring = new_keyring()
    vol_id = new_id()
    ci = rbd_connection(svc.cfg, keyring=keyring)
    first = svc.attach_volume(vol_id, ci)
    conf = first["attachment"]["conf"]
    os.unlink(first["path"])                 # the device is gone
    delete = inproc_brick.delete_rbd_conf
    monkeypatch.setattr(inproc_brick, "delete_rbd_conf", raising(error))
    if then == "detach":
        svc.detach_volume(vol_id)
        assert records(svc) == []
        named = []
    else:
        named = [svc.attach_volume(vol_id, ci)["attachment"]["conf"]]
    assert os.path.exists(conf)
    [due] = keyring_sweeps(svc, keyring)
    monkeypatch.setattr(inproc_brick, "delete_rbd_conf", delete)
    time_passes(svc, now, due, conf, *named)
    assert not os.path.exists(conf)
    assert all(os.path.exists(path) for path in named)
    svc.detach_volume(vol_id)
    assert fakebrick.confs() == []


def test_close_waits_for_a_conf_sweep_which_then_calls_the_daemon_no_more(
        host_cfg, inproc_brick, monkeypatch, ceph_confs):
    # A conf sweep is a call of the service throughout: close() waits
    # for the one inside the daemon's delete, and the sweep stops before
    # its next conf.  Before, it counted only while reading the journal:
    # close() returned and stopped the brick while the sweep went on
    # calling the daemon (the real brick would start a new root daemon
    # after the agent stopped; review-safety13a M1).
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    keyring = new_keyring()
    confs = [ceph_confs(keyring, old_enough(svc)) for _ in range(2)]
    entered, release, calls = threading.Event(), threading.Event(), []
    delete = inproc_brick.delete_rbd_conf

    def held(path, holding=None):
        calls.append(svc._store is not None)
        entered.set()
        release.wait(30)
        return delete(path, holding)

    monkeypatch.setattr(inproc_brick, "delete_rbd_conf", held)
    sweep = threading.Thread(target=svc._scheduled_sweep,
                             args=(frozenset([keyring]), sorted(confs)))
    sweep.start()
    try:
        assert entered.wait(30)
        assert svc._calls == 1          # close() waits for it
        closer = threading.Thread(target=svc.close)
        closer.start()
        deadline = time.monotonic() + 30
        while not svc._closing:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        release.set()
        sweep.join(30)
    closer.join(30)
    assert svc._store is None
    assert calls == [True]              # none after close() began
    assert [os.path.exists(p) for p in sorted(confs)] == [False, True]


def test_looks_again_at_one_conf_for_other_keyrings_do_not_replace_another(
        inproc_service, ceph_confs):
    # A young conf deferred by one sweep (keyring K1) and by another for
    # another keyring (K3, a cut connect's): both looks stay pending, so
    # the conf holding K1 is deleted once old (review-safety13a L2).
    svc = inproc_service
    now = fake_clock(svc)
    k1, k3 = new_keyring(), new_keyring()
    young = ceph_confs(k1, time.time())
    svc._sweep_confs(keyrings=frozenset([k1]))
    now[0] += 5
    svc._sweep_confs(keyrings=frozenset([k3]))
    time_passes(svc, now,
                now[0] + svc.cfg.timeout + service.CONF_SWEEP_MARGIN + 1,
                young)
    assert not os.path.exists(young)


def test_a_cut_rbd_extend_is_in_flight_and_its_keyring_swept_later(
        inproc_service, inproc_brick, monkeypatch):
    # os-brick's RBD extend writes a ceph conf of its own and deletes it
    # when it returns: while it runs no sweep deletes it (its keyring is
    # in flight), and a cut one may leave it, so its keyring is swept
    # later (review-safety13a L3).
    svc = inproc_service
    keyring = new_keyring()
    vol_id = new_id()
    ci = rbd_connection(svc.cfg, keyring=keyring)
    svc.attach_volume(vol_id, ci)
    seen = []

    def cut(connection_info):
        seen.append(dict(svc._in_flight_keyrings))
        raise errors.HelperTimeout(operation="extend", timeout=1.0)

    monkeypatch.setattr(inproc_brick, "extend", cut)
    with pytest.raises(errors.HelperTimeout):
        svc.extend_volume(vol_id)
    assert seen == [{keyring: 1}]
    assert svc._in_flight_keyrings == {}
    assert len(keyring_sweeps(svc, keyring)) == 1
