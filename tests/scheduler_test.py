"""The scheduler: one thread running calls at their due time, on a fake
clock (no wall-clock asserts)."""

import logging
import threading

from vdsm_managedvolume import scheduler


def fake(start=100.0):
    now = [start]
    return now, scheduler.Scheduler("test-later", clock=lambda: now[0])


def test_calls_run_at_their_due_time_in_order_in_one_thread():
    now, later = fake()
    ran = []
    try:
        for key, delay in (("b", 20), ("a", 10), ("c", 30)):
            later.after(delay, key, lambda key=key: ran.append(
                (key, threading.current_thread())))
        assert later.settle(30)
        assert ran == []
        now[0] += 20
        assert later.settle(30)
        assert [k for k, _ in ran] == ["a", "b"]
        assert [k for _, k in later.pending()] == ["c"]
        now[0] += 10
        assert later.settle(30)
        assert [k for k, _ in ran] == ["a", "b", "c"]
        assert {t for _, t in ran} == {later._thread}
        assert later._thread.name == "test-later"
        assert later.pending() == []
    finally:
        later.stop()


def test_a_call_scheduled_again_under_its_key_runs_once_at_the_later_time():
    now, later = fake()
    ran = []
    try:
        later.after(10, "k", lambda: ran.append("first"))
        later.after(30, "k", lambda: ran.append("second"))
        later.after(20, "k", lambda: ran.append("third"))
        assert later.pending() == [(130.0, "k")]
        now[0] += 29
        assert later.settle(30)
        assert ran == []
        now[0] += 1
        assert later.settle(30)
        assert ran == ["third"]
    finally:
        later.stop()


def test_a_failing_call_is_logged_and_the_others_run(caplog):
    now, later = fake()
    ran = []
    try:
        later.after(1, "bad", lambda: 1 / 0)
        later.after(2, "good", lambda: ran.append("good"))
        now[0] += 2
        assert later.settle(30)
        assert ran == ["good"]
        [line] = [r for r in caplog.records
                  if r.levelno == logging.ERROR]
        assert "test-later" in line.getMessage()
    finally:
        later.stop()


def test_stop_drops_pending_calls_and_refuses_new_ones():
    now, later = fake()
    ran = []
    later.after(1, "k", lambda: ran.append("k"))
    later.stop()
    assert later.after(0, "j", lambda: ran.append("j")) is False
    now[0] += 10
    assert later.settle(30)
    assert ran == [] and later.pending() == []
