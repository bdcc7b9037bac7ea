"""Ceph RBD, mapped by the kernel (os-brick's ``do_local_attach``).

The kernel names the device ``/dev/rbdN`` (N changes at every map) and
udev links it as ``<rbd_dir>/<pool>/<volume>``: that stable link is the
path, from ``data.name``, and what the udev rule matches (``SYMLINK==
"rbd/<pool>/<volume>"``).

Special cases, all here:

- the connector is created, and every call's data carries,
  ``do_local_attach``: the image is mapped on this host (``rbd map``),
  as vdsm's managedvolume-helper does with its own RBD connector,
  instead of being opened by librbd inside qemu;
- disconnect also hands the connector the device path connect returned,
  as ``data.device_path``, for connectors that find the mapping by it;
- ``data.name`` must be "pool/image" or "pool/namespace/image"
  (``validate.rbd_name``) before anything happens, even with a vendor
  adapter: it becomes a path, a link target and a udev rule.  Without
  an adapter only "pool/image": os-brick 7's connector splits the name
  into exactly two parts.

Host command: rbd (``rbd map``, ``rbd showmapped``, ``rbd unmap``).

Size refresh (os-brick's ``extend_volume``): nothing to rescan, the
kernel refreshes a mapped image's size itself; the connector reads it.
"""

import os

from .. import errors
from .. import validate
from . import base


class RBD(base.Transport):
    name = "rbd"
    stable_links = ("rbd_dir", "rbd")
    connector_kwargs = {"do_local_attach": True}
    host_tools = (("rbd", "ceph-common"),)

    def check(self, cfg, connection_info):
        validate.rbd_name(base.field_name("name"),
                          connection_info["data"].get("name"))
        super().check(cfg, connection_info)

    def fields(self, data):
        # os-brick 7's RBDConnector splits data.name into exactly two
        # parts (pool, volume = name.split('/')) at connect, showmapped
        # and disconnect: a namespace would fail there, so it is refused
        # here unless a vendor adapter's connector does the mapping.
        if data["name"].count("/") != 1:
            raise errors.InvalidParams(
                name=base.field_name("name"), reason="os-brick's RBD "
                "connector takes only \"pool/image\" (no namespace), got "
                "{!r}".format(data["name"]))

    def connector_data(self, connection_info, attachment=None):
        data = super().connector_data(connection_info)
        data.setdefault("do_local_attach", True)
        if attachment and attachment.get("path"):
            data["device_path"] = attachment["path"]
        return data

    def path(self, cfg, vol_id, connection_info, attachment):
        return os.path.join(cfg.rbd_dir, connection_info["data"]["name"])
