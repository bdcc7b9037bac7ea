"""The STOMP 1.2 codec, checked against the specification, vdsm-client's
captured bytes and the independent stomp.py implementation."""

import pytest
import stomp.utils

from vdsm_managedvolume import stompframe
from vdsm_managedvolume.stompframe import Frame, FrameError, Parser

VDSM_SEND = (
    b"SEND\ndestination:jms.topic.vdsm_requests\n"
    b"content-type:application/json\nreply-to:3f4c\n"
    b"ovirtCorrelationId:myflow\ncontent-length:16\n\n"
    b'[{"id": "1234"}]\0')


def parse_all(data, **kw):
    return Parser(**kw).feed(data)


def test_parses_vdsm_client_send_exactly():
    [frame] = parse_all(VDSM_SEND)
    assert frame.command == "SEND"
    assert frame.headers == {
        "destination": "jms.topic.vdsm_requests",
        "content-type": "application/json",
        "reply-to": "3f4c",
        "ovirtCorrelationId": "myflow",
        "content-length": "16",
    }
    assert frame.body == b'[{"id": "1234"}]'


def test_byte_by_byte_feeding_gives_the_same_frames():
    data = b"\n\r\n" + VDSM_SEND + b"\n" + VDSM_SEND + b"\r\n\n"
    parser = Parser()
    frames = []
    for i in range(len(data)):
        frames.extend(parser.feed(data[i:i + 1]))
    assert frames == parse_all(VDSM_SEND + VDSM_SEND)
    assert parser.heartbeats == 5
    assert parser.buffered == 0


def test_eols_between_frames_are_heartbeats():
    parser = Parser()
    assert parser.feed(b"\n\n\r\n") == []
    assert parser.heartbeats == 3


def test_crlf_line_ends_are_accepted():
    [frame] = parse_all(b"CONNECT\r\naccept-version:1.2\r\n"
                        b"heart-beat:0,24000\r\n\r\n\0")
    assert frame == Frame("CONNECT", {"accept-version": "1.2",
                                      "heart-beat": "0,24000"})


def test_crlf_head_end_is_found_before_a_body_starting_with_lf():
    # The head ends at its first empty line, CRLF or LF, whichever comes
    # first: here the body's own LF must not be taken for the end.
    data = b"SEND\r\ndestination:d\r\n\r\n\nbody\0"
    [frame] = parse_all(data)
    assert frame == Frame("SEND", {"destination": "d"}, b"\nbody")
    parser = Parser()
    frames = []
    for i in range(len(data)):
        frames.extend(parser.feed(data[i:i + 1]))
    assert frames == [frame]


def test_content_length_body_may_hold_nuls():
    body = b"a\0b\0\0c"
    [frame] = parse_all(stompframe.encode("SEND", {"destination": "d"},
                                          body))
    assert frame.body == body


def test_body_without_content_length_ends_at_first_nul():
    [frame] = parse_all(b"SEND\ndestination:d\n\nhello\0")
    assert frame.body == b"hello"


def test_header_escapes_are_decoded():
    [frame] = parse_all(b"SEND\ndestination:a\\cb\\nc\\rd\\\\e\n\n\0")
    assert frame.headers["destination"] == "a:b\nc\rd\\e"


def test_connect_headers_are_taken_literally():
    [frame] = parse_all(b"CONNECT\naccept-version:1.2\nlogin:a\\b\n\n\0")
    assert frame.headers["login"] == "a\\b"


def test_repeated_header_first_wins():
    [frame] = parse_all(b"SEND\ndestination:one\ndestination:two\n\n\0")
    assert frame.headers["destination"] == "one"


def test_header_value_may_hold_colons_in_connect():
    [frame] = parse_all(b"CONNECT\naccept-version:1.2\nhost:a:b\n\n\0")
    assert frame.headers["host"] == "a:b"


@pytest.mark.parametrize("data,message", [
    (b"SEND\ndestination:a\\tb\n\n\0", "undefined escape"),
    (b"SEND\ndestination:a\\\n\n\0", "undefined escape"),
    (b"SEND\nno-colon-here\n\n\0", "has no ':'"),
    (b"SEND\n:empty-name\n\n\0", "empty name"),
    (b"send\n\n\0", "invalid command"),
    (b"SEND1\n\n\0", "invalid command"),
    (b"\xff\xfe\n\n\0", "invalid command"),
    (b"SEND\ncontent-length:-1\n\n\0", "invalid content-length"),
    (b"SEND\ncontent-length:abc\n\n\0", "invalid content-length"),
    (b"SEND\ncontent-length:2\n\nabc\0", "longer than its content-length"),
    (b"SUBSCRIBE\nid:1\ndestination:d\n\nbody\0", "must not have a body"),
    (b"SEND\nname:\xff\n\n\0", "not UTF-8"),
    (b"\rSEND\n\n\0", "CR not followed by LF"),
    (b"SEND\nbad\rheader:x\n\n\0", "bare CR"),
    (b"SEND\nh:v\r\r\n\n\0", "bare CR"),
    (b"SEND\nh:a\0b\n\n\0", "holds a NUL"),
])
def test_malformed_frames_are_refused_with_a_precise_reason(data, message):
    with pytest.raises(FrameError) as e:
        parse_all(data)
    assert message in str(e.value)


def test_unknown_command_is_refused_when_commands_are_given():
    parser = Parser(commands=stompframe.CLIENT_COMMANDS)
    with pytest.raises(FrameError, match="unknown command 'MESSAGE'"):
        parser.feed(b"MESSAGE\n\n\0")


def test_parser_stays_failed_after_an_error():
    parser = Parser()
    with pytest.raises(FrameError):
        parser.feed(b"SEND\nbad\n\n\0")
    with pytest.raises(FrameError, match="failed earlier"):
        parser.feed(b"SEND\n\n\0")


def test_announced_content_length_over_limit_is_refused_before_the_body():
    parser = Parser(max_frame=1000)
    with pytest.raises(FrameError, match="frame too large"):
        parser.feed(b"SEND\ncontent-length:10000000000\n\n")


def test_endless_headers_are_refused_at_the_limit():
    parser = Parser(max_frame=1000)
    parser.feed(b"SEND\n")
    with pytest.raises(FrameError, match="frame too large"):
        for _ in range(100):
            parser.feed(b"x-header:" + b"v" * 20 + b"\n")


def test_body_without_nul_is_refused_at_the_limit():
    parser = Parser(max_frame=1000)
    parser.feed(b"SEND\ndestination:d\n\n")
    with pytest.raises(FrameError, match="frame too large"):
        parser.feed(b"x" * 2000)


def test_frame_at_the_limit_is_accepted():
    data = stompframe.encode("SEND", {"destination": "d"}, b"x" * 100)
    [frame] = Parser(max_frame=len(data)).feed(data)
    assert len(frame.body) == 100
    with pytest.raises(FrameError, match="frame too large"):
        Parser(max_frame=len(data) - 1).feed(data)


def test_too_many_headers_are_refused():
    data = b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(200)) + \
        b"\n\0"
    with pytest.raises(FrameError, match="too many headers"):
        parse_all(data)


def test_encode_escapes_header_values_and_sets_content_length():
    data = stompframe.encode("MESSAGE", {
        "destination": "a:b\nc\\d", "content-length": "999"}, b"{}")
    assert data == (b"MESSAGE\ndestination:a\\cb\\nc\\\\d\n"
                    b"content-length:2\n\n{}\0")


def test_encode_does_not_escape_connected():
    data = stompframe.encode("CONNECTED", {"version": "1.2",
                                           "server": "x:y"})
    assert data == b"CONNECTED\nversion:1.2\nserver:x:y\n\n\0"


def test_encode_refuses_newlines_in_connected_headers():
    with pytest.raises(ValueError):
        stompframe.encode("CONNECTED", {"server": "a\nb"})


def test_encode_matches_vdsm_message_bytes():
    body = b'{"jsonrpc": "2.0", "id": "1", "result": true}'
    data = stompframe.encode("MESSAGE", {
        "destination": "d1", "content-type": "application/json",
        "subscription": "s1"}, body)
    assert data == (b"MESSAGE\ndestination:d1\ncontent-type:application/json"
                    b"\nsubscription:s1\ncontent-length:45\n\n" + body +
                    b"\0")


@pytest.mark.parametrize("value", [
    "plain", "a:b", "new\nline", "cr\rhere", "back\\slash", "\\c literal",
    "ünïcödé",
])
def test_header_round_trip(value):
    data = stompframe.encode("SEND", {"destination": value, value: "x"})
    [frame] = parse_all(data)
    assert frame.headers["destination"] == value
    assert frame.headers[value] == "x"


@pytest.mark.parametrize("value", ["a:b", "new\nline", "back\\slash",
                                   "ünïcödé"])
def test_stomp_py_reads_our_escapes(value):
    # stomp.py's own frame parser, independent from ours.
    data = stompframe.encode("MESSAGE", {"destination": value}, b"body")
    frame = stomp.utils.parse_frame(data[:-1])
    assert frame.cmd == "MESSAGE"
    assert frame.headers["destination"] == value
    assert frame.body == b"body"


def test_we_read_stomp_py_frames():
    frame = stomp.utils.Frame("SEND", {"destination": "/queue/a",
                                       "content-length": 5}, "hello")
    data = b"".join(stomp.utils.convert_frame(frame))
    [parsed] = parse_all(data)
    assert parsed.command == "SEND"
    assert parsed.headers["destination"] == "/queue/a"
    assert parsed.body == b"hello"


@pytest.mark.parametrize("value,expected", [
    (None, (0, 0)), ("0,24000", (0, 24000)), ("10, 20", (10, 20)),
])
def test_parse_heartbeat(value, expected):
    assert stompframe.parse_heartbeat(value) == expected


@pytest.mark.parametrize("value", ["", "1", "a,b", "-1,0", "1,2,3"])
def test_parse_heartbeat_refuses_garbage(value):
    with pytest.raises(FrameError, match="invalid heart-beat"):
        stompframe.parse_heartbeat(value)


@pytest.mark.parametrize("destination, subscription, message_id, body", [
    ("reply-1", "sub-1", "1", b'{"jsonrpc": "2.0", "id": 1}'),
    ("a:b\nc\\d\re", "s:1", 17, '{"x": "\u00e9"}'),
    ("\u00e9t\u00e9", "sub", "2", b"\0 in a body"),
    ("d", "s", "3", b""),
])
def test_json_message_is_the_frame_encode_makes(destination, subscription,
                                                message_id, body):
    assert stompframe.json_message(destination, subscription, message_id,
                                   body) == stompframe.encode(
        stompframe.MESSAGE, {"destination": destination,
                             "content-type": "application/json",
                             "subscription": subscription,
                             "message-id": message_id}, body)
