"""What the privsep client and the privsep daemon agree on.

Two processes run this package on either side of one unix socket::

    service (not root)                         privsep daemon (root)
    privileged.py  ── msgpack over a socket ──> brick.py
         \\                                      /
          `──── privsep.py (this module) ──────'
          `──── privsepconfig.py (its file) ───'

Neither imports the other: the client (``privileged``) must never import
os-brick nor oslo.config's daemon options, the daemon (``brick``) has no
use for the client's start-up and channel code.  What both must agree on
lives here:

- the protocol: what the entrypoints are called and take, and what
  they mean (``PROTOCOL``), told to each other at every daemon start
  (``identity``; see "Versions" below);
- the names: the privsep context privsep-helper is told to load
  (``CONTEXT``), the prefix of the entrypoints the client calls
  (``ENTRYPOINTS``), the logger the daemon's records arrive on
  (``DAEMON_LOGGER``), the crash points inside the daemon
  (``CRASH_POINTS``), the only options privsep-helper may get
  (``HELPER_OPTIONS``) and the exit code of a daemon refusing an unsafe
  start (``EXIT_REFUSED``);
- the values crossing the socket: msgpack turns lists into tuples and
  cannot carry sets, so both sides hand over ``plain()`` values;
- the error: os-brick's exception classes never cross (the client must
  not import them).  The daemon raises ``RemoteError(kind, *details)``
  with a masked message; oslo.privsep sends an exception by its class's
  qualified name (``REMOTE_ERROR``), which the client turns back into our
  errors (HelperFailed, NotSupported, UnknownAdapter, InvalidParams).

The daemon's configuration file (what it may do, from managedvolume.conf)
is the other shared piece: ``privsepconfig``.

Versions
--------
The daemon is a process of its own that imports this package from disk
when it starts, the client imported it when *it* started.  An RPM
upgrade replaces the files under a running client (the agent until the
package's ``%postun`` restarts it; vdsmd until an admin does), and a
daemon that client starts from then on (its first call, or after its
daemon died) runs the new files: the same entrypoint names, maybe other
parameters or meanings (a disconnect that took one more argument).  A
call with the wrong number of arguments would fail in the daemon with a
TypeError; one with the right number and another meaning would do the
wrong thing as root.  So the client's first call after ``getpid`` is
``handshake(identity())``, and each side compares the other's
``PROTOCOL`` with its own:

- the client (privileged._Daemon.start) stops a daemon of another
  protocol, or one without ``handshake`` (a version from before it: a
  downgrade), before sending it anything else, and fails that call and
  every later one with DaemonMismatch (926) naming both sides, until
  the process is restarted;
- the daemon (brick._setup) serves no call but ``getpid`` and
  ``handshake`` before a client of its own protocol said so: a client
  from before the handshake (it calls ``hello`` next) gets an error
  naming both sides, its HelperFailed (926).

A new client never meets an old daemon otherwise: each process starts
its own daemon on a socket of its own, and a daemon ends with its
client's channel.

A daemon started while an upgrade replaces the files may import some
of each version.  It refuses to start (brick.start_problem, exit
``EXIT_REFUSED``: the client's call fails with 926 quoting why, and the
next call starts another daemon) when its files tell two versions
apart: brick.py's and this module's ``PROTOCOL``, or the ``BUILD`` of
brick.py, this module (the host package) and the package's
``__init__.py`` (vdsm-managedvolume-common, which also holds errors.py,
log.py and mask.py, replaced in a step of its own).  The protocol does
not change with every release; the build does (scripts/stamp-build).
"""

import os

from . import __version__
from . import faults

# The version of what the entrypoints (brick.py) are called and take,
# and of what their arguments and results mean.  Bump it, and
# brick.PROTOCOL with it, with any such change; tests/privsep_test.py
# pins each entrypoint's parameters to it.  A daemon whose brick.py and
# privsep.py differ (started while an upgrade writes the files) refuses
# to start.  1: the entrypoints before the handshake (none was told).
PROTOCOL = 2

# The build these files are of (the package's ``BUILD``, which the
# -common package holds): stamped by scripts/stamp-build into this file,
# brick.py and __init__.py alike.
BUILD = "source"

# The privsep context privsep-helper loads (``--privsep_context``), and
# the module path every entrypoint name starts with.
CONTEXT = "vdsm_managedvolume.brick.context"
ENTRYPOINTS = "vdsm_managedvolume.brick."

# The logger the daemon's records are logged on in the client's process.
DAEMON_LOGGER = "vdsm_managedvolume.daemon"

# The only arguments privsep-helper may get (the client's argv, built by
# helper_args; checked again by the daemon before it serves).
HELPER_OPTIONS = ("--config-file", "--privsep_context",
                  "--privsep_sock_path")

# Exit code of a daemon refusing an unsafe start (sysexits' EX_CONFIG).
EXIT_REFUSED = 78

# Seconds a call cancelled at its deadline has to return before the
# daemon kills itself (brick.py, "Deadlines"): time for the command it
# is inside to finish (a ``multipath -f``, an ``iscsiadm --op``: they
# take milliseconds when they are not hung).  The client waits longer
# than this for the answer (privileged.KILL_GRACE).
END_GRACE = 5.0

# Seconds after its deadline a cancelled call's answer waits for the
# threads os-brick started for it (a multipath connect's portal logins)
# to stop.  Well before KILL_GRACE: an answer that came after the
# client gave up and killed the daemon would be lost, and the plain
# timeout in its place would have the service disconnect beside a login
# still running (review-privsepfix9 L-1).
THREADS_GRACE = 3.0

CRASH_POINTS = (
    "privsep.connect.before",
    "privsep.connect.after",
    "privsep.disconnect.before",
    "privsep.disconnect.after",
    "privsep.extend.before",
    "privsep.extend.after",
)
faults.register(*CRASH_POINTS)


def helper_args(config_file, sock_path):
    """privsep-helper's arguments: each of HELPER_OPTIONS with its value
    (``config_file`` None: without ``--config-file``, for a helper
    command that names its configuration itself)."""
    values = (config_file, CONTEXT, sock_path)
    return [arg for option, value in zip(HELPER_OPTIONS, values)
            if value is not None for arg in (option, value)]


def identity():
    """What this side tells the other at the handshake: ``{protocol,
    version, path}`` (the package's version and directory, for the
    admin reading the error)."""
    return {"protocol": PROTOCOL, "version": __version__, "build": BUILD,
            "path": os.path.dirname(os.path.abspath(__file__))}


def describe(info):
    """``info`` (``identity()`` of a side, None for a side from before
    the handshake) in words, for logs and errors."""
    if not isinstance(info, dict) or "protocol" not in info:
        return "no privsep protocol (a version from before the handshake)"
    build = info.get("build")
    return "privsep protocol {} (vdsm-managedvolume {}{} in {})".format(
        info.get("protocol"), info.get("version", "unknown"),
        ", build {}".format(build) if build else "",
        info.get("path", "unknown"))


class RemoteError(Exception):
    """An error raised in the daemon: ``(kind, *details)``.

    Crosses the socket by class name (``REMOTE_ERROR``), so both sides
    import this module, never os-brick's exception classes.  Kinds:
    "failed" (message), "unsupported" (message), "unknown_adapter"
    (adapter, installed), "invalid" (parameter name, reason), "timeout"
    (message, and ``THREADS_LEFT`` when threads os-brick started for
    it still run: the call was cancelled at its deadline and returned),
    "still_running" (message: a disconnect not run, what an earlier
    connect of its connection started still runs; brick._wait_earlier).
    """


# The last detail of a "timeout" RemoteError whose call returned while
# threads os-brick started for it (a multipath iSCSI connect's portal
# logins) still run inside a command: what they do may still take
# effect (a session logging in), so its caller must not take the
# call's failure for "nothing done" (brick.py, "Deadlines").
THREADS_LEFT = "threads-left"

# The name oslo.privsep sends a RemoteError by (module and class).
REMOTE_ERROR = "{}.{}".format(RemoteError.__module__, RemoteError.__name__)


# The types ``plain`` returns as they are (exactly these: a subclass of
# one takes the checks below), looked up first: nearly every value.
_LEAVES = frozenset((str, int, float, bool, type(None)))


def plain(obj):
    """``obj`` as plain JSON types: tuples and sets become lists (msgpack
    turns lists into tuples and cannot carry sets), dict keys strings,
    anything else its str()."""
    if type(obj) in _LEAVES:
        return obj
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): plain(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((plain(v) for v in obj), key=repr)
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return str(obj)
