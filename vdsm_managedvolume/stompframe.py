r"""STOMP 1.2 frames: a small, strict codec for the agent and its client.

vdsm speaks JSON-RPC inside STOMP 1.2 frames (docs/dependencies.md).  No
maintained Python STOMP *server* library exists, so this module is the whole
wire format, written from the specification
(https://stomp.github.io/stomp-specification-1.2.html)::

    frame   = command EOL *( header EOL ) EOL *OCTET NUL *( EOL )
    EOL     = [CR] LF
    header  = name ":" value            (first occurrence of a name wins)

    CONNECT\r\n                 <- command; CR before LF is tolerated
    accept-version:1.2\n         <- headers: taken literally in CONNECT and
    heart-beat:0,24000\n            CONNECTED, elsewhere unescaped:
    \n                              \c -> ":"   \n -> LF   \r -> CR
    <body>\0                        \\ -> "\"  (any other escape: error)
    \n\n                         <- EOLs between frames are heart-beats

The body ends at the first NUL, unless ``content-length`` says how many
octets it has: then it may hold NULs, and the octet after it must be NUL.

``Parser`` is incremental: feed it whatever ``recv()`` returned and it hands
back complete frames; it keeps its place, so a large frame arriving in many
pieces is scanned once.  It enforces a maximum frame size *before* buffering
the frame (a peer announcing ``content-length:10G`` is refused at once), and
every malformation raises ``FrameError`` naming what is wrong: the agent
sends that text in an ERROR frame and closes the connection, as the
specification asks.

``encode()`` is the other direction; it escapes header values (except in
CONNECT and CONNECTED) and adds ``content-length`` to every frame that has a
body.
"""

from . import errors

# Client commands (what a server accepts).
CONNECT = "CONNECT"
STOMP = "STOMP"
SEND = "SEND"
SUBSCRIBE = "SUBSCRIBE"
UNSUBSCRIBE = "UNSUBSCRIBE"
ACK = "ACK"
NACK = "NACK"
BEGIN = "BEGIN"
COMMIT = "COMMIT"
ABORT = "ABORT"
DISCONNECT = "DISCONNECT"

# Server commands (what a client accepts).
CONNECTED = "CONNECTED"
MESSAGE = "MESSAGE"
RECEIPT = "RECEIPT"
ERROR = "ERROR"

CLIENT_COMMANDS = frozenset((CONNECT, STOMP, SEND, SUBSCRIBE, UNSUBSCRIBE,
                             ACK, NACK, BEGIN, COMMIT, ABORT, DISCONNECT))
SERVER_COMMANDS = frozenset((CONNECTED, MESSAGE, RECEIPT, ERROR))

# Only these frames may carry a body (specification, "Frames and Headers").
BODY_COMMANDS = frozenset((SEND, MESSAGE, ERROR))

# CONNECT and CONNECTED headers are never escaped, for 1.0 compatibility.
LITERAL_COMMANDS = frozenset((CONNECT, STOMP, CONNECTED))

HEARTBEAT = b"\n"

DEFAULT_MAX_FRAME = 1024 * 1024
MAX_HEADERS = 128

_ESCAPES = {ord("c"): ":", ord("n"): "\n", ord("r"): "\r", ord("\\"): "\\"}
_ESCAPE_TABLE = str.maketrans({"\\": "\\\\", ":": "\\c", "\n": "\\n",
                               "\r": "\\r"})


class FrameError(errors.Error):
    """The peer sent bytes that are not a valid STOMP 1.2 frame.

    Local to the wire layer: it becomes an ERROR frame, never a JSON-RPC
    error.
    """

    code = 100
    msg = "{self.reason}"


class Frame:
    """One STOMP frame: a command, ordered headers and a body (bytes)."""

    __slots__ = ("command", "headers", "body")

    def __init__(self, command, headers=None, body=b""):
        self.command = command
        self.headers = dict(headers or {})
        self.body = body

    def encode(self):
        return encode(self.command, self.headers, self.body)

    def __eq__(self, other):
        return (isinstance(other, Frame) and
                (self.command, self.headers, self.body) ==
                (other.command, other.headers, other.body))

    def __repr__(self):
        return "Frame({!r}, {!r}, <{} bytes>)".format(
            self.command, self.headers, len(self.body))


def encode(command, headers=None, body=b""):
    """Return the bytes of one frame.

    ``headers`` is a mapping (order kept); values are converted with str().
    A ``content-length`` header is set from the body whenever the body is
    not empty, replacing any given one, so the body may hold NULs.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    head = _head(command, headers, len(body))
    return b"".join((head.encode("utf-8"), body, b"\0"))     # body copied once


def json_message(destination, subscription, message_id, body):
    """The bytes of ``encode(MESSAGE, {"destination": destination,
    "content-type": "application/json", "subscription": subscription,
    "message-id": message_id}, body)``, the frame of every JSON-RPC
    response: ``_JSON_MESSAGE`` filled in."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not body:
        return encode(MESSAGE, {"destination": destination,
                                "content-type": "application/json",
                                "subscription": subscription,
                                "message-id": message_id}, body)
    head = _JSON_MESSAGE % (_escape(str(destination)),
                            _escape(str(subscription)),
                            _escape(str(message_id)), len(body))
    return b"".join((head.encode("utf-8"), body, b"\0"))


def parse_heartbeat(value):
    """Parse a ``heart-beat`` header: ``"cx,cy"`` -> (cx, cy) milliseconds.

    A missing header (None) means ``0,0``.
    """
    if value is None:
        return 0, 0
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise FrameError("invalid heart-beat header {!r}: expected two "
                         "non-negative integers 'cx,cy'".format(value))
    return int(parts[0]), int(parts[1])


class Parser:
    """Incremental STOMP 1.2 parser.

    ``feed(data)`` returns the list of frames completed by ``data`` (maybe
    empty).  ``heartbeats`` counts the EOLs seen between frames.  After a
    ``FrameError`` the parser is unusable: the connection must be closed.

    commands: the accepted commands (None: any upper-case word); a server
        passes ``CLIENT_COMMANDS``, a client ``SERVER_COMMANDS``.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME, commands=None):
        self.max_frame = max_frame
        self.commands = commands
        self.heartbeats = 0
        self._buf = bytearray()
        self._scan = 0          # where to resume looking for the header end
        self._head = None       # (command, headers, body_start, length)
        self._failed = None

    def feed(self, data):
        if self._failed is not None:
            raise FrameError("parser failed earlier: {}".format(self._failed))
        self._buf += data
        frames = []
        try:
            while True:
                frame = self._next()
                if frame is None:
                    break
                frames.append(frame)
        except FrameError as e:
            self._failed = e.reason
            raise
        return frames

    @property
    def buffered(self):
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    # Private helpers

    def _next(self):
        buf = self._buf
        if self._head is None:
            self._skip_heartbeats()
            if not buf:
                return None
            end = self._find_header_end()
            if end is None:
                if len(buf) > self.max_frame:
                    raise self._too_large(len(buf))
                return None
            head_len, body_start = end
            self._head = self._parse_head(bytes(buf[:head_len]), body_start)
        command, headers, body_start, length = self._head
        if length is not None:
            end = body_start + length
            if len(buf) <= end:
                return None
            if buf[end] != 0:
                raise FrameError(
                    "frame body is longer than its content-length {} (the "
                    "octet after it must be NUL)".format(length))
            body = bytes(buf[body_start:end])
        else:
            end = buf.find(b"\0", body_start)
            if end == -1:
                if len(buf) > self.max_frame:
                    raise self._too_large(len(buf))
                return None
            if end + 1 > self.max_frame:
                raise self._too_large(end + 1)
            body = bytes(buf[body_start:end])
        del buf[:end + 1]
        self._head = None
        self._scan = 0
        if body and command not in BODY_COMMANDS:
            raise FrameError("{} frame must not have a body".format(command))
        return Frame(command, headers, body)

    def _skip_heartbeats(self):
        buf = self._buf
        i = 0
        n = len(buf)
        while i < n:
            if buf[i] == 0x0A:
                self.heartbeats += 1
                i += 1
            elif buf[i] == 0x0D:
                if i + 1 == n:
                    break           # wait: CR must be followed by LF
                if buf[i + 1] != 0x0A:
                    raise FrameError("CR not followed by LF before a frame")
                self.heartbeats += 1
                i += 2
            else:
                break
        if i:
            del buf[:i]

    def _find_header_end(self):
        """Return (head_len, body_start) once the empty line is buffered.

        The head is the command and header lines without the empty line.
        """
        buf = self._buf
        pos = self._scan
        # The first LF followed by an empty line ("\n" or "\r\n"): two
        # searches in C, not a Python step per header line.
        lf = buf.find(b"\n\n", pos)
        crlf = buf.find(b"\n\r\n", pos, len(buf) if lf == -1 else lf + 2)
        if crlf != -1:
            return crlf, crlf + 3
        if lf != -1:
            return lf, lf + 2
        # Not yet: an end begun in the last 2 bytes is found next time.
        self._scan = max(pos, len(buf) - 2)
        return None

    def _parse_head(self, head, body_start):
        if body_start > self.max_frame:
            raise self._too_large(body_start)
        parsed = self._parse_plain_head(head)
        if parsed is None:
            command, headers = self._parse_any_head(head)
        else:
            command, headers = parsed
        length = None
        if "content-length" in headers:
            value = headers["content-length"]
            if not value.isdigit() or not value.isascii():
                raise FrameError("invalid content-length {!r}".format(
                    value[:40]))
            length = int(value)
            if body_start + length + 1 > self.max_frame:
                raise self._too_large(body_start + length + 1)
        return command, headers, body_start, length

    def _parse_plain_head(self, head):
        """(command, headers) of a head needing no care (UTF-8, no escape,
        no NUL, no CR but before LF: every frame a client of ours sends),
        in a few passes over the whole head; None for any other head,
        which ``_parse_any_head`` parses (or names what is wrong with it).
        """
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\\" in text or "\0" in text:
            return None
        if "\r" in text:
            text = text.replace("\r\n", "\n")
            if text.endswith("\r"):
                text = text[:-1]
            if "\r" in text:
                return None
        lines = text.split("\n")
        if len(lines) - 1 > MAX_HEADERS:
            return None
        command = lines[0]
        if not (command.isascii() and command.isalpha() and
                command.isupper()) or (self.commands is not None and
                                       command not in self.commands):
            return None
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name:
                return None
            headers.setdefault(name, value)
        return command, headers

    def _parse_any_head(self, head):
        lines = head.split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line
                 for line in lines]
        command = self._parse_command(lines[0])
        if len(lines) - 1 > MAX_HEADERS:
            raise FrameError("too many headers ({}; at most {})".format(
                len(lines) - 1, MAX_HEADERS))
        literal = command in LITERAL_COMMANDS
        headers = {}
        for raw in lines[1:]:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError("header {!r} is not UTF-8".format(raw[:80]))
            if "\r" in line:
                raise FrameError("header {!r} holds a bare CR".format(
                    line[:80]))
            if "\0" in line:
                # NUL ends a frame: in a header it can only be an attempt
                # to smuggle one (and it would reach log lines).
                raise FrameError("header {!r} holds a NUL".format(
                    line[:80]))
            name, sep, value = line.partition(":")
            if not sep:
                raise FrameError("header line {!r} has no ':'".format(
                    line[:80]))
            if not literal:
                name, value = _unescape(name), _unescape(value)
            if not name:
                raise FrameError("header line {!r} has an empty name"
                                 .format(line[:80]))
            # "If a client or a server receives repeated frame header
            # entries, only the first header entry SHOULD be used."
            headers.setdefault(name, value)
        return command, headers

    def _parse_command(self, raw):
        try:
            command = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FrameError("invalid command {!r}".format(raw[:40]))
        if not command.isalpha() or not command.isupper():
            raise FrameError("invalid command {!r}".format(command[:40]))
        if self.commands is not None and command not in self.commands:
            raise FrameError("unknown command {!r}".format(command[:40]))
        return command

    def _too_large(self, size):
        return FrameError("frame too large: more than {} bytes (at least {})"
                          .format(self.max_frame, size))


def _head(command, headers, length):
    """The head of a frame (``encode``): the command, a ``name:value``
    line for each header (escaped, but in CONNECT and CONNECTED), a
    ``content-length`` line last when the body has a ``length``, and the
    blank line before the body."""
    literal = command in LITERAL_COMMANDS
    lines = [command]
    for name, value in (headers or {}).items():
        if name == "content-length":
            continue
        name, value = str(name), str(value)
        if literal:
            if any(c in s for s in (name, value) for c in "\r\n") or \
                    ":" in name:
                raise ValueError("header {!r} cannot be sent in {} "
                                 "(no escaping there)".format(name, command))
        else:
            name = _escape(name)
            value = _escape(value)
        lines.append(name + ":" + value)
    if length:
        lines.append("content-length:" + str(length))
    lines.append("\n")
    return "\n".join(lines)


def _escape(text):
    # Most values (ids, destinations, numbers) hold nothing to escape:
    # four searches cost less than a translate() walking every character.
    if "\\" in text or ":" in text or "\n" in text or "\r" in text:
        return text.translate(_ESCAPE_TABLE)
    return text


def _unescape(s):
    if "\\" not in s:
        return s
    out = []
    it = iter(s)
    for c in it:
        if c != "\\":
            out.append(c)
            continue
        nxt = next(it, None)
        if nxt is None or ord(nxt) not in _ESCAPES:
            raise FrameError("undefined escape sequence {!r} in header "
                             "{!r}".format("\\" + (nxt or ""), s[:80]))
        out.append(_ESCAPES[ord(nxt)])
    return "".join(out)


# The head of every JSON-RPC response, made by ``_head`` with a %-slot for
# each value that changes (escaped by json_message); the length's slot
# stands for the body a response always has.
_JSON_MESSAGE = _head(MESSAGE, {"destination": "%s",
                                "content-type": "application/json",
                                "subscription": "%s",
                                "message-id": "%s"}, "%d")
