"""One thread that calls a function when a deadline passes.

The privsep daemon (``brick``) arms one deadline per call and ends itself
with SIGKILL when one passes, so that an operation past its deadline
cannot complete behind its caller's back.  A thread per call
(threading.Timer) cost a thread start and, at the end of the call, waking
that thread to cancel it: a third of the daemon's CPU for a fast call.
Here arming adds a heap entry and wakes the watching thread only when the
new deadline is the earliest; disarming forgets the call, and its entry
is dropped when the thread meets it (or when the heap holds mostly such
entries).

Standard library only: the test process imports it without the daemon's
oslo.privsep and os-brick.
"""

import heapq
import itertools
import threading
import time


class Watchdog:
    """One thread calling ``fire(name, flow_id)`` when an armed deadline
    (time.monotonic()) passes; started by the first ``arm``."""

    def __init__(self, fire):
        self._fire = fire
        self._cond = threading.Condition(threading.Lock())
        self._heap = []         # (deadline, token), disarmed ones included
        self._armed = {}        # token -> (name, flow_id)
        self._tokens = itertools.count()
        self._thread = None

    def arm(self, deadline, name, flow_id):
        """Watch ``deadline``; return the token that disarms it."""
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (name, flow_id)
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == token:
                self._cond.notify()
        return token

    def disarm(self, token):
        with self._cond:
            self._armed.pop(token, None)
            if len(self._heap) > 64 + 2 * len(self._armed):
                self._heap = [e for e in self._heap if e[1] in self._armed]
                heapq.heapify(self._heap)

    def _run(self):
        while True:
            with self._cond:
                expired = self._wait_expired()
            self._fire(*expired)

    def _wait_expired(self):
        """(name, flow_id) of the next armed deadline once it passed."""
        while True:
            while self._heap and self._heap[0][1] not in self._armed:
                heapq.heappop(self._heap)
            if not self._heap:
                self._cond.wait()
                continue
            deadline, token = self._heap[0]
            remaining = deadline - time.monotonic()
            if remaining > 0:
                self._cond.wait(remaining)
                continue
            heapq.heappop(self._heap)
            return self._armed.pop(token)
