"""Ceph RBD, mapped by the kernel (os-brick's ``do_local_attach``).

The kernel names the device ``/dev/rbdN`` (N changes at every map) and
udev links it as ``<rbd_dir>/<pool>/<volume>``: that stable link is the
path, from ``data.name`` ("pool/volume", checked by
``validate.connection_info``).
"""

import os

from . import base


class RBD(base.Transport):
    name = "rbd"

    def path(self, cfg, vol_id, connection_info, attachment):
        return os.path.join(cfg.rbd_dir, connection_info["data"]["name"])
