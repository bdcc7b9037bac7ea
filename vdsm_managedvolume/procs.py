"""The host's running processes, as /proc shows them: which still run a
command an earlier connect started.

A connect cut at its deadline, or by the death of the privsep daemon
running it, may leave a command of its own running: a multipath iSCSI
connect's per-portal ``iscsiadm --login``, an ``rbd map``.  The daemon's
children outlive it (nothing kills them: SIGKILL on iscsiadm can leave
its database lock behind, brick.py "Deadlines"), and what they do still
takes effect (a session logs in, an image is mapped) after a disconnect
that ran before they ended and found nothing.  The daemon remembers the
threads it started only while it lives; the kernel remembers the
processes whoever started them, across daemon and agent restarts.  So a
disconnect first looks here for such a command (``transports``'
``connect_command`` tells one of its connection's by its argv) and
waits for it (``brick._wait_earlier``).

Only root's processes count (real and effective uid 0, read from
/proc/PID/status, whose ``Uid:`` line shows them even for a process
that made itself non-dumpable and so shows root as the owner of its
/proc directory): os-brick runs iscsiadm and rbd as root, while any
user may run a program named ``iscsiadm`` with a volume's target on
its command line (target and image names are world-readable in /sys)
and, were it counted, hold that volume's disconnects off for as long
as it likes (review-safety10 M-1).  The owner of /proc/PID is looked
at first, so most processes of a hypervisor (qemu's, vdsm's) cost one
stat, not a read of their argv.  Then the command's name
(/proc/PID/comm, the base name of the program file the kernel ran,
a script's own for a script run by its ``#!`` line) must be one the
matcher names (its ``programs``): reading comm takes no lock of the
process, while reading its argv takes its memory map's lock, which a
process faulting on dead storage (a hung NFS or FUSE mount) may hold
for as long as that lasts, and the read would wait with it, past the
disconnect's deadline (review-safety10 L-1).  So only root's
``iscsiadm``, ``rbd`` and ``nvme`` have their argv read.

Read as root in the daemon (any user may read /proc/PID/cmdline unless
/proc is mounted with hidepid; hidepid=2 does not hide root's commands
from the daemon's reduced capability set: checked on Linux 6.18 with
CAP_SYS_ADMIN, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH alone).  A
process that ends while it is read is skipped.  The daemon leaves out
its own children (``parent``): those are its calls', which it knows
better (a login another volume's connect runs now on a target shared
with this one is not this volume's).  Argument vectors are never
logged nor returned: os-brick puts a CHAP password on iscsiadm's
(``--op update -n node.session.auth.password -v ...``).
"""

import os

PROC = "/proc"

# Clock ticks per second of /proc/PID/stat's times.
_TICKS = os.sysconf("SC_CLK_TCK")

# How much of a command's name /proc/PID/comm shows (TASK_COMM_LEN - 1).
_COMM_LEN = 15


def matching(match, proc=PROC, parent=None):
    """``[(pid, name, age)]`` of the processes whose argv ``match``
    (argv -> a short name for logs, or None) names, ``age`` the seconds
    since each started; this process excluded, and the children of
    ``parent`` (a pid) when given.  When ``match`` has ``programs`` (a
    set of command names), only processes whose comm is one of those
    are looked at further."""
    found = []
    uptime = None
    me = os.getpid()
    programs = getattr(match, "programs", None)
    if programs is not None:
        # The kernel keeps TASK_COMM_LEN - 1 bytes of the name.
        programs = {p.encode()[:_COMM_LEN] for p in programs}
    try:
        pids = [int(n) for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        try:
            if os.stat("{}/{}".format(proc, pid)).st_uid != 0:
                continue    # not root's (a non-dumpable one shows 0)
        except OSError:
            continue        # ended meanwhile
        if programs is not None and _comm(proc, pid) not in programs:
            continue
        if not _roots(proc, pid):
            continue
        argv = _argv(proc, pid)
        if not argv:
            continue        # gone, or a kernel thread or a zombie
        name = match(argv)
        if name is None:
            continue
        stat = _stat(proc, pid)
        if stat is None:
            continue        # ended meanwhile
        ppid, started = stat
        if parent is not None and ppid == parent:
            continue
        if uptime is None:
            uptime = _uptime(proc)
        found.append((pid, name, max(0.0, uptime - started)))
    return found


def _comm(proc, pid):
    """The command's name (/proc/PID/comm, bytes), None when it ended."""
    try:
        with open("{}/{}/comm".format(proc, pid), "rb") as f:
            return f.read().rstrip(b"\n")
    except OSError:
        return None


def _argv(proc, pid):
    try:
        with open("{}/{}/cmdline".format(proc, pid), "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def _roots(proc, pid):
    """Whether ``pid`` runs with real and effective uid 0 (the first two
    numbers of /proc/PID/status's ``Uid:`` line); False when it ended."""
    try:
        with open("{}/{}/status".format(proc, pid), "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    real, effective = line.split()[1:3]
                    return real == effective == b"0"
    except (OSError, ValueError):
        pass
    return False


def _stat(proc, pid):
    """(parent pid, seconds after boot it started) of ``pid``
    (/proc/PID/stat fields 4 and 22), or None."""
    try:
        with open("{}/{}/stat".format(proc, pid), "rb") as f:
            stat = f.read()
        # The command name (field 2) is in parentheses and may hold
        # spaces and parentheses: fields are counted after the last ")".
        fields = stat[stat.rindex(b")") + 2:].split()
        return int(fields[1]), int(fields[19]) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


def _uptime(proc):
    try:
        with open(proc + "/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
