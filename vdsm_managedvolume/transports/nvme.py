"""NVMe over Fabrics and LightOS (NVMe/TCP): os-brick's path, as is.

The connector returns the namespace's block device (``/dev/nvmeXnY``),
matched in the udev rule by its kernel name: vdsm's rule for every type
without a stable link of its own.

Host command: nvme (nvmeof; LightOS needs no command known here).
A disconnect waits for an ``nvme connect`` of its subsystem that an
earlier privsep daemon left running (``connect_command``).

Size refresh (os-brick's ``extend_volume``): nvmeof rescans the
subsystem's namespaces (``nvme ns-rescan``) unless the target already
told the host, waits for the new size and grows a replicated volume's
RAID; LightOS only reads the size its target already gave the device.

Fields, as os-brick 7's connectors read them (``NVMeOFConnProps``,
``LightOSConnector``); only what they certainly fail on is refused:

    nvmeof   one of three shapes: volume_replicas (a list of targets) with
             vol_uuid and replica_count (replicated); target_nqn with
             portals (one target); or the old nqn, target_portal,
             target_port and transport_type.  A target has target_nqn
             (a string) and portals, a non-empty list of
             [address, port, transport] lists.
    lightos  uuid (a string); lightos_nodes, when given, an object of
             nodes.
"""

import uuid as _uuid

from .. import errors
from . import base
from .base import field_name


class NVMeOF(base.Transport):
    name = "nvmeof"
    host_tools = (("nvme", "nvme-cli"),)

    def fields(self, data):
        if "volume_replicas" in data:
            replicas = base.list_of(field_name("volume_replicas"),
                                    data["volume_replicas"], dict)
            vol_uuid = base.required(data, "vol_uuid", str)
            try:
                _uuid.UUID(vol_uuid)
            except ValueError:
                raise errors.InvalidParams(
                    name=field_name("vol_uuid"),
                    reason="not a UUID") from None
            # os-brick reads conn_props["replica_count"] or the number
            # of replicas (NVMeOFConnProps.__init__): the key must be
            # there, but null is a value it takes.
            if "replica_count" not in data:
                raise errors.InvalidParams(
                    name=field_name("replica_count"),
                    reason="missing (os-brick's connector needs it; null "
                    "means one per replica)")
            for i, target in enumerate(replicas):
                self._target(target, "volume_replicas[{}].".format(i))
        elif "target_nqn" in data:
            self._target(data, "")
        else:
            for key in ("nqn", "target_portal", "target_port",
                        "transport_type"):
                base.required(data, key)

    def connect_command(self, connection_info):
        """An ``nvme connect ... -n <nqn>`` of one of the connection's
        targets (target_nqn, each replica's, the old nqn): os-brick's
        ``Target.connect`` (nvmeof.py, ``run_nvme_cli(['connect', '-a',
        address, '-s', port, '-t', transport, '-n', nqn, ...])``).  A
        subsystem may hold other volumes' namespaces: a connect of one
        of those is recognised too."""
        data = connection_info.get("data") or {}
        replicas = data.get("volume_replicas")
        replicas = replicas if isinstance(replicas, list) else []
        targets = [data] + [r for r in replicas if isinstance(r, dict)]
        nqns = {n for t in targets
                for n in (t.get("target_nqn"), t.get("nqn"))
                if isinstance(n, str) and n}
        if not nqns:
            return None

        return base.command_matcher("nvme", ("connect",), ("-n", "--nqn"),
                                    nqns, "nvme connect")

    def _target(self, target, prefix):
        base.required(target, "target_nqn", str, prefix=prefix)
        base.list_of(field_name(prefix + "portals"),
                     base.required(target, "portals", list, prefix=prefix),
                     list, length=3)


class LightOS(base.Transport):
    name = "lightos"

    def fields(self, data):
        base.required(data, "uuid", str)
        nodes = data.get("lightos_nodes")
        if nodes is not None:
            base.of_kind(field_name("lightos_nodes"), nodes, dict)
