"""Benchmark: one privsep round trip, through the real ``privileged.Brick``,
against oslo.privsep's own client.

A real privsep daemon (as root) and os-brick's real ``local`` connector
on a loop device: connect+disconnect pairs (two round trips each) from
one thread, then from several threads at once.  Prints per round trip:
wall time (p50/p95), calls per second, this process' CPU and the
daemon's CPU (from /proc/PID/stat), and the context switches of both
processes; it asserts nothing.

Baseline, measured in the same run: oslo.privsep's stock client
(``PrivContext`` in client mode, started by its
``RootwrapClientChannel``: ``oslo_privsep.comm.ClientChannel`` with its
``privsep_reader`` thread handing each reply to the caller) calling the
same entrypoints (``vdsm_managedvolume.brick.connect_volume`` ...) of a
second daemon started from the same configuration file: the daemon side
is the same code, only the client differs.  The two sides take turns
(``--rounds`` each, alternating) so that other load on the machine hits
both alike; each ratio is the baseline's figure over ours (calls per
second: ours over the baseline's), so above 1x ours is faster or
cheaper.

    sudo .venv/bin/python bench/privsep_rt.py [--pairs N] [--threads T]
                                              [--rounds R]
"""

import argparse
import os
import resource
import shlex
import shutil
import sys
import tempfile
import threading
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchutil  # noqa: E402
from vdsm_managedvolume import config  # noqa: E402
from vdsm_managedvolume import privileged  # noqa: E402
from vdsm_managedvolume import privsepconfig  # noqa: E402

# Seconds each call may take (the daemon's deadline).
CALL_TIMEOUT = 60


def proc_cpu(pid):
    """(seconds on a CPU, voluntary+involuntary context switches) summed
    over the threads of ``pid`` (those alive now: both daemons keep
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
    """proc_cpu() of this process, threads that ended included (oslo's
    reader thread is one of ours)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw


class Ours:
    """privileged.Brick: our client (no thread of its own)."""

    name = "ours"
    label = "privileged.Brick (ours)"

    def __init__(self, cfg):
        self.brick = privileged.Brick(cfg)

    def start(self, ci):
        self.brick.disconnect(ci, self.brick.connect(ci))
        self.pid = self.brick.daemon_pid()

    def pair(self, ci):
        self.brick.disconnect(ci, self.brick.connect(ci))

    def stop(self):
        self.brick.stop()


class Oslo:
    """oslo.privsep's stock client calling our daemon's entrypoints."""

    name = "oslo"
    label = "oslo.privsep client (baseline)"

    def __init__(self, cfg):
        # oslo_privsep.daemon imports eventlet, which warns that it is
        # deprecated: here and in the helper (on our stderr).
        warnings.filterwarnings("ignore", category=Warning,
                                module="oslo_privsep.daemon")
        os.environ["PYTHONWARNINGS"] = "ignore::Warning:oslo_privsep.daemon"
        from oslo_config import cfg as oslo_cfg
        from vdsm_managedvolume import brick
        self.brick = brick
        # The stock client reads its helper command from oslo.config:
        # privsep-helper with our daemon's configuration file (the
        # daemon refuses any other argument).
        oslo_cfg.CONF([], project="privsep-rt", default_config_files=[],
                      default_config_dirs=[])
        oslo_cfg.CONF.set_override(
            "helper_command", shlex.join([privileged._privsep_helper(),
                                          "--config-file",
                                          cfg.privsep_config]),
            group=privsepconfig.SECTION)
        # The daemon imports this package from where we do.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + paths)
        self.pid = None

    def start(self, ci):
        from vdsm_managedvolume import privsep
        # The first call starts the daemon; it serves nothing before a
        # client of its protocol said so (privsep.py, "Versions").
        self.brick.handshake(privsep.identity())
        self.brick.hello()      # configures os-brick
        self.pid = self.brick.getpid()
        self.pair(ci)

    def pair(self, ci):
        att = self.brick.connect_volume(
            ci, time.monotonic() + CALL_TIMEOUT, "-")
        self.brick.disconnect_volume(
            ci, att, True, time.monotonic() + CALL_TIMEOUT, "-")

    def stop(self):
        self.brick.context.stop()


class Figures:
    """What the rounds of one client with T threads added up to."""

    def __init__(self):
        self.times = []
        self.wall = 0.0
        self.client = [0.0, 0]
        self.daemon = [0.0, 0]

    @property
    def calls(self):
        return 2 * len(self.times)

    def add(self, times, wall, me0, me1, d0, d1):
        self.times.extend(times)
        self.wall += wall
        for acc, a, b in ((self.client, me0, me1), (self.daemon, d0, d1)):
            acc[0] += b[0] - a[0]
            acc[1] += b[1] - a[1]


def run(client, ci, pairs, threads, figures=None):
    """``pairs`` connect+disconnect pairs from ``threads`` threads;
    added to ``figures`` when given.  Exits with the first failure."""
    times = []
    failures = []
    per_thread = max(1, pairs // threads)

    def worker():
        try:
            for _ in range(per_thread):
                t = time.perf_counter()
                client.pair(ci)
                times.append((time.perf_counter() - t) / 2)
        except Exception as e:
            failures.append(e)

    me0, d0 = self_cpu(), proc_cpu(client.pid)
    start = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - start
    me1, d1 = self_cpu(), proc_cpu(client.pid)
    if failures:
        sys.exit("bench/privsep_rt.py: a call through {} failed: {}: {}"
                 .format(client.label, type(failures[0]).__name__,
                         failures[0]))
    if figures is not None:
        figures.add(times, wall, me0, me1, d0, d1)


def report(threads, results):
    print()
    print("{} thread(s), per round trip:".format(threads))
    head = "  {:<32} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8}"
    print(head.format("client", "p50", "p95", "calls/s", "CPU client",
                      "CPU daemon", "cs cli", "cs dmn"))
    rows = {}
    for client, f in results:
        n = f.calls
        row = (benchutil.percentile(f.times, 50),
               benchutil.percentile(f.times, 95), n / f.wall,
               f.client[0] / n, f.daemon[0] / n, f.client[1] / n,
               f.daemon[1] / n)
        rows[client.name] = row
        print(head.format(
            client.label, "{:.0f} us".format(row[0] * 1e6),
            "{:.0f} us".format(row[1] * 1e6), "{:.0f}".format(row[2]),
            "{:.0f} us".format(row[3] * 1e6),
            "{:.0f} us".format(row[4] * 1e6), "{:.1f}".format(row[5]),
            "{:.1f}".format(row[6])))
    ours, oslo = rows["ours"], rows["oslo"]
    print("  baseline vs ours (above 1x: ours better): p50 {}, calls/s {}, "
          "CPU client {}, CPU daemon {}, context switches client {}, "
          "daemon {}".format(
              _ratio(oslo[0], ours[0]), _ratio(ours[2], oslo[2]),
              _ratio(oslo[3], ours[3]), _ratio(oslo[4], ours[4]),
              _ratio(oslo[5], ours[5]), _ratio(oslo[6], ours[6])))


def _ratio(baseline, ours):
    return "{:.2f}x".format(baseline / ours) if ours else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000,
                   help="connect+disconnect pairs per client and thread "
                        "count, all rounds together (default 2000)")
    p.add_argument("--threads", type=int, default=8,
                   help="threads of the concurrent run; 1: none "
                        "(default 8)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds per client, alternating (default 4)")
    args = p.parse_args()
    if args.pairs < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--pairs, --threads and --rounds must be at least 1")
    if os.geteuid() != 0:
        sys.exit("bench/privsep_rt.py needs root (loop device, privsep "
                 "daemon)")
    tmp = tempfile.mkdtemp(prefix="privsep-rt-")
    clients = []
    try:
        cfg = config.with_state_dir(config.Config(),
                                    os.path.join(tmp, "state"))
        with benchutil.loop_device(tmp) as loop:
            ci = {"driver_volume_type": "local",
                  "data": {"device_path": loop}}
            for cls in (Ours, Oslo):
                clients.append(cls(cfg))
                clients[-1].start(ci)       # ours writes the config file
                run(clients[-1], ci, 100, 1)        # warm up
            print("load average before: {:.1f}".format(os.getloadavg()[0]))
            for threads in sorted({1, args.threads}):
                results = [(c, Figures()) for c in clients]
                per_round = max(threads, args.pairs // args.rounds)
                for _ in range(args.rounds):
                    for client, figures in results:
                        run(client, ci, per_round, threads, figures)
                report(threads, results)
            print("load average after: {:.1f}".format(os.getloadavg()[0]))
    finally:
        for client in clients:
            client.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
