"""The log filter: flow ids, masking, and no forged lines."""

import logging
import os
import sys

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import log
from vdsm_managedvolume import mask


@pytest.mark.parametrize("raw, shown", [
    ("a\nb", "a\\nb"),
    ("a\r\nb", "a\\r\\nb"),
    ("nul\x00", "nul\\x00"),
    ("del\x7f", "del\\x7f"),
    ("plain ascii: ok [1] (x)", "plain ascii: ok [1] (x)"),
    ("tab\tesc\x1b[31m", "tab\\tesc\\x1b[31m"),
    ("rtl\u202eevil\u2066", "rtl\\u202eevil\\u2066"),
    ("sep\u2028nel\x85", "sep\\u2028nel\\x85"),
    ("lone\ud800", "lone\\ud800"),
    ("caf\u00e9 \U0001f600 ok", "caf\u00e9 \U0001f600 ok"),
])
def test_printable_escapes_what_could_forge_a_line(raw, shown):
    assert log.printable(raw) == shown


def test_wire_values_in_arguments_stay_on_one_line(log_lines):
    logger, lines = log_lines
    reply_to = "dest\n2026-12-01 00:00:00,000 INFO forged\r\u202e"
    logger.warning("No subscription to %s (connection %s)", reply_to, 7)
    logger.info("%(method)s failed", {"method": "Host.x\nforged"})
    logger.info("failed: %s",
                errors.MethodNotFound(method="ManagedVolume.x\nforged"))
    with log.flow("flow\nforged"):
        logger.info("with a flow")
    assert len(lines) == 4
    assert all("\n" not in line and "\r" not in line
               and "\u202e" not in line for line in lines)
    assert lines[0].endswith(
        "No subscription to dest\\n2026-12-01 00:00:00,000 INFO forged"
        "\\r\\u202e (connection 7)")
    assert lines[1].endswith("Host.x\\nforged failed")
    assert lines[2].endswith("ManagedVolume.x\\nforged")
    assert "[flow=flow_forged]" in lines[3]


def test_a_lone_surrogate_does_not_break_a_utf8_log_file(tmp_path):
    path = tmp_path / "agent.log"
    handler = log.ReopenableFileHandler(str(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter(log.FORMAT))
    log.install_filter(handler)
    logger = logging.getLogger("tests.log_test.surrogate")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("method %s", "x\ud800y")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "method x\\ud800y" in path.read_text(encoding="utf-8")


def test_masked_argument_is_masked_once_and_only_when_logged(
        log_lines, monkeypatch):
    logger, lines = log_lines
    ci = {"driver_volume_type": "iscsi",
          "data": {"auth_username": "chapuser", "auth_password": "pw-77x"}}
    calls = []
    real = mask.mask

    def counting(obj, _depth=0):
        if obj is ci:
            calls.append(obj)
        return real(obj, _depth)

    monkeypatch.setattr(mask, "mask", counting)
    logger.setLevel(logging.INFO)
    logger.debug("not written %s", mask.Masked(ci))
    assert calls == [] and lines == []
    logger.info("attaching %s auth_method=%s", mask.Masked(ci), "CHAP")
    logger.info("as repr %r", mask.Masked(ci))
    assert len(calls) == 2
    assert "pw-77x" not in "\n".join(lines)
    assert "'auth_password': '********'" in lines[0]
    assert "'auth_username': 'chapuser'" in lines[1]


def test_masked_argument_is_masked_without_the_filter(caplog):
    # vdsm's handlers do not have our filter.
    ci = {"data": {"auth_password": "pw-88y"}}
    with caplog.at_level(logging.INFO, logger="tests.unfiltered"):
        logging.getLogger("tests.unfiltered").info(
            "attaching %s", mask.Masked(ci))
    assert "pw-88y" not in caplog.text
    assert mask.MASK in caplog.text


# The filter's fast path: a line of plain arguments (str, numbers, None,
# mask.Masked) without any secret marker is written as formatted.  Every
# other line takes the full path: each argument masked (by key, by shape)
# and escaped, then the line.

SECRET = "s3cr3t-Fast-Pw"
CEPH_KEY = "AQBsgnVjAAAAABAA" + "k" * 22 + "=="


@pytest.mark.parametrize("msg, args", [
    ("running %s", ("iscsiadm -n node.session.auth.password -v " + SECRET,)),
    ("login password=%s", (SECRET,)),
    ("%s", ("pa\u017f\u017fword=" + SECRET,)),
    ("map %s", ("--key " + CEPH_KEY,)),
    ("db %s", ("postgresql://engine:" + SECRET + "@db/engine",)),
    ("%(cmd)s failed", ({"cmd": "auth_password=" + SECRET},)),
    ("%s=%r", ("token", SECRET)),
])
def test_plain_arguments_holding_a_secret_shape_are_masked(
        log_lines, msg, args):
    logger, lines = log_lines
    logger.info(msg, *args)
    assert SECRET not in lines[0] and CEPH_KEY not in lines[0]
    assert mask.MASK in lines[0]


def test_a_mapping_that_prints_no_keys_is_still_masked_by_key(log_lines):
    # Its text shows no secret marker: only its keys say what is secret.
    class Hiding(dict):
        def __repr__(self):
            return " ".join(str(v) for v in self.values())

        __str__ = __repr__

    logger, lines = log_lines
    logger.info("volume %s connection %s", "v1", Hiding(auth_password=SECRET))
    logger.info("connection %s", Hiding(auth_password=SECRET, lun=1))
    logger.info("%(auth_password)s", Hiding(auth_password=SECRET))
    assert len(lines) == 3
    assert all(SECRET not in line and mask.MASK in line for line in lines)


def test_a_secret_named_only_by_its_mapping_key_is_masked(log_lines):
    # The line shows the value alone, which looks like any word: only the
    # key says it is a secret.
    logger, lines = log_lines
    logger.info("chap %(user)s:%(password)s", {"user": "u",
                                                "password": "hunter2"})
    logger.info("%(auth_password)s", {"auth_password": "hunter2"})
    assert len(lines) == 2
    assert all("hunter2" not in line and mask.MASK in line
               for line in lines)


@pytest.mark.parametrize("raw, shown", [
    ("x\x1b[2Jy", "x\\x1b[2Jy"),
    ("nul\x00", "nul\\x00"),
    ("del\x7f", "del\\x7f"),
    ("a\nINFO forged", "a\\nINFO forged"),
])
def test_plain_arguments_are_escaped_on_a_clean_line(log_lines, raw, shown):
    logger, lines = log_lines
    logger.info("volume %s detached", raw)
    assert lines[0].endswith("volume {} detached".format(shown))


def test_a_clean_line_is_written_as_formatted_without_masking_each_argument(
        log_lines, monkeypatch):
    logger, lines = log_lines
    calls = []
    real = mask.mask

    def counting(obj, _depth=0):
        calls.append(obj)
        return real(obj, _depth)

    monkeypatch.setattr(mask, "mask", counting)
    logger.info("Attached volume %s path=%s size=%d %s", "9f3c1e0a",
                "/dev/loop3", 1024, mask.Masked({"device_path": "/dev/x"}))
    assert lines[0].endswith(
        "Attached volume 9f3c1e0a path=/dev/loop3 size=1024 "
        "{'device_path': '/dev/x'}")
    # Only the Masked argument, by itself: no argument a second time
    # (its strings are masked within the call: no call of their own).
    assert calls == [{"device_path": "/dev/x"}]


def test_a_forked_child_masks_records_its_parent_had_masked():
    # A record marked as masked by another process (a forwarded one) is
    # masked again: the child must not take its parent's pid for its own.
    record = logging.LogRecord("x", logging.INFO, __file__, 1,
                               "auth_password=%s", (SECRET,), None)
    record._managedvolume_masked = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            log.ContextFilter().filter(record)
            os.write(w, record.getMessage().encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        shown = f.read().decode()
    os.waitpid(pid, 0)
    assert shown == "auth_password=" + mask.MASK


@pytest.mark.parametrize("created", [
    1764547200.0, 1764547200.999, 1764547201.0005, 1764547259.5,
])
@pytest.mark.parametrize("datefmt", [None, "%H:%M:%S"])
def test_formatter_shows_the_time_as_logging_does(created, datefmt):
    ours, stdlib = log.Formatter(datefmt=datefmt), logging.Formatter(
        datefmt=datefmt)
    for t in (created - 1, created, created):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m",
                                   None, None)
        record.created = t
        record.msecs = int((t - int(t)) * 1000) + 0.0
        assert ours.formatTime(record, datefmt) == \
            stdlib.formatTime(record, datefmt)


def _record(exc_info=None, sinfo=None):
    record = logging.LogRecord("managedvolume.x", logging.INFO, __file__, 1,
                               "Attached volume %s path=%s", ("v", "/dev/x"),
                               exc_info, sinfo=sinfo)
    record.flow_id = "f1"
    return record


@pytest.mark.parametrize("fmt", [log.FORMAT, log.JOURNAL_FORMAT,
                                 "%(message)s (%(module)s:%(lineno)d)"])
def test_formatter_writes_what_logging_formatter_writes(fmt):
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    for kw in ({}, {"exc_info": exc_info}, {"sinfo": "Stack (most recent "
                                                     "call last): here"}):
        ours, stdlib = _record(**kw), _record(**kw)
        stdlib.created, stdlib.msecs = ours.created, ours.msecs
        assert log.Formatter(fmt).format(ours) == \
            logging.Formatter(fmt).format(stdlib)


@pytest.mark.parametrize("handler", ["stream", "file"])
def test_handlers_write_and_flush_each_line_and_reopen_after_close(
        tmp_path, handler):
    path = tmp_path / "agent.log"
    if handler == "stream":
        f = open(path, "w")
        h = log.StreamHandler(f)
    else:
        h = log.ReopenableFileHandler(str(path))
    h.setFormatter(log.Formatter("%(message)s"))
    log.install_filter(h)
    try:
        h.handle(_record())
        # Flushed with the line: visible to another reader at once.
        assert path.read_text() == "Attached volume v path=/dev/x\n"
        if handler == "file":
            h.close()
            h.handle(_record())     # opened again, as logging does
            assert path.read_text().count("Attached volume") == 2
    finally:
        h.close()
        if handler == "stream":
            f.close()


def test_setup_keeps_the_stack_and_the_caller_of_every_record(tmp_path):
    # logging's caller lookup is process-wide: turned off, stack_info=True
    # printed no stack and a handler showing %(lineno)d got 0, whatever
    # configured it.
    class Cfg:
        log_config = ""
        log_level = "INFO"
        log_file = str(tmp_path / "agent.log")

    conf = tmp_path / "logger.conf"
    conf.write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=file\n"
        "[formatters]\nkeys=plain\n[logger_root]\nlevel=INFO\n"
        "handlers=file\n[handler_file]\nclass=FileHandler\n"
        "formatter=plain\nargs=({!r},)\n[formatter_plain]\n"
        "format=%(funcName)s:%(lineno)d %(message)s\n".format(
            str(tmp_path / "custom.log")))
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging._srcfile
    other = []

    class Keep(logging.Handler):
        def emit(self, record):
            other.append((record.funcName, record.lineno))

    keep = Keep()
    logger = logging.getLogger("tests.setup")
    logger.addHandler(keep)
    try:
        log.setup(Cfg())
        logger.warning("ours", stack_info=True)
        Cfg.log_config = str(conf)
        log.setup(Cfg())
        logger.info("custom")
    finally:
        logger.removeHandler(keep)
        for h in root.handlers:
            h.close()
        root.handlers[:], level, logging._srcfile = saved
        root.setLevel(level)
    ours = (tmp_path / "agent.log").read_text()
    assert "] ours\nStack (most recent call last):\n" in ours
    assert "in test_setup_keeps_the_stack_and_the_caller_of_every_record" \
        in ours
    name = "test_setup_keeps_the_stack_and_the_caller_of_every_record"
    assert [f for f, _ in other] == [name, name]
    assert all(line > 0 for _, line in other)
    custom = (tmp_path / "custom.log").read_text()
    assert custom.startswith(name + ":")


@pytest.fixture
def agent_logging(tmp_path):
    """log.setup() writing to a file, as the agent does; logging's
    handlers, level and logger class put back after."""
    class Cfg:
        log_config = ""
        log_level = "INFO"
        log_file = str(tmp_path / "agent.log")

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLoggerClass()
    try:
        log.setup(Cfg())
        yield tmp_path / "agent.log"
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], level, logger_class = saved
        root.setLevel(level)
        logging.setLoggerClass(logger_class)


def _lines_of_a_call(logger):
    import threading
    with log.flow("flow-7"):
        logger.info("Attached volume %s path=%s", "v-1", "/dev/loop7")
        logger.info("FINISH %s ok (%.3f s)", "ManagedVolume.attach", 0.0012)
        logger.info("START %s(%s)", "x", mask.Masked(
            {"data": {"device_path": "/dev/x"}}, params=True))
        logger.warning("no args 100%")
        logger.info("with a secret %s", "auth_password=s3cret")
        logger.info("with a line break %s", "a\nb")
        logger.info("a mapping %(a)s", {"a": "b"})
        logger.info("an object %s", ValueError("boom"))
        logger.info(log.clean_line("made whole by its caller 100% (s)"))
    done = []
    t = threading.Thread(target=lambda: done.append(
        logger.info("from thread %s", "t")), name="operation-3")
    t.start()
    t.join()


def test_a_plain_line_is_written_as_logging_writes_it_without_a_record(
        agent_logging, monkeypatch):
    made = []
    make = logging.Logger.makeRecord

    def counted(self, *args, **kwargs):
        record = make(self, *args, **kwargs)
        made.append(record.getMessage())
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counted)
    logger = logging.getLogger("managedvolume.tests.fast")
    # The agent's one handler alone (pytest captures through its own).
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [
        h for h in root.handlers if isinstance(h, log.ReopenableFileHandler)])
    _lines_of_a_call(logger)
    fast = agent_logging.read_text().splitlines()
    # Only the lines that need masking, escaping or a mapping's keys
    # made a record: logging's path.
    assert sorted(made) == sorted([
        "with a secret auth_password=s3cret", "with a line break a\nb",
        "a mapping b", "an object boom"])
    agent_logging.write_text("")

    # Another handler beside the agent's: every line takes logging's
    # path, and writes the same text (time of day aside).
    seen = []

    class Caller(logging.Handler):
        def emit(self, record):
            seen.append((record.funcName, record.lineno))

    caller = Caller()
    logging.getLogger().addHandler(caller)
    try:
        _lines_of_a_call(logger)
    finally:
        logging.getLogger().removeHandler(caller)
    slow = agent_logging.read_text().splitlines()
    assert len(fast) == len(slow) == 10
    assert [line[24:] for line in fast] == [line[24:] for line in slow]
    assert "[managedvolume.tests.fast] [flow=flow-7] Attached volume v-1 " \
        "path=/dev/loop7" in fast[0]
    assert "(operation-3)" in fast[-1]
    assert "auth_password=" + mask.MASK in fast[4]
    assert "a\\nb" in fast[5]
    assert fast[8].endswith("[flow=flow-7] made whole by its caller 100% (s)")
    # logging's path through this package's loggers still finds the
    # caller, one frame past the logger's own.
    assert {f for f, _ in seen} == {"_lines_of_a_call", "<lambda>"}


def test_setup_gives_the_short_path_to_loggers_made_before_and_after(
        agent_logging):
    before = logging.getLogger("managedvolume.jsonrpc")
    after = logging.getLogger("managedvolume.tests.later")
    assert type(before) is type(after) is log._Logger


def test_a_flow_id_from_the_wire_is_cleaned_once(monkeypatch):
    # Cleaned when its frame is read; the worker's flow() and the
    # dispatcher's inside it take it as it is.
    seen = []
    real = mask.plainly_clean

    def counted(text):
        if text == "flow-from-the-wire":
            seen.append(text)
        return real(text)

    monkeypatch.setattr(mask, "plainly_clean", counted)
    flow_id = log.clean_flow_id("flow-from-the-wire")
    with log.flow(flow_id):
        with log.flow(flow_id):
            assert log.current_flow() == "flow-from-the-wire"
        assert log.current_flow() == "flow-from-the-wire"
    assert log.current_flow() == "-"
    assert len(seen) == 1
    assert log.clean_flow_id(flow_id) is flow_id
