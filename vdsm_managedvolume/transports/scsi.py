"""iSCSI and Fibre Channel: always through multipath.

vdsm hands qemu the multipath device, never a single path: os-brick runs
with ``use_multipath`` and its attachment names the map
(``multipath_id``); the path is ``<multipath_dir>/<multipath_id>``, a
stable link to ``dm-N`` that the udev rule matches (``SYMLINK==
"mapper/<id>"``).  Without a multipath id (multipathd down, the LUN
blacklisted) the volume is refused with 928 and disconnected again by
the service's rollback.

Host commands: iscsiadm (iSCSI), multipath and multipathd (both).

Size refresh (os-brick's ``extend_volume``): every path of the LUN is
rescanned (``echo 1 > /sys/.../rescan``), then ``multipathd resize map``.

Fields, as os-brick 7's connectors read them (``ISCSIConnector`` in
multipath mode, ``FibreChannelConnector``); only what they certainly
fail on is refused:

    iscsi          target_portals + target_iqns (non-empty lists of
                   strings: os-brick then logs in to each), or
                   target_portal + target_iqn (strings: os-brick
                   discovers the other portals); and target_luns (a
                   list) or target_lun
    fibre_channel  target_wwns (a list of strings) or target_wwn (a
                   string or a list of strings); target_luns (a list)
                   or target_lun (an integer, 0 when absent); as many
                   LUNs as WWNs, or a single LUN for all of them
"""

import os

from .. import errors
from . import base
from .base import field_name


MULTIPATH = (("multipath", "device-mapper-multipath or multipath-tools"),
             ("multipathd", "device-mapper-multipath or multipath-tools"))


class _Multipath(base.Transport):

    stable_links = ("multipath_dir", "mapper")
    host_tools = MULTIPATH

    def path(self, cfg, vol_id, connection_info, attachment):
        multipath_id = attachment.get("multipath_id")
        if not multipath_id:
            raise errors.UnsupportedDevice(
                vol_id=vol_id, driver_volume_type=self.name)
        return os.path.join(cfg.multipath_dir, multipath_id)


class ISCSI(_Multipath):
    name = "iscsi"
    host_tools = (("iscsiadm", "iscsi-initiator-utils or open-iscsi"),
                  ) + MULTIPATH

    def fields(self, data):
        if "target_portals" in data and "target_iqns" in data:
            base.list_of(field_name("target_portals"),
                         data["target_portals"], str)
            base.list_of(field_name("target_iqns"), data["target_iqns"],
                         str)
        else:
            base.required(data, "target_portal", str)
            base.required(data, "target_iqn", str)
        # Integers: os-brick compares a LUN with numbers
        # (LinuxSCSI.process_lun_id), a string fails there with a
        # TypeError after the login.
        if data.get("target_luns"):
            base.list_of(field_name("target_luns"), data["target_luns"],
                         int)
        else:
            base.required(data, "target_lun", int)

    def connect_command(self, connection_info):
        """An ``iscsiadm ... -T <iqn> ... --login`` for one of the
        connection's targets (target_iqn, target_iqns): os-brick's
        ``ISCSIConnector._connect_to_iscsi_portal_unsafe`` runs it
        through ``_run_iscsiadm`` (``iscsiadm -m node -T <iqn> -p
        <portal> --login``), in a thread per portal for a multipath
        connect.  Matched by the IQN alone: a portal is shared by every
        volume of the storage, and a login to a target os-brick
        discovered under another IQN (sendtargets discovery, without
        target_iqns) is not recognised."""
        data = connection_info.get("data") or {}
        # Only strings: os-brick ignores target_iqns without
        # target_portals, and fields() checks it only with them.
        listed = data.get("target_iqns")
        listed = listed if isinstance(listed, list) else []
        iqns = {i for i in listed + [data.get("target_iqn")]
                if isinstance(i, str) and i}
        if not iqns:
            return None

        return base.command_matcher("iscsiadm", ("--login", "-l"),
                                    ("-T", "--targetname"), iqns,
                                    "iscsiadm --login")


class FibreChannel(_Multipath):
    name = "fibre_channel"

    def fields(self, data):
        if data.get("target_wwns"):
            wwns = base.list_of(field_name("target_wwns"),
                                data["target_wwns"], str)
        elif isinstance(data.get("target_wwn"), list):
            wwns = base.list_of(field_name("target_wwn"),
                                data["target_wwn"], str)
        else:
            wwns = [base.required(data, "target_wwn", str)]
        if data.get("target_luns"):
            luns = base.of_kind(field_name("target_luns"),
                                data["target_luns"], list)
            name = field_name("target_luns")
        else:
            luns = [base.of_kind(field_name("target_lun"),
                                 data.get("target_lun", 0), int)]
            name = field_name("target_lun")
        if len(luns) != len(wwns) and not (len(luns) == 1 and len(wwns) > 1):
            raise errors.InvalidParams(
                name=name, reason="{} LUNs for {} WWNs (expected one LUN, "
                "or one per WWN)".format(len(luns), len(wwns)))
