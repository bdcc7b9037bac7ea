"""Which CPUs the agent and its privsep daemon run on.

vdsm's practice, followed here (oVirt/vdsm: ``vdsmd.__set_cpu_affinity``,
``taskset.pick_cpu``, ``common/cmdutils.wrap_command``):

- vdsm pins itself, every thread, to one CPU: its ``[vars]
  cpu_affinity``, by default "auto", the second online CPU (the first
  when only one is online).  Its history gives no reason for the second
  but continuity: the first default was CPU 1, fixed, which kept vdsm
  from starting where CPU 1 was offline, so "auto" takes the second
  online one.  It reports its CPUs to the engine in its capabilities
  (``vdsmToCpusAffinity``).  A Python process runs Python in one thread
  at a time (the interpreter lock); threads spread over several cores
  hand that lock from core to core at every system call, and wake idle
  cores to do it.
- It runs every command it starts on every CPU ("only VDSM itself should
  be bound": ``reset_cpu_affinity``, through ``taskset``).

So:

``[agent] cpu_affinity`` (``agent_cpus``, applied by ``pin_agent`` before
the agent starts a thread): "auto" (the default, as vdsm's) takes the
second of the CPUs the agent may use when it starts (vdsm takes the
second online one even if systemd's CPUAffinity= excludes it), empty
means no pinning, a list in the kernel's syntax (``0-3,8``; vdsm's own
option takes commas only) names the CPUs.  Beside a vdsmd that pins
itself the agent lands on vdsm's core, the one ovirt-engine keeps
dedicated-CPU VMs off (it excludes vdsm's CPUs only).  Inside vdsm this
package pins nothing: vdsm did.

``[privsep] daemon_cpu_affinity`` (``daemon_cpus``): where the daemon,
and every command os-brick runs from it (iscsiadm, multipath, rbd,
nvme), runs, and the agent's own commands (``udevadm trigger`` where
sysfs cannot be written: ``udev.trigger``); otherwise they would share
the agent's one core, or vdsm's.
"auto" means, when the process starting the daemon pinned itself, the
CPUs it had before (the agent, through ``pin_agent``) or every CPU the
host's init may use (vdsm, through its own ``[vars] cpu_affinity``: the
CPUs of pid 1, which systemd's CPUAffinity= in system.conf and tuned's
cpu-partitioning restrict; vdsm's own commands take every configured CPU,
``cmdutils._ANY_CPU``, whatever that says); else the starter's own.
Empty means the starter's own; a list names them.  The daemon is born on
them: the thread starting it widens its own CPUs around the spawn
(``spawning_on``), so sudo, privsep-helper, the daemon's start-up and
every thread it makes inherit them.

``[agent] front_cpu_affinity`` (``front_cpus``, two processes): the
front end, the wire, runs beside the back end, not on its core (one core
for both was slower than one process).  Which CPU is safe follows
ovirt-engine (``VdsManager.updateCpuTopology``,
``VdsCpuUnitPinningHelper``, ``CpuPinningPolicyUnit``): of a host's
CPUs it keeps only vdsm's from dedicated and isolate-threads VMs (it
reads the one CPU vdsm reports in its capabilities, and a host reporting
more or none gets no such VM at all); it gives them CPUs of the socket
with the most free ones, cores from the lowest up, so CPU 0 is the first
on a one-socket host; manual pinning is what the admin wrote, never
exclusive; pid 1's CPUs it does not know.  So "auto" pins the front end
to a CPU only where the admin set housekeeping CPUs aside (pid 1 may not
use every online CPU), and elsewhere lets it run on every CPU but the
back end's, as every other process of the host does.

The kernel keeps only the CPUs of a set that are online and allowed by
the process's cpuset; a set it refuses entirely (EINVAL) is logged, and
the process keeps running where it was: where it runs is never a reason
not to serve.

Measured: docs/operations.md, "CPU placement".
"""

import logging
import os
import re
import sys
import threading

from . import errors

log = logging.getLogger(__name__)

AUTO = "auto"

# The kernel's largest NR_CPUS (Kconfig: 8192): a CPU number beyond is a
# typo, and a range to it would be a set of millions.
MAX_CPUS = 8192

ONLINE = "/sys/devices/system/cpu/online"

_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?\Z")

# The CPUs this process could use before pin_agent pinned it; None: not
# pinned by us.
_before_pin = None


def check(text, key, where):
    """``text`` as a value of ``key`` (a cpu_affinity), normalised
    ("auto" in any case, a list as written); ConfigError naming
    ``where`` otherwise."""
    text = text.strip()
    if text.lower() == AUTO:
        return AUTO
    cpu_list(text, key, where)
    return text


def cpu_list(text, key="cpu_affinity", where="managedvolume.conf"):
    """The CPUs of a list in the kernel's syntax (``0-3,8``), a sorted
    list of ints; [] for an empty text.  ConfigError naming ``where`` and
    ``key`` for anything else (a range running backwards, an empty item,
    a CPU number no kernel has: MAX_CPUS)."""
    if not text.strip():
        return []
    cpus = set()
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        first = last = None
        if m:
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
        if m is None or last < first or last >= MAX_CPUS:
            raise errors.ConfigError(
                "{}: {} = {!r} is not 'auto', empty nor a CPU list such as "
                "0-3,8 of CPUs 0 to {} (at {!r})".format(
                    where, key, text, MAX_CPUS - 1, part.strip()))
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def text(cpus):
    """``[0, 1, 2, 5]`` as the kernel writes it: ``0-2,5``."""
    ranges = []
    for c in sorted(cpus):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ",".join(str(a) if a == b else "{}-{}".format(a, b)
                    for a, b in ranges)


def agent_cpus(setting, allowed=None):
    """The CPUs ``[agent] cpu_affinity`` pins the agent to, a sorted
    list, or None: not pinned.  ``allowed``: the CPUs it may use now
    (``os.sched_getaffinity(0)``).  "auto": the second of them, as vdsm
    picks (``taskset.pick_cpu``), None when only one."""
    if setting != AUTO:
        return cpu_list(setting) or None
    allowed = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    if len(allowed) < 2:
        return None
    return allowed[:2][-1:]


def pin_agent(setting):
    """Pin every thread of this process as ``[agent] cpu_affinity`` says
    (call it before starting threads: new ones inherit); the CPUs it
    runs on now, a sorted list."""
    global _before_pin
    before = sorted(os.sched_getaffinity(0))
    cpus = agent_cpus(setting, before)
    if cpus is None:
        return before
    if set_threads(cpus, "the agent"):
        _before_pin = before
    return sorted(os.sched_getaffinity(0))


def daemon_cpus(setting):
    """The CPUs the privsep daemon (and every command it starts) runs on,
    a sorted list, or None: those of the process starting it.  See the
    module docstring for "auto"."""
    if setting != AUTO:
        return cpu_list(setting) or None
    if _before_pin is not None:
        return list(_before_pin)
    # Inside vdsm: its configuration module is loaded before anything else
    # runs, and nothing of ours imports it.
    vdsm_config = sys.modules.get("vdsm.common.config")
    try:
        pinned = vdsm_config.config.get("vars", "cpu_affinity") != ""
    except Exception:
        # Not inside vdsm, or a vdsm without the option.
        return None
    return host_cpus() if pinned else None


def front_cpus(setting):
    """The CPUs of the agent's front end (``hop``: the wire) as ``[agent]
    front_cpu_affinity`` says, a sorted list, or None: the agent's own
    (the back end's).  Empty: None.  A list: those CPUs.  Call it in the
    front, after the fork, before pinning it.

    "auto": among the CPUs the host's init may use (``host_cpus``) that
    the agent could use before it pinned itself (its own when it did not)
    and that are not the back end's:

    - when init may not use every online CPU (systemd's CPUAffinity=,
      tuned's cpu-partitioning, isolcpus=: the admin set CPUs aside),
      the first of them, a housekeeping CPU: one core, as the back end;
    - else all of them, unpinned: no CPU but vdsm's is known to be kept
      from dedicated-CPU VMs (ovirt-engine hands them CPUs from the
      lowest core up, CPU 0 first on a one-socket host), and a process
      free to move leaves a core a vCPU keeps busy;

    None when there is none (one CPU, or an agent not pinned)."""
    if not setting:
        return None
    if setting != AUTO:
        return cpu_list(setting, "front_cpu_affinity") or None
    back = os.sched_getaffinity(0)
    could = set(_before_pin) if _before_pin is not None else back
    host = host_cpus()
    free = [cpu for cpu in host if cpu in could and cpu not in back]
    if not free:
        return None
    online = online_cpus()
    if set(online) - set(host):
        log.info("The host's init may use CPUs %s of %s online: the front "
                 "end takes the first of them the back end does not use",
                 text(host), text(online))
        return free[:1]
    if len(free) == 1:
        log.info("The host's init may use every online CPU (%s): the "
                 "front end takes the one the back end does not use, %s",
                 text(online), text(free))
    else:
        log.info("The host's init may use every online CPU (%s): none is "
                 "known to be kept from dedicated-CPU VMs but the back "
                 "end's, so the front end is not pinned to one, it may use "
                 "%s", text(online), text(free))
    return free


def online_cpus():
    """The online CPUs, a sorted list (the kernel's
    /sys/devices/system/cpu/online); ``host_cpus`` if it cannot be
    read."""
    try:
        with open(ONLINE) as f:
            return cpu_list(f.read(), "online", ONLINE)
    except (OSError, errors.ConfigError):
        return host_cpus()


def host_cpus():
    """Every CPU the host's init (pid 1) may use, a sorted list: what
    systemd's CPUAffinity= (system.conf) leaves to services; all
    configured CPUs if it cannot be read."""
    try:
        return sorted(os.sched_getaffinity(1))
    except OSError:
        return list(range(os.sysconf("SC_NPROCESSORS_CONF")))


# What a quiet spawning_on was refused, (what, cpus): warned once.
_refused = set()
_refused_lock = threading.Lock()


class spawning_on:
    """Context manager: run the block (a spawn) with this thread on
    ``cpus`` (None: as it is), so that the child is born on them; the
    thread's CPUs are restored after it.  A list the kernel refuses is a
    warning: the child is then born on this thread's CPUs.  ``quiet``
    (a command run often: the udevadm fallback at every trigger): the
    start on them is logged at DEBUG, not INFO, and a refused list is a
    warning once per process for each ``what`` and list, then DEBUG
    (review-fix9 hostfix-L3)."""

    def __init__(self, cpus, what, quiet=False):
        self._cpus = cpus
        self._what = what
        self._quiet = quiet
        self._before = None

    def __enter__(self):
        if self._cpus is None:
            return
        before = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, self._cpus)
        except OSError as e:
            level = logging.WARNING
            if self._quiet:
                key = (self._what, tuple(self._cpus))
                with _refused_lock:
                    if key in _refused:
                        level = logging.DEBUG
                    _refused.add(key)
            log.log(level, "Cannot start %s on CPUs %s (%s): it starts on "
                    "%s%s", self._what, text(self._cpus), e, text(before),
                    "; said once, then at DEBUG" if self._quiet
                    and level == logging.WARNING else "")
            return
        self._before = before
        log.log(logging.DEBUG if self._quiet else logging.INFO,
                "Starting %s on CPUs %s", self._what,
                text(os.sched_getaffinity(0)))

    def __exit__(self, *exc):
        if self._before is not None:
            os.sched_setaffinity(0, self._before)
        return False


def set_threads(cpus, who):
    """Move every thread of this process to ``cpus``; True when done.
    A refusal is a warning naming ``who``: the process keeps its CPUs."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError as e:
        log.warning("Cannot list the threads of %s (%s): it keeps its CPUs "
                    "%s", who, e, text(os.sched_getaffinity(0)))
        return False
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue        # a thread that ended meanwhile
        except OSError as e:
            log.warning("Cannot move %s to CPUs %s (%s): it keeps its CPUs "
                        "%s", who, text(cpus), e,
                        text(os.sched_getaffinity(0)))
            return False
    return True
