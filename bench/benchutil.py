"""What the benchmarks share: a scratch loop device, percentiles and a
standalone agent process."""

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

AGENT = os.path.join(os.path.dirname(sys.executable), "managedvolume-agent")
# Seconds an agent may take to say READY=1 (it starts its privsep daemon).
START_TIMEOUT = 120


def same_program_children(pid):
    """The children of ``pid`` running the same program as it (same
    command line), a list of pids: an agent's back end when it runs in
    two processes (hop.py), none in one (its privsep daemon is the back
    end's child, not the agent's).  OSError when ``pid`` is gone."""
    with open("/proc/{0}/task/{0}/children".format(pid)) as f:
        children = [int(p) for p in f.read().split()]
    with open("/proc/{}/cmdline".format(pid), "rb") as f:
        cmdline = f.read()
    pids = []
    for child in children:
        try:
            with open("/proc/{}/cmdline".format(child), "rb") as f:
                if f.read() == cmdline:
                    pids.append(child)
        except FileNotFoundError:
            pass    # ended meanwhile
    return pids


@contextlib.contextmanager
def loop_device(directory, size=16 * 1024 * 1024):
    """A loop device over a sparse file in ``directory``; detached after."""
    fd, backing = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    loop = subprocess.check_output(
        ["losetup", "--find", "--show", backing]).decode().strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        os.unlink(backing)


def percentile(values, q):
    """The q-th percentile (1-99) of ``values``."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    return statistics.quantiles(s, n=100, method="inclusive")[q - 1]


class AgentProcess:
    """``managedvolume-agent`` on a free loopback port.

    Started with ``NOTIFY_SOCKET`` pointing at a datagram socket of ours:
    the agent says READY=1 there once it listens, with the address it
    bound in its STATUS= line, so no port is guessed and no poll is timed.
    """

    def __init__(self, base, argv, env=None, **popen):
        self.base = base
        self.argv = argv
        self.env = env or {}
        self.popen = popen
        self.proc = None
        self.notify = None
        self.port = None

    def start(self):
        """Start the agent and wait for READY=1; an agent that exits or
        does not get ready in START_TIMEOUT seconds is stopped and the
        error raised (no agent is ever left running by a failed start)."""
        notify_path = os.path.join(self.base, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(1)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, **self.env)
        self.proc = subprocess.Popen(
            [AGENT, "--listen", "127.0.0.1:0"] + self.argv, env=env,
            **self.popen)
        try:
            message = self._wait_ready()
            status = [line for line in message.splitlines()
                      if line.startswith("STATUS=")][0]
            self.port = int(status.rpartition(":")[2])
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError("the agent exited with {} before it "
                                       "was ready".format(
                                           self.proc.returncode))
                if time.monotonic() > deadline:
                    raise RuntimeError("the agent was not ready in {} "
                                       "seconds".format(START_TIMEOUT))
                continue
            if "READY=1" in message.splitlines():
                return message

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.notify is not None:
            self.notify.close()
