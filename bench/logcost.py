"""Benchmark: the CPU one INFO line costs the agent, through the handler
``log.setup`` installs (a log file, the masking filter, the formatter).

An attach+detach writes six INFO lines (each call's START and FINISH,
the service's Attached and Detached).  Kinds of line measured:

    plain       ids, paths, states ("Attached volume ... path=..."): the
                filter's fast path (no argument masked one by one)
    start       a call's START line with connection_info (``api._Args``:
                the parameters masked by key, then formatted)
    secret      a START line whose connection_info holds a CHAP password:
                the full path (masked by key and by shape)
    debug off   a DEBUG line while the level is INFO

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


def lines():
    service = logging.getLogger("managedvolume.service")
    calls = logging.getLogger("managedvolume.api")
    path = "/dev/loop7"
    managed = "/run/vdsm/managedvolumes/{}_{}".format(SD_ID, VOL_ID)
    return [
        ("plain", lambda: service.info(
            "Attached volume %s path=%s managed_path=%s", VOL_ID, path,
            managed)),
        ("start", lambda: calls.info(
            "START %s(%s)", "ManagedVolume.attach_volume",
            api._Args({"vol_id": VOL_ID, "connection_info": LOCAL,
                       "sd_id": SD_ID}))),
        ("secret", lambda: calls.info(
            "START %s(%s)", "ManagedVolume.attach_volume",
            api._Args({"vol_id": VOL_ID, "connection_info": ISCSI,
                       "sd_id": SD_ID}))),
        ("debug off", lambda: service.debug(
            "Updated volume %s: %s", VOL_ID, "state")),
    ]


def cpu_per_call(fn, n, rounds):
    best = None
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            fn()
        each = (time.process_time() - start) / n
        best = each if best is None else min(best, each)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=5000,
                   help="lines per round (default 5000)")
    p.add_argument("--rounds", type=int, default=7,
                   help="rounds; the best is shown (default 7)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="logcost-")
    try:
        log.setup(level="INFO", filename=os.path.join(tmp, "agent.log"))
        print("load average before: {:.1f}".format(os.getloadavg()[0]))
        for name, fn in lines():
            us = cpu_per_call(fn, args.lines, args.rounds) * 1e6
            print("{:10} {:7.2f} us CPU per line".format(name, us))
        print("load average after: {:.1f}".format(os.getloadavg()[0]))
    finally:
        logging.getLogger().handlers[0].close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
