"""Ask the hosts whether they still use a volume, over vdsm's protocol.

ovirt-engine never names a host in ``disconnect_volume``
(DisconnectManagedBlockStorageDeviceCommand passes the disk id only).  It
calls it after the host's own ``ManagedVolume.detach_volume`` succeeded,
and means a different host depending on the flow (docs/engine.md, "How
ovirt-engine drives the shim"): after a completed live migration the
source, after a failed one the destination, while the VM runs on the
other.  A volume connected to two hosts cannot tell which from the
command line alone; the hosts can: the one that detached no longer lists
the volume in ``ManagedVolume.volumes_info``.

So ``disconnect_volume`` without a host asks every connected host, the way
the engine talks to vdsm (JSON-RPC over STOMP over mutual TLS, the
engine's certificate; ``vdsm_managedvolume.stompclient``), and ends only
the connections of hosts that answered and no longer have the volume (or
have only records from an earlier boot: ``this_boot`` false, ``holds``).
A record stale in this boot (its device gone or changed: a path that
blinked) is still an attachment the engine has not detached, and keeps
the connection.  A host that cannot be asked keeps its connection,
logged: a leaked export is recoverable (a later disconnect asks again,
``disconnect_volume VOL HOST`` ends it at once), a cut disk pauses a
running VM.

That holds for a volume's only connection too, which upstream ended
(it ended the first one, asking nobody).  Usually that host has just
detached, but not always: ProcessDownVmCommand runs unlocked beside a
new RunVmCommand of the same VM on the same host, so its
``disconnect_volume`` can come after the new start's ``connect_volume``
(which reused that very connection) and ``attach_volume``: the only
connection is then the running VM's.  And since another host's answer
now counts as none, the hosts that cannot be asked are also those whose
address is misconfigured, which an error should show, not a guess hide.
The leak is bounded: ``connect_volume`` reuses a host's connection, so
there is at most one per host and volume, and ``delete_volume`` ends
what is left (it refuses while a host that cannot be asked has a saved
device on its connection: an admin ends that one).  Hosts whose name
does not resolve to them from the engine need ``addresses``
(``MANAGEDVOLUME_ENGINE_HOST_ADDRESSES``).

Where a host is reached: the address configured for its connector's
``host`` name (``addresses``), else the connector's ``ip``, then its
``host``, each on ``port``.  The certificate chain is checked against the
CA; the name is not (the connector's address need not be the name the
host was registered with, which is what its certificate carries).

So whatever engine-managed host answers at that address is asked, and an
address can belong to another host than the connection's: a DHCP address
given to another host, two cloned hosts both called
``localhost.localdomain``.  vdsm's own connector has no ``ip``
(managedvolume-helper calls ``get_connector_properties(my_ip=None)``), so
its ``host``, ``socket.gethostname()``, is often the only address (this
package's, the agent's or the hook's, has one: ``[privsep] my_ip``, else
the default route's source address).  A
host that answered "no such volume" for another one ended a connection
a VM was using.  So before a ``volumes_info`` answer that ends a
connection is trusted (the volume is not held there), the host is asked
``Host.getCapabilities`` on the same connection, and its
``connector_info`` must be the connection's host (``identity_difference``:
the identity of the connection's transport, ``EXPORT_IDENTITY``, else
``IDENTITY``, each as the connection's connector has it).  ovirt-engine
passes ``connect_volume`` exactly what the host's getCapabilities said
(``VdsBrokerObjectsBuilder``: ``vds.setConnectorInfo(struct.get(
VdsProperties.CONNECTOR_INFO))``, passed on by
``ManagedBlockStorageCommandUtil.getConnectionInfo``), so the same host
answers the same.  Another host, or a host that reports no connector_info
(no os-brick), is a host that cannot be asked: its connection stays.
The next address of the connector is tried, if any.

``volumes_info`` comes first and getCapabilities only after an answer
"not held": inside vdsm getCapabilities runs a fresh os-brick helper
(about 3 s of a host's CPU per call), and an answer "held" keeps the
connection (or refuses a delete) whoever gave it, the safe side.  An
impostor saying "held" can only keep a connection that could have been
ended (a leak, ended by a later disconnect or delete_volume); the host
still running the VM costs one call, not two.
"""

import json
import logging
import ssl
import threading

from . import args as argsmod

log = logging.getLogger(__name__)

# ovirt-engine's own PKI (ovirt-engine.conf: ENGINE_PKI_ENGINE_CERT,
# ENGINE_PKI_CA; engine_id_rsa is the private key of the engine's
# certificate, unencrypted, which setup extracts from keys/engine.p12).
DEFAULT_CERT = "/etc/pki/ovirt-engine/certs/engine.cer"
DEFAULT_KEY = "/etc/pki/ovirt-engine/keys/engine_id_rsa"
DEFAULT_CA = "/etc/pki/ovirt-engine/ca.pem"
DEFAULT_PORT = argsmod.DEFAULT_HOST_PORT
DEFAULT_TIMEOUT = argsmod.DEFAULT_HOST_TIMEOUT

VOLUMES_INFO = "ManagedVolume.volumes_info"
CAPABILITIES = "Host.getCapabilities"

# Which connector properties tell the host a connection was made for
# from another host (``identity_keys``).  A host's identity is what the
# backend granted the connection's export to, read by os-brick from the
# host, per transport (the connection's driver_volume_type): the iSCSI
# initiator name (/etc/iscsi/initiatorname.iscsi), the FC port WWNs (the
# HBAs'), the NVMe host NQN (/etc/nvme/hostnqn).  For those the host name
# is not compared: ``hostnamectl`` or a DHCP-assigned name changes it
# (os-brick's ``host`` is ``socket.gethostname()``) while the export, and
# the host using it, stay.
EXPORT_IDENTITY = {
    "iscsi": "initiator",
    "iser": "initiator",
    "fibre_channel": "wwpns",
    "nvmeof": "nqn",
}

# Any other transport (RBD, whose export is not per host, local, the
# vendors'), or a connector without its transport's identity: the host
# name and every storage identity the connection's connector has.
# Never ``uuid``: os-brick's NVMe connector reports the root
# filesystem's UUID (findmnt / and blkid) there, which a reinstall, a
# restore or an image-based upgrade (oVirt Node) changes and a host with
# an overlay root lacks, and no export depends on it.  Never ``ip`` (a
# host has several; the engine may reach it at none of them) nor
# ``multipath``, ``platform``... (settings, shared by every host).
#
# A reinstall usually changes the initiator name and host NQN too (their
# packages make new ones): the old connection's export is then granted
# to a host that no longer exists, nobody can tell it from a clone that
# kept them, and the connection stays (``delete_volume`` ends it, or an
# admin with the identity ``identity`` prints).
IDENTITY = ("host", "initiator", "nqn", "wwpns")


class Settings:
    """How to reach the hosts (one per request; crosses the warm socket)."""

    FIELDS = ("port", "cert_file", "key_file", "ca_file", "timeout", "tls",
              "addresses")

    def __init__(self, port=DEFAULT_PORT, cert_file=DEFAULT_CERT,
                 key_file=DEFAULT_KEY, ca_file=DEFAULT_CA,
                 timeout=DEFAULT_TIMEOUT, tls=True, addresses=None):
        self.port = port
        self.cert_file = cert_file
        self.key_file = key_file
        self.ca_file = ca_file
        self.timeout = timeout
        self.tls = tls
        # connector host name -> "address" or "address:port"
        self.addresses = dict(addresses or {})

    def to_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, d):
        return cls(**(d or {}))

    def endpoints(self, connector):
        """[(address, port)] to try for a connection's connector, in order."""
        connector = connector or {}
        configured = self.addresses.get(connector.get("host") or "")
        if configured:
            return [argsmod.split_address(configured, self.port)]
        found = []
        for key in ("ip", "host"):
            value = connector.get(key)
            if value and (value, self.port) not in found:
                found.append((value, self.port))
        return found

    def ssl_context(self):
        if not self.tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.load_verify_locations(self.ca_file)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class Answer:
    """What one host said about the volume."""

    def __init__(self, connector, attached=None, endpoint=None, reason="",
                 transport=None):
        self.connector = connector
        self.transport = transport
        self.attached = attached      # True, False, or None: not asked
        self.endpoint = endpoint
        self.reason = reason

    @property
    def host(self):
        return (self.connector or {}).get("host")

    def where(self):
        if self.endpoint is None:
            return "host {}".format(self.host)
        return "host {} ({}:{})".format(self.host, *self.endpoint)


def ask(settings, vol_id, connectors, flow_id=None, transports=None):
    """One ``Answer`` per connector, asking every host at once;
    ``transports``: each connection's driver_volume_type, for
    ``identity_difference``."""
    transports = transports or [None] * len(connectors)
    answers = [Answer(c, transport=t)
               for c, t in zip(connectors, transports)]
    try:
        ctx = settings.ssl_context()
    except (OSError, ssl.SSLError) as e:
        reason = "cannot load the engine's certificate, key or CA " \
                 "({}): {}".format(", ".join(
                     (settings.cert_file, settings.key_file,
                      settings.ca_file)), e)
        for a in answers:
            a.reason = reason
        return answers
    threads = [threading.Thread(target=_ask_one,
                                args=(settings, ctx, vol_id, a, flow_id),
                                name="ask-{}".format(a.host), daemon=True)
               for a in answers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def identity_difference(connector, reported, transport=None):
    """How ``reported`` (a connector_info) is not the host of
    ``connector`` (the one a connection of ``transport``, its
    driver_volume_type, was made for), or "" when it is that host.

    ``connector`` must name a ``host``; every identity
    (``identity_keys``) it has must be the same in ``reported`` (its
    ``wwpns`` all among ``reported``'s).  One ``reported`` has and
    ``connector`` has not is no difference: it came since (os-brick
    writes an NVMe host NQN at its first NVMe call, an FC card was
    added).  An identity ``connector`` has that ``reported`` lacks is
    one: leaving a connection alone is the safe side when unsure.
    """
    connector = connector if isinstance(connector, dict) else {}
    if not connector.get("host"):
        return "the connection's connector names no host"
    if not isinstance(reported, dict):
        return "no connector_info"
    for key in identity_keys(connector, transport):
        want = connector.get(key)
        if not want:
            continue
        got = reported.get(key)
        if key == "wwpns":
            same = set(_strings(want)) <= set(_strings(got))
        else:
            same = got == want
        if not same:
            return "{} {} (not {})".format(key, _show(got), _show(want))
    return ""


def identity_keys(connector, transport):
    """The keys ``identity_difference`` compares for a connection of
    ``transport`` made for ``connector``: its transport's own identity
    when the connector has it (``EXPORT_IDENTITY``), else ``IDENTITY``."""
    key = EXPORT_IDENTITY.get(transport)
    if key and isinstance(connector, dict) and connector.get(key):
        return (key,)
    return IDENTITY


def same_grant(a, b, transport=None):
    """Whether connectors ``a`` and ``b`` are one grantee of an export:
    what a backend grants to (``EXPORT_IDENTITY``) is the same in both.
    For a connection of ``transport`` that has one, that key alone (a
    host may have gained another identity since); otherwise every one of
    the iSCSI initiator, the NVMe host NQN and the FC port WWNs (one in
    common) that both have must agree, and they must have one in common:
    two hosts with another initiator each and one NQN (a DMI UUID
    several boards share, a cloned /etc/nvme/hostnqn) are two grantees.
    The host name is never compared (a renamed host keeps its grants)."""
    a = a if isinstance(a, dict) else {}
    b = b if isinstance(b, dict) else {}
    key = EXPORT_IDENTITY.get(transport)
    common = False
    for k in (key,) if key else ("initiator", "nqn", "wwpns"):
        mine, theirs = _grantees(a.get(k)), _grantees(b.get(k))
        if not mine or not theirs:
            continue
        if not (mine & theirs if k == "wwpns" else mine == theirs):
            return False
        common = True
    return common


def _grantees(value):
    """The non-empty strings of an identity (a WWN list or one name),
    lower case."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return {v.lower() for v in values if isinstance(v, str) and v}


def transport(conn_info):
    """A connection's driver_volume_type, from its conn_info (or None)."""
    if isinstance(conn_info, dict):
        return conn_info.get("driver_volume_type")
    return None


def identity(connector, connection_id=None):
    """The JSON object of ``connector``'s identities (``IDENTITY``), and
    of ``connection_id`` when given: what names one connection among
    several to hosts of the same name (give it to disconnect_volume,
    save_device, get_connection_info).  The connection id tells apart
    connections whose identities are the same: an earlier version
    compared ``uuid`` in connect_volume, and made a second connection
    for a host whose root filesystem changed."""
    connector = connector if isinstance(connector, dict) else {}
    shown = {k: connector[k] for k in IDENTITY if connector.get(k)}
    if connection_id is not None:
        shown[CONNECTION_ID] = connection_id
    return json.dumps(shown)


# The key of a connector object (the admin's) naming one connection by
# its id (cinderlib's Connection.id, the volume_attachment row's).
CONNECTION_ID = "connection_id"

# The key of the admin's connector object for disconnect_volume that ends
# the connection even when the driver cannot (``ops._end``).
FORCE = "force"


def names(connector, given):
    """Whether ``given`` (a host name, or a connector object as the admin
    or the engine passes it) names the host of ``connector`` (a
    connection's): the same ``host``, and for a connector object the
    same host by ``identity_difference`` one way or the other (the
    object may carry fewer identities than the connection's connector,
    or more: ones the host gained since)."""
    connector = connector if isinstance(connector, dict) else {}
    if not isinstance(given, dict):
        return connector.get("host") == given
    return connector.get("host") == given.get("host") and (
        identity_difference(connector, given) == "" or
        identity_difference(given, connector) == "")


# Private helpers

def _ask_one(settings, ctx, vol_id, answer, flow_id):
    from vdsm_managedvolume import stompclient
    endpoints = settings.endpoints(answer.connector)
    if not endpoints:
        answer.reason = "its connector has neither ip nor host"
        return
    reasons = []
    for address, port in endpoints:
        try:
            with stompclient.Client(address, port, ctx,
                                    timeout=settings.timeout) as client:
                infos = client.call(VOLUMES_INFO, {"vol_ids": [vol_id]},
                                    flow_id=flow_id)
                attached = holds(infos, vol_id)
                if not attached:
                    # Only this answer ends a connection: the host must
                    # be the connection's (getCapabilities may take
                    # seconds on vdsm, so "I have it" is not checked).
                    caps = client.call(CAPABILITIES, flow_id=flow_id)
                    reported = caps.get("connector_info") \
                        if isinstance(caps, dict) else None
                    other = identity_difference(
                        answer.connector, reported, answer.transport)
                    if other:
                        reasons.append(_not_that_host(
                            address, port, answer.connector, reported,
                            other, answer.transport))
                        continue
        except Exception as e:
            reasons.append("{}:{}: {}".format(
                address, port, str(e) or type(e).__name__))
            continue
        answer.endpoint = (address, port)
        answer.attached = attached
        return
    answer.reason = "; ".join(reasons)


def _not_that_host(address, port, connector, reported, difference,
                   transport=None):
    """Why the host at ``address``:``port`` is not the connection's:
    another host, or one of its name whose identity is not the one the
    connection was made for (it changed since, as a reinstall changes
    the initiator name, or a clone of that name answered).  A connection
    told by its host's name (``BY_NAME_ONLY``) says so: a renamed host
    is that host, and only the admin can know."""
    name = reported.get("host") if isinstance(reported, dict) else None
    if name and name == connector.get("host"):
        return ("{}:{} is host {} but not the identity the connection was "
                "made for: {} (changed since, or another host of that "
                "name)".format(address, port, name, difference))
    why = "{}:{} is not that host: {}".format(address, port, difference)
    if difference.startswith("host ") and \
            identity_keys(connector, transport) == IDENTITY:
        why += " ({})".format(BY_NAME_ONLY.format(
            transport=transport or "unknown"))
    return why


# Said when a host is told apart by its name: nothing better exists for
# RBD.  os-brick's RBDConnector.get_connector_properties returns only
# do_local_attach; the rest of a connector is get_connector_properties'
# platform, os_type, ip and host (socket.gethostname()) and the other
# transports' identities, which an RBD-only host need not keep unique
# (cloned images share an initiator name; os-brick derives the NVMe
# host NQN and hostid from the DMI system UUID, which some boards and
# clones share).  Taking another host for the connection's would let a
# delete_volume proceed while that host still uses the volume.
BY_NAME_ONLY = ("a connection of transport {transport} is known by its "
                "host's name only: os-brick reports no identity of its "
                "own for it, so a renamed host is taken for another; if "
                "this is that host renamed, end its connection by the "
                "override once no VM there uses the volume")


def _strings(value):
    if isinstance(value, (list, tuple)):
        return [str(v).lower() for v in value]
    return [] if value is None else [str(value).lower()]


def _show(value):
    if value is None or value == [] or value == "":
        return "missing"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def holds(infos, vol_id):
    """Whether a host whose ``volumes_info`` answered ``infos`` still has
    ``vol_id``: it has a record of it that is not of an earlier boot.

    A record stale in this boot (``device gone``: an iSCSI or NVMe path
    that blinked; ``device changed``) is still the engine's attachment:
    the engine has not detached it, the VM may run there, and ending
    the connection would unexport the volume from under it."""
    return any(isinstance(i, dict) and i.get("vol_id") == vol_id and
               not _of_an_earlier_boot(i) for i in infos or ())


def _of_an_earlier_boot(info):
    """Whether a ``volumes_info`` record was made in an earlier boot of
    the host (or an unknown one whose managed link is gone): its
    connection ended with that boot.  ``this_boot`` says it; agents
    before it only said why a record is stale ("made in another boot",
    "made in an unknown boot ...")."""
    if "this_boot" in info:
        return info["this_boot"] is False
    return bool(info.get("stale")) and str(
        info.get("stale_reason") or "").startswith("made in ")
