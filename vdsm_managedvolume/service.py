"""Attach and detach managed volumes: the logic, the locks, the journal.

This is vdsm's ``managedvolume.py`` made safe.  The verbs and their results
are vdsm's (README, "Verbs"); what differs is how they get there:

- every input is validated before anything happens on the host
  (``validate``), the driver type and the adapter included;
- every operation on a volume holds that volume's lock, across threads and
  processes (``locking``);
- every step is announced in the journal (``store``) before it is taken,
  so that a crash anywhere leaves a record saying what may exist::

    attach:  row 'attaching' -> connect -> record attachment + path
             -> udev rule -> managed link -> row 'attached'
    detach:  row 'detaching' -> remove link -> remove rule -> disconnect
             -> delete row
    extend:  row 'extending' set -> rescan (os-brick extend_volume)
             -> size read from the device recorded, 'extending' cleared

  and ``reconcile()`` (run by ``start()``) finishes or undoes whatever a
  crash interrupted: 'attaching' is rolled back, 'detaching' finished,
  an 'attached' volume of this boot whose device is present gets its
  link and rule back (and, after an interrupted extend, its size
  recorded), one whose device is gone is reported 'stale' and kept
  (attaching it again fixes it), links and rules nobody owns are removed;
- every record carries the boot it was made in (``boot``).  A record from
  another boot is never a live attachment, even when a device of the same
  name came back at boot (oVirt/vdsm#433: DRBD, StorPool, FC LUNs, local
  disks): volumes_info says ``stale``, reconcile (in a thread after
  every start) detaches it as detach_volume would (ovirt-engine never
  will when the VM was restarted on another host), a re-attach before
  that starts afresh as a first attach (connect, link, rule, this
  boot), a detach disconnects.  Within one boot (agent or vdsmd
  restarted) links are kept and a second attach is 927, as in vdsm;
- before disconnecting, or attaching over a record of this boot, the
  device at the recorded path must still be the one recorded (the
  transport's ``identity``: WWN, serial, loop backing file, MAJ:MIN +
  diskseq within a boot); a re-attach over any record compares the
  device its connect returned with the recorded one (WWN, serial, loop
  backing file).  A record of another boot is not judged by what is at
  its path now: a kernel name (NVMe's ``/dev/nvmeXnY``) is given anew in
  connect order at each boot, so it may be another volume's while this
  one comes back under another name (vdsm's ``managedvolume._add_volume``
  looks at the recorded path too, for its 927; its ``attach_volume``
  then takes the path the connect returned).  A device that now belongs
  to something else is never disconnected nor given to qemu's user (the
  class of Nova's OSSA-2023-003): detach then forgets the record and
  leaves the device alone, re-attach is refused with 929
  (``DeviceChanged``), and the log says what the admin does;
- what differs between driver types (the path after connect, checks of
  their own, the device's identity) is asked of ``transports``;
- connector_info is cached and refreshed only when what it is made of
  changes (``connectorinfo``), so getCapabilities costs microseconds,
  not a helper process.

The privileged work (os-brick) happens in ``privileged.Brick``'s privsep
daemon; the journal, the locks and the managed links (in ``run_dir``,
which belongs to the service's user) happen here.  The udev rules need
root: a root service writes them itself; a service that is not root (vdsm
runs it as user vdsm) or cannot write ``udev_rules_dir`` asks the daemon
(``[volumes] udev_writer``, see ``udevwriter``), whose narrow
entrypoints rebuild each rule from the ids and the device path.
"""

import collections
import logging
import os
import re
import tempfile
import threading
import time

from . import adapters
from . import boot
from . import connectorinfo
from . import devices
from . import errors
from . import faults
from . import fileutil
from . import hosttools
from . import locking
from . import mask
from . import scheduler
from . import store
from . import transports
from . import udev
from . import udevwriter
from . import validate

faults.register(
    "attach.after_record",
    "attach.after_connect",
    "attach.after_attachment",
    "attach.after_udev",
    "attach.after_link",
    "attach.after_move",
    "detach.after_record",
    "detach.after_unlink",
    "detach.after_rule",
    "detach.after_disconnect",
    "extend.after_record",
    "extend.after_rescan",
)

log = logging.getLogger("managedvolume.service")


# Errors an attach is refused with for the caller's mistake, not the
# host's failure: logged at WARNING (the call's FINISH line says the
# code at INFO).
_REFUSALS = (errors.AlreadyAttached, errors.InvalidParams)


class Service:

    def __init__(self, cfg, brick=None):
        self.cfg = cfg
        self._owns_brick = brick is None
        if brick is None:
            from . import privileged
            brick = privileged.Brick(cfg)
        self._brick = brick
        self._store = None
        # Calls using the journal now, and whether close() was asked.
        self._calls = 0
        self._closing = False
        self._calls_cond = threading.Condition()
        # Records kept because what an earlier connect started still ran
        # (``_retry_later``), the thread trying them again, what stops
        # it; None: not started (a tool's service), never tried again.
        self._kept = set()
        self._kept_said = set()     # those whose WARNING was logged
        self._kept_thread = None
        self._kept_stop = None
        # The RBD ceph conf sweeps waiting for their time (one thread for
        # all; None: not started, a tool's service sweeps nothing later),
        # the keyrings of the RBD attaches and extends in flight (how
        # many of each: ``_InFlight``), and the sets of the sweeps
        # running now, each collecting every keyring in flight while it
        # ran (``_sweep_confs``).
        self._later = None
        self._confs_lock = threading.Lock()
        self._in_flight_keyrings = collections.Counter()
        self._sweeping = {}
        self._connector = connectorinfo.Cache(
            brick, cfg.connector_info_ttl, cfg.connector_info_cache)
        self.udev_writer = udevwriter.choose(cfg)
        if self.udev_writer == "daemon":
            self._rules = udevwriter.DaemonRules(brick)
        else:
            self._rules = udevwriter.ServiceRules(cfg)

    def open(self, read_only=False):
        """Open (create, migrate) the journal without touching the host.

        For tools that want a dry-run ``reconcile(apply=False)``; the
        service itself uses ``start()``.  ``read_only`` (a dry run): the
        journal is opened with ``store.open_read_only`` (nothing created,
        migrated or written; a journal of another schema version is a
        StoreError) and no directory is made.
        """
        with self._calls_cond:
            if self._store is None:
                boot.current(self.cfg)      # an unreadable boot id fails here
                self._store = (store.open_read_only if read_only
                               else store.open)(self.cfg.db_path)
            self._closing = False
        if read_only:
            return
        for d in (self.cfg.run_dir, self.cfg.lock_dir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        log.info("udev rules are written by the %s", "privsep daemon"
                 if self.udev_writer == "daemon" else "service")

    def start(self, defer_detach_stale=False):
        """Open (create, migrate) the journal and reconcile the host.

        ``defer_detach_stale``: the records of an earlier boot (attached,
        or an attach or detach a crash cut) are kept now (stale; their
        links and rules removed) and detached by ``detach_stale_later``.
        Each such detach is a privsep call
        that unreachable storage may hold for ``[privsep] timeout``; after
        a fence there may be dozens, and a host whose agent (or vdsm's
        first call) does not answer meanwhile looks dead to the engine.
        """
        self.open()
        with self._calls_cond:
            self._kept_stop = threading.Event()
            if self._later is None:
                self._later = scheduler.Scheduler("conf-sweeps")
        self._sweep_confs()
        self._log_reconcile(self.reconcile(
            apply=True, detach_stale=not defer_detach_stale))

    def detach_stale_later(self):
        """Reconcile again in a thread of its own, which detaches the
        records of an earlier boot that ``start`` kept; return the thread.
        A volume whose lock an operation holds is skipped ("busy"), never
        waited for: an attach arriving meanwhile goes first (a first
        attach over such a record), and a record still there is detached
        at the next reconcile."""
        def run():
            try:
                self._log_reconcile(self.reconcile(apply=True))
            except Exception:
                log.exception("Reconciling the records of an earlier "
                              "boot failed")

        t = threading.Thread(target=run, name="reconcile-stale",
                             daemon=True)
        t.start()
        return t

    def _log_reconcile(self, entries):
        for entry in entries:
            log.info("Reconcile %s (%s): %s -> %s%s", entry["vol_id"],
                     entry["state"], entry["action"], entry["result"],
                     " ({})".format(entry["reason"]) if entry.get("reason")
                     else "")

    def close(self, timeout=None):
        """Refuse new calls, let running ones finish, close the journal.

        New calls fail with StoreClosed (935) at once.  Calls already
        running get up to ``timeout`` seconds (``cfg.shutdown_timeout``)
        to finish, so that an attach is not cut between its connect and
        its journal update; one still running after that fails at its
        next journal write and leaves its record for reconcile.  The
        privsep daemon (when this service started it) gets what is left
        of ``timeout`` for its running calls, then it is killed: closing
        takes ``timeout`` at most.
        """
        if timeout is None:
            timeout = self.cfg.shutdown_timeout
        deadline = time.monotonic() + timeout
        with self._calls_cond:
            self._closing = True
            if self._kept_stop is not None:
                self._kept_stop.set()
            if self._later is not None:
                self._later.stop()
                self._later = None
            while self._calls:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("Closing the journal with %d calls still "
                                "running", self._calls)
                    break
                self._calls_cond.wait(remaining)
            db, self._store = self._store, None
        if db is not None:
            db.close()
        if self._owns_brick:
            self._brick.stop(max(0.0, deadline - time.monotonic()))

    def attach_volume(self, vol_id, connection_info,
                      sd_id=validate.BLANK_UUID):
        """Connect a volume; return {vol_id, path, attachment, managed_path}.

        Raises AlreadyAttached (927) when the volume is attached with the
        same connection_info and its device and managed link exist,
        ConnectionMismatch (929) when it is attached with another one,
        InvalidParams when a ``local`` device_path is a block device the
        host itself uses (mounted, swap, held by dm/LVM/md),
        HelperFailed (926) when the connector succeeded but the device
        path does not exist (the connection is undone),
        InvalidParams when connection_info is larger than
        validate.MAX_CONNECTION_INFO as JSON, holds NaN or infinities,
        lacks a field its connector needs or holds one of the wrong type
        (``transports``: rbd's data.name is "pool/image").
        A record left by a reboot (another boot) or a crash does not
        block: the volume is attached again, from another boot as a first
        attach.  DeviceChanged (929) when the device at the recorded path
        of a record of this boot is no longer the one recorded
        (``devices.changed``), or when the device the connect returned is
        not the one recorded (its WWN, serial or loop backing file;
        ``_check_recorded``): it may belong to something else, it is not
        disconnected nor given to qemu's user.
        DetachFirst (931) when an earlier record of the volume that must
        be detached first (another connection_info, or a detach left
        unfinished) cannot be yet: what an earlier connect of it started
        still runs (``_detach_first``); nothing is connected, the record
        stays 'detaching' and the service detaches it once that ended.
        On failure everything done is undone and nothing
        stays recorded (unless the undo itself failed: then the record
        stays 'attaching' for reconcile), except over a record of this
        boot whose device is there (attached, only its managed link
        missing; under any sd_id): a VM may be using that device, so
        nothing is disconnected nor removed, and the record is 'attached'
        as it was, its sd_id included (``_keep_attached``); a device its
        connect returned that is not the recorded one (DeviceChanged) is
        left connected and not recorded.  A successful attach there under
        another sd_id removes the link and rule named with the old one
        only once the new ones exist.
        """
        vol_id = validate.uuid("vol_id", vol_id)
        sd_id = validate.uuid("sd_id", sd_id)
        connection_info = validate.connection_info(
            "connection_info", connection_info)
        validate.driver_type(connection_info, self.cfg.allowed_types)
        # The one check on the service's side that the adapter is an
        # installed plug-in (934 before anything is recorded or started).
        # detach, extend and reconcile use the recorded connection_info,
        # which passed it; the daemon loads the plug-in by name from its
        # own environment (brick._connector), 934 again if it is gone.
        adapters.check(connection_info.get("adapter"))
        transport = transports.get(connection_info["driver_volume_type"])
        transport.check(self.cfg, connection_info)

        with self._call() as db, self._locked(vol_id), \
                _InFlight(self, connection_info):
            boot_id = self._boot()
            # Most attaches find no record: the intent is written at once
            # (an insert that leaves a record already there alone), and
            # only a record found is read and judged (_reuse).
            added = db.add_volume(vol_id, sd_id, connection_info,
                                  boot_id=boot_id, exist_ok=True)
            rec = None if added else self._find(vol_id)
            fresh = True
            live = False
            # What the volume's device was at its last attach: the device
            # this connect returns must be it (``_check_recorded``).
            recorded = None
            if rec is not None:
                recorded = rec["identity"]
                rec, fresh, live = self._reuse(rec, sd_id, connection_info,
                                               boot_id)
            # At INFO, the call's START line (api.py) says this (with
            # connection_info, masked) and its FINISH line the outcome;
            # progress is DEBUG, as in vdsm (storage/managedvolume.py:
            # attach_volume and detach_volume log their start at DEBUG).
            log.debug("Attaching volume %s sd_id=%s", vol_id, sd_id)
            # Attached in this boot, its device there (only its managed
            # link was missing): a VM may be using that device.  Its
            # record stays 'attached' throughout, under its sd_id until
            # the last step: a crash or a stop from here leaves a record
            # reconcile keeps (making its link again; the link and rule
            # named with another sd_id are then nobody's and go), never
            # one it rolls back, and a failure leaves the volume as it
            # was (_keep_attached).
            moved = live and rec["sd_id"] != sd_id
            if rec is None:
                if not added:   # _reuse removed the record it found
                    db.add_volume(vol_id, sd_id, connection_info,
                                  boot_id=boot_id)
            elif fresh:
                # What the record says about another boot's connection
                # must not be disconnected by a rollback.
                db.update_volume(vol_id, state="attaching", sd_id=sd_id,
                                 boot_id=boot_id, managed_path=None,
                                 attachment=None, path=None,
                                 multipath_id=None, identity=None,
                                 size=None, extending=None, connecting=True)
            elif not live:
                db.update_volume(vol_id, state="attaching", sd_id=sd_id,
                                 boot_id=boot_id, managed_path=None,
                                 size=None, extending=None, connecting=True)
            elif not rec["connecting"]:
                # A connect cut now may leave a login running beside the
                # live connection (store.py, ``connecting``); within
                # this boot only, so no fsync.
                db.update_volume(vol_id, connecting=True, durable=False)
            # Whether a connect of this record earlier in this boot may
            # not have completed: what this one returns does not tell
            # that those commands ended.
            unfinished = rec is not None and not fresh and rec["connecting"]
            faults.crash_point("attach.after_record")
            # Over a record of this boot, the connection its attach made
            # may still be there: a rollback after a connect that did not
            # return ends that one, with what its connect returned
            # (os-brick's disconnect needs it: which path the I/O went
            # through, RBD's conf holding the keyring).
            earlier = None if fresh or rec is None else rec["attachment"]
            attachment = None
            try:
                attachment = self._brick.connect(connection_info)
                faults.crash_point("attach.after_connect")
                path = self._resolve_path(transport, vol_id,
                                          connection_info, attachment)
                # One stat of the device serves the check that it
                # exists, its identity, its size and the udev trigger.
                st = devices.examine(path)
                if st is None:
                    # os-brick's local connector returns any path it is
                    # given; a VM would fail on it much later.
                    raise errors.HelperFailed(
                        "the connector reported success but device {} "
                        "does not exist".format(path))
                identity = transport.identity(path, st)
                self._check_not_shared(vol_id, path, identity, boot_id)
                if rec is not None:
                    self._check_recorded(vol_id, path, attachment,
                                         identity, recorded, live)
                found = {"attachment": attachment, "path": path,
                         "size": devices.size(path, st),
                         "identity": identity}
                if not unfinished:
                    found["connecting"] = False
                multipath_id = attachment.get("multipath_id")
                if multipath_id is not None or not added:
                    # A record inserted by this attach has none yet: not
                    # setting it spares SQLite a rewrite of its index.
                    found["multipath_id"] = multipath_id
                # Synced unless the transport needs nothing of it after
                # a power loss (a local device: the intent, synced,
                # announces the rule and the link, named by the ids;
                # store.py, "Commits and fsyncs").
                db.update_volume(
                    vol_id, durable=transport.sync_connection
                    or bool(connection_info.get("adapter")), **found)
                faults.crash_point("attach.after_attachment")
                self._add_udev_rule(sd_id, vol_id, path,
                                    devices.block_number(st),
                                    (identity or {}).get("backing"))
                faults.crash_point("attach.after_udev")
                managed_path = self._add_link(sd_id, vol_id, path)
                faults.crash_point("attach.after_link")
                # The last step: no side effect follows that a power
                # loss could leave unannounced, so no fsync (see store.py;
                # the next durable commit syncs it).  Moved to another
                # sd_id: the old link and rule go once the new ones exist
                # (the device is owned throughout).
                db.update_volume(vol_id, state="attached",
                                 managed_path=managed_path, durable=False,
                                 **({"sd_id": sd_id} if moved else {}))
            except Exception as e:
                if isinstance(e, errors.ConnectorFailed):
                    # The cause may be a missing initiator command, far
                    # below os-brick's message about the storage.
                    missing = hosttools.explain(
                        connection_info["driver_volume_type"])
                    if missing:
                        e.reason = "{} ({})".format(e.reason, missing)
                # Refused for the caller's mistake (the device attached
                # as another volume, 927; a parameter the connector
                # refused, -32602): not a failure of this host.
                log.log(logging.WARNING if isinstance(e, _REFUSALS)
                        else logging.ERROR,
                        "Attaching volume %s failed: %s", vol_id, e)
                if live:
                    self._keep_attached(rec, sd_id, e)
                else:
                    self._rollback(
                        vol_id, sd_id, connection_info,
                        earlier if attachment is None else attachment, e,
                        connecting=unfinished or (
                            attachment is None and _cut(e)),
                        confs=(earlier, attachment), own=rec is None)
                # The RBD confs of both connects that the record, if one
                # is left, no longer names (review-fix9 hostfix-L1); a
                # rollback forgetting the record deleted them first.
                self._drop_unnamed_confs(vol_id, connection_info, earlier,
                                         attachment)
                raise
            if moved:
                # A crash from here leaves the old link and rule to
                # reconcile: nobody's (the record names the new sd_id).
                faults.crash_point("attach.after_move")
                log.info("Volume %s moved from sd_id %s to %s", vol_id,
                         rec["sd_id"], sd_id)
                self._silent_remove_link_and_rule(rec["sd_id"], vol_id)
            if earlier is not None:
                # Over a record of this boot: the RBD conf of the
                # attachment it named is nobody's now.
                if not self._drop_conf(vol_id, earlier, attachment):
                    self._sweep_keyring_later(connection_info)

        # DEBUG: the call's FINISH line (api.py) names the device at
        # INFO, as vdsm's FINISH return= does (storage/managedvolume.py
        # logs its "Attached volume" at DEBUG too).
        log.debug("Attached volume %s path=%s managed_path=%s", vol_id,
                  path, managed_path)
        return {"vol_id": vol_id, "path": path, "attachment": attachment,
                "managed_path": managed_path}

    def detach_volume(self, vol_id, sd_id=validate.BLANK_UUID):
        """Disconnect a volume and forget it.  Idempotent.

        Returns what was done, for the call's log line (the API returns
        none of it: detach's result is true): {vol_id, path, was}, was
        the state the record was in (path: its device's, None when none
        was recorded), None when nothing was recorded (already detached).

        A volume without a record is already detached: success.  If the
        disconnect fails while the device is still present, the error is
        raised and the record stays 'detaching' (detach again, or let
        reconcile finish it).  A record in any state is detached: an
        'attaching' one (a crashed or failed attach) may hold a
        connection, so it is disconnected too.

        ``sd_id`` differing from the recorded one: vdsm (which records no
        sd_id) builds the link and rule names from the given sd_id and so
        leaks the real ones.  Here the record wins: the link and rule
        named with the recorded sd_id are removed, and any named with the
        given sd_id as well (a vol_id has one record, so those can only
        be leftovers).

        A record from another boot is detached too (its disconnect is
        replayed).  Whatever the record, the device at its path is not
        disconnected when it is no longer the device recorded, or is
        attached as another volume in this boot (see ``_detach``).
        """
        vol_id = validate.uuid("vol_id", vol_id)
        sd_id = validate.uuid("sd_id", sd_id)
        with self._call():
            rec = None
            if not self._unknown(vol_id):
                with self._locked(vol_id):
                    rec = self._find(vol_id)
                    if rec is not None:
                        self._detach_named(rec, sd_id)
        # DEBUG: the call's FINISH line (api.py) says the same at INFO,
        # from what this returns.
        if rec is None:
            log.debug("Volume %s is not attached, nothing to detach", vol_id)
            return {"vol_id": vol_id, "path": None, "was": None}
        log.debug("Detached volume %s path=%s (was %s)", vol_id,
                  rec["path"], rec["state"])
        return {"vol_id": vol_id, "path": rec["path"], "was": rec["state"]}

    def _detach_named(self, rec, sd_id):
        vol_id = rec["vol_id"]
        if rec["sd_id"] != sd_id:
            log.warning("Volume %s was attached with sd_id %s, detach asked "
                        "for %s; using the recorded one", vol_id,
                        rec["sd_id"], sd_id)
            self._silent_remove_link_and_rule(sd_id, vol_id)
        log.debug("Detaching volume %s (%s)", vol_id, rec["state"])
        try:
            self._detach(rec)
        except errors.StillRunning as e:
            self._retry_later(vol_id, e)
            raise

    def _unknown(self, vol_id):
        """Whether nothing was done to ``vol_id`` in this boot (it has no
        lock file: they are never removed) and nothing is recorded of it.

        A detach of such a volume succeeds without making its lock file:
        a client detaching ids never attached here (a buggy script, a
        scanner holding a certificate) would otherwise fill lock_dir
        with a file per id for the rest of the boot.  An attach that
        records it after this look simply comes after the detach.  A
        volume known here pays one stat (the lock file exists).
        """
        return (not os.path.exists(locking.lock_path(self.cfg.lock_dir,
                                                     vol_id))
                and self._find(vol_id) is None)

    def extend_volume(self, vol_id, sd_id=validate.BLANK_UUID, new_size=None):
        """Make this host see the size the storage now gives an attached
        volume; return {vol_id, path, size}.

        The storage side grows first (the engine's extend_volume through
        cinderlib); this is the host step Nova's LibvirtDriver.extend_volume
        and Ember-CSI's NodeExpandVolume take: os-brick's
        ``connector.extend_volume`` in the privsep daemon (SCSI rescan and
        multipath resize, NVMe rescan, ...).  ``size`` is the device's
        size in bytes read after the rescan (``devices.size``), and is
        recorded.  The running VM still sees its old size until libvirt's
        blockResize is called on its drive (docs/engine.md).

        Raises NotAttached (-32602 naming vol_id) unless the volume is
        attached here now (record 'attached', device and managed link
        present): nothing is rescanned then.  With ``new_size`` (bytes), a
        device still smaller after the rescan is ExtendIncomplete (926,
        naming both sizes); the size seen is recorded all the same.
        ``sd_id`` differing from the recorded one is logged; the record
        wins, as in detach.  Idempotent: extending again rescans again.
        """
        vol_id = validate.uuid("vol_id", vol_id)
        sd_id = validate.uuid("sd_id", sd_id)
        new_size = validate.size("new_size", new_size)
        with self._call() as db, self._locked(vol_id):
            rec = self._find(vol_id)
            why = self._not_attached(rec)
            if why:
                raise errors.NotAttached(vol_id=vol_id, reason=why)
            if rec["sd_id"] != sd_id:
                log.warning("Volume %s was attached with sd_id %s, extend "
                            "asked for %s; using the recorded one",
                            vol_id, rec["sd_id"], sd_id)
            path = rec["path"]
            log.info("Extending volume %s path=%s size=%s new_size=%s",
                     vol_id, path, rec["size"], new_size)
            db.update_volume(vol_id, extending=new_size or 0)
            faults.crash_point("extend.after_record")
            try:
                # os-brick's RBD extend writes a ceph conf of its own too,
                # deleted when it returns (_InFlight).
                with _InFlight(self, rec["connection_info"]):
                    reported = self._brick.extend(rec["connection_info"])
                faults.crash_point("extend.after_rescan")
            except Exception as e:
                log.error("Extending volume %s failed: %s", vol_id, e)
                self._silent_record_size(vol_id, path)
                if _cut(e):
                    # Cut, its conf may stay (or come late): nobody
                    # learns its name (review-safety13a L3).
                    self._sweep_keyring_later(rec["connection_info"])
                raise
            size = devices.size(path)
            if size is None:
                size = reported
            if reported is not None and reported != size:
                log.info("Volume %s: os-brick reported %s bytes, device %s "
                         "has %s", vol_id, reported, path, size)
            db.update_volume(vol_id, size=size, extending=None)
        if new_size and (size is None or size < new_size):
            raise errors.ExtendIncomplete(vol_id=vol_id, path=path,
                                          size=size, new_size=new_size)
        log.info("Extended volume %s path=%s size=%s", vol_id, path, size)
        return {"vol_id": vol_id, "path": path, "size": size}

    def volumes_info(self, vol_ids=(), include_secrets=False):
        """Records of ``vol_ids`` (all when empty), sorted by vol_id.

        Each is {vol_id, connection_info, path?, attachment?,
        managed_path?, exists?, size?, stale, stale_reason?, this_boot};
        ``exists`` (whether the path exists now) only where a path is
        recorded, ``size`` (bytes, when attach or extend last read it)
        only where one is recorded; ``stale`` whether the record is not a
        live attachment (``_stale_reason``: made in another boot, its
        device gone or changed), and why; ``this_boot`` whether the
        record was made in the host's current boot (``_same_boot``): the
        engine shim ends a host's connection only when every record of
        the volume there is of another boot (engine/hosts.py), never for
        a device gone or changed in this boot, which the engine has not
        detached.
        Secrets in connection_info are masked unless ``include_secrets``.
        Unknown ids are skipped.
        """
        vol_ids = validate.uuid_list("vol_ids", vol_ids)
        include_secrets = validate.boolean("include_secrets",
                                           include_secrets)
        if include_secrets and not self.cfg.remote_secrets:
            # Any peer the CA signed may call: on oVirt that CA signed
            # every host's certificate, so one host (or its stolen key)
            # would read every other host's CHAP passwords and keyrings.
            # Root on the host reads them from the journal instead.
            raise errors.InvalidParams(
                name="include_secrets", reason="secrets are not sent "
                "over the API (read them on the host: managedvolume-tool "
                "list --secrets; the host's [volumes] remote_secrets "
                "allows it)")
        result = []
        with self._call() as db:
            records = db.volumes(vol_ids)
        boot_id = self._boot()
        for rec in records:
            ci = rec["connection_info"]
            info = {"vol_id": rec["vol_id"],
                    "connection_info": ci if include_secrets
                    else mask.mask(ci)}
            if rec["path"]:
                info["path"] = rec["path"]
                info["exists"] = os.path.exists(rec["path"])
            if rec["attachment"] is not None:
                info["attachment"] = rec["attachment"] if include_secrets \
                    else mask.mask(rec["attachment"])
            if rec["managed_path"]:
                info["managed_path"] = rec["managed_path"]
            if rec["size"] is not None:
                info["size"] = rec["size"]
            info.update(stale_fields(self._stale_reason(rec, boot_id)))
            info["this_boot"] = self._same_boot(rec, boot_id)
            result.append(info)
        return result

    def stale_reason(self, rec):
        """Why the journal record ``rec`` is not a live attachment, or
        None: what volumes_info reports as ``stale_reason``.  Looks at the
        host only (boot id, links, devices), not at the journal: for tools
        holding records of their own (managedvolume-tool list)."""
        return self._stale_reason(rec, self._boot())

    def connector_info(self, refresh=False, stale_ok=False):
        """os-brick's connector properties, cached.

        Refreshed when ``refresh``, after ``cfg.connector_info_ttl``, or
        when a source changed (initiator name, NVMe host NQN/ID, host name,
        addresses); ``stale_ok``: a stale value is returned at once and
        refreshed in the background (see ``caps()``).  Raises NotSupported
        (925) without os-brick.
        """
        return self._connector.get(
            refresh=validate.boolean("refresh", refresh), stale_ok=stale_ok)

    def caps(self):
        """{"connector_info": {...}}, or {} when os-brick is missing.

        Never raises: capabilities must not fail because of us.  Never
        waits once a value is known: a stale one is reported (see
        ``connector_info_age()``) while a background thread refreshes it,
        and when the helper fails the last known value stays.
        """
        try:
            return {"connector_info": self.connector_info(stale_ok=True)}
        except errors.NotSupported as e:
            log.info("Managed volumes not supported: %s", e)
            return {}
        except Exception:
            log.exception("Cannot get connector_info")
            last = self._connector.last()
            return {"connector_info": last} if last else {}

    def connector_info_age(self):
        """Seconds since connector_info was fetched (None: never)."""
        return self._connector.age()

    def reconcile(self, apply=True, force=False, detach_stale=True):
        """Make the host agree with the journal; return what was found.

        Returns [{"vol_id", "state", "action", "result"}] for every volume
        or file that needed something (healthy volumes are not listed;
        entries about files nobody owns have state None and a "path").
        Actions: "rollback" ('attaching'), "detach" ('detaching'),
        "recreate-link", "recreate-rule", "recreate-link+rule",
        "record-size" (an interrupted extend; combined with the others as
        "record-size+recreate-link"...), "detach-stale" (an attached
        record of another boot, its boot id recorded: detached as
        detach_volume would, never disconnecting a device that is not
        the one recorded; kept as it was when the detach fails, forgotten
        then with ``force``), "stale" (not a live attachment: device gone
        or changed in this boot, or made in an unknown boot; the record is
        kept for the engine's detach or re-attach), "remove-stale-link",
        "remove-stale-rule", "remove-stale-link+rule" (a record of an
        unknown boot, or whose device changed: its link and rule would
        point at, or chown, a device that is not the volume's; and the
        rule matching a kernel name of a record whose device is gone; the
        record is kept), "adopt" (a
        record written before boots were recorded whose managed link
        proves it is of this boot: the boot and device identity are
        recorded; "adopt+recreate-rule" when its rule is missing too),
        "remove-link", "remove-rule", "remove-temp-link",
        "remove-temp-rule", "skip" (busy).
        Stale entries carry a "reason".
        Results: "planned" (dry run), "done", "kept", "busy",
        "failed: <why>".
        ``apply=False`` is a dry run: actions are reported as "planned".
        Volumes whose lock is held (an operation in progress in another
        process) are skipped with result "busy".  A dry run takes each
        volume's lock only when the lock directory exists (it creates the
        lock file of a volume that never had one, nothing else).
        ``force`` (with ``apply``): a rollback or detach (detach-stale
        included) whose disconnect fails is ended anyway: the record is
        forgotten with a warning (result "forgotten: <why>"), whatever
        may be left on the host is the admin's to check.  Without it such
        a record stays and every reconcile retries it.
        ``detach_stale=False``: the records of another boot are kept, as
        "stale" ones are (``start``).
        """
        results = []
        with self._call() as db:
            for rec in db.volumes():
                entry = self._with_lock_now(
                    rec, lambda: self._reconcile_volume(
                        rec["vol_id"], apply, force, detach_stale), apply)
                if entry:
                    results.append(entry)
            results.extend(self._reconcile_links(apply))
            results.extend(self._reconcile_rules(apply))
        return results

    # Private helpers

    def _db(self):
        db = self._store
        if db is None:
            raise errors.StoreClosed()
        return db

    def _call(self):
        """Count a call using the journal (close() waits for it): a
        context manager giving the journal."""
        return _Counted(self)

    def _locked(self, vol_id, timeout=None):
        if timeout is None:
            timeout = self.cfg.lock_timeout
        return locking.volume_lock(self.cfg.lock_dir, vol_id, timeout)

    def _find(self, vol_id):
        try:
            return self._db().get_volume(vol_id)
        except errors.StoreNotFound:
            return None

    def _reuse(self, rec, sd_id, connection_info, boot_id):
        """Decide what an existing record means for a new attach.

        Returns (record to attach over or None when it was removed,
        whether the attach starts afresh: the record is from another
        boot, so nothing it says about a connection holds any more,
        whether it is live: attached in this boot, its device there and
        the one recorded, only its managed link missing).
        """
        vol_id = rec["vol_id"]
        if rec.get("corrupt"):
            raise errors.CorruptRecord(vol_id=vol_id, reason=rec["corrupt"])
        same_boot = self._same_boot(rec, boot_id)
        changed = self._device_changed(rec, boot_id)
        live = (same_boot and rec["state"] == "attached"
                and _exists(rec["path"]) and not changed)
        if rec["connection_info"] != connection_info:
            if live:
                raise errors.ConnectionMismatch(vol_id=vol_id)
            log.info("Volume %s has a %s record with another "
                     "connection_info that is not attached (%s); removing "
                     "it first", vol_id, rec["state"],
                     self._stale_reason(rec, boot_id) or "no device")
            self._detach_first(rec, same_boot)
            return None, True, False
        if rec["state"] == "detaching":
            log.info("Volume %s was being detached; finishing that first",
                     vol_id)
            self._detach_first(rec, same_boot)
            return None, True, False
        if changed and same_boot:
            log.error("Not attaching volume %s: the device at %s is not "
                      "the one recorded at its attach: %s. It may belong "
                      "to something else now; it was not touched. Check "
                      "what it holds, detach the volume (that forgets the "
                      "record and leaves the device alone), then attach "
                      "again", vol_id, rec["path"], changed)
            raise errors.DeviceChanged(vol_id=vol_id, path=rec["path"],
                                       reason=changed)
        if not same_boot:
            # Whatever is at its recorded path now is not compared: a
            # kernel name (NVMe's /dev/nvmeXnY, /dev/sdX) is given anew
            # at each boot in connect order, so it may be another
            # volume's device while this one comes back under another
            # name.  The connect tells where the volume is, and the
            # device it returns is compared (``_check_recorded``).
            log.warning("Volume %s has a record (%s) from %s: its "
                        "connection ended with that boot; attaching it as "
                        "a first attach", vol_id, rec["state"],
                        "another boot" if rec["boot_id"]
                        else "an unknown boot")
            # Its rule names a device, and names are reused across boots.
            self._silent_remove_link_and_rule(rec["sd_id"], vol_id)
            return rec, True, False
        if live and self._link_ok(rec["sd_id"], vol_id, rec["path"]):
            raise errors.AlreadyAttached(vol_id=vol_id, path=rec["path"])
        log.info("Volume %s has a %s record but %s; attaching it again",
                 vol_id, rec["state"],
                 "no managed link" if live else "no device")
        if rec["sd_id"] != sd_id and not live:
            # A live record keeps them until the new ones exist (a VM may
            # be using its device: the rule is qemu's ownership).
            self._silent_remove_link_and_rule(rec["sd_id"], vol_id)
        return rec, False, live

    def _detach_first(self, rec, same_boot):
        """Detach ``rec``, the earlier record an attach must remove before
        it connects (``_reuse``).  When that detach cannot finish yet
        because what an earlier connect of the record started still runs
        (StillRunning: a login or map, threads of the daemon; its cut
        connect's privsep call has not returned), the attach fails with
        DetachFirst (931) naming the volume, the record and what runs:
        the journal holds the earlier record as the refused detach left
        it ('detaching', nothing else changed), nothing of this attach,
        and the record is kept for the service's retries
        (``_retry_later``), which detach it once that ended.
        ``same_boot``: whether ``rec`` was made in this boot."""
        made = "made in this boot" if same_boot else "made in another boot"
        try:
            self._detach(rec)
        except errors.StillRunning as e:
            self._retry_later(rec["vol_id"], e)
            info = rec["connection_info"] or {}
            raise errors.DetachFirst(
                vol_id=rec["vol_id"], every=RETRY_KEPT, running=e.running,
                record="'{}', {}, sd_id {}, {}".format(
                    rec["state"], info.get("driver_volume_type"),
                    rec["sd_id"], made)) from None

    def _boot(self):
        return boot.current(self.cfg)

    def _same_boot(self, rec, boot_id):
        """Whether ``rec`` was made in the current boot.

        A record written before boots were recorded (boot_id NULL: vdsm's
        rows, or an older version of this package) is judged as vdsm PR
        #483 judges every row (``managedvolume._add_volume``): its managed
        link lives on tmpfs, so a link pointing at its path proves this
        boot; no link, another boot.
        """
        if rec["boot_id"] is not None:
            return rec["boot_id"] == boot_id
        return bool(rec["path"]) and self._link_ok(
            rec["sd_id"], rec["vol_id"], rec["path"])

    def _identity(self, rec):
        """What the device now at ``rec``'s path is, as its transport
        tells (None without a path or a block device)."""
        if not rec["path"]:
            return None
        ci = rec["connection_info"] or {}
        return transports.get(ci.get("driver_volume_type")).identity(
            rec["path"])

    def _device_changed(self, rec, boot_id):
        """Why the device now at ``rec``'s path is not the one recorded at
        its attach, or None (same, gone, or nothing to compare)."""
        if not rec["identity"] or not rec["path"]:
            return None
        return devices.changed(rec["identity"],
                               self._identity(rec),
                               self._same_boot(rec, boot_id))

    def _stale_reason(self, rec, boot_id):
        """Why ``rec`` is not a live attachment, or None when it is (or
        is an attach or detach of this boot in progress)."""
        if rec.get("corrupt"):
            return "corrupt record: {}; 'managedvolume-tool reconcile " \
                "--apply --force' forgets it".format(rec["corrupt"])
        if not self._same_boot(rec, boot_id):
            if rec["boot_id"]:
                return "made in another boot"
            return ("made in an unknown boot (recorded before boots were) "
                    "and its managed link is gone")
        if rec["state"] != "attached":
            return None
        if not _exists(rec["path"]):
            return "device gone"
        changed = self._device_changed(rec, boot_id)
        if changed:
            return "device changed: " + changed
        return None

    def _foreign_device(self, rec, boot_id):
        """Why the device at ``rec``'s path must not be disconnected for
        it: (reason, the vol_id it is shared with when ``[volumes]
        shared_devices`` allows that, else None), or None when it may
        be."""
        current = self._identity(rec)
        if current is None:
            return None
        changed = devices.changed(rec["identity"], current,
                                  self._same_boot(rec, boot_id))
        if changed:
            return "it is not the device recorded at attach ({})".format(
                changed), None
        other = self._device_holder(rec["vol_id"], current, boot_id,
                                    states=("attached",))
        if other is None:
            return None
        return "it is attached as volume {} in this boot".format(
            other), other if self.cfg.shared_devices else None

    def _device_holder(self, vol_id, current, boot_id, states=store.STATES):
        """The vol_id of a live record of this boot, other than
        ``vol_id``'s and in one of ``states``, holding the device whose
        identity (``devices.identity``) is ``current``; None when none
        does.

        A record holds a device when its path names that device now
        (same MAJ:MIN), it is not stale (``_stale_reason``: of this boot;
        when attached, its device as recorded, ``devices.changed``).
        Only records whose recorded device is that MAJ:MIN (and those
        recorded without one) are looked at: an index lookup in the
        journal (``store.volumes_on_device``), whatever its size.
        """
        number = devices.device_number_of(current)
        for rec in self._db().volumes_on_device(current["dev"]):
            if (rec["vol_id"] == vol_id or rec["state"] not in states
                    or not rec["path"] or rec.get("corrupt")
                    or devices.device_number(rec["path"]) != number
                    or not self._same_boot(rec, boot_id)):
                continue
            if (rec["state"] == "attached" and rec["identity"]
                    and devices.changed(rec["identity"], current, True)):
                continue    # stale: its device changed
            return rec["vol_id"]
        return None

    def _not_attached(self, rec):
        """Why ``rec`` is not a volume attached here now, or None.

        A verb acting on the device (extend) must never act on one that
        may be another's: after a reboot the same path can name another
        device.  The managed link lives on tmpfs (``run_dir``), so a
        record whose link is missing is from a previous boot (vdsm's rule
        since its PR #483) or was damaged; reconcile repairs the latter.
        """
        if rec is None:
            return "no record"
        if rec["state"] != "attached":
            return "its record is '{}': an attach or detach is in " \
                "progress or was interrupted".format(rec["state"])
        if not _exists(rec["path"]):
            return "its device {} is gone".format(rec["path"])
        stale = self._stale_reason(rec, self._boot())
        if stale:
            return "its record is stale ({}); attach it again".format(stale)
        if not self._link_ok(rec["sd_id"], rec["vol_id"], rec["path"]):
            return "its managed link is missing: the record is from a " \
                "previous boot or was damaged; attach it again"
        return None

    def _silent_record_size(self, vol_id, path):
        """After a failed extend: record what the device shows, clear the
        'extending' mark (logging, not raising, a journal error)."""
        try:
            self._db().update_volume(vol_id, size=devices.size(path),
                                     extending=None)
        except Exception:
            log.exception("Failed to record the size of volume %s", vol_id)

    def _resolve_path(self, transport, vol_id, connection_info,
                      attachment):
        """The device path after connect (``transports``: vdsm's rule)."""
        if not isinstance(attachment, dict):
            raise errors.HelperFailed(
                "connector returned {!r}, not an attachment".format(
                    type(attachment).__name__))
        return transport.path(self.cfg, vol_id, connection_info, attachment)

    def _detach(self, rec):
        """Tear down whatever ``rec`` may have on the host, then forget it.

        Used by detach, by reconcile ('attaching', 'detaching') and by a
        re-attach over a dead record.
        """
        vol_id, sd_id = rec["vol_id"], rec["sd_id"]
        if rec.get("corrupt"):
            # Nothing it says can be disconnected: not an internal error.
            raise errors.CorruptRecord(vol_id=vol_id, reason=rec["corrupt"])
        db = self._db()
        if rec["state"] != "detaching":
            # Synced only for a record of an unknown boot: any other
            # already synced says what a host crash leaves to tear down
            # (store.py, "Commits and fsyncs").
            db.update_volume(vol_id, state="detaching",
                             durable=rec["boot_id"] is None)
        faults.crash_point("detach.after_record")
        fileutil.rm_file(self._link_path(sd_id, vol_id))
        faults.crash_point("detach.after_unlink")
        self._rules.remove(sd_id, vol_id)
        faults.crash_point("detach.after_rule")
        foreign = self._foreign_device(rec, self._boot())
        if foreign:
            reason, shared_with = foreign
            if shared_with:
                log.info("Not disconnecting volume %s: its device %s is "
                         "shared with volume %s, still attached ([volumes] "
                         "shared_devices)", vol_id, rec["path"], shared_with)
            else:
                log.error("Not disconnecting volume %s: the device at %s "
                          "now belongs to something else: %s. The "
                          "volume's record, managed link and udev rule are "
                          "removed and that device is left alone. If the "
                          "volume's own connection still exists on this "
                          "host, end it by hand (iscsiadm, multipath -f, "
                          "rbd unmap, losetup -d) after checking which "
                          "device it is", vol_id, rec["path"], reason)
            faults.crash_point("detach.after_disconnect")
            dropped = self._drop_conf(vol_id, rec["attachment"], None)
            db.remove_volume(vol_id)
            if rec["connecting"] or not dropped:
                self._sweep_keyring_later(rec["connection_info"])
            return
        try:
            # Only a record whose connect may not have completed waits for
            # the logins and maps an earlier daemon left: on a target all
            # an array's volumes share, another volume's late login must
            # not hold off the detach of one attached long ago
            # (review-safety10 M-2).
            self._brick.disconnect(rec["connection_info"], rec["attachment"],
                                   rec["connecting"])
        except errors.CannotSend as e:
            # The same arguments could not have reached the daemon for the
            # connect either (a record journaled before validation refused
            # such values): nothing was connected.
            log.warning("Volume %s: %s; its connect could not have been "
                        "sent either, so nothing is connected: forgetting "
                        "it", vol_id, e)
        except errors.Error as e:
            # A device gone tells the connection is over only when the
            # disconnect itself ended with an answer.  One cut at its
            # deadline or by the daemon's death may have got that far
            # and no further (a multipath map flushed, its paths and
            # sessions still there, iscsid logging in again at boot):
            # the record stays 'detaching' for the next detach or
            # reconcile to finish.  So does one never sent (no daemon
            # could be started): it did not answer either.
            if (rec["path"] and not _exists(rec["path"]) and not _cut(e)
                    and not _unsent(e)):
                log.warning("Disconnecting volume %s failed (%s), but its "
                            "device %s is gone; forgetting it", vol_id, e,
                            rec["path"])
            else:
                raise
        faults.crash_point("detach.after_disconnect")
        # os-brick deletes the conf it is given only when it unmapped a
        # device: one found gone leaves it (review-fix9 hostfix-L1).
        # Deleted before the record goes, so that a crash between them
        # leaves a record, which the next detach or reconcile clears
        # (a conf that is gone is no error, its device is gone), not a
        # conf that no record names: the start's sweep finds one only
        # while another record holds its keyring, and none when this
        # was the host's last RBD volume (review-safety10 L-3).
        dropped = self._drop_conf(vol_id, rec["attachment"], None)
        # The last step (see store.py): after a host crash a record still
        # 'detaching' is detached again, idempotently.
        db.remove_volume(vol_id, durable=False)
        if rec["connecting"] or not dropped:
            # What a cut connect of it may still write, or the conf the
            # daemon could not delete now (``_sweep_keyring_later``).
            self._sweep_keyring_later(rec["connection_info"])

    def _keep_attached(self, rec, sd_id, error):
        """After a failed attach over ``rec`` (attached in this boot, its
        device there, only its managed link missing) under ``sd_id``:
        leave the volume as it was.  A VM may be using the device, through
        the link or a file descriptor opened before the link went: a
        disconnect (a multipath flush, an iSCSI logout) or the removal of
        its udev rule (qemu's ownership at the next uevent) would cut its
        disk.  The record stayed 'attached' (attach_volume never wrote its
        intent over it) and gets back the fields the attach's steps may
        have written, its sd_id included; a link and rule the attach made
        under another sd_id are removed (the record's own stay).  A
        connect made again over the same connection_info returns the
        connection the record holds (a detach of the record ends it),
        except a connect that returned another device (DeviceChanged,
        ``_check_recorded``): that one is left connected and not
        recorded, it is not known to be the volume's.  What that connect
        returned may name a new RBD conf holding the keyring (os-brick
        writes one per connect): the caller deletes it once the record
        is put back (``_drop_unnamed_confs`` reads which conf the record
        names: if putting it back failed, the record may still name the
        new one, which then stays).  Logged, not raised: the caller
        raises ``error``."""
        vol_id = rec["vol_id"]
        log.warning("Volume %s stays attached at %s as it was: attaching it "
                    "again failed (%s), and a VM may be using its device; "
                    "detach it to end its connection", vol_id, rec["path"],
                    error)
        if isinstance(error, errors.DeviceChanged):
            log.error("Volume %s: the device %s its connect returned is "
                      "left connected and is not recorded: it is not the "
                      "one recorded (%s) and may belong to something else. "
                      "Check what it holds and end it by hand (iscsiadm, "
                      "multipath -f, rbd unmap, losetup -d) if nothing "
                      "uses it; a detach of the volume ends the volume's "
                      "own connection (its device %s), not that one",
                      vol_id, error.path, error.reason, rec["path"])
        if sd_id != rec["sd_id"]:
            self._silent_remove_link_and_rule(sd_id, vol_id)
        kept = {k: rec[k] for k in _KEPT_ON_FAILED_REATTACH}
        if not _cut(error):
            # Its connect ended with an answer (or before a later step):
            # nothing of it runs (store.py, ``connecting``).
            kept["connecting"] = rec["connecting"]
        try:
            self._db().update_volume(vol_id, **kept)
        except errors.Error as e:
            log.error("Cannot put back volume %s's record as it was: %s; "
                      "it stays 'attached' with what the failed attach "
                      "found (the same connection)", vol_id, e)

    def _drop_conf(self, vol_id, attachment, kept):
        """Have the daemon delete the RBD ceph conf ``attachment`` names
        (os-brick writes one, holding the keyring, at every connect;
        ``transports.rbd``) when ``kept``, the attachment the record
        keeps, names another: no disconnect would be given it, and
        os-brick deletes a conf only at the disconnect given it.  Logged,
        not raised: False when the delete failed (the daemon down or
        cut), else True."""
        conf = attachment.get("conf") if isinstance(attachment, dict) \
            else None
        if not conf or conf == (kept or {}).get("conf"):
            return True
        if not os.path.lexists(conf):
            return True     # os-brick's disconnect deleted it
        try:
            self._brick.delete_rbd_conf(conf)
        except Exception as e:
            log.warning("Volume %s: cannot delete the ceph conf %s, which "
                        "no record names any more: %s", vol_id, conf, e)
            return False
        return True

    def _drop_unnamed_confs(self, vol_id, connection_info, *attachments):
        """After a failed attach: delete the RBD confs ``attachments``
        name (the record's earlier one, the one the connect wrote) that
        the volume's record, if one is left, does not name
        (``_drop_conf``): a rollback that disconnected a device already
        gone, or forgot the record, leaves them to nobody.  One the
        daemon could not delete now (or all, when the record cannot be
        read) is swept with the keyring of ``connection_info`` later
        (``_sweep_keyring_later``).  Logged, not raised."""
        try:
            rec = self._find(vol_id)
        except errors.Error as e:
            log.warning("Volume %s: cannot read its record (%s); its ceph "
                        "confs are swept later", vol_id, e)
            self._sweep_keyring_later(connection_info)
            return
        kept = rec["attachment"] if rec is not None else None
        if not all([self._drop_conf(vol_id, attachment, kept)
                    for attachment in attachments]):
            self._sweep_keyring_later(connection_info)

    def _sweep_confs(self, keyrings=None, paths=None):
        """Delete the RBD ceph confs (os-brick's ``brickrbd_*``, holding
        the keyring) in the temp dir that no record names, left by what
        this service could not follow up: a crash between a re-attach's
        record update and its ``_drop_conf`` (failed: its
        ``_drop_unnamed_confs``), a connect cut after os-brick wrote one
        (its name never came back), even after its record went.

        Run at start, before reconcile, for the keyrings of this
        journal's RBD records (``keyrings`` None), and later in the
        scheduler's one thread (``_later``): ``[privsep] timeout`` + 61 s
        after the record of a connect cut at its deadline went, for its
        keyring (``_sweep_keyring_later``: it may write its conf after its
        record went), and once old enough for a conf too young to judge
        (``paths``: that one only).  Only files that cannot belong to a
        connect in flight: older than ``[privsep] timeout`` +
        CONF_SWEEP_MARGIN (a younger one is looked at again once it is
        old enough, never skipped for good), and not holding the keyring
        of an attach or extend of this service in flight, whatever their
        age (the
        clock may have been stepped; ``_InFlight``: from before its
        connect until its record names what the connect wrote, or its
        rollback deleted it; an extend during its call; one deferred
        that way is looked at again later); made by root, holding one
        of ``keyrings`` (another agent's or program's confs on this
        host are left alone): the daemon checks the name, the owner and
        the content, and deletes through its narrow entrypoint
        (``brick.delete_rbd_conf``).
        Nothing when no record has a keyring.  Not those of a record
        without ``keyring`` (os-brick copies the host's /etc/ceph keyring
        into them): any ceph client of the host may hold that one, so it
        does not tell our conf from another os-brick user's, whose
        mapping needs it until its disconnect (docs/operations.md, "Ceph
        keyrings in the temp dir").  A detach deletes its conf before
        its record goes (``_detach``), and a rollback those of its
        connects (``_forget_attach``): a crash there leaves no conf that
        no record names.  Logged, not raised (the journal's errors are
        raised).  Never the content of a conf: it holds a secret."""
        # Every keyring whose attach or extend is in flight from now
        # until the sweep ends: what its call wrote is named by no
        # record yet, whatever the records read below say.
        window = set()
        with self._confs_lock:
            window.update(self._in_flight_keyrings)
            self._sweeping[id(window)] = window
        try:
            # A call of its own throughout (close() waits for it, and it
            # stops at the next conf once close() began): no daemon call
            # after the brick stopped, which would start a new daemon.
            with self._call() as db:
                self._sweep_confs_now(db, window, keyrings, paths)
        finally:
            with self._confs_lock:
                del self._sweeping[id(window)]

    def _sweep_confs_now(self, db, window, keyrings, paths):
        named = set()
        records = db.volumes()
        found = set()
        for rec in records:
            keyring = _keyring(rec.get("connection_info"))
            if keyring is not None:
                found.add(keyring)
            attachment = rec.get("attachment")
            if isinstance(attachment, dict) and attachment.get("conf"):
                named.add(attachment["conf"])
        keyrings = frozenset(found if keyrings is None else keyrings)
        if not keyrings:
            return
        temp = tempfile.gettempdir()
        if paths is None:
            try:
                paths = [os.path.join(temp, n)
                         for n in sorted(os.listdir(temp))
                         if n.startswith("brickrbd_")]
            except OSError as e:
                log.warning("Cannot list %s for leftover ceph confs: %s",
                            temp, e)
                return
        wait = self._sweep_wait()
        old = time.time() - self.cfg.timeout - CONF_SWEEP_MARGIN
        for path in paths:
            if self._closing:
                return      # the next start sweeps
            if path in named:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_uid != 0:
                continue
            if st.st_mtime > old:
                # At most ``wait`` ahead: an mtime ahead of the clock (a
                # clock stepped back) is looked at every ``wait`` until
                # the clock has passed it by the margin.
                self._look_again(path, keyrings,
                                 min(st.st_mtime - old + 1.0, wait))
                continue
            with self._confs_lock:
                busy = keyrings & window
            holding = keyrings - busy
            deleted = False
            if holding:
                try:
                    deleted = self._brick.delete_rbd_conf(
                        path, holding=sorted(holding))
                except Exception as e:
                    log.warning("Cannot delete the leftover ceph conf %s: "
                                "%s", path, e)
                    continue
                if deleted:
                    log.info("Deleted ceph conf %s: no record names it",
                             path)
            if not deleted and busy:
                # It may be what an attach in flight wrote: looked at
                # again once that attach recorded it, or undid it.
                self._look_again(path, keyrings, wait)

    def _look_again(self, path, keyrings, delay):
        """Sweep the conf at ``path`` again in ``delay`` seconds for
        ``keyrings`` (one pending look per path and keyrings: the later
        one); nothing in a service that was not started (a tool's)."""
        later = self._later
        if later is None:
            return
        log.debug("Ceph conf %s cannot be judged yet: looked at again in "
                  "%.0f s", path, delay)
        # Keyed by the keyrings too: a look for other keyrings (a cut
        # connect's) must not replace this one (review-safety13a L2).
        later.after(delay, ("conf", path, keyrings),
                    lambda: self._scheduled_sweep(keyrings, [path]))

    def _sweep_keyring_later(self, connection_info):
        """The record of ``connection_info``, whose connect may not have
        completed (``connecting``: cut at its deadline, or by the
        daemon's death), went: what that connect still runs may write
        its RBD conf after that, under a name that never reaches the
        journal (or a conf of the record that the daemon could not
        delete stays, named by no record).  Its keyring is swept
        ``_sweep_wait()`` seconds from now (later confs of that connect
        cannot come: the daemon ends a call END_GRACE after its
        deadline; a call the agent could not end keeps its record,
        StillRunning), in the scheduler's one thread; another cut
        connect of the same keyring meanwhile pushes that sweep back.
        Not across a restart: the start's sweep finds such a conf while
        a record holds its keyring (docs/operations.md, "Ceph keyrings
        in the temp dir")."""
        keyring = _keyring(connection_info)
        later = self._later
        if keyring is None or later is None:
            return
        keyrings = frozenset([keyring])
        later.after(self._sweep_wait(), ("keyring", keyring),
                    lambda: self._scheduled_sweep(keyrings, None))

    def _scheduled_sweep(self, keyrings, paths):
        try:
            self._sweep_confs(keyrings, paths)
        except errors.StoreClosed:
            pass        # closing: the next start sweeps

    def _sweep_wait(self):
        """How long after a cut connect's record went its confs are
        swept (and how long a conf is deferred): ``[privsep] timeout`` +
        CONF_SWEEP_MARGIN + 1 s, when any conf it wrote is old enough
        for the sweep."""
        return self.cfg.timeout + CONF_SWEEP_MARGIN + 1.0

    def _rollback(self, vol_id, sd_id, connection_info, attachment,
                  error=None, connecting=True, confs=(), own=False):
        """Undo a failed attach (``error``: why it failed), logging (not
        raising) cleanup errors.  ``connecting``: a connect of it may not
        have completed (store.py): the disconnect waits for the commands
        an earlier daemon left.  ``confs``: the attachments of the
        attach's connects (the record's earlier one, the one this
        connect returned; None for one not made or not returned), whose
        RBD ceph confs (holding the keyring) are deleted before the
        record is forgotten: a crash in between leaves a record naming
        them, which the next detach or reconcile clears, not confs no
        record names, which only a start sweeping for that keyring
        would find (``_sweep_confs``).

        The record goes if the disconnect worked, or when nothing can be
        connected: the device was another volume's (DeviceAttached: not
        disconnected, it is in use), or the connect itself ended with
        the connector's error (ConnectorFailed: it returned, it did not
        hang or die; os-brick cleans up after a failed connect) and the
        disconnect fails the same way (a host without FC HBAs or an NVMe
        initiator fails both, forever).  Otherwise (a connect that timed
        out or whose daemon died may have connected) the record stays
        'attaching' and reconcile (or the next attach/detach) retries.
        A connect cut while part of it may still run (StillRunning:
        threads it started) is not disconnected now: its record stays
        'attaching' (the daemon makes a later disconnect wait for those
        threads).
        A connect that returned a device other than the one recorded
        (DeviceChanged) is not disconnected either, and its record stays
        as ``_check_recorded`` wrote it.
        A connect that was never sent to a privsep daemon (``unsent``,
        privileged.Brick: no daemon could be started, the helper exited
        or refused, sudo refused it, the daemon speaks another protocol
        (DaemonMismatch), or it was stopping) over no earlier record
        (``own``: the attach wrote the record) did nothing on the host:
        the record goes without a disconnect, which would most likely
        fail the same way and leave it 'attaching' until a later detach
        or reconcile.  A record that was there before the attach stays
        as the normal path leaves it (its earlier connection may exist).
        """
        if own and attachment is None and _unsent(error):
            log.warning("Forgetting volume %s: its connect was not sent "
                        "to any privsep daemon (%s)", vol_id, error)
            self._forget_attach(vol_id, confs, connection_info, False)
            return
        self._silent_remove_link_and_rule(sd_id, vol_id)
        if isinstance(error, errors.DeviceChanged):
            # Raised after the connect by _check_recorded only, which
            # kept the record.
            log.warning("Not disconnecting volume %s: its connect "
                        "returned a device that is not the volume's",
                        vol_id)
            return
        if isinstance(error, errors.DeviceAttached):
            log.warning("Not disconnecting volume %s: its device belongs "
                        "to volume %s", vol_id, error.other)
            self._forget_attach(vol_id, confs, connection_info,
                                connecting)
            return
        if isinstance(error, errors.StillRunning):
            # Cut at its deadline while part of its connect still runs
            # (a portal login): a disconnect now finds nothing of what
            # it may still log in (the daemon makes it wait for those
            # threads).  Kept as a cut detach keeps 'detaching'.
            log.warning("Keeping the 'attaching' record of volume %s, not "
                        "disconnecting it now (%s); detach it, or "
                        "reconcile, to disconnect it once that ended",
                        vol_id, error.running)
            self._retry_later(vol_id, error)
            return
        failure = self._silent_disconnect(vol_id, connection_info,
                                          attachment, connecting)
        if failure is None:
            self._forget_attach(vol_id, confs, connection_info,
                                connecting)
        elif (isinstance(error, errors.ConnectorFailed)
              and isinstance(failure, errors.ConnectorFailed)):
            log.warning("Forgetting volume %s: its connect failed (%s) and "
                        "so does its disconnect (%s); nothing is known to "
                        "be connected", vol_id, error, failure)
            self._forget_attach(vol_id, confs, connection_info,
                                connecting)
        else:
            log.warning("Keeping the 'attaching' record of volume %s: "
                        "reconcile will disconnect it", vol_id)
            if isinstance(failure, errors.StillRunning):
                self._retry_later(vol_id, failure)

    def _forget_attach(self, vol_id, confs, connection_info, connecting):
        """A rolled back attach's last step: delete the RBD confs of its
        connects (``confs``: attachments, see ``_rollback``), then forget
        its record; a connect of it that may not have completed
        (``connecting``) may still write one, and a conf the daemon
        could not delete now stays: their keyring is swept later
        (``_sweep_keyring_later``).  Logged, not raised."""
        dropped = all([self._drop_conf(vol_id, attachment, None)
                       for attachment in confs])
        if self._silent_remove(vol_id) and (connecting or not dropped):
            self._sweep_keyring_later(connection_info)

    def _silent_disconnect(self, vol_id, connection_info, attachment,
                           connecting=True):
        """None when the disconnect worked, else its error."""
        try:
            self._brick.disconnect(connection_info, attachment, connecting)
            return None
        except errors.EarlierConnectRunning as e:
            # Expected and explained (a login an earlier connect left
            # still runs): no traceback (review-safety10 L-5).
            log.warning("Not disconnecting volume %s during cleanup: %s",
                        vol_id, e)
            return e
        except Exception as e:
            log.exception("Failed to disconnect volume %s during cleanup",
                          vol_id)
            return e

    def _check_not_shared(self, vol_id, path, identity, boot_id):
        """Raise DeviceAttached when the device at ``path`` (``identity``)
        is held by another volume's live record (``_device_holder``),
        unless ``cfg.shared_devices``.  A stale record (another boot's,
        or whose device changed) holds no device."""
        if self.cfg.shared_devices or identity is None:
            return
        other = self._device_holder(vol_id, identity, boot_id)
        if other is not None:
            major, minor = devices.device_number_of(identity)
            raise errors.DeviceAttached(
                path=path, major=major, minor=minor, other=other,
                vol_id=vol_id)

    def _check_recorded(self, vol_id, path, attachment, identity,
                        recorded, live=False):
        """Raise DeviceChanged (929) when the device a re-attach's connect
        returned (at ``path``, ``identity``) is not the device recorded
        at the volume's last attach (``recorded``), by the facts that
        hold in every boot (WWN, serial, loop backing file: a reconnect
        in this boot may change MAJ:MIN and diskseq too).

        Before that, unless the record is ``live`` (attached in this
        boot, its recorded device there: it stays as it was, and the
        returned device is left connected, not recorded, see
        ``_keep_attached``), the record is made the one a device changed
        in this boot leaves: attached here, at ``path``, with the
        ``recorded`` identity.  So, as for that one (``_reuse``,
        ``_detach``), the device is never disconnected, linked or
        chowned for this volume (the rollback leaves it: ``_rollback``),
        every re-attach is 929 until the admin's detach forgets the
        record, and volumes_info and reconcile report it "device
        changed".
        """
        changed = devices.changed(recorded, identity, same_boot=False)
        if not changed:
            return
        if live:
            raise errors.OtherDeviceReturned(vol_id=vol_id, path=path,
                                             reason=changed)
        log.error("Not attaching volume %s: the device its connect "
                  "returned at %s is not the one recorded at its last "
                  "attach: %s. It may belong to something else; it was "
                  "not disconnected nor given to qemu's user. Check what "
                  "it holds, detach the volume (that forgets the record "
                  "and leaves the device alone), then attach again",
                  vol_id, path, changed)
        try:
            self._db().update_volume(
                vol_id, state="attached", path=path, attachment=attachment,
                multipath_id=attachment.get("multipath_id"),
                identity=recorded)
        except Exception:
            log.exception("Failed to record the changed device of volume "
                          "%s", vol_id)
        raise errors.DeviceChanged(vol_id=vol_id, path=path, reason=changed)

    def _silent_remove(self, vol_id):
        """Forget ``vol_id``'s record; whether that worked."""
        try:
            self._db().remove_volume(vol_id)
            return True
        except Exception:
            log.exception("Failed to remove volume %s from the journal",
                          vol_id)
            return False

    def _silent_remove_link_and_rule(self, sd_id, vol_id):
        """The managed link, then the udev rule, named with ``sd_id``;
        logged, not raised."""
        self._silent_remove_link(sd_id, vol_id)
        self._silent_remove_rule(sd_id, vol_id)

    def _silent_remove_link(self, sd_id, vol_id):
        try:
            fileutil.rm_file(self._link_path(sd_id, vol_id))
        except Exception:
            log.exception("Failed to remove the managed link of volume %s",
                          vol_id)

    def _silent_remove_rule(self, sd_id, vol_id):
        try:
            self._rules.remove(sd_id, vol_id)
        except Exception:
            log.exception("Failed to remove the udev rule of volume %s",
                          vol_id)

    def _add_udev_rule(self, sd_id, vol_id, path, number=None,
                       backing=None):
        """``number``: the device's (major, minor), ``backing``: a loop
        device's backing file, when the caller has just read them
        (``devices.block_number``, ``devices.identity``), else None."""
        self._rules.add(sd_id, vol_id, path, number, backing)

    def _link_path(self, sd_id, vol_id):
        return fileutil.join(self.cfg.run_dir, "{}_{}".format(sd_id, vol_id))

    def _add_link(self, sd_id, vol_id, path):
        """Point <run_dir>/<sd_id>_<vol_id> at ``path`` atomically.

        A new link is made in place (one symlink call: it appears
        whole); one that exists is replaced through a temp link and a
        rename.  ``run_dir`` is made at start (``open``), and again here
        only if it went missing.
        """
        link = self._link_path(sd_id, vol_id)
        try:
            os.symlink(path, link)
            return link
        except FileNotFoundError:
            os.makedirs(self.cfg.run_dir, mode=0o755, exist_ok=True)
        except FileExistsError:
            pass
        tmp = os.path.join(self.cfg.run_dir,
                           ".{}_{}.tmp".format(sd_id, vol_id))
        fileutil.rm_file(tmp)
        os.symlink(path, tmp)
        os.rename(tmp, link)
        return link

    def _link_ok(self, sd_id, vol_id, path):
        try:
            return os.readlink(self._link_path(sd_id, vol_id)) == path
        except OSError:
            return False

    def _with_lock_now(self, rec, func, apply):
        """Run ``func`` holding the volume's lock, or report "busy".

        A dry run (``apply`` False) makes no directory: without the lock
        directory (/run after a reboot, before the agent made it) no
        operation can hold a volume's lock, so none is taken; looked at
        for each lock, so that an agent starting meanwhile is seen."""
        if not apply and not os.path.isdir(self.cfg.lock_dir):
            return func()
        try:
            with self._locked(rec["vol_id"], timeout=0):
                return func()
        except errors.VolumeBusy:
            return {"vol_id": rec["vol_id"], "state": rec.get("state"),
                    "action": "skip", "result": "busy"}

    def _reconcile_volume(self, vol_id, apply, force=False,
                          detach_stale=True):
        rec = self._find(vol_id)   # again, now under the lock
        if rec is None:
            return None
        if rec.get("corrupt"):
            return self._reconcile_corrupt(rec, apply, force)
        state = rec["state"]
        boot_id = self._boot()
        # Made in an earlier boot, that boot recorded (not an unknown one).
        earlier = bool(rec["boot_id"]) and rec["boot_id"] != boot_id
        if state in ("attaching", "detaching"):
            if earlier and not detach_stale:
                # An attach or detach a crash of another boot cut: torn
                # down later (detach_stale_later), as the attached
                # records of another boot are, and for the same reason
                # (``start``).
                return self._reconcile_stale(
                    rec, self._stale_reason(rec, boot_id), boot_id, apply)
            action = "rollback" if state == "attaching" else "detach"
            entry = self._reconcile_action(rec, action, apply,
                                           lambda: self._detach(rec))
            return self._forget_if_forced(entry, force)
        reason = self._stale_reason(rec, boot_id)
        if reason is not None:
            if apply and rec["extending"] is not None:
                # Nothing to measure: the last size seen stays recorded.
                self._db().update_volume(vol_id, extending=None)
            if earlier and detach_stale:
                return self._forget_if_forced(
                    self._detach_of_another_boot(rec, reason, apply,
                                                 keep=not force), force)
            return self._reconcile_stale(rec, reason, boot_id, apply)
        # Written before boots were recorded, yet its link proves this
        # boot (see _same_boot): record the boot and the device.
        adopt = rec["boot_id"] is None
        missing = []
        if not self._link_ok(rec["sd_id"], vol_id, rec["path"]):
            missing.append("link")
        if not udev.rule_ok(self.cfg, rec["sd_id"], vol_id, rec["path"]):
            missing.append("rule")
        actions = ["adopt"] if adopt else []
        if rec["extending"] is not None:
            actions.append("record-size")
        if missing:
            actions.append("recreate-" + "+".join(missing))
        if not actions:
            return None

        def repair():
            if adopt:
                self._db().update_volume(
                    vol_id, boot_id=boot_id,
                    identity=self._identity(rec))
            if rec["extending"] is not None:
                # A rescan may or may not have happened: what the device
                # shows now is the truth (extend again to rescan).
                self._db().update_volume(
                    vol_id, size=devices.size(rec["path"]), extending=None)
            if missing:
                self._add_udev_rule(rec["sd_id"], vol_id, rec["path"])
                link = self._add_link(rec["sd_id"], vol_id, rec["path"])
                self._db().update_volume(vol_id, managed_path=link)

        return self._reconcile_action(rec, "+".join(actions), apply, repair)

    def _reconcile_corrupt(self, rec, apply, force):
        """A record that cannot be decoded (store._decoded): reported
        stale and kept; with ``force`` (and ``apply``) forgotten, with
        its link and udev rule: what it may have connected cannot be
        known, let alone disconnected."""
        vol_id, sd_id = rec["vol_id"], rec["sd_id"]
        reason = self._stale_reason(rec, None)
        if not force:
            return {"vol_id": vol_id, "state": rec["state"],
                    "action": "stale", "result": "kept", "reason": reason}

        def forget():
            log.warning("Forgetting volume %s: its record is corrupt (%s) "
                        "(--force): whatever it connected may still be on "
                        "the host", vol_id, rec["corrupt"])
            try:
                validate.uuid("sd_id", sd_id)
            except errors.InvalidParams:
                pass    # no link or rule can be named after it
            else:
                fileutil.rm_file(self._link_path(sd_id, vol_id))
                self._rules.remove(sd_id, vol_id)
            self._db().remove_volume(vol_id)

        entry = self._reconcile_action(rec, "forget", apply, forget,
                                       reason=reason)
        if entry["result"] == "done":
            entry["result"] = "forgotten: corrupt record"
        return entry

    def _forget_if_forced(self, entry, force):
        """With ``force``, a rollback or detach that failed forgets its
        record all the same (``reconcile``)."""
        if force and entry["result"].startswith("failed"):
            log.warning("Forgetting volume %s although its %s failed "
                        "(--force): whatever it connected may still be "
                        "on the host", entry["vol_id"], entry["action"])
            rec = self._find(entry["vol_id"])
            self._db().remove_volume(entry["vol_id"])
            if rec is not None and rec["connecting"]:
                self._sweep_keyring_later(rec["connection_info"])
            entry["result"] = "forgotten: " + entry["result"][
                len("failed: "):]
        return entry

    def _detach_of_another_boot(self, rec, reason, apply, keep=True):
        """A record made in an earlier boot (its boot id recorded, and
        not this one's) is detached as detach_volume would (``_detach``:
        never disconnecting a device that is no longer the one recorded).

        ovirt-engine detaches a volume only from the host its VM device
        names (ManagedBlockStorageCommandUtil's
        disconnectManagedBlockStorageDisk: ATTACHED_VDS_ID or
        DEST_VDS_ID).  When the host was fenced, its detach failed, and
        the VM's restart on another host made that one ATTACHED_VDS_ID:
        nothing will ever detach the volume here, while the record keeps
        what came back at boot (an iSCSI node logging in at every boot,
        a multipath map) and the engine shim ends the host's connection
        (engine/hosts.py: a record of an earlier boot holds nothing).
        vdsm (storage/managedvolume.py) keeps such rows until the engine
        detaches.  A start of the VM here later is a first attach either
        way.

        A failed detach (the storage unreachable, a map held open) keeps
        the record as it was (``keep``): stale, re-attached as a first
        attach, detached again at the next reconcile; without ``keep``
        (--force) it is left for ``_forget_if_forced``."""
        def detach():
            try:
                self._detach(rec)
            except Exception:
                if keep:
                    self._silent_keep(rec)
                raise

        return self._reconcile_action(rec, "detach-stale", apply, detach,
                                      reason=reason)

    def _silent_keep(self, rec):
        """Put back the state of ``rec`` (an attached record of another
        boot whose detach failed), without its managed link, which the
        detach removed."""
        try:
            self._db().update_volume(rec["vol_id"], state=rec["state"],
                                     managed_path=None)
        except Exception:
            log.exception("Failed to keep the record of volume %s",
                          rec["vol_id"])

    def _reconcile_stale(self, rec, reason, boot_id, apply):
        """A record that is not a live attachment, of this boot or of an
        unknown one (``_detach_of_another_boot`` takes those of another):
        kept for the engine's detach or re-attach; its link and udev rule
        are removed unless it is of this boot and its device is simply
        gone (then they name only the volume's own device, which may come
        back, and its rule gives it back its owner when it does).  A rule
        matching a kernel name with no guard (a bare ``KERNEL==``, see
        ``udev``) is removed then too: the kernel gives the name to the
        next device that comes, and the rule would give that one to
        qemu's user; a guarded one matches only the volume's device and
        is kept."""
        vol_id, sd_id = rec["vol_id"], rec["sd_id"]
        leftovers = []
        gone = self._same_boot(rec, boot_id) and reason == "device gone"
        if not gone:
            if os.path.lexists(self._link_path(sd_id, vol_id)):
                leftovers.append("link")
        if (udev.bare_kernel_rule(self.cfg, sd_id, vol_id) if gone
                else udev.has_rule(self.cfg, sd_id, vol_id)):
            leftovers.append("rule")
        if not leftovers:
            return {"vol_id": vol_id, "state": rec["state"],
                    "action": "stale", "result": "kept", "reason": reason}

        def remove():
            if not gone:    # a gone device's link is kept (above)
                fileutil.rm_file(self._link_path(sd_id, vol_id))
            self._rules.remove(sd_id, vol_id)
            if not gone:
                self._db().update_volume(vol_id, managed_path=None)

        return self._reconcile_action(
            rec, "remove-stale-" + "+".join(leftovers), apply, remove,
            reason=reason)

    def _reconcile_action(self, rec, action, apply, func, reason=None):
        entry = {"vol_id": rec["vol_id"], "state": rec["state"],
                 "action": action, "result": "planned"}
        if reason is not None:
            entry["reason"] = reason
        if apply:
            try:
                func()
                entry["result"] = "done"
            except errors.StillRunning as e:
                # Expected and explained: no traceback.
                self._retry_later(rec["vol_id"], e)
                entry["result"] = "failed: {}".format(mask.mask_text(str(e)))
            except Exception as e:
                log.exception("Reconcile of volume %s failed",
                              rec["vol_id"])
                entry["result"] = "failed: {}".format(mask.mask_text(str(e)))
        return entry

    def _retry_later(self, vol_id, error):
        """The record of ``vol_id`` stays because what an earlier connect
        (or disconnect) of it started still runs (``error``, a
        StillRunning: a login an earlier daemon left, a thread of the
        daemon); nothing else would come back to it (the engine does
        not retry a failed detach, reconcile runs at a start), and such
        a login, after an agent restart, is always older than a
        disconnect may wait: each disconnect is refused at once
        (review-safety10 L-5).  A started service reconciles it again
        every RETRY_KEPT seconds, until it is no longer kept; a tool's
        logs what to do."""
        stop = self._kept_stop
        if stop is None:
            log.warning("Volume %s stays recorded: %s. Once that ended, "
                        "'managedvolume-tool reconcile --apply' (or a "
                        "detach of the volume) finishes it", vol_id,
                        error)
            return
        with self._calls_cond:
            known = vol_id in self._kept_said
            self._kept_said.add(vol_id)
            self._kept.add(vol_id)
            if self._kept_thread is None and not stop.is_set():
                self._kept_thread = threading.Thread(
                    target=self._retry_kept, args=(stop,),
                    name="retry-kept", daemon=True)
                self._kept_thread.start()
        # Once per record kept, not at every pass (a login stuck on a
        # dead portal may run for hours).
        log.log(logging.DEBUG if known else logging.WARNING,
                "Volume %s stays recorded: %s. It is tried again every "
                "%g s while this service runs; once that ended, "
                "'managedvolume-tool reconcile --apply' (or a detach of "
                "the volume) finishes it at once", vol_id, error,
                RETRY_KEPT)

    def _retry_kept(self, stop):
        """``_retry_later``'s thread: every RETRY_KEPT seconds, reconcile
        the kept records, each under its lock taken without waiting (one
        an operation holds is tried at the next pass).  A record stays
        in the set only while its retry answers the same (StillRunning:
        the daemon ran nothing, cheap), or could not be tried (busy, a
        journal error); any other failure of a disconnect that ran (a
        command hung on the sick storage, holding os-brick's host-wide
        lock until the daemon is killed) is not repeated on its own: a
        WARNING says what to do.  The thread ends when none is left or
        the service closes."""
        while not stop.wait(RETRY_KEPT):
            with self._calls_cond:
                vol_ids = sorted(self._kept)
                self._kept.difference_update(vol_ids)
            entries = []
            for vol_id in vol_ids:
                entry = None
                try:
                    with self._call():
                        rec = self._find(vol_id)
                        if rec is not None:
                            entry = self._with_lock_now(
                                rec, lambda vol_id=vol_id:
                                self._reconcile_volume(vol_id, True), True)
                            rec = self._find(vol_id)
                except errors.StoreClosed:
                    with self._calls_cond:
                        self._kept.update(vol_ids)
                    return self._retry_ended()
                except Exception:
                    log.exception("Trying volume %s again failed", vol_id)
                    rec = None
                    entry = {"result": "busy"}      # tried next time
                if entry is not None:
                    if entry["result"] == "busy":
                        with self._calls_cond:
                            self._kept.add(vol_id)
                    elif "vol_id" in entry:
                        entries.append(entry)
                with self._calls_cond:
                    if vol_id in self._kept:
                        continue
                    self._kept_said.discard(vol_id)
                if rec is not None and rec["state"] != "attached":
                    log.warning("Volume %s stays recorded (%s) and is not "
                                "tried again on its own: %s. Once its "
                                "storage is back, 'managedvolume-tool "
                                "reconcile --apply' (or a detach of the "
                                "volume) finishes it", vol_id,
                                rec["state"], (entry or {}).get("result"))
            self._log_reconcile(entries)
            with self._calls_cond:
                if not self._kept:
                    # Under the lock _retry_later adds under: a record
                    # kept from now on starts a thread of its own.
                    self._kept_thread = None
                    return
        self._retry_ended()

    def _retry_ended(self):
        with self._calls_cond:
            if self._kept_thread is threading.current_thread():
                self._kept_thread = None

    def _reconcile_links(self, apply):
        try:
            names = sorted(os.listdir(self.cfg.run_dir))
        except FileNotFoundError:
            return []
        results = []
        for name in names:
            path = os.path.join(self.cfg.run_dir, name)
            if name.startswith(".") and name.endswith(".tmp"):
                results.extend(self._remove_temp(path, "remove-temp-link",
                                                 apply))
                continue
            ids = _split_link_name(name)
            if ids is None:
                continue
            sd_id, vol_id = ids
            results.extend(self._orphan_check(
                sd_id, vol_id, path, "remove-link", apply))
        return results

    def _reconcile_rules(self, apply):
        results = []
        for path in udev.list_temp_files(self.cfg):
            results.extend(self._remove_temp(
                path, "remove-temp-rule", apply,
                lambda path=path: self._rules.remove_temp(path)))
        for sd_id, vol_id, path in udev.list_rules(self.cfg):
            results.extend(self._orphan_check(
                sd_id, vol_id, path, "remove-rule", apply,
                lambda sd_id=sd_id, vol_id=vol_id:
                    self._rules.remove(sd_id, vol_id)))
        return results

    def _orphan_check(self, sd_id, vol_id, path, action, apply,
                      remove=None):
        def check():
            rec = self._find(vol_id)
            if rec is not None and rec["sd_id"] == sd_id:
                return None
            return self._remove_orphan(vol_id, path, action, apply, remove)

        entry = self._with_lock_now({"vol_id": vol_id, "state": None}, check,
                                    apply)
        return [entry] if entry else []

    def _remove_temp(self, path, action, apply, remove=None):
        """A temp file is a leftover unless its volume is being attached
        right now (by another thread or process holding the lock)."""
        m = _TEMP_RE.search(os.path.basename(path))
        if m is None:
            return [self._remove_orphan(None, path, action, apply, remove)]
        vol_id = m.group(1)
        entry = self._with_lock_now(
            {"vol_id": vol_id, "state": None},
            lambda: self._remove_orphan(vol_id, path, action, apply,
                                        remove), apply)
        return [entry]

    def _remove_orphan(self, vol_id, path, action, apply, remove=None):
        """Remove ``path`` (by ``remove()`` when given: rules may need the
        daemon)."""
        entry = {"vol_id": vol_id, "state": None, "action": action,
                 "result": "planned", "path": path}
        if apply:
            try:
                if remove is None:
                    fileutil.rm_file(path)
                else:
                    remove()
                entry["result"] = "done"
            except (OSError, errors.Error) as e:
                entry["result"] = "failed: {}".format(mask.mask_text(str(e)))
        return entry


def stale_fields(reason):
    """volumes_info's ``stale`` and (when stale) ``stale_reason`` of a
    record, from ``Service.stale_reason``'s answer."""
    if reason is None:
        return {"stale": False}
    return {"stale": True, "stale_reason": reason}


# ".<sd_id>_<vol_id>.tmp", ".99-vdsm-managed_<sd_id>_<vol_id>.rules.tmp"
_TEMP_RE = re.compile(r"_([0-9a-f-]{36})(?:\.rules)?\.tmp\Z")


def _split_link_name(name):
    sd_id, sep, vol_id = name.partition("_")
    if not sep:
        return None
    try:
        return (validate.uuid("sd_id", sd_id), validate.uuid("vol_id", vol_id))
    except errors.InvalidParams:
        return None


# How often a record kept because what an earlier connect started still
# runs is reconciled again (``Service._retry_later``).
RETRY_KEPT = 60.0

# How much older than ``[privsep] timeout`` a ceph conf no record names
# must be for a sweep (``_sweep_confs``): a connect that wrote it has
# returned or was cut by then, and its record updated.
CONF_SWEEP_MARGIN = 60.0

# What a failed attach over a live record of this boot puts back
# (Service._keep_attached): every field the attach's steps may write.
_KEPT_ON_FAILED_REATTACH = ("sd_id", "attachment", "path", "multipath_id",
                            "identity", "managed_path", "size")


class _Counted:
    """``Service._call``: a class, not a generator's context manager
    (entered twice per attach+detach, at a few times the cost)."""

    __slots__ = ("_service",)

    def __init__(self, service):
        self._service = service

    def __enter__(self):
        svc = self._service
        with svc._calls_cond:
            if svc._store is None or svc._closing:
                raise errors.StoreClosed()
            svc._calls += 1
            return svc._store

    def __exit__(self, *exc):
        svc = self._service
        with svc._calls_cond:
            svc._calls -= 1
            if svc._closing:
                svc._calls_cond.notify_all()     # close() waits for 0
        return False


class _InFlight:
    """The RBD keyring (``_keyring``) of an attach or extend in flight,
    known to the ceph conf sweeps, whose privileged call may write a
    conf holding it: an attach from before its connect until its record
    names what the connect wrote, or its rollback deleted it (the
    attach's end); an extend during its call (os-brick's RBD extend
    writes a conf and deletes it when it returns).  A sweep never
    deletes such a conf (``Service._sweep_confs``).  Nothing for other
    volumes."""

    __slots__ = ("_service", "_keyring")

    def __init__(self, service, connection_info):
        self._service = service
        self._keyring = _keyring(connection_info)

    def __enter__(self):
        keyring = self._keyring
        if keyring is not None:
            svc = self._service
            with svc._confs_lock:
                svc._in_flight_keyrings[keyring] += 1
                for window in svc._sweeping.values():
                    window.add(keyring)
        return self

    def __exit__(self, *exc):
        keyring = self._keyring
        if keyring is not None:
            svc = self._service
            with svc._confs_lock:
                # In place, and a keyring at 0 goes (Counter's -=).
                svc._in_flight_keyrings -= collections.Counter((keyring,))
        return False


def _keyring(connection_info):
    """The keyring an RBD ``connection_info`` gives os-brick (each of its
    connects writes it into a ceph conf of its own), or None."""
    if (not isinstance(connection_info, dict)
            or connection_info.get("driver_volume_type") != "rbd"):
        return None
    data = connection_info.get("data")
    keyring = data.get("keyring") if isinstance(data, dict) else None
    return keyring if isinstance(keyring, str) and keyring else None


def _cut(error):
    """Whether the privileged call that raised ``error`` may not have
    ended: cut at its deadline (HelperTimeout, StillRunning) or by the
    daemon's death (HelperFailed but not the connector's own error); any
    other error is an answer (the call ended), came from a step after
    it, or ended a call never sent (``_unsent``: nothing of it runs)."""
    if not isinstance(error, errors.Error):
        return True
    if error.unsent:
        return False
    return isinstance(error, errors.HelperTimeout) or (
        isinstance(error, errors.HelperFailed)
        and not isinstance(error, errors.ConnectorFailed))


def _unsent(error):
    """Whether ``error`` ended a privileged call before any of it was
    written to a privsep daemon's channel (errors.Error.unsent): nothing
    of it ran on the host, and it did not answer either."""
    return isinstance(error, errors.Error) and error.unsent


def _exists(path):
    return bool(path) and os.path.exists(path)
