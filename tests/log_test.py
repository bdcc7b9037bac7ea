"""The log filter: flow ids, masking, and no forged lines."""

import logging

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import log
from vdsm_managedvolume import mask


@pytest.mark.parametrize("raw, shown", [
    ("a\nb", "a\\nb"),
    ("a\r\nb", "a\\r\\nb"),
    ("nul\x00", "nul\\x00"),
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
    assert "[flow=flow\\nforged]" in lines[3]


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
