"""Mutual TLS: the development PKI, and who the agent lets in."""

import os
import select
import selectors
import socket
import ssl
import stat
import threading
import time

import pytest

from vdsm_managedvolume import pki
from vdsm_managedvolume import stompclient
from vdsm_managedvolume import stompserver

from . import agentutil
from .agentutil import Raw, request


@pytest.fixture
def state(tmp_path):
    cfg = agentutil.make_config(tmp_path / "state")
    pki.ensure_dev_pki(cfg)
    return cfg


@pytest.fixture
def tls(state, tmp_path):
    state.handshake_timeout = 1.0
    run = agentutil.Running(state, agentutil.StubDispatcher(), tls=True)
    yield run
    run.stop()


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_dev_pki_has_every_file_keys_private(state):
    d = os.path.join(state.state_dir, "pki")
    assert state.key_file == os.path.join(d, "vdsmkey.pem")
    assert state.cert_file == os.path.join(d, "vdsmcert.pem")
    assert state.ca_file == os.path.join(d, "cacert.pem")
    for name in ("vdsmkey.pem", "client-key.pem", "cakey.pem"):
        assert _mode(os.path.join(d, name)) == 0o600
    for name in ("vdsmcert.pem", "client-cert.pem", "cacert.pem"):
        assert _mode(os.path.join(d, name)) == 0o644


def test_dev_pki_is_kept_across_restarts(state):
    with open(state.cert_file, "rb") as f:
        before = f.read()
    pki.ensure_dev_pki(state)
    with open(state.cert_file, "rb") as f:
        assert f.read() == before


def test_missing_server_cert_is_reissued_by_the_same_ca(state):
    with open(state.ca_file, "rb") as f:
        ca = f.read()
    os.unlink(state.cert_file)
    pki.ensure_dev_pki(state)
    assert os.path.exists(state.cert_file)
    with open(state.ca_file, "rb") as f:
        assert f.read() == ca


def test_configured_real_pki_is_never_written(tmp_path):
    cfg = agentutil.make_config(tmp_path / "state")
    cfg.ca_file = str(tmp_path / "etc" / "cacert.pem")
    assert pki.ensure_dev_pki(cfg) is False
    assert not os.path.exists(str(tmp_path / "etc"))
    assert not os.path.exists(cfg.key_file)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_client_with_dev_cert_verifies_server_name(tls, host):
    with stompclient.Client(host, tls.address[1], tls.client_context,
                            timeout=10) as c:
        assert c.call("echo", {"a": 1})["params"] == {"a": 1}


def test_ipv6_loopback_with_tls(state):
    state.listen = "::1"
    try:
        run = agentutil.Running(state, agentutil.StubDispatcher(), tls=True)
    except Exception as e:          # no IPv6 on this machine
        pytest.skip("no IPv6 loopback: {}".format(e))
    try:
        with stompclient.Client("::1", run.address[1], run.client_context,
                                timeout=10) as c:
            assert c.call("echo", {})["params"] == {}
    finally:
        run.stop()


def _refused(address, ctx):
    """Connect and try one round trip; return the exception raised."""
    with pytest.raises((ssl.SSLError, OSError, stompclient.ClientError)) \
            as e:
        with stompclient.Client("localhost", address[1], ctx,
                                timeout=10) as c:
            c.call("echo", {})
    return e.value


def test_client_without_certificate_is_refused(tls, state):
    ctx = pki.client_context(state.ca_file)
    _refused(tls.address, ctx)
    assert tls.dispatcher.bodies == []


def test_client_with_foreign_ca_certificate_is_refused(tls, state,
                                                       tmp_path):
    ca_key, ca_cert = pki.create_ca("evil CA")
    key, cert = pki.create_cert(ca_key, ca_cert, "intruder", server=False)
    pki.write_key(str(tmp_path / "k.pem"), key)
    pki.write_cert(str(tmp_path / "c.pem"), cert)
    ctx = pki.client_context(state.ca_file, str(tmp_path / "c.pem"),
                             str(tmp_path / "k.pem"))
    _refused(tls.address, ctx)
    assert tls.dispatcher.bodies == []
    # The agent still serves the right clients.
    with tls.raw() as c:
        c.connect()
        c.subscribe()
        assert c.call(request("echo", {}, "ok"))[1]["id"] == "ok"


def test_client_refuses_server_of_another_ca(tls, tmp_path):
    ca_key, ca_cert = pki.create_ca("other CA")
    pki.write_cert(str(tmp_path / "ca.pem"), ca_cert)
    cert, key, _ = pki.client_files(tls.cfg)
    ctx = pki.client_context(str(tmp_path / "ca.pem"), cert, key)
    with pytest.raises(ssl.SSLCertVerificationError):
        stompclient.Client("localhost", tls.address[1], ctx, timeout=10)


def test_plain_stomp_on_tls_port_is_dropped(tls):
    with Raw(tls.address) as c:
        c.send(agentutil.VDSM_CONNECT)
        assert c.eof(timeout=20) == []


def test_silent_client_is_dropped_after_handshake_timeout(tls):
    with socket.create_connection(tls.address, timeout=30) as s:
        # handshake_timeout is 1 s: the agent closes, we read EOF.
        assert s.recv(100) == b""


def test_handshake_in_progress_does_not_block_other_clients(tls):
    with socket.create_connection(tls.address, timeout=30):
        with tls.raw() as c:
            c.connect()
            c.subscribe()
            assert c.call(request("echo", {}, "x"))[1]["id"] == "x"


def _closed_by_peer(sock, timeout=20):
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return False
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def _still_open(sock):
    ready, _, _ = select.select([sock], [], [], 0.2)
    return not ready


def test_connections_never_finishing_a_handshake_cannot_lock_clients_out(
        state, monkeypatch):
    # A peer opens connections and never starts TLS (no certificate
    # needed), renewing them within handshake_timeout: they used to hold
    # every place (MAX_CONNECTIONS) and the engine was refused.  Now a
    # new connection takes the place of the oldest unproven one.
    monkeypatch.setattr(stompserver, "MAX_UNPROVEN", 4)
    monkeypatch.setattr(stompserver, "MAX_CONNECTIONS", 6)
    state.handshake_timeout = 3600.0
    run = agentutil.Running(state, agentutil.StubDispatcher(), tls=True)
    silent = []
    try:
        with run.raw() as proven:        # proven: stays whatever comes
            proven.connect()
            proven.subscribe()
            for _ in range(10):
                silent.append(socket.create_connection(run.address, 30))
            agentutil.wait_for(lambda: len(run.server._unproven) == 4
                               and _closed_by_peer(silent[5], 0))
            assert all(_closed_by_peer(s) for s in silent[:6])
            assert all(_still_open(s) for s in silent[6:])
            with run.raw() as late:
                late.connect()
                late.subscribe()
                assert late.call(request("echo", {}, "late"))[1]["id"] \
                    == "late"
            assert proven.call(request("echo", {}, "p"))[1]["id"] == "p"
    finally:
        for s in silent:
            s.close()
        run.stop()


def test_when_every_connection_is_proven_a_new_one_is_refused(
        state, monkeypatch):
    monkeypatch.setattr(stompserver, "MAX_CONNECTIONS", 2)
    run = agentutil.Running(state, agentutil.StubDispatcher(), tls=True)
    try:
        with run.raw() as a, run.raw() as b:
            for c in (a, b):
                c.connect()
                c.subscribe()
            agentutil.wait_for(lambda: not run.server._unproven)
            with socket.create_connection(run.address, 30) as extra:
                assert _closed_by_peer(extra)
            assert a.call(request("echo", {}, "a"))[1]["id"] == "a"
    finally:
        run.stop()


def test_tls13_session_gets_no_session_tickets(tls):
    # Tickets are records after the handshake; ovirt-engine's client
    # decodes one record per reactor round, so they delayed its first
    # reply (docs/interop.md).
    ctx = pki.dev_client_context(tls.cfg)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with Raw(tls.address, ctx) as c:
        c.connect()
        c.subscribe()
        assert c.call(request("echo", {}, "t"))[1]["id"] == "t"
        assert c.sock.version() == "TLSv1.3"
        assert not c.sock.session.has_ticket


def test_client_stuck_inside_the_handshake_is_dropped_at_handshake_timeout(
        tls):
    # A real ClientHello trickled a byte every 0.3 s, never complete: the
    # handshake deadline counts from the accept whatever bytes came
    # (handshake_timeout 1 s), not from the last byte, so the agent closes
    # while bytes still come (the test's own bound: ~100 bytes, 30 s).
    ctx = pki.dev_client_context(tls.cfg)
    out = ssl.MemoryBIO()
    first = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        first.do_handshake()
    client_hello = out.read()
    trickle = client_hello[:min(len(client_hello) - 1, 100)]
    with socket.create_connection(tls.address, timeout=30) as s:
        closed = False
        for i in range(len(trickle)):
            try:
                s.sendall(trickle[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([s], [], [], 0.3)[0]:
                try:
                    assert s.recv(100) == b""
                except ConnectionResetError:
                    pass
                closed = True
                break
        assert closed, "still open after {} bytes".format(len(trickle))


def test_connect_window_opens_when_the_handshake_ends_not_at_accept(state):
    # A handshake that took longer than idle_timeout (within its own,
    # larger, handshake_timeout) must leave the client its whole CONNECT
    # window: the accept time is moved back instead of waiting.
    state.handshake_timeout = 3600.0
    state.idle_timeout = 60.0
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        server_side = pki.server_context(state).wrap_socket(
            ours, server_side=True, do_handshake_on_connect=False)
        conn = stompserver.Connection(agentutil.ConnectionOwner(state),
                                      server_side, "test")
        conn.created -= 2 * state.idle_timeout
        done = threading.Event()

        def client():
            ctx = pki.dev_client_context(state)
            with ctx.wrap_socket(peer, server_hostname="localhost"):
                done.wait(60)

        t = threading.Thread(target=client, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + 60
            while conn.state == conn.HANDSHAKE and not conn.closed:
                assert time.monotonic() < deadline, "handshake hangs"
                select.select([server_side], [], [], 1)
                conn.ready(selectors.EVENT_READ)
            assert conn.state == conn.WAIT_CONNECT
            now = time.monotonic()
            assert conn.check_deadlines(now) > now
            assert conn.state == conn.WAIT_CONNECT and not conn.closed
        finally:
            done.set()
            t.join(60)
    finally:
        ours.close()
        peer.close()
