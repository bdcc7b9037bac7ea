"""The twelve operations of the engine's cinderlib client, on cinderlib.

Each function takes a ``cinderlib.Backend`` and the request's parsed
arguments and returns the payload the engine reads after
``<correlation_id>:`` (a string), or None when the operation prints nothing.
What the engine does with the payload decides its shape:

    connect_volume        conn dict {driver_volume_type, data}: sent to the
                          host's ManagedVolume.attach_volume
    storage_stats         the backend's stats dict, finite, with the
                          top-level capacity the engine reads
    get_connection_info   {conn, connector, device} of one connection,
                          device null until save_device
    create_snapshot       the new snapshot's id (bare, not JSON)
    create_volume_from_snapshot   the new volume's id (bare)

Where upstream is wrong we differ, and say so here:

- A missing volume or snapshot raises ``errors.EngineNotFound``.  The runner
  prints it as ``error:...`` and exits 0 only for the removals (delete,
  remove_snapshot, disconnect: the goal is already reached); upstream also
  exited 0 for extend, clone, connect..., which the engine took as success.
- A command killed half-way leaves nothing the next one cannot find
  (``_connect``, ``_end``; docs/engine.md, "Killed mid-command"): a
  connection is recorded before the driver grants it to its host and
  deleted only after the driver ended it and removed the export, marked
  unfinished in between (``_unfinished``); cinderlib records it after
  the grant and deletes it before the export's removal.  delete_volume
  removes the export before the driver's delete, as cinder does.
- connect_volume reuses the connection of the same host (forgetting its
  old device) when the connector is that host's by the identity the
  connection's export was granted to (``hosts.identity_difference``:
  the initiator of an iSCSI connection, the wwpns of an FC one, the nqn
  of an NVMe-oF one, else host name, initiator, nqn, wwpns); upstream
  compared the host name only, so
  of two hosts with one name (cloned, ``localhost.localdomain``) the
  second got the first's connection (its initiator's ACL).
  disconnect/save_device/
  get_connection_info take an optional connector host and act on that
  connection only: during a live migration the volume is connected to two
  hosts, and upstream always used the first connection.
- disconnect_volume without a host (the engine's only form) ends only the
  connections of hosts that say they no longer have the volume
  (``hosts``: a host that cannot be asked, or whose getCapabilities says
  it is another host, keeps its connection, the only one too);
  upstream ended the first (oldest) one, cutting the disk of the source
  still running the VM after a failed migration.
- A connection is ended as cinder's volume manager ends an attachment,
  not with cinderlib's ``Connection.disconnect()`` (see ``_end``): the
  volume's export is removed only when the driver says no other
  connection shares it and no other connection is left.  cinderlib
  removed it at every disconnect, so with a driver that exports each
  volume once (LVM's iSCSI target, nvmet) ending the source's connection
  after a migration deleted the target the destination was using.
- create_volume of an existing id with the same size succeeds when that
  volume is available or in use (the engine retries after a timeout); with
  another size, or still "creating" (an abandoned run), it fails.
- storage_stats parses ``refresh`` ("false" was a true string upstream).
- remove_snapshot and create_volume_from_snapshot find the snapshot
  under whichever volume of the backend holds it (``_find_snapshot_of``):
  the engine names the disk, not the volume it snapshotted.  They lock
  that volume too (``lock_ids``), not only the one named.
- A create that fails (volume, clone, volume from snapshot, snapshot)
  deletes what cinderlib saved of it in "error" (``_discard``): the engine
  got an error and never learns that id, and an "error" snapshot made
  its volume impossible to delete (cinderlib refuses a volume with
  snapshots).  delete_volume also deletes "error" snapshots an older
  version left, and refuses a volume with other snapshots before it ends
  any connection.
- delete_volume refuses a volume a connected host still has attached
  (``hosts``, as disconnect_volume asks): ovirt-engine removes a disk
  that is unplugged from a running VM, and a failed hot plug leaves it
  attached on the VM's host (docs/flows.md).  Upstream (cinderlib's
  Volume.delete) deleted it under the host.  A host that cannot be
  asked refuses the delete too when an attach through its connection
  completed (a device saved), naming the override: the by-identity
  disconnect_volume of that connection.
"""

import json
import logging
import uuid

from vdsm_managedvolume import errors

log = logging.getLogger(__name__)


def create_volume(backend, args):
    vol = _find_volume(backend, args["volume_id"], required=False)
    if vol is not None:
        # Only a finished volume: one in "error", or still "creating" in
        # another run, is not a success to report to the engine's retry.
        if vol.size == args["size"] and vol.status in ("available",
                                                       "in-use"):
            log.info("Volume %s already exists with size %s GiB",
                     vol.id, vol.size)
            return None
        raise errors.EngineError(
            "Volume {} already exists (size {} GiB, status {})".format(
                vol.id, vol.size, vol.status))
    log.info("Creating volume %s of %s GiB", args["volume_id"], args["size"])
    try:
        backend.create_volume(args["size"], id=args["volume_id"])
    except Exception:
        _discard(_find_volume(backend, args["volume_id"], required=False),
                 "volume")
        raise
    return None


def delete_volume(backend, args):
    vol = _find_volume(backend, args["volume_id"])
    for snap in [s for s in vol.snapshots if s.status == "error"]:
        # A failed create_snapshot of a version that did not discard it:
        # the engine never learned its id, nobody else would delete it.
        log.info("Deleting snapshot %s of volume %s, left in error by a "
                 "failed create_snapshot", snap.id, vol.id)
        snap.delete()
    if vol.snapshots:
        # cinderlib would refuse too, but only after the connections
        # below were ended.
        raise errors.EngineHasSnapshots(
            id=vol.id, snapshots=", ".join(s.id for s in vol.snapshots))
    # ovirt-engine refuses to remove a disk plugged into a VM that is not
    # down (RemoveDiskCommand.validateAllVmsForDiskAreDown), but not an
    # unplugged one: a hot plug whose VM step failed leaves the disk
    # attached on the VM's host, unplugged, until the VM stops.  Every
    # connected host is asked, as disconnect_volume asks; one that still
    # has the volume keeps it (cinder refuses to delete an attached
    # volume too).  The other connections (ovirt-engine's own leaks, a
    # host a disconnect could not ask) are ended first.
    #
    # A host that cannot be asked (down, unreachable, slow, its agent
    # restarting, another host at its address) is no answer either way.
    # Its connection is ended only when no attach through it completed
    # (no device saved: ovirt-engine's saveDevices runs save_device right
    # after the host's attach_volume, so no VM was given the device);
    # with a device the delete is refused and names the override, the
    # by-identity disconnect_volume of that connection.  Refusing costs
    # the engine nothing it cannot retry: RemoveManagedBlockStorageDisk-
    # Command returns before removeDiskFromDb on any non-zero exit
    # (ManagedBlockReturnValue.getSucceed: exit 0) and its endWithFailure
    # unlocks the disk, which stays and can be removed again;
    # RemoveAllManagedBlockStorageDisksCommand (removing a VM with its
    # disks) logs the failure and leaves the disk floating.
    conns = list(vol.connections)
    if conns:
        answers = _ask(vol, conns, args)
        holders = [a for a in answers if a.attached]
        if holders:
            raise errors.EngineInUse(
                id=vol.id, hosts=", ".join(a.where() for a in holders),
                commands="; ".join(_detach_command(vol.id, a)
                                   for a in holders))
        unasked = [(c, a) for c, a in zip(conns, answers)
                   if a.attached is None and c.device and
                   not _unfinished(c)]
        if unasked:
            raise errors.EngineCannotAsk(
                id=vol.id,
                hosts="; ".join("{}, which cannot be asked whether it "
                                "still has it ({})".format(a.where(),
                                                           a.reason)
                                for _, a in unasked),
                commands="; ".join(
                    "{} disconnect_volume DRIVER_JSON DB_URL FLOW_ID {} "
                    "'{}'".format(ADAPTER, vol.id, _override(c))
                    for c, _ in unasked))
        for conn, answer in zip(conns, answers):
            if answer.attached is None and _unfinished(conn):
                log.info("Ending the connection of volume %s to %s left "
                         "unfinished by a command that did not end (%s); "
                         "the host cannot be asked (%s)", vol.id,
                         answer.where(), _attach_status(conn),
                         answer.reason)
            elif answer.attached is None:
                log.warning("Ending the connection of volume %s to %s "
                            "though the host cannot be asked (%s): no "
                            "attach through it completed (no device "
                            "saved)", vol.id, answer.where(),
                            answer.reason)
    ended = _end_all(vol, conns, " before deleting it")
    if not ended or not ended[-1][1]:
        # As cinder's VolumeManager.delete_volume does before the
        # driver's delete_volume: a connect killed after create_export
        # left an export no connection records.
        _remove_export(vol, "before deleting it")
    log.info("Deleting volume %s", vol.id)
    vol.delete()
    return None


def connect_volume(backend, args):
    from . import hosts
    vol = _find_volume(backend, args["volume_id"])
    connector = args["connector_info"]
    host = connector.get("host")
    for conn in vol.connections:
        # The connection's connector must be this host by its identity
        # (``hosts.identity_keys``), not only by name.
        other = hosts.identity_difference(conn.connector_info, connector,
                                          hosts.transport(conn.conn_info))
        if other:
            if host is not None and _host(conn) == host:
                log.info("Volume %s has a connection to another host "
                         "named %s (this one's %s): not reusing it",
                         vol.id, host, other)
            continue
        if _host(conn) != host:
            # Same identity, another name (hostnamectl, a DHCP name): the
            # connection keeps the connector it was made for, which the
            # driver's terminate_connection gets.
            log.info("Volume %s is connected to host %s, now named %s",
                     vol.id, _host(conn), host)
        if _unfinished(conn):
            # A command killed while it connected or ended it: the
            # driver's grant to this host may or may not exist.
            log.info("Volume %s: the connection to host %s was left "
                     "unfinished by a command that did not end (%s); "
                     "connecting it again", vol.id, _host(conn),
                     _attach_status(conn))
            conn = _connect(vol, connector, conn)
            return _dumps(conn.conn_info)
        log.info("Volume %s already connected to host %s", vol.id, host)
        # The engine connects before every attach: the device saved for
        # this host's earlier attach is gone or about to be replaced, and
        # save_device must find this connection again as the one without
        # a device, the last connected (``_pick_connection``).
        conn.device = None
        _stamp(conn)
        conn.save()
        if vol.status != "in-use":
            # A connect killed after its connection's record.
            vol._ovo.status = "in-use"
            vol.save()
        return _dumps(conn.conn_info)
    log.info("Connecting volume %s to host %s", vol.id, host)
    conn = _connect(vol, connector)
    return _dumps(conn.conn_info)


def disconnect_volume(backend, args):
    """End the connections of the hosts that no longer use the volume.

    With a host (an admin's command; ``_named``): that host's connection,
    ended without asking; a host name several connections have (cloned
    hosts, a reinstalled one: connect_volume keeps one per identity) is
    refused, ending none of them, and a connector object names one.
    With ``"force": true`` in that object a failing terminate_connection
    is logged and the record deleted all the same (``_end_all``).
    Without (how ovirt-engine always calls it, after the host's
    detach_volume): every connected host is asked (``hosts``) and only
    those that answered that they no longer have the volume lose their
    connection; a host that cannot be asked keeps its connection
    (logged).  A connection the driver fails to end is then logged as an
    ERROR, not failed (see below), and kept "detached" for the next
    disconnect or delete.
    """
    from . import hosts
    vol = _find_volume(backend, args["volume_id"])
    host = args.get("connector")
    conns = list(vol.connections)
    if host is not None:
        conns = _named(vol, conns, host)
        if not conns and isinstance(host, dict) and host.get(
                hosts.CONNECTION_ID) is not None:
            # The admin's override naming one connection: a mistyped id
            # must not look like a done job (review-engfix6 L2).
            log.warning("Volume %s has no connection %s: nothing was "
                        "disconnected; its connections: %s", vol.id,
                        _show_host(host),
                        ", ".join(_override(c) for c in vol.connections)
                        or "none")
        elif not conns:
            log.info("Volume %s has no connection to host %s", vol.id,
                     _show_host(host))
    elif conns:
        conns = _released(vol, conns, args)
    connected = bool(vol.connections)
    force = isinstance(host, dict) and host.get(hosts.FORCE) is True
    try:
        results = _end_all(vol, conns, "", force=force)
    except errors.EngineNotEnded as e:
        if host is not None:
            raise
        # The engine's form: every host released said it no longer has
        # the volume, and the records not ended stay "detached" for the
        # next disconnect or delete.  A failure tells ovirt-engine
        # nothing it can act on (it never retries) and keeps its
        # bookkeeping stale: disconnectManagedBlockStorageDisk saves the
        # disk's hosts (ATTACHED_VDS_ID := DEST_VDS_ID after a
        # migration) only on success, so the next migration back
        # detached the disk on the host running the VM (review-engfix8
        # M2).
        log.error("%s", e)
        return None
    for conn, ended in results:
        if ended is None and host is not None:
            log.warning("Volume %s: the connection to host %s was not "
                        "ended: the driver never granted it, and another "
                        "host's connection is left; it ends with the "
                        "volume's last connection", vol.id, _host(conn))
    if not vol.connections and (vol.status == "in-use" or not connected):
        # No connection, so no host uses an export of the volume (and an
        # export may grant any host, as cinder's nvmet subsystems do;
        # review-final10 L1).  One may be left by an end killed after its
        # connection's record was deleted, before the export's removal
        # (the volume still "in-use"), or by a connect killed after
        # create_export, before its record (still "available").  Ending
        # the last connection above removed it already.
        log.info("Volume %s has no connection: removing its export, if "
                 "any (a command killed half-way may have left one)",
                 vol.id)
        _remove_export(vol, "the volume has no connection")
        if vol.status == "in-use":
            vol._ovo.status = "available"
            vol.save()
    return None


def extend_volume(backend, args):
    vol = _find_volume(backend, args["volume_id"])
    if args["size"] < vol.size:
        raise errors.EngineError("Cannot shrink volume {} from {} to {} "
                                 "GiB".format(vol.id, vol.size, args["size"]))
    if args["size"] == vol.size:
        log.info("Volume %s already has %s GiB", vol.id, vol.size)
        return None
    log.info("Extending volume %s from %s to %s GiB", vol.id, vol.size,
             args["size"])
    vol.extend(args["size"])
    return None


def storage_stats(backend, args):
    """The backend's stats as cinder reports them, made readable by the
    engine.

    ovirt-engine (``ManagedBlockStorageDomainStatsRefresher``) reads only
    the top-level ``total_capacity_gb`` and ``free_capacity_gb``: a number,
    a numeric string, or cinder's sentinels "infinite" / "unknown" (the
    last sizes it saved are kept).  So:

    - a float infinity is printed "infinite", NaN and -inf "unknown",
      wherever they are: Jackson refuses JSON's ``Infinity``/``NaN``, and
      the whole answer failed (and with it adding the storage domain);
    - a driver that reports its capacity only per pool gets the sums of
      its pools at the top level (a key the driver sets is left as it
      is): "infinite" if a pool is, "unknown" if a pool has no number.
    """
    log.info("Fetching backend stats (refresh=%s)", args["refresh"])
    stats = _finite(backend.stats(refresh=args["refresh"]))
    pools = stats.get("pools")
    if isinstance(pools, list) and pools:
        for key in _CAPACITY:
            if stats.get(key) is None:
                stats[key] = _pools_sum(pools, key)
                log.info("Backend reports %s only per pool: %s over %d "
                         "pool(s)", key, stats[key], len(pools))
    return json.dumps(stats, allow_nan=False)


def save_device(backend, args):
    vol = _find_volume(backend, args["volume_id"])
    conn = _pick_connection(vol, args.get("connector"), for_device=True)
    log.info("Saving device of volume %s on host %s", vol.id, _host(conn))
    conn.device_attached(args["device"])
    return None


def get_connection_info(backend, args):
    vol = _find_volume(backend, args["volume_id"])
    conn = _pick_connection(vol, args.get("connector"))
    log.info("Fetching connection of volume %s on host %s", vol.id,
             _host(conn))
    # cinderlib drops "device" from its dict until save_device (and again
    # when connect_volume forgets it): always the three keys, null when
    # none is saved (the engine's Jackson map reads null as Java null).
    return _dumps({"conn": conn.conn_info,
                   "connector": conn.connector_info,
                   "device": conn.device or None})


def clone_volume(backend, args):
    vol = _find_volume(backend, args["volume_id"])
    new_id = args["cloned_vol_id"]
    if _find_volume(backend, new_id, required=False) is not None:
        # Never discarded below: it is not this run's.
        raise errors.EngineError("Volume {} already exists".format(new_id))
    log.info("Cloning volume %s to %s", vol.id, new_id)
    try:
        vol.clone(id=new_id)
    except Exception:
        _discard(_find_volume(backend, new_id, required=False), "clone")
        raise
    return None


def create_snapshot(backend, args):
    vol = _find_volume(backend, args["volume_id"])
    log.info("Creating snapshot of volume %s", vol.id)
    # Loaded first, so that cinderlib adds the new snapshot to the list
    # even when its create fails.
    before = {s.id for s in vol.snapshots}
    try:
        snap = vol.create_snapshot()
    except Exception:
        for failed in [s for s in vol.snapshots if s.id not in before]:
            _discard(failed, "snapshot")
        raise
    log.info("Created snapshot %s of volume %s", snap.id, vol.id)
    return snap.id


def remove_snapshot(backend, args):
    vol, snap = _find_snapshot_of(backend, args["volume_id"],
                                  args["snapshot_id"])
    _check_locked(args, vol, snap)
    log.info("Removing snapshot %s of volume %s", snap.id, vol.id)
    snap.delete()
    return None


def create_volume_from_snapshot(backend, args):
    vol, snap = _find_snapshot_of(backend, args["volume_id"],
                                  args["snapshot_id"])
    _check_locked(args, vol, snap)
    params = {}
    if args.get("size"):
        if args["size"] < snap.volume_size:
            raise errors.EngineError(
                "Volume from snapshot {} needs at least {} GiB, got {}".format(
                    snap.id, snap.volume_size, args["size"]))
        params["size"] = args["size"]
    # Our id, not one cinderlib makes up: a failed create is found by it.
    params["id"] = str(uuid.uuid4())
    log.info("Creating volume %s from snapshot %s of volume %s",
             params["id"], snap.id, vol.id)
    try:
        new = snap.create_volume(**params)
    except Exception:
        _discard(_find_volume(backend, params["id"], required=False),
                 "volume from snapshot")
        raise
    log.info("Created volume %s from snapshot %s", new.id, snap.id)
    return new.id


# What ovirt-engine runs for this shim (ManagedBlockExecutor), which
# reads the adapter's settings as the engine's commands do: the command
# an admin runs.
ADAPTER = "/usr/share/ovirt-engine/managedblock/managedvolume-adapter"

# The volume ids each operation locks for its whole run (``volumelock``):
# those whose connections it reads, decides on and writes, or whose
# existence it changes.  Not get_connection_info and storage_stats (they
# write nothing), nor the source of a clone (cinder clones a volume in
# use; a long clone must not hold a VM's start).  See ``lock_ids`` for the
# snapshot commands.
LOCKS = {
    "create_volume": ("volume_id",),
    "delete_volume": ("volume_id",),
    "connect_volume": ("volume_id",),
    "disconnect_volume": ("volume_id",),
    "extend_volume": ("volume_id",),
    "save_device": ("volume_id",),
    "clone_volume": ("cloned_vol_id",),
    "create_snapshot": ("volume_id",),
    "remove_snapshot": ("volume_id",),
    "create_volume_from_snapshot": ("volume_id",),
}


def lock_ids(command, args):
    """The volume ids ``command`` locks for its whole run: ``LOCKS``, and
    for remove_snapshot and create_volume_from_snapshot the volume
    holding the snapshot, when it is not the one the engine named
    (``_find_snapshot_of``): a create_snapshot or delete_volume of that
    volume must not run beside them.

    Read before locking, from cinder's records (a snapshot's volume never
    changes); the operation checks under the lock that the volume it acts
    on is one of these (``_check_locked``).  Several ids are locked in
    sorted order (``volumelock.held``), as every command locks them, so
    two commands never wait for each other's second lock.
    """
    ids = [args[name] for name in LOCKS.get(command, ())]
    if command in _SNAPSHOT_OWNER_LOCKED:
        ids += [i for i in _snapshot_volume_ids(args["snapshot_id"])
                if i not in ids]
    return ids


_SNAPSHOT_OWNER_LOCKED = ("remove_snapshot", "create_volume_from_snapshot")

# The lock files a command removes when it lets go of them
# (``volumelock.held``'s discard): the volume delete_volume deleted, or
# found gone.  Also after a failed delete: a waiter then locks a new file,
# and the next command on the volume makes it again.
DISCARDS = {
    "delete_volume": ("volume_id",),
}

# Removals: when the volume or snapshot is gone, the goal is reached.
IDEMPOTENT = frozenset(("delete_volume", "remove_snapshot",
                        "disconnect_volume"))

OPERATIONS = {f.__name__: f for f in (
    create_volume, delete_volume, connect_volume, disconnect_volume,
    extend_volume, storage_stats, save_device, get_connection_info,
    clone_volume, create_snapshot, remove_snapshot,
    create_volume_from_snapshot)}


# Private helpers

def _find_volume(backend, vol_id, required=True):
    vols = backend.volumes_filtered(volume_id=vol_id)
    if not vols:
        if required:
            raise errors.EngineNotFound(kind="Volume", id=vol_id)
        return None
    return vols[0]


def _connect(vol, connector, conn=None):
    """Connect ``vol`` to ``connector``'s host: a new connection, or
    ``conn``, one a killed command left unfinished (``_unfinished``).

    cinderlib's ``Volume.connect`` records the connection only once the
    driver's ``initialize_connection`` has granted the volume to the
    host (an LVM target's ACL, a SAN's host mapping): a command killed
    in between left a grant no record names, which nothing ended and
    which made the backend refuse to delete the volume.  So the
    connection is recorded first, ``CONNECTING`` (cinder's attachment
    "attaching"), then granted, then completed with its conn_info; a
    record left ``CONNECTING`` or ``ENDING`` is connected again by its
    host's next connect_volume (the drivers' initialize_connection is
    idempotent for a connector: nova calls it at every start) and ended
    by disconnect_volume or delete_volume even when its host cannot be
    asked: its conn_info was never printed since, so no attach went
    through it (one the driver never granted only once no complete
    connection is left: ``_end``).

    A new connection whose initialize_connection fails is forgotten
    (``_abandon``), as cinder's volume manager forgets it
    (``_connection_create``).  The driver may have granted before it
    failed (a SAN call timing out after the mapping): when no other
    connection of the volume is left, terminate_connection takes that
    back first (cinderlib only deleted the record: review-engfix6 L3).
    With another connection left it is never called: drivers are
    written for cinder, which never terminates a connector whose
    initialize_connection failed, and some end more than that
    connector's grant then (Dell SC iSCSI unmaps the volume from every
    host when the initiator has no server on the array), which would
    cut the disk of a VM running elsewhere.  The export is removed only
    when no other connection uses it; cinderlib removed it after any
    failure, which cut a migration's source when its destination failed
    to connect.
    """
    from cinderlib import objects
    driver = vol.backend.driver
    model_update = driver.create_export(vol.CONTEXT, vol._ovo, connector)
    if model_update:
        vol._ovo.update(model_update)
        vol.save()
    new = conn is None
    if new:
        # cinderlib's Connection.connect, in two steps.
        conn = objects.Connection(vol.backend, connector=connector,
                                  volume=vol, status="attached",
                                  attach_status=CONNECTING,
                                  connection_info={"conn": {}})
        conn.connector_info = connector
        conn.save()
        vol.connections.append(conn)
        getattr(vol._ovo, objects.CONNECTIONS_OVO_FIELD).objects.append(
            conn._ovo)
    else:
        # The grant is made for the connector the host has now (a
        # renamed host's), which is what its end must name.
        conn.connector_info = connector
        conn.device = None
        conn._ovo.attach_status = CONNECTING
        conn.save()
    try:
        conn_info = driver.initialize_connection(vol._ovo, connector)
    except Exception:
        if new:
            _abandon(vol, conn, connector)
        else:
            log.warning("Connecting volume %s to host %s failed; its "
                        "connection stays unfinished, to be ended or "
                        "connected again", vol.id, connector.get("host"))
        raise
    conn.conn_info = conn_info
    conn._ovo._changed_fields.add("connection_info")
    conn._ovo.attach_status = "attached"
    _stamp(conn)
    conn.save()
    vol._ovo.status = "in-use"
    vol.save()
    return conn


def _end_all(vol, conns, context, force=False):
    """End each of ``conns`` (``_end``, with ``force``), those the driver
    granted first; [(connection, what ``_end`` returned)].

    One that fails (the driver's terminate_connection raising) is
    logged, its record kept, unfinished, and the others are still ended;
    then ``EngineNotEnded`` names the failures and the admin's override
    for a backend that can no longer end one (its host gone from the
    array: IBM Storwize/SVC and HPE 3PAR raise then): the connection's
    connector object with ``"force": true``.
    """
    from . import hosts
    ended = []
    failed = []
    for conn in _granted_first(conns):
        log.info("Disconnecting volume %s from host %s%s", vol.id,
                 _host(conn), context)
        try:
            ended.append((conn, _end(vol, conn, force=force)))
        except Exception as e:
            log.warning("Could not end the connection of volume %s to "
                        "host %s: %s", vol.id, _host(conn), e)
            failed.append((conn, e))
    if failed:
        forced = [dict(json.loads(_override(c)), **{hosts.FORCE: True})
                  for c, _ in failed]
        raise errors.EngineNotEnded(
            id=vol.id, count=len(failed),
            failures="; ".join("host {}: {}".format(_host(c), e)
                               for c, e in failed),
            commands="; ".join(
                "{} disconnect_volume DRIVER_JSON DB_URL FLOW_ID {} "
                "'{}'".format(ADAPTER, vol.id, json.dumps(f))
                for f in forced))
    return ended


def _abandon(vol, conn, connector):
    """Forget ``conn``, the new connection of ``vol`` whose
    initialize_connection for ``connector`` just failed (``_connect``):
    with no other complete connection left, terminate_connection first (a
    failure is logged: the grant the driver may have made stays, as
    cinder leaves it), then the record, then the export unless another
    connection uses it."""
    others = [c for c in vol.connections if c.id != conn.id]
    # One left unfinished (a killed command's) is no host's: ending what
    # the driver granted then cuts nobody (``_end``); kept, the grant
    # was left with no record naming it (review-engfix8 L1).
    if not [c for c in others if not _unfinished(c)]:
        try:
            vol.backend.driver.terminate_connection(vol._ovo, connector,
                                                    force=False)
        except Exception as e:
            log.warning("Connecting volume %s to host %s failed, and so "
                        "did taking back what the driver may have granted "
                        "(%s)", vol.id, connector.get("host"), e)
    conn.persistence.delete_connection(conn)
    vol._connection_removed(conn)
    if others:
        log.warning("Connecting volume %s to host %s failed; keeping its "
                    "export: %d other connection(s) use it", vol.id,
                    connector.get("host"), len(others))
    else:
        _remove_export(vol, "after its failed connect")


def _end(vol, conn, force=False):
    """End ``conn``, removing ``vol``'s export only when nothing shares
    it; return whether it was removed, or None when ``conn`` was kept
    (below: one the driver never granted, beside a complete one).
    A failing terminate_connection is raised, the record kept "detached"
    (below), unless the driver never granted ``conn`` or ``force``
    (the admin's): then it is logged and the record deleted all the
    same, leaving whatever the backend still grants that host.

    What cinder's volume manager does when an attachment is deleted
    (``VolumeManager.attachment_delete`` with ``_connection_terminate``,
    cinder/volume/manager.py): the driver's ``terminate_connection``
    answers whether other attachments still share the volume's export (a
    bool; anything else means "not shared"), and ``remove_export`` runs
    only when it is not shared; a failing ``remove_export`` is logged and
    does not fail the detach.  cinderlib's ``Connection.disconnect()``
    drops that answer and always removes the export.  We also keep the
    export while any other connection of ours is left (one the driver may
    not count, kept because its host could not be asked): a leaked export
    is recoverable, a removed one cuts a running VM's disk.

    The connection is marked ``ENDING`` before the driver is called, and
    its record is deleted after ``terminate_connection``, before the
    export's removal (cinderlib's order, ``Connection._disconnect``): a
    command killed before the deletion leaves the record, which the next
    disconnect_volume or delete_volume ends again and its host's next
    connect_volume connects again (``_connect``); the connection of a
    command killed after terminate_connection was reused as it was by
    cinderlib, handing the host a connection whose grant was gone.
    terminate_connection must find the export when it runs again: LIO's
    (cinder's ``LioAdm.terminate_connection``, ``cinder-rtstool
    delete-initiator``) fails once the target is gone, so a record
    outliving its export would never end (review-engfix6 M2).  A command
    killed after the deletion leaves an export no record names:
    delete_volume removes it before the driver's delete, a later connect
    reuses it.  The volume is "available" again when it has no
    connection left.

    A grant is made to the host's identity (``hosts.same_grant``: the
    initiator, NQN or port WWNs), not to the record: when another
    connection of ``vol`` has the same identity (a host renamed after a
    connect of its was killed made a second one; cloned hosts),
    terminate_connection would revoke what that connection still uses,
    the disk of a VM running there.  The record is then deleted without
    calling the driver, and the grant ends with the last of them
    (review-engfix6 M1).

    A connection the driver never granted (``_granted``: no conn_info
    recorded; a connect killed before initialize_connection returned,
    or one whose reconnect failed, or a failed connect's forgetting
    killed half-way) is kept, unfinished, while another connection of
    ``vol`` is complete (a host may use it): drivers are written for
    cinder, which calls terminate_connection only for an attachment
    whose initialize_connection succeeded (``_connection_terminate``
    skips one without a connector), and some end more than that
    connector's grant for one they do not know (Dell SC iSCSI unmaps
    the volume from every host when the initiator has no server on the
    array), cutting the disk of a VM running elsewhere.  It is ended
    with terminate_connection once no complete connection is left:
    whatever the driver ends then, no host uses, and a grant made before
    the kill is taken back (deleting the record alone left that grant,
    which made such backends refuse the volume's delete).  Callers end
    the granted connections first (``_granted_first``) so that one run
    ends both.
    """
    driver = vol.backend.driver
    others = [c for c in vol.connections if c.id != conn.id]
    sharing = _sharing(vol, conn, others)
    complete = [c for c in others if not _unfinished(c)]
    if _waits(vol, conn):
        log.info("Keeping the connection of volume %s to host %s, left "
                 "unfinished (%s) before the driver ever granted it, "
                 "until it is the volume's last: terminate_connection "
                 "for a connector the driver never granted may end the "
                 "access of every host (%d other connection(s): %s)",
                 vol.id, _host(conn), _attach_status(conn), len(complete),
                 ", ".join(_host(c) or "?" for c in complete))
        return None
    if _attach_status(conn) != ENDING:
        conn._ovo.attach_status = ENDING
        conn.save()
    if sharing:
        log.info("Not ending the grant of volume %s to host %s: %d other "
                 "connection(s) of the same identity (%s) use it",
                 vol.id, _host(conn), len(sharing),
                 ", ".join(_host(c) or "?" for c in sharing))
        shared = True
    else:
        try:
            shared = driver.terminate_connection(
                vol._ovo, conn.connector_info, force=False)
        except Exception as e:
            if _granted(conn) and not force:
                raise
            # cinder never asks a driver to end a connector it never
            # granted, and some raise for one they have no host for
            # (IBM Storwize/SVC, HPE 3PAR): raising, the record could
            # never end (review-engfix8 M1).  A driver that did grant
            # before the kill knows the connector.
            log.warning("Ending the connection of volume %s to host %s "
                        "though the driver could not end it (%s): %s; "
                        "whatever the backend still grants that host is "
                        "left to the host's next connection or the "
                        "backend's administrator", vol.id, _host(conn),
                        "forced" if force else "it never granted it", e)
            shared = False
        shared = shared if isinstance(shared, bool) else False
    removed = not (shared or others)
    # cinderlib's Connection._disconnect.
    conn.conn_info = None
    conn._ovo.status = "detached"
    conn.persistence.delete_connection(conn)
    vol._connection_removed(conn)
    if removed:
        _remove_export(vol, "ignored as cinder does")
    else:
        log.info("Keeping the export of volume %s: %s", vol.id,
                 "the driver says it is shared" if shared and not sharing
                 else "{} other connection(s) left".format(len(others)))
    if not others:
        vol._ovo.status = "available"
        vol.save()
    return removed


def _sharing(vol, conn, others):
    """The connections of ``others`` granted to ``conn``'s identity
    (``hosts.same_grant``, for the volume's transport)."""
    from . import hosts
    kind = next((t for t in (hosts.transport(c.conn_info)
                             for c in vol.connections) if t), None)
    return [c for c in others
            if hosts.same_grant(c.connector_info, conn.connector_info,
                                kind)]


def _waits(vol, conn, ending=()):
    """Whether ``_end`` keeps ``conn``, once ``ending`` are ended: one
    the driver never granted, beside a complete connection, sharing no
    grant with another."""
    gone = {c.id for c in ending}
    others = [c for c in vol.connections
              if c.id != conn.id and c.id not in gone]
    return not _granted(conn) and not _sharing(vol, conn, others) and \
        any(not _unfinished(c) for c in others)


def _remove_export(vol, context):
    """The driver's ``remove_export`` of ``vol``; a failure is logged
    (with ``context``), never raised: a leaked export is recoverable."""
    try:
        vol.backend.driver.remove_export(vol._context, vol._ovo)
    except Exception as e:
        log.warning("Could not remove the export of volume %s (%s): %s",
                    vol.id, context, e)


def _ask(vol, conns, args):
    """One ``hosts.Answer`` per connection: does its host have ``vol``?"""
    from . import hosts
    settings = hosts.Settings.from_dict(args.get("hosts"))
    return hosts.ask(settings, vol.id, [c.connector_info for c in conns],
                     flow_id=args.get("correlation_id"),
                     transports=[hosts.transport(c.conn_info)
                                 for c in conns])


def _released(vol, conns, args):
    """The connections whose hosts said they no longer have ``vol``.

    The hosts of the connections the driver granted are asked first,
    all at once; those of the connections it never granted only when
    ``_end`` would end them: ``_end`` keeps one beside a complete
    connection (``_waits``), whatever its host answers, and asking a
    host that does not answer costs the host timeout (10 s) at every
    disconnect_volume of the volume, each stop or migration of the VM
    running elsewhere.  Once no complete connection is left (the VM's
    stop on its last host) its host is asked: a host that says it has
    the volume (attached through a connection since ended by hand)
    keeps it.  The shim keeps nothing between commands, so a host
    known unreachable is asked again each time.
    """
    granted = [c for c in conns if _granted(c)]
    released = _released_of(vol, granted, args) if granted else []
    never = [c for c in conns if not _granted(c)]
    waiting = [c for c in never if _waits(vol, c, ending=released)]
    for conn in waiting:
        log.info("Keeping the connection of volume %s to host %s, left "
                 "unfinished (%s) before the driver ever granted it, "
                 "without asking its host: it ends once no complete "
                 "connection is left", vol.id, _host(conn),
                 _attach_status(conn))
    asked = [c for c in never if all(c.id != w.id for w in waiting)]
    return released + (_released_of(vol, asked, args) if asked else [])


def _released_of(vol, conns, args):
    """``_released`` of ``conns``, their hosts asked at once."""
    released = []
    for conn, answer in zip(conns, _ask(vol, conns, args)):
        if answer.attached is None and _unfinished(conn):
            log.info("The connection of volume %s to %s was left "
                     "unfinished by a command that did not end (%s): no "
                     "attach went through it since, so it is released "
                     "though the host cannot be asked (%s)", vol.id,
                     answer.where(), _attach_status(conn), answer.reason)
            released.append(conn)
        elif answer.attached is None:
            log.warning("Keeping the connection of volume %s to %s: the "
                        "host cannot be asked whether it still uses it "
                        "(%s); disconnect_volume %s '%s' ends it once "
                        "you know it does not (a host the engine cannot "
                        "reach at its connector's ip or host name needs "
                        "MANAGEDVOLUME_ENGINE_HOST_ADDRESSES)", vol.id,
                        answer.where(), answer.reason, vol.id,
                        _override(conn))
        elif answer.attached:
            log.info("Keeping the connection of volume %s to %s: the "
                     "volume is attached there", vol.id, answer.where())
        else:
            log.info("%s no longer has volume %s", answer.where(), vol.id)
            released.append(conn)
    return released


_CAPACITY = ("total_capacity_gb", "free_capacity_gb")


def _finite(obj):
    """A copy of ``obj`` with cinder's capacity sentinels for the floats
    JSON cannot carry."""
    if isinstance(obj, float):
        if obj != obj or obj == float("-inf"):
            return "unknown"
        return "infinite" if obj == float("inf") else obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _pools_sum(pools, key):
    total = 0
    unknown = False
    for pool in pools:
        value = pool.get(key) if isinstance(pool, dict) else None
        if isinstance(value, str) and value.strip().lower() == "infinite":
            return "infinite"
        number = _capacity(value)
        if number is None:
            unknown = True
        else:
            total += number
    return "unknown" if unknown else round(total, 2)


def _capacity(value):
    """A finite number of GiB from a number or a numeric string, or
    None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or value != value or \
            value in (float("inf"), float("-inf")):
        return None
    return value


def _discard(obj, kind):
    """Delete ``obj`` (a volume or snapshot) that a failed create left in
    "error", best effort: the engine got an error line and never learns
    its id.  The operation's own error is the one reported; a failing
    delete is logged with the id and leaves the object in "error" (not
    cinderlib's "error_deleting"), where delete_volume still finds a
    snapshot."""
    if obj is None or obj.status != "error":
        return
    try:
        obj.delete()
    except Exception as e:
        log.warning("Could not delete %s %s that the failed create left in "
                    "error: %s", kind, obj.id, e)
        try:
            obj._ovo.status = "error"
            obj.save()
        except Exception as e:
            log.warning("Could not mark %s %s as error again: %s", kind,
                        obj.id, e)
    else:
        log.info("Deleted %s %s that the failed create left in error",
                 kind, obj.id)


def _find_snapshot_of(backend, vol_id, snap_id):
    """(volume, snapshot): snapshot ``snap_id`` of volume ``vol_id`` or,
    when it is not there, of whichever volume of this backend holds it.

    ovirt-engine names the *disk* (its first volume's id) where it should
    name the volume holding the snapshot: RemoveSnapshotCommand,
    RestoreAllManagedBlockSnapshotsCommand (``setImageGroupID(disk.getId())``)
    and TryBackToAllSnapshotsOfVmCommand (``setVolumeId(image.getId())``),
    while CreateSnapshotDiskCommand snapshots the disk's active volume
    (``disk.getImageId()``).  After a snapshot preview is committed that
    is a volume made from the snapshot, with another id: its snapshots
    were "not found" under the disk, so a removal succeeded without
    removing anything (and the volume could never be deleted), and a
    preview of one failed.  Another backend's snapshot is not found.
    """
    vol = _find_volume(backend, vol_id, required=False)
    if vol is not None:
        for snap in vol.snapshots:
            if snap.id == snap_id:
                return vol, snap
    for owner_id in _snapshot_volume_ids(snap_id):
        owner = _find_volume(backend, owner_id, required=False)
        if owner is not None:
            log.info("Snapshot %s is of volume %s, not of volume %s (the "
                     "engine names the disk)", snap_id, owner.id, vol_id)
            return owner, _find_snapshot(owner, snap_id)
    if vol is None:
        raise errors.EngineNotFound(kind="Volume", id=vol_id)
    raise errors.EngineNotFound(kind="Snapshot", id=snap_id)


def _check_locked(args, vol, snap):
    """Refuse to act on ``snap`` of ``vol`` when ``vol`` is not locked:
    the snapshot was not in the records when the locks were chosen
    (``lock_ids``), and appeared before they were held."""
    locked = args.get("locked")
    if locked is not None and vol.id not in locked:
        raise errors.EngineError(
            "Snapshot {} of volume {} appeared while this command waited "
            "for its locks; run it again".format(snap.id, vol.id))


def _snapshot_volume_ids(snap_id):
    """The ids of the volumes holding a snapshot ``snap_id``, of any
    backend.  From cinder's records: cinderlib's ``get_snapshots`` builds
    objects that need the snapshot's backend loaded in this process
    (KeyError for another storage domain's)."""
    from cinder import objects as cinder_objs
    from cinderlib import objects as cl_objs
    snaps = cinder_objs.SnapshotList.get_all(cl_objs.CONTEXT,
                                             filters={"id": snap_id})
    return [s.volume_id for s in snaps.objects]


def _find_snapshot(vol, snap_id):
    for snap in vol.snapshots:
        if snap.id == snap_id:
            return snap
    raise errors.EngineNotFound(kind="Snapshot", id=snap_id)


def _host(conn):
    return (conn.connector_info or {}).get("host")


def _pick_connection(vol, host, for_device=False):
    """The connection an operation without a connection id means.

    With ``host`` (a name or a connector object, ``_named``): that host's
    connection.  Without: the only one; with several (a live migration),
    for save_device the one that has no device yet (the host that just
    attached), else the newest.  Newest is the last connected by
    connect_volume, which stamps a connection it reuses too: the engine
    runs save_device right after its connect_volume and the host's
    attach, so of several connections without a device (one leaked by a
    failed attach elsewhere) the last connected is that host's.
    """
    # One a killed command left unfinished has no conn_info to give, nor
    # an attach to save a device for.
    conns = [c for c in vol.connections if not _unfinished(c)]
    if not conns:
        raise errors.EngineNotFound(kind="Connection of volume", id=vol.id)
    if host is not None:
        named = _named(vol, conns, host)
        if named:
            return named[0]
        raise errors.EngineNotFound(
            kind="Connection of volume {} to host".format(vol.id),
            id=_show_host(host))
    if len(conns) == 1:
        return conns[0]
    if for_device:
        fresh = [c for c in conns if not c.device]
        if fresh:
            return max(fresh, key=_connected_at)
    return max(conns, key=_connected_at)


def _named(vol, conns, host):
    """The connections of ``conns`` to ``host`` (a name or a connector
    object, ``hosts.names``, with its ``connection_id`` if it has one):
    none or one.  Several (hosts of one name with other identities:
    connect_volume keeps a connection each; or one identity an earlier
    version connected twice) are refused with the connector object of
    each, its connection id included, so that the admin names one:
    ending all of them cuts the other hosts' disks."""
    from . import hosts
    named = [c for c in conns if hosts.names(c.connector_info, host)]
    conn_id = host.get(hosts.CONNECTION_ID) if isinstance(host, dict) \
        else None
    if conn_id is not None:
        named = [c for c in named if c.id == conn_id]
    if len(named) > 1:
        raise errors.EngineAmbiguousHost(
            id=vol.id, count=len(named),
            named="host {}".format(_show_host(host)),
            identities=", ".join(_override(c) for c in named))
    return named


def _override(conn):
    """The connector object naming ``conn`` alone, for the admin's
    command (``_named``): its host's identities and its id."""
    from . import hosts
    return hosts.identity(conn.connector_info, conn.id)


def _show_host(host):
    """``host`` (a name or a connector object) for a message."""
    if isinstance(host, dict):
        from . import hosts
        return hosts.identity(host, host.get(hosts.CONNECTION_ID))
    return host


def _detach_command(vol_id, answer):
    """The command that detaches ``vol_id`` on the host that gave
    ``answer`` (vdsm-client, as on the host or anywhere with its TLS
    setup)."""
    from . import hosts
    address, port = answer.endpoint
    return "vdsm-client -a {}{} ManagedVolume detach_volume vol_id={}".format(
        address, "" if port == hosts.DEFAULT_PORT else " -p {}".format(port),
        vol_id)


def _connected_at(conn):
    """A key ordering connections by when they were last connected:
    attach_time, stamped by connect_volume (in UTC,
    ``runner._utc_postgresql_sessions``, and marked so: ``_stamp``); a
    connection an older version stamped ranks before every marked one,
    and one of a version that stamped nothing (only its created_at)
    before those.

    Stamps of different versions are never compared: the rows an older
    version wrote on PostgreSQL hold stamps in the server's time zone
    (cinderlib's created_at is an aware stamp, as attach_time, which
    PostgreSQL converted to the session's zone), hours ahead of this
    version's UTC ones east of UTC (review-engfix6 L1), so an older
    version's deviceless connection (a failed attach's) outranked a host
    connected after the upgrade (review-engfix7 L1).  Every connection
    stamped since the upgrade is marked, and was connected after every
    one that is not."""
    ovo = conn._ovo
    when = ovo.attach_time if ovo.obj_attr_is_set("attach_time") else None
    if when is not None:
        info = ovo.connection_info or {}
        return (3 if info.get(STAMP_ZONE) == "UTC" else 2, when)
    if conn.created_at is not None:
        return (1, conn.created_at)
    return (0, 0)


# The key of a connection's connection_info (beside cinderlib's conn,
# connector and device) marking its attach_time as stamped in UTC by
# this version (``_connected_at``).
STAMP_ZONE = "attach_time_zone"


def _stamp(conn):
    """Stamp ``conn`` as connected now (attach_time, in UTC, marked)."""
    conn._ovo.attach_time = _now()
    if conn._ovo.connection_info is None:
        conn._ovo.connection_info = {}
    conn._ovo.connection_info[STAMP_ZONE] = "UTC"
    conn._ovo._changed_fields.add("connection_info")


def _now():
    from oslo_utils import timeutils
    return timeutils.utcnow()


# The attach_status (cinder's VolumeAttachStatus) of a connection a
# command is changing, which it keeps if that command is killed:
# CONNECTING from its record until its conn_info is recorded (the
# driver's grant may exist), ENDING from before terminate_connection
# until its record is deleted (the grant may be gone).  A complete one
# is "attached", or None when made by an older version.
CONNECTING = "attaching"
ENDING = "detached"


def _granted(conn):
    """Whether the driver's initialize_connection ever returned for
    ``conn``: its conn_info is recorded (``_connect``), as cinder writes
    an attachment's connector only then (``_connection_create``); ending
    a connection forgets it only with its record (``_end``)."""
    return bool(conn.conn_info)


def _granted_first(conns):
    """``conns`` in the order to end them: those the driver granted
    first (``_end`` keeps one it never granted while a complete one is
    left)."""
    return sorted(conns, key=lambda c: not _granted(c))


def _attach_status(conn):
    ovo = conn._ovo
    return ovo.attach_status if ovo.obj_attr_is_set("attach_status") \
        else None


def _unfinished(conn):
    """Whether a killed command left ``conn`` half connected or half
    ended (``_connect``, ``_end``)."""
    return _attach_status(conn) in (CONNECTING, ENDING)


def _dumps(obj):
    # json.dumps' default separators, as upstream: byte-compatible output.
    return json.dumps(obj)
