"""Benchmark: attach+detach and connector_info, ours vs vdsm's design.

Ours: ``Service`` with the real ``privileged.Brick`` (one long-lived
privsep daemon) and os-brick's real local connector on a real loop device;
every pair goes through validation, the per-volume lock, the journal
(SQLite, synchronous=FULL), the udev rule + ``udevadm trigger`` and the
managed link.

Baseline, what vdsm does: a fresh Python process per operation importing
``os_brick.initiator.connector`` and running the connector once (attach
and detach are one process each), and a fresh process running
``get_connector_properties`` for every getCapabilities.  (The baseline
runs os-brick's privileged calls in-process instead of spawning os-brick's
own daemon, so it is a lower bound of vdsm's cost.)

Needs root (loop device, privsep daemon).  Prints p50/p95 of each and the
ratios with their targets; it does not assert them.

    .venv/bin/python bench/attach.py [--pairs N] [--baseline-pairs N]
                                     [--info-calls N] [--info-baseline N]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchutil  # noqa: E402
from vdsm_managedvolume import config  # noqa: E402
from vdsm_managedvolume import service  # noqa: E402

TARGET_PAIR_RATIO = 200
TARGET_INFO_RATIO = 1000

BASELINE_CONNECT = """
import json, sys
from os_brick.initiator import connector
c = connector.InitiatorConnector.factory("local", None)
print(json.dumps(c.connect_volume({"device_path": sys.argv[1]})))
"""

BASELINE_DISCONNECT = """
import json, sys
from os_brick.initiator import connector
c = connector.InitiatorConnector.factory("local", None)
c.disconnect_volume({"device_path": sys.argv[1]}, json.loads(sys.argv[2]))
"""

BASELINE_PROPERTIES = """
import json
import os_brick.privileged
from os_brick.initiator import connector
os_brick.privileged.default.set_client_mode(False)
print(json.dumps(connector.get_connector_properties(
    None, None, multipath=True, enforce_multipath=True)))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=50,
                   help="attach+detach pairs through the service")
    p.add_argument("--baseline-pairs", type=int, default=4,
                   help="attach+detach pairs with a process per operation "
                        "(~3 s per process)")
    p.add_argument("--info-calls", type=int, default=20000,
                   help="cached connector_info calls")
    p.add_argument("--info-baseline", type=int, default=4,
                   help="connector_info calls with a process each")
    args = p.parse_args()

    if os.geteuid() != 0:
        sys.exit("bench/attach.py needs root (loop device, privsep daemon)")

    tmp = tempfile.mkdtemp(prefix="managedvolume-bench-")
    try:
        with benchutil.loop_device(tmp) as loop:
            cfg = config.with_state_dir(config.Config(),
                                        os.path.join(tmp, "s"))
            svc = service.Service(cfg)
            svc.start()
            try:
                results = run(svc, loop, args)
            finally:
                svc.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)


def run(svc, loop, args):
    ci = {"driver_volume_type": "local", "data": {"device_path": loop}}
    print("starting the privsep daemon and warming up...", flush=True)
    t = time.monotonic()
    svc.attach_volume(str(uuid.uuid4()), ci)  # starts the daemon
    print("  first call (daemon start): {:.2f} s".format(
        time.monotonic() - t), flush=True)
    for rec in svc.volumes_info():
        svc.detach_volume(rec["vol_id"])

    r = {}
    print("service: {} attach+detach pairs".format(args.pairs), flush=True)
    r["pair"] = timed(args.pairs, lambda: pair(svc, ci))

    # The largest part of our pair: vdsm's udevadm trigger, a process.
    r["udevadm"] = timed(20, lambda: subprocess.run(
        [svc.cfg.udevadm, "trigger", "--action=change", loop],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    print("baseline: {} pairs, a process per operation".format(
        args.baseline_pairs), flush=True)
    r["pair_base"] = timed(args.baseline_pairs,
                           lambda: baseline_pair(loop), verbose=True)

    print("service: connector_info (first call fills the cache)",
          flush=True)
    t = time.monotonic()
    svc.connector_info()
    r["info_fill"] = time.monotonic() - t
    r["info"] = timed(args.info_calls, svc.connector_info)

    print("baseline: {} connector_info, a process each".format(
        args.info_baseline), flush=True)
    r["info_base"] = timed(args.info_baseline, baseline_properties,
                           verbose=True)
    return r


def pair(svc, ci):
    vol_id = str(uuid.uuid4())
    svc.attach_volume(vol_id, ci)
    svc.detach_volume(vol_id)


def baseline_pair(loop):
    out = _python(BASELINE_CONNECT, loop)
    _python(BASELINE_DISCONNECT, loop, out.strip())


def baseline_properties():
    _python(BASELINE_PROPERTIES)


def _python(code, *argv):
    res = subprocess.run([sys.executable, "-c", code] + list(argv),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         check=False)
    if res.returncode != 0:
        sys.exit("baseline process failed: {}".format(
            res.stderr.decode()[-2000:]))
    return res.stdout.decode()


def timed(n, func, verbose=False):
    times = []
    for i in range(n):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
        if verbose:
            print("  {}/{}: {:.2f} s".format(i + 1, n, times[-1]),
                  flush=True)
    return times


def fmt(seconds):
    if seconds >= 1:
        return "{:.2f} s".format(seconds)
    if seconds >= 1e-3:
        return "{:.2f} ms".format(seconds * 1e3)
    return "{:.2f} us".format(seconds * 1e6)


def report(r, args):
    print()
    print("{:<44} {:>10} {:>10}".format("", "p50", "p95"))
    rows = (
        ("attach+detach, service ({} pairs)".format(args.pairs), r["pair"]),
        ("attach+detach, process per op ({} pairs)".format(
            args.baseline_pairs), r["pair_base"]),
        ("connector_info, cached ({} calls)".format(args.info_calls),
         r["info"]),
        ("connector_info, process each ({} calls)".format(
            args.info_baseline), r["info_base"]),
    )
    for name, times in rows:
        print("{:<44} {:>10} {:>10}".format(
            name, fmt(benchutil.percentile(times, 50)),
            fmt(benchutil.percentile(times, 95))))
    print("  of which udevadm trigger (one process): p50 {}".format(
        fmt(benchutil.percentile(r["udevadm"], 50))))
    print("connector_info cache fill (privsep daemon): {}".format(
        fmt(r["info_fill"])))
    pair_ratio = (benchutil.percentile(r["pair_base"], 50)
                  / benchutil.percentile(r["pair"], 50))
    info_ratio = (benchutil.percentile(r["info_base"], 50)
                  / benchutil.percentile(r["info"], 50))
    print()
    print("attach+detach ratio (p50): {:>12.0f}x  target >= {}x  {}".format(
        pair_ratio, TARGET_PAIR_RATIO,
        "met" if pair_ratio >= TARGET_PAIR_RATIO else "NOT met"))
    print("connector_info ratio (p50): {:>11.0f}x  target >= {}x  {}".format(
        info_ratio, TARGET_INFO_RATIO,
        "met" if info_ratio >= TARGET_INFO_RATIO else "NOT met"))


if __name__ == "__main__":
    main()
