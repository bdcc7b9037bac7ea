"""One thread that calls a function when a deadline passes.

The privsep daemon (``brick``) arms one deadline per call; when one
passes it cancels that call, and ends itself with SIGKILL if the call
has not ended a grace period later (brick.py, "Deadlines"), so that an
operation past its deadline cannot complete behind its caller's back.
A thread per call (threading.Timer) cost a thread start and, at the end
of the call, waking that thread to cancel it: a third of the daemon's
CPU for a fast call.
Here arming adds a heap entry and wakes the watching thread only when the
new deadline comes before the time the thread sleeps until; disarming
forgets the call, and its entry is dropped when the thread meets it (or
when the heap holds mostly such entries).

The thread sleeps until the earliest entry's deadline even when that
call has ended: dropping it at once, when the thread wakes up for a new
call that has ended meanwhile (a fast call ends before the woken thread
gets to run), leaves the heap empty, so that the next call wakes the
thread again, and the one after: a wake-up (two GIL hand-offs) per call.
Ended calls are dropped when a deadline passes, so the thread wakes about
twice per call timeout however many calls run.

Standard library only: the test process imports it without the daemon's
oslo.privsep and os-brick.
"""

import heapq
import itertools
import threading
import time


class Watchdog:
    """One thread calling ``fire(*args)`` when a deadline (time.monotonic())
    armed with ``args`` passes; started by the first ``arm``."""

    def __init__(self, fire):
        self._fire = fire
        self._cond = threading.Condition(threading.Lock())
        self._heap = []         # (deadline, token), disarmed ones included
        self._armed = {}        # token -> args
        self._tokens = itertools.count()
        self._thread = None
        self._wake_at = None    # when the thread wakes (None: notified)

    def arm(self, deadline, *args):
        """Watch ``deadline`` (``fire(*args)`` when it passes); return the
        token that disarms it."""
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = args
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="watchdog", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline < self._wake_at:
                self._cond.notify()
        return token

    def disarm(self, token):
        with self._cond:
            self._armed.pop(token, None)
            if len(self._heap) > 64 + 2 * len(self._armed):
                self._drop_disarmed()

    def _run(self):
        while True:
            with self._cond:
                expired = self._wait_expired()
            self._fire(*expired)

    def _wait_expired(self):
        """The args of the next armed deadline once it passed."""
        while True:
            now = time.monotonic()
            if self._heap and self._heap[0][0] <= now:
                while self._heap and self._heap[0][0] <= now:
                    _, token = heapq.heappop(self._heap)
                    if token in self._armed:
                        return self._armed.pop(token)
                self._drop_disarmed()
            self._wake_at = self._heap[0][0] if self._heap else None
            self._cond.wait(None if self._wake_at is None
                            else self._wake_at - now)

    def _drop_disarmed(self):
        self._heap = [e for e in self._heap if e[1] in self._armed]
        heapq.heapify(self._heap)
