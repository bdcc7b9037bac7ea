"""Logging: the flow id in every line, secrets masked in every line.

The engine sends a flow id (``ovirtCorrelationId``) with each request; an
admin greps one id to follow one call through the agent, the service and
the privileged daemon.  ``flow(id)`` sets it for the current thread (a
contextvar), and the ``ContextFilter`` installed on every handler writes it
into ``%(flow_id)s`` and masks secrets in the message and its arguments
(``mask.mask``), so no caller has to remember either.

The same filter makes every string argument and the flow id
``printable``: a value from the wire (a JSON-RPC method name, a STOMP
header such as ``reply-to`` or ``ovirtCorrelationId``, a destination)
cannot start a forged log line with a newline or carriage return, hide
text with a NUL, reorder a line with a bidi override, or break the log
file's encoding with a lone surrogate.  Such characters appear escaped,
as a backslash and n, r or t, or a backslash and their hex code point
(``x00``, ``u202e``).  One line per record: multi-line
text belongs in the traceback, not in an argument.  The flow id is
stricter still, whether from the wire or set in process: such
characters and brackets become ``_`` before it is masked
(``clean_flow_id``).

Most lines hold nothing to mask or escape (ids, paths, states, timings)
and the agent writes several per call: when every argument is a plain
value (a string, a number, None, a ``mask.Masked``) and the formatted
line is ASCII, printable and holds none of the words a secret's shape
needs (``mask.plainly_clean``), the line is written as formatted.  Any
other line has each argument masked and escaped, then the whole line
masked.

Such a plain line, logged by a logger of this package (and, once
``setup`` ran, by any logger the process makes after it, third-party
ones included: ``speed_up_loggers``) in a process whose only handler is
the one ``setup`` installed, is written without a ``LogRecord``
(``_Logger``): what logging would do with it (make the record, look up
the caller's frame, walk the loggers for handlers, run the filter,
format, write) comes to the same text, which is made and written
directly.  The agent writes several lines per attach+detach; this takes
a plain line from ~87k to ~46k instructions.  Any other line, or any
other configuration (a ``log_config`` file, vdsm's handlers, a test's
capture handler), takes logging's own path.
"""

import contextvars
import logging
import logging.config
import os
import re
import sys
import threading
import time

from . import mask

FORMAT = ("%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] "
          "[flow=%(flow_id)s] %(message)s")
JOURNAL_FORMAT = "[%(name)s] [flow=%(flow_id)s] %(message)s"

# A flow id from the wire is copied into every log line of its call: at
# most this long.
MAX_FLOW_ID = 128

_flow_id = contextvars.ContextVar("flow_id", default="-")

# This process's pid, for the filter (os.getpid() is a system call, and
# the filter runs on every record).
_pid = os.getpid()


def _forked():
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

# C0 and C1 controls (newline, CR, NUL, ESC...), DEL, the line and
# paragraph separators, bidi marks, embeddings, overrides and isolates,
# and lone surrogates.
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e"
    "\u2066-\u2069\ud800-\udfff]")


def printable(text):
    r"""``text`` with every character that could forge or disguise a log
    line escaped (``\n``, ``\r``, ``\t``, else ``\xNN``/``\uNNNN``).

    The one sanitiser for values from the wire that reach a log line;
    the log filter applies it to every string argument."""
    if not isinstance(text, str):
        return text
    # Printable ASCII, nearly every value, holds none of them: two tests
    # in C instead of the regular expression's scan.
    if (text.isascii() and text.isprintable()) or \
            not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(_escape, text)


def clean_flow_id(value):
    """A flow id as every log line of its call shows it, whether it came
    from the wire (``ovirtCorrelationId``) or is set in process
    (``flow()``, the engine's correlation id): at most MAX_FLOW_ID
    characters, one line, each character that is not printable or is a
    bracket (which would close ``[flow=...]`` early) replaced by ``_``,
    then a secret's shape masked (``mask.mask_text``: a flow id is any
    text the client chose); None for none.

    Stricter than ``printable``, which escapes: the flow id is also what
    an admin greps for, so it stays one plain word.  Every flow id that
    reaches a line passes here: merely escaped, ``password\\n=s3cret``
    would be written as no shape mask_text knows."""
    if value is None or type(value) is _CleanFlowId:
        return value
    value = value[:MAX_FLOW_ID]
    if not (value.isprintable() and "[" not in value and "]" not in value):
        value = "".join(c if c.isprintable() and c not in "[]" else "_"
                        for c in value)
    # Masked last, on the text as logged: 'password\n=s3cret' is only a
    # secret's shape once the line break is a '_'.
    if not mask.plainly_clean(value):
        value = mask.mask_text(value)[:MAX_FLOW_ID]
    # Nearly every flow id: as it came.
    return _CleanFlowId(value) if value else None


class _CleanFlowId(str):
    """A flow id as ``clean_flow_id`` returned it: not cleaned again (a
    request's id is cleaned when its frame is read, then its worker
    and the dispatcher each run in ``flow()``)."""

    __slots__ = ()


def _escape(m):
    c = m.group()
    special = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c)
    if special:
        return special
    code = ord(c)
    return "\\x{:02x}".format(code) if code < 0x100 \
        else "\\u{:04x}".format(code)


def current_flow():
    return _flow_id.get()


class flow:
    """Context manager: run the block with ``flow_id`` in every log line
    it writes, as ``clean_flow_id`` shows it (one plain word, a secret's
    shape masked).  (A class: a generator's context manager costs several
    times more, and a request enters two.)"""

    __slots__ = ("_value", "_token")

    def __init__(self, flow_id):
        if isinstance(flow_id, str):
            flow_id = clean_flow_id(flow_id)
        self._value = flow_id or "-"

    def __enter__(self):
        # Inside a flow() of the same id (the dispatcher's, inside the
        # worker's): nothing to set.
        if _flow_id.get() is self._value:
            self._token = None
        else:
            self._token = _flow_id.set(self._value)

    def __exit__(self, *exc):
        if self._token is not None:
            _flow_id.reset(self._token)
        return False


class ContextFilter(logging.Filter):
    """Adds ``flow_id`` and masks secrets; never drops a record."""

    def filter(self, record):
        if not hasattr(record, "flow_id"):
            record.flow_id = _flow_id.get()
        record.flow_id = printable(record.flow_id)
        # Masked once per process (a record may pass several handlers; one
        # forwarded by the privsep daemon carries the daemon's pid here and
        # is masked again).
        if getattr(record, "_managedvolume_masked", None) == _pid:
            return True
        if not (record.exc_info or record.exc_text or record.stack_info):
            line = _plain_line(record)
            if line is not None:
                record.msg = line
                record.args = None
                record._managedvolume_masked = _pid
                return True
        # Structured arguments first (a dict's secret keys are masked by
        # name, whatever their values look like), then the whole formatted
        # message: an exception or any object with a __str__ quoting a
        # password passes the first step unchanged.
        if record.args:
            if isinstance(record.args, dict):
                record.args = {k: _printable_arg(v) for k, v in
                               mask.mask(record.args).items()}
            else:
                record.args = tuple(_printable_arg(mask.mask(a))
                                    for a in record.args)
        record.msg = _masked_message(record)
        record.args = None
        # Tracebacks may quote connection data: format once, masked.  A
        # record forwarded by the privsep daemon arrives with exc_text
        # already formatted (and exc_info gone): mask that too.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(
                record.exc_info)
        if record.exc_text:
            record.exc_text = mask.mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask.mask_text(record.stack_info)
        record._managedvolume_masked = _pid
        return True


# Arguments whose text is all a line shows of them: a secret among them
# can only be in that text.  Exact types: a subclass may print something
# else than its value (a dict subclass hiding its keys would keep its
# secret values from the key check that mask.mask does on dicts).
PLAIN_TYPES = frozenset((str, int, float, bool, type(None)))


def _as_is(text):
    """Whether the filter would write ``text`` as it is: ASCII (where the
    characters printable() escapes are exactly those isprintable()
    refuses), printable, no secret's marker (``mask.plainly_clean``)."""
    return mask.plainly_clean(text) and text.isprintable()


class Line(str):
    """A log line made whole by its caller and found plainly clean and
    printable by ``clean_line``: logged alone (no arguments), it is
    written as it is, neither the short path nor the filter scans it
    again.  Made by ``clean_line`` only."""

    __slots__ = ()


def clean_line(text):
    """``text`` as a ``Line`` when the filter would write it as it is
    (ASCII, printable, no secret's marker: ``mask.plainly_clean``),
    else None: the caller then logs it the usual way (a template and
    its arguments, masked as each needs).  For a line whose arguments
    its caller formats anyway (api.py's START and FINISH lines): one
    scan of the whole line instead of one of the arguments, then one of
    the line."""
    return Line(text) if _as_is(text) else None


def _plain_line(record):
    """The record's line, when it is its final text already: the fast
    path taken by nearly every line (ids, paths, states, timings).

    When the template is a string and every argument (positional: a
    mapping is masked by its keys) a string, a number, None or a
    ``mask.Masked`` (whose text is masked by key already), the
    formatted line holds every character an argument could add; when that
    line is ASCII, printable and holds no secret's marker
    (``mask.plainly_clean``), neither does any argument, so masking and
    escaping each argument, then the line, would change nothing.  None
    otherwise: the filter's full path decides."""
    if type(record.msg) is Line and not record.args:
        return str(record.msg)
    if type(record.msg) is not str:
        return None
    args = record.args
    if args:
        # A mapping's secrets are found by its keys ("%(password)s" puts
        # only the value in the line, which may look like anything): the
        # full path masks it with mask.mask.
        if type(args) is not tuple:
            return None
        for value in args:
            if type(value) not in PLAIN_TYPES and \
                    not isinstance(value, mask.Masked):
                return None
    try:
        line = record.getMessage()
    except Exception:
        return None
    return line if _as_is(line) else None


def _masked_message(record):
    """The record's message, masked: the text of each ``mask.Masked``
    argument as it masked itself (once), the rest of the line by one
    pass of ``mask_text``."""
    args = record.args
    values = args.values() if isinstance(args, dict) else args or ()
    texts = {}

    def hold(value):
        if not isinstance(value, mask.Masked):
            return value
        # NUL cannot come from a printable argument nor a template of ours.
        key = "\x00{}\x00".format(len(texts))
        texts[key] = printable(str(value))
        return _Placeholder(key)

    if any(isinstance(v, mask.Masked) for v in values):
        held = ({k: hold(v) for k, v in args.items()}
                if isinstance(args, dict) else tuple(hold(a) for a in args))
        try:
            line = mask.mask_text(str(record.msg) % held)
        except Exception:
            line = None
        # A placeholder eaten by the masking (a template quoting a secret
        # shape around it): mask the whole line, as for any other record.
        if line is not None and all(line.count(k) == 1 for k in texts):
            for key, text in texts.items():
                line = line.replace(key, text)
            return line
    try:
        message = record.getMessage()
    except Exception:
        # A broken format string: keep what we have, masked.
        message = "{} {!r}".format(record.msg, record.args)
    return mask.mask_text(message)


class _Placeholder:
    """Where a Masked argument's text goes, for %s and %r alike."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __str__(self):
        return self.key

    __repr__ = __str__


def _printable_arg(value):
    # Exceptions carry wire values in their text (a method name in
    # MethodNotFound) and are formatted with %s: escape that text too.
    if isinstance(value, BaseException):
        return printable(str(value))
    return printable(value)


def setup(cfg=None, level=None, stream=None, filename=None):
    """Configure the root logger for a program of this package.

    A ``log_config`` file (logging.config.fileConfig format) wins; else one
    handler: ``filename`` / ``cfg.log_file`` when given, stderr otherwise
    (under systemd, with ``JOURNAL_STREAM`` set, without timestamps since
    journald adds its own).  Our formats show no pid nor process name:
    then no record asks for them (a system call per record; a record
    forwarded by the privsep daemon keeps the daemon's pid).
    """
    root = logging.getLogger()
    if cfg is not None and cfg.log_config:
        logging.config.fileConfig(cfg.log_config,
                                  disable_existing_loggers=False)
        for handler in root.handlers:
            install_filter(handler)
        return
    level = level or (cfg.log_level if cfg is not None else "INFO")
    filename = filename or (cfg.log_file if cfg is not None else "")
    if filename:
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        handler = ReopenableFileHandler(filename)
        handler.setFormatter(Formatter(FORMAT))
    else:
        handler = StreamHandler(stream or sys.stderr)
        fmt = JOURNAL_FORMAT if os.environ.get("JOURNAL_STREAM") else FORMAT
        handler.setFormatter(Formatter(fmt))
    install_filter(handler)
    # The caller's frame is looked up for each record although our formats
    # show no file, line or function (1-2 us a record): logging's switch
    # for it (logging._srcfile) is process-wide, and turned off it drops
    # the stack of stack_info=True and shows line 0 in any other handler.
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.logProcesses = False
    logging.logMultiprocessing = False
    speed_up_loggers()


class Formatter(logging.Formatter):
    """logging.Formatter, with the time of day formatted once a second
    (localtime and strftime for every line, for the same text, cost more
    than the rest of the line's formatting), and whether the format shows
    it found once, not at every line."""

    _second = (None, None, None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._uses_time = self.usesTime()

    def format(self, record):
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # What logging.Formatter.format does for a line without a
        # traceback or a stack, in three calls fewer.
        record.message = record.getMessage()
        if self._uses_time:
            record.asctime = self.formatTime(record, self.datefmt)
        return self._style.format(record)

    def formatTime(self, record, datefmt=None):
        return self._time_text(record.created, record.msecs, datefmt)

    def _time_text(self, created, msecs, datefmt=None):
        second = int(created)
        cached_second, cached_datefmt, text = self._second
        if cached_second != second or cached_datefmt != datefmt:
            text = time.strftime(datefmt or self.default_time_format,
                                 self.converter(second))
            # One tuple: threads formatting at once see one second's text.
            self._second = (second, datefmt, text)
        if datefmt or not self.default_msec_format:
            return text
        return self.default_msec_format % (text, msecs)


def install_filter(handler):
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())


def reopen():
    """Reopen file handlers (SIGHUP after logrotate moved the file)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


class _Emit:
    """``emit`` of logging.StreamHandler in fewer calls: the stream is
    flushed directly, ``handle`` already holding the lock that
    ``flush()`` would take again."""

    def emit(self, record):
        try:
            msg = self.format(record)
            stream = self.stream
            stream.write(msg + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class StreamHandler(_Emit, logging.StreamHandler):
    """logging.StreamHandler (stderr, the journal), ``_Emit``'s way."""


class ReopenableFileHandler(_Emit, logging.FileHandler):
    """A log file created 0640 (masked content still describes the host's
    storage), reopened on SIGHUP after logrotate moved it."""

    def emit(self, record):
        if self.stream is None:
            # Closed: logging.FileHandler's emit decides whether to open
            # it again (Python 3.9 and later ones differ).
            logging.FileHandler.emit(self, record)
        else:
            _Emit.emit(self, record)

    def _open(self):
        fd = os.open(self.baseFilename,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o640)
        return os.fdopen(fd, self.mode.replace("w", "a"),
                         encoding=self.encoding, errors=self.errors)

    def reopen(self):
        with self.lock:
            if self.stream:
                self.stream.close()
            self.stream = self._open()


def speed_up_loggers():
    """Give this package's loggers the plain line's short path
    (``_Logger``), and every logger made from now on in this process:
    ``setup`` calls it, so only this package's programs, never vdsm
    (whose handlers would make every line take logging's path anyway).
    The short path writes only what logging would have written."""
    if logging.getLoggerClass() is logging.Logger:
        logging.setLoggerClass(_Logger)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if type(logger) is logging.Logger and (
                name == "managedvolume" or
                name.startswith(("managedvolume.", "vdsm_managedvolume"))):
            logger.__class__ = _Logger


class _Logger(logging.Logger):
    """A logger writing a plain line (see ``_plain_line``) without a
    LogRecord when the process logs through ``setup``'s one handler with
    its format: the same text as logging's path, made and written
    directly (``_write_plain``).  Every other line (a traceback, a stack,
    ``extra``, an argument to mask or escape) and every other
    configuration takes logging's path unchanged."""

    def _log(self, level, msg, args, exc_info=None, extra=None,
             stack_info=False, stacklevel=1):
        if exc_info or extra is not None or stack_info or \
                not _write_plain(self, level, msg, args):
            # One frame more (this one) between the caller and logging:
            # findCaller skips logging's own frames, not ours.
            super()._log(level, msg, args, exc_info, extra, stack_info,
                         stacklevel + 1)


# The handlers and formats ``setup`` installs, whose text _write_plain
# makes itself; the format as a tuple's template (its fields in order).
_OUR_HANDLERS = frozenset((StreamHandler, ReopenableFileHandler))
_FAST_FORMATS = {
    FORMAT: ("%s %-7s (%s) [%s] [flow=%s] %s", True),
    JOURNAL_FORMAT: ("[%s] [flow=%s] %s", False),
}


def _handler_of(logger, level):
    """The one handler a record of ``logger`` at ``level`` would reach,
    when it is one of ours with only our filter and one of our formats;
    else None.  What ``Logger.handle`` and ``callHandlers`` look at."""
    if logger.disabled or logger.filters or \
            logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found = None
    c = logger
    while c is not None:
        if c.handlers:
            if found is not None or len(c.handlers) != 1:
                return None
            found = c.handlers[0]
        if not c.propagate:
            break
        c = c.parent
    if found is None or type(found) not in _OUR_HANDLERS or \
            level < found.level:
        return None
    filters = found.filters
    if len(filters) != 1 or type(filters[0]) is not ContextFilter:
        return None
    formatter = found.formatter
    if type(formatter) is not Formatter or formatter.datefmt is not None \
            or type(formatter._style) is not logging.PercentStyle \
            or formatter._style._fmt not in _FAST_FORMATS \
            or getattr(formatter._style, "_defaults", None):
        return None
    return found


def _write_plain(logger, level, msg, args):
    """Write the line of ``logger.log(level, msg, *args)`` as logging
    would through ``setup``'s handler, when it is a plain line (see
    ``_plain_line``) and that handler the only one; return whether it
    was written (False: nothing was done)."""
    handler = _handler_of(logger, level)
    if handler is None:
        return False
    if type(msg) is Line and not args:
        line = msg      # clean_line scanned it
    else:
        if type(msg) is not str:
            return False
        line = msg
        if args:
            for value in args:
                if type(value) not in PLAIN_TYPES and \
                        not isinstance(value, mask.Masked):
                    return False
            try:
                line = msg % args
            except Exception:
                return False
        if not _as_is(line):
            return False
    formatter = handler.formatter
    template, timed = _FAST_FORMATS[formatter._style._fmt]
    flow_id = printable(_flow_id.get())
    if timed:
        created = time.time()
        text = template % (
            formatter._time_text(created,
                                 int((created - int(created)) * 1000)),
            logging.getLevelName(level),
            threading.current_thread().name if logging.logThreads
            else None,
            logger.name, flow_id, line)
    else:
        text = template % (logger.name, flow_id, line)
    handler.acquire()
    try:
        stream = handler.stream
        if stream is None:
            return False    # closed: logging's emit decides
        try:
            stream.write(text + handler.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            handler.handleError(logging.LogRecord(
                logger.name, level, "(unknown file)", 0, line, None, None))
    finally:
        handler.release()
    return True
