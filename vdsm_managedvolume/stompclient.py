"""A JSON-RPC over STOMP client that sends exactly what vdsm-client sends.

Used by ``managedvolume-client``, the tests and the benchmarks.  The bytes
on the wire are vdsm's (docs/dependencies.md, "vdsm's wire")::

    CONNECT      accept-version:1.2, heart-beat:0,24000
    SUBSCRIBE    destination:<uuid>, ack:auto, id:<uuid>
    SEND         destination:jms.topic.vdsm_requests,
                 content-type:application/json, reply-to:<uuid>,
                 [ovirtCorrelationId:<flow id>], content-length
                 body: a JSON *array* holding one request

``call()`` returns the result, or raises the ``errors.Error`` subclass of
the server's code carrying the server's message, so that
``except errors.AlreadyAttached`` works across the wire.  One call at a time
per client (a lock serializes callers); open several clients to run calls
concurrently.
"""

import json
import socket
import threading
import time
import uuid

from . import errors
from . import stompframe

REQUESTS = "jms.topic.vdsm_requests"
DEFAULT_HEARTBEAT = (0, 24000)

# Server codes -> our classes; anything else becomes a plain errors.Error.
_ERRORS = {cls.code: cls for cls in (
    errors.ParseError, errors.InvalidRequest, errors.MethodNotFound,
    errors.InvalidParams, errors.InternalError, errors.NotSupported,
    errors.HelperFailed, errors.AlreadyAttached, errors.UnsupportedDevice,
    errors.ConnectionMismatch, errors.UnsupportedDriverType,
    errors.HelperTimeout, errors.VolumeBusy, errors.AgentBusy,
    errors.UnknownAdapter, errors.StoreError)}


class ClientError(errors.Error):
    """The connection failed or the server sent a STOMP ERROR frame."""

    code = 100
    msg = "{self.reason}"


class Timeout(ClientError):
    msg = "No response within {self.timeout} seconds"


def remote_error(code, message):
    """Return the ``errors.Error`` for a JSON-RPC error from the server.

    The instance is of the class registered for ``code`` (so callers can
    catch meaning) but its text is the server's message, verbatim.
    """
    cls = _ERRORS.get(code, errors.Error)
    err = cls.__new__(cls)
    err.reason = message
    err.msg = "{self.reason}"
    err.code = code
    Exception.__init__(err, message)
    return err


class Client:
    """A connected, subscribed STOMP session (see module docstring)."""

    def __init__(self, host="localhost", port=54321, ssl_context=None,
                 timeout=60, heartbeat=DEFAULT_HEARTBEAT,
                 max_frame=64 * 1024 * 1024):
        self.host = host
        self.port = port
        self.timeout = timeout
        self._lock = threading.Lock()
        self._parser = stompframe.Parser(
            max_frame=max_frame, commands=stompframe.SERVER_COMMANDS)
        self._frames = []
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        try:
            self.connected = self._connect(heartbeat)
            self.reply_to = str(uuid.uuid4())
            self.subscription = str(uuid.uuid4())
            self._send(stompframe.SUBSCRIBE, {
                "destination": self.reply_to, "ack": "auto",
                "id": self.subscription})
        except BaseException:
            self._sock.close()
            raise

    def call(self, method, params=None, flow_id=None):
        """Call ``method`` and return its result (raises errors.Error)."""
        request_id = str(uuid.uuid4())
        request = {"jsonrpc": "2.0", "method": method,
                   "params": params if params is not None else {},
                   "id": request_id}
        # allow_nan=False: a non-finite float raises here, not as a
        # -32700 from the agent naming a word the caller never wrote.
        body = json.dumps([request], allow_nan=False).encode("utf-8")
        headers = {"destination": REQUESTS,
                   "content-type": "application/json",
                   "reply-to": self.reply_to}
        if flow_id:
            headers["ovirtCorrelationId"] = flow_id
        with self._lock:
            self._send(stompframe.SEND, headers, body)
            response = self._wait_response(request_id)
        if "error" in response:
            error = response["error"] or {}
            raise remote_error(error.get("code"), error.get("message", ""))
        return response.get("result")

    def close(self):
        """DISCONNECT with a receipt, wait briefly for it, close."""
        if self._sock is None:
            return
        try:
            with self._lock:
                receipt = str(uuid.uuid4())
                self._send(stompframe.DISCONNECT, {"receipt": receipt})
                self._sock.settimeout(min(self.timeout, 5))
                deadline = time.monotonic() + min(self.timeout, 5)
                while time.monotonic() < deadline:
                    frame = self._recv_frame(deadline)
                    if frame is None or (
                            frame.command == stompframe.RECEIPT and
                            frame.headers.get("receipt-id") == receipt):
                        break
        except (OSError, errors.Error):
            pass
        finally:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Private helpers

    def _connect(self, heartbeat):
        self._send(stompframe.CONNECT, {
            "accept-version": "1.2",
            "heart-beat": "{},{}".format(*heartbeat)})
        frame = self._recv_frame(time.monotonic() + self.timeout)
        if frame is None:
            raise ClientError("connection closed before CONNECTED")
        if frame.command == stompframe.ERROR:
            raise self._stomp_error(frame)
        if frame.command != stompframe.CONNECTED:
            raise ClientError("expected CONNECTED, got {}".format(
                frame.command))
        return frame

    def _send(self, command, headers, body=b""):
        self._sock.sendall(stompframe.encode(command, headers, body))

    def _wait_response(self, request_id):
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self._recv_frame(deadline)
            if frame is None:
                raise ClientError("connection closed by the server")
            if frame.command == stompframe.ERROR:
                raise self._stomp_error(frame)
            if frame.command != stompframe.MESSAGE:
                continue
            try:
                message = json.loads(frame.body)
            except ValueError as e:
                raise ClientError("invalid JSON response: {}".format(e))
            for response in (message if isinstance(message, list)
                             else [message]):
                if isinstance(response, dict) and (
                        response.get("id") == request_id or
                        (response.get("id") is None and
                         "error" in response)):
                    return response

    def _recv_frame(self, deadline):
        """The next frame (heart-beats skipped), None on EOF."""
        while not self._frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(timeout=self.timeout)
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                raise Timeout(timeout=self.timeout)
            if not data:
                return None
            self._frames.extend(self._parser.feed(data))
        return self._frames.pop(0)

    def _stomp_error(self, frame):
        text = frame.headers.get("message", "")
        body = frame.body.decode("utf-8", "replace").strip()
        if body and body != text:
            text += ": " + body
        return ClientError("STOMP ERROR: {}".format(text))
