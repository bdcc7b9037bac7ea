"""A block device already on the host (DRBD/LINSTOR, a loop device).

os-brick's local connector returns whatever ``device_path`` it is given,
and the udev rule would then give that device to qemu's user: the path
must name an allowed block device the host does not use
(``devices.check_local``, ``[volumes] local_devices``) before anything
happens, even with a vendor adapter.  The rule matches the device by its
kernel name (or by the link, when ``device_path`` is one).

Size refresh (os-brick's ``extend_volume``): nothing is rescanned; the
connector reads the device's size (``blockdev --getsize64``).  A device
that must be told its new size does it itself (DRBD), or is told by
whoever grew it (``losetup -c`` for a loop device's grown file).
"""

from .. import devices
from .. import validate
from . import base

FIELD = base.field_name("device_path")


class Local(base.Transport):
    name = "local"

    # os-brick's local connector connects and disconnects nothing and
    # returns no multipath_id: after a power loss the intent's record is
    # all reconcile needs (a vendor adapter may differ: service.py syncs
    # the connection of any adapter's volume).
    sync_connection = False

    # os-brick's LocalConnector keeps nothing but its root helper and
    # executor: one serves every call (a DRBD host's attaches are all
    # local; making one per call cost ~7 us of the daemon's CPU).
    reuse_connector = True

    def check(self, cfg, connection_info):
        path = validate.device_path(
            FIELD, connection_info["data"].get("device_path"))
        devices.check_local(FIELD, path, cfg.local_device_patterns)
