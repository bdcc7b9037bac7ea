"""The watchdog the privsep daemon ends itself with when a call passes
its deadline (the daemon killing itself: privileged_test.py)."""

import threading
import time

from vdsm_managedvolume import watchdog


def armed_dog():
    fired = []
    event = threading.Event()

    def fire(name, flow_id):
        fired.append((name, flow_id))
        event.set()
    return watchdog.Watchdog(fire), fired, event


def test_a_call_past_its_deadline_fires_once():
    dog, fired, event = armed_dog()
    dog.arm(time.monotonic() + 0.05, "connect", "flow-1")
    assert event.wait(30)
    time.sleep(0.1)
    assert fired == [("connect", "flow-1")]


def test_a_call_ended_in_time_never_fires():
    dog, fired, event = armed_dog()
    token = dog.arm(time.monotonic() + 0.2, "connect", "flow-1")
    dog.disarm(token)
    # A later call past its deadline proves the watchdog ran meanwhile.
    dog.arm(time.monotonic() + 0.3, "disconnect", "flow-2")
    assert event.wait(30)
    assert fired == [("disconnect", "flow-2")]


def test_an_earlier_deadline_armed_later_fires_first():
    dog, fired, event = armed_dog()
    late = dog.arm(time.monotonic() + 60, "extend", "flow-1")
    dog.arm(time.monotonic() + 0.05, "connect", "flow-2")
    assert event.wait(30)
    assert fired == [("connect", "flow-2")]
    dog.disarm(late)


def test_ended_calls_do_not_pile_up():
    dog, fired, _ = armed_dog()
    for _ in range(10000):
        dog.disarm(dog.arm(time.monotonic() + 3600, "connect", "-"))
    assert len(dog._heap) <= 64 and dog._armed == {}
    assert fired == []


def test_every_call_is_watched_by_one_thread():
    dog, _, _ = armed_dog()
    before = threading.active_count()
    tokens = [dog.arm(time.monotonic() + 3600, "connect", "-")
              for _ in range(20)]
    assert threading.active_count() == before + 1
    for token in tokens:
        dog.disarm(token)
