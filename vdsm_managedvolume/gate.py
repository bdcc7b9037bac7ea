"""The run queue of the data plane: how many operations run Python at once.

The agent runs each attach, detach and extend in a thread of its own (up
to ``[agent] max_operations``, see ``stompserver``), because each may
wait seconds for the storage.  But the agent is one Python process: only
the thread holding the interpreter lock (the GIL) runs, and every system
call (an SQLite step, an fsync, a stat, a socket send) lets it go.  With
32 operations runnable at once each system call handed the GIL to
another of them, and the caller then queued to get it back: a convoy.
Measured: ~1000 futex calls per attach+detach with 32 callers against 29
with one, the agent's CPU per pair up from ~3.1 ms to ~5.5 ms, all of the
growth in the kernel, and 32 callers no faster than one.

So an operation thread runs Python only while it holds a slot of a
``Gate`` (``SLOTS`` of them), and gives its slot back whenever it goes
to a wait that can be long or that depends on another thread::

    operation thread:  hold() .. validate, journal reads, log ..
                         released(): privsep call (round trip, daemon
                                     start), journal commit (lock wait),
                                     journal fsync, volume lock wait,
                                     udevadm
                       .. takes a slot again .. released() ... end

The other operations sleep on the gate, not on the GIL: when the thread
that runs makes a system call, few threads want the GIL meanwhile (the
I/O thread, the control plane's workers, operations just back from a
wait; the privsep channel has no thread of its own: its callers read
the replies, in ``released()``), so it gets it back without queueing
behind 31 others; while it waits, another operation takes its slot.
The waits still overlap: 64 attaches that take 2 s each at the storage
still take 2 s together.

What an operation does holding its slot never waits on the storage:
sizes and identities come from sysfs, the device itself is never
opened (``devices``), so a hung device holds up its own operation, in
its privsep call, not the others.

Only the data plane's threads hold a slot (``stompserver`` wraps each of
their jobs, and the delivery of its answer, in ``hold()``).  In the
agent's two processes (``hop``) each has a gate of its own: the back
end's threads running attaches, detaches and extends hold its slot as
here, and the front end's operation threads give theirs back while they
wait for the back end's answer.
``released()`` is a no-op for a thread that holds none: the control
plane (getCapabilities, volumes_info, the hook's control socket) never
waits for the gate, and neither does vdsm calling the API in its own
threads, or ``managedvolume-tool``.

One slot: measured against two (docs/operations.md, "Under load"), one
gives the most pairs per second and the least CPU per pair on a
2-core machine; a second slot brings part of the convoy back.

No deadlock
-----------
A slot holder must never wait for something whose owner needs a slot to
let it go.  Two rules make that so:

1. A wait on a lock another operation thread may hold is in a
   ``released()`` block: the volume locks (``locking``: the threading
   lock and the flock), the journal's write lock (``store._write``: the
   whole of it, so the group committer commits without a slot) and its
   sync lock (``store._sync``, the fsync of a durable write), the
   privsep client's lock and the daemon start under it, the start's
   flock and the wait for the reply (``privileged.Brick._call``: the
   whole of it).
2. A lock taken inside a ``released()`` block is let go inside it
   (``with`` blocks nest), so a thread waiting for its slot again holds
   no lock a slot holder could want, except the volume lock it just
   took, and whoever wants that one waits for it released (rule 1).

The locks an operation thread takes while holding a slot, and why each
is safe:

- ``store``'s read lock, and its write lock when a read or a write
  finds it free (``store._read`` and ``store._write`` try it, never
  wait for it holding a slot): held for one SELECT or one commit
  (without fsync in WAL mode; without WAL, only a write without fsync
  tries it) by a slot holder or a control-plane thread, neither of
  which needs a slot to finish it.
- ``Service``'s call counter (a Condition): held for a counter update
  only; ``Service.close()`` waits on it from the agent's main thread.
- the locks of ``logging``'s handlers, ``locking``'s registry, the
  privsep channel's flow counter, ``devices``' mounts and swaps (a
  poll, after a change a read of /proc): held for a few statements,
  never across a wait.
- ``stompserver``'s pool and delivery counters, taken to deliver an
  answer: held for a counter update, never across a wait.
- ``stompserver``'s connection lock: a slot holder only tries it
  (``Connection.write``) and never waits for it.  Its other holders
  (the I/O thread reading, or flushing queued frames until the socket
  is full; a control-plane worker writing an answer of up to 64 KiB)
  hold it across several socket calls and need the interpreter lock to
  finish, so an operation waiting for it would stop the data plane
  behind them; when the lock is taken the answer goes through the I/O
  loop instead.
- the import lock: a module imported inside a ``released()`` block is
  imported before the block ends (rule 2); elsewhere its importer runs
  without taking a slot.
- ``api``'s service lock, held while a first call inside vdsm starts the
  service (reconcile calls the daemon): never held in the agent, which
  binds its service to each call (``api.using``), and nobody holds a
  slot inside vdsm.
- ``connectorinfo``'s refresh lock, held across a privsep call: only
  the control plane and its background thread refresh connector_info,
  no operation does.

Shutdown: nothing the agent does to stop (draining the pools, closing
the service, stopping the privsep daemon) takes a slot, and an
operation's slot is given back however its job ends (an exception
included), so operations in flight finish or fail as before.
"""

import threading

# How many operation threads run Python at once (see the docstring).
SLOTS = 1

# .gate: the Gate whose slot this thread holds, None or absent: none.
_held = threading.local()


class Gate:
    """``slots`` operation threads at most run at once; see the module
    docstring."""

    def __init__(self, slots=SLOTS):
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        # A plain lock for one slot: cheaper than a Semaphore (no
        # Condition in Python around it).
        self._slots = threading.Lock() if slots == 1 \
            else threading.Semaphore(slots)

    def hold(self):
        """Context manager: run the block holding a slot of this gate
        (waiting for one first); the slot is given back however the
        block ends.  A thread already holding a slot keeps it."""
        return _Hold(self)


class released:
    """Context manager: give this thread's slot back for the block (a
    wait), take a slot again after it.  A no-op in a thread holding no
    slot, or inside another ``released()`` block.

    Never hold, at the end of the block, a lock taken inside it (see
    the module docstring).
    """

    __slots__ = ("_gate",)

    def __init__(self):
        self._gate = getattr(_held, "gate", None)

    def __enter__(self):
        gate = self._gate
        if gate is not None:
            _held.gate = None
            gate._slots.release()
        return self

    def __exit__(self, *exc):
        gate = self._gate
        if gate is not None:
            gate._slots.acquire()
            _held.gate = gate
        return False


def holding():
    """Whether this thread holds a slot now."""
    return getattr(_held, "gate", None) is not None


# Private helpers

class _Hold:

    __slots__ = ("_gate", "_taken")

    def __init__(self, gate):
        self._gate = gate
        self._taken = False

    def __enter__(self):
        if getattr(_held, "gate", None) is None:
            self._gate._slots.acquire()
            _held.gate = self._gate
            self._taken = True
        return self

    def __exit__(self, *exc):
        if self._taken:
            _held.gate = None
            self._gate._slots.release()
        return False
