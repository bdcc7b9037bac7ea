"""Run one request on cinderlib and say what the engine must read.

Both ways of running an operation end here: in the command's own process
(cold) and in a child of the warm service.  ``run`` returns an ``Outcome``
(the exact stdout bytes and the exit code, see ``outcome``) instead of
printing, so the two ways are byte-identical by construction.

Failures never print a traceback on stdout.  The log gets one ERROR line
per failure, the traceback only at DEBUG (``--log-level DEBUG``), masked.
The log is a file (the engine's log directory by default, see
``args.resolve_log_file``); stderr only when asked (``--log-file -``):
ovirt-engine merges stderr into the output it parses.  The whole
operation, cinderlib's import and setup included, runs in a worker thread;
when its timeout expires (the sub-command's ``args.DEFAULT_TIMEOUTS`` unless
--timeout says otherwise), the caller gets ``error:... did not finish
within N seconds``, exit 1, and the process exits, abandoning the
operation: never reported as success.

cinderlib pitfalls handled here (docs/dependencies.md, "cinderlib"):

- ``cl.setup(disable_logs=True)`` disables every logger of the process, ours
  included: we pass ``disable_logs=False`` and then put our own handler back
  (oslo.log replaces the root handlers), with cinder's loggers at WARNING.
- ``file_locks_path`` is always given (cinderlib's default is the cwd).
- With ``VIRTUAL_ENV`` set, ``cl.setup`` rewrites the venv's
  ``etc/cinder/rootwrap.conf``; we hide the variable during setup.
"""

import logging
import os
import sys
import threading
import traceback
import warnings

from vdsm_managedvolume import errors
from vdsm_managedvolume import log as logutil
from vdsm_managedvolume import mask

from . import args as argsmod
from . import volumelock
from .outcome import EXIT_FAILED
from .outcome import EXIT_OK
from .outcome import EXIT_USAGE
from .outcome import Outcome
from .outcome import error
from .outcome import result

log = logging.getLogger("vdsm_managedvolume.engine")

# Third-party loggers kept at WARNING unless the log level is DEBUG: at INFO
# cinder logs connection info (with CHAP secrets) and every SQL migration.
NOISY = ("cinder", "cinderlib", "oslo", "oslo_db", "oslo_concurrency",
         "oslo_service", "oslo_config", "oslo_utils", "oslo_log", "futurist",
         "os_brick", "sqlalchemy", "alembic", "stevedore", "tooz",
         "urllib3", "py.warnings", "oslo_policy", "oslo.privsep")

def run(request):
    """Run ``request`` within its timeout and return its ``Outcome``."""
    try:
        # The command checked it; a request from another version of the
        # command, forwarded to a warm service, may not have been: an
        # answer, not a child dying in configure_logging.
        request.log_level = argsmod.log_level(request.log_level,
                                              "log level")
    except errors.EngineUsage as e:
        return error(e, EXIT_USAGE)
    scrub = Scrubber(request.secrets())
    configure_logging(request.log_level, request.log_file,
                      request.correlation_id, scrub)
    # The give-up below writes through these, whoever holds the root
    # logger by then (``give_up``).
    ours = list(logging.getLogger().handlers)
    box = []
    done = threading.Event()

    def work():
        try:
            with logutil.flow(request.correlation_id):
                box.append(_execute(request, scrub))
        finally:
            done.set()

    # Waited for through an Event set when the work is done: the answer
    # goes out then, without waiting for the thread's end (join() would
    # do too: nothing cinder or cinderlib import monkey-patches threading,
    # and warm._wait_ended relies on join()).
    worker = threading.Thread(target=work, name="operation", daemon=True)
    worker.start()
    if not done.wait(request.timeout):
        give_up(ours, request, worker)
        return error(errors.EngineTimeout(
            operation=request.command, timeout=seconds(request.timeout)))
    if not box:
        return error("internal error: the operation ended without a result")
    return box[0]


def give_up(handlers, request, worker):
    """Log that ``request``, run by ``worker``, was given up, and where
    it was (a database connect, a driver call, a lock: the one thing a
    rerun will not show), through ``handlers``: ours, as
    ``configure_logging`` installed them.

    Not through the root logger: a worker given up inside ``cl.setup``
    (a cold run's, under load) may have left oslo.log's handlers there,
    before ``_execute`` put ours back, and oslo.log's formatter fails on
    our records (its format shows the process id, which ``log.setup``
    turns off): the log then had "--- Logging error ---" and the stack
    as a tuple's repr instead of these two lines.
    """
    with logutil.flow(request.correlation_id):
        say(handlers, logging.ERROR,
            "%s did not finish within %s seconds; giving up",
            request.command, seconds(request.timeout))
        say(handlers, logging.WARNING, "%s was given up at:\n%s",
            request.command, stack_of(worker))


def say(handlers, level, msg, *args):
    """Log ``msg % args`` as ``log`` would, through ``handlers`` only
    (their filters mask, add the flow id and scrub, as on any line)."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, args, None)
    for handler in handlers:
        if level >= handler.level:
            handler.handle(record)


def stack_of(thread):
    """The Python stack of a running ``thread``, innermost call last."""
    try:
        frame = sys._current_frames().get(thread.ident)
        if frame is None:
            return "(ended)"
        return "".join(traceback.format_stack(frame)).rstrip()
    except Exception as e:
        # Frames change under us while the thread runs on: say so
        # rather than lose the line.
        return "(not readable: {}: {})".format(type(e).__name__, e)


def configure_logging(level="INFO", filename="", flow_id=None, scrub=None):
    """Our handler on the root logger: file or stderr, flow id, masking.

    Safe to call again after something (oslo.log) replaced the handlers.
    ``flow_id`` is the default flow of every line (a process or a warm
    child serves one request), ``scrub`` hides the request's secret values.
    """
    level = level.upper()
    unusable = None
    try:
        logutil.setup(level=level, filename=filename or None,
                      stream=sys.stderr)
    except OSError as e:
        unusable = e
        _fallback_logging(level)
    root = logging.getLogger()
    for handler in root.handlers:
        if flow_id is not None:
            # A thread a library starts has no flow in its context; in this
            # process every line belongs to this request anyway.
            handler.filters.insert(0, _DefaultFlow(flow_id))
        if scrub is not None:
            handler.addFilter(scrub)
    wanted = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in NOISY:
        logger = logging.getLogger(name)
        # setLevel clears the cache of every logger (hundreds, once cinder
        # is imported): in a warm child, whose parent set the same levels,
        # that would only copy their pages.
        if logger.level != wanted:
            logger.setLevel(wanted)
    logging.captureWarnings(True)
    if unusable is not None:
        log.warning("Cannot write the log file %s (%s); logging to %s",
                    filename, unusable.strerror or unusable,
                    _handler_target())


def _fallback_logging(level):
    """The private run directory's log file; never stderr."""
    fallback = argsmod.fallback_log_file()
    try:
        argsmod.private_dirs(os.path.dirname(fallback))
        logutil.setup(level=level, filename=fallback)
    except (OSError, errors.Error):
        logutil.setup(level=level, stream=open(os.devnull, "w"))


def _handler_target():
    for handler in logging.getLogger().handlers:
        return getattr(handler, "baseFilename", os.devnull)
    return os.devnull


class Scrubber(logging.Filter):
    """Hides the request's own secret *values* wherever they show up.

    ``mask`` recognizes ``password=...`` shapes; a backend error quoting a
    password in free text ("login admin/s3cret failed") would slip through,
    so the values themselves are replaced too, in logs and in error lines.
    """

    def __init__(self, secrets):
        super().__init__()
        self.secrets = list(secrets)

    def text(self, text):
        text = mask.mask_text(text)
        for secret in self.secrets:
            text = text.replace(secret, mask.MASK)
        return text

    def filter(self, record):
        if not self.secrets:
            return True
        record.msg = self.text(record.getMessage())
        record.args = None
        if record.exc_text:
            record.exc_text = self.text(record.exc_text)
        elif record.exc_info:
            record.exc_text = self.text(
                logging.Formatter().formatException(record.exc_info))
        return True


# SQLite (the default database): how long a transaction waits for the
# write lock another shim process holds before failing with "database is
# locked" (pysqlite's own default is 5 s); see _queue_sqlite_writers.
SQLITE_BUSY_TIMEOUT = 60.0


# Process-wide cinderlib state: set up once, per DB URL.

_state = {"db_url": None, "locks_dir": None}


def setup_cinderlib(db_url, locks_dir):
    """Import cinderlib and point it at ``db_url`` (idempotent).

    The first call runs ``cl.setup``; a later call with another URL only
    switches the persistence.  cinderlib's ``file_locks_path`` is the
    first call's locks directory (the volume locks are each request's:
    ``volumelock``).
    """
    select_threading_backend()
    import cinderlib as cl
    if _state["db_url"] != db_url:
        private_sqlite_file(db_url)
    if not cl.Backend.global_initialization:
        _queue_sqlite_writers()
        _utc_postgresql_sessions()
        # 0700 at every level we create (and the default run directory,
        # shared with the warm service's socket, 0700 even if it exists).
        argsmod.locks_dir(locks_dir)
        persistence = {"storage": "db", "connection": db_url}
        venv = os.environ.pop("VIRTUAL_ENV", None)
        try:
            cl.setup(file_locks_path=locks_dir,
                     persistence_config=persistence,
                     disable_logs=False)
        finally:
            if venv is not None:
                os.environ["VIRTUAL_ENV"] = venv
        _state.update(db_url=db_url, locks_dir=locks_dir)
    elif _state["db_url"] != db_url:
        # cinderlib reconfigures oslo.db's global transaction factory, which
        # refuses once started: give it a fresh one (the old one's pool was
        # disposed by the warm service before forking).
        from cinder.db.sqlalchemy import api as sqla_api
        from oslo_db.sqlalchemy import enginefacade
        sqla_api.main_context_manager._root_factory = \
            enginefacade._TransactionFactory()
        _state["db_url"] = None
        cl.Backend.set_persistence({"storage": "db", "connection": db_url})
        _state["db_url"] = db_url
    return cl


def sqlite_path(db_url):
    """The file a SQLite ``db_url`` opens, as pysqlite opens it, or None
    (another database, or SQLite in memory: ``sqlite://``,
    ``sqlite:///:memory:``, a ``file:`` URI with ``mode=memory``)."""
    from urllib.parse import parse_qs
    from urllib.parse import unquote
    from urllib.parse import urlsplit

    from sqlalchemy.engine import url as sa_url
    try:
        url = sa_url.make_url(db_url)
    except Exception:
        return None     # cl.setup says what is wrong with it
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if str(url.query.get("uri", "")).lower() in ("true", "1") and \
            database.startswith("file:"):
        # A SQLite URI filename (SQLAlchemy's ?uri=true): file:PATH or
        # file://[localhost]/PATH, %-escaped, with its own options.
        parts = urlsplit(database)
        if "memory" in parse_qs(parts.query).get("mode", []) or \
                url.query.get("mode") == "memory":
            return None
        database = unquote(parts.path)
    if database in ("", ":memory:"):
        return None
    return os.path.abspath(database)


def private_sqlite_file(db_url):
    """Create a SQLite database file 0600 before SQLite creates it.

    cinderlib's database holds the backends' CHAP passwords and keyrings
    (in each connection's info); SQLite would create the file with the
    process's umask (0644: readable by every local user).  An empty file
    is an empty database to SQLite, and its journal files take the
    database file's mode.  An existing file is left as it is (an admin
    may have reasons), but one others may read or write is logged.
    Nothing here fails the operation: a path SQLite cannot open either is
    for cl.setup to report.
    """
    path = sqlite_path(db_url)
    if path is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                     os.O_CLOEXEC, 0o600)
    except FileExistsError:
        _check_private_file(path)
        return
    except OSError as e:
        log.debug("Cannot create %s 0600 (%s); left to SQLite", path, e)
        return
    try:
        os.fchmod(fd, 0o600)      # a umask such as 0277 aside
    finally:
        os.close(fd)
    log.info("Created the cinderlib database file %s (0600)", path)


def _check_private_file(path):
    import stat
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("The cinderlib database %s is mode %04o: other users "
                    "may read the backends' secrets in it (chmod 600 %s)",
                    path, mode, path)


def _queue_sqlite_writers():
    """Make SQLite transactions wait for each other instead of failing.

    Every shim process (a cold run, a warm child) is a client of its own
    of one SQLite file, and the engine runs operations concurrently.
    oslo.db begins each transaction with a plain (deferred) ``BEGIN``
    (``oslo_db.sqlalchemy.engines._init_events``), which takes the write
    lock only at the first write, after the reads.  A transaction that
    has read and then finds another process holding the write lock gets
    "database is locked" at once, whatever the busy timeout: SQLite does
    not wait there, as waiting could deadlock (sqlite3_busy_handler(3)).
    So a SQLite transaction here begins with ``BEGIN IMMEDIATE`` (the
    write lock first, waited for) and waits up to SQLITE_BUSY_TIMEOUT.
    Read-only transactions queue too: they are short.  Other databases
    are left alone.  Registered on the classes, once per process (a warm
    service's children inherit it), before cinderlib creates its engine.
    """
    import sqlalchemy
    if sqlalchemy.event.contains(sqlalchemy.pool.Pool, "connect",
                                 _sqlite_connected):
        return
    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "connect",
                            _sqlite_connected)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "begin",
                            _sqlite_begin)


def _utc_postgresql_sessions():
    """Make every PostgreSQL session of this process run in UTC.

    cinder's naive stamps (updated_at, oslo.db's defaults) are UTC, but
    those its versioned objects set are aware (a connection's created_at,
    the ``attach_time`` connect_volume stamps, ``ops._connected_at``),
    which psycopg2 sends as ``timestamptz``: PostgreSQL stores them in
    the *session's* time zone, the server's unless set, in cinder's
    ``timestamp without time zone`` columns.  So their order depended on
    the server's zone: when it changed (daylight saving time ending, a
    server set to another zone) a connection connected later could look
    connected earlier, and save_device saved the device on another
    host's connection (review-engfix6 L1).  In UTC they are all UTC.

    ``SET TIME ZONE 'UTC'`` once per new database connection (cinderlib
    pools them: a few per process), in its own transaction, and none
    when the server's zone, which it reports at start-up, is UTC
    already.  Not in libpq's start-up ``options`` (``-c timezone=UTC``,
    no round trip at all), which PgBouncer refuses ("unsupported startup
    parameter: options") unless its ``ignore_startup_parameters`` lists
    it, failing every command (review-engfix7 L2); PgBouncer keeps a
    client's TimeZone across the server connections it hands it, as it
    keeps its client_encoding.  Registered on the class, once per
    process, before cinderlib creates its engine; other databases are
    left alone.
    """
    import sqlalchemy
    if not sqlalchemy.event.contains(sqlalchemy.engine.Engine, "connect",
                                     _pg_connected):
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect",
                                _pg_connected)


# What PostgreSQL reports as its TimeZone when it is UTC (its default
# zone is the one initdb found, "Etc/UTC" on a host in UTC).
PG_UTC_ZONES = ("UTC", "Etc/UTC")


def _pg_connected(dbapi_connection, connection_record):
    if not type(dbapi_connection).__module__.startswith("psycopg2"):
        return
    if dbapi_connection.get_parameter_status("TimeZone") in PG_UTC_ZONES:
        return
    # Committed at once: the pool rolls back what a checkout leaves open,
    # and a rolled back SET is undone.
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
    finally:
        dbapi_connection.autocommit = autocommit


def _sqlite_connected(dbapi_connection, connection_record):
    import sqlite3
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA busy_timeout = {:d}".format(
            int(SQLITE_BUSY_TIMEOUT * 1000)))


def _sqlite_begin(conn):
    # Runs before oslo.db's own "begin" listener (class-level listeners
    # come first), which emits BEGIN unless its "in_transaction" mark says
    # a transaction is open.
    if conn.dialect.name == "sqlite" and "in_transaction" not in conn.info:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.info["in_transaction"] = True


def backend(cl, driver):
    """The cinderlib Backend of this driver config (created once)."""
    driver = dict(driver)
    name = driver.pop("volume_backend_name")
    existing = cl.Backend.backends.get(name)
    if existing is not None and existing._original_driver_cfg != driver:
        # Same name, new options (a changed storage domain): start over.
        del cl.Backend.backends[name]
    return cl.Backend(name, **driver)


def check_driver(driver):
    """The driver class must import: no falling back to anything else."""
    import importlib
    path = driver.get("volume_driver", "")
    module, _, name = path.rpartition(".")
    try:
        if not module:
            raise ImportError("not a module.Class path")
        cls = getattr(importlib.import_module(module), name, None)
        if cls is None:
            raise ImportError("module {} has no {}".format(module, name))
    except Exception as e:
        raise errors.EngineError(
            "volume_driver {} cannot be imported: {}".format(
                path, str(e) or type(e).__name__))


# Private helpers

def select_threading_backend():
    """Keep eventlet out: oslo.service's threading backend, no warnings.

    Must run before cinder is imported; harmless afterwards.
    """
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    try:
        from oslo_service import backend
        backend.init_backend(backend.BackendType.THREADING)
    except Exception:
        # Older oslo.service (no backends) or already selected.
        pass


def _execute(request, scrub):
    from . import ops
    log.info("Running %s %s", request.command, _describe(request))
    try:
        set_up = _state["db_url"] == request.db_url
        cl = setup_cinderlib(request.db_url, request.locks_dir)
        if not set_up:
            # oslo.log just replaced the root handlers: put ours back.
            configure_logging(request.log_level, request.log_file,
                              request.correlation_id, scrub)
        check_driver(request.driver)
        be = backend(cl, request.driver)
        ids = ops.lock_ids(request.command, request.args)
        # What disconnect_volume needs to ask the hosts, and what is
        # locked.
        op_args = dict(request.args, hosts=request.hosts,
                       correlation_id=request.correlation_id, locked=ids)
        # The request's locks directory, not the one cinderlib was set
        # up with (a warm service's first request's): every process
        # working on a volume must lock in the same place.
        with volumelock.held(request.locks_dir, ids,
                             "{} (flow {})".format(request.command,
                                                   request.correlation_id),
                             timeout=request.lock_timeout,
                             discard=[request.args[name] for name in
                                      ops.DISCARDS.get(request.command,
                                                       ())]):
            payload = ops.OPERATIONS[request.command](be, op_args)
    except errors.EngineNotFound as e:
        log.warning("%s: %s", request.command, e)
        code = EXIT_OK if request.command in ops.IDEMPOTENT else EXIT_FAILED
        return error(e, code)
    except errors.EngineUsage as e:
        return error(scrub.text(str(e)), EXIT_USAGE)
    except Exception as e:
        return failure(request, scrub, e)
    log.info("%s done", request.command)
    if payload is None:
        return Outcome()
    return result(request.correlation_id, payload)


def failure(request, scrub, exc):
    """The Outcome of ``request`` failing with ``exc`` (logged once)."""
    reason = " ".join(scrub.text(_reason(exc)).split())
    if _expected(exc):
        log.error("%s failed: %s", request.command, reason)
    else:
        log.error("%s failed unexpectedly: %s: %s (the traceback is "
                  "logged at DEBUG)", request.command,
                  type(exc).__name__, reason)
    log.debug("%s failed:\n%s", request.command, scrub.text(
        "".join(traceback.format_exception(type(exc), exc,
                                           exc.__traceback__))))
    return error("{} failed: {}".format(request.command,
                                        scrub.text(_reason(exc))))


def _describe(request):
    parts = ["{}={}".format(k, v) for k, v in request.args.items()
             if k not in ("connector_info", "device")]
    parts.append("backend={}".format(request.driver.get("volume_backend_name")))
    return " ".join(parts)


# Where the errors an operation meets in normal life come from: the
# database (missing, unreachable, wrong password), cinder and its drivers
# (the backend refused), os-brick.  Their message says it all; a traceback
# of the library's insides would only bury it in the log the engine
# captures (stderr by default).
EXPECTED_MODULES = ("cinder", "cinderlib", "os_brick", "oslo_db",
                    "sqlalchemy", "psycopg2")


def _expected(exc):
    """True for an error worth one log line; False for a bug somewhere."""
    if isinstance(exc, (errors.EngineError, OSError)):
        return True
    module = type(exc).__module__
    return any(module == m or module.startswith(m + ".")
               for m in EXPECTED_MODULES)


def _reason(exc):
    text = str(exc) or type(exc).__name__
    if type(exc).__module__.startswith(("cinder", "cinderlib", "oslo",
                                        "sqlalchemy", "psycopg2")):
        return "{}: {}".format(type(exc).__name__, text)
    return text


def seconds(t):
    """A timeout as people write it: 3, not 3.0."""
    return int(t) if float(t).is_integer() else t


class _DefaultFlow(logging.Filter):

    def __init__(self, flow_id):
        super().__init__()
        # Shown as log.flow() shows it (the correlation id is any text the
        # engine chose).
        self.flow_id = logutil.clean_flow_id(flow_id) or "-"

    def filter(self, record):
        if not hasattr(record, "flow_id"):
            current = logutil.current_flow()
            record.flow_id = self.flow_id if current == "-" else current
        return True
