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

Where a host is reached: the address configured for its connector's
``host`` name (``addresses``), else the connector's ``ip``, then its
``host``, each on ``port``.  The certificate chain is checked against the
CA; the name is not (the connector's address need not be the name the
host was registered with, which is what its certificate carries).
"""

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

    def __init__(self, connector, attached=None, endpoint=None, reason=""):
        self.connector = connector
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


def ask(settings, vol_id, connectors, flow_id=None):
    """One ``Answer`` per connector, asking every host at once."""
    answers = [Answer(c) for c in connectors]
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
        except Exception as e:
            reasons.append("{}:{}: {}".format(
                address, port, str(e) or type(e).__name__))
            continue
        answer.endpoint = (address, port)
        answer.attached = holds(infos, vol_id)
        return
    answer.reason = "; ".join(reasons)


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
