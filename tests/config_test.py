import os

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
