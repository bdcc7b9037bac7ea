"""The shim killed at every step of connect_volume, disconnect_volume
and delete_volume: what the next command must converge.

A backend with per-host exports (an LVM target's ACL, a SAN's host
mapping) is changed by the driver before cinderlib's database says so.
The FileDriver has none, so ``ExportingDriver`` keeps them visible in
``exports.json`` in its volume directory: per volume, whether its export
exists (create_export, remove_export) and the initiators it is granted
to (initialize_connection, terminate_connection: to the connector's
``initiator``, as an LVM target's ACL, not to its host name); with
``fail-after-grant`` in that directory its initialize_connection grants,
then fails (a SAN call timing out after it mapped the host), with
``fail-before-grant`` it fails before granting, with
``fail-terminate`` its terminate_connection fails (the backend does not
answer; only for the grantees the file names, if any, one a line,
each alone or followed by a volume id: only that volume's),
with ``unmap-all`` its terminate_connection of a connector it does not
grant revokes every grant (Dell SC iSCSI's, for an initiator with no
server on the array), with ``strict`` it raises then (IBM Storwize/SVC,
HPE 3PAR: no host object for the connector); its terminate_connection
fails once the export is gone, as LIO's does (cinder's
``LioAdm.terminate_connection``: ``cinder-rtstool delete-initiator``
finds no target), and its delete_volume refuses a
volume still exported, as such backends do.  Each terminate_connection
is recorded in ``terminations.jsonl`` with the grantees the volume had
when it came (``Backend.terminations``).

Every driver call and every write cinderlib makes to its database is a
step (``steps.jsonl``, before and after each).  A first run of a command
lists its steps; then, for each, a fresh volume gets the same command
killed there (SIGKILL of the warm service's child running it:
``kill-at`` names the step's number) and the engine's next command
(docs/engine.md, "Killed mid-command": the same command again, or the
next flow's) must leave cinderlib's database, the driver's exports and
the shim's locks agreeing, with nothing left once the volume is deleted.
"""

import datetime
import json
import os
import re
import signal
import sqlite3

import pytest

from .engine_fixtures import files_in
from .engine_fixtures import new_id

pytestmark = pytest.mark.slow


def __getattr__(name):
    """The test driver, built in the shim's processes that import it by
    name; collecting this module does not import cinder into pytest."""
    if name != "ExportingDriver":
        raise AttributeError(name)
    from cinder import exception
    from vdsm_managedvolume.engine.filedriver import FileDriver

    class ExportingDriver(FileDriver):
        def do_setup(self, context):
            super().do_setup(context)
            _trace_database(self._dir)

        def create_export(self, context, volume, connector):
            with _step(self._dir, "create_export"):
                self._change(volume.id, export=True)

        def remove_export(self, context, volume):
            with _step(self._dir, "remove_export"):
                self._change(volume.id, export=False)

        def initialize_connection(self, volume, connector, **kwargs):
            with _step(self._dir, "initialize_connection"):
                if os.path.exists(os.path.join(self._dir,
                                               "fail-before-grant")):
                    # Dell SC iSCSI's API failing before it made the
                    # host's server.
                    raise exception.VolumeBackendAPIException(
                        data="timed out creating a server for {}".format(
                            connector.get("host")))
                if not self._exports().get(volume.id, {}).get("export"):
                    raise exception.VolumeBackendAPIException(
                        data="volume {} is not exported".format(volume.id))
                info = super().initialize_connection(volume, connector,
                                                     **kwargs)
                self._change(volume.id, grant=_grantee(connector))
                if os.path.exists(os.path.join(self._dir,
                                               "fail-after-grant")):
                    # A SAN call timing out after it mapped the host.
                    raise exception.VolumeBackendAPIException(
                        data="timed out mapping volume {}".format(
                            volume.id))
                return info

        def terminate_connection(self, volume, connector, **kwargs):
            with _step(self._dir, "terminate_connection"):
                with open(os.path.join(self._dir, "terminations.jsonl"),
                          "a") as f:
                    f.write(json.dumps([volume.id, _grantee(connector),
                                        self._exports().get(volume.id, {})
                                        .get("hosts", [])]) + "\n")
                if _fails_for(os.path.join(self._dir, "fail-terminate"),
                              _grantee(connector), volume.id):
                    raise exception.VolumeBackendAPIException(
                        data="the backend does not answer")
                found = self._exports().get(volume.id, {})
                if not found.get("export"):
                    raise exception.ISCSITargetDetachFailed(
                        volume_id=volume.id)
                if os.path.exists(os.path.join(self._dir, "strict")) \
                        and _grantee(connector) not in found["hosts"]:
                    # IBM Storwize/SVC, HPE 3PAR: no host object on the
                    # array for that connector.
                    raise exception.VolumeDriverException(
                        message="Failed to get host name from connector")
                if os.path.exists(os.path.join(self._dir, "unmap-all")) \
                        and _grantee(connector) not in found["hosts"]:
                    # Dell SC iSCSI: no server for that initiator on the
                    # array, so it unmaps the volume from every host.
                    for host in found["hosts"]:
                        self._change(volume.id, revoke=host)
                shared = super().terminate_connection(volume, connector,
                                                      **kwargs)
                self._change(volume.id, revoke=_grantee(connector))
                return shared

        def delete_volume(self, volume):
            with _step(self._dir, "delete_volume"):
                found = self._exports().get(volume.id)
                if found and (found["export"] or found["hosts"]):
                    raise exception.VolumeBackendAPIException(
                        data="volume {} is still exported: {}".format(
                            volume.id, found))
                super().delete_volume(volume)
                self._change(volume.id, forget=True)

        def _exports(self):
            try:
                with open(os.path.join(self._dir, "exports.json")) as f:
                    return json.load(f)
            except FileNotFoundError:
                return {}

        def _change(self, vol_id, export=None, grant=None, revoke=None,
                    forget=False):
            exports = self._exports()
            entry = exports.setdefault(vol_id, {"export": False,
                                                "hosts": []})
            if export is not None:
                entry["export"] = export
            hosts = set(entry["hosts"])
            if grant:
                hosts.add(grant)
            if revoke:
                hosts.discard(revoke)
            entry["hosts"] = sorted(hosts)
            if forget:
                del exports[vol_id]
            path = os.path.join(self._dir, "exports.json")
            with open(path + ".tmp", "w") as f:
                json.dump(exports, f)
            os.rename(path + ".tmp", path)

    return ExportingDriver


def _fails_for(path, grantee, volume_id):
    """Whether the failure mode at ``path`` is on for ``grantee``'s
    connection of ``volume_id``: the file exists, empty (every one), or
    a line names the grantee, alone (any volume) or before the volume."""
    try:
        with open(path) as f:
            lines = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return False
    return not lines or [grantee] in lines or [grantee, volume_id] in lines


def _grantee(connector):
    """What ExportingDriver grants an export to: the connector's iSCSI
    initiator (its host name when it has none)."""
    return connector.get("initiator") or connector["host"]


# In the shim's process: the steps it took (pid, count).
_taken = {"pid": None, "count": 0}


class _step:
    """A step of the running command, before and after its body: recorded
    in ``steps.jsonl``; the process kills itself (SIGKILL) at the step
    whose number ``kill-at`` holds."""

    def __init__(self, directory, name):
        self.directory = directory
        self.name = name

    def __enter__(self):
        _reached(self.directory, self.name + ":before")

    def __exit__(self, kind, value, tb):
        if kind is None:
            _reached(self.directory, self.name + ":after")


def _reached(directory, name):
    if _taken["pid"] != os.getpid():
        _taken.update(pid=os.getpid(), count=0)
    number = _taken["count"]
    _taken["count"] += 1
    with open(os.path.join(directory, "steps.jsonl"), "a") as f:
        f.write(json.dumps(name) + "\n")
    try:
        with open(os.path.join(directory, "kill-at")) as f:
            kill_at = int(f.read())
    except FileNotFoundError:
        return
    if number == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _trace_database(directory):
    """Make every write of cinderlib's persistence a step."""
    from cinderlib import objects
    persistence = objects.Object.persistence
    if getattr(persistence, "_traced", False):
        return
    for name in ("set_volume", "set_connection", "delete_connection",
                 "delete_volume"):
        setattr(persistence, name, _traced(directory, "db." + name,
                                           getattr(persistence, name)))
    persistence._traced = True


def _traced(directory, name, method):
    def traced(*args, **kwargs):
        with _step(directory, name):
            return method(*args, **kwargs)
    return traced


class Backend:
    """An ExportingDriver backend and its database (SQLite in
    ``tmp_path``, or a new database of ``pg_cluster``), driven through
    the shim (the session's warm service)."""

    def __init__(self, shim, service, tmp_path, pg_cluster=None):
        self.shim = shim
        self.service = service
        self.pg = pg_cluster
        self.dir = str(tmp_path / "vols")
        if pg_cluster is None:
            self.db = str(tmp_path / "cinderlib.db")
            self.db_url = "sqlite:///" + self.db
        else:
            self.db = pg_cluster.new_database()
            # The password never on argv: the URL from a file.
            url_file = tmp_path / "db_url"
            url_file.write_text(pg_cluster.url(db=self.db))
            url_file.chmod(0o600)
            self.db_url = "@" + str(url_file)
        self.driver = {"volume_driver":
                       "tests.engine_kill_test.ExportingDriver",
                       "volume_backend_name": "exporting",
                       "file_volume_dir": self.dir}
        os.makedirs(self.dir)

    def run(self, *args, code=0, cid="c"):
        """Run a command; its exit code must be ``code`` (None: any)."""
        r = self.shim.run(*args, driver=self.driver, db_url=self.db_url,
                          cid=cid)
        assert code is None or r.code == code, r.describe()
        return r

    def killed(self, step, *args):
        """Run a command killed at its step number ``step``."""
        path = os.path.join(self.dir, "kill-at")
        with open(path, "w") as f:
            f.write(str(step))
        try:
            r = self.shim.run(*args, driver=self.driver,
                              db_url=self.db_url, cid="c")
        finally:
            os.unlink(path)
        assert r.code != 0, r.describe()
        assert "lost the request" in r.error(), r.describe()
        return r

    def steps(self, *args):
        """The steps a command takes (it runs)."""
        path = os.path.join(self.dir, "steps.jsonl")
        if os.path.exists(path):
            os.unlink(path)
        self.run(*args)
        with open(path) as f:
            return [json.loads(line) for line in f]

    def terminations(self, vol):
        """[(grantee, [the volume's grantees when it came])] of each
        terminate_connection of ``vol``, in order."""
        try:
            with open(os.path.join(self.dir, "terminations.jsonl")) as f:
                calls = [json.loads(line) for line in f]
        except FileNotFoundError:
            return []
        return [(grantee, hosts) for v, grantee, hosts in calls if v == vol]

    def exports(self, vol):
        try:
            with open(os.path.join(self.dir, "exports.json")) as f:
                return json.load(f).get(vol)
        except FileNotFoundError:
            return None

    def sql(self, query, *params):
        """The rows of ``query`` (``?``: ``params``, volume ids), each a
        tuple of strings."""
        if self.pg is None:
            with sqlite3.connect(self.db) as db:
                return [tuple(str(v) for v in row)
                        for row in db.execute(query, params).fetchall()]
        for param in params:
            assert "'" not in param
            query = query.replace("?", "'{}'".format(param), 1)
        out = self.pg.psql(query, db=self.db)
        return [tuple(line.split("|")) for line in out.splitlines()]

    def connections(self, vol):
        """[(host, whether its conn_info is recorded)] of ``vol``."""
        rows = self.sql("SELECT connection_info FROM volume_attachment "
                        "WHERE volume_id = ? AND NOT deleted", vol)
        return sorted((info["connector"]["host"], bool(info.get("conn")))
                      for info in (json.loads(i) for i, in rows))

    def volume_status(self, vol):
        rows = self.sql("SELECT status FROM volumes WHERE id = ? AND NOT "
                        "deleted", vol)
        return rows[0][0] if rows else None

    def check_agrees(self, vol, hosts, step):
        """cinderlib's records and the driver's exports say ``vol`` is
        connected to exactly ``hosts``, each connection complete (killed
        at ``step``)."""
        state = (self.connections(vol), self.exports(vol),
                 self.volume_status(vol))
        assert state == ([(h, True) for h in sorted(hosts)],
                         {"export": bool(hosts),
                          "hosts": sorted(_initiator(h) for h in hosts)},
                         "in-use" if hosts else "available"), step

    def check_gone(self, vol, step):
        """Nothing of ``vol`` is left: records, exports, file, lock."""
        locks = self.shim.env["MANAGEDVOLUME_ENGINE_LOCKS_DIR"]
        state = (self.sql("SELECT count(*) FROM volume_attachment WHERE "
                          "volume_id = ? AND NOT deleted", vol),
                 self.volume_status(vol), self.exports(vol),
                 "volume-" + vol in files_in(self.dir),
                 [n for n in files_in(locks) if vol in n])
        assert state == ([("0",)], None, None, False, []), step
        assert self.service.proc.poll() is None


@pytest.fixture
def backend(engine_service, engine_shim, tmp_path):
    return Backend(engine_shim, engine_service, tmp_path)


@pytest.fixture
def pg_backend(engine_service, engine_shim, tmp_path, pg_cluster):
    return Backend(engine_shim, engine_service, tmp_path, pg_cluster)


def _initiator(host):
    return "iqn.1994-05.com.redhat:" + host


def _connector(host, initiator=None):
    return json.dumps({"host": host,
                       "initiator": initiator or _initiator(host)})


def _steps(backend, *args, setup=()):
    """[(number, name)] of the steps of ``args`` on a volume prepared by
    ``setup`` (commands whose first argument after the name is the
    volume) at which to kill it: before the first, and after each (what
    runs between one step's end and the next one's start changes nothing
    outside the process)."""
    vol = new_id()
    backend.run("create_volume", vol, 1)
    for command in setup:
        backend.run(command[0], vol, *command[1:])
    steps = backend.steps(args[0], vol, *args[1:])
    assert steps, "no step taken"
    return [(n, "{} {}".format(n, name)) for n, name in enumerate(steps)
            if n == 0 or name.endswith(":after")]


def _step_number(backend, name, *args, setup=()):
    """The number of the step ``name`` of ``args`` (``_steps``)."""
    [number] = [n for n, step in _steps(backend, *args, setup=setup)
                if step.endswith(" " + name)]
    return number


def test_a_connect_killed_at_any_step_is_finished_by_the_next_connect(
        backend):
    # The engine runs connect_volume again for that host when the VM is
    # started there again (a user's Run, an HA restart).
    for number, step in _steps(backend, "connect_volume", _connector("h")):
        vol = new_id()
        backend.run("create_volume", vol, 1)
        backend.killed(number, "connect_volume", vol, _connector("h"))
        conn = backend.run("connect_volume", vol, _connector("h")).json("c")
        assert conn["driver_volume_type"] == "local", step
        backend.check_agrees(vol, ["h"], step)
        backend.run("disconnect_volume", vol, "h")
        backend.check_agrees(vol, [], step)
        backend.run("delete_volume", vol)
        backend.check_gone(vol, step)


@pytest.mark.parametrize("database", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_connect_killed_at_any_step_leaves_nothing_once_run_elsewhere(
        request, database):
    backend = request.getfixturevalue(
        "backend" if database == "sqlite" else "pg_backend")
    # RunVmCommand.runVm: a failed attachManagedBlockStorageDisks makes
    # no status and rerun() tries another host: connect_volume for
    # that host's connector, then its stop's disconnect_volume (no host
    # named: neither host can be asked here), then the disk's removal.
    for number, step in _steps(backend, "connect_volume", _connector("h")):
        vol = new_id()
        backend.run("create_volume", vol, 1)
        backend.killed(number, "connect_volume", vol, _connector("h"))
        backend.run("connect_volume", vol, _connector("g"))
        backend.run("disconnect_volume", vol)
        # h's connection is gone, or complete (killed after its record:
        # as any host whose attach failed, it is kept until the delete),
        # or unfinished, never granted by the driver, kept while g's is
        # complete (ending it could end g's grant too).
        conns = backend.connections(vol)
        if ("h", False) in conns:
            assert conns == [("g", True), ("h", False)], step
            assert backend.exports(vol) in (
                {"export": True, "hosts": [_initiator("g")]},
                {"export": True, "hosts": [_initiator("g"),
                                           _initiator("h")]}), step
        else:
            hosts = [h for h, _ in conns]
            assert hosts in (["g"], ["g", "h"]), step
            backend.check_agrees(vol, hosts, step)
        backend.run("delete_volume", vol)
        backend.check_gone(vol, step)


@pytest.mark.parametrize("others", [[], ["g"]], ids=["only", "shared"])
def test_a_disconnect_killed_at_any_step_converges(backend, others):
    # The VM ran on h (its device saved), h detached, then its stop's
    # disconnect_volume was killed.
    setup = [("connect_volume", _connector(h)) for h in ["h"] + others]
    setup.insert(1, ("save_device", json.dumps({"path": "/dev/h"}), "h"))
    for number, step in _steps(backend, "disconnect_volume", "h",
                               setup=setup):
        # ProcessDownVmCommand does not run it again: its failure keeps
        # the disk's ATTACHED_VDS_ID, and the VM's next start connects
        # that host again (the same connection)...
        vol = new_id()
        backend.run("create_volume", vol, 1)
        for command in setup:
            backend.run(command[0], vol, *command[1:])
        backend.killed(number, "disconnect_volume", vol, "h")
        backend.run("connect_volume", vol, _connector("h"))
        backend.check_agrees(vol, ["h"] + others, step)
        # ... and the next stop disconnects it again.
        backend.run("disconnect_volume", vol, "h")
        backend.check_agrees(vol, others, step)
        for host in others:
            backend.run("disconnect_volume", vol, host)
        backend.run("delete_volume", vol)
        backend.check_gone(vol, step)

        # Or the disk is removed: delete_volume ends what is left.
        vol = new_id()
        backend.run("create_volume", vol, 1)
        for command in setup:
            backend.run(command[0], vol, *command[1:])
        backend.killed(number, "disconnect_volume", vol, "h")
        r = backend.run("delete_volume", vol, code=None)
        # Killed before it marked h's connection, the disconnect changed
        # nothing: h is a host whose attach completed and that cannot be
        # asked, and the admin's override ends it.  Once marked, nothing
        # can have attached through it since.
        assert bool(r.code) == (number == 0), (step, r.describe())
        if r.code:
            override = re.search(r"FLOW_ID {} '([^']*)'".format(vol),
                                 r.error()).group(1)
            backend.run("disconnect_volume", vol, override)
            backend.run("delete_volume", vol)
        backend.check_gone(vol, step)


def test_a_delete_killed_at_any_step_is_finished_by_the_next_delete(
        backend):
    # RemoveManagedBlockStorageDiskCommand: a failed delete_volume keeps
    # the disk (unlocked); the admin removes it again.
    setup = [("connect_volume", _connector("h")),
             ("connect_volume", _connector("g"))]
    for number, step in _steps(backend, "delete_volume", setup=setup):
        vol = new_id()
        backend.run("create_volume", vol, 1)
        for command in setup:
            backend.run(command[0], vol, *command[1:])
        backend.killed(number, "delete_volume", vol)
        r = backend.run("delete_volume", vol)
        assert r.stdout == b"" or b"not found" in r.stdout, (step,
                                                             r.describe())
        backend.check_gone(vol, step)


def test_a_connection_left_unfinished_is_never_picked(backend):
    # Its conn_info is not recorded (or its grant may be gone): the
    # connection without a host named is the one complete.
    number = _step_number(backend, "initialize_connection:after",
                          "connect_volume", _connector("h"))
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("g"))
    backend.killed(number, "connect_volume", vol, _connector("h"))
    assert backend.connections(vol) == [("g", True), ("h", False)]
    info = backend.run("get_connection_info", vol).json("c")
    assert info["connector"]["host"] == "g"
    backend.run("save_device", vol, json.dumps({"path": "/dev/g"}))
    info = backend.run("get_connection_info", vol, "g").json("c")
    assert info["device"] == {"path": "/dev/g"}
    backend.run("disconnect_volume", vol, "h")
    backend.run("disconnect_volume", vol, "g")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "initialize_connection:after")


def _set_zone(backend, zone):
    """The PostgreSQL server's time zone for the next sessions of the
    backend's database (what postgresql.conf's timezone sets)."""
    backend.pg.psql("ALTER DATABASE {} SET timezone TO '{}'".format(
        backend.db, zone), db=backend.db)


@pytest.mark.postgres
def test_save_device_picks_the_host_connected_last_across_a_dst_change(
        pg_backend):
    # g connected (its attach failed: the engine never disconnects it),
    # then the clocks went back an hour (EDT to EST), then h connected
    # and attached.  attach_time was stored in the server's zone: h's
    # looked an hour older than g's, and its device was saved on g's
    # connection (review-engfix6 L1).
    backend = pg_backend
    _set_zone(backend, "Etc/GMT+4")
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("g"))
    _set_zone(backend, "Etc/GMT+5")
    backend.run("connect_volume", vol, _connector("h"))
    backend.run("save_device", vol, json.dumps({"path": "/dev/h"}))
    info = backend.run("get_connection_info", vol, "h").json("c")
    assert info["device"] == {"path": "/dev/h"}
    # Stored in UTC, as cinder's own naive stamps (updated_at).
    for updated, attached in backend.sql(
            "SELECT updated_at, attach_time FROM volume_attachment WHERE "
            "volume_id = ?", vol):
        stamps = [datetime.datetime.fromisoformat(t[:19])
                  for t in (updated, attached)]
        assert abs(stamps[1] - stamps[0]) < datetime.timedelta(
            minutes=10), (updated, attached)


@pytest.mark.parametrize("database", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_an_older_versions_connection_never_outranks_a_stamped_one(
        request, database):
    # g's deviceless connection was made by a version that stamped no
    # attach_time, its created_at in the server's zone (east of UTC
    # here: ahead of the UTC stamps this version writes; on SQLite a
    # clock stepped back since).  h connects now and attaches: the
    # device is h's.
    backend = request.getfixturevalue(
        "backend" if database == "sqlite" else "pg_backend")
    if backend.pg is not None:
        _set_zone(backend, "Etc/GMT-3")
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("g"))
    later = (datetime.datetime.now(datetime.timezone.utc) +
             datetime.timedelta(hours=3 if backend.pg else 0,
                                minutes=1)).strftime("%Y-%m-%d %H:%M:%S")
    backend.sql("UPDATE volume_attachment SET attach_time = NULL, "
                "created_at = '{}' WHERE volume_id = ?".format(later), vol)
    backend.run("connect_volume", vol, _connector("h"))
    backend.run("save_device", vol, json.dumps({"path": "/dev/h"}))
    info = backend.run("get_connection_info", vol, "h").json("c")
    assert info["device"] == {"path": "/dev/h"}
    info = backend.run("get_connection_info", vol, "g").json("c")
    assert info["device"] is None


@pytest.mark.parametrize("database", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_an_older_versions_stamp_never_outranks_one_stamped_since(
        request, database):
    # g's deviceless connection (its attach failed) was stamped by the
    # previous version, which on PostgreSQL wrote attach_time in the
    # server's zone: east of UTC, hours ahead of the UTC stamps written
    # since the upgrade (on SQLite: a clock stepped back since).  h
    # connects after the upgrade and attaches: the device is h's
    # (review-engfix7 L1).
    backend = request.getfixturevalue(
        "backend" if database == "sqlite" else "pg_backend")
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("g"))
    [(info,)] = backend.sql("SELECT connection_info FROM volume_attachment "
                            "WHERE volume_id = ?", vol)
    info = json.loads(info)
    info.pop("attach_time_zone", None)
    local = (datetime.datetime.now(datetime.timezone.utc) +
             datetime.timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S")
    backend.sql("UPDATE volume_attachment SET attach_time = '{}', "
                "connection_info = '{}' WHERE volume_id = ?".format(
                    local, json.dumps(info)), vol)
    backend.run("connect_volume", vol, _connector("h"))
    backend.run("save_device", vol, json.dumps({"path": "/dev/h"}))
    info = backend.run("get_connection_info", vol, "h").json("c")
    assert info["device"] == {"path": "/dev/h"}
    assert "attach_time_zone" not in info
    info = backend.run("get_connection_info", vol, "g").json("c")
    assert info["device"] is None
    # g's next connect (after the upgrade) stamps it anew: g is the
    # last connected, the connection without a device.
    backend.run("connect_volume", vol, _connector("g"))
    info = backend.run("get_connection_info", vol).json("c")
    assert info["connector"]["host"] == "g"


def test_a_renamed_hosts_unfinished_connection_ends_without_its_grant(
        backend):
    # h's connect was killed once its record existed; the host, renamed
    # g since (hostnamectl, DHCP), connects with the same initiator: a
    # second connection, complete, whose device a VM uses.  The engine's
    # next disconnect_volume (no host) cannot ask "h" and ends the
    # unfinished one unasked: the initiator's grant stays, g uses it
    # (review-engfix6 M1).
    number = _step_number(backend, "initialize_connection:after",
                          "connect_volume", _connector("h"))
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.killed(number, "connect_volume", vol, _connector("h"))
    backend.run("connect_volume", vol, _connector("g", _initiator("h")))
    assert backend.connections(vol) == [("g", True), ("h", False)]
    backend.run("save_device", vol, json.dumps({"path": "/dev/g"}), "g")
    backend.run("disconnect_volume", vol)
    assert backend.connections(vol) == [("g", True)]
    assert backend.exports(vol) == {"export": True,
                                    "hosts": [_initiator("h")]}
    # The last connection of that identity ends the grant.
    backend.run("disconnect_volume", vol, "g")
    assert backend.exports(vol) == {"export": False, "hosts": []}
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "initialize_connection:after")


def test_hosts_sharing_only_an_nqn_are_two_grantees(backend):
    # Another initiator each and one NVMe host NQN (a DMI UUID several
    # boards share, a cloned /etc/nvme/hostnqn): ending a's connection
    # ends a's grant (review-final10 M1).
    nqn = "nqn.2014-08.org.nvmexpress:uuid:03000200-0400-0500-0006-0007"
    vol = new_id()
    backend.run("create_volume", vol, 1)
    for host in ("a", "b"):
        backend.run("connect_volume", vol, json.dumps(
            {"host": host, "initiator": _initiator(host), "nqn": nqn}))
    backend.run("disconnect_volume", vol, "a")
    assert backend.exports(vol) == {"export": True,
                                    "hosts": [_initiator("b")]}
    backend.run("disconnect_volume", vol, "b")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "-")


def test_a_disconnect_killed_after_the_record_then_the_engines_next(
        backend):
    # Killed after the record's deletion, before remove_export: the
    # engine's next disconnect_volume finds no connection and removes
    # the export no host uses (review-final10 L1; an nvmet subsystem may
    # let any host in).
    setup = [("connect_volume", _connector("h"))]
    number = _step_number(backend, "db.delete_connection:after",
                          "disconnect_volume", "h", setup=setup)
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("h"))
    backend.killed(number, "disconnect_volume", vol, "h")
    assert backend.connections(vol) == []
    assert backend.exports(vol)["export"] is True
    backend.run("disconnect_volume", vol)
    backend.check_agrees(vol, [], "db.delete_connection:after")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "db.delete_connection:after")


def test_one_delete_ends_both_connections_of_one_initiator(backend):
    # The renamed host's unfinished and complete connections, both ended
    # by one delete_volume: the last one ends the grant.
    number = _step_number(backend, "initialize_connection:after",
                          "connect_volume", _connector("h"))
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.killed(number, "connect_volume", vol, _connector("h"))
    backend.run("connect_volume", vol, _connector("g", _initiator("h")))
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "initialize_connection:after")


@pytest.mark.parametrize("named", [(), ("h",)], ids=["engine", "host"])
def test_a_connect_killed_after_create_export_then_a_disconnect(
        backend, named):
    # Killed before its record: an export no connection names.  A
    # disconnect_volume of the volume, finding no connection, removes it
    # (it was left until the volume's delete).
    number = _step_number(backend, "create_export:after",
                          "connect_volume", _connector("h"))
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.killed(number, "connect_volume", vol, _connector("h"))
    assert backend.connections(vol) == []
    assert backend.exports(vol)["export"] is True
    backend.run("disconnect_volume", vol, *named)
    backend.check_agrees(vol, [], "create_export:after")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "create_export:after")


@pytest.mark.parametrize("answers", [True, False],
                         ids=["answers", "does-not-answer"])
def test_a_connect_failing_after_its_grant_takes_it_back(backend, answers):
    # initialize_connection granted, then failed, on a volume with no
    # other connection: terminate_connection takes the grant back, then
    # the export goes (cinderlib deleted the record only: the grant, no
    # record naming it, was never ended and the backend then refused to
    # delete the volume; review-engfix6 L3).  A backend that does not
    # answer keeps it, as cinder leaves it; nothing is left that a later
    # command would fail on.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    fails = ["fail-after-grant"] + ([] if answers else ["fail-terminate"])
    with _modes(backend, *fails):
        r = backend.run("connect_volume", vol, _connector("h"), code=1)
    assert "timed out mapping volume" in r.error()
    assert backend.connections(vol) == []
    assert backend.exports(vol) == {
        "export": False, "hosts": [] if answers else [_initiator("h")]}
    backend.run("disconnect_volume", vol)
    backend.run("connect_volume", vol, _connector("h"))
    backend.check_agrees(vol, ["h"], "-")
    # (h's next connection and its end take back the grant left.)
    backend.run("disconnect_volume", vol, "h")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "-")


def test_a_connect_failing_beside_another_host_never_terminates_it(
        backend):
    # A migration's destination h fails to connect while the VM runs on
    # g: terminate_connection for h, a connector the driver never
    # completed, is not called (cinder never calls it; Dell SC's unmaps
    # the volume from every host then, g included); the export stays.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("g"))
    backend.run("save_device", vol, json.dumps({"path": "/dev/g"}))
    with _modes(backend, "fail-after-grant", "unmap-all"):
        backend.run("connect_volume", vol, _connector("h"), code=1)
        assert backend.connections(vol) == [("g", True)]
        assert backend.exports(vol) == {
            "export": True, "hosts": [_initiator("g"), _initiator("h")]}


class _modes:
    """The driver's failure modes ``names`` on, for a ``with`` block."""

    def __init__(self, backend, *names):
        self.paths = [os.path.join(backend.dir, n) for n in names]

    def __enter__(self):
        for path in self.paths:
            open(path, "w").close()

    def __exit__(self, *exc):
        for path in self.paths:
            os.unlink(path)


def _first_step(backend, name, *args, setup=()):
    """The number of the first step ``name`` of ``args`` (``_steps``)."""
    return [n for n, step in _steps(backend, *args, setup=setup)
            if step.endswith(" " + name)][0]


def _leave_never_granted(backend, vol, how):
    """Leave ``vol`` a connection to h that the driver never granted
    (as Dell SC iSCSI, which then has no server for h's initiator),
    unfinished, ``how``: a connect killed after its record; that, then
    h's next connect failing before the grant; or a connect failing
    after its grant, the volume's only connection, killed once
    terminate_connection took the grant back, before it deleted the
    record."""
    if how == "forgetting-killed":
        probe = new_id()
        backend.run("create_volume", probe, 1)
        path = os.path.join(backend.dir, "steps.jsonl")
        os.unlink(path)
        with _modes(backend, "fail-after-grant"):
            backend.run("connect_volume", probe, _connector("h"), code=1)
            with open(path) as f:
                steps = [json.loads(line) for line in f]
            backend.killed(steps.index("terminate_connection:after"),
                           "connect_volume", vol, _connector("h"))
        backend.run("disconnect_volume", probe)
        backend.run("delete_volume", probe)
    else:
        number = _first_step(backend, "db.set_connection:after",
                             "connect_volume", _connector("h"))
        backend.killed(number, "connect_volume", vol, _connector("h"))
    if how == "reconnect-failed":
        with _modes(backend, "fail-before-grant"):
            r = backend.run("connect_volume", vol, _connector("h"), code=1)
        assert "timed out creating a server for h" in r.error()
    assert backend.connections(vol) == [("h", False)]
    assert backend.exports(vol) == {"export": True, "hosts": []}


@pytest.mark.parametrize("how", ["killed", "reconnect-failed",
                                 "forgetting-killed"])
def test_a_connection_never_granted_is_not_ended_beside_a_running_host(
        backend, how):
    # h's connect left a record the driver never granted; the VM reruns
    # on g (RunVmCommand.rerun) and runs there.  The engine's next
    # disconnect_volume of the volume (another host's stop or migration)
    # and an admin's by-name one ended h's record with
    # terminate_connection, which on Dell SC iSCSI, for an initiator
    # without a server, unmaps the volume from every host: g's VM lost
    # its disk (review-engfix7 M3).  It waits until it is the volume's
    # last connection.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    _leave_never_granted(backend, vol, how)
    backend.run("connect_volume", vol, _connector("g"))
    backend.run("save_device", vol, json.dumps({"path": "/dev/g"}), "g")
    running = ([("g", True), ("h", False)],
               {"export": True, "hosts": [_initiator("g")]})
    with _modes(backend, "unmap-all"):
        backend.run("disconnect_volume", vol)
        assert (backend.connections(vol), backend.exports(vol)) == running
        backend.run("disconnect_volume", vol, "h")
        assert (backend.connections(vol), backend.exports(vol)) == running
        assert "the connection to host h was not ended" in \
            backend.service.log()
        # The VM stops on g (its host asked: here by name).
        backend.run("disconnect_volume", vol, "g")
        assert backend.connections(vol) == [("h", False)]
        assert backend.exports(vol) == {"export": True, "hosts": []}
        # The last one ends, with the driver: a grant made before the
        # kill would go with it.
        backend.run("disconnect_volume", vol)
        backend.check_agrees(vol, [], how)
    backend.run("delete_volume", vol)
    backend.check_gone(vol, how)


@pytest.mark.parametrize("granted", [False, True],
                         ids=["before-the-grant", "after-the-grant"])
def test_a_delete_ends_a_connection_never_granted_after_the_others(
        backend, granted):
    # delete_volume ends every connection (no host had the volume
    # attached): the one the driver never granted (h's connect killed
    # before initialize_connection returned, or after, before its
    # conn_info was recorded) last, with terminate_connection, once g's
    # complete one was ended.  Ended first, it would unmap g's grant too
    # on Dell SC iSCSI (before the grant: no server for h's initiator);
    # deleted without the driver, it would leave the grant made before
    # the kill, and the backend would refuse to delete the volume.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    if granted:
        number = _first_step(backend, "initialize_connection:after",
                             "connect_volume", _connector("h"))
        backend.killed(number, "connect_volume", vol, _connector("h"))
        assert backend.connections(vol) == [("h", False)]
    else:
        _leave_never_granted(backend, vol, "killed")
    h = [_initiator("h")] if granted else []
    assert backend.exports(vol) == {"export": True, "hosts": h}
    backend.run("connect_volume", vol, _connector("g"))
    with _modes(backend, "unmap-all"):
        backend.run("delete_volume", vol)
    assert backend.terminations(vol) == [
        (_initiator("g"), sorted([_initiator("g")] + h)),
        (_initiator("h"), h)]
    backend.check_gone(vol, granted)


def test_a_disconnect_ends_the_others_when_one_end_fails(backend):
    # The stops of h1 and h2 were killed after they marked their
    # connections ending (their hosts had detached): the engine's next
    # disconnect_volume ends both, unasked.  h1's terminate_connection
    # fails: h2's was not tried in that run, and the command failed,
    # which ovirt-engine cannot retry and which keeps its record of the
    # disk's hosts stale (review-engfix8 M2).  Now h2's is ended, h1's
    # failure is an ERROR, and the next disconnect ends h1's; an
    # admin's by-name disconnect of h1 fails.
    setup = [("connect_volume", _connector("h1")),
             ("connect_volume", _connector("h2"))]
    number = _first_step(backend, "db.set_connection:after",
                         "disconnect_volume", "h1", setup=setup)
    vol = new_id()
    backend.run("create_volume", vol, 1)
    for command in setup:
        backend.run(command[0], vol, *command[1:])
    for host in ("h1", "h2"):
        backend.killed(number, "disconnect_volume", vol, host)
    failure = "Could not end 1 connection(s) of volume {} (host h1: " \
              "".format(vol)
    with open(os.path.join(backend.dir, "fail-terminate"), "w") as f:
        f.write(_initiator("h1") + "\n")
    try:
        backend.run("disconnect_volume", vol)
        assert backend.connections(vol) == [("h1", True)]
        assert backend.exports(vol) == {"export": True,
                                        "hosts": [_initiator("h1")]}
        assert "ERROR" in [line for line in
                           backend.service.log().splitlines()
                           if failure in line][0]
        r = backend.run("disconnect_volume", vol, "h1", code=1)
        assert failure in r.error()
    finally:
        os.unlink(os.path.join(backend.dir, "fail-terminate"))
    backend.run("disconnect_volume", vol)
    backend.check_agrees(vol, [], "-")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "-")


def test_a_connection_never_granted_ends_on_a_driver_that_refuses_it(
        backend):
    # On IBM Storwize/SVC or HPE 3PAR terminate_connection raises for a
    # connector the array has no host for: h's connect killed after its
    # record, the VM run and stopped on g, the stop's disconnect_volume
    # failed for ever, and so did the disk's removal (review-engfix8
    # M1).  cinder would not have called the driver: the record goes,
    # with a WARNING.
    vol = new_id()
    backend.run("create_volume", vol, 1)
    _leave_never_granted(backend, vol, "killed")
    backend.run("connect_volume", vol, _connector("g"))
    backend.run("save_device", vol, json.dumps({"path": "/dev/g"}), "g")
    with _modes(backend, "strict"):
        backend.run("disconnect_volume", vol, "g")
        backend.run("disconnect_volume", vol)
    backend.check_agrees(vol, [], "killed")
    assert "though the driver could not end it (it never granted it)" in \
        backend.service.log()
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "killed")


def test_an_end_the_driver_refuses_is_forced_by_the_admins_override(
        backend):
    # h's stop was killed after terminate_connection took h's last
    # mapping (Storwize then deletes the host object): every later
    # terminate_connection for h raises.  The engine's disconnect logs
    # it, the delete and the admin's by-name disconnect fail, naming the
    # override: h's connector object with "force": true, which ends the
    # record without the driver (review-engfix8 M1).
    setup = [("connect_volume", _connector("h"))]
    number = _step_number(backend, "terminate_connection:after",
                          "disconnect_volume", "h", setup=setup)
    vol = new_id()
    backend.run("create_volume", vol, 1)
    backend.run("connect_volume", vol, _connector("h"))
    backend.killed(number, "disconnect_volume", vol, "h")
    with _modes(backend, "strict"):
        backend.run("disconnect_volume", vol)
        for command in (("disconnect_volume", vol, "h"),
                        ("delete_volume", vol)):
            r = backend.run(*command, code=1)
            assert "Could not end 1 connection(s) of volume {} (host " \
                   "h: ".format(vol) in r.error()
            assert "Failed to get host name from connector" in r.error()
        override = re.search(r"FLOW_ID {} '([^']*)'".format(vol),
                             r.error()).group(1)
        assert json.loads(override)["force"] is True
        assert backend.connections(vol) == [("h", True)]
        backend.run("disconnect_volume", vol, override)
    backend.check_agrees(vol, [], "terminate_connection:after")
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "terminate_connection:after")


def test_a_connect_failing_beside_only_unfinished_ones_takes_its_grant(
        backend):
    # h's connect was killed after its record; the rerun on k granted k,
    # then failed: no complete connection is left, so k's grant is
    # taken back (kept beside h's record, it was named by no record and
    # the backend refused the volume's delete for ever: review-engfix8
    # L1).
    vol = new_id()
    backend.run("create_volume", vol, 1)
    _leave_never_granted(backend, vol, "killed")
    with _modes(backend, "fail-after-grant"):
        backend.run("connect_volume", vol, _connector("k"), code=1)
    assert backend.connections(vol) == [("h", False)]
    assert backend.exports(vol) == {"export": True, "hosts": []}
    backend.run("delete_volume", vol)
    backend.check_gone(vol, "killed")
