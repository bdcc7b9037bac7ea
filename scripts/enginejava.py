#!/usr/bin/env python3
"""Drive managedvolume-agent with ovirt-engine's own JSON-RPC client.

ovirt-engine talks to hosts with vdsm-jsonrpc-java.  The harness directory
(``../shared/enginejava`` beside the repository, or $MANAGEDVOLUME_ENGINEJAVA)
holds that library's sources (release 1.7.4) and EngineLikeClient, a driver
that builds and uses the client as ovirt-engine does (its README.txt says
how).  The harness is only read: this script compiles both with Debian's
JDK and jars into a directory of ours, starts agents (mutual TLS, and plain
TCP on loopback) in temporary state directories, runs the scenarios and
fails when any step of any scenario fails.  Latencies are printed, never
judged (docs/interop.md says what they are and why).

    sudo .venv/bin/python scripts/enginejava.py [--full] [--out DIR]

Without --full: the quick set that tests/enginejava_test.py runs in CI.
``make interop`` runs --full (idle periods of 60 s, every scenario, more
repetitions; 6-8 minutes).  Needs root (the engine sequence attaches a
loop device).  Packages: see PACKAGES (scripts/install-sysdeps.sh installs
them).
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(os.path.dirname(sys.executable), "managedvolume-agent")
HARNESS_ENV = "MANAGEDVOLUME_ENGINEJAVA"

# Debian packages of the JDK and of the jars the library imports.
PACKAGES = ("default-jdk-headless", "libjackson2-databind-java",
            "libjackson2-core-java", "libjackson2-annotations-java",
            "libslf4j-java", "libcommons-lang3-java")
JAR_DIR = "/usr/share/java"
JARS = ("jackson-databind", "jackson-core", "jackson-annotations",
        "slf4j-api", "commons-lang3")
RUN_JARS = JARS + ("slf4j-jdk14",)

DRIVER = "javaclient.EngineLikeClient"

Scenario = collections.namedtuple(
    "Scenario", "name mode args repeat kind")
Result = collections.namedtuple(
    "Result", "name ok detail latencies")


def find_harness():
    """The harness directory, or None."""
    if os.environ.get(HARNESS_ENV):
        return os.environ[HARNESS_ENV]
    candidates = [os.path.join(REPO, os.pardir, "shared", "enginejava")]
    try:
        # A git worktree: beside the main checkout.
        common = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--path-format=absolute",
             "--git-common-dir"], capture_output=True, text=True,
            check=True).stdout.strip()
        candidates.append(os.path.join(os.path.dirname(common), os.pardir,
                                       "shared", "enginejava"))
    except (OSError, subprocess.CalledProcessError):
        pass
    for path in candidates:
        if os.path.isfile(os.path.join(path, "src", "javaclient",
                                       "EngineLikeClient.java")):
            return os.path.normpath(path)
    return None


def missing():
    """What the build needs and this host lacks (empty: nothing)."""
    lack = [tool for tool in ("javac", "java") if not shutil.which(tool)]
    lack += [name + ".jar" for name in RUN_JARS
             if not os.path.exists(_jar(name))]
    return lack


def build(harness, build_dir):
    """Compile the library (main sources) and the driver into build_dir;
    return the class path to run the driver with."""
    lib_src = os.path.join(harness, "vdsm-jsonrpc-java", "client", "src",
                           "main", "java")
    lib_out = os.path.join(build_dir, "lib-classes")
    out = os.path.join(build_dir, "classes")
    for d in (lib_out, out):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    sources = sorted(glob.glob(os.path.join(lib_src, "**", "*.java"),
                               recursive=True))
    listing = os.path.join(build_dir, "lib-sources.txt")
    with open(listing, "w") as f:
        f.write("\n".join(sources) + "\n")
    jars = ":".join(_jar(name) for name in JARS)
    _javac(["-nowarn", "--release", "11", "-cp", jars, "-d", lib_out,
            "@" + listing])
    _javac(["--release", "17", "-cp", lib_out + ":" + jars, "-d", out] +
           sorted(glob.glob(os.path.join(harness, "src", "javaclient",
                                         "*.java"))))
    return ":".join([out, lib_out] + [_jar(name) for name in RUN_JARS])


def scenarios(full):
    """The scenarios, as run.sh in the harness names them."""
    idle = "60" if full else "5"
    tls12 = ["--ssl-protocol", "TLSv1.2"]
    chosen = [
        # ovirt-engine's defaults: the whole sequence, idle on heart-beats
        # only, a burst of 40 concurrent calls on the connection.
        Scenario("tls-engine", "tls", tls12 + [
            "--heartbeat-sec", "30", "--idle-sec", idle], 1, "steps"),
        # The library's own default protocol (TLS 1.3 here), client
        # heart-beats; the idle period outlasts a heart-beat interval.
        Scenario("tls13-clienthb", "tls", [
            "--ssl-protocol", "TLS", "--heartbeat-sec", "10",
            "--outgoing-heartbeat-ms", "5000",
            "--idle-sec", "20" if full else "12"], 1, "steps"),
        Scenario("tls-nocert", "tls", tls12 + ["--scenario", "nocert"], 1,
                 "steps"),
        # Concurrent calls right after connecting.
        Scenario("tls-burst", "tls", tls12 + [
            "--scenario", "burst", "--burst", "8"], 3 if full else 1,
            "steps"),
        Scenario("plain-engine", "plain", [
            "--heartbeat-sec", "30", "--idle-sec", idle], 1, "steps"),
        # New connections: the client sends SUBSCRIBE before CONNECT on
        # about half of them.
        Scenario("plain-connect-race", "plain", [
            "--scenario", "caps", "--heartbeat-sec", "3",
            "--connection-timeout-sec", "3", "--client-timeout-sec", "10"],
            20 if full else 6, "race"),
    ]
    if full:
        chosen[5:5] = [Scenario("plain-clienthb", "plain", [
            "--heartbeat-sec", "10", "--outgoing-heartbeat-ms", "5000",
            "--idle-sec", "20"], 1, "steps")]
        # Slow by the client's plain reader (frames that arrive together
        # wait for the next heart-beat): not in the quick set.
        chosen.append(Scenario("plain-burst", "plain", [
            "--scenario", "burst", "--burst", "8",
            "--connection-timeout-sec", "3"], 2, "steps"))
    return chosen


class Agent:
    """A ``managedvolume-agent`` process in a state dir of its own."""

    def __init__(self, base, insecure=False):
        self.base = base
        self.insecure = insecure
        self.state_dir = os.path.join(base, "state")
        self.log_file = os.path.join(self.state_dir, "log", "agent.log")
        self.config = os.path.join(base, "managedvolume.conf")
        with open(self.config, "w") as f:
            # DEBUG: the connect race is judged from the agent's log.
            f.write("[logging]\nlog_level = DEBUG\n")
        self.port = None
        self.proc = None

    def start(self, timeout=120):
        self.port = _free_port()
        cmd = [AGENT, "--config", self.config, "--state-dir",
               self.state_dir, "--listen", "127.0.0.1:{}".format(self.port)]
        if self.insecure:
            cmd.append("--insecure")
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("MANAGEDVOLUME_CONFIG", None)
        self.stderr = open(os.path.join(self.base, "agent.stderr"), "w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.stderr,
                                     stderr=self.stderr)
        deadline = time.monotonic() + timeout
        while "Listening on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stderr.seek(0)
                raise RuntimeError("agent did not start: {}".format(
                    self.stderr.read()[-2000:]))
            time.sleep(0.1)
        return self

    @property
    def tls_args(self):
        if self.insecure:
            return []
        pki = os.path.join(self.state_dir, "pki")
        return ["--ca", os.path.join(pki, "cacert.pem"),
                "--cert", os.path.join(pki, "client-cert.pem"),
                "--key", os.path.join(pki, "client-key.pem")]

    def log(self):
        try:
            with open(self.log_file, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stderr.close()
        return rc


class LoopDevice:
    """A 64 MiB loop device to attach (the engine sequence needs one)."""

    def __init__(self, directory):
        self.backing = os.path.join(directory, "volume.img")
        with open(self.backing, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        self.path = subprocess.check_output(
            ["losetup", "--find", "--show", self.backing]).decode().strip()

    def detach(self):
        subprocess.run(["losetup", "-d", self.path], check=False)


def run_scenario(classpath, scenario, agent, device, out):
    """Run one scenario against ``agent``; return a Result."""
    latencies = []
    failures = []
    notes = []
    mark = len(agent.log())
    for i in range(1, scenario.repeat + 1):
        name = scenario.name if scenario.repeat == 1 else "{}-{}".format(
            scenario.name, i)
        for attempt in (1, 2):
            before = len(agent.log())
            summary = _client(classpath, name, agent, scenario, device,
                              os.path.join(out, scenario.name, str(i),
                                            str(attempt)))
            ok = bool(summary and summary.get("ok"))
            for step in (summary or {}).get("steps", []):
                latencies.extend(step.get("latencies_ms", []))
            lost = _connections_without_connect(agent.log()[before:])
            if ok or scenario.kind == "race" or not lost or attempt == 2:
                break
            # The client's own race: it queued its CONNECT and never sent
            # it (the agent saw the connection, no CONNECT); the engine
            # would reconnect, so do we, once.
            notes.append("{}: client never sent CONNECT; retried".format(
                name))
        if not ok:
            failures.append((name, _failed_steps(summary)))
    detail = []
    if scenario.kind == "race":
        text = agent.log()[mark:]
        refused = len(re.findall(r"STOMP error from", text))
        early = len(re.findall(r"before CONNECT", text))
        lost = _connections_without_connect(text)
        detail.append("{} connections, {} sent a frame before CONNECT, "
                      "{} never sent CONNECT (client side), {} ERROR "
                      "frames".format(scenario.repeat, early, lost,
                                      refused))
        ok = refused == 0 and len(failures) <= lost
    else:
        ok = not failures
    if not ok:
        for name, steps in failures:
            detail.append("{} failed: {}".format(name, steps))
    detail.extend(notes)
    if latencies:
        s = sorted(latencies)
        detail.append("{} calls in bursts: p50 {:.0f} ms, max {:.0f} ms"
                      .format(len(s), s[len(s) // 2], s[-1]))
    return Result(scenario.name, ok, "; ".join(detail), latencies)


def run_all(classpath, full, base, out, report=print):
    """Start the agents, run every scenario; return the Results."""
    results = []
    device = LoopDevice(base)
    agents = {}
    try:
        for mode in ("tls", "plain"):
            path = os.path.join(base, mode)
            os.makedirs(path)
            agents[mode] = Agent(path, insecure=(mode == "plain")).start()
        for scenario in scenarios(full):
            result = run_scenario(classpath, scenario, agents[scenario.mode],
                                  device.path, out)
            report("{:20} {}  {}".format(
                result.name, "PASS" if result.ok else "FAIL", result.detail))
            results.append(result)
    finally:
        for agent in agents.values():
            agent.stop()
        device.detach()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every scenario, idle periods of 60 s")
    parser.add_argument("--out", metavar="DIR",
                        help="keep the clients' logs and summaries here")
    args = parser.parse_args(argv)
    harness = find_harness()
    if harness is None:
        sys.exit("enginejava: no harness: set {} to the enginejava "
                 "directory".format(HARNESS_ENV))
    lack = missing()
    if lack:
        sys.exit("enginejava: missing {}; install: apt-get install {}"
                 .format(" ".join(lack), " ".join(PACKAGES)))
    if os.geteuid() != 0:
        sys.exit("enginejava: needs root (loop device, privsep daemon)")
    base = tempfile.mkdtemp(prefix="enginejava-")
    out = args.out or os.path.join(base, "out")
    try:
        print("building {} ...".format(harness), flush=True)
        classpath = build(harness, os.path.join(base, "build"))
        results = run_all(classpath, args.full, base, out,
                          report=lambda line: print(line, flush=True))
    finally:
        if args.out:
            print("logs in {}".format(args.out))
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


# Private helpers

def _jar(name):
    return os.path.join(JAR_DIR, name + ".jar")


def _javac(args):
    proc = subprocess.run(["javac", "-encoding", "UTF-8"] + args,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("javac failed:\n" + proc.stdout + proc.stderr)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(classpath, name, agent, scenario, device, out):
    os.makedirs(out, exist_ok=True)
    cmd = ["java", "-cp", classpath, DRIVER, "--name", name,
           "--host", "127.0.0.1", "--port", str(agent.port),
           "--mode", scenario.mode, "--device", device, "--out", out]
    cmd += scenario.args
    if "--scenario" in scenario.args and \
            scenario.args[scenario.args.index("--scenario") + 1] == "nocert":
        cmd += agent.tls_args[:2]          # the CA only: no certificate
    else:
        cmd += agent.tls_args
    with open(os.path.join(out, "client.log"), "w") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                           timeout=600)
        except subprocess.TimeoutExpired:
            return None
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _failed_steps(summary):
    if not summary:
        return "no summary (the client did not finish)"
    return ", ".join("{}. {}{}".format(
        step.get("n"), step.get("name"),
        " ({})".format(step["problem"]) if step.get("problem") else "")
        for step in summary.get("steps", []) if not step.get("ok"))


def _connections_without_connect(text):
    """Connections the agent saw, minus the STOMP sessions it opened."""
    return max(0, len(re.findall(r"\] Connection from ", text)) -
               len(re.findall(r"STOMP session with", text)))


if __name__ == "__main__":
    sys.exit(main())
