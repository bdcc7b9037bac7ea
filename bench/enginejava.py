"""40 concurrent calls on one mutual-TLS connection: ovirt-engine's own
client (vdsm-jsonrpc-java, built by scripts/enginejava.py from the harness
beside the repository) beside our own, against the same
``managedvolume-agent``.

    engine     EngineLikeClient --scenario burst: the engine's client
               (TLSv1.2, heart-beat 30 s), N threads each making one
               ManagedVolume.volumes_info call through the engine's FutureMap
    ours       the same N calls from this process on one connection, all
               sent at once (stompframe over ssl), each timed from its send
               to its response

Each burst is timed on its own: calls per second is N / (slowest call),
p50 and p99 are over every call of every burst.  The engine's client
decodes one TLS record per reactor round, a round at least every second
(docs/interop.md), which shows in its p99; the ratio engine/ours is
printed, nothing is asserted.

Needs root (the agent's privsep daemon) and the JDK (see
scripts/enginejava.py).  Usage:

    .venv/bin/python bench/enginejava.py [--bursts 5] [--calls 40]
"""

import argparse
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchutil  # noqa: E402
from vdsm_managedvolume import config  # noqa: E402
from vdsm_managedvolume import pki  # noqa: E402
from vdsm_managedvolume import stompframe  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "enginejava", os.path.join(REPO, "scripts", "enginejava.py"))
enginejava = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(enginejava)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    harness = enginejava.find_harness()
    if harness is None:
        sys.exit("bench/enginejava.py: no harness (set {})".format(
            enginejava.HARNESS_ENV))
    lack = enginejava.missing()
    if lack:
        sys.exit("bench/enginejava.py: missing {}; apt-get install {}"
                 .format(" ".join(lack), " ".join(enginejava.PACKAGES)))
    if os.geteuid() != 0:
        sys.exit("bench/enginejava.py needs root (privsep daemon)")

    base = tempfile.mkdtemp(prefix="bench-enginejava-")
    agent = None
    try:
        classpath = enginejava.build(harness, os.path.join(base, "build"))
        os.makedirs(os.path.join(base, "agent"))
        agent = enginejava.Agent(os.path.join(base, "agent")).start()
        engine = [_engine_burst(classpath, agent, args.calls,
                                os.path.join(base, "out", str(i)))
                  for i in range(args.bursts)]
        ours = [_our_burst(agent, args.calls) for _ in range(args.bursts)]
        _report(args.calls, args.bursts, engine, ours)
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def _engine_burst(classpath, agent, calls, out):
    """Latencies (ms) of one burst by the engine's client."""
    scenario = enginejava.Scenario(
        "bench", "tls", ["--ssl-protocol", "TLSv1.2", "--heartbeat-sec",
                         "30", "--scenario", "burst", "--burst",
                         str(calls), "--no-trace"], 1, "steps")
    summary = enginejava._client(classpath, "bench", agent, scenario,
                                 "/dev/null", out)
    for step in (summary or {}).get("steps", []):
        if step.get("name", "").startswith("burst"):
            if step.get("answered_ok") != calls:
                raise RuntimeError("engine burst failed: {}".format(
                    step.get("errors")))
            return step["latencies_ms"]
    raise RuntimeError("engine burst did not run (see {})".format(out))


def _our_burst(agent, calls):
    """Latencies (ms) of ``calls`` calls sent at once on one connection."""
    cfg = config.Config()
    config.with_state_dir(cfg, agent.state_dir)
    ctx = pki.dev_client_context(cfg)
    sock = ctx.wrap_socket(socket.create_connection(
        ("127.0.0.1", agent.port), timeout=60), server_hostname="localhost")
    parser = stompframe.Parser(max_frame=64 * 1024 * 1024,
                               commands=stompframe.SERVER_COMMANDS)
    frames = []

    def next_frame():
        while not frames:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("agent closed the connection")
            frames.extend(parser.feed(data))
        return frames.pop(0)

    try:
        sock.sendall(stompframe.encode(stompframe.CONNECT, {
            "accept-version": "1.2", "heart-beat": "0,24000"}))
        assert next_frame().command == stompframe.CONNECTED
        reply = str(uuid.uuid4())
        sock.sendall(stompframe.encode(stompframe.SUBSCRIBE, {
            "destination": reply, "id": reply, "ack": "auto"}))
        ids = [str(uuid.uuid4()) for _ in range(calls)]
        data = b"".join(stompframe.encode(stompframe.SEND, {
            "destination": "jms.topic.vdsm_requests",
            "content-type": "application/json", "reply-to": reply},
            json.dumps([{"jsonrpc": "2.0", "id": i,
                         "method": "ManagedVolume.volumes_info",
                         "params": {"vol_ids": []}}])) for i in ids)
        start = time.perf_counter()
        sock.sendall(data)
        latencies = []
        for _ in ids:
            frame = next_frame()
            response = json.loads(frame.body)
            if "error" in response:
                raise RuntimeError(response["error"])
            latencies.append((time.perf_counter() - start) * 1000)
        return latencies
    finally:
        sock.close()


def _report(calls, bursts, engine, ours):
    print("{} concurrent ManagedVolume.volumes_info calls on one mutual-TLS "
          "connection, {} bursts each, same agent".format(calls, bursts))
    print("{:38} {:>10} {:>9} {:>9} {:>9}".format(
        "client", "calls/s", "p50 ms", "p99 ms", "max ms"))
    rows = {}
    for name, runs in (("engine (vdsm-jsonrpc-java 1.7.4)", engine),
                       ("ours (stompframe, one connection)", ours)):
        every = [x for run in runs for x in run]
        rate = sum(calls / (max(run) / 1000.0) for run in runs) / len(runs)
        rows[name] = (rate, benchutil.percentile(every, 50),
                      benchutil.percentile(every, 99), max(every))
        print("{:38} {:>10.0f} {:>9.1f} {:>9.1f} {:>9.1f}".format(
            name, *rows[name]))
    (e_rate, _, e_p99, _), (o_rate, _, o_p99, _) = rows.values()
    # Three significant digits: the engine's rate is a few calls per
    # second against hundreds (x0.00 with two decimals).
    print("engine / ours: calls/s x{:.3g} (ours/engine x{:.3g}), p99 "
          "x{:.1f}".format(e_rate / o_rate, o_rate / e_rate, e_p99 / o_p99))


if __name__ == "__main__":
    main()
