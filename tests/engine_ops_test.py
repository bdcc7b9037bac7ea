"""What the operations (``vdsm_managedvolume/engine/ops.py``) do to the
backend and to cinderlib's records, run as the engine runs them (the
session's warm service), on real cinderlib and a real SQLite database.

The backend is the embedded FileDriver with a recorder: each call a
per-volume-export driver (LVM's iSCSI target, nvmet) acts on is appended
to ``calls.jsonl`` in its volume directory, with terminate_connection's
answer ("still shared").
"""

import json
import os
import sqlite3
import time

import pytest

from .agentutil import wait_for
from .engine_fixtures import files_in
from .engine_fixtures import new_id


def __getattr__(name):
    """Test drivers, built on first use (inside the shim's processes, which
    import ``tests.engine_ops_test.RecordingDriver`` by name); collecting
    this module does not import cinder into pytest."""
    if name not in ("RecordingDriver", "FailingDriver", "IscsiDriver"):
        raise AttributeError(name)
    from cinder import exception
    from vdsm_managedvolume.engine.filedriver import FileDriver

    class RecordingDriver(FileDriver):
        def terminate_connection(self, volume, connector, **kwargs):
            self._maybe_hold("terminate_connection")
            shared = super().terminate_connection(volume, connector,
                                                  **kwargs)
            self._record("terminate_connection", connector["host"], shared)
            return shared

        def remove_export(self, context, volume):
            self._record("remove_export", volume.id)
            return super().remove_export(context, volume)

        def _update_volume_stats(self):
            # stats.json in its volume directory (Python's JSON, which
            # carries Infinity and NaN) replaces the FileDriver's stats.
            super()._update_volume_stats()
            path = os.path.join(self._dir, "stats.json")
            if os.path.exists(path):
                with open(path) as f:
                    self._stats = json.load(f)

        def _maybe_hold(self, method):
            # While hold-<method> exists: say so (held-<method>) and wait
            # for "release".
            if not os.path.exists(os.path.join(self._dir, "hold-" + method)):
                return
            open(os.path.join(self._dir, "held-" + method), "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(self._dir, "release")):
                if time.monotonic() > deadline:
                    raise RuntimeError("never released")
                time.sleep(0.05)

        def _record(self, *call):
            with open(os.path.join(self._dir, "calls.jsonl"), "a") as f:
                f.write(json.dumps(call) + "\n")

    class FailingDriver(RecordingDriver):
        # Each create fails after doing its work (a partial backend object
        # to clean up) while fail-<method> exists in its volume directory;
        # delete_snapshot fails before doing anything.
        def create_volume(self, volume):
            super().create_volume(volume)
            self._maybe_fail("create_volume")

        def create_cloned_volume(self, volume, src_vref):
            super().create_cloned_volume(volume, src_vref)
            self._maybe_fail("create_cloned_volume")

        def create_snapshot(self, snapshot):
            super().create_snapshot(snapshot)
            self._maybe_fail("create_snapshot")

        def create_volume_from_snapshot(self, volume, snapshot):
            super().create_volume_from_snapshot(volume, snapshot)
            self._maybe_fail("create_volume_from_snapshot")

        def delete_snapshot(self, snapshot):
            self._maybe_fail("delete_snapshot")
            super().delete_snapshot(snapshot)

        def initialize_connection(self, volume, connector, **kwargs):
            self._maybe_fail("initialize_connection")
            return super().initialize_connection(volume, connector,
                                                 **kwargs)

        def _maybe_fail(self, method):
            if os.path.exists(os.path.join(self._dir, "fail-" + method)):
                raise exception.VolumeBackendAPIException(
                    data="{} failed (simulated)".format(method))

    class IscsiDriver(FailingDriver):
        # The FileDriver's volumes behind an LVM-like iSCSI export: one
        # target per volume, granted to each connector's initiator.
        def initialize_connection(self, volume, connector, **kwargs):
            super().initialize_connection(volume, connector, **kwargs)
            return {"driver_volume_type": "iscsi",
                    "data": {"target_discovered": False,
                             "target_portal": "192.0.2.1:3260",
                             "target_iqn": "iqn.2026-12.test:" + volume.id,
                             "target_lun": 0}}

    return locals()[name]


class Backend:
    """One recording backend and its SQLite database, driven through the
    shim."""

    def __init__(self, shim, tmp_path):
        self.shim = shim
        self.dir = str(tmp_path / "vols")
        self.db = str(tmp_path / "cinderlib.db")
        self.driver = {"volume_driver":
                       "tests.engine_ops_test.FailingDriver",
                       "volume_backend_name": "recording",
                       "file_volume_dir": self.dir}
        os.makedirs(self.dir)

    def failing(self, *methods):
        """Make the driver's ``methods`` fail (none: none fails)."""
        for name in files_in(self.dir):
            if name.startswith("fail-"):
                os.unlink(os.path.join(self.dir, name))
        for method in methods:
            open(os.path.join(self.dir, "fail-" + method), "w").close()

    def run(self, *args, code=0, cid="c", options=()):
        r = self.shim.run(*args, driver=self.driver,
                          db_url="sqlite:///" + self.db, cid=cid,
                          options=options)
        assert r.code == code, r.describe()
        return r

    def popen(self, *args, cid):
        return self.shim.popen(*args, driver=self.driver,
                               db_url="sqlite:///" + self.db, cid=cid)

    def hold(self, method):
        """Hold the driver's next ``method`` calls until ``release``;
        return the file that says one is held."""
        open(os.path.join(self.dir, "hold-" + method), "w").close()
        return os.path.join(self.dir, "held-" + method)

    def release(self):
        open(os.path.join(self.dir, "release"), "w").close()

    def reporting(self, stats):
        """Make the driver report ``stats`` (floats may be inf and nan)."""
        with open(os.path.join(self.dir, "stats.json"), "w") as f:
            json.dump(stats, f)

    def calls(self):
        """The calls recorded since the last time they were read."""
        path = os.path.join(self.dir, "calls.jsonl")
        try:
            with open(path) as f:
                calls = [json.loads(line) for line in f]
        except FileNotFoundError:
            return []
        os.unlink(path)
        return calls

    def sql(self, query, *params):
        with sqlite3.connect(self.db) as db:
            return db.execute(query, params).fetchall()

    def volume_status(self, vol):
        return self.sql("SELECT status FROM volumes WHERE id = ? AND "
                        "NOT deleted", vol)[0][0]

    def snapshots(self, vol):
        return self.sql("SELECT id, status FROM snapshots WHERE "
                        "volume_id = ? AND NOT deleted", vol)

    def volume_ids(self):
        return sorted(i for i, in self.sql(
            "SELECT id FROM volumes WHERE NOT deleted"))

    def connection_ids(self, vol):
        """The ids of ``vol``'s connections, oldest first."""
        return [i for i, in self.sql(
            "SELECT id FROM volume_attachment WHERE volume_id = ? AND NOT "
            "deleted ORDER BY created_at", vol)]

    def copy_connection(self, conn_id):
        """A second record of connection ``conn_id`` (what an earlier
        version could make); its id."""
        columns = [c[1] for c in self.sql(
            "PRAGMA table_info(volume_attachment)") if c[1] != "id"]
        new = new_id()
        self.sql("INSERT INTO volume_attachment (id, {0}) SELECT ?, {0} "
                 "FROM volume_attachment WHERE id = ?".format(
                     ", ".join(columns)), new, conn_id)
        return new

    def connected_hosts(self, vol):
        rows = self.sql("SELECT connection_info FROM volume_attachment "
                        "WHERE volume_id = ? AND NOT deleted", vol)
        return sorted(json.loads(info)["connector"]["host"]
                      for info, in rows)


@pytest.fixture
def backend(engine_service, engine_shim, tmp_path):
    return Backend(engine_shim, tmp_path)


@pytest.mark.parametrize("ended,kept", [("src", "dst"), ("dst", "src")],
                         ids=["migration-completed", "migration-failed"])
def test_ending_one_hosts_connection_keeps_the_export_the_other_uses(
        backend, ended, kept):
    vol = new_id()
    backend.run("create_volume", vol, 1)
    for host in ("src", "dst"):
        backend.run("connect_volume", vol, json.dumps({"host": host}))
    assert backend.calls() == []

    # After a completed migration the source's connection ends, after a
    # failed one the destination's: the other host still runs the VM on
    # the volume's export (cinderlib's disconnect removed it).
    backend.run("disconnect_volume", vol, ended)
    assert backend.calls() == [["terminate_connection", ended, True]]
    assert backend.connected_hosts(vol) == [kept]
    assert backend.volume_status(vol) == "in-use"
    info = backend.run("get_connection_info", vol).json("c")
    assert info["connector"] == {"host": kept}

    # The last connection takes the export with it, and the records say
    # what cinderlib's own disconnect would have left.
    backend.run("disconnect_volume", vol, kept)
    assert backend.calls() == [["terminate_connection", kept, False],
                               ["remove_export", vol]]
    assert backend.connected_hosts(vol) == []
    assert backend.volume_status(vol) == "available"
    # Before the delete, as cinder's volume manager (a connect killed
    # after create_export left an export no connection records).
    backend.run("delete_volume", vol)
    assert backend.calls() == [["remove_export", vol]]


def test_a_failed_connect_keeps_the_export_another_host_uses(backend):
    # A migration's destination fails to connect: the source still runs
    # the VM on the volume's export (cinderlib's Volume.connect removed it
    # after any failure).
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, json.dumps({"host": "src"}))
    backend.failing("initialize_connection")
    r = backend.run("connect_volume", vol, json.dumps({"host": "dst"}),
                    code=1)
    assert r.error().endswith("initialize_connection failed (simulated)")
    # Not terminated: a connector the driver never completed, beside
    # another host's connection.
    assert backend.calls() == []
    assert backend.connected_hosts(vol) == ["src"]
    assert backend.volume_status(vol) == "in-use"

    # With no other connection, the failed connect's export goes.
    backend.failing()
    backend.run("disconnect_volume", vol, "src")
    assert backend.calls() == [["terminate_connection", "src", False],
                               ["remove_export", vol]]
    backend.failing("initialize_connection")
    backend.run("connect_volume", vol, json.dumps({"host": "dst"}), code=1)
    assert backend.calls() == [["terminate_connection", "dst", False],
                               ["remove_export", vol]]
    assert backend.connected_hosts(vol) == []
    assert backend.volume_status(vol) == "available"
    backend.failing()
    backend.run("delete_volume", vol)


def test_deleting_a_volume_ends_its_connections_and_then_its_export(
        backend):
    vol = new_id()
    backend.run("create_volume", vol, 1)
    for host in ("a", "b"):
        backend.run("connect_volume", vol, json.dumps({"host": host}))
    backend.run("delete_volume", vol)
    assert backend.calls() == [["terminate_connection", "a", True],
                               ["terminate_connection", "b", False],
                               ["remove_export", vol]]
    assert backend.sql("SELECT count(*) FROM volumes WHERE id = ? AND "
                       "NOT deleted", vol) == [(0,)]


def test_a_failed_snapshot_is_discarded_and_its_volume_can_be_deleted(
        backend):
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, json.dumps({"host": "h"}))
    backend.failing("create_snapshot")
    r = backend.run("create_snapshot", vol, code=1)
    assert r.error().endswith("create_snapshot failed (simulated)")
    # cinderlib saved it in "error"; the engine never learns its id.
    assert backend.snapshots(vol) == []
    assert [n for n in files_in(backend.dir) if n.startswith("snapshot-")] \
        == []
    backend.failing()
    backend.run("delete_volume", vol)
    assert backend.volume_ids() == []


def test_a_snapshot_left_in_error_is_deleted_with_its_volume(
        engine_service, backend):
    vol = new_id()
    backend.run("create_volume", vol, 1)
    # The failed snapshot cannot be deleted either: it stays in "error",
    # logged with its id.
    backend.failing("create_snapshot", "delete_snapshot")
    backend.run("create_snapshot", vol, code=1)
    [(snap, status)] = backend.snapshots(vol)
    assert status == "error"
    assert "Could not delete snapshot {} that the failed create left in " \
        "error".format(snap) in engine_service.log()
    backend.failing()
    backend.run("delete_volume", vol)
    assert backend.calls() == [["remove_export", vol]]
    assert backend.snapshots(vol) == []
    assert backend.volume_ids() == []
    assert files_in(backend.dir) == []


def test_a_volume_with_snapshots_is_refused_before_its_connections_end(
        backend):
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, json.dumps({"host": "h"}))
    snap = backend.run("create_snapshot", vol).payload("c")
    r = backend.run("delete_volume", vol, code=1)
    assert r.error() == "delete_volume failed: Volume {} has snapshots " \
                        "{}; remove them first".format(vol, snap)
    assert backend.calls() == []
    assert backend.connected_hosts(vol) == ["h"]
    backend.run("remove_snapshot", snap, vol)
    backend.run("delete_volume", vol)
    assert backend.calls() == [["terminate_connection", "h", False],
                               ["remove_export", vol]]


def test_failed_creates_leave_no_volume_behind(backend):
    vol = new_id()
    backend.failing("create_volume")
    backend.run("create_volume", vol, 1, code=1)
    assert backend.volume_ids() == []
    # The volume's file the driver made is gone with it: a retry works.
    assert files_in(backend.dir) == ["fail-create_volume"]
    backend.failing()
    backend.run("create_volume", vol, 1)
    snap = backend.run("create_snapshot", vol).payload("c")

    clone = new_id()
    backend.failing("create_cloned_volume", "create_volume_from_snapshot")
    r = backend.run("clone_volume", vol, clone, code=1)
    assert r.error().endswith("create_cloned_volume failed (simulated)")
    r = backend.run("create_volume_from_snapshot", vol, snap, code=1)
    assert r.error().endswith(
        "create_volume_from_snapshot failed (simulated)")
    assert backend.volume_ids() == [vol]
    assert sorted(n for n in files_in(backend.dir)
                  if n.startswith("volume-")) == ["volume-" + vol]

    # An existing volume is never the target of a clone.
    backend.failing()
    r = backend.run("clone_volume", vol, vol, code=1)
    assert r.error() == "clone_volume failed: Volume {} already " \
                        "exists".format(vol)
    backend.run("clone_volume", vol, clone)
    assert backend.volume_ids() == sorted([vol, clone])


def test_a_connect_waits_until_a_disconnect_of_the_volume_is_done(
        engine_service, backend):
    # ProcessDownVm's disconnect_volume (no VM lock) and a new RunVm's
    # connect_volume of the same host: the connect used to reuse the
    # connection the disconnect was ending, and the host got a LUN whose
    # mapping was gone.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, json.dumps({"host": "h"}))
    held = backend.hold("terminate_connection")
    disconnect = backend.popen("disconnect_volume", vol, "h", cid="c-dis")
    connect = None
    try:
        wait_for(lambda: os.path.exists(held))
        connect = backend.popen("connect_volume", vol,
                                json.dumps({"host": "h"}), cid="c-con")
        wait_for(lambda: "[flow=c-con] Waiting for volume {}: "
                 "disconnect_volume (flow c-dis) (pid ".format(vol)
                 in engine_service.log())
        # One that cannot wait that long says who has the volume.
        r = backend.run("save_device", vol, "{}", code=1,
                        options=["--lock-timeout", "0.5"])
        assert r.error().startswith(
            "save_device failed: Volume {} is busy: disconnect_volume "
            "(flow c-dis) (pid ".format(vol))
        assert r.error().endswith("holds it; gave up after 0.5 seconds")
    finally:
        backend.release()
        out = disconnect.communicate(timeout=120)
        assert disconnect.returncode == 0, out
        if connect is not None:
            out = connect.communicate(timeout=120)
            assert connect.returncode == 0, out

    # The connect ran after the disconnect: a new connection, not the
    # ended one.
    assert out[0].startswith(b"c-con:{")
    assert backend.connected_hosts(vol) == ["h"]
    assert backend.calls() == [["terminate_connection", "h", False],
                               ["remove_export", vol]]
    backend.run("save_device", vol, json.dumps({"path": "/dev/x"}))
    assert "Got volume {}".format(vol) in engine_service.log()


def test_a_connection_is_reused_only_by_the_host_it_was_made_for(
        engine_service, backend):
    # Two hosts cloned from one image, both "localhost.localdomain" (or a
    # host reinstalled): the second must not get the first's connection,
    # made for the first's initiator (upstream matched the name only).
    vol = new_id()
    backend.run("create_volume", vol, 1)
    first = {"host": "localhost.localdomain", "initiator": "iqn.h1",
             "uuid": "u1"}
    second = dict(first, initiator="iqn.h2", uuid="u2")
    backend.run("connect_volume", vol, json.dumps(first))
    backend.run("save_device", vol, json.dumps({"path": "/dev/first"}))
    backend.run("connect_volume", vol, json.dumps(second))
    assert backend.connected_hosts(vol) == ["localhost.localdomain"] * 2
    assert "Volume {} has a connection to another host named " \
        "localhost.localdomain (this one's initiator 'iqn.h2' (not " \
        "'iqn.h1')): not reusing it".format(vol) in engine_service.log()

    # The first host again, now with an NVMe host NQN (os-brick writes
    # one at its first NVMe call) and its ip changed: its own connection,
    # whose old device is forgotten.
    backend.run("connect_volume", vol,
                json.dumps(dict(first, nqn="nqn.h1", ip="10.0.0.9")))
    assert backend.connected_hosts(vol) == ["localhost.localdomain"] * 2
    devices = sorted(json.loads(info).get("device") is not None
                     for info, in backend.sql(
                         "SELECT connection_info FROM volume_attachment "
                         "WHERE volume_id = ? AND NOT deleted", vol))
    assert devices == [False, False]
    backend.run("delete_volume", vol)


def test_save_device_saves_on_the_connection_connected_last(backend):
    """ovirt-engine names no host in save_device; it runs it right after
    its connect_volume and that host's attach.  Of several connections
    without a device (one leaked by an attach that failed on another
    host, one whose device connect_volume forgot as it reused it) it is
    the one connected last: a reused connection kept its first time, so
    the device went on the leaked connection, and the connection of the
    host running the VM had none (a delete then found no device to
    refuse on when that host could not be asked)."""
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, json.dumps({"host": "d"}))
    backend.run("save_device", vol, json.dumps({"path": "/dev/d1"}))
    # c's attach failed after its connect (saveDevices: no disconnect).
    backend.run("connect_volume", vol, json.dumps({"host": "c"}))
    # The VM starts on d again.
    backend.run("connect_volume", vol, json.dumps({"host": "d"}))
    backend.run("save_device", vol, json.dumps({"path": "/dev/d2"}))
    devices = {h: backend.run("get_connection_info", vol, h).json(
        "c")["device"] for h in ("c", "d")}
    assert devices == {"c": None, "d": {"path": "/dev/d2"}}
    # So the delete is refused while d cannot be asked.
    r = backend.run("delete_volume", vol, code=1)
    assert "was attached on host d, which cannot be asked" in r.error()
    backend.run("disconnect_volume", vol, "d")
    backend.run("delete_volume", vol)


def test_a_renamed_host_gets_its_iscsi_connection_back(
        engine_service, backend):
    """os-brick's ``host`` is the hostname (hostnamectl, a DHCP name) and
    its ``uuid`` the root filesystem's (a restore, an oVirt Node
    upgrade): an iSCSI connection is the export granted to an initiator,
    and the host with that initiator gets it back whatever its name and
    root filesystem are now; it got a second connection (and export
    grant) for the same initiator.  A clone of the same name with
    another initiator still gets its own."""
    backend.driver["volume_driver"] = "tests.engine_ops_test.IscsiDriver"
    vol = new_id()
    backend.run("create_volume", vol, 1)
    before = {"host": "h1", "initiator": "iqn.h1", "uuid": "u1"}
    conn = backend.run("connect_volume", vol, json.dumps(before)).json("c")
    assert conn["driver_volume_type"] == "iscsi"
    backend.run("save_device", vol, json.dumps({"path": "/dev/dm-3"}))

    after = dict(before, host="h1-renamed", uuid="u2")
    assert backend.run("connect_volume", vol,
                       json.dumps(after)).json("c") == conn
    assert backend.connected_hosts(vol) == ["h1"]
    assert "Volume {} is connected to host h1, now named h1-renamed".format(
        vol) in engine_service.log()
    info = backend.run("get_connection_info", vol).json("c")
    assert (info["connector"], info["device"]) == (before, None)

    backend.run("connect_volume", vol,
                json.dumps(dict(after, initiator="iqn.h2")))
    assert backend.connected_hosts(vol) == ["h1", "h1-renamed"]
    backend.run("delete_volume", vol)
    assert backend.volume_ids() == []


def test_a_host_name_two_connections_have_ends_neither_of_them(
        engine_service, backend):
    """Cloned hosts both named "localhost.localdomain" have a connection
    each (connect_volume keeps one per identity).  The admin's
    ``disconnect_volume VOL NAME`` (what the WARNING of a kept connection
    advised) ended both, the live one of the twin too: a name several
    connections have is refused, and a connector object names one."""
    vol = new_id()
    backend.run("create_volume", vol, 1)
    name = "localhost.localdomain"
    first = {"host": name, "initiator": "iqn.h1"}
    second = {"host": name, "initiator": "iqn.h2"}
    backend.run("connect_volume", vol, json.dumps(first))
    backend.run("connect_volume", vol, json.dumps(second))
    backend.calls()
    ids = backend.connection_ids(vol)

    for command in ("disconnect_volume", "get_connection_info"):
        r = backend.run(command, vol, name, code=1)
        assert r.error() == (
            "{} failed: Volume {} has 2 connections to host {}: {}, {}; "
            "nothing was done. Name one by its connector JSON (one of "
            "these objects)".format(
                command, vol, name,
                json.dumps(dict(first, connection_id=ids[0])),
                json.dumps(dict(second, connection_id=ids[1]))))
    # A connector object with the host name only is no better.
    backend.run("save_device", vol, json.dumps({"path": "/dev/x"}),
                json.dumps({"host": name}), code=1)
    assert backend.connected_hosts(vol) == [name, name]
    assert backend.calls() == []

    # The second host's connector, as getCapabilities says it (with
    # settings and an identity the connection lacks: its NQN came
    # since), or just the identity that differs, names its connection.
    backend.run("save_device", vol, json.dumps({"path": "/dev/second"}),
                json.dumps(dict(second, nqn="nqn.h2", multipath=False)))
    info = backend.run("get_connection_info", vol, json.dumps(
        {"host": name, "initiator": "iqn.h2"})).json("c")
    assert (info["connector"], info["device"]) == \
        (second, {"path": "/dev/second"})
    backend.run("disconnect_volume", vol, json.dumps(second))
    assert backend.calls() == [["terminate_connection", name, False]]
    info = backend.run("get_connection_info", vol, name).json("c")
    assert info["connector"] == first
    # Nothing of a third identity is ended.
    backend.run("disconnect_volume", vol,
                json.dumps(dict(first, initiator="iqn.h3")))
    assert backend.connected_hosts(vol) == [name]
    assert "Volume {} has no connection to host {}".format(
        vol, json.dumps({"host": name, "initiator": "iqn.h3"})) in \
        engine_service.log()
    backend.run("disconnect_volume", vol, name)
    assert backend.connected_hosts(vol) == []


def test_two_connections_of_one_identity_are_named_by_their_ids(
        engine_service, backend):
    """An earlier version compared os-brick's ``uuid`` in connect_volume:
    a host whose root filesystem changed got a second connection with
    the same host name and identities.  Nothing named one of them (the
    identity named both, and was refused as ambiguous): once its host
    was gone with a device saved on each, its volume could never be
    deleted.  Each printed object now carries its connection's id, which
    names that one."""
    vol = new_id()
    backend.run("create_volume", vol, 1)
    host = {"host": "h", "initiator": "iqn.h"}
    backend.run("connect_volume", vol, json.dumps(host))
    [first] = backend.connection_ids(vol)
    second = backend.copy_connection(first)
    named = [json.dumps(dict(host, connection_id=i))
             for i in (first, second)]
    for i, name in enumerate(named):
        backend.run("save_device", vol, json.dumps({"path": str(i)}),
                    name)
    backend.calls()

    r = backend.run("delete_volume", vol, code=1)
    for name in named:
        assert "disconnect_volume DRIVER_JSON DB_URL FLOW_ID {} '{}'".format(
            vol, name) in r.error()
    r = backend.run("disconnect_volume", vol, json.dumps(host), code=1)
    assert "{}, {}; nothing was done".format(*named) in r.error()
    assert backend.calls() == []

    # The grant is the initiator's, which the other connection shares:
    # the driver is not asked to end it until the last of them ends.
    backend.run("disconnect_volume", vol, named[1])
    assert backend.connection_ids(vol) == [first]
    assert backend.calls() == []
    info = backend.run("get_connection_info", vol, "h").json("c")
    assert info["device"] == {"path": "0"}
    backend.run("disconnect_volume", vol, named[0])
    assert backend.connection_ids(vol) == []
    assert backend.calls() == [["terminate_connection", "h", False],
                               ["remove_export", vol]]
    backend.run("delete_volume", vol)
    assert backend.volume_ids() == []


def test_a_connection_id_naming_nothing_is_said_so(engine_service,
                                                   backend):
    # An admin's mistyped override (review-engfix6 L2): nothing ended,
    # and the command says so with the connections there are, rather
    # than an INFO line that looks like a done job.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    host = {"host": "h", "initiator": "iqn.h"}
    backend.run("connect_volume", vol, json.dumps(host))
    [first] = backend.connection_ids(vol)
    wrong = json.dumps(dict(host, connection_id="nope"))
    backend.run("disconnect_volume", vol, wrong)
    assert backend.connection_ids(vol) == [first]
    assert 'has no connection {{"host": "h", "initiator": "iqn.h", ' \
        '"connection_id": "nope"}}: nothing was disconnected; its ' \
        'connections: {{"host": "h", "initiator": "iqn.h", ' \
        '"connection_id": "{}"}}'.format(first) in engine_service.log()
    r = backend.run("save_device", vol, json.dumps({"path": "/dev/x"}),
                    wrong, code=1)
    assert '"connection_id": "nope"} not found' in r.error()
    backend.run("disconnect_volume", vol, "h")
    backend.run("delete_volume", vol)


def test_a_warm_child_locks_in_its_requests_locks_directory(
        engine_service, backend, tmp_path):
    # The session's warm service was set up by an earlier request, with
    # that one's locks directory; the engine's cold runs lock in theirs
    # (ENGINE_TMP's, say, where the service's first request came from an
    # admin's shell): every process must lock a volume in the same place.
    from vdsm_managedvolume.engine import volumelock
    backend.run("storage_stats", "false")     # the service is set up
    vol = new_id()
    locks = str(tmp_path / "engine-tmp" / "locks")
    backend.run("create_volume", vol, 1, cid="c-locks",
                options=["--locks-dir", locks])
    assert "[flow=c-locks] Running create_volume" in engine_service.log()
    assert os.path.exists(volumelock.path(locks, vol))
    # delete_volume takes its volume's lock file with it.
    backend.run("delete_volume", vol, options=["--locks-dir", locks])
    assert not os.path.exists(volumelock.path(locks, vol))
    backend.run("delete_volume", vol, options=["--locks-dir", locks])
    assert not os.path.exists(volumelock.path(locks, vol))


def test_connection_info_has_a_null_device_until_one_is_saved(backend):
    # cinderlib leaves "device" out of its dict until save_device, and
    # drops it again when connect_volume forgets a host's old device: the
    # documented shape is {conn, connector, device} whatever the state.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    conn = backend.run("connect_volume", vol,
                       json.dumps({"host": "h"})).json("c")
    info = backend.run("get_connection_info", vol).json("c")
    assert info == {"conn": conn, "connector": {"host": "h"},
                    "device": None}

    device = {"path": "/dev/x", "attachment": {"type": "local"}}
    backend.run("save_device", vol, json.dumps(device))
    assert backend.run("get_connection_info", vol).json("c")["device"] \
        == device

    # The next attach on that host: its old device is forgotten.
    backend.run("connect_volume", vol, json.dumps({"host": "h"}))
    info = backend.run("get_connection_info", vol).json("c")
    assert info == {"conn": conn, "connector": {"host": "h"},
                    "device": None}


def _strict_json(text):
    # What Jackson accepts: no Infinity, -Infinity or NaN.
    def refuse(constant):
        raise AssertionError("{} in {}".format(constant, text))
    return json.loads(text, parse_constant=refuse)


def test_stats_are_finite_and_capacity_per_pool_is_summed(backend):
    inf, nan = float("inf"), float("nan")
    backend.reporting({
        "volume_backend_name": "recording",
        "pools": [
            {"pool_name": "a", "total_capacity_gb": 100,
             "free_capacity_gb": inf, "max_over_subscription_ratio": nan},
            {"pool_name": "b", "total_capacity_gb": "50.5",
             "free_capacity_gb": 20.25},
        ]})
    stats = _strict_json(backend.run("storage_stats", "true").payload("c"))
    # The engine reads only these two (ManagedBlockStorageDomainStats-
    # Refresher): a number, a numeric string, "infinite" or "unknown".
    assert stats["total_capacity_gb"] == 150.5
    assert stats["free_capacity_gb"] == "infinite"
    assert stats["pools"][0]["free_capacity_gb"] == "infinite"
    assert stats["pools"][0]["max_over_subscription_ratio"] == "unknown"
    assert stats["pools"][1]["free_capacity_gb"] == 20.25

    # A pool without a number makes the sum unknown; what the driver
    # reports at the top level is its own answer, kept.
    backend.reporting({
        "volume_backend_name": "recording",
        "total_capacity_gb": -inf,
        "free_capacity_gb": 7,
        "pools": [{"pool_name": "a", "total_capacity_gb": 1,
                   "free_capacity_gb": 1},
                  {"pool_name": "b", "total_capacity_gb": "unknown"}]})
    stats = _strict_json(backend.run("storage_stats", "true").payload("c"))
    assert stats["total_capacity_gb"] == "unknown"
    assert stats["free_capacity_gb"] == 7

    backend.reporting({
        "volume_backend_name": "recording",
        "pools": [{"pool_name": "a", "total_capacity_gb": 10,
                   "free_capacity_gb": 4},
                  {"pool_name": "b", "total_capacity_gb": 6}]})
    stats = _strict_json(backend.run("storage_stats", "true").payload("c"))
    assert (stats["total_capacity_gb"], stats["free_capacity_gb"]) == \
        (16, "unknown")


def test_a_snapshot_is_found_when_the_engine_names_the_disk_not_its_volume(
        backend):
    # ovirt-engine snapshots a disk's active volume (disk.getImageId())
    # but previews and removes snapshots under the disk id
    # (TryBackToAllSnapshotsOfVm, RemoveSnapshot, RestoreAllManagedBlock-
    # Snapshots).  After a committed preview the active volume is the one
    # made from the snapshot, with its own id.
    disk = new_id()
    backend.run("create_volume", disk, 1)
    first = backend.run("create_snapshot", disk).payload("c")
    active = backend.run("create_volume_from_snapshot", disk,
                         first).payload("c")
    snap = backend.run("create_snapshot", active).payload("c")

    # A preview of it, named under the disk.
    preview = backend.run("create_volume_from_snapshot", disk,
                          snap).payload("c")
    assert preview in backend.volume_ids()
    backend.run("delete_volume", preview)

    # Its removal, named under the disk: removed for real (it was "not
    # found", exit 0, and stayed on the backend for ever).
    r = backend.run("remove_snapshot", snap, disk)
    assert r.stdout == b"", r.describe()
    assert backend.snapshots(active) == []
    assert "snapshot-" + snap not in files_in(backend.dir)
    backend.run("delete_volume", active)

    # Nowhere: still the success of a removal, and still the disk's own.
    r = backend.run("remove_snapshot", snap, disk)
    assert r.error() == "Snapshot {} not found".format(snap)
    assert [s for s, _ in backend.snapshots(disk)] == [first]


def test_the_snapshot_commands_lock_the_volume_holding_the_snapshot(
        backend, engine_shim):
    # The engine names the disk; the snapshot is of its active volume,
    # which a create_snapshot or delete_volume of that volume locks.
    from vdsm_managedvolume.engine import volumelock
    disk = new_id()
    backend.run("create_volume", disk, 1)
    first = backend.run("create_snapshot", disk).payload("c")
    active = backend.run("create_volume_from_snapshot", disk,
                         first).payload("c")
    snap = backend.run("create_snapshot", active).payload("c")
    locks = engine_shim.env["MANAGEDVOLUME_ENGINE_LOCKS_DIR"]
    with volumelock.held(locks, [active], "create_snapshot (flow x)", 1):
        for args in (("create_volume_from_snapshot", disk, snap),
                     ("remove_snapshot", snap, disk)):
            r = backend.run(*args, code=1, options=["--lock-timeout", "0.3"])
            assert r.error() == (
                "{} failed: Volume {} is busy: create_snapshot (flow x) "
                "(pid {}) holds it; gave up after 0.3 seconds".format(
                    args[0], active, os.getpid()))
    assert backend.snapshots(active) == [(snap, "available")]

    # The disk is locked too (and first, when its id sorts first).
    with volumelock.held(locks, [disk], "extend_volume (flow y)", 1):
        r = backend.run("remove_snapshot", snap, disk, code=1,
                        options=["--lock-timeout", "0.3"])
        assert "Volume {} is busy: extend_volume (flow y)".format(disk) \
            in r.error()

    preview = backend.run("create_volume_from_snapshot", disk,
                          snap).payload("c")
    backend.run("remove_snapshot", snap, disk)
    assert backend.snapshots(active) == []
    for vol in (preview, active):
        backend.run("delete_volume", vol)
    backend.run("remove_snapshot", first, disk)
    backend.run("delete_volume", disk)


def test_another_backends_snapshot_is_not_found(backend, engine_shim):
    vol = new_id()
    backend.run("create_volume", vol, 1)
    snap = backend.run("create_snapshot", vol).payload("c")
    # Same database, another storage domain's backend.
    other = dict(backend.driver, volume_backend_name="other")
    elsewhere = new_id()
    r = engine_shim.run("remove_snapshot", snap, elsewhere, driver=other,
                        db_url="sqlite:///" + backend.db)
    assert r.code == 0, r.describe()
    assert r.error() == "Volume {} not found".format(elsewhere)
    assert backend.snapshots(vol) == [(snap, "available")]
