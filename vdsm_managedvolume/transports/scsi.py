"""iSCSI and Fibre Channel: always through multipath.

vdsm hands qemu the multipath device, never a single path: os-brick runs
with ``use_multipath`` and its attachment names the map
(``multipath_id``); the path is ``<multipath_dir>/<multipath_id>``.
Without a multipath id (multipathd down, the LUN blacklisted) the volume
is refused with 928 and disconnected again by the service's rollback.
"""

import os

from .. import errors
from . import base


class _Multipath(base.Transport):

    def path(self, cfg, vol_id, connection_info, attachment):
        multipath_id = attachment.get("multipath_id")
        if not multipath_id:
            raise errors.UnsupportedDevice(
                vol_id=vol_id, driver_volume_type=self.name)
        return os.path.join(cfg.multipath_dir, multipath_id)


class ISCSI(_Multipath):
    name = "iscsi"


class FibreChannel(_Multipath):
    name = "fibre_channel"
