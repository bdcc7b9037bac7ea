import logging
import os
import stat
import subprocess
import uuid

import pytest

from vdsm_managedvolume import devices
from vdsm_managedvolume import udev

from .host_fixtures import make_cfg

VOL = "0d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
SD = "2d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
RUN = ' RUN+="/usr/bin/chown vdsm:qemu $env{DEVNAME}"\n'


@pytest.mark.parametrize("path, rule", [
    ("/dev/mapper/20024f4005854000b", 'SYMLINK=="mapper/20024f4005854000b",'),
    ("/dev/rbd/volumes/volume-d1530bb1",
     'SYMLINK=="rbd/volumes/volume-d1530bb1",'),
    ("/dev/nvme0n3", 'KERNEL=="nvme0n3",'),
])
def test_rule_text_matches_vdsm(path, rule):
    assert udev.rule_text(path, "vdsm:qemu", "/usr/bin/chown") == rule + RUN


@pytest.mark.parametrize("attrs, guard", [
    ({"wwid": "eui.0025385b71b07e2f", "diskseq": "9"},
     'ATTR{wwid}=="eui.0025385b71b07e2f", '),
    # A value a rule cannot hold (a space, a quote) is passed over.
    ({"wwid": "t10.ATA     X\"", "serial": "S3Z9NB0K", "diskseq": "9"},
     'ATTR{serial}=="S3Z9NB0K", '),
    ({"loop/backing_file": "/var/a b.img (deleted)", "diskseq": "9"},
     'ATTR{diskseq}=="9", '),
    ({"loop/backing_file": "/var/a.img", "diskseq": "9"},
     'ATTR{loop/backing_file}=="/var/a.img", '),
    ({}, ""),
])
def test_kernel_name_rule_is_guarded_by_the_first_attribute_it_can_hold(
        tmp_path, monkeypatch, attrs, guard):
    monkeypatch.setattr(devices, "SYS_DEV_BLOCK", str(tmp_path))
    for name, value in attrs.items():
        (tmp_path / "259:3" / name).parent.mkdir(parents=True,
                                                 exist_ok=True)
        (tmp_path / "259:3" / name).write_text(value + "\n")
    assert udev.rule_text("/dev/nvme0n3", "vdsm:qemu", "/usr/bin/chown",
                          number=(259, 3)) == \
        'KERNEL=="nvme0n3", ' + guard + RUN[1:]


def test_kernel_name_rule_guard_takes_the_backing_file_just_read(
        tmp_path, monkeypatch):
    # An attach has just read its loop device's backing file (identity):
    # the rule's guard is that value, not read again; the same text.
    monkeypatch.setattr(devices, "SYS_DEV_BLOCK", str(tmp_path))
    (tmp_path / "7:3" / "loop").mkdir(parents=True)
    (tmp_path / "7:3" / "loop" / "backing_file").write_text("/var/a.img\n")
    (tmp_path / "7:3" / "diskseq").write_text("9\n")
    read = udev.rule_text("/dev/loop3", "vdsm:qemu", "/usr/bin/chown",
                          number=(7, 3))
    assert 'ATTR{loop/backing_file}=="/var/a.img", ' in read
    reads = []
    real = udev._read_attr
    monkeypatch.setattr(udev, "_read_attr",
                        lambda path: reads.append(path) or real(path))
    assert udev.rule_text("/dev/loop3", "vdsm:qemu", "/usr/bin/chown",
                          number=(7, 3), backing="/var/a.img") == read
    assert reads == []
    # Not a loop device: nothing given, the attributes are read.
    assert udev.rule_text("/dev/loop3", "vdsm:qemu", "/usr/bin/chown",
                          number=(7, 3), backing=None) == read
    assert reads


def udev_applies(rule_file, path):
    """Whether udev (``udevadm test``, no daemon needed) applies the rule
    in ``rule_file`` to the device at ``path`` on a change event.  The
    rule is read from a copy in /run/udev/rules.d whose RUN is
    /bin/true: nothing is chowned even where a udevd runs."""
    with open(rule_file) as f:
        text = f.read()
    copy = "/run/udev/rules.d/99-mv-test-{}.rules".format(uuid.uuid4())
    os.makedirs(os.path.dirname(copy), exist_ok=True)
    with open(copy, "w") as f:
        f.write(text.replace("/usr/bin/chown", "/bin/true"))
    try:
        major, minor = devices.device_number(path)
        res = subprocess.run(
            ["udevadm", "test", "--action=change",
             "/sys/dev/block/{}:{}".format(major, minor)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    except FileNotFoundError:
        pytest.skip("no udevadm")
    finally:
        os.unlink(copy)
    out = res.stdout.decode("utf-8", "replace")
    assert "Reading rules file: " + copy in out, out
    return "{}:1 RUN".format(copy) in out


@pytest.mark.root
def test_kernel_name_rule_chowns_only_the_device_it_was_written_for(
        tmp_path, loop_device):
    # The kernel gives a name to the next device that comes (a loop minor
    # when its file is detached; NVMe's nvmeXnY at every boot): a rule
    # outliving its device must not give that one to qemu.
    cfg = make_cfg(tmp_path)
    dst = udev.add_rule(cfg, SD, VOL, loop_device.path)
    with open(dst) as f:
        assert f.read() == 'KERNEL=="{}", ATTR{{loop/backing_file}}=="{}",' \
            .format(os.path.basename(loop_device.path),
                    loop_device.backing) + RUN
    assert udev.rule_ok(cfg, SD, VOL, loop_device.path)
    assert udev_applies(dst, loop_device.path)

    loop_device.reattach(str(tmp_path / "other.img"))

    assert not udev_applies(dst, loop_device.path)
    assert not udev.rule_ok(cfg, SD, VOL, loop_device.path)


def test_rule_never_sets_owner_group_or_mode():
    text = udev.rule_text("/dev/mapper/x", "vdsm:qemu", "/usr/bin/chown")
    for word in ("OWNER", "GROUP", "MODE"):
        assert word not in text


def test_symlink_under_dev_uses_symlink_match(tmp_path):
    # Any other symlink (e.g. /dev/disk/by-id/...) is matched as a symlink.
    link = tmp_path / "by-id-x"
    link.symlink_to("/dev/null")
    assert udev.rule_text(str(link), "a:b", "/c").startswith("SYMLINK==")


def test_configured_device_dirs_are_named_as_udev_sees_them(tmp_path):
    cfg = make_cfg(tmp_path)
    path = os.path.join(cfg.multipath_dir, "3600a")
    udev.add_rule(cfg, SD, VOL, path)
    with open(udev.rule_path(cfg.udev_rules_dir, SD, VOL)) as f:
        assert f.read().startswith('SYMLINK=="mapper/3600a",')


@pytest.mark.parametrize("path", [
    '/dev/mapper/x", RUN+="/bin/sh -c evil',
    "/dev/mapper/x\nKERNEL==\"sda\"",
    "/dev/sd a",
])
def test_path_that_could_inject_a_rule_is_refused(path):
    with pytest.raises(udev.UnsafePath):
        udev.rule_text(path, "vdsm:qemu", "/usr/bin/chown")


def test_add_writes_atomically_0644_and_remove_is_idempotent(tmp_path):
    cfg = make_cfg(tmp_path)
    dst = udev.add_rule(cfg, SD, VOL, "/dev/loop7")
    assert os.path.basename(dst) == \
        "99-vdsm-managed_{}_{}.rules".format(SD, VOL)
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o644
    assert os.listdir(cfg.udev_rules_dir) == [os.path.basename(dst)]
    assert udev.has_rule(cfg, SD, VOL)
    assert udev.list_rules(cfg) == [(SD, VOL, dst)]
    assert udev.remove_rule(cfg, SD, VOL) is True
    assert udev.remove_rule(cfg, SD, VOL) is False
    assert udev.list_rules(cfg) == []


def test_list_ignores_foreign_rules_and_finds_temp_files(tmp_path):
    cfg = make_cfg(tmp_path)
    os.makedirs(cfg.udev_rules_dir)
    for name in ("99-vdsm-foo-bar.rules", "10-other.rules",
                 "99-vdsm-managed_../x_y.rules"):
        open(os.path.join(cfg.udev_rules_dir, name.replace("/", "")),
             "w").close()
    tmp = os.path.join(cfg.udev_rules_dir,
                       ".99-vdsm-managed_{}_{}.rules.tmp".format(SD, VOL))
    open(tmp, "w").close()
    assert udev.list_rules(cfg) == []
    assert udev.list_temp_files(cfg) == [tmp]


# Not a block device: trigger falls back to running udevadm.
NOT_BLOCK = "/dev/null"


def test_trigger_runs_udevadm_change_on_other_paths(tmp_path):
    cfg = make_cfg(tmp_path)
    assert udev.trigger(cfg, NOT_BLOCK) is True
    with open(tmp_path / "udevadm.log") as f:
        assert f.read() == "trigger --action=change {}\n".format(NOT_BLOCK)


@pytest.mark.root
def test_trigger_of_a_block_device_writes_its_sysfs_uevent(tmp_path):
    # What "udevadm trigger --action=change" does, without a process.
    cfg = make_cfg(tmp_path)
    dev = "/dev/loop0"
    if not os.path.exists(dev):
        pytest.skip("no /dev/loop0")
    st = os.stat(dev)
    assert udev._sysfs_uevent(dev) == "/sys/dev/block/{}:{}/uevent".format(
        os.major(st.st_rdev), os.minor(st.st_rdev))
    assert udev.trigger(cfg, dev) is True
    assert not (tmp_path / "udevadm.log").exists()


def test_missing_udevadm_is_a_warning(tmp_path, caplog):
    cfg = make_cfg(tmp_path, udevadm=str(tmp_path / "no-such-udevadm"))
    with caplog.at_level(logging.WARNING, logger="managedvolume.udev"):
        assert udev.trigger(cfg, NOT_BLOCK) is False
    assert "not found" in caplog.text


def test_failing_udevadm_is_a_warning(tmp_path, caplog):
    script = tmp_path / "bad-udevadm"
    script.write_text("#!/bin/sh\necho no such device >&2\nexit 3\n")
    script.chmod(0o755)
    cfg = make_cfg(tmp_path, udevadm=str(script))
    with caplog.at_level(logging.WARNING, logger="managedvolume.udev"):
        assert udev.trigger(cfg, NOT_BLOCK) is False
    assert "rc=3" in caplog.text and "no such device" in caplog.text


def test_hanging_udevadm_is_bounded(tmp_path, caplog):
    script = tmp_path / "slow-udevadm"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    cfg = make_cfg(tmp_path, udevadm=str(script))
    with caplog.at_level(logging.WARNING, logger="managedvolume.udev"):
        assert udev.trigger(cfg, NOT_BLOCK, timeout=0.2) is False
    assert "did not finish" in caplog.text


def test_rule_ok_detects_torn_or_stale_rules(tmp_path):
    cfg = make_cfg(tmp_path)
    assert not udev.rule_ok(cfg, SD, VOL, "/dev/loop7")
    dst = udev.add_rule(cfg, SD, VOL, "/dev/loop7")
    assert udev.rule_ok(cfg, SD, VOL, "/dev/loop7")
    assert not udev.rule_ok(cfg, SD, VOL, "/dev/loop6")
    open(dst, "w").close()            # torn by a power loss
    assert udev.has_rule(cfg, SD, VOL)
    assert not udev.rule_ok(cfg, SD, VOL, "/dev/loop7")


@pytest.mark.parametrize("path", [
    "/dev/sda", "/dev/mapper/3600a", "/dev/rbd/pool/vol-1",
    "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"])
def test_plain_device_paths_pass_the_daemons_check(path):
    assert udev.check_device_path(path) == path


@pytest.mark.parametrize("path", [
    "/etc/shadow", "/dev/../etc/shadow", "/dev/./sda", "dev/sda",
    "/dev/sda/", "/dev", "/devices/x", '/dev/x"', "/dev/a b", "", None, 3])
def test_other_paths_fail_the_daemons_check(path):
    with pytest.raises(udev.UnsafePath):
        udev.check_device_path(path)


def test_configured_device_dirs_pass_the_daemons_check(tmp_path):
    cfg = make_cfg(tmp_path)
    path = os.path.join(cfg.multipath_dir, "3600a")
    assert udev.check_device_path(path, ("/dev", cfg.multipath_dir)) == path
    with pytest.raises(udev.UnsafePath):
        udev.check_device_path(path)


def test_temp_names_parse_back_to_their_ids():
    name = os.path.basename(udev.temp_path("/x", SD, VOL))
    assert udev.parse_temp_name(name) == (SD, VOL)
    assert udev.parse_temp_name(name[1:]) is None
    assert udev.parse_temp_name(".99-vdsm-managed_junk.tmp") is None


def test_remove_of_the_temp_file_leaves_the_rule(tmp_path):
    cfg = make_cfg(tmp_path)
    dst = udev.add_rule(cfg, SD, VOL, "/dev/loop7")
    tmp = udev.temp_path(cfg.udev_rules_dir, SD, VOL)
    open(tmp, "w").close()
    assert udev.remove_rule(cfg, SD, VOL, temp=True) is True
    assert udev.remove_rule(cfg, SD, VOL, temp=True) is False
    assert os.listdir(cfg.udev_rules_dir) == [os.path.basename(dst)]


def test_symlink_planted_at_the_temp_name_is_not_followed(tmp_path):
    cfg = make_cfg(tmp_path)
    os.makedirs(cfg.udev_rules_dir)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, udev.temp_path(cfg.udev_rules_dir, SD, VOL))
    with pytest.raises(OSError):
        udev.add_rule(cfg, SD, VOL, "/dev/loop7")
    assert victim.read_text() == "keep me"
