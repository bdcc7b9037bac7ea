"""The ``managedvolume-agent`` process.

It serves the ManagedVolume verbs on vdsm's port with vdsm's wire protocol
(docs/dependencies.md, "vdsm's wire"), so the engine and vdsm-client talk
to it unchanged.  The process holds the layers together, each in a module
of its own::

    main: configuration, the agent lock, logging, signals
      -> bind()                 the port, before the journal is touched
      -> hop.start_back()       forks the back end (``[agent] processes
                                = 2``, the default), which runs
                                service.Service: reconciles the journal
                                before it says it is ready
      -> hop.Proxy              the service's calls, forwarded to it
      -> jsonrpc.Dispatcher     the protocol, calling api.py
      -> stompserver.Server     the wire: frames, connections, heart-beats,
                                worker pools; on the port bound here
      -> ControlSocket          the hook's socket, in the server's loop

This process, systemd's main pid, is the front end: the wire, the
protocol, the API's log lines; its back end, the service (hop.py says
why two, and how they live and die as one).  With ``processes = 1`` the
service runs here, as before.

Besides the port, the agent serves a local control socket
(``cfg.socket_path``): a client connecting there reads one JSON line,
``{"connector_info": {...}}`` (``{}`` when unknown), which the
after_get_caps hook adds to vdsm's capabilities.  The socket is
world-writable (the hook runs as vdsm): MAX_CONTROL_CLIENTS are served at
once, more are closed at once.

A mistake of the configuration or the command line (a key's value, a
``listen`` host that does not exist, a log file that cannot be made)
stops the agent before it opens the journal, with one line naming the
key or option and the value (exit 2).  So does, with exit 1 (it may go
away: systemd retries), the port held by another process.

Signals: SIGTERM/SIGINT stop accepting, let in-flight calls finish (up to
``shutdown_timeout``), close the back end and exit 0 (before the agent
serves: the back end, once its start ended); SIGHUP reopens the log
file, here and in the back end, from the start.  Under systemd
(``NOTIFY_SOCKET``) the agent reports READY=1 (once the back end is
ready) and STOPPING=1, with how long its stop may take (``stop_bound``:
a ``shutdown_timeout`` beyond the unit's TimeoutStopSec= extends it,
never meets its SIGKILL).
When the back end ends unasked the agent exits 1.
"""

import argparse
import errno
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import threading
import time

from . import __version__
from . import affinity
from . import config
from . import errors
from . import fileutil
from . import hop
from . import log as logmod
from . import pki
from . import privileged
from . import stompserver

log = logging.getLogger("managedvolume.agent")

# Exit statuses.  A configuration error will not go away by itself: the
# unit's RestartPreventExitStatus= names EXIT_CONFIG, so systemd does not
# restart a bad file every RestartSec forever.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# Control socket clients served at once (each is a thread).
MAX_CONTROL_CLIENTS = 16
# Bound of the connector_info call made for the control socket; the hook
# reading it gives up after 2 seconds.
CONTROL_TIMEOUT = 1.0
# Seconds a starting agent waits for the lock of an agent that is gone
# while its back end (hop.py) still holds it.
LOCK_RETRY = 2.0

# Seconds an interpreter may take to exit once the agent's stop is done
# (threads joined, handlers flushed), beyond ``stop_bound``.
EXIT_SLACK = 4.0


def main(argv=None):
    """The ``managedvolume-agent`` console script."""
    args = _parse_args(argv)
    # Every mistake of the file or the command line is found here, before
    # the journal is opened: one line naming the key, exit 2.
    try:
        cfg = _configure(args)
    except (errors.ConfigError, ValueError) as e:
        print("managedvolume-agent: {}".format(e), file=sys.stderr)
        return EXIT_CONFIG
    privileged.become_subreaper()
    # Held until the agent stopped: a second agent on this state would
    # reconcile under the first one's calls and, on exit, remove its
    # control socket.  Taken before this agent logs anything: a second
    # one, refused here, says so on its own stderr only, not in the log
    # file of the agent holding the lock (the same file, for the same
    # state).  That one may be stopping: systemd retries (exit 1).
    try:
        lock_fd = _lock_agent(cfg)
    except errors.AgentRunning as e:
        print("managedvolume-agent: Cannot start: {}".format(e),
              file=sys.stderr)
        return EXIT_FAILED
    except errors.Error as e:
        # The lock file cannot be opened: this agent's own trouble.
        log.error("Cannot start: %s", e)
        print("managedvolume-agent: {}".format(e), file=sys.stderr)
        return EXIT_FAILED
    try:
        log.info("vdsm-managedvolume agent %s starting (config %s, state "
                 "dir %s)", __version__, cfg.source or "defaults",
                 cfg.state_dir or "-")
        return _run(cfg, args.insecure)
    except errors.Error as e:
        # Found while starting (the port held by another process, TLS
        # files not written yet at host deploy, a name server not up
        # yet): any of them may go away, so systemd retries (exit 1,
        # not 2).
        log.error("Cannot start: %s", e)
        print("managedvolume-agent: {}".format(e), file=sys.stderr)
        return EXIT_FAILED
    finally:
        os.close(lock_fd)


class ControlSocket:
    """The local socket the after_get_caps hook reads connector_info from
    (see the module docstring).

    connector_info: a callable returning the connector info dict (raising
    errors.NotSupported without os-brick).
    """

    def __init__(self, path, connector_info):
        self.path = path
        self._caps = _ConnectorInfo(connector_info)
        self._slots = threading.BoundedSemaphore(MAX_CONTROL_CLIENTS)

    def serve_in(self, server):
        """Bind the socket and serve it in ``server``'s I/O loop; it is
        closed and removed when the server stops."""
        sock = bind_unix(self.path)
        server.add_listener(
            sock, self._accept,
            on_close=lambda: fileutil.rm_file(self.path, log=log))
        self._caps.refresh()

    # Private helpers

    def _accept(self, sock, addr):
        # The socket is world-writable (the hook runs as vdsm): a local
        # user must not be able to make us start unbounded threads.
        if not self._slots.acquire(blocking=False):
            log.debug("Control socket busy: closing a client")
            sock.close()
            return
        try:
            threading.Thread(target=self._serve, args=(sock,),
                             name="control", daemon=True).start()
        except RuntimeError:
            self._slots.release()
            sock.close()

    def _serve(self, sock):
        try:
            info = self._caps.get(CONTROL_TIMEOUT)
            line = {} if info is None else {"connector_info": info}
            sock.setblocking(True)
            sock.settimeout(CONTROL_TIMEOUT)
            sock.sendall(json.dumps(line).encode("utf-8") + b"\n")
        except OSError as e:
            log.debug("Control client went away: %s", e)
        finally:
            sock.close()
            self._slots.release()


def parse_listen(value):
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("invalid --listen {!r}: expected [ADDRESS]:PORT"
                             .format(value))
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("invalid --listen {!r}: expected HOST:PORT"
                             .format(value))
        if ":" in host:
            raise ValueError("invalid --listen {!r}: write an IPv6 address "
                             "in brackets, [ADDRESS]:PORT".format(value))
    if not port.isdigit() or int(port) > 65535:
        raise ValueError("invalid port {!r} in --listen {!r}".format(
            port, value))
    return host, int(port)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host, port):
    """A listening TCP socket on ``host:port`` (non-blocking); '::' is
    dual stack.  ConfigError when the address cannot be bound."""
    if host in config.ANY_ADDRESS:
        family = socket.AF_INET if host == "0.0.0.0" else socket.AF_INET6
        if family == socket.AF_INET6 and not socket.has_ipv6:
            family = socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            # A kernel without IPv6: all IPv4 addresses, then.
            family = socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            # Dual stack: '::' serves IPv4 clients too, like vdsm.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr = ("::" if family == socket.AF_INET6 else "0.0.0.0", port)
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as e:
            raise errors.ConfigError("cannot listen on {}: cannot resolve "
                                     "{!r}: {}".format(
                                         stompserver.format_address(
                                             (host, port)), host, e))
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except (OSError, OverflowError) as e:
        sock.close()
        hint = ""
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            hint = (" (another managedvolume-agent, or vdsmd, holds the "
                    "port; choose another with --listen HOST:PORT)")
        raise errors.ConfigError("cannot listen on {}: {}{}".format(
            stompserver.format_address((host, port)), e, hint))
    return sock


def bind_unix(path):
    """A listening unix socket at ``path`` (replacing a stale one),
    world-writable; ConfigError when it cannot be bound."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fileutil.rm_file(path, log=log)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # The after_get_caps hook runs as vdsm, not root; connector info
        # holds no secrets.
        os.chmod(path, 0o666)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise errors.ConfigError("cannot listen on {}: {}".format(path, e))
    return sock


def stop_bound(cfg):
    """Seconds from SIGTERM until the agent's stop is done, at most:
    ``shutdown_timeout`` for the drain and the service's close, the last
    responses' flush (``stompserver.FINAL_FLUSH``), and with two
    processes a back end late to close gets ``hop.STOP_MARGIN``, then
    SIGKILL and ``hop.STOP_MARGIN`` more.  STOPPING=1 tells systemd to
    wait that long and ``EXIT_SLACK`` (EXTEND_TIMEOUT_USEC; the unit's
    TimeoutStopSec= stays the least it waits)."""
    bound = cfg.shutdown_timeout + stompserver.FINAL_FLUSH
    if cfg.processes == 2:
        bound += 2 * hop.STOP_MARGIN
    return bound


def stopping_message(cfg):
    """What the agent tells systemd when its stop begins."""
    return "STOPPING=1\nEXTEND_TIMEOUT_USEC={}".format(
        int((stop_bound(cfg) + EXIT_SLACK) * 1000000))


def sd_notify(message):
    """Tell systemd ``message`` when NOTIFY_SOCKET is set; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode("utf-8"))
        return True
    except OSError as e:
        log.warning("sd_notify(%r) failed: %s", message, e)
        return False


AGENT_EPILOG = """\
It runs in the foreground until SIGTERM or Ctrl-C (in-flight calls
finish, within [agent] shutdown_timeout); SIGHUP reopens the log file.

examples:
  managedvolume-agent --state-dir .state       # what make run starts
  managedvolume-agent --state-dir /tmp/mv --listen 127.0.0.1:54329 --insecure
  managedvolume-agent --config /etc/vdsm/managedvolume.conf   # the service

exit status:
  0  stopped by SIGTERM or SIGINT
  1  failed while starting or serving, maybe for a while only (the port
     in use, TLS files, another agent still on this state, the journal,
     the privsep daemon, its back end ended): systemd restarts it after
     5 s
  2  a mistake in the configuration file or the command line, found
     before anything starts: one line names the key or option and the
     value; systemd does not restart it (RestartPreventExitStatus=2)

files:
  /etc/vdsm/managedvolume.conf                  configuration
  /var/lib/vdsm/storage/managedvolume.db        the journal
  /run/vdsm/managedvolume/agent.lock, agent.sock

See managedvolume-agent(8) and managedvolume.conf(5)."""


# Private helpers

def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="managedvolume-agent",
        description="Serve the ManagedVolume verbs with vdsm's wire "
                    "protocol\n(JSON-RPC over STOMP 1.2 over mutual TLS).",
        epilog=AGENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", metavar="FILE",
        help="configuration file (default: $MANAGEDVOLUME_CONFIG or "
             "{})".format(config.DEFAULT_CONFIG_FILE))
    parser.add_argument(
        "--state-dir", metavar="DIR",
        help="keep database, run links, udev rules, locks, logs and a "
             "development PKI under DIR")
    parser.add_argument(
        "--listen", metavar="HOST:PORT",
        help="address to listen on ([V6]:PORT for IPv6; default from the "
             "configuration, [::]:54321)")
    parser.add_argument(
        "--insecure", action="store_true",
        help="plain TCP without TLS; only on a loopback address")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    return parser.parse_args(argv)


def _configure(args):
    """The configuration of ``args``, checked, with logging set up;
    ConfigError (or ValueError from --listen) naming what is wrong."""
    cfg = config.load(args.config, state_dir=args.state_dir)
    if args.listen:
        cfg.listen, cfg.port = parse_listen(args.listen)
        cfg.origins["listen"] = cfg.origins["port"] = \
            "--listen {}".format(args.listen)
    if args.insecure and not is_loopback(cfg.listen):
        raise errors.ConfigError(
            "--insecure serves plain TCP without authentication and is "
            "refused on {!r}: only a loopback address (127.0.0.1, ::1, "
            "localhost) may be used with it".format(cfg.listen))
    if cfg.state_dir and not cfg.log_file and not cfg.log_config:
        cfg.log_file = os.path.join(cfg.log_dir, "agent.log")
        cfg.origins["log_file"] = "--state-dir {}".format(args.state_dir)
    problems = config.environment_problems(cfg)
    if problems:
        raise problems[0]
    try:
        logmod.setup(cfg)
    except Exception as e:
        # fileConfig raises whatever its sections make it (KeyError,
        # ImportError of a handler class, OSError of a handler's file).
        key = "log_config" if cfg.log_config else "log_file"
        raise errors.ConfigError("{}: {} = {!r}: cannot set up logging: "
                                 "{}: {}".format(
                                     config.where(cfg, key), key,
                                     getattr(cfg, key), type(e).__name__, e))
    return cfg


def _run(cfg, insecure):
    # Before any thread starts (each inherits it), as vdsm pins itself.
    cpus = affinity.pin_agent(cfg.cpu_affinity)
    log.info("Running on CPUs %s ([agent] cpu_affinity = %s)",
             affinity.text(cpus), cfg.cpu_affinity or "(empty)")
    return _serve(cfg, insecure)


def _serve(cfg, insecure):
    # Imported here: the service pulls in the privileged layer, which the
    # codec and the client never need.
    from . import jsonrpc

    # Bound first: an address in use (vdsmd's port) is found before the
    # journal is opened, migrated or reconciled.  Clients connecting
    # before we serve wait in the backlog.
    listener = bind(cfg.listen, cfg.port)
    back = None
    # Signals before we serve (the back end's start reconciles, which
    # storage trouble can hold for long): SIGHUP reopens the log as it
    # will later; with two processes SIGTERM and SIGINT stop the back end
    # (once its start ended: it reads then) and the agent exits 0.  The
    # handlers only note the signal: the wait for the back end wakes on
    # the wakeup fd and looks (an exception raised from a handler could
    # land in a log write or a lock's wait).
    stop_asked = []
    hup_early = []

    def reopen(signo, frame):
        logmod.reopen()
        log.info("Log file reopened (SIGHUP)")
        if back is not None:
            back.signal(signal.SIGHUP)
        else:
            hup_early.append(signo)     # forked meanwhile: passed on below

    def stop_starting(signo, frame):
        stop_asked.append(signo)

    signal.signal(signal.SIGHUP, reopen)
    if cfg.processes == 2:
        signal.signal(signal.SIGTERM, stop_starting)
        signal.signal(signal.SIGINT, stop_starting)

    def back_lost():
        # As if the agent had crashed (what one process does when the
        # service dies): its connections close without answers, so the
        # engine sees its calls cut, as it sees a dead vdsm's
        # (VDS_NETWORK_ERROR), never an answer for a call whose outcome
        # is unknown; systemd restarts the agent, whose start reconciles.
        fileutil.rm_file(cfg.socket_path, log=log)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:
                pass
        os._exit(EXIT_FAILED)

    try:
        ssl_context = None
        if not insecure:
            if cfg.state_dir:
                pki.ensure_dev_pki(cfg)
            try:
                ssl_context = pki.server_context(cfg)
            except (OSError, ssl.SSLError) as e:
                raise errors.ConfigError(
                    "cannot load TLS files (cert {}, key {}, CA {}): {}"
                    .format(cfg.cert_file, cfg.key_file, cfg.ca_file, e))
        if cfg.processes == 2:
            if stop_asked:
                # Not even forked: nothing to reconcile for nothing.
                _log_stop_asked(stop_asked)
                listener.close()
                return EXIT_OK
            # The back end (hop.py) opens the journal and reconciles; we
            # serve once it says it is ready.
            back = hop.start_back(cfg, close_in_back=(listener,),
                                  on_lost=back_lost)
            if hup_early:
                back.signal(signal.SIGHUP)
            wake_r, wake_w = hop.signal_wakeup()
            try:
                ready = back.wait_ready(wake_r, lambda: bool(stop_asked))
            finally:
                signal.set_wakeup_fd(-1)
                wake_r.close()
                wake_w.close()
            if ready is False:      # ended by itself: its code, not ours
                listener.close()
                code = back.exit_code()
                log.error("The back end (pid %d) failed to start (%s)",
                          back.pid, "exit status {}".format(code))
                return code if code else EXIT_FAILED
            if stop_asked:
                _log_stop_asked(stop_asked)
                return _stop_starting(cfg, listener, back)
            service = hop.Proxy(back.client, cfg)
        else:
            from . import service as service_module
            service = service_module.Service(cfg)
            # Reconcile the journal before the first request can arrive;
            # the records of an earlier boot are detached once we serve
            # (a privsep call each, which storage trouble can hold:
            # Service.start).
            service.start(defer_detach_stale=True)
    except BaseException:
        listener.close()
        if back is not None:
            back.stop(cfg.shutdown_timeout)
        raise
    # One bound for the whole stop: what the server's drain left of
    # shutdown_timeout is the service's (and its daemon's) to close.
    stop_began = []
    try:
        dispatcher = jsonrpc.Dispatcher(service)
        server = stompserver.Server(cfg, dispatcher, ssl_context)
        address = server.listen(listener)
        ControlSocket(cfg.socket_path, lambda: service.connector_info(
            stale_ok=True)).serve_in(server)
        if back is None:
            service.detach_stale_later()

        def terminate(signo, frame):
            log.info("Received %s", signal.Signals(signo).name)
            server.shutdown()

        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGINT, terminate)
        # A signal may land in any thread: the I/O loop wakes for it.
        server.wake_on_signals()
        if stop_asked:
            server.shutdown()   # asked between the back's start and here
        server.on_stopping(lambda: sd_notify(stopping_message(cfg)))
        server.on_stopping(lambda: stop_began.append(time.monotonic()))
        sd_notify("READY=1\nSTATUS=Listening on {}".format(
            stompserver.format_address(address)))
        _announce(cfg, address, insecure)
        server.serve()
    finally:
        timeout = None
        if stop_began:
            timeout = max(0.0, stop_began[0] + cfg.shutdown_timeout
                          - time.monotonic())
        try:
            if back is not None:
                back.stop(cfg.shutdown_timeout if timeout is None
                          else timeout)
            else:
                service.close(timeout)
        except Exception:
            log.exception("Closing the service failed")
    log.info("Agent stopped")
    return 0


def _log_stop_asked(signals):
    log.info("Received %s before serving: stopping",
             signal.Signals(signals[0]).name)


def _stop_starting(cfg, listener, back):
    """Stop a back end still starting, asked by a signal: it closes once
    its start ended (killed when late: ``BackProcess.stop``); 0."""
    sd_notify(stopping_message(cfg))
    listener.close()
    back.stop(cfg.shutdown_timeout)
    log.info("Agent stopped before serving")
    return EXIT_OK


def _lock_agent(cfg):
    """Take ``state_run_dir/agent.lock`` for this process's life (the fd
    is returned and must stay open); AgentRunning naming the process
    that holds it, ConfigError when the file cannot be opened."""
    path = cfg.agent_lock_file
    try:
        os.makedirs(cfg.state_run_dir, mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise errors.ConfigError("cannot open {}: {}".format(
            path, e.strerror))
    deadline = time.monotonic() + LOCK_RETRY
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            # The agent written there is gone, its back end still holds
            # the lock: it dies with it (a restart right after a kill -9
            # of the agent), in milliseconds.
            if not _alive(other) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            raise errors.AgentRunning(pid=other or "unknown",
                                      run_dir=cfg.state_run_dir, path=path)
    os.ftruncate(fd, 0)
    os.pwrite(fd, "{}\n".format(os.getpid()).encode(), 0)
    return fd


def _alive(pid):
    """Whether the process ``pid`` (text) exists."""
    if not pid.isdigit():
        return True     # Unknown: assume it does.
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _announce(cfg, address, insecure):
    """Tell a person at a terminal where we are, when the log does not."""
    if not cfg.log_file:
        return  # The log goes to stderr (or journald) already.
    client = "managedvolume-client"
    beside = os.path.join(os.path.dirname(sys.executable), client)
    if shutil.which(client) != beside and os.path.exists(beside):
        client = beside  # A virtualenv not on PATH (make run).
    hint = [client]
    if cfg.state_dir:
        hint += ["--state-dir", cfg.state_dir]
    if insecure:
        hint.append("--insecure")
    host, port = address[:2]
    if host not in ("::", "0.0.0.0"):
        hint += ["-a", host]
    if port != 54321:
        hint += ["-p", str(port)]
    print("managedvolume-agent: listening on {} ({}); log: {}\n"
          "  try: {} Host getCapabilities\n"
          "  stop: Ctrl-C or SIGTERM".format(
              stompserver.format_address(address),
              "plain TCP" if insecure else "mutual TLS", cfg.log_file,
              " ".join(hint)), file=sys.stderr, flush=True)


class _ConnectorInfo:
    """Connector info for the control socket, never blocking long.

    ``get(timeout)`` starts a fetch unless one is running and waits for it
    at most ``timeout``; it returns the freshest value known (None when no
    fetch ever succeeded).  The fetch is ``Service.connector_info``: cached
    there (microseconds) and refreshed there, which also rewrites the cache
    file the hook falls back to when the agent is down.
    """

    def __init__(self, fetch):
        self._fetch = fetch
        self._lock = threading.Lock()
        self._running = None        # Event of the fetch in progress
        self._value = None

    def refresh(self):
        return self._start()

    def get(self, timeout):
        done = self._start()
        done.wait(timeout)
        return self._value

    def _start(self):
        with self._lock:
            if self._running is None:
                running = threading.Event()
                try:
                    threading.Thread(target=self._run, args=(running,),
                                     name="connector-info",
                                     daemon=True).start()
                except RuntimeError as e:
                    # No thread now (TasksMax...): the last value, and
                    # the next call tries again (not a fetch "running"
                    # for good).
                    log.warning("Cannot start a connector info fetch: %s",
                                e)
                    running.set()
                    return running
                self._running = running
            return self._running

    def _run(self, done):
        try:
            value = self._fetch()
        except errors.NotSupported as e:
            log.info("No connector info: %s", e)
            value = None
        except Exception as e:
            log.warning("Cannot get connector info: %s", e)
            value = self._value
        with self._lock:
            self._value = value
            self._running = None
        done.set()
