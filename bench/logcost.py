"""Benchmark: the CPU one INFO line costs the agent, through the handler
``log.setup`` installs (a log file, the masking filter, the formatter),
against vdsm's logging of the same line.

An attach+detach writes four INFO lines (each call's START and FINISH;
FINISH names the outcome: ids, paths, states).  Kinds of line measured:

    plain       ids, paths, states (an attach's "FINISH ... ok vol_id=...
                path=... managed_path=..."): the filter's fast path (no
                argument masked one by one)
    start       a call's START line with connection_info (``api._Args``:
                the parameters masked by key, then formatted)
    secret      a START line whose connection_info holds a CHAP password:
                the full path (masked by key and by shape)
    debug off   a DEBUG line while the level is INFO

Baseline, measured in the same run, the rounds alternating with ours:
vdsm's logging of the same line: the standard library's FileHandler and
Formatter with vdsm's format string (``[formatter_long]`` of vdsm's
logger.conf, with the module and line number; vdsm's own formatter
class also adds the time zone, so this baseline is if anything
cheaper), no filter, logging's defaults (a pid per record), and the
arguments as vdsm logs them: the parameters' repr, unmasked (vdsm
writes ``auth_password`` to its log at INFO).  The ratio is our CPU
over the baseline's: what masking, escaping and the flow id cost per
line (above 1x: ours costs more).

CPU time (user+system) per line, the best of several rounds: the machine
may be shared, and the best round is the one least disturbed.  It prints;
it asserts nothing.  No root needed.

    .venv/bin/python bench/logcost.py [--lines N] [--rounds N]
"""

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from vdsm_managedvolume import api  # noqa: E402
from vdsm_managedvolume import log  # noqa: E402

VOL_ID = str(uuid.uuid4())
SD_ID = "00000000-0000-0000-0000-000000000000"
LOCAL = {"driver_volume_type": "local",
         "data": {"device_path": "/dev/loop7"}}
ISCSI = {"driver_volume_type": "iscsi",
         "data": {"target_iqn": "iqn.2026-12.org.example:vol",
                  "target_portal": "192.0.2.1:3260", "target_lun": 1,
                  "auth_method": "CHAP", "auth_username": "chapuser",
                  "auth_password": "chap-secret"}}


# vdsm's logger.conf, [formatter_long].
VDSM_FORMAT = ("%(asctime)s %(levelname)-5s (%(threadName)s) [%(name)s] "
               "%(message)s (%(module)s:%(lineno)d)")


class VdsmArgs:
    """A START line's parameters as vdsm logs them: name=repr(value),
    nothing masked, formatted when the line is written (as ``api._Args``
    is, so the two sides differ only in what the handler does)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return ", ".join("{}={!r}".format(k, v)
                         for k, v in self.value.items())


def lines(args_type):
    """(name, function writing one line) for each kind of line, the
    START lines' parameters wrapped in ``args_type``."""
    service = logging.getLogger("managedvolume.service")
    calls = logging.getLogger("managedvolume.api")
    path = "/dev/loop7"
    managed = "/run/vdsm/managedvolumes/{}_{}".format(SD_ID, VOL_ID)
    return [
        ("plain", lambda: calls.info(
            "FINISH %s ok vol_id=%s path=%s managed_path=%s (%.3f s)",
            "ManagedVolume.attach_volume", VOL_ID, path, managed, 0.0042)),
        ("start", lambda: calls.info(
            "START %s(%s)", "ManagedVolume.attach_volume",
            args_type({"vol_id": VOL_ID, "connection_info": LOCAL,
                       "sd_id": SD_ID}))),
        ("secret", lambda: calls.info(
            "START %s(%s)", "ManagedVolume.attach_volume",
            args_type({"vol_id": VOL_ID, "connection_info": ISCSI,
                       "sd_id": SD_ID}))),
        ("debug off", lambda: service.debug(
            "Updated volume %s: %s", VOL_ID, "state")),
    ]


class Side:
    """One way of logging: its root handler and the lines it writes."""

    def __init__(self, name, handler, args_type, log_processes):
        self.name = name
        self.handler = handler
        self.lines = lines(args_type)
        self.log_processes = log_processes
        self.best = {}

    def install(self):
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        logging.logProcesses = self.log_processes
        logging.logMultiprocessing = self.log_processes

    def measure(self, n):
        self.install()
        for name, fn in self.lines:
            each = cpu_per_call(fn, n)
            self.best[name] = min(self.best.get(name, each), each)


def cpu_per_call(fn, n):
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def ours(directory):
    """The handler log.setup installs for a log file."""
    log.setup(level="INFO", filename=os.path.join(directory, "agent.log"))
    return Side("ours", logging.getLogger().handlers[0], api._Args,
                log_processes=False)


def vdsm(directory):
    handler = logging.FileHandler(os.path.join(directory, "vdsm.log"))
    handler.setFormatter(logging.Formatter(VDSM_FORMAT))
    return Side("vdsm", handler, VdsmArgs, log_processes=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=5000,
                   help="lines per round (default 5000)")
    p.add_argument("--rounds", type=int, default=7,
                   help="rounds of each side, alternating; the best is "
                        "shown (default 7)")
    args = p.parse_args()
    if args.lines < 1 or args.rounds < 1:
        p.error("--lines and --rounds must be at least 1")
    tmp = tempfile.mkdtemp(prefix="logcost-")
    sides = []
    try:
        sides = [ours(tmp), vdsm(tmp)]
        print("load average before: {:.1f}".format(os.getloadavg()[0]))
        for _ in range(args.rounds):
            for side in sides:
                side.measure(args.lines)
        print("load average after: {:.1f}".format(os.getloadavg()[0]))
    finally:
        for side in sides:
            side.handler.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report(*sides)


def report(ours, vdsm):
    print("CPU per line, the best of the rounds: ours (log.setup: masking "
          "filter, flow id) vs vdsm's logging (stdlib FileHandler and "
          "Formatter, vdsm's format, nothing masked)")
    print("{:10} {:>12} {:>12} {:>12}".format("line", "ours", "vdsm",
                                             "ours/vdsm"))
    for name, _ in ours.lines:
        print("{:10} {:>9.2f} us {:>9.2f} us {:>11.2f}x".format(
            name, ours.best[name] * 1e6, vdsm.best[name] * 1e6,
            ours.best[name] / vdsm.best[name]))


if __name__ == "__main__":
    main()
