"""The STOMP server (stompserver.py), in process, over plain loopback TCP
and mutual TLS, driven by raw sockets, our client and the independent
stomp.py client.

The dispatcher is a stub here (tests/agentutil.py); the real service is
driven through the ``managedvolume-agent`` process in agent_process_test.py.
"""

import argparse
import json
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import stomp

from vdsm_managedvolume import errors
from vdsm_managedvolume import pki
from vdsm_managedvolume import stompclient
from vdsm_managedvolume import stompframe
from vdsm_managedvolume import stompserver

from . import agentutil
from .agentutil import request, send_bytes, subscribe_bytes


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    # One development PKI for the module: creating keys is cheap, but the
    # test servers should share a CA like a real deployment does.
    d = tmp_path_factory.mktemp("state")
    pki.ensure_dev_pki(agentutil.make_config(d))
    return d


@pytest.fixture(params=["tcp", "tls"])
def running(request, pki_dir, tmp_path):
    run = _start(request.param, pki_dir, tmp_path)
    yield run
    run.stop()


@pytest.fixture
def tcp(pki_dir, tmp_path):
    run = _start("tcp", pki_dir, tmp_path)
    yield run
    run.stop()


def _start(kind, pki_dir, tmp_path, dispatcher=None, **overrides):
    cfg = agentutil.make_config(pki_dir, **overrides)
    cfg.state_run_dir = str(tmp_path / "run")
    return agentutil.Running(cfg, dispatcher or agentutil.StubDispatcher(),
                             tls=(kind == "tls"))


# The session, verb by verb

def test_vdsm_client_connect_gets_connected_version_and_heartbeat(running):
    with running.raw() as c:
        c.send(agentutil.VDSM_CONNECT)
        frame = c.frame()
        assert frame.command == "CONNECTED"
        assert frame.headers["version"] == "1.2"
        # We send every 24 s (the client's cy); we ask nothing back.
        assert frame.headers["heart-beat"] == "24000,0"


def test_vdsm_client_bytes_get_a_message_with_vdsm_headers(running):
    with running.raw() as c:
        c.send(agentutil.VDSM_CONNECT)
        c.frame()
        c.send(subscribe_bytes("5e4b6d84-reply", "ab12-sub"))
        c.send(send_bytes(request("echo", {"a": 1}, "1234"),
                          "5e4b6d84-reply", flow_id="myflow"))
        frame = c.frame()
    assert frame.command == "MESSAGE"
    assert frame.headers["destination"] == "5e4b6d84-reply"
    assert frame.headers["content-type"] == "application/json"
    assert frame.headers["subscription"] == "ab12-sub"
    assert int(frame.headers["content-length"]) == len(frame.body)
    # An array holding one request gets a single object.
    response = json.loads(frame.body)
    assert response == {"jsonrpc": "2.0", "id": "1234", "result": {
        "params": {"a": 1}, "flow": "myflow", "flow_arg": "myflow"}}


def test_stomp_command_works_like_connect(tcp):
    with tcp.raw() as c:
        c.send(b"STOMP\naccept-version:1.1,1.2\nhost:x\n\n\0")
        frame = c.frame()
        assert frame.command == "CONNECTED"
        assert frame.headers["heart-beat"] == "0,0"


def test_a_tls_client_on_the_plain_port_gets_an_error_frame_at_once(
        pki_dir, tmp_path):
    # It waited idle_timeout for a frame that never came, and the client
    # its whole --timeout for a ServerHello.
    run = _start("tcp", pki_dir, tmp_path, idle_timeout=3600.0)
    try:
        with run.raw(timeout=30) as c:
            c.send(b"\x16\x03\x01\x00\x05hello")
            frames = c.eof()
        assert [f.command for f in frames] == ["ERROR"]
        assert frames[0].headers["message"] == (
            "TLS handshake on a plain TCP port: this agent serves without "
            "TLS (a client needs --insecure)")

        # What a real TLS client makes of it, and what the admin reads.
        context = pki.dev_client_context(agentutil.make_config(pki_dir))
        with socket.create_connection(run.address, timeout=30) as sock:
            with pytest.raises(ssl.SSLError) as e:
                context.wrap_socket(sock, server_hostname="localhost")
        assert e.value.reason == "WRONG_VERSION_NUMBER"
        from vdsm_managedvolume import client
        hint = client._hint(argparse.Namespace(use_tls=True), e.value)
        assert hint == (" (the server serves plain TCP, without TLS: use "
                        "--insecure)")
    finally:
        run.stop()


def test_client_heartbeat_offer_is_accepted(tcp):
    with tcp.raw() as c:
        frame = c.connect(heartbeat="5000,0")
        assert frame.headers["heart-beat"] == "0,5000"


def test_disconnect_with_receipt_gets_receipt_then_close(running):
    with running.raw() as c:
        c.connect()
        c.send(b"DISCONNECT\nreceipt:r-77\n\n\0")
        frames = c.eof()
    assert [(f.command, f.headers) for f in frames] == [
        ("RECEIPT", {"receipt-id": "r-77"})]


def test_receipt_is_sent_for_subscribe(tcp):
    with tcp.raw() as c:
        c.connect()
        c.send(b"SUBSCRIBE\ndestination:d\nid:1\nreceipt:r1\n\n\0")
        frame = c.frame()
        assert (frame.command, frame.headers) == (
            "RECEIPT", {"receipt-id": "r1"})


def test_ack_and_nack_are_accepted_and_ignored(tcp):
    with tcp.raw() as c:
        c.connect()
        c.send(b"SUBSCRIBE\ndestination:d\nid:1\nack:client\n\n\0")
        c.send(b"ACK\nid:m1\n\n\0NACK\nid:m2\nreceipt:r\n\n\0")
        frame = c.frame()
        assert (frame.command, frame.headers) == (
            "RECEIPT", {"receipt-id": "r"})


def test_send_without_reply_to_is_handled_without_response(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        c.send(b"SEND\ndestination:jms.topic.vdsm_requests\n"
               b"content-type:application/json\n\n" +
               request("echo", {}, "silent").encode() + b"\0")
        frame, response = c.call(request("echo", {}, "loud"))
        assert response["id"] == "loud"
        # The two SENDs run on different pool threads: "silent" may be
        # handled after "loud" has been answered (CI, stop 23). Wait for
        # it, then check no answer to it came before the next one.
        agentutil.wait_for(lambda: len(tcp.dispatcher.bodies) == 2)
        frame, response = c.call(request("echo", {}, "after"))
        assert response["id"] == "after"
    assert len(tcp.dispatcher.bodies) == 3


def test_request_to_a_sub_destination_is_served(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        c.send(send_bytes(request("echo", {}, "x"), "reply-queue",
                          destination="jms.topic.vdsm_requests.extra"))
        assert json.loads(c.frame().body)["id"] == "x"


def test_notification_gets_no_response(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        c.send(send_bytes(json.dumps({"jsonrpc": "2.0", "method": "echo"}),
                          "reply-queue"))
        frame, response = c.call(request("echo", {}, "after"))
    assert response["id"] == "after"


def test_parse_error_goes_to_vdsm_responses_when_subscribed(running):
    with running.raw() as c:
        c.connect()
        c.subscribe()
        c.subscribe("jms.topic.vdsm_responses", "events")
        c.send(send_bytes("{not json", "reply-queue"))
        frame = c.frame()
    assert frame.headers["destination"] == "jms.topic.vdsm_responses"
    assert frame.headers["subscription"] == "events"
    response = json.loads(frame.body)
    assert response["id"] is None
    assert response["error"]["code"] == -32700


def test_parse_error_goes_to_reply_to_without_vdsm_responses(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        frame, response = c.call("{not json")
    assert frame.headers["destination"] == "reply-queue"
    assert response["error"]["code"] == -32700


def test_header_escapes_reach_the_reply_destination(tcp):
    with tcp.raw() as c:
        c.connect()
        c.send(b"SUBSCRIBE\ndestination:q\\cwith\\ncolon\\\\\nid:s\\c1\n\n\0")
        body = request("echo", {}, "e").encode()
        c.send(b"SEND\ndestination:jms.topic.vdsm_requests\n"
               b"reply-to:q\\cwith\\ncolon\\\\\ncontent-length:%d\n\n%s\0"
               % (len(body), body))
        frame = c.frame()
    assert frame.headers["destination"] == "q:with\ncolon\\"
    assert frame.headers["subscription"] == "s:1"


def test_body_with_nul_reaches_the_dispatcher_whole(tcp):
    body = b'[{"jsonrpc": "2.0", "method": "echo", "id": "n"}]\0\0  '
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        c.send(send_bytes(body, "reply-queue"))
        c.frame()
    assert tcp.dispatcher.bodies == [body]


def test_response_goes_to_the_subscription_of_another_connection(tcp):
    with tcp.raw() as listener, tcp.raw() as sender:
        listener.connect()
        listener.send(subscribe_bytes("shared-replies", "L"))
        listener.send(b"SUBSCRIBE\ndestination:x\nid:sync\nreceipt:s\n\n\0")
        listener.frame()                      # the receipt: subscribed
        sender.connect()
        sender.send(send_bytes(request("echo", {}, "o"), "shared-replies"))
        frame = listener.frame()
    assert frame.headers["subscription"] == "L"
    assert json.loads(frame.body)["id"] == "o"


def test_a_response_whose_connection_closes_before_the_write_is_routed(
        tcp, monkeypatch):
    # The worker saw its connection open, then the I/O thread closed it
    # before the write: the response goes the loop's way, to another
    # connection subscribed to the same reply-to (a reconnected engine),
    # not silently nowhere.
    write = stompserver.Connection.write

    def closed_first(conn, data):
        done = threading.Event()
        tcp.server.call_soon(lambda: (conn.close(), done.set()))
        assert done.wait(30)
        return write(conn, data)

    with tcp.raw() as listener, tcp.raw() as sender:
        listener.connect()
        listener.send(subscribe_bytes("shared-replies", "L"))
        listener.send(b"SUBSCRIBE\ndestination:x\nid:sync\nreceipt:s\n\n\0")
        listener.frame()                      # the receipt: subscribed
        sender.connect()
        sender.send(subscribe_bytes("shared-replies", "S"))
        monkeypatch.setattr(stompserver.Connection, "write", closed_first)
        sender.send(send_bytes(request("echo", {}, "o"), "shared-replies"))
        frame = listener.frame()
    assert frame.headers["subscription"] == "L"
    assert json.loads(frame.body)["id"] == "o"


def test_a_worker_finding_the_connection_lock_taken_leaves_it_to_the_loop(
        running, monkeypatch):
    # An operation's answer is written holding the data plane's only
    # slot (gate.py): the worker never waits for the connection's lock,
    # whose holder (the I/O thread flushing, a control-plane worker
    # writing) needs the interpreter lock to let it go.  The frame is
    # not taken and the loop delivers it once the lock is free.
    write = stompserver.Connection.write
    taken = []

    def lock_held(conn, data):
        with agentutil.held_elsewhere(conn._lock):
            taken.append(write(conn, data))
        return taken[-1]

    with running.raw() as c:
        c.connect()
        c.subscribe()
        monkeypatch.setattr(stompserver.Connection, "write", lock_held)
        frame, response = c.call(request("echo", {"i": 1}, "1"))
    assert taken == [False]
    assert response["id"] == "1"
    assert response["result"]["params"] == {"i": 1}
    assert frame.headers["subscription"] == "sub-1"


def test_unsubscribed_destination_gets_no_response(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        c.send(b"UNSUBSCRIBE\nid:sub-1\n\n\0")
        c.send(send_bytes(request("echo", {}, "lost"), "reply-queue"))
        c.subscribe("other", "sub-2")
        frame, response = c.call(request("echo", {}, "found"), "other")
    assert response["id"] == "found"


def test_error_response_is_raised_as_the_matching_error_class(running):
    with stompclient.Client("localhost", running.address[1],
                            running.client_context, timeout=10) as client:
        with pytest.raises(errors.AlreadyAttached) as e:
            client.call("fail", {"code": 927, "message": "attached at /x"})
        assert e.value.code == 927
        assert str(e.value) == "attached at /x"
        with pytest.raises(errors.AgentBusy):
            client.call("fail", {"code": 933, "message": "busy"})
        with pytest.raises(errors.Error) as e:
            client.call("fail", {"code": 4242, "message": "unknown"})
        assert e.value.code == 4242
        assert client.call("echo", {"x": 1}, flow_id="f")["flow"] == "f"


def test_dispatcher_crash_becomes_internal_error(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        frame, response = c.call(request("boom", {}, "b"))
    assert response["id"] == "b"
    assert response["error"]["code"] == -32603
    assert "stub exploded" in response["error"]["message"]


# Protocol errors: an ERROR frame, the connection closed, others unharmed

@pytest.mark.parametrize("frames,message", [
    # Served before CONNECT (see below), so checked like any frame.
    (b"SEND\ndestination:x\n\n\0", "unknown destination 'x'"),
    (b"CONNECT\nheart-beat:0,0\n\n\0", "missing accept-version"),
    (b"CONNECT\naccept-version:1.0,1.1\n\n\0", "unsupported STOMP version"),
    (b"CONNECT\naccept-version:1.2\nheart-beat:x\n\n\0",
     "invalid heart-beat"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "invalid command"),
    (agentutil.VDSM_CONNECT + b"FOO\n\n\0", "unknown command 'FOO'"),
    (agentutil.VDSM_CONNECT + b"MESSAGE\n\n\0", "unknown command 'MESSAGE'"),
    (agentutil.VDSM_CONNECT + b"ACK\n\n\0", "ACK needs a id header"),
    (agentutil.VDSM_CONNECT + b"BEGIN\ntransaction:t\n\n\0",
     "BEGIN is not supported"),
    (agentutil.VDSM_CONNECT + agentutil.VDSM_CONNECT, "already connected"),
    (agentutil.VDSM_CONNECT + b"SUBSCRIBE\nid:1\n\n\0",
     "SUBSCRIBE needs a destination header"),
    (agentutil.VDSM_CONNECT + b"SUBSCRIBE\ndestination:d\n\n\0",
     "SUBSCRIBE needs a id header"),
    (agentutil.VDSM_CONNECT + b"SUBSCRIBE\ndestination:d\nid:1\nack:never"
     b"\n\n\0", "invalid ack mode 'never'"),
    (agentutil.VDSM_CONNECT + subscribe_bytes("d", "1") +
     subscribe_bytes("e", "1"), "subscription id '1' is already in use"),
    (agentutil.VDSM_CONNECT + b"SEND\n\n\0",
     "SEND needs a destination header"),
    (agentutil.VDSM_CONNECT + b"SEND\ndestination:/queue/nobody\n\n\0",
     "unknown destination '/queue/nobody'"),
    (agentutil.VDSM_CONNECT + b"SEND\ndestination:a\\qb\n\n\0",
     "undefined escape"),
    (agentutil.VDSM_CONNECT + b"SEND\ndestination:d\ncontent-length:1\n\n"
     b"xy\0", "longer than its content-length"),
    (agentutil.VDSM_CONNECT + b"SUBSCRIBE\nid:1\ndestination:d\n\nbody\0",
     "must not have a body"),
])
def test_protocol_error_gets_error_frame_and_close(running, frames,
                                                   message):
    with running.raw() as bad:
        bad.send(frames)
        seen = bad.eof()
    errors_seen = [f for f in seen if f.command == "ERROR"]
    assert len(errors_seen) == 1, seen
    error = errors_seen[0]
    assert message in error.headers["message"]
    assert message in error.body.decode()
    assert running.dispatcher.bodies == []
    # The agent keeps serving others.
    with running.raw() as good:
        good.connect()
        good.subscribe()
        frame, response = good.call(request("echo", {}, "still"))
        assert response["id"] == "still"


def test_error_frame_carries_receipt_id_of_the_bad_frame(tcp):
    with tcp.raw() as c:
        c.connect()
        c.send(b"SUBSCRIBE\nid:1\nreceipt:r9\n\n\0")
        [error] = c.eof()
    assert error.headers["receipt-id"] == "r9"


def test_error_is_read_even_when_more_bytes_follow(tcp):
    # Closing with unread input would reset the connection and lose the
    # ERROR frame; the agent half-closes and drains instead.
    with tcp.raw() as c:
        c.send(b"BOGUS\n\n\0" + b"x" * 200000)
        frames = c.eof()
    assert frames[0].command == "ERROR"


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_oversized_frame_gets_frame_too_large(kind, pki_dir, tmp_path):
    run = _start(kind, pki_dir, tmp_path, max_frame=4096)
    try:
        with run.raw() as c:
            c.connect()
            c.subscribe()
            c.send(send_bytes("x" * 5000, "reply-queue"))
            [error] = c.eof()
        assert "frame too large" in error.headers["message"]
        # Announced only: refused before the body is sent.
        with run.raw() as c:
            c.connect()
            c.send(b"SEND\ndestination:jms.topic.vdsm_requests\n"
                   b"content-length:999999999\n\n")
            [error] = c.eof()
        assert "frame too large" in error.headers["message"]
        assert run.dispatcher.bodies == []
        with run.raw() as c:
            c.connect()
            c.subscribe()
            frame, response = c.call(request("echo", {}, "ok"))
            assert response["id"] == "ok"
    finally:
        run.stop()


def test_client_that_never_sends_connect_is_dropped(pki_dir, tmp_path):
    run = _start("tcp", pki_dir, tmp_path, idle_timeout=0.5)
    try:
        with run.raw() as c:
            [error] = c.eof(timeout=20)
        assert "no CONNECT frame within 0.5 seconds" in \
            error.headers["message"]
    finally:
        run.stop()


def test_connected_client_that_sends_no_heartbeats_may_stay_silent(
        pki_dir, tmp_path):
    # As vdsm does: the engine keeps its connection between calls and
    # sends heart-beat:0,N (no heart-beats from it).  idle_timeout bounds
    # the wait for CONNECT, a partial frame and unread output only.
    run = _start("tcp", pki_dir, tmp_path, idle_timeout=0.5)
    try:
        with run.raw() as c:
            c.connect(heartbeat="0,0")
            c.subscribe()
            time.sleep(1.5)
            frame, response = c.call(request("echo", {}, "later"))
            assert response["id"] == "later"
    finally:
        run.stop()


# Heart-beats

def test_idle_client_hears_heartbeats(running):
    with running.raw() as c:
        frame = c.connect(heartbeat="0,1000")
        assert frame.headers["heart-beat"] == "1000,0"
        c.sock.settimeout(20)
        data = c.sock.recv(100)
        assert data == b"\n"


def test_heartbeats_flow_while_a_long_call_runs(tcp):
    with tcp.raw() as c:
        c.connect(heartbeat="0,1000")
        c.subscribe()
        c.send(send_bytes(request("sleep", {"seconds": 3}, "long"),
                          "reply-queue"))
        frame = c.frame(timeout=30)
        assert frame.command == "MESSAGE"
        # Heart-beats arrived before the response.
        assert c.parser.heartbeats >= 1


def test_tiny_heartbeat_request_is_raised_to_our_minimum(tcp):
    with tcp.raw() as c:
        frame = c.connect(heartbeat="0,10")
        assert frame.headers["heart-beat"] == "1000,0"


# What ovirt-engine's client (vdsm-jsonrpc-java) needs from the wire, as
# vdsm's server does it (docs/interop.md); tests/enginejava_test.py drives
# the agent with that client itself.

@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_each_frame_is_written_in_tls_records_of_its_own(
        version, pki_dir, tmp_path):
    # The engine's TLS reader parses one frame per record it reads: frames
    # packed into one record stayed unparsed and concurrent calls wedged.
    run = _start("tls", pki_dir, tmp_path)
    ctx = pki.dev_client_context(run.cfg)
    ctx.minimum_version = ctx.maximum_version = getattr(
        ssl.TLSVersion, version)
    try:
        with agentutil.TlsRecords(run.address, ctx) as c:
            # One write: the agent answers all of it in one round (the
            # CONNECTED and RECEIPT frames at once, the responses as the
            # workers finish).
            c.send(agentutil.VDSM_CONNECT +
                   b"SUBSCRIBE\ndestination:reply-queue\nid:s\nreceipt:r1"
                   b"\n\n\0" +
                   b"SUBSCRIBE\ndestination:other\nid:t\nreceipt:r2\n\n\0" +
                   b"".join(send_bytes(request("echo", {}, str(i)),
                                       "reply-queue") for i in range(8)))
            records = c.frames(11)
    finally:
        run.stop()
    for data, frames in records:
        assert len(frames) == 1 or (data == b"\n" and not frames), (
            "one TLS record holds {}".format(data[:300]))
    commands = [f.command for _, frames in records for f in frames]
    assert commands[:3] == ["CONNECTED", "RECEIPT", "RECEIPT"]
    assert sorted(commands[3:]) == ["MESSAGE"] * 8


def test_tls_heartbeat_is_a_tls_record_of_its_own(pki_dir, tmp_path):
    run = _start("tls", pki_dir, tmp_path)
    try:
        with agentutil.TlsRecords(run.address,
                                  pki.dev_client_context(run.cfg)) as c:
            c.send(b"CONNECT\naccept-version:1.2\nheart-beat:0,1000\n\n\0")
            [(_, [connected])] = c.frames(1)
            assert connected.headers["heart-beat"] == "1000,0"
            assert c.record() == b"\n"
    finally:
        run.stop()


def test_heartbeat_is_queued_when_due_even_while_output_is_pending(
        pki_dir, tmp_path):
    # The heart-beat schedule counts from the last byte written; output
    # waiting for a slow reader does not suppress it, and it is queued as
    # an item of its own (its own write), never appended to a frame.
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        owner = agentutil.ConnectionOwner(agentutil.make_config(pki_dir))
        conn = stompserver.Connection(owner, ours, "test")
        conn.state = conn.CONNECTED
        conn.send_interval = 1.0
        frame = stompframe.encode("MESSAGE", {"destination": "d"}, b"x")
        conn.send(frame)
        # Due while the frame still waits to be written: queued behind it.
        conn.check_deadlines(conn.last_send + 1.5)
        # Due again later: one heart-beat waiting is enough.
        conn.check_deadlines(conn.last_send + 3.0)
        conn.update()
        peer.settimeout(10)
        data = b""
        while len(data) < len(frame) + 1:
            data += peer.recv(65536)
        assert data == frame + b"\n"
        peer.settimeout(0.2)
        with pytest.raises(socket.timeout):
            peer.recv(65536)
        conn.close()
    finally:
        ours.close()
        peer.close()


def test_subscribe_before_connect_is_served_as_vdsm_does(running):
    # ovirt-engine's plain client sends SUBSCRIBE before CONNECT on about
    # half of its new connections.
    with running.raw() as c:
        c.send(subscribe_bytes("reply-queue", "early"))
        frame = c.connect(heartbeat="0,5000")
        assert frame.headers["heart-beat"] == "5000,0"
        frame, response = c.call(request("echo", {}, "after"))
    assert frame.headers["subscription"] == "early"
    assert response["id"] == "after"


def test_request_before_connect_is_answered_without_heartbeats(tcp):
    with tcp.raw() as c:
        c.subscribe()
        frame, response = c.call(request("echo", {}, "first"))
        assert response["id"] == "first"
        # Until CONNECT, vdsm's defaults: no heart-beats either way.
        assert c.parser.heartbeats == 0
        frame = c.connect(heartbeat="0,1000")
        assert frame.headers["heart-beat"] == "1000,0"
        c.sock.settimeout(20)
        assert c.sock.recv(100) == b"\n"


def test_connect_after_frames_is_still_refused_twice(tcp):
    with tcp.raw() as c:
        c.subscribe()
        c.connect()
        c.send(agentutil.VDSM_CONNECT)
        [error] = c.eof()
    assert "already connected" in error.headers["message"]


def test_unsubscribe_of_unknown_id_is_ignored_as_vdsm_does(running):
    # ovirt-engine's client sends such UNSUBSCRIBEs while it closes.
    with running.raw() as c:
        c.connect()
        c.send(b"UNSUBSCRIBE\nid:never-subscribed\nreceipt:u\n\n\0")
        frame = c.frame()
        assert (frame.command, frame.headers) == (
            "RECEIPT", {"receipt-id": "u"})
        c.subscribe()
        frame, response = c.call(request("echo", {}, "alive"))
    assert response["id"] == "alive"


# The worker pool

def test_full_pool_answers_agent_busy_at_once(pki_dir, tmp_path):
    run = _start("tcp", pki_dir, tmp_path, workers=1, max_queue=1)
    stub = run.dispatcher
    try:
        with run.raw() as c:
            c.connect()
            c.subscribe()
            c.send(send_bytes(request("wait", {}, "running"), "reply-queue"))
            assert stub.started.acquire(timeout=10)
            c.send(send_bytes(request("echo", {}, "queued"), "reply-queue"))
            c.send(send_bytes(request("echo", {}, "refused"), "reply-queue"))
            frame = c.frame()
            busy = json.loads(frame.body)
            assert busy["id"] == "refused"
            assert busy["error"]["code"] == errors.AgentBusy.code
            assert "all 1 workers" in busy["error"]["message"]
            stub.release.set()
            ids = {json.loads(c.frame().body)["id"] for _ in range(2)}
            assert ids == {"running", "queued"}
    finally:
        stub.release.set()
        run.stop()


# Clients

def test_stomp_py_client_drives_every_verb(running):
    received = []
    got = threading.Event()

    class Listener(stomp.ConnectionListener):
        def on_message(self, frame):
            received.append(frame)
            got.set()

    conn = stomp.Connection12([running.address], heartbeats=(0, 1000),
                              timeout=10)
    if running.tls:
        cert, key, ca = pki.client_files(running.cfg)
        conn.set_ssl([running.address], key_file=key, cert_file=cert,
                     ca_certs=ca)
    conn.set_listener("l", Listener())
    conn.connect(wait=True, headers={"heart-beat": "0,1000"})
    try:
        conn.subscribe("py-replies", id="py-sub", ack="auto")
        conn.send("jms.topic.vdsm_requests", request("echo", {"k": "v"},
                                                     "py-1"),
                  content_type="application/json",
                  headers={"reply-to": "py-replies",
                           "ovirtCorrelationId": "py-flow"})
        assert got.wait(10)
        frame = received[0]
        assert frame.headers["subscription"] == "py-sub"
        response = json.loads(frame.body)
        assert response["result"]["flow"] == "py-flow"
        conn.unsubscribe("py-sub")
    finally:
        conn.disconnect(receipt="bye")


def test_our_client_calls_concurrently_from_many_connections(running):
    results = []

    def work(i):
        with stompclient.Client("localhost", running.address[1],
                                running.client_context, timeout=30) as c:
            for j in range(5):
                results.append(c.call("echo", {"i": i, "j": j})["params"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted((r["i"], r["j"]) for r in results) == [
        (i, j) for i in range(8) for j in range(5)]


def test_a_worker_writes_its_response_without_waking_the_loop(
        running, monkeypatch):
    # One thread hand-off per request: the I/O thread hands the request
    # to a worker, which writes the response itself when its connection
    # has nothing else queued; the loop is not woken to do it.  (Handed
    # off at the round's end, however slowly a loaded machine runs it:
    # handed off earlier, the worker may find the connection's lock held
    # by the I/O thread and leave its response to the loop.)
    monkeypatch.setattr(stompserver, "HANDOFF_AFTER", 3600.0)
    wakes = []
    wake = running.server._wake
    running.server._wake = lambda: (wakes.append(1), wake())
    with running.raw() as c:
        c.connect()
        c.subscribe()
        ids = []
        for i in range(20):
            frame, response = c.call(request("echo", {"i": i}, str(i)))
            assert response["id"] == str(i)
            assert response["result"]["params"] == {"i": i}
            assert frame.headers["subscription"] == "sub-1"
            assert frame.headers["destination"] == "reply-queue"
            ids.append(int(frame.headers["message-id"]))
    assert wakes == []
    assert ids == sorted(set(ids))


def test_a_long_round_of_the_loop_wakes_the_workers_before_it_ends(
        tcp, monkeypatch):
    # The workers of the jobs a round accepts are woken when it ends,
    # unless it has run for HANDOFF_AFTER (or accepted HANDOFF_JOBS):
    # here the read that accepted the request takes longer than that, and
    # the request runs before the round's end (_deliver_results).
    dispatcher = tcp.dispatcher
    server = tcp.server
    ready = stompserver.Connection.ready
    rounds = []

    def slow_ready(conn, events):
        ready(conn, events)
        if server._pool.pending and not rounds:     # the request taken
            rounds.append("long")
            time.sleep(stompserver.HANDOFF_AFTER * 5)

    deliver = server._deliver_results

    def round_end():
        if rounds == ["long"]:
            rounds.append(dispatcher.started.acquire(timeout=10))
            dispatcher.release.set()
        deliver()

    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        monkeypatch.setattr(stompserver.Connection, "ready", slow_ready)
        monkeypatch.setattr(server, "_deliver_results", round_end)
        try:
            frame, response = c.call(request("wait", {}, "w"))
        finally:
            dispatcher.release.set()
    assert response == {"jsonrpc": "2.0", "id": "w", "result": True}
    assert rounds == ["long", True]


def test_a_round_accepting_many_requests_wakes_their_workers_before_it_ends(
        tcp, monkeypatch):
    # HANDOFF_JOBS requests read at once are handed to their workers
    # after that read, not at the round's end.
    dispatcher = tcp.dispatcher
    server = tcp.server
    count = stompserver.HANDOFF_JOBS
    monkeypatch.setattr(stompserver, "HANDOFF_AFTER", 3600.0)
    started = []
    deliver = server._deliver_results

    def round_end():
        if not started and server._pool.pending == count:
            started.append(all(dispatcher.started.acquire(timeout=10)
                               for _ in range(count)))
            dispatcher.release.set()
        deliver()

    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        monkeypatch.setattr(server, "_deliver_results", round_end)
        c.send(b"".join(send_bytes(request("wait", {}, str(i)),
                                   "reply-queue") for i in range(count)))
        ids = {json.loads(c.frame().body)["id"] for _ in range(count)}
    assert ids == {str(i) for i in range(count)}
    assert started == [True]


def test_responses_to_a_peer_not_reading_yet_arrive_whole_and_once(
        running):
    # Workers writing at once meet a full socket: what it does not take
    # is queued as the loop queues it (TLS: to be retried as it was), and
    # the loop writes it once the peer reads.
    count, size = 64, 60000     # frames just under one send() each
    with running.raw(timeout=60) as c:
        c.connect()
        c.subscribe()
        # Small socket buffers both ends: the first responses fill them.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        [conn] = running.server._connections
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        c.send(b"".join(
            send_bytes(request("big", {"size": size}, str(i)), "reply-queue")
            for i in range(count)))
        time.sleep(0.5)     # let the socket buffers fill
        results = {}
        for _ in range(count):
            frame = c.frame()
            assert frame.command == "MESSAGE", frame
            response = json.loads(frame.body)
            assert response["id"] not in results
            results[response["id"]] = response["result"]
    assert results == {str(i): "x" * size for i in range(count)}


def test_large_response_arrives_whole(running):
    # Responses are not bound by max_frame (that limits what we accept).
    size = 3 * 1024 * 1024
    with stompclient.Client("localhost", running.address[1],
                            running.client_context, timeout=30) as c:
        assert c.call("big", {"size": size}) == "x" * size


# Shutdown

def test_shutdown_lets_in_flight_calls_finish(tcp):
    with tcp.raw() as c:
        c.connect()
        c.subscribe()
        c.send(send_bytes(request("sleep", {"seconds": 1.5}, "inflight"),
                          "reply-queue"))
        time.sleep(0.3)
        tcp.server.shutdown()
        frame = c.frame(timeout=20)
        assert json.loads(frame.body)["id"] == "inflight"
        assert c.eof(timeout=20) == []
    tcp.stop(timeout=20)
    with pytest.raises(OSError):
        socket.create_connection(tcp.address, timeout=5)


def test_shutdown_waits_for_an_answer_its_worker_is_delivering(
        pki_dir, tmp_path):
    # A worker delivers its answer after giving its pool slot back (so
    # that the client's next request finds the slot free): the drain must
    # not close the connection under it.
    run = _start("tcp", pki_dir, tmp_path)
    respond = run.server._respond

    def slow_respond(*args):
        time.sleep(0.5)
        respond(*args)

    run.server._respond = slow_respond
    try:
        with run.raw() as c:
            c.connect()
            c.subscribe()
            c.send(send_bytes(request("wait", {}, "inflight"),
                              "reply-queue"))
            assert run.dispatcher.started.acquire(timeout=10)
            run.server.shutdown()
            run.dispatcher.release.set()
            frame = c.frame()
            assert frame is not None, "closed before the answer"
            assert json.loads(frame.body)["id"] == "inflight"
    finally:
        run.dispatcher.release.set()
        run.stop()


def test_request_during_shutdown_is_refused_with_933(pki_dir, tmp_path):
    run = _start("tcp", pki_dir, tmp_path)
    try:
        with run.raw() as c:
            c.connect()
            c.subscribe()
            c.send(send_bytes(request("wait", {}, "inflight"),
                              "reply-queue"))
            assert run.dispatcher.started.acquire(timeout=10)
            run.server.shutdown()
            c.send(send_bytes(request("echo", {}, "late"), "reply-queue"))
            late = json.loads(c.frame().body)
            assert late["id"] == "late"
            assert late["error"]["code"] == 933
            assert "shutting down" in late["error"]["message"]
            run.dispatcher.release.set()
            assert json.loads(c.frame().body)["id"] == "inflight"
    finally:
        run.dispatcher.release.set()
        run.stop()


def test_a_request_costs_the_loop_only_the_connections_it_touches(pki_dir):
    # Each round of the I/O loop looks at the connections with something
    # new (events, output, a close) and at all of them only when the
    # earliest deadline comes (at least once a second): idle connections
    # do not slow every request down.
    server = stompserver.Server(agentutil.make_config(pki_dir), None)
    looked = []

    class Idle:
        closed = False

        def __init__(self, name, deadline=None):
            self.name = name
            self.deadline = deadline

        def check_deadlines(self, now):
            looked.append(self.name)
            return self.deadline

        def update(self):
            pass

    conns = [Idle(i) for i in range(100)]
    server._connections.update(conns)
    now = time.monotonic()
    assert server._expire(now) == pytest.approx(1.0)  # all of them
    assert sorted(looked) == list(range(100))
    del looked[:]
    server.touch(conns[7])
    server._expire(now + 0.25)
    assert looked == [7]
    del looked[:]
    # A touched connection's deadline is the next round's, before the
    # others' second comes.
    conns[9].deadline = now + 0.5
    server.touch(conns[9])
    assert server._expire(now + 0.3) == pytest.approx(0.2)
    assert looked == [9]
    del looked[:]
    server._expire(now + 0.5)
    assert sorted(looked) == list(range(100))
    server._wake_r.close()
    server._wake_w.close()


# Layers

def test_the_wire_server_imports_no_layer_above_or_below_it():
    # It is handed a dispatcher: the protocol (jsonrpc), the API, the
    # service and the privileged layer stay out of its imports.
    code = ("import sys, vdsm_managedvolume.stompserver; print(' '.join("
            "m for m in sys.modules if m.startswith('vdsm_managedvolume')))")
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout.split()
    assert "vdsm_managedvolume.stompserver" in out
    for layer in ("jsonrpc", "api", "schema", "service", "privileged",
                  "agent"):
        assert "vdsm_managedvolume." + layer not in out


def test_plain_connections_without_a_frame_give_their_place_to_new_ones(
        pki_dir, tmp_path, monkeypatch):
    # Over plain TCP a connection is proven by its first frame (a
    # SUBSCRIBE before CONNECT counts, as vdsm serves it); until then it
    # is the first to be closed when a new one needs a place.
    monkeypatch.setattr(stompserver, "MAX_UNPROVEN", 2)
    run = _start("tcp", pki_dir, tmp_path, idle_timeout=3600.0)
    silent = []
    try:
        with run.raw() as early:
            early.send(subscribe_bytes("reply-queue", "sub-1"))
            agentutil.wait_for(lambda: not run.server._unproven)
            for _ in range(4):
                silent.append(socket.create_connection(run.address, 30))
            agentutil.wait_for(lambda: len(run.server._connections) == 3)
            for s in silent[:2]:
                s.settimeout(20)
                assert s.recv(10) == b""
            early.connect()
            assert early.call(request("echo", {}, "e"))[1]["id"] == "e"
    finally:
        for s in silent:
            s.close()
        run.stop()
