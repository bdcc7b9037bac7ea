"""Benchmark: the engine shim per operation, cold command vs warm service.

Cold is what ovirt-engine pays today: one ``managedvolume-cinderlib-client``
process per operation, importing cinderlib and running ``cl.setup`` each
time.  Warm is the same command forwarding to ``--serve`` (started once,
here, before timing): the same operations, the same output bytes.

Both sides run the same sequence of operations on the embedded FileDriver
and a SQLite database (or ``--db-url``), each round on fresh volumes:

    create_volume connect_volume save_device get_connection_info
    extend_volume storage_stats create_snapshot create_volume_from_snapshot
    clone_volume remove_snapshot disconnect_volume delete_volume x3

Prints each operation's p50, cold and warm, the overall p50 of all
operations and the ratio, with the targets (warm p50 <= 0.3 s, ratio >= 20);
it does not assert them.

Bytecode: installed, the package is byte-compiled (the RPM runs
compileall); checked out, it is imported from source, and a development
environment often sets PYTHONDONTWRITEBYTECODE, so that every command would
compile its own modules again (~5 ms, a tenth of a warm command; a cold
one compiles more, but that is lost in its second).  Both sides therefore
run with a private bytecode cache in the bench's temporary directory
(PYTHONPYCACHEPREFIX; nothing is written into the tree), as installed;
``--from-source`` measures the checked-out condition instead.

    .venv/bin/python bench/engine.py [--rounds N] [--db-url URL]
                                     [--from-source]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutil  # noqa: E402

TARGET_WARM_P50 = 0.3
TARGET_RATIO = 20
CLIENT = os.path.join(os.path.dirname(sys.executable),
                      "managedvolume-cinderlib-client")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of the whole sequence per side "
                             "(default 2: ~30 cold runs)")
    parser.add_argument("--db-url", help="database (default: SQLite in a "
                                         "temp dir, one per side)")
    parser.add_argument("--from-source", action="store_true",
                        help="no bytecode cache for the package's modules "
                             "unless the environment allows one (see above)")
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="bench-engine-")
    env = dict(os.environ,
               MANAGEDVOLUME_ENGINE_LOCKS_DIR=os.path.join(base, "locks"),
               MANAGEDVOLUME_ENGINE_LOG_FILE=os.path.join(base, "engine.log"))
    if not args.from_source:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(base, "pycache")
    sock = os.path.join(base, "run", "cinderlib.sock")
    service = start_service(sock, os.path.join(base, "service.log"), env)
    try:
        timings = {"cold": {}, "warm": {}}
        for side in ("cold", "warm"):
            db_url = args.db_url or "sqlite:///{}/{}.db".format(base, side)
            driver = json.dumps({"volume_driver": "vdsm_managedvolume.engine."
                                 "filedriver.FileDriver",
                                 "volume_backend_name": "bench-" + side,
                                 "file_volume_dir":
                                     os.path.join(base, side + "-vols")})
            options = ["--cold"] if side == "cold" else ["--socket", sock]
            # Untimed: a fresh database gets its schema on first use.
            run(options, env, "storage_stats", driver, db_url, "false")
            for _ in range(args.rounds):
                for op, seconds in sequence(options, env, driver, db_url):
                    timings[side].setdefault(op, []).append(seconds)
        report(timings)
        print("bytecode: {}".format(
            "from source (as checked out)" if args.from_source else
            "cached, as installed (PYTHONPYCACHEPREFIX in the temp dir)"))
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def sequence(options, env, driver, db_url):
    """Run one round; yield (operation, seconds) per command."""
    vol = str(uuid.uuid4())
    clone = str(uuid.uuid4())
    connector = json.dumps({"host": "bench-host", "initiator": "iqn.x"})

    def timed(op, *args):
        start = time.monotonic()
        out = run(options, env, op, driver, db_url, *args)
        return op, time.monotonic() - start, out

    steps = [
        ("create_volume", vol, "1"),
        ("connect_volume", vol, connector),
        ("save_device", vol, json.dumps({"path": "/dev/bench"})),
        ("get_connection_info", vol),
        ("extend_volume", vol, "2"),
        ("storage_stats", "true"),
    ]
    for step in steps:
        op, t, _ = timed(*step)
        yield op, t
    op, t, snap = timed("create_snapshot", vol)
    yield op, t
    op, t, from_snap = timed("create_volume_from_snapshot", vol, snap)
    yield op, t
    for step in [("clone_volume", vol, clone),
                 ("remove_snapshot", snap, vol),
                 # Named: "bench-host" is no host to ask (see hosts.py).
                 ("disconnect_volume", vol, "bench-host"),
                 ("delete_volume", vol),
                 ("delete_volume", clone),
                 ("delete_volume", from_snap)]:
        op, t, _ = timed(*step)
        yield op, t


def run(options, env, op, driver, db_url, *args):
    cid = "bench"
    proc = subprocess.run([CLIENT] + options + [op, driver, db_url, cid]
                          + list(args), capture_output=True, env=env,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError("{} failed: {}{}".format(
            op, proc.stdout.decode(), proc.stderr.decode()[-2000:]))
    out = proc.stdout.decode()
    return out[len(cid) + 1:].strip() if out.startswith(cid + ":") else ""


def start_service(sock, log_file, env):
    proc = subprocess.Popen([CLIENT, "--serve", "--socket", sock,
                             "--log-file", log_file], env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            return proc
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    proc.kill()
    raise RuntimeError("warm service did not start")


def report(timings):
    cold, warm = timings["cold"], timings["warm"]
    print("{:<30} {:>10} {:>10} {:>8}".format("operation", "cold p50",
                                              "warm p50", "ratio"))
    for op in cold:
        c = benchutil.percentile(cold[op], 50)
        w = benchutil.percentile(warm[op], 50)
        print("{:<30} {:>9.3f}s {:>9.3f}s {:>7.1f}x".format(op, c, w, c / w))
    all_cold = [t for ts in cold.values() for t in ts]
    all_warm = [t for ts in warm.values() for t in ts]
    c = benchutil.percentile(all_cold, 50)
    w = benchutil.percentile(all_warm, 50)
    print("{:<30} {:>9.3f}s {:>9.3f}s {:>7.1f}x".format(
        "all operations ({} each)".format(len(all_cold)), c, w, c / w))
    print("warm p95 {:.3f}s; target warm p50 <= {}s: {}; target ratio >= "
          "{}: {}".format(benchutil.percentile(all_warm, 95),
                          TARGET_WARM_P50,
                          "met" if w <= TARGET_WARM_P50 else "NOT met",
                          TARGET_RATIO,
                          "met" if c / w >= TARGET_RATIO else "NOT met"))


if __name__ == "__main__":
    main()
