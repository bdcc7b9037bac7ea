"""runner: how the shim runs one operation (cold, or in a warm child).

Here what is about the run itself rather than the command line
(engine_client_test.py) or the service (engine_warm_test.py).
"""

import os
import sqlite3
import subprocess

import pytest

from .engine_fixtures import new_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Longer than pysqlite's default busy timeout (5 s): an operation that
# would give up after that default fails here too.
HOLD = 7


def test_an_operation_waits_for_another_sqlite_writer_instead_of_failing(
        engine_service, engine_shim, engine_backend, tmp_path):
    be = engine_backend
    first = new_id()
    r = engine_shim.run("create_volume", first, 1, driver=be["driver"],
                        db_url=be["db_url"])
    assert r.code == 0, r.describe()

    # Another shim process in the middle of a write transaction: it holds
    # the database's write lock while this operation reads and then
    # writes.  Without a busy wait on the write lock SQLite answers
    # "database is locked" at once.
    db = sqlite3.connect(str(tmp_path / "cinderlib.db"), isolation_level=None)
    second = new_id()
    try:
        db.execute("BEGIN IMMEDIATE")
        proc = engine_shim.popen("create_volume", second, 1,
                                 driver=be["driver"], db_url=be["db_url"],
                                 cid="waits")
        try:
            proc.wait(HOLD)
        except subprocess.TimeoutExpired:
            pass
        db.execute("COMMIT")
        out, err = proc.communicate(timeout=120)
    finally:
        db.close()
    assert proc.returncode == 0, (out, err[-3000:])
    r = engine_shim.run("extend_volume", second, 2, driver=be["driver"],
                        db_url=be["db_url"])
    assert r.code == 0, r.describe()


def _python39():
    """A Python 3.9 interpreter (EL9's, the oldest this package runs on),
    or None."""
    import glob
    import shutil
    for candidate in sorted(glob.glob(os.path.expanduser(
            "~/.pyenv/versions/3.9*/bin/python"))) + [
                shutil.which("python3.9")]:
        if candidate and subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2]"
                 " == (3, 9)"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL).returncode == 0:
            return candidate
    return None


def test_a_failure_reaches_the_engine_on_python_3_9():
    # traceback.format_exception(exc) takes one argument only from 3.10:
    # on EL9's Python 3.9 every failed operation raised TypeError while
    # logging its traceback, and the engine got "internal error: the
    # operation ended without a result" instead of the reason.
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 here")
    code = (
        "import logging, types\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from vdsm_managedvolume.engine import runner\n"
        "try:\n"
        "    raise ValueError('the backend said no')\n"
        "except ValueError as e:\n"
        "    exc = e\n"
        "out = runner.failure(types.SimpleNamespace(command='delete_volume'),"
        " runner.Scrubber([]), exc)\n"
        "print(out.exit_code, out.output.decode())\n")
    p = subprocess.run([python, "-c", code], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=120, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("1 ")
    assert "delete_volume failed: the backend said no" in p.stdout
    assert "Traceback" in p.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("zone,pgoptions", [
    ("Etc/GMT-3", None),
    # The server's zone is UTC, the session's not: reported, and set.
    ("UTC", "-c timezone=EST5EDT")])
def test_postgresql_sessions_run_in_utc_whatever_the_options_given(
        monkeypatch, pg_cluster, zone, pgoptions):
    import sqlalchemy
    from vdsm_managedvolume.engine import runner
    db = pg_cluster.new_database()
    pg_cluster.psql("ALTER DATABASE {} SET timezone TO '{}'".format(
        db, zone), db=db)
    if pgoptions is None:
        monkeypatch.delenv("PGOPTIONS", raising=False)
    else:
        monkeypatch.setenv("PGOPTIONS", pgoptions)
    registered = sqlalchemy.event.contains(
        sqlalchemy.engine.Engine, "connect", runner._pg_connected)
    runner._utc_postgresql_sessions()
    # The URL's options are the user's, kept.
    engine = sqlalchemy.create_engine(
        pg_cluster.url(db=db) + "?options=-c%20statement_timeout%3D5000",
        pool_size=1)
    try:
        # The second from the pool, after the rollback at its return.
        for _ in range(2):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW timezone").scalar() == \
                    "UTC"
                assert conn.exec_driver_sql(
                    "SHOW statement_timeout").scalar() == "5s"
    finally:
        engine.dispose()
        if not registered:
            sqlalchemy.event.remove(sqlalchemy.engine.Engine, "connect",
                                    runner._pg_connected)
