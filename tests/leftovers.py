"""What a killed test run leaves behind, found and cleaned by the next run.

A pytest run killed with SIGKILL (a CI timeout, the OOM killer, kill -9)
runs no finalizer: its loop devices stay attached, its agents and their
privsep daemons and its PostgreSQL cluster run on.  The processes have
watchdogs of their own that end them when the run's end of a pipe
closes, however the run ended (``tests/lifeline.py`` for each agent,
``scripts/pgcluster.sh run`` for the cluster); loop devices cannot have
one (a loop device is a kernel object, not a process), so the next run
detaches them at its start (``conftest.pytest_configure``), and stops
the agents a killed watchdog left.

Only what is clearly a dead run's is touched, never another run's that
is still going (several run at once on this machine):

- a loop device whose backing file is under a pytest base temp dir,
  ``<tmp>/pytest-of-<user>/pytest-<N>/`` (every fixture that makes one
  puts its backing file under ``tmp_path``), when that run is over:
  pytest writes its pid into ``pytest-<N>/.lock`` as it starts and
  removes the file as it exits, so no ``.lock``, or one naming a process
  that is gone (or started after the file was written: the pid was
  reused), is a run that ended.  Only base temp dirs right under the
  temp root pytest uses count: a test's own fake one further down (under
  its ``tmp_path``, in a run still going) is never another run's;
- an agent or privsep daemon whose command line names a path under such
  a base temp dir (its config, its state dir);
- a cluster of ``pgcluster.sh run`` whose ``owner`` file names a run
  that is over in the same sense (its watchdog was killed too).
"""

import fcntl
import glob
import os
import re
import signal
import struct
import tempfile

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


def stale_loop_devices(root=None):
    """[(device, backing file)] of loop devices of test runs that are
    over (base temp dirs under ``root``, default pytest's temp root)."""
    over = _RunsOver(root)
    found = []
    for backing_file in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing_file) as f:
                backing = f.read().strip()
        except OSError:
            continue            # detached meanwhile
        if backing.endswith(" (deleted)"):
            backing = backing[:-len(" (deleted)")]
        if over.holds(backing):
            name = backing_file.split("/")[3]
            found.append(("/dev/" + name, backing))
    return found


def detach_stale_loop_devices(root=None):
    """Detach the loop devices of test runs that are over; return them."""
    return detach_loop_devices(stale_loop_devices(root))


def detach_loop_devices(found):
    """Detach each ``(device, backing file)`` of ``found`` that is still
    bound to that file; return those detached.

    Between the look at a device's backing file and its detach, another
    run may detach it and a third attach its own file to the same minor
    (several runs at once on this machine): ``losetup -d`` would then
    end that run's device.  So, as ``losetup -d`` does, the device is
    opened and cleared with LOOP_CLR_FD (losetup's
    ``loopcxt_delete_device``), but only after looking again, on the
    open device, that it is still bound to the same file: its sysfs
    backing file is the one found, and the backing file's device and
    inode (LOOP_GET_STATUS64) are the same before and after that look.
    What is left is the window between the last look and the clear (two
    system calls), not the whole listing."""
    done = []
    for device, backing in found:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            before = _loop_file(fd)
            if (before is None or _sysfs_backing(device) != backing
                    or _loop_file(fd) != before):
                continue
            fcntl.ioctl(fd, LOOP_CLR_FD)
            done.append((device, backing))
        except OSError:
            continue            # detached meanwhile, or busy
        finally:
            os.close(fd)
    return done


# linux/loop.h
LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset,
# lo_sizelimit, lo_number, lo_encrypt_type, lo_encrypt_key_size,
# lo_flags, lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32],
# lo_init[2].
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


def _loop_file(fd):
    """(device, inode) of the file the open loop device ``fd`` is bound
    to, None when it is bound to none."""
    buf = bytearray(_LOOP_INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError:
        return None             # ENXIO: not bound
    info = _LOOP_INFO64.unpack(bytes(buf))
    return info[0], info[1]


def _sysfs_backing(device):
    try:
        with open("/sys/block/{}/loop/backing_file".format(
                os.path.basename(device))) as f:
            backing = f.read().strip()
    except OSError:
        return None
    if backing.endswith(" (deleted)"):
        backing = backing[:-len(" (deleted)")]
    return backing


def stale_pg_clusters():
    """The directories of pgcluster.sh clusters whose run is over."""
    return [d for d in sorted(glob.glob(PGCLUSTER_GLOB))
            if os.path.exists(os.path.join(d, "owner"))
            and owner_gone(os.path.join(d, "owner"))]


def stale_agents(root=None):
    """[(pid, command line)] of the agents and privsep daemons of test
    runs that are over (base temp dirs under ``root``, default pytest's
    temp root): their lifelines (tests/lifeline.py) were killed too."""
    over = _RunsOver(root)
    found = []
    for pid, args in _processes():
        if pid == os.getpid() or not any(
                os.path.basename(a) in _AGENT_PROGRAMS for a in args[:2]):
            continue
        if any(over.holds(a.partition("=")[2] or a) for a in args[1:]):
            found.append((pid, " ".join(args)))
    return found


def stop_stale_agents(root=None):
    """SIGKILL the agents and privsep daemons of test runs that are over
    (as systemd ends a service); return them."""
    stale = stale_agents(root)
    for pid, _ in stale:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stale


def privsep_daemons(marker):
    """The pids of the privsep daemons (and helpers) whose command line
    holds ``marker`` (an agent's state dir: its privsep.conf is there)."""
    return [pid for pid, args in _processes()
            if any(os.path.basename(a) == "privsep-helper" for a in args[:2])
            and any(marker in a for a in args)]


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

# argv[0] (a console script) or argv[1] (its interpreter's script).
_AGENT_PROGRAMS = {"managedvolume-agent", "privsep-helper"}


class _RunsOver:
    """Which paths lie under the base temp dir of a test run that is
    over: <root>/pytest-of-<user>/pytest-<N>/..., as _pytest.tmpdir names
    them, right under ``root`` (default: the temp root pytest uses)."""

    def __init__(self, root=None):
        root = os.path.realpath(root or _pytest_temproot())
        self._basetemp = re.compile("^(" + re.escape(root.rstrip("/"))
                                    + r"/pytest-of-[^/]+/pytest-\d+)/")
        self._over = {}

    def holds(self, path):
        m = self._basetemp.match(path)
        if not m:
            return False
        basetemp = m.group(1)
        if basetemp not in self._over:
            self._over[basetemp] = owner_gone(os.path.join(basetemp, ".lock"))
        return self._over[basetemp]


def _pytest_temproot():
    # _pytest.tmpdir.TempPathFactory.getbasetemp's choice.
    return os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()


def _processes():
    """(pid, argv) of every process we can read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/cmdline".format(entry), "rb") as f:
                raw = f.read()
        except OSError:
            continue
        args = raw.decode("utf-8", "replace").split("\0")
        if args and args[-1] == "":
            args.pop()
        if args:
            yield int(entry), args


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
