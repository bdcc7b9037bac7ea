"""The boot id: from the config key, overridden by the environment, read
at each use (the kernel's once: it cannot change while a process
lives)."""

import pytest

from vdsm_managedvolume import boot
from vdsm_managedvolume import config
from vdsm_managedvolume import errors


def test_default_is_the_kernels_boot_id(monkeypatch):
    monkeypatch.delenv(boot.ENV_FILE, raising=False)
    cfg = config.Config()
    assert cfg.boot_id_file == "/proc/sys/kernel/random/boot_id"
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot.current(cfg) == f.read().strip()


def test_the_kernels_boot_id_is_read_once(monkeypatch):
    monkeypatch.delenv(boot.ENV_FILE, raising=False)
    monkeypatch.setattr(boot, "_kernel_boot_id", None)
    cfg = config.Config()
    first = boot.current(cfg)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: (
        opened.append(a[0]), real_open(*a, **k))[1])
    assert boot.current(cfg) == first
    assert opened == []


def test_config_key_is_read_at_each_use(tmp_path, monkeypatch):
    monkeypatch.delenv(boot.ENV_FILE, raising=False)
    f = tmp_path / "boot_id"
    f.write_text("boot-1\n")
    cfg = config.Config(boot_id_file=str(f))
    assert boot.current(cfg) == "boot-1"
    f.write_text("boot-2\n")                   # "rebooted"
    assert boot.current(cfg) == "boot-2"


def test_environment_overrides_the_config_key(tmp_path, monkeypatch):
    f = tmp_path / "env_boot_id"
    f.write_text("from-env\n")
    monkeypatch.setenv(boot.ENV_FILE, str(f))
    cfg = config.Config(boot_id_file=str(tmp_path / "missing"))
    assert boot.id_file(cfg) == str(f)
    assert boot.current(cfg) == "from-env"


def test_config_file_sets_the_key(tmp_path):
    conf = tmp_path / "mv.conf"
    conf.write_text("[paths]\nboot_id_file = /run/test/boot_id\n")
    assert config.load(str(conf)).boot_id_file == "/run/test/boot_id"


@pytest.mark.parametrize("content", ["", "\n", "x" * 65, "bad\x01id"])
def test_a_file_without_a_boot_id_is_a_config_error(tmp_path, monkeypatch,
                                                    content):
    monkeypatch.delenv(boot.ENV_FILE, raising=False)
    f = tmp_path / "boot_id"
    f.write_text(content)
    with pytest.raises(errors.ConfigError, match="boot_id_file"):
        boot.current(config.Config(boot_id_file=str(f)))


def test_a_missing_file_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv(boot.ENV_FILE, raising=False)
    missing = str(tmp_path / "missing")
    with pytest.raises(errors.ConfigError, match=missing):
        boot.current(config.Config(boot_id_file=missing))
