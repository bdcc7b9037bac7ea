"""Which boot of the host this is.

Every journal record carries the boot it was made in (the kernel's
``/proc/sys/kernel/random/boot_id``, a fresh UUID at each boot).  A record
made in another boot describes a connection that the reboot (or the fence)
ended, even when a device with the same name came back at boot (DRBD,
StorPool, FC LUNs, a local disk): such a record is never taken for an
attached volume (see ``service``).

vdsm tells the two apart by the volume's run link (vdsm PR #483, fixing
oVirt/vdsm#433: ``managedvolume._add_volume`` treats a database row without
its link under the tmpfs ``/run/vdsm/managedvolumes`` as left by a previous
boot).  We record the boot itself, so that the start-up reconcile, which
recreates missing links, cannot destroy the signal; the link test remains
for records written before the boot was recorded (vdsm's, or an older
version of this package).

The file is ``[paths] boot_id_file``, or ``$MANAGEDVOLUME_BOOT_ID_FILE``
when set.  The kernel's file is read once per process (its value cannot
change while a process lives: every attach and detach asks); any other
file is read at each use (a few microseconds): a test reboots a host by
writing a new id there and restarting the agent.
"""

import os

from . import errors

ENV_FILE = "MANAGEDVOLUME_BOOT_ID_FILE"

# A boot id is a UUID; anything printable up to this size is accepted so
# that tests may use readable names.
MAX_LENGTH = 64

# The kernel's boot id, fixed for the life of the process.
KERNEL_FILE = "/proc/sys/kernel/random/boot_id"
_kernel_boot_id = None


def id_file(cfg):
    """The file naming the current boot."""
    return os.environ.get(ENV_FILE) or cfg.boot_id_file


def current(cfg):
    """The current boot id; ConfigError naming the file when unreadable."""
    global _kernel_boot_id
    path = id_file(cfg)
    if path == KERNEL_FILE and _kernel_boot_id is not None:
        return _kernel_boot_id
    try:
        with open(path) as f:
            value = f.read(MAX_LENGTH + 1).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise errors.ConfigError(
            "cannot read the boot id from {} (boot_id_file, ${}): {}".format(
                path, ENV_FILE, e))
    if not value or len(value) > MAX_LENGTH or not value.isprintable():
        raise errors.ConfigError(
            "{} (boot_id_file, ${}) does not hold a boot id".format(
                path, ENV_FILE))
    if path == KERNEL_FILE:
        _kernel_boot_id = value
    return value
