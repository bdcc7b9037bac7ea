"""Which CPUs the agent and its privsep daemon run on.

vdsm's practice, followed here (oVirt/vdsm: ``vdsmd.__set_cpu_affinity``,
``taskset.pick_cpu``, ``common/cmdutils.wrap_command``):

- vdsm pins itself, every thread, to one CPU: its ``[vars]
  cpu_affinity``, by default "auto", the second online CPU (the first
  when only one is online).  A Python process runs Python in one thread
  at a time (the interpreter lock); threads spread over several cores
  hand that lock from core to core at every system call, and wake idle
  cores to do it.
- It runs every command it starts on every CPU ("only VDSM itself should
  be bound": ``reset_cpu_affinity``, through ``taskset``).

So:

``[agent] cpu_affinity`` (``agent_cpus``, applied by ``pin_agent`` before
the agent starts a thread): the same values and default as vdsm's, "auto"
taking the second of the CPUs the agent may use when it starts (vdsm takes
the second online one even if systemd's CPUAffinity= excludes it), empty
for no pinning, or a CPU list in the kernel's syntax (``0-3,8``).  Inside
vdsm this package pins nothing: vdsm did.

``[privsep] cpu_affinity`` (``daemon_cpus``, applied by the daemon to its
threads at its ``hello``, before it runs anything: brick.py): "auto" means
every CPU when the process starting the daemon pinned itself (the agent,
through ``pin_agent``: the CPUs it had before; vdsm, through its own
``[vars] cpu_affinity``: 0 to the number of configured CPUs less one, as
vdsm's ``cmdutils._ANY_CPU``), else the starter's own; empty means the
starter's own; a CPU list names them.  The daemon, and every command
os-brick runs from it (iscsiadm, multipath, rbd, nvme), would otherwise
share the agent's one core, or vdsm's.

The kernel keeps only the CPUs of a set that are online and allowed by
the process's cpuset; a set it refuses entirely (EINVAL) is logged, and
the process keeps running where it was: where it runs is never a reason
not to serve.

Measured (2026-12-01, 2-core VM, load average 6-8 from other jobs, one
agent alternating between free and pinned to CPU 1, six rounds each):
32 callers 402-479 vs 254-377 attach+detach pairs per second; the
agent's CPU per pair with 32 callers 1.79-2.08 vs 2.13-2.83 ms; one
caller's p50 2.37-4.65 vs 3.01-14.36 ms (docs/operations.md, "Under
load").
"""

import logging
import os
import re
import sys

from . import errors

log = logging.getLogger(__name__)

AUTO = "auto"

# The kernel's largest NR_CPUS (Kconfig: 8192): a CPU number beyond is a
# typo, and a range to it would be a set of millions.
MAX_CPUS = 8192

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
                "0-3,8 (at {!r})".format(where, key, text, part.strip()))
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
    return list(range(os.sysconf("SC_NPROCESSORS_CONF"))) if pinned \
        else None


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
