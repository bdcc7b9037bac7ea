"""runner: how the shim runs one operation (cold, or in a warm child).

Here what is about the run itself rather than the command line
(engine_client_test.py) or the service (engine_warm_test.py).
"""

import sqlite3
import subprocess

from .engine_fixtures import new_id

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
