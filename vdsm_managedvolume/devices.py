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
- it has media (its size is not 0: an unbound loop device, a DRBD
  minor not set up, would give the VM a 0-byte disk);
- the host does not use it (``in_use``).

A device is in use when it, or any of its partitions:

- holds a mounted filesystem (``/proc/self/mountinfo``, by MAJ:MIN),
- is an active swap area (``/proc/swaps``, by MAJ:MIN of the path
  swapon was given, whatever its name: ``_Swaps``),
- has holders (``/sys/dev/block/MAJ:MIN/holders``: device-mapper, LVM,
  md RAID built on it).

``in_use`` examines only block devices.

Mounts and swaps are read once and read again only when they change.
Reading and parsing ``/proc/self/mountinfo`` at every attach costs more
than the rest of the check (a host with many mounts: far more), so both
files are kept open and ``poll()``-ed first: the kernel flags the open
file (POLLPRI|POLLERR) after a mount or umount in this mount namespace
(fs/proc_namespace.c, ``mounts_poll``) and after a swapon or swapoff
(mm/swapfile.c, ``swaps_poll``), before that system call returns.  So a
device mounted or swapped on a moment before the check is seen, as when
the file was read every time.  The flag is the open file's, cleared by
the poll that reports it: one lock covers the poll and the reading it
calls for, so that no thread uses the old text after another thread's
poll saw the change.  A file that is not the kernel's own (``/proc/swaps``
overlaid by a FUSE file system such as lxcfs in a container: nothing
flags it) is read at every check, as is one that cannot be kept open.
A descriptor number is not trusted for ever: other code in the process
may close it and the number go to another file (a regular file is never
flagged, and the old text would be used for ever; a pipe in error state
is flagged at every poll).  So each check fstat()s the kept descriptors
and compares (st_dev, st_ino) with what they were at open, *after* the
poll and the reads it called for, not before: a number closed under us
never is our open file again, so one that is ours after them was ours
for them (checked before, the number could change hands in between, and
the poll or the read be another file's).  Three system calls when
nothing changed (poll, two fstat), as many as when the fstat came first.
The reads are pread()s from offset 0: no lseek, and a file that took the
number keeps its owner's offset.  On a difference, or a descriptor poll
says is closed, both files are opened afresh and what was read is
dropped, and only a descriptor that is still the file opened is closed
(never another component's).  A forked child opens its own (the flag is
shared with the parent's open file), closes the inherited ones that are
still ours and takes a new lock (a parent's thread may have held it at
fork).  Another open of the very same /proc file given the number would
pass the comparison; nothing short of kcmp(2) tells.

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
import functools
import os
import re
import select
import stat
import threading

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
    real, st = _real_path(path)
    if st is None:
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
    allowed = _matcher(tuple(patterns))
    if not (allowed(path) or real != path and allowed(real)):
        raise errors.InvalidParams(
            name=name, reason="{} is not an allowed local device: "
            "[volumes] local_devices allows {}".format(
                _named(path, real), ", ".join(patterns) or "none"))
    if size(real, st) == 0:
        # A VM would get a 0-byte disk, and the next ``losetup -f`` on
        # the host binds exactly this loop device.
        raise errors.InvalidParams(
            name=name, reason="{} has no media (0 bytes: an unbound loop "
            "device, a DRBD minor not set up)".format(_named(path, real)))
    reason = _in_use((os.major(st.st_rdev), os.minor(st.st_rdev)))
    if reason:
        raise errors.InvalidParams(
            name=name, reason="{}: the host uses it, it cannot be given "
            "to a VM".format(reason))
    return real


def examine(path):
    """``os.stat`` of ``path`` (links followed), None when nothing is
    there or it cannot be examined.

    After a connect the service stats the device once and hands the
    result to ``identity``, ``size`` and the udev trigger (``block_number``).
    """
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def block_number(st):
    """(major, minor) of a block device from its ``examine`` result; None
    when ``st`` is None or not a block device."""
    if st is None or not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def device_number(path):
    """(major, minor) of the block device at ``path``, None when it is
    missing or not a block device."""
    return block_number(examine(path))


def device_number_of(identity):
    """(major, minor) of an ``identity``'s "dev"."""
    major, minor = identity["dev"].split(":")
    return int(major), int(minor)


def sysfs_path(major, minor, *names):
    """``/sys/dev/block/MAJ:MIN[/names...]``: the kernel's directory of a
    block device, by number."""
    # "/".join, not os.path.join: nine calls per attach+detach, and the
    # names are relative ("loop/backing_file").
    return "/".join((SYS_DEV_BLOCK, "{}:{}".format(major, minor)) + names)


def in_use(path):
    """A sentence saying how the host uses the device at ``path``, or None
    when it is not a block device or the host does not use it."""
    number = device_number(path)
    if number is None:
        return None
    return _in_use(number)


def size(path, st=None):
    """The size in bytes of the device at ``path`` as the kernel sees it
    now, or None when it cannot be read (``st``: its ``examine``, when
    the caller has it).

    A block device's size is read from sysfs (``/sys/dev/block/MAJ:MIN/
    size``, in 512-byte sectors whatever the logical block size), which
    every user may read: no need to open the device, which belongs to
    qemu's user.  After a rescan (SCSI ``rescan``, ``multipathd resize
    map``, ``losetup -c``) it is the new size.  A regular file (the test
    connectors' stand-ins) is its length.
    """
    if st is None:
        st = examine(path)
        if st is None:
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


def identity(path, st=None):
    """What the block device at ``path`` is: {"dev", "diskseq"?, "wwn"?,
    "serial"?, "backing"?}; None when nothing, or no block device, is
    there (``st``: its ``examine``, when the caller has it)."""
    found = block_number(examine(path) if st is None else st)
    if found is None:
        return None
    major, minor = found
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
    # The most specific persistent fact recorded decides alone: a WWN
    # names the LU or namespace, while an NVMe serial is its
    # controller's, which a target re-creating its subsystem (Linux
    # nvmet draws it at random) changes for the same namespace.
    persistent = [k for k in PERSISTENT if recorded.get(k)][:1]
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
    mounts, swaps = _host.now()
    for (major, minor), name in devices:
        where = mounts.get(major, minor)
        if where:
            return "{} is mounted at {}".format(name, where)
        if swaps.holds((major, minor), name):
            return "{} is an active swap area".format(name)
        holders = _holders(major, minor)
        if holders:
            return "{} is held by {}".format(name, ", ".join(holders))
    return None


def _real_path(path):
    """(``os.path.realpath(path)``, its ``os.stat`` or None).

    A normalised absolute path none of whose components is a symbolic
    link is its own real path: then one ``os.lstat`` of each component
    (what realpath makes, without its bookkeeping) tells it, and the
    last one is the device's stat (not a link: the same as ``os.stat``).
    Any other path, and any error, is realpath's (the stat None).
    """
    if path[:1] == "/" and "//" not in path and "/." not in path \
            and path[-1:] != "/":
        end = 0
        try:
            while True:
                end = path.find("/", end + 1)
                st = os.lstat(path if end < 0 else path[:end])
                if stat.S_ISLNK(st.st_mode):
                    break
                if end < 0:
                    return path, st
        except (OSError, ValueError):
            pass
    return os.path.realpath(path), None


@functools.lru_cache(maxsize=16)
def _matcher(patterns):
    """A function telling whether a path matches one of the shell
    ``patterns`` (``fnmatch.fnmatchcase``): one regular expression for
    all of them, compiled once per tuple of patterns."""
    if not patterns:
        return lambda path: False
    try:
        match = re.compile("|".join(
            "(?:{})".format(fnmatch.translate(p)) for p in patterns)).match
    except re.error:
        return lambda path: any(fnmatch.fnmatchcase(path, p)
                                for p in patterns)
    return lambda path: match(path) is not None


def _named(path, real):
    if real == path:
        return path
    return "{} (-> {})".format(path, real)


def _read_sys(major, minor, name):
    """A sysfs attribute of the device, stripped; None when it is absent
    or unreadable.  An attribute is a page at most: one read."""
    data = _read_file(sysfs_path(major, minor, name), to_end=False)
    try:
        return None if data is None else data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


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
                ma, mi = _read_file(part + "/dev", to_end=False).split(b":")
                found.append(((int(ma), int(mi)), name))
            except (AttributeError, ValueError):
                continue
    return found


class _Mounts:
    """Where each device is mounted, from one text of
    /proc/self/mountinfo: each device's answer is searched for once
    (``_mount_point``) and remembered with the text."""

    def __init__(self, mountinfo):
        self._text = mountinfo
        self._found = {}

    @classmethod
    def of(cls, data):
        """From the bytes of /proc/self/mountinfo (None: unreadable)."""
        return cls(_text(data))

    def get(self, major, minor):
        """Where the filesystem on ``major:minor`` is mounted first, or
        None."""
        key = (major, minor)
        try:
            return self._found[key]
        except KeyError:
            where = self._found[key] = _mount_point(self._text, major, minor)
            return where


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


class _Swaps:
    """The active swap devices, from one text of /proc/swaps.

    Each line's first field is the path swapon was given, as the kernel
    prints it (seq_file_path: a space, tab, newline or backslash as
    ``\\ooo``; " (deleted)" after the name of a removed node; other bytes
    as they are, UTF-8 or not: ``of`` decodes them as ``os.fsdecode``
    does, so that a path that is not UTF-8 is still stat'ed).  A device
    is known by its number, whatever node it was swapped on through
    (``mknod /x/myswap b 7 3; swapon /x/myswap`` is loop3): each path is
    stat'ed once, when the text is read.  A path that cannot be stat'ed
    (a removed node, another mount namespace's) is known by its name
    only, as the kernel would name the device: a node of another name
    that is gone since cannot be told.  Every entry is known by its name
    as well (a swap file's names no disk): the path is stat'ed in this
    process's view of /dev, which may differ from the swapper's.
    """

    def __init__(self, text):
        self.numbers = set()
        self.names = set()
        for line in text.splitlines()[1:]:
            fields = line.split()
            if not fields:
                continue
            path = _unescape(fields[0])
            deleted = path.endswith(_DELETED)
            if deleted:
                path = path[:-len(_DELETED)]
            number = device_number(path)
            if number is not None:
                self.numbers.add(number)
            # The name too, always: the path is the swapper's, stat'ed
            # from this process's view of /dev, which may map the name to
            # another number (a container's remapped nodes); a name that
            # matches wrongly only refuses a device, the safe side.
            self.names.add(os.path.basename(os.path.realpath(path)))

    @classmethod
    def of(cls, data):
        """From the bytes of /proc/swaps (None: unreadable)."""
        return cls("" if data is None else os.fsdecode(data))

    def holds(self, number, name):
        """Whether the device ``number``, named ``name`` by the kernel,
        is an active swap area."""
        return number in self.numbers or name in self.names


_DELETED = " (deleted)"


def _unescape(field):
    """A path as seq_file_path printed it, its ``\\ooo`` escapes undone."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})",
                  lambda m: chr(int(m.group(1), 8)), field)


class _HostUse:
    """The host's mounts and swaps, read again only when they change
    (see the module docstring)."""

    FILES = (("/proc/self/mountinfo", _Mounts.of), ("/proc/swaps", _Swaps.of))

    def __init__(self):
        self._lock = threading.Lock()
        self._forget()
        os.register_at_fork(after_in_child=self._after_fork)

    def now(self):
        """(mounts, swaps) as they are now: a ``_Mounts`` and a
        ``_Swaps``."""
        with self._lock:
            if self._poll is None:
                self._open()
            elif self._fds:
                self._check()
            return tuple(
                self._values[path] if path in self._values
                else parse(_read_file(path))
                for path, parse in self.FILES)

    def _check(self):
        """Read again the kept files poll says changed, then make sure
        every kept number is still our file (see the module docstring:
        after, not before) before taking what was read."""
        read = []
        for fd, events in self._poll.poll(0):
            if events & select.POLLNVAL:
                # Closed under us: start afresh.
                self._reopen()
                return
            if events & (select.POLLPRI | select.POLLERR):
                read.append((fd, _read_kept(fd)))
        for fd, (_, _, fid) in self._fds.items():
            if _file_id(fd) != fid:
                # A number closed under us and given to another file:
                # nothing would flag a change any more, and what poll
                # said or a read returned may be that file's.
                self._reopen()
                return
        for fd, data in read:
            self._take(fd, data)

    def _forget(self):
        self._poll = None
        self._fds = {}          # fd -> (path, parse, _file_id at open)
        self._values = {}       # path -> parsed text

    def _close_ours(self):
        """Close the descriptors that are still the files we opened (a
        number closed under us may be another component's file by now:
        that one is left alone), and forget them all."""
        for fd, (_, _, fid) in list(self._fds.items()):
            if _file_id(fd) == fid:
                os.close(fd)
        self._forget()

    def _reopen(self):
        self._close_ours()
        self._open()

    def _after_fork(self):
        # A child: the flag is shared with the parent's open files, so it
        # opens its own; the inherited descriptors are its own references
        # (closing them leaves the parent's alone).  The lock may have
        # been held by a parent's thread that the child does not have.
        self._lock = threading.Lock()
        self._close_ours()

    def _open(self):
        self._poll = select.poll()
        proc = _st_dev("/proc/self")
        for path, parse in self.FILES:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue        # read at every check
            data = _read_kept(fd)
            fid = _file_id(fd)      # after the read, as in _check
            if proc is None or fid is None or fid[0] != proc:
                if fid is not None:
                    os.close(fd)    # not procfs: nothing flags a change
                continue
            self._fds[fd] = (path, parse, fid)
            self._poll.register(fd, select.POLLPRI | select.POLLERR)
            self._take(fd, data)

    def _take(self, fd, data):
        """Keep what was read from ``fd``, a number just checked to be
        our file; None (a failed read): close it, and read that file at
        every check from now on."""
        path, parse, _ = self._fds[fd]
        if data is None:
            self._poll.unregister(fd)
            del self._fds[fd]
            self._values.pop(path, None)
            os.close(fd)
            return
        self._values[path] = parse(data)


def _file_id(fd):
    """(st_dev, st_ino) of the file open at ``fd``, None when none is."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_host = _HostUse()


def _st_dev(path):
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def _read_file(path, to_end=True):
    """The bytes of a kernel file (/proc, /sys), None when it cannot be
    read.  ``to_end`` False: one read (a sysfs attribute)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_fd(fd) if to_end else os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_kept(fd):
    """The bytes of a kept file, None when it cannot be read."""
    try:
        return _read_fd(fd)
    except OSError:
        return None


def _read_fd(fd):
    """The bytes of the file at ``fd`` from its start: os.pread until the
    end (no buffered file object, and its isatty ioctl, for a few bytes
    of the kernel's; no lseek, and the file's offset left alone)."""
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _text(data):
    """/proc text from ``_read_file`` ("" when it could not be read); a
    byte that is not UTF-8 shown as U+FFFD (a mount point, in a
    message)."""
    return "" if data is None else data.decode("utf-8", "replace")


def _holders(major, minor):
    try:
        return sorted(os.listdir(sysfs_path(major, minor, "holders")))
    except OSError:
        return []
