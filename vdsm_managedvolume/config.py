"""Configuration: one INI file holding every path, limit and timeout.

Defaults are vdsm's paths, so that on a vdsm host the package needs no
configuration at all.  ``--state-dir DIR`` (``with_state_dir``) moves every
path this package *writes* under DIR: the embedded default used by
``make run``, the tests and CI, with nothing outside the tree touched.

The file (``/etc/vdsm/managedvolume.conf`` by default) has one section per
concern; every key is optional::

    [paths]
    db_path = /var/lib/vdsm/storage/managedvolume.db
    run_dir = /run/vdsm/managedvolumes
    ...
    [volumes]
    allowed_types = iscsi, fibre_channel, rbd, nvmeof, lightos, local, storpool

Unknown sections or keys are an error naming them, and so is a value the
key cannot take (a boolean spelt ``ture``, a ``nan`` timeout, a port
above 65535, a ``udev_writer`` that is none of its three): a typo must
not silently fall back to a default.  An empty boolean (``key =``) is
not a typo: it is the key's default, as a commented-out line is
(configparser's getboolean and oslo.config refuse it, but a file that
loaded before must not stop the agent after an upgrade).  An
``allowed_types`` name that neither os-brick nor an installed adapter
knows is taken with a warning naming the closest known one
(``_check_types``).  Checked as the file is read, so the agent, ``tool
check`` and ``dump-config`` refuse the same files.  What only the host can
tell (does ``listen`` resolve, can the log file be made) is
``environment_problems``.  ``FIELDS`` below is the one list of keys; the
shipped ``managedvolume.conf`` and the docs are made from it
(``managedvolume-tool dump-config``).
"""

import configparser
import dataclasses
import difflib
import fcntl
import logging
import math
import os
import socket
import sys

from . import affinity
from . import errors

log = logging.getLogger("managedvolume.config")

DEFAULT_CONFIG_FILE = "/etc/vdsm/managedvolume.conf"

# [logging] log_level: the names logging knows, as the file may spell them.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_CONFIG_FILE = "MANAGEDVOLUME_CONFIG"

DEFAULT_ALLOWED_TYPES = ("iscsi", "fibre_channel", "rbd", "nvmeof", "lightos",
                         "local", "storpool")

# What a ``local`` attach may hand to a VM (shell patterns, ``*`` crossing
# "/"): what LINSTOR/DRBD, the vendor known to use the local connector,
# hands out (``/dev/drbd/by-res/<resource>/<volume>``, ``/dev/drbdN``).
DEFAULT_LOCAL_DEVICES = ("/dev/drbd/by-res/*", "/dev/drbd/by-disk/*",
                         "/dev/drbd[0-9]*")

# Added in --state-dir mode (make run, tests): loop devices.
STATE_DIR_LOCAL_DEVICES = ("/dev/loop[0-9]*",)

# [volumes] allowed_types may name: the driver_volume_types os-brick
# connects on Linux (os-brick 7.1.1, connector._connector_mapping_linux,
# as cinder spells them), and the name of an installed vendor adapter
# (adapters.py).  Anything else is warned about (a misspelt fibre_channel
# quietly refused every FC attach with 930), not refused: it may be a
# vendor's type whose adapter comes later (_check_types).
OS_BRICK_TYPES = ("fibre_channel", "glusterfs", "gpfs", "huaweisdshypervisor",
                  "iscsi", "iser", "lightos", "local", "nfs", "nvme",
                  "nvmeof", "quobyte", "rbd", "scaleio", "scality",
                  "storpool", "vmdk", "vzstorage")

# [volumes] udev_writer (udevwriter.choose).
UDEV_WRITERS = ("auto", "service", "daemon")


# Booleans as configparser's getboolean takes them, in any case.
_BOOLEANS = {"1": True, "yes": True, "true": True, "on": True,
             "0": False, "no": False, "false": False, "off": False}


@dataclasses.dataclass
class Config:
    # [paths]
    db_path: str = "/var/lib/vdsm/storage/managedvolume.db"
    run_dir: str = "/run/vdsm/managedvolumes"
    udev_rules_dir: str = "/etc/udev/rules.d"
    lock_dir: str = "/run/vdsm/managedvolume/locks"
    state_run_dir: str = "/run/vdsm/managedvolume"
    log_dir: str = "/var/log/vdsm"
    multipath_dir: str = "/dev/mapper"
    rbd_dir: str = "/dev/rbd"
    privsep_config: str = "/etc/vdsm/managedvolume-privsep.conf"
    boot_id_file: str = "/proc/sys/kernel/random/boot_id"

    # [volumes]
    allowed_types: tuple = DEFAULT_ALLOWED_TYPES
    lock_timeout: float = 60.0
    udev_owner: str = "vdsm:qemu"
    udevadm: str = "/usr/bin/udevadm"
    chown: str = "/usr/bin/chown"
    udev_writer: str = "auto"
    local_devices: tuple = DEFAULT_LOCAL_DEVICES
    shared_devices: bool = False
    remote_secrets: bool = False

    # [privsep]
    timeout: float = 120.0
    properties_timeout: float = 30.0
    connector_info_ttl: float = 300.0
    helper_command: str = ""
    root_helper: str = "sudo"
    connector_override: str = ""
    my_ip: str = ""
    daemon_cpu_affinity: str = "auto"

    # [agent]
    listen: str = "::"
    port: int = 54321
    key_file: str = "/etc/pki/vdsm/keys/vdsmkey.pem"
    cert_file: str = "/etc/pki/vdsm/certs/vdsmcert.pem"
    ca_file: str = "/etc/pki/vdsm/certs/cacert.pem"
    workers: int = 8
    max_queue: int = 64
    max_operations: int = 64
    max_frame: int = 1048576
    handshake_timeout: float = 10.0
    idle_timeout: float = 120.0
    shutdown_timeout: float = 30.0
    cpu_affinity: str = "auto"
    processes: int = 2
    front_cpu_affinity: str = "auto"

    # [logging]
    log_level: str = "INFO"
    log_file: str = ""
    log_config: str = ""

    # Where this configuration came from (not keys of the file).
    source: str = ""
    state_dir: str = ""
    # key -> where its value was set ("FILE [section]", "--listen"), for
    # messages naming it; keys absent here hold their default.
    origins: dict = dataclasses.field(default_factory=dict, repr=False,
                                      compare=False)

    @property
    def socket_path(self):
        """The agent's local control socket (the hook reads caps there)."""
        return os.path.join(self.state_run_dir, "agent.sock")

    @property
    def connector_info_cache(self):
        """File holding the last connector_info (the hook's fallback)."""
        return os.path.join(self.state_run_dir, "connector_info.json")

    @property
    def privsep_config_file(self):
        """The privsep daemon's oslo.config file (``privsep_config``).

        Root-owned: root reads it, so the service's user must not write
        it (see privsepconfig.py).
        """
        return self.privsep_config

    @property
    def privsep_sock_path(self):
        """Where the privsep helper connects back to us: a fixed path,
        named in the sudoers rule."""
        return os.path.join(self.state_run_dir, "privsep.sock")

    @property
    def privsep_lock_file(self):
        """flock'ed by whoever binds ``privsep_sock_path`` until the
        helper connected (vdsmd and managedvolume-tool may both start a
        daemon)."""
        return os.path.join(self.state_run_dir, "privsep.lock")

    @property
    def agent_lock_file(self):
        """flock'ed by the running agent for its whole life: one agent per
        state dir, and how ``nearby_state_dirs`` sees one running."""
        return os.path.join(self.state_run_dir, "agent.lock")

    @property
    def local_device_patterns(self):
        """``local_devices``, plus loop devices in --state-dir mode."""
        if self.state_dir:
            return self.local_devices + tuple(
                p for p in STATE_DIR_LOCAL_DEVICES
                if p not in self.local_devices)
        return self.local_devices

    @property
    def brick_lock_dir(self):
        """os-brick's [oslo_concurrency] lock_path."""
        return os.path.join(self.lock_dir, "os-brick")


SECTIONS = {
    "paths": ("db_path", "run_dir", "udev_rules_dir", "lock_dir",
              "state_run_dir", "log_dir", "multipath_dir", "rbd_dir",
              "privsep_config", "boot_id_file"),
    "volumes": ("allowed_types", "lock_timeout", "udev_owner", "udevadm",
                "chown", "udev_writer", "local_devices", "shared_devices",
                "remote_secrets"),
    "privsep": ("timeout", "properties_timeout", "connector_info_ttl",
                "helper_command", "root_helper", "connector_override",
                "my_ip", "daemon_cpu_affinity"),
    "agent": ("listen", "port", "key_file", "cert_file", "ca_file", "workers",
              "max_queue", "max_operations", "max_frame",
              "handshake_timeout", "idle_timeout", "shutdown_timeout",
              "cpu_affinity", "processes", "front_cpu_affinity"),
    "logging": ("log_level", "log_file", "log_config"),
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Fields of Config that are not keys of the file.
NOT_KEYS = ("source", "state_dir", "origins")

# Port numbers: 0 lets the kernel choose a free one (tests; the agent
# prints and logs the port it got).
MAX_PORT = 65535

# [agent] listen values meaning every address.
ANY_ADDRESS = ("", "::", "0.0.0.0", "*")


def load(path=None, state_dir=None, overrides=None):
    """Load the configuration.

    path: the INI file; None means ``$MANAGEDVOLUME_CONFIG`` or the default
        file when it exists (a missing default file means all defaults; a
        missing explicit file is an error).
    state_dir: put every written path under this directory.
    overrides: a mapping of key -> value applied last (command line).
    """
    cfg = Config()
    explicit = path is not None or ENV_CONFIG_FILE in os.environ
    if path is None:
        path = os.environ.get(ENV_CONFIG_FILE, DEFAULT_CONFIG_FILE)
    if os.path.exists(path):
        _read_file(cfg, path)
        cfg.source = path
    elif explicit:
        raise errors.ConfigError("configuration file {} does not exist"
                                 .format(path))
    if state_dir:
        with_state_dir(cfg, state_dir)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, "override")
    return cfg


def where(cfg, key):
    """Where ``key``'s value came from, for a message: "FILE [section]",
    a command-line option, or "[section] (default)"."""
    origin = cfg.origins.get(key)
    if origin:
        return origin
    for section, keys in SECTIONS.items():
        if key in keys:
            return "[{}] (default)".format(section)
    return "(default)"


def environment_problems(cfg):
    """What the file's syntax cannot show but would stop the agent at
    start, each a ConfigError naming the key and its value: a ``listen``
    host that does not resolve, a ``log_file`` whose directory cannot be
    made, a ``log_config`` that is missing or not logging's INI format.

    Reads only (the tool's check runs it; the agent runs it before it
    touches the journal).  A list, empty when all is well.
    """
    problems = []
    for check in (_check_listen, _check_log_file, _check_log_config):
        try:
            check(cfg)
        except errors.ConfigError as e:
            problems.append(e)
    return problems


def with_state_dir(cfg, state_dir):
    """Move every path this package writes under ``state_dir``.

    Device paths (multipath_dir, rbd_dir) and PKI files are not moved: PKI
    goes to ``state_dir/pki`` only where the files are still vdsm's
    defaults (the agent creates a development PKI there).  The same for
    the privsep daemon's configuration: ``state_run_dir/privsep.conf``
    unless the file names one.
    """
    d = os.path.abspath(state_dir)
    cfg.state_dir = d
    cfg.db_path = os.path.join(d, "lib", "managedvolume.db")
    cfg.run_dir = os.path.join(d, "run", "managedvolumes")
    cfg.state_run_dir = os.path.join(d, "run", "managedvolume")
    cfg.lock_dir = os.path.join(d, "run", "locks")
    cfg.udev_rules_dir = os.path.join(d, "udev", "rules.d")
    cfg.log_dir = os.path.join(d, "log")
    defaults = Config()
    if cfg.privsep_config == defaults.privsep_config:
        cfg.privsep_config = os.path.join(cfg.state_run_dir, "privsep.conf")
    for name, fname in (("key_file", "vdsmkey.pem"),
                        ("cert_file", "vdsmcert.pem"),
                        ("ca_file", "cacert.pem")):
        if getattr(cfg, name) == getattr(defaults, name):
            setattr(cfg, name, os.path.join(d, "pki", fname))
    return cfg


def nearby_state_dirs():
    """The ``.state`` directories near here (the current directory's, the
    source tree's whose virtualenv runs us) that a running agent uses.

    For hints: on a development machine ``make run`` serves ``.state``,
    and a command run without ``--state-dir`` looks at vdsm's paths.
    A running agent holds ``run/managedvolume/agent.lock`` (flock).
    """
    tree = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(sys.executable))))
    found = []
    for base in (_cwd(), tree):
        if not base:
            continue
        d = os.path.join(base, ".state")
        if d in found:
            continue
        lock = with_state_dir(Config(), d).agent_lock_file
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            found.append(d)
        except OSError:
            pass
        finally:
            os.close(fd)
    return found


def state_dir_hint(program):
    """A sentence pointing at a running development agent's state dir, or
    "" when there is none near."""
    dirs = nearby_state_dirs()
    if not dirs:
        return ""
    cwd = _cwd()
    shown = os.path.relpath(dirs[0], cwd) if cwd and dirs[0].startswith(
        cwd + os.sep) else dirs[0]
    return ("an agent is running with --state-dir {0} here: did you mean "
            "'{1} --state-dir {0} ...'?".format(shown, program))


# The head of the shipped file (render(commented=True)).
COMMENTED_HEADER = """\
# vdsm-managedvolume configuration; see managedvolume.conf(5).
# Every key is optional.  The values below, commented out, are this
# version's defaults: a key left commented takes the installed version's
# default, also once you edited this file (upgrades then keep it as it
# is).  A key you set keeps its value across upgrades."""


def render(cfg=None, commented=False):
    """The INI text of ``cfg`` (defaults when None), every key present.

    ``commented``: every key commented out (``#key = value``), as the
    package ships the file: it is %config(noreplace), so once an admin
    edited one key a file setting every key kept all the others at the
    defaults of that version forever.
    """
    cfg = cfg or Config()
    if commented:
        lines = [COMMENTED_HEADER]
    else:
        lines = ["# vdsm-managedvolume configuration; every key is optional."]
    for section, keys in SECTIONS.items():
        lines.append("")
        lines.append("[{}]".format(section))
        for key in keys:
            lines.append("{}{} = {}".format("#" if commented else "", key,
                                            _format(getattr(cfg, key))))
    return "\n".join(lines) + "\n"


# Private helpers

def _cwd():
    # The current directory may have been removed under us.
    try:
        return os.getcwd()
    except OSError:
        return ""


def _read_file(cfg, path):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # UTF-8 whatever the locale, and a bad byte named with its line.
        text = raw.decode("utf-8")
        parser.read_string(text, source=path)
    except UnicodeDecodeError as e:
        raise errors.ConfigError(
            "cannot read {}: not UTF-8 (byte 0x{:02x} on line {})".format(
                path, raw[e.start], raw.count(b"\n", 0, e.start) + 1))
    except (OSError, configparser.Error) as e:
        raise errors.ConfigError("cannot read {}: {}".format(path, e))
    for section in parser.sections():
        if section not in SECTIONS:
            raise errors.ConfigError(
                "{}: unknown section [{}] (known: {})".format(
                    path, section, ", ".join(SECTIONS)))
        for key, value in parser.items(section):
            if key not in SECTIONS[section]:
                raise errors.ConfigError(
                    "{}: unknown key {!r} in [{}] (known: {})".format(
                        path, key, section, ", ".join(SECTIONS[section])))
            _set(cfg, key, value, "{} [{}]".format(path, section))


def _set(cfg, key, value, where):
    field = FIELDS.get(key)
    if field is None or key in NOT_KEYS:
        raise errors.ConfigError("{}: unknown key {!r}".format(where, key))
    default = getattr(Config, key, None)
    if default is None:
        default = field.default
    try:
        if isinstance(value, str):
            if isinstance(default, tuple):
                value = tuple(v.strip() for v in value.split(",")
                              if v.strip())
            elif isinstance(default, bool):
                # Empty is the key's default, as a commented-out line:
                # "key =" loaded as false up to 252e3d5 (the only boolean
                # defaults to false), and refusing it stopped a host's
                # agent on upgrade for a line that never meant anything
                # else.  A misspelt value is still refused.
                value = (default if not value.strip()
                         else _BOOLEANS[value.strip().lower()])
            elif isinstance(default, int):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
    except KeyError:
        raise errors.ConfigError(
            "{}: {} = {!r} is not a boolean (allowed: {}, in any case)"
            .format(where, key, value, ", ".join(_BOOLEANS)))
    except ValueError:
        raise errors.ConfigError(
            "{}: {} = {!r} is not a valid {}".format(
                where, key, value, type(default).__name__))
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise errors.ConfigError(
                "{}: {} = {!r} is not a finite number".format(
                    where, key, value))
        if value < 0:
            raise errors.ConfigError(
                "{}: {} = {!r} must not be negative".format(where, key, value))
    if key == "port" and value > MAX_PORT:
        # Never wrapped: getaddrinfo took 70000 as 4464.
        raise errors.ConfigError(
            "{}: port = {!r} is out of range (0-{})".format(
                where, value, MAX_PORT))
    if key == "log_level":
        value = _log_level(value, where)
    elif key == "allowed_types":
        _check_types(value, where)
    elif key in ("cpu_affinity", "daemon_cpu_affinity",
                 "front_cpu_affinity"):
        value = affinity.check(value, key, where)
    elif key == "processes" and value not in (1, 2):
        raise errors.ConfigError(
            "{}: processes = {!r} is not 1 or 2".format(where, value))
    elif key == "udev_writer":
        value = value.strip().lower()
        if value not in UDEV_WRITERS:
            raise errors.ConfigError(
                "{}: udev_writer = {!r} is not one of {}".format(
                    where, value, ", ".join(UDEV_WRITERS)))
    setattr(cfg, key, value)
    cfg.origins[key] = where


def _check_types(types, where):
    unknown = [t for t in types if t not in OS_BRICK_TYPES]
    if not unknown:
        return
    # Only now: reading the entry points costs milliseconds.
    from . import adapters
    installed = adapters.installed()
    unknown = [t for t in unknown if t not in installed]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name.lower().replace("-", "_"),
                                          OS_BRICK_TYPES + tuple(installed),
                                          n=1)
        hints.append("{!r}{}".format(
            name, " (did you mean {!r}?)".format(close[0]) if close else ""))
    # A warning, not a refusal: such a name may be the type of a vendor's
    # driver whose adapter is installed later, or one an older os-brick
    # connected (drbd); refusing it stopped an upgraded host's agent,
    # detaches included.  Attaches of such a type fail with 930 or 934.
    log.warning(
        "%s: allowed_types = %r: %s %s not a driver_volume_type os-brick "
        "connects (%s) nor an installed adapter (%s)", where,
        ", ".join(types), ", ".join(hints),
        "is" if len(hints) == 1 else "are", ", ".join(OS_BRICK_TYPES),
        ", ".join(installed) or "none")


def _check_listen(cfg):
    if cfg.listen in ANY_ADDRESS:
        return
    try:
        socket.getaddrinfo(cfg.listen, cfg.port, type=socket.SOCK_STREAM,
                           flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        if getattr(e, "errno", None) == socket.EAI_AGAIN:
            # The name server did not answer (not up yet at boot): not a
            # mistake of the file; the agent's bind fails, exit 1, and
            # systemd tries again.
            return
        raise errors.ConfigError(
            "{}: listen = {!r} cannot be resolved: {}".format(
                where(cfg, "listen"), cfg.listen, _reason(e)))


def _check_log_file(cfg):
    if not cfg.log_file or cfg.log_config:
        return
    path = os.path.abspath(cfg.log_file)
    if os.path.isdir(path):
        raise errors.ConfigError(
            "{}: log_file = {!r} is a directory".format(
                where(cfg, "log_file"), cfg.log_file))
    # The nearest existing ancestor must be a directory we may create
    # the rest in (the agent makes the missing levels).
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        reason = "{} is not a directory".format(parent)
    elif not os.access(parent, os.W_OK | os.X_OK):
        reason = "{} is not writable".format(parent)
    else:
        return
    raise errors.ConfigError(
        "{}: log_file = {!r}: its directory cannot be created: {}".format(
            where(cfg, "log_file"), cfg.log_file, reason))


# What logging.config.fileConfig reads without a default.
_LOG_CONFIG_SECTIONS = (("loggers", "keys"), ("handlers", "keys"),
                        ("formatters", "keys"), ("logger_root", "handlers"))


def _check_log_config(cfg):
    if not cfg.log_config:
        return
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(cfg.log_config, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise errors.ConfigError(
            "{}: log_config = {!r} cannot be read: {}".format(
                where(cfg, "log_config"), cfg.log_config, _reason(e)))
    missing = ["[{}] {}".format(s, k) for s, k in _LOG_CONFIG_SECTIONS
               if not parser.has_option(s, k)]
    if missing:
        raise errors.ConfigError(
            "{}: log_config = {!r} is not a logging configuration file "
            "(logging.config.fileConfig format): no {}".format(
                where(cfg, "log_config"), cfg.log_config,
                ", ".join(missing)))


def _reason(e):
    # The system's sentence without Python's "[Errno N]" prefix.
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# The other names logging's setLevel takes (logging._nameToLevel), which
# a configuration may hold from before log_level was checked.
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL",
                      "NOTSET": "DEBUG"}


def _log_level(value, where):
    # Checked here, not when logging is set up: the agent died of a
    # ValueError traceback there, and dump-config and check said nothing.
    level = value.strip().upper() if isinstance(value, str) else value
    # What logging itself took before this check, by their usual names.
    level = _LOG_LEVEL_ALIASES.get(level, level)
    if level not in LOG_LEVELS:
        raise errors.ConfigError(
            "{}: log_level = {!r} is not a log level (allowed: {}, in any "
            "case)".format(where, value, ", ".join(LOG_LEVELS)))
    return level


def _format(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)
