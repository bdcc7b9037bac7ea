"""One thread running calls at their due time.

Some of the service's work must wait: a ceph conf too young to judge is
looked at again once old enough, and the confs a connect cut at its
deadline may still write are swept ``[privsep] timeout`` + 61 s after
its record went (``service._sweep_confs``).  A sleeping thread per wait
would cost a thread (and its stack) per cut connect, many at once after
a storage outage; here every pending call sits in one heap, run by one
thread, started at the first call and ended by ``stop()``::

    at(due, key, func)      func() runs once clock() >= due, in the
                            scheduler's thread; a call pending under the
                            same key is replaced, and runs at the later
                            of the two due times (a later cut connect of
                            the same keyring pushes its sweep back)

Keys stay in memory and are never logged (a sweep's key holds a
keyring).  A failing call is logged and the others go on.  Nothing
survives the process: what a restart drops, the service's start covers
(``service._sweep_confs``, docs/operations.md).

``clock`` (time.monotonic) may be replaced by a test's fake clock: the
thread sleeps until the earliest due time by that clock, and ``kick()``
makes it look again after the test moved it.
"""

import heapq
import itertools
import logging
import threading
import time

log = logging.getLogger("managedvolume.scheduler")


class Scheduler:

    def __init__(self, name, clock=time.monotonic):
        self.name = name
        self.clock = clock
        self._cond = threading.Condition()
        self._heap = []         # (due, seq, key); stale entries skipped
        self._pending = {}      # key -> (due, seq, func)
        self._seq = itertools.count()
        self._thread = None
        self._stopped = False
        self._running = False   # a call runs now

    def at(self, due, key, func):
        """Run ``func()`` once ``clock()`` reaches ``due`` (see the module
        docstring for ``key``); False when stopped (nothing scheduled)."""
        with self._cond:
            if self._stopped:
                return False
            old = self._pending.get(key)
            if old is not None and old[0] > due:
                due = old[0]
            seq = next(self._seq)
            self._pending[key] = (due, seq, func)
            heapq.heappush(self._heap, (due, seq, key))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def after(self, delay, key, func):
        """``at(clock() + delay, key, func)``."""
        return self.at(self.clock() + delay, key, func)

    def pending(self):
        """[(due, key)] of the calls not run yet, soonest first."""
        with self._cond:
            return sorted((due, key) for key, (due, _, _)
                          in self._pending.items())

    def kick(self):
        """Look at the clock again (a test moved its fake one)."""
        with self._cond:
            self._cond.notify_all()

    def settle(self, timeout):
        """Wait until no call is running and none is due by ``clock()``,
        at most ``timeout`` seconds; whether that came (for tests, after
        moving a fake clock: the calls now due have run)."""
        def settled():
            now = self.clock()
            return not self._running and not any(
                due <= now for due, _, _ in self._pending.values())

        with self._cond:
            self._cond.notify_all()
            return self._cond.wait_for(settled, timeout)

    def stop(self):
        """Run nothing more (a call running now ends on its own); the
        pending calls are dropped."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._heap = []
            self._cond.notify_all()

    def _run(self):
        while True:
            with self._cond:
                func = self._next()
                if func is None:
                    return
                self._running = True
            try:
                func()
            except Exception:
                log.exception("A scheduled call of %s failed", self.name)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def _next(self):
        """Wait (holding ``_cond``) for the next call due; None once
        stopped."""
        while not self._stopped:
            heap = self._heap
            while heap:
                due, seq, key = heap[0]
                current = self._pending.get(key)
                if current is not None and current[1] == seq:
                    break
                heapq.heappop(heap)     # replaced or run already
            if not heap:
                self._cond.wait()
                continue
            delay = heap[0][0] - self.clock()
            if delay > 0:
                self._cond.wait(delay)
                continue
            _, _, key = heapq.heappop(heap)
            return self._pending.pop(key)[2]
        return None
