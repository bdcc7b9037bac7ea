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

AGENT = os.path.join(os.path.dirname(sys.executable), "managedvolume-agent")


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
        notify_path = os.path.join(self.base, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(120)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, **self.env)
        self.proc = subprocess.Popen(
            [AGENT, "--listen", "127.0.0.1:0"] + self.argv, env=env,
            **self.popen)
        while True:
            message = self.notify.recv(4096).decode()
            if "READY=1" in message.splitlines():
                break
        status = [line for line in message.splitlines()
                  if line.startswith("STATUS=")][0]
        self.port = int(status.rpartition(":")[2])
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
