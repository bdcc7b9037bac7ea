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
    armed = os.environ.get(ENV)
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
