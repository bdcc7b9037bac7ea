"""Console scripts end like command-line tools, not with tracebacks."""

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize("argv", [
    ["managedvolume-tool", "dump-schema"],
    ["managedvolume-tool", "dump-config", "--json"],
    ["managedvolume-client", "ManagedVolume", "-h"],
])
def test_reader_going_away_ends_quietly(argv):
    argv = [os.path.join(BIN, argv[0])] + argv[1:]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like "| head -0": nobody reads
    err = p.stderr.read()
    rc = p.wait(60)
    assert b"Traceback" not in err
    assert b"Broken pipe" not in err
    assert rc in (0, 141)
