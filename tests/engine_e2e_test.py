"""End to end on one machine: the engine's half (our cinderlib client on
the embedded FileDriver with loop devices) and the host's half (the
managedvolume-agent over vdsm's wire protocol), the way oVirt chains them:

    create_volume -> Host.getCapabilities (connector_info)
    -> connect_volume -> ManagedVolume.attach_volume -> I/O on managed_path
    -> save_device -> detach_volume -> disconnect_volume
    -> extend, snapshot, volume from snapshot, clone -> delete everything

on SQLite and on PostgreSQL, leaving no file, record or loop device behind;
and growing a disk while it is attached (docs/engine.md "Growing a
disk"): engine extend_volume -> ManagedVolume.extend_volume on the host.
docs/engine-demo.sh runs the same chain from a shell.
"""

import json
import os
import sqlite3

import pytest

from vdsm_managedvolume import errors

from .engine_fixtures import files_in
from .engine_fixtures import loop_devices_under
from .engine_fixtures import new_id

pytestmark = [pytest.mark.root, pytest.mark.slow]

GiB = 1024**3
DATA = b"written through managed_path by the e2e test"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    # The wire tests' helper: a real managedvolume-agent process with its
    # own state dir, on loopback without TLS.
    from .agent_process_test import AgentProcess
    proc = AgentProcess(tmp_path_factory.mktemp("e2e-agent"),
                        insecure=True).start()
    yield proc
    proc.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        path = tmp_path / "cinderlib.db"

        def live_volumes():
            with sqlite3.connect(str(path)) as db:
                return db.execute("SELECT count(*) FROM volumes WHERE "
                                  "deleted = 0").fetchone()[0]
        return "sqlite:///{}".format(path), live_volumes

    pg = request.getfixturevalue("pg_cluster")
    db = pg.new_database()

    def live_volumes():
        return int(pg.psql("SELECT count(*) FROM volumes WHERE deleted = "
                           "false", db=db))
    return pg.url(db=db), live_volumes


def test_provision_attach_io_detach_snapshot_clone_delete(
        agent, engine_service, engine_shim, database, tmp_path):
    db_url, live_volumes = database
    vols_dir = str(tmp_path / "vols")
    driver = {"volume_driver":
              "vdsm_managedvolume.engine.filedriver.FileDriver",
              "volume_backend_name": "e2e",
              "file_volume_dir": vols_dir,
              "file_volume_use_loop": True}

    def shim(*args, cid="e2e"):
        r = engine_shim.run(*args, driver=driver, db_url=db_url, cid=cid)
        assert r.code == 0, r.describe()
        return r

    vol = new_id()
    try:
        shim("create_volume", vol, 1)
        with agent.client() as host:
            caps = host.call("Host.getCapabilities", flow_id="e2e-caps")
            connector = caps["connector_info"]
            assert connector["host"]

            conn = shim("connect_volume", vol, json.dumps(connector),
                        cid="e2e-connect").json("e2e-connect")
            assert conn["driver_volume_type"] == "local"
            assert conn["data"]["device_path"].startswith("/dev/loop")

            info = host.call("ManagedVolume.attach_volume",
                             {"vol_id": vol, "connection_info": conn},
                             flow_id="e2e-attach")
            assert info["path"] == conn["data"]["device_path"]
            managed = info["managed_path"]
            assert os.path.realpath(managed) == info["path"]

            with open(managed, "r+b") as f:
                f.seek(512 * 1024)
                f.write(DATA)
                f.flush()
                os.fsync(f.fileno())
            with open(managed, "rb") as f:
                f.seek(512 * 1024)
                assert f.read(len(DATA)) == DATA

            shim("save_device", vol, json.dumps(info))
            saved = shim("get_connection_info", vol, connector["host"],
                         cid="e2e-info").json("e2e-info")
            assert saved["device"] == info
            assert saved["connector"] == connector

            assert host.call("ManagedVolume.detach_volume",
                             {"vol_id": vol}) is True
            assert not os.path.lexists(managed)
            shim("disconnect_volume", vol, json.dumps(connector))
            assert loop_devices_under(vols_dir) == []
            assert host.call("ManagedVolume.volumes_info",
                             {"vol_ids": [vol]}) == []

        shim("extend_volume", vol, 2)
        snap = shim("create_snapshot", vol, cid="e2e-snap").payload(
            "e2e-snap")
        from_snap = shim("create_volume_from_snapshot", vol, snap, 3,
                         cid="e2e-from").payload("e2e-from")
        clone = new_id()
        shim("clone_volume", vol, clone)
        for v, size in ((vol, 2), (from_snap, 3), (clone, 2)):
            path = os.path.join(vols_dir, "volume-" + v)
            assert os.path.getsize(path) == size * GiB
            with open(path, "rb") as f:
                f.seek(512 * 1024)
                assert f.read(len(DATA)) == DATA, v
        assert live_volumes() == 3

        shim("remove_snapshot", snap, vol)
        for v in (from_snap, clone, vol):
            shim("delete_volume", v)
        assert files_in(vols_dir) == []
        assert live_volumes() == 0
    finally:
        leaked = loop_devices_under(vols_dir)
        for dev in leaked:
            os.system("losetup -d {}".format(dev))
    assert leaked == []


def test_grow_a_disk_while_attached_engine_then_host(
        agent, engine_service, engine_shim, tmp_path):
    # The flow of docs/engine.md "Growing a disk": the engine grows the
    # volume (the FileDriver grows the file and its loop device, as an
    # array grows its LUN), then the host rescans and reports the size.
    db_url = "sqlite:///{}".format(tmp_path / "cinderlib.db")
    vols_dir = str(tmp_path / "vols")
    driver = {"volume_driver":
              "vdsm_managedvolume.engine.filedriver.FileDriver",
              "volume_backend_name": "e2e-extend",
              "file_volume_dir": vols_dir,
              "file_volume_use_loop": True}

    def shim(*args, cid="e2e-extend"):
        r = engine_shim.run(*args, driver=driver, db_url=db_url, cid=cid)
        assert r.code == 0, r.describe()
        return r

    vol = new_id()
    pattern = os.urandom(4096)
    past = os.urandom(4096)
    try:
        shim("create_volume", vol, 1)
        with agent.client() as host:
            connector = host.call("Host.getCapabilities")["connector_info"]
            conn = shim("connect_volume", vol, json.dumps(connector),
                        cid="x-connect").json("x-connect")
            info = host.call("ManagedVolume.attach_volume",
                             {"vol_id": vol, "connection_info": conn},
                             flow_id="x-attach")
            managed = info["managed_path"]
            rec, = host.call("ManagedVolume.volumes_info",
                             {"vol_ids": [vol]})
            assert rec["size"] == GiB

            fd = os.open(managed, os.O_RDWR)
            try:
                os.pwrite(fd, pattern, GiB - 4096)
                os.fsync(fd)
            finally:
                os.close(fd)

            shim("extend_volume", vol, 2)
            grown = host.call("ManagedVolume.extend_volume",
                              {"vol_id": vol, "new_size": 2 * GiB},
                              flow_id="x-extend")
            assert grown == {"vol_id": vol, "path": info["path"],
                             "size": 2 * GiB}
            rec, = host.call("ManagedVolume.volumes_info",
                             {"vol_ids": [vol]})
            assert rec["size"] == 2 * GiB

            fd = os.open(managed, os.O_RDWR)
            try:
                assert os.lseek(fd, 0, os.SEEK_END) == 2 * GiB
                assert os.pread(fd, 4096, GiB - 4096) == pattern
                os.pwrite(fd, past, GiB + 512 * 1024)
                os.fsync(fd)
            finally:
                os.close(fd)
            with open(managed, "rb") as f:
                f.seek(GiB + 512 * 1024)
                assert f.read(4096) == past

            # More than the storage holds: 926 naming both sizes, the
            # volume stays attached and its size recorded.
            with pytest.raises(errors.Error) as e:
                host.call("ManagedVolume.extend_volume",
                          {"vol_id": vol, "new_size": 3 * GiB})
            assert e.value.code == 926
            assert str(2 * GiB) in str(e.value)
            assert str(3 * GiB) in str(e.value)

            assert host.call("ManagedVolume.detach_volume",
                             {"vol_id": vol}) is True
            # Not attached any more: nothing to rescan.
            with pytest.raises(errors.Error) as e:
                host.call("ManagedVolume.extend_volume", {"vol_id": vol})
            assert e.value.code == -32602 and "vol_id" in str(e.value)
            shim("disconnect_volume", vol, json.dumps(connector))
            assert host.call("ManagedVolume.volumes_info",
                             {"vol_ids": [vol]}) == []
        assert loop_devices_under(vols_dir) == []
        with open(os.path.join(vols_dir, "volume-" + vol), "rb") as f:
            f.seek(GiB + 512 * 1024)
            assert f.read(4096) == past
        shim("delete_volume", vol)
        assert files_in(vols_dir) == []
    finally:
        leaked = loop_devices_under(vols_dir)
        for dev in leaked:
            os.system("losetup -d {}".format(dev))
    assert leaked == []
