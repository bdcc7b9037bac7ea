"""Named crash points, for proving that the journal converges.

A crash point is a line in attach/detach (or in the privileged daemon)
where a real host could lose power.  ``crash_point("attach.after_connect")``
does nothing unless the environment variable ``MANAGEDVOLUME_CRASH_AT``
names that point, in which case the process kills itself with SIGKILL: no
cleanup, no finally blocks, no flushed buffers - exactly what kill -9 or a
fence does.  The tests run an operation in a child process once per point,
then start a fresh service and check that everything converged.

``MANAGEDVOLUME_CRASH_AT`` may hold several names separated by commas.
Every point that exists is listed in ``POINTS`` so that the tests can be
sure they cover all of them.

The variable is read once, when a process imports this module: an
attach+detach passes nine crash points, and reading the environment at
each (a lookup that raises and catches KeyError when the variable is
unset, as it always is in production) cost the agent 5% of its CPU per
call.  Every process that crashes on purpose is started with the variable
already set (the test's child, the agent, the privsep daemon, which
privsep-helper starts by exec); a test that changes the environment of a
process that already imported this module calls ``rearm()``.
"""

import os
import signal

ENV = "MANAGEDVOLUME_CRASH_AT"

POINTS = set()


def register(*names):
    """Declare crash points (at import time, next to the code using them)."""
    POINTS.update(names)


def crash_point(name):
    """Die here with SIGKILL if ``$MANAGEDVOLUME_CRASH_AT`` names ``name``."""
    if _armed and name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)


def rearm():
    """Read ``$MANAGEDVOLUME_CRASH_AT`` again (this process changed it)."""
    global _armed
    _armed = frozenset(n for n in os.environ.get(ENV, "").split(",") if n)


_armed = frozenset()
rearm()
