"""The command line of ovirt-engine's cinderlib client, and ours around it.

ovirt-engine runs, for every storage operation::

    <client> SUB-COMMAND DRIVER_JSON DB_URL CORRELATION_ID [ARGS...]

and that order is fixed (``COMMANDS`` below holds each sub-command's
arguments, upstream's names and order, plus our optional extras at the end).
Everything we add goes *before* the sub-command, as ``--options``, so the
engine's argv keeps its meaning::

    managedvolume-cinderlib-client [--timeout SEC] [--lock-timeout SEC]
        [--log-file PATH] [--log-level LEVEL] [--locks-dir DIR]
        [--socket PATH] [--cold]
        [--host-port N] [--host-cert PATH] [--host-key PATH]
        [--host-ca PATH] [--host-timeout SEC] [--host-tls BOOL]
        [--host-addresses HOST=ADDRESS[:PORT],...]
        SUB-COMMAND DRIVER_JSON DB_URL CORRELATION_ID [ARGS...]
    managedvolume-cinderlib-client --serve [--socket PATH] [--log-file PATH]

Secrets need not travel on argv (where any local user can read them in
/proc/PID/cmdline).  DRIVER_JSON and DB_URL each accept:

    '{"volume_driver": ...}'   inline, as the engine passes them
    @PATH                      read from a file (0600, say)
    -                          read from stdin (at most one of the two)
    env:NAME                   read from environment variable NAME
    env:                       read from MANAGEDVOLUME_DRIVER_JSON /
                               MANAGEDVOLUME_DB_URL

A DB_URL naming a user but no password takes it from
``MANAGEDVOLUME_DB_PASSWORD`` (or libpq's ``PGPASSWORD``), so the URL itself
may stay on argv.  A PostgreSQL DB_URL (psycopg2) gets libpq's connect
timeout and TCP keepalives (``PG_DEFAULTS``) unless it sets them itself.
Every option has an environment variable (``ENV_*`` below), so a wrapper
can set them once.
"""

import json
import os
import re
import stat
import sys

from vdsm_managedvolume import errors

ENV_DRIVER = "MANAGEDVOLUME_DRIVER_JSON"
ENV_DB_URL = "MANAGEDVOLUME_DB_URL"
ENV_DB_PASSWORD = "MANAGEDVOLUME_DB_PASSWORD"
ENV_TIMEOUT = "MANAGEDVOLUME_ENGINE_TIMEOUT"
ENV_LOCK_TIMEOUT = "MANAGEDVOLUME_ENGINE_LOCK_TIMEOUT"
ENV_LOG_FILE = "MANAGEDVOLUME_ENGINE_LOG_FILE"
ENV_LOG_LEVEL = "MANAGEDVOLUME_ENGINE_LOG_LEVEL"
ENV_LOCKS_DIR = "MANAGEDVOLUME_ENGINE_LOCKS_DIR"
ENV_SOCKET = "MANAGEDVOLUME_ENGINE_SOCKET"
ENV_COLD = "MANAGEDVOLUME_ENGINE_COLD"
ENV_HOST_PORT = "MANAGEDVOLUME_ENGINE_HOST_PORT"
ENV_HOST_CERT = "MANAGEDVOLUME_ENGINE_HOST_CERT"
ENV_HOST_KEY = "MANAGEDVOLUME_ENGINE_HOST_KEY"
ENV_HOST_CA = "MANAGEDVOLUME_ENGINE_HOST_CA"
ENV_HOST_TIMEOUT = "MANAGEDVOLUME_ENGINE_HOST_TIMEOUT"
ENV_HOST_TLS = "MANAGEDVOLUME_ENGINE_HOST_TLS"
ENV_HOST_ADDRESSES = "MANAGEDVOLUME_ENGINE_HOST_ADDRESSES"
# What ovirt-engine puts in the environment of the commands it runs
# (ovirt-engine.py: ENGINE_TMP, its private temp dir; ENGINE_LOG).
ENV_ENGINE_TMP = "ENGINE_TMP"
ENV_ENGINE_LOG = "ENGINE_LOG"
ENGINE_LOG_DIR = "/var/log/ovirt-engine"
# ovirt-engine's state directory (ENGINE_VAR, owned by its user, ovirt):
# on a machine that has it, the volume locks are there, one place for
# every command whoever runs it (``default_locks_dir``).
ENGINE_STATE_DIR = "/var/lib/ovirt-engine"

# libpq connection settings a PostgreSQL DB_URL gets unless its query
# string sets them (SQLAlchemy passes them to psycopg2, psycopg2 to
# libpq).  Without them a database server that went away (a powered-off
# host: no reset, no answer) held a command until the shim's own timeout
# (300 s on a VM's start or migration): connecting, libpq waits for ever;
# in a query, the kernel's keepalive starts after two hours.  With them a
# connect gives up after 10 s, and an idle or waiting connection is found
# dead within about a minute (30 s idle, then 3 probes 10 s apart); the
# command then fails with the driver's error, as for any database error.
PG_DEFAULTS = (
    ("connect_timeout", "10"),
    ("keepalives", "1"),
    ("keepalives_idle", "30"),
    ("keepalives_interval", "10"),
    ("keepalives_count", "3"),
)
PG_SCHEMES = ("postgresql", "postgresql+psycopg2")

# How long a sub-command may run when --timeout is not set.  ovirt-engine
# reads the command's output until its answer line or EOF without a limit
# (ManagedBlockExecutor.getOutput; its ManagedBlockCommandTimeoutInMinutes
# starts only after that), so a command that hangs (a storage API that
# never answers, a database connection stalled mid-query, a driver lock
# held by a dead process) would hold an engine thread, and in RunVm and
# MigrateVm the VM's lock, until the engine restarts.  Given up, a command
# answers "error:... did not finish within N seconds", exit 1, which the
# engine treats as any failed command (RunVm tries another host, a
# migration rolls back), and its operation ends with it.
# - The commands of a VM's start, stop and migration take well under a
#   second (cinderlib's import and setup: a few seconds on a busy machine;
#   disconnect_volume asks the hosts at once, --host-timeout each): 5
#   minutes is generous.
# - Provisioning may move a whole volume (a clone or a volume from a
#   snapshot on a backend without copy offload, a delete that wipes):
#   6 hours, so that none a backend finishes is abandoned half done.
VM_TIMEOUT = 300
PROVISION_TIMEOUT = 6 * 3600
DEFAULT_TIMEOUTS = {
    "connect_volume": VM_TIMEOUT,
    "disconnect_volume": VM_TIMEOUT,
    "save_device": VM_TIMEOUT,
    "get_connection_info": VM_TIMEOUT,
    "storage_stats": VM_TIMEOUT,
    "create_volume": PROVISION_TIMEOUT,
    "delete_volume": PROVISION_TIMEOUT,
    "extend_volume": PROVISION_TIMEOUT,
    "clone_volume": PROVISION_TIMEOUT,
    "create_snapshot": PROVISION_TIMEOUT,
    "remove_snapshot": PROVISION_TIMEOUT,
    "create_volume_from_snapshot": PROVISION_TIMEOUT,
}
# --timeout 0: no limit at all (Options.timeout None: not set).
NO_TIMEOUT = 0
# How long a command waits for another one on the same volume
# (volumelock.py: a disconnect holds it while asking the hosts).
DEFAULT_LOCK_TIMEOUT = 120.0

# --log-file value meaning "stderr" (asked for; never the default: the
# engine merges stderr into the output it parses).
LOG_STDERR = "-"

# vdsm's port (the engine's VdsPort); see hosts.py.
DEFAULT_HOST_PORT = 54321
# Seconds to wait for one host's answer (hosts.py).
DEFAULT_HOST_TIMEOUT = 10.0

FILE_DRIVER = "vdsm_managedvolume.engine.filedriver.FileDriver"

# sub-command -> (required arguments, optional arguments), upstream's order.
# The optional ones are ours: "connector" is a connector JSON object or a
# host name choosing one connection among several (live migration).
COMMANDS = {
    "create_volume": (("volume_id", "size"), ()),
    "delete_volume": (("volume_id",), ()),
    "connect_volume": (("volume_id", "connector_info"), ()),
    "disconnect_volume": (("volume_id",), ("connector",)),
    "extend_volume": (("volume_id", "size"), ()),
    "storage_stats": (("refresh",), ()),
    "save_device": (("volume_id", "device"), ("connector",)),
    "get_connection_info": (("volume_id",), ("connector",)),
    "clone_volume": (("volume_id", "cloned_vol_id"), ()),
    "create_snapshot": (("volume_id",), ()),
    "remove_snapshot": (("snapshot_id", "volume_id"), ()),
    "create_volume_from_snapshot": (("volume_id", "snapshot_id"), ("size",)),
}

# Arguments naming a volume or snapshot: ovirt-engine always passes UUIDs
# (its own disk and snapshot ids), and cinder stores them as the ids (the
# FileDriver names files after them).  Anything else is a bad command line,
# refused before anything is created.
IDS = ("volume_id", "snapshot_id", "cloned_vol_id")
_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
# How much of a bad value an error line quotes.
QUOTE_MAX = 80
# The largest size in GiB: cinder's volumes.size column is an INTEGER
# (PostgreSQL's int4).  A larger one overflowed it after the driver had
# made the volume: a backend volume without a record, which no delete
# finds and which blocks a retry of the same id.
MAX_SIZE = 2 ** 31 - 1
# The longest --timeout / --host-timeout, in seconds (a week): larger ones
# overflow the waits they end up in (threading's, select's, a socket's).
# No limit at all is 0.
MAX_TIMEOUT = 7 * 24 * 3600
# How deep a JSON argument may nest (a connector, a device, the driver
# options are a few levels deep): deeper ones fail the recursive code
# that masks, copies and logs them.
MAX_DEPTH = 32
# The log levels --log-level takes (logging's names), and the other names
# logging's setLevel took before they were checked, read as the agent's
# configuration reads them (config.py).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL",
                     "NOTSET": "DEBUG"}

USAGE = """\
usage: managedvolume-cinderlib-client [OPTIONS] SUB-COMMAND DRIVER_JSON DB_URL
                                      CORRELATION_ID [ARGS...]
       managedvolume-cinderlib-client --serve [--socket PATH] \
[--log-file PATH]
       managedvolume-cinderlib-client -h|--help|--version

ovirt-engine's cinderlib client (its cinderlib-client.py, same command
line and output): provisions and connects Managed Block Storage volumes
through cinderlib, with the domain's driver options and persistence.

sub-commands:
{commands}
DRIVER_JSON: the storage domain's driver options (JSON); DB_URL: cinderlib's
persistence (sqlite:///FILE or postgresql://...); each inline, @FILE,
- (stdin) or env:[NAME], the way to keep secrets off the command line.

options (before the sub-command; each also an environment variable):
  --timeout SEC        give up on any sub-command after SEC seconds, at most
                       604800, 0: no limit (default {vm_timeout}: connect,
                       disconnect, save_device, get_connection_info,
                       storage_stats; {provision_timeout}: the others)
  --lock-timeout SEC   how long to wait while another command works on the
                       same volume (default {lock_timeout:g})
  --log-file PATH|-    log file, - for stderr (default
                       $ENGINE_LOG/managedblock/managedvolume.log)
  --log-level LEVEL    DEBUG, INFO (default), WARNING, ERROR, CRITICAL
  --locks-dir DIR      cinderlib's file locks (default: the run directory)
  --socket PATH        the warm service's socket; --serve runs the service
  --cold               never forward to the warm service
  --host-port N        vdsm's port on the hosts (default {port})
  --host-cert PATH --host-key PATH --host-ca PATH
                       the engine's TLS files for asking hosts
                       (disconnect_volume; default ovirt-engine's PKI)
  --host-timeout SEC   how long to wait for one host (default {host_timeout:g})
  --host-tls BOOL      false: hosts without TLS (development only)
  --host-addresses HOST=ADDRESS[:PORT],...
                       where a connector's host is reached

output (ovirt-engine's contract): the first line starting with "error" or
"CORRELATION_ID:" is the answer ("CORRELATION_ID:<JSON>" is a result);
exit 0 is success.

example (the embedded file-backed driver, SQLite; prints nothing, exit 0):
  managedvolume-cinderlib-client create_volume \\
    '{{"volume_driver": "{file_driver}",
      "volume_backend_name": "file", "file_volume_dir": "/tmp/vols"}}' \\
    sqlite:////tmp/cinderlib.db flow-1 \\
    9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10 1

See managedvolume-cinderlib-client(1) and docs/engine.md.
""".format(
    commands="\n".join(
        "  {} {}".format(name, " ".join(
            list(req) + ["[{}]".format(o) for o in opt]))
        for name, (req, opt) in COMMANDS.items()),
    port=DEFAULT_HOST_PORT, host_timeout=DEFAULT_HOST_TIMEOUT,
    file_driver=FILE_DRIVER, vm_timeout=VM_TIMEOUT,
    provision_timeout=PROVISION_TIMEOUT, lock_timeout=DEFAULT_LOCK_TIMEOUT)


class Options:
    """Settings of one invocation (command line over environment)."""

    def __init__(self):
        self.timeout = None     # not set: the sub-command's default
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT
        self.log_file = ""
        self.log_level = "INFO"
        self.locks_dir = ""
        self.socket = ""
        self.cold = False
        self.serve = False
        self.hosts = {}      # hosts.Settings fields set by options/env


class Request:
    """One operation, with everything resolved: what crosses the socket.

    ``driver`` and ``db_url`` hold secrets: ``repr`` masks them, and the
    request is only ever written to the 0600 socket of the warm service.
    """

    FIELDS = ("command", "driver", "db_url", "correlation_id", "args",
              "timeout", "log_file", "log_level", "locks_dir", "hosts",
              "lock_timeout")

    def __init__(self, command, driver, db_url, correlation_id, args,
                 timeout=None, log_file="", log_level="INFO",
                 locks_dir="", hosts=None,
                 lock_timeout=DEFAULT_LOCK_TIMEOUT):
        self.command = command
        self.driver = driver
        self.db_url = db_url
        self.correlation_id = correlation_id
        self.args = args
        self.timeout = timeout
        self.log_file = log_file
        self.log_level = log_level
        self.locks_dir = locks_dir
        # How disconnect_volume reaches the hosts (hosts.Settings fields).
        self.hosts = dict(hosts or {})
        self.lock_timeout = lock_timeout

    def __repr__(self):
        # Imported here, as in secrets(): a command forwarding a request
        # without secrets on argv never needs the masker (see client.py).
        from vdsm_managedvolume import mask
        return "Request(command={!r}, correlation_id={!r}, args={!r}, " \
               "driver={!r}, db_url={!r})".format(
                   self.command, self.correlation_id, mask.mask(self.args),
                   mask.mask(self.driver), mask.mask_text(self.db_url))

    def to_json(self):
        return json.dumps({name: getattr(self, name) for name in self.FIELDS})

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))

    def secrets(self):
        """Every secret value of this request, to scrub from free text."""
        found = []
        _collect_secrets(self.driver, found)
        password = _url_password(self.db_url)
        if password:
            found.append(password)
        # Longest first, so that a secret containing another is hidden whole.
        return sorted({s for s in found if len(s) >= 3}, key=len,
                      reverse=True)


def parse(argv, environ=None, stdin=None):
    """Return ``(Options, Request or None)`` for ``argv`` (without argv[0]).

    Raises ``errors.EngineUsage`` naming what is wrong.
    """
    environ = os.environ if environ is None else environ
    stdin = sys.stdin if stdin is None else stdin
    opts = _options_from_env(environ)
    argv = list(argv)
    while argv and argv[0].startswith("--"):
        _parse_option(opts, argv)
    if opts.serve:
        if argv:
            raise errors.EngineUsage("--serve takes no arguments, got "
                                     "{}".format(" ".join(argv)))
        return opts, None
    if len(argv) < 4:
        raise errors.EngineUsage(
            "expected SUB-COMMAND DRIVER_JSON DB_URL CORRELATION_ID [ARGS...]")
    command, driver_src, db_src, correlation_id, *rest = argv
    if command not in COMMANDS:
        # Masked and cut short: without its sub-command, the engine's
        # argv starts with the driver JSON, passwords and all.
        from vdsm_managedvolume import mask
        raise errors.EngineUsage("unknown sub-command {} (known: {})".format(
            _quoted(mask.mask_text(command)), ", ".join(COMMANDS)))
    _check_correlation_id(correlation_id)
    if driver_src == "-" and db_src == "-":
        raise errors.EngineUsage("only one of DRIVER_JSON and DB_URL may be "
                                 "read from stdin")
    driver = _driver(_source("DRIVER_JSON", driver_src, ENV_DRIVER, environ,
                             stdin))
    db_url = _source("DB_URL", db_src, ENV_DB_URL, environ, stdin).strip()
    if not db_url:
        raise errors.EngineUsage("DB_URL is empty")
    _check_url_userinfo(db_url)
    db_url = _with_pg_defaults(_with_password(db_url, environ))
    args = _command_args(command, rest)
    _check_volume_driver(driver)
    request = Request(command=command, driver=driver, db_url=db_url,
                      correlation_id=correlation_id, args=args,
                      timeout=request_timeout(command, opts.timeout),
                      log_file=resolve_log_file(opts.log_file, environ),
                      log_level=opts.log_level,
                      locks_dir=opts.locks_dir or default_locks_dir(),
                      hosts=opts.hosts, lock_timeout=opts.lock_timeout)
    return opts, request


def default_run_dir():
    """Where the socket and the fallback log live unless configured.

    Under ``$ENGINE_TMP`` when set (ovirt-engine gives the commands it runs
    its private temp dir there); else ``uid_run_dir``.  Whoever made it,
    it must be a directory of our uid (``private_dirs``): one another user
    pre-created is refused.
    """
    engine_tmp = os.environ.get(ENV_ENGINE_TMP)
    if engine_tmp:
        return os.path.join(os.path.abspath(engine_tmp),
                            "managedvolume-engine")
    return uid_run_dir()


def uid_run_dir():
    """The run directory of this uid without ovirt-engine's environment:
    root gets /run, anyone else a directory in the temp dir."""
    if os.getuid() == 0:
        return "/run/managedvolume-engine"
    return os.path.join(os.environ.get("TMPDIR") or "/tmp",
                        "managedvolume-engine-{}".format(os.getuid()))


def default_log_file(environ=None):
    """The engine's log directory: ``$ENGINE_LOG/managedblock/``."""
    environ = os.environ if environ is None else environ
    return os.path.join(environ.get(ENV_ENGINE_LOG) or ENGINE_LOG_DIR,
                        "managedblock", "managedvolume.log")


def fallback_log_file():
    """Where logs go when the log file cannot be opened: the private run
    directory (never stderr, which the engine parses)."""
    return os.path.join(default_run_dir(), "managedvolume.log")


def resolve_log_file(value, environ=None):
    """--log-file as the runner takes it: a path, or "" for stderr."""
    if value == LOG_STDERR:
        return ""
    return value or default_log_file(environ)


def private_dirs(path):
    """Make sure directory ``path`` exists; create what is missing 0700.

    Every level created here is 0700 (``os.makedirs(mode=)`` gives only the
    leaf that mode, the parents 0777 minus umask).  A directory that
    already exists is left as it is -- an admin may name a socket in /tmp
    or /run -- except the default run directory: it is ours whoever created
    it (a cold run of an older version made it 0755), so it must be a
    directory of our uid and is made 0700.  Returns the paths whose mode
    was changed, for the caller to log.
    """
    target = os.path.abspath(path)
    run_dir = next((d for d in (default_run_dir(), uid_run_dir())
                    if os.path.commonpath([target, d]) == d), None)
    mine = run_dir is not None
    if mine and os.path.lexists(run_dir):
        # Checked before anything is created in it.
        _check_run_dir(run_dir)
    missing = []
    path = target
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            if not os.path.isdir(p):
                raise
            continue    # a concurrent run made it (with this very code)
        os.chmod(p, 0o700)     # a umask such as 0277 aside
    fixed = []
    if mine:
        st = _check_run_dir(run_dir)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(run_dir, 0o700)
            fixed.append(run_dir)
    return fixed


def _check_run_dir(run_dir):
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise errors.EngineError(
            "{} must be a directory owned by uid {} (found mode {:o}, "
            "uid {})".format(run_dir, os.getuid(), st.st_mode, st.st_uid))
    return st


def default_locks_dir():
    """Where every command on this machine locks its volumes, whatever
    its environment (never under ENGINE_TMP, which only the engine's
    commands have, and which ovirt-engine empties at every start and
    stop): ovirt-engine's state directory's
    ``managedvolume-engine/locks`` on an engine machine, else (no
    ovirt-engine: development, tests) ``uid_run_dir``'s ``locks``."""
    if os.path.isdir(ENGINE_STATE_DIR):
        return os.path.join(ENGINE_STATE_DIR, "managedvolume-engine",
                            "locks")
    return os.path.join(uid_run_dir(), "locks")


def locks_dir(path):
    """Make sure ``path`` is a locks directory this process may lock in
    beside every other command (``private_dirs`` for what is missing).

    Lock files are made 0600 by whoever locks a volume first: the
    directory must be ours, and root does not make one (or a file in
    one) under another user's directory, such as the engine's
    ``/var/lib/ovirt-engine`` (ovirt): ovirt-engine's own commands,
    run as ovirt, could then not open the volume's lock and failed.
    """
    target = os.path.abspath(path)
    found = target
    while not os.path.lexists(found) and found != os.path.dirname(found):
        found = os.path.dirname(found)
    st = os.stat(found)
    uid = os.getuid()
    if st.st_uid != uid and (found == target or uid == 0):
        owner = _user_name(st.st_uid)
        raise errors.EngineError(
            "The locks directory {} {} {} (uid {}), not to uid {}: run "
            "this command as {} (sudo -u {} ...), as ovirt-engine runs "
            "it, so that its commands can open the lock files it "
            "makes".format(target, "belongs to" if found == target else
                           "would be made in {}, which belongs to".format(
                               found), owner, st.st_uid, uid, owner,
                           owner))
    return private_dirs(target)


def _user_name(uid):
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def default_socket():
    return os.path.join(default_run_dir(), "cinderlib.sock")


def parse_bool(name, value):
    """The engine sends Java's Boolean.toString(): "true" / "false"."""
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise errors.EngineUsage("{} must be true or false, got {!r}".format(
        name, value))


def log_level(value, name="--log-level"):
    """A log level name (any case; empty: INFO), upper-cased.

    Checked here, before anything runs: logging refuses an unknown one
    with a ValueError deep in the run (an internal error; in the warm
    service, a lost request).
    """
    level = (value or "INFO").strip().upper()
    level = LOG_LEVEL_ALIASES.get(level, level)
    if level not in LOG_LEVELS:
        raise errors.EngineUsage("{} must be one of {}, got {}".format(
            name, ", ".join(LOG_LEVELS), _quoted(value)))
    return level


def split_address(value, default_port):
    """(address, port) of "ADDRESS", "ADDRESS:PORT", "[V6]:PORT" or "V6"."""
    if value.startswith("["):
        address, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        address, _, port = value.partition(":")
    else:
        address, port = value, ""
    return address, int(port) if port else default_port


def parse_addresses(text):
    """``HOST=ADDRESS[:PORT],...`` -> {host: address}; ValueError names
    the bad entry."""
    addresses = {}
    for entry in text.replace(";", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        host, eq, address = entry.partition("=")
        host, address = host.strip(), address.strip()
        if not eq or not host or not address:
            raise ValueError("expected HOST=ADDRESS[:PORT], got {!r}".format(
                entry))
        try:
            _, port = split_address(address, DEFAULT_HOST_PORT)
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise ValueError("bad port in {!r}".format(entry))
        addresses[host] = address
    return addresses


def request_timeout(command, timeout):
    """Seconds ``command`` may run (None: no limit), given the --timeout
    set (None: not set, ``NO_TIMEOUT``: no limit)."""
    if timeout is None:
        return DEFAULT_TIMEOUTS[command]
    if timeout == NO_TIMEOUT:
        return None
    return timeout


# Private helpers

def _options_from_env(environ):
    opts = Options()
    if environ.get(ENV_TIMEOUT):
        opts.timeout = _timeout(environ[ENV_TIMEOUT], ENV_TIMEOUT,
                                zero_means_none=True)
    if environ.get(ENV_LOCK_TIMEOUT):
        opts.lock_timeout = _timeout(environ[ENV_LOCK_TIMEOUT],
                                     ENV_LOCK_TIMEOUT)
    opts.log_file = environ.get(ENV_LOG_FILE, "")
    opts.log_level = log_level(environ.get(ENV_LOG_LEVEL, ""), ENV_LOG_LEVEL)
    opts.locks_dir = environ.get(ENV_LOCKS_DIR, "")
    opts.socket = environ.get(ENV_SOCKET, "")
    opts.cold = parse_bool(ENV_COLD, environ.get(ENV_COLD, ""))
    for option, env in _HOST_OPTIONS.items():
        if environ.get(env):
            _host_option(opts, option, environ[env], env)
    return opts


# --host-* option -> its environment variable.
_HOST_OPTIONS = {
    "--host-port": ENV_HOST_PORT,
    "--host-cert": ENV_HOST_CERT,
    "--host-key": ENV_HOST_KEY,
    "--host-ca": ENV_HOST_CA,
    "--host-timeout": ENV_HOST_TIMEOUT,
    "--host-tls": ENV_HOST_TLS,
    "--host-addresses": ENV_HOST_ADDRESSES,
}


def _host_option(opts, option, value, name):
    """Check one --host-* value and store it as a hosts.Settings field."""
    if option == "--host-port":
        if not (value.isascii() and value.isdigit()) or \
                not 0 < int(value) < 65536:
            raise errors.EngineUsage("{} must be a port number, got "
                                     "{}".format(name, _quoted(value)))
        opts.hosts["port"] = int(value)
    elif option == "--host-timeout":
        opts.hosts["timeout"] = _timeout(value, name)
    elif option == "--host-tls":
        opts.hosts["tls"] = parse_bool(name, value)
    elif option == "--host-addresses":
        try:
            opts.hosts["addresses"] = parse_addresses(value)
        except ValueError as e:
            raise errors.EngineUsage("{}: {}".format(name, e))
    else:
        if not value:
            raise errors.EngineUsage("{} is empty".format(name))
        opts.hosts[option[len("--host-"):] + "_file"] = value


_VALUED = {"--timeout", "--lock-timeout", "--log-file", "--log-level",
           "--locks-dir", "--socket"} | set(_HOST_OPTIONS)


def _parse_option(opts, argv):
    arg = argv.pop(0)
    name, eq, value = arg.partition("=")
    if name in ("--cold", "--serve"):
        if eq:
            raise errors.EngineUsage("{} takes no value".format(name))
        setattr(opts, name[2:], True)
        return
    if name not in _VALUED:
        raise errors.EngineUsage("unknown option {}".format(name))
    if not eq:
        if not argv:
            raise errors.EngineUsage("{} needs a value".format(name))
        value = argv.pop(0)
    if name == "--timeout":
        opts.timeout = _timeout(value, name, zero_means_none=True)
    elif name == "--lock-timeout":
        opts.lock_timeout = _timeout(value, name)
    elif name in _HOST_OPTIONS:
        _host_option(opts, name, value, name)
    elif name == "--log-level":
        opts.log_level = log_level(value, name)
    else:
        setattr(opts, name[2:].replace("-", "_"), value)


def _timeout(value, name, zero_means_none=False):
    """Seconds > 0; with ``zero_means_none``, 0 or "none" is no timeout
    (``NO_TIMEOUT``)."""
    if zero_means_none and value.strip().lower() in ("0", "none"):
        return NO_TIMEOUT
    try:
        t = float(value)
    except ValueError:
        t = 0
    if not 0 < t <= MAX_TIMEOUT:
        raise errors.EngineUsage("{} must be a positive number of seconds "
                                 "up to {}{}, got {}".format(
                                     name, MAX_TIMEOUT,
                                     " (0: none)" if zero_means_none
                                     else "", _quoted(value)))
    return t


def _source(name, value, default_env, environ, stdin):
    """Resolve an inline / @FILE / - / env: value (never echoing it)."""
    if value == "-":
        return stdin.read()
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path) as f:
                return f.read()
        except OSError as e:
            raise errors.EngineUsage("cannot read {} from {}: {}".format(
                name, path, e.strerror))
    if value.startswith("env:"):
        var = value[4:] or default_env
        if var not in environ:
            raise errors.EngineUsage("{}: environment variable {} is not "
                                     "set".format(name, var))
        return environ[var]
    return value


def _driver(text):
    try:
        driver = json.loads(text)
    except ValueError as e:
        # Not the text itself: it may hold a password.
        raise errors.EngineUsage("DRIVER_JSON is not valid JSON ({}: line "
                                 "{} column {})".format(e.msg, e.lineno,
                                                        e.colno))
    except RecursionError:
        raise _too_deep("DRIVER_JSON")
    _check_depth("DRIVER_JSON", driver)
    if not isinstance(driver, dict):
        raise errors.EngineUsage("DRIVER_JSON must be a JSON object")
    # ovirt-engine's: which client to run (ManagedBlockExecutor picks
    # /usr/share/ovirt-engine/managedblock/<adapter>-adapter by it); not an
    # option of the cinder driver.
    driver.pop("adapter", None)
    driver.setdefault("volume_backend_name", "file")
    return driver


def _check_volume_driver(driver):
    # No default driver: a storage domain without one is a mistake, and
    # the embedded FileDriver serves only when named.  (Not a usage error:
    # the command line is right, the configuration is not.)
    volume_driver = driver.get("volume_driver")
    if not volume_driver or not isinstance(volume_driver, str):
        raise errors.EngineError(
            "DRIVER_JSON has no volume_driver (the cinder driver class, "
            "e.g. {})".format(FILE_DRIVER))


def _command_args(command, values):
    required, optional = COMMANDS[command]
    if not len(required) <= len(values) <= len(required) + len(optional):
        raise errors.EngineUsage("{} takes {}, got {} argument(s)".format(
            command, " ".join(list(required) +
                              ["[{}]".format(o) for o in optional]),
            len(values)))
    args = dict(zip(required + optional, values))
    for name in IDS:
        if name in args:
            _check_uuid(name, args[name])
    if "size" in args:
        args["size"] = _size(args["size"])
    if "refresh" in args:
        args["refresh"] = parse_bool("refresh", args["refresh"])
    for name in ("connector_info", "device"):
        if name in args:
            args[name] = _json_arg(name, args[name], want=dict)
    if "connector_info" in args:
        # What connect_volume matches connections by, and what
        # disconnect_volume and the hosts are asked by: a connection
        # without it could never be named again.
        _check_host(args["connector_info"].get("host"), "connector_info")
    if "connector" in args:
        args["connector"] = _connector(args["connector"])
    return args


def _check_uuid(name, value):
    # The canonical 8-4-4-4-12 form only (uuid.UUID would also take braces,
    # "urn:uuid:" and 32 bare digits: one volume under several names).
    # The value is passed on as given: no second spelling of an id is made.
    if not _UUID.fullmatch(value):
        raise errors.EngineUsage("{} must be a UUID, got {}".format(
            name, _quoted(value)))


def _size(value):
    # ASCII digits only: int() would also take "+5", " 5", "1_0" and
    # other scripts' digits.
    # int() of more than 4300 digits raises (Python 3.11): counted first.
    digits = value.lstrip("0")
    if not (value.isascii() and value.isdigit()) or not digits:
        raise errors.EngineUsage(
            "size must be a positive whole number of GiB, got {}".format(
                _quoted(value)))
    if len(digits) > len(str(MAX_SIZE)) or int(digits) > MAX_SIZE:
        raise errors.EngineUsage(
            "size must be at most {} GiB, got {}".format(MAX_SIZE,
                                                         _quoted(value)))
    return int(digits)


def _quoted(value):
    """``value`` quoted for an error line: at most QUOTE_MAX characters."""
    if len(value) > QUOTE_MAX:
        return "{!r}...".format(value[:QUOTE_MAX])
    return repr(value)


def _json_arg(name, value, want):
    if value.startswith("@"):
        value = _source(name, value, None, {}, None)
    try:
        obj = json.loads(value)
    except ValueError:
        raise errors.EngineUsage("{} is not valid JSON".format(name))
    except RecursionError:
        raise _too_deep(name)
    _check_depth(name, obj)
    if not isinstance(obj, want):
        raise errors.EngineUsage("{} must be a JSON object".format(name))
    return obj


def _connector(value):
    """A connector JSON object (a dict naming a "host"), or a plain host
    name (a str)."""
    if value.lstrip().startswith(("{", "@")):
        # Here only: hosts imports this module (and ssl), and a host
        # name, what the engine passes, needs none of it.
        from . import hosts
        connector = _json_arg("connector", value, want=dict)
        _check_host(connector.get("host"), "connector")
        conn_id = connector.get(hosts.CONNECTION_ID, "-")
        if not (isinstance(conn_id, str) and conn_id):
            raise errors.EngineUsage("connector's {} must be a non-empty "
                                     "string".format(hosts.CONNECTION_ID))
        if not isinstance(connector.get(hosts.FORCE, False), bool):
            raise errors.EngineUsage("connector's {} must be true or "
                                     "false".format(hosts.FORCE))
        return connector
    if not value:
        raise errors.EngineUsage("connector host is empty")
    return value


def _check_host(host, name):
    if not isinstance(host, str) or not host.strip():
        raise errors.EngineUsage("{} has no host (a non-empty string "
                                 "naming the host)".format(name))


def _check_depth(name, obj):
    """Refuse JSON nested deeper than MAX_DEPTH (walked level by level:
    no recursion here)."""
    level = [obj] if isinstance(obj, (dict, list)) else []
    for _ in range(MAX_DEPTH):
        nested = []
        for o in level:
            values = o.values() if isinstance(o, dict) else o
            nested.extend(v for v in values if isinstance(v, (dict, list)))
        if not nested:
            return
        level = nested
    if level:
        raise _too_deep(name)


def _too_deep(name):
    return errors.EngineUsage("{} is nested more than {} levels deep".format(
        name, MAX_DEPTH))


def _check_correlation_id(correlation_id):
    """The engine's id prefixes the answer line it reads with Java's
    readLine: a line break (\n, \r) in it splits that line, and the
    answer is written as UTF-8.  Refused before anything runs (it did
    run, and then failed to print its answer)."""
    ok = bool(correlation_id) and correlation_id.isprintable()
    if ok:
        try:
            correlation_id.encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    if not ok:
        # An id starting with "error" is fine: see outcome.result.
        raise errors.EngineUsage(
            "invalid correlation id {} (it must be printable UTF-8 "
            "text)".format(_quoted(correlation_id)))


def _check_url_userinfo(url):
    """Refuse a raw '@' in a DB URL's user name or password.

    SQLAlchemy ends the password at the first '@' and takes the rest for
    the host, which its errors then print ("could not translate host name
    "SECRET@127.0.0.1""), and which our own masking (up to the last '@')
    did not read as SQLAlchemy does.  '%40' is the way to write it (for
    the engine: in its MANAGEDBLOCK_DB_PASSWORD, which it puts in the URL
    as it is).  SQLite URLs have no user: their paths may hold '@'.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower().startswith("sqlite"):
        return
    if rest.count("@") > 1:
        raise errors.EngineUsage(
            "DB_URL holds more than one '@': percent-encode '@' in its "
            "user name and password as %40")


def _with_password(url, environ):
    """Put $MANAGEDVOLUME_DB_PASSWORD (or libpq's $PGPASSWORD) in ``url``.

    Only into a URL that names a user but no password.  Done here, not left
    to libpq, so that the warm service (which has not the command's
    environment) connects the same way a cold run does.
    """
    password = environ.get(ENV_DB_PASSWORD) or environ.get("PGPASSWORD")
    if not password or _url_password(url) is not None:
        return url
    scheme, sep, rest = url.partition("://")
    creds, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" in creds:
        return url
    from urllib.parse import quote
    return "{}://{}:{}@{}".format(scheme, creds, quote(password, safe=""),
                                  hostpart)


def _with_pg_defaults(url):
    """``url`` with the ``PG_DEFAULTS`` its query string does not set.

    Only for psycopg2 (the engine's ``postgresql+psycopg2://``, and
    SQLAlchemy's default for ``postgresql://``): other drivers take other
    arguments.  The query starts at the first '?' after the user part, as
    SQLAlchemy reads it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in PG_SCHEMES:
        return url
    # The user part as SQLAlchemy's URL pattern reads it (a user without
    # ':' or '/', a password without '@'): an '@' in the query string
    # (application_name=a@b, a certificate path) is not its end.
    creds = re.match(r"(?:[^:/]*(?::[^@]*)?@)?", rest).group(0)
    creds, at = creds[:-1], creds[-1:]
    base, _, query = rest[len(creds) + len(at):].partition("?")
    from urllib.parse import parse_qsl
    from urllib.parse import urlencode
    given = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
    missing = [(k, v) for k, v in PG_DEFAULTS if k not in given]
    if not missing:
        return url
    query = "&".join(q for q in (query, urlencode(missing)) if q)
    return "{}://{}{}{}?{}".format(scheme, creds, at, base, query)


def _collect_secrets(obj, found):
    from vdsm_managedvolume import mask
    if isinstance(obj, dict):
        for k, v in obj.items():
            if mask.is_secret_key(k) and isinstance(v, str) and v:
                found.append(v)
            else:
                _collect_secrets(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_secrets(v, found)


def _url_password(url):
    # scheme://user:password@host/... without importing SQLAlchemy here.
    rest = url.partition("://")[2]
    creds, at, _ = rest.rpartition("@")
    if not at:
        return None
    user, colon, password = creds.partition(":")
    if not colon or not password:
        return None
    from urllib.parse import unquote
    return unquote(password)
