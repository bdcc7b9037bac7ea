"""data/managedvolume-adapter: what ovirt-engine runs for the storage
domains whose driver options hold ``"adapter": "managedvolume"``.

ManagedBlockExecutor resolves the domain's adapter to
``<ENGINE_USR>/managedblock/<adapter>-adapter`` and runs it with its
cinderlib client's arguments, from that directory, stderr merged into
stdout.  The RPM installs the script there with ``client=`` pointing at
the installed command (tests/rpm_test.py); here the script from the tree
runs this tree's command.
"""

import json
import os
import re
import subprocess

import pytest

from .engine_fixtures import Drain
from .engine_fixtures import client_argv
from .engine_fixtures import new_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = os.path.join(ROOT, "data", "managedvolume-adapter")
CONF = os.path.join(ROOT, "data", "managedvolume-adapter.conf")


@pytest.fixture
def adapter(tmp_path):
    """The adapter in its own 'managedblock' directory, running this
    tree's client, reading a settings file of the test's."""
    managedblock = tmp_path / "managedblock"
    managedblock.mkdir()
    client = tmp_path / "client"
    client.write_text("#!/bin/sh\nexec {} \"$@\"\n".format(
        " ".join(client_argv())))
    client.chmod(0o755)
    with open(ADAPTER) as f:
        script = f.read()
    path = managedblock / "managedvolume-adapter"
    path.write_text(script.replace(
        "\nclient=/usr/bin/managedvolume-cinderlib-client\n",
        "\nclient={}\n".format(client)))
    path.chmod(0o755)
    return path


def engine_env(tmp_path, conf):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MANAGEDVOLUME_")}
    env.update(PYTHONPATH=ROOT, MANAGEDVOLUME_ADAPTER_CONF=str(conf),
               ENGINE_TMP=str(tmp_path / "engine-tmp"),
               # Not the machine's default (/run/... for root).
               MANAGEDVOLUME_ENGINE_LOCKS_DIR=str(tmp_path / "locks"),
               ENGINE_LOG=str(tmp_path / "engine-log"))
    return env


def test_the_adapter_runs_the_shim_with_its_settings_file(adapter,
                                                          tmp_path):
    conf = tmp_path / "managedvolume-adapter.conf"
    conf.write_text("MANAGEDVOLUME_ENGINE_LOG_FILE={}\n"
                    "MANAGEDVOLUME_ENGINE_COLD=1\n".format(
                        tmp_path / "adapter.log"))
    driver = json.dumps({
        "adapter": "managedvolume",
        "volume_driver": "vdsm_managedvolume.engine.filedriver.FileDriver",
        "volume_backend_name": "file",
        "file_volume_dir": str(tmp_path / "vols")})
    db_url = "sqlite:///{}".format(tmp_path / "cinderlib.db")
    vol = new_id()
    for argv in (["create_volume", driver, db_url, "flow-a", vol, "1"],
                 ["connect_volume", driver, db_url, "flow-b", vol,
                  json.dumps({"host": "h1"})]):
        # As ManagedBlockExecutor: the adapter's directory, merged output.
        p = subprocess.run([str(adapter)] + argv, cwd=str(adapter.parent),
                           env=engine_env(tmp_path, conf),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=240)
        assert p.returncode == 0, p.stdout
    assert p.stdout.startswith(b"flow-b:{") and p.stdout.count(b"\n") == 1
    log = (tmp_path / "adapter.log").read_text()
    assert "[flow=flow-a] create_volume done" in log
    assert "[flow=flow-b] connect_volume done" in log


def test_the_shipped_settings_file_sets_nothing_and_parses(adapter,
                                                           tmp_path):
    # Every line is a comment: the defaults apply, and sh reads it.
    with open(CONF) as f:
        lines = [line for line in f.read().splitlines()
                 if line and not line.startswith("#")]
    assert lines == []
    p = subprocess.run([str(adapter)], env=engine_env(tmp_path, CONF),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=240)
    assert p.returncode == 2
    assert p.stdout.startswith(b"error:expected SUB-COMMAND")


def engine_reads(output, cid):
    """What ManagedBlockExecutor.getOutput makes of the merged output:
    the first line starting with "error" or the correlation id, without
    that prefix and the character after it; "" when there is none."""
    for line in output.decode("utf-8", "replace").splitlines():
        for prefix in ("error", cid):
            if line.startswith(prefix):
                return line[len(prefix) + 1:]
    return ""


@pytest.mark.parametrize("text", [
    'MANAGEDVOLUME_ENGINE_COLD="1\n',
    "MANAGEDVOLUME_ENGINE_COLD=1\nif then\n",
    "MANAGEDVOLUME_ENGINE_TIMEOUT=${NOT_SET:?set it}\n",
    "MANAGEDVOLUME_ENGINE_COLD=1\n[ -n \"$NOT_SET\" ] && X=1\n",
], ids=["unterminated-quote", "syntax-error", "unset-expansion",
        "failing-last-line"])
def test_a_broken_settings_file_is_an_error_line_for_the_engine(
        adapter, tmp_path, text):
    # The shell's own message went to the engine, which drops every line
    # not starting with "error": it logged an empty failure.
    conf = tmp_path / "managedvolume-adapter.conf"
    conf.write_text(text)
    p = subprocess.run([str(adapter), "storage_stats", "{}", "sqlite://",
                        "cid", "true"], cwd=str(adapter.parent),
                       env=engine_env(tmp_path, conf),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=240)
    assert p.returncode == 1, p.stdout
    assert engine_reads(p.stdout, "cid") == (
        "managedvolume-adapter: {} is not valid sh (a syntax error, or a "
        "line that failed; check it with: sh -n {})".format(conf, conf)), \
        p.stdout


def test_a_missing_client_is_an_error_line_for_the_engine(adapter,
                                                         tmp_path):
    missing = str(tmp_path / "no-such-client")
    adapter.write_text(re.sub(r"\nclient=\S+\n",
                              "\nclient={}\n".format(missing),
                              adapter.read_text()))
    p = subprocess.run([str(adapter), "storage_stats", "{}", "sqlite://",
                        "cid", "true"], cwd=str(adapter.parent),
                       env=engine_env(tmp_path, tmp_path / "none.conf"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=240)
    assert p.returncode == 1, p.stdout
    assert engine_reads(p.stdout, "cid") == (
        "managedvolume-adapter: {} is not installed or not "
        "executable".format(missing))


def test_every_setting_is_in_the_man_page_and_host_ones_in_the_file():
    from vdsm_managedvolume.engine import args
    names = {v for k, v in vars(args).items() if k.startswith("ENV_")}
    with open(os.path.join(ROOT, "docs", "man",
                           "managedvolume-cinderlib-client.1")) as f:
        man = f.read().replace("\\", "")
    with open(CONF) as f:
        conf = f.read()
    for name in names:
        assert name in man, name
        if name.startswith("MANAGEDVOLUME_ENGINE_HOST_"):
            assert "#{}=".format(name) in conf, name


def test_the_packaged_warm_service_serves_the_adapter_once_enabled(
        adapter, tmp_path):
    """What an admin does: start managedvolume-cinderlib.service (its
    ExecStart line, as its user) and uncomment the socket line of the
    shipped settings file; the engine's commands are then served warm."""
    import configparser
    import signal
    import time

    from vdsm_managedvolume.engine import warm

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(os.path.join(ROOT, "data", "managedvolume-cinderlib.service"))
    service = unit["Service"]
    # systemd makes RuntimeDirectory= with its mode; here under tmp_path.
    runtime = "/run/" + service["RuntimeDirectory"]
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=int(service["RuntimeDirectoryMode"], 8))
    argv = service["ExecStart"].replace(runtime, str(run_dir)).split()
    assert argv[0] == "/usr/bin/managedvolume-cinderlib-client"
    socket_path = argv[argv.index("--socket") + 1]

    with open(CONF) as f:
        shipped = f.read()
    line = "#MANAGEDVOLUME_ENGINE_SOCKET={}/".format(runtime)
    conf = tmp_path / "managedvolume-adapter.conf"
    conf.write_text(shipped.replace(line, line[1:]).replace(
        runtime, str(run_dir)))
    env = engine_env(tmp_path, conf)
    proc = subprocess.Popen(client_argv() + argv[1:], env=env, cwd="/",
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stderr = Drain(proc.stderr)         # its log: read all along
    try:
        deadline = time.monotonic() + 90
        while not warm._connectable(socket_path):
            assert proc.poll() is None, stderr.text(wait=10)
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.05)
        driver = json.dumps({
            "adapter": "managedvolume",
            "volume_driver":
                "vdsm_managedvolume.engine.filedriver.FileDriver",
            "volume_backend_name": "file",
            "file_volume_dir": str(tmp_path / "vols")})
        db_url = "sqlite:///{}".format(tmp_path / "cinderlib.db")
        p = subprocess.run(
            [str(adapter), "create_volume", driver, db_url, "flow-warm",
             new_id(), "1"], cwd=str(adapter.parent), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
        assert p.returncode == 0, p.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        service_log = stderr.text(wait=30)
    # The service logs to stderr (the journal, under systemd); the request
    # to the engine's log directory, as a cold run would.
    assert "[flow=flow-warm] Child " in service_log, service_log
    log = (tmp_path / "engine-log" / "managedblock" /
           "managedvolume.log").read_text()
    assert "[flow=flow-warm] create_volume done" in log
    assert proc.returncode == 0 and not os.path.exists(socket_path)
