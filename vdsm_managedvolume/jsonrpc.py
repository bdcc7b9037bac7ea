"""JSON-RPC 2.0 dispatch, the way vdsm answers it.

One message in (the body of a STOMP SEND), at most one message out::

    {request}                    -> {response}
    [{request}]                  -> {response}    vdsm's Python client sends
                                                  a one-element array and
                                                  expects a single object
    [{r1}, {r2}, ...]            -> [{resp1}, {resp2}, ...]   a true batch
    {notification} (no "id")     -> nothing
    []  / 42 / "x"               -> {"error": -32600, "id": null}
    not JSON                     -> {"error": -32700, "id": null}

A response carries ``result`` (a null result is sent as ``true``, as vdsm
does) or ``error: {"code": N, "message": "..."}`` - never a ``data``
member, never a traceback.  Codes: -32700 parse error, -32600 invalid
request, -32601 method not found, -32602 invalid params (the message names
the parameter), -32603 internal error, and ours (925-935, see errors.py
and the schema).

The verbs are looked up in the schema (``schema.py``), their params bound
and type-checked there (positional in schema order or named, defaults
filled), and then called through the vdsm-convention API classes
(``api.py``) - the same path vdsm takes - which turn service errors into
status codes and mask secrets in results.  Every call is logged with the
flow id of the request (``log.flow``); params are masked in the log.
"""

import json
import logging
import math
import re
import time

from . import api
from . import errors
from . import jsontext
from . import log as logmod
from . import mask
from . import schema as schema_module

log = logging.getLogger("managedvolume.jsonrpc")

VERSION = "2.0"

# How deeply a whole message may nest: a batch array, a request, its
# params and schema.MAX_PARAM_DEPTH levels inside one param.  Checked
# right after parsing, before anything walks the message recursively.
MAX_DEPTH = schema_module.MAX_PARAM_DEPTH + 3

# Requests in one batch, at most (each runs in turn in one worker).
MAX_BATCH = 100

# Error messages quote what was wrong; a 1 MB bad value is not repeated.
MAX_MESSAGE = 1000


class Dispatcher:
    """Answers JSON-RPC messages by calling ``service`` through ``api``.

    Thread safe: the agent calls ``handle`` from several worker threads.
    """

    def __init__(self, service, schema=None):
        self.service = service
        self.schema = schema or schema_module.load()
        # Verb name -> (method, API class, return key), as found.
        self._verbs = {}

    def handle(self, data, flow_id=None):
        """Answer one message; return the response bytes, or None when
        nothing is to be sent (notifications only).  Never raises."""
        with logmod.flow(flow_id):
            try:
                return self._handle(data)
            except Exception as e:
                # Never let a request end a worker without an answer.
                log.exception("Cannot answer a message")
                return _encode(_error_response(
                    None, errors.to_error(e))).encode("utf-8")

    def is_operation(self, data):
        """Whether the message ``data`` may hold an operation (a verb of
        ``api.OPERATIONS``); see ``is_operation``."""
        return is_operation(data)

    def refuse(self, data, error):
        """The response refusing every request of ``data`` with ``error``,
        running none; see ``refuse``."""
        return refuse(data, error)

    def is_unknown_id_error(self, response):
        """Whether ``response`` answers a request of unknown id; see
        ``is_unknown_id_error``."""
        return is_unknown_id_error(response)

    # Private helpers

    def _handle(self, data):
        try:
            message, shallow = _parse(data)
        except errors.Error as e:
            log.warning("Invalid message: %s", e)
            return _encode(_error_response(None, e)).encode("utf-8")
        if shallow:
            return _answer(message, self._handle_shallow)
        return _answer(message, self._handle_one)

    def _handle_shallow(self, request):
        return self._handle_one(request, shallow=True)

    def _handle_one(self, request, shallow=False):
        """The encoded response of one request, None for a notification.

        shallow: no param can nest more than schema.MAX_PARAM_DEPTH
        levels (``_parse``): binding need not walk them."""
        try:
            request_id, method, params = _parse_request(request)
        except _BadRequest as e:
            # Answered even without an id: the id could not be trusted.
            return _encode(_error_response(e.request_id, e.error))
        notification = "id" not in request
        start = time.monotonic()
        try:
            result, unmasked = self._call(method, params, shallow)
            response = {"jsonrpc": VERSION, "id": request_id,
                        "result": True if result is None else result}
            if unmasked:
                response = mask.masked_json(response, _ENCODER.encode,
                                            "result")
            else:
                response = _ENCODER.encode(response)
        except errors.Error as e:
            log.info("RPC call %s failed (error %s) in %.2f seconds",
                     method, e.code, time.monotonic() - start)
            response = _encode(_error_response(request_id, e))
        except Exception as e:
            log.error("RPC call %s failed (internal error) in %.2f seconds",
                      method, time.monotonic() - start, exc_info=True)
            error = errors.InternalError("{}: {}".format(
                type(e).__name__, mask.mask_text(str(e))))
            response = _encode(_error_response(request_id, error))
        else:
            # DEBUG: the API layer's FINISH line says the same at INFO
            # (each INFO line costs tens of microseconds on every call).
            if log.isEnabledFor(logging.DEBUG):
                log.debug("RPC call %s succeeded in %.2f seconds", method,
                          time.monotonic() - start)
        if notification:
            return None
        return response

    def _call(self, name, params, shallow=False):
        """Bind params, call the API class, unwrap vdsm's response dict:
        (result, whether it is still to be masked)."""
        verb = self._verbs.get(name)
        if verb is None:
            verb = self._verb(name)
        method, cls, key = verb
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Calling %s with %s", name,
                      mask.Masked(params, params=True, short=True))
        args = self.schema.args(name, params, shallow=shallow)
        obj = cls(*[None] * len(cls.ctorArgs))
        with api.using(self.service, checked=True,
                       mask_later=True) as bound:
            response = getattr(obj, method.verb)(*args)
        status = response.get("status", {})
        if status.get("code"):
            raise _StatusError(status["code"], status.get("message", ""))
        if key is None:
            return None, False
        return response.get(key), bound.unmasked

    def _verb(self, name):
        """(schema method, API class, return key) of the verb ``name``,
        found once per verb; errors.MethodNotFound for another name."""
        method = self.schema.method(name)
        cls = api.NAMESPACES.get(method.namespace)
        if cls is None or not hasattr(cls, method.verb):
            raise errors.MethodNotFound(method=name)
        verb = (method, cls, api.return_key(method.namespace, method.verb))
        self._verbs[name] = verb
        return verb


# A method name is ASCII; JSON can spell its letters only as themselves or
# as \u escapes.  A body holding neither verb name nor any \u escape
# therefore holds no operation.
_OPERATION_MARKERS = tuple(
    name.rpartition(".")[2].encode("ascii") for name in api.OPERATIONS
) + (b"\\u",)
# One search for any of them (a scan in C, not one per marker).
_OPERATION_SEARCH = re.compile(b"|".join(
    re.escape(marker) for marker in _OPERATION_MARKERS)).search


def is_operation(data):
    """Whether the message ``data`` (bytes) may call an operation.

    The agent asks this in its I/O thread for every request, to choose
    the pool: a substring scan (microseconds even for a large body), never
    a parse.  It errs one way only: a message that calls an operation is
    always recognised; one that merely mentions a verb name (or holds a
    \\u escape) is counted as an operation too, which costs it nothing
    but a data-plane slot.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return _OPERATION_SEARCH(data) is not None


def refuse(data, error):
    """The response (bytes) refusing every request of the message ``data``
    with ``error`` (an errors.Error), running none: the agent's answer
    when it is busy or stopping.

    The message is decoded only for its request ids (``decode``: no walk
    of its nesting, which only a request that runs needs), and answered
    as ``handle`` would answer it: one response per request with an id (a
    single object for a message of one), None when there is none
    (notifications).  What ``handle`` answers without running anything
    gets the same answer: an entry that is not a valid request (not an
    object, a bad id, no jsonrpc "2.0", no method name, params neither
    an object nor an array) gets its -32600 error, with a null id when
    the id could not be trusted, a notification included.  A message
    that is not JSON, an empty batch or a batch of more than MAX_BATCH
    requests gets one error with a null id, never one per entry: this
    runs in the agent's I/O thread.
    """
    try:
        message = decode(data)
    except errors.Error:
        return _encode(_error_response(None, error)).encode("utf-8")

    def refuse_one(request):
        try:
            request_id = _parse_request(request)[0]
        except _BadRequest as e:
            return _encode(_error_response(e.request_id, e.error))
        if "id" not in request:
            return None
        return _encode(_error_response(request_id, error))

    return _answer(message, refuse_one, whole=error)


def is_unknown_id_error(response):
    """Whether the response bytes are an error whose id is null: the
    answer to a message whose request id could not be read (not JSON, not
    a request).  The agent sends it to ``jms.topic.vdsm_responses`` when
    the client subscribed there, as vdsm does with a response whose id it
    cannot map to a reply-to (yajsonrpc/stompserver.py, StompServer.send).
    """
    if len(response) > 4096 or b'"error"' not in response:
        return False
    try:
        message = json.loads(response)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("id") is None


def _answer(message, answer_one, whole=None):
    """The response bytes to the parsed ``message``, None when it has
    nothing to answer: ``answer_one(request)`` is the encoded response of
    one request (None for a notification).

    A batch (an array) gets an array of the responses, except a batch of
    one: vdsm's Python client sends its every request that way and expects
    a single object.  An empty batch or one of more than MAX_BATCH
    requests is answered whole with one error, id null: ``whole``, or the
    InvalidRequest saying why.
    """
    if not isinstance(message, list):
        response = answer_one(message)
        return None if response is None else response.encode("utf-8")
    if not message or len(message) > MAX_BATCH:
        error = whole or errors.InvalidRequest(
            "batch of {} requests; at most {}".format(
                len(message), MAX_BATCH) if message else "empty batch")
        return _encode(_error_response(None, error)).encode("utf-8")
    responses = [r for r in map(answer_one, message) if r is not None]
    if not responses:
        return None
    if len(message) == 1:
        return responses[0].encode("utf-8")
    return "[{}]".format(", ".join(responses)).encode("utf-8")


def parse(data):
    """The JSON message in ``data`` (bytes or str), to run.

    Raises ParseError (-32700) for anything that is not strict JSON in
    UTF-8 (other encodings, invalid UTF-8, NaN/Infinity) and
    InvalidRequest (-32600) for nesting beyond MAX_DEPTH, the same words
    whether the walk or the parser's recursion limit found it.
    """
    return _parse(data)[0]


def _parse(data):
    """(``parse(data)``, shallow): shallow when no value in the message
    can nest more than schema.MAX_PARAM_DEPTH levels.

    A message nests at most as deeply as it has opening brackets (in
    strings too: counted, they only make the count larger): walking it
    to learn its depth is needed only beyond that.  Nearly every request
    has a handful, and neither it nor its params are walked.
    """
    message = decode(data)
    if isinstance(data, str):
        openers = data.count("[") + data.count("{")
    else:
        openers = data.count(b"[") + data.count(b"{")
    if openers > MAX_DEPTH and schema_module.too_deep(message, MAX_DEPTH):
        raise _too_deep()
    return message, openers <= schema_module.MAX_PARAM_DEPTH


def _too_deep():
    return errors.InvalidRequest("nested deeper than {} levels".format(
        MAX_DEPTH))


def decode(data):
    """The JSON message in ``data`` (bytes or str), its nesting not
    bounded beyond the parser's own recursion limit (``parse`` bounds it).

    Raises ParseError (-32700) for anything that is not strict JSON in
    UTF-8, InvalidRequest (-32600) for nesting beyond the parser's
    recursion limit (valid JSON, refused as ``parse`` refuses MAX_DEPTH).
    """
    try:
        if isinstance(data, (bytes, bytearray)):
            # UTF-8 only (json.loads would guess UTF-16 and UTF-32 too).
            data = data.decode("utf-8")
        if data.startswith("\ufeff"):
            # Refused with json.loads' own words (its decoder does not
            # look for a byte order mark).
            json.loads(data)
        message = _DECODER.decode(data)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.ParseError(str(e))
    return message


def _no_constant(name):
    raise ValueError("{} is not valid JSON".format(name))


# Made once: json.loads and json.dumps build one per call when given any
# option.
_DECODER = jsontext.Decoder(parse_constant=_no_constant)
_ENCODER = jsontext.Encoder(allow_nan=False)


class _BadRequest(Exception):

    def __init__(self, request_id, error):
        self.request_id = request_id
        self.error = error


def _parse_request(request):
    """(id, method, params) of a valid request; _BadRequest otherwise."""
    if not isinstance(request, dict):
        raise _BadRequest(None, errors.InvalidRequest(
            "expected an object, got {}".format(_kind(request))))
    request_id = request.get("id")
    if not _valid_id(request_id):
        raise _BadRequest(None, errors.InvalidRequest(
            "id must be a string, a finite number or null"))
    if request.get("jsonrpc") != VERSION:
        raise _BadRequest(request_id, errors.InvalidRequest(
            'jsonrpc must be "2.0"'))
    method = request.get("method")
    if not isinstance(method, str):
        raise _BadRequest(request_id, errors.InvalidRequest(
            "method must be a string"))
    params = request.get("params")
    if params is not None and not isinstance(params, (list, dict)):
        raise _BadRequest(request_id, errors.InvalidRequest(
            "params must be an object or an array"))
    return request_id, method, params


class _StatusError(errors.Error):
    """A non-zero vdsm status, passed through as is."""

    msg = "{self.reason}"

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _error_response(request_id, error):
    # Every error is masked here, whatever raised it (a status the API
    # layer built is masked there already: masking it again is harmless,
    # and no error reaches the wire unmasked however it was made).
    message = mask.mask_text(str(error))
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "... ({} characters)".format(
            len(message))
    return {"jsonrpc": VERSION, "id": request_id,
            "error": {"code": error.code, "message": message}}


def _encode(obj):
    """JSON text of a response (tuples become arrays; anything else that
    JSON cannot hold raises TypeError or ValueError (NaN) -> internal
    error)."""
    return _ENCODER.encode(obj)


def _valid_id(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        # 1e400 parses as infinity, which no response can carry back.
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int))


def _kind(value):
    return {list: "array", str: "string", bool: "boolean",
            type(None): "null", dict: "object"}.get(type(value), "number")
