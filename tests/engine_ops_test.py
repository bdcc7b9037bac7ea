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

import pytest

from .engine_fixtures import new_id


def __getattr__(name):
    """Test drivers, built on first use (inside the shim's processes, which
    import ``tests.engine_ops_test.RecordingDriver`` by name); collecting
    this module does not import cinder into pytest."""
    if name != "RecordingDriver":
        raise AttributeError(name)
    from vdsm_managedvolume.engine.filedriver import FileDriver

    class RecordingDriver(FileDriver):
        def terminate_connection(self, volume, connector, **kwargs):
            shared = super().terminate_connection(volume, connector,
                                                  **kwargs)
            self._record("terminate_connection", connector["host"], shared)
            return shared

        def remove_export(self, context, volume):
            self._record("remove_export", volume.id)
            return super().remove_export(context, volume)

        def _record(self, *call):
            with open(os.path.join(self._dir, "calls.jsonl"), "a") as f:
                f.write(json.dumps(call) + "\n")

    return locals()[name]


class Backend:
    """One recording backend and its SQLite database, driven through the
    shim."""

    def __init__(self, shim, tmp_path):
        self.shim = shim
        self.dir = str(tmp_path / "vols")
        self.db = str(tmp_path / "cinderlib.db")
        self.driver = {"volume_driver":
                       "tests.engine_ops_test.RecordingDriver",
                       "volume_backend_name": "recording",
                       "file_volume_dir": self.dir}

    def run(self, *args, code=0):
        r = self.shim.run(*args, driver=self.driver,
                          db_url="sqlite:///" + self.db, cid="c")
        assert r.code == code, r.describe()
        return r

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
    backend.run("delete_volume", vol)
    assert backend.calls() == []


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
