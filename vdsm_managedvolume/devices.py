"""Whether a block device is in use by the host itself.

os-brick's ``local`` connector hands over whatever ``device_path`` it is
given, and attach then gives the device to qemu's user with a udev rule.
A request naming ``/dev/sda`` (the host's root disk) or a mounted loop
device would give a VM the host's own data.  Before a ``local`` attach the
service asks ``in_use(path)``; a device is in use when it, or any of its
partitions:

- holds a mounted filesystem (``/proc/self/mountinfo``, by MAJ:MIN),
- is an active swap area (``/proc/swaps``),
- has holders (``/sys/dev/block/MAJ:MIN/holders``: device-mapper, LVM,
  md RAID built on it).

Only block devices are examined; other paths are the connector's business
(and attach refuses a path that does not exist after connecting).
"""

import os
import stat


def in_use(path):
    """A sentence saying how the host uses the device at ``path``, or None
    when it is not a block device or the host does not use it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    devices = [(os.major(st.st_rdev), os.minor(st.st_rdev))]
    devices += _partitions(*devices[0])
    mounts = _mounted()
    swaps = _swaps()
    for major, minor in devices:
        name = _kernel_name(major, minor)
        where = mounts.get((major, minor))
        if where:
            return "{} is mounted at {}".format(name, where)
        if name in swaps:
            return "{} is an active swap area".format(name)
        holders = _holders(major, minor)
        if holders:
            return "{} is held by {}".format(name, ", ".join(holders))
    return None


# Private helpers

def _sys(major, minor, *names):
    return os.path.join("/sys/dev/block/{}:{}".format(major, minor), *names)


def _kernel_name(major, minor):
    try:
        return os.path.basename(os.path.realpath(_sys(major, minor)))
    except OSError:
        return "{}:{}".format(major, minor)


def _partitions(major, minor):
    """(major, minor) of every partition of a disk."""
    found = []
    top = _sys(major, minor)
    try:
        names = os.listdir(top)
    except OSError:
        return found
    for name in names:
        dev = os.path.join(top, name, "dev")
        if os.path.exists(os.path.join(top, name, "partition")):
            try:
                with open(dev) as f:
                    ma, mi = f.read().strip().split(":")
                found.append((int(ma), int(mi)))
            except (OSError, ValueError):
                continue
    return found


def _mounted():
    """{(major, minor): mount point} of mounted filesystems."""
    mounts = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                ma, mi = fields[2].split(":")
                mounts.setdefault((int(ma), int(mi)), fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return mounts


def _swaps():
    """Kernel names of active swap devices."""
    names = set()
    try:
        with open("/proc/swaps") as f:
            next(f, None)
            for line in f:
                path = line.split()[0]
                names.add(os.path.basename(os.path.realpath(path)))
    except (OSError, IndexError):
        pass
    return names


def _holders(major, minor):
    try:
        return sorted(os.listdir(_sys(major, minor, "holders")))
    except OSError:
        return []
