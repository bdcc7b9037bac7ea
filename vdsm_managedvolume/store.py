"""The journal: one SQLite database recording every managed volume.

The store is what makes attach and detach crash safe.  A row is written
*before* the side effect it announces, durably (its WAL synced), so
that after a crash at any point the next start finds out what may exist on
the host and finishes or undoes it (see ``service.reconcile``)::

    state       meaning                              reconcile
    ----------  -----------------------------------  -------------------
    attaching   a connect may have happened; link    roll back: disconnect,
                and udev rule may exist               remove link/rule, row
    attached    connected, path known, link + rule   recreate a missing
                                                      link/rule; keep stale
    detaching   link/rule/connection being removed   finish the detach

Beside the state, ``size`` is the device's size in bytes when it was last
looked at (attach, extend), and ``extending`` is set (to the size asked
for, 0 for "whatever the storage has now") while an extend runs: a
rescan may have happened, the size recorded may be old; reconcile
records the size the device has and clears it.

Each record also carries the boot it was made in (``boot_id``; NULL for
rows written before version 4: "unknown boot") and what its device was
(``identity``, see ``devices.identity``).  A record from another boot is
never a live attachment (see ``service``).  The identity's MAJ:MIN is
also kept in an indexed column of its own (``dev``, written with
``identity``): which records hold a device (``volumes_on_device``) is
asked at every attach and detach, and must not decode every record.

``connecting`` is set while a connect of the record may not have
completed, so that a command it started may still run (an ``iscsiadm
--login`` an earlier privsep daemon left, see ``procs``): set by the
write announcing the connect (the intent 'attaching'; for a re-attach
over a live record, a write of its own), cleared by the write recording
what a connect returned (unless an earlier connect of the record, in
this boot, had not completed either), kept by the detach.  A disconnect
waits for such commands only for a record that is ``connecting``
(``service._detach``): another volume's late login on a target both
share (one IQN for every LUN of an array) must not hold off the detach
of a volume whose connect completed long ago (review-safety10 M-2).  It
matters within a boot only (a host crash ends every command), so it
takes the durability of the write it rides on and needs no fsync of
its own.

Commits and fsyncs
------------------
A commit with an fsync (``durable=True``, the default) survives anything;
one without (``durable=False``) survives a crash of the process (the
kernel has it, and the next fsync, the WAL being written in order, syncs
it too) but not a crash of the host.  What a host crash (power loss,
panic, fence) leaves is what decides which writes need the fsync:

- it ends the boot: after it, every record is of another boot, and
  ``service.reconcile`` tears down whatever such a record may have left,
  whatever its state ('attaching': rolled back, 'detaching': finished,
  'attached': detach-stale), through the same ``_detach``;
- it ends the connections and empties /run (the managed links); what may
  stay is the udev rule (removed by name, from the record's ids: see
  ``udev``) and, at worst, a connection the boot makes again (iscsid
  logs in again to the nodes os-brick's
  ``ISCSIConnector._connect_to_iscsi_portal`` set to ``node.startup
  automatic``), which the teardown disconnects.

So the record synced before the first side effect of a volume (the
attach's intent: the insert, or the update of a record found, to
'attaching' with this boot) is what reconcile needs to tear the volume
down after a host crash.  The others need no fsync: 'attached'; the
detach's 'detaching' (synced only for a record of an unknown boot,
written before boots were recorded, which reconcile would keep instead
of detaching); the detach's delete (after a host crash a record that
comes back is detached again, idempotently).  Within a boot they are as
good as synced.  The attach's record of what connect made (attachment,
path, multipath_id, device identity), written before the udev rule and
the link, is synced too, except for a local device
(``transports.base.Transport.sync_connection`` says what needs it:
disconnect's attachment, vdsm hiding the multipath map the record
names, the identity a re-attach compares).  An attach+detach of a
local device (a loop device in the benchmarks) costs one fsync, of any
other transport two; until 2026-12-01 both cost three.
``tests/crash_test.py`` cuts the power at every crash point (the
journal as of its last fsync, a new boot, the rule and the connection
kept), over no record, a record of an unknown boot and one of another
boot, and checks that the next start leaves nothing.

A commit without fsync is made in WAL mode only: with a rollback
journal (a file system where SQLite cannot use WAL; ``_connect`` warns)
every commit is synced (``synchronous=FULL``).

In WAL mode every commit is made with ``synchronous=NORMAL``, and a
durable write then syncs the WAL itself (``_sync``: one ``fdatasync`` of
the ``-wal`` file, what FULL makes SQLite do at the end of each commit;
its directory is synced once, as SQLite does at a new WAL's first
sync), after its commit and outside the write lock.  Its caller returns
only after that sync, so the record is still durable before the side
effect it announces; but the write lock is free during the fsync, and
the writes of other operations (most have no fsync) commit meanwhile
instead of queueing behind it.  A sync covers every commit made before
it started: a durable write committed before another's sync started
returns with that one (group sync).  The WAL is written in order, and
a checkpoint (which copies it into the database) syncs the WAL before
and the database after, so a later restart of the WAL never takes a
synced commit back (as long as nobody checkpoints this journal with
``synchronous=OFF``).  A failed sync fails every durable write after it
until the journal is opened again (``_sync`` says why).  With 32
callers, syncing inside the commit made
nearly every write wait for the lock (each giving its run slot back and
taking it again): context switches in the agent per attach+detach 61-64
-> 38-40.

Secrets in the journal's files
------------------------------
``connection_info`` and ``attachment`` may hold secrets (a CHAP
password, a Ceph key in RBD's conf).  A deleted record, or a value an
update replaced, lives on in the files where SQLite leaves it: in the
free space of the database's pages and in the WAL frames of the
commits that wrote it, kept until other frames overwrite them (after a
checkpoint SQLite writes the WAL again from its start; it never
shortens it).  The ``-shm`` file holds no record content (it indexes
the WAL's frames).  So:

- ``PRAGMA secure_delete = ON``: the pages a delete or an update
  writes have the dropped value overwritten with zeros (the default of
  some builds of SQLite only: set whatever the build).
- Two temporary triggers of the writer's connection (``_TRIGGERS``:
  nothing in the file, vdsm and older versions of this package see the
  schema they know) hand every value a statement drops from these
  columns, a DELETE's or an UPDATE's that changes them, to
  ``_note_dropped``; when ``mask.holds_secret`` finds a secret in one
  (as mask.py sees it: a value under a secret key, a ``[key, value]``
  pair, a secret's shape in a string; unreadable text counts), the
  journal is scrubbed: ``PRAGMA wal_checkpoint(TRUNCATE)`` copies the
  WAL, zeroed pages last, into the database and truncates the WAL to
  nothing.  The secret is then in none of the three files.
- The scrub is made ``SCRUB_DELAY`` (1 s) after the write, under the
  write lock, by the store's one scrub thread (``_scrub_loop``: the
  coalescing timer, started with the store: starting a thread at the
  delete cost it 1-2 ms), not by the write itself (a checkpoint syncs
  the WAL and the database; made in the delete it cost the detach
  8-12 ms): the drops of that second share one scrub (a mass detach:
  about one a second), and the detach returns without it.  The delete
  itself pays for the look at what it dropped (none once a scrub is
  due) and for waking the scrub's thread: median 0.08-0.09 -> 0.22 ms
  for a delete a scrub follows, 0.045-0.060 -> 0.049-0.077 ms in a
  burst.  fsyncs (fsync and fdatasync, SQLite's included) per
  attach+detach of a volume with a CHAP password: 2.2 -> 5.2 for pairs
  a second apart or more (a scrub each: the WAL's and the database's
  syncs, and the new WAL header's at the next commit), 2.03 ->
  2.04-2.05 in a burst of 300 (``strace -c``; old and new alternating,
  load 2.6-4).  The checkpoint's syncs hold the write lock: with 32
  threads making attach+detach pairs of CHAP volumes for 5 s (a scrub
  a second), the attach's intent took p50 3.7-4.4 -> 3.6-5.2 ms, p99
  13.8-22.5 -> 14.4-25.7 ms, 1737-1884 -> 1531-1882 pairs/s: not told
  apart from the noise (load 2.9-3.3, review-safety13b L2).
- ``close`` makes a scrub still due, once (SQLite checkpoints, without
  truncating, at the close of a journal's last connection only, and
  then deletes the WAL; vdsm or a tool may have it open), and every
  open of a writable store makes one (a process killed before its
  scrub left the frames in the WAL; a close-time scrub a reader held
  off).
- A reader holding the WAL (another connection inside a read) keeps
  the WAL from being truncated: the scrub waits ``SCRUB_BUSY_MS`` for
  it (not the busy timeout: it holds the write lock), and tries again
  later, the delay doubling up to ``SCRUB_DELAY_MAX``; so does a scrub
  failed by an error (logged).
- Durability is untouched: the checkpoint syncs the WAL before it
  copies it and the database after (synchronous=NORMAL does), so the
  commits a ``_sync`` running meanwhile was to make durable are durable
  either way, and the truncation keeps the file (its inode): the
  descriptor ``_sync`` holds still names the WAL SQLite writes next.
  No scrub is made after a failed sync (its checkpoint would copy
  pages that may never have reached the disk, then truncate the WAL
  that shows the loss), and a scrub whose checkpoint fails with an I/O
  error (one of its syncs) fails every durable write after it, as a
  failed sync does (review-safety13b L1).

Not reached: the blocks the file system frees at the truncation (until
reused), backups and snapshots of the file, and what a version without
secure delete left in the free space of a journal's pages (``VACUUM``
rewrites them: docs/operations.md, "Secrets and other local users").
``tests/store_test.py`` greps the three files for a deleted secret.

Writers that arrive while another one commits share its next commit
(group commit): the first to take the write lock commits every write
queued so far in one transaction, one statement each (a statement that
breaks a constraint is backed out alone by SQLite and fails that write
only: no savepoint is needed); each caller returns only after the commit
holding its write is done (and, for a durable one, synced).  Thirty-two
callers attaching at once wait for a few fsyncs, not for thirty-two in
a row.  The wait for the write lock, the commit and the sync are made
without the caller's run slot (``gate``), except that a write finding
nothing queued and the lock free commits at once, holding its slot (a
few page writes; giving the slot back and taking it again cost more:
with 32 callers, py-spy saw a third of the
agent's interpreter time in the slot releases of ``_write``).

A record whose JSON column cannot be decoded, or decodes to the wrong
type (a hand edit, a disk error, another program), is still read: that
column is None and the record's ``corrupt`` says why (``_decoded``).  One
bad row must not stop the agent from starting nor every tool from
reading the journal; the service reports it stale and acts on it only
when told to forget it (``reconcile --apply --force``).

Schema versions are kept in a ``versions`` table, as vdsm's
``managedvolumedb`` does; version 1 *is* vdsm's schema, so a database
written by vdsm is migrated in place (its rows become ``attached``).  A
database from a newer version of this package, or a file that is not a
database, is refused with a clear ``StoreError`` rather than guessed at.

This module owns its SQL and its errors: callers see plain dicts and
``errors.StoreError`` / ``StoreNotFound`` / ``StoreClosed``, never sqlite3.
Two connections per ``Store``, each serialised by a lock, make it safe
from many threads: one writes, and reads too when no commit holds it
(its page cache is current: it made the last writes); the other only
reads, when the writer is busy, so that a read never waits behind a
commit.  WAL plus ``busy_timeout`` makes several processes safe.

What an attach+detach costs here (one caller): five writes (one with
an fsync for a local device, two for any other), two reads (detach's
record, and which records hold its device), no read before the
attach's intent (``add_volume(exist_ok=True)``).  The writer's ``PRAGMA
synchronous`` is set once, when the store is opened (NORMAL in WAL mode,
FULL without, see above), never at a commit (SQLite has no
per-transaction setting).
"""

import functools
import logging
import os
import sqlite3
import threading
import time
import urllib.parse

from . import errors
from . import gate
from . import jsontext
from . import mask

STATES = ("attaching", "attached", "detaching")

# Columns the service may update, and how each is stored.
_JSON_COLUMNS = ("connection_info", "attachment", "identity")
_COLUMNS = ("sd_id", "state", "connection_info", "attachment", "path",
            "multipath_id", "managed_path", "size", "extending",
            "boot_id", "identity", "connecting")

BUSY_TIMEOUT = 30.0

# Seconds from a write that dropped a secret to the scrub of the
# journal's files (see "Secrets in the journal's files"): the drops of
# that while share one scrub.
SCRUB_DELAY = 1.0
# The longest wait between scrubs that could not be made (another
# connection reading, an I/O error): the delay doubles up to it.
SCRUB_DELAY_MAX = 60.0
# Milliseconds a scrub waits for readers (its busy timeout), holding
# the write lock: a read takes well under that; one longer makes the
# scrub try again later instead of holding every write.
SCRUB_BUSY_MS = 20

# Temporary triggers (the connection's own, never in the file: vdsm and
# older versions of this package see the schema they know) reporting
# each value a write drops from connection_info or attachment, the
# columns that may hold a secret (a CHAP password, a Ceph keyring).
_DROPPED = "managedvolume_dropped"
_TRIGGERS = (
    "CREATE TEMP TRIGGER managedvolume_scrub_delete AFTER DELETE ON "
    "main.volumes BEGIN SELECT {f}(OLD.connection_info, OLD.attachment); "
    "END".format(f=_DROPPED),
    # Only when a value is dropped: an attach's first attachment
    # replaces NULL, and calls nothing (a Python call from SQLite).
    "CREATE TEMP TRIGGER managedvolume_scrub_update AFTER UPDATE OF "
    "connection_info, attachment ON main.volumes WHEN "
    "(OLD.connection_info IS NOT NULL AND "
    "OLD.connection_info IS NOT NEW.connection_info) OR "
    "(OLD.attachment IS NOT NULL AND "
    "OLD.attachment IS NOT NEW.attachment) BEGIN SELECT {f}("
    "CASE WHEN OLD.connection_info IS NOT NEW.connection_info THEN "
    "OLD.connection_info END, "
    "CASE WHEN OLD.attachment IS NOT NEW.attachment THEN "
    "OLD.attachment END); END".format(f=_DROPPED),
)

# A record: every column but dev (identity holds it too).
_SELECT = ("SELECT vol_id, sd_id, state, connection_info, attachment, "
           "path, multipath_id, managed_path, size, extending, boot_id, "
           "identity, connecting, created, updated FROM volumes")

_SELECT_ONE = _SELECT + " WHERE vol_id = ?"

log = logging.getLogger("managedvolume.store")

# (version, description, script).  Append only; never edit a released one.
MIGRATIONS = (
    (1, "Initial version (vdsm managedvolumedb)", """
        CREATE TABLE volumes (
            vol_id TEXT PRIMARY KEY,
            path TEXT,
            connection_info TEXT,
            attachment TEXT,
            multipath_id TEXT,
            updated datetime);
        CREATE UNIQUE INDEX multipath_id ON volumes (multipath_id);
    """),
    (2, "Journal states, storage domain, managed path", """
        ALTER TABLE volumes ADD COLUMN sd_id TEXT
            NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000';
        ALTER TABLE volumes ADD COLUMN state TEXT
            NOT NULL DEFAULT 'attached'
            CHECK (state IN ('attaching', 'attached', 'detaching'));
        ALTER TABLE volumes ADD COLUMN managed_path TEXT;
        ALTER TABLE volumes ADD COLUMN created datetime;
        UPDATE volumes SET created = updated WHERE created IS NULL;
    """),
    (3, "Device size, extend in progress", """
        ALTER TABLE volumes ADD COLUMN size INTEGER;
        ALTER TABLE volumes ADD COLUMN extending INTEGER;
    """),
    # boot_id NULL: a row written before boots were recorded ("unknown
    # boot", see service._same_boot).  identity: devices.identity() of
    # the device at path, taken when the volume was attached.
    (4, "Boot of each record, device identity", """
        ALTER TABLE volumes ADD COLUMN boot_id TEXT;
        ALTER TABLE volumes ADD COLUMN identity TEXT;
    """),
    # dev: identity's MAJ:MIN, kept in step with identity by
    # update_volume, so that "which record holds this device" is an
    # index lookup, not a decode of every record (see volumes_on_device).
    (5, "Device number of each record, indexed", """
        ALTER TABLE volumes ADD COLUMN dev TEXT;
        CREATE INDEX volumes_dev ON volumes (dev);
    """),
    # connecting: 1 while a connect of the record may not have completed
    # (see the module docstring).  A row of before it that is not
    # 'attached' with an attachment is not known to have one that did;
    # nor is a row an older agent, still running after the migration
    # (the RPM migrates before it restarts the agent), writes without
    # naming the column: hence the default.
    (6, "Connect not known to have completed", """
        ALTER TABLE volumes ADD COLUMN connecting INTEGER NOT NULL
            DEFAULT 1;
        UPDATE volumes SET connecting = 0
            WHERE state = 'attached' AND attachment IS NOT NULL;
    """),
)

VERSION = MIGRATIONS[-1][0]


def open(path, busy_timeout=BUSY_TIMEOUT):
    """Open (creating and migrating when needed) the store at ``path``."""
    return Store(path, busy_timeout=busy_timeout)


def open_read_only(path, busy_timeout=BUSY_TIMEOUT):
    """Open the store at ``path`` to read it only.

    Nothing is created, migrated or written (a write is a StoreError), so
    a tool that only looks (``managedvolume-tool list``) never changes the
    journal under a running agent or vdsm (SQLite may create the empty
    -wal and -shm files any reader of a WAL database needs).  The schema
    must be this program's, as vdsm's own tools require of its database:
    an older one (migrated by ``managedvolume-tool configure`` or the
    agent's start), a newer one or a missing file is a StoreError saying
    which.
    """
    return _ReadOnlyStore(path, busy_timeout)


def inspect(path):
    """Read-only look at a store: {"version", "description", "records"}.

    Never creates, migrates or writes anything (a doctor must not change
    what it examines): ``version`` 0 means a database without our tables.
    """
    conn = _connect_read_only(path)
    try:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        info = {"version": 0, "description": None, "records": 0}
        info["version"], info["description"] = _schema(conn, tables)
        if "volumes" in tables:
            info["records"] = conn.execute(
                "SELECT count(*) FROM volumes").fetchone()[0]
        return info
    except sqlite3.Error as e:
        raise errors.StoreError(
            "{} is not a usable database: {}".format(path, e))
    finally:
        conn.close()


class Store:

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self._lock = threading.RLock()
        self._conn = _connect(path, busy_timeout)
        self._reader = None
        try:
            self._migrate()
            # Reads have their own connection: in WAL mode a reader sees
            # the last commit and never waits for a writer (its fsync, or
            # another process holding the write lock), so volumes_info
            # answers while attaches commit.
            self._reader = _connect(path, busy_timeout)
        except BaseException:
            self._conn.close()
            raise
        self._read_lock = threading.Lock()
        # Writes waiting for a commit (see _write).
        self._pending = []
        self._pending_lock = threading.Lock()
        # A commit without fsync is safe in WAL mode only: in a rollback
        # journal, synchronous=NORMAL may corrupt the database on a power
        # loss, not just lose the last commits (SQLite's "PRAGMA
        # synchronous").  _connect asks for WAL (warning if refused) and
        # sets FULL: the writer's commits are made at NORMAL in WAL mode,
        # for the life of the store (a durable write syncs the WAL
        # itself: _sync).
        self._wal = self._conn.execute(
            "PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        if self._wal:
            self._conn.execute("PRAGMA synchronous = NORMAL")
        # The schema's one CHECK, version 2's "state IN (...)", is not
        # evaluated by this connection: every state it writes was checked
        # already (_check_state, in add_volume and update_volume), and
        # SQLite 3.40 evaluates that IN list by building an ephemeral
        # table, a page of the temporary database zeroed for it, at each
        # insert and each update of state (three per attach+detach,
        # ~30,000 instructions each).  Every connection but this writer
        # (vdsm's, the read-only stores', sqlite3 by hand) still enforces
        # it; the migrations above ran with it.  The pragma silences every
        # CHECK of this connection: a migration adding one must check its
        # column in Python too (store_test pins the schema's CHECKs).
        self._conn.execute("PRAGMA ignore_check_constraints = ON")
        # In WAL mode a durable write is synced after its commit, outside
        # the write lock (_sync): commits counted, the last count synced,
        # the WAL (SQLite's own name of it; its descriptor opened at the
        # first sync), the first sync error (it stays: see _sync).
        self._commits = 0
        self._synced = 0
        self._sync_lock = threading.Lock()
        self._wal_path = _wal_path(self._conn, path) if self._wal else None
        self._wal_fd = None
        self._sync_error = None
        # The scrub (see "Secrets in the journal's files"): whether one is
        # due (a secret dropped since the last; under _lock), whether its
        # thread is asked for one and whether the store closes (under
        # _scrub_cond), and the delay before its next attempt.
        self._busy_ms = int(busy_timeout * 1000)
        self._dropped = False
        self._scrub_due = False
        self._scrub_cond = threading.Condition(threading.Lock())
        self._scrub_wanted = False
        self._closing = False
        self._scrub_delay = SCRUB_DELAY
        self._scrubber = None
        if self._wal:
            try:
                self._conn.create_function(_DROPPED, 2, self._note_dropped)
                for trigger in _TRIGGERS:
                    self._conn.execute(trigger)
            except sqlite3.Error as e:
                self.close()
                raise errors.StoreError("{}: {}".format(path, e))
            # Started now, not at the first secret's delete: starting a
            # thread waits for it to run (1-2 ms of that delete, under
            # the write lock, at load 3).
            self._scrubber = threading.Thread(
                target=self._scrub_loop, name="journal-scrub", daemon=True)
            self._scrubber.start()
            # What an earlier process left: its last deletes may never
            # have been scrubbed (killed before its scrub, or before it
            # closed the journal).
            with self._lock:
                self._scrub_due = True
                self._scrub_now()

    def close(self):
        with self._scrub_cond:
            self._closing = True
            self._scrub_cond.notify_all()
        with self._lock, self._read_lock:
            if self._conn is not None:
                if self._scrub_due:
                    # Not left to SQLite's checkpoint at the close: it
                    # makes none while another process (vdsm, a tool)
                    # has the journal open.
                    self._scrub_now(retry=False)
                self._conn.close()
                self._conn = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._sync_lock:
            # After SQLite's own descriptors (it holds no lock on the WAL).
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        if self._scrubber is not None and \
                self._scrubber is not threading.current_thread():
            # Told to stop above: it waits for nothing (bounded all the
            # same: a stop never hangs on it).
            self._scrubber.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Reading

    def get_volume(self, vol_id):
        """Return the record of ``vol_id``; raise StoreNotFound."""
        rows = self._read(_SELECT_ONE, (vol_id,))
        if not rows:
            raise errors.StoreNotFound(vol_id=vol_id)
        return _record(rows[0])

    def volumes(self, vol_ids=()):
        """Records of ``vol_ids`` (all when empty), sorted by vol_id.

        Unknown ids are skipped.  Each record is a dict holding every
        column; JSON columns are decoded, missing values are None.
        """
        sql = _SELECT
        vol_ids = list(vol_ids)
        if vol_ids:
            sql += " WHERE vol_id IN ({})".format(
                ",".join("?" for _ in vol_ids))
        sql += " ORDER BY vol_id"
        rows = self._read(sql, vol_ids)
        return [_record(row) for row in rows]

    def owns_multipath(self, multipath_id):
        """Whether a managed volume owns this multipath device.

        vdsm's multipath code asks this so it does not treat a managed
        volume's device as one of its own block storage domains.
        """
        rows = self._read(
            "SELECT EXISTS (SELECT 1 FROM volumes WHERE multipath_id = ?)",
            (multipath_id,))
        return rows[0][0] == 1

    def volumes_on_device(self, dev):
        """Records whose device, as recorded at attach, is ``dev``
        ("MAJ:MIN"), and those with a path but no recorded device
        (written before devices were recorded, or whose path is no block
        device): the caller looks at their path.  Sorted by vol_id.

        Each is {vol_id, sd_id, state, path, boot_id, identity}, decoded
        as the caller iterates (it usually stops at the first): an index
        lookup, whatever the number of records, and no connection_info
        decoded.
        """
        rows = self._read(
            "SELECT vol_id, sd_id, state, path, boot_id, identity "
            "FROM volumes WHERE dev = ? OR (dev IS NULL AND path IS NOT "
            "NULL) ORDER BY vol_id", (dev,))
        keys = ("vol_id", "sd_id", "state", "path", "boot_id")
        return (_decoded(dict(zip(keys, row)), (("identity", row[5]),))
                for row in rows)

    def version_info(self):
        """{"version", "description", "updated"} of the schema."""
        rows = self._read(
            "SELECT version, description, updated FROM versions "
            "ORDER BY version DESC LIMIT 1")
        return dict(zip(("version", "description", "updated"), rows[0]))

    # Writing (each call is one durable transaction)

    def add_volume(self, vol_id, sd_id, connection_info, state="attaching",
                   boot_id=None, exist_ok=False):
        """Insert a new record; StoreError if ``vol_id`` already has one.
        An 'attaching' one is ``connecting`` (its connect comes next).

        ``exist_ok``: a record already there is left as it is and False
        is returned (True: inserted).  One statement either way, so an
        attach, which usually finds no record, writes its intent without
        reading first.
        """
        _check_state(state)
        now = _now()
        sql = ("INSERT INTO volumes (vol_id, sd_id, state, connection_info, "
               "boot_id, connecting, created, updated) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        if exist_ok:
            # Only a record of the same vol_id is let be: any other
            # constraint still fails (SQLite 3.24+: EL8 has 3.26).
            sql += " ON CONFLICT (vol_id) DO NOTHING"
        try:
            count = self._write(
                sql, (vol_id, sd_id, state, _dumps(connection_info), boot_id,
                      state == "attaching", now, now),
                durable=True)
        except sqlite3.IntegrityError:
            raise errors.StoreError(
                "volume {} already has a record".format(vol_id))
        if count == 0:
            return False
        log.debug("Added volume %s state=%s", vol_id, state)
        return True

    def update_volume(self, vol_id, durable=True, **fields):
        """Set ``fields`` (column=value) of ``vol_id``'s record.

        ``durable=False`` for the last write of an operation only (see
        the module docstring).  Raise StoreNotFound if there is no record.
        """
        for name in fields:
            if name not in _COLUMNS:
                raise ValueError("unknown column {!r}".format(name))
        if "state" in fields:
            _check_state(fields["state"])
        names = list(fields)
        values = [_dumps(fields[n]) if n in _JSON_COLUMNS else fields[n]
                  for n in names]
        if "identity" in fields:
            names.append("dev")
            values.append(_dev(fields["identity"]))
        sql = _update_sql(tuple(names))
        try:
            count = self._write(sql, values + [_now(), vol_id],
                                durable=durable)
        except sqlite3.IntegrityError as e:
            raise errors.StoreError(
                "cannot update volume {}: {}".format(vol_id, e))
        if count == 0:
            raise errors.StoreNotFound(vol_id=vol_id)
        log.debug("Updated volume %s: %s", vol_id, ", ".join(fields))

    def remove_volume(self, vol_id, durable=True):
        """Delete the record of ``vol_id`` (no record is not an error).

        ``durable=False`` for the last write of an operation only (see
        the module docstring).
        """
        self._write("DELETE FROM volumes WHERE vol_id = ?", (vol_id,),
                    durable=durable)
        log.debug("Removed volume %s", vol_id)

    # Private helpers

    def _read(self, sql, args=()):
        """The rows of one query, read on the writer's connection when no
        commit holds it and no write waits for it, else on the reader's:
        never waiting for a commit, never delaying one.  The writer made
        the last writes, so its page cache is current; the reader would
        first read again every page they changed (three preads per read
        after each attach or detach step)."""
        if (self._conn is not None and not self._pending
                and self._lock.acquire(blocking=False)):
            try:
                if self._conn is not None:
                    return self._fetch(self._conn, sql, args)
            finally:
                self._lock.release()
        with self._read_lock:
            conn = self._reader
            if conn is None:
                raise errors.StoreClosed()
            return self._fetch(conn, sql, args)

    def _fetch(self, conn, sql, args):
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise errors.StoreError("{}: {}".format(self.path, e))

    def _write(self, sql, args=(), durable=True):
        """Run one statement in a committed transaction; its rowcount.

        Group commit: the write is queued; whoever holds the write lock
        commits everything queued (see ``_commit``), so a caller that
        waited for the lock usually finds its write already committed.
        In WAL mode no commit waits for an fsync: a durable write is
        synced after its commit, outside the write lock (``_sync``).
        """
        if durable and self._sync_error is not None:
            # Nothing durable is written after a failed sync (see _sync).
            raise self._unsynced()
        job = _Job(sql, args, durable)
        if ((self._wal or not durable) and not self._pending
                and self._lock.acquire(blocking=False)):
            # No fsync and no wait: committed here, keeping the run slot
            # (giving it back and taking it again costs more than this).
            try:
                self._commit([job])
            finally:
                self._lock.release()
        else:
            with self._pending_lock:
                self._pending.append(job)
            # The lock wait and the commit without a run slot: others
            # run meanwhile, and the group committer needs none.
            with gate.released(), self._lock:
                if not job.done:
                    with self._pending_lock:
                        batch, self._pending = self._pending, []
                    self._commit(batch)
        if job.error is not None:
            raise job.error
        if durable and self._wal:
            self._sync(job.seq)
        return job.count

    def _commit(self, batch):
        """Commit ``batch`` in one transaction; set each job's outcome.
        Synced (synchronous=FULL) without WAL only."""
        try:
            conn = self._checked()
            if len(batch) == 1:
                # A lone write is its own transaction (autocommit: one
                # statement instead of BEGIN, the write, COMMIT); it
                # commits, or fails and changes nothing, the same way.
                batch[0].count = conn.execute(
                    batch[0].sql, batch[0].args).rowcount
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                for job in batch:
                    try:
                        job.count = conn.execute(job.sql, job.args).rowcount
                    except sqlite3.IntegrityError as e:
                        # SQLite backs out the failed statement alone
                        # (its ABORT conflict resolution) and the
                        # transaction goes on: the others still commit.
                        job.error = e
                conn.execute("COMMIT")
            except BaseException:
                # Nothing of the batch is committed (or known to be: an
                # interrupt may come at COMMIT): no write may be told
                # it succeeded; the finally below tells them.
                for job in batch:
                    job.count = job.error = None
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as e:
            for job in batch:
                job.error = e
        except sqlite3.Error as e:
            error = errors.StoreError("{}: {}".format(self.path, e))
            for job in batch:
                job.error = error
        except errors.StoreClosed as e:
            for job in batch:
                job.error = e
        finally:
            if self._dropped:
                # A secret left the records: out of the files soon.
                self._dropped = False
                self._scrub_due = True
                self._schedule_scrub()
            # Counted once in the WAL (page cache): the next fdatasync of
            # the WAL that starts after this syncs it (_sync).
            self._commits += 1
            for job in batch:
                if job.count is None and job.error is None:
                    # Interrupted (BaseException): not known committed.
                    job.error = errors.StoreError(
                        "{}: the commit was interrupted".format(self.path))
                job.seq = self._commits
                job.done = True

    def _sync(self, seq):
        """Make the commits up to number ``seq`` durable: one fdatasync of
        the WAL, SQLite's own sync of synchronous=FULL, made after the
        commit and the write lock, so that other writes commit meanwhile;
        a sync already made after commit ``seq`` serves (group sync).
        Without a run slot: an fsync may take milliseconds.

        A failed sync is a StoreError, and so is every durable write
        after it until the journal is opened again (the agent's
        restart): the kernel reports a writeback error once, and the
        pages it failed to write may never reach the disk, whatever a
        later fsync says; the WAL frames written after them chain their
        checksums from them, so a recovery that finds them lost drops
        the later ones too.  Unlike synchronous=FULL (whose failed sync
        failed the commit), the write whose sync failed stays committed
        and visible until then; its caller takes no side effect on it,
        and nothing durable is built after it."""
        with gate.released(), self._sync_lock:
            if self._synced >= seq:
                return
            if self._sync_error is not None:
                raise self._unsynced()
            if self._conn is None:
                raise errors.StoreClosed()
            # Every commit counted so far is in the WAL: this sync covers
            # it.
            target = self._commits
            try:
                if self._wal_fd is None:
                    self._wal_fd = _open_wal(self._wal_path)
                os.fdatasync(self._wal_fd)
            except OSError as e:
                self._sync_error = e
                log.error("%s: its WAL could not be synced (%s): no "
                          "durable write is made until the journal is "
                          "opened again (restart the agent)", self.path, e)
                raise self._unsynced() from None
            self._synced = target

    def _note_dropped(self, connection_info, attachment):
        """The triggers' function (``_TRIGGERS``), called in the
        statement dropping these JSON texts (None: nothing dropped):
        notes a secret among them for ``_commit``.  Never raises (an
        error here would fail the write): unreadable text counts as a
        secret."""
        if self._dropped or self._scrub_due:
            # Noted, or a scrub is due anyway: it comes after this
            # commit (it waits for the write lock), so it covers it.
            return None
        try:
            if _holds_secret(connection_info) or _holds_secret(attachment):
                self._dropped = True
        except Exception:
            self._dropped = True
        return None

    def _schedule_scrub(self):
        """Ask the scrub's thread for a scrub ``_scrub_delay`` from now,
        unless it is asked already (the drops of that delay share it)."""
        with self._scrub_cond:
            if not self._scrub_wanted:
                self._scrub_wanted = True
                self._scrub_cond.notify()

    def _scrub_loop(self):
        """The scrub's thread, for the store's life: the one coalescing
        timer.  Waits until a scrub is asked for, then ``_scrub_delay``,
        then scrubs (``close`` scrubs what is still due)."""
        cond = self._scrub_cond
        while True:
            with cond:
                while not (self._scrub_wanted or self._closing):
                    cond.wait()
                deadline = time.monotonic() + self._scrub_delay
                while not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                if self._closing:
                    return
                self._scrub_wanted = False
            self._scrub()

    def _scrub(self):
        """Scrub now if one is due, under the write lock."""
        with self._lock:
            if self._conn is not None and self._scrub_due:
                self._scrub_now()

    def _scrub_now(self, retry=True):
        """Checkpoint the WAL into the database and truncate it (secure
        delete zeroed the dropped values in the pages written since, see
        "Secrets in the journal's files"); with ``retry``, try again
        later when it could not be done.  The caller holds the write
        lock.

        Safe beside ``_sync``: the checkpoint syncs the WAL before it
        copies it and the database after (synchronous=NORMAL), so the
        commits an fdatasync running meanwhile was to sync are durable
        either way; the truncation keeps the file (its inode), so the
        descriptor ``_sync`` holds names the WAL SQLite writes next."""
        if self._sync_error is not None:
            # No checkpoint of a WAL whose sync failed: it would copy
            # pages that may never have reached the disk and truncate
            # the WAL that would show the loss (see _sync).
            log.warning("%s: deleted secrets are not scrubbed from the "
                        "journal's files: its WAL could not be synced "
                        "(%s); restart the agent", self.path,
                        self._sync_error)
            return False
        conn = self._conn
        done = False
        try:
            conn.execute("PRAGMA busy_timeout = {:d}".format(SCRUB_BUSY_MS))
            try:
                busy, _, _ = conn.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute("PRAGMA busy_timeout = {:d}".format(
                    self._busy_ms))
        except sqlite3.Error as e:
            if _io_error(e):
                # A sync of the checkpoint failed (SQLite consumed the
                # kernel's one report): as a failed _sync, nothing
                # durable is written after it.
                with self._sync_lock:
                    if self._sync_error is None:
                        self._sync_error = e
                log.error("%s: its WAL could not be checkpointed to scrub "
                          "deleted secrets (%s): no durable write is made "
                          "until the journal is opened again (restart the "
                          "agent)", self.path, e)
                return False
            log.warning("%s: its WAL could not be checkpointed to scrub "
                        "deleted secrets (%s); trying again later",
                        self.path, e)
        else:
            done = not busy
            if busy:
                # Another connection is reading: SQLite copied what it
                # could, the WAL cannot restart under it.
                log.debug("%s: WAL in use by a reader: scrubbing again "
                          "later", self.path)
        if done:
            self._scrub_due = False
            self._scrub_delay = SCRUB_DELAY
            log.debug("%s: WAL checkpointed and truncated", self.path)
        elif retry:
            self._scrub_delay = min(self._scrub_delay * 2, SCRUB_DELAY_MAX)
            self._schedule_scrub()
        return done

    def _unsynced(self):
        return errors.StoreError(
            "{}: its WAL could not be synced ({}); the journal is no "
            "longer known durable: restart the agent".format(
                self.path, self._sync_error))

    def _checked(self):
        if self._conn is None:
            raise errors.StoreClosed()
        return self._conn

    def _migrate(self):
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = _current_version(conn)
                if current > VERSION:
                    raise errors.StoreError(
                        "{} has schema version {}, newer than this "
                        "program's {}; refusing to guess".format(
                            self.path, current, VERSION))
                for version, description, script in MIGRATIONS:
                    if version <= current:
                        continue
                    log.info("Migrating %s to version %d: %s",
                             self.path, version, description)
                    for statement in _statements(script):
                        conn.execute(statement)
                    if version in _MIGRATION_STEPS:
                        _MIGRATION_STEPS[version](conn)
                    conn.execute(
                        "INSERT INTO versions (version, description, "
                        "updated) VALUES (?, ?, ?)",
                        (version, description, _now()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise errors.StoreError("{}: {}".format(self.path, e))


class _ReadOnlyStore(Store):
    """``open_read_only``: one read-only connection, no writer (nothing
    to sync, nothing to scrub: a close of its own)."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._conn = None
        self._reader = _connect_read_only(path, busy_timeout)
        try:
            version, _ = _schema(self._reader)
        except sqlite3.Error as e:
            self._reader.close()
            raise errors.StoreError(
                "{} is not a usable database: {}".format(path, e))
        if version != VERSION:
            self._reader.close()
            raise errors.StoreError(
                "{} has schema version {}, {} this program's {}{}".format(
                    path, version,
                    "older than" if version < VERSION else "newer than",
                    VERSION, "; 'managedvolume-tool configure' migrates it"
                    if version < VERSION else ""))

    def close(self):
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _write(self, sql, args=(), durable=True):
        raise errors.StoreError("{} is open read-only".format(self.path))


class _Job:
    """One write waiting for its commit."""

    __slots__ = ("sql", "args", "durable", "count", "error", "done", "seq")

    def __init__(self, sql, args, durable):
        self.sql = sql
        self.args = args
        self.durable = durable
        self.count = None
        self.error = None
        self.done = False
        self.seq = 0


def _connect(path, busy_timeout):
    """Open ``path``, created 0600 before SQLite ever sees it."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        # SQLite creates -wal and -shm with the database file's mode.
        # Only a new file is opened here: closing a descriptor of a file
        # drops every POSIX lock this process holds on it, and without the
        # SHARED lock of a connection already open (Store's writer, when
        # its reader is opened) another process closing the journal takes
        # itself for the last user and deletes the WAL that connection
        # still writes to: its later commits would be lost.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as e:
        raise errors.StoreError("cannot create {}: {}".format(path, e))
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout,
                               isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as e:
        raise errors.StoreError("cannot open {}: {}".format(path, e))
    try:
        conn.execute("PRAGMA busy_timeout = {:d}".format(
            int(busy_timeout * 1000)))
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("%s: journal_mode is %s, not wal", path, mode)
        conn.execute("PRAGMA synchronous = FULL")
        # A deleted or replaced value is overwritten with zeros in the
        # pages written (the default of some builds only): see "Secrets
        # in the journal's files".
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA foreign_keys = ON")
        # A file that is not a database fails here, not at first use.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        conn.close()
        raise errors.StoreError(
            "{} is not a usable database: {}".format(path, e))
    return conn


def _wal_path(conn, path):
    """The WAL SQLite writes for ``conn``: its name of the database file
    (symbolic links resolved as its version does), "-wal" appended."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return file + "-wal"
    return os.path.realpath(path) + "-wal"


def _open_wal(wal_path):
    """A descriptor of the WAL at ``wal_path``, to sync it, its directory
    entry synced once (SQLite's first sync of a new WAL does so): SQLite
    made it for the commit just done, and keeps it while a connection is
    open (the last to close deletes it)."""
    fd = os.open(wal_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dir_fd = os.open(os.path.dirname(wal_path),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _connect_read_only(path, busy_timeout=BUSY_TIMEOUT):
    """``path`` opened read-only (never created)."""
    uri = "file:{}?mode=ro".format(urllib.parse.quote(os.path.abspath(path)))
    try:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise errors.StoreError("cannot open {}: {}".format(path, e))


def _io_error(e):
    """Whether the sqlite3 error ``e`` is SQLITE_IOERR (any of its
    extended codes: a read, a write or a sync failed)."""
    name = getattr(e, "sqlite_errorname", None)     # Python 3.11+
    if name is not None:
        return name.startswith("SQLITE_IOERR")
    return "disk I/O error" in str(e)


def _holds_secret(text):
    """Whether a JSON column's ``text`` holds a secret, as ``mask``
    sees one (undecodable text: it may).

    Text that ``mask.json_plainly_clean`` clears is not decoded: a
    delete of a record without a secret then costs no decode of its
    connection_info and attachment."""
    if text is None or mask.json_plainly_clean(text):
        return False
    try:
        value = _loads(text)
    except errors.StoreError:
        return True
    return mask.holds_secret(value)


def _schema(conn, tables=None):
    """(version, description) of the schema, reading only; version 0 for
    a database without our versions table."""
    if tables is None:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "versions" not in tables:
        return 0, None
    row = conn.execute("SELECT version, description FROM versions "
                       "ORDER BY version DESC LIMIT 1").fetchone()
    return tuple(row) if row else (0, None)


def _current_version(conn):
    has_versions = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' "
        "AND name = 'versions'").fetchone()
    if not has_versions:
        has_volumes = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' "
            "AND name = 'volumes'").fetchone()
        if has_volumes:
            raise errors.StoreError(
                "database has a volumes table but no versions table")
        conn.execute(
            "CREATE TABLE versions (version INTEGER PRIMARY KEY, "
            "description TEXT, updated datetime)")
        return 0
    row = conn.execute("SELECT max(version) FROM versions").fetchone()
    return row[0] or 0


def _statements(script):
    return [s.strip() for s in script.split(";") if s.strip()]


def _record(row):
    (vol_id, sd_id, state, connection_info, attachment, path, multipath_id,
     managed_path, size, extending, boot_id, identity, connecting, created,
     updated) = row
    return _decoded({
        "vol_id": vol_id,
        "sd_id": sd_id,
        "state": state,
        "path": path,
        "multipath_id": multipath_id,
        "managed_path": managed_path,
        "size": size,
        "extending": extending,
        "boot_id": boot_id,
        "connecting": bool(connecting),
        "created": created,
        "updated": updated,
    }, (("connection_info", connection_info), ("attachment", attachment),
        ("identity", identity)))


def _decoded(rec, columns):
    """``rec`` with its JSON ``columns`` ((name, text), ...) decoded.

    One corrupt record must not make every read fail (the agent could
    not start, no tool could list or clear it): a column that is not
    JSON, or JSON of the wrong type (``_JSON_TYPES``), is None and the
    record says why in ``corrupt`` (absent from a sound record).  The
    service treats such a record as stale (``service._stale_reason``) and
    refuses to act on it (errors.CorruptRecord); ``reconcile --apply
    --force`` forgets it.
    """
    problems = []
    for name, text in columns:
        value = None
        if text is not None:
            try:
                value = _loads(text)
            except errors.StoreError as e:
                problems.append("{}: {}".format(name, e.reason))
            else:
                wrong = _JSON_TYPES[name](value)
                if wrong:
                    problems.append("{} {}".format(name, wrong))
                    value = None
        rec[name] = value
    if problems:
        rec["corrupt"] = "; ".join(problems)
    return rec


def _connection_type(value):
    if not isinstance(value, dict):
        return "is JSON {}, not an object".format(type(value).__name__)
    if not isinstance(value.get("driver_volume_type"), str):
        return "has no driver_volume_type string"
    if not isinstance(value.get("data"), dict):
        return "has no data object"
    return None


def _object_type(value):
    if value is None or isinstance(value, dict):
        return None
    return "is JSON {}, not an object".format(type(value).__name__)


# What each JSON column must decode to: a function returning what is
# wrong with a value, None when nothing is.
_JSON_TYPES = {"connection_info": _connection_type,
               "attachment": _object_type,
               "identity": _object_type}


# json.dumps(value, sort_keys=True), without making an encoder per call.
_ENCODER = jsontext.Encoder(sort_keys=True)


def _dumps(value):
    if value is None:
        return None
    return _ENCODER.encode(value)


def _loads(text):
    if text is None:
        return None
    if isinstance(text, bytes):
        # vdsm stored JSON as UTF-8 bytes (BLOB).
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.StoreError("not UTF-8 ({})".format(e.reason))
    try:
        return jsontext.loads(text)
    except (ValueError, RecursionError) as e:
        raise errors.StoreError("undecodable JSON ({})".format(
            type(e).__name__ if isinstance(e, RecursionError) else e))


def _dev(identity):
    """The indexed ``dev`` of a record with this ``identity``."""
    if isinstance(identity, dict) and isinstance(identity.get("dev"), str):
        return identity["dev"]
    return None


def _fill_dev(conn):
    """Version 5: ``dev`` of the records written before it."""
    rows = conn.execute("SELECT vol_id, identity FROM volumes "
                        "WHERE identity IS NOT NULL").fetchall()
    for vol_id, identity in rows:
        try:
            dev = _dev(_loads(identity))
        except errors.StoreError:
            continue    # reported when the record is read
        conn.execute("UPDATE volumes SET dev = ? WHERE vol_id = ?",
                     (dev, vol_id))


# What a migration computes beyond its SQL: version -> function(conn), run
# in the same transaction after that version's script.
_MIGRATION_STEPS = {5: _fill_dev}


@functools.lru_cache(maxsize=64)
def _update_sql(names):
    """The UPDATE setting these columns (known ones: a few dozen sets at
    most), made once per set."""
    return "UPDATE volumes SET {}, updated = ? WHERE vol_id = ?".format(
        ", ".join("{} = ?".format(n) for n in names))


def _check_state(state):
    # A str exactly (a subclass's __eq__ could say anything): this check
    # stands in for the schema's CHECK on the writer's connection.
    if type(state) is not str or state not in STATES:
        raise ValueError("invalid state {!r}".format(state))


# The last second _now() formatted: (seconds since the epoch, its
# "YYYY-MM-DD HH:MM:SS" in UTC).  Replaced whole: threads may share it.
_second = (None, "")


def _now():
    """"YYYY-MM-DD HH:MM:SS.ffffff", UTC, as datetime's isoformat(" ")
    writes it (microseconds truncated, as datetime.now does).  The date
    and time of day are formatted once a second: four writes of an
    attach+detach made a datetime each (~3.4 us apiece, this ~1.4 us)."""
    global _second
    sec, us = divmod(time.time_ns() // 1000, 1000000)
    second = _second
    if second[0] != sec:
        second = _second = (sec, time.strftime("%Y-%m-%d %H:%M:%S",
                                               time.gmtime(sec)))
    return "{}.{:06d}".format(second[1], us)
