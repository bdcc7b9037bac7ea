"""Helpers for the wire tests: a raw STOMP peer, a stub dispatcher, a
running in-process server (with the agent's control socket), a call held
in a thread (``Held``), bench/'s shared helpers (``bench_module``).  (Not a
fixtures file: the wire tests import what they need.)"""

import contextlib
import importlib.util
import json
import logging
import os
import socket
import ssl
import threading
import time

from vdsm_managedvolume import agent
from vdsm_managedvolume import config
from vdsm_managedvolume import jsonrpc
from vdsm_managedvolume import log as logmod
from vdsm_managedvolume import pki
from vdsm_managedvolume import stompframe
from vdsm_managedvolume import stompserver

from . import fakebrick
from .host_fixtures import iscsi_connection, new_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The bytes vdsm-client sends (docs/dependencies.md, "vdsm's wire").
VDSM_CONNECT = b"CONNECT\naccept-version:1.2\nheart-beat:0,24000\n\n\0"


def subscribe_bytes(destination, sub_id):
    return ("SUBSCRIBE\ndestination:{}\nack:auto\nid:{}\n\n\0"
            .format(destination, sub_id)).encode()


def send_bytes(body, reply_to, flow_id=None,
               destination="jms.topic.vdsm_requests"):
    if isinstance(body, str):
        body = body.encode()
    head = ("SEND\ndestination:{}\ncontent-type:application/json\n"
            "reply-to:{}\n".format(destination, reply_to))
    if flow_id:
        head += "ovirtCorrelationId:{}\n".format(flow_id)
    head += "content-length:{}\n\n".format(len(body))
    return head.encode() + body + b"\0"


def request(method, params=None, request_id="req-1"):
    return json.dumps([{"jsonrpc": "2.0", "method": method,
                        "params": params or {}, "id": request_id}])


class Raw:
    """A STOMP peer on a plain or TLS socket, sending whatever it is told.
    """

    def __init__(self, address, ssl_context=None, timeout=10):
        sock = socket.create_connection(address, timeout=timeout)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.parser = stompframe.Parser(
            max_frame=64 * 1024 * 1024, commands=stompframe.SERVER_COMMANDS)
        self.frames = []
        self.timeout = timeout

    def send(self, data):
        self.sock.sendall(data)

    def frame(self, timeout=None):
        """The next frame; None on EOF."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame within {}s".format(
                    timeout or self.timeout))
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.frames.extend(self.parser.feed(data))
        return self.frames.pop(0)

    def eof(self, timeout=None):
        """Read until EOF, return the frames seen before it."""
        seen = []
        while True:
            frame = self.frame(timeout)
            if frame is None:
                return seen
            seen.append(frame)

    def connect(self, heartbeat="0,24000"):
        self.send("CONNECT\naccept-version:1.2\nheart-beat:{}\n\n\0"
                  .format(heartbeat).encode())
        frame = self.frame()
        assert frame.command == "CONNECTED", frame
        return frame

    def subscribe(self, destination="reply-queue", sub_id="sub-1"):
        self.send(subscribe_bytes(destination, sub_id))

    def call(self, body, reply_to="reply-queue", flow_id=None):
        self.send(send_bytes(body, reply_to, flow_id))
        frame = self.frame()
        assert frame.command == "MESSAGE", frame
        return frame, json.loads(frame.body)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TlsRecords:
    """A TLS client that sees record boundaries: it feeds its TLS object
    one record at a time, so ``record()`` returns the plaintext of exactly
    one application-data record as the server wrote it (records that
    carry no data, such as TLS 1.3 session tickets, are skipped)."""

    def __init__(self, address, ssl_context, timeout=10):
        self.sock = socket.create_connection(address, timeout=timeout)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = ssl_context.wrap_bio(self._in, self._out,
                                        server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._push()
                self._in.write(self._raw_record())
        self._push()

    def send(self, data):
        self.tls.write(data)
        self._push()

    def record(self):
        """The plaintext of the next application-data record (b"" on
        close)."""
        while True:
            raw = self._raw_record()
            if not raw:
                return b""
            self._in.write(raw)
            try:
                data = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                self._push()
                continue        # a record without data (e.g. a ticket)
            except ssl.SSLZeroReturnError:
                return b""
            self._push()
            return data

    def frames(self, count):
        """The next ``count`` frames, one list per record read:
        [(record_plaintext, [frames parsed from it alone])]."""
        seen = []
        total = 0
        while total < count:
            data = self.record()
            if not data:
                raise EOFError("closed after {} frames".format(total))
            parser = stompframe.Parser(commands=stompframe.SERVER_COMMANDS)
            frames = parser.feed(data)
            assert parser.buffered == 0, (
                "a record ends inside a frame: {!r}".format(data[:200]))
            seen.append((data, frames))
            total += len(frames)
        return seen

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _push(self):
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _raw_record(self):
        header = self._exactly(5)
        if not header:
            return b""
        length = int.from_bytes(header[3:5], "big")
        return header + self._exactly(length)

    def _exactly(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                if data:
                    raise EOFError("TLS record cut short")
                return b""
            data += chunk
        return data


class StubDispatcher:
    """Answers like jsonrpc.Dispatcher, without a service.

    Methods: ``echo`` returns its params and the flow id; ``big`` returns
    params["size"] bytes; ``sleep`` sleeps
    params["seconds"]; ``wait`` blocks until ``release`` is set; ``fail``
    returns error params["code"]; ``boom`` raises; a body that is not JSON
    gets a parse error with id null.
    """

    # Refusals (933) and the routing of unknown-id errors are the real
    # dispatcher's.
    refuse = staticmethod(jsonrpc.refuse)
    is_unknown_id_error = staticmethod(jsonrpc.is_unknown_id_error)

    def __init__(self):
        self.bodies = []
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.log = logging.getLogger("tests.stub")

    def handle(self, body, flow_id=None):
        self.bodies.append(body)
        self.log.info("handling %d bytes", len(body))
        try:
            message = json.loads(body)
        except ValueError as e:
            return _encode({"jsonrpc": "2.0", "id": None, "error": {
                "code": -32700, "message": "Parse error: {}".format(e)}})
        req = message[0] if isinstance(message, list) else message
        method = req.get("method")
        params = req.get("params") or {}
        if method == "echo":
            result = {"params": params, "flow": logmod.current_flow(),
                      "flow_arg": flow_id}
        elif method == "big":
            result = "x" * params["size"]
        elif method == "sleep":
            time.sleep(params["seconds"])
            result = True
        elif method == "wait":
            self.started.release()
            self.release.wait(30)
            result = True
        elif method == "fail":
            return _encode({"jsonrpc": "2.0", "id": req.get("id"), "error": {
                "code": params["code"], "message": params["message"]}})
        elif method == "boom":
            raise RuntimeError("stub exploded")
        else:
            return _encode({"jsonrpc": "2.0", "id": req.get("id"), "error": {
                "code": -32601, "message": "Method not found: " + method}})
        if "id" not in req:
            return None
        return _encode({"jsonrpc": "2.0", "id": req["id"], "result": result})


def make_config(state_dir, **overrides):
    cfg = config.Config()
    config.with_state_dir(cfg, str(state_dir))
    cfg.listen = "127.0.0.1"
    cfg.port = 0
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


class Running:
    """An in-process server serving in a thread, wired as the agent
    process wires it: the port bound by ``agent.bind``, the control socket
    (when ``connector_info`` is given) served in its loop."""

    def __init__(self, cfg, dispatcher, tls=False, connector_info=None):
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.tls = tls
        if tls:
            pki.ensure_dev_pki(cfg)
            ctx = pki.server_context(cfg)
            self.client_context = pki.dev_client_context(cfg)
        else:
            ctx = None
            self.client_context = None
        self.server = stompserver.Server(cfg, dispatcher, ctx)
        self.address = self.server.listen(agent.bind(cfg.listen, cfg.port))
        if connector_info is not None:
            agent.ControlSocket(cfg.socket_path,
                                connector_info).serve_in(self.server)
        self._thread = threading.Thread(target=self.server.serve,
                                        name="server-io", daemon=True)
        self._thread.start()

    def raw(self, **kw):
        return Raw(self.address, self.client_context, **kw)

    def stop(self, timeout=30):
        """Stop as the agent does on SIGTERM: ``shutdown()``, then wait
        for the drain to end ``serve()``."""
        self.server.shutdown()
        self._thread.join(timeout)


def _encode(obj):
    return json.dumps(obj).encode()


def wait_for(predicate, timeout=60):
    """Poll ``predicate`` until true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within {}s".format(
                timeout))
        time.sleep(0.05)


class Held:
    """``fn(*args)`` in a thread of its own (a daemon: a call the test
    holds at the fake array, or one a stop cuts, never keeps pytest
    alive): ``result`` or ``error`` (the exception) once it ended."""

    def __init__(self, fn, *args):
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, args),
                                       daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except Exception as e:
            self.error = e

    def join(self, timeout):
        """Wait ``timeout`` seconds at most for the end; self."""
        self.thread.join(timeout)
        return self


def bench_module(name):
    """``bench/<name>.py`` as a module of its own (``bench_<name>``, not
    in sys.modules): for what the benchmarks and the tests share, from a
    script that imports none of its neighbours (benchutil)."""
    spec = importlib.util.spec_from_file_location(
        "bench_" + name, os.path.join(REPO, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocked_attaches(run, service, release, count, timeout=60):
    """Start ``count`` attaches over ``run``'s wire, each held in the fake
    connector until ``release`` exists; return {fake key: (vol_id, its
    client)} once all are inside the connector."""
    volumes = {}
    for _ in range(count):
        vol_id = new_id()
        ci = iscsi_connection(service.cfg, fake_wait=release)
        client = run.raw(timeout=timeout)
        client.connect()
        client.subscribe()
        client.send(send_bytes(request(
            "ManagedVolume.attach_volume",
            {"vol_id": vol_id, "connection_info": ci},
            request_id=vol_id), "reply-queue"))
        volumes[ci["data"]["fake_key"]] = (vol_id, client)
    started = {"connect-start " + key for key in volumes}
    wait_for(lambda: started <= set(fakebrick.calls()))
    return volumes


class ConnectionOwner:
    """What a stompserver.Connection needs of its server, for driving one
    by hand: a configuration and the callbacks, which do nothing."""

    def __init__(self, cfg):
        self.cfg = cfg

    def forget(self, conn):
        pass

    def touch(self, conn):
        pass

    def watch(self, conn, events):
        pass

    def again(self, conn):
        pass

    def proven(self, conn):
        pass


@contextlib.contextmanager
def held_elsewhere(lock):
    """Hold ``lock`` in another thread for the block (a commit in
    progress, a connection being written by another thread)."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        thread.join(30)
