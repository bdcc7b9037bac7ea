"""The privileged boundary: the service's client of one privsep daemon.

vdsm started a fresh helper process per call (2.7-3.6 s each, mostly
importing os-brick) with no timeout.  Here one long-lived oslo.privsep
daemon (``brick.py``) runs os-brick as root; a call costs a round trip on
a unix socket plus the os-brick work (measured: local connect+disconnect
0.3-0.4 ms, connector properties 25-45 ms warm, daemon start 0.4 s idle,
seconds on a loaded host)::

    service threads ──Brick.connect()──┐
                                       │ msgpack over a unix socket
    Brick ── one _Daemon ── channel ───┴──> privsep daemon (root, pool of
                                             threads, os-brick imported)

Starting the daemon
-------------------
On first use (and after the daemon died), under a lock, bounded by
``Brick.start_timeout``::

    privsep-helper --config-file <privsep_config>
                   --privsep_context vdsm_managedvolume.brick.context
                   --privsep_sock_path <state_run_dir>/privsep.sock

- As root: the environment's ``privsep-helper`` (next to sys.executable)
  directly, no sudo; it inherits our environment (fault injection,
  fake connectors) and PYTHONPATH is extended so the daemon imports the
  same code we do.
- Not root (vdsm): ``cfg.root_helper`` (default ``sudo``) before it.  The
  argv is exactly the sudoers rule's command (data/sudoers): no
  wildcard, because in sudoers a ``*`` also matches spaces, that is extra
  arguments, and privsep-helper acts on extra arguments (a second
  ``--config-file``, ``--config-dir``, oslo.log's ``--log-config-append``
  and ``--log-file``) before any code of ours runs.
- ``cfg.helper_command``: replaces both entirely (as oslo.privsep's
  option does; ``--privsep_context`` and ``--privsep_sock_path`` are
  appended).

Who may write what root reads
-----------------------------
The daemon is root; everything it acts on must come from root.

- Its configuration file (``privsepconfig``): written from
  managedvolume.conf by a root service at every start, only checked by
  one that is not root (``privsepconfig.prepare_config``).
- The daemon checks the same before it serves (brick.py): exactly the
  three arguments above (``privsep.HELPER_OPTIONS``), that file and its
  directory root's, and under sudo no connector override.  It refuses
  and exits otherwise (``privsep.EXIT_REFUSED``).
- The socket: a fixed path in ``state_run_dir`` (the service user's
  directory), bound with mode 0600 (fchmod before bind: no window), so
  only our user and root can connect; we accept only a root peer.
  vdsmd and managedvolume-tool may start daemons at the same time: the
  path is taken under an flock on ``state_run_dir/privsep.lock`` held
  from bind until the helper connected, and unlinked before the lock is
  released, so a start never takes over another's socket.  The
  directory is opened without following a symlink and every name in it
  is used relative to it: a root service never creates or unlinks files
  where the directory's owner points it.

Once it connected, the daemon tells its pid (``getpid``), then its
privsep protocol in answer to ours (``handshake``): a daemon of another
one runs files an upgrade put there after we started, and is stopped
before it gets any call; every later call fails with DaemonMismatch
(926) without starting another (privsep.py, "Versions").  Then
``hello`` has it set os-brick up.

We do the socket dance ourselves instead of oslo.privsep's
RootwrapClientChannel because that one waits without a bound for a helper
that never connects.  A daemon that cannot start is HelperFailed (926)
quoting the helper's output (the daemon's reason for refusing).

Timeouts
--------
Every call carries a deadline: ``cfg.timeout`` (connect, disconnect,
extend) or ``cfg.properties_timeout`` (connector properties), counted
after the daemon is up.  When a deadline passes the daemon cancels the
call (see brick.py, "Deadlines"): its sleeps and the commands it would
start next raise, a command it is inside is left to finish.  The call
then returns a "timeout" error, which we raise as HelperTimeout (931),
and the daemon and the calls beside it go on; as StillRunning (931 too)
when threads os-brick started for it (portal logins) were still inside a
command when it answered: what they do may still take effect; as
EarlierConnectRunning (931) a disconnect not run because a login or map
an earlier connect of its connection started still runs (whichever
daemon started it: brick._wait_earlier).  A call
that has not returned ``privsep.END_GRACE`` seconds after its deadline
(stuck inside one command) makes the daemon kill itself, as every
deadline did before 2026-12-01, so that os-brick cannot finish a
timed-out connect later (the commands it started, and iscsid's own login
retries, are not stopped: brick.py); we then raise HelperTimeout too and
the next call starts a new daemon.  Should the daemon's watchdog fail,
we kill it ourselves ``KILL_GRACE`` seconds after the deadline (root
can; with sudo we cannot: that daemon may then still be running the
call, beside the new daemon the next call starts, and we raise
StillRunning, so that the service keeps the record and disconnects
nothing yet; a later disconnect, on the new daemon, waits only for the
logins and maps of it that /proc shows, brick._wait_earlier).  Such a
kill, or a crash, kills calls running concurrently for other volumes
too.  After a kill at another call's deadline, a
disconnect, extend, connector properties or udev rule call whose own
deadline has not passed runs again on a new daemon, within that deadline
(``RERUN_AFTER_KILL`` says why those and not connect); other cut calls,
and every call cut by a crash, get HelperFailed, and the service treats
a failed connect as "maybe connected" (its journal does).

Besides os-brick, the daemon writes udev rules for a service that is not
root (``add_udev_rule``, ``remove_udev_rule``; see brick.py for what it
checks).  Its configuration file holds the rule settings
(``privsepconfig.UDEV_KEYS``): the calls carry only ids and a device
path.

What the client and the daemon agree on (names, the values and the error
crossing the socket) is ``privsep``; neither side imports the other.

Flow ids: every call carries the caller's flow id and the daemon tags
its lines with it; lines it cannot tag (its start-up, oslo.privsep's own)
are tagged here by ``_Channel`` when the call they belong to is known.

Errors: os-brick's exceptions never cross as classes (the service must not
import os-brick): the daemon sends ``privsep.RemoteError(kind, message)``
with the message masked, which becomes HelperFailed (926), NotSupported
(925) or UnknownAdapter (934) here.  The daemon dying mid-call (``kill -9``, an
OOM kill) is HelperFailed for every call in flight at once, whether the
channel ends with EOF or with a reset (``_Channel``); the next call starts
a new daemon.  A daemon that ended while no call was in flight is seen
by the next call's send, which then cannot have reached it: that call
goes to a new daemon.  Arguments the channel cannot encode are
CannotSend (926), raised before anything is sent.  Every error raised
before any send of the call may have reached a daemon (none could be
started for it, or the send found its daemon ended or stopping) is
marked ``unsent`` (errors.Error): the service then knows nothing of it
ran (a connect left nothing to disconnect).  One after a send, or
after a call cut and not run again because no new daemon started, is
not: the daemon may have acted on it.

The channel has no thread of its own: the calling threads read the
socket in turn (``_Channel``), so a call with no other in flight is one
send and one receive in the calling thread, no hand-off to another
thread (oslo.privsep's client hands every reply from its reader thread
to the caller).  The wire is oslo.privsep's, unchanged.

CPUs: vdsm pins itself to one core by default (its ``[vars]
cpu_affinity``, "auto": the second online CPU, ``vdsmd.__set_cpu_affinity``)
and runs its own commands on every CPU ("only VDSM itself should be
bound": ``cmdutils.wrap_command``'s ``reset_cpu_affinity``, through
taskset).  A daemon started from inside vdsm would inherit that one core,
and so would every command os-brick runs (iscsiadm, multipath, rbd,
nvme): in a mass start, all of the host's attach work on the core vdsm
answers the engine's polls from; the same for the agent, which pins
itself as vdsm does.  So the daemon is started on the CPUs
``affinity.daemon_cpus`` names (``[privsep] daemon_cpu_affinity``): the
starting thread widens its own around the spawn (``affinity.spawning_on``),
and the daemon, its threads and its commands inherit them.

os-brick is never imported in this process: ``check_supported`` uses
importlib's find_spec; importing os_brick.utils would replace time.sleep
process-wide.
"""

import collections
import fcntl
import importlib.util
import ipaddress
import itertools
import logging
import math
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import struct
import sys
import threading
import time

from . import adapters
from . import affinity
from . import errors
from . import fileutil
from . import gate
from . import log
from . import mask
from . import privsep
from . import privsepconfig

LOG = logging.getLogger(__name__)

# Bound for starting the daemon: importing os-brick takes 2-4 s on an idle
# machine, much more on a loaded one.
START_TIMEOUT = 60.0

# How long after a deadline we wait for the call's answer, or the end of
# the daemon (its watchdog: privsep.END_GRACE, less than this), before
# killing it from here.
KILL_GRACE = privsep.END_GRACE + 3.0

# The operations run again on a new daemon when the daemon was killed at
# another call's deadline (brick._die) while they ran, their own deadline
# not passed: each may run twice with no harm (os-brick's disconnect and
# extend are idempotent: a disconnect of what is gone, a rescan; ours
# write or remove one file; the properties only read).  Not connect: a
# cut connect may have left a process of its own running (``rbd map``,
# ``iscsiadm``: the daemon's children outlive it), and a second connect
# racing it could map the volume twice; it fails, the service undoes it
# (a disconnect, which runs again if cut) and the engine may retry.
RERUN_AFTER_KILL = frozenset(("disconnect", "extend", "connector_properties",
                              "add_udev_rule", "remove_udev_rule",
                              "delete_rbd_conf"))

# How long stopping waits for the daemon's running calls before killing it.
STOP_WAIT = 10.0

# How long closing waits for an ended daemon to be collectable.
REAP_WAIT = 2.0

PR_SET_CHILD_SUBREAPER = 36


class Brick:
    """os-brick operations, run as root in one long-lived daemon.

    Thread-safe: calls from many threads share the daemon and run in
    parallel there.  No daemon is started before the first call.
    """

    start_timeout = START_TIMEOUT

    def __init__(self, cfg):
        self._cfg = cfg
        self._lock = threading.Lock()
        self._daemon = None
        # The DaemonMismatch of the first daemon found speaking another
        # privsep protocol (our files were replaced): no daemon is
        # started after it.
        self._mismatch = None

    def connector_properties(self):
        """os-brick's connector properties for this host (multipath and
        enforce_multipath True), lists not tuples.

        ``ip`` is ``cfg.my_ip``, or when that is empty the source address
        of the default route (``default_ip()``), or None.
        """
        return self._call("connector_properties", (my_ip(self._cfg),),
                          self._cfg.properties_timeout)

    def connect(self, connection_info):
        """Connect the volume; return the attachment os-brick returned.

        The connector is the adapter plug-in named by
        ``connection_info["adapter"]`` (the service checked that it is
        installed; the daemon loads it, UnknownAdapter (934) when it has
        none by that name), else os-brick's for ``driver_volume_type``.
        """
        return self._call("connect_volume", (connection_info,),
                          self._cfg.timeout, operation="connect")

    def disconnect(self, connection_info, attachment, connecting=True):
        """Disconnect the volume (``attachment``: what connect returned, or
        None when unknown).  ``connecting``: a connect of it may not have
        completed (the record's, store.py): the daemon then also waits
        for the logins and maps of its connection that earlier daemons
        left running (brick._wait_earlier); its own calls' threads are
        waited for either way."""
        self._call("disconnect_volume",
                   (connection_info, attachment, bool(connecting)),
                   self._cfg.timeout, operation="disconnect")

    def extend(self, connection_info):
        """Have os-brick rescan the volume's device (connector.extend_volume)
        so this host sees the size the storage now gives it; return
        os-brick's new size in bytes, or None when it reports none.

        Bounded like connect (``cfg.timeout``): a rescan past its
        deadline is cancelled, a command stuck on a dead path ends the
        daemon (HelperTimeout either way; module docstring, "Timeouts").
        """
        return self._call("extend_volume", (connection_info,),
                          self._cfg.timeout, operation="extend")

    def add_udev_rule(self, sd_id, vol_id, path):
        """Have the daemon write the volume's udev rule and trigger a change
        event for ``path``; return the rule file's path.

        For a service that cannot write ``cfg.udev_rules_dir`` itself (vdsm
        runs it as user vdsm).  The daemon validates the ids and the path
        and rebuilds the rule text itself, into the rules directory of
        its own configuration file: it never writes what or where we say.
        """
        return self._call("add_udev_rule", (sd_id, vol_id, path),
                          self._cfg.timeout, operation="add_udev_rule")

    def remove_udev_rule(self, sd_id, vol_id, temp=False):
        """Have the daemon remove the volume's udev rule (``temp``: the
        leftover temp file of an interrupted write); return whether there
        was one."""
        return self._call("remove_udev_rule", (sd_id, vol_id, bool(temp)),
                          self._cfg.timeout, operation="remove_udev_rule")

    def delete_rbd_conf(self, path, holding=None):
        """Have the daemon delete a ceph conf os-brick's RBD connector
        wrote (``attachment["conf"]``, holding the keyring) that no
        record names any more; return whether it was deleted.  Only one
        os-brick could have written (brick.delete_rbd_conf): InvalidParams
        otherwise; with ``holding`` (keyrings) only one holding one of
        them."""
        return self._call("delete_rbd_conf", (path, holding),
                          self._cfg.timeout, operation="delete_rbd_conf")

    def check_supported(self):
        """Raise NotSupported (925) when os-brick is not installed."""
        check_supported()

    def stop(self, wait=STOP_WAIT):
        """Stop the daemon: it finishes running calls within ``wait``
        seconds, else it is killed; the next call starts a new one."""
        with self._lock:
            daemon, self._daemon = self._daemon, None
        if daemon is not None:
            daemon.stop(wait)

    def daemon_pid(self):
        """The daemon's pid, None when none is running."""
        daemon = self._daemon
        if daemon is None or not daemon.alive():
            return None
        return daemon.pid

    # Private helpers

    def _call(self, name, args, timeout, operation=None):
        # The whole call without a run slot (``gate``): it waits for the
        # daemon's answer, and maybe for ``_lock``, which another
        # operation thread holds while it starts a daemon.
        with gate.released():
            return self._daemon_call(name, args, timeout, operation)

    def _daemon_call(self, name, args, timeout, operation):
        operation = operation or name
        check_sendable(operation, args)
        flow = log.current_flow()
        # An error ending the call before any send of it may have reached
        # a daemon (``rerun``: one was cut there) is marked ``unsent``: no
        # daemon could be started for it (the helper failed or refused,
        # no handshake or hello), or the send found its daemon ended or
        # stopping (_Unsent, _Stopping).  The service then knows that
        # nothing of it ran: a connect left nothing to disconnect.
        replaced = rerun = False
        try:
            daemon = self._running_daemon()
        except errors.Error as e:
            e.unsent = True
            raise
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    result = daemon.call(
                        privsep.ENTRYPOINTS + name, args + (deadline, flow),
                        deadline - time.monotonic() + KILL_GRACE, deadline,
                        flow=flow)
                    break
                except _Unsent:
                    # It ended while idle, seen by this send (nothing is
                    # polled before a call): nothing reached it, so a new
                    # daemon gets the call, with the whole timeout.
                    if replaced:
                        raise
                    replaced = True
                    daemon = self._running_daemon()
                    deadline = time.monotonic() + timeout
                except _Died:
                    now = time.monotonic()
                    victim = daemon.deadline_passed(now)
                    if (rerun or now >= deadline or victim is None
                            or operation not in RERUN_AFTER_KILL):
                        raise
                    # Killed at another call's deadline, ours not passed:
                    # the same call again on a new daemon, with what was
                    # left of our deadline counted once it is up (as the
                    # first attempt's was).
                    rerun = True
                    left = deadline - now
                    LOG.warning(
                        "%s was cut when privsep daemon %s was killed at "
                        "the deadline of %s: running it again on a new "
                        "daemon (%.1f s left)", operation, daemon.pid,
                        victim, left)
                    self._discard(daemon)
                    daemon = self._running_daemon()
                    deadline = time.monotonic() + left
        except _Timeout:
            LOG.error("%s: no answer %.1f s after its deadline: killing "
                      "privsep daemon %s", operation, KILL_GRACE, daemon.pid)
            if not self._discard(daemon, kill=True):
                # Not root (sudo): that daemon may still be running the
                # call while the next one starts a new daemon.  Its
                # caller must not take the failure for "nothing done".
                raise errors.StillRunning(
                    operation=operation, timeout=timeout,
                    running="privsep daemon {}, which could not be "
                    "ended, may still be running it".format(daemon.pid))
            raise errors.HelperTimeout(operation=operation, timeout=timeout)
        except _Stopping:
            raise errors.HelperFailed(
                "privsep daemon {} is stopping: {} was not sent".format(
                    daemon.pid, operation), unsent=not rerun) from None
        except _Died as e:
            self._discard(daemon)
            if isinstance(e, _Unsent) and not rerun:
                # The new daemon, too, had ended before the send.
                raise errors.HelperFailed(
                    "privsep daemon {} ended before {} was sent ({}); the "
                    "next call starts a new one".format(
                        daemon.pid, operation, e), unsent=True) from None
            now = time.monotonic()
            if now >= deadline:
                raise errors.HelperTimeout(operation=operation,
                                           timeout=timeout)
            victim = daemon.deadline_passed(now)
            if victim is not None:
                raise errors.HelperFailed(
                    "privsep daemon {} was killed at the deadline of {} "
                    "while {} ran: {} was cut{}; the next call starts a "
                    "new daemon".format(
                        daemon.pid, victim, operation, operation,
                        " again" if rerun else " and not run again"))
            raise errors.HelperFailed(
                "privsep daemon {} died during {} ({}); the next call "
                "starts a new one".format(daemon.pid, operation, e))
        except privsep.RemoteError as e:
            if e.args[0] == "timeout":
                # Cancelled at its deadline and returned: the daemon and
                # the calls beside it go on (brick.py, "Deadlines").
                LOG.error("%s: cancelled at its deadline in privsep "
                          "daemon %s: %s", operation, daemon.pid,
                          mask.mask_text(_remote_message(e)))
                if e.args[-1] == privsep.THREADS_LEFT:
                    raise errors.StillRunning(
                        operation=operation, timeout=timeout,
                        running=errors.StillRunning.THREADS) from None
                raise errors.HelperTimeout(
                    operation=operation, timeout=timeout) from None
            if e.args[0] == "still_running":
                raise errors.EarlierConnectRunning(
                    operation=operation, timeout=timeout,
                    running=mask.mask_text(_remote_message(e))) from None
            raise _local_error(e) from None
        except errors.Error as e:
            # No daemon could be started to take the call again: after
            # an _Unsent nothing of it was sent; after a cut (``rerun``)
            # the first send may have run.
            if not rerun:
                e.unsent = True
            raise
        return privsep.plain(result)

    def _running_daemon(self):
        with self._lock:
            daemon = self._daemon
            if daemon is not None and daemon.usable():
                return daemon
            if daemon is not None:
                LOG.warning("privsep daemon %s is gone: starting a new one",
                            daemon.pid)
                daemon.close()
                self._daemon = None
            if self._mismatch is not None:
                # Every daemon we could start runs the same files.
                raise errors.DaemonMismatch(**vars(self._mismatch))
            check_supported()
            try:
                self._daemon = _Daemon.start(self._cfg, self.start_timeout)
            except errors.DaemonMismatch as e:
                self._mismatch = e
                LOG.error("%s. The daemon was stopped before it got any "
                          "call; every privileged call of this process "
                          "fails with %s until it is restarted (the RPM "
                          "restarts managedvolume-agent at the end of an "
                          "upgrade; vdsmd: systemctl restart vdsmd)",
                          e, e.code)
                raise
            return self._daemon

    def _discard(self, daemon, kill=False):
        """Let go of ``daemon`` (``kill``: killing it first); whether it
        is known to be gone when killed."""
        with self._lock:
            if self._daemon is daemon:
                self._daemon = None
        gone = daemon.kill() if kill else True
        daemon.close()
        return gone


def _handshake(channel, pid, deadline, flow):
    """Tell the daemon just started our ``privsep.identity()`` and compare
    its with ours (privsep.py, "Versions"): None when they speak the
    same protocol, else the DaemonMismatch to raise."""
    ours = privsep.identity()
    try:
        theirs = channel.call(privsep.ENTRYPOINTS + "handshake", (ours,),
                              _remaining(deadline), flow=flow)
    except privsep.RemoteError as e:
        # No such entrypoint: a version from before the handshake.
        LOG.warning("privsep daemon %s did not answer the handshake (%s): "
                    "taken for a version from before it", pid,
                    mask.mask_text(_remote_message(e)))
        theirs = None
    if isinstance(theirs, dict) and \
            theirs.get("protocol") == privsep.PROTOCOL:
        return None
    return errors.DaemonMismatch(
        pid=pid, theirs=privsep.describe(theirs),
        ours=privsep.describe(ours), process=_process_name(),
        process_pid=os.getpid())


def _process_name():
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] \
        else "python"


class _Packer:
    """msgpack as the channel packs (oslo_privsep.comm.Serializer: bin
    type, str encoded as UTF-8 with surrogateescape), the common case
    packed without the error handler.  Given one, msgpack encodes each
    str through Python's codec call (a bytes object made per string);
    without, by its own UTF-8 path: the same bytes for every str but
    one holding a lone surrogate, which fails there (a ValueError) and
    is packed again with it.  A failed pack leaves a packer empty
    (msgpack resets its buffer), a packed one is reset by pack itself."""

    __slots__ = ("_plain", "_escaping")

    def __init__(self):
        import msgpack
        self._plain = msgpack.Packer(use_bin_type=True)
        self._escaping = msgpack.Packer(use_bin_type=True,
                                        unicode_errors="surrogateescape")

    def pack(self, obj):
        try:
            return self._plain.pack(obj)
        except Exception:
            # The channel's packing decides (and raises as it would).
            return self._escaping.pack(obj)


# check_sendable's packer (msgpack.packb made one per call, with its
# 1 MiB buffer), used under its lock.
_sendable_lock = threading.Lock()
_sendable_packer = None


def check_sendable(operation, args):
    """Raise CannotSend when ``args`` cannot cross the channel (a lone
    surrogate, an integer beyond 64 bits: msgpack refuses them), before
    any daemon is started or anything is sent.  Encoded as the channel
    encodes (oslo_privsep.comm.Serializer)."""
    global _sendable_packer
    try:
        with _sendable_lock:
            if _sendable_packer is None:
                _sendable_packer = _Packer()
            _sendable_packer.pack(args)
    except (ValueError, TypeError, OverflowError) as e:
        raise errors.CannotSend(operation=operation, reason=mask.mask_text(
            "{}: {}".format(type(e).__name__, e)))


def check_supported():
    """Raise NotSupported (925) when os-brick or oslo.privsep is missing.

    find_spec only: importing os-brick here would cost seconds and replace
    time.sleep in this process.
    """
    for name in ("os_brick", "oslo_privsep"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise errors.NotSupported("{} cannot be imported".format(name))


# A documentation address (RFC 5737 / RFC 3849): never answers, and
# connecting a UDP socket to it sends nothing.
_PROBE_ADDRESSES = ((socket.AF_INET, "192.0.2.1"),
                    (socket.AF_INET6, "2001:db8::1"))


def my_ip(cfg):
    """The ``ip`` of connector_info: ``cfg.my_ip``, else ``default_ip()``.

    Raises ConfigError for a ``my_ip`` that is not an IP address.
    """
    if cfg.my_ip:
        try:
            return str(ipaddress.ip_address(cfg.my_ip.strip()))
        except ValueError:
            raise errors.ConfigError(
                "my_ip = {!r} is not an IP address".format(cfg.my_ip))
    return default_ip()


def default_ip():
    """The source address of the default route, or None without one.

    Connecting a UDP socket only asks the kernel for a route: no packet
    leaves the host.  IPv4 first (what cinder's my_ip usually is), then
    IPv6.
    """
    for family, address in _PROBE_ADDRESSES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((address, 9))
                ip = s.getsockname()[0]
        except OSError:
            continue
        if ip and not ipaddress.ip_address(ip).is_unspecified:
            return ip
    return None


def helper_command(cfg, sock_path=None):
    """The argv starting the daemon (see the module docstring).

    ``sock_path``: where the helper connects; ``cfg.privsep_sock_path``
    (the path of the sudoers rule) by default.
    """
    if sock_path is None:
        sock_path = cfg.privsep_sock_path
    if cfg.helper_command:
        return (shlex.split(cfg.helper_command)
                + privsep.helper_args(None, sock_path))
    cmd = [_privsep_helper()] + privsep.helper_args(cfg.privsep_config,
                                                    sock_path)
    if os.geteuid() != 0:
        cmd = shlex.split(cfg.root_helper) + cmd
    return cmd


class _Timeout(Exception):
    """No reply within the wait."""


class _Died(Exception):
    """The daemon closed the channel (it died) during the call."""


class _Stopping(Exception):
    """The daemon is being stopped: the call was not sent, and the calls
    still running there are left to finish."""


class _Unsent(_Died):
    """The daemon had ended before the call was sent: nothing of it
    reached the daemon."""


class _Daemon:
    """One running daemon: its channel, pid and stderr."""

    def __init__(self, channel, sock, pid, pidfd, output):
        self.channel = channel
        self.sock = sock
        self.pid = pid
        self._pidfd = pidfd
        self._output = output
        # Calls failing together (the daemon died) discard it together.
        self._close_lock = threading.Lock()
        # The deadline and operation of each call sent and not answered.
        self._deadlines = {}
        self._deadlines_lock = threading.Lock()

    @classmethod
    def start(cls, cfg, timeout):
        started = time.monotonic()
        deadline = started + timeout
        # The daemon's start-up lines belong to the call that started it.
        flow = log.current_flow()
        privsepconfig.prepare_config(cfg)
        cmd = helper_command(cfg)
        cpus = affinity.daemon_cpus(cfg.daemon_cpu_affinity)
        proc = None
        output = None
        with _SocketPlace(cfg, deadline) as place:
            try:
                listener = place.listen()
                LOG.info("Starting privsep daemon: %s", cmd)
                try:
                    # A session of its own: Ctrl-C at the terminal of
                    # ``make run`` signals our process group, and the
                    # daemon would die of it with a CRITICAL traceback
                    # before we stop it cleanly.
                    with affinity.spawning_on(cpus, "the privsep daemon"):
                        proc = subprocess.Popen(
                            cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env=_daemon_env(cfg), close_fds=True,
                            start_new_session=True)
                except OSError as e:
                    raise errors.HelperFailed(
                        "cannot run privsep helper {}: {}".format(cmd[0], e))
                output = _Output(proc.stdout, flow)
                sock = _accept(listener, proc, deadline, output, cmd)
            except BaseException:
                if proc is not None:
                    _silent_kill(proc)
                    proc.wait()
                raise

        channel = _Channel(sock, startup_flow=flow)
        daemon = None
        mismatch = None
        try:
            channel.ping(_remaining(deadline))
            pid = channel.call(privsep.ENTRYPOINTS + "getpid", (),
                               _remaining(deadline), flow=flow)
            daemon = cls(channel, sock, pid, _pidfd(pid), output)
            mismatch = _handshake(channel, pid, deadline, flow)
            if mismatch is None:
                info = channel.call(privsep.ENTRYPOINTS + "hello", (flow,),
                                    _remaining(deadline), flow=flow)
        except (_Timeout, _Died, privsep.RemoteError) as e:
            if daemon is not None:
                daemon.kill()
            channel.shutdown()
            sock.close()
            if (isinstance(e, privsep.RemoteError)
                    and e.args[0] == "unsupported"):
                raise errors.NotSupported(e.args[1])
            raise errors.HelperFailed(
                "privsep daemon did not become ready within {:.0f} s "
                "({}: {}){}".format(timeout, type(e).__name__,
                                    _remote_message(e), output.tail()))
        finally:
            _reap(proc, deadline)
            channel.startup_flow = None
            output.flow = None
        if mismatch is not None:
            # Sent nothing but getpid and handshake: it ends at once.
            daemon.stop()
            raise mismatch
        LOG.info("privsep daemon pid %s ready in %.2f s (os-brick %s)",
                 pid, time.monotonic() - started, info.get("os_brick"))
        return daemon

    def call(self, name, args, wait, deadline, flow="-"):
        """The call's reply (see _Channel.call).  ``deadline``: the one the
        daemon's watchdog keeps for it (monotonic time, the same clock in
        both processes), known here while it runs, and kept when the
        daemon dies or no answer comes, for ``deadline_passed``."""
        key = object()
        with self._deadlines_lock:
            self._deadlines[key] = (deadline, name.rpartition(".")[2])
        try:
            reply = self.channel.call(name, args, wait, flow=flow)
        except BaseException as e:
            # Kept when the call reached the daemon and got no answer;
            # forgotten when nothing was sent or the daemon answered.
            if not isinstance(e, (_Timeout, _Died)) or \
                    isinstance(e, _Unsent):
                self._forget(key)
            raise
        self._forget(key)
        return reply

    def deadline_passed(self, now):
        """The operation of a call sent to this daemon that had no answer
        and whose deadline is past at ``now`` (the daemon's watchdog kills
        the daemon then: brick._die), or None."""
        with self._deadlines_lock:
            for deadline, operation in self._deadlines.values():
                if deadline <= now:
                    return operation
        return None

    def _forget(self, key):
        with self._deadlines_lock:
            self._deadlines.pop(key, None)

    def alive(self):
        """Whether the daemon runs (reads what it sent while idle)."""
        return self.channel.running

    def usable(self):
        """Whether calls may be sent (no I/O: see _Channel.open)."""
        return self.channel.open

    def kill(self):
        """SIGKILL the daemon and wait (bounded) until it is gone; whether
        it is (False: not allowed, or still there)."""
        with self._close_lock:
            if self._pidfd is None:
                return True
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                return True
            except PermissionError:
                LOG.error("Not allowed to kill privsep daemon %s (not "
                          "root); its own watchdog must end it", self.pid)
                return False
            return bool(select.select([self._pidfd], [], [], 10)[0])

    def stop(self, wait=STOP_WAIT):
        """Close the channel: the daemon ends after its running calls,
        killed after ``wait`` seconds."""
        self.channel.shutdown()
        if not self.channel.wait_closed(wait):
            LOG.warning("privsep daemon %s did not exit: killing it",
                        self.pid)
            self.kill()
        self.close()

    def close(self):
        """Close the socket and collect the daemon.  Idempotent: every
        call that saw the daemon die closes it."""
        with self._close_lock:
            try:
                self.sock.close()
            except OSError:
                pass
            if self._pidfd is not None:
                # Exited (or exiting): collect it where we are its reaper.
                select.select([self._pidfd], [], [], REAP_WAIT)
                _reap_pid(self.pid)
                os.close(self._pidfd)
                self._pidfd = None


def become_subreaper():
    """Adopt our orphaned descendants (the privsep daemon forks away from
    its helper) so that we, not PID 1, reap them when they end.

    Where PID 1 reaps nothing (containers), killed daemons would otherwise
    stay zombies until the host reboots.  Long-lived programs (the agent,
    the test session) call this once; returns whether it took effect.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_pid(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # Not our child: its reaper collects it.


def _import_comm():
    from oslo_privsep import comm
    return comm


class _Waiter:
    """One call waiting for its reply (see _Channel)."""

    __slots__ = ("reply", "error", "asleep", "wake")

    def __init__(self):
        self.reply = None
        self.error = None
        self.asleep = False
        # Held while nobody woke the waiter: sleeping is acquiring it.
        self.wake = threading.Lock()
        self.wake.acquire()


class _Channel:
    """oslo.privsep's client protocol, with bounded waits everywhere and
    no thread of its own.

    The wire is oslo_privsep.comm's, unchanged (the daemon is oslo's):
    a stream of msgpack objects (``comm.Serializer``/``Deserializer``
    options), each request ``(msgid, (Message.CALL, name, args, kwargs))``
    or ``(msgid, (Message.PING,))``, each reply ``(msgid, (Message.RET,
    value))`` or ``(msgid, (Message.ERR, class name, args, traceback))``,
    and the daemon's log records ``(None, (Message.LOG, record dict))``
    in between.  The daemon only echoes msgid back: ours are short
    counters, not oslo's uuid4 strings.

    Why not ``oslo_privsep.comm.ClientChannel``: its ``privsep_reader``
    thread reads every reply and hands it to the caller through a
    ``comm.Future`` (a Condition), so that each call costs two thread
    hand-offs in this process (caller -> reader woken by the reply ->
    caller), each a GIL transfer that, with many busy threads in the
    service, waits its turn.  Here the callers read the socket
    themselves, one at a time (leader/follower): the caller holding the
    reader role reads until its own reply has come, delivering the
    replies of other calls to their waiters and handling log records on
    its way; when it leaves, it hands the role to a caller still
    waiting.  With one call in flight, the caller sends and reads its
    own reply: no other thread is involved.  (oslo's ``_ClientChannel``
    is not used either: its start has no bound and it re-raises remote
    exceptions by importing their classes.)

    With no call in flight nobody reads: ``running`` looks for an end of
    the daemon (and reads log records sent meanwhile) without waiting,
    so a daemon that died while idle is noticed before the next call is
    sent to it.
    """

    def __init__(self, sock, startup_flow=None):
        import msgpack
        self._comm = _import_comm()
        self._sock = sock
        # The unpacker and the reader role belong to one caller at a time
        # (``_reading``); ``_lock`` guards the waiters and the role.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters = {}
        self._reading = False
        self._ids = itertools.count()
        self._running = True
        self._broken = None
        # Set by shutdown() (under _send_lock): nothing more is sent, and
        # a send's EPIPE can then only mean the daemon died.
        self._shut = False
        self._packer = _Packer()
        self._unpacker = msgpack.Unpacker(
            use_list=False, raw=False, strict_map_key=False,
            unicode_errors="surrogateescape",
            max_buffer_size=100 * 1024 * 1024)
        # Whether data was fed since the unpacker last ran out of whole
        # messages (the reader's, as the unpacker is).
        self._fed = False
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        # The socket's receive timeout (SO_RCVTIMEO): how long a reader's
        # recv blocks at most; none yet.
        self._recv_bound = math.inf
        # Flow ids of the calls waiting for a reply: flow -> count.
        self._flows = collections.Counter()
        # While set (the daemon is starting), records without a flow id
        # belong to the call that started it.
        self.startup_flow = startup_flow

    @property
    def running(self):
        """False once the daemon closed the channel (it ended): reads
        what it sent while no call was in flight."""
        if self._running:
            self._read_idle()
        return self._running

    @property
    def open(self):
        """False once this channel saw the daemon end (no I/O: a daemon
        that ended while idle is seen by the next call's send, _Unsent)."""
        return self._running

    def ping(self, wait):
        reply = self._send((self._comm.Message.PING.value,), wait)
        if reply[0] != self._comm.Message.PONG:
            raise _Died("unexpected reply to PING: {!r}".format(reply))

    def call(self, name, args, wait, flow="-"):
        reply = self._send(
            (self._comm.Message.CALL.value, name, args, {}), wait, flow)
        if reply[0] == self._comm.Message.RET:
            return reply[1]
        if reply[0] == self._comm.Message.ERR:
            cls_name, exc_args = reply[1], reply[2]
            if cls_name == privsep.REMOTE_ERROR:
                raise privsep.RemoteError(*exc_args)
            # Not raised by our entrypoints' wrapper (bad call, setup).
            raise privsep.RemoteError(
                "failed", mask.mask_text("{}: {}".format(
                    cls_name.rsplit(".", 1)[-1],
                    " ".join(str(a) for a in exc_args))))
        raise _Died("unexpected reply: {!r}".format(reply[:1]))

    def shutdown(self):
        """Close our sending half: the daemon ends after its running calls
        (oslo's Daemon.loop ends at EOF).  A call sent after this fails
        alone (the daemon is stopping); the running ones get their
        replies."""
        with self._send_lock:
            self._shut = True
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def wait_closed(self, wait):
        """Read until the daemon closes the channel, at most ``wait``
        seconds; return whether it did."""
        deadline = time.monotonic() + wait
        waiter = _Waiter()
        key = object()      # never a msgid: no reply is delivered to it
        with self._lock:
            self._waiters[key] = waiter
        try:
            while True:
                with self._lock:
                    while self._running and self._reading:
                        if not self._sleep(waiter, deadline):
                            return False
                    if not self._running:
                        return True
                    if time.monotonic() >= deadline:
                        self._promote()
                        return False
                    self._reading = True
                try:
                    self._read(waiter, deadline)
                finally:
                    self._leave()
        finally:
            with self._lock:
                del self._waiters[key]

    # Private helpers

    def _send(self, msg, wait, flow="-"):
        deadline = time.monotonic() + wait
        msgid = "{:x}".format(next(self._ids))
        data = self._packer.pack((msgid, msg))
        waiter = _Waiter()
        with self._lock:
            if not self._running:
                # Ended after the caller chose this daemon: nothing sent.
                raise _Unsent(self._broken)
            self._waiters[msgid] = waiter
            self._flows[flow] += 1
        try:
            try:
                with self._send_lock:
                    if self._shut:
                        raise _Stopping()
                    self._sock.sendall(data)
            except OSError as e:
                # The daemon ended (EPIPE: it closed its end) before it
                # had the whole request: it cannot have acted on it.
                reason = "privsep daemon gone ({}: {})".format(
                    type(e).__name__, e)
                self._read_idle()       # its last records, if any
                self._fail(reason)
                raise _Unsent(reason)
            return self._wait(waiter, deadline, wait)
        finally:
            with self._lock:
                del self._waiters[msgid]
                self._flows[flow] -= 1
                if not self._flows[flow]:
                    del self._flows[flow]

    def _wait(self, waiter, deadline, wait):
        """The reply of ``waiter``'s call: as the reader, or woken by
        the reader with the reply or the reader role."""
        while True:
            with self._lock:
                while (waiter.reply is None and waiter.error is None
                       and self._reading):
                    if not self._sleep(waiter, deadline):
                        break
                if waiter.reply is not None:
                    return waiter.reply
                if waiter.error is not None:
                    raise _Died(waiter.error)
                if self._reading or time.monotonic() >= deadline:
                    if not self._reading:
                        self._promote()     # we may have been offered it
                    raise _Timeout("no reply within {:.1f} s".format(wait))
                self._reading = True
            try:
                self._read(waiter, deadline)
            finally:
                self._leave()

    def _sleep(self, waiter, deadline):
        """Wait (``_lock`` held, released meanwhile) until woken or
        ``deadline``; return False at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        waiter.asleep = True
        self._lock.release()
        try:
            woken = waiter.wake.acquire(timeout=remaining)
        finally:
            self._lock.acquire()
        if waiter.asleep:
            waiter.asleep = False   # nobody woke us: the deadline
        elif not woken:
            waiter.wake.acquire()   # woken just after the deadline
        return True

    def _wake(self, waiter):
        # _lock held.
        if waiter.asleep:
            waiter.asleep = False
            waiter.wake.release()

    def _leave(self):
        """Give up the reader role: to a caller still waiting, if any."""
        with self._lock:
            self._reading = False
            self._promote()

    def _promote(self):
        # _lock held, nobody reading: offer the role to a sleeping caller.
        for waiter in self._waiters.values():
            if waiter.asleep:
                self._wake(waiter)
                return

    def _read_until(self, waiter, deadline):
        while True:
            self._handle_buffered()
            if waiter.reply is not None or not self._running:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._bound_recv(remaining)
            self._receive()

    def _read(self, waiter, deadline):
        """As the reader: handle what arrives until ``waiter`` has its
        reply, the channel ended or ``deadline`` passed."""
        self._guarded(self._read_until, waiter, deadline)

    def _read_idle(self):
        """Read what the daemon sent while no call was in flight (log
        records, or its end), without waiting."""
        with self._lock:
            if self._reading or not self._running:
                return
            self._reading = True
        try:
            self._guarded(self._drain)
        finally:
            self._leave()

    def _drain(self):
        while self._running and self._poll.poll(0):
            self._receive()
            self._handle_buffered()

    def _guarded(self, read, *args):
        """Run ``read`` as the reader; anything it cannot make sense of (a
        frame that is not [msgid, message], a buffer overflow) ends the
        channel for every call in flight, as a broken socket does."""
        try:
            read(*args)
        except Exception as e:
            LOG.error("privsep channel broken: %s: %s", type(e).__name__, e)
            self._fail("privsep channel broken ({}: {})".format(
                type(e).__name__, e))

    def _bound_recv(self, remaining):
        """Make a blocking recv return within ``remaining`` seconds.

        SO_RCVTIMEO instead of a poll before each recv (a second system
        call, and one more release of the GIL, per reply).  Changed only
        when it is too long for this wait or far shorter than needed, so
        that calls with the same timeout set it once.
        """
        if self._recv_bound > remaining or self._recv_bound < remaining / 4:
            bound = max(remaining / 2, 0.001)
            sec = int(bound)
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                struct.pack("ll", sec, int((bound - sec) * 1e6)))
            self._recv_bound = bound

    def _receive(self):
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return      # SO_RCVTIMEO: nothing yet
        except OSError as e:
            # A daemon killed with a request still unread in its socket
            # resets the connection (ECONNRESET) instead of closing it:
            # any end of the channel is the daemon's end, and every call
            # in flight fails at once, not at its deadline.
            LOG.warning("privsep channel broken: %s", e)
            self._fail("privsep daemon gone ({}: {})".format(
                type(e).__name__, e))
            return
        if not data:
            LOG.debug("EOF on the privsep channel")
            self._fail("privsep daemon gone (end of file)")
            return
        self._unpacker.feed(data)
        self._fed = True

    def _handle_buffered(self):
        if not self._fed:
            # Every whole message fed so far was handled: the unpacker
            # would only raise StopIteration (msgpack adds a traceback
            # to it: the reader's first look, before each recv).
            return
        for msgid, msg in self._unpacker:
            if msgid is None:
                self._log_record(msg)
                continue
            with self._lock:
                waiter = self._waiters.get(msgid)
                if waiter is None:
                    continue    # its caller stopped waiting (deadline)
                waiter.reply = msg
                self._wake(waiter)
        self._fed = False

    def _fail(self, reason):
        with self._lock:
            self._running = False
            self._broken = reason
            for waiter in self._waiters.values():
                waiter.error = reason
                self._wake(waiter)

    def _implied_flow(self):
        """The flow id of a daemon record that has none.

        The daemon tags what it logs inside a call (brick.py); oslo.privsep's
        own lines around a call (its reply and exception lines, start-up)
        carry none.  They belong to the call that started the daemon while
        it starts, else to the calls now waiting for a reply, when these
        all have one flow id.  With calls of several flows in flight such
        a line cannot be attributed and keeps "-".
        """
        startup = self.startup_flow
        if startup is not None:
            return startup
        with self._lock:
            flows = list(self._flows)
        return flows[0] if len(flows) == 1 else "-"

    def _log_record(self, msg):
        if msg[0] != self._comm.Message.LOG:
            return
        data = {(k.decode() if isinstance(k, bytes) else k): v
                for k, v in msg[1].items()}
        if data.get("flow_id") in (None, "-"):
            data["flow_id"] = self._implied_flow()
        record = logging.makeLogRecord(data)
        logger = logging.getLogger(privsep.DAEMON_LOGGER)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


class _Output:
    """Reads the helper's and daemon's stdout/stderr: logs each line and
    keeps the last ones for error messages.  While ``flow`` is set (the
    daemon is starting) lines carry that flow id."""

    def __init__(self, pipe, flow=None):
        self.flow = flow
        self._lines = collections.deque(maxlen=10)
        self._thread = threading.Thread(target=self._read, args=(pipe,),
                                        name="privsep-output", daemon=True)
        self._thread.start()

    def tail(self):
        lines = list(self._lines)
        if not lines:
            return ""
        return "; output: " + mask.mask_text(" | ".join(lines))

    def _read(self, pipe):
        with pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self._lines.append(line)
                    with log.flow(self.flow):
                        LOG.debug("privsep output: %s", line)


class _SocketPlace:
    """The fixed socket path the helper connects to, ours while the
    context lasts.

    Entering takes an flock on ``privsep.lock`` in ``state_run_dir``
    (waiting at most until ``deadline``: another process may be starting
    its daemon); ``listen()`` binds the path with mode 0600; leaving
    closes the listener, unlinks the path and releases the lock.  Names
    are used relative to the directory, opened without following a
    symlink.
    """

    SOCK = "privsep.sock"
    LOCK = "privsep.lock"

    def __init__(self, cfg, deadline):
        self._cfg = cfg
        self._deadline = deadline
        self._dirfd = None
        self._lockfd = None
        self._listener = None

    def __enter__(self):
        path = self._cfg.privsep_sock_path
        # The daemon connects to the full path (sockaddr_un: 108 bytes).
        if len(os.fsencode(path)) > 107:
            raise errors.HelperFailed(
                "privsep socket path {} is too long for a unix socket; "
                "use a shorter state_run_dir".format(path))
        directory = self._cfg.state_run_dir
        try:
            if not os.path.lexists(directory):
                os.makedirs(directory, mode=0o755, exist_ok=True)
            self._dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY
                                  | os.O_NOFOLLOW | os.O_CLOEXEC)
            # Read-only: the file may be root's or vdsm's; flock needs
            # no write access.
            self._lockfd = os.open(
                self.LOCK, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                | os.O_CLOEXEC, 0o644, dir_fd=self._dirfd)
        except OSError as e:
            self._close_fds()
            raise errors.HelperFailed(
                "cannot use {} for the privsep socket: {}; run "
                "'managedvolume-tool configure' as root".format(
                    directory, e.strerror))
        try:
            self._lock()
        except BaseException:
            self._close_fds()
            raise
        return self

    def listen(self):
        # A socket left by a start that crashed: ours now, under the lock.
        fileutil.rm_file(self.SOCK, dir_fd=self._dirfd, log=LOG)
        listener = socket.socket(socket.AF_UNIX)
        self._listener = listener
        # The mode of the inode bound is the socket's own (Linux): set it
        # before bind, so that no other user can ever connect.
        os.fchmod(listener.fileno(), 0o600)
        # Through the directory fd: no symlink swapped in since we opened
        # it is followed, and the path length is not ours to worry about.
        listener.bind("/proc/self/fd/{}/{}".format(self._dirfd, self.SOCK))
        listener.listen(1)
        return listener

    def __exit__(self, t, e, tb):
        try:
            if self._listener is not None:
                self._listener.close()
                fileutil.rm_file(self.SOCK, dir_fd=self._dirfd, log=LOG)
        finally:
            self._close_fds()

    def _lock(self):
        waited = False
        while True:
            try:
                fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if not waited:
                LOG.info("Waiting for another process starting a privsep "
                         "daemon (%s)", self._cfg.privsep_lock_file)
                waited = True
            if time.monotonic() >= self._deadline:
                raise errors.HelperFailed(
                    "another process held {} during the whole start bound"
                    .format(self._cfg.privsep_lock_file))
            time.sleep(0.05)

    def _close_fds(self):
        # Closing the lock's fd releases the flock.
        for name in ("_lockfd", "_dirfd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _accept(listener, proc, deadline, output, cmd):
    """Wait for the helper to connect, bounded; fail early when it exits
    without connecting."""
    listener.settimeout(0.1)
    while True:
        try:
            sock = _accept_root(listener)
            if sock is not None:
                return sock
        except socket.timeout:
            pass
        rc = proc.poll()
        if rc is not None:
            # The helper connects before it exits: one last look.
            listener.settimeout(0)
            try:
                sock = _accept_root(listener)
                if sock is not None:
                    return sock
            except (BlockingIOError, socket.timeout):
                pass
            time.sleep(0.1)  # let the output reader catch up
            raise errors.HelperFailed(
                "privsep helper {} exited with code {} without starting "
                "the daemon{}".format(cmd[0], rc, output.tail()))
        if time.monotonic() >= deadline:
            _silent_kill(proc)
            raise errors.HelperFailed(
                "privsep helper {} did not start the daemon within the "
                "start bound{}".format(cmd[0], output.tail()))


def _accept_root(listener):
    """The next connection if its peer is root (the helper), else None.

    We send it connection info with its secrets: only root may be it.
    The socket's mode already keeps other users out; this keeps out our
    own user's other processes too.
    """
    sock, _ = listener.accept()
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                            struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid != 0:
        LOG.warning("Refused a connection to the privsep socket from pid "
                    "%s (uid %s): not root", pid, uid)
        sock.close()
        return None
    sock.settimeout(None)
    return sock


def _reap(proc, deadline):
    # The helper exits right after forking the daemon.
    if proc is None:
        return
    try:
        proc.wait(max(1.0, _remaining(deadline)))
    except subprocess.TimeoutExpired:
        _silent_kill(proc)
        proc.wait()


def _silent_kill(proc):
    if proc.poll() is not None:
        return
    try:
        proc.kill()
    except OSError as e:
        LOG.warning("Cannot kill privsep helper %s: %s", proc.pid, e)


def _pidfd(pid):
    # A pidfd names this process even after its pid is reused.
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        LOG.warning("Cannot open pidfd of privsep daemon %s: %s", pid, e)
        return None


def _daemon_env(cfg):
    """Our environment, with PYTHONPATH such that the daemon imports this
    package (and a connector override) from where we do.  Only effective
    without sudo, which resets the environment.

    As root, without sudo's variables: they tell the daemon that a user
    who is not root started it (brick.check_start), which is not so even
    when root's session began with sudo (``sudo make check``).
    """
    env = dict(os.environ)
    if os.geteuid() == 0:
        for name in ("SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND"):
            env.pop(name, None)
    paths = env.get("PYTHONPATH", "").split(os.pathsep) if env.get(
        "PYTHONPATH") else []
    for module in (__name__.split(".")[0],
                   cfg.connector_override.split(".")[0]):
        root = _import_root(module) if module else None
        if root and root not in paths:
            paths.append(root)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _import_root(top_level):
    try:
        spec = importlib.util.find_spec(top_level)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in",
                                                          "frozen"):
        return None
    path = os.path.dirname(os.path.abspath(spec.origin))
    if spec.submodule_search_locations is not None:
        path = os.path.dirname(path)
    return path


def _privsep_helper():
    path = os.path.join(os.path.dirname(sys.executable), "privsep-helper")
    if os.access(path, os.X_OK):
        return path
    return shutil.which("privsep-helper") or "privsep-helper"


def _local_error(e):
    kind, details = e.args[0], e.args[1:]
    if kind == "unsupported":
        return errors.NotSupported(*details)
    if kind == "invalid":
        return errors.InvalidParams(name=details[0], reason=details[1])
    if kind == "unknown_adapter":
        return errors.UnknownAdapter(adapter=details[0],
                                     group=adapters.GROUP,
                                     installed=details[1])
    return errors.ConnectorFailed(mask.mask_text(" ".join(details)))


def _remaining(deadline):
    return max(0.01, deadline - time.monotonic())


def _remote_message(e):
    if isinstance(e, privsep.RemoteError) and len(e.args) > 1:
        return e.args[1]
    return str(e)
