"""Sparse volume files and the loop devices in front of them.

The storage half of ``filedriver``, kept free of cinder so that it can be
tested (and reused) without importing cinder.

Copies
------
``copy`` first asks the filesystem to share the extents (the FICLONE ioctl:
XFS, btrfs, bcachefs; instant and no space used).  Where it cannot (ext4,
tmpfs: EOPNOTSUPP/EINVAL/EXDEV...), it copies only the data extents::

    src   |##data##|......hole......|#data#|....hole....|
           SEEK_DATA^      SEEK_HOLE^ ...
    dst   |##data##|......hole......|#data#|....hole....|  (same size)

so an empty 10 GiB volume copies in microseconds and stays empty.

Loop devices
------------
A loop device is found by its backing file in sysfs
(``/sys/block/loopN/loop/backing_file``), so nothing has to remember which
device belongs to which file: after a crash the next delete still finds
and detaches it.  ``losetup -c`` makes a grown file's device grow online.
"""

import errno
import fcntl
import glob
import logging
import os
import subprocess

log = logging.getLogger(__name__)

# From <linux/fs.h>: _IOW(0x94, 9, int).
FICLONE = 0x40049409

# Errors meaning "this filesystem / pair of files cannot share extents".
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
               errno.ENOSYS, errno.EPERM, errno.EBADF)


class CommandFailed(Exception):

    def __init__(self, cmd, rc, err):
        self.cmd = cmd
        self.rc = rc
        self.err = err
        super().__init__("{} failed (exit {}): {}".format(
            " ".join(cmd), rc, err))


def create(path, size):
    """Create a new sparse file of ``size`` bytes (fails if it exists).

    A file this call created but could not size (too large for the
    filesystem: EFBIG; no space) is removed: left behind, it made every
    retry of the same volume fail with "File exists".
    """
    with open(path, "xb") as f:
        try:
            os.ftruncate(f.fileno(), size)
        except BaseException:
            remove(path)
            raise


def grow(path, size):
    """Make ``path`` at least ``size`` bytes; never shrinks."""
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size < size:
            os.ftruncate(f.fileno(), size)


def copy(src, dst, reflink=True):
    """Copy ``src`` to a new file ``dst``; return "reflink" or "sparse"."""
    with open(src, "rb") as s, open(dst, "xb") as d:
        if reflink:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
                log.info("Reflinked %s to %s", src, dst)
                return "reflink"
            except OSError as e:
                if e.errno not in _NO_REFLINK:
                    raise
        size = os.fstat(s.fileno()).st_size
        copied = sparse_copy(s.fileno(), d.fileno(), size)
        os.ftruncate(d.fileno(), size)
        log.info("Copied %s to %s (%d data bytes of %d)", src, dst, copied,
                 size)
        return "sparse"


def sparse_copy(src_fd, dst_fd, size):
    """Copy the data extents of ``src_fd`` to the same offsets of ``dst_fd``.

    Holes are skipped (they stay holes in a fresh ``dst``).  Returns the
    number of bytes copied.
    """
    copied = 0
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # only a hole after offset
                break
            raise
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        pos = start
        while pos < end:
            n = os.copy_file_range(src_fd, dst_fd, end - pos, pos, pos)
            if n == 0:
                break
            pos += n
        copied += pos - start
        offset = end
    return copied


def remove(path):
    """Remove ``path``; a missing file is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        log.debug("%s already removed", path)


def loop_devices(path):
    """The loop devices backed by ``path`` (sorted device paths)."""
    devices = []
    real = os.path.realpath(path)
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().rstrip("\n")
        except OSError:
            continue    # detached meanwhile
        if name.endswith(" (deleted)"):
            name = name[:-len(" (deleted)")]
        if name == real:
            devices.append("/dev/" + backing.split("/")[3])
    return sorted(devices)


def loop_attach(path):
    """Attach ``path`` to a free loop device and return the device path."""
    dev = run("losetup", "--find", "--show", path).strip()
    log.info("Attached %s to loop device %s", path, dev)
    return dev


def loop_resize(dev):
    """Make ``dev`` see its backing file's new size (online)."""
    run("losetup", "-c", dev)


def loop_detach(dev):
    """Detach ``dev``; one detached by someone else meanwhile is fine."""
    log.info("Detaching loop device %s", dev)
    try:
        run("losetup", "-d", dev)
    except CommandFailed:
        name = os.path.basename(dev)
        if os.path.exists("/sys/block/{}/loop/backing_file".format(name)):
            raise


def run(*cmd):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        raise CommandFailed(cmd, p.returncode, p.stderr.strip())
    return p.stdout
