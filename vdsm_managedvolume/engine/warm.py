"""Warm mode: a long-lived service that keeps cinderlib loaded.

A cold run of the command pays for Python, cinderlib's import (seconds on a
busy machine) and ``cl.setup`` (a schema check, ~0.2 s) before doing an
operation that often takes 20 ms.  The warm service pays once::

    managedvolume-cinderlib-client --serve [--socket PATH] [--log-file PATH]

and every later command forwards its request to it (``forward.py``) instead
of running it::

    command ── request (JSON line, secrets included) ──> service
            <── {"output": ..., "exit_code": N} ───────  (then close)

The command prints ``output`` and exits with ``exit_code``: the same bytes a
cold run prints, because the service runs the very same ``runner.run``.

One child per request
---------------------
The service forks a child for each request, from a parent that has imported
cinderlib and run ``cl.setup`` for the request's DB URL, so the child only
builds the Backend and runs the operation.  Children give us what threads in
one cinderlib process could not: cinderlib's process-global state is never
shared between two operations, requests run in parallel (the engine runs
operations concurrently), a stuck driver is killed without harming the
service, and nothing of one request (its secrets, a driver's session) lives
on in the next.  The parent keeps itself fork-safe: it never holds a pooled
database connection when it forks (the pool is disposed after setup) and
stops tooz's heartbeat thread, so it has no other thread.

The first request for a DB URL is served by a child that does the setup
itself (like a cold run); the parent does the setup *after* forking that
child, for the next ones.  A setup that hangs (database unreachable) makes
the parent exit: its cinderlib state is unknown, and the commands fall back
to cold runs.

Trust
-----
Requests carry backend and database passwords, so the socket is created
0600 inside a 0700 directory, the service serves only its own uid (and
root, checked with SO_PEERCRED), and the command refuses to send anything
to a socket that is not a socket owned by its uid with no group/other
permissions.  If the socket is absent or dead, the command runs the request
itself.  Once a request was sent, it never runs it a second time: a lost
answer is an ``error:`` line, not a retry.
"""

import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import threading
import time

from vdsm_managedvolume import errors
from vdsm_managedvolume import log as logutil
from vdsm_managedvolume import mask

from . import args as argsmod
from . import outcome
from . import runner
from .forward import KILL_GRACE
from .forward import READ_TIMEOUT

log = logging.getLogger("vdsm_managedvolume.engine.warm")

MAX_REQUEST = 4 * 1024 * 1024
MAX_CHILDREN = 32
# How long the parent may spend in cl.setup for a new DB URL.
SETUP_TIMEOUT = 60.0


def serve(socket_path, log_file="", log_level="INFO"):
    """Run the warm service until SIGTERM/SIGINT; returns an exit code."""
    runner.configure_logging(log_level, log_file)
    server = Server(socket_path, log_file=log_file, log_level=log_level)
    try:
        return server.run()
    except AlreadyServing as e:
        log.error("%s", e)
        return 1


class AlreadyServing(Exception):
    pass


class Server:

    def __init__(self, socket_path, log_file="", log_level="INFO"):
        self.socket_path = socket_path
        self.log_file = log_file
        self.log_level = log_level
        self.children = {}          # pid -> kill deadline
        self.stopping = False
        self.exit_code = 0
        self.sock = None
        self._inode = None

    def run(self):
        if _connectable(self.socket_path):
            raise AlreadyServing("a service already listens on {}".format(
                self.socket_path))
        t = time.monotonic()
        _preload()
        log.info("cinderlib loaded in %.2f seconds", time.monotonic() - t)
        self._listen()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("Serving on %s (pid %d)", self.socket_path, os.getpid())
        try:
            while not self.stopping:
                self._reap()
                try:
                    ready, _, _ = select.select([self.sock], [], [], 0.5)
                except InterruptedError:
                    continue
                if ready:
                    self._accept()
        finally:
            self._close()
        log.info("Stopped")
        return self.exit_code

    # Private helpers

    def _listen(self):
        directory = os.path.dirname(os.path.abspath(self.socket_path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(self.socket_path):
            if _connectable(self.socket_path):
                raise AlreadyServing("a service already listens on "
                                     "{}".format(self.socket_path))
            log.info("Removing stale socket %s", self.socket_path)
            os.unlink(self.socket_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)   # 0600 from birth: no window for others
        try:
            self.sock.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        self._inode = os.stat(self.socket_path).st_ino
        self.sock.listen(64)

    def _close(self):
        if self.sock is not None:
            self.sock.close()
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        # Children finish (or time out) on their own; reap what is done.
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)

    def _stop(self, signo, frame):
        log.info("Got signal %d, stopping", signo)
        self.stopping = True

    def _accept(self):
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return
            raise
        try:
            if not self._allowed(conn):
                return
            request = self._read_request(conn)
            if request is None:
                return
            if not self._prepare(request):
                # What a cold run stuck in the same setup would have said.
                _answer(conn, outcome.error(_timeout_error(request)))
                return
            while len(self.children) >= MAX_CHILDREN:
                self._reap(block=True)
            self._fork(conn, request)
        finally:
            conn.close()

    def _allowed(self, conn):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (os.getuid(), 0):
            return True
        log.warning("Refusing request of uid %d (pid %d)", uid, pid)
        return False

    def _read_request(self, conn):
        conn.settimeout(READ_TIMEOUT)
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            return argsmod.Request.from_json(data.decode("utf-8"))
        except (OSError, ValueError, TypeError) as e:
            # Never the data: it holds secrets.
            log.warning("Dropping malformed request (%d bytes): %s",
                        len(data), type(e).__name__)
            return None

    def _fork(self, conn, request):
        pid = os.fork()
        if pid == 0:
            if not request.log_file:
                # The command would have logged to its stderr; the
                # service's log is the closest thing a child has.
                request.log_file = self.log_file
            _child(self.sock, conn, request)   # never returns
        self.children[pid] = (time.monotonic() + request.timeout +
                              KILL_GRACE)
        with logutil.flow(request.correlation_id):
            log.info("Forked child %d for %s", pid, request.command)

    def _reap(self, block=False):
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                break
            self.children.pop(pid, None)
            if status:
                log.warning("Child %d ended with status %#x", pid, status)
            block = False
        now = time.monotonic()
        for pid, deadline in list(self.children.items()):
            if now > deadline:
                log.error("Child %d overran its timeout, killing it", pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.children[pid] = float("inf")

    def _prepare(self, request):
        """Run cl.setup for ``request``'s DB URL here, before forking.

        Then the child (and every later one for this URL) starts set up;
        doing it in both would race on a fresh database's migrations.  A
        setup error is left for the child to meet and report exactly as a
        cold run would.  Runs in a thread, bounded by the request's timeout;
        returns False if it hung (the parent then stops: its cinderlib
        state is unknown and it has a second thread it cannot fork with).
        """
        if runner._state["db_url"] == request.db_url:
            return True
        box = []
        done = threading.Event()

        def work():
            try:
                cl = runner.setup_cinderlib(request.db_url, request.locks_dir)
                _warm_up_queries(cl)
                box.append(None)
            except Exception as e:
                box.append(e)
            finally:
                try:
                    _release_parent_resources()
                finally:
                    done.set()

        t = time.monotonic()
        worker = threading.Thread(target=work, name="setup", daemon=True)
        worker.start()
        finished = done.wait(min(request.timeout, SETUP_TIMEOUT))
        # oslo.log replaced the root handlers during cl.setup.
        runner.configure_logging(self.log_level, self.log_file)
        with logutil.flow(request.correlation_id):
            if not finished:
                log.error("cinderlib setup did not finish within %s "
                          "seconds; stopping (commands run cold meanwhile)",
                          min(request.timeout, SETUP_TIMEOUT))
                self.stopping = True
                self.exit_code = 1
                return False
            if box[0] is not None:
                scrub = runner.Scrubber(request.secrets())
                log.warning("cinderlib setup failed, the child will meet "
                            "it: %s", scrub.text(str(box[0])))
            else:
                log.info("cinderlib set up for %s in %.2f seconds",
                         mask.mask_text(request.db_url),
                         time.monotonic() - t)
        return True


def _child(listener, conn, request):
    """The forked child: run one request, answer, exit.  Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        listener.close()
        _release_inherited_resources()
        _answer(conn, runner.run(request))
        conn.shutdown(socket.SHUT_WR)
        code = 0
    except BaseException:
        try:
            log.exception("Child failed")
        except BaseException:
            pass
    finally:
        try:
            logging.shutdown()
        finally:
            os._exit(code)


def _answer(conn, outcome):
    try:
        conn.settimeout(READ_TIMEOUT)
        conn.sendall(json.dumps(outcome.to_dict()).encode("utf-8"))
    except OSError:
        pass


def _timeout_error(request):
    return errors.EngineTimeout(operation=request.command,
                                timeout=runner.seconds(request.timeout))


def _preload():
    """Import what every request needs (the cost warm mode exists to avoid)."""
    runner.select_threading_backend()
    import cinderlib  # noqa: F401
    from . import filedriver  # noqa: F401
    from . import ops  # noqa: F401


def _warm_up_queries(cl):
    """Run the queries every operation runs, once, in the parent.

    SQLAlchemy compiles and caches each statement shape on first use;
    compiled here, the cache is inherited by every child (~15 ms each).
    """
    nil = "00000000-0000-0000-0000-000000000000"
    persistence = cl.Backend.persistence
    persistence.get_volumes(volume_id=nil, backend_name="-")
    persistence.get_snapshots(volume_id=nil)
    persistence.get_connections(volume_id=nil)


def _release_parent_resources():
    """After setup in the parent: no pooled connection, no extra thread."""
    from cinder import coordination
    from cinder.db.sqlalchemy import api
    try:
        api.get_engine().dispose()
    except Exception as e:
        log.debug("No engine to dispose: %s", e)
    coordinator = coordination.COORDINATOR.coordinator
    heart = getattr(coordinator, "heart", None)
    if heart is not None and heart.is_alive():
        heart.stop()
        heart.wait()
    # Children would otherwise walk (and so copy, page by page) the whole
    # inherited heap at their first garbage collection.
    gc.freeze()


def _release_inherited_resources():
    """In a child: forget (never close) whatever the parent's pool held."""
    if runner._state["db_url"] is None:
        return
    from cinder.db.sqlalchemy import api
    api.get_engine().dispose(close=False)


def _connectable(path):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
