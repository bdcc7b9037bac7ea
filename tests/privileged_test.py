"""The privileged boundary, through a real privsep daemon as root.

One daemon serves the whole module (starting one costs seconds); tests
that need a fresh one (environment, broken helper) make their own Brick.
Connectors this kernel cannot drive are faked inside the daemon by
tests/fakebrick.py; ``local`` is os-brick's real LocalConnector on a real
loop device.
"""

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import faults
from vdsm_managedvolume import log
from vdsm_managedvolume import mask
from vdsm_managedvolume import privileged
from vdsm_managedvolume import privsep
from vdsm_managedvolume.transports import rbd

from tests import fakebrick
from tests.host_fixtures import hung_iscsi_info, hung_iscsiadm

pytestmark = pytest.mark.root

SECRET = "s3cr3t-Chap-Pw"


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fakebrick")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fakebrick.ENV_DIR, str(d))
        mp.delenv(faults.ENV, raising=False)
        yield d


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, fake_dir):
    cfg = config.with_state_dir(config.Config(),
                                str(tmp_path_factory.mktemp("state")))
    cfg.connector_override = "tests.fakebrick"
    return cfg


@pytest.fixture(scope="module")
def brick(cfg):
    b = privileged.Brick(cfg)
    yield b
    b.stop()


@pytest.fixture
def fresh_cfg(tmp_path, fake_dir):
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    cfg.connector_override = "tests.fakebrick"
    return cfg


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(16 * 1024**2)
    dev = subprocess.check_output(
        ["losetup", "-f", "--show", str(backing)]).decode().strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def iscsi(key, dev_dir, **knobs):
    data = {
        "target_iqn": "iqn.2003-01.org.example:" + key,
        "target_portal": "192.0.2.10:3260",
        "target_lun": 1,
        "auth_method": "CHAP",
        "auth_username": "chap-user",
        "auth_password": SECRET,
        "fake_key": key,
        "fake_dev_dir": str(dev_dir),
    }
    data.update(knobs)
    return {"driver_volume_type": "iscsi", "data": data}


def no_tuples(obj):
    if isinstance(obj, tuple):
        return False
    if isinstance(obj, dict):
        return all(no_tuples(v) for v in obj.values())
    if isinstance(obj, list):
        return all(no_tuples(v) for v in obj)
    return True


def gone(pid):
    """Whether ``pid`` has exited (a zombie counts: our init may be slow
    to reap the daemon, which is not our child)."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in {} s".format(timeout))
        time.sleep(0.05)


def thread_switches(pid):
    """{thread id: voluntary context switches} of process ``pid``."""
    out = {}
    for tid in os.listdir("/proc/{}/task".format(pid)):
        try:
            with open("/proc/{}/task/{}/status".format(pid, tid)) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        out[tid] = int(line.split()[1])
        except FileNotFoundError:
            pass
    return out


# Connector properties

def test_connector_properties_enforce_multipath_as_plain_lists(brick):
    props = brick.connector_properties()
    assert props["multipath"] is True
    assert props["enforce_multipath"] is True
    assert props["os_type"] == "linux"
    assert no_tuples(props)
    assert json.loads(json.dumps(props)) == props


def test_daemon_runs_as_root_with_only_the_declared_capabilities(brick):
    brick.connector_properties()
    pid = brick.daemon_pid()
    with open("/proc/{}/status".format(pid)) as f:
        status = dict(line.split(":", 1) for line in f)
    assert status["Uid"].split()[0] == "0"
    eff = int(status["CapEff"], 16)
    # CAP_DAC_OVERRIDE=1, CAP_DAC_READ_SEARCH=2, CAP_SYS_ADMIN=21
    assert eff == (1 << 1) | (1 << 2) | (1 << 21)


def test_daemon_files_and_children_are_nobody_elses_to_write(
        brick, cfg, fake_dir, tmp_path):
    # oslo.privsep's Daemon.run() sets umask 0: os-brick's external lock
    # files were 0666 (any user could lockf one and hang every attach),
    # and every command the daemon ran inherited it.
    info = iscsi("umask", tmp_path, fake_brick_lock=True)
    att = brick.connect(info)
    try:
        with open("/proc/{}/status".format(brick.daemon_pid())) as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Umask"].strip() == "0022"
        lock = os.path.join(cfg.brick_lock_dir, "os-brick-connect_volume")
        assert os.stat(lock).st_mode & 0o022 == 0
        device = os.path.join(str(fake_dir), "devices", "umask")
        assert os.stat(device).st_mode & 0o022 == 0
        assert os.stat(cfg.brick_lock_dir).st_mode & 0o777 == 0o700
    finally:
        brick.disconnect(info, att)


# The real local connector on a real loop device

def test_local_connector_connects_a_real_loop_device(brick, loop_device):
    info = {"driver_volume_type": "local",
            "data": {"device_path": loop_device}}
    attachment = brick.connect(info)
    assert attachment == {"type": "local", "path": loop_device}
    assert brick.disconnect(info, attachment) is None


def test_calls_share_one_long_lived_daemon(brick, loop_device):
    info = {"driver_volume_type": "local",
            "data": {"device_path": loop_device}}
    brick.connector_properties()
    pid = brick.daemon_pid()
    for _ in range(3):
        brick.disconnect(info, brick.connect(info))
    assert brick.daemon_pid() == pid


# Fake connectors: the shapes os-brick returns

def test_fake_iscsi_returns_multipath_attachment(brick, fake_dir, tmp_path):
    info = iscsi("shape-iscsi", tmp_path)
    att = brick.connect(info)
    assert att["type"] == "block"
    assert att["multipath_id"] == att["scsi_wwn"]
    assert att["path"].startswith("/dev/dm-")
    assert os.path.islink(tmp_path / att["multipath_id"])
    assert "shape-iscsi" in fakebrick.connected(str(fake_dir))

    brick.disconnect(info, att)
    assert not os.path.lexists(tmp_path / att["multipath_id"])
    assert "shape-iscsi" not in fakebrick.connected(str(fake_dir))


def test_fake_fibre_channel_returns_multipath_attachment(brick, tmp_path):
    info = {"driver_volume_type": "fibre_channel",
            "data": {"target_wwn": ["500a098280feeba5"], "target_lun": 3,
                     "fake_dev_dir": str(tmp_path)}}
    att = brick.connect(info)
    assert set(att) == {"type", "scsi_wwn", "multipath_id", "path"}
    assert os.path.islink(tmp_path / att["multipath_id"])
    brick.disconnect(info, att)


def test_fake_rbd_returns_dev_rbd_path(brick, tmp_path):
    info = {"driver_volume_type": "rbd",
            "data": {"name": "volumes/volume-1", "keyring": SECRET,
                     "fake_dev_dir": str(tmp_path)}}
    att = brick.connect(info)
    # With a keyring, os-brick writes a ceph conf holding it; only a
    # disconnect given that attachment deletes it.
    conf = att.pop("conf")
    assert att == {"type": "block", "path": "/dev/rbd/volumes/volume-1"}
    assert os.path.islink(tmp_path / "volumes" / "volume-1")
    assert os.path.exists(conf)
    brick.disconnect(info, dict(att, conf=conf))
    assert not os.path.lexists(tmp_path / "volumes" / "volume-1")
    assert not os.path.exists(conf)


def test_daemon_refuses_an_rbd_disconnect_naming_a_conf_it_did_not_write(
        brick, tmp_path):
    # os-brick gives the attachment's conf to rbd as root (--conf) and
    # deletes it after the unmap: a caller of the daemon must not get
    # any file read or deleted as root that way.  Refused before
    # anything is done; the volume stays connected, the files stay.
    info = {"driver_volume_type": "rbd",
            "data": {"name": "volumes/volume-2", "keyring": SECRET,
                     "fake_dev_dir": str(tmp_path)}}
    att = brick.connect(info)
    elsewhere = tmp_path / "brickrbd_abc"
    elsewhere.write_text("kept")
    fd, foreign = tempfile.mkstemp(prefix="brickrbd_")
    os.close(fd)
    os.chown(foreign, 65534, 65534)         # made by another user
    link = os.path.join(tempfile.gettempdir(),
                        "brickrbd_link%d" % os.getpid())
    os.symlink(str(elsewhere), link)
    hard = os.path.join(tempfile.gettempdir(),
                        "brickrbd_hard%d" % os.getpid())
    fd, target = tempfile.mkstemp(prefix="notbrick_")
    os.close(fd)
    os.link(target, hard)                   # a root file linked in
    try:
        for conf in (foreign, link, hard, "/etc/hostname", "brickrbd_x"):
            with pytest.raises(errors.InvalidParams, match="attachment.conf"):
                brick.disconnect(info, dict(att, conf=conf))
            assert os.path.lexists(conf) or not os.path.isabs(conf)
        assert elsewhere.read_text() == "kept"
        assert os.path.islink(tmp_path / "volumes" / "volume-2")
        brick.disconnect(info, att)
        assert not os.path.lexists(tmp_path / "volumes" / "volume-2")
        assert not os.path.exists(att["conf"])
        # One os-brick wrote in another temp dir (a daemon started with
        # another TMPDIR, or that fell back to /var/tmp), or one gone:
        # accepted, so that its record can always be detached.
        fd, moved = tempfile.mkstemp(prefix="brickrbd_", dir=str(tmp_path))
        os.close(fd)
        assert rbd.conf_problem(moved) is None
        assert rbd.conf_problem(str(tmp_path / "brickrbd_gone")) is None
    finally:
        for path in (foreign, link, hard, target):
            os.unlink(path)


def test_daemon_deletes_only_a_ceph_conf_os_brick_writes(brick, tmp_path):
    # A regular file named as os-brick names them, right in the daemon's
    # temp dir (where os-brick writes them): nothing else.
    fd, conf = tempfile.mkstemp(prefix="brickrbd_")
    os.close(fd)
    assert brick.delete_rbd_conf(conf) is True
    assert not os.path.exists(conf)
    assert brick.delete_rbd_conf(conf) is False
    elsewhere = tmp_path / "brickrbd_abc"
    elsewhere.write_text("kept")
    other = tempfile.NamedTemporaryFile(prefix="notbrick_")
    folder = tempfile.mkdtemp(prefix="brickrbd_")
    fd, foreign = tempfile.mkstemp(prefix="brickrbd_")
    os.close(fd)
    os.chown(foreign, 65534, 65534)         # made by another user
    # A link named as os-brick names them, to a root file: neither is
    # deleted (review-fix9 hostfix-L2).
    link = os.path.join(tempfile.gettempdir(),
                        "brickrbd_link%d" % os.getpid())
    fd, target = tempfile.mkstemp(prefix="notbrick_")
    os.close(fd)
    os.symlink(target, link)
    try:
        for path in (str(elsewhere), other.name, folder, foreign, link,
                     os.path.join(tempfile.gettempdir(), "brickrbd_/x"),
                     os.path.join(tempfile.gettempdir(), "brickrbd_..")):
            with pytest.raises(errors.InvalidParams):
                brick.delete_rbd_conf(path)
        assert elsewhere.read_text() == "kept"
        assert os.path.exists(other.name) and os.path.isdir(folder)
        assert os.path.exists(foreign)
        assert os.path.islink(link) and os.path.exists(target)
    finally:
        other.close()
        os.rmdir(folder)
        os.unlink(foreign)
        os.unlink(link)
        os.unlink(target)


def test_fake_iscsi_without_multipath_has_no_multipath_id(brick, tmp_path):
    info = iscsi("no-mpath", tmp_path, fake_no_multipath=True)
    att = brick.connect(info)
    assert "multipath_id" not in att
    assert att["path"].startswith("/dev/sd")
    brick.disconnect(info, att)


def test_disconnect_of_unknown_device_succeeds(brick, tmp_path):
    brick.disconnect(iscsi("never-connected", tmp_path), None)


def test_fake_disconnect_needs_the_device_info_its_connect_returned(
        brick, fake_dir, tmp_path):
    # As os-brick's connectors (fakebrick._check_device_info): a caller
    # that lost or mixed up its attachment record fails loudly and the
    # connection stays.
    info = iscsi("device-info", tmp_path)
    att = brick.connect(info)
    for wrong in (None, {}, dict(att, path="/dev/dm-0"),
                  {k: v for k, v in att.items() if k != "multipath_id"}):
        with pytest.raises(errors.ConnectorFailed) as e:
            brick.disconnect(info, wrong)
        assert "connect returned" in str(e.value)
        assert "device-info" in fakebrick.connected(str(fake_dir))
    assert fakebrick.calls(str(fake_dir)).count(
        "disconnect-wrong device-info") == 4
    brick.disconnect(info, att)
    assert "device-info" not in fakebrick.connected(str(fake_dir))


def test_fake_rbd_disconnect_without_device_info_leaves_its_conf(
        brick, fake_dir, tmp_path):
    # os-brick deletes the ceph conf holding the keyring only when
    # device_info names it.
    info = {"driver_volume_type": "rbd",
            "data": {"name": "volumes/blind", "keyring": SECRET,
                     "fake_dev_dir": str(tmp_path),
                     "fake_blind_disconnect": True}}
    att = brick.connect(info)
    conf = os.path.basename(att["conf"])
    assert conf in fakebrick.confs(str(fake_dir))
    brick.disconnect(info, None)
    assert "rbd-volumes_blind" not in fakebrick.connected(str(fake_dir))
    assert "disconnect-blind rbd-volumes_blind" in fakebrick.calls(
        str(fake_dir))
    assert conf in fakebrick.confs(str(fake_dir))
    os.unlink(att["conf"])


@pytest.mark.parametrize("given", ["none", "earlier"])
def test_fake_disconnect_after_reboot_takes_the_earlier_boot_or_none(
        brick, fake_dir, tmp_path, given):
    info = iscsi("rebooted-" + given, tmp_path)
    att = brick.connect(info)
    fakebrick.reboot(str(fake_dir))
    with pytest.raises(errors.ConnectorFailed):
        brick.disconnect(info, dict(att, path="/dev/dm-0"))
    brick.disconnect(info, None if given == "none" else att)
    assert info["data"]["fake_key"] not in fakebrick.connected(
        str(fake_dir))


def test_lists_in_connection_info_reach_the_connector_as_lists(
        brick, tmp_path):
    # msgpack turns lists into tuples on the way in too.
    info = iscsi("lists", tmp_path,
                 target_iqns=["iqn.a", "iqn.b"], fake_wwn="36001405abc")
    att = brick.connect(info)
    assert att["multipath_id"] == "36001405abc"
    brick.disconnect(info, att)


# Errors

def test_connector_error_is_helper_failed_with_secrets_masked(
        brick, tmp_path, caplog):
    info = iscsi("fails", tmp_path, fake_fail=True)
    with pytest.raises(errors.HelperFailed) as e:
        brick.connect(info)
    assert e.value.code == 926
    message = str(e.value)
    assert "Login failed" in message
    assert "FakeConnectorError" in message
    assert SECRET not in message
    assert mask.MASK in message
    assert SECRET not in caplog.text


def test_secret_quoted_without_its_key_is_masked(brick, tmp_path):
    info = iscsi("bare-secret", tmp_path,
                 fake_fail="target refused CHAP secret " + SECRET)
    with pytest.raises(errors.HelperFailed) as e:
        brick.connect(info)
    assert SECRET not in str(e.value)
    assert "target refused CHAP secret" in str(e.value)


def test_a_secret_starting_with_another_is_masked_whole(brick, tmp_path):
    longer = SECRET + "XYZtail"
    info = iscsi("prefix-secret", tmp_path, discovery_auth_password=longer,
                 fake_fail="discovery refused " + longer)
    with pytest.raises(errors.HelperFailed) as e:
        brick.connect(info)
    assert "XYZtail" not in str(e.value)
    assert "discovery refused " + mask.MASK in str(e.value)


def test_rbd_secret_type_and_uuid_are_not_masked(brick, tmp_path):
    # secret_type ("ceph") and secret_uuid name a libvirt secret; "ceph"
    # masked garbled every RBD error ("******** cluster").
    uuid = "b0e8d3a6-2c4f-4d2e-9d3b-6f1a2c3d4e5f"
    info = {"driver_volume_type": "rbd",
            "data": {"name": "volumes/volume-2", "keyring": SECRET,
                     "secret_type": "ceph", "secret_uuid": uuid,
                     "auth_username": "cinder",
                     "fake_fail": "rbd map volumes/volume-2 on ceph cluster "
                                  "failed: secret_uuid={} key {}".format(
                                      uuid, SECRET)}}
    with pytest.raises(errors.HelperFailed) as e:
        brick.connect(info)
    message = str(e.value)
    assert "on ceph cluster failed: secret_uuid=" + uuid in message
    assert SECRET not in message


def test_daemon_log_lines_carry_the_callers_flow_id(brick, tmp_path,
                                                    caplog):
    caplog.set_level("INFO", logger=privsep.DAEMON_LOGGER)
    with log.flow("flow-priv-1"):
        with pytest.raises(errors.HelperFailed):
            brick.connect(iscsi("flow", tmp_path, fake_fail=True))
    records = [r for r in caplog.records
               if getattr(r, "flow_id", None) == "flow-priv-1"
               and r.name == "vdsm_managedvolume.brick"]
    assert records
    assert all(SECRET not in r.getMessage() for r in records)


def test_missing_driver_volume_type_is_helper_failed(brick):
    with pytest.raises(errors.HelperFailed):
        brick.connect({"data": {}})


@pytest.mark.slow
def test_a_late_call_polling_in_python_is_cancelled_and_the_daemon_goes_on(
        brick, cfg, fake_dir, tmp_path, monkeypatch):
    # os-brick polls and retries with sleeps: past the deadline the next
    # one raises in the daemon, the call ends with 931 and nothing else
    # is touched.  Before, the daemon was killed at every deadline.
    brick.connector_properties()
    old_pid = brick.daemon_pid()
    monkeypatch.setattr(cfg, "timeout", 1.0)
    info = iscsi("slow", tmp_path, fake_sleep=60)
    with pytest.raises(errors.HelperTimeout) as e:
        brick.connect(info)
    assert e.value.code == 931
    assert str(e.value) == ("Privileged connect did not finish within 1.0 "
                            "seconds")
    # It ended in the daemon before the answer came: it never completes.
    assert "connect slow" not in fakebrick.calls(str(fake_dir))
    assert "slow" not in fakebrick.connected(str(fake_dir))
    assert brick.daemon_pid() == old_pid

    monkeypatch.setattr(cfg, "timeout", 120.0)
    att = brick.connect(iscsi("after-timeout", tmp_path))
    assert brick.daemon_pid() == old_pid
    brick.disconnect(iscsi("after-timeout", tmp_path), att)


def command_pids(key):
    """Pids of fakebrick's ``fake_command_wait`` command for ``key``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/{}/cmdline".format(name), "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[-3:-1] == [b"fakebrick-command", key.encode()]:
            pids.append(int(name))
    return pids


@pytest.mark.slow
def test_a_late_call_inside_a_command_starts_no_other_and_the_daemon_goes_on(
        brick, cfg, fake_dir, tmp_path, monkeypatch, caplog):
    # Past the deadline the command running is left alone; once it ends
    # on its own (within privsep.END_GRACE), the call starts no further
    # command and ends with 931 while the daemon goes on.
    brick.connector_properties()
    old_pid = brick.daemon_pid()
    monkeypatch.setattr(cfg, "timeout", 1.0)
    release = str(tmp_path / "release")
    result = {}

    def connect():
        try:
            brick.connect(iscsi("in-command", tmp_path,
                                fake_command_wait=release))
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=connect)
    t.start()
    try:
        wait_for(lambda: any("connect exceeded its deadline: cancelled"
                             in r.getMessage() for r in caplog.records))
        [pid] = command_pids("in-command")
    finally:
        with open(release, "w"):
            pass
    t.join(60)
    assert isinstance(result.get("error"), errors.HelperTimeout)
    calls = fakebrick.calls(str(fake_dir))
    assert "connect-start in-command" in calls
    assert "connect-after-command in-command" not in calls
    assert "in-command" not in fakebrick.connected(str(fake_dir))
    assert brick.daemon_pid() == old_pid


@pytest.mark.slow
def test_a_late_call_stuck_in_one_command_ends_the_daemon_not_the_command(
        brick, cfg, fake_dir, tmp_path, monkeypatch, caplog):
    # A command that does not return: cancelling cannot end the call, so
    # privsep.END_GRACE after its deadline the daemon is killed (what
    # every deadline did before), and the command is left running.
    brick.connector_properties()
    old_pid = brick.daemon_pid()
    monkeypatch.setattr(cfg, "timeout", 1.0)
    release = str(tmp_path / "release")
    try:
        with pytest.raises(errors.HelperTimeout) as e:
            brick.connect(iscsi("stuck", tmp_path,
                                fake_command_wait=release))
        assert e.value.code == 931
        wait_for(lambda: gone(old_pid))
        # Cancelled first; the kill came only after the grace.
        messages = [r.getMessage() for r in caplog.records]
        cancelled = [i for i, m in enumerate(messages)
                     if "connect exceeded its deadline: cancelled" in m]
        killed = [i for i, m in enumerate(messages)
                  if "connect did not return" in m
                  and "after its deadline" in m and "killing" in m]
        assert cancelled and killed and cancelled[0] < killed[0]
        # Not killed by us: it ends when its own condition is met.
        [pid] = command_pids("stuck")
        assert not gone(pid)
    finally:
        with open(release, "w"):
            pass
    wait_for(lambda: gone(pid))
    assert "connect-after-command stuck" not in fakebrick.calls(
        str(fake_dir))
    monkeypatch.setattr(cfg, "timeout", 120.0)
    assert brick.connector_properties()["multipath"] is True
    assert brick.daemon_pid() not in (None, old_pid)


@pytest.mark.slow
def test_a_call_waiting_for_os_bricks_lock_fails_at_its_deadline_alone(
        brick, cfg, fake_dir, tmp_path, monkeypatch):
    # A slow, healthy holder of os-brick's per-host "connect_volume"
    # lock (a disconnect retrying multipath -f holds it for a minute)
    # and a connect queued behind it: at the waiter's deadline its wait
    # for the lock raises, it fails with 931 without having started,
    # and the holder goes on in the same daemon.  Before, the wait
    # could not be cancelled: END_GRACE later the daemon was killed,
    # and the holder with it.
    brick.connector_properties()
    pid = brick.daemon_pid()
    release = str(tmp_path / "release")
    monkeypatch.setattr(cfg, "timeout", 120.0)
    results = {}

    def hold():
        try:
            results["holder"] = brick.connect(iscsi(
                "lock-holder", tmp_path, fake_brick_lock_wait=release))
        except Exception as e:
            results["holder"] = e

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        wait_for(lambda: "connect-locked lock-holder" in fakebrick.calls(
            str(fake_dir)))
        monkeypatch.setattr(cfg, "timeout", 1.0)
        with pytest.raises(errors.HelperTimeout) as e:
            brick.connect(iscsi("lock-waiter", tmp_path,
                                fake_brick_lock=True))
        assert e.value.code == 931
        assert brick.daemon_pid() == pid
    finally:
        with open(release, "w"):
            pass
    holder.join(60)
    assert results["holder"]["multipath_id"]
    calls = fakebrick.calls(str(fake_dir))
    assert "connect-start lock-waiter" in calls
    assert "connect lock-waiter" not in calls
    assert brick.daemon_pid() == pid
    monkeypatch.setattr(cfg, "timeout", 120.0)
    brick.disconnect(iscsi("lock-holder", tmp_path), results["holder"])


@pytest.mark.slow
def test_a_hung_iscsi_multipath_connect_fails_alone_beside_another_call(
        fresh_cfg, fake_dir, tmp_path, monkeypatch, caplog):
    # The hung LUN of a mass start, through os-brick's own multipath
    # iSCSI connect: its portal threads hang in "iscsiadm --login" while
    # its main thread polls (time.sleep(1)).  At the deadline that sleep
    # raises: the connect fails with 931, the call in flight beside it
    # succeeds, the daemon stays.  The logins are left to finish; when
    # they do, their threads start no further command (os-brick would
    # set node.startup next).  Before, the daemon was killed at the
    # deadline, and the call beside it with it.
    #
    # The 931 says that threads it started still run (StillRunning): a
    # login may still complete.  A disconnect of that connection (the
    # service's, later) waits for them, so that it sees the session
    # they log in; past its own deadline it fails with 931 in turn.
    # Before, the 931 said nothing of them and the disconnect ran at
    # once, found no session, and "succeeded" while the logins went on.
    iscsiadm_log, logins_release = hung_iscsiadm(tmp_path, monkeypatch)
    b = privileged.Brick(fresh_cfg)
    results = {}

    def run(name, func, *args):
        try:
            results[name] = func(*args)
        except Exception as e:
            results[name] = e

    try:
        b.connector_properties()
        pid = b.daemon_pid()
        beside_release = str(tmp_path / "beside-release")
        fresh_cfg.timeout = 60.0
        beside = threading.Thread(target=run, args=("beside", b.connect, iscsi(
            "beside", tmp_path, fake_wait=beside_release)))
        beside.start()
        wait_for(lambda: "connect-start beside" in fakebrick.calls(
            str(fake_dir)))

        fresh_cfg.timeout = 2.0
        hung_info = hung_iscsi_info()
        hung = threading.Thread(target=run, args=(
            "hung", b.connect, hung_info))
        hung.start()
        hung.join(60)
        assert type(results["hung"]) is errors.StillRunning
        assert results["hung"].code == 931
        assert str(results["hung"]) == (
            "Privileged connect did not finish within 2.0 seconds, and "
            "threads it started are still inside a command (an iSCSI "
            "login may still complete)")
        assert "beside" not in results
        # A disconnect while the logins still hang waits for them, and
        # is not run, the daemon going on; it says what it waited for
        # and for how long that has run (review-privsepfix9 L-3): here
        # longer than its 2 s could wait, so at once.
        with pytest.raises(errors.EarlierConnectRunning) as e:
            b.disconnect(hung_info, None)
        assert e.value.code == 931
        message = str(e.value)
        assert message.startswith("Privileged disconnect not run: an "
                                  "earlier connect of this connection "
                                  "still runs (")
        assert "2 thread(s) of an earlier connect of this daemon, inside " \
            "a command for " in message
        # Its logins are this daemon's children: its threads', counted
        # once (not as processes left by an earlier daemon).
        assert "iscsiadm --login pid" not in message
        assert "longer than this disconnect could wait" in message
        assert b.daemon_pid() == pid

        with open(beside_release, "w"):
            pass
        beside.join(60)
        assert results["beside"]["path"].startswith("/dev/dm-")
        assert b.daemon_pid() == pid

        lines = iscsiadm_log.read_text().splitlines()
        assert sum("--login" in line for line in lines) == 2
        assert not any(line.startswith("login-end") for line in lines)
        # Another disconnect waits for the logins, and runs once they
        # ended.
        fresh_cfg.timeout = 60.0
        disconnect = threading.Thread(target=run, args=(
            "disconnect", b.disconnect, hung_info, None))
        disconnect.start()

        def waiting():
            b.daemon_pid()      # reads the daemon's records
            return any("Waiting for what an earlier connect of this "
                       "connection still runs" in r.getMessage()
                       for r in caplog.records)
        wait_for(waiting)
        logins_release.touch()
        disconnect.join(60)
        assert results["disconnect"] is None

        def stopped():
            b.daemon_pid()
            return sum("of the cancelled connect stopped at its next sleep "
                       "or command" in r.getMessage()
                       for r in caplog.records) == 2
        wait_for(stopped)
        # Its "iscsiadm -m session" (looking for what to log out) came
        # after both logins had ended.
        lines = iscsiadm_log.read_text().splitlines()
        ended = [i for i, line in enumerate(lines)
                 if line.startswith("login-end")]
        assert len(ended) == 2
        assert any("-m session" in line for line in lines[max(ended):])
        assert not any("node.startup" in line for line in lines)
        assert b.daemon_pid() == pid
        b.disconnect(iscsi("beside", tmp_path), results["beside"])
    finally:
        logins_release.touch()
        b.stop()


@pytest.mark.slow
def test_calls_cut_by_another_calls_deadline(
        brick, cfg, fake_dir, tmp_path, monkeypatch, caplog):
    # One LUN hangs in a command past the timeout while other volumes'
    # calls run: the daemon is killed privsep.END_GRACE after its
    # deadline (brick._die).  A disconnect cut there runs again on a new
    # daemon and succeeds; a connect cut there fails, saying why, and is
    # not run again (RERUN_AFTER_KILL).  Ordered by events, not by time:
    # the others are inside the daemon, each waiting for a file, before
    # the hung call starts, and the files appear once the daemon is gone.
    brick.connector_properties()
    old_pid = brick.daemon_pid()
    monkeypatch.setattr(cfg, "timeout", 60.0)
    others_release = str(tmp_path / "others-release")
    bystander = iscsi("cut-disconnect", tmp_path,
                      fake_wait_disconnect=others_release)
    att = brick.connect(bystander)
    results = {}

    def run(name, func, *args):
        try:
            results[name] = func(*args)
        except Exception as e:
            results[name] = e

    others = [
        threading.Thread(target=run, args=(
            "disconnect", brick.disconnect, bystander, att)),
        threading.Thread(target=run, args=(
            "connect", brick.connect,
            iscsi("cut-connect", tmp_path, fake_wait=others_release)))]
    for t in others:
        t.start()
    release = str(tmp_path / "release")
    try:
        wait_for(lambda: {"disconnect-start cut-disconnect",
                          "connect-start cut-connect"} <= set(
                              fakebrick.calls(str(fake_dir))))
        monkeypatch.setattr(cfg, "timeout", 1.0)
        hung = threading.Thread(target=run, args=(
            "hung", brick.connect, iscsi("hung", tmp_path,
                                         fake_command_wait=release)))
        hung.start()
        hung.join(60)
        wait_for(lambda: gone(old_pid))
    finally:
        with open(others_release, "w"):
            pass
        for t in others:
            t.join(60)
        with open(release, "w"):
            pass
    # Each ended by itself, none left waiting (no time is asserted).
    assert not any(t.is_alive() for t in [hung] + others)

    assert isinstance(results["hung"], errors.HelperTimeout)
    calls = fakebrick.calls(str(fake_dir))
    assert results["disconnect"] is None
    assert calls.count("disconnect-start cut-disconnect") == 2
    assert "cut-disconnect" not in fakebrick.connected(str(fake_dir))
    error = results["connect"]
    assert type(error) is errors.HelperFailed
    assert ("privsep daemon {} was killed at the deadline of "
            "connect_volume while connect ran: connect was cut and not "
            "run again".format(old_pid)) in str(error)
    assert calls.count("connect-start cut-connect") == 1
    assert "connect cut-connect" not in calls
    assert any("disconnect was cut when privsep daemon {} was killed"
               .format(old_pid) in r.getMessage() for r in caplog.records)
    assert brick.daemon_pid() not in (None, old_pid)


class UnkillableDaemon:
    """A daemon that never answers and that we may not kill: one whose own
    watchdog failed, under sudo."""

    pid = 4242

    def usable(self):
        return True

    def call(self, name, args, wait, deadline, flow=None):
        raise privileged._Timeout("no reply within {:.1f} s".format(wait))

    def deadline_passed(self, now):
        return None

    def kill(self):
        return False        # as _Daemon.kill when not allowed

    def close(self):
        pass


class EndedDaemon:
    """A daemon that had ended before the send found it (_Unsent)."""

    def __init__(self, pid):
        self.pid = pid

    def usable(self):
        return True

    def call(self, name, args, wait, deadline, flow=None):
        raise privileged._Unsent("privsep daemon gone (EPIPE)")

    def deadline_passed(self, now):
        return None

    def kill(self):
        return True

    def close(self):
        pass


def test_a_call_whose_new_daemon_had_ended_too_is_unsent(
        fresh_cfg, monkeypatch):
    # The send found its daemon ended, and so did the send to the daemon
    # started in its place: nothing of the call reached either (review-
    # safety15 L1).  Before, "died during connect": maybe connected.
    daemons = iter([EndedDaemon(4243), EndedDaemon(4244)])
    b = privileged.Brick(fresh_cfg)
    monkeypatch.setattr(b, "_running_daemon", lambda: next(daemons))
    with pytest.raises(errors.HelperFailed) as e:
        b.connect(iscsi("ended-twice", "/nonexistent"))
    assert type(e.value) is errors.HelperFailed
    assert e.value.unsent
    assert "privsep daemon 4244 ended before connect was sent" in str(
        e.value)


def test_a_late_call_whose_daemon_cannot_be_killed_may_still_run(fresh_cfg):
    # KILL_GRACE after its deadline, no answer, and the kill is refused
    # (not root): that daemon may still run the call beside the new one
    # the next call starts.  Not a plain 931 ("nothing done" to the
    # service, which would disconnect on the new daemon at once) but
    # StillRunning: its record is kept.
    fresh_cfg.timeout = 0.0
    b = privileged.Brick(fresh_cfg)
    b._daemon = UnkillableDaemon()
    with pytest.raises(errors.StillRunning) as e:
        b.connect(iscsi("unkillable", "/nonexistent"))
    assert e.value.code == 931
    assert str(e.value) == (
        "Privileged connect did not finish within 0.0 seconds, and "
        "privsep daemon 4242, which could not be ended, may still be "
        "running it")
    assert b._daemon is None


@pytest.mark.slow
def test_properties_timeout_is_helper_timeout(brick, cfg, monkeypatch):
    # A call whose deadline passed before the daemon took it up is not
    # started at all, and the daemon goes on.
    brick.connector_properties()
    pid = brick.daemon_pid()
    monkeypatch.setattr(cfg, "properties_timeout", 0.0)
    with pytest.raises(errors.HelperTimeout) as e:
        brick.connector_properties()
    assert e.value.operation == "connector_properties"
    monkeypatch.undo()
    assert brick.connector_properties()["multipath"] is True
    assert brick.daemon_pid() == pid


@pytest.mark.slow
def test_daemon_killed_mid_call_is_helper_failed_and_next_call_works(
        brick, fake_dir, tmp_path):
    brick.connector_properties()
    pid = brick.daemon_pid()
    info = iscsi("killed", tmp_path, fake_sleep=30)
    result = {}

    def connect():
        try:
            brick.connect(info)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=connect)
    t.start()
    wait_for(lambda: "connect-start killed" in
             fakebrick.calls(str(fake_dir)))
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert isinstance(result.get("error"), errors.HelperFailed)
    assert "died" in str(result["error"])
    # It reached the daemon: it may have connected.
    assert not result["error"].unsent

    att = brick.connect(iscsi("after-kill", tmp_path))
    assert brick.daemon_pid() not in (None, pid)
    brick.disconnect(iscsi("after-kill", tmp_path), att)


@pytest.mark.slow
def test_daemon_killed_with_calls_in_flight_fails_each_with_helper_failed(
        brick, fake_dir, tmp_path):
    # Every waiting call fails at once with the same clear error (they
    # all discard the dead daemon: no raw OSError from that race).
    brick.connector_properties()
    pid = brick.daemon_pid()
    keys = ["inflight-{}".format(i) for i in range(4)]
    results = {}

    def connect(key):
        try:
            brick.connect(iscsi(key, tmp_path, fake_sleep=60))
        except Exception as e:
            results[key] = e

    threads = [threading.Thread(target=connect, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    wait_for(lambda: all("connect-start " + k in
                         fakebrick.calls(str(fake_dir)) for k in keys))
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == keys
    for e in results.values():
        assert type(e) is errors.HelperFailed, repr(e)
        assert "privsep daemon {} died during connect".format(pid) in str(e)
    assert brick.connector_properties()["multipath"] is True
    assert brick.daemon_pid() not in (None, pid)


def test_reset_channel_fails_waiting_calls_at_once_not_at_their_deadline():
    # A daemon killed with a request unread in its socket resets the
    # connection (ECONNRESET, not EOF): oslo's reader thread died of it
    # and every call waited for its whole deadline, then reported 931.
    # The calling thread reads its reply itself: it must see the reset.
    import socket
    ours, daemons = socket.socketpair()
    channel = privileged._Channel(ours)
    result = {}

    def call():
        try:
            channel.call("x", (), 600)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    select.select([daemons], [], [], 30)     # our request was sent
    daemons.close()      # our request is still unread there: a reset
    t.join(30)
    assert not t.is_alive()
    assert isinstance(result["error"], privileged._Died)
    assert "ConnectionResetError" in str(result["error"])
    assert not channel.running
    ours.close()


# The channel's callers read their own replies (no reader thread): a fake
# daemon on a socketpair speaks oslo.privsep's wire (msgpack objects,
# requests (msgid, (CALL, name, args, kwargs)), replies (msgid, (RET,
# value)), log records (None, (LOG, record))).

class FakeDaemon:
    def __init__(self, sock):
        import msgpack
        self.sock = sock
        self.unpacker = msgpack.Unpacker(use_list=False, raw=False)

    def requests(self, n):
        got = []
        while len(got) < n:
            got.extend(self.unpacker)
            if len(got) < n:
                self.unpacker.feed(self.sock.recv(65536))
        return got

    def send(self, *objs):
        import msgpack
        self.sock.sendall(b"".join(
            msgpack.packb(o, use_bin_type=True) for o in objs))

    def reply(self, msgid, value):
        self.send((msgid, (4, value)))     # comm.Message.RET

    def log(self, message):
        self.send((None, (6, {"name": privsep.DAEMON_LOGGER,   # LOG
                              "levelno": 20, "levelname": "INFO",
                              "msg": message, "args": (),
                              "flow_id": "flow-d"})))


def calls_in_threads(channel, waits):
    """Start a call per wait (args: its index); return the threads and
    {index: result or exception}."""
    results = {}

    def call(i, wait):
        try:
            results[i] = channel.call("f", (i,), wait)
        except Exception as e:
            results[i] = e
    threads = [threading.Thread(target=call, args=(i, w))
               for i, w in enumerate(waits)]
    for t in threads:
        t.start()
    return threads, results


def test_concurrent_calls_each_get_their_own_reply_in_any_order():
    import socket
    ours, theirs = socket.socketpair()
    channel = privileged._Channel(ours)
    daemon = FakeDaemon(theirs)
    threads, results = calls_in_threads(channel, [30] * 8)
    requests = daemon.requests(8)
    daemon.log("between replies")
    for msgid, (_, name, args, kwargs) in reversed(requests):
        daemon.reply(msgid, args[0] * 10)
    for t in threads:
        t.join(30)
    assert results == {i: i * 10 for i in range(8)}
    assert channel.running
    ours.close()
    theirs.close()


def test_a_call_past_its_deadline_hands_reading_to_the_calls_waiting():
    # The first call reads (nobody else is); it gives up at its deadline
    # and a call still waiting must take over, or it would never see
    # its reply.
    import socket
    ours, theirs = socket.socketpair()
    channel = privileged._Channel(ours)
    daemon = FakeDaemon(theirs)
    [first], results = calls_in_threads(channel, [0.3])
    [(msgid0, _)] = daemon.requests(1)
    wait_for(lambda: channel._reading)
    [second], more = calls_in_threads(channel, [30])
    [(msgid1, _)] = daemon.requests(1)
    first.join(30)
    assert isinstance(results[0], privileged._Timeout)
    daemon.reply(msgid0, "too late")    # dropped: nobody waits for it
    daemon.reply(msgid1, "second")
    second.join(30)
    assert more[0] == "second"
    ours.close()
    theirs.close()


def test_records_and_end_sent_while_idle_are_read_by_running(
        flow_records):
    import socket
    ours, theirs = socket.socketpair()
    channel = privileged._Channel(ours)
    daemon = FakeDaemon(theirs)
    daemon.log("while idle")
    assert channel.running
    assert [(r.getMessage(), r.flow_id) for r in flow_records.records
            if r.name == privsep.DAEMON_LOGGER] == [("while idle", "flow-d")]
    theirs.close()
    assert not channel.running
    with pytest.raises(privileged._Died):
        channel.call("f", (), 30)
    ours.close()


def test_a_call_after_shutdown_fails_alone_and_running_calls_finish():
    # Stopping closes our sending half; a call sent then must not be taken
    # for the daemon's death, which would fail the calls it still runs.
    import socket
    ours, theirs = socket.socketpair()
    channel = privileged._Channel(ours)
    daemon = FakeDaemon(theirs)
    [running], results = calls_in_threads(channel, [30])
    [(msgid, _)] = daemon.requests(1)
    channel.shutdown()
    with pytest.raises(privileged._Stopping):
        channel.call("f", (), 30)
    daemon.reply(msgid, "done")
    running.join(30)
    assert results == {0: "done"}
    assert channel.running
    ours.close()
    theirs.close()


def test_a_frame_that_is_no_reply_ends_the_channel_for_every_call():
    import socket
    ours, theirs = socket.socketpair()
    channel = privileged._Channel(ours)
    daemon = FakeDaemon(theirs)
    threads, results = calls_in_threads(channel, [30, 30])
    daemon.requests(2)
    daemon.send(7)      # not a (msgid, message) pair
    for t in threads:
        t.join(30)
    assert all(isinstance(results[i], privileged._Died) and
               "privsep channel broken" in str(results[i]) for i in (0, 1))
    assert not channel.running
    ours.close()
    theirs.close()


def test_a_call_on_a_channel_already_ended_is_unsent():
    # Another caller read the daemon's end after this one chose the
    # daemon: nothing is sent, and Brick._call gives the call to a new
    # daemon (_Unsent), as when the send itself finds the end.
    import socket
    ours, theirs = socket.socketpair()
    channel = privileged._Channel(ours)
    theirs.close()
    channel._read_idle()        # the end, read by someone else
    assert not channel.running
    with pytest.raises(privileged._Unsent):
        channel.call("f", (), 30)
    ours.close()


def test_daemon_killed_while_idle_is_restarted_transparently(brick):
    brick.connector_properties()
    pid = brick.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: brick.daemon_pid() is None)
    assert brick.connector_properties()["multipath"] is True
    assert brick.daemon_pid() != pid


def test_daemon_ended_while_idle_is_replaced_by_the_next_call_itself(
        brick, caplog):
    # Nothing polls the channel before a call: the send finds the daemon
    # gone, nothing of the call reached it, and a new daemon gets it.
    brick.connector_properties()
    pid = brick.daemon_pid()
    sock = brick._daemon.sock
    os.kill(pid, signal.SIGKILL)
    # Its end closed (the end of file is there to read, unread).
    wait_for(lambda: select.select([sock], [], [], 0)[0])
    assert brick.connector_properties()["multipath"] is True
    assert brick.daemon_pid() not in (None, pid)
    assert "privsep daemon {} is gone".format(pid) in caplog.text


@pytest.mark.slow
def test_distinct_volumes_connect_in_parallel(brick, fake_dir, tmp_path):
    keys = ["par-{}".format(i) for i in range(4)]
    results = {}

    def connect(key):
        results[key] = brick.connect(iscsi(key, tmp_path, fake_sleep=1))

    threads = [threading.Thread(target=connect, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == keys
    events = [line.split()[0] for line in fakebrick.calls(str(fake_dir))
              if line.split()[1] in keys]
    # Every call had started before the first one finished.
    assert events[:4] == ["connect-start"] * 4
    for key in keys:
        brick.disconnect(iscsi(key, tmp_path), results[key])


def test_daemon_wakes_one_thread_per_call_after_a_burst(
        fresh_cfg, fake_dir, tmp_path):
    # A burst leaves the daemon's pool with a thread per call it ran at
    # once; from then on a call must wake the thread that runs it, not
    # others for nothing (oslo.privsep's ThreadPoolExecutor woke a
    # second waiter at every call, the waiting threads in turn).
    b = privileged.Brick(fresh_cfg)
    release = str(tmp_path / "release")
    keys = ["burst-{}".format(i) for i in range(8)]
    results = {}

    def connect(key):
        results[key] = b.connect(iscsi(key, tmp_path, fake_wait=release))

    try:
        threads = [threading.Thread(target=connect, args=(k,))
                   for k in keys]
        for t in threads:
            t.start()
        wait_for(lambda: sum(
            line.split()[0] == "connect-start" and line.split()[1] in keys
            for line in fakebrick.calls(str(fake_dir))) == 8)
        with open(release, "w"):
            pass
        for t in threads:
            t.join(60)
        assert sorted(results) == keys
        for key in keys:
            b.disconnect(iscsi(key, tmp_path), results[key])
        pid = b.daemon_pid()
        info = iscsi("burst-single", tmp_path)
        b.disconnect(info, b.connect(info))     # all of them waiting now
        before = thread_switches(pid)
        # The pool's threads (8 at least: the burst's), the main thread.
        assert len(before) >= 8 + 1
        for _ in range(20):
            b.disconnect(info, b.connect(info))
        after = thread_switches(pid)
        woken = [tid for tid in before if after.get(tid) != before[tid]]
        # Two pool threads taking turns (the one reading the next call
        # and the one that ran the last); the watchdog may have woken
        # once.
        assert len(woken) <= 3, woken
    finally:
        b.stop()


def test_a_stopped_daemon_answers_the_calls_it_runs_then_exits(
        fresh_cfg, fake_dir, tmp_path):
    b = privileged.Brick(fresh_cfg)
    release = str(tmp_path / "release")
    results = []
    try:
        b.connector_properties()
        pid = b.daemon_pid()
        running = threading.Thread(target=lambda: results.append(
            b.connect(iscsi("stop-running", tmp_path, fake_wait=release))))
        running.start()
        wait_for(lambda: "connect-start stop-running" in
                 fakebrick.calls(str(fake_dir)))
        stopping = threading.Thread(target=b.stop)
        stopping.start()
        time.sleep(0.2)
        assert not gone(pid)        # it waits for the call it runs
        with open(release, "w"):
            pass
        running.join(60)
        stopping.join(60)
        assert results and results[0]["path"]
        wait_for(lambda: gone(pid))
        b.disconnect(iscsi("stop-running", tmp_path), results[0])
    finally:
        b.stop()


# Starting the daemon

def test_missing_os_brick_is_not_supported_without_a_daemon(
        fresh_cfg, monkeypatch):
    real = privileged.importlib.util.find_spec
    monkeypatch.setattr(
        privileged.importlib.util, "find_spec",
        lambda name, *a: None if name == "os_brick" else real(name, *a))
    b = privileged.Brick(fresh_cfg)
    with pytest.raises(errors.NotSupported) as e:
        b.connector_properties()
    assert e.value.code == 925
    assert b.daemon_pid() is None


@pytest.mark.parametrize("command, expected", [
    ("/bin/false", "exited with code 1"),
    ("/bin/true", "exited with code 0 without starting"),
    ("/nonexistent/privsep-helper", "cannot run privsep helper"),
])
def test_helper_that_cannot_start_is_helper_failed(fresh_cfg, command,
                                                    expected):
    fresh_cfg.helper_command = command
    b = privileged.Brick(fresh_cfg)
    with pytest.raises(errors.HelperFailed) as e:
        b.connector_properties()
    assert expected in str(e.value)
    assert b.daemon_pid() is None


def test_helper_that_hangs_is_helper_failed_within_the_start_bound(
        fresh_cfg):
    fresh_cfg.helper_command = "sh -c 'exec sleep 60' --"
    b = privileged.Brick(fresh_cfg)
    b.start_timeout = 1.0
    with pytest.raises(errors.HelperFailed) as e:
        b.connector_properties()
    assert "did not start the daemon" in str(e.value)


def test_helper_output_is_quoted_in_the_error(fresh_cfg):
    fresh_cfg.helper_command = (
        "sh -c 'echo helper broken: password=hunter22 >&2; exit 3' --")
    b = privileged.Brick(fresh_cfg)
    with pytest.raises(errors.HelperFailed) as e:
        b.connector_properties()
    assert "helper broken" in str(e.value)
    assert "hunter22" not in str(e.value)
    # No daemon got the call: the service knows nothing of it ran.
    assert e.value.unsent


def test_a_call_sent_after_the_daemon_was_told_to_stop_is_unsent(
        fresh_cfg, tmp_path):
    # Chosen just before Brick.stop closed the channel: refused before
    # the send (_Stopping), nothing of it reached the daemon.
    b = privileged.Brick(fresh_cfg)
    try:
        b.connector_properties()
        b._daemon.channel.shutdown()
        with pytest.raises(errors.HelperFailed) as e:
            b.connect(iscsi("stopping", tmp_path))
        assert "is stopping: connect was not sent" in str(e.value)
        assert e.value.unsent
    finally:
        b.stop()


@pytest.mark.slow
def test_a_call_cut_then_not_run_again_for_want_of_a_daemon_is_not_unsent(
        fresh_cfg, fake_dir, tmp_path):
    # A disconnect cut when the daemon was killed at another call's
    # deadline runs again on a new daemon (RERUN_AFTER_KILL); when none
    # can start, its failure is the start's, but its first send may
    # have run: not unsent.
    fresh_cfg.timeout = 60.0
    b = privileged.Brick(fresh_cfg)
    release = str(tmp_path / "release")
    others_release = str(tmp_path / "others-release")
    result = {}

    def disconnect():
        try:
            b.disconnect(iscsi("cut-rerun", tmp_path,
                               fake_wait_disconnect=others_release), None)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=disconnect)
    try:
        b.connector_properties()
        pid = b.daemon_pid()
        t.start()
        wait_for(lambda: "disconnect-start cut-rerun" in
                 fakebrick.calls(str(fake_dir)))
        fresh_cfg.helper_command = "sh -c 'exit 1' --"
        fresh_cfg.timeout = 1.0
        with pytest.raises(errors.HelperTimeout):
            b.connect(iscsi("cut-rerun-hung", tmp_path,
                            fake_command_wait=release))
        wait_for(lambda: gone(pid))
        t.join(60)
        error = result["error"]
        assert type(error) is errors.HelperFailed
        assert "exited with code 1 without starting the daemon" in str(
            error)
        assert not error.unsent
    finally:
        for path in (release, others_release):
            with open(path, "w"):
                pass
        t.join(60)
        b.stop()


# A daemon of another version: the package's files replaced under us

def other_tree(tmp_path, monkeypatch, edits):
    """A copy of the package with ``edits`` ({module file: [(old, new)]})
    made, which the daemons started from now on import (their
    PYTHONPATH puts it first), as they import an upgrade's files; the
    test process keeps its own.  Returns its package directory."""
    import shutil
    src = os.path.dirname(privsep.__file__)
    pkg = str(tmp_path / "tree" / "vdsm_managedvolume")
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, changes in edits.items():
        path = os.path.join(pkg, name)
        with open(path) as f:
            text = f.read()
        for old, new in changes:
            assert old in text
            text = text.replace(old, new)
        with open(path, "w") as f:
            f.write(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [os.path.dirname(pkg)] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p]))
    return pkg


def started(caplog):
    return [r for r in caplog.records
            if r.getMessage().startswith("Starting privsep daemon")]


def test_daemon_of_another_protocol_gets_no_call_and_none_is_started_again(
        fresh_cfg, fake_dir, tmp_path, monkeypatch, caplog):
    # An upgrade: the agent runs protocol N, the files on disk N+1.
    ours = privsep.PROTOCOL
    bump = [("\nPROTOCOL = {}\n".format(ours),
             "\nPROTOCOL = {}\n".format(ours + 1))]
    pkg = other_tree(tmp_path, monkeypatch,
                     {"privsep.py": bump, "brick.py": bump})
    caplog.set_level("INFO", logger=privileged.LOG.name)
    info = iscsi("mismatch", tmp_path)
    b = privileged.Brick(fresh_cfg)
    try:
        with pytest.raises(errors.DaemonMismatch) as e:
            b.connect(info)
        assert e.value.code == 926
        assert e.value.unsent
        message = str(e.value)
        assert "privsep daemon {} speaks privsep protocol {} " \
            "(vdsm-managedvolume".format(e.value.pid, ours + 1) in message
        assert pkg in message
        assert "speaks privsep protocol {} (vdsm-managedvolume".format(
            ours) in message
        assert "restart" in message
        # Nothing reached os-brick, and the daemon is gone.
        assert "mismatch" not in fakebrick.connected(str(fake_dir))
        wait_for(lambda: gone(e.value.pid))
        assert b.daemon_pid() is None
        [error] = [r for r in caplog.records if r.levelname == "ERROR"
                   and r.name == privileged.LOG.name]
        assert message in error.getMessage()
        assert "until it is restarted" in error.getMessage()
        # Every daemon it could start runs the same files: none is.
        with pytest.raises(errors.DaemonMismatch) as again:
            b.disconnect(info, None)
        assert str(again.value) == message
        assert len(started(caplog)) == 1
    finally:
        b.stop()


def test_daemon_whose_files_are_of_two_protocols_refuses_to_start(
        fresh_cfg, fake_dir, tmp_path, monkeypatch):
    # Started while an upgrade writes the files: privsep.py already new,
    # brick.py not yet.  Not latched: the next call starts another.
    ours = privsep.PROTOCOL
    other_tree(tmp_path, monkeypatch, {"privsep.py": [(
        "\nPROTOCOL = {}\n".format(ours),
        "\nPROTOCOL = {}\n".format(ours + 1))]})
    b = privileged.Brick(fresh_cfg)
    try:
        with pytest.raises(errors.HelperFailed) as e:
            b.connector_properties()
        assert not isinstance(e.value, errors.DaemonMismatch)
        assert "refuses to start: its files are of two versions: the " \
            "entrypoints in " in str(e.value)
        assert "are of privsep protocol {}, privsep.py's is {}".format(
            ours, ours + 1) in str(e.value)
        monkeypatch.delenv("PYTHONPATH")
        monkeypatch.setenv("PYTHONPATH", os.path.dirname(
            os.path.dirname(privsep.__file__)))
        assert b.connector_properties()["multipath"] is True
    finally:
        b.stop()


@pytest.mark.parametrize("stamped", ["__init__.py", "brick.py"])
def test_daemon_whose_files_are_of_two_builds_refuses_to_start(
        fresh_cfg, fake_dir, tmp_path, monkeypatch, stamped):
    # One privsep protocol, two builds: -common (__init__.py) replaced,
    # the host package (privsep.py, brick.py) not yet, in one RPM
    # transaction; or brick.py beside another build's privsep.py.  Not
    # latched: the next call starts another.
    pkg = other_tree(tmp_path, monkeypatch, {stamped: [(
        '\nBUILD = "source"\n', '\nBUILD = "0.2.0-1.0123456789ab"\n')]})
    b = privileged.Brick(fresh_cfg)
    try:
        with pytest.raises(errors.HelperFailed) as e:
            b.connect(iscsi("two-builds", tmp_path))
        assert not isinstance(e.value, errors.DaemonMismatch)
        assert e.value.unsent
        builds = {"__init__.py": "source", "privsep.py": "source",
                  "brick.py": "source", stamped: "0.2.0-1.0123456789ab"}
        assert "refuses to start: its files are of two builds: in {}, " \
            "{} (the package is being replaced?".format(pkg, ", ".join(
                "{} is of build {}".format(name, builds[name])
                for name in ("__init__.py", "privsep.py", "brick.py"))) \
            in str(e.value)
        assert not [c for c in fakebrick.calls(str(fake_dir))
                    if c.endswith(" two-builds")]
        monkeypatch.setenv("PYTHONPATH", os.path.dirname(
            os.path.dirname(privsep.__file__)))
        assert b.connector_properties()["multipath"] is True
    finally:
        b.stop()


def test_daemon_from_before_the_handshake_is_a_mismatch(
        fresh_cfg, fake_dir, tmp_path, monkeypatch):
    # A downgrade: the files on disk have no handshake entrypoint.
    other_tree(tmp_path, monkeypatch, {"brick.py": [(
        "@context.entrypoint\ndef handshake(", "def handshake(")]})
    b = privileged.Brick(fresh_cfg)
    try:
        with pytest.raises(errors.DaemonMismatch) as e:
            b.connector_properties()
        assert "speaks no privsep protocol (a version from before the " \
            "handshake)" in str(e.value)
        wait_for(lambda: gone(e.value.pid))
    finally:
        b.stop()


def test_client_from_before_the_handshake_gets_no_call_served(
        fresh_cfg, fake_dir, tmp_path, monkeypatch):
    # An agent of a version without the handshake (it calls hello next)
    # whose files were replaced by this one's.
    monkeypatch.setattr(privileged, "_handshake", lambda *args: None)
    b = privileged.Brick(fresh_cfg)
    try:
        with pytest.raises(errors.HelperFailed) as e:
            b.connect(iscsi("old-client", tmp_path))
        assert not isinstance(e.value, errors.DaemonMismatch)
        assert "its client no privsep protocol (a version from before " \
            "the handshake)" in str(e.value)
        assert "no call is served: restart the client" in str(e.value)
        assert "old-client" not in fakebrick.connected(str(fake_dir))
        assert b.daemon_pid() is None
    finally:
        b.stop()


def test_daemon_serves_no_operation_after_a_handshake_of_another_protocol(
        fresh_cfg, fake_dir, tmp_path):
    b = privileged.Brick(fresh_cfg)
    try:
        b.connector_properties()
        daemon = b._daemon
        theirs = daemon.channel.call(
            privsep.ENTRYPOINTS + "handshake",
            ({"protocol": privsep.PROTOCOL - 1, "version": "0.0.9"},), 30)
        assert theirs == privsep.identity()
        with pytest.raises(errors.HelperFailed) as e:
            b.connect(iscsi("late-other", tmp_path))
        assert "its client privsep protocol {} (vdsm-managedvolume " \
            "0.0.9 in unknown)".format(privsep.PROTOCOL - 1) in str(e.value)
        assert "late-other" not in fakebrick.connected(str(fake_dir))
    finally:
        b.stop()


# Crash points reach the daemon through its environment

@pytest.mark.slow
@pytest.mark.parametrize("point, connected", [
    ("privsep.connect.before", False),
    ("privsep.connect.after", True),
])
def test_crash_point_in_connect_kills_the_daemon(
        fresh_cfg, fake_dir, tmp_path, monkeypatch, point, connected):
    key = "crash-" + point.replace(".", "-")
    # The connect's answer is lost with the daemon: the disconnect goes
    # without device_info.
    info = iscsi(key, tmp_path, fake_blind_disconnect=True)
    monkeypatch.setenv(faults.ENV, point)
    b = privileged.Brick(fresh_cfg)
    try:
        with pytest.raises(errors.HelperFailed):
            b.connect(info)
        assert (key in fakebrick.connected(str(fake_dir))) == connected
        # The next daemon starts with the environment of its start.
        monkeypatch.delenv(faults.ENV)
        b.disconnect(info, None)
        assert key not in fakebrick.connected(str(fake_dir))
    finally:
        b.stop()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["privsep.disconnect.before",
                                   "privsep.disconnect.after"])
def test_crash_point_in_disconnect_kills_the_daemon(
        fresh_cfg, fake_dir, tmp_path, monkeypatch, point):
    key = "crash-" + point.replace(".", "-")
    info = iscsi(key, tmp_path)
    monkeypatch.setenv(faults.ENV, point)
    b = privileged.Brick(fresh_cfg)
    try:
        att = b.connect(info)
        with pytest.raises(errors.HelperFailed):
            b.disconnect(info, att)
        still = point.endswith(".before")
        assert (key in fakebrick.connected(str(fake_dir))) == still
        monkeypatch.delenv(faults.ENV)
        b.disconnect(info, att)
        assert key not in fakebrick.connected(str(fake_dir))
    finally:
        b.stop()


# The service process stays free of os-brick

def test_service_process_never_imports_os_brick(fresh_cfg, tmp_path):
    script = """
import sys, time
from vdsm_managedvolume import adapters, config, privileged
cfg = config.with_state_dir(config.Config(), sys.argv[1])
cfg.connector_override = "tests.fakebrick"
b = privileged.Brick(cfg)
sleep = time.sleep
b.connector_properties()
adapters.check(None)
assert not [m for m in sys.modules if m.startswith(("os_brick", "eventlet"))]
assert time.sleep is sleep
b.stop()
print("ok")
"""
    out = subprocess.check_output(
        [sys.executable, "-c", script, str(tmp_path / "state")],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.strip().endswith(b"ok")


# Helpers without a daemon

def test_helper_command_as_root_runs_privsep_helper_without_sudo(fresh_cfg):
    cmd = privileged.helper_command(fresh_cfg, "/tmp/x.sock")
    assert cmd[0] == os.path.join(os.path.dirname(sys.executable),
                                  "privsep-helper")
    assert cmd[1:3] == ["--config-file", fresh_cfg.privsep_config_file]
    assert cmd[-4:] == ["--privsep_context", privsep.CONTEXT,
                        "--privsep_sock_path", "/tmp/x.sock"]


def test_helper_command_not_root_uses_root_helper(fresh_cfg, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 36)
    fresh_cfg.root_helper = "sudo -n"
    cmd = privileged.helper_command(fresh_cfg, "/tmp/x.sock")
    assert cmd[:2] == ["sudo", "-n"]
    assert cmd[2].endswith("privsep-helper")


def test_helper_command_option_replaces_the_command(fresh_cfg):
    fresh_cfg.helper_command = "/usr/bin/my-helper --config-file /etc/x"
    cmd = privileged.helper_command(fresh_cfg, "/tmp/x.sock")
    assert cmd[:3] == ["/usr/bin/my-helper", "--config-file", "/etc/x"]
    assert cmd[3] == "--privsep_context"


# A daemon on another oslo.privsep

# privsep-helper on an oslo.privsep whose Daemon.loop takes other
# parameters: brick._fits refuses it, oslo's own executor serves.
OTHER_OSLO_HELPER = """
from oslo_privsep import daemon


class Reshaped(daemon.Daemon):
    def loop(self, *args):
        return super().loop()


daemon.Daemon = Reshaped
daemon.helper_main()
"""


def test_oslo_privseps_own_executor_is_a_warning_in_the_services_log(
        fresh_cfg, flow_records):
    # Said when check_start found it, the line went to privsep-helper's
    # output, which reaches the service's log at DEBUG ("privsep
    # output: ..."): lost at the default level.
    fresh_cfg.helper_command = " ".join(shlex.quote(arg) for arg in (
        sys.executable, "-c", OTHER_OSLO_HELPER, "--config-file",
        fresh_cfg.privsep_config))
    b = privileged.Brick(fresh_cfg)
    try:
        with log.flow("flow-other-oslo"):
            assert b.connector_properties()["multipath"] is True
    finally:
        b.stop()
    said = [r for r in flow_records.records
            if "its own executor runs the calls" in r.getMessage()]
    assert [(r.levelname, r.flow_id) for r in said] == [
        ("WARNING", "flow-other-oslo")]
    assert "oslo.privsep 3.12.0's Daemon is not the one" in \
        said[0].getMessage()


# Flow ids on the daemon's lines

def test_daemon_start_up_lines_carry_the_flow_of_the_call_that_started_it(
        fresh_cfg, flow_records):
    fresh_cfg.log_level = "DEBUG"        # oslo.privsep's own lines too
    b = privileged.Brick(fresh_cfg)
    try:
        with log.flow("flow-start"):
            b.connector_properties()
        pid = b.daemon_pid()
        records = [r for r in flow_records.records
                   if r.process == pid or r.name == privileged.__name__]
    finally:
        b.stop()
    messages = [r.getMessage() for r in records]
    # The daemon's own start-up (oslo.privsep), os-brick's set-up and the
    # reply lines are there...
    assert any("privsep daemon running as pid" in m for m in messages)
    assert any("privsep: reply" in m for m in messages)
    # ...and all of them carry the caller's flow id.
    assert {r.flow_id for r in records} == {"flow-start"}, [
        (r.flow_id, r.getMessage()[:80]) for r in records
        if r.flow_id != "flow-start"]


def test_daemon_lines_of_concurrent_calls_carry_each_callers_flow_id(
        fresh_cfg, fake_dir, tmp_path, flow_records):
    # Two calls in flight with different flow ids: nothing can be guessed
    # on the client side, the daemon must tag each line itself - also
    # the lines of threads os-brick spawns and oslo.privsep's reply line.
    fresh_cfg.log_level = "DEBUG"
    b = privileged.Brick(fresh_cfg)
    try:
        b.connector_properties()
        pid = b.daemon_pid()
        flow_records.clear()
        infos = {flow: iscsi("flow-" + flow, tmp_path, fake_sleep=0.5,
                             fake_log_thread=True)
                 for flow in ("flow-a", "flow-b")}
        attachments = {}

        def connect(flow):
            with log.flow(flow):
                attachments[flow] = b.connect(infos[flow])

        threads = [threading.Thread(target=connect, args=(f,))
                   for f in infos]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for flow, info in infos.items():
            b.disconnect(info, attachments[flow])
        records = [r for r in flow_records.records if r.process == pid]
    finally:
        b.stop()
    for flow in infos:
        key = "flow-" + flow
        thread_lines = [r for r in records
                        if r.getMessage() == "fake thread " + key]
        assert [r.flow_id for r in thread_lines] == [flow]
        assert thread_lines[0].threadName != "MainThread"
        wwn = attachments[flow]["multipath_id"]
        replies = [r for r in records if "privsep: reply" in r.getMessage()
                   and wwn in r.getMessage()]
        assert [r.flow_id for r in replies] == [flow]


# connector_info's ip (os-brick's my_ip)

def test_default_ip_is_the_source_address_of_the_default_route():
    route = subprocess.run(["ip", "-o", "route", "get", "192.0.2.1"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if route.returncode != 0:
        pytest.skip("no IPv4 route on this host")
    words = route.stdout.decode().split()
    assert privileged.default_ip() == words[words.index("src") + 1]


def test_default_ip_without_any_route_is_none(monkeypatch):
    class Unreachable(privileged.socket.socket):
        def connect(self, address):
            raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(privileged.socket, "socket", Unreachable)
    assert privileged.default_ip() is None


def test_my_ip_option_wins_over_the_default_route(fresh_cfg):
    fresh_cfg.my_ip = "2001:DB8::7"
    assert privileged.my_ip(fresh_cfg) == "2001:db8::7"
    fresh_cfg.my_ip = ""
    assert privileged.my_ip(fresh_cfg) == privileged.default_ip()


def test_my_ip_that_is_not_an_address_is_config_error(fresh_cfg):
    fresh_cfg.my_ip = "host.example.com"
    with pytest.raises(errors.ConfigError, match="my_ip"):
        privileged.my_ip(fresh_cfg)
    b = privileged.Brick(fresh_cfg)
    with pytest.raises(errors.ConfigError):
        b.connector_properties()
    assert b.daemon_pid() is None


def test_connector_properties_carry_my_ip(brick, cfg, monkeypatch):
    assert brick.connector_properties()["ip"] == privileged.default_ip()
    monkeypatch.setattr(cfg, "my_ip", "192.0.2.55")
    assert brick.connector_properties()["ip"] == "192.0.2.55"



@pytest.mark.parametrize("value", [
    ("1f", (1, "connect_volume", ({"driver_volume_type": "local", "data": {
        "device_path": "/dev/loop0"}},), {})),
    ("é", "\u202e", "日本", b"bytes", 2 ** 63, -2 ** 63, 1.5, None, True,
     [], {}, {"k": ["v", {"n": "\U0001f600"}]}),
    ("lone \udc80 surrogate", {"\udcff": "x"}),
])
def test_packer_packs_what_the_channel_packs(value):
    import msgpack
    channel = msgpack.Packer(use_bin_type=True,
                             unicode_errors="surrogateescape")
    packer = privileged._Packer()
    assert packer.pack(value) == channel.pack(value)
    # Again: a failed plain pack left nothing behind.
    assert packer.pack(value) == channel.pack(value)


@pytest.mark.parametrize("value", [
    ("\ud800 not escapable",), (2 ** 64,), (object(),)])
def test_packer_refuses_what_the_channel_refuses(value):
    import msgpack
    channel = msgpack.Packer(use_bin_type=True,
                             unicode_errors="surrogateescape")
    with pytest.raises(Exception) as expected:
        channel.pack(value)
    with pytest.raises(type(expected.value)):
        privileged._Packer().pack(value)
    with pytest.raises(errors.CannotSend):
        privileged.check_sendable("connect", value)
    privileged.check_sendable("connect", ("fine",))
