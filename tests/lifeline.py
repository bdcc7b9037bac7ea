"""Ends a process a test started when the test run ends, however it ends.

    python tests/lifeline.py PID START_TICKS [MARKER]

A test run killed with SIGKILL (a CI timeout, the OOM killer, kill -9)
runs no finalizer, and the agents it started (tests.agent_process_test
.AgentProcess: the flows' hosts among them) and their privsep daemons
ran on, adopted by PID 1.  Neither can be made to watch the run without
test-only code in the agent, and a parent death signal
(``PR_SET_PDEATHSIG``) is about the *thread* that started the process:
the flows start their hosts from a thread pool whose threads end long
before the hosts should.

So each agent gets a lifeline: this small process, in a session of its
own (a signal to the run's process group does not end it first), whose
stdin is a pipe only the test run holds the write end of.  The kernel
closes that end when the run ends, SIGKILL included; at EOF the lifeline
SIGKILLs process PID if it is still the one that started at START_TICKS
(``leftovers.start_ticks``: never a process that reused the pid), then
every privsep daemon whose command line names MARKER (the agent's state
directory), as systemd kills what is left of a service.  A test that
stops its agent closes the pipe after the agent ended: the lifeline
finds nothing to kill.  ``scripts/pgcluster.sh run`` does the same for
the PostgreSQL cluster.

Should the lifeline be killed too, the next run's start stops what it
left (``leftovers.stop_stale_agents``).
"""

import os
import signal
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))

from tests import leftovers  # noqa: E402


def watch(proc, marker=None):
    """Start the lifeline of ``proc`` (a subprocess.Popen): it ends that
    process, and the privsep daemons naming ``marker``, when this test
    run ends; None when ``proc`` already ended."""
    ticks = leftovers.start_ticks(proc.pid)
    if ticks is None:
        return None
    argv = [sys.executable, os.path.abspath(__file__), str(proc.pid),
            str(ticks)] + ([marker] if marker else [])
    return subprocess.Popen(argv, stdin=subprocess.PIPE,
                            start_new_session=True)


def cut(lifeline, timeout=60):
    """The test is done with the watched process (ended, or to be ended
    now): the lifeline ends what is left and exits; wait for it, so that
    it cannot take a process started next with the same marker for
    one."""
    lifeline.stdin.close()
    lifeline.wait(timeout)


def main(argv):
    pid, ticks = int(argv[1]), int(argv[2])
    marker = argv[3] if len(argv) > 3 else None
    # Until EOF: the run ended (or the test closed the pipe).
    while os.read(0, 4096):
        pass
    if leftovers.start_ticks(pid) == ticks:
        _kill(pid)
    if marker:
        for daemon in leftovers.privsep_daemons(marker):
            _kill(daemon)
    return 0


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
