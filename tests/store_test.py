import contextlib
import json
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import mask
from vdsm_managedvolume import store

from .agentutil import held_elsewhere

VOL = "0d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
VOL2 = "1d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
SD = "2d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
CI = {"driver_volume_type": "iscsi", "data": {"target_lun": 1}}

# vdsm's managedvolumedb schema, version 1, as vdsm creates it.
VDSM_SCHEMA = """
    CREATE TABLE volumes (
        vol_id TEXT PRIMARY KEY,
        path TEXT,
        connection_info TEXT,
        attachment TEXT,
        multipath_id TEXT,
        updated datetime);
    CREATE UNIQUE INDEX multipath_id ON volumes (multipath_id);
    CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        description TEXT,
        updated datetime
    );
    INSERT INTO versions (version, description, updated)
    VALUES (1, "Initial version", datetime("now"));
"""


@pytest.fixture
def db(tmp_path):
    s = store.open(str(tmp_path / "lib" / "mv.db"))
    yield s
    s.close()


def test_new_database_is_private_wal_and_latest_version(tmp_path):
    path = tmp_path / "lib" / "mv.db"
    with store.open(str(path)) as s:
        s.add_volume(VOL, SD, CI)
        assert s.version_info()["version"] == store.VERSION
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        p = str(path) + suffix
        if os.path.exists(p):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_writer_commits_at_normal_in_wal_mode_with_a_busy_timeout(db):
    # NORMAL: a durable write syncs the WAL itself (Store._sync).
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert db._reader.execute("PRAGMA synchronous").fetchone()[0] == 2
    for conn in (db._conn, db._reader):
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000


def test_add_get_update_remove_round_trip(db):
    db.add_volume(VOL, SD, CI)
    rec = db.get_volume(VOL)
    assert rec["state"] == "attaching"
    assert rec["sd_id"] == SD
    assert rec["connection_info"] == CI
    assert rec["attachment"] is None and rec["path"] is None
    assert rec["created"] and rec["updated"]

    att = {"type": "block", "multipath_id": "3600a", "path": "/dev/dm-1"}
    db.update_volume(VOL, attachment=att, path="/dev/mapper/3600a",
                     multipath_id="3600a")
    db.update_volume(VOL, state="attached", managed_path="/run/x")
    rec = db.get_volume(VOL)
    assert rec["attachment"] == att
    assert rec["path"] == "/dev/mapper/3600a"
    assert rec["managed_path"] == "/run/x"
    assert rec["state"] == "attached"
    assert db.owns_multipath("3600a")
    assert not db.owns_multipath("3600b")

    db.remove_volume(VOL)
    with pytest.raises(errors.StoreNotFound):
        db.get_volume(VOL)
    db.remove_volume(VOL)  # idempotent


def test_duplicate_volume_is_a_store_error(db):
    db.add_volume(VOL, SD, CI)
    with pytest.raises(errors.StoreError, match="already"):
        db.add_volume(VOL, SD, CI)


def test_update_of_missing_volume_is_not_found(db):
    with pytest.raises(errors.StoreNotFound):
        db.update_volume(VOL, state="attached")


class _AnyState(str):
    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


def test_invalid_state_or_column_is_refused(db):
    db.add_volume(VOL, SD, CI)
    for state in ("bogus", _AnyState("bogus"), b"attached", None):
        with pytest.raises(ValueError):
            db.update_volume(VOL, state=state)
        with pytest.raises(ValueError):
            db.add_volume(VOL2, SD, CI, state=state)
    with pytest.raises(ValueError):
        db.update_volume(VOL, created="x")
    assert db.get_volume(VOL)["state"] == "attaching"
    assert [v["vol_id"] for v in db.volumes()] == [VOL]


def test_the_schema_has_one_check_the_writer_stands_in_for(db):
    # The writer's connection ignores CHECK constraints (store.py: the
    # state's IN list is checked in Python instead); a migration adding
    # another CHECK must check its column in Python too, then change this.
    conn = sqlite3.connect(db.path)
    try:
        sql = " ".join(row[0] for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
    finally:
        conn.close()
    assert sql.upper().count("CHECK") == 1
    assert "CHECK (state IN" in sql or "CHECK(state IN" in sql


def test_the_schema_still_checks_states_for_other_writers(db):
    # The store's writer does not evaluate the CHECK (it checks every
    # state itself); the schema keeps it for vdsm, the tool, sqlite3.
    db.add_volume(VOL, SD, CI)
    db.update_volume(VOL, state="attached")
    conn = sqlite3.connect(db.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE volumes SET state = 'bogus'")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("INSERT INTO volumes (vol_id, state) "
                         "VALUES ('x', 'bogus')")
    finally:
        conn.close()
    assert db.get_volume(VOL)["state"] == "attached"


def test_volumes_are_sorted_and_filtered(db):
    db.add_volume(VOL2, SD, CI)
    db.add_volume(VOL, SD, CI)
    assert [v["vol_id"] for v in db.volumes()] == [VOL, VOL2]
    assert [v["vol_id"] for v in db.volumes([VOL2, "unknown"])] == [VOL2]


def test_closed_store_raises_store_closed(tmp_path):
    s = store.open(str(tmp_path / "mv.db"))
    s.close()
    s.close()
    with pytest.raises(errors.StoreClosed):
        s.volumes()
    with pytest.raises(errors.StoreClosed):
        s.add_volume(VOL, SD, CI)


def test_vdsm_database_is_migrated_in_place(tmp_path):
    path = str(tmp_path / "managedvolume.db")
    conn = sqlite3.connect(path)
    conn.executescript(VDSM_SCHEMA)
    conn.execute(
        "INSERT INTO volumes (vol_id, path, connection_info, attachment, "
        "multipath_id, updated) VALUES (?, ?, ?, ?, ?, datetime('now'))",
        (VOL, "/dev/mapper/3600a", json.dumps(CI).encode("utf-8"),
         json.dumps({"path": "/dev/dm-1"}).encode("utf-8"), "3600a"))
    conn.commit()
    conn.close()

    with store.open(path) as s:
        assert s.version_info()["version"] == store.VERSION
        rec = s.get_volume(VOL)
    assert rec["state"] == "attached"
    assert rec["sd_id"] == "00000000-0000-0000-0000-000000000000"
    assert rec["connection_info"] == CI
    assert rec["attachment"] == {"path": "/dev/dm-1"}
    assert rec["created"]
    assert (rec["boot_id"], rec["identity"]) == (None, None)  # unknown boot

    with store.open(path) as s:   # reopening does not migrate again
        assert s.version_info()["version"] == store.VERSION


def test_version_2_database_gains_size_and_extending(tmp_path):
    path = str(tmp_path / "mv.db")
    with _journal_of_version(path, 2) as conn:
        conn.execute("INSERT INTO volumes (vol_id, path, connection_info) "
                     "VALUES (?, '/dev/mapper/3600a', ?)",
                     (VOL, json.dumps(CI)))

    with store.open(path) as s:
        assert s.version_info()["version"] == store.VERSION
        rec = s.get_volume(VOL)
        assert (rec["state"], rec["size"], rec["extending"]) == (
            "attached", None, None)
        s.update_volume(VOL, size=2 * 1024**3, extending=0)
        rec = s.get_volume(VOL)
        assert (rec["size"], rec["extending"]) == (2 * 1024**3, 0)


@contextlib.contextmanager
def _journal_of_version(path, version):
    """A journal at ``path`` as an agent of store version ``version``
    left it, its connection given to the ``with`` for the rows a test
    puts in (committed and closed after)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE versions (version INTEGER PRIMARY KEY, "
                 "description TEXT, updated datetime)")
    for number, description, script in store.MIGRATIONS[:version]:
        conn.executescript(script)
        conn.execute("INSERT INTO versions VALUES (?, ?, 'now')",
                     (number, description))
    yield conn
    conn.commit()
    conn.close()


def test_newer_database_is_refused(tmp_path):
    path = str(tmp_path / "mv.db")
    store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO versions VALUES (?, 'future', 'now')",
                 (store.VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(errors.StoreError, match="newer"):
        store.open(path)


def test_corrupt_file_is_a_clear_store_error(tmp_path):
    path = tmp_path / "mv.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(errors.StoreError) as e:
        store.open(str(path))
    assert e.value.code == 935
    assert str(path) in str(e.value)


@pytest.mark.parametrize("column, text, why", [
    ("attachment", "{bad", "attachment: undecodable JSON (Expecting"),
    ("connection_info", "{bad", "connection_info: undecodable JSON"),
    ("connection_info", '"str"', "connection_info is JSON str, not an "
     "object"),
    ("connection_info", "[]", "connection_info is JSON list"),
    ("connection_info", '{"data": {}}',
     "connection_info has no driver_volume_type string"),
    ("connection_info", '{"driver_volume_type": "iscsi", "data": 1}',
     "connection_info has no data object"),
    ("attachment", "1", "attachment is JSON int, not an object"),
    ("identity", "[1]", "identity is JSON list, not an object"),
    ("identity", "[" * 100000, "identity: undecodable JSON (RecursionError"),
])
def test_a_corrupt_record_is_read_saying_why_and_others_stay_sound(
        db, column, text, why):
    # It made every read fail: the agent could not start, no tool could
    # list or clear it.
    db.add_volume(VOL, SD, CI)
    db.add_volume(VOL2, SD, CI)
    db._write("UPDATE volumes SET {} = ? WHERE vol_id = ?".format(column),
              (text, VOL))
    bad, good = db.volumes()
    assert bad["vol_id"] == VOL and bad[column] is None
    assert why in bad["corrupt"]
    assert "corrupt" not in good and good["connection_info"] == CI
    assert db.get_volume(VOL)["corrupt"] == bad["corrupt"]


def test_many_threads_share_one_store(db):
    ids = ["{:08x}-0000-4000-8000-000000000000".format(i) for i in range(40)]

    def work(vol_id):
        db.add_volume(vol_id, SD, CI)
        db.update_volume(vol_id, state="attached")
        db.get_volume(vol_id)

    threads = [threading.Thread(target=work, args=(v,)) for v in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [v["vol_id"] for v in db.volumes()] == ids
    assert {v["state"] for v in db.volumes()} == {"attached"}


def _process_worker(path, first, count):
    with store.open(path) as s:
        for i in range(first, first + count):
            vol_id = "{:08x}-0000-4000-8000-000000000000".format(i)
            s.add_volume(vol_id, SD, CI)
            s.update_volume(vol_id, state="attached")


def test_many_processes_share_one_database(tmp_path):
    path = str(tmp_path / "mv.db")
    store.open(path).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_worker, args=(path, i * 20, 20))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with store.open(path) as s:
        vols = s.volumes()
    assert len(vols) == 80
    assert {v["state"] for v in vols} == {"attached"}


def test_another_process_closing_the_journal_loses_none_of_our_writes(
        db):
    """`managedvolume-tool list` while the agent runs: the tool's close
    must not take itself for the journal's last user and delete the WAL
    the agent still writes to (the agent's later commits would be lost,
    and other processes would read the old state)."""
    db.add_volume(VOL, SD, CI)
    db.add_volume(VOL2, SD, CI)
    subprocess.run([sys.executable, "-c",
                    "import sys; from vdsm_managedvolume import store; "
                    "store.open(sys.argv[1]).close()", db.path],
                   check=True, timeout=60)
    db.remove_volume(VOL, durable=False)
    db.update_volume(VOL2, state="attached")
    assert os.path.exists(db.path + "-wal")
    conn = sqlite3.connect(db.path)
    try:
        rows = conn.execute("SELECT vol_id, state FROM volumes").fetchall()
    finally:
        conn.close()
    assert rows == [(VOL2, "attached")]


def test_unwritable_location_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(errors.StoreError, match="cannot create"):
        store.open(str(blocker / "lib" / "mv.db"))


def test_inspect_reads_version_without_migrating_or_writing(tmp_path):
    path = str(tmp_path / "mv.db")
    with store.open(path):
        pass
    before = os.stat(path).st_mtime_ns
    info = store.inspect(path)
    assert info == {"version": store.VERSION,
                    "description": store.MIGRATIONS[-1][1], "records": 0}
    assert os.stat(path).st_mtime_ns == before


def test_inspect_of_a_missing_file_creates_nothing(tmp_path):
    path = tmp_path / "absent.db"
    with pytest.raises(errors.StoreError):
        store.inspect(str(path))
    assert not path.exists()


def test_version_3_rows_migrate_to_an_unknown_boot(tmp_path):
    path = str(tmp_path / "mv.db")
    with _journal_of_version(path, 3) as conn:
        conn.execute("INSERT INTO volumes (vol_id, path, connection_info, "
                     "state) VALUES (?, '/dev/loop3', ?, 'attached')",
                     (VOL, json.dumps(CI)))
    with store.open(path) as s:
        rec = s.get_volume(VOL)
        assert (rec["path"], rec["boot_id"], rec["identity"]) == (
            "/dev/loop3", None, None)
        s.update_volume(VOL, boot_id="b1", identity={"dev": "7:3"})
        rec = s.get_volume(VOL)
    assert (rec["boot_id"], rec["identity"]) == ("b1", {"dev": "7:3"})


def test_version_4_rows_get_their_device_indexed(tmp_path):
    path = str(tmp_path / "mv.db")
    with _journal_of_version(path, 4) as conn:
        conn.execute("INSERT INTO volumes (vol_id, path, connection_info, "
                     "state, boot_id, identity) VALUES (?, '/dev/loop3', "
                     "?, 'attached', 'b1', ?)",
                     (VOL, json.dumps(CI), json.dumps({"dev": "7:3"})))
        conn.execute("INSERT INTO volumes (vol_id, connection_info, state) "
                     "VALUES (?, ?, 'attaching')", (VOL2, json.dumps(CI)))
    with store.open(path) as s:
        assert [r["vol_id"] for r in s.volumes_on_device("7:3")] == [VOL]
        assert list(s.volumes_on_device("7:4")) == []


def test_version_5_rows_not_known_to_have_connected_are_connecting(
        tmp_path):
    # A record whose connect completed ('attached' with what it
    # returned) is not connecting; any other may be (an 'attaching' one,
    # a 'detaching' one that may have come from one): their disconnect
    # waits for an earlier daemon's logins, as every disconnect did.
    path = str(tmp_path / "mv.db")
    third = "3d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
    fourth = "4d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
    with _journal_of_version(path, 5) as conn:
        for vol_id, state, attachment in (
                (VOL, "attached", {"path": "/dev/dm-1"}),
                (VOL2, "attaching", None),
                (third, "detaching", {"path": "x"}),
                (fourth, "attached", None)):
            conn.execute("INSERT INTO volumes (vol_id, connection_info, "
                         "state, attachment) VALUES (?, ?, ?, ?)",
                         (vol_id, json.dumps(CI), state,
                          json.dumps(attachment) if attachment else None))
    with store.open(path) as s:
        assert {r["vol_id"]: r["connecting"] for r in s.volumes()} == {
            VOL: False, VOL2: True, third: True, fourth: True}
    # An agent of before it, still running after the migration (the
    # RPM migrates before the restart), writes intents that do not name
    # the column: they may not have completed either.
    fifth = "5d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO volumes (vol_id, connection_info, state) "
                 "VALUES (?, ?, 'attaching')", (fifth, json.dumps(CI)))
    conn.commit()
    conn.close()
    with store.open(path) as s:
        assert s.get_volume(fifth)["connecting"] is True


def test_an_attaching_record_is_connecting_until_told(db):
    db.add_volume(VOL, SD, CI)
    assert db.get_volume(VOL)["connecting"] is True
    db.update_volume(VOL, attachment={"path": "/dev/dm-1"},
                     connecting=False)
    db.update_volume(VOL, state="detaching")
    assert db.get_volume(VOL)["connecting"] is False
    db.add_volume(VOL2, SD, CI, state="attached")
    assert db.get_volume(VOL2)["connecting"] is False


def test_volumes_on_device_follows_the_recorded_identity(db):
    third = "3d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
    for vol_id in (VOL, VOL2, third):
        db.add_volume(vol_id, SD, CI)
    db.update_volume(VOL, path="/dev/loop3", identity={"dev": "7:3"})
    db.update_volume(VOL2, path="/dev/loop3", identity={"dev": "7:3"})
    # A path without a recorded device (not a block device, or written
    # before devices were): the caller must look at it.
    db.update_volume(third, path="/tmp/file", identity=None)
    assert [r["vol_id"] for r in db.volumes_on_device("7:3")] == [
        VOL, VOL2, third]
    rec = db.get_volume(VOL)
    assert next(db.volumes_on_device("7:3")) == {
        k: rec[k] for k in ("vol_id", "sd_id", "state", "path", "boot_id",
                            "identity")}
    db.update_volume(VOL2, identity={"dev": "7:4"})
    assert [r["vol_id"] for r in db.volumes_on_device("7:3")] == [
        VOL, third]
    db.remove_volume(VOL)
    db.update_volume(third, path=None)
    assert list(db.volumes_on_device("7:3")) == []
    assert [r["vol_id"] for r in db.volumes_on_device("7:4")] == [VOL2]


def test_add_volume_records_its_boot(db):
    db.add_volume(VOL, SD, CI, boot_id="boot-1")
    assert db.get_volume(VOL)["boot_id"] == "boot-1"


def _statements(db):
    seen = []
    db._conn.set_trace_callback(seen.append)
    return seen


def _queued_writers(db, jobs):
    """Run each job in a thread while the write lock is held, until all
    are queued; then let them commit.  Return what each raised."""
    from .agentutil import wait_for
    outcome = {}

    def run(name, job):
        try:
            job()
            outcome[name] = None
        except BaseException as e:
            outcome[name] = e

    threads = [threading.Thread(target=run, args=item)
               for item in jobs.items()]
    with db._lock:                      # a commit in progress
        for t in threads:
            t.start()
        wait_for(lambda: len(db._pending) == len(jobs))
    for t in threads:
        t.join(30)
    return outcome


def test_writers_arriving_during_a_commit_share_the_next_one(db):
    ids = ["{:08d}-6a69-4a2e-9f63-4c8f3bd6f0a1".format(i) for i in range(6)]
    seen = _statements(db)
    outcome = _queued_writers(db, {
        vol_id: lambda vol_id=vol_id: db.add_volume(vol_id, SD, CI)
        for vol_id in ids})
    assert outcome == {vol_id: None for vol_id in ids}
    # One statement per write between BEGIN and COMMIT: no savepoints.
    assert [s.split()[0] for s in seen if not s.startswith("PRAGMA")] == \
        ["BEGIN"] + ["INSERT"] * len(ids) + ["COMMIT"]
    assert [r["vol_id"] for r in db.volumes()] == ids


def test_a_failing_write_in_a_shared_commit_fails_alone(db):
    db.add_volume(VOL, SD, CI)
    seen = _statements(db)
    outcome = _queued_writers(db, {
        "duplicate": lambda: db.add_volume(VOL, SD, CI),
        "new": lambda: db.add_volume(VOL2, SD, CI),
        "update": lambda: db.update_volume(VOL, state="attached"),
    })
    assert isinstance(outcome["duplicate"], errors.StoreError)
    assert "already has a record" in str(outcome["duplicate"])
    assert outcome["new"] is None and outcome["update"] is None
    # SQLite backed out the failed statement alone; the transaction
    # went on and committed the others.
    kinds = [s.split()[0] for s in seen if not s.startswith("PRAGMA")]
    assert (kinds[0], kinds[-1]) == ("BEGIN", "COMMIT")
    assert sorted(kinds[1:-1]) == ["INSERT", "INSERT", "UPDATE"]
    assert [(r["vol_id"], r["state"]) for r in db.volumes()] == [
        (VOL, "attached"), (VOL2, "attaching")]


def test_a_shared_commit_interrupted_tells_no_writer_it_succeeded(db):
    # An interrupt (KeyboardInterrupt, SystemExit) at COMMIT: the writes
    # whose statements ran are not committed, and their callers are told
    # so (review-cpudiet9 M1: they were told the write succeeded).
    db.add_volume(VOL, SD, CI)
    real = db._checked

    class Interrupted:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise KeyboardInterrupt
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    db._checked = lambda: Interrupted(real())
    outcome = _queued_writers(db, {
        "new": lambda: db.add_volume(VOL2, SD, CI),
        "update": lambda: db.update_volume(VOL, state="attached"),
        "remove": lambda: db.remove_volume(VOL),
    })
    del db._checked
    assert all(e is not None for e in outcome.values()), outcome
    assert sum(isinstance(e, KeyboardInterrupt)
               for e in outcome.values()) == 1
    assert all("interrupted" in str(e) for e in outcome.values()
               if not isinstance(e, KeyboardInterrupt))
    assert [(r["vol_id"], r["state"]) for r in db.volumes()] == [
        (VOL, "attaching")]
    db.add_volume(VOL2, SD, CI)             # no transaction left open
    assert len(db.volumes()) == 2


def test_a_lone_write_is_one_statement_and_fails_whole(db):
    db.add_volume(VOL, SD, CI)
    seen = _statements(db)
    db.update_volume(VOL, state="detaching")
    assert [s.split()[0] for s in seen] == ["UPDATE"]
    with pytest.raises(errors.StoreError, match="already has a record"):
        db.add_volume(VOL, SD, CI)
    assert [(r["vol_id"], r["state"]) for r in db.volumes()] == [
        (VOL, "detaching")]
    db.add_volume(VOL2, SD, CI)             # no transaction left open
    assert len(db.volumes()) == 2


def _syncs(monkeypatch):
    """The fdatasync calls made from now on, each whether its caller
    held a run slot (``gate``) then."""
    from vdsm_managedvolume import gate
    calls = []
    real = os.fdatasync

    def fdatasync(fd):
        calls.append(gate.holding())
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_only_a_durable_write_is_synced_after_its_commit(db, monkeypatch):
    # WAL mode: every commit is made with synchronous=NORMAL, set when
    # the store was opened (no PRAGMA at a commit), and a durable write
    # syncs the WAL after it.
    syncs = _syncs(monkeypatch)
    seen = _statements(db)
    db.add_volume(VOL, SD, CI)
    assert len(syncs) == 1
    db.update_volume(VOL, state="attached", durable=False)
    assert len(syncs) == 1
    db.update_volume(VOL, state="detaching")
    assert len(syncs) == 2
    db.remove_volume(VOL, durable=False)
    assert len(syncs) == 2
    assert not [s for s in seen if s.startswith("PRAGMA")]
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert db.volumes() == []


def test_a_sync_serves_every_commit_made_before_it(db, monkeypatch):
    syncs = _syncs(monkeypatch)
    db.add_volume(VOL, SD, CI)
    db.update_volume(VOL, state="attached", durable=False)
    first = db._commits
    db.update_volume(VOL, state="detaching")    # syncs both
    assert len(syncs) == 2
    db._sync(first)
    assert len(syncs) == 2


def test_a_journal_behind_a_symlink_syncs_the_wal_sqlite_writes(tmp_path):
    # SQLite names the WAL after the database file, symbolic links
    # resolved: the sync must reach that file, not one beside the link.
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").mkdir()
    link = tmp_path / "link" / "mv.db"
    os.symlink(str(real / "mv.db"), str(link))
    (real / "mv.db").touch()
    with store.open(str(link)) as s:
        s.add_volume(VOL, SD, CI)
        assert os.fstat(s._wal_fd).st_ino == \
            os.stat(str(real / "mv.db-wal")).st_ino
    assert os.listdir(str(tmp_path / "link")) == ["mv.db"]


def test_a_failed_sync_fails_every_durable_write_after_it(db, monkeypatch):
    # The kernel reports a writeback error once: a later fdatasync may
    # succeed although the pages it failed to write never reach the disk,
    # and WAL frames written after them are lost with them.  Nothing
    # durable is made after a failed sync; writes without fsync go on.
    import errno
    real = os.fdatasync
    calls = []

    def fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(errors.StoreError, match="could not be synced"):
        db.add_volume(VOL, SD, CI)
    with pytest.raises(errors.StoreError, match="restart the agent"):
        db.add_volume(VOL2, SD, CI)
    assert len(calls) == 1
    # Refused before its commit.
    assert [r["vol_id"] for r in db.volumes()] == [VOL]
    db.update_volume(VOL, state="attached", durable=False)
    assert db.get_volume(VOL)["state"] == "attached"


def test_a_write_committed_during_a_sync_waits_for_the_next(db,
                                                            monkeypatch):
    # Group sync serves only the commits made before a sync started.
    from .agentutil import wait_for
    real = os.fdatasync
    sizes = []
    in_first = threading.Event()
    go_on = threading.Event()

    def fdatasync(fd):
        sizes.append(os.fstat(fd).st_size)
        if len(sizes) == 1:
            in_first.set()
            assert go_on.wait(30)
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    out = []
    first = threading.Thread(
        target=lambda: out.append(("first", db.add_volume(VOL, SD, CI))))
    second = threading.Thread(
        target=lambda: out.append(("second", db.add_volume(VOL2, SD, CI))))
    first.start()
    try:
        wait_for(in_first.is_set)
        second.start()
        wait_for(lambda: db._commits >= 2)
        second.join(0.5)
        assert out == []
    finally:
        go_on.set()
        first.join(30)
        second.join(30)
    assert sorted(out) == [("first", True), ("second", True)]
    # A second sync, of a WAL holding the second write's frames.
    assert len(sizes) == 2 and sizes[1] > sizes[0]


def test_a_read_only_store_opens_and_closes(tmp_path):
    path = str(tmp_path / "mv.db")
    with store.open(path) as s:
        s.add_volume(VOL, SD, CI)
    with store.open_read_only(path) as s:
        assert [r["vol_id"] for r in s.volumes()] == [VOL]


def test_writes_commit_while_a_durable_write_syncs(db, monkeypatch):
    # The fsync of a durable write is made after its commit, outside the
    # write lock: another write (without fsync), and a read on the
    # writer's connection, do not wait for it.
    with _held_in_its_sync(db, monkeypatch, VOL) as outcome:
        seen = _statements(db)
        db.update_volume(VOL, state="attached", durable=False)
        assert db.get_volume(VOL)["state"] == "attached"
        # On the writer's connection, not queued behind the sync.
        assert [s.split()[0] for s in seen] == ["UPDATE", "SELECT"]
        assert outcome == []
    assert outcome == [True]


@contextlib.contextmanager
def _held_in_its_sync(db, monkeypatch, vol_id):
    """A durable ``add_volume(vol_id)`` in another thread, held in its
    fdatasync (after its commit) for the body of the ``with``; yields the
    list its outcome goes to (``[True]`` once it finished)."""
    from .agentutil import wait_for
    syncing = threading.Event()
    go_on = threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd):
        syncing.set()
        assert go_on.wait(30)
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    outcome = []
    writer = threading.Thread(
        target=lambda: outcome.append(db.add_volume(vol_id, SD, CI)))
    writer.start()
    try:
        wait_for(syncing.is_set)
        yield outcome
    finally:
        go_on.set()
        writer.join(30)
        monkeypatch.setattr(os, "fdatasync", real)


def test_every_write_is_synced_without_wal(tmp_path, monkeypatch):
    # synchronous=NORMAL may corrupt a rollback-journal database on a
    # power loss: a journal SQLite could not put in WAL mode (_connect
    # warns) syncs every commit (FULL), and no write syncs the WAL.
    real = store._connect

    def connect(path, busy_timeout):
        conn = real(path, busy_timeout)
        conn.execute("PRAGMA journal_mode = DELETE")
        return conn

    monkeypatch.setattr(store, "_connect", connect)
    syncs = _syncs(monkeypatch)
    with store.open(str(tmp_path / "mv.db")) as db:
        assert db._wal is False
        seen = _statements(db)
        db.add_volume(VOL, SD, CI)
        db.update_volume(VOL, state="attached", durable=False)
        db.remove_volume(VOL, durable=False)
        assert not [s for s in seen if s.startswith("PRAGMA")]
        assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert db.volumes() == []
    assert syncs == []


def test_a_write_keeps_the_run_slot_unless_it_must_wait(db, monkeypatch):
    # A write finding the write lock free commits holding the caller's
    # run slot (gate): giving it back and taking it again cost more.  A
    # durable write gives it back for its fsync, made after the commit;
    # any write that must wait for the lock (another commit) gives it
    # back for the wait.
    from vdsm_managedvolume import gate
    g = gate.Gate(1)
    db.add_volume(VOL, SD, CI)
    slot_free = []
    syncs = _syncs(monkeypatch)
    real_commit = db._commit

    def commit(batch):
        slot_free.append(not g._slots.locked())
        return real_commit(batch)

    db._commit = commit
    with g.hold():
        db.update_volume(VOL, state="attached", durable=False)
        db.update_volume(VOL, state="detaching")
    assert slot_free == [False, False]
    assert syncs == [False]
    assert db.get_volume(VOL)["state"] == "detaching"

    del slot_free[:]
    done = threading.Event()

    def final_write():
        with g.hold():
            db.remove_volume(VOL, durable=False)
        done.set()

    writer = threading.Thread(target=final_write)
    try:
        with held_elsewhere(db._lock):
            writer.start()
            from .agentutil import wait_for
            wait_for(lambda: db._pending)
            # Waiting for the lock, the writer holds no slot: another
            # runs.
            with g.hold():
                assert not done.is_set()
    finally:
        writer.join(30)
    assert done.is_set() and slot_free == [True]
    assert db.volumes() == []


def test_add_if_new_leaves_a_record_alone_in_one_statement(db):
    seen = _statements(db)
    assert db.add_volume(VOL, SD, CI, exist_ok=True) is True
    db.update_volume(VOL, state="attached")
    assert db.add_volume(VOL, SD, {"other": 1}, exist_ok=True) is False
    assert [s.split()[0] for s in seen
            if not s.startswith("PRAGMA")] == ["INSERT", "UPDATE", "INSERT"]
    rec = db.get_volume(VOL)
    assert (rec["state"], rec["connection_info"]) == ("attached", CI)
    with pytest.raises(errors.StoreError, match="already has a record"):
        db.add_volume(VOL, SD, CI)


def test_a_read_uses_the_free_writer_and_never_waits_for_a_commit(db):
    db.add_volume(VOL, SD, CI)
    seen = _statements(db)
    assert db.get_volume(VOL)["vol_id"] == VOL
    assert [s.split()[0] for s in seen] == ["SELECT"]
    del seen[:]
    with held_elsewhere(db._lock):
        assert db.get_volume(VOL)["vol_id"] == VOL      # the reader's
        assert seen == []


# Secrets in the journal's files

SECRET = "Chap-S3cret-4c8f3bd6"
CEPH_KEY = "AQBa1pVnAAAAABAAwG5jdW5yb3Vuc2VjcmV0MQ=="
SECRET_CI = {"driver_volume_type": "iscsi",
             "data": {"target_lun": 1, "auth_method": "CHAP",
                      "auth_username": "admin", "auth_password": SECRET}}


def _files_holding(path, secret=SECRET):
    """Which of the journal's files hold ``secret``'s bytes."""
    return sorted(suffix or "db" for suffix in ("", "-wal", "-shm")
                  if os.path.exists(path + suffix)
                  and secret.encode() in open(path + suffix, "rb").read())


@pytest.fixture
def scrub_db(tmp_path, monkeypatch):
    """A store whose scrubs run only when the test calls ``_scrub``
    (its timer never fires), with another connection open: SQLite's own
    checkpoint at the last close, which also deletes the WAL, is not
    what cleans the files (vdsm or a tool may have it open)."""
    monkeypatch.setattr(store, "SCRUB_DELAY", 3600.0)
    path = str(tmp_path / "mv.db")
    s = store.open(path)
    other = sqlite3.connect(path)
    other.execute("SELECT count(*) FROM volumes").fetchone()
    yield s
    s.close()
    other.close()


def _secret_everywhere(db, ci=SECRET_CI):
    """A record holding a secret in the database file (checkpointed) and
    in WAL frames of several commits."""
    db.add_volume(VOL, SD, ci)
    db._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    db.update_volume(VOL, state="attached", attachment={"path": "/dev/x"})
    db.update_volume(VOL, state="detaching", durable=False)
    assert _files_holding(db.path) == ["-wal", "db"]


def test_a_deleted_secret_leaves_the_journal_files_by_itself(tmp_path,
                                                              monkeypatch):
    from .agentutil import wait_for
    monkeypatch.setattr(store, "SCRUB_DELAY", 0.05)
    path = str(tmp_path / "mv.db")
    other = sqlite3.connect(path)
    try:
        with store.open(path) as db:
            _secret_everywhere(db)
            db.add_volume(VOL2, SD, CI)
            db.remove_volume(VOL)
            wait_for(lambda: not db._scrub_due)
            assert _files_holding(path) == []
            # What is still recorded is still there.
            assert [r["vol_id"] for r in db.volumes()] == [VOL2]
            rows = other.execute("SELECT vol_id FROM volumes").fetchall()
            assert rows == [(VOL2,)]
    finally:
        other.close()


def test_a_deleted_secret_is_zeroed_where_sqlite_does_not_by_default(
        tmp_path, monkeypatch):
    # This machine's SQLite (Debian's) zeroes deleted content by default
    # (SQLITE_SECURE_DELETE); other builds do not: the checkpoint would
    # copy the page with the deleted record's bytes into the database
    # file.  The store turns it on whatever the build (review-safety13b
    # M1).
    real = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(store, "SCRUB_DELAY", 3600.0)
    path = str(tmp_path / "mv.db")
    with store.open(path) as db:
        _secret_everywhere(db)
        db.add_volume(VOL2, SD, CI)
        db.remove_volume(VOL)
        db._scrub()
        assert _files_holding(path) == []
        assert db._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_the_delete_itself_does_not_scrub_and_one_scrub_serves_many(
        scrub_db):
    db = scrub_db
    _secret_everywhere(db)
    ids = [VOL2, "3d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"]
    for vol_id in ids:
        db.add_volume(vol_id, SD, SECRET_CI)
    seen = _statements(db)
    db.remove_volume(VOL)
    assert db._scrub_due and db._scrub_wanted
    for vol_id in ids:
        db.remove_volume(vol_id, durable=False)
    assert not [s for s in seen if "wal_checkpoint" in s]
    # What the scrub's thread does at the end of its delay: one scrub
    # for the deletes of that delay.
    db._scrub()
    assert [s for s in seen if "wal_checkpoint" in s] == [
        "PRAGMA wal_checkpoint(TRUNCATE)"]
    assert not db._scrub_due
    assert _files_holding(db.path) == []
    assert os.path.getsize(db.path + "-wal") == 0


def test_a_secret_carried_as_a_key_value_pair_is_scrubbed(scrub_db):
    # mask.py masks a pair's value (["auth_password", "..."]): such a
    # record held a secret too.
    db = scrub_db
    ci = {"driver_volume_type": "iscsi",
          "data": {"target_lun": 1,
                   "options": [["auth_password", SECRET]]}}
    _secret_everywhere(db, ci)
    db.remove_volume(VOL)
    assert db._scrub_due
    db._scrub()
    assert _files_holding(db.path) == []


def test_only_a_write_dropping_a_secret_schedules_a_scrub(scrub_db):
    db = scrub_db
    db.add_volume(VOL, SD, CI)
    db.remove_volume(VOL)                   # no secret
    db.add_volume(VOL, SD, SECRET_CI)
    db.update_volume(VOL, state="attached", attachment={"path": "/dev/x"},
                     path="/dev/x")         # the secret stays recorded
    db.update_volume(VOL, connection_info=SECRET_CI)     # the same value
    assert not db._scrub_due and not db._scrub_wanted
    # An attachment holding a secret (RBD's conf, a Ceph key), replaced.
    db.update_volume(VOL, attachment={
        "conf": "[client.admin]\n\tkey = {}\n".format(CEPH_KEY)})
    db.update_volume(VOL, attachment={"path": "/dev/x"})
    assert db._scrub_due
    db._scrub()
    assert _files_holding(db.path, CEPH_KEY) == []
    # The connection_info holding one, replaced.
    db.update_volume(VOL, connection_info=CI)
    assert db._scrub_due
    db._scrub()
    assert _files_holding(db.path) == []


def test_a_delete_of_a_record_without_a_secret_decodes_nothing(
        scrub_db, monkeypatch):
    # Its JSON is plainly clean as written: the delete's trigger does
    # not decode connection_info and attachment to look for secrets.
    db = scrub_db
    db.add_volume(VOL, SD, {"driver_volume_type": "local",
                            "data": {"device_path": "/dev/loop3"}})
    db.update_volume(VOL, state="attached",
                     attachment={"path": "/dev/loop3", "type": "local"})
    decoded = []
    real = store._loads
    monkeypatch.setattr(store, "_loads",
                        lambda text: decoded.append(text) or real(text))
    db.remove_volume(VOL, durable=False)
    assert decoded == []
    assert not db._scrub_due


@pytest.mark.parametrize("text", [
    # A marker behind a JSON escape: decoded, then found.
    '{"pass\\u0077ord": "x"}',
    '{"data": {"options": [["auth_p\\u0061ssword", "x"]]}}',
    # Secrets mask sees in clean-looking ASCII.
    '{"k": "admin:pw@10.0.0.1"}',
    '{"conf": "key = ' + CEPH_KEY + '"}',
    # Nested deeper than mask looks: it hides it whole.
    "[" * (mask.MAX_DEPTH + 2) + "]" * (mask.MAX_DEPTH + 2),
])
def test_a_dropped_value_holding_a_secret_is_found_however_written(text):
    assert store._holds_secret(text)


def test_an_attachs_first_attachment_calls_nothing_from_sqlite(
        tmp_path, monkeypatch):
    calls = []
    real = store.Store._note_dropped

    def note(self, *args):
        calls.append(args)
        return real(self, *args)

    monkeypatch.setattr(store.Store, "_note_dropped", note)
    with store.open(str(tmp_path / "mv.db")) as db:
        db.add_volume(VOL, SD, CI)
        db.update_volume(VOL, attachment={"path": "/dev/x"}, path="/dev/x")
        db.update_volume(VOL, state="attached", durable=False)
        assert calls == []
        # A value dropped is still looked at.
        db.update_volume(VOL, attachment={"path": "/dev/y"})
        assert calls == [(None, '{"path": "/dev/x"}')]
        db.remove_volume(VOL)
        assert calls[1:] == [(store._dumps(CI), '{"path": "/dev/y"}')]


def test_close_scrubs_a_secret_deleted_just_before(scrub_db):
    db = scrub_db
    _secret_everywhere(db)
    db.remove_volume(VOL)
    assert db._scrub_due
    db.close()
    assert not db._scrub_due and not db._scrubber.is_alive()
    # The other connection keeps the WAL: emptied, not deleted.
    assert os.path.getsize(db.path + "-wal") == 0
    assert _files_holding(db.path) == []


KILLED_AFTER_DELETE = """
import json, os, sys
from vdsm_managedvolume import store
store.SCRUB_DELAY = 3600.0
db = store.open(sys.argv[1])
db.add_volume(sys.argv[2], "sd", json.loads(sys.argv[3]))
db._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
db.update_volume(sys.argv[2], state="attached", attachment={"path": "/x"})
db.remove_volume(sys.argv[2])
os._exit(0)     # killed before its scrub: no close
"""


def test_open_scrubs_what_a_process_killed_before_its_scrub_left(tmp_path):
    path = str(tmp_path / "mv.db")
    store.open(path).close()
    subprocess.run([sys.executable, "-c", KILLED_AFTER_DELETE, path, VOL,
                    json.dumps(SECRET_CI)], check=True, timeout=60)
    assert _files_holding(path) == ["-wal", "db"]
    with store.open(path) as db:
        assert _files_holding(path) == []
        assert not db._scrub_due and db.volumes() == []


def test_a_scrub_a_reader_holds_off_is_made_again_later(scrub_db):
    # A TRUNCATE checkpoint cannot restart the WAL under a reader: the
    # scrub waits SCRUB_BUSY_MS for it, not the busy timeout (holding the
    # write lock), and tries again later.
    db = scrub_db
    _secret_everywhere(db)
    reader = sqlite3.connect(db.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM volumes").fetchone()
        db.remove_volume(VOL)
        db._scrub()
        assert db._scrub_due and db._scrub_wanted
        # The next attempt after a longer delay.
        assert db._scrub_delay == min(2 * store.SCRUB_DELAY,
                                      store.SCRUB_DELAY_MAX)
        # Writes go on meanwhile.
        db.add_volume(VOL2, SD, CI)
        reader.execute("COMMIT")
    finally:
        reader.close()
    db._scrub()
    assert not db._scrub_due and db._scrub_delay == store.SCRUB_DELAY
    assert _files_holding(db.path) == []
    assert db._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000


def test_a_scrub_during_a_sync_keeps_the_durable_writes_wal(scrub_db,
                                                             monkeypatch):
    # The scrub truncates the WAL while a durable write's fdatasync runs
    # outside the write lock: neither waits for the other, and the
    # descriptor _sync holds still names the WAL SQLite writes next.
    db = scrub_db
    _secret_everywhere(db)
    db.remove_volume(VOL, durable=False)
    with _held_in_its_sync(db, monkeypatch, VOL2) as outcome:
        db._scrub()
        assert not db._scrub_due
        assert os.path.getsize(db.path + "-wal") == 0
        assert outcome == []
    assert outcome == [True]
    db.update_volume(VOL2, state="attached")
    wal = os.stat(db.path + "-wal")
    assert os.fstat(db._wal_fd).st_ino == wal.st_ino and wal.st_size > 0
    assert _files_holding(db.path) == []
    with store.open_read_only(db.path) as ro:
        assert [(r["vol_id"], r["state"]) for r in ro.volumes()] == [
            (VOL2, "attached")]


def test_no_scrub_after_a_failed_sync(scrub_db):
    # Its checkpoint would copy pages that may never have reached the
    # disk and truncate the WAL that shows the loss (review-safety13b
    # L1).
    import errno
    db = scrub_db
    _secret_everywhere(db)
    db.remove_volume(VOL, durable=False)
    db._sync_error = OSError(errno.EIO, "Input/output error")
    seen = _statements(db)
    db._scrub()
    assert not [s for s in seen if "wal_checkpoint" in s]
    assert db._scrub_due


class _FailingCheckpoint:
    """The writer's connection, whose checkpoints fail as a failed sync
    makes them fail."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, *args):
        if "wal_checkpoint" in sql:
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_a_scrub_whose_sync_fails_fails_the_durable_writes_after_it(
        scrub_db):
    # SQLite consumed the kernel's one report of the error: as after a
    # failed _sync, nothing durable is written after it.
    db = scrub_db
    _secret_everywhere(db)
    db.remove_volume(VOL, durable=False)
    real = db._conn
    db._conn = _FailingCheckpoint(real)
    try:
        db._scrub()
    finally:
        db._conn = real
    assert db._scrub_due
    with pytest.raises(errors.StoreError, match="restart the agent"):
        db.add_volume(VOL2, SD, CI)
    # Another error (not I/O) is retried later, nothing refused.
    assert store._io_error(sqlite3.OperationalError("disk I/O error"))
    assert not store._io_error(sqlite3.OperationalError("database is "
                                                        "locked"))


def test_timestamps_are_utc_in_isoformat_with_microseconds(monkeypatch):
    import datetime
    utc = datetime.timezone.utc

    def at(ns):
        monkeypatch.setattr(store.time, "time_ns", lambda: ns)
        return store._now()

    base = 1764680000 * 10**9
    # The second is formatted once and reused; the next one is new.
    for ns in (base + 999999999, base + 10**9, base + 10**9 + 1500,
               base - 1000):
        expected = datetime.datetime.fromtimestamp(
            ns // 1000 / 10**6, utc).replace(tzinfo=None)
        assert at(ns) == expected.isoformat(" ", "microseconds")
    monkeypatch.undo()
    before = datetime.datetime.now(utc).replace(tzinfo=None)
    now = datetime.datetime.fromisoformat(store._now())
    after = datetime.datetime.now(utc).replace(tzinfo=None)
    assert before <= now <= after
