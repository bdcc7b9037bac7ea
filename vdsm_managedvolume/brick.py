"""The privileged side: os-brick inside one long-lived privsep daemon.

This module is imported only INSIDE the daemon (``privsep-helper
--privsep_context vdsm_managedvolume.brick.context``); the unprivileged
service talks to it through ``privileged.Brick``.  Keeping os-brick here
matters: importing it costs seconds, and ``os_brick.utils`` replaces
``time.sleep`` process-wide.  The two sides never import each other: what
they agree on is ``privsep`` (names, the values and the error crossing the
socket) and ``privsepconfig`` (this daemon's configuration file).

Inside the daemon::

    privsep-helper --config-file <privsep_config> --privsep_context ...
      cfg.CONF parsed from that file ([oslo_concurrency] lock_path, our
      [managedvolume_privileged] section); this module is imported:
      check_start() refuses an unsafe start (below); the helper
      connects to the client's socket and the daemon forks away from it
    oslo.privsep's Daemon.run(): chdir /, umask 0 (!), drop capabilities
    getpid()                first call: umask 022 (UMASK), pid
    handshake()             the client's privsep protocol, ours back
                            (privsep.py, "Versions"): nothing below is
                            served before a client of ours said it
    hello()                 umask 022 again, configure os-brick (below);
                            any other call does both first if it comes
                            first (_setup)
    connector_properties()  \
    connect_volume()         |
    disconnect_volume()      > each in a thread of the daemon's pool
    extend_volume()          |
    add_udev_rule()          |
    remove_udev_rule()       |
    delete_rbd_conf()       /

os-brick outside OpenStack needs, once, before any connector runs:
oslo.service's threading backend selected before os_brick is imported
(else eventlet), ``[oslo_concurrency] lock_path`` (else RequiredOptError on
iSCSI/FC/NVMe), ``os_brick.setup(conf)``, and os-brick's own PrivContexts
switched to "server mode" so that its privileged helpers run right here
instead of spawning a second daemon through sudo.

Threads: oslo.privsep's loop (``oslo_privsep.daemon.Daemon.loop``) reads
every request on the main thread and hands it to a pool thread
(``thread_pool_size``): one wake-up between each request's arrival and
its start.  Running a call on the reading thread would save it, but
while the call runs nothing would read, and no call is known to be fast
(a connect waiting for its device, a command hung on a dead path,
os-brick's per-connector lock): every other call, and the end of the
channel, would wait for it.  So the pool's threads take turns at the
channel (``_Daemon``, a ``workers.Pool`` in place of oslo's
ThreadPoolExecutor): the thread holding the turn reads one request,
passes the turn to another thread *before* running the call (the
wake-up now happens beside the call), then runs it; a call that blocks
holds its own thread only.  A call wakes one thread, the one taking the
turn, the thread that has just answered first (8 callers at once,
side by side with the hand-off design: daemon CPU per call 162 -> 119
us, context switches 5.5 -> 2.1).  Also cut: the watchdog no longer
wakes up per call (watchdog.py), and a call's request context draws no
uuid4.

Deadlines: every entrypoint gets the caller's deadline (time.monotonic(),
CLOCK_MONOTONIC, the same clock in both processes), and one watchdog
thread (``watchdog.Watchdog``) watches every call's.  When a call's
deadline passes it is cancelled, here, cooperatively (``_Call``): from
then on, in the call's thread and in the threads os-brick spawned for it
(``os_brick.executor.Thread`` hands them oslo.context's per-thread
context, where ``_set_thread_flow`` keeps the call):

- a sleep raises ``_Cancelled`` at once, however long it was to last.
  os-brick's polling and retries all sleep through ``time.sleep``,
  which importing ``os_brick.utils`` replaced process-wide by
  ``os_brick.utils._sleep``; that calls the module global
  ``os_brick.utils._time_sleep``, which ``_install_cancellation``
  replaces: tenacity's waits (``utils.retry``), the multipath iSCSI
  connect's wait for its portal threads and device, the per-portal scan
  loop, NVMe-oF's polls, processutils' retry delays, and the
  ``time.sleep(0)`` processutils runs after every attempt of a command
  (what ends its own retry loop).
- starting a command raises ``_Cancelled`` before its Popen: os-brick
  runs every command through ``oslo_concurrency.processutils.execute``
  (``rootwrap.custom_execute``, the privileged ``execute_root``), which
  is replaced by a wrapper that also tells which thread is inside a
  command.
- waiting for a lock raises ``_Cancelled`` (polled every
  ``_CancellableSemaphore.POLL`` s): os-brick takes its locks through
  ``oslo_concurrency.lockutils.lock``, whose in-process part (taken
  before the lock file) is a semaphore from ``lockutils._semaphores``,
  which ``_install_cancellation`` replaces by ``_CancellableSemaphores``:
  the per-host ``connect_volume`` lock of every iSCSI, FC and NVMe-oF
  connect and disconnect, ``extend_volume``'s, and a multipath iSCSI
  connect's per-portal login lock.  A call queued behind a slow holder
  (a disconnect retrying ``multipath -f`` for a minute) fails at its
  own deadline and the holder goes on; before, it could not stop, and
  END_GRACE later the daemon was killed, holder included.  The lock
  file's wait (another process holding it) sleeps, so it raises too.
- a command already running is never signalled: it is left to finish on
  its own (os-brick's own timeouts).  A sleep taken while the thread is
  inside a command (``custom_execute`` sleeps its retry backoff between
  Popen and communicate) is cut short instead of raising, so that the
  command is waited for and its pipes read, not abandoned.

``_Cancelled`` is a BaseException: it goes past os-brick's ``except
Exception`` (cleanups that would run commands, retries) up to the
entrypoint, through ``finally`` and ``with`` (os-brick's locks are
released).  The call then fails with a "timeout" RemoteError, whatever
it returned (a call taken from the pool after its deadline is not
started at all), and its caller reports HelperTimeout and undoes it
(the service disconnects a timed-out connect) while the daemon and the
other calls in it go on.  Before 2026-12-01 every deadline killed the
daemon, and with it every call in flight beside the late one: in a
mass start one hung LUN failed every attach beside it.  Killing the late
call's commands instead was tried and reverted: SIGKILL can leave
iscsiadm's database lock (/run/lock/iscsi/lock.write) or a suspended
multipath map behind (docs/operations.md, "A hung LUN in a mass start").

What cancelling does not stop:
- a call stuck inside one command (iscsiadm, multipath, rbd, nvme) or
  a wait that is neither a sleep nor a lock (FC's device discovery, an
  oslo.service looping call in a thread of its own; a write to a dead
  device; an adapter's or librados' own waits): if the
  call has not returned ``privsep.END_GRACE`` seconds after its
  deadline, the watchdog kills the whole daemon with SIGKILL, as it did
  at every deadline before, so that os-brick cannot go on to finish a
  "ghost" connect after the caller was told it failed.  The other calls
  in it fail (the client reruns the idempotent ones:
  privileged.RERUN_AFTER_KILL), the next call starts a fresh daemon.
  (The call's own thread then cannot finish a connect; a command it or
  its threads started still runs, outside any daemon.)
- the late call's commands: those running in the threads os-brick
  spawned for it (a multipath connect's per-portal ``iscsiadm
  --login``) go on after the call's own thread returned, holding
  os-brick's lock for that portal and target in this daemon; each such
  thread stops at its next sleep or command.  A command that never
  returns keeps that lock until the daemon ends.  So what the kill
  above prevents (a ghost connect) holds for the call's own thread, not
  for those: they are counted (``os_brick.executor.Thread``'s start and
  run, ``_Call.threads``), the answer waits for them up to
  ``privsep.THREADS_GRACE`` after the deadline (no kill: they are not the
  call's own thread), and when some still run it says so
  (``privsep.THREADS_LEFT``: the service keeps the record, it does not
  take the failure for "nothing done").  The call is then "lingering"
  (``_lingering``).  The same holds for threads left by a call that
  ended with an error (they are cancelled then).
- so a disconnect first waits for what an earlier connect of the same
  connection still runs (``_wait_earlier``), so that it sees the
  session a late login made: the lingering threads of this daemon, and,
  when the service's record says a connect of it may not have
  completed (store.py, ``connecting``: not for a volume attached long
  ago, whose detach another volume's late login on a target they share
  must not hold off), the host's processes running that connect's
  command that an earlier daemon started (``procs``: ``iscsiadm -T
  <iqn> --login`` of one of its targets, ``rbd map`` of its image,
  ``nvme connect -n <nqn>`` of its subsystem; ``transports``'
  ``connect_command``; not this daemon's
  own children, which are its calls', lingering ones included), which
  outlive the daemon that started them: one killed at a deadline (the
  call's own thread inside its login or map), stopped with the agent,
  or whose agent restarted.  For those it relies on the kernel's
  process table alone: no state of ours survives a daemon.  While they
  run (up to the disconnect's deadline, or not at all when each has
  already run
  longer than the disconnect could wait: stuck) the disconnect is not
  run and says so ("still_running": ``errors.EarlierConnectRunning``,
  931), and the service keeps the record (detach, reconcile, the
  rollback of a cut connect) for a later disconnect.  Not recognised:
  a login to a target os-brick discovered under another IQN (sendtargets
  discovery without target_iqns), FC's and iSCSI's SCSI scans (``tee
  .../scan``, which name no target).
- what runs outside the daemon: iscsid retries a login on its own
  (``node.session.initial_login_retry_max``), so a late session may
  still appear after the caller's rollback disconnect, as before.

(oslo.privsep's own entrypoint_with_timeout only stops waiting and
leaves the call running.)

udev rules for an unprivileged service: inside vdsm the service runs as
user vdsm and cannot write ``/etc/udev/rules.d`` nor a device's sysfs
``uevent``.  ``add_udev_rule(sd_id, vol_id, path)`` and
``remove_udev_rule(sd_id, vol_id)`` do it here, and nothing more: the ids
must be UUIDs, the path a plain device path under /dev (or the configured
multipath/rbd directories, ``transports.device_dirs``), the rule text is
rebuilt here by ``udev.rule_text`` and the file name from the ids, in the
``udev_rules_dir`` of this daemon's configuration file.  No entrypoint
writes a file name or text the caller chose.

Flow ids: each entrypoint gets the caller's flow id and every line logged
while it runs carries it, including lines of threads os-brick spawns
(``os_brick.executor.Thread`` copies oslo.context's per-thread context,
where we keep the flow id) and oslo.privsep's own reply line, logged by
the worker thread after the entrypoint returned (a thread keeps the flow
id of its last call).  The client tags what remains (start-up lines; see
``privileged._Channel``).

Refusing to start (``check_start``, run when this module is imported by
privsep-helper, before it connects to the client): the helper's arguments
must be exactly ``--config-file F --privsep_context <ours>
--privsep_sock_path S`` (no second config file, no ``--config-dir``, no
oslo.log option), oslo.config must have read F alone (no default config
directory), F a regular file owned by root and not writable by group or
others, in a directory of the same kind; under sudo (``SUDO_UID`` set)
also every directory above it, no ``OS_<GROUP>__<OPT>`` variable (oslo's
environment source), no ``connector_override`` (test-only: it makes root
import a module), and the socket must be the caller's; and its files
must be of one version: one ``PROTOCOL`` here and in privsep.py, one
``BUILD`` here, in privsep.py and in the package's __init__.py
(``file_builds``; privsep.py, "Versions").  Otherwise we log
why, print it on stderr (the client quotes it in its HelperFailed) and
exit with ``privsep.EXIT_REFUSED``: the daemon never serves.  This is
defence in depth: oslo.privsep parsed the arguments and set up logging
before any code of ours ran, so an argument like ``--log-config-append``
has done its harm by then.  The sudoers rule's exact command (no
wildcard) is what keeps such arguments out; this check catches a broken
installation or a loosened rule.

Results cross the socket as msgpack (lists become tuples, sets fail):
entrypoints return ``privsep.plain()`` values; every error is a
``privsep.RemoteError`` holding a masked message, so that the service
never has to import os-brick's exception classes.
"""

import collections
import errno
import functools
import importlib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
import types
import weakref

from oslo_config import cfg as oslo_cfg
from oslo_privsep import capabilities as caps
from oslo_privsep import comm
from oslo_privsep import daemon as oslo_daemon
from oslo_privsep import priv_context

from . import adapters
from . import config
from . import errors
from . import faults
from . import log
from . import mask
from . import privsep
from . import privsepconfig
from . import procs
from . import transports
from . import udev
from . import validate
from . import watchdog
from . import workers
from .transports import rbd

LOG = logging.getLogger(__name__)

# What the daemon keeps of root's powers.  The Python code of os-brick's
# privileged helpers runs in this process: os-brick's own privsep context
# asks for CAP_SYS_ADMIN (device-mapper/multipath and block device ioctls,
# rbd map, mounts) and CAP_DAC_READ_SEARCH (walking /sys, /dev/disk).  We
# add CAP_DAC_OVERRIDE because the lock directory and the state files may
# belong to the service's user (vdsm), not to root.  Not needed: CAP_MKNOD
# (device nodes come from devtmpfs/udev), CAP_SYS_RAWIO (SCSI inquiries run
# as commands, not in this process), CAP_NET_ADMIN (iscsiadm/nvme run as
# commands), CAP_CHOWN/CAP_FOWNER (udev rules and sysfs uevent files
# belong to root, which the daemon still is; the chown runs in udev).  Note
# that commands os-brick runs (iscsiadm, multipath, rbd, nvme) are exec'd
# by uid 0 and so regain the bounding set: capabilities confine this
# process' own code, not its children.
CAPABILITIES = [caps.CAP_SYS_ADMIN, caps.CAP_DAC_OVERRIDE,
                caps.CAP_DAC_READ_SEARCH]

context = priv_context.PrivContext(
    "vdsm_managedvolume",
    cfg_section=privsepconfig.SECTION,
    pypath=__name__ + ".context",
    capabilities=CAPABILITIES,
    logger_name=privsep.DAEMON_LOGGER,
)

OPTS = [
    oslo_cfg.StrOpt("connector_override", default="",
                    help="Module whose get_connector() is asked first "
                         "(tests: tests.fakebrick)."),
    oslo_cfg.StrOpt("root_helper", default="sudo",
                    help="root_helper handed to os-brick connectors."),
] + [
    # What add_udev_rule/remove_udev_rule may do, from managedvolume.conf
    # (never from a call's arguments).
    oslo_cfg.StrOpt(key, default=getattr(config.Config, key))
    for key in privsepconfig.UDEV_KEYS]
oslo_cfg.CONF.register_opts(OPTS, group=privsepconfig.SECTION)

def check_start(argv=None, environ=None, conf=None):
    """Refuse to serve when started unsafely: log why, print it on
    stderr and exit with privsep.EXIT_REFUSED (see the module docstring).

    Does nothing outside privsep-helper (a process importing this module
    for another reason).
    """
    conf = oslo_cfg.CONF if conf is None else conf
    try:
        context_name = conf.privsep_context
    except (oslo_cfg.NoSuchOptError, oslo_cfg.Error):
        return
    if context_name is None:
        return
    problem = start_problem(sys.argv[1:] if argv is None else argv,
                            os.environ if environ is None else environ,
                            conf)
    if problem is None:
        # privsep-helper builds its Daemon once this import returns.
        if _fits(oslo_daemon.Daemon):
            oslo_daemon.Daemon = _Daemon
        else:
            # Said at the first call (_setup): logged now, the line would
            # go to privsep-helper's output, which the service logs at
            # DEBUG only, as "privsep output".
            global _fallback
            _fallback = ("oslo.privsep {}'s Daemon is not the one this "
                         "daemon's pool was written for (oslo.privsep "
                         "{}): its own executor runs the calls".format(
                             _version("oslo.privsep"), OSLO_PRIVSEP_READ))
        return
    message = ("vdsm-managedvolume privsep daemon refuses to start: "
               + mask.mask_text(problem))
    LOG.critical("%s", message)
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    finally:
        os._exit(privsep.EXIT_REFUSED)


def start_problem(argv, environ, conf):
    """What makes this start unsafe, or None (see check_start)."""
    if PROTOCOL != privsep.PROTOCOL:
        return ("its files are of two versions: the entrypoints in {} are "
                "of privsep protocol {}, privsep.py's is {} (the package "
                "is being replaced?)".format(__file__, PROTOCOL,
                                             privsep.PROTOCOL))
    builds = file_builds()
    if len(set(builds.values())) > 1:
        return ("its files are of two builds: in {}, {} (the package is "
                "being replaced? vdsm-managedvolume-common holds "
                "__init__.py, the host package privsep.py and brick.py)"
                .format(os.path.dirname(os.path.abspath(__file__)),
                        ", ".join("{} is of build {}".format(name, build)
                                  for name, build in builds.items())))
    args, problem = _helper_args(argv)
    if problem:
        return problem
    if args["--privsep_context"] != privsep.CONTEXT:
        return "--privsep_context {!r} is not {}".format(
            args["--privsep_context"], privsep.CONTEXT)
    path = args["--config-file"]
    if list(conf.config_file or ()) != [path]:
        return "configuration read from {} (exactly {} allowed)".format(
            ", ".join(conf.config_file or ()) or "nothing", path)
    if conf.config_dir:
        dirs = conf.config_dir
        if isinstance(dirs, str):
            dirs = [dirs]
        return "configuration directories read: {} (none allowed)".format(
            ", ".join(dirs))
    sudo = "SUDO_UID" in environ
    reason = privsepconfig.unsafe_config(path, ancestors=sudo)
    if reason:
        return "configuration file {} {}".format(path, reason)
    if not sudo:
        return None
    env_opts = sorted(k for k in environ
                      if k.startswith("OS_") and "__" in k)
    if env_opts:
        return "environment variables set options: {}".format(
            ", ".join(env_opts))
    if conf[privsepconfig.SECTION].connector_override:
        return ("connector_override = {} under sudo (test-only: it makes "
                "root import a module)".format(
                    conf[privsepconfig.SECTION].connector_override))
    return _sock_problem(args["--privsep_sock_path"], environ["SUDO_UID"])


def file_builds():
    """{file name: the build it is of} for the files stamped with one
    build id (scripts/stamp-build); None for one from before the
    stamp."""
    return collections.OrderedDict(
        (name, getattr(module, "BUILD", None))
        for name, module in (("__init__.py", sys.modules[__package__]),
                             ("privsep.py", privsep),
                             ("brick.py", sys.modules[__name__])))


# Handed to every connector factory, as vdsm's helper does.
CONNECTOR_KWARGS = {"use_multipath": True, "device_scan_attempts": 3}

# The privsep protocol of the entrypoints below (privsep.py, "Versions"),
# the one this daemon tells at the handshake: it must be
# ``privsep.PROTOCOL``, else this file and privsep.py are of two versions
# (a daemon started while an upgrade writes the files) and the daemon
# refuses to start (``start_problem``); the next call starts another.
PROTOCOL = 2

# The build this file is of (privsep.BUILD, stamped by scripts/stamp-build
# with it and the package's __init__.py): another build's privsep.py or
# __init__.py beside it (vdsm-managedvolume-common is replaced in a step
# of its own) makes the daemon refuse to start, as another PROTOCOL does.
BUILD = "source"


@context.entrypoint
def handshake(client):
    """The client's second call (after getpid): ``client`` is its
    ``privsep.identity()``; return ours.  Fixed for every protocol to
    come: one dict each way, so that two versions can always tell each
    other apart.  Until a client of our ``PROTOCOL`` said so, ``_setup``
    refuses every call (privsep.py, "Versions")."""
    global _client
    _set_thread_flow(None)
    if not isinstance(client, dict):
        client = {}
    client = privsep.plain(client)
    with _setup_lock:
        _client = client
    if client.get("protocol") != privsep.PROTOCOL:
        LOG.error("%s", _refusal(client))
    return privsep.identity()


@context.entrypoint
def hello(flow_id=None):
    """Configure os-brick; return what the client wants to know."""
    _set_thread_flow(flow_id)
    with log.flow(flow_id):
        info = _setup()
    info["pid"] = os.getpid()
    return info


@context.entrypoint
def getpid():
    # The client's first call (privileged._Daemon.start): the earliest
    # point our code runs after oslo.privsep set umask 0 (see _setup).
    os.umask(UMASK)
    _set_thread_flow(None)
    return os.getpid()


@context.entrypoint
def connector_properties(my_ip, deadline, flow_id):
    with _operation("connector_properties", deadline, flow_id, None):
        if my_ip is not None:
            my_ip = str(ipaddress.ip_address(my_ip))
        from os_brick.initiator import connector
        props = connector.get_connector_properties(
            _conf().root_helper, my_ip, multipath=True,
            enforce_multipath=True, host=None)
        return privsep.plain(props)


@context.entrypoint
def connect_volume(connection_info, deadline, flow_id):
    connection_info = privsep.plain(connection_info)
    with _operation("connect", deadline, flow_id, connection_info):
        conn = _connector(connection_info)
        faults.crash_point("privsep.connect.before")
        attachment = conn.connect_volume(_data(connection_info))
        faults.crash_point("privsep.connect.after")
        return privsep.plain(attachment or {})


@context.entrypoint
def disconnect_volume(connection_info, attachment, connecting, deadline,
                      flow_id):
    connection_info = privsep.plain(connection_info)
    attachment = privsep.plain(attachment)
    with _operation("disconnect", deadline, flow_id, connection_info):
        _check_rbd_conf(connection_info, attachment)
        _wait_earlier(connection_info, processes=bool(connecting))
        conn = _connector(connection_info)
        data = _data(connection_info, attachment)
        faults.crash_point("privsep.disconnect.before")
        conn.disconnect_volume(data, attachment)
        faults.crash_point("privsep.disconnect.after")
        return None


@context.entrypoint
def extend_volume(connection_info, deadline, flow_id):
    """Make this host see the volume's new size; return os-brick's answer
    (the new size in bytes, or None when the connector does not know).

    os-brick's ``connector.extend_volume(connection_properties)``, as Nova
    (LibvirtDriver.extend_volume through its volume drivers) and Ember-CSI
    (NodeExpandVolume, through cinderlib's Connection.extend) call it;
    what each connector does is told in its transport's module
    (vdsm_managedvolume/transports/).
    """
    connection_info = privsep.plain(connection_info)
    with _operation("extend", deadline, flow_id, connection_info):
        conn = _connector(connection_info)
        faults.crash_point("privsep.extend.before")
        size = conn.extend_volume(_data(connection_info))
        faults.crash_point("privsep.extend.after")
        return size if isinstance(size, int) else None


@context.entrypoint
def add_udev_rule(sd_id, vol_id, path, deadline, flow_id):
    """Write the rule giving ``path`` to qemu, trigger it; return the rule
    file's path.  See the module docstring for what is checked."""
    with _operation("add_udev_rule", deadline, flow_id, None):
        cfg = _udev_config()
        sd_id, vol_id = _volume_ids(sd_id, vol_id)
        udev.check_device_path(path, transports.device_dirs(cfg))
        _check_inside(cfg, udev.rule_path(cfg.udev_rules_dir, sd_id, vol_id))
        dst = udev.add_rule(cfg, sd_id, vol_id, path)
        udev.trigger(cfg, path)
        LOG.info("Wrote udev rule %s for %s", dst, path)
        return dst


@context.entrypoint
def remove_udev_rule(sd_id, vol_id, temp, deadline, flow_id):
    """Remove the volume's rule (``temp``: its leftover temp file);
    return whether there was one."""
    with _operation("remove_udev_rule", deadline, flow_id, None):
        cfg = _udev_config()
        sd_id, vol_id = _volume_ids(sd_id, vol_id)
        _check_inside(cfg, udev.rule_path(cfg.udev_rules_dir, sd_id, vol_id))
        removed = udev.remove_rule(cfg, sd_id, vol_id, temp=bool(temp))
        if removed:
            LOG.info("Removed udev %s of volume %s",
                     "temp file" if temp else "rule", vol_id)
        return removed


@context.entrypoint
def delete_rbd_conf(path, holding, deadline, flow_id):
    """Delete a ceph conf os-brick's RBD connector wrote at a connect (it
    holds the keyring) that no record names any more: a connect made
    again over the record wrote another (``transports.rbd``), a
    disconnect found the device gone and left it, or the service's start
    found it named by no record (``service._sweep_confs``).  Only a
    regular file named as os-brick names them, right in this daemon's
    temp dir where it writes them, made by this daemon's user
    (``rbd.conf_problem``); with ``holding`` (keyrings), only one
    holding one of them (another program's conf is left alone); deleted
    as os-brick's disconnect deletes its conf.  Returns whether it was
    deleted."""
    with _operation("delete_rbd_conf", deadline, flow_id, None):
        problem = rbd.conf_problem(path, tempfile.gettempdir())
        if problem:
            raise errors.InvalidParams(
                name="path", reason="{!r}: {}".format(path, problem))
        if not os.path.lexists(path):
            return False
        if holding is not None and not _holds_one_of(path, holding):
            return False
        from os_brick.privileged import rbd as rbd_privsep
        rbd_privsep.delete_if_exists(path)
        LOG.info("Deleted ceph conf %s", path)
        return True


# Private helpers

def _holds_one_of(path, keyrings):
    """Whether the file at ``path`` (checked by rbd.conf_problem: a
    regular file, not a link) holds one of ``keyrings`` (strings), as
    os-brick's ``RBDConnector._create_ceph_conf`` writes it."""
    keyrings = [k for k in keyrings if isinstance(k, str) and k]
    try:
        # Non-blocking: a FIFO put there since the check must not hang
        # this thread in open() (review-safety10 L-4).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        # What was opened is what was checked: a regular file of ours
        # with one link, not one swapped in since.
        if rbd.conf_stat_problem(os.fstat(fd)):
            return False
        # A conf is a few lines; a larger file is no conf of os-brick's.
        text = f.read(1 << 16).decode("utf-8", "replace")
    return any(k in text for k in keyrings)


def _helper_args(argv):
    """``{option: value}`` of privsep-helper's argv, or a problem: each
    of privsep.HELPER_OPTIONS exactly once (``--opt value`` or
    ``--opt=value``), nothing else."""
    args = {}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in privsep.HELPER_OPTIONS:
            return None, "unexpected argument {!r} (allowed: {})".format(
                argv[i], ", ".join(privsep.HELPER_OPTIONS))
        if not eq:
            i += 1
            if i == len(argv):
                return None, "{} without a value".format(name)
            value = argv[i]
        if name in args:
            return None, "{} given more than once".format(name)
        args[name] = value
        i += 1
    missing = [o for o in privsep.HELPER_OPTIONS if o not in args]
    if missing:
        return None, "missing {}".format(", ".join(missing))
    return args, None


def _sock_problem(path, sudo_uid):
    # The socket is the sudo caller's: bound by its client in its own
    # directory.  (That directory is the caller's, so this narrows, not
    # closes, a swap before the helper connects; the helper then only
    # talks to some socket the caller chose, which it could anyway.)
    try:
        st = os.lstat(path)
    except OSError as e:
        return "socket {}: {}".format(path, e.strerror)
    if not stat.S_ISSOCK(st.st_mode):
        return "{} is not a socket".format(path)
    if str(st.st_uid) != str(sudo_uid):
        return "socket {} belongs to uid {}, not to the sudo caller {}" \
            .format(path, st.st_uid, sudo_uid)
    return None


@functools.lru_cache(maxsize=None)
def _udev_config():
    """The udev settings of the daemon's configuration (``_conf``), as a
    Config, made once (16 us; a refusal is not kept: raised each time)."""
    conf = _conf()
    rules_dir = conf.udev_rules_dir
    if not rules_dir or not os.path.isabs(rules_dir):
        raise privsep.RemoteError(
            "failed", "udev_rules_dir {!r} of the privsep configuration is "
            "not an absolute path".format(rules_dir))
    values = {key: getattr(conf, key) for key in privsepconfig.UDEV_KEYS}
    values["udev_rules_dir"] = os.path.normpath(rules_dir)
    return config.Config(**values)


def _volume_ids(sd_id, vol_id):
    return validate.uuid("sd_id", sd_id), validate.uuid("vol_id", vol_id)


def _check_inside(cfg, path):
    # Belt and braces: names made of two UUIDs cannot leave the directory.
    if os.path.dirname(path) != cfg.udev_rules_dir:
        raise privsep.RemoteError(
            "failed", "{!r} is outside {}".format(path, cfg.udev_rules_dir))


class _Daemon(oslo_daemon.Daemon):
    """oslo.privsep's daemon, its calls run by a ``workers.Pool`` whose
    threads take turns reading the channel.

    oslo.privsep 3.12's ``Daemon.__init__`` makes a
    ``concurrent.futures.ThreadPoolExecutor(thread_pool_size)``, and
    ``Daemon.loop`` reads each request in the main thread and submits it
    to that executor (``_process_cmd``) with
    ``_create_done_callback(msgid)`` as the future's callback, which sends
    the reply.  That executor's ``queue.SimpleQueue`` wakes a second
    waiting thread for nothing at every call once two or more wait
    (``workers``), its threads in turn, and each call makes a Future, a
    work item and a Condition: 5-7 context switches in the daemon per
    call.  Even without them, every call was handed from the thread that
    read it to the thread that ran it: a wake-up (on this 2-core VM often
    of an idle vCPU) between the request's arrival and its start.

    Here the threads of one pool (``privsep-N``) take turns at the
    channel, leader and followers: the thread holding the turn
    (``_lead``) reads one request, gives the turn to another thread (it
    wakes one, or leaves it to one that has just answered), and runs
    the call itself, so the wake-up happens beside the call instead of
    before it.  The call is oslo's ``_process_cmd`` and its reply oslo's
    callback (its reply, logging and ``communication_error`` are
    oslo's), sent once the pool counts the thread as coming back
    (``_Request``).  The main thread only waits for the channel's end.
    The pool has ``thread_pool_size`` threads, so at most that many
    calls run at once, as in oslo's executor; while all of them run
    calls nobody reads, and the next request is read once one of them
    has answered (oslo's executor queued it in memory until then; here
    it waits in the socket: the client sends at most
    ``max_operations`` calls and the control plane's few,
    ``privsepconfig.thread_pool_size``).  At the channel's end the
    daemon exits once the calls it took have run (``Pool.stop``,
    ``join``) and, as the executor's threads are no daemon threads, once
    the threads os-brick started from them have ended too; an error
    reading the channel ends it as it ended oslo's loop (raised from
    ``loop``), and so does a turn that cannot be passed on (no thread
    can be started: the request read is still run and answered, and the
    calls in flight end, so that the agent starts a new daemon instead
    of waiting for a daemon that reads nothing); when ``loop`` itself
    leaves on an exception (SIGINT), the channel is shut for reading so
    that the turn ends as well (``_stop_reading``).  A call ended by a
    BaseException that is no Exception gets an ERR reply (oslo's
    executor sent none: its caller waited for its deadline).

    Installed by ``check_start`` in privsep-helper only (``helper_main``
    builds ``Daemon(channel, context)`` after importing this module), and
    only over an oslo.privsep Daemon whose methods it calls have the
    parameters it was written against (``_fits``): another keeps its own
    executor, and the daemon's first call says so at WARNING in the
    service's log (``_setup``).  tests/brick_test.py pins the hash of
    the oslo ``loop`` whose steps ``loop`` and ``_lead`` share
    (oslo.privsep 3.12.0, ``OSLO_PRIVSEP_READ``): read another
    version's before trusting it.
    """

    def __init__(self, channel, context):
        super().__init__(channel, context)
        self.thread_pool = None     # oslo's executor: never started
        # Threads that are not daemons, as the executor's: at the exit
        # the interpreter waits for the threads os-brick started from
        # them (they inherit it), a portal login left running included.
        self.calls = workers.Pool(context.conf.thread_pool_size,
                                  sys.maxsize, name="privsep", daemon=False)
        self._ended = threading.Event()
        self._error = None
        # Held to pass the turn on, and to stop that once loop() ends:
        # Pool.stop() must come after the last job submitted.
        self._turn_lock = threading.Lock()
        self._stopping = False

    def loop(self):
        # oslo_privsep.daemon.Daemon.loop, its reading done by the pool's
        # threads in turn (_lead).
        oslo_daemon.LOG.info("privsep daemon running as pid %s",
                             os.getpid())
        self.context.set_client_mode(False)
        try:
            self.calls.submit(self._lead)
            self._ended.wait()
        finally:
            with self._turn_lock:
                self._stopping = True       # no turn passed on from now
            if not self._ended.is_set():
                # Leaving on an exception of its own (SIGINT: the daemon
                # stays in its client's process group): the thread
                # holding the turn would read on until the client closes
                # the channel (review-perf13 L8).
                self._stop_reading()
            self.calls.stop()
            self.calls.join()
        if self._error is not None:
            raise self._error
        oslo_daemon.LOG.debug("Socket closed, shutting down privsep daemon")

    def _stop_reading(self):
        """End the reading: the channel's socket (oslo's ``ServerChannel``
        reads it through its ``Deserializer``) is shut for reading, so the
        turn's ``next`` ends (StopIteration) while the calls in flight
        can still answer."""
        reader = getattr(self.channel, "reader_iter", None)
        sock = getattr(reader, "readsock", None)
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _lead(self):
        """Holding the channel's turn: read one request, pass the turn on,
        run the call; return what sends its reply (``_Request.run``)."""
        try:
            msgid, msg = next(self.channel)
        except StopIteration:
            self._ended.set()
            return None
        except BaseException as e:
            self._error = e
            self._ended.set()
            return None
        error = self.communication_error
        if error:
            # The write stream closed (EPIPE): the end, as oslo's loop.
            if getattr(error, "errno", None) != errno.EPIPE:
                self._error = error
            self._ended.set()
            return None
        with self._turn_lock:
            if not self._stopping:
                try:
                    self.calls.submit(self._lead)
                except BaseException as e:
                    # No thread to take the turn (RuntimeError: can't
                    # start new thread): nobody would read again and the
                    # daemon would hang.  It ends instead, once this call
                    # and those in flight have answered (review-perf13
                    # M1).
                    oslo_daemon.LOG.critical("privsep daemon cannot go on "
                                             "reading its channel: %r", e)
                    self._error = e
                    self._ended.set()
        return _Request(self, msgid, msg).run()


# The oslo.privsep whose Daemon ``_Daemon`` was read against (its loop's
# hash is pinned in tests/brick_test.py).
OSLO_PRIVSEP_READ = "3.12.0"

# Why oslo.privsep's own Daemon serves instead of ``_Daemon`` (None: it
# does not), for ``_setup`` to say once the daemon's lines reach the
# service's log.
_fallback = None


def _version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _fits(daemon_class):
    """Whether ``_Daemon`` may replace oslo.privsep's ``daemon_class``: it
    calls its ``_process_cmd(msgid, cmd, *args)`` and
    ``_create_done_callback(msgid)`` (private, the same since oslo.privsep
    added its executor) and is built as it is; else oslo's own runs
    (setup.cfg takes any oslo.privsep >= 3.0)."""
    import inspect
    expected = {"__init__": ["self", "channel", "context"],
                "_process_cmd": ["self", "msgid", "cmd", "args"],
                "_create_done_callback": ["self", "msgid"],
                "loop": ["self"]}
    for name, params in expected.items():
        try:
            found = list(inspect.signature(
                getattr(daemon_class, name)).parameters)
        except (AttributeError, TypeError, ValueError):
            return False
        if found != params:
            return False
    return True


class _Request:
    """One request to ``_Daemon``, the future oslo's callback reads."""

    __slots__ = ("daemon", "msgid", "msg", "reply", "error")

    def __init__(self, daemon, msgid, msg):
        self.daemon = daemon
        self.msgid = msgid
        self.msg = msg
        self.reply = None
        self.error = None

    def run(self):
        """Run the call; return what sends its reply.  The pool runs that
        once it counts this thread as coming back for the next call: sent
        from inside the job, the reply could bring the next call before
        that, and the pool would wake another thread for it."""
        try:
            self.reply = self.daemon._process_cmd(self.msgid, *self.msg)
        except Exception as e:
            self.error = e
        except BaseException as e:
            # What oslo's executor did not answer at all (its thread died
            # and the caller waited for its deadline): answered as an
            # Exception is (``_process_cmd``), and this thread goes on.
            oslo_daemon.LOG.critical("privsep call %s ended by %r",
                                     self.msgid, e, exc_info=True)
            cls = type(e)
            self.reply = (comm.Message.ERR.value,
                          "{}.{}".format(cls.__module__, cls.__name__),
                          e.args, traceback.format_exc())
        return self.answer

    def answer(self):
        self.daemon._create_done_callback(self.msgid)(self)

    def result(self):
        if self.error is not None:
            raise self.error
        return self.reply


_setup_lock = threading.Lock()
_setup_info = None

# The ``privsep.identity()`` the client told at its handshake; None
# before it (a client from before the handshake never tells).
_client = None


# The daemon's file creation mask.  oslo.privsep's Daemon.run() sets
# umask 0 after importing this module and before its first call: every
# file the daemon and its children (iscsiadm, multipath, nvme, rbd) made
# would be writable by anyone, os-brick's external lock files
# (oslo.concurrency, in lock_path) included, which any local user could
# then lockf to hang every iSCSI/FC/NVMe attach and detach.
UMASK = 0o022


def _setup():
    global _setup_info
    with _setup_lock:
        if (_client or {}).get("protocol") != privsep.PROTOCOL:
            # Its arguments may mean something else here: nothing runs.
            raise privsep.RemoteError("failed", _refusal(_client))
        if _setup_info is not None:
            return dict(_setup_info)
        # First, before anything makes a file or a child: every call
        # runs this (hello, _operation) and waits for it under the lock.
        os.umask(UMASK)
        # Log lines go to the service over the channel; mask them here
        # too and tag them with the caller's flow id.
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _ThreadFlowFilter)
                       for f in handler.filters):
                handler.filters.insert(0, _ThreadFlowFilter())
            log.install_filter(handler)
        if _fallback is not None:
            # In the service's log at WARNING (the channel carries it).
            LOG.warning("%s", _fallback)

        from oslo_service import backend
        try:
            backend.init_backend(backend.BackendType.THREADING)
        except backend.exceptions.BackendAlreadySelected:
            pass

        try:
            from oslo_concurrency import lockutils  # noqa: F401 (opts)
            import os_brick
            import os_brick.privileged
            from os_brick.initiator import connector  # noqa: F401
        except ImportError as e:
            raise privsep.RemoteError(
                "unsupported", "os-brick cannot be imported: {}".format(e))

        for ctx in (os_brick.privileged.default,
                    os_brick.privileged.brick_privsep_hide_output):
            ctx.set_client_mode(False)
        _install_cancellation()
        os_brick.setup(oslo_cfg.CONF)

        version = _version("os-brick")
        _setup_info = {
            "os_brick": version,
            "lock_path": oslo_cfg.CONF.oslo_concurrency.lock_path,
        }
        LOG.info("privsep daemon pid %s ready: os-brick %s, lock_path %s",
                 os.getpid(), version, _setup_info["lock_path"])
        return dict(_setup_info)


def _refusal(client):
    """Why a call of ``client`` (its identity, None before a handshake)
    is not served."""
    return ("privsep daemon {} speaks {}, its client {}: the package's "
            "files were replaced (an upgrade or a downgrade) while the "
            "client ran, and this daemon, started by it since, runs the "
            "ones now on disk; no call is served: restart the client "
            "(managedvolume-agent, vdsmd)".format(
                os.getpid(), privsep.describe(privsep.identity()),
                privsep.describe(client)))


class _operation:
    """Run one privileged operation under its deadline.

    Sets the flow id for the daemon's log lines, watches the deadline
    (``_Call``), and turns every exception into a RemoteError with a
    masked message: "timeout" for a call cancelled at its deadline,
    whatever it did.
    """

    def __init__(self, name, deadline, flow_id, connection_info):
        self.name = name
        self.deadline = deadline
        self.flow_id = flow_id
        self.connection_info = connection_info

    def __enter__(self):
        self._call = _Call(self.name, self.flow_id, self.connection_info)
        _set_thread_flow(self.flow_id, self._call)
        self._flow = log.flow(self.flow_id)
        self._flow.__enter__()
        try:
            _setup()
            if time.monotonic() >= self.deadline:
                # Taken from the pool (or set up) too late: nothing of
                # it runs, not even what needs no sleep nor command.
                LOG.error("%s not started: its deadline had passed",
                          self.name)
                raise privsep.RemoteError(
                    "timeout", "not started: its deadline had passed")
        except BaseException:
            self._flow.__exit__(None, None, None)
            raise
        self._call.arm(self.deadline)

    def __exit__(self, t, e, tb):
        cancelled = self._call.end()
        try:
            if isinstance(e, _EarlierRunning):
                # Nothing was done: said as such, whether it waited up
                # to its deadline or answered at once.
                LOG.error("%s not run: %s", self.name, e)
                raise privsep.RemoteError("still_running", str(e)) from None
            if cancelled:
                # It failed, whatever it returned or raised: the caller
                # was (or is about to be) told so, and undoes it.
                if e is None:
                    how = "returned after its deadline"
                elif isinstance(e, _Cancelled):
                    how = "stopped at its next sleep or command"
                else:
                    how = "failed after its deadline: " + _scrub(
                        "{}: {}".format(t.__name__, e), self.connection_info)
                # Its own thread is out; the threads os-brick started
                # for it (a multipath connect's portal logins) stop at
                # their next sleep or command, and get the time a
                # command of its own would have had to end.
                left = self._call.threads and self._call.wait_threads(
                    self.deadline + privsep.THREADS_GRACE)
                if left:
                    how += ("; {} thread(s) it started still run inside a "
                            "command (a login may still complete: a "
                            "disconnect of this connection waits for "
                            "them)".format(left))
                LOG.error("%s cancelled at its deadline: %s", self.name, how)
                if left:
                    raise privsep.RemoteError(
                        "timeout", how, privsep.THREADS_LEFT) from None
                raise privsep.RemoteError("timeout", how) from None
            if e is None or isinstance(e, privsep.RemoteError):
                return False
            if isinstance(e, errors.UnknownAdapter):
                raise privsep.RemoteError(
                    "unknown_adapter", e.adapter, e.installed) from None
            if isinstance(e, errors.InvalidParams):
                LOG.error("%s refused: %s", self.name, e)
                raise privsep.RemoteError(
                    "invalid", e.name, e.reason) from None
            message = _scrub("{}: {}".format(t.__name__, e),
                             self.connection_info)
            LOG.error("%s failed: %s", self.name, message)
            raise privsep.RemoteError("failed", message) from None
        finally:
            self._flow.__exit__(None, None, None)


def _set_thread_flow(flow_id, call=None):
    """Remember ``flow_id`` as this thread's, for lines logged outside the
    call's context (see _ThreadFlowFilter), and ``call`` (a ``_Call``) as
    the call this thread, and the threads os-brick spawns from it, run
    for (``_thread_call``).

    Kept in oslo.context's per-thread request context because
    os_brick.executor.Thread hands that one to the threads os-brick
    spawns.  Not cleared when the call ends: oslo.privsep logs its reply
    in this thread after the entrypoint returned, and a thread os-brick
    spawned for a cancelled call must stay cancelled.
    """
    try:
        from oslo_context import context as oslo_context
    except ImportError:
        return
    flow_id = flow_id or "-"
    # A context of its own per call (threads os-brick spawned for an
    # earlier call keep theirs); its request id given, so that no uuid4
    # is drawn (a getrandom call) for an id nothing reads.
    ctx = oslo_context.RequestContext(overwrite=True,
                                      request_id="req-" + flow_id)
    ctx.managedvolume_flow = flow_id
    ctx.managedvolume_call = call


def _thread_flow():
    try:
        from oslo_context import context as oslo_context
    except ImportError:
        return "-"
    return getattr(oslo_context.get_current(), "managedvolume_flow", "-")


def _thread_call():
    """The ``_Call`` this thread runs for, or None."""
    try:
        from oslo_context import context as oslo_context
    except ImportError:
        return None
    return getattr(oslo_context.get_current(), "managedvolume_call", None)


class _ThreadFlowFilter(logging.Filter):
    """Sets ``flow_id`` of a record logged outside ``log.flow()`` from its
    thread's last call (runs before log.ContextFilter)."""

    def filter(self, record):
        if not hasattr(record, "flow_id"):
            flow = log.current_flow()
            record.flow_id = flow if flow != "-" else _thread_flow()
        return True


class _EarlierRunning(Exception):
    """A disconnect not run: what an earlier connect of its connection
    started still runs (``_wait_earlier``)."""


class _Cancelled(BaseException):
    """Raised in a cancelled call's threads at their next sleep or
    command (see the module docstring, "Deadlines").  A BaseException so
    that os-brick's ``except Exception`` neither retries nor runs a
    cleanup (its commands would be refused anyway) on it."""

    def __init__(self, operation):
        super().__init__(operation)
        self.operation = operation


class _Call:
    """One entrypoint call under its deadline (module docstring,
    "Deadlines"): whether it was cancelled, whether it ended, how many
    commands its threads run and how many threads os-brick started for
    it still run."""

    __slots__ = ("name", "flow_id", "cancelled", "ended", "commands",
                 "token", "threads", "connection_info", "key", "deadline",
                 "since")

    def __init__(self, name, flow_id, connection_info=None):
        self.name = name
        self.flow_id = flow_id
        self.cancelled = threading.Event()
        self.ended = False
        self.commands = 0       # running, in any of its threads
        self.token = None       # the watchdog's, for what comes next
        self.threads = 0        # os_brick.executor.Thread started, running
        self.connection_info = connection_info
        self.key = None         # _connection_key, once it is lingering
        self.deadline = None
        self.since = {}         # thread ident: when its command started

    def arm(self, deadline):
        with _calls_lock:
            self.deadline = deadline
            self.token = _watchdog.arm(deadline, _expire, self)

    def end(self):
        """The entrypoint returned: stop watching it; whether it was
        cancelled.  Threads os-brick started for it that still run are
        cancelled too (they stop at their next sleep or command: what
        they would do is for a call that is over), and the call is
        lingering until they end (``_wait_earlier``)."""
        with _calls_lock:
            self.ended = True
            _watchdog.disarm(self.token)
            cancelled = self.cancelled.is_set()
            if self.threads:
                self.cancelled.set()
                self.key = _connection_key(self.connection_info)
                _lingering.setdefault(self.key, set()).add(self)
            return cancelled

    def wait_threads(self, until):
        """Wait until the threads os-brick started for this call ended, at
        most until ``until`` (time.monotonic()); how many still run."""
        with _calls_lock:
            _calls_changed.wait_for(
                lambda: not self.threads,
                max(0.0, until - time.monotonic()))
            return self.threads

    def thread_started(self):
        with _calls_lock:
            self.threads += 1

    def thread_finished(self):
        with _calls_lock:
            self.threads -= 1
            if not self.threads and self.ended:
                calls = _lingering.get(self.key)
                if calls is not None:
                    calls.discard(self)
                    if not calls:
                        del _lingering[self.key]
                _calls_changed.notify_all()

    def command_started(self):
        with _calls_lock:
            self.commands += 1
            self.since[threading.get_ident()] = time.monotonic()

    def command_finished(self):
        with _calls_lock:
            self.commands -= 1
            self.since.pop(threading.get_ident(), None)


_calls_lock = threading.Lock()
# Notified when a call is cancelled and when the last thread os-brick
# started for an ended call ends.
_calls_changed = threading.Condition(_calls_lock)

# Ended calls whose threads still run, by their connection's key: a
# disconnect of that connection waits for them (``_wait_earlier``).
_lingering = {}

# Per thread: whether it is inside a command (between its Popen and the
# end of its communicate), where a sleep must not raise.
_in_command = threading.local()


def _connection_key(connection_info):
    """What tells two calls for the same connection (its
    connection_info, as the service records it), or None."""
    if connection_info is None:
        return None
    return json.dumps(connection_info, sort_keys=True, default=str)


def _wait_earlier(connection_info, processes=True):
    """Wait until nothing an earlier connect of ``connection_info``
    started still runs (module docstring, "Deadlines"), so that this
    disconnect sees what it made: a multipath iSCSI connect cut at its
    deadline may have left a portal thread inside ``iscsiadm --login``,
    a connect cut by the daemon's death its ``rbd map``, whose session
    or map would come up after a disconnect that found nothing to end.
    What is looked for: the threads os-brick started for an earlier
    call of this daemon (``_lingering``), and, with ``processes`` (the
    service's record says a connect of it may not have completed:
    store.py, ``connecting``), the host's processes running such a
    command of the connection that an earlier daemon started
    (``procs``, the transport's ``connect_command``; not this daemon's
    children): those outlive a daemon killed at a deadline or stopped
    with the agent.  An earlier daemon's login of a target another
    volume shares (same IQN) is waited for too: its argv does not tell
    the volume; it ends on its own (iscsid's login retries).  A record
    whose connect completed does not look: on an array with one target
    for every LUN, a login another volume's cut connect left would
    hold off the detach of every volume there (review-safety10 M-2).

    Raises ``_EarlierRunning`` (the disconnect is not run, its caller
    keeps the record) when they still run at this call's deadline, or
    at once when each of them has already run longer than this call
    could wait (stuck: a command in D state, a login retried for
    minutes; waiting for the deadline again would only hold the
    volume's lock).  One WARNING per call says what it waits for and for
    how long it has run."""
    call = _thread_call()
    match = None
    if processes:
        transport = transports.get(
            connection_info.get("driver_volume_type"))
        match = transport.connect_command(connection_info)
    warned = False
    while True:
        running = _earlier(connection_info, match)
        if not running:
            if warned:
                LOG.info("What an earlier connect of this connection ran "
                         "has ended: disconnecting")
            return
        what = "; ".join(d for d, _ in running)
        if not warned:
            # Judged once, at the first look: what has run longer than
            # this call could wait is stuck (logged once: the error).
            left = call.deadline - time.monotonic()
            if min(age for _, age in running) > left:
                raise _EarlierRunning(
                    "an earlier connect of this connection still runs "
                    "({}), longer than this disconnect could wait ({:.0f} "
                    "s): not disconnected, the volume stays recorded; "
                    "detach again once it ended".format(
                        what, max(0.0, left)))
            LOG.warning("Waiting for what an earlier connect of this "
                        "connection still runs before disconnecting: %s",
                        what)
            warned = True
        if call.cancelled.wait(_EARLIER_POLL):
            raise _EarlierRunning(
                "an earlier connect of this connection still runs ({}) "
                "at this disconnect's deadline: not disconnected, the "
                "volume stays recorded; detach again once it "
                "ended".format(what))


# How often a disconnect looks again at what an earlier connect runs.
_EARLIER_POLL = 0.25


def _earlier(connection_info, match):
    """``[(description, age)]`` of what an earlier connect of the
    connection (``connection_info``, ``match``: see ``_wait_earlier``)
    still runs: this daemon's lingering threads (age: how long the
    oldest has been inside its command, 0 when none is), the host's
    processes."""
    found = []
    if _lingering:          # under no lock: ours, if any, is there now
        # Its key only then: a JSON dump, 4-9 us at every disconnect.
        key = _connection_key(connection_info)
        now = time.monotonic()
        with _calls_lock:
            for c in _lingering.get(key, ()):
                age = now - min(c.since.values()) if c.since else 0.0
                found.append(("{} thread(s) of an earlier {} of this "
                              "daemon, inside a command for {:.0f} s"
                              .format(c.threads, c.name, age), age))
    if match is not None:
        # This daemon's own children are its calls' (those of an earlier
        # connect of this connection: its lingering threads, above); a
        # login another volume's connect runs now on a shared target
        # (same IQN) is not this volume's and is not waited for.  A
        # daemon that is gone left its children to init (or the agent,
        # a subreaper): those are waited for, whoever's they were.
        for pid, name, age in procs.matching(match, parent=os.getpid()):
            found.append(("{} pid {}, running for {:.0f} s (left by an "
                          "earlier privsep daemon)".format(name, pid, age),
                          age))
    return found


def _expire(call):
    """The watchdog at ``call``'s deadline: cancel it; the daemon ends
    privsep.END_GRACE seconds later unless the call returned by then."""
    with _calls_lock:
        if call.ended:
            return
        call.cancelled.set()
        _calls_changed.notify_all()
        commands = call.commands
        call.token = _watchdog.arm(time.monotonic() + privsep.END_GRACE,
                                   _die, call)
    with log.flow(call.flow_id):
        LOG.error("%s exceeded its deadline: cancelled (its sleeps, lock "
                  "waits and new commands raise; %d command(s) running are "
                  "left to finish); privsep daemon %s ends in %.1f s unless "
                  "it returns", call.name, commands, os.getpid(),
                  privsep.END_GRACE)


def _die(call):
    # The cancelled call did not return: it is stuck in a command or in
    # a wait that is not a sleep.  It must stop, or it could complete
    # behind its caller's back (a leaked device); there is no way to
    # stop one thread: end the process.  Concurrent calls fail with
    # HelperFailed (the idempotent ones are run again), the next call
    # starts a fresh daemon.  Checked and killed under the lock, so that
    # a call returning meanwhile is either reported or cut, never
    # answered and then cut (its caller would blame no one).  Logged
    # before, outside the lock: the line is a write on the channel to
    # the client, and every call's end and command start take that lock.
    with _calls_lock:
        if call.ended:
            return
    try:
        with log.flow(call.flow_id):
            LOG.error("%s did not return %.1f s after its deadline (stuck "
                      "in a command or another wait that cannot be "
                      "cancelled): killing privsep daemon %s unless it "
                      "returns now", call.name, privsep.END_GRACE,
                      os.getpid())
    finally:
        with _calls_lock:
            if not call.ended:
                os.kill(os.getpid(), signal.SIGKILL)


def _fire(action, *args):
    # The kill must happen whatever logging does: an error here would end
    # the one watchdog thread, and no later deadline would be kept.
    try:
        action(*args)
    except BaseException:
        os.kill(os.getpid(), signal.SIGKILL)
        raise


_watchdog = watchdog.Watchdog(_fire)


def _install_cancellation():
    """Make sleeps, lock waits and new commands raise in cancelled calls'
    threads, and count the threads os-brick starts for a call (module
    docstring, "Deadlines"); once, after os_brick.utils was imported and
    before any connector ran."""
    import os_brick.utils
    from oslo_concurrency import processutils

    sleep = os_brick.utils._time_sleep
    if not getattr(sleep, "managedvolume", False):
        def cancellable_sleep(secs):
            call = _thread_call()
            if call is None or secs < 0:
                return sleep(secs)
            if call.cancelled.wait(secs) and not getattr(
                    _in_command, "running", False):
                raise _Cancelled(call.name)
            # Else slept, or cut short inside a command: its end is
            # waited for (communicate), and the next sleep raises.
            return None

        cancellable_sleep.managedvolume = True
        os_brick.utils._time_sleep = cancellable_sleep

    execute = processutils.execute
    if not getattr(execute, "managedvolume", False):
        def cancellable_execute(*cmd, **kwargs):
            call = _thread_call()
            if call is None:
                return execute(*cmd, **kwargs)
            if call.cancelled.is_set():
                raise _Cancelled(call.name)
            on_execute = kwargs.pop("on_execute", None)
            on_completion = kwargs.pop("on_completion", None)
            running = []

            def started(proc):
                call.command_started()
                running.append(proc)
                _in_command.running = True
                if on_execute is not None:
                    on_execute(proc)

            def finished(proc):
                _in_command.running = False
                running.remove(proc)
                call.command_finished()
                if on_completion is not None:
                    on_completion(proc)

            try:
                return execute(*cmd, on_execute=started,
                               on_completion=finished, **kwargs)
            finally:
                if running:     # on_execute raised: no on_completion
                    _in_command.running = False
                    running.clear()
                    call.command_finished()

        cancellable_execute.managedvolume = True
        processutils.execute = cancellable_execute

    from os_brick import executor
    thread_class = executor.Thread
    if not getattr(thread_class.start, "managedvolume", False):
        start, run = thread_class.start, thread_class.run

        # Counted from start(), not run(): a thread started just before
        # its call ends has not run yet, and must count.
        def tracked_start(self):
            call = getattr(self.__context__, "managedvolume_call", None)
            self._managedvolume_call = call
            if call is None:
                return start(self)
            call.thread_started()
            try:
                return start(self)
            except BaseException:
                call.thread_finished()
                raise

        def tracked_run(self):
            try:
                return run(self)
            finally:
                call = getattr(self, "_managedvolume_call", None)
                if call is not None:
                    call.thread_finished()

        tracked_start.managedvolume = True
        thread_class.start = tracked_start
        thread_class.run = tracked_run

    from oslo_concurrency import lockutils
    if not isinstance(lockutils._semaphores, _CancellableSemaphores):
        # Before any connector ran: no lock is held yet.
        lockutils._semaphores = _CancellableSemaphores()

    hook = threading.excepthook
    if not getattr(hook, "managedvolume", False):
        def excepthook(args):
            # A thread os-brick spawned for a cancelled call (a
            # per-portal login) stopped as meant: one line, no traceback.
            if isinstance(args.exc_value, _Cancelled):
                LOG.warning("thread %s of the cancelled %s stopped at its "
                            "next sleep or command",
                            getattr(args.thread, "name", "?"),
                            args.exc_value.operation)
                return
            hook(args)

        excepthook.managedvolume = True
        threading.excepthook = excepthook


class _CancellableSemaphore:
    """oslo.concurrency's in-process lock (what ``lockutils.lock`` takes
    before the lock file): a wait for it raises ``_Cancelled`` once the
    waiting call is cancelled, as a sleep does.  os-brick takes its
    per-host ``connect_volume`` lock (iSCSI, FC, NVMe-oF connect and
    disconnect) and its per-portal login lock through it: a call queued
    behind a slow holder fails at its deadline instead of ending the
    daemon END_GRACE later.

    Waiters get it in the order they came, as with the
    ``threading.Semaphore`` it replaces (its Condition wakes waiters
    first come, first served): in a mass start the connects queued on
    the per-host lock run in arrival order, so none waits past its
    deadline while later ones go first (a wait polled without a queue
    let 37 of 200 simulated attaches fail with 931;
    review-privsepfix9 M-A).  A cancelled waiter leaves the queue and
    the next one moves up."""

    # How often a waiting call looks at its cancellation (its 931 comes
    # at most this late; a waiter of no call is only woken by release).
    POLL = 0.25

    def __init__(self, value=1):
        self._cond = threading.Condition(threading.Lock())
        self._value = value
        self._queue = collections.deque()

    def acquire(self, blocking=True, timeout=None):
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        call = _thread_call() if blocking else None
        with self._cond:
            if call is not None and call.cancelled.is_set():
                raise _Cancelled(call.name)
            if self._value > 0 and not self._queue:
                self._value -= 1
                return True
            if not blocking:
                return False
            until = None if timeout is None else time.monotonic() + timeout
            me = object()
            self._queue.append(me)
            try:
                while True:
                    if call is not None and call.cancelled.is_set():
                        raise _Cancelled(call.name)
                    if self._value > 0 and self._queue[0] is me:
                        self._value -= 1
                        return True
                    wait = self.POLL if call is not None else None
                    if until is not None:
                        left = until - time.monotonic()
                        if left <= 0:
                            return False
                        wait = left if wait is None else min(wait, left)
                    self._cond.wait(wait)
            finally:
                self._queue.remove(me)
                # The next in line (or all, on a cancel) looks again.
                self._cond.notify_all()

    def release(self, n=1):
        if n < 1:
            raise ValueError("n must be one or more")
        with self._cond:
            self._value += n
            self._cond.notify_all()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class _CancellableSemaphores:
    """In place of ``lockutils._semaphores`` (a ``lockutils.Semaphores``,
    which ``lockutils.internal_lock`` asks for a lock by name): the same,
    making ``_CancellableSemaphore``s."""

    def __init__(self):
        self._semaphores = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, name):
        with self._lock:
            sem = self._semaphores.get(name)
            if sem is None:
                sem = _CancellableSemaphore()
                self._semaphores[name] = sem
            return sem

    def __len__(self):
        return len(self._semaphores)


@functools.lru_cache(maxsize=None)
def _conf():
    """Our section of the daemon's configuration, read once: the daemon
    reads its file when it starts and never again, and an option read
    through oslo.config costs 2-6 us (two per call before)."""
    section = oslo_cfg.CONF[privsepconfig.SECTION]
    return types.SimpleNamespace(
        **{opt.dest: section[opt.dest] for opt in OPTS})


# os-brick's connectors of the transports that say they may be reused
# (``Transport.reuse_connector``), by protocol, made at first use: the
# daemon's configuration (root_helper) does not change while it runs.
_connectors = {}


def _connector(connection_info):
    protocol = connection_info.get("driver_volume_type")
    if not protocol:
        raise privsep.RemoteError(
            "failed", "connection_info has no driver_volume_type")
    conf = _conf()
    transport = transports.get(protocol)
    adapter = connection_info.get("adapter")
    if adapter:
        # The service checked the name already (service.attach_volume);
        # this side is root and takes no name on its caller's word: it
        # loads only a plug-in installed in its own environment (which
        # sudo may make differ from the caller's), 934 otherwise.
        factory = adapters.load(adapter)
        return factory(conf.root_helper, protocol=protocol,
                       **_connector_kwargs(transport))

    override = conf.connector_override
    if override:
        module = importlib.import_module(override)
        conn = module.get_connector(protocol, connection_info,
                                    conf.root_helper,
                                    **_connector_kwargs(transport))
        if conn is not None:
            return conn

    conn = _connectors.get(protocol)
    if conn is None:
        from os_brick.initiator import connector
        conn = connector.InitiatorConnector.factory(
            protocol, conf.root_helper, **_connector_kwargs(transport))
        if transport.reuse_connector:
            # Two first calls at once may both make one: either serves.
            conn = _connectors.setdefault(protocol, conn)
    return conn


def _connector_kwargs(transport):
    kwargs = dict(CONNECTOR_KWARGS)
    kwargs.update(transport.connector_kwargs)
    return kwargs


def _check_rbd_conf(connection_info, attachment):
    """Refuse an RBD disconnect whose attachment names a ceph conf that
    os-brick could not have written (``rbd.conf_problem``): os-brick
    hands it to ``rbd`` as root (``--conf``) and then deletes it, so a
    caller of this daemon could otherwise have root read and delete any
    file.  A conf os-brick wrote always passes, wherever its temp dir
    was; one that is gone passes too (nothing to read or delete; its
    record must stay clearable)."""
    if connection_info.get("driver_volume_type") != "rbd":
        return
    conf = attachment.get("conf") if isinstance(attachment, dict) else None
    if conf is None:
        return
    problem = rbd.conf_problem(conf)
    if problem:
        raise errors.InvalidParams(
            name="attachment.conf", reason="{!r}: {}".format(conf, problem))


def _data(connection_info, attachment=None):
    return transports.get(
        connection_info.get("driver_volume_type")).connector_data(
            connection_info, attachment)


def _scrub(text, connection_info):
    """Mask secret shapes, and the secret values themselves wherever they
    appear (a connector may quote a password without its key)."""
    text = mask.mask_text(text)
    # Longest first: a secret that starts with a shorter one would leave
    # its tail behind ("abc123" before "abc123XYZ": "********XYZ").
    for value in sorted(set(_secret_values(connection_info)), key=len,
                        reverse=True):
        text = text.replace(value, mask.MASK)
    return text


def _secret_values(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if (mask.is_secret_key(k) and isinstance(v, str)
                    and len(v) >= 3):
                yield v
            else:
                yield from _secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _secret_values(v)


# Last, so that everything it uses is defined; privsep-helper imports this
# module before it connects to the client.
check_start()
