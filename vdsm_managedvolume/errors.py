"""Every error this package reports, with its code.

One class per meaning.  Callers raise meaning, not strings: each class has a
``msg`` template formatted from its own attributes, and a ``code`` that
reaches the wire unchanged (JSON-RPC ``error.code``, vdsm's status code, the
client's exit message).

Codes
-----
vdsm reserves 925-935 for managed volumes.  925-929 are vdsm's own and keep
their meaning; 930-935 are ours (documented in the schema YAML too):

    925  NotSupported          os-brick cannot be imported
    926  HelperFailed          the privileged connector call failed
         ExtendIncomplete      (926) the device is still smaller than the
                               new_size asked for after an extend
    927  AlreadyAttached       same connection_info, device present
    928  UnsupportedDevice     iscsi/FC attachment without multipath_id
    929  ConnectionMismatch    record exists with another connection_info
         (DeviceChanged: or its device is no longer the one attached;
         OtherDeviceReturned: an attach again returned another device)
    930  UnsupportedDriverType driver_volume_type not on the allow-list
    931  HelperTimeout         the privileged call did not finish in time
         StillRunning          (931) and part of it may still run
         EarlierConnectRunning (931) a disconnect not run: an earlier
                               connect's login or map still runs
         DetachFirst           (931) an attach not run: the volume's
                               earlier record must be detached first,
                               and what its connect started still runs
    932  VolumeBusy            another operation holds the volume's lock
    933  AgentBusy             every worker of the agent is in use, or
                               max_operations attaches/detaches/
                               extends run, or (NoThread) the system
                               refused a new thread
    934  UnknownAdapter        connection_info.adapter: no installed plug-in
    935  StoreError            the local journal cannot be read or written

JSON-RPC's own codes (-32700 .. -32603) are here too, so that the protocol
layer and the API layer speak one vocabulary (NotAttached is a -32602
naming vol_id).

Messages never carry secrets: whatever is formatted into them goes through
``mask`` first where it may hold connection data.
"""


class Error(Exception):
    """Base of every error of this package."""

    code = 100
    msg = "{self.reason}"
    # True on the error of a privileged call known never to have been
    # written to any privsep daemon's channel (privileged.Brick marks it):
    # nothing of that call ran on the host.
    unsent = False

    def __init__(self, reason="", **kwargs):
        self.reason = reason
        for name, value in kwargs.items():
            setattr(self, name, value)
        super().__init__(str(self))

    def __str__(self):
        try:
            return self.msg.format(self=self)
        except (AttributeError, KeyError, IndexError):
            return "{}: {}".format(type(self).__name__, self.reason)

    def response(self):
        """The vdsm-style status dict of this error."""
        return {"code": self.code, "message": str(self)}


# JSON-RPC 2.0 standard errors

class ParseError(Error):
    code = -32700
    msg = "Parse error: {self.reason}"


class InvalidRequest(Error):
    code = -32600
    msg = "Invalid request: {self.reason}"


class MethodNotFound(Error):
    code = -32601
    msg = "Method not found: {self.method}"


class InvalidParams(Error):
    """A parameter is missing, of the wrong type or of a wrong value.

    ``name`` is the parameter's path (``connection_info.data``), ``reason``
    says what is wrong with it.
    """

    code = -32602
    msg = "Invalid parameter {self.name}: {self.reason}"


class NotAttached(InvalidParams):
    """``vol_id`` names no volume attached on this host now: no record, a
    record of an attach or detach in progress or interrupted, a record
    from a previous boot, or a device that is gone.

    A verb that acts on an attached device (extend_volume) refuses rather
    than touch a device that may not be this volume's.  -32602, not a
    managed volume code: every code of vdsm's 925-935 range has a meaning
    already and none says "not attached"; the parameter is what is wrong.
    """

    name = "vol_id"
    msg = ("Invalid parameter vol_id: volume {self.vol_id} is not attached "
           "on this host ({self.reason})")


class InternalError(Error):
    code = -32603
    msg = "Internal error: {self.reason}"


# Managed volume errors (vdsm's 925-929)

class NotSupported(Error):
    code = 925
    msg = "Managed volumes are not supported on this host: {self.reason}"


class HelperFailed(Error):
    code = 926
    msg = "Managed volume helper failed: {self.reason}"


class ConnectorFailed(HelperFailed):
    """The daemon ran the connector and it raised: the call ended (it
    neither hung nor died), with os-brick's error."""


class CannotSend(HelperFailed):
    """The call's arguments cannot be encoded for the privsep channel, so
    the daemon never saw them (nothing was done)."""

    unsent = True

    msg = ("Managed volume helper failed: the {self.operation} arguments "
           "cannot be sent to the privsep daemon: {self.reason}")


class DaemonMismatch(HelperFailed):
    """The privsep daemon this process started speaks another privsep
    protocol (privsep.py, "Versions"): the package's files were replaced
    while this process ran.  It was stopped before it got any call, and
    so is every later one until this process is restarted."""

    unsent = True

    msg = ("Managed volume helper failed: privsep daemon {self.pid} speaks "
           "{self.theirs}, {self.process} (pid {self.process_pid}) speaks "
           "{self.ours}: the package was replaced while it ran; restart "
           "{self.process}")


class ExtendIncomplete(HelperFailed):
    """The rescan ran, the device is still smaller than asked for.

    926 (the privileged host step did not do what was asked): the storage
    has not grown the LUN yet, or the host did not see it.
    """

    msg = ("Volume {self.vol_id}: device {self.path} is {self.size} bytes "
           "after the rescan, smaller than the requested {self.new_size} "
           "bytes (has the storage grown it?)")


class AlreadyAttached(Error):
    code = 927
    msg = "Volume {self.vol_id} is already attached at {self.path}"


class DeviceAttached(AlreadyAttached):
    """The device a connect found is recorded for another volume.

    927 as well: the device is already attached, under another vol_id
    (two vol_ids on one device would give two VMs one disk).
    ``[volumes] shared_devices = true`` allows it.
    """

    msg = ("Device {self.path} ({self.major}:{self.minor}) is already "
           "attached as volume {self.other}; not attaching it as volume "
           "{self.vol_id} too ([volumes] shared_devices allows sharing)")


class UnsupportedDevice(Error):
    code = 928
    msg = ("Unsupported device for volume {self.vol_id}: a "
           "{self.driver_volume_type} attachment needs a multipath_id, "
           "os-brick returned none (is multipathd running?)")


class ConnectionMismatch(Error):
    code = 929
    msg = ("Volume {self.vol_id} is attached with a different "
           "connection_info; detach it first")


class DeviceChanged(ConnectionMismatch):
    """The record's device is no longer the one attached: 929, whose
    remedy (detach first) is this one's too."""
    msg = ("Volume {self.vol_id}: the device at {self.path} is not the one "
           "recorded at its attach ({self.reason}); it may belong to "
           "something else now and was not touched. Detach the volume "
           "(this forgets the record and leaves the device alone), then "
           "attach it again")


class OtherDeviceReturned(DeviceChanged):
    """An attach again over a volume attached in this boot, its device
    there: the connect returned another device.  The volume stays
    attached at its own device, which a VM may use, so a detach is not
    the remedy here (it would end that device's connection)."""
    msg = ("Volume {self.vol_id}: attaching it again returned the device "
           "at {self.path}, which is not the one it is attached with "
           "({self.reason}); that device was left connected and not "
           "recorded (it may belong to something else), and the volume "
           "stays attached as it was. Check what {self.path} holds")


# Ours (930-935)

class UnsupportedDriverType(Error):
    code = 930
    msg = ("Unsupported driver_volume_type {self.driver_volume_type!r}: "
           "allowed are {self.allowed}")


class HelperTimeout(Error):
    code = 931
    msg = ("Privileged {self.operation} did not finish within "
           "{self.timeout} seconds")


class StillRunning(HelperTimeout):
    """Past its deadline, and part of the call may still run: what it
    does may still take effect, so its failure is not "nothing done"
    (the service keeps the volume's record for a later disconnect).
    ``running`` says what: threads os-brick started for it still inside
    a command (a multipath iSCSI connect's portal logins; a disconnect
    of that connection waits for them in the daemon), or a daemon that
    could not be ended."""

    msg = ("Privileged {self.operation} did not finish within "
           "{self.timeout} seconds, and {self.running}")

    THREADS = ("threads it started are still inside a command (an iSCSI "
               "login may still complete)")


class EarlierConnectRunning(StillRunning):
    """A disconnect not run: what an earlier connect of the same
    connection started still runs (an ``iscsiadm --login`` or ``rbd
    map``, whichever daemon started it; brick._wait_earlier), and would
    take effect after it.  The caller keeps the volume's record for a
    later disconnect."""

    msg = "Privileged {self.operation} not run: {self.running}"


class DetachFirst(HelperTimeout):
    """An attach not run: the volume has an earlier record (another
    connection_info, or a detach left unfinished) that must be detached
    first, and that detach cannot finish yet because what an earlier
    connect of it started still runs (``StillRunning``: a login or map,
    threads of the daemon).  Nothing of this attach is recorded; the
    earlier record stays 'detaching' and the service detaches it again
    every ``every`` seconds (``service.RETRY_KEPT``) until that ended.
    ``record`` describes the earlier record (state, driver type, sd_id,
    boot; never its connection_info), ``running`` what still runs."""

    msg = ("Volume {self.vol_id} was not attached: its earlier record "
           "({self.record}) must be detached first, and that detach "
           "cannot finish yet: {self.running}. Nothing of this attach was "
           "recorded; the earlier record stays 'detaching' and the "
           "service detaches it again every {self.every:g} s while it "
           "runs. Attach again once 'managedvolume-tool list' no longer "
           "shows the volume (once what runs ended, a detach of the "
           "volume or 'managedvolume-tool reconcile --apply' finishes "
           "it at once)")


class VolumeBusy(Error):
    code = 932
    msg = ("Volume {self.vol_id} is busy: another operation held its lock "
           "for more than {self.timeout} seconds")


class AgentBusy(Error):
    code = 933
    msg = ("Agent busy: all {self.workers} workers are in use and "
           "{self.queued} requests are waiting; retry later")


class TooManyOperations(AgentBusy):
    """Attaches, detaches and extends running at once reached ``[agent]
    max_operations``: the next one is refused, never queued."""

    msg = ("Agent busy: {self.running} attach/detach/extend operations are "
           "running, the limit ([agent] max_operations); retry later")


class NoThread(AgentBusy):
    """A worker thread could not be started (``RuntimeError: can't start
    new thread``: the unit's TasksMax, ``ulimit -u`` or memory): that
    request is refused; the agent goes on serving with the threads it
    has."""

    msg = ("Agent busy: cannot start a worker thread ({self.reason}); "
           "retry later")


class ShuttingDown(AgentBusy):
    """A request that arrived after SIGTERM, while the agent drains."""

    msg = "Agent is shutting down; retry later"


class UnknownAdapter(Error):
    code = 934
    msg = ("Unknown adapter {self.adapter!r}: no plug-in in entry point "
           "group {self.group!r} (installed: {self.installed})")


class StoreError(Error):
    code = 935
    msg = "Managed volume database error: {self.reason}"


# Local errors that never reach the wire as such

class StoreNotFound(StoreError):
    """No record for a volume (callers usually treat it as "not attached")."""
    msg = "No record for volume {self.vol_id}"


class CorruptRecord(StoreError):
    """A volume's journal record cannot be decoded (undecodable JSON, or
    JSON of the wrong type, in connection_info, attachment or identity):
    nothing it says can be acted on (store.py)."""
    msg = ("Volume {self.vol_id}: its journal record is corrupt "
           "({self.reason}): it cannot be used to attach or detach; "
           "'managedvolume-tool reconcile --apply --force' forgets it (then "
           "check the host for a connection it may have left)")


class StoreClosed(StoreError):
    msg = "The managed volume database is closed"


class ConfigError(Error):
    code = 100
    msg = "Configuration error: {self.reason}"


class AgentRunning(ConfigError):
    """Another agent holds the agent lock of this state directory (its
    pid in ``pid``, the lock file in ``path``)."""

    msg = ("Configuration error: another managedvolume-agent (pid "
           "{self.pid}) is running on {self.run_dir} (it holds {self.path}); "
           "stop it first, or give this one another --state-dir")


# Engine shim (the cinderlib client).  ovirt-engine reads only the
# "error:<text>" line and the exit code, so these carry no wire code of
# their own; they exist so that the shim, too, raises meaning.

class EngineError(Error):
    code = 1
    msg = "{self.reason}"


class EngineUsage(EngineError):
    code = 2
    msg = "{self.reason}"


class EngineNotFound(EngineError):
    msg = "{self.kind} {self.id} not found"


class EngineTimeout(EngineError):
    msg = "{self.operation} did not finish within {self.timeout} seconds"


class EngineBusy(EngineError):
    msg = ("Volume {self.id} is busy: {self.holder} holds it; gave up "
           "after {self.timeout} seconds")


class EngineHasSnapshots(EngineError):
    msg = ("Volume {self.id} has snapshots {self.snapshots}; remove them "
           "first")


class EngineInUse(EngineError):
    msg = ("Volume {self.id} is still attached on {self.hosts}. Once no VM "
           "there uses it, detach it there ({self.commands}), then remove "
           "the disk again")


class EngineCannotAsk(EngineError):
    msg = ("Volume {self.id} was attached on {self.hosts}; nothing was "
           "done. Make the host reachable and remove the disk again, or, "
           "once no VM there uses the volume (the host is gone for good, "
           "or the volume was detached there), end that connection as "
           "user ovirt ({self.commands}: the storage domain's driver "
           "options, the engine's managed block DB URL, any flow id) and "
           "remove the disk again")


class EngineNotEnded(EngineError):
    msg = ("Could not end {self.count} connection(s) of volume {self.id} "
           "({self.failures}); the next disconnect_volume or "
           "delete_volume tries again. If the storage can no longer end "
           "it (the host is gone from it), end the record without it, as "
           "user ovirt, once no VM there uses the volume "
           "({self.commands}: the storage domain's driver options, the "
           "engine's managed block DB URL, any flow id); what the storage "
           "still grants that host is then for its administrator to "
           "remove")


class EngineAmbiguousHost(EngineError):
    msg = ("Volume {self.id} has {self.count} connections to {self.named}: "
           "{self.identities}; nothing was done. Name one by its connector "
           "JSON (one of these objects)")


def to_error(exc):
    """Return ``exc`` as an ``Error`` (unknown exceptions are internal)."""
    if isinstance(exc, Error):
        return exc
    from . import mask
    return InternalError(mask.mask_text(
        "{}: {}".format(type(exc).__name__, exc)))
