"""Who writes the udev rules that give a volume's device to qemu.

A rule file goes into ``udev_rules_dir`` (/etc/udev/rules.d) and its
change event is triggered through the device's sysfs ``uevent``: both
need root.  The standalone agent runs as root and writes them itself
(``ServiceRules``); inside vdsmd the service runs as user vdsm and asks
the privsep daemon (``DaemonRules``), whose narrow entrypoints rebuild
each rule from the ids and the device path (brick.py).  ``[volumes]
udev_writer`` chooses (``choose``); both writers offer the same three
calls, so the service does not care which it has (``add`` takes the
device's (major, minor) when the service has just read it: the service's
writer then triggers it without another stat).
"""

import os

from . import config
from . import errors
from . import fileutil
from . import udev

WRITERS = config.UDEV_WRITERS


def choose(cfg):
    """Who writes the udev rules: "service" or "daemon".

    ``cfg.udev_writer``: "service" and "daemon" force it; "auto" (the
    default) is "service" when this process is root and may write
    ``udev_rules_dir`` (the standalone agent), else "daemon" (inside
    vdsmd, user vdsm: rule files and sysfs uevents need root).
    """
    mode = (cfg.udev_writer or "auto").strip().lower()
    if mode not in WRITERS:
        raise errors.ConfigError(
            "udev_writer = {!r}: expected one of {}".format(
                cfg.udev_writer, ", ".join(WRITERS)))
    if mode != "auto":
        return mode
    if os.geteuid() == 0 and _writable(cfg.udev_rules_dir):
        return "service"
    return "daemon"


class ServiceRules:
    """udev rules written by this process (root)."""

    def __init__(self, cfg):
        self._cfg = cfg

    def add(self, sd_id, vol_id, path, number=None, backing=None):
        try:
            udev.add_rule(self._cfg, sd_id, vol_id, path, number, backing)
        except udev.UnsafePath as e:
            raise errors.HelperFailed(str(e))
        udev.trigger(self._cfg, path, number=number)

    def remove(self, sd_id, vol_id):
        udev.remove_rule(self._cfg, sd_id, vol_id)

    def remove_temp(self, path):
        fileutil.rm_file(path)


class DaemonRules:
    """udev rules written by the privsep daemon (the service is not root).

    The daemon writes into the rules directory of its own configuration
    (written from the same managedvolume.conf), so reading them here
    (rule_ok, list_rules) sees what it wrote.
    """

    def __init__(self, brick):
        self._brick = brick

    def add(self, sd_id, vol_id, path, number=None, backing=None):
        # The daemon reads the device's number and attributes itself.
        self._brick.add_udev_rule(sd_id, vol_id, path)

    def remove(self, sd_id, vol_id):
        self._brick.remove_udev_rule(sd_id, vol_id)

    def remove_temp(self, path):
        ids = udev.parse_temp_name(os.path.basename(path))
        if ids is None:
            raise errors.HelperFailed(
                "{} is not a temp file of ours; not asking the privsep "
                "daemon to remove it".format(path))
        self._brick.remove_udev_rule(*ids, temp=True)


# Private helpers

def _writable(path):
    """Whether we may create files in ``path`` (or in the nearest existing
    parent, which makedirs would create it in)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return os.access(path, os.W_OK | os.X_OK)
