"""The privsep daemon's own module (brick.py), in a process of its own:
what needs no daemon.  The daemon itself is tested through the privileged
boundary (privileged_test.py)."""

import json
import subprocess
import sys

from .host_fixtures import REPO

DIE = """
import json, logging, os, signal
from vdsm_managedvolume import brick

locked_while_logging = []


class Handler(logging.Handler):
    def emit(self, record):
        locked_while_logging.append(brick._calls_lock.locked())


logging.getLogger().addHandler(Handler())
kills = []
brick.os.kill = lambda pid, sig: kills.append(sig)
call = brick._Call("connect", "flow-1")
brick._die(call)
ended = brick._Call("disconnect", "flow-2")
ended.end()
brick._die(ended)
print(json.dumps({"locked": locked_while_logging, "kills": kills,
                  "sigkill": int(signal.SIGKILL)}))
"""


def test_the_kill_at_end_grace_is_logged_outside_the_calls_lock():
    # The line is a write on the channel to the client: under the lock,
    # a blocked write would hold up every call's end and command start,
    # and the kill itself.  A call that ended is neither logged nor
    # killed.
    out = subprocess.run([sys.executable, "-c", DIE], cwd=REPO, check=True,
                         stdout=subprocess.PIPE).stdout
    result = json.loads(out.decode().splitlines()[-1])
    assert result["locked"] == [False]
    assert result["kills"] == [result["sigkill"]]
