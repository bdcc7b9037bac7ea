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
database connection when it forks (every engine's pool is disposed after
setup), stops tooz's heartbeat thread, and waits for the setup thread's
end (``_wait_ended``), so it has no other thread.

The parent runs ``cl.setup`` for a request's DB URL before forking its
child (once per URL; another URL switches the persistence).  A setup that
hangs (database unreachable) makes the parent exit: its cinderlib state is
unknown, and the commands fall back to cold runs.  A setup that fails (a
wrong password) is answered by the parent itself, formatted as a cold run
formats it; no child is forked from a half set-up cinderlib.

A spare child, forked ahead
---------------------------
Forking is not free, and a fresh child is slow at first: every page of the
parent it writes to (Python writes reference counts even when it only
reads) is copied on that first write, and an operation touches thousands
of them (~2 us each here).  So the parent keeps one *spare* child, forked
for its current DB URL while nobody waits, that warms itself up: it runs
the lookups operations start with (for a nil id: no row, no request's
data), sets up logging, starts and ends a thread, builds and forgets a
backend of the embedded driver on an empty temporary directory, closes
its database connection and says "ready" (~15-25 ms).  The parent, for
its part, has run every query shape of the operations once
(``_warm_up_queries``), so that no child compiles them again.

A request for that URL is handed to the spare -- the request's bytes and
the command's connection (SCM_RIGHTS) over a private socketpair -- and the
parent at once forks the next spare.  The spare then runs the request
exactly as a freshly forked child would, and exits: still one process per
request, nothing of a request outlives it.  When no ready spare is there
(a burst, another DB URL, a spare still warming up after a short wait),
the parent forks a child for the request as before.  A spare whose parent
went away reads EOF and exits.

No child outlives its service
-----------------------------
Every child asks the kernel for SIGKILL when the service dies
(``PR_SET_PDEATHSIG``, set first thing after the fork; a service that died
before that is seen by ``getppid``), so a service killed with SIGKILL
takes its children with it, a child in the middle of a request included,
instead of leaving them to PID 1 (seen after a killed test run).  On
SIGTERM the service retires its spare at once, gives running requests
``STOP_GRACE`` seconds to answer, then kills and reaps what is left.

Trust
-----
Requests carry backend and database passwords, so the socket is created
0600, inside a 0700 directory unless the admin named an existing one
(``args.private_dirs``), the service serves only its own uid (and
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
# How long the parent may spend in cl.setup for a new DB URL, and how long
# a spare child may take to warm up before the parent gives up on it.
SETUP_TIMEOUT = 60.0
# Handing a request to a ready spare is a local write of a few kilobytes;
# a spare that does not take it in this time is killed, and the request
# goes to a freshly forked child.
HANDOFF_TIMEOUT = 5.0
# On SIGTERM, how long running requests may take to answer before the
# service kills them and exits.
STOP_GRACE = 5.0
# prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
_libc_prctl = None
# What a spare says when it has warmed up, and how long a request waits
# for a spare still warming up before it gets a child of its own (forking
# one, ~5 ms, and its slower start cost about as much).
READY = b"R"
SPARE_WAIT = 0.015
# The id of no volume, snapshot or attachment: what warm-up queries ask for.
NIL = "00000000-0000-0000-0000-000000000000"
# What makes the service and its children log their threads' stacks.
DUMP_SIGNAL = signal.SIGUSR1
# The name of the throwaway backend a spare builds (see _warm_up_backend).
WARM_UP_BACKEND = "managedvolume-warm-up"


def serve(socket_path, log_file="", log_level="INFO"):
    """Run the warm service until SIGTERM/SIGINT; returns an exit code."""
    runner.configure_logging(log_level, log_file)
    _dump_stacks_on_signal(log_file)
    server = Server(socket_path, log_file=log_file, log_level=log_level)
    try:
        return server.run()
    except (AlreadyServing, errors.EngineError, OSError) as e:
        # Another service, a run directory not ours, a path we cannot
        # create: one line says it (the traceback at DEBUG).
        log.error("Cannot serve on %s: %s", socket_path, e)
        log.debug("Cannot serve", exc_info=True)
        return 1


class AlreadyServing(Exception):
    pass


def _dump_stacks_on_signal(log_file):
    """On DUMP_SIGNAL the service, or any child of it (inherited), writes
    the Python stack of each of its threads to the service's log.

    faulthandler writes from the signal handler, without the GIL or any
    lock: a process stuck in C code (a connect waiting on a lock inherited
    across fork) still answers.  On a descriptor of its own (the service's
    log file, else a copy of stderr): the logging handler's may be closed
    and replaced under it.  Both follow log rotation (``_follow_log_file``).
    ``kill -USR1 PID`` for a request that does not end, before killing it.
    """
    global _dump_fd
    import faulthandler
    fd = None
    if log_file:
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                         0o640)
        except OSError as e:
            log.warning("Stack dumps on signal %d go to stderr: %s",
                        DUMP_SIGNAL, e)
    try:
        if fd is None:
            fd = os.dup(2)
        else:
            _dump_fd = fd
    except OSError as e:
        # Never the default action: it would kill the service, and with
        # it (PR_SET_PDEATHSIG) every request running.
        log.warning("No stack dumps on signal %d, ignored: %s",
                    DUMP_SIGNAL, e)
        signal.signal(DUMP_SIGNAL, signal.SIG_IGN)
        return
    faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True)


# The descriptor stack dumps go to when it is the service's log file.
_dump_fd = None


def _follow_log_file(log_file):
    """Write the log and the stack dumps to the file at ``log_file`` when
    logrotate moved the one they were written to; True when it did.

    ``copytruncate`` needs nothing (both descriptors append: after the
    truncation, at the start of the same file).  A rename (``create`` or
    not) leaves them on the moved file, compressed and deleted later: the
    parent compares the file at the path with the dump descriptor's at
    each turn of its loop (half a second at most, two system calls),
    and so does a child before it runs a request (forked or spare, its
    copy of that descriptor may predate the move); then it opens the
    path and puts the new file in place of the old under the same
    descriptor number (dup2: a dump meanwhile goes whole to one or the
    other), and reopens the logging handlers.  A child already running
    its request when the file moves dumps to the moved file.
    """
    fd = _dump_fd
    if fd is None or not log_file:
        return False
    try:
        now = os.fstat(fd)
        st = os.stat(log_file)
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            return False
    except FileNotFoundError:
        pass            # moved and no new one made yet: made here
    except OSError:
        return False
    try:
        new = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                      0o640)
    except OSError:
        return False    # the moved file it is, until next time
    try:
        os.dup2(new, fd, inheritable=False)
    finally:
        os.close(new)
    logutil.reopen()
    return True


class Server:

    def __init__(self, socket_path, log_file="", log_level="INFO"):
        self.socket_path = socket_path
        self.log_file = log_file
        self.log_level = log_level
        self.children = {}          # pid -> kill deadline
        self.spare = None           # a Spare, or None
        self.stopping = False
        self.exit_code = 0
        self.sock = None
        self._inode = None

    def run(self):
        if _connectable(self.socket_path):
            raise AlreadyServing("a service already listens on {}".format(
                self.socket_path))
        _prctl()     # loaded here, once: a child must not import ctypes
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
                if _follow_log_file(self.log_file):
                    log.info("Log file %s was moved: writing to the new "
                             "one", self.log_file)
                waiting = [self.sock]
                if self.spare is not None and not self.spare.ready:
                    waiting.append(self.spare.channel)
                try:
                    ready, _, _ = select.select(waiting, [], [], 0.5)
                except InterruptedError:
                    continue
                if self.spare is not None and self.spare.channel in ready:
                    self._spare_spoke()
                if self.sock in ready:
                    self._accept()
                    # Here, not in _accept: the spare's copy of the parent
                    # must not hold that request in a live frame.
                    self._fork_spare()
        finally:
            self._close()
        log.info("Stopped")
        return self.exit_code

    # Private helpers

    def _listen(self):
        # Missing levels are created 0700, the default run directory made
        # 0700 even if a cold run created it first; a directory the admin
        # named (--socket /tmp/x.sock) is left alone: the socket is 0600
        # whatever its directory, and the command checks it (forward.py).
        directory = os.path.dirname(os.path.abspath(self.socket_path))
        for path in argsmod.private_dirs(directory):
            log.info("Made %s private (0700)", path)
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
        self._retire_spare()
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        # Running requests may still answer; then no child outlives us.
        deadline = time.monotonic() + STOP_GRACE
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        self._end_children()

    def _end_children(self):
        """Kill and reap every child left (the service is stopping)."""
        for pid in list(self.children):
            log.warning("Child %d still running at stop, killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.children.pop(pid, None)

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
            data, request = self._read_request(conn)
            if request is None:
                return
            if not self._hand_off(conn, data, request):
                prepared = self._prepare(request)
                if prepared is False:
                    # What a cold run stuck in the same setup would have
                    # said.
                    _answer(conn, outcome.error(_timeout_error(request)))
                    return
                if isinstance(prepared, Exception):
                    # Our cinderlib is half set up for this URL: a child
                    # forked now would inherit that (one hung in its own
                    # connect, in CI).  Answer from the same error, as the
                    # child and a cold run would.
                    scrub = runner.Scrubber(request.secrets())
                    with logutil.flow(request.correlation_id):
                        _answer(conn, runner.failure(request, scrub,
                                                     prepared))
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
        """(the request's bytes, its Request), or (data, None)."""
        conn.settimeout(READ_TIMEOUT)
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if not data:
                # Connected and closed: a liveness probe (``_connectable``).
                return data, None
            return data, _parse_request(data)
        except (OSError, ValueError, TypeError) as e:
            # Never the data: it holds secrets.
            log.warning("Dropping malformed request (%d bytes): %s",
                        len(data), type(e).__name__)
            return data, None

    def _fork(self, conn, request):
        _check_alone()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _die_with(parent)
            if self.spare is not None:
                # Only the parent may talk to the spare (and its EOF must
                # tell the spare that the parent is gone).
                self.spare.channel.close()
            _child(self.sock, conn, request, self.log_file)  # never returns
        self._started(pid, request, "forked")

    def _started(self, pid, request, how):
        # No timeout (--timeout 0): the child runs as long as its
        # operation does, as a cold run would.
        self.children[pid] = (time.monotonic() + (
            float("inf") if request.timeout is None else request.timeout) +
                              KILL_GRACE)
        with logutil.flow(request.correlation_id):
            log.info("Child %d runs %s (%s)", pid, request.command, how)

    def _hand_off(self, conn, data, request):
        """Give ``request`` to the ready spare of its DB URL, if any.

        False when there is none or it would not take the request; then
        the spare never had the whole request, so it cannot have run it.
        """
        spare = self.spare
        if (spare is None or spare.db_url != request.db_url or
                runner._state["db_url"] != request.db_url):
            return False
        if not spare.ready and not self._others_waiting():
            # Nearly warm (it takes ~15 ms): worth a short wait, unless a
            # burst is queueing behind this request.
            ready, _, _ = select.select([spare.channel], [], [], SPARE_WAIT)
            if ready:
                self._spare_spoke()
        if self.spare is not spare or not spare.ready:
            return False
        self.spare = None
        try:
            spare.channel.settimeout(HANDOFF_TIMEOUT)
            socket.send_fds(spare.channel,
                            [struct.pack("!I", len(data))], [conn.fileno()])
            spare.channel.sendall(data)
        except OSError as e:
            with logutil.flow(request.correlation_id):
                log.warning("Spare child %d did not take the request (%s); "
                            "forking another", spare.pid,
                            e.strerror or type(e).__name__)
            spare.kill()
            self.children[spare.pid] = float("inf")    # reaped as it ends
            return False
        finally:
            spare.channel.close()
        self._started(spare.pid, request, "pre-forked")
        return True

    def _others_waiting(self):
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def _fork_spare(self):
        """Keep one spare child for the current DB URL (see module doc)."""
        db_url = runner._state["db_url"]
        if self.spare is not None:
            if self.spare.db_url == db_url:
                return
            self._retire_spare()
        if (db_url is None or self.stopping or
                len(self.children) >= MAX_CHILDREN):
            return
        _check_alone()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX,
                                                  socket.SOCK_STREAM)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _die_with(parent)
            parent_end.close()
            _spare(self.sock, child_end, self.log_file,
                   self.log_level)     # never returns
        child_end.close()
        self.spare = Spare(pid, parent_end, db_url)
        log.debug("Forked spare child %d", pid)

    def _spare_spoke(self):
        spare = self.spare
        try:
            said = spare.channel.recv(1)
        except OSError:
            said = b""
        if said == READY:
            spare.ready = True
        else:
            log.warning("Spare child %d went away", spare.pid)
            self._retire_spare()

    def _retire_spare(self):
        """Drop the spare: it reads EOF and exits (a stuck one is killed)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        spare.channel.close()
        if not spare.ready:
            spare.kill()
        # Reaped with the other children; it has no request to finish.
        self.children[spare.pid] = time.monotonic() + KILL_GRACE

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
            if self.spare is not None and pid == self.spare.pid:
                self.spare.channel.close()
                self.spare = None
            if status and status != signal.SIGKILL:
                log.warning("Child %d ended with status %#x", pid, status)
            block = False
        now = time.monotonic()
        spare = self.spare
        if (spare is not None and not spare.ready and
                now > spare.born + SETUP_TIMEOUT):
            log.error("Spare child %d did not warm up within %s seconds, "
                      "killing it", spare.pid, SETUP_TIMEOUT)
            self._retire_spare()
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
        setup error is reported here with the error formatting of a cold
        run (``runner.failure``).  Runs in a thread, bounded by the
        request's timeout;
        returns False if it hung (the parent then stops: its cinderlib
        state is unknown and it has a second thread it cannot fork with),
        the exception if the setup failed (the request is answered with it,
        no child is forked).
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
        deadline = t + _setup_limit(request)
        worker = threading.Thread(target=work, name="setup", daemon=True)
        worker.start()
        finished = done.wait(_setup_limit(request))
        if finished:
            # Its end, not only its word: see _wait_ended.
            finished = _wait_ended(worker, deadline)
        # oslo.log replaced the root handlers during cl.setup.
        runner.configure_logging(self.log_level, self.log_file)
        # A setup still running may replace them again (runner.give_up).
        ours = list(logging.getLogger().handlers)
        with logutil.flow(request.correlation_id):
            if not finished:
                runner.say(ours, logging.ERROR,
                           "cinderlib setup did not finish within %s "
                           "seconds; stopping (commands run cold "
                           "meanwhile)", _setup_limit(request))
                if worker.is_alive():
                    runner.say(ours, logging.ERROR, "The setup was at:\n%s",
                               runner.stack_of(worker))
                self.stopping = True
                self.exit_code = 1
                return False
            if box[0] is not None:
                return box[0]
            else:
                log.info("cinderlib set up for %s in %.2f seconds",
                         mask.mask_text(request.db_url),
                         time.monotonic() - t)
        return True


class Spare:
    """The parent's handle on its spare child."""

    def __init__(self, pid, channel, db_url):
        self.pid = pid
        self.channel = channel      # the parent's end of the socketpair
        self.db_url = db_url
        self.ready = False
        self.born = time.monotonic()

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _child(listener, conn, request, log_file):
    """A child forked for a request: run it, answer, exit.  Never returns."""
    code = 1
    try:
        _become_child(listener)
        code = _run_one(conn, request, log_file)
    except BaseException:
        _log_failure()
    finally:
        _end(code)


def _spare(listener, channel, log_file, log_level):
    """The spare child: warm up, wait for a request, run it, exit.

    Never returns.  Gets the request's length, the command's connection
    (SCM_RIGHTS) and then the request's bytes from the parent; EOF instead
    means the parent retired it (or died): exit without running anything.
    """
    code = 1
    try:
        _become_child(listener)
        _warm_up_child(log_file, log_level)
        channel.sendall(READY)
        header, fds, _, _ = socket.recv_fds(channel, 4, 1)
        if not fds:
            code = 0
            return
        conn = socket.socket(fileno=fds[0])
        if len(header) < 4:
            return
        size = struct.unpack("!I", header)[0]
        data = b""
        while len(data) < size:
            chunk = channel.recv(min(65536, size - len(data)))
            if not chunk:
                return  # the parent gave up on us: never run half a request
            data += chunk
        channel.close()
        code = _run_one(conn, _parse_request(data), log_file)
    except BaseException:
        _log_failure()
    finally:
        _end(code)


def _check_alone():
    """Say so when the parent forks with another thread (task) alive: the
    child may inherit a lock that thread holds (see _wait_ended)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    if len(tasks) > 1:
        log.error("Forking with other threads alive (tasks %s; Python's: "
                  "%s): the child may inherit a lock one of them holds",
                  ", ".join(sorted(tasks)), ", ".join(
                      t.name for t in threading.enumerate()
                      if t is not threading.current_thread()) or "none")


def _die_with(parent):
    """In a child, first thing: be killed when ``parent`` dies.

    Already dead (between the fork and the prctl) shows as another parent:
    then exit at once.
    """
    _prctl()(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _prctl():
    """libc's prctl(2) (ctypes), loaded once."""
    global _libc_prctl
    if _libc_prctl is None:
        import ctypes
        _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _libc_prctl


def _become_child(listener):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    listener.close()
    _release_inherited_resources()


def _run_one(conn, request, log_file):
    _follow_log_file(log_file)
    if not request.log_file:
        # The command would have logged to its stderr; the service's log
        # is the closest thing a child has.
        request.log_file = log_file
    _answer(conn, runner.run(request))
    conn.shutdown(socket.SHUT_WR)
    return 0


def _log_failure():
    try:
        log.exception("Child failed")
    except BaseException:
        pass


def _end(code):
    try:
        logging.shutdown()
    finally:
        os._exit(code)


def _parse_request(data):
    return argsmod.Request.from_json(data.decode("utf-8"))


def _answer(conn, outcome):
    try:
        conn.settimeout(READ_TIMEOUT)
        conn.sendall(json.dumps(outcome.to_dict()).encode("utf-8"))
    except OSError:
        pass


def _wait_ended(thread, deadline):
    """Wait until ``thread`` has ended, up to ``deadline``; whether it has.

    The parent must fork with no other thread, down to the kernel's
    task: a thread that used libpq runs, after its last Python line and
    even after ``join()`` returned (Python's state of it is gone by then),
    the C libraries' thread-exit destructors, and OpenSSL's takes a
    process-wide lock (the one RAND_bytes takes, which libpq calls for
    each SCRAM login).  A fork in that window gives the child that lock
    held by a thread it does not have: its first PostgreSQL connect waits
    for it forever (seen under load: a warm child single-threaded in
    psycopg2.connect, on a futex, for good; reproduced outside the service
    with a thread that connects, then a fork: ~1 child in 1000 hangs in
    PQconnectPoll -> RAND_bytes_ex -> CRYPTO_THREAD_write_lock, with the
    thread joined or not).  So the thread's task must have left
    /proc/self/task.
    """
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        return False
    task = "/proc/self/task/{}".format(thread.native_id)
    while os.path.exists(task):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def _setup_limit(request):
    """How long cl.setup may take in the parent for ``request``."""
    if request.timeout is None:
        return SETUP_TIMEOUT
    return min(request.timeout, SETUP_TIMEOUT)


def _timeout_error(request):
    return errors.EngineTimeout(
        operation="cinderlib setup for " + request.command,
        timeout=runner.seconds(_setup_limit(request)))


def _preload():
    """Import what every request needs (the cost warm mode exists to avoid)."""
    runner.select_threading_backend()
    import cinderlib  # noqa: F401
    from . import filedriver  # noqa: F401
    from . import ops  # noqa: F401


def _warm_up_queries(cl):
    """Run, once in the parent, the queries operations run (reading only).

    SQLAlchemy compiles each statement shape on first use and caches the
    result in the engine; compiled here, the cache is inherited by every
    child.  Uncached, the joined-load SELECT that ``volume_create`` runs to
    read back the new row costs ~7 ms to compile, the snapshot one ~6 ms,
    the attachment one ~2-3 ms, and nearly every operation loads a volume
    with its attachments' specs and its type's extra specs (~2 ms).  A nil
    id matches no row: nothing is written, no request's data is read.
    (INSERT/UPDATE/DELETE shapes are left to the children: ~0.5 ms each,
    and compiling them here would need a write.)
    """
    from cinder import exception
    from cinder.db import api as db
    persistence = cl.Backend.persistence
    persistence.get_volumes(volume_id=NIL, backend_name="-")
    persistence.get_snapshots(volume_id=NIL)
    persistence.get_connections(volume_id=NIL)
    ctx = cl.objects.CONTEXT
    for read in (db.volume_get, db.snapshot_get, db.volume_attachment_get):
        try:
            read(ctx, NIL)
        except exception.NotFound:
            pass
    db.attachment_specs_get(ctx, NIL)
    db.volume_type_extra_specs_get(ctx, NIL)


def _release_parent_resources():
    """After setup in the parent: no pooled connection, no extra thread.

    Every engine's pool is emptied, not only cinder's: a migration of a
    fresh database (cinder's daa98075b90d) starts oslo.db's global
    enginefacade, whose engine kept a PostgreSQL connection open in the
    parent, inherited by every child (one socket in a dozen processes).
    """
    from cinder import coordination
    from cinder.db.sqlalchemy import api
    try:
        try:
            api.get_engine().dispose()
        except Exception as e:
            log.debug("No engine to dispose: %s", e)
        _dispose_other_engines()
        coordinator = coordination.COORDINATOR.coordinator
        heart = getattr(coordinator, "heart", None)
        if heart is not None and heart.is_alive():
            heart.stop()
            heart.wait()
    finally:
        # Children would otherwise walk (and so copy, page by page) the
        # whole inherited heap at their first garbage collection; frozen
        # again however the above ended (_dispose_other_engines unfreezes).
        gc.freeze()


def _dispose_other_engines():
    """Close the pooled connections of every SQLAlchemy engine alive.

    gc.get_objects() does not list frozen objects: an earlier setup's
    gc.freeze() (in _release_parent_resources) froze its engines, oslo.db's
    global one among them, which a second setup (another database, a
    setup after a failed one) must dispose too.  Unfrozen first; the
    caller freezes again right after."""
    import sqlalchemy.engine
    gc.unfreeze()
    for obj in gc.get_objects():
        if isinstance(obj, sqlalchemy.engine.Engine):
            try:
                obj.dispose()
            except Exception as e:
                log.debug("Cannot dispose %s: %s", obj, e)


def _warm_up_child(log_file, log_level):
    """In a spare: fault in (copy) pages that every request writes to.

    It runs code a request runs, on nothing of any request: the lookups
    operations start with (a volume with its type, extra specs and
    attachments; its snapshots; its connections) for a nil id, the
    service's own logging set-up, a thread that does nothing, a throwaway
    backend.  ~15-25 ms, once per spare, while nobody waits; the request
    then runs ~7 ms faster.
    (All of ``_warm_up_queries`` would save a little more than it costs
    only on an idle machine: a spare must be ready when the next command
    comes.)  Then the database connection is closed: the request opens its
    own, as in a freshly forked child.  Failures (a database gone) are left
    for the request to meet.
    """
    import cinderlib as cl
    from cinder.db.sqlalchemy import api
    persistence = cl.Backend.persistence
    try:
        persistence.get_volumes(volume_id=NIL, backend_name="-")
        persistence.get_snapshots(volume_id=NIL)
        persistence.get_connections(volume_id=NIL)
    except Exception as e:
        log.debug("Warm-up query failed: %s", type(e).__name__)
    finally:
        api.get_engine().dispose()
    runner.configure_logging(log_level, log_file)
    done = threading.Event()
    threading.Thread(target=done.set, name="warm-up", daemon=True).start()
    done.wait(1)
    _warm_up_backend(cl)


def _warm_up_backend(cl):
    """Build a Backend of the embedded driver on an empty directory, and
    forget it: what cinderlib and cinder do for any backend (its options
    group, the driver's init and setup, the capabilities) then costs the
    request's own Backend ~1 ms instead of ~2.5.  Nothing of it is kept."""
    import shutil
    import tempfile
    directory = tempfile.mkdtemp(prefix="managedvolume-warm-up-")
    try:
        cl.Backend(WARM_UP_BACKEND, volume_driver=argsmod.FILE_DRIVER,
                   file_volume_dir=directory)
    except Exception as e:
        log.debug("Warm-up backend failed: %s", type(e).__name__)
    finally:
        cl.Backend.backends.pop(WARM_UP_BACKEND, None)
        shutil.rmtree(directory, ignore_errors=True)


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
