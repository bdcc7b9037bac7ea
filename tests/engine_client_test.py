"""The command line contract ovirt-engine depends on (docs/engine.md, "The
contract"), and the ways ours is better than upstream's.

Most tests go through the session's warm service (fast); the tests about
cold runs, and the cold/warm comparison, start real cold processes.
"""

import hashlib
import json
import os
import re
import socket
import time
import uuid

import pytest

from .engine_fixtures import files_in
from .engine_fixtures import new_id
from .engine_fixtures import start_time
from .engine_fixtures import wait_until_ended

SECRET = "s3cr3t-Backend-pw"
# A driver JSON as args.parse requires it (the class is only named here).
FILE_JSON = json.dumps({"volume_driver": "vdsm_managedvolume.engine."
                                        "filedriver.FileDriver"})


def __getattr__(name):
    """Test drivers, built on first use (inside the shim's processes).

    cinderlib imports ``tests.engine_client_test.SlowDriver`` by name; the
    classes are made lazily so that collecting this module does not import
    cinder into pytest.
    """
    if name not in ("SlowDriver", "LeakyDriver", "PausingDriver",
                    "ChattyDriver"):
        raise AttributeError(name)
    from cinder import exception
    from vdsm_managedvolume.engine.filedriver import FileDriver

    class SlowDriver(FileDriver):
        # Says which process runs the operation (slow-<id>.pid in its
        # volume directory), then outlasts any test.
        def create_volume(self, volume):
            path = os.path.join(self._dir, "slow-{}.pid".format(volume.id))
            with open(path + ".tmp", "w") as f:
                f.write("{} {}".format(os.getpid(), start_time(os.getpid())))
            os.rename(path + ".tmp", path)
            time.sleep(120)

    class PausingDriver(FileDriver):
        # Slower than nothing: proves the paths of a request without a
        # timeout (cold thread wait, warm child deadline, forwarding).
        def create_volume(self, volume):
            time.sleep(2)
            return super().create_volume(volume)

    class ChattyDriver(FileDriver):
        # A library that prints, to both streams and straight to fd 2.
        def create_volume(self, volume):
            import sys
            print("error: printed by a library")
            print(volume.id + ": printed to stderr", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(2, b"error: written to fd 2 by C code\n")
            return super().create_volume(volume)

    class LeakyDriver(FileDriver):
        # A backend whose error quotes the password in free text.
        def create_volume(self, volume):
            raise exception.VolumeBackendAPIException(
                data="login admin/{} refused".format(
                    self.configuration.safe_get("san_password")))

    return locals()[name]


def test_every_sub_command_prints_what_the_engine_parses(
        engine_service, engine_shim, engine_backend):
    be = engine_backend

    def run(*args, **kw):
        return engine_shim.run(*args, driver=be["driver"],
                               db_url=be["db_url"], **kw)

    vol = new_id()
    r = run("create_volume", vol, 1, cid="c-create")
    assert (r.stdout, r.code) == (b"", 0), r.describe()
    assert files_in(be["dir"]) == ["volume-" + vol]

    connector = {"host": "host-1", "initiator": "iqn.1994-05.com.redhat:h1"}
    r = run("connect_volume", vol, json.dumps(connector), cid="c-connect")
    assert r.code == 0, r.describe()
    conn = r.json("c-connect")
    device_path = os.path.join(be["dir"], "volume-" + vol)
    assert conn == {"driver_volume_type": "local",
                    "data": {"device_path": device_path,
                             "access_mode": "rw"}}

    # Same host again: the same connection, not a second one.
    r = run("connect_volume", vol, json.dumps(connector), cid="c-again")
    assert r.json("c-again") == conn

    device = {"vol_id": vol, "path": device_path,
              "attachment": {"path": device_path, "type": "local"},
              "managed_path": "/run/vdsm/managedvolumes/x_" + vol}
    r = run("save_device", vol, json.dumps(device), cid="c-save")
    assert (r.stdout, r.code) == (b"", 0), r.describe()

    r = run("get_connection_info", vol, cid="c-info")
    assert r.json("c-info") == {"conn": conn, "connector": connector,
                                "device": device}

    r = run("extend_volume", vol, 2, cid="c-extend")
    assert (r.stdout, r.code) == (b"", 0), r.describe()
    assert os.path.getsize(device_path) == 2 * 1024**3

    r = run("storage_stats", "true", cid="c-stats")
    stats = r.json("c-stats")
    assert stats["volume_backend_name"] == "file"
    assert stats["pools"][0]["provisioned_capacity_gb"] == 2.0

    r = run("create_snapshot", vol, cid="c-snap")
    snap = r.payload("c-snap")
    assert uuid.UUID(snap)      # bare id, not JSON
    assert "snapshot-" + snap in files_in(be["dir"])

    # Optional size (ours): the new volume grows beyond the snapshot's 2.
    r = run("create_volume_from_snapshot", vol, snap, 3, cid="c-from")
    from_snap = r.payload("c-from")
    assert os.path.getsize(os.path.join(be["dir"], "volume-" + from_snap)) \
        == 3 * 1024**3

    clone = new_id()
    r = run("clone_volume", vol, clone, cid="c-clone")
    assert (r.stdout, r.code) == (b"", 0), r.describe()
    assert os.path.getsize(os.path.join(be["dir"], "volume-" + clone)) \
        == 2 * 1024**3

    r = run("remove_snapshot", snap, vol, cid="c-rmsnap")
    assert (r.stdout, r.code) == (b"", 0), r.describe()

    # host-1 is not a real host to ask (engine_migration_test.py asks real
    # ones): name it.
    r = run("disconnect_volume", vol, "host-1", cid="c-disconnect")
    assert (r.stdout, r.code) == (b"", 0), r.describe()
    r = run("get_connection_info", vol, cid="c-info2")
    assert r.code == 1 and "not found" in r.error()

    for v in (vol, from_snap, clone):
        r = run("delete_volume", v, cid="c-delete")
        assert (r.stdout, r.code) == (b"", 0), r.describe()
    assert files_in(be["dir"]) == []


def test_cold_and_warm_runs_print_the_same_bytes_and_exit_codes(
        engine_service, engine_shim, engine_backend, tmp_path):
    be = engine_backend
    vol = new_id()
    missing = new_id()
    r = engine_shim.run("create_volume", vol, 1, driver=be["driver"],
                        db_url=be["db_url"], cid="c-prep")
    assert r.code == 0, r.describe()
    h1 = json.dumps({"host": "h1"})
    assert engine_shim.run("connect_volume", vol, h1, driver=be["driver"],
                           db_url=be["db_url"], cid="c-prep").code == 0

    cases = [
        ("connect_volume", vol, h1),                 # existing connection
        ("get_connection_info", vol),
        ("get_connection_info", vol, "h1"),
        ("get_connection_info", vol, "nowhere"),     # exit 1
        ("create_volume", vol, 1),                   # exists, same size
        ("create_volume", vol, 5),                   # exists, other size
        ("extend_volume", vol, 1),                   # already that size
        ("extend_volume", missing, 2),               # not found: exit 1
        ("delete_volume", missing),                  # not found: exit 0
        ("remove_snapshot", missing, vol),           # not found: exit 0
        ("disconnect_volume", vol, "nowhere"),       # nothing to do
        ("create_volume", vol, "ten"),               # usage: exit 2
        ("no_such_command", vol),                    # usage: exit 2
    ]
    for case in cases:
        cid = "cid-" + case[0]
        warm = engine_shim.run(*case, driver=be["driver"],
                               db_url=be["db_url"], cid=cid)
        cold = engine_shim.run(*case, driver=be["driver"],
                               db_url=be["db_url"], cid=cid, warm=False)
        assert (warm.stdout, warm.code) == (cold.stdout, cold.code), \
            "{}\nwarm: {}\ncold: {}".format(case, warm.describe(),
                                            cold.describe())
        assert warm.stdout.count(b"\n") <= 1
        assert warm.stdout == b"" or warm.stdout.startswith(
            (cid.encode() + b":", b"error:"))
    codes = {case: engine_shim.run(*case, driver=be["driver"],
                                   db_url=be["db_url"]).code
             for case in cases[3:5] + cases[7:9] + cases[11:]}
    assert codes == {cases[3]: 1, cases[4]: 0, cases[7]: 1, cases[8]: 0,
                     cases[11]: 2, cases[12]: 2}


def test_not_found_is_success_only_for_removals(
        engine_service, engine_shim, engine_backend):
    be = engine_backend
    missing = new_id()
    expected = {
        ("delete_volume", missing): 0,
        ("remove_snapshot", new_id(), missing): 0,
        ("disconnect_volume", missing): 0,
        ("extend_volume", missing, 2): 1,
        ("connect_volume", missing, '{"host": "h"}'): 1,
        ("clone_volume", missing, new_id()): 1,
        ("create_snapshot", missing): 1,
        ("save_device", missing, "{}"): 1,
        ("get_connection_info", missing): 1,
        ("create_volume_from_snapshot", missing, new_id()): 1,
    }
    for case, code in expected.items():
        r = engine_shim.run(*case, driver=be["driver"], db_url=be["db_url"])
        assert r.code == code, r.describe()
        # Formatted, unlike upstream's literal "Volume '%s' not found".
        assert r.error() == "Volume {} not found".format(missing)


def test_live_migration_acts_on_the_named_host_connection_only(
        engine_service, engine_shim, engine_backend):
    be = engine_backend

    def run(*args):
        r = engine_shim.run(*args, driver=be["driver"], db_url=be["db_url"],
                            cid="cid")
        assert r.code == 0, r.describe()
        return r

    vol = new_id()
    run("create_volume", vol, 1)
    run("connect_volume", vol, json.dumps({"host": "src"}))
    run("save_device", vol, json.dumps({"path": "/dev/src-path"}))
    # Migration: the destination connects while the source keeps its own.
    run("connect_volume", vol, json.dumps({"host": "dst"}))
    # Without a host, save_device picks the connection that has no device
    # yet (upstream overwrote the source's, the first one).
    run("save_device", vol, json.dumps({"path": "/dev/dst-path"}))
    src = run("get_connection_info", vol, "src").json("cid")
    dst = run("get_connection_info", vol,
              json.dumps({"host": "dst", "ip": "10.0.0.2"})).json("cid")
    assert src["device"] == {"path": "/dev/src-path"}
    assert dst["device"] == {"path": "/dev/dst-path"}

    # The migration is done: drop the source's connection only.
    run("disconnect_volume", vol, "src")
    only = run("get_connection_info", vol).json("cid")
    assert only["connector"] == {"host": "dst"}
    assert only["device"] == {"path": "/dev/dst-path"}

    # The engine's form, without a host: "dst" cannot be asked (no such
    # host), so its connection stays (engine_migration_test.py has hosts).
    run("disconnect_volume", vol)
    assert "Keeping the connection of volume {} to host dst".format(vol) \
        in engine_service.log()
    assert run("get_connection_info", vol).json("cid")["connector"] == \
        {"host": "dst"}
    run("disconnect_volume", vol, "dst")
    r = engine_shim.run("get_connection_info", vol, driver=be["driver"],
                        db_url=be["db_url"])
    assert r.code == 1
    run("delete_volume", vol)


def test_secrets_may_come_from_file_stdin_or_environment(
        engine_service, engine_shim, engine_backend, tmp_path):
    be = engine_backend
    driver_file = tmp_path / "driver.json"
    driver_file.write_text(json.dumps(be["driver"]))
    url_file = tmp_path / "db_url"
    url_file.write_text(be["db_url"] + "\n")
    vol = new_id()

    r = engine_shim.run("create_volume", vol, 1, driver="@" + str(driver_file),
                        db_url="@" + str(url_file))
    assert r.code == 0, r.describe()
    r = engine_shim.run("connect_volume", vol, '{"host": "h"}', driver="-",
                        db_url="env:", stdin=json.dumps(be["driver"]).encode(),
                        env={"MANAGEDVOLUME_DB_URL": be["db_url"]}, cid="c1")
    assert r.json("c1")["data"]["device_path"].endswith(vol)
    r = engine_shim.run("get_connection_info", vol, driver="env:MY_DRIVER",
                        db_url="-", stdin=be["db_url"].encode(), cid="c2",
                        env={"MY_DRIVER": json.dumps(be["driver"])})
    assert r.json("c2")["connector"] == {"host": "h"}

    r = engine_shim.run("delete_volume", vol, driver="env:UNSET_VAR",
                        db_url=be["db_url"])
    assert r.code == 2
    assert r.error() == ("DRIVER_JSON: environment variable UNSET_VAR is "
                         "not set")
    r = engine_shim.run("delete_volume", vol, driver="-", db_url="-")
    assert r.code == 2 and "stdin" in r.error()

    r = engine_shim.run("disconnect_volume", vol, driver=be["driver"],
                        db_url=be["db_url"])
    r = engine_shim.run("delete_volume", vol, driver=be["driver"],
                        db_url=be["db_url"])
    assert (r.stdout, r.code) == (b"", 0), r.describe()


def test_usage_errors_are_one_error_line_and_never_echo_the_driver(
        engine_shim, engine_backend):
    be = engine_backend
    secret_json = '{"san_password": "%s", broken' % SECRET
    cases = [
        ((), "expected SUB-COMMAND DRIVER_JSON DB_URL CORRELATION_ID"),
        (("create_volume", secret_json, be["db_url"], "cid", new_id(), "1"),
         "DRIVER_JSON is not valid JSON"),
        (("create_volume", "[1]", be["db_url"], "cid", new_id(), "1"),
         "DRIVER_JSON must be a JSON object"),
        (("create_volume", "{}", be["db_url"], "cid", new_id()),
         "create_volume takes volume_id size, got 1 argument(s)"),
        (("storage_stats", "{}", be["db_url"], "cid", "maybe"),
         "refresh must be true or false"),
        (("--timeout", "-1", "storage_stats", "{}", be["db_url"], "cid",
          "true"), "--timeout must be a positive number"),
        (("--bogus", "storage_stats"), "unknown option --bogus"),
        (("storage_stats", "{}", be["db_url"], "", "true"),
         "invalid correlation id"),
        (("--host-port", "99999", "storage_stats", "{}", be["db_url"], "c",
          "true"), "--host-port must be a port number"),
        (("--host-addresses", "h1", "storage_stats", "{}", be["db_url"], "c",
          "true"), "--host-addresses: expected HOST=ADDRESS[:PORT]"),
        # The engine's argv without its sub-command: the driver JSON first.
        (('{"san_password": "%s"}' % SECRET, be["db_url"], "cid", new_id()),
         "unknown sub-command '{\"san_password\": \"********\"}'"),
        (("--log-level", "NOPE", "storage_stats", "{}", be["db_url"], "c",
          "true"), "--log-level must be one of DEBUG, INFO"),
        (("--timeout", "1e10", "storage_stats", "{}", be["db_url"], "c",
          "true"), "--timeout must be a positive number of seconds up to"),
        (("storage_stats", "{}", be["db_url"], "c\rd", "true"),
         "invalid correlation id 'c\\rd'"),
        (("connect_volume", "{}", be["db_url"], "c", new_id(),
          "[" * 100000), "connector_info is nested more than"),
        (("connect_volume", "{}", be["db_url"], "c", new_id(),
          '{"host": ["h1"]}'), "connector_info has no host"),
        (("storage_stats", "{}",
          "postgresql://engine:DB@%s@127.0.0.1:1/ovirt" % SECRET, "c",
          "true"), "DB_URL holds more than one '@'"),
    ]
    import subprocess
    from .engine_fixtures import client_argv
    for argv, message in cases:
        proc = subprocess.run(client_argv() + list(argv), capture_output=True,
                              env=engine_shim.env, timeout=60)
        out = proc.stdout.decode()
        assert proc.returncode == 2, (argv, out, proc.stderr)
        assert out.startswith("error:" + message), (argv, out)
        assert out.count("\n") == 1
        assert SECRET not in out + proc.stderr.decode()


def test_inline_secrets_are_hidden_in_output_logs_and_cmdline(
        engine_shim, tmp_path):
    log_file = tmp_path / "engine.log"
    driver = {"volume_driver": "tests.engine_client_test.LeakyDriver",
              "volume_backend_name": "leaky",
              "file_volume_dir": str(tmp_path / "vols"),
              "san_password": SECRET}
    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    r = engine_shim.run("create_volume", new_id(), 1, driver=driver,
                        db_url=db_url, cid="c-leak", warm=False,
                        options=["--log-file", str(log_file)])
    assert r.code == 1
    assert r.error().endswith("login admin/******** refused")
    text = log_file.read_text()
    assert "login admin/******** refused" in text
    for where in (r.stdout.decode(), r.stderr, text):
        assert SECRET not in where

    # While a (slow) operation runs, /proc/PID/cmdline shows it masked.
    driver["volume_driver"] = "tests.engine_client_test.SlowDriver"
    proc = engine_shim.popen("create_volume", new_id(), 1, driver=driver,
                             db_url=db_url, warm=False,
                             options=["--timeout", "20"])
    try:
        deadline = time.monotonic() + 20
        while True:
            with open("/proc/{}/cmdline".format(proc.pid), "rb") as f:
                cmdline = f.read().decode()
            if "********" in cmdline or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert "********" in cmdline
        assert SECRET not in cmdline
    finally:
        proc.kill()
        proc.communicate()


def test_timeout_gives_a_clear_error_cold_and_warm(
        engine_service, engine_shim, tmp_path):
    driver = {"volume_driver": "tests.engine_client_test.SlowDriver",
              "volume_backend_name": "slow",
              "file_volume_dir": str(tmp_path / "vols")}
    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    # The service set up for this database first, without a timeout: a
    # setup longer than the request's 3 s (a loaded machine) would stop
    # the service that the session shares.
    r = engine_shim.run("storage_stats", "false", driver=driver,
                        db_url=db_url)
    assert r.code == 0, r.describe()
    for warm in (True, False):
        vol = new_id()
        r = engine_shim.run("create_volume", vol, 1, driver=driver,
                            db_url=db_url, warm=warm,
                            options=["--timeout", "3"])
        assert r.code == 1, r.describe()
        assert r.stdout == b"error:create_volume did not finish within 3 " \
                           b"seconds\n"
        assert "Traceback" not in r.stdout.decode()
        # The log says where the operation was when it was given up.
        text = engine_service.log() if warm else r.stderr
        assert "create_volume was given up at:" in text
        pid_file = tmp_path / "vols" / "slow-{}.pid".format(vol)
        if not pid_file.exists():
            # A loaded machine: the 3 s ran out before the driver was
            # called (the cold run still importing cinderlib, the warm
            # child still starting); the log above says where it was.
            continue
        assert "time.sleep(120)" in text
        # The operation ends with its answer: the process that ran the
        # driver (the warm child, or the cold command itself) is gone, so
        # nothing finishes later behind the engine's back.
        pid, started = (int(v) for v in pid_file.read_text().split())
        wait_until_ended(pid, started)


# Imported first by a cold run whose PYTHONPATH starts with its directory
# (site's sitecustomize): the operation's thread stops for good just after
# cl.setup's oslo.log put its handlers (and formatter) on the root logger,
# before the shim puts its own back.
_STOP_IN_OSLO_LOGGING = """
import logging, os, time
_set = logging.Handler.setFormatter
def setFormatter(self, fmt):
    _set(self, fmt)
    if type(fmt).__module__.startswith("oslo_log"):
        open(os.environ["STOPPED_MARK"], "w").close()
        time.sleep(600)
logging.Handler.setFormatter = setFormatter
"""


def test_a_command_given_up_inside_cinderlib_setup_says_where(
        engine_shim, tmp_path):
    # Given up while oslo.log's handlers held the root logger (a cold run
    # on a loaded machine): its formatter failed on the shim's records,
    # and the log had "--- Logging error ---" with the stack as a tuple's
    # repr instead of what was given up and where.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_STOP_IN_OSLO_LOGGING)
    mark = tmp_path / "stopped"
    env = {"PYTHONPATH": str(site) + os.pathsep +
           engine_shim.env["PYTHONPATH"], "STOPPED_MARK": str(mark)}
    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    # Long enough to reach the stop: importing cinderlib takes 1-6 s.
    for timeout in (5, 10, 20, 40, 80):
        r = engine_shim.run("create_volume", new_id(), 1, driver=FILE_JSON,
                            db_url=db_url, warm=False, env=env,
                            options=["--timeout", str(timeout)])
        assert r.code == 1, r.describe()
        if mark.exists():
            break
    assert mark.exists(), r.describe()
    assert r.stdout == "error:create_volume did not finish within {} " \
                       "seconds\n".format(timeout).encode()
    assert "create_volume did not finish within {} seconds; giving " \
           "up".format(timeout) in r.stderr, r.describe()
    assert "create_volume was given up at:\n" in r.stderr, r.describe()
    assert "time.sleep(600)" in r.stderr
    assert "Logging error" not in r.stderr, r.describe()


def test_a_postgresql_server_that_never_answers_fails_the_command(
        engine_shim, tmp_path):
    # A server gone without a reset (a powered-off host): the connection
    # is made (here: a listening socket nobody serves), then nothing.
    # libpq waited for ever, and the command until the shim's timeout.
    # Cold: a warm service must not set up on a database that hangs.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = "postgresql+psycopg2://engine:{}@127.0.0.1:{}/db".format(
            SECRET, server.getsockname()[1])
        r = engine_shim.run(
            "storage_stats", "true", driver=FILE_JSON,
            db_url=url, warm=False, options=["--timeout", "100"])
    assert r.code == 1, r.describe()
    error = r.error()
    assert error.startswith("storage_stats failed: OperationalError: "), \
        r.describe()
    assert "timeout expired" in error and SECRET not in error


def test_logs_carry_the_correlation_id_and_survive_cinderlib_setup(
        engine_service, engine_shim, engine_backend, tmp_path):
    be = engine_backend
    # A venv whose rootwrap.conf cinderlib would rewrite
    # (docs/dependencies.md, "cinderlib").
    venv = tmp_path / "venv"
    (venv / "etc" / "cinder").mkdir(parents=True)
    rootwrap = venv / "etc" / "cinder" / "rootwrap.conf"
    rootwrap.write_text("[DEFAULT]\nfilters_path=/etc/cinder/rootwrap.d\n"
                        "exec_dirs=/sbin,/usr/sbin,/bin,/usr/bin\n")
    before = hashlib.sha256(rootwrap.read_bytes()).hexdigest()

    for warm in (False, True):
        log_file = tmp_path / "engine-{}.log".format(warm)
        vol = new_id()
        cid = "flow-{}".format(uuid.uuid4().hex[:8])
        r = engine_shim.run("create_volume", vol, 1, driver=be["driver"],
                            db_url=be["db_url"], cid=cid, warm=warm,
                            options=["--log-file", str(log_file)],
                            env={"VIRTUAL_ENV": str(venv)})
        assert r.code == 0, r.describe()
        lines = log_file.read_text().splitlines()
        # Lines written after cl.setup: cinderlib did not silence us.
        assert any("Creating volume {}".format(vol) in line
                   for line in lines), lines
        assert any("create_volume done" in line for line in lines), lines
        records = [line for line in lines if re.match(r"\d{4}-\d\d-\d\d ",
                                                      line)]
        assert records and all("[flow={}]".format(cid) in line
                               for line in records), records
        # Nothing on stderr when logging to a file.
        assert r.stderr == "", r.stderr

    assert hashlib.sha256(rootwrap.read_bytes()).hexdigest() == before


def test_engine_style_invocation_without_options_uses_the_environment(
        engine_service, engine_shim, engine_backend):
    """ovirt-engine passes no options: the environment carries ours."""
    import subprocess
    from .engine_fixtures import client_argv
    be = engine_backend
    env = dict(engine_shim.env,
               MANAGEDVOLUME_ENGINE_SOCKET=engine_service.socket_path)
    cid = "engine-" + uuid.uuid4().hex[:8]
    proc = subprocess.run(
        client_argv() + ["storage_stats", json.dumps(be["driver"]),
                         be["db_url"], cid, "false"],
        capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(cid.encode() + b":{")
    # Answered by the warm service.
    assert "[flow={}] Child ".format(cid) in engine_service.log()


def test_help_lists_every_sub_command(engine_shim):
    import subprocess
    from .engine_fixtures import client_argv
    proc = subprocess.run(client_argv() + ["--help"], capture_output=True,
                          env=engine_shim.env, timeout=60)
    assert proc.returncode == 0
    from vdsm_managedvolume.engine import args
    for name, (required, optional) in args.COMMANDS.items():
        assert "  {} {}".format(name, " ".join(
            list(required) + ["[{}]".format(o) for o in optional])).encode() \
            in proc.stdout
    assert len(args.COMMANDS) == 12
    assert b'the first line starting with "error" or\n"CORRELATION_ID:"' \
        in proc.stdout
    # It teaches: what it is, each option, an example; in 80 columns.
    text = proc.stdout.decode()
    assert "ovirt-engine's cinderlib client" in text
    for option in sorted(args._VALUED | {"--cold", "--serve"}):
        assert option + " " in text, option
    assert "\nexample" in text
    assert [line for line in text.splitlines() if len(line) > 80] == []
    # No line of the help reads as an answer to the engine.
    assert not [line for line in text.splitlines()
                if line.startswith("error")]


def test_the_help_example_creates_a_volume(engine_shim, tmp_path):
    import subprocess
    from .engine_fixtures import client_argv
    text = subprocess.run(client_argv() + ["--help"], capture_output=True,
                          env=engine_shim.env, timeout=60,
                          universal_newlines=True).stdout
    lines = text[text.index("\nexample"):].splitlines()[2:]
    example = "\n".join(lines[:lines.index("")])
    example = example.replace("/tmp/", str(tmp_path) + "/").replace(
        "managedvolume-cinderlib-client", " ".join(client_argv()), 1)
    env = dict(engine_shim.env, MANAGEDVOLUME_ENGINE_COLD="1")
    proc = subprocess.run(["bash", "-e", "-c", example], capture_output=True,
                          env=env, timeout=240)
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr
    assert os.listdir(str(tmp_path / "vols")) == [
        "volume-9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"]


def test_version_prints_the_package_version(engine_shim):
    import subprocess
    from vdsm_managedvolume import __version__
    from .engine_fixtures import client_argv
    proc = subprocess.run(client_argv() + ["--version"], capture_output=True,
                          env=engine_shim.env, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout == "managedvolume-cinderlib-client {}\n".format(
        __version__).encode()


def test_only_arguments_that_may_hold_a_secret_load_the_masker():
    """The forwarding command skips ``mask`` for arguments it would not
    change; every shape ``mask`` hides must therefore count as "may"."""
    from vdsm_managedvolume import mask
    from vdsm_managedvolume.engine import client
    shapes = ['{{"{}": "v4lue"}}'.format(word.upper())
              for word in mask._SECRET_WORDS]
    shapes += ["auth_x=v4lue", '{"discovery_auth_pw": "v4lue"}',
               "postgresql+psycopg2://user:v4lue@host/db",
               "key = AQBw5ExlAAAAABAAm0IySNT0tDMWb6IAN+Wksw==",
               "AQBw5ExlAAAAABAAm0IySNT0tDMWb6IAN+Wksw==",
               "iscsiadm -n node.session.auth.password -v v4lue",
               "PASSWORD%3Dv4lue",
               # Case-folding forms: a long s, a Kelvin sign.
               "\u017fecret=v4lue", '{"to\u212aen": "v4lue"}']
    for text in shapes:
        assert mask.mask_text(text) != text, text
        assert client._may_hold_secret(text), text
    # What the engine passes for a backend without credentials, a connector
    # and a device: nothing to hide, nothing loaded.
    for text in ('{"volume_backend_name": "file", "file_volume_dir": '
                 '"/var/lib/managedvolume-file"}',
                 "sqlite:////var/lib/engine/cinderlib.db",
                 '{"host": "host1", "initiator": "iqn.1994-05.com.redhat:1",'
                 ' "multipath": true}', '{"path": "/dev/dm-3"}', new_id()):
        assert mask.mask_text(text) == text
        assert not client._may_hold_secret(text), text


def _log_records(text):
    return [line for line in text.splitlines()
            if re.match(r"\d{4}-\d\d-\d\d ", line)]


def test_expected_errors_are_one_log_line_and_a_traceback_only_at_debug(
        engine_service, engine_shim, engine_backend, tmp_path):
    """The default log is stderr, which the engine captures with stdout:
    an ordinary failure must not bury its reason in a traceback."""
    be = engine_backend
    vol = new_id()
    r = engine_shim.run("create_volume", vol, 1, driver=be["driver"],
                        db_url=be["db_url"], warm=False)
    assert r.code == 0, r.describe()
    missing_dir_db = "sqlite:///{}".format(tmp_path / "no-such-dir" / "db")
    cases = [
        # An EngineError of ours: the volume exists with another size.
        (("create_volume", vol, 2), be["db_url"], "already exists"),
        # The database's own error (oslo.db / SQLAlchemy).
        (("create_volume", new_id(), 1), missing_dir_db,
         "unable to open database file"),
    ]
    for case, db_url, reason in cases:
        r = engine_shim.run(*case, driver=be["driver"], db_url=db_url,
                            warm=False)
        assert r.code == 1, r.describe()
        assert reason in r.error()
        assert "Traceback" not in r.stderr, r.stderr
        errors = [line for line in _log_records(r.stderr)
                  if " ERROR " in line]
        assert len(errors) == 1 and reason in errors[0], r.stderr
        # Every line of the log is a record: nothing else on stderr.
        assert _log_records(r.stderr) == r.stderr.splitlines(), r.stderr

        r = engine_shim.run(*case, driver=be["driver"], db_url=db_url,
                            warm=False, options=["--log-level", "DEBUG"])
        assert r.code == 1
        assert "Traceback" in r.stderr

    # Warm: the same one line in the request's log file.
    log_file = tmp_path / "warm.log"
    r = engine_shim.run("create_volume", vol, 2, driver=be["driver"],
                        db_url=be["db_url"],
                        options=["--log-file", str(log_file)])
    assert r.code == 1, r.describe()
    text = log_file.read_text()
    assert "Traceback" not in text
    assert len([line for line in _log_records(text)
                if " ERROR " in line]) == 1, text
    assert "[flow=cid-test] Child " in engine_service.log()     # was warm


def test_an_unexpected_error_is_one_log_line_and_a_traceback_at_debug(
        engine_shim, engine_backend, tmp_path):
    """A bug (here: a "service" answering garbage) still prints its
    ``error:`` line; the log gets one ERROR line, the traceback at DEBUG."""
    import socket
    import threading
    be = engine_backend
    path = str(tmp_path / "garbage.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(4)

    def answer_garbage():
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"this is not JSON")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        from .engine_fixtures import Shim
        shim = Shim(engine_shim.run_dir, path)
        r = shim.run("storage_stats", "true", driver=be["driver"],
                     db_url=be["db_url"])
        assert r.code == 1, r.describe()
        assert r.error().startswith("internal error: JSONDecodeError: ")
        assert "Traceback" not in r.stderr
        errors = [line for line in _log_records(r.stderr)
                  if " ERROR " in line]
        assert len(errors) == 1 and "JSONDecodeError" in errors[0], r.stderr
        assert _log_records(r.stderr) == r.stderr.splitlines(), r.stderr

        r = shim.run("storage_stats", "true", driver=be["driver"],
                     db_url=be["db_url"], options=["--log-level", "DEBUG"])
        assert r.code == 1
        assert "Traceback" in r.stderr and "JSONDecodeError" in r.stderr
    finally:
        thread.join(30)
        server.close()


def test_sigusr1_shows_a_forwarding_command_waiting_and_it_goes_on(
        engine_shim, engine_backend, tmp_path):
    """docs/engine.md: ``kill -USR1`` a command that does not end shows
    where it is.  A command forwarded to the warm service only waits for
    its answer: the signal must show that wait, not kill the command (the
    engine would see a failure while the service goes on with the
    operation)."""
    import signal
    import socket
    import threading
    from .engine_fixtures import Shim
    be = engine_backend
    path = str(tmp_path / "slow.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(1)
    received = threading.Event()
    answer = threading.Event()

    def answer_when_told():
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            received.set()
            answer.wait(120)
            try:
                conn.sendall(json.dumps({"output": "forwarded answer\n",
                                         "exit_code": 0}).encode())
            except OSError:
                pass            # the command is gone: the test says so

    thread = threading.Thread(target=answer_when_told, daemon=True)
    thread.start()
    proc = Shim(engine_shim.run_dir, path).popen(
        "storage_stats", "true", driver=be["driver"], db_url=be["db_url"])
    try:
        assert received.wait(60)
        os.kill(proc.pid, signal.SIGUSR1)
        shown = []
        for line in proc.stderr:
            shown.append(line.decode("utf-8", "replace"))
            if "most recent call first" in line.decode("utf-8", "replace"):
                break
        # The dump's first lines: where the command waits.
        shown += [proc.stderr.readline().decode() for _ in range(3)]
        assert "most recent call first" in "".join(shown), \
            (proc.poll(), shown)
        assert "forward.py" in "".join(shown), shown
        answer.set()
        out, _ = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (0, b"forwarded answer\n")
    finally:
        answer.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        thread.join(30)
        server.close()


def test_a_bad_id_is_a_usage_error_and_creates_nothing(
        engine_shim, engine_backend):
    be = engine_backend
    for warm in (False, True):
        r = engine_shim.run("create_volume", "not-a-uuid", 1, warm=warm,
                            driver=be["driver"], db_url=be["db_url"])
        assert r.code == 2, r.describe()
        assert r.stdout == b"error:volume_id must be a UUID, got " \
                           b"'not-a-uuid'\n"
    # Refused before cinderlib: no volume file, not even a database.
    assert files_in(be["dir"]) == []
    assert not os.path.exists(be["db_url"][len("sqlite:///"):])


def test_a_cold_run_creates_its_locks_directories_private(
        engine_shim, engine_backend, tmp_path):
    be = engine_backend
    locks = tmp_path / "new" / "run" / "locks"
    r = engine_shim.run("storage_stats", "false", driver=be["driver"],
                        db_url=be["db_url"], warm=False,
                        options=["--locks-dir", str(locks)])
    assert r.code == 0, r.describe()
    for path in (locks, locks.parent, locks.parent.parent):
        assert oct(path.stat().st_mode & 0o777) == oct(0o700), path


# The shim as ovirt-engine runs it (ManagedBlockExecutor)

def engine_reads(merged, cid):
    """What ManagedBlockExecutor.getOutput returns from the merged output:
    the first line starting with "error" (minus 6 characters) or with the
    correlation id (minus the id and one character)."""
    for line in merged.decode("utf-8").splitlines():
        if line.startswith("error"):
            return line[len("error") + 1:]
        if line.startswith(cid):
            return line[len(cid) + 1:]
    return ""


def run_as_engine(engine_shim, *args, driver, db_url, cid, warm=True,
                  env=None):
    """Run the client with stderr merged into stdout, as the engine does,
    with the engine's environment (no log option: the defaults)."""
    import subprocess
    argv, full_env = engine_shim.command(*args, driver=driver, db_url=db_url,
                                         cid=cid, warm=warm)
    full_env.pop("MANAGEDVOLUME_ENGINE_LOG_FILE")
    full_env.update(env or {})
    proc = subprocess.run(argv, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=full_env, timeout=240)
    return proc.returncode, proc.stdout


@pytest.mark.parametrize("cid", ["error-4f1c", "2026-11-30 22:00:01,123 x",
                                 "e2b8c1d4-flow"])
def test_the_engine_reads_the_answer_whatever_the_correlation_id(
        engine_service, engine_shim, engine_backend, tmp_path, cid):
    be = engine_backend
    env = {"ENGINE_LOG": str(tmp_path / "log")}
    vol = new_id()
    code, out = run_as_engine(engine_shim, "create_volume", vol, 1,
                              driver=be["driver"], db_url=be["db_url"],
                              cid=cid, env=env)
    assert (code, out) == (0, b"")
    connector = json.dumps({"host": "h1"})
    answers = []
    for warm in (True, False):
        code, out = run_as_engine(
            engine_shim, "connect_volume", vol, connector,
            driver=be["driver"], db_url=be["db_url"], cid=cid, warm=warm,
            env=env)
        assert code == 0, out
        # Only the answer: the log went to the engine's log directory.
        assert out.count(b"\n") == 1, out
        answers.append(json.loads(engine_reads(out, cid)))
    assert answers[0] == answers[1]
    assert answers[0]["data"]["device_path"].endswith(vol)
    if cid.startswith("error"):
        assert out.startswith(b"error:{")
    with open(tmp_path / "log" / "managedblock" / "managedvolume.log") as f:
        assert "[flow={}] connect_volume done".format(cid) in f.read()


def test_logs_go_to_the_engines_log_dir_never_to_stderr_unless_asked(
        engine_shim, engine_backend, tmp_path):
    be = engine_backend

    def run(env, options=()):
        argv, full_env = engine_shim.command(
            "storage_stats", "false", driver=be["driver"],
            db_url=be["db_url"], cid="logs", warm=False, options=options)
        full_env.pop("MANAGEDVOLUME_ENGINE_LOG_FILE")
        full_env.update(env)
        import subprocess
        return subprocess.run(argv, capture_output=True, env=full_env,
                              timeout=240)

    p = run({"ENGINE_LOG": str(tmp_path / "log")})
    assert (p.returncode, p.stderr) == (0, b""), p.stderr
    log = tmp_path / "log" / "managedblock" / "managedvolume.log"
    assert "[flow=logs] storage_stats done" in log.read_text()
    assert oct(log.stat().st_mode & 0o777) == oct(0o640)

    # A log directory that cannot be written: the private run directory's
    # file instead, still nothing on stderr.
    (tmp_path / "not-a-dir").write_text("")
    p = run({"ENGINE_LOG": str(tmp_path / "not-a-dir"),
             "ENGINE_TMP": str(tmp_path / "etmp")})
    assert (p.returncode, p.stderr) == (0, b""), p.stderr
    fallback = tmp_path / "etmp" / "managedvolume-engine" / "managedvolume.log"
    text = fallback.read_text()
    assert "Cannot write the log file {}".format(
        tmp_path / "not-a-dir" / "managedblock" / "managedvolume.log") in text
    assert "[flow=logs] storage_stats done" in text

    # Asked for: stderr.
    p = run({}, options=["--log-file", "-"])
    assert p.returncode == 0
    assert b"[flow=logs] storage_stats done" in p.stderr


def test_a_driver_config_without_a_driver_that_imports_is_an_error(
        engine_service, engine_shim, tmp_path):
    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    vols = tmp_path / "vols"
    vol = new_id()
    for driver, message in [
            ({"file_volume_dir": str(vols)},
             "DRIVER_JSON has no volume_driver (the cinder driver class, "
             "e.g. vdsm_managedvolume.engine.filedriver.FileDriver)"),
            ({"volume_driver": "cinder.volume.drivers.nope.NopeDriver",
              "file_volume_dir": str(vols)},
             "volume_driver cinder.volume.drivers.nope.NopeDriver cannot be "
             "imported"),
            ({"volume_driver": "vdsm_managedvolume.engine.filedriver.Nope",
              "file_volume_dir": str(vols)},
             "module vdsm_managedvolume.engine.filedriver has no Nope")]:
        for warm in (True, False):
            r = engine_shim.run("create_volume", vol, 1, driver=driver,
                                db_url=db_url, warm=warm)
            assert r.code == 1, r.describe()
            assert message in r.error()
    assert files_in(str(vols)) == []
    # A relative file_volume_dir would be another directory for a cold
    # command (the engine's cwd) than for the warm service (/).
    for warm in (True, False):
        r = engine_shim.run("create_volume", vol, 1, db_url=db_url,
                            warm=warm, driver={
                                "file_volume_dir": "relative/vols",
                                "volume_driver": "vdsm_managedvolume."
                                "engine.filedriver.FileDriver"})
        assert r.code == 1, r.describe()
        assert "file_volume_dir 'relative/vols' is not an absolute path" \
            in r.error()
    # The engine's "adapter" key is ovirt-engine's, not the driver's.
    r = engine_shim.run("create_volume", vol, 1, db_url=db_url, driver={
        "adapter": "managedvolume", "file_volume_dir": str(vols),
        "volume_driver": "vdsm_managedvolume.engine.filedriver.FileDriver"})
    assert (r.code, r.stdout) == (0, b""), r.describe()
    assert files_in(str(vols)) == ["volume-" + vol]


def test_a_timeout_by_default_and_an_abandoned_operation_never_succeeds(
        engine_service, engine_shim, tmp_path):
    from vdsm_managedvolume.engine import args

    def timeout(command, *rest, options=(), environ=None):
        argv = list(options) + [command, FILE_JSON, "sqlite://", "c"]
        return args.parse(argv + list(rest), environ=environ or {})[
            1].timeout

    # A hung command would hold an engine thread (and the VM's lock in
    # RunVm/MigrateVm) for ever: minutes for a VM's start, stop and
    # migration, hours for provisioning, which may copy a volume.
    vol, conn = new_id(), '{"host": "h"}'
    assert timeout("connect_volume", vol, conn) == 300
    assert timeout("disconnect_volume", vol) == 300
    assert timeout("save_device", vol, "{}") == 300
    assert timeout("get_connection_info", vol) == 300
    assert timeout("storage_stats", "true") == 300
    assert timeout("clone_volume", vol, new_id()) == 6 * 3600
    assert timeout("create_volume", vol, "1") == 6 * 3600
    assert set(args.DEFAULT_TIMEOUTS) == set(args.COMMANDS)
    # Set, one limit for every sub-command; 0: none.
    for command, rest in (("storage_stats", ["true"]),
                          ("clone_volume", [vol, new_id()])):
        assert timeout(command, *rest, options=["--timeout", "0"]) is None
        assert timeout(command, *rest, environ={args.ENV_TIMEOUT: "0"}) \
            is None
        assert timeout(command, *rest, environ={args.ENV_TIMEOUT: "7"}) == 7
        assert timeout(command, *rest, options=["--timeout", "9"],
                       environ={args.ENV_TIMEOUT: "7"}) == 9

    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    pausing = {"volume_driver": "tests.engine_client_test.PausingDriver",
               "volume_backend_name": "slow",
               "file_volume_dir": str(tmp_path / "vols")}
    for warm, options in ((True, []), (False, []), (True, ["--timeout", "0"]),
                          (False, ["--timeout", "0"])):
        r = engine_shim.run("create_volume", new_id(), 1, driver=pausing,
                            db_url=db_url, warm=warm, options=options)
        assert (r.code, r.stdout) == (0, b""), r.describe()

    # A run that gives up says so (exit 1), and the operation it abandoned
    # does not finish later behind the engine's back: the process that ran
    # it is gone (PausingDriver would have made the file after 2 s).
    for warm in (True, False):
        vol = new_id()
        r = engine_shim.run("create_volume", vol, 1, driver=pausing,
                            db_url=db_url, warm=warm,
                            options=["--timeout", "0.5"])
        assert r.code == 1, r.describe()
        assert r.error() == "create_volume did not finish within 0.5 " \
                            "seconds"
        time.sleep(3)
        assert "volume-" + vol not in files_in(str(tmp_path / "vols"))
        r = engine_shim.run("get_connection_info", vol, driver=pausing,
                            db_url=db_url)
        assert "Volume {} not found".format(vol) == r.error()


@pytest.mark.root
def test_engine_tmp_holds_the_run_dir_and_another_users_is_refused(
        engine_shim, engine_backend, tmp_path):
    # The run dir holds the fallback log (and the default socket), not
    # the locks (args.default_locks_dir): a log file that cannot be
    # written sends the log there.
    be = engine_backend
    env = dict(engine_shim.env)
    env["MANAGEDVOLUME_ENGINE_LOG_FILE"] = str(tmp_path / "no" / "x.log")
    (tmp_path / "no").write_text("")

    def run(engine_tmp):
        import subprocess
        argv, _ = engine_shim.command("storage_stats", "false",
                                      driver=be["driver"],
                                      db_url=be["db_url"], cid="tmp",
                                      warm=False)
        env["ENGINE_TMP"] = str(engine_tmp)
        return subprocess.run(argv, capture_output=True, env=env,
                              timeout=240)

    mine = tmp_path / "engine-tmp"
    mine.mkdir()
    p = run(mine)
    assert p.returncode == 0, p
    run_dir = mine / "managedvolume-engine"
    assert oct(run_dir.stat().st_mode & 0o777) == oct(0o700)
    assert os.listdir(str(run_dir)) == ["managedvolume.log"]

    # Another user's: nothing is written there (the log is lost rather
    # than put where they read it).
    theirs = tmp_path / "shared-tmp"
    (theirs / "managedvolume-engine").mkdir(parents=True)
    os.chown(str(theirs / "managedvolume-engine"), 65534, 65534)
    p = run(theirs)
    assert p.returncode == 0, p
    assert os.listdir(str(theirs / "managedvolume-engine")) == []


def test_host_addresses_take_ports_and_ipv6_and_the_connector_decides_order():
    from vdsm_managedvolume.engine import args, hosts
    addresses = args.parse_addresses(
        "a.example=192.0.2.1, b=[2001:db8::2]:5432;c=2001:db8::3,d=h:1")
    assert addresses == {"a.example": "192.0.2.1", "b": "[2001:db8::2]:5432",
                         "c": "2001:db8::3", "d": "h:1"}
    for bad in ("a", "=x", "a=", "a=h:0", "a=h:99999", "a=h:port"):
        with pytest.raises(ValueError):
            args.parse_addresses(bad)
    s = hosts.Settings(port=7, addresses=addresses)
    assert s.endpoints({"host": "b", "ip": "10.0.0.9"}) == [
        ("2001:db8::2", 5432)]
    assert s.endpoints({"host": "c"}) == [("2001:db8::3", 7)]
    # Not configured: the connector's ip, then its host name.
    assert s.endpoints({"host": "e", "ip": "10.0.0.5"}) == [
        ("10.0.0.5", 7), ("e", 7)]
    assert s.endpoints({}) == []


def test_a_host_is_the_connections_host_by_every_identity_it_had():
    from vdsm_managedvolume.engine import hosts
    stored = {"host": "h1", "initiator": "iqn.a", "uuid": "u1",
              "wwpns": ["50014380186af83c", "50014380186af83e"],
              "ip": "10.0.0.1", "multipath": True}
    same = dict(stored, ip="10.0.0.2", multipath=False)
    assert hosts.identity_difference(stored, same) == ""
    # What came since (an NVMe NQN, another FC port) is no difference.
    assert hosts.identity_difference(stored, dict(
        same, nqn="nqn.x", wwpns=["50014380186AF83E", "50014380186af83c",
                                  "5001438018600000"])) == ""
    assert hosts.identity_difference(stored, dict(same, host="h2")) == \
        "host 'h2' (not 'h1')"
    assert hosts.identity_difference(stored, dict(
        same, wwpns=["50014380186af83c"])) == \
        "wwpns 50014380186af83c (not 50014380186af83c,50014380186af83e)"
    # What went away is one: unsure, the connection stays.
    no_initiator = dict(same)
    del no_initiator["initiator"]
    assert hosts.identity_difference(stored, no_initiator) == \
        "initiator missing (not 'iqn.a')"
    assert hosts.identity_difference(stored, None) == "no connector_info"
    assert hosts.identity_difference({"initiator": "iqn.a"}, same) == \
        "the connection's connector names no host"


def test_a_host_keeps_its_identity_through_a_rename_and_a_new_root_fs():
    """os-brick's ``uuid`` is the root filesystem's UUID (a reinstall, a
    restore, an oVirt Node upgrade change it) and ``host`` the hostname
    (hostnamectl, DHCP): a connection's host is told by what its export
    was granted to, per transport."""
    from vdsm_managedvolume.engine import hosts
    stored = {"host": "h1", "initiator": "iqn.a", "nqn": "nqn.a",
              "uuid": "u1", "wwpns": ["50014380186af83c"]}
    renewed = dict(stored, host="h1.example.com", uuid="u2")
    # The root filesystem's UUID is no identity, for any transport.
    for transport in (None, "rbd", "iscsi", "fibre_channel", "nvmeof"):
        assert hosts.identity_difference(
            stored, dict(stored, uuid="u2"), transport) == ""
        assert hosts.identity_difference(
            stored, dict(stored, uuid=None), transport) == ""
    # A rename keeps the host its export was granted to ...
    for transport in ("iscsi", "iser", "fibre_channel", "nvmeof"):
        assert hosts.identity_difference(stored, renewed, transport) == ""
    # ... and only that identity counts for it.
    assert hosts.identity_difference(
        stored, dict(renewed, initiator="iqn.b"), "iscsi") == \
        "initiator 'iqn.b' (not 'iqn.a')"
    assert hosts.identity_difference(
        stored, dict(renewed, initiator="iqn.b"), "nvmeof") == ""
    assert hosts.identity_difference(
        stored, dict(renewed, nqn="nqn.b"), "nvmeof") == \
        "nqn 'nqn.b' (not 'nqn.a')"
    assert hosts.identity_difference(
        stored, dict(renewed, wwpns=["5001438018600000"]),
        "fibre_channel") == \
        "wwpns 5001438018600000 (not 50014380186af83c)"
    # No per-host export (RBD), or the connector lacks its transport's
    # identity: the name and every storage identity.
    assert hosts.identity_difference(stored, renewed, "rbd") == \
        "host 'h1.example.com' (not 'h1')"
    no_initiator = {"host": "h1", "nqn": "nqn.a"}
    assert hosts.identity_difference(
        no_initiator, dict(no_initiator, host="h2"), "iscsi") == \
        "host 'h2' (not 'h1')"
    assert hosts.identity(stored) == json.dumps(
        {"host": "h1", "initiator": "iqn.a", "nqn": "nqn.a",
         "wwpns": ["50014380186af83c"]})


def test_a_renamed_rbd_host_is_said_to_be_known_by_its_name_only():
    """An RBD connection's host can be told only by its name (os-brick's
    RBDConnector reports nothing of its own; the initiator name and NVMe
    NQN of an RBD-only host need not be unique): a renamed host is one
    that cannot be asked, and the reason says why and what to do."""
    from vdsm_managedvolume.engine import hosts
    stored = {"host": "h1", "initiator": "iqn.a"}
    renamed = dict(stored, host="h1.example.com")
    for transport in ("rbd", "vendor", None):
        difference = hosts.identity_difference(stored, renamed, transport)
        assert difference == "host 'h1.example.com' (not 'h1')"
        why = hosts._not_that_host("192.0.2.1", 54321, stored, renamed,
                                   difference, transport)
        assert why == (
            "192.0.2.1:54321 is not that host: {} (a connection of "
            "transport {} is known by its host's name only: os-brick "
            "reports no identity of its own for it, so a renamed host is "
            "taken for another; if this is that host renamed, end its "
            "connection by the override once no VM there uses the "
            "volume)".format(difference, transport or "unknown"))
    # Another identity is no question of names.
    other = dict(stored, initiator="iqn.b")
    difference = hosts.identity_difference(stored, other, "iscsi")
    assert hosts._not_that_host("192.0.2.1", 54321, stored, other,
                                difference, "iscsi") == \
        "192.0.2.1:54321 is host h1 but not the identity the connection " \
        "was made for: initiator 'iqn.b' (not 'iqn.a') (changed since, " \
        "or another host of that name)"


def test_a_host_holds_a_volume_unless_its_records_are_of_an_earlier_boot():
    from vdsm_managedvolume.engine import hosts
    vol = new_id()

    def rec(**fields):
        return dict({"vol_id": vol, "connection_info": {}}, **fields)

    assert not hosts.holds([], vol)
    assert not hosts.holds([rec(vol_id=new_id(), stale=False,
                                this_boot=True)], vol)
    assert hosts.holds([rec(stale=False, this_boot=True)], vol)
    # Stale in this boot (a path that blinked): not detached by the
    # engine, the VM may run there.
    assert hosts.holds([rec(stale=True, stale_reason="device gone",
                            this_boot=True)], vol)
    assert hosts.holds([rec(stale=True, stale_reason="device changed: "
                            "serial a -> b", this_boot=True)], vol)
    assert not hosts.holds([rec(stale=True, stale_reason="made in another "
                                "boot", this_boot=False)], vol)
    # Agents without this_boot: told by the reason; anything else holds.
    assert not hosts.holds([rec(stale=True, stale_reason="made in another "
                                "boot")], vol)
    assert not hosts.holds([rec(stale=True, stale_reason="made in an "
                                "unknown boot (...)")], vol)
    assert hosts.holds([rec(stale=True, stale_reason="device gone")], vol)
    assert hosts.holds([rec(stale=True)], vol)
    assert hosts.holds([rec()], vol)
    assert hosts.holds(["junk", rec(stale=True, stale_reason="device gone")],
                       vol)


def test_what_a_library_prints_never_reaches_the_engine(
        engine_service, engine_shim, tmp_path):
    driver = {"volume_driver": "tests.engine_client_test.ChattyDriver",
              "volume_backend_name": "chatty",
              "file_volume_dir": str(tmp_path / "vols")}
    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    log = tmp_path / "log" / "managedblock" / "managedvolume.log"
    vol = new_id()
    # Cold: the command's own stdout and stderr (merged, as the engine
    # reads them) carry nothing; what was printed is in the log file.
    code, out = run_as_engine(engine_shim, "create_volume", vol, 1,
                              driver=driver, db_url=db_url, cid=vol,
                              warm=False,
                              env={"ENGINE_LOG": str(tmp_path / "log")})
    assert (code, out) == (0, b"")
    text = log.read_text()
    assert "error: printed by a library" in text
    assert "{}: printed to stderr".format(vol) in text
    assert "error: written to fd 2 by C code" in text


def test_a_command_started_without_stderr_still_runs():
    # faulthandler refuses to register without a usable fd 2; the stack
    # dump on SIGUSR1 is a help, not a condition for running.
    import subprocess
    import sys
    r = subprocess.run(
        [sys.executable, "-m", "vdsm_managedvolume.engine.client",
         "--version"], stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2), timeout=120)
    assert r.returncode == 0
    assert r.stdout.startswith(b"managedvolume-cinderlib-client ")


def test_the_sqlite_database_is_created_private_and_a_loose_one_logged(
        engine_service, engine_shim, engine_backend, tmp_path):
    # It holds the backends' CHAP passwords (each connection's info):
    # SQLite created it with the umask (0644, readable by everyone).
    be = engine_backend
    path = tmp_path / "cinderlib.db"
    assert be["db_url"] == "sqlite:///{}".format(path)
    old = os.umask(0o022)
    try:
        r = engine_shim.run("create_volume", new_id(), 1,
                            driver=be["driver"], db_url=be["db_url"])
    finally:
        os.umask(old)
    assert (r.stdout, r.code) == (b"", 0), r.describe()
    assert os.stat(path).st_mode & 0o777 == 0o600
    # One that exists is left alone, but said (in the log, never stdout).
    loose = tmp_path / "loose.db"
    loose.write_bytes(b"")
    loose.chmod(0o644)
    r = engine_shim.run("storage_stats", "false", driver=be["driver"],
                        db_url="sqlite:///{}".format(loose), warm=False)
    assert r.code == 0, r.describe()
    assert "The cinderlib database {} is mode 0644".format(loose) in \
        r.stderr, r.describe()
    assert r.stdout.startswith(b"cid-test:")
    assert os.stat(loose).st_mode & 0o777 == 0o644


def test_secrets_left_on_argv_without_setproctitle_are_logged(
        engine_service, engine_shim, engine_backend, tmp_path):
    # Hiding them from /proc/PID/cmdline silently did nothing.
    blocker = tmp_path / "no-setproctitle"
    blocker.mkdir()
    (blocker / "setproctitle.py").write_text(
        "raise ImportError('not installed here')\n")
    env = {"PYTHONPATH": str(blocker) + os.pathsep +
           engine_shim.env["PYTHONPATH"]}
    log_file = tmp_path / "engine.log"
    driver = dict(engine_backend["driver"], san_password=SECRET)
    r = engine_shim.run("storage_stats", "false", driver=driver,
                        db_url=engine_backend["db_url"], env=env,
                        options=["--log-file", str(log_file)])
    assert r.code == 0, r.describe()
    text = log_file.read_text()
    assert "setproctitle is not installed: the secrets on this command " \
           "line stay readable" in text
    assert SECRET not in text + r.stderr + r.stdout.decode()
    # With it, nothing to say.
    r = engine_shim.run("storage_stats", "false", driver=driver,
                        db_url=engine_backend["db_url"],
                        options=["--log-file", str(log_file)])
    assert r.code == 0, r.describe()
    assert log_file.read_text().count("setproctitle is not installed") == 1


def test_a_bad_log_level_is_answered_by_the_warm_service_not_lost(
        engine_service, engine_shim, engine_backend):
    # A request another version of the command sent unchecked: its child
    # died in the logging set-up and the command read "lost the request".
    from vdsm_managedvolume.engine import args, forward
    be = engine_backend
    request = args.Request(command="storage_stats", driver=be["driver"],
                           db_url=be["db_url"], correlation_id="c-level",
                           args={"refresh": False}, log_level="NOPE",
                           locks_dir=engine_shim.env[args.ENV_LOCKS_DIR])
    answer = forward.forward(request, engine_shim.socket_path)
    assert answer.exit_code == 2
    assert answer.output.startswith(b"error:log level must be one of")
    # The service goes on serving.
    r = engine_shim.run("storage_stats", "false", driver=be["driver"],
                        db_url=be["db_url"])
    assert r.code == 0 and r.stdout.startswith(b"cid-test:"), r.describe()
    # The environment variable as the option: a usage error, exit 2.
    r = engine_shim.run("storage_stats", "false", driver=be["driver"],
                        db_url=be["db_url"],
                        env={args.ENV_LOG_LEVEL: "verbose"})
    assert r.code == 2, r.describe()
    assert r.error().startswith(args.ENV_LOG_LEVEL + " must be one of")
