"""What the wire costs: round trips through the agent vs. the service called
directly, in the same run, on the same loop device with os-brick's real
``local`` connector in a real privsep daemon.

    direct       Service(cfg).volumes_info() / attach+detach in this process
    dispatch     the same through jsonrpc.Dispatcher.handle(bytes) in this
                 process (JSON, schema binding, API class; no transport)
    wire         managedvolume-agent (a separate process, mutual TLS, STOMP,
                 JSON-RPC, schema, API) driven by stompclient.Client

Both with one caller, then with 32 concurrent callers (threads; one client
connection each over the wire).  The added wire latency is wire p50 minus
direct p50, per RPC (attach+detach is two RPCs); the target is <= 2 ms
(printed, not asserted); the last column is the ratio of the two p50s.

Needs root (loop device, privsep daemon).  Usage:

    .venv/bin/python bench/rpc.py [--rounds N] [--clients 32]

udevadm is /bin/true on both sides (no udevd here); everything else is the
production path.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchutil  # noqa: E402
from vdsm_managedvolume import config  # noqa: E402
from vdsm_managedvolume import pki  # noqa: E402
from vdsm_managedvolume import stompclient  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200,
                        help="calls per measurement with one caller")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=10,
                        help="calls per caller in the concurrent runs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/rpc.py needs root (loop device, privsep daemon)")

    base = tempfile.mkdtemp(prefix="bench-rpc-")
    agent = None
    service = None
    loops = contextlib.ExitStack()
    try:
        loop = loops.enter_context(benchutil.loop_device(base))
        conn = {"driver_volume_type": "local",
                "data": {"device_path": loop}}

        service = _start_service(os.path.join(base, "inproc"))
        agent = _Agent(os.path.join(base, "wire")).start()

        direct = _Direct(service, conn)
        dispatch = _Dispatch(service, conn)
        rows = []
        for name, rpcs, n, ops in (
                ("volumes_info", 1, args.rounds, "info"),
                ("attach+detach", 2, max(20, args.rounds // 4), "attach")):
            for callers, rounds in ((1, n), (args.clients, args.per_client)):
                rows.append((name, rpcs, callers,
                             _measure(lambda: direct, ops, callers, rounds),
                             _measure(lambda: dispatch, ops, callers,
                                      rounds),
                             _measure(lambda: _Wire(agent, conn), ops,
                                      callers, rounds)))
        _report(rows, loop)
    finally:
        if agent is not None:
            agent.stop()
        if service is not None:
            service.close()
        loops.close()
        shutil.rmtree(base, ignore_errors=True)


# Callers

class _Direct:
    """The service called in this process (shared by every thread)."""

    def __init__(self, service, conn):
        self.service = service
        self.conn = conn

    def info(self):
        self.service.volumes_info([])

    def attach(self):
        vol_id = str(uuid.uuid4())
        self.service.attach_volume(vol_id, self.conn)
        self.service.detach_volume(vol_id)

    def close(self):
        pass


class _Dispatch(_Direct):
    """The JSON-RPC layer called in this process, without a transport."""

    def __init__(self, service, conn):
        from vdsm_managedvolume import jsonrpc
        self.dispatcher = jsonrpc.Dispatcher(service)
        self.conn = conn

    def _call(self, method, params):
        body = json.dumps([{"jsonrpc": "2.0", "method": method,
                            "params": params, "id": "1"}]).encode()
        response = json.loads(self.dispatcher.handle(body))
        if "error" in response:
            raise RuntimeError(response["error"])

    def info(self):
        self._call("ManagedVolume.volumes_info", {"vol_ids": []})

    def attach(self):
        vol_id = str(uuid.uuid4())
        self._call("ManagedVolume.attach_volume",
                   {"vol_id": vol_id, "connection_info": self.conn})
        self._call("ManagedVolume.detach_volume", {"vol_id": vol_id})


class _Wire:
    """One client connection to the agent."""

    def __init__(self, agent, conn):
        self.client = agent.client()
        self.conn = conn

    def info(self):
        self.client.call("ManagedVolume.volumes_info", {"vol_ids": []})

    def attach(self):
        vol_id = str(uuid.uuid4())
        self.client.call("ManagedVolume.attach_volume",
                         {"vol_id": vol_id, "connection_info": self.conn})
        self.client.call("ManagedVolume.detach_volume", {"vol_id": vol_id})

    def close(self):
        self.client.close()


def _measure(make_caller, op, callers, rounds):
    """Latencies (seconds) of ``rounds`` calls by each of ``callers``."""
    latencies = []
    lock = threading.Lock()
    ready = threading.Barrier(callers)
    failures = []

    def run():
        caller = make_caller()
        try:
            fn = getattr(caller, op)
            fn()                                    # warm up
            ready.wait()
            mine = []
            for _ in range(rounds):
                start = time.perf_counter()
                fn()
                mine.append(time.perf_counter() - start)
            with lock:
                latencies.extend(mine)
        except Exception as e:
            failures.append(e)
            ready.abort()
        finally:
            caller.close()

    threads = [threading.Thread(target=run) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return latencies


def _report(rows, loop):
    print("RPC round trips (milliseconds): Service called directly, through "
          "the in-process Dispatcher, and through managedvolume-agent over "
          "mutual TLS (local connector, {})".format(loop))
    head = ("{:<14} {:>4} {:>7} {:>5} | {:>7} {:>7} | {:>7} {:>7} | {:>7} "
            "{:>7} | {:>9} {:>8}")
    print(head.format("operation", "rpcs", "callers", "calls", "direct",
                      "p95", "dispatch", "p95", "wire", "p95",
                      "wire adds", "wire /"))
    print(head.format("", "", "", "", "p50", "", "p50", "", "p50", "",
                      "p50/rpc", "direct"))
    worst = None
    for name, rpcs, callers, direct, dispatch, wire in rows:
        d50, d95 = _pct(direct)
        p50, p95 = _pct(dispatch)
        w50, w95 = _pct(wire)
        added = (w50 - d50) / rpcs
        if callers == 1:
            worst = added if worst is None else max(worst, added)
        print("{:<14} {:>4} {:>7} {:>5} | {:>7.2f} {:>7.2f} | {:>7.2f} "
              "{:>7.2f} | {:>7.2f} {:>7.2f} | {:>+9.2f} {:>8}".format(
                  name, rpcs, callers, len(wire), d50, d95, p50, p95, w50,
                  w95, added,
                  "{:.2f}x".format(w50 / d50) if d50 else "-"))
    print("target: the wire adds <= 2 ms p50 per RPC with one caller; "
          "measured worst {:+.2f} ms ({})".format(
              worst, "met" if worst <= 2.0 else "NOT met"))


def _pct(values):
    return (benchutil.percentile(values, 50) * 1000,
            benchutil.percentile(values, 95) * 1000)


# Set-up

def _settings(state_dir):
    # The concurrent callers attach distinct vol_ids on the one loop
    # device at once: sharing it must be allowed.
    return ("[volumes]\nudevadm = /bin/true\nlock_timeout = 120\n"
            "shared_devices = true\n"
            "[privsep]\ntimeout = 120\n"
            "[agent]\nworkers = 8\nmax_queue = 64\n"
            "[logging]\nlog_level = WARNING\n")


def _start_service(state_dir):
    from vdsm_managedvolume import service as service_module
    os.makedirs(state_dir)
    path = os.path.join(state_dir, "managedvolume.conf")
    with open(path, "w") as f:
        f.write(_settings(state_dir))
    cfg = config.load(path, state_dir=state_dir)
    service = service_module.Service(cfg)
    service.start()
    return service


class _Agent:

    def __init__(self, base):
        self.base = base
        self.state_dir = os.path.join(base, "state")
        os.makedirs(base)
        self.config_file = os.path.join(base, "managedvolume.conf")
        with open(self.config_file, "w") as f:
            f.write(_settings(self.state_dir))

    def start(self):
        self.process = benchutil.AgentProcess(
            self.base, ["--config", self.config_file, "--state-dir",
                        self.state_dir]).start()
        self.port = self.process.port
        cfg = config.with_state_dir(config.Config(), self.state_dir)
        self.ctx = pki.dev_client_context(cfg)
        return self

    def client(self):
        return stompclient.Client("localhost", self.port, self.ctx,
                                  timeout=300)

    def stop(self):
        self.process.stop()


if __name__ == "__main__":
    main()
