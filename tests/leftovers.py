"""What a killed test run leaves behind, found and cleaned by the next run.

A pytest run killed with SIGKILL (a CI timeout, the OOM killer, kill -9)
runs no finalizer: its loop devices stay attached and its PostgreSQL
cluster runs on.  The cluster has a watchdog of its own
(``scripts/pgcluster.sh run``: it stops the cluster when the run's end of
a pipe closes, however the run ended); loop devices cannot have one (a
loop device is a kernel object, not a process), so the next run detaches
them at its start (``conftest.pytest_configure``).

Only what is clearly a dead run's is touched, never another run's that
is still going (several run at once on this machine):

- a loop device whose backing file is under a pytest base temp dir,
  ``<tmp>/pytest-of-<user>/pytest-<N>/`` (every fixture that makes one
  puts its backing file under ``tmp_path``), when that run is over:
  pytest writes its pid into ``pytest-<N>/.lock`` as it starts and
  removes the file as it exits, so no ``.lock``, or one naming a process
  that is gone (or started after the file was written: the pid was
  reused), is a run that ended;
- a cluster of ``pgcluster.sh run`` whose ``owner`` file names a run
  that is over in the same sense (its watchdog was killed too).
"""

import glob
import os
import re
import subprocess

# <tmp>/pytest-of-<user>/pytest-<N>/..., as _pytest.tmpdir names them.
_BASETEMP = re.compile(r"^(/.+/pytest-of-[^/]+/pytest-\d+)/")

PGCLUSTER_GLOB = "/tmp/pgcluster.*"


def owner_gone(owner_file):
    """Whether the process whose pid ``owner_file`` holds has ended: no
    file, no such process, or one that started after the file was
    written (the pid was reused)."""
    try:
        written = os.stat(owner_file).st_mtime
        with open(owner_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return True
    started = _start_time(pid)
    return started is None or started > written + 1


def stale_loop_devices():
    """[(device, backing file)] of loop devices of test runs that are
    over."""
    found = []
    for backing_file in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing_file) as f:
                backing = f.read().strip()
        except OSError:
            continue            # detached meanwhile
        if backing.endswith(" (deleted)"):
            backing = backing[:-len(" (deleted)")]
        m = _BASETEMP.match(backing)
        if m and owner_gone(os.path.join(m.group(1), ".lock")):
            name = backing_file.split("/")[3]
            found.append(("/dev/" + name, backing))
    return found


def detach_stale_loop_devices():
    """Detach the loop devices of test runs that are over; return them."""
    stale = stale_loop_devices()
    for device, _ in stale:
        subprocess.run(["losetup", "-d", device], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    return stale


def stale_pg_clusters():
    """The directories of pgcluster.sh clusters whose run is over."""
    return [d for d in sorted(glob.glob(PGCLUSTER_GLOB))
            if os.path.exists(os.path.join(d, "owner"))
            and owner_gone(os.path.join(d, "owner"))]


def start_ticks(pid):
    """The start time of process ``pid`` (clock ticks after boot), or None
    when there is no such process (or only its zombie)."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


# Private helpers

def _start_time(pid):
    """When process ``pid`` started (seconds since the epoch), None when
    there is none (or only its zombie)."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def _boot_time():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")
