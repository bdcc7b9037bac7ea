"""Benchmark: one privsep round trip, through the real ``privileged.Brick``.

A real privsep daemon (as root) and os-brick's real ``local`` connector
on a loop device: N connect+disconnect pairs from one thread (two round
trips each), then the same from several threads at once.  Prints per
round trip: wall time (p50/p95), this process' CPU and the daemon's CPU
(from /proc/PID/stat), and the context switches of both processes; it
asserts nothing.

    sudo .venv/bin/python bench/privsep_rt.py [--pairs N] [--threads T]
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchutil  # noqa: E402
from vdsm_managedvolume import config  # noqa: E402
from vdsm_managedvolume import privileged  # noqa: E402


def proc_cpu(pid):
    """(seconds on a CPU, voluntary+involuntary context switches) summed
    over the threads of ``pid`` (those alive now: both processes keep
    their threads)."""
    cpu = 0.0
    switches = 0
    task = "/proc/{}/task".format(pid)
    for tid in os.listdir(task):
        try:
            with open("{}/{}/schedstat".format(task, tid)) as f:
                cpu += int(f.read().split()[0]) / 1e9
            with open("{}/{}/status".format(task, tid)) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt",
                                        "nonvoluntary_ctxt")):
                        switches += int(line.split()[1])
        except FileNotFoundError:
            pass        # a thread that just ended
    return cpu, switches


def self_cpu():
    """proc_cpu() of this process, threads that ended included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw


def run(brick, ci, pairs, threads):
    daemon = brick.daemon_pid()
    times = []

    def worker(n):
        for _ in range(n):
            t = time.perf_counter()
            att = brick.connect(ci)
            brick.disconnect(ci, att)
            times.append((time.perf_counter() - t) / 2)

    me0, d0 = self_cpu(), proc_cpu(daemon)
    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(pairs // threads,))
          for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - start
    me1, d1 = self_cpu(), proc_cpu(daemon)
    calls = 2 * len(times)
    print("{:2d} thread(s): round trip p50 {:.0f} us p95 {:.0f} us; "
          "{:.0f} calls/s; CPU per call: client {:.0f} us, daemon {:.0f} us; "
          "context switches per call: client {:.1f}, daemon {:.1f}".format(
              threads, benchutil.percentile(times, 50) * 1e6,
              benchutil.percentile(times, 95) * 1e6, calls / wall,
              (me1[0] - me0[0]) / calls * 1e6, (d1[0] - d0[0]) / calls * 1e6,
              (me1[1] - me0[1]) / calls, (d1[1] - d0[1]) / calls))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="privsep-rt-")
    try:
        cfg = config.with_state_dir(config.Config(),
                                    os.path.join(tmp, "state"))
        brick = privileged.Brick(cfg)
        try:
            with benchutil.loop_device(tmp) as loop:
                ci = {"driver_volume_type": "local",
                      "data": {"device_path": loop}}
                brick.disconnect(ci, brick.connect(ci))  # start it
                run(brick, ci, 100, 1)                    # warm up
                run(brick, ci, args.pairs, 1)
                if args.threads > 1:
                    run(brick, ci, args.pairs, args.threads)
        finally:
            brick.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
