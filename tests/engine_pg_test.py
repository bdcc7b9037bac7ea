"""The shim on a real PostgreSQL server (a private cluster on loopback,
started by scripts/pgcluster.sh), with a password-protected role."""

import json
import time

import pytest

from vdsm_managedvolume.engine.args import FILE_DRIVER

from .engine_fixtures import Service
from .engine_fixtures import Shim
from .engine_fixtures import files_in
from .engine_fixtures import new_id
from .engine_fixtures import process_cmdlines

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_backend(pg_cluster, tmp_path):
    db = pg_cluster.new_database()
    return {
        "driver": {"volume_driver": FILE_DRIVER,
                   "volume_backend_name": "file",
                   "file_volume_dir": str(tmp_path / "vols")},
        "db": db,
        "url": pg_cluster.url(db=db),
        "url_without_password": pg_cluster.url(password=False, db=db),
        "dir": str(tmp_path / "vols"),
    }


def test_lifecycle_on_postgresql_cold_and_warm_keeps_the_password_secret(
        engine_service, engine_shim, pg_cluster, pg_backend, tmp_path):
    be = pg_backend
    url_file = tmp_path / "db_url"
    url_file.write_text(be["url"])
    url_file.chmod(0o600)
    log_file = tmp_path / "engine.log"
    opts = ["--log-file", str(log_file)]
    outputs = []

    def run(*args, warm=True, db_url="@" + str(url_file), env=None):
        r = engine_shim.run(*args, driver=be["driver"], db_url=db_url,
                            warm=warm, options=opts, env=env, cid="cid")
        assert r.code == 0, r.describe()
        outputs.append(r.stdout.decode() + r.stderr)
        return r

    vol = new_id()
    # Cold on a fresh database: cinderlib creates its schema.
    run("create_volume", vol, 1, warm=False)
    # The URL without password, the password from the environment.
    conn = run("connect_volume", vol, json.dumps({"host": "h"}),
               db_url=be["url_without_password"],
               env={"MANAGEDVOLUME_DB_PASSWORD": pg_cluster.password}
               ).json("cid")
    assert conn["data"]["device_path"].endswith(vol)
    run("save_device", vol, json.dumps({"path": "/dev/x"}), warm=False,
        db_url=be["url_without_password"],
        env={"PGPASSWORD": pg_cluster.password})
    assert run("get_connection_info", vol).json("cid")["device"] == \
        {"path": "/dev/x"}
    run("extend_volume", vol, 2)
    snap = run("create_snapshot", vol).payload("cid")
    from_snap = run("create_volume_from_snapshot", vol, snap).payload("cid")
    clone = new_id()
    run("clone_volume", vol, clone)
    assert pg_cluster.psql(
        "SELECT count(*) FROM volumes WHERE deleted = false",
        db=be["db"]) == "3\n"

    # While the service holds cinderlib set up for this database, neither
    # its command line nor its children's show the password.
    cmdlines = process_cmdlines([engine_service.pid])
    assert cmdlines
    for cmdline in cmdlines.values():
        assert pg_cluster.password not in cmdline

    run("remove_snapshot", snap, vol)
    run("disconnect_volume", vol)
    # Host h cannot be asked (no engine certificate here): it keeps its
    # connection, whose saved device makes delete_volume refuse, until
    # it is ended by name.
    run("disconnect_volume", vol, "h")
    for v in (vol, from_snap, clone):
        run("delete_volume", v, warm=(v != vol))
    assert files_in(be["dir"]) == []
    assert pg_cluster.psql(
        "SELECT count(*) FROM volumes WHERE deleted = false",
        db=be["db"]) == "0\n"
    assert pg_cluster.psql(
        "SELECT count(*) FROM volume_attachment WHERE deleted = false",
        db=be["db"]) == "0\n"

    text = log_file.read_text() + engine_service.log() + "".join(outputs)
    for form in (pg_cluster.password, be["url"].split("@")[0].split(":")[-1]):
        assert form not in text


def test_a_wrong_db_password_is_an_error_line_without_the_password(
        engine_service, engine_shim, pg_cluster, pg_backend):
    be = pg_backend
    wrong = "Wrong-pw-{}".format(new_id()[:8])
    url = be["url_without_password"].replace(
        pg_cluster.user + "@", "{}:{}@".format(pg_cluster.user, wrong))
    for warm in (True, False):
        r = engine_shim.run("storage_stats", "false", driver=be["driver"],
                            db_url=url, warm=warm)
        assert r.code == 1, r.describe()
        assert "password authentication failed" in r.error()
        assert wrong not in r.stdout.decode() + r.stderr


def test_the_warm_service_holds_no_connection_its_children_would_share(
        pg_cluster, pg_backend, tmp_path):
    # A service of its own: its first setup migrates this fresh database,
    # which starts oslo.db's global engine (cinder's migration
    # daa98075b90d asks it for the dialect).  That engine's connection
    # stayed open in the service and every child inherited its socket.
    be = pg_backend
    shim = Shim(str(tmp_path), str(tmp_path / "run" / "cinderlib.sock"))
    service = Service(shim, str(tmp_path / "service.log"))
    try:
        r = shim.run("create_volume", new_id(), 1, driver=be["driver"],
                     db_url=be["url"])
        assert (r.code, r.stdout) == (0, b""), r.describe()

        def sessions():
            # Client sessions only: autovacuum may visit the database.
            return int(pg_cluster.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                "'{}' AND backend_type = 'client backend'".format(be["db"])))

        # The request's child ends, the spare closes its connection once
        # warm: then nobody is connected to the database.
        deadline = time.monotonic() + 60
        while sessions() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sessions() == 0
        assert "Forking with other threads alive" not in service.log()
    finally:
        service.stop()
