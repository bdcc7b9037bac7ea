import json
import logging
import os
import re
import subprocess
import sys

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors


def test_defaults_are_vdsm_paths(monkeypatch, tmp_path):
    monkeypatch.setenv(config.ENV_CONFIG_FILE, str(tmp_path / "none.conf"))
    with pytest.raises(errors.ConfigError, match="does not exist"):
        config.load()
    cfg = config.Config()
    assert cfg.run_dir == "/run/vdsm/managedvolumes"
    assert cfg.udev_rules_dir == "/etc/udev/rules.d"
    assert cfg.port == 54321


def test_state_dir_moves_every_written_path(tmp_path):
    cfg = config.with_state_dir(config.Config(), str(tmp_path))
    for name in ("db_path", "run_dir", "state_run_dir", "lock_dir",
                 "udev_rules_dir", "log_dir", "key_file", "cert_file",
                 "ca_file"):
        assert getattr(cfg, name).startswith(str(tmp_path)), name
    assert cfg.multipath_dir == "/dev/mapper"


def test_file_values_are_typed(tmp_path):
    path = tmp_path / "mv.conf"
    path.write_text("[volumes]\nallowed_types = iscsi, rbd\n"
                    "lock_timeout = 5\n[agent]\nworkers = 3\n")
    cfg = config.load(path=str(path))
    assert cfg.allowed_types == ("iscsi", "rbd")
    assert cfg.lock_timeout == 5.0
    assert cfg.workers == 3


@pytest.mark.parametrize("text,match", [
    ("[volume]\nx = 1\n", "unknown section \\[volume\\]"),
    ("[agent]\nworker = 1\n", "unknown key 'worker' in \\[agent\\]"),
    ("[agent]\nworkers = many\n", "workers = 'many' is not a valid int"),
    ("[agent]\nworkers = -1\n", "must not be negative"),
    ("[logging]\nlog_level = NOPE\n",
     "log_level = 'NOPE' is not a log level \\(allowed: DEBUG, INFO, "
     "WARNING, ERROR, CRITICAL"),
    ("[logging]\nlog_level =\n", "log_level = '' is not a log level"),
])
def test_bad_file_names_the_key(tmp_path, text, match):
    path = tmp_path / "mv.conf"
    path.write_text(text)
    with pytest.raises(errors.ConfigError, match=match):
        config.load(path=str(path))


def test_render_round_trips(tmp_path):
    path = tmp_path / "mv.conf"
    path.write_text(config.render())
    assert config.load(path=str(path)).allowed_types == \
        config.DEFAULT_ALLOWED_TYPES


@pytest.mark.parametrize("name, level", [
    ("warn", "WARNING"), ("FATAL", "CRITICAL"), ("NOTSET", "DEBUG")])
def test_log_level_names_logging_took_still_start_the_agent(name, level):
    # A configuration that worked before log_level was checked (logging's
    # setLevel took these) must not stop the agent after an upgrade.
    cfg = config.load(path=os.devnull, overrides={"log_level": name})
    assert cfg.log_level == level


def test_log_level_is_taken_in_any_case():
    cfg = config.load(path=os.devnull, overrides={"log_level": " debug"})
    assert cfg.log_level == "DEBUG"


@pytest.mark.parametrize("value", ["65536", "70000"])
def test_a_port_out_of_range_is_refused_not_wrapped(tmp_path, value):
    # getaddrinfo took 70000 as 4464: the agent listened there.
    path = tmp_path / "mv.conf"
    path.write_text("[agent]\nport = {}\n".format(value))
    with pytest.raises(errors.ConfigError,
                       match=r"mv.conf \[agent\]: port = {} is out of "
                             r"range \(0-65535\)".format(value)):
        config.load(path=str(path))


def _problems(tmp_path, text):
    path = tmp_path / "mv.conf"
    path.write_text(text)
    cfg = config.load(path=str(path))
    return [str(e) for e in config.environment_problems(cfg)]


def test_a_sound_configuration_has_no_environment_problems(tmp_path):
    good = tmp_path / "logger.ini"
    good.write_text("[loggers]\nkeys = root\n[handlers]\nkeys = h\n"
                    "[formatters]\nkeys =\n[logger_root]\nhandlers = h\n"
                    "[handler_h]\nclass = StreamHandler\nargs = ()\n")
    assert _problems(tmp_path, "[agent]\nlisten = localhost\n"
                               "[logging]\nlog_file = {}\n".format(
                                   tmp_path / "new" / "dir" / "a.log")) == []
    assert _problems(tmp_path, "[logging]\nlog_config = {}\n".format(
        good)) == []
    assert config.environment_problems(config.Config()) == []


@pytest.mark.parametrize("text, match", [
    ("[agent]\nlisten = nosuchhost.invalid\n",
     r"mv.conf \[agent\]: listen = 'nosuchhost.invalid' cannot be "
     r"resolved: "),
    ("[logging]\nlog_file = /dev/null/x/agent.log\n",
     r"mv.conf \[logging\]: log_file = '/dev/null/x/agent.log': its "
     r"directory cannot be created: /dev/null is not a directory"),
    ("[logging]\nlog_file = /\n", r"log_file = '/' is a directory"),
    ("[logging]\nlog_config = /nonexistent/logger.conf\n",
     r"mv.conf \[logging\]: log_config = '/nonexistent/logger.conf' "
     r"cannot be read: No such file or directory"),
    ("[logging]\nlog_config = {here}\n",
     r"log_config = '.*mv.conf' is not a logging configuration file "
     r"\(logging.config.fileConfig format\): no \[loggers\] keys, "
     r"\[handlers\] keys, \[formatters\] keys, \[logger_root\] handlers"),
])
def test_environment_problems_name_the_key_and_value(tmp_path, text, match):
    text = text.format(here=tmp_path / "mv.conf")
    problems = _problems(tmp_path, text)
    assert len(problems) == 1, problems
    assert re.search(match, problems[0]), problems[0]


def test_environment_problems_create_nothing(tmp_path):
    _problems(tmp_path, "[logging]\nlog_file = {}\n".format(
        tmp_path / "a" / "b" / "agent.log"))
    assert not (tmp_path / "a").exists()


def test_a_file_that_is_not_utf8_is_an_error_naming_it_and_the_line(
        tmp_path):
    # A Latin-1 comment is enough; open() used the locale's encoding.
    path = tmp_path / "mv.conf"
    path.write_bytes(b"# modifi\xe9\n[agent]\nport = 5\n")
    with pytest.raises(errors.ConfigError,
                       match=r"cannot read .*mv.conf: not UTF-8 \(byte "
                             r"0xe9 on line 1\)"):
        config.load(path=str(path))



@pytest.mark.parametrize("text, match", [
    ("[volumes]\nshared_devices = ture\n",
     r"mv.conf \[volumes\]: shared_devices = 'ture' is not a boolean "
     r"\(allowed: 1, yes, true, on, 0, no, false, off, in any case\)"),
    ("[volumes]\nudev_writer = bogus\n",
     r"mv.conf \[volumes\]: udev_writer = 'bogus' is not one of auto, "
     r"service, daemon"),
    ("[volumes]\nlock_timeout = nan\n",
     r"mv.conf \[volumes\]: lock_timeout = nan is not a finite number"),
    ("[privsep]\ntimeout = inf\n", r"timeout = inf is not a finite number"),
    ("[agent]\nidle_timeout = -inf\n",
     r"idle_timeout = -inf is not a finite number"),
])
def test_a_typo_is_refused_naming_the_key_never_a_silent_default(
        tmp_path, text, match):
    path = tmp_path / "mv.conf"
    path.write_text(text)
    with pytest.raises(errors.ConfigError, match=match):
        config.load(path=str(path))


@pytest.mark.parametrize("text, key, value", [
    ("[volumes]\nshared_devices = false\n", "shared_devices", False),
    ("[volumes]\nshared_devices = Yes\n", "shared_devices", True),
    ("[volumes]\nshared_devices = on\n", "shared_devices", True),
    ("[volumes]\nshared_devices = 0\n", "shared_devices", False),
    # Empty: the key's default, as up to 252e3d5 (it loaded as false).
    ("[volumes]\nshared_devices =\n", "shared_devices", False),
    ("[volumes]\nshared_devices =   \n", "shared_devices", False),
    ("[volumes]\nudev_writer = Daemon\n", "udev_writer", "daemon"),
    ("[volumes]\nallowed_types = nfs, scaleio\n", "allowed_types",
     ("nfs", "scaleio")),
])
def test_what_the_documentation_spells_is_taken(tmp_path, text, key, value):
    path = tmp_path / "mv.conf"
    path.write_text(text)
    assert getattr(config.load(path=str(path)), key) == value


def test_the_shipped_configuration_and_the_defaults_are_taken():
    shipped = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "data", "managedvolume.conf")
    cfg = config.load(path=shipped)
    for key in config.FIELDS:
        if key not in config.NOT_KEYS:
            assert getattr(cfg, key) == getattr(config.Config, key), key


@pytest.mark.parametrize("text, types, match", [
    ("[volumes]\nallowed_types = bogus, iscsi\n", ("bogus", "iscsi"),
     r"mv.conf \[volumes\]: allowed_types = 'bogus, iscsi': 'bogus' is not "
     r"a driver_volume_type os-brick connects \(fibre_channel, .*\) nor an "
     r"installed adapter"),
    ("[volumes]\nallowed_types = iscsi, fibre-channel\n",
     ("iscsi", "fibre-channel"),
     r"'fibre-channel' \(did you mean 'fibre_channel'\?\) is not"),
    ("[volumes]\nallowed_types = ISCSI\n", ("ISCSI",),
     r"'ISCSI' \(did you mean 'iscsi'\?\) is not"),
])
def test_an_unknown_allowed_type_is_taken_with_a_warning(
        tmp_path, caplog, text, types, match):
    # Refused, it stopped the agent of an upgraded host whose vendor type
    # (or drbd, which os-brick 7 dropped) worked before, detaches included.
    path = tmp_path / "mv.conf"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="managedvolume.config"):
        assert config.load(path=str(path)).allowed_types == types
    assert re.search(match, caplog.text)


def test_an_installed_adapter_may_be_an_allowed_type(tmp_path, monkeypatch):
    from vdsm_managedvolume import adapters
    monkeypatch.setattr(adapters, "installed", lambda: ["acme"])
    path = tmp_path / "mv.conf"
    path.write_text("[volumes]\nallowed_types = iscsi, acme\n")
    assert config.load(path=str(path)).allowed_types == ("iscsi", "acme")


def test_every_transport_and_os_brick_connector_is_a_known_type():
    # OS_BRICK_TYPES is os-brick's mapping, copied: importing os-brick
    # costs seconds and replaces time.sleep, so ask another process.
    from vdsm_managedvolume import transports
    assert set(transports.names()) <= set(config.OS_BRICK_TYPES)
    assert set(config.DEFAULT_ALLOWED_TYPES) <= set(config.OS_BRICK_TYPES)
    p = subprocess.run(
        [sys.executable, "-c",
         "import json\n"
         "from os_brick.initiator import connector\n"
         "print(json.dumps(sorted(connector.get_connector_mapping("
         "'x86_64'))))"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        pytest.skip("os-brick not importable: {}".format(p.stderr[-200:]))
    assert sorted(t.lower() for t in json.loads(p.stdout)) == \
        sorted(config.OS_BRICK_TYPES)


def test_a_name_server_not_answering_is_no_mistake_of_the_file(
        monkeypatch):
    # At boot the name server may not be up yet: the agent's bind fails
    # then (exit 1, restarted), never exit 2 for a file that is right.
    import socket

    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN,
                              "Temporary failure in name resolution")

    cfg = config.Config()
    cfg.listen = "agent.example.org"
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert config.environment_problems(cfg) == []

    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    problem, = config.environment_problems(cfg)
    assert "listen = 'agent.example.org' cannot be resolved" in str(problem)
