"""What the benchmarks share: a scratch loop device and percentiles."""

import contextlib
import os
import statistics
import subprocess
import tempfile


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
