"""A block device the host uses is never handed to a VM (real loop
devices, real mounts, real swap)."""

import contextlib
import errno
import os
import stat
import subprocess

import pytest

from vdsm_managedvolume import devices
from vdsm_managedvolume import errors

from .host_fixtures import new_id

pytestmark = pytest.mark.root

SD = "0c6f5a8e-2b1d-4c3e-9f4a-5b6c7d8e9f01"


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


@pytest.fixture
def mounted(loop_device, tmp_path):
    run("mkfs.ext4", "-q", "-F", loop_device.path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", loop_device.path, str(mnt))
    yield loop_device, str(mnt)
    run("umount", str(mnt))


@contextlib.contextmanager
def swapped_on(device, node=None):
    """``device`` made a swap area and swapped on for the block, through
    ``node`` (another name of the same device) when given; the test is
    skipped where swapon is not permitted."""
    run("mkswap", device)
    try:
        run("swapon", node or device)
    except subprocess.CalledProcessError:
        pytest.skip("swapon not permitted here")
    try:
        yield
    finally:
        run("swapoff", device)


@contextlib.contextmanager
def mounted_at(device, mnt):
    """``device`` (a file system on it) mounted at ``mnt`` for the block,
    which is given what ``in_use`` then says of it."""
    mnt.mkdir()
    run("mount", device, str(mnt))
    try:
        yield "{} is mounted at {}".format(os.path.basename(device), mnt)
    finally:
        run("umount", str(mnt))


def swap_reason(device):
    """What ``in_use`` says of ``device`` while it is an active swap."""
    return "{} is an active swap area".format(os.path.basename(device))


def test_unused_loop_device_is_free(loop_device):
    assert devices.in_use(loop_device.path) is None


def test_mounted_device_is_in_use(mounted):
    dev, mnt = mounted
    reason = devices.in_use(dev.path)
    assert reason == "{} is mounted at {}".format(
        os.path.basename(dev.path), mnt)


def test_active_swap_is_in_use(loop_device):
    with swapped_on(loop_device.path):
        assert devices.in_use(loop_device.path) == \
            swap_reason(loop_device.path)


def test_a_partition_in_use_makes_its_disk_in_use(
        loop_device, tmp_path, monkeypatch):
    # A sysfs tree as the kernel lays it out: /sys/dev/block/MAJ:MIN links
    # to the device's directory, a partition is a directory named after
    # its disk beside the disk's attribute files.
    st = os.stat(loop_device.path)
    disk = os.path.basename(loop_device.path)
    number = "{}:{}".format(os.major(st.st_rdev), os.minor(st.st_rdev))
    top = tmp_path / "block" / disk
    for name in ("holders", "queue", "power", "mq"):
        (top / name).mkdir(parents=True)
    for name in ("size", "uevent", "ro", "removable"):
        (top / name).write_text("0\n")
    for part, minor, holder in (("p1", 901, None), ("p2", 902, "dm-7")):
        d = top / (disk + part)
        (d / "holders").mkdir(parents=True)
        (d / "partition").write_text(part[1:] + "\n")
        (d / "dev").write_text("259:{}\n".format(minor))
        if holder:
            (d / "holders" / holder).write_text("")
    by_number = tmp_path / "dev-block"
    by_number.mkdir()
    (by_number / number).symlink_to(top)
    (by_number / "259:901").symlink_to(top / (disk + "p1"))
    (by_number / "259:902").symlink_to(top / (disk + "p2"))
    monkeypatch.setattr(devices, "SYS_DEV_BLOCK", str(by_number))
    assert devices.in_use(loop_device.path) == \
        "{}p2 is held by dm-7".format(disk)


def test_mount_point_is_found_by_the_device_number_field_only():
    lines = ["{} 1 0:{} / /m{} rw - tmpfs t rw".format(i, 100 + i, i)
             for i in range(2000)]
    # 7:1 in another field (a root path, a mount point) is not a match.
    lines.insert(5, "9001 1 8:3 / /srv/ 7:1 rw - ext4 /dev/sda3 rw")
    lines.append("9002 1 7:1 / /mnt/vol rw - ext4 /dev/loop1 rw")
    lines.append("9003 1 7:1 / /mnt/again rw - ext4 /dev/loop1 rw")
    text = "\n".join(lines) + "\n"
    assert devices._mount_point(text, 7, 1) == "/mnt/vol"
    assert devices._mount_point(text, 0, 150) == "/m50"
    assert devices._mount_point(text, 7, 2) is None
    assert devices._mount_point("", 7, 1) is None
    mounts = devices._Mounts(text)
    assert mounts.get(7, 1) == "/mnt/vol" and mounts.get(7, 2) is None
    assert mounts.get(7, 1) == "/mnt/vol" and mounts.get(7, 2) is None


def test_mounts_and_swaps_are_read_again_only_after_a_change(
        loop_device, tmp_path, monkeypatch):
    reads = []
    read_fd = devices._read_fd
    monkeypatch.setattr(devices, "_read_fd",
                        lambda fd: reads.append(fd) or read_fd(fd))
    monkeypatch.setattr(devices, "_host", devices._HostUse())
    assert devices.in_use(loop_device.path) is None
    assert len(reads) == 2                  # mountinfo and swaps, opened
    # Nothing read while nothing changed (other tests on this host may
    # mount meanwhile: a read then is right, so look a few times).
    for _ in range(5):
        del reads[:]
        assert devices.in_use(loop_device.path) is None
        if not reads:
            break
    assert reads == []
    mnt = tmp_path / "m"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "none", str(mnt))   # another mount
    try:
        assert devices.in_use(loop_device.path) is None
        assert reads                        # mountinfo again
    finally:
        run("umount", str(mnt))


def test_a_device_mounted_after_the_mounts_were_read_is_in_use(
        loop_device, tmp_path):
    run("mkfs.ext4", "-q", "-F", loop_device.path)
    assert devices.in_use(loop_device.path) is None     # read and kept
    with mounted_at(loop_device.path, tmp_path / "mnt") as reason:
        assert devices.in_use(loop_device.path) == reason
    assert devices.in_use(loop_device.path) is None


def test_a_device_swapped_on_after_the_swaps_were_read_is_in_use(
        loop_device):
    assert devices.in_use(loop_device.path) is None     # read and kept
    with swapped_on(loop_device.path):
        assert devices.in_use(loop_device.path) == \
            swap_reason(loop_device.path)
    assert devices.in_use(loop_device.path) is None


def test_a_forked_child_does_not_take_the_parents_change_flag(
        loop_device, tmp_path):
    # The flag belongs to the open file, which a child shares with its
    # parent: a child polling it must not clear it for the parent.
    devices.in_use(loop_device.path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "none", str(mnt))
    try:
        pid = os.fork()
        if pid == 0:
            try:
                devices.in_use(loop_device.path)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        st = os.stat(str(mnt))
        mounts, _ = devices._host.now()
        assert mounts.get(os.major(st.st_dev), os.minor(st.st_dev)) == \
            str(mnt)
    finally:
        run("umount", str(mnt))


def test_paths_that_are_not_block_devices_are_not_judged(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert devices.in_use(str(f)) is None
    assert devices.in_use(str(tmp_path / "missing")) is None


def test_size_of_a_loop_device_follows_its_capacity(loop_device):
    size = os.path.getsize(loop_device.backing)
    assert devices.size(loop_device.path) == size
    with open(loop_device.backing, "r+b") as f:
        f.truncate(3 * size)
    # The kernel sees nothing until the capacity is re-read.
    assert devices.size(loop_device.path) == size
    run("losetup", "-c", loop_device.path)
    assert devices.size(loop_device.path) == 3 * size


def test_size_of_a_file_a_link_and_what_has_none(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 1234)
    link = tmp_path / "link"
    link.symlink_to(f)
    assert devices.size(str(f)) == 1234
    assert devices.size(str(link)) == 1234
    assert devices.size(str(tmp_path / "missing")) is None
    assert devices.size("/dev/null") is None      # a character device


def test_local_attach_of_a_mounted_device_is_refused_and_nothing_changes(
        mounted, inproc_service):
    svc = inproc_service
    dev, mnt = mounted
    vol_id = new_id()
    ci = {"driver_volume_type": "local", "data": {"device_path": dev.path}}
    before = sorted(os.listdir(svc.cfg.run_dir))

    with pytest.raises(errors.InvalidParams) as e:
        svc.attach_volume(vol_id, ci, SD)

    assert "connection_info.data.device_path" in str(e.value)
    assert "mounted at {}".format(mnt) in str(e.value)
    assert svc.volumes_info([vol_id]) == []
    assert sorted(os.listdir(svc.cfg.run_dir)) == before


def test_local_attach_of_an_unbound_loop_device_is_refused(
        loop_device, inproc_service):
    svc = inproc_service
    loop_device.detach()
    if loop_device.current_backing() is not None:
        pytest.skip("another process took {}".format(loop_device.path))
    vol_id = new_id()
    ci = {"driver_volume_type": "local",
          "data": {"device_path": loop_device.path}}

    with pytest.raises(errors.InvalidParams) as e:
        svc.attach_volume(vol_id, ci, SD)

    assert str(e.value) == (
        "Invalid parameter connection_info.data.device_path: {} has no "
        "media (0 bytes: an unbound loop device, a DRBD minor not set "
        "up)".format(loop_device.path))
    assert svc.volumes_info([vol_id]) == []


# Identity: what the device at a path is

def test_identity_of_a_loop_device_names_its_dev_diskseq_and_backing_file(
        loop_device):
    ident = devices.identity(loop_device.path)
    st = os.stat(loop_device.path)
    assert ident["dev"] == "{}:{}".format(os.major(st.st_rdev),
                                          os.minor(st.st_rdev))
    assert ident["backing"] == loop_device.backing
    assert int(ident["diskseq"]) > 0
    assert "wwn" not in ident


def test_identity_of_what_is_not_a_block_device_is_none(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert devices.identity(str(f)) is None
    assert devices.identity(str(tmp_path / "missing")) is None


def test_a_loop_minor_given_another_file_is_another_device(
        loop_device, tmp_path):
    before = devices.identity(loop_device.path)
    first = loop_device.backing
    other = tmp_path / "other.img"
    loop_device.reattach(str(other))
    after = devices.identity(loop_device.path)
    assert after["dev"] == before["dev"]
    assert devices.changed(before, after, same_boot=True) == \
        "backing {} (recorded {})".format(other, first)
    # The backing file is a fact of every boot.
    assert devices.changed(before, after, same_boot=False)


@pytest.mark.parametrize("recorded, current, same_boot, differs", [
    # Persistent facts decide alone, in any boot.
    ({"dev": "8:0", "wwn": "naa.1"}, {"dev": "8:16", "wwn": "naa.1"},
     True, None),
    ({"dev": "8:0", "wwn": "naa.1"}, {"dev": "8:0", "wwn": "naa.2"},
     False, "wwn naa.2 (recorded naa.1)"),
    ({"dev": "8:0", "serial": "S1"}, {"dev": "8:0"},
     True, "serial none (recorded S1)"),
    # The WWN before the serial (an NVMe serial is the controller's: a
    # target re-creating its subsystem gives the namespace a new one).
    ({"dev": "259:0", "wwn": "eui.1", "serial": "S1"},
     {"dev": "259:3", "wwn": "eui.1", "serial": "S2"}, False, None),
    ({"dev": "259:0", "wwn": "eui.1", "serial": "S1"},
     {"dev": "259:0", "wwn": "eui.2", "serial": "S1"}, True,
     "wwn eui.2 (recorded eui.1)"),
    # Without them, MAJ:MIN and diskseq, within the recording boot only.
    ({"dev": "252:0", "diskseq": "9"}, {"dev": "252:0", "diskseq": "12"},
     True, "diskseq 12 (recorded 9)"),
    ({"dev": "252:0", "diskseq": "9"}, {"dev": "252:1", "diskseq": "3"},
     False, None),
    # Nothing recorded, or nothing there: nothing to tell.
    (None, {"dev": "8:0"}, True, None),
    ({"dev": "8:0"}, None, True, None),
])
def test_changed_compares_the_facts_that_hold(recorded, current, same_boot,
                                              differs):
    assert devices.changed(recorded, current, same_boot) == differs


# The kept descriptors of mountinfo and swaps (devices._HostUse)

def proc_fds():
    """The descriptors of this process open on a mountinfo or swaps."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if target.endswith("/mountinfo") or target == "/proc/swaps":
            found.add(int(name))
    return found


def fd_of(host, path):
    return next(fd for fd, kept in host._fds.items() if kept[0] == path)


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def host(monkeypatch, loop_device):
    """A fresh cache of mounts and swaps, read once."""
    h = devices._HostUse()
    monkeypatch.setattr(devices, "_host", h)
    assert devices.in_use(loop_device.path) is None
    assert len(h._fds) == 2
    yield h
    for fd in list(h._fds):
        if fd in proc_fds():
            os.close(fd)
    h._forget()         # its after-fork handler lives on


def test_a_kept_number_given_to_a_regular_file_is_not_trusted(
        host, loop_device, tmp_path):
    run("mkfs.ext4", "-q", "-F", loop_device.path)
    fd = fd_of(host, "/proc/self/mountinfo")
    os.close(fd)                            # some other code closes it
    other = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT)
    try:
        if other != fd:
            pytest.skip("another thread took the number")
        with mounted_at(loop_device.path, tmp_path / "mnt") as reason:
            assert devices.in_use(loop_device.path) == reason
        assert os.fstat(other).st_ino == os.stat(str(tmp_path / "f")).st_ino
        assert other not in host._fds and len(host._fds) == 2
    finally:
        os.close(other)


def test_a_kept_number_given_to_a_broken_pipe_is_left_to_its_owner(
        host, loop_device):
    fd = fd_of(host, "/proc/self/mountinfo")
    r, w = os.pipe()
    os.dup2(w, fd)                          # closes ours, the pipe's now
    os.close(w)
    os.close(r)                             # the write end: POLLERR
    try:
        # Its read fails (a pipe has no offset to pread at): neither that
        # nor the reopening closes it.
        assert devices.in_use(loop_device.path) is None
        assert is_open(fd) and fd not in host._fds and len(host._fds) == 2
    finally:
        os.close(fd)


class PollThen:
    """A kept poll object whose next poll first runs ``action``: what
    other code may do between the check's start and its poll."""

    def __init__(self, poll, action):
        self._poll = poll
        self._action = action

    def poll(self, timeout):
        self._action()
        return self._poll.poll(timeout)

    def register(self, *args):
        self._poll.register(*args)

    def unregister(self, fd):
        self._poll.unregister(fd)


def test_a_kept_number_given_to_another_file_just_before_the_poll_is_seen(
        host, loop_device, tmp_path):
    # Checked before the poll, the number was still ours; polled, it was
    # a regular file's (never flagged): the mount went unseen.
    run("mkfs.ext4", "-q", "-F", loop_device.path)
    fd = fd_of(host, "/proc/self/mountinfo")
    other = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT)

    def take_the_number():
        os.dup2(other, fd)      # closes ours (its flag with it)

    host._poll = PollThen(host._poll, take_the_number)
    try:
        with mounted_at(loop_device.path, tmp_path / "mnt") as reason:
            assert devices.in_use(loop_device.path) == reason
        assert is_open(fd) and fd not in host._fds and len(host._fds) == 2
        assert os.fstat(fd).st_ino == os.fstat(other).st_ino
    finally:
        os.close(other)
        if fd not in host._fds:
            os.close(fd)


def test_reading_a_kept_number_leaves_the_files_offset_alone(
        host, loop_device, tmp_path):
    # Another open of mountinfo that took the number passes the identity
    # check (module docstring): its owner's offset is not moved.
    fd = fd_of(host, "/proc/self/mountinfo")
    other = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    os.read(other, 10)
    os.dup2(other, fd)
    os.close(other)
    mnt = tmp_path / "m"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "none", str(mnt))   # flags it: read
    try:
        st = os.stat(str(mnt))
        mounts, _ = devices._host.now()
        assert mounts.get(os.major(st.st_dev), os.minor(st.st_dev)) == \
            str(mnt)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 10
    finally:
        run("umount", str(mnt))


def test_a_kept_descriptor_closed_under_us_leaks_nothing(host, loop_device):
    before = proc_fds()
    kept = set(host._fds)
    os.close(fd_of(host, "/proc/self/mountinfo"))   # POLLNVAL
    assert devices.in_use(loop_device.path) is None
    assert len(host._fds) == 2
    # The swaps descriptor, still open, was closed before opening anew.
    assert proc_fds() == (before - kept) | set(host._fds)


def test_a_failed_read_falls_back_to_reading_at_every_check(
        host, loop_device, tmp_path, monkeypatch):
    run("mkfs.ext4", "-q", "-F", loop_device.path)
    fd = fd_of(host, "/proc/self/mountinfo")
    read_fd = devices._read_fd
    failed = []

    def fail_once(n):
        if n == fd and not failed:
            failed.append(n)
            raise OSError(errno.EIO, "I/O error")
        return read_fd(n)

    monkeypatch.setattr(devices, "_read_fd", fail_once)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", loop_device.path, str(mnt))    # flags it: read again
    try:
        expected = "{} is mounted at {}".format(
            os.path.basename(loop_device.path), mnt)
        assert devices.in_use(loop_device.path) == expected
        assert failed and list(host._fds.values())[0][0] == "/proc/swaps"
        assert len(host._fds) == 1 and not is_open(fd)
        assert devices.in_use(loop_device.path) == expected
    finally:
        run("umount", str(mnt))
    assert devices.in_use(loop_device.path) is None


def test_a_child_forked_while_the_lock_is_held_checks_and_closes_ours(
        host, loop_device):
    inherited = list(host._fds)
    with host._lock:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if not any(is_open(fd) for fd in inherited) and \
                        host._lock.acquire(blocking=False):
                    host._lock.release()
                    if devices.in_use(loop_device.path) is None and \
                            len(host._fds) == 2:
                        code = 0
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert all(is_open(fd) for fd in inherited)
    assert devices.in_use(loop_device.path) is None


# Swap areas by device number



def test_a_device_swapped_on_through_a_node_of_another_name_is_in_use(
        loop_device, tmp_path):
    st = os.stat(loop_device.path)
    node = str(tmp_path / "myswap")
    os.mknod(node, 0o600 | stat.S_IFBLK, st.st_rdev)
    assert devices.in_use(loop_device.path) is None     # read and kept
    with swapped_on(loop_device.path, node):
        assert devices.in_use(loop_device.path) == \
            swap_reason(loop_device.path)
    assert devices.in_use(loop_device.path) is None


def test_a_device_swapped_on_through_a_removed_node_is_in_use(
        loop_device, tmp_path):
    # /proc/swaps then says "/x/loop3\040(deleted)": the number is lost,
    # the name is the kernel's.
    st = os.stat(loop_device.path)
    name = os.path.basename(loop_device.path)
    (tmp_path / "x y").mkdir()
    node = str(tmp_path / "x y" / name)
    os.mknod(node, 0o600 | stat.S_IFBLK, st.st_rdev)
    with swapped_on(loop_device.path, node):
        os.unlink(node)
        with open("/proc/swaps") as f:
            assert "\\040(deleted)" in f.read()
        assert devices.in_use(loop_device.path) == \
            swap_reason(loop_device.path)
    assert devices.in_use(loop_device.path) is None


def test_a_device_swapped_on_through_a_name_that_is_not_utf8_is_in_use(
        loop_device, tmp_path):
    # Decoded with "replace", the path could not be stat'ed again: the
    # device was known by neither its number nor its name.
    st = os.stat(loop_device.path)
    node = os.path.join(str(tmp_path), os.fsdecode(b"swap\xff\xfe"))
    os.mknod(node, 0o600 | stat.S_IFBLK, st.st_rdev)
    assert devices.in_use(loop_device.path) is None     # read and kept
    with swapped_on(loop_device.path, node):
        with open("/proc/swaps", "rb") as f:
            assert b"swap\xff\xfe" in f.read()
        assert devices.in_use(loop_device.path) == \
            swap_reason(loop_device.path)
    assert devices.in_use(loop_device.path) is None


def test_swaps_are_known_by_number_and_escaped_names_are_read():
    text = ("Filename\tType\tSize\tUsed\tPriority\n"
            "/nonexistent/a\\040b/loop9\\040(deleted)  partition\t8\t0\t-2\n"
            "/nonexistent/swapfile  file\t8\t0\t-3\n"
            "/dev/null  partition\t8\t0\t-4\n")
    swaps = devices._Swaps(text)
    assert swaps.holds((7, 99), "loop9")
    assert not swaps.holds((7, 99), "loop9 (deleted)")
    assert not swaps.holds((7, 98), "loop8")
    assert devices._unescape("a\\040b\\011c\\134d") == "a b\tc\\d"


def test_a_swap_entry_is_known_by_its_name_even_when_it_stats_as_a_device(
        loop_device):
    # Stat'ed in the agent's view of /dev, the swapper's path may name
    # another number (a container's remapped nodes): its name still
    # refuses the device the kernel calls so.
    text = ("Filename\tType\tSize\tUsed\tPriority\n"
            "{}  partition\t8\t0\t-2\n".format(loop_device.path))
    swaps = devices._Swaps(text)
    st = os.stat(loop_device.path)
    assert swaps.holds((os.major(st.st_rdev), os.minor(st.st_rdev)), "x")
    assert swaps.holds((999, 999), os.path.basename(loop_device.path))
