"""Which block devices a ``local`` attach may hand to a VM, and how big a
device is (``size``, read after attach and extend).

os-brick's ``local`` connector hands over whatever ``device_path`` it is
given, and attach then gives the device to qemu's user with a udev rule
(and a ``managed_path`` link to it).  Any holder of the engine's
certificate can call attach, so a request naming ``/etc/shadow``,
``/dev/console`` or ``/dev/sda`` (the host's root disk) must fail before
anything happens.  ``check_local(path, patterns)`` allows a path only
when:

- it exists and, after resolving links, is a block device (not a file,
  a directory, a character device such as a tty, /proc or /sys entries);
- the path as given or the device it resolves to matches one of the
  configured patterns (``[volumes] local_devices``; by default what
  LINSTOR/DRBD hands out, ``/dev/drbd/by-res/...`` and ``/dev/drbdN``;
  loop devices too in ``--state-dir`` mode);
- the host does not use it (``in_use``).

A device is in use when it, or any of its partitions:

- holds a mounted filesystem (``/proc/self/mountinfo``, by MAJ:MIN),
- is an active swap area (``/proc/swaps``),
- has holders (``/sys/dev/block/MAJ:MIN/holders``: device-mapper, LVM,
  md RAID built on it).

``in_use`` examines only block devices.

The device's identity (``identity``, ``changed``): names under /dev are
reused.  A loop device is detached and another file attached on the same
minor, a SCSI LUN number is given to another volume, ``dm-N`` and ``rbdN``
are numbered afresh at each boot.  Disconnecting or chown-ing "whatever is
at the recorded path" then hits a device that belongs to something else
(the class of Nova's OSSA-2023-003, where a reused LUN was flushed and
removed under another instance).  So attach records what the device *is*,
read from sysfs, and detach and re-attach compare it before touching it::

    wwn       the SCSI/NVMe WWN (sysfs ``wwid``, ``device/wwid``, or the
              multipath map's ``dm/uuid``): the same in every boot
    serial    the disk's serial (``serial``, ``device/serial``), likewise
    backing   a loop device's backing file
    dev       MAJ:MIN, and
    diskseq   the kernel's per-boot sequence number of the disk (Linux
              5.15+; a new one at each loop attach, each SCSI rescan):
              both only meaningful within the boot that recorded them

The persistent facts decide when they were recorded; otherwise, within the
recording boot, ``dev`` and ``diskseq`` do.  A record from another boot
without persistent facts cannot be compared, and is not claimed to differ.
"""

import errno
import fnmatch
import os
import stat

from . import errors

# Where the kernel describes block devices by MAJ:MIN (tests point it at a
# fake tree to give a fake device a WWN).
SYS_DEV_BLOCK = "/sys/dev/block"

# Identity facts that name the same device in every boot.
PERSISTENT = ("wwn", "serial", "backing")

# Where sysfs tells the identity facts of a device that is not a loop
# device (diskseq and a loop's backing file are read first): the first
# of each key's attributes that is there.
_FACTS = (
    ("wwn", ("wwid", "device/wwid", "dm/uuid")),
    ("serial", ("serial", "device/serial")),
)


def check_local(name, path, patterns):
    """Return the block device ``path`` resolves to, or raise
    InvalidParams (named ``name``) saying why a VM may not have it.

    ``path`` was checked by ``validate.device_path`` (absolute,
    normalised, no NUL).
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise errors.InvalidParams(
            name=name, reason="{} {}".format(
                _named(path, real), "does not exist"
                if e.errno == errno.ENOENT else "cannot be examined ({})"
                .format(e.strerror)))
    if not stat.S_ISBLK(st.st_mode):
        raise errors.InvalidParams(
            name=name, reason="{} is not a block device".format(
                _named(path, real)))
    if not any(fnmatch.fnmatchcase(p, pattern)
               for pattern in patterns for p in (path, real)):
        raise errors.InvalidParams(
            name=name, reason="{} is not an allowed local device: "
            "[volumes] local_devices allows {}".format(
                _named(path, real), ", ".join(patterns) or "none"))
    reason = _in_use((os.major(st.st_rdev), os.minor(st.st_rdev)))
    if reason:
        raise errors.InvalidParams(
            name=name, reason="{}: the host uses it, it cannot be given "
            "to a VM".format(reason))
    return real


def device_number(path):
    """(major, minor) of the block device at ``path``, None when it is
    missing or not a block device."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def device_number_of(identity):
    """(major, minor) of an ``identity``'s "dev"."""
    major, minor = identity["dev"].split(":")
    return int(major), int(minor)


def sysfs_path(major, minor, *names):
    """``/sys/dev/block/MAJ:MIN[/names...]``: the kernel's directory of a
    block device, by number."""
    return os.path.join(SYS_DEV_BLOCK, "{}:{}".format(major, minor), *names)


def in_use(path):
    """A sentence saying how the host uses the device at ``path``, or None
    when it is not a block device or the host does not use it."""
    number = device_number(path)
    if number is None:
        return None
    return _in_use(number)


def size(path):
    """The size in bytes of the device at ``path`` as the kernel sees it
    now, or None when it cannot be read.

    A block device's size is read from sysfs (``/sys/dev/block/MAJ:MIN/
    size``, in 512-byte sectors whatever the logical block size), which
    every user may read: no need to open the device, which belongs to
    qemu's user.  After a rescan (SCSI ``rescan``, ``multipathd resize
    map``, ``losetup -c``) it is the new size.  A regular file (the test
    connectors' stand-ins) is its length.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        return None
    try:
        return int(_read_sys(os.major(st.st_rdev), os.minor(st.st_rdev),
                             "size")) * 512
    except (TypeError, ValueError):
        return None


def identity(path):
    """What the block device at ``path`` is: {"dev", "diskseq"?, "wwn"?,
    "serial"?, "backing"?}; None when nothing, or no block device, is
    there."""
    number = device_number(path)
    if number is None:
        return None
    major, minor = number
    ident = {"dev": "{}:{}".format(major, minor)}
    diskseq = _read_sys(major, minor, "diskseq")
    if diskseq:
        ident["diskseq"] = diskseq
    backing = _read_sys(major, minor, "loop/backing_file")
    if backing:
        # A bound loop device: the loop driver's disk has no wwid,
        # serial, dm or device of its own; nothing more to look for.
        ident["backing"] = backing
        return ident
    for key, names in _FACTS:
        for name in names:
            value = _read_sys(major, minor, name)
            if value:
                ident[key] = value
                break
    return ident


def changed(recorded, current, same_boot):
    """Why ``current`` (an ``identity``) is not the device ``recorded``,
    or None when it is (or when nothing allows telling).

    ``same_boot``: whether ``recorded`` was taken in the current boot
    (only then do MAJ:MIN and diskseq mean anything).
    """
    if not recorded or not current:
        return None
    persistent = [k for k in PERSISTENT if recorded.get(k)]
    if persistent:
        keys = persistent
    elif same_boot:
        keys = [k for k in ("dev", "diskseq") if recorded.get(k)]
    else:
        return None
    diffs = ["{} {} (recorded {})".format(
        k, current.get(k) or "none", recorded[k])
        for k in keys if current.get(k) != recorded[k]]
    return ", ".join(diffs) or None


# Private helpers

def _in_use(number):
    """``in_use`` of the block device numbered ``number``."""
    disk = _kernel_name(*number)
    devices = [(number, disk)] + _partitions(*number, disk)
    mountinfo = _read_text("/proc/self/mountinfo")
    swaps = _swaps()
    for (major, minor), name in devices:
        where = _mount_point(mountinfo, major, minor)
        if where:
            return "{} is mounted at {}".format(name, where)
        if name in swaps:
            return "{} is an active swap area".format(name)
        holders = _holders(major, minor)
        if holders:
            return "{} is held by {}".format(name, ", ".join(holders))
    return None


def _named(path, real):
    if real == path:
        return path
    return "{} (-> {})".format(path, real)


def _read_sys(major, minor, name):
    # os.read, not open(): no buffered text file (and its isatty ioctl)
    # for each of the few bytes of a sysfs attribute.
    try:
        fd = os.open(sysfs_path(major, minor, name),
                     os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def _kernel_name(major, minor):
    # /sys/dev/block/MAJ:MIN links to the device's directory, named for it.
    path = sysfs_path(major, minor)
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return "{}:{}".format(major, minor)


def _partitions(major, minor, disk):
    """((major, minor), name) of every partition of the disk named
    ``disk``.

    The kernel names a partition after its disk (``sda1``, ``loop0p1``,
    ``nvme0n1p1``: block/partitions/core.c, add_partition), and lists it
    as a directory of that name in the disk's sysfs directory: only those
    names are looked at, not the disk's two dozen attribute files.
    """
    found = []
    top = sysfs_path(major, minor)
    try:
        names = os.listdir(top)
    except OSError:
        return found
    for name in names:
        if not name.startswith(disk) or name == disk:
            continue
        part = top + "/" + name
        if os.path.exists(part + "/partition"):
            try:
                with open(part + "/dev") as f:
                    ma, mi = f.read().strip().split(":")
                found.append(((int(ma), int(mi)), name))
            except (OSError, ValueError):
                continue
    return found


def _mount_point(mountinfo, major, minor):
    """Where the filesystem on device ``major:minor`` is mounted first,
    from the text of /proc/self/mountinfo (None: not mounted).

    Each line is "ID PARENT MAJ:MIN ROOT MOUNTPOINT ..."
    (proc_pid_mountinfo(5)): the device's " MAJ:MIN " is searched for in
    the whole text, and only a line holding it is split, so that a host
    with thousands of mounts costs one scan, not a split of every line.
    """
    needle = " {}:{} ".format(major, minor)
    start = 0
    while True:
        at = mountinfo.find(needle, start)
        if at < 0:
            return None
        line_start = mountinfo.rfind("\n", 0, at) + 1
        line_end = mountinfo.find("\n", at)
        if line_end < 0:
            line_end = len(mountinfo)
        fields = mountinfo[line_start:line_end].split()
        if len(fields) > 4 and fields[2] == needle.strip():
            return fields[4]
        start = at + 1


def _swaps():
    """Kernel names of active swap devices."""
    names = set()
    for line in _read_text("/proc/swaps").splitlines()[1:]:
        fields = line.split()
        if fields:
            names.add(os.path.basename(os.path.realpath(fields[0])))
    return names


def _read_text(path):
    """The whole text of a /proc file ("" when it cannot be read):
    os.read until the end, no buffered text file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _holders(major, minor):
    try:
        return sorted(os.listdir(sysfs_path(major, minor, "holders")))
    except OSError:
        return []
