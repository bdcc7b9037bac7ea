"""The standalone agent in two processes, and the hop between them.

The agent is one Python program, and one Python process runs Python in
one thread at a time (the GIL): at 32 callers it was one core busy, the
wire (TLS, STOMP, JSON-RPC, the API's log lines) and the service
(journal, locks, privsep calls, udev) taking turns.  So ``agent.py``
forks, once the port is bound and the TLS files are loaded and before
the journal is opened::

    FRONT (systemd's main pid)             BACK (its child)
      listener, TLS, STOMP, heart-beats      service.Service: the journal,
      jsonrpc, schema, api.py (START/          per-volume locks, the privsep
        FINISH lines, masking)                 daemon, udev rules, links,
      worker pools, busy codes 930-935         reconcile at start, stale
      the hook's control socket                detaches
      Proxy ----------- socketpair -----------> Back: a thread per call

The front's API gets a ``Proxy`` in place of the service: the Service
methods it calls, each forwarded over the hop and answered by the back.

The hop
-------
One socketpair.  A frame is a 4-byte big-endian length and a ``marshal``
payload: a request ``(id, method, args, flow_id)``, an answer ``(id, ok,
value)``.  marshal, not msgpack: it is the interpreter's own (both ends
are one interpreter: forked), and it carries exactly what a call carries
in one process: str with lone surrogates, ints of any size, tuples as
tuples, float as float.  Values of another type (a str or dict
subclass) go as their plain base type.  marshal trusts what it reads:
both ends are this program, and the socketpair has no name and is in no
other process.  Frames are never logged: an attach's connection_info
holds CHAP passwords and keyrings.

Many calls are in flight at once, matched by id.  The front has no
reader thread: a caller waiting for its answer reads frames itself when
nobody else does (it holds the read lock), hands other callers' answers
to them, and on getting its own lets another waiting caller read on.
One caller's call costs one wake-up (its answer), not two (a reader
thread's and then the caller's).

The back reads frames in a thread of its own and runs each call in a
pool: attaches, detaches and extends in ``max_operations`` threads
holding the back's gate slot (``gate``: exactly as in one process),
everything else (getCapabilities, volumes_info, the control socket's
connector_info) in threads of their own, so a control call never waits
behind attaches.  The front's operation threads give their gate slot
back while they wait on the hop (``gate.released()``).

Errors cross as (class, code, message) and are raised in the front as
that class, with that message: the JSON-RPC error a client reads is the
one of one process, byte for byte.

Every call gets an answer, or the agent ends: in one process a call ran
in a front pool's thread, whose failure ``api._call`` answers; here one
lost answer would hold its caller (and its operation slot) for good,
and one dead reader every call after it while the agent looks READY.
So the back answers a call it cannot start a thread for with 933
(``errors.NoThread``), a result it cannot frame with the framing's
error, any exception of a call with itself; a back whose reader fails
stops (and the front's reaper ends the agent); a front that reads
something that is not an answer shuts the hop (the back reads its end
and stops).

Life
----
The two live and die as one.  The back ignores SIGINT and SIGTERM: the
front stops it (a close frame) once its own drain is done, within
``shutdown_timeout``; the front forwards SIGHUP (the back reopens its
log).  The kernel kills the back when the front dies
(PR_SET_PDEATHSIG); the front's reaper ends the front (exit 1) when the
back ends unasked, as if the agent had crashed: its connections close
without answers (the engine sees a dead vdsm's VDS_NETWORK_ERROR, as
for a crash of one process), systemd restarts it and the journal's
reconcile at the start repairs what the calls cut left.
The agent lock's fd is shared: held until both ended.
"""

import itertools
import logging
import marshal
import os
import select
import signal
import socket
import struct
import sys
import threading

from . import affinity
from . import errors
from . import gate
from . import log as logmod
from . import validate
from . import workers

log = logging.getLogger("managedvolume.hop")

_HEADER = struct.Struct(">I")
_MARSHAL_VERSION = 4

# The calls that act on the host: run holding the back's gate slot.
DATA_CALLS = frozenset(("attach_volume", "detach_volume", "extend_volume"))
CONTROL_CALLS = frozenset(("volumes_info", "caps", "connector_info"))

# Seconds a stop waits for the back to end beyond the close's timeout
# before killing it.
STOP_MARGIN = 5.0

# ids: 0 is the back's "ready" message.
_READY = 0


class BackEnded(errors.InternalError):
    msg = ("the agent's back end (pid {self.pid}) ended: the outcome of "
           "this call is unknown; the agent restarts")


# The wire

def encode(obj):
    """``obj`` as a frame's payload."""
    try:
        return marshal.dumps(obj, _MARSHAL_VERSION)
    except ValueError:
        # A subclass (a str Enum, an OrderedDict): its plain base type,
        # as JSON would write it.
        return marshal.dumps(_plain(obj), _MARSHAL_VERSION)


def frame(obj):
    data = encode(obj)
    return _HEADER.pack(len(data)) + data


def read_frame(rfile):
    """The next frame's object from the buffered reader ``rfile``; EOFError
    at its end."""
    head = rfile.read(4)
    if len(head) < 4:
        raise EOFError
    size, = _HEADER.unpack(head)
    body = rfile.read(size)
    if len(body) < size:
        raise EOFError
    return marshal.loads(body)


def _plain(obj):
    if obj is None or type(obj) in (str, int, float, bool, bytes):
        return obj
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool):
        return bool(obj)
    for base in (str, int, float, bytes):
        if isinstance(obj, base):
            return base(obj)
    return repr(obj)


def error_info(e):
    """What crosses the hop of the exception ``e``."""
    cls = type(e)
    code = getattr(e, "code", None) if isinstance(e, errors.Error) else None
    try:
        message = str(e)
    except Exception:
        message = repr(e)
    return (cls.__module__, cls.__qualname__, code, message)


def raise_error(info):
    """Raise the exception ``info`` (``error_info``) describes, of its
    class when this process has it, with its message."""
    module, name, code, message = info
    cls = _error_class(module, name, code)
    if issubclass(cls, errors.Error):
        e = cls.__new__(cls)
        e.reason = message
        e.msg = "{self.reason}"
        if code is not None:
            e.code = code
        Exception.__init__(e, message)
        raise e
    try:
        # Not cls(message): a builtin's constructor may want more
        # (UnicodeDecodeError five arguments, CalledProcessError two).
        e = cls.__new__(cls)
        BaseException.__init__(e, message)
    except Exception:
        e = type(cls.__name__, (_Remote,), {"__module__": module})(message)
    raise e


_classes = {}


def _error_class(module, name, code):
    key = (module, name, code is not None)
    cls = _classes.get(key)
    if cls is not None:
        return cls
    obj = sys.modules.get(module)
    for part in name.split("."):
        obj = getattr(obj, part, None)
    if code is not None and isinstance(obj, type) and \
            issubclass(obj, errors.Error):
        cls = obj
    elif code is not None:
        cls = type(name.rpartition(".")[2], (errors.Error,),
                   {"__module__": module})
    else:
        # Named as the original (api.py's internal error shows the name),
        # and one of its class when it can be (a builtin).
        bases = (_Remote,)
        if isinstance(obj, type) and issubclass(obj, Exception):
            bases = (_Remote, obj)
        try:
            cls = type(name.rpartition(".")[2], bases,
                       {"__module__": module})
        except TypeError:
            cls = type(name.rpartition(".")[2], (_Remote,),
                       {"__module__": module})
    _classes[key] = cls
    return cls


class _Remote(Exception):
    """An exception of the back that is not an errors.Error: its text is
    the original's str()."""

    def __str__(self):
        return self.args[0] if self.args else ""


# The front

class Client:
    """The front's end of the hop: ``call(method, args)`` from any
    thread; see the module docstring for who reads."""

    def __init__(self, sock, pid):
        self.pid = pid
        self._sock = sock
        self._rfile = sock.makefile("rb", buffering=1 << 16)
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending = {}
        self._ids = itertools.count(1)
        self._broken = False
        # Called by a caller whose call the back's end cut, before it
        # raises BackEnded (BackProcess: to wait for the process's end).
        self.on_cut = None

    def fileno(self):
        return self._sock.fileno()

    def read_ready(self):
        """Wait for the back's ready message (before any call); its value,
        or None when the back ended first."""
        try:
            cid, ok, value = read_frame(self._rfile)
        except (EOFError, OSError, ValueError):
            return None
        return value if cid == _READY else None

    def call(self, method, args):
        waiter = _Waiter()
        cid = next(self._ids)
        # Framed before the waiter is registered: a failure here leaves
        # nothing behind.
        data = frame((cid, method, args, logmod.current_flow()))
        with self._lock:
            broken = self._broken
            if not broken:
                self._pending[cid] = waiter
        if broken:
            # The back ended: as for a call it cut, nothing may answer
            # while the agent is ending (``on_cut``).
            if self.on_cut is not None:
                self.on_cut()
            raise BackEnded(pid=self.pid)
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError:
            self.broken()
        while not waiter.done:
            if self._read_lock.acquire(blocking=False):
                try:
                    self._read_until(waiter)
                finally:
                    self._read_lock.release()
                    self._hand_on()
            else:
                waiter.event.wait()
                waiter.event.clear()
        if waiter.ok:
            return waiter.value
        if waiter.value is None:
            if self.on_cut is not None:
                self.on_cut()
            raise BackEnded(pid=self.pid)
        raise_error(waiter.value)

    def send(self, method, args):
        """Send a call nobody waits an answer for (close)."""
        data = frame((0, method, args, logmod.current_flow()))
        with self._send_lock:
            self._sock.sendall(data)

    def broken(self):
        """The back is gone: fail every call waiting, and any new one."""
        with self._lock:
            self._broken = True
            pending, self._pending = self._pending, {}
        # Wakes the caller reading, if any.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for waiter in pending.values():
            waiter.ok = False
            waiter.value = None
            waiter.done = True
            waiter.event.set()

    def close(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._rfile.close()
        self._sock.close()

    def _read_until(self, waiter):
        rfile = self._rfile
        pending = self._pending
        lock = self._lock
        while not waiter.done:
            try:
                cid, ok, value = read_frame(rfile)
            except (EOFError, OSError, ValueError):
                self.broken()
                return
            except Exception:
                # Not a frame of ours (marshal: TypeError...): the hop is
                # unusable.  broken() shuts the socket: the back reads its
                # end and stops, and the reaper ends this process.
                log.exception("Unreadable answer from the back end")
                self.broken()
                return
            with lock:
                other = pending.pop(cid, None)
            if other is None:
                continue
            other.ok = ok
            other.value = value
            other.done = True
            if other is not waiter:
                other.event.set()

    def _hand_on(self):
        # Someone still waiting reads next (a spurious wake-up at worst:
        # it finds its answer, or the read lock taken, and waits again).
        with self._lock:
            if not self._pending:
                return
            waiter = next(iter(self._pending.values()))
        waiter.event.set()


class _Waiter:
    __slots__ = ("event", "done", "ok", "value")

    def __init__(self):
        self.event = threading.Event()
        self.done = False
        self.ok = False
        self.value = None


class Proxy:
    """The Service methods the front's API and control socket call,
    forwarded to the back.  An operation's thread gives its gate slot
    back for the wait (``gate.released()``)."""

    def __init__(self, client, cfg):
        self.cfg = cfg
        self._client = client
        self._age = threading.local()

    def attach_volume(self, vol_id, connection_info,
                      sd_id=validate.BLANK_UUID):
        with gate.released():
            return self._client.call("attach_volume",
                                     (vol_id, connection_info, sd_id))

    def detach_volume(self, vol_id, sd_id=validate.BLANK_UUID):
        with gate.released():
            return self._client.call("detach_volume", (vol_id, sd_id))

    def extend_volume(self, vol_id, sd_id=validate.BLANK_UUID,
                      new_size=None):
        with gate.released():
            return self._client.call("extend_volume",
                                     (vol_id, sd_id, new_size))

    def volumes_info(self, vol_ids=(), include_secrets=False):
        return self._client.call("volumes_info",
                                 (list(vol_ids), include_secrets))

    def connector_info(self, refresh=False, stale_ok=False):
        return self._client.call("connector_info", (refresh, stale_ok))

    def caps(self):
        """Service.caps(), and connector_info_age() with it: one hop for
        getCapabilities (``api.get_caps`` asks for the age next, in this
        thread)."""
        caps, age = self._client.call("caps", ())
        self._age.value = age
        return caps

    def connector_info_age(self):
        return getattr(self._age, "value", None)


class BackProcess:
    """The front's handle on the back: its pid (and pidfd), the hop's
    client, the reaper."""

    def __init__(self, pid, sock, on_lost):
        self.pid = pid
        self.client = Client(sock, pid)
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None      # Signals go by pid then.
        self._asked = False
        self._serving = False
        self._state = threading.Lock()
        self._ended = threading.Event()
        self.status = None
        self._on_lost = on_lost
        self.client.on_cut = self._cut
        self._reaper = threading.Thread(target=self._reap, name="reaper",
                                        daemon=True)
        self._reaper.start()

    def wait_ready(self, wake=None, stopped=None):
        """True once the back reconciled and serves; False when it ended
        before (its exit status is ``exit_code()``); None when
        ``stopped()`` became true first: it is asked before the wait and
        whenever the socket ``wake`` (a signal's wakeup fd) is readable.
        """
        if wake is not None:
            hop = self.client.fileno()
            while True:
                if stopped():
                    return None
                try:
                    readable, _, _ = select.select([hop, wake], [], [])
                except InterruptedError:
                    continue
                if hop in readable:
                    break
                drain(wake)
        ready = self.client.read_ready() is not None
        with self._state:
            if ready and not self._ended.is_set():
                self._serving = True
                return True
            self._asked = True      # Its failure was logged by itself.
        self._ended.wait()
        return False

    def _cut(self):
        # The hop ended under a call.  Unless we stopped the back end,
        # the reaper is about to end this process as if it had crashed
        # (``on_lost``): no answer may leave for the call meanwhile.
        self._ended.wait(STOP_MARGIN)
        with self._state:
            lost = self._serving and not self._asked
        if lost and self._on_lost is not None:
            threading.Event().wait()    # until the process ends

    def exit_code(self):
        status = self.status
        if status is None:
            return None
        return os.waitstatus_to_exitcode(status) \
            if hasattr(os, "waitstatus_to_exitcode") else status >> 8

    @property
    def lost(self):
        """Whether the back ended unasked."""
        return self._ended.is_set() and not self._asked

    def signal(self, signo):
        if self._ended.is_set():
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signo)
            else:
                os.kill(self.pid, signo)
        except (ProcessLookupError, OSError) as e:
            log.debug("Cannot signal the back end: %s", e)

    def stop(self, timeout):
        """Close the back (its service gets ``timeout`` seconds), wait for
        its end, kill it when late."""
        self._asked = True
        if not self._ended.is_set():
            try:
                self.client.send("close", (timeout,))
            except OSError:
                pass
            if not self._ended.wait(timeout + STOP_MARGIN):
                log.error("The back end (pid %d) did not stop within %.1f "
                          "s: killing it", self.pid, timeout + STOP_MARGIN)
                self.signal(signal.SIGKILL)
                self._ended.wait(STOP_MARGIN)
        self.client.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        code = self.exit_code()
        if code:
            log.warning("The back end (pid %d) exited with status %s",
                        self.pid, code)

    def _reap(self):
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                status = 0
                break
        with self._state:
            self.status = status
            self._ended.set()
            if self._asked or not self._serving:
                return      # Stopped, or wait_ready() tells.
        log.error("The back end (pid %d) ended unasked (%s): the agent "
                  "exits, as if it had crashed", self.pid, _describe(status))
        self.client.broken()
        if self._on_lost is not None:
            self._on_lost()


def signal_wakeup():
    """A socketpair whose write end is now the signals' wakeup fd
    (``signal.set_wakeup_fd``), both ends non-blocking: a thread waiting
    in select() on the read end wakes for every signal, wherever it
    landed.  Returns (read end, write end)."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    return wake_r, wake_w


def drain(wake_r):
    """Read what the wakeup fd wrote (the read end is non-blocking)."""
    try:
        while wake_r.recv(256):
            pass
    except OSError:     # BlockingIOError: nothing more
        pass


def _describe(status):
    if os.WIFSIGNALED(status):
        try:
            return "killed by {}".format(
                signal.Signals(os.WTERMSIG(status)).name)
        except ValueError:
            return "killed by signal {}".format(os.WTERMSIG(status))
    return "exit status {}".format(os.WEXITSTATUS(status))


def start_back(cfg, close_in_back=(), on_lost=None):
    """Fork the back end; return its ``BackProcess``.  ``close_in_back``:
    sockets of the front (the listener) the back closes.  ``on_lost()``
    is called (in the reaper's thread) when the back ends unasked."""
    # No thread of ours runs yet (the fork copies only this one; Python
    # 3.12 warns about a fork beside others).
    log.debug("Forking the back end (%d threads)", threading.active_count())
    front, back = socket.socketpair()
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    # Blocked across the fork: the back must not die of a SIGTERM sent to
    # the group before it ignores it.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    parent = os.getpid()
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        front.close()
        back.close()
        raise
    if pid == 0:
        code = 1
        try:
            front.close()
            for s in close_in_back:
                s.close()
            code = _back_main(cfg, back, before, parent)
        except BaseException:
            try:
                log.exception("The back end failed")
            except BaseException:
                pass
        finally:
            logging.shutdown()
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, before)
    back.close()
    log.info("Back end started (pid %d)", pid)
    back_cpus = os.sched_getaffinity(0)
    cpus = affinity.front_cpus(cfg.front_cpu_affinity)
    if cpus is not None and affinity.set_threads(cpus,
                                                 "the agent's front end"):
        log.info("Front end on CPUs %s, back end on CPUs %s ([agent] "
                 "front_cpu_affinity = %s)", affinity.text(cpus),
                 affinity.text(back_cpus), cfg.front_cpu_affinity or "")
    return BackProcess(pid, front, on_lost)


# The back

PR_SET_PDEATHSIG = 1


def _set_pdeathsig(signo):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signo, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _back_main(cfg, sock, mask, parent):
    threading.current_thread().name = "back"
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        return 1        # The front died before prctl (or before the fork
                        # returned here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def reopen(signo, frame):
        logmod.reopen()
        log.info("Log file reopened (SIGHUP)")

    signal.signal(signal.SIGHUP, reopen)
    # A signal may land in any thread; the main thread, which runs the
    # handler, wakes on this socket (it would otherwise wait in a lock
    # that no signal interrupts).
    wake_r, wake_w = signal_wakeup()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # PR_SET_CHILD_SUBREAPER is not inherited: the privsep daemon is ours.
    from . import privileged
    privileged.become_subreaper()
    from . import service as service_module
    try:
        service = service_module.Service(cfg)
        service.start(defer_detach_stale=True)
    except errors.Error as e:
        log.error("Cannot start: %s", e)
        print("managedvolume-agent: {}".format(e), file=sys.stderr)
        return 1
    back = Back(cfg, sock, service, wake_w)
    back.start()
    service.detach_stale_later()
    while not back.done.is_set():
        try:
            select.select([wake_r], [], [], 1.0)
        except InterruptedError:
            pass
        drain(wake_r)
    return back.exit_code


class Back:
    """The back's end of the hop: reads calls, runs them, answers."""

    def __init__(self, cfg, sock, service, wake):
        self.cfg = cfg
        self.service = service
        self.done = threading.Event()
        self.exit_code = 0
        self._sock = sock
        self._wake = wake
        self._send_lock = threading.Lock()
        # As many threads as the front can have calls in flight: its
        # operations, its control workers, the control socket's fetch.
        self._data = workers.Pool(cfg.max_operations, 1 << 30,
                                  name="back-operation", gate=gate.Gate())
        self._control = workers.Pool(cfg.workers + 2, 1 << 30,
                                     name="back-control")
        self._calls = {name: self._method(name) for name in
                       DATA_CALLS | CONTROL_CALLS}

    def _method(self, name):
        own = getattr(self, "_" + name, None)
        if own is not None:
            return own
        return lambda *args: getattr(self.service, name)(*args)

    def start(self):
        self._sock.sendall(frame((_READY, True, os.getpid())))
        threading.Thread(target=self._read, name="back-reader",
                         daemon=True).start()

    def _connector_info(self, refresh, stale_ok):
        return self.service.connector_info(refresh=refresh,
                                           stale_ok=stale_ok)

    def _caps(self):
        caps = self.service.caps()
        age = self.service.connector_info_age() \
            if "connector_info" in caps else None
        return caps, age

    def _read(self):
        rfile = self._sock.makefile("rb", buffering=1 << 16)
        timeout = None
        try:
            while True:
                cid, method, args, flow_id = read_frame(rfile)
                if method == "close":
                    timeout = args[0]
                    break
                self._submit(cid, method, args, flow_id)
        except (EOFError, OSError, ValueError):
            log.warning("The front end went away: stopping")
            self.exit_code = 1
        except BaseException:
            # Nothing would read the front's calls any more while this
            # process lives on: end it (the front's reaper then ends the
            # agent, and systemd restarts it).
            log.exception("The back end's reader failed: stopping")
            self.exit_code = 1
        self._stop(timeout)

    def _submit(self, cid, method, args, flow_id):
        pool = self._data if method in DATA_CALLS else self._control
        try:
            pool.submit(lambda: self._run(cid, method, args, flow_id))
        except RuntimeError as e:
            # No thread could be started: this call is refused (933),
            # the next ones may find one.
            with logmod.flow(flow_id):
                log.warning("Refusing %s: cannot start a thread: %s",
                            method, e)
            self._answer(cid, False,
                         error_info(errors.NoThread(reason=str(e))))

    def _run(self, cid, method, args, flow_id):
        with logmod.flow(flow_id):
            try:
                fn = self._calls[method]
                ok, value = True, fn(*args)
            except errors.Error as e:
                ok, value = False, error_info(e)
            except BaseException as e:
                # api.py (in the front) makes it an internal error; the
                # traceback is here.  (BaseException: a caller waits for
                # every call's answer.)
                log.error("%s failed", method, exc_info=True)
                ok, value = False, error_info(e)
            self._answer(cid, ok, value)

    def _answer(self, cid, ok, value):
        """Send a call's answer; one that cannot be framed goes as the
        error that framing raised (the front's caller waits for it)."""
        try:
            data = frame((cid, ok, value))
        except Exception as e:
            log.error("Cannot frame the answer to call %d", cid,
                      exc_info=True)
            data = frame((cid, False, error_info(e)))
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as e:
                log.debug("Cannot answer the front end: %s", e)

    def _stop(self, timeout):
        if timeout is None:
            timeout = self.cfg.shutdown_timeout
        try:
            self.service.close(timeout)
        except Exception:
            log.exception("Closing the service failed")
            self.exit_code = 1
        self.done.set()
        try:
            self._wake.send(b"\0")
        except OSError:
            pass
