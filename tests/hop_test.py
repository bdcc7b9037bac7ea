"""The hop's failures: every call gets an answer, or the agent ends.

A call the back end cannot run (no thread to start, an answer that
cannot be framed, an exception of any kind) is answered with an error
and the hop goes on; a back end whose reader fails stops (the front's
reaper then ends the agent); errors of builtin classes whose
constructors want more than a message cross as themselves.  Both ends
run in this process (``agent_split_test.Hop``).
"""

import json
import subprocess
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import hop

from .agent_split_test import FakeService, Hop


@pytest.fixture
def make_hop():
    hops = []
    yield lambda service, **kw: hops.append(Hop(service, **kw)) or hops[-1]
    for h in hops:
        h.close()


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def cut_call(h):
    """volumes_info in a thread of its own; the list of the BackEnded it
    raised."""
    failed = []

    def call():
        try:
            h.proxy.volumes_info([])
        except hop.BackEnded as e:
            failed.append(e)

    t = threading.Thread(target=call)
    t.start()
    return t, failed


def test_a_call_no_thread_can_run_is_refused_933_and_the_hop_goes_on(
        make_hop, monkeypatch):
    h = make_hop(FakeService(attach_volume=lambda *a: {"ok": 1},
                             volumes_info=lambda ids, s: []))

    def no_thread(fn, handoff=None):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as m:
        m.setattr(h.back._data, "submit", no_thread)
        with pytest.raises(errors.NoThread) as e:
            h.proxy.attach_volume("v", {})
        assert e.value.code == errors.AgentBusy.code == 933
        assert "cannot start a worker thread" in str(e.value)
        assert "can't start new thread" in str(e.value)
        # The control plane has its own threads.
        assert h.proxy.volumes_info([]) == []
    assert h.proxy.attach_volume("v", {}) == {"ok": 1}


def test_an_answer_that_cannot_be_framed_is_answered_as_an_error(make_hop):
    h = make_hop(FakeService(volumes_info=lambda ids, s: nested(100000),
                             attach_volume=lambda *a: {"ok": 1}))
    with pytest.raises(RecursionError):
        h.proxy.volumes_info([])
    assert h.proxy.attach_volume("v", {}) == {"ok": 1}


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()],
                         ids=["SystemExit", "KeyboardInterrupt"])
def test_any_exception_of_a_call_is_answered(make_hop, exc):
    def fail(*args):
        raise exc

    h = make_hop(FakeService(attach_volume=fail,
                             volumes_info=lambda ids, s: []))
    with pytest.raises(BaseException) as e:
        h.proxy.attach_volume("v", {})
    assert type(e.value).__name__ == type(exc).__name__
    assert h.proxy.volumes_info([]) == []


def test_a_back_whose_reader_fails_stops(make_hop, monkeypatch, caplog):
    h = make_hop(FakeService(volumes_info=lambda ids, s: []))
    monkeypatch.setattr(h.back, "_submit", lambda *a: 1 / 0)
    t, failed = cut_call(h)
    assert h.back.done.wait(10)
    assert h.back.exit_code == 1
    assert "The back end's reader failed" in caplog.text
    # (The process would end here, and with it the hop.)
    h.client.broken()
    t.join(10)
    assert failed


def test_an_unreadable_answer_breaks_the_hop(make_hop):
    started = threading.Event()
    release = threading.Event()

    def slow(ids, s):
        started.set()
        release.wait(10)
        return []

    h = make_hop(FakeService(volumes_info=slow))
    t, failed = cut_call(h)
    assert started.wait(10)
    # A well-formed frame that is not an answer (marshal reads an int).
    h.back._sock.sendall(hop.frame(5))
    t.join(10)
    release.set()
    assert failed
    # And the back reads the front's end: it stops.
    assert h.back.done.wait(10)


def test_a_call_that_cannot_be_framed_leaves_no_waiter(make_hop):
    h = make_hop(FakeService(volumes_info=lambda ids, s: ids))
    with pytest.raises(RecursionError):
        h.proxy.volumes_info(nested(100000))
    assert h.client._pending == {}
    assert h.proxy.volumes_info(["a"]) == ["a"]


def test_a_call_after_the_back_ended_waits_as_a_cut_one(make_hop):
    h = make_hop(FakeService(volumes_info=lambda ids, s: []))
    cut = []
    h.client.on_cut = lambda: cut.append(1)
    h.client.broken()
    with pytest.raises(hop.BackEnded):
        h.proxy.volumes_info([])
    assert cut == [1]


# (agent_split_test's ERRORS has them too: the wire bytes of one process.)
BUILTIN_ERRORS = [
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    subprocess.CalledProcessError(5, ["iscsiadm", "-m", "node"]),
    json.JSONDecodeError("Expecting value", "x", 0),
    OSError(28, "No space left on device"),
    FileNotFoundError(2, "No such file or directory", "/dev/sdz"),
]


@pytest.mark.parametrize("error", BUILTIN_ERRORS,
                         ids=[type(e).__name__ for e in BUILTIN_ERRORS])
def test_builtin_errors_cross_as_their_class_and_message(error):
    with pytest.raises(type(error)) as e:
        hop.raise_error(hop.error_info(error))
    assert str(e.value) == str(error)
    assert type(e.value).__name__ == type(error).__name__


def test_a_builtin_error_that_cannot_be_built_keeps_its_name(monkeypatch):
    class Picky(Exception):
        def __new__(cls, *args):
            if len(args) != 2:
                raise TypeError("two arguments")
            return super().__new__(cls, *args)

    monkeypatch.setattr(hop, "_error_class", lambda *a: Picky)
    with pytest.raises(hop._Remote) as e:
        hop.raise_error(("somewhere", "Picky", None, "went wrong"))
    assert type(e.value).__name__ == "Picky"
    assert str(e.value) == "went wrong"
