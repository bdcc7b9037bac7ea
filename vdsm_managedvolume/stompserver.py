"""The wire server: JSON-RPC messages in STOMP 1.2 frames, over mutual TLS.

It speaks vdsm's wire protocol (docs/dependencies.md, "vdsm's wire"; vdsm's
own server is lib/yajsonrpc/stompserver.py), so the engine and vdsm-client
talk to it unchanged.  It knows frames, connections and routing, not the
verbs: each request body goes to a ``dispatcher`` (``jsonrpc.Dispatcher``)
and its answer comes back as bytes.  The process around it (configuration,
the sockets it listens on, signals, the control socket) is ``agent.py``.

Design
------
One I/O thread owns every socket (a ``selectors`` loop, non-blocking TLS):
it accepts, handshakes, parses frames (``stompframe``), answers the STOMP
verbs itself and writes what is queued.  Requests run in worker threads
(``Dispatcher.handle()``).  A worker writes its response itself when its
connection has nothing queued (``Connection.write``: one thread hand-off
per request, the loop is not woken); otherwise, or for whatever the
socket does not take at once, the loop writes it.  The workers of the
requests one round of the loop read are woken at the end of the round,
just before the loop waits and lets the interpreter lock go
(``Server._hand_off``), not each while the loop still holds it; in a
long round, once it has run HANDOFF_AFTER or taken HANDOFF_JOBS.  Two
planes, two bounded pools::

    SEND --(I/O thread: Dispatcher.is_operation(body)?)--+
         |                                               |
         no: control plane                               yes: data plane
         getCapabilities, volumes_info, errors           attach, detach,
                                                         extend
         ``workers`` threads + ``max_queue`` waiting     ``max_operations``
                                                         threads, no queue

After a host failure the engine starts dozens of VMs on the survivors at
once, each attach taking seconds at the array, while it keeps polling
getCapabilities: a host that does not answer is fenced.  So

- attaches and detaches of distinct volumes run at once, up to
  ``max_operations`` (one thread each, started when first needed; the
  privsep daemon's pool is sized to match); one more is refused at once
  with 933 (TooManyOperations), never queued without bound;
- they can never take the threads of the control plane: getCapabilities
  and volumes_info answer in microseconds whatever the data plane does
  (the service serves a cached connector_info, stale rather than late);
- an attach that takes a minute never stops heart-beats or other clients;
- frames are never interleaved: a frame is queued whole, written by one
  thread, and a worker writes only when nothing is queued before it; an
  SSL object is never used by two threads at once (each use of a
  connection's socket holds its lock);
- when ``workers`` are busy and ``max_queue`` requests wait, a new control
  request is answered at once with error 933 (AgentBusy) as well.

Connection life::

    accept -> TLS handshake within handshake_timeout of the accept
           -> CONNECT/STOMP within idle_timeout of the handshake's end (of
              the accept over plain TCP), accept-version must hold 1.2
           -> CONNECTED version:1.2 heart-beat:<sx>,<sy>
           -> SUBSCRIBE / UNSUBSCRIBE / SEND ... / DISCONNECT [receipt]

As in vdsm, SUBSCRIBE, SEND, UNSUBSCRIBE... before CONNECT are served
(no heart-beats until CONNECT), and UNSUBSCRIBE of an unknown id is
ignored.  Every frame we send, heart-beats too, is written by a send() of
its own: over TLS each is in records of its own, which ovirt-engine's
client needs (docs/interop.md).

A malformed frame, an unknown or unsupported command, a frame larger than
``max_frame``: the connection gets an ERROR frame saying precisely what was
wrong and is closed, as STOMP asks; other connections are not affected.
So does a TLS client on a plain TCP port (``--insecure``), at its first
byte: its TLS library takes our plain-text answer for a bad record and
fails at once, instead of waiting its timeout for a ServerHello.

What one peer can cost us is bounded (tests/security_test.py attacks each):
a TLS handshake must end within ``handshake_timeout`` of the accept,
whatever the peer sends meanwhile (nothing, part of a ClientHello, a
trickle), as in vdsm (sslutils.SSLHandshakeDispatcher: 10 s from the
accept; its protocol detector then gets 10 s more); the CONNECT window
(``idle_timeout``) opens only when the handshake ends, so a slow
handshake never shortens it; a frame must arrive whole within
``idle_timeout`` of its first byte (slowloris); at most MAX_CONNECTIONS
connections, of which at most MAX_UNPROVEN not yet proven (a TLS
handshake not finished, or over plain TCP no frame yet): a new
connection takes the place of the oldest unproven one when either bound
is reached, and is closed at once only when all MAX_CONNECTIONS are
proven, so connections that never finish a handshake cannot lock the
engine out; out of file descriptors, accepting pauses instead of
spinning; a peer that does not read its responses is
not read from either once READ_PAUSE bytes wait for it, and is dropped
when it takes no byte for ``idle_timeout`` or MAX_OUTPUT bytes pile up; a
flow id reaches the log printable and at most ``log.MAX_FLOW_ID`` long.

Routing: a SEND to ``jms.topic.vdsm_requests`` (or ``...vdsm_requests.<x>``)
is a request; its response goes as a MESSAGE to the ``reply-to``
destination, with the ``subscription`` id this connection subscribed it
with (any connection's subscription when this one has none).  No reply-to,
no response.  Errors about a request whose id is unknown (unparsable JSON)
go to ``jms.topic.vdsm_responses`` when the connection subscribed to it.
The ``ovirtCorrelationId`` header is the flow id of the call
(``log.flow``): it is in every log line the call writes.
"""

import collections
import itertools
import logging
import selectors
import signal
import socket
import ssl
import threading
import time

from . import __version__
from . import errors
from . import gate
from . import log as logmod
from . import stompframe
from . import workers

log = logging.getLogger("managedvolume.stompserver")

REQUESTS = "jms.topic.vdsm_requests"
RESPONSES = "jms.topic.vdsm_responses"

# We never promise heart-beats more often than this (milliseconds), and send
# them a little earlier than promised, so that a late wake-up stays in time.
MIN_HEARTBEAT = 1000
HEARTBEAT_EARLY = 0.8
# A client that offered heart-beats is dropped after this many silent
# intervals (STOMP leaves the margin to us).
HEARTBEAT_GRACE = 3

# After an ERROR frame: how long we keep reading (and discarding) so that
# closing does not reset the connection before the peer read the error.
LINGER = 2.0

# Seconds the I/O loop keeps flushing the last responses once the drain of
# a stop ended (in-flight calls done, or shutdown_timeout spent).
FINAL_FLUSH = 1.0
# Output a connection may have pending.  Above READ_PAUSE we stop reading
# (and so stop running) its requests until it reads its responses; above
# MAX_OUTPUT, or when it takes no byte for idle_timeout seconds while
# output is pending, it is dropped.  Memory per connection stays bounded
# by about max_frame (input) + MAX_OUTPUT (output).
READ_PAUSE = 1024 * 1024
MAX_OUTPUT = 16 * 1024 * 1024
# Connections at once (each costs a file descriptor, TLS state and up to
# max_frame of input buffer); more are accepted and closed at once.
MAX_CONNECTIONS = 512
# Of those, connections not yet proven (TLS: the handshake, which checks
# the client's certificate, not finished; plain TCP: no frame yet).  When
# a new connection finds MAX_UNPROVEN of them, or MAX_CONNECTIONS in all,
# the oldest unproven one is closed to make room: a peer opening
# connections it never completes (~51 a second renews 512 slots within
# handshake_timeout) must not refuse the engine.  It would now need more
# than MAX_UNPROVEN new connections during one client's handshake.
MAX_UNPROVEN = 128
# When accept() fails for lack of file descriptors, stop accepting for
# this long instead of spinning on a listener that stays readable.
ACCEPT_PAUSE = 1.0

CHUNK = 65536
# The jobs a round of the I/O loop accepts wait for the round to end
# before their workers are woken (Server._hand_off), unless the round has
# already accepted this many or run this long (seconds): a long round
# (64 full reads per connection, large frames parsed, refusals, flushes)
# must not hold back every request it took.
HANDOFF_JOBS = 8
HANDOFF_AFTER = 0.001

# The most plaintext one TLS record holds (RFC 8446 5.1): a TLS recv
# returns one record at most.
TLS_RECORD = 16384

# The first byte of a TLS connection (a handshake record: ClientHello).
# No STOMP frame starts with it; on a plain TCP port it is a TLS client,
# which would otherwise wait its whole timeout for a ServerHello.
TLS_HANDSHAKE = b"\x16"


class Server:
    """The wire server; see the module docstring.

    dispatcher: ``jsonrpc.Dispatcher`` or alike: ``handle(body, flow_id)``
        -> response bytes or None, ``refuse(body, error)`` -> the response
        refusing every request of ``body`` with ``error``,
        ``is_unknown_id_error(response)``, and optionally
        ``is_operation(body)`` (True: the data plane).
    ssl_context: a server context (mutual TLS), None for plain TCP.

    The process hands it listening sockets: ``listen(sock)`` for STOMP,
    ``add_listener()`` for any other served in the same I/O loop; then
    ``serve()`` runs the loop in the calling thread until ``shutdown()``.
    """

    def __init__(self, cfg, dispatcher, ssl_context=None):
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.ssl_context = ssl_context
        self.address = None
        self._selector = selectors.DefaultSelector()
        self._listeners = {}    # socket -> (handler, on_accept, on_close)
        self._connections = set()
        # Connections not yet proven (see MAX_UNPROVEN), oldest first.
        self._unproven = collections.OrderedDict()
        self._evicted_logged = 0.0
        self._results = collections.deque()
        # Answers made but maybe not yet written or queued: a worker
        # delivers after giving its pool slot back, and the stop's drain
        # must wait for it too.
        self._delivering = 0
        self._delivering_lock = threading.Lock()
        self._again = set()     # connections with decrypted bytes pending
        # Connections whose state may have changed since the loop last
        # looked at them (see _loop), and when it must look at all of them
        # (no connection's deadline comes earlier).
        self._touched = set()
        self._sweep_at = 0.0
        # Jobs accepted in this round of the loop, handed to their
        # workers just before the loop waits (see _loop).
        self._handoff = []
        self._round_start = 0.0     # when select() last returned
        self._pool = workers.Pool(cfg.workers, cfg.max_queue,
                                  name="worker")
        # The data plane's threads run Python one at a time (``gate``).
        self._operations = workers.Pool(cfg.max_operations, 0,
                                        name="operation", gate=gate.Gate())
        self._is_operation = getattr(dispatcher, "is_operation", None)
        self._paused = {}       # listener -> resume time
        self._refused_logged = 0.0
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._on_stopping = []
        self._wakes_on_signals = False

    def listen(self, sock):
        """Serve STOMP clients on the listening socket ``sock`` (bound,
        non-blocking); return its address."""
        self.add_listener(sock, self._add_connection)
        self.address = sock.getsockname()[:2]
        log.info("Listening on %s (%s)", format_address(self.address),
                 "mutual TLS" if self.ssl_context else "plain TCP")
        return self.address

    def add_listener(self, sock, on_accept, on_close=None):
        """Accept on the listening socket ``sock`` (non-blocking) in the
        I/O loop: ``on_accept(client_socket, address)`` is called in the
        I/O thread and must not block.  The socket is closed when the
        stop begins, then ``on_close()`` is called.  Call before
        ``start()``/``serve()``."""
        def handler():
            self._accept(sock)
        self._listeners[sock] = (handler, on_accept, on_close)
        self._selector.register(sock, selectors.EVENT_READ, handler)

    def serve(self):
        """Run the I/O loop until ``shutdown()`` and the drain are done."""
        try:
            self._loop()
        finally:
            self._close_all()

    def shutdown(self):
        """Begin a graceful stop; safe in a signal handler."""
        self._stopping.set()
        self._wake()

    def wake_on_signals(self):
        """Wake the I/O loop on every signal (call from the main thread,
        which runs ``serve()``): a signal may land in any thread, and its
        Python handler runs only once the main thread runs again."""
        signal.set_wakeup_fd(self._wake_w.fileno(),
                             warn_on_full_buffer=False)
        self._wakes_on_signals = True

    def on_stopping(self, callback):
        """Call ``callback()`` (in the I/O thread) when the stop begins."""
        self._on_stopping.append(callback)

    # The I/O loop

    def _loop(self):
        drain_deadline = None
        final_deadline = None
        while True:
            now = time.monotonic()
            if self._stopping.is_set() and drain_deadline is None:
                drain_deadline = now + self.cfg.shutdown_timeout
                self._begin_stop()
            if drain_deadline is not None and final_deadline is None:
                pending = self._pool.pending + self._operations.pending + \
                    self._delivering
                if (pending == 0 and not self._results) or \
                        now >= drain_deadline:
                    if pending:
                        log.warning("%d operations still running after %s "
                                    "seconds; exiting anyway", pending,
                                    self.cfg.shutdown_timeout)
                    final_deadline = now + FINAL_FLUSH
                    for conn in list(self._connections):
                        conn.close_after_flush(linger=False)
            if final_deadline is not None and (
                    not self._connections or now >= final_deadline):
                return
            self._hand_off_early(now)   # before _expire's flushes
            timeout = min(self._expire(now), self._resume_accepting(now))
            if drain_deadline is not None:
                timeout = min(timeout, 0.1)
            if self._again:
                timeout = 0
            if self._handoff:
                self._hand_off()
            events = self._selector.select(timeout)
            self._round_start = time.monotonic()
            for key, ready in events:
                handler = key.data
                if handler is None:
                    self._drain_wake()
                elif isinstance(handler, Connection):
                    handler.ready(ready)
                    self._touched.add(handler)
                    self._hand_off_early()
                else:
                    handler()
            again, self._again = self._again, set()
            for conn in again:
                conn.ready(selectors.EVENT_READ)
                self._hand_off_early()
            self._touched.update(again)
            self._deliver_results()

    def _expire(self, now):
        """Act on connection deadlines and flush what they queued; return
        the select timeout.

        Only the connections touched since the last round (events, output
        queued, a close begun, new) are looked at, unless the earliest
        deadline known (``_sweep_at``: at most a second away) has come:
        then every one is.  A request costs the same with 3 connections
        open or 300.  A connection's deadlines only move earlier when it
        is touched (its output queued, a frame begun, its state changed),
        so ``_sweep_at`` never passes one.
        """
        if now >= self._sweep_at:
            conns = list(self._connections)
            self._sweep_at = now + 1.0
        else:
            conns = [c for c in self._touched if not c.closed]
        self._touched = set()
        for conn in conns:
            deadline = conn.check_deadlines(now)
            if deadline is not None and deadline < self._sweep_at:
                self._sweep_at = deadline
        for conn in conns:
            conn.update()
        if self._touched:
            return 0.0      # touched meanwhile (a deadline closed it)
        return max(0.0, self._sweep_at - now)

    def touch(self, conn):
        """``conn`` has something for the loop (output, a close)."""
        self._touched.add(conn)

    def _begin_stop(self):
        log.info("Stopping: no new connections; waiting up to %s seconds "
                 "for %d operations in flight", self.cfg.shutdown_timeout,
                 self._pool.pending + self._operations.pending)
        for callback in self._on_stopping:
            try:
                callback()
            except Exception:
                log.exception("Stopping callback failed")
        self._close_listeners()

    def _close_listeners(self):
        listeners, self._listeners = self._listeners, {}
        self._paused.clear()
        for sock, (_, _, on_close) in listeners.items():
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
            if on_close is not None:
                on_close()

    def _close_all(self):
        self._close_listeners()
        for conn in list(self._connections):
            conn.close()
        self._hand_off()
        self._pool.stop()
        self._operations.stop()
        self._selector.close()
        if self._wakes_on_signals:
            signal.set_wakeup_fd(-1)
            self._wakes_on_signals = False
        self._wake_r.close()
        self._wake_w.close()

    def _hand_off(self):
        """Wake the workers of the jobs accepted in this round.

        Done last, just before the loop waits (and lets the interpreter
        lock go): a worker woken at once would find the lock held by
        this thread and sleep again until the round ends (on 2 cores,
        about 4 more futex calls and 2 more context switches per
        request); earlier only in a long round (``_hand_off_early``)."""
        handoff, self._handoff = self._handoff, []
        for put, job in handoff:
            put(job)

    def _hand_off_early(self, now=None):
        """Wake the workers now if this round has accepted HANDOFF_JOBS
        jobs or run for HANDOFF_AFTER seconds: a long round (many full
        reads, large frames, refusals, flushes) would delay every request
        it accepted by its whole length.  Nothing to do (no clock read)
        when the round has accepted none."""
        if not self._handoff:
            return
        if len(self._handoff) >= HANDOFF_JOBS:
            self._hand_off()
            return
        if now is None:
            now = time.monotonic()
        if now - self._round_start > HANDOFF_AFTER:
            self._hand_off()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _accept(self, listener):
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._pause_accepting(listener, e)
            return
        on_accept = self._listeners[listener][1]
        on_accept(sock, addr)

    def _add_connection(self, sock, addr):
        """A new client on the STOMP listener."""
        if self._unproven and (len(self._unproven) >= MAX_UNPROVEN or
                               len(self._connections) >= MAX_CONNECTIONS):
            self._evict_unproven(addr)
        if len(self._connections) >= MAX_CONNECTIONS:
            now = time.monotonic()
            if now - self._refused_logged > 10.0:
                self._refused_logged = now
                log.warning("Refusing connection from %s: %d connections "
                            "already open (the limit)",
                            format_address(addr), len(self._connections))
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False)
        conn = Connection(self, sock, format_address(addr))
        self._connections.add(conn)
        self._unproven[conn] = None
        self._touched.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        log.debug("Connection from %s", conn.peer)
        if self.ssl_context is None:
            conn.ready(selectors.EVENT_READ)

    def _evict_unproven(self, addr):
        """Close the oldest connection not yet proven, for a new one from
        ``addr`` (see MAX_UNPROVEN)."""
        conn, _ = self._unproven.popitem(last=False)
        now = time.monotonic()
        if now - self._evicted_logged > 10.0:
            self._evicted_logged = now
            log.warning("Closing the connection from %s (open %.1f s, %s) "
                        "for one from %s: %d connections open, %d not yet "
                        "proven (limits %d and %d); more are closed the "
                        "same way, logged every 10 s", conn.peer,
                        now - conn.created, "TLS handshake not finished"
                        if conn.state == conn.HANDSHAKE else "no frame yet",
                        format_address(addr), len(self._connections),
                        len(self._unproven) + 1, MAX_CONNECTIONS,
                        MAX_UNPROVEN)
        conn.close()

    def _pause_accepting(self, listener, error):
        """accept() failed (no file descriptors left...): the listener
        stays readable, so stop watching it for ACCEPT_PAUSE seconds
        instead of spinning and logging in a loop."""
        log.warning("accept failed: %s; not accepting for %s seconds",
                    error, ACCEPT_PAUSE)
        try:
            self._selector.unregister(listener)
        except (KeyError, ValueError):
            return
        self._paused[listener] = time.monotonic() + ACCEPT_PAUSE

    def _resume_accepting(self, now):
        """Watch paused listeners again when due; return the select
        timeout until the next one."""
        timeout = 1.0
        for listener, when in list(self._paused.items()):
            if now >= when:
                del self._paused[listener]
                if listener.fileno() != -1:
                    handler = self._listeners[listener][0]
                    self._selector.register(listener, selectors.EVENT_READ,
                                            handler)
            else:
                timeout = min(timeout, when - now)
        return timeout

    # Connections call these (in the I/O thread)

    def forget(self, conn):
        self._connections.discard(conn)
        self._unproven.pop(conn, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def proven(self, conn):
        """``conn`` finished its TLS handshake (over plain TCP: sent a
        frame): it no longer gives its place to a new connection."""
        self._unproven.pop(conn, None)

    def again(self, conn):
        """Run ``conn.ready()`` on the next round, whatever select says."""
        self._again.add(conn)

    def watch(self, conn, events):
        try:
            self._selector.modify(conn.sock, events, conn)
        except (KeyError, ValueError):
            pass

    def submit(self, conn, body, reply_to, flow_id):
        """Hand a request to its plane's pool, or answer 933 at once."""
        if self._stopping.is_set():
            self._route(conn, reply_to, flow_id, self.dispatcher.refuse(
                body, errors.ShuttingDown()))
            return
        job = (conn, body, reply_to, flow_id)
        operation = self._is_operation is not None and \
            self._is_operation(body)
        pool = self._operations if operation else self._pool
        try:
            if pool.submit(lambda: self._handle(job), self._handoff):
                return
            if operation:
                error = errors.TooManyOperations(running=pool.workers)
            else:
                error = errors.AgentBusy(workers=pool.workers,
                                         queued=pool.max_queue)
        except RuntimeError as e:
            # No thread could be started: this request is refused, the
            # I/O thread (which calls this) goes on.
            error = errors.NoThread(reason=str(e))
        with logmod.flow(flow_id):
            log.warning("Refusing a request from %s: %s", conn.peer, error)
        self._route(conn, reply_to, flow_id,
                    self.dispatcher.refuse(body, error))

    def publish(self, conn, destination, frame):
        """Forward a SEND to a destination that is not ours (broker-like).

        Return whether anybody was subscribed.
        """
        targets = self._subscribers(conn, destination)
        headers = {k: v for k, v in frame.headers.items() if k != "receipt"}
        for target, sub_id in targets:
            target.send(_message(target, sub_id, headers, frame.body))
        return bool(targets)

    # Private helpers

    def _handle(self, job):
        """Run one request in a worker thread."""
        conn, body, reply_to, flow_id = job
        with logmod.flow(flow_id):
            log.debug("Request from %s (%d bytes)", conn.peer, len(body))
            try:
                response = self.dispatcher.handle(body, flow_id)
            except Exception as e:
                log.exception("Dispatcher failed")
                response = self.dispatcher.refuse(body, errors.to_error(e))

        def deliver():
            # Run by the pool once this job's slot is free: a client that
            # sends its next operation on reading this answer must find
            # the slot free, not a spurious 933.
            try:
                self._respond(conn, reply_to, flow_id, response)
            finally:
                with self._delivering_lock:
                    self._delivering -= 1

        with self._delivering_lock:
            self._delivering += 1
        return deliver

    def _respond(self, conn, reply_to, flow_id, response):
        """Send a response from the worker that made it (``Connection.
        write``) when its route is the usual one: the reply-to
        destination, subscribed once by the request's own connection.
        Anything else is routed by the I/O thread (``_route``)."""
        if response is None:
            return
        # Read once, whole (a copy made without a thread switch): the I/O
        # thread may change the subscriptions meanwhile.
        subscriptions = list(conn.subscriptions.items())
        sub_ids = [sid for sid, dest in subscriptions if dest == reply_to]
        if len(sub_ids) != 1 or conn.closed or (
                reply_to != RESPONSES and
                any(dest == RESPONSES for _, dest in subscriptions) and
                self.dispatcher.is_unknown_id_error(response)) or \
                not conn.write(_response(conn, sub_ids[0], reply_to,
                                         response)):
            # Not the usual route, or the connection would not take the
            # frame now (it closed meanwhile: another connection on the
            # same reply-to gets it, or the drop is logged).
            self.call_soon(self._route, conn, reply_to, flow_id, response)
            return
        if log.isEnabledFor(logging.DEBUG):
            with logmod.flow(flow_id):
                log.debug("Response sent to %s (%d bytes)", reply_to,
                          len(response))

    def call_soon(self, fn, *args):
        """Run ``fn(*args)`` in the I/O thread (from any thread)."""
        self._results.append((fn, args))
        self._wake()

    def _deliver_results(self):
        while self._results:
            fn, args = self._results.popleft()
            fn(*args)

    def _route(self, conn, reply_to, flow_id, response):
        if response is None:
            return
        with logmod.flow(flow_id):
            destination = reply_to
            # The cheap tests first: the last one parses the response.
            if reply_to != RESPONSES and \
                    RESPONSES in conn.subscriptions.values() and \
                    self.dispatcher.is_unknown_id_error(response):
                destination = RESPONSES
            if destination is None:
                log.debug("Request without reply-to: response dropped")
                return
            targets = self._subscribers(conn, destination)
            if not targets:
                log.warning("No subscription to %s (connection %s %s): "
                            "response dropped", destination, conn.peer,
                            "closed" if conn.closed else "open")
                return
            for target, sub_id in targets:
                target.send(_response(target, sub_id, destination,
                                      response))
            log.debug("Response sent to %s (%d bytes)", destination,
                      len(response))

    def _subscribers(self, conn, destination):
        """[(connection, subscription id)]: this connection's, else any."""
        own = [(conn, sid) for sid, dest in conn.subscriptions.items()
               if dest == destination] if not conn.closed else []
        if own:
            return own
        return [(c, sid) for c in self._connections if not c.closed
                for sid, dest in c.subscriptions.items()
                if dest == destination]


class Connection:
    """One client connection, driven by the I/O thread; a worker writes
    its response itself (``write``) under the connection's lock."""

    HANDSHAKE = "handshake"
    WAIT_CONNECT = "wait-connect"
    CONNECTED = "connected"
    CLOSING = "closing"

    def __init__(self, server, sock, peer):
        self.server = server
        self.cfg = server.cfg
        self.sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.state = self.HANDSHAKE if self.tls else self.WAIT_CONNECT
        self.parser = stompframe.Parser(
            max_frame=self.cfg.max_frame,
            commands=stompframe.CLIENT_COMMANDS)
        self.subscriptions = {}     # id -> destination
        self.closed = False
        # TLS handshake finished, or (plain TCP) a frame received: see
        # MAX_UNPROVEN.
        self.proven = False
        now = time.monotonic()
        self.created = now
        # When the CONNECT window (idle_timeout) opened: the handshake's
        # end over TLS, the accept over plain TCP.
        self.opened = now
        self.last_recv = now
        self.last_send = now
        self.send_interval = 0.0    # seconds between our heart-beats
        self.recv_timeout = 0.0     # silence after which the peer is dead
        # Output: one item per frame (or heart-beat EOL), written one item
        # per send(); see _flush().
        self._out = collections.deque()
        self._out_len = 0           # bytes pending in _out
        self._out_off = 0           # bytes of _out[0] already written
        self._out_since = None      # output pending without progress since
        self._frame_since = None    # a frame partly received since
        self._paused = False        # not reading: too much output pending
        self._retry_len = 0         # SSL_write must be retried as it was
        self._want_write = False    # TLS asked to wait for writability
        self._events = selectors.EVENT_READ
        self._linger = False
        self._linger_until = None
        self._close_deadline = None
        self._message_ids = itertools.count(1)
        self._connect_seen = False  # CONNECT/STOMP received
        # The socket and the output queue are the I/O thread's, except
        # that a worker may write its response directly (``write``): this
        # lock makes each use of the socket (an SSL object must never be
        # used by two threads at once) and each change of the output
        # queue whole.  Held only around them, never while waiting.
        self._lock = threading.Lock()

    # Called by the server

    def ready(self, events):
        if self.closed:
            return
        # Whatever TLS wanted is retried below; each step says again what
        # it waits for.
        self._want_write = False
        if self.state == self.HANDSHAKE:
            self._handshake()
            if self.state == self.HANDSHAKE or self.closed:
                return
        if self._out:
            self._flush()
        if not self.closed and not self._reading_paused():
            self._read()
        if not self.closed and self._out:
            self._flush()

    def update(self):
        """Flush queued output and watch for the events we need."""
        if self.closed:
            return
        if self._out and not self._want_write:
            self._flush()
        if self.closed:
            return
        if self.state == self.CLOSING and not self._out and \
                self._linger_until is None:
            self._finish_close()
            if self.closed:
                return
        events = 0 if self._reading_paused() else selectors.EVENT_READ
        if self._out or self._want_write:
            events |= selectors.EVENT_WRITE
        if not events:
            events = selectors.EVENT_READ
        if events != self._events:
            self._events = events
            self.server.watch(self, events)

    def check_deadlines(self, now):
        """Enforce timeouts and send heart-beats; return the next deadline."""
        if self.closed:
            return None
        if self.state == self.HANDSHAKE:
            deadline = self.created + self.cfg.handshake_timeout
            if now >= deadline:
                log.warning("TLS handshake with %s timed out after %s "
                            "seconds", self.peer, self.cfg.handshake_timeout)
                self.close()
                return None
            return deadline
        if self.state != self.CLOSING and self._out_since is not None:
            deadline = self._out_since + self.cfg.idle_timeout
            if now >= deadline:
                log.warning("%s took no byte of its %d pending bytes for "
                            "%s seconds: closing", self.peer, self._out_len,
                            self.cfg.idle_timeout)
                self.close()
                return None
            stall = deadline
        else:
            stall = None
        if self.state == self.WAIT_CONNECT:
            deadline = self.opened + self.cfg.idle_timeout
            if now >= deadline:
                self.fail("no CONNECT frame within {} seconds".format(
                    self.cfg.idle_timeout))
                return None
            return deadline
        if self.state == self.CLOSING:
            deadline = self._close_deadline
            if self._linger_until is not None:
                deadline = min(deadline, self._linger_until)
            if now >= deadline:
                self.close()
                return None
            return deadline
        deadlines = [stall] if stall is not None else []
        if self._frame_since is not None:
            # Slowloris: a frame trickled byte by byte would hold its
            # buffer (up to max_frame) forever.
            deadline = self._frame_since + self.cfg.idle_timeout
            if now >= deadline:
                self.fail("incomplete frame: {} bytes received, the rest "
                          "did not arrive within {} seconds".format(
                              self.parser.buffered, self.cfg.idle_timeout))
                return None
            deadlines.append(deadline)
        if self.recv_timeout:
            deadline = self.last_recv + self.recv_timeout
            if now >= deadline:
                log.warning("No heart-beat from %s for %.1f seconds: "
                            "closing", self.peer, now - self.last_recv)
                self.close()
                return None
            deadlines.append(deadline)
        if self.send_interval:
            # Due from the last byte written, whatever is queued: a
            # heart-beat is an item of its own (its own TLS record), queued
            # unless one already waits.
            deadline = self.last_send + self.send_interval
            if now >= deadline:
                with self._lock:
                    if not self._out or \
                            self._out[-1] != stompframe.HEARTBEAT:
                        self._queue(stompframe.HEARTBEAT)
                deadline = now + self.send_interval
            deadlines.append(deadline)
        return min(deadlines) if deadlines else None

    def send(self, data):
        """Queue bytes; written by the loop (``update``)."""
        if self.closed or self.state == self.CLOSING:
            return
        with self._lock:
            full = bool(self._out) and \
                self._out_len + len(data) > MAX_OUTPUT
            if not full:
                self._queue(data)
        if full:
            log.warning("%s does not read its responses (%d bytes "
                        "pending): closing", self.peer, self._out_len)
            self.close()
            return
        self.server.touch(self)

    def next_message_id(self):
        return str(next(self._message_ids))     # atomic: any thread

    def write(self, data):
        """Send the frame ``data`` from a worker thread; False when it was
        not taken (the caller routes it through the loop).

        When nothing waits to be written before it, the worker writes it
        itself: the I/O thread is neither woken nor involved, and a
        request costs one thread hand-off instead of two.  Whatever the
        socket did not take at once (it is full, TLS wants to wait) is
        queued as the I/O thread would have queued it and the loop is
        told to go on writing.  A frame that cannot be written now (output
        queued, a close begun, too large for one send, the connection's
        lock held by another thread) is not taken.

        The lock is never waited for: its holder (the I/O thread flushing
        queued frames until the socket is full, a control-plane worker
        writing an answer of up to 64 KiB) needs the interpreter lock to
        let it go, and an operation's answer is written holding the data
        plane's only slot (``gate``): waiting here would stop every
        operation behind another thread's writes on the engine's one
        connection.  The loop delivers the frame instead.
        """
        if len(data) > CHUNK:
            return False
        if not self._lock.acquire(False):
            return False
        try:
            if self.closed or self.state != self.CONNECTED or self._out:
                return False
            done = self._write_locked(data)
        finally:
            self._lock.release()
        if not done:
            self.server.call_soon(self.server.touch, self)
        return True

    def fail(self, reason, receipt=None):
        """Send an ERROR frame and close, as STOMP asks."""
        log.warning("STOMP error from %s: %s", self.peer, reason)
        headers = {"message": reason[:200], "content-type": "text/plain"}
        if receipt is not None:
            headers["receipt-id"] = receipt
        self.send(stompframe.encode(stompframe.ERROR, headers,
                                    (reason + "\n").encode("utf-8")))
        self.close_after_flush()

    def close_after_flush(self, linger=True):
        if self.closed:
            return
        self.server.touch(self)
        if self.state != self.CLOSING:
            with self._lock:    # no worker writes once CLOSING
                self.state = self.CLOSING
            self._linger = linger
            self._close_deadline = time.monotonic() + LINGER + 5.0
        elif not linger:
            self._linger = False

    def close(self):
        if self.closed:
            return
        with self._lock:
            # A worker checks this under the lock before it writes: none
            # writes to the descriptor after it is closed (and maybe given
            # to a new connection).
            self.closed = True
        self.server.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        log.debug("Connection %s closed", self.peer)

    # Private helpers

    def _prove(self):
        self.proven = True
        self.server.proven(self)

    def _handshake(self):
        try:
            with self._lock:
                self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_write = False
            return
        except ssl.SSLWantWriteError:
            self._want_write = True
            return
        except (ssl.SSLError, OSError) as e:
            log.warning("TLS handshake with %s failed: %s", self.peer, e)
            self.close()
            return
        self._want_write = False
        self.state = self.WAIT_CONNECT
        self.opened = time.monotonic()
        self._prove()
        log.debug("TLS handshake with %s done (%s)", self.peer,
                  self.sock.version())

    def _read(self):
        for _ in range(64):
            try:
                if self.tls:
                    with self._lock:
                        data = self.sock.recv(CHUNK)
                else:
                    # A plain socket may be read and written at once;
                    # only this thread closes it.
                    data = self.sock.recv(CHUNK)
            except (ssl.SSLWantReadError, BlockingIOError,
                    InterruptedError):
                return
            except ssl.SSLWantWriteError:
                self._want_write = True
                return
            except (ssl.SSLError, OSError) as e:
                log.debug("Reading from %s failed: %s", self.peer, e)
                self.close()
                return
            if not data:
                log.debug("%s closed the connection", self.peer)
                self.close()
                return
            self.last_recv = time.monotonic()
            if self.state == self.CLOSING:
                continue        # lingering: discard
            # Less than asked: the socket (or TLS record) is drained, and
            # select() says when more comes; do not pay a recv() that
            # fails (and an exception) to learn it.  A TLS recv returns
            # one record at most: a full one says more may follow.
            drained = len(data) < (TLS_RECORD if self.tls else CHUNK)
            if (not self.tls and not self.proven
                    and not self.parser.buffered
                    and data[:1] == TLS_HANDSHAKE):
                # Our ERROR frame, plain text, fails the client's
                # handshake at once ("wrong version number").
                self.fail("TLS handshake on a plain TCP port: this agent "
                          "serves without TLS (a client needs --insecure)")
                return
            try:
                frames = self.parser.feed(data)
            except stompframe.FrameError as e:
                self.fail(str(e))
                return
            if not self.parser.buffered:
                self._frame_since = None
            elif frames or self._frame_since is None:
                self._frame_since = self.last_recv
            if frames and not self.proven:
                self._prove()
            for frame in frames:
                if self.state == self.CLOSING:
                    break
                self._on_frame(frame)
            if self.closed:
                return
            # Up to 64 full reads here: the requests this round took
            # (this connection's or another's) are not held back for all
            # of them.
            self.server._hand_off_early()
            if self._reading_paused():
                return      # update() resumes once the peer read enough
            if drained:
                break
        # More TLS records may be decrypted already; select() cannot see
        # them, so come back on the next round.
        if self.tls and self._pending():
            self.server.again(self)

    def _flush(self):
        # One send() never crosses a frame boundary: each STOMP frame (and
        # each heart-beat) goes in TLS records of its own, as vdsm writes
        # them (yajsonrpc/stomp.py, AsyncDispatcher.handle_write sends one
        # frame per send).  ovirt-engine's client (vdsm-jsonrpc-java,
        # SSLEngineNioHelper.read) decrypts one TLS record per reactor
        # round and takes one frame from it: frames packed into one record
        # stayed unparsed until more bytes arrived, and 40 concurrent calls
        # wedged its connection.  Plain TCP is
        # written the same way: batching frames there measured no gain
        # (docs/interop.md).
        with self._lock:
            error = self._flush_locked()
        if error is not None:
            log.debug("Writing to %s failed: %s", self.peer, error)
            self.close()

    def _flush_locked(self):
        """Write queued items; return the error that ends the connection,
        if any."""
        while self._out:
            item = self._out[0]
            off = self._out_off
            size = self._retry_len or min(len(item) - off, CHUNK)
            try:
                n = self._send_locked(item[off:off + size])
            except (ssl.SSLError, OSError) as e:
                return e
            if not n:
                return None
            self._out_len -= n
            if off + n == len(item):
                self._out.popleft()
                self._out_off = 0
            else:
                self._out_off = off + n
            self._out_since = self.last_send if self._out else None
        return None

    def _send_locked(self, chunk):
        """One send() of ``chunk``: the bytes written, 0 when the socket
        cannot take any now (then ``_want_write`` and ``_retry_len`` say
        how to retry: TLS must retry the same write); an error that ends
        the connection is raised."""
        try:
            n = self.sock.send(chunk)
        except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            self._retry_len = len(chunk) if self.tls else 0
            self._want_write = True
            return 0
        except ssl.SSLWantReadError:
            self._retry_len = len(chunk)
            self._want_write = False
            return 0
        self._retry_len = 0
        self._want_write = False
        self.last_send = time.monotonic()
        return n

    def _write_locked(self, data):
        """Write the frame ``data`` with nothing queued (a worker, holding
        the lock); return True when it was written whole, False when
        (the rest of) it was queued and the loop must go on writing.

        Nothing is queued while the write runs: the I/O thread, which
        looks at the queue without the lock, does not wait for it.
        """
        try:
            n = self._send_locked(data)
        except (ssl.SSLError, OSError) as e:
            # Queued: the loop's write meets the error again and closes.
            log.debug("Writing to %s failed: %s", self.peer, e)
            n = 0
        if n == len(data):
            return True
        self._queue(data)
        self._out_off = n
        self._out_len -= n
        return False

    def _queue(self, data):
        """Append one item to the output (holding the lock)."""
        if not self._out:
            self._out_since = time.monotonic()
        self._out.append(bytes(data))
        self._out_len += len(data)

    def _pending(self):
        """Decrypted bytes TLS holds for us."""
        with self._lock:
            return self.sock.pending()

    def _reading_paused(self):
        """Whether we stop reading: the peer does not read its responses
        (backpressure: its further requests wait in the kernel's buffers,
        not in ours, and do not run)."""
        paused = self._out_len > READ_PAUSE and self.state != self.CLOSING
        if paused != self._paused:
            self._paused = paused
            if paused:
                log.debug("%s has %d bytes of responses pending: not "
                          "reading its requests until it reads them",
                          self.peer, self._out_len)
            elif self.tls and self._pending():
                self.server.again(self)
        return paused

    def _finish_close(self):
        """Everything was written: close, or half-close and linger.

        Closing a socket whose receive queue holds unread bytes makes the
        kernel send RST, and the peer may lose our ERROR frame; so after an
        error we shut down our side and read until the peer closes (or
        LINGER seconds).
        """
        if not self._linger:
            self.close()
            return
        try:
            with self._lock:
                if self.tls:
                    try:
                        self.sock.unwrap()
                    except (ssl.SSLError, OSError, ValueError):
                        pass        # close_notify is best effort
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.tls = False
        self._linger_until = time.monotonic() + LINGER
        # A deadline set, maybe from update() after this round's
        # check_deadlines: the loop must learn it (``Server._expire``).
        self.server.touch(self)

    def _on_frame(self, frame):
        command = frame.command
        if command in (stompframe.CONNECT, stompframe.STOMP) and \
                not self._connect_seen:
            self._connect(frame)
            return
        if self.state == self.WAIT_CONNECT:
            # A frame before CONNECT is served like any other, as vdsm's
            # server does (yajsonrpc/stompserver.py: StompAdapterImpl.
            # handle_frame dispatches every command whatever came first):
            # ovirt-engine's plain TCP client (vdsm-jsonrpc-java) sends its
            # SUBSCRIBE before its CONNECT on about half of its new
            # connections.  Until CONNECT arrives the session has vdsm's
            # defaults: no heart-beats either way.
            log.debug("%s sent %s before CONNECT", self.peer, command)
            self.state = self.CONNECTED
        receipt = frame.headers.get("receipt")
        handler = self._HANDLERS.get(command)
        if command in (stompframe.CONNECT, stompframe.STOMP):
            self.fail("already connected: {} sent twice".format(command),
                      receipt)
            return
        if handler is None:
            self.fail("{} is not supported by this server (no "
                      "transactions)".format(command), receipt)
            return
        try:
            handler(self, frame)
        except stompframe.FrameError as e:
            self.fail(str(e), receipt)
            return
        if receipt is not None and command != stompframe.DISCONNECT:
            self.send(stompframe.encode(stompframe.RECEIPT,
                                        {"receipt-id": receipt}))

    def _connect(self, frame):
        versions = frame.headers.get("accept-version")
        if versions is None:
            self.fail("missing accept-version header: this server speaks "
                      "STOMP 1.2 only")
            return
        if "1.2" not in [v.strip() for v in versions.split(",")]:
            self.fail("unsupported STOMP version {!r}: this server speaks "
                      "1.2 only".format(versions))
            return
        try:
            cx, cy = stompframe.parse_heartbeat(frame.headers.get(
                "heart-beat"))
        except stompframe.FrameError as e:
            self.fail(str(e))
            return
        # We send every max(sx, cy) ms; we expect the client's every cx ms
        # if it offers them (sy = cx accepts the offer).
        sx = max(cy, MIN_HEARTBEAT) if cy else 0
        sy = cx
        self.send_interval = sx / 1000.0 * HEARTBEAT_EARLY
        self.recv_timeout = sy / 1000.0 * HEARTBEAT_GRACE
        self.state = self.CONNECTED
        self._connect_seen = True
        self.last_recv = time.monotonic()
        self.send(stompframe.encode(stompframe.CONNECTED, {
            "version": "1.2",
            "heart-beat": "{},{}".format(sx, sy),
            "server": "vdsm-managedvolume/{}".format(__version__),
        }))
        log.debug("STOMP session with %s (heart-beat %s,%s)", self.peer,
                  sx, sy)

    def _on_subscribe(self, frame):
        destination = _required(frame, "destination")
        sub_id = _required(frame, "id")
        ack = frame.headers.get("ack", "auto")
        if ack not in ("auto", "client", "client-individual"):
            raise stompframe.FrameError(
                "invalid ack mode {!r} (auto, client or client-individual)"
                .format(ack))
        if sub_id in self.subscriptions:
            raise stompframe.FrameError(
                "subscription id {!r} is already in use".format(sub_id))
        self.subscriptions[sub_id] = destination
        log.debug("%s subscribed to %s as %s", self.peer, destination,
                  sub_id)

    def _on_unsubscribe(self, frame):
        sub_id = _required(frame, "id")
        if self.subscriptions.pop(sub_id, None) is None:
            # Ignored, as vdsm does (yajsonrpc/stompserver.py:
            # StompAdapterImpl._cmd_unsubscribe); ovirt-engine's client
            # sends such UNSUBSCRIBEs while it closes.
            log.debug("%s unsubscribed unknown id %r", self.peer, sub_id)

    def _on_ack(self, frame):
        _required(frame, "id")

    def _on_send(self, frame):
        destination = _required(frame, "destination")
        reply_to = frame.headers.get("reply-to")
        flow_id = logmod.clean_flow_id(
            frame.headers.get("ovirtCorrelationId"))
        if destination == REQUESTS or destination.startswith(REQUESTS + "."):
            self.server.submit(self, frame.body, reply_to, flow_id)
            return
        if not self.server.publish(self, destination, frame):
            raise stompframe.FrameError(
                "unknown destination {!r}: requests go to {}".format(
                    destination, REQUESTS))

    def _on_disconnect(self, frame):
        receipt = frame.headers.get("receipt")
        if receipt is not None:
            self.send(stompframe.encode(stompframe.RECEIPT,
                                        {"receipt-id": receipt}))
        log.debug("%s disconnected", self.peer)
        self.close_after_flush()

    _HANDLERS = {
        stompframe.SEND: _on_send,
        stompframe.SUBSCRIBE: _on_subscribe,
        stompframe.UNSUBSCRIBE: _on_unsubscribe,
        stompframe.DISCONNECT: _on_disconnect,
        # Every message is delivered once and needs no acknowledgement;
        # a client acknowledging anyway is not wrong.
        stompframe.ACK: _on_ack,
        stompframe.NACK: _on_ack,
    }


def format_address(addr):
    """``host:port``, ``[v6]:port``, or a unix socket's path."""
    if isinstance(addr, tuple):
        host, port = addr[:2]
        if ":" in host:
            return "[{}]:{}".format(host, port)
        return "{}:{}".format(host, port)
    return str(addr) or "unix"


# Private helpers

def _message(target, sub_id, headers, body):
    """The MESSAGE frame delivering ``body`` (with ``headers``) to the
    subscription ``sub_id`` of the connection ``target``."""
    headers = dict(headers)
    headers["subscription"] = sub_id
    headers["message-id"] = target.next_message_id()
    return stompframe.encode(stompframe.MESSAGE, headers, body)


def _response(target, sub_id, destination, response):
    """The MESSAGE frame of a JSON-RPC response sent to ``destination``."""
    return stompframe.json_message(destination, sub_id,
                                   target.next_message_id(), response)


def _required(frame, name):
    value = frame.headers.get(name)
    if value is None:
        raise stompframe.FrameError("{} needs a {} header".format(
            frame.command, name))
    return value
