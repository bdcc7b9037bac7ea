"""A small ovirt-engine for the flow tests: real shim, real hosts.

ovirt-engine's Managed Block Storage flows are several calls, in a fixed
order, across the engine's cinderlib client (our shim) and several hosts.
This module replays those orders against real parts (no mock of ours):

- ``Shim``: ``managedvolume-cinderlib-client``, one process per operation
  as ManagedBlockExecutor runs it (through the suite's warm service), on
  the embedded FileDriver with real loop devices, on SQLite or PostgreSQL;
- ``Host``: a real ``managedvolume-agent`` process (tests.agent_process_test
  .AgentProcess) with its own state dir, port, boot-id file, privsep
  daemon and certificate, and its own host name: each agent runs in a UTS
  namespace, so os-brick's connector_info says ``host-a``, ``host-b``...
  All certificates (hosts' and the engine's) come from one CA, as oVirt's
  engine CA signs every host's;
- ``Engine``: what ovirt-engine does, step by step.  Each method names the
  ovirt-engine class whose order it replays (read in oVirt/ovirt-engine,
  backend/manager/modules/bll):

  ManagedBlockStorageCommandUtil.attachManagedBlockStorageDisks /
  saveDevices: per disk, ConnectManagedBlockStorageDeviceCommand
  (``connect_volume`` with the host's connector_info), the host's
  ``ManagedVolume.attach_volume`` (AttachManagedBlockStorageVolumeVDSCommand),
  then the VM device's spec params record the host (ATTACHED_VDS_ID, or
  DEST_VDS_ID during a live migration), then
  SaveManagedBlockStorageDiskDeviceCommand (``save_device``).  The disks
  are walked with ``allMatch``: the first failure stops the walk.

  disconnectManagedBlockStorageDisk: the host is DEST_VDS_ID when removing
  the destination (a failed migration), else ATTACHED_VDS_ID; no host
  recorded: nothing to do.  DisconnectManagedBlockStorageDeviceCommand
  first detaches on that host (DetachManagedBlockStorageVolumeVDSCommand);
  only when that succeeded it runs ``disconnect_volume`` with the disk id
  alone (never a host); only when both succeeded are the spec params
  saved (ATTACHED := DEST after a completed migration, DEST removed).

  RunVmCommand.runVm: attach the disks (all of them, plugged or not:
  VmHandler.updateDisksFromDb loads DiskDao.getAllForVm), then create
  the VM.  A failed attach (an EngineException) reruns the command on
  another host (RunVmCommandBase.rerun -> reexecuteCommand, no
  ProcessDownVmCommand between: the spec params the first host got are
  overwritten by the next host's); only when no host is left
  (runningFailed -> processVmOnDown) does ProcessDownVmCommand
  disconnect the disks.  A VDS_NETWORK_ERROR (the host's vdsm died
  under the call) neither reruns nor disconnects: the VM is set Unknown
  on that host (setVmUnknown), and once the host answers again and does
  not report it, VmAnalyzer.proceedDisappearedVm sets it Down, which
  runs ProcessDownVmCommand.
  ProcessDownVmCommand (a VM went down: stopped, crashed, or its host
  fenced): disconnect the disks.
  HotPlugDiskToVmCommand (a running VM): AbstractDiskVmCommand
  .performPlugCommand runs saveDevices on the VM's host (its false
  return ignored; a failed attach_volume throws and ends the command),
  then vdsm's VM.hotplugDisk; when that fails nothing is undone: the
  disk stays attached, ATTACHED_VDS_ID set, the device unplugged.
  HotUnPlugDiskFromVmCommand: VM.hotunplugDisk, the device unplugged,
  then disconnectManagedBlockStorageDisk (its result ignored).  Both
  are refused while the VM migrates (isVmStatusIn Up, Paused, Down).
  RemoveDiskCommand: refused while a VM that is not down has the disk
  plugged (validateAllVmsForDiskAreDown), an unplugged one is removed
  (RemoveManagedBlockStorageDiskCommand: ``delete_volume``; a failure
  keeps the disk).
  MigrateVmCommand.perform: attach the disks to the destination
  (isLiveMigration), then migrate; any failure -> runningFailed, which
  disconnects the disks with removeDest.  reportCompleted (the migration
  succeeded): disconnect the disks (the source).
  MaintenanceNumberOfVdssCommand: the host PreparingForMaintenance first
  (no RunVm nor migration is scheduled to it from then on:
  SchedulingManager.fetchHosts takes Up hosts only) and the migrations
  to it cancelled (cancelIncomingMigrations: each reruns elsewhere, as
  a migration that failed after it started), then
  MaintenanceVdsCommand -> MigrateMultipleVmsCommand: MigrateVmToServer
  for each VM running on the host (run_on_vds) in turn, each
  reportCompleted on its own.  A VM whose RunVm was scheduled there
  before and lands later stays, until the monitoring's retry
  (HostPreparingForMaintenanceIdleTime: MaintenanceNumberOfVdss again)
  migrates it too.
  MigrateVmCommand.rerun (the migration failed after it started and the
  VM runs on the source): perform again to another host, no
  runningFailed between; DEST_VDS_ID is overwritten.
  ExtendManagedBlockStorageDiskSizeCommand, CreateManagedBlockStorage-
  DiskSnapshotCommand, CloneSingleManagedBlockDiskCommand: one shim call.
  TryBackToManagedBlockSnapshotCommand (a preview): a volume made from
  the snapshot becomes the disk's active image, which every later attach
  names; RestoreAllManagedBlockSnapshotsCommand UNDO deletes it.
  CopyManagedBlockDiskCommand (a disk copy): attach the new disk and the
  source on one host with no VM (attachManagedBlockStorageDisk: no
  save_device, nothing records the host), copy, detach both
  (disconnectManagedBlockStorageDeviceFromHost); on failure the same
  detaches and the new disk's removal.  With one side an image domain,
  only the Managed Block Storage side is made, attached and detached.
  CreateManagedBlockStorageDiskSnapshotCommand.endWithFailure (the VM's
  snapshot failed later): remove_snapshot.  RestoreAllManagedBlock-
  SnapshotsCommand commit: remove_snapshot of the snapshot taken right
  after the previewed one.  RemoveVmCommand ->
  RemoveAllManagedBlockStorageDisksCommand: delete_volume of each disk,
  no snapshot removed first.  AddVmTemplateCommand
  (CreateAllTemplateDisksCommand), AddVmCommand from a template and
  CloneVmCommand: CloneSingleManagedBlockDiskCommand (clone_volume) of
  each disk, the VM down; RemoveVmTemplateCommand: refused while a VM
  is based on the template, else delete_volume of its disks.
  RestartVdsVmsOperation.restartVms (a fenced host): each VM down
  (ProcessDownVmCommand), the HA ones to HaAutoStartVmsRunner, which
  runs them on another host one after the other, each RunVmCommand
  scheduled among the hosts Up when it starts; with none, it fails
  validation and the runner tries again later.

``check(engine)`` is the one check every flow ends with: each host's
journal (``volumes_info``), managed_path links, udev rules, the loop
devices and the shim's connections agree with what the engine believes,
and nothing else exists.  docs/flows.md draws each flow.
"""

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import threading
import time
import uuid

from vdsm_managedvolume import faults
from vdsm_managedvolume import pki
from vdsm_managedvolume import stompclient

from . import fakebrick
from . import leftovers
from .agent_process_test import AgentProcess
from .engine_fixtures import loop_devices_under

FILE_DRIVER = "vdsm_managedvolume.engine.filedriver.FileDriver"
EXPORTING_DRIVER = "tests.flowexports.ExportingDriver"

# {(driver, command, number of args, with a host, connected): the names
# of the steps the command takes} (``Engine.steps``).
_STEPS = {}


class StepFailed(Exception):
    """A call of a flow failed, the way the engine sees it.

    ``host``: the host whose verb failed (a VDS command: the engine's
    EngineException), None for a shim command; ``network``: that host's
    vdsm did not answer (the connection dropped or never came up: the
    engine's VDS_NETWORK_ERROR) rather than answering with an error."""

    def __init__(self, message, network=False, host=None, done=False,
                 cut=False, killed=False, left=frozenset()):
        super().__init__(message)
        self.network = network
        self.host = host
        # The shim's process was SIGKILLed in the middle (``kill_next``);
        # ``left``: the (volume, host) connections of its volume the
        # backend holds after it.
        self.killed = killed
        self.left = left
        # The host's vdsm died under the call (the connection closed
        # after the request went out): what it did is its journal's to
        # finish or undo when it starts again.
        self.cut = cut
        # The host did it all the same (the engine gave up waiting).
        self.done = done


# Hosts

class Cluster:
    """The CA and the engine's certificate, shared by all hosts."""

    def __init__(self, base):
        self.base = str(base)
        self.pki_dir = os.path.join(self.base, "engine-pki")
        os.makedirs(self.pki_dir, mode=0o700, exist_ok=True)
        self.ca_key, self.ca_cert = pki.create_ca("flows engine CA")
        self.ca_file = os.path.join(self.pki_dir, "ca.pem")
        pki.write_cert(self.ca_file, self.ca_cert)
        key, cert = pki.create_cert(self.ca_key, self.ca_cert, "engine",
                                    server=False)
        self.cert_file = os.path.join(self.pki_dir, "engine.cer")
        self.key_file = os.path.join(self.pki_dir, "engine_id_rsa")
        pki.write_key(self.key_file, key)
        pki.write_cert(self.cert_file, cert)
        self.hosts = {}

    def context(self):
        return pki.client_context(self.ca_file, self.cert_file,
                                  self.key_file)

    def add_host(self, name):
        host = Host(self, name, os.path.join(self.base, name))
        self.hosts[name] = host
        return host

    def stop(self):
        for host in self.hosts.values():
            host.stop()


class Host:
    """A hypervisor: one managedvolume-agent, its daemon, its boot id."""

    def __init__(self, cluster, name, base):
        self.cluster = cluster
        self.name = name
        self.base = base
        os.makedirs(base, exist_ok=True)
        self.boot_id_file = os.path.join(base, "boot_id")
        self.new_boot_id()
        # The host's PKI: its own key and certificate, the cluster's CA
        # (the agent issues the rest from the CA key at its first start).
        pki_dir = os.path.join(base, "state", "pki")
        os.makedirs(pki_dir, mode=0o700, exist_ok=True)
        pki.write_cert(os.path.join(pki_dir, pki.CA_CERT), cluster.ca_cert)
        pki.write_key(os.path.join(pki_dir, pki.CA_KEY), cluster.ca_key)
        self.agent = AgentProcess(
            base, env={"MANAGEDVOLUME_BOOT_ID_FILE": self.boot_id_file},
            argv_prefix=["unshare", "--uts", "sh", "-c",
                         'hostname "$0" && exec "$@"', name])
        self.connector = None
        self.up = False

    # Life cycle

    def start(self):
        self.agent.start()
        self.up = True
        self.connector = self.call("Host.getCapabilities")["connector_info"]
        assert self.connector["host"] == self.name, self.connector
        return self

    def stop(self):
        if self.up:
            self.agent.stop()
            self.up = False

    def restart(self):
        """systemctl restart (vdsm restarted, an upgrade): the agent stops
        cleanly and starts again in the same boot."""
        self.stop()
        return self.start()

    def arm(self, point):
        """Restart the agent so that it SIGKILLs itself at the crash point
        ``point`` (``faults``: MANAGEDVOLUME_CRASH_AT) of its next call."""
        self.stop()
        self.agent.extra_env[faults.ENV] = point
        return self.start()

    def crashed(self):
        """The agent killed itself (``arm``): systemd kills what is left
        of the service (its privsep daemon) and restarts it, same boot."""
        self.agent.extra_env.pop(faults.ENV, None)
        self.agent.proc.wait(60)
        # The crash point kills the agent's back end (hop.py, the
        # service): its front end then exits 1, as if it had crashed.
        assert self.agent.proc.returncode == 1, self.agent.stderr()
        self.crash()
        return self.start()

    def crash(self):
        """kill -9 the agent and its privsep daemon (power cut, fence;
        ``start`` after it is a SIGKILLed service restarted in the same
        boot, ``boot`` a host powered on again)."""
        daemons = self.daemon_pids()
        if self.agent.proc.poll() is None:
            self.agent.proc.send_signal(signal.SIGKILL)
        for pid in daemons:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.agent.stop()
        _wait_gone(daemons)
        self.up = False

    def boot(self):
        """Power on after a crash: tmpfs is empty, the boot id is new.

        The journal and the udev rules (both on disk) stay, and so does the
        device: DRBD, FC LUNs, a local disk come back at boot (here: the
        loop device is the backend's, it never went away)."""
        assert not self.up
        shutil.rmtree(os.path.join(self.agent.state_dir, "run"),
                      ignore_errors=True)
        self.new_boot_id()
        return self.start()

    def new_boot_id(self):
        self.boot_id = str(uuid.uuid4())
        with open(self.boot_id_file, "w") as f:
            f.write(self.boot_id + "\n")

    def daemon_pids(self):
        return leftovers.privsep_daemons(
            self.agent.state_dir + "/run/managedvolume/privsep")

    # Calls, as the engine makes them (mutual TLS, the engine's cert)

    def call(self, method, params=None, flow_id=None):
        if not self.up:
            raise StepFailed("{} is not reachable".format(self.name),
                             network=True)
        with stompclient.Client("localhost", self.agent.port,
                                self.cluster.context(),
                                timeout=120) as client:
            return client.call(method, params or {}, flow_id=flow_id)

    def copy(self, source, target, size):
        """CopyData on this host: the first ``size`` bytes of the device
        at ``source`` to the one at ``target`` (qemu-img convert)."""
        with open(source, "rb") as src, open(target, "r+b") as dst:
            dst.write(src.read(size))
            dst.flush()
            os.fsync(dst.fileno())

    # What the host holds

    @property
    def address(self):
        return "127.0.0.1:{}".format(self.agent.port)

    def volumes_info(self):
        return self.call("ManagedVolume.volumes_info", {"vol_ids": []})

    def links(self):
        d = os.path.join(self.agent.state_dir, "run", "managedvolumes")
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return {}
        return {n: os.path.realpath(os.path.join(d, n)) for n in names}

    def connects(self, mark=0):
        """What reached this host's connector since ``mark`` (a length
        of the list): "connect-start <key>" and "connect <key>" lines of
        tests.fakebrick's SlowLocalConnector (``Engine.hold_attaches``),
        "connect-expired <key>" when a held attach stopped waiting
        (``fakebrick.WAIT_LIMIT``)."""
        return fakebrick.calls(self.agent.fakebrick_dir)[mark:]

    def started(self, verb, vol_id):
        """How many calls of ``verb`` on ``vol_id`` this agent began (its
        log's START lines: written before the call waits for the
        volume's lock)."""
        try:
            with open(self.agent.log_file) as f:
                text = f.read()
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines()
                   if "START {}(".format(verb) in line and vol_id in line)

    def rules(self):
        d = os.path.join(self.agent.state_dir, "udev", "rules.d")
        try:
            return sorted(n for n in os.listdir(d) if n.endswith(".rules"))
        except FileNotFoundError:
            return []


def _wait_gone(pids, timeout=30):
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists("/proc/{}".format(pid)):
            try:
                with open("/proc/{}/stat".format(pid)) as f:
                    if f.read().rpartition(")")[2].split()[0] == "Z":
                        break
            except OSError:
                break
            if time.monotonic() > deadline:
                raise AssertionError("process {} did not die".format(pid))
            time.sleep(0.02)


# The engine's side

class Backend:
    """A FileDriver backend with loop devices and its database."""

    def __init__(self, base, db_url, live_rows, driver=FILE_DRIVER):
        self.dir = os.path.join(str(base), "volumes")
        self.driver = {"volume_driver": driver,
                       "volume_backend_name": "flows",
                       "file_volume_dir": self.dir,
                       "file_volume_use_loop": True}
        self.db_url = db_url
        # live_rows(sql) -> rows (tuples) of the shim's database
        self.live_rows = live_rows
        # The driver keeps its exports and grants in exports.json
        # (tests.flowexports): ``check`` compares them too.
        self.exporting = driver == EXPORTING_DRIVER

    def connections(self):
        """{(volume_id, connector host)} of the live connections."""
        return set(self.connection_states())

    def connection_states(self):
        """{(volume_id, connector host): whether it is complete: its
        conn_info recorded, not marked connecting or ending (False: left
        unfinished by a killed command)}."""
        return {pair: done for pair, (done, _) in self.records().items()}

    def records(self):
        """{(volume_id, connector host): (complete, cinderlib's
        connection_info: {conn, connector, device?})} of the live
        connections (the last, when a pair has several: ``rows``)."""
        return {(v, h): (done, info) for v, h, done, info in self.rows()}

    def rows(self):
        """[(volume_id, connector host, complete, connection_info)]: one
        per live connection record, a pair's every record."""
        rows = self.live_rows(
            "SELECT volume_id, attach_status, connection_info FROM "
            "volume_attachment WHERE deleted = {}".format(self.false))
        found = []
        for vol_id, status, info in rows:
            info = json.loads(info or "{}")
            host = (info.get("connector") or {}).get("host")
            # ops.CONNECTING, ops.ENDING: a connect or an end cut short.
            done = bool(info.get("conn")) and \
                status not in ("attaching", "detached")
            found.append((vol_id, host, done, info))
        return found

    def exports(self):
        """{volume id: {"export": bool, "hosts": [grantee]}} of an
        exporting driver, {} for the FileDriver."""
        try:
            with open(os.path.join(self.dir, "exports.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def live_volumes(self):
        rows = self.live_rows("SELECT id FROM volumes WHERE deleted = "
                              "{}".format(self.false))
        return {r[0] for r in rows}

    def loop_devices(self):
        return loop_devices_under(self.dir)

    false = "0"


def sqlite_backend(base):
    os.makedirs(str(base), exist_ok=True)
    path = os.path.join(str(base), "cinderlib.db")

    def rows(sql):
        if not os.path.exists(path):
            return []
        with sqlite3.connect(path) as db:
            return db.execute(sql).fetchall()
    return Backend(base, "sqlite:///" + path, rows)


def exporting_backend(base):
    """SQLite, and a driver whose exports and per-host grants are
    visible and whose steps can be killed (tests.flowexports)."""
    backend = sqlite_backend(base)
    return Backend(base, backend.db_url, backend.live_rows,
                   driver=EXPORTING_DRIVER)


def postgres_backend(base, pg):
    db = pg.new_database()

    def rows(sql):
        # Through libpq, as the shim reads them: typed columns, no text
        # output of psql to split (a JSON value holds any separator).
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port,
                                user=pg.user, password=pg.password,
                                dbname=db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()
    backend = Backend(base, pg.url(db=db), rows)
    backend.false = "false"
    return backend


class Disk:
    """A Managed Block Storage disk and its VM device's spec params."""

    def __init__(self, label, vol_id, size):
        self.label = label
        # The disk's id, and the volume of its active image, the one
        # every attach names (disk.getImageId()): another after a
        # snapshot preview.
        self.disk_id = vol_id
        self.vol_id = vol_id
        # Volumes of the disk's other images (the one before a preview).
        self.others = set()
        self.previewed_from = None
        self.previewed_snapshot = None
        self.size = size
        self.attached = None     # ATTACHED_VDS_ID
        self.dest = None         # DEST_VDS_ID

    def hosts(self):
        return {h for h in (self.attached, self.dest) if h}

    def volumes(self):
        return {self.vol_id} | self.others


class Vm:

    def __init__(self, name, disks):
        self.name = name
        self.disks = disks
        # The disks whose VM device is plugged (vm_device.is_plugged).
        self.plugged = {d.label for d in disks}
        self.status = "down"
        self.run_on = None
        # The template it was made from (vm_static.vmt_guid), if any.
        self.template = None


class Engine:
    """ovirt-engine's Managed Block Storage orders, one call at a time."""

    def __init__(self, shim, backend, hosts, sd_id=None, say=None,
                 shim_env=None):
        self.shim_runner = shim
        self.backend = backend
        self.hosts = dict(hosts)
        self.sd_id = sd_id or str(uuid.uuid4())
        self.say = say or (lambda line: None)
        # {name: value}, or a callable returning it at each call
        self.shim_env = shim_env or {}
        self.disks = {}
        self.vms = {}
        self.trace = []
        # (vol_id, host) connections the engine's own flow leaves in the
        # shim (ovirt-engine behaviour, see docs/flows.md): expected, and
        # cleaned by the next disconnect_volume of that volume.  Only the
        # engine's steps change it (``leaked``), from its order or, after
        # a killed shim command, from what the backend then holds.
        self._leaked = set()
        # (vol_id, host, boot id) attachments a host keeps in this boot
        # that the engine forgot (a rerun overwrote ATTACHED_VDS_ID): it
        # never detaches them, the shim keeps their connections (the host
        # says it has the volume); an admin's detach, or the host's next
        # boot (its agent detaches the records of an earlier boot), ends
        # them.
        self.forgotten = set()
        # (vol_id, host) the engine still has there (the spec params were
        # not saved) though the host detached it: its detach was cut by
        # the host's death (the journal's replay finished it when the
        # agent started again), or done before a disconnect_volume that
        # failed.
        self.cut = set()
        # (vol_id, host) whose device the engine saved (save_device
        # succeeded) since its last connect_volume for that host (which
        # forgets the device of the connection it reuses).
        self.saved = set()
        # {snapshot id: label of the disk}: the backend's snapshots.
        self.snapshots = {}
        # {snapshot id: whether its disk was plugged in its VM when the
        # VM's snapshot (its configuration) was taken}.
        self.snapshot_plugged = {}
        # Volume ids the backend keeps that the engine forgot (its own
        # flows drop them from its database): expected on the backend.
        self.orphans = set()
        self.faults = {}        # (where, step) -> calls to let pass
        self.lost_replies = set()   # (host, verb): answered too late
        # {host: connection_info data knobs}: that host's storage is
        # slow (tests.fakebrick.SlowLocalConnector), ``hold_attaches``.
        self.slow_storage = {}
        # {shim command: the step number its next run is killed at}
        self.kills = {}
        # {(host, vol_id)} whose attaches fail (``fail_attaches``)
        self.failing_attaches = set()
        # {host: what happens there between the next connect_volume for
        # it and its attach_volume} (``between_connect_and_attach``)
        self.before_attach = {}
        # {template name: [labels of its disks]}
        self.templates = {}
        # Hosts PreparingForMaintenance or in Maintenance: the scheduler
        # never picks them (``schedule``).
        self.maintaining = set()
        # {(shim command, vol_id): the host whose grant the command's next
        # run on that volume fails to end} (``fail_next_terminate``)
        self.terminate_failures = {}
        # ["<grantee> <vol_id>"]: the lines of the exporting driver's
        # ``fail-terminate`` while runs that fail are in flight.
        self._failing_terminates = []
        # {vol_id: {(vol_id, host)}} the last disconnect_volume of the
        # volume could not end (its driver failed), though it exited 0:
        # leaks once the engine's bookkeeping is done (``_end_leaks``).
        self._unended = {}
        # (vol_id, host) connections a killed connect_volume left before
        # the driver's grant returned (no conn_info): the shim keeps
        # them while a complete connection of the volume is left.
        self._ungranted = set()
        # (vol_id, host) leaks whose record the shim left unfinished
        # (ops.CONNECTING, ops.ENDING: a killed command's, or one kept
        # "detached" by a failed terminate; ``_ungranted`` among them):
        # no complete connection, and released at a disconnect_volume
        # though their host cannot be asked (ops._released_of).
        self._unfinished = set()
        self._lock = threading.Lock()

    @property
    def leaked(self):
        return frozenset(self._leaked)

    # Plumbing

    def note(self, actor, target, what, outcome):
        line = "{:<7} -> {:<7} {:<52} {}".format(actor, target, what,
                                                 outcome)
        with self._lock:
            self.trace.append((actor, target, what, outcome))
        self.say(line)

    def shim(self, command, *args, label=""):
        """Run one sub-command; the payload, or StepFailed."""
        what = "{} {}".format(command, label).strip()
        if self._fault("shim", command):
            # The backend cannot be reached: the command fails for real.
            driver = dict(self.backend.driver,
                          file_volume_dir=self.backend.dir + "-unreachable")
            db_url = self.backend.db_url
            if command == "save_device":
                db_url = "sqlite:////nonexistent/engine-db-down.db"
        else:
            driver, db_url = self.backend.driver, self.backend.db_url
        cid = "flow-" + uuid.uuid4().hex[:8]
        env = self.shim_env
        if callable(env):
            env = env()
        with self._lock:
            kill_at = self.kills.pop(command, None)
            failing = self.terminate_failures.pop(
                (command, args[0] if args else None), None)
        if kill_at is not None:
            before = self.backend.connections()
            kill_file = os.path.join(self.backend.dir, "kill-at")
            with open(kill_file, "w") as f:
                f.write(str(kill_at))
        if failing is not None:
            fails = "{} {}".format(grantee(self, failing), args[0])
            self._fail_terminates(add=fails)
        try:
            r = self.shim_runner.run(command, *args, driver=driver,
                                     db_url=db_url, cid=cid, env=env)
        finally:
            if kill_at is not None:
                os.unlink(kill_file)
            if failing is not None:
                self._fail_terminates(remove=fails)
        line = r.stdout.decode("utf-8", "replace")
        if kill_at is not None:
            # The warm service's child running it died: the client says
            # so and exits non-zero, what ManagedBlockExecutor sees of a
            # killed cinderlib-client.
            assert r.code != 0 and "lost the request" in line, \
                r.describe()
            self.note("engine", "shim", what,
                      "KILLED at step {}".format(kill_at))
            left = self._left_by_kill(command, args, before)
            raise StepFailed("{}: killed: {}".format(command,
                                                     r.describe()),
                             killed=True, left=left)
        # ManagedBlockExecutor: success is exit status 0, whatever the
        # output (the removals print "error:" and exit 0 when the volume
        # or snapshot is already gone).
        if r.code != 0:
            self.note("engine", "shim", what, "FAILED " + line.strip()[:60])
            raise StepFailed("{}: {}".format(command, r.describe()))
        if failing is not None:
            self._left_unended(command, args[0], failing, what)
        if line.startswith("error"):
            self.note("engine", "shim", what, "ok: " + line.strip()[:60])
            return ""
        payload = line[len(cid) + 1:].rstrip("\n") if line else ""
        self.note("engine", "shim", what, "ok")
        return payload

    def kill_next(self, command, step):
        """SIGKILL the next run of the shim's ``command`` at its step
        number ``step`` (``steps``): the backend must be an exporting
        one (tests.flowexports: the driver kills itself there).
        ``check`` fails while it is unused; ``killing`` bounds it to a
        block."""
        assert self.backend.exporting
        with self._lock:
            self.kills[command] = step

    @contextlib.contextmanager
    def killing(self, command, step):
        """``kill_next`` for the block, which must run ``command``: a
        block that ends without it (the engine refused earlier) fails
        there, not at a later step that the kill would hit."""
        self.kill_next(command, step)
        try:
            yield
        finally:
            with self._lock:
                unused = self.kills.pop(command, None)
        assert unused is None, "{} never ran: its kill at step {} " \
            "was not used".format(command, unused)

    def fail_next_terminate(self, command, host, label):
        """The driver's terminate_connection of ``host``'s grant of the
        disk ``label`` fails (the backend does not answer) in the next
        run of the shim's ``command`` on that disk
        (tests.engine_kill_test's ``fail-terminate``, naming the grantee
        and the volume: other volumes' runs meanwhile are not touched;
        the backend must be an exporting one).  The engine's
        disconnect_volume then ends the other connections it released,
        logs an ERROR and exits 0, the record kept "detached"
        (docs/engine.md, "Killed mid-command"): a success for the
        engine, which saves the disk's hosts and never learns of the
        record, a leak until the volume's next disconnect_volume or
        delete_volume (``_left_unended``)."""
        assert self.backend.exporting
        with self._lock:
            self.terminate_failures[(command,
                                     self.disks[label].vol_id)] = host

    def _fail_terminates(self, add=None, remove=None):
        """The exporting driver's ``fail-terminate``: the lines of the
        runs in flight that fail, no file while none does (an empty one
        fails every terminate_connection)."""
        path = os.path.join(self.backend.dir, "fail-terminate")
        with self._lock:
            if add is not None:
                self._failing_terminates.append(add)
            if remove is not None:
                self._failing_terminates.remove(remove)
            if self._failing_terminates:
                with open(path + ".tmp", "w") as f:
                    f.write("".join(line + "\n"
                                    for line in self._failing_terminates))
                os.rename(path + ".tmp", path)
            else:
                os.unlink(path)

    def _left_unended(self, command, vol_id, host, what):
        """A run of ``command`` on ``vol_id`` whose terminate_connection
        of ``host`` failed exited 0: what it kept of ``host``'s
        connection, read from the shim's database as the engine cannot
        know, counts as a leak once the engine's bookkeeping of the
        disconnect is done (``_end_leaks``).  Only an unfinished record
        may be left: a complete one was not ended at all."""
        left = {pair: done for pair, done in
                self.backend.connection_states().items()
                if pair == (vol_id, host)}
        assert not any(left.values()), \
            "{} left {}'s connection complete".format(command, host)
        self.note("engine", "shim", what, "exit 0, {}'s end failed: "
                  "kept 'detached'".format(host) if left else
                  "exit 0, {}'s connection not there".format(host))
        with self._lock:
            self._unended[vol_id] = set(left)

    def _left_by_kill(self, command, args, before):
        """A shim command was SIGKILLed: ovirt-engine sees a failure and
        learns nothing of what it left, so the connections it made are
        leaks until the volume's next disconnect_volume ends them, and
        the ones it ended are no leaks any more.  The backend is the one
        thing that knows which step it reached: read it, and refuse what
        no run of that command can do (a connect making another host's
        connection, anything else making one).  The volume's connections
        now."""
        now = self.backend.connections()
        vol_id = args[0]
        made, ended = now - before, before - now
        allowed = set()
        if command == "connect_volume":
            allowed = {(vol_id, json.loads(args[1])["host"])}
        assert made <= allowed, "killed {} made connections {}".format(
            command, sorted(made))
        assert {v for v, _ in ended} <= {vol_id}, \
            "killed {} of {} ended {}".format(command, vol_id,
                                              sorted(ended))
        records = self.backend.records()
        with self._lock:
            self._leaked = (self._leaked - ended) | made
            self._ungranted |= {p for p in made
                                if not records[p][1].get("conn")}
            self._unfinished |= {p for p in now
                                 if p[0] == vol_id and not records[p][0]}
        return frozenset(p for p in now if p[0] == vol_id)

    def steps(self, command, *args, host=None, connected=False):
        """[step names] ``command`` takes on a volume made for it (its
        volume id first, then ``args``; with ``host``, that host's
        connector_info after them), connected to nobody or, with
        ``connected``, to ``host``: the numbers ``kill_next`` takes.
        The volume is removed again; the flow's trace does not show
        it.  A command's steps do not depend on the volume nor on which
        host: each kind is run once per session (``_STEPS``)."""
        assert self.backend.exporting
        kind = (self.backend.driver["volume_driver"], command, len(args),
                host is not None, connected)
        if kind not in _STEPS:
            _STEPS[kind] = self._run_steps(command, *args, host=host,
                                           connected=connected)
        return list(_STEPS[kind])

    def _run_steps(self, command, *args, host, connected):
        vol = str(uuid.uuid4())
        path = os.path.join(self.backend.dir, "steps.jsonl")
        connector = json.dumps(self.hosts[host].connector) if host else None

        env = self.shim_env() if callable(self.shim_env) else self.shim_env

        def run(*argv):
            r = self.shim_runner.run(*argv, driver=self.backend.driver,
                                     db_url=self.backend.db_url,
                                     cid="steps", env=env)
            assert r.code == 0, r.describe()

        run("create_volume", vol, 1)
        if connected:
            run("connect_volume", vol, connector)
        if os.path.exists(path):
            os.unlink(path)
        if host is not None and not connected:
            args += (connector,)
        run(command, vol, *args)
        with open(path) as f:
            steps = [json.loads(line) for line in f]
        os.unlink(path)
        if host is not None:
            run("disconnect_volume", vol, host)
        if command != "delete_volume":
            run("delete_volume", vol)
        return steps

    def host_call(self, host, verb, params, label=""):
        what = "{} {}".format(verb.split(".")[1], label).strip()
        if self._fault(host, verb) or (
                (host, params.get("vol_id")) in self.failing_attaches
                and verb == "ManagedVolume.attach_volume"):
            # A device the host cannot attach: the agent refuses for real.
            params = dict(params, connection_info={
                "driver_volume_type": "local",
                "data": {"device_path": "/dev/flows-missing-device"}})
        try:
            result = self.hosts[host].call(verb, params)
        except StepFailed as e:
            self.note("engine", host, what, "FAILED {}".format(e)[:70])
            e.host = host
            raise
        except Exception as e:
            self.note("engine", host, what, "FAILED {}".format(e)[:70])
            raise StepFailed("{} on {}: {}".format(verb, host, e),
                             network=isinstance(e, (stompclient.ClientError,
                                                    OSError)),
                             host=host,
                             cut=isinstance(e, stompclient.ClientError))
        if (host, verb) in self.lost_replies:
            self.lost_replies.discard((host, verb))
            self.note("engine", host, what, "done, answered too late: "
                      "VDS_NETWORK_ERROR")
            raise StepFailed("{} on {}: no answer in time".format(
                verb, host), network=True, host=host, done=True)
        self.note("engine", host, what, "ok")
        return result

    def fail_next(self, where, step, skip=0):
        """Make a ``step`` (a sub-command when ``where`` is "shim", else a
        verb of that host) fail for real, after ``skip`` calls passed."""
        self.faults[(where, step)] = skip

    def fail_attaches(self, host, label):
        """From now on every attach of the disk ``label`` on ``host``
        fails for real (a LUN that host cannot reach), whichever thread
        runs it."""
        self.failing_attaches.add((host, self.disks[label].vol_id))

    def lose_next_reply(self, host, verb):
        """The next ``verb`` on ``host`` succeeds there, but its answer
        comes after the engine gave up (vdsTimeout, 180 s: an os-brick
        connect waiting for a path, a host under load): the engine sees
        VDS_NETWORK_ERROR."""
        self.lost_replies.add((host, verb))

    def hold_attaches(self, host, barrier):
        """From now on every attach on ``host`` waits in its connector
        (its privsep daemon, os-brick's connect) until the file
        ``barrier`` exists: a storage slow to answer, so that a test
        knows attaches are in flight without guessing how long they take
        (``Host.connects`` says which reached the connector).  They
        wait ``fakebrick.WAIT_LIMIT`` s at most: ``attaches_held``
        fails naming the barrier once one stopped waiting."""
        self.slow_storage.setdefault(host, {})["fake_wait"] = barrier

    def attaches_held(self, host, mark):
        """Whether no attach on ``host`` got past its connector since
        ``mark`` (``Host.connects``) while ``hold_attaches`` holds them;
        AssertionError naming the barrier when one stopped waiting for
        it, rather than a plain False."""
        lines = self.hosts[host].connects(mark)
        expired = [line.split()[1] for line in lines
                   if line.startswith("connect-expired ")]
        if expired:
            raise AssertionError(
                "{} attach(es) on {} stopped waiting for barrier {} after "
                "fakebrick.WAIT_LIMIT = {} s: the test opened it later "
                "(connector keys {})".format(
                    len(expired), host,
                    self.slow_storage.get(host, {}).get("fake_wait"),
                    fakebrick.WAIT_LIMIT, ", ".join(expired)))
        return not any(line.startswith("connect ") for line in lines)

    def hold_in_connector(self, host, step, barrier):
        """From now on the volumes attached on ``host`` are slow to
        answer ``step`` ("extend" or "disconnect"): the host's extend or
        detach of such a volume waits in its connector (holding the
        volume's lock) until the file ``barrier`` exists, after
        "<step>-start <key>" (``Host.connects``)."""
        self.slow_storage.setdefault(host, {})[
            "fake_wait_" + step] = barrier

    def between_connect_and_attach(self, host, event):
        """Run ``event()`` (the host's agent restarted, killed, stopped)
        once, after the next connect_volume for ``host`` answered and
        before the host's attach_volume is sent."""
        self.before_attach[host] = event

    def refresh_caps(self, host):
        """Host.getCapabilities, as ovirt-engine's host monitoring asks it
        (VdsManager.refreshCapabilities: at activation, after a fence and
        whenever it refreshes the host) while commands run: the answer."""
        return self.host_call(host, "Host.getCapabilities", {})

    def _fault(self, where, step):
        with self._lock:
            skip = self.faults.get((where, step))
            if skip is None:
                return False
            if skip > 0:
                self.faults[(where, step)] = skip - 1
                return False
            del self.faults[(where, step)]
            return True

    def _leak(self, vol_id, host):
        with self._lock:
            self._leaked.add((vol_id, host))

    def _end_leaks(self, vol_id, asked_only=False):
        """The shim ended the volume's connections no host uses (with
        ``asked_only``: those of the hosts it could ask, and those of
        the others left unfinished, ``_unfinished``), but one the
        driver never granted (``_ungranted``) while a complete one is
        left (docs/engine.md: it ends with the volume's last complete
        connection).  Flows run in threads (many VMs at once): under
        the lock."""
        with self._lock:
            waiting = set()
            if asked_only and any(v == vol_id for v, _ in self._ungranted):
                # What the engine knows of the shim's complete
                # connections of the volume: those of the hosts it has
                # the disk on (or forgot it on), and those the shim kept
                # for a host it could not ask.  (delete_volume ends every
                # connection.)  Only the flows that killed a connect get
                # here, one call at a time: ``expected`` reads the
                # engine's disks, which other threads change.
                complete = {h for h, vols in self.expected().items()
                            if vol_id in vols}
                complete |= {h for v, h in self._leaked
                             if v == vol_id and not self.hosts[h].up
                             and (v, h) not in self._unfinished}
                waiting = {(v, h) for v, h in self._ungranted
                           if v == vol_id and (v, h) in self._leaked
                           and complete - {h}}
            # Kept: one waiting, and one complete of a host the shim
            # could not ask; an unfinished one it releases all the same.
            self._leaked = {(v, h) for v, h in self._leaked
                            if v != vol_id or (v, h) in waiting
                            or (asked_only and not self.hosts[h].up
                                and (v, h) not in self._unfinished)}
            # A record the disconnect could not end, though it exited 0
            # (``fail_next_terminate``): kept "detached", unfinished.
            unended = self._unended.pop(vol_id, set())
            self._leaked |= unended
            self._unfinished |= unended
            self._ungranted &= self._leaked
            self._unfinished &= self._leaked

    # Disks

    def add_disk(self, label, size=1):
        disk = Disk(label, str(uuid.uuid4()), size)
        self.shim("create_volume", disk.vol_id, size, label=label)
        self.disks[label] = disk
        return disk

    def remove_disk(self, label):
        """RemoveDiskCommand: refused while a VM that is not down has the
        disk plugged (validateAllVmsForDiskAreDown); else
        RemoveManagedBlockStorageDiskCommand (``_delete_disk``)."""
        disk = self.disks[label]
        for vm in self.vms.values():
            if disk in vm.disks and vm.status != "down" and \
                    label in vm.plugged:
                self.note("engine", "engine", "remove " + label,
                          "refused: {} is not down".format(vm.name))
                raise StepFailed("ACTION_TYPE_FAILED_VM_IS_NOT_DOWN")
        self._delete_disk(label)

    def _delete_disk(self, label):
        """RemoveManagedBlockStorageDiskCommand: ``delete_volume`` naming
        the disk's id (RemoveDiskParameters.getDiskId: the disk's first
        volume, which is not its active one after a committed preview)
        and, only when it succeeded, the disk leaves the engine's
        database (removeDiskFromDb: the image whose id is the disk's,
        and the disk), with its VM devices.  The images of its other
        volumes stay behind: those volumes stay on the backend,
        forgotten (``orphans``)."""
        disk = self.disks[label]
        self.shim("delete_volume", disk.disk_id, label=label)
        # The shim ended every connection of the volume.
        self._end_leaks(disk.disk_id)
        with self._lock:
            self.orphans |= disk.volumes() - {disk.disk_id}
            del self.disks[label]
            for vm in self.vms.values():
                if disk in vm.disks:
                    vm.disks.remove(disk)
                    vm.plugged.discard(label)

    def extend_disk(self, label, size):
        """ExtendManagedBlockStorageDiskSizeCommand: extend_volume; then
        the host step ovirt-engine lacks (README, "Growing a disk of a
        running VM"): ManagedVolume.extend_volume on every host that has
        the disk.  {host: the size in bytes it sees now}."""
        disk = self.disks[label]
        self.shim("extend_volume", disk.vol_id, size, label=label)
        disk.size = size
        return {host: self.grow_on(host, label)
                for host in sorted(disk.hosts())}

    def grow_on(self, host, label):
        """The host step of an extend (ManagedVolume.extend_volume to the
        disk's size): the size in bytes the host sees now."""
        disk = self.disks[label]
        return self.host_call(
            host, "ManagedVolume.extend_volume",
            {"vol_id": disk.vol_id, "sd_id": self.sd_id,
             "new_size": disk.size * 1024**3}, label=label)["size"]

    def snapshot_disk(self, label):
        """CreateManagedBlockStorageDiskSnapshotCommand (of the disk's
        active volume): the snapshot id."""
        snap_id = self.shim("create_snapshot", self.disks[label].vol_id,
                            label=label)
        self.snapshots[snap_id] = label
        return snap_id

    def remove_snapshot(self, label, snap_id, volume=None):
        """RemoveManagedBlockStorageSnapshotCommand: remove_snapshot
        naming the snapshot and, by default, the disk (its id, not its
        active volume's: RemoveSnapshotCommand.removeManagedBlockSnapshot,
        RestoreAllManagedBlockSnapshotsCommand.removeSnapshot); ``volume``
        names another (CreateManagedBlockStorageDiskSnapshotCommand
        .revertSnapshot names the volume it snapshotted)."""
        self.shim("remove_snapshot", snap_id,
                  volume or self.disks[label].disk_id, label=label)
        del self.snapshots[snap_id]

    def snapshot_failed(self, name, snaps):
        """The VM's snapshot fails after its Managed Block Storage disks'
        snapshots were made (CreateSnapshotForVmCommand.endVmCommand
        without TaskGroupSuccess: an image disk's snapshot task or the
        live snapshot failed; overrideChildCommandSuccess ends every
        child with failure): for each disk,
        CreateManagedBlockStorageDiskSnapshotCommand.endWithFailure ->
        revertSnapshot -> RemoveManagedBlockStorageSnapshotCommand:
        remove_snapshot of the new snapshot, naming the volume it
        snapshotted (getVolumeId: the disk's active image), and, when
        that succeeded, the disk's earlier image active again.  No host
        call: a running VM keeps its disks as they were."""
        vm = self.vms[name]
        self.note("engine", "engine", "snapshot of " + name,
                  "failed later: endWithFailure")
        for disk in vm.disks:
            self.remove_snapshot(disk.label, snaps[disk.label],
                                 volume=disk.vol_id)

    def snapshot_vm(self, name):
        """CreateSnapshotForVmCommand, live or not: for each Managed
        Block Storage disk of the VM, CreateSnapshotDiskCommand runs
        CreateManagedBlockStorageDiskSnapshotCommand (create_snapshot of
        the disk's active volume; no host call, no freeze of these
        disks).  {label: snapshot id}."""
        vm = self.vms[name]
        snaps = {disk.label: self.snapshot_disk(disk.label)
                 for disk in vm.disks}
        for label, snap_id in snaps.items():
            self.snapshot_plugged[snap_id] = label in vm.plugged
        return snaps

    def preview_snapshot(self, name, snaps):
        """TryBackToAllSnapshotsOfVmCommand (the VM is down): for each
        disk, TryBackToManagedBlockSnapshotCommand runs
        create_volume_from_snapshot naming the disk (image.getId()) and
        the snapshot; the new volume becomes the disk's active image
        (initNewVolume: imageId := the new volume), the earlier one
        inactive.  Every attach from now on names the new volume."""
        vm = self.vms[name]
        assert vm.status == "down"
        for disk in vm.disks:
            new = self.shim("create_volume_from_snapshot", disk.disk_id,
                            snaps[disk.label], label=disk.label)
            disk.previewed_from = disk.vol_id
            disk.previewed_snapshot = snaps[disk.label]
            disk.others.add(disk.vol_id)
            disk.vol_id = new

    def undo_preview(self, name):
        """RestoreAllSnapshotsCommand, UNDO (the VM is down): the images
        to restore are the active (previewed) ones;
        RestoreAllManagedBlockSnapshotsCommand.handleUndo marks the
        earlier image active again and runs
        RemoveManagedBlockStorageDiskCommand on the previewed volume
        (delete_volume)."""
        vm = self.vms[name]
        assert vm.status == "down"
        for disk in vm.disks:
            self.shim("delete_volume", disk.vol_id, label=disk.label)
            self._end_leaks(disk.vol_id)
            disk.vol_id, disk.previewed_from = disk.previewed_from, None
            disk.previewed_snapshot = None
            disk.others.discard(disk.vol_id)

    def commit_preview(self, name):
        """RestoreAllSnapshotsCommand, commit (the VM is down):
        RestoreAllManagedBlockSnapshotsCommand.handleCommit keeps the
        previewed volume P as the disk's active image and removes, from
        the backend, the images whose parent is P's parent other than P
        (getAllSnapshotsForParent).  P's parent is the previewed
        snapshot S (TryBackToManagedBlockSnapshotCommand.initNewVolume);
        a snapshot's parent is the disk's snapshot leaf when it was
        taken (CreateManagedBlockStorageDiskSnapshotCommand
        .createNewDiskImageForSnapshot: getSnapshotLeaf), so the images
        under S are P and the snapshot taken right after S, if any: that
        one is removed (remove_snapshot naming the disk), nothing else.
        The disk's earlier volume stays on the backend, inactive, with S
        and the snapshots before S."""
        vm = self.vms[name]
        assert vm.status == "down"
        for disk in vm.disks:
            mine = [s for s, label in self.snapshots.items()
                    if label == disk.label]
            later = mine[mine.index(disk.previewed_snapshot) + 1:]
            if later:
                self.remove_snapshot(disk.label, later[0])
            disk.previewed_from = disk.previewed_snapshot = None

    def copy_disk(self, label, new_label, host):
        """MoveOrCopyDiskCommand (copy) of a disk no running VM has
        plugged, to a new Managed Block Storage disk:
        CopyImageGroupCommand -> CopyManagedBlockDiskCommand on a host
        of the pool (VdsCommandsHelper.getHostForExecution: ``host``).

        createVolumes: AddManagedBlockStorageDiskCommand
        (create_volume), then attachVolume of the target, then of the
        source: ManagedBlockStorageCommandUtil
        .attachManagedBlockStorageDisk, connect_volume and the host's
        attach_volume only (no save_device, no VM device records the
        host); a failed attach throws.  CopyData: the host copies from
        the source's ``path`` to the target's (qemu-img convert; here the
        first 2 MiB).  DETACH_VOLUME:
        disconnectManagedBlockStorageDeviceFromHost of the source, then
        of the target (DisconnectManagedBlockStorageDeviceCommand:
        detach_volume on the host, then disconnect_volume; results
        ignored).  A failure anywhere: endWithFailure detaches both the
        same way and runs RemoveManagedBlockStorageDiskCommand on the
        target (delete_volume); StepFailed is raised."""
        return self._copy(host, source=self.disks[label],
                          new_label=new_label)

    def copy_disk_to_image(self, label, image, host):
        """MoveOrCopyDiskCommand of a Managed Block Storage disk to an
        image storage domain (vdsm's volume, here the file ``image``):
        CopyManagedBlockDiskCommand.createVolumes makes the target the
        image way (super.createVolumes, no shim call) and attaches the
        source only; DETACH_VOLUME detaches the source only; a failure:
        endWithFailure detaches the source, no
        RemoveManagedBlockStorageDisk (the target is vdsm's)."""
        self._copy(host, source=self.disks[label], image=image)

    def copy_image_to_disk(self, image, new_label, host):
        """MoveOrCopyDiskCommand of an image disk (the file ``image``) to
        a new Managed Block Storage disk: create_volume and the attach of
        the target only; DETACH_VOLUME detaches the target only; a
        failure: endWithFailure detaches it and removes it."""
        return self._copy(host, image=image, new_label=new_label)

    def _copy(self, host, source=None, new_label=None, image=None):
        dst = None
        if new_label is not None:
            size = source.size if source else 1
            dst = Disk(new_label, str(uuid.uuid4()), size)
            self.shim("create_volume", dst.vol_id, dst.size,
                      label=new_label)
            self.disks[new_label] = dst
        what = "{} -> {}".format(source.label if source else "image",
                                 new_label or "image")
        try:
            target = self._attach_volume(dst, host)["path"] if dst \
                else image
            path = self._attach_volume(source, host)["path"] if source \
                else image
            self.note("engine", host, "copy_data " + what, "ok")
            self.hosts[host].copy(path, target, 2 * 1024**2)
        except StepFailed:
            self.note("engine", "engine", "copy " + what, "endWithFailure")
            self._detach_copied(host, source, dst)
            if dst is not None:
                self.shim("delete_volume", dst.vol_id, label=new_label)
                self._end_leaks(dst.vol_id)
                del self.disks[new_label]
            raise
        self._detach_copied(host, source, dst)
        return dst

    def _detach_copied(self, host, source, target):
        """CopyManagedBlockDiskCommand.detachVolume: the source, then the
        target, those of Managed Block Storage."""
        for disk in (source, target):
            if disk is not None:
                self._detach_volume(disk, host)

    def clone_disk(self, label, new_label):
        """CloneSingleManagedBlockDiskCommand: clone_volume."""
        src = self.disks[label]
        disk = Disk(new_label, str(uuid.uuid4()), src.size)
        self.shim("clone_volume", src.vol_id, disk.vol_id,
                  label="{} -> {}".format(label, new_label))
        self.disks[new_label] = disk
        return disk

    # Templates and clones (no host call: clone_volume only)

    def add_template(self, name, vm_name):
        """AddVmTemplateCommand of a VM that is down (isVmStatusValid:
        Down, else refused) -> CreateAllTemplateDisksCommand
        .addVmTemplateManagedBlockDisks: for each Managed Block Storage
        disk of the VM (getVmDisksFromDb: plugged or not),
        CloneSingleManagedBlockDiskCommand: clone_volume of the disk's
        active volume (getImageId) to a new id, the template disk's id
        and image.  The first failure ends the command.  The labels of
        the template's disks ("<template>-<disk>")."""
        vm = self.vms[vm_name]
        if vm.status != "down":
            self.note("engine", "engine", "template of " + vm_name,
                      "refused: VM {}".format(vm.status))
            raise StepFailed("ACTION_TYPE_FAILED_VM_IS_NOT_DOWN")
        labels = [self.clone_disk(disk.label,
                                  "{}-{}".format(name, disk.label)).label
                  for disk in vm.disks]
        self.templates[name] = labels
        return labels

    def add_template_from_snapshot(self, name, vm_name, snaps):
        """AddVmTemplateFromSnapshotCommand of the VM's snapshot whose
        disks' snapshots are ``snaps`` (what ``snapshot_vm`` returned).
        Any VM status passes for a regular snapshot (isVmStatusValid).
        Its disks are the snapshot's configuration's: the Managed Block
        Storage ones plugged there (getVmDisksFromDB: ONLY_PLUGGED), and
        when there is one, validateImages refuses: AddVmTemplateFromSnapshot
        is not among the operations a Managed Block Storage domain
        supports (ManagedBlockStorageDomainValidator
        .allowedStorageOperations), before any shim call.  Without one,
        CreateAllTemplateDisksFromSnapshotCommand.getVmDisksFromDb adds
        the Managed Block Storage disks of ``getVm().getDiskMap()``,
        plugged, but that VM is the child command's own, read by
        vmDao.get, whose disk map nothing fills (only
        VmHandler.updateDisksFromDb does): none, no clone_volume, even of
        a disk the VM has now.  The labels of the template's disks."""
        plugged = sorted(label for label, snap_id in snaps.items()
                         if self.snapshot_plugged[snap_id])
        if plugged:
            self.note("engine", "engine", "template {} from a snapshot of "
                      "{}".format(name, vm_name), "refused: disks " +
                      ", ".join(plugged))
            raise StepFailed("ACTION_TYPE_FAILED_UNSUPPORTED_ACTION_FOR_"
                             "MANAGED_BLOCK_STORAGE_TYPE")
        self.note("engine", "engine", "template {} from a snapshot of {}"
                  .format(name, vm_name), "ok, no disk cloned")
        self.templates[name] = []
        return []

    def add_vm_from_template(self, name, template):
        """AddVmCommand from a template: addVmImages ->
        addManagedBlockDisks, CloneSingleManagedBlockDiskCommand of each
        of the template's Managed Block Storage disks (clone_volume: a
        Managed Block Storage disk is always a full clone, never a thin
        one on the template's).  The VM is based on the template
        (vmt_guid)."""
        labels = [self.clone_disk(label, "{}-{}".format(
            name, label.split("-", 1)[1])).label
            for label in self.templates[template]]
        vm = self.add_vm(name, *labels)
        vm.template = template
        return vm

    def clone_vm(self, source, name):
        """CloneVmCommand: refused while the source runs with Managed
        Block Storage disks (validate:
        ACTION_TYPE_FAILED_CANNOT_CLONE_RUNNING_VM_WITH_MBS_DISKS); else
        no VM snapshot is taken (getVmSnapshotToClone: not every disk
        supports it) and AddVmAndCloneImageCommand.addVmImages clones
        the source's *plugged* Managed Block Storage disks
        (getSourceDisks: ONLY_PLUGGED) with
        CloneSingleManagedBlockDiskCommand.  The clone keeps the
        source's template (updateOriginalTemplate)."""
        src = self.vms[source]
        if src.status != "down":
            self.note("engine", "engine", "clone " + source,
                      "refused: VM {}".format(src.status))
            raise StepFailed(
                "ACTION_TYPE_FAILED_CANNOT_CLONE_RUNNING_VM_WITH_MBS_DISKS")
        labels = [self.clone_disk(disk.label, "{}-{}".format(
            name, disk.label.split("-", 1)[-1])).label
            for disk in src.disks if disk.label in src.plugged]
        vm = self.add_vm(name, *labels)
        vm.template = src.template
        return vm

    def detach_disk_from_vm(self, name, label):
        """DetachDiskFromVmCommand of a VM that is down (or of an
        unplugged disk): the VM device goes, the disk stays, floating;
        no shim or host call for a disk nothing has attached."""
        vm = self.vms[name]
        disk = self.disks[label]
        assert vm.status == "down" or label not in vm.plugged
        assert not disk.hosts()
        vm.disks.remove(disk)
        vm.plugged.discard(label)

    def remove_template(self, name):
        """RemoveVmTemplateCommand: refused while a VM is based on the
        template (validate: vmDao.getAllWithTemplate,
        VMT_CANNOT_REMOVE_DETECTED_DERIVED_VM), before any shim call;
        else RemoveAllManagedBlockStorageDisksCommand: delete_volume of
        each template disk, one after the other; the template goes
        whatever they answered (removeManagedBlockDisks ignores the
        result), a disk that failed stays, floating.  The labels of
        those disks."""
        derived = sorted(vm.name for vm in self.vms.values()
                         if vm.template == name)
        if derived:
            self.note("engine", "engine", "remove template " + name,
                      "refused: VMs " + ", ".join(derived))
            raise StepFailed("VMT_CANNOT_REMOVE_DETECTED_DERIVED_VM")
        failed = []
        for label in self.templates.pop(name):
            try:
                self._delete_disk(label)
            except StepFailed:
                failed.append(label)
        return failed

    # VMs

    def add_vm(self, name, *disk_labels):
        vm = Vm(name, [self.disks[d] for d in disk_labels])
        self.vms[name] = vm
        return vm

    def remove_vm(self, name):
        """RemoveVmCommand with its disks (the VM down): the VM leaves
        the engine's database first, with its snapshots' records
        (removeVmFromDb -> removeVmSnapshots: the snapshot rows only),
        then RemoveAllManagedBlockStorageDisksCommand runs
        RemoveManagedBlockStorageDiskCommand for each active disk, one
        after the other, with no remove_snapshot before.  A disk whose
        delete_volume fails stays, with no VM (the event names it:
        processUnremovedDisks).  The labels of those disks."""
        vm = self.vms[name]
        assert vm.status == "down"
        del self.vms[name]
        failed = []
        for disk in list(vm.disks):
            try:
                self._delete_disk(disk.label)
            except StepFailed:
                failed.append(disk.label)
        if failed:
            self.note("engine", "engine", "remove " + name,
                      "VM removed, disks left: " + ", ".join(failed))
        return failed

    def run_vm(self, name, host, rerun_on=()):
        """RunVmCommand.runVm: attach the disks, then create the VM.

        A failed attach reruns the command on the next host of
        ``rerun_on`` (RunVmCommandBase.rerun: no ProcessDownVmCommand
        between); with none left (runningFailed) ProcessDownVmCommand
        disconnects the disks and StepFailed is raised.  A
        VDS_NETWORK_ERROR ends the command with the VM Unknown on that
        host (``vm_disappeared`` once the host answers again).  The host
        the VM runs on."""
        vm = self.vms[name]
        hosts = [host] + list(rerun_on)
        for i, host in enumerate(hosts):
            try:
                self._attach_disks(vm, host, live_migration=False)
            except StepFailed as e:
                if e.network:
                    self.note("engine", "engine", "run {} on {}".format(
                        name, host), "VDS_NETWORK_ERROR: VM Unknown")
                    vm.status = "unknown"
                    vm.run_on = host
                    raise
                if i + 1 < len(hosts):
                    self.note("engine", "engine", "run {} on {} failed"
                              .format(name, host), "rerun")
                    continue
                self.note("engine", "engine", "run {} on {} failed".format(
                    name, host), "VM down")
                self._process_down(vm)
                raise
            vm.status = "up"
            vm.run_on = host
            return host

    def schedule(self, candidates):
        """SchedulingManager.schedule for a RunVm (RunVmCommand
        .getVdsToRunOn) or a migration: the first of ``candidates`` (the
        policy's order) that is Up (fetchHosts:
        getAllForClusterWithStatus Up): reachable, and not being moved to
        maintenance.  None: no host."""
        return next((h for h in candidates if self.hosts[h].up and
                     h not in self.maintaining), None)

    def ha_restart(self, names, candidates):
        """HaAutoStartVmsRunner (AutoStartVmsRunner.processVmDown ->
        runVmAndUpdateStatus): one RunVmCommand after the other from its
        thread, each waiting for the one before; each is scheduled when
        it starts (``schedule``), and reruns on the other hosts Up then
        (RunVmCommandBase.rerun; here the hosts Up when the RunVm
        started, not when it reruns).  A VM with no host Up fails
        validation (RunVmValidator.canRunVm: canSchedule) and stays
        down, for the runner's next try (HaVmToRestart: every
        RetryToRunAutoStartVmShortIntervalInSeconds ten times, then
        every RetryToRunAutoStartVmLongIntervalInSeconds).  {VM name:
        the host it runs on, or None}."""
        placed = {}
        for name in names:
            host = self.schedule(candidates)
            if host is None:
                self.note("engine", "engine", "run " + name,
                          "refused: no host Up (the runner tries again)")
                placed[name] = None
                continue
            others = [h for h in candidates if h != host and
                      self.schedule([h]) == h]
            placed[name] = self.run_vm(name, host, rerun_on=others)
        return placed

    def vm_disappeared(self, name):
        """VmAnalyzer.proceedDisappearedVm: the VM's host answers again
        and does not report it: Down, ProcessDownVmCommand."""
        vm = self.vms[name]
        self.note("engine", vm.run_on, "{} not reported".format(name),
                  "VM down")
        vm.status = "down"
        vm.run_on = None
        return self._process_down(vm)

    def add_disk_to_vm(self, name, label, activate=False):
        """AttachDiskToVmCommand: the VM gets the disk's device,
        unplugged; with ``activate``, of a VM that is down: plugged (no
        host call: the next run attaches it)."""
        vm = self.vms[name]
        vm.disks.append(self.disks[label])
        if activate:
            assert vm.status == "down"
            vm.plugged.add(label)

    def hot_plug(self, name, label, fail_vm_step=False):
        """HotPlugDiskToVmCommand on a running VM.

        validate: the VM is Up, Paused or Down (never migrating) and the
        device unplugged (HOT_PLUG_DISK_IS_NOT_UNPLUGGED).
        AbstractDiskVmCommand.performPlugCommand: ManagedBlockStorage-
        CommandUtil.saveDevices on the VM's host (its false return, a
        failed connect_volume or save_device, is ignored; a failed
        attach_volume throws, which ends the command), then vdsm's
        VM.hotplugDisk (``fail_vm_step``: it fails), which throws on
        failure: nothing is undone, the disk stays attached on the host
        with ATTACHED_VDS_ID set, the device unplugged.
        """
        vm = self.vms[name]
        disk = self.disks[label]
        assert vm.status == "up" and label not in vm.plugged
        try:
            self._save_devices(disk, vm.run_on, live_migration=False)
        except StepFailed as e:
            if e.host is not None:
                raise       # AttachManagedBlockStorageVolume threw
            # A shim command failed: saveDevices returned false, ignored.
        if fail_vm_step:
            self.note("engine", vm.run_on, "hotplugDisk {} {}".format(
                name, label), "FAILED (vdsm)")
            raise StepFailed("VM.hotplugDisk failed")
        self.note("engine", vm.run_on, "hotplugDisk {} {}".format(
            name, label), "ok")
        vm.plugged.add(label)

    def hot_unplug(self, name, label):
        """HotUnPlugDiskFromVmCommand: validate: the VM is Up, Paused or
        Down and the device plugged (HOT_UNPLUG_DISK_IS_NOT_PLUGGED).
        executeVmCommand: vdsm's VM.hotunplugDisk (a running VM), the
        device unplugged, then disconnectManagedBlockStorageDisk(vm,
        disk, false), whose result is ignored."""
        vm = self.vms[name]
        if vm.status not in ("up", "down") or label not in vm.plugged:
            self.note("engine", "engine", "hot unplug " + label,
                      "refused: VM {}".format(vm.status))
            raise StepFailed("HotUnPlugDiskFromVm validation")
        if vm.status == "up":
            self.note("engine", vm.run_on, "hotunplugDisk {} {}".format(
                name, label), "ok")
        vm.plugged.discard(label)
        self._disconnect_disk(self.disks[label], remove_dest=False)

    def admin_detach(self, host, label):
        """An admin detaches a volume the engine forgot (vdsm-client
        ManagedVolume detach_volume on the host); the shim ends its
        connection at the next disconnect_volume of the volume."""
        disk = self.disks[label]
        self.host_call(host, "ManagedVolume.detach_volume",
                       {"vol_id": disk.vol_id, "sd_id": self.sd_id},
                       label=label)
        self.forgotten = {f for f in self.forgotten
                          if f[:2] != (disk.vol_id, host)}
        self._leak(disk.vol_id, host)

    def stop_vm(self, name):
        """StopVmCommand, then the VM's down event: ProcessDownVmCommand
        disconnects its disks."""
        vm = self.vms[name]
        self.note("engine", vm.run_on, "destroy {}".format(name), "ok")
        vm.status = "down"
        vm.run_on = None
        return self._process_down(vm)

    def host_down(self, host):
        """The host was fenced (or confirmed rebooted): every VM that ran
        on it goes down (ClearNonResponsiveVdsVmsCommand /
        RestartVdsVmsOperation -> ProcessDownVmCommand)."""
        for vm in self.vms.values():
            if vm.run_on == host:
                vm.status = "down"
                vm.run_on = None
                self._process_down(vm)

    def migrate(self, name, dest, fail_at=None, rerun_on=(), during=None):
        """MigrateVmCommand: perform, then reportCompleted or runningFailed.

        ``fail_at``: None (success), ``connect_volume``, ``attach_volume``,
        ``save_device`` (the real call fails) or ``migrate`` (vdsm's
        migration itself fails, before or after it started).

        ``rerun_on``: the hosts the scheduler picks next when the
        migration to ``dest`` fails after it started (``migrate``): vdsm
        reports the VM running on the source again, VmAnalyzer sets the
        rerun flag and MigrateVmCommand.rerun (the VM is Up) runs
        RunVmCommandBase.rerun -> reexecuteCommand: perform again, to the
        next host, with no runningFailed between.  The earlier
        destination's attachments stay and its DEST_VDS_ID is
        overwritten (saveAttachedHost): the engine forgets them.  With
        no host left, runningFailed detaches from the last destination.

        ``during``: called once the disks are attached on the first
        destination (DEST_VDS_ID set), while the memory moves.
        """
        vm = self.vms[name]
        src = vm.run_on
        if fail_at in ("connect_volume", "save_device"):
            self.fail_next("shim", fail_at)
        elif fail_at == "attach_volume":
            self.fail_next(dest, "ManagedVolume.attach_volume")
        vm.status = "migrating"
        hosts = [dest] + list(rerun_on)
        for i, dest in enumerate(hosts):
            try:
                self._attach_disks(vm, dest, live_migration=True)
                if during is not None and i == 0:
                    during()
                if fail_at == "migrate" and i == 0:
                    self.note("engine", src, "migrate {} to {}".format(
                        name, dest), "FAILED (vdsm)")
                    raise StepFailed("migration failed")
                self.note("engine", src, "migrate {} to {}".format(
                    name, dest), "ok")
                break
            except StepFailed:
                if fail_at == "migrate" and i + 1 < len(hosts):
                    self.note("engine", "engine", "migrate {}".format(name),
                              "rerun")
                    continue
                self._running_failed(vm)
                vm.status = "up"
                return False
        # reportCompleted: the VM runs on dest; disconnect the source.
        vm.run_on = dest
        vm.status = "up"
        self._disconnect_disks(vm, remove_dest=False)
        return True

    def maintenance(self, host, dests, performed=None):
        """The host to maintenance with its VMs running:
        MaintenanceNumberOfVdssCommand sets it PreparingForMaintenance
        (moveVdssToGoingToMaintenanceMode: nothing is scheduled to it
        any more; its cancelIncomingMigrations cancels the migrations
        to it, which the caller replays as migrations that fail after
        they started: ``migrate``), then MaintenanceVdsCommand ->
        MigrateMultipleVmsCommand schedules every VM running on the
        host (getAllRunningForVds: run_on_vds, which a RunVm sets only
        once its disks are attached and the VM created) (here: to
        ``dests`` in turn) and runs MigrateVmToServer for each, one
        after the other: each perform attaches the VM's disks on its
        destination and starts the migration; then ``performed()``, if
        given, while the memory moves.  Each reportCompleted comes back
        from the monitoring of its own VM, in any order, several at
        once: here all at once, in threads.  Run again for the VMs that
        landed since (the monitoring's retry,
        VdsEventListener.handleVdsMaintenanceTimeout, or an admin's
        Activate and Maintenance again).  {VM name: its host}."""
        self.maintaining.add(host)
        self.note("engine", host, "maintenance",
                  "PreparingForMaintenance")
        vms = sorted((vm for vm in self.vms.values() if vm.run_on == host),
                     key=lambda vm: vm.name)
        moves = list(zip(vms, (dests * len(vms))[:len(vms)]))
        for vm, dest in moves:
            vm.status = "migrating"
            self._attach_disks(vm, dest, live_migration=True)
            self.note("engine", host, "migrate {} to {}".format(
                vm.name, dest), "ok")
        if performed is not None:
            performed()

        def completed(move):
            vm, dest = move
            vm.run_on = dest
            vm.status = "up"
            return self._disconnect_disks(vm, remove_dest=False)

        if moves:
            with concurrent.futures.ThreadPoolExecutor(len(moves)) as pool:
                assert all(pool.map(completed, reversed(moves)))
        return {vm.name: vm.run_on for vm, _ in moves}

    def migrate_many(self, names, dest):
        """Several VMs selected, Migrate: MigrateVMActionRunner
        (SortedMultipleActionsRunnerBase.runCommands: the commands
        sorted by priority, here ``names``' order, then
        PrevalidatingMultipleActionsRunner.runCommands, one after the
        other in one thread): each MigrateVmCommand.perform attaches the
        VM's disks on ``dest`` and starts the migration; one whose
        attach fails runs runningFailed there and then (detaching from
        the destination with removeDest), while the migrations started
        before it are in flight.  Their reportCompleted come back later
        from the monitoring of each VM, here all at once.  {VM name: the
        host it runs on}."""
        started = []
        for name in names:
            vm = self.vms[name]
            vm.status = "migrating"
            try:
                self._attach_disks(vm, dest, live_migration=True)
            except StepFailed:
                self._running_failed(vm)
                vm.status = "up"
                continue
            self.note("engine", vm.run_on, "migrate {} to {}".format(
                name, dest), "ok")
            started.append(vm)

        def completed(vm):
            vm.run_on = dest
            vm.status = "up"
            return self._disconnect_disks(vm, remove_dest=False)

        if started:
            with concurrent.futures.ThreadPoolExecutor(len(started)) as pool:
                assert all(pool.map(completed, started))
        return {name: self.vms[name].run_on for name in names}

    def _running_failed(self, vm):
        """MigrateVmCommand.runningFailed: disconnect from the dest."""
        if not self._disconnect_disks(vm, remove_dest=True):
            self.note("engine", "engine", "detach from destination",
                      "not all disks")

    def _process_down(self, vm):
        return self._disconnect_disks(vm, remove_dest=False)

    # ManagedBlockStorageCommandUtil

    def _attach_disks(self, vm, host, live_migration):
        for disk in vm.disks:                     # allMatch: stop at first
            self._save_devices(disk, host, live_migration)

    def _attach_volume(self, disk, host):
        """attachManagedBlockStorageDisk: connect_volume with the host's
        connector_info, then the host's attach_volume; what it returned."""
        connector = self.hosts[host].connector
        conn = json.loads(self.shim("connect_volume", disk.vol_id,
                                    json.dumps(connector),
                                    label="{} for {}".format(disk.label,
                                                             host)))
        with self._lock:
            self.saved.discard((disk.vol_id, host))
            self._ungranted.discard((disk.vol_id, host))
            self._unfinished.discard((disk.vol_id, host))
        if host in self.slow_storage:
            conn = dict(conn, data=dict(conn["data"],
                                        **self.slow_storage[host]))
        event = self.before_attach.pop(host, None)
        if event is not None:
            event()
        try:
            device = self.host_call(
                host, "ManagedVolume.attach_volume",
                {"vol_id": disk.vol_id, "connection_info": conn,
                 "sd_id": self.sd_id}, label=disk.label)
        except StepFailed as e:
            if e.done:
                # The host attached it; nothing records the host, so the
                # engine never detaches it there.
                self.forgotten.add((disk.vol_id, host,
                                    self.hosts[host].boot_id))
            else:
                # Nothing records the host: the connection the shim just
                # made is left for the next disconnect_volume of this
                # volume.
                self._leak(disk.vol_id, host)
            raise
        self.cut.discard((disk.vol_id, host))
        return device

    def _detach_volume(self, disk, host):
        """disconnectManagedBlockStorageDeviceFromHost (no VM device):
        the host's detach_volume, then disconnect_volume; whether both
        succeeded."""
        try:
            self.host_call(host, "ManagedVolume.detach_volume",
                           {"vol_id": disk.vol_id, "sd_id": self.sd_id},
                           label=disk.label)
        except StepFailed:
            # Nothing records the host: the engine never comes back.
            self.forgotten.add((disk.vol_id, host,
                                self.hosts[host].boot_id))
            return False
        try:
            self.shim("disconnect_volume", disk.vol_id, label=disk.label)
        except StepFailed as e:
            self._disconnect_failed(disk.vol_id, host, e)
            return False
        self._end_leaks(disk.vol_id, asked_only=True)
        return True

    def _disconnect_failed(self, vol_id, host, e):
        """DisconnectManagedBlockStorageDeviceCommand failed after
        ``host`` detached (or its detach failed): nothing records that
        the host let go, so the host's connection is a leak, ended by
        the volume's next disconnect_volume; a killed disconnect_volume
        may have ended it already (``_left_by_kill``)."""
        if not e.killed or (vol_id, host) in e.left:
            self._leak(vol_id, host)

    def _save_devices(self, disk, host, live_migration):
        device = self._attach_volume(disk, host)
        if live_migration:
            if disk.dest not in (None, host) and self.hosts[disk.dest].up:
                # saveAttachedHost overwrites DEST_VDS_ID (a migration
                # rerun to another host): the engine forgets the
                # attachment on the earlier destination.
                self.forgotten.add((disk.vol_id, disk.dest,
                                    self.hosts[disk.dest].boot_id))
            disk.dest = host
        else:
            if disk.attached not in (None, host) and \
                    self.hosts[disk.attached].up and \
                    (disk.vol_id, disk.attached) not in self.cut:
                # saveAttachedHost overwrites ATTACHED_VDS_ID: the engine
                # forgets the attachment on the other host.
                self.forgotten.add((disk.vol_id, disk.attached,
                                    self.hosts[disk.attached].boot_id))
            self.cut.discard((disk.vol_id, disk.attached))
            disk.attached = host
        self.shim("save_device", disk.vol_id, json.dumps(device),
                  label=disk.label)
        with self._lock:
            self.saved.add((disk.vol_id, host))

    def _disconnect_disks(self, vm, remove_dest):
        for disk in vm.disks:
            if not self._disconnect_disk(disk, remove_dest):
                return False
        return True

    def _disconnect_disk(self, disk, remove_dest):
        host = disk.dest if remove_dest else disk.attached
        if host is None:
            return False                   # "attach has likely failed"
        try:
            self.host_call(host, "ManagedVolume.detach_volume",
                           {"vol_id": disk.vol_id, "sd_id": self.sd_id},
                           label=disk.label)
            self.shim("disconnect_volume", disk.vol_id, label=disk.label)
        except StepFailed as e:
            # The spec params are not saved: a later attach elsewhere
            # overwrites them and this host's connection is forgotten.
            self._disconnect_failed(disk.vol_id, host, e)
            if (e.cut and e.host == host) or e.host is None:
                # The detach was cut (the host's journal finishes it), or
                # done: disconnect_volume failed after it.
                self.cut.add((disk.vol_id, host))
            return False
        if disk.dest is None:
            disk.attached = None
        else:
            if not remove_dest:
                disk.attached = disk.dest
            disk.dest = None
        # The shim ended every connection no host uses any more, except
        # those of hosts it could not ask (it keeps them: a leaked export
        # is recoverable, a cut disk is not).
        self._end_leaks(disk.vol_id, asked_only=True)
        return True

    # What the engine believes

    def expected(self):
        """{host: {vol_id}} of the disks the engine has on each host, and
        of those it forgot there in the host's current boot, less those
        whose cut detach the host's journal finished."""
        found = {name: set() for name in self.hosts}
        for disk in self.disks.values():
            for host in disk.hosts():
                found[host].add(disk.vol_id)
        for vol_id, host, boot_id in self.forgotten:
            if self.hosts[host].boot_id == boot_id:
                found[host].add(vol_id)
        for vol_id, host in self.cut:
            found[host].discard(vol_id)
        return found

    def cleanup(self):
        """Stop every VM and delete every disk (the end of a flow)."""
        for name, vm in self.vms.items():
            if vm.status == "unknown":
                self.vm_disappeared(name)
            elif vm.status != "down":
                self.stop_vm(name)
        for snap_id, label in list(self.snapshots.items()):
            self.remove_snapshot(label, snap_id)
        # Each its own RemoveDiskCommand, a few at once (the flows with
        # 50 VMs remove 60 disks).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(self.remove_disk, list(self.disks)))
        for vol_id in sorted(self.orphans):
            self.admin_delete_volume(vol_id)

    def admin_delete_volume(self, vol_id):
        """An admin deletes a volume the engine forgot, with the shim's
        own command line (managedvolume-cinderlib-client delete_volume,
        as ovirt-engine would run it)."""
        self.shim("delete_volume", vol_id, label="forgotten")
        self.orphans.discard(vol_id)


# The check every flow ends with

def check(engine):
    """Every host, the loop devices and the shim agree with the engine.

    Per host: volumes_info lists exactly the engine's disks on that host,
    each attached in this boot with its device present; exactly those
    managed_path links exist, each pointing at the recorded path; exactly
    those udev rules exist.  The shim holds exactly one connection per
    (disk, host) the engine believes in (plus the connections ovirt-engine
    itself is known to leave, ``Engine.leaked``) and no pair has two
    records; each one's device, when saved, is that host's attach result
    (its managed_path), and is there wherever the engine saved it since
    its last connect; a loop device exists exactly for the volumes with
    a connection, and it is the path every host uses.
    """
    problems = []
    if engine.kills:
        # A kill asked for and never used would hit a later step.
        problems.append("shim kills never used: {}".format(engine.kills))
    if engine.before_attach:
        # Likewise an event whose connect_volume never answered.
        problems.append("events before an attach never run: {}".format(
            sorted(engine.before_attach)))
    expected = engine.expected()
    volumes = {v: d for d in engine.disks.values() for v in d.volumes()}
    loops = engine.backend.loop_devices()
    for name, host in engine.hosts.items():
        if not host.up:
            continue
        want = expected[name]
        infos = {i["vol_id"]: i for i in host.volumes_info()}
        if set(infos) != want:
            problems.append("{}: volumes_info has {}, engine believes {}"
                            .format(name, _labels(engine, infos),
                                    _labels(engine, want)))
        for vol_id in want & set(infos):
            info = infos[vol_id]
            label = volumes[vol_id].label
            if info.get("stale"):
                problems.append("{}: {} is stale".format(name, label))
            if not info.get("exists"):
                problems.append("{}: {} has no device ({})".format(
                    name, label, info.get("path")))
            elif info.get("path") not in loops:
                problems.append("{}: {} path {} is no loop device of the "
                                "backend {}".format(name, label,
                                                    info.get("path"), loops))
        links = host.links()
        want_links = {"{}_{}".format(engine.sd_id, v) for v in want}
        if set(links) != want_links:
            problems.append("{}: links {}, expected {}".format(
                name, sorted(links), sorted(want_links)))
        for link, target in links.items():
            vol_id = link.split("_", 1)[1]
            if vol_id in infos and infos[vol_id].get("path") != target:
                problems.append("{}: link of {} -> {}, journal says {}"
                                .format(name, vol_id, target,
                                        infos[vol_id].get("path")))
        want_rules = {"99-vdsm-managed_{}_{}.rules".format(engine.sd_id, v)
                      for v in want}
        if set(host.rules()) != want_rules:
            problems.append("{}: udev rules {}, expected {}".format(
                name, host.rules(), sorted(want_rules)))

    pairs = {(v, h) for h, vols in expected.items() for v in vols}
    connections = engine.backend.connections()
    if connections != pairs | engine.leaked:
        problems.append("shim connections {}, engine believes {} (+ known "
                        "leaks {})".format(sorted(connections), sorted(pairs),
                                           sorted(engine.leaked)))
    def connection_info(pair):
        vol_id, host = pair
        return json.loads(engine.shim("get_connection_info", vol_id, host,
                                      label=volumes[vol_id].label))

    # Each connection's conn_info and device, from the shim's database;
    # where the volume has several connections (the shim must pick the
    # host's), what the shim's get_connection_info answers for the host
    # too: one shim process each, a few at once, as the engine runs its
    # commands (a shim process per connection cost the flows with 50
    # VMs minutes).
    rows = engine.backend.rows()
    records = {(v, h): (done, info) for v, h, done, info in rows}
    for pair in sorted(records):
        count = sum(1 for v, h, _, _ in rows if (v, h) == pair)
        if count > 1:
            problems.append("shim: {} connections of {} to {}".format(
                count, *pair))
    pairs_checked = sorted(pairs & connections)
    shared = {v for v, _ in connections
              if sum(1 for w, _ in connections if w == v) > 1}
    pairs_asked = [p for p in pairs_checked if p[0] in shared]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(pairs_asked, pool.map(connection_info,
                                                 pairs_asked)))
    for (vol_id, host) in pairs_checked:
        info = records[(vol_id, host)][1]
        answer = answers.get((vol_id, host))
        if answer is not None and (
                answer["conn"] != info["conn"] or
                (answer.get("device") or None) != (info.get("device")
                                                   or None)):
            problems.append("shim: get_connection_info of {} on {} "
                            "answered {}, its record is {}".format(
                                vol_id, host, answer, info))
        device = info.get("device") or {}
        conn_path = info["conn"]["data"]["device_path"]
        if conn_path not in loops:
            problems.append("shim: connection of {} to {} names {}, not a "
                            "loop device".format(vol_id, host, conn_path))
        # Every host sees the same loop device: the attach result's
        # managed_path (a link of that host's) tells whose device it is.
        mine = os.path.join(engine.hosts[host].agent.state_dir, "run",
                            "managedvolumes", "{}_{}".format(engine.sd_id,
                                                             vol_id))
        if not device and (vol_id, host) in engine.saved:
            problems.append("shim: no device saved for {} on {}".format(
                vol_id, host))
        elif device and device.get("managed_path") != mine:
            problems.append("shim: saved device of {} on {} is another "
                            "host's: {}".format(vol_id, host, device))
        if device and device.get("path") != conn_path:
            problems.append("shim: saved device of {} on {} is {}".format(
                vol_id, host, device.get("path")))
    connected = {v for v, _ in connections}
    if len(loops) != len(connected):
        problems.append("loop devices {} for {} connected volumes".format(
            loops, len(connected)))
    live = engine.backend.live_volumes()
    if live != set(volumes) | engine.orphans:
        problems.append("shim volumes {}, engine has {} (+ forgotten "
                        "{})".format(sorted(live), sorted(volumes),
                                     sorted(engine.orphans)))
    files = sorted(n for n in _listdir(engine.backend.dir)
                   if n.startswith("volume-"))
    if files != sorted("volume-" + v for v in set(volumes) | engine.orphans):
        problems.append("volume files {}".format(files))
    snapshots = sorted(n for n in _listdir(engine.backend.dir)
                       if n.startswith("snapshot-"))
    if snapshots != sorted("snapshot-" + s for s in engine.snapshots):
        problems.append("snapshot files {}, engine has {}".format(
            snapshots, sorted(engine.snapshots)))
    if engine.backend.exporting:
        problems += _export_problems(engine, live)
    assert not problems, "\n".join(problems)


def _export_problems(engine, live):
    """An exporting driver's exports and grants (tests.flowexports) agree
    with the shim's connections: a volume is exported exactly while it
    has a connection, granted to the hosts of its complete connections
    and to none but its connections' (one left unfinished by a killed
    connect may or may not have been granted yet), and a deleted volume
    has nothing left."""
    problems = []
    states = engine.backend.connection_states()
    exports = engine.backend.exports()
    for vol_id in sorted(set(exports) | live):
        entry = exports.get(vol_id, {"export": False, "hosts": []})
        if vol_id not in live:
            problems.append("backend: deleted volume {} still has {}".format(
                vol_id, entry))
            continue
        conns = {h: done for (v, h), done in states.items() if v == vol_id}
        grants = set(entry["hosts"])
        least = {grantee(engine, h) for h, done in conns.items() if done}
        most = {grantee(engine, h) for h in conns}
        if entry["export"] != bool(conns) or not least <= grants <= most:
            problems.append("backend: volume {} has {}, its connections "
                            "{}".format(vol_id, entry, conns))
    return problems


def grantee(engine, host):
    """What the exporting driver grants ``host``'s connections to
    (engine_kill_test._grantee)."""
    connector = engine.hosts[host].connector
    return connector.get("initiator") or connector["host"]


def journals(engine):
    """{host: [(label, stale)]}: what each journal holds (docs, demo)."""
    labels = {d.vol_id: d.label for d in engine.disks.values()}
    return {name: [(labels.get(i["vol_id"], i["vol_id"]),
                    bool(i.get("stale")))
                   for i in host.volumes_info()]
            for name, host in engine.hosts.items() if host.up}


def _labels(engine, vol_ids):
    labels = {d.vol_id: d.label for d in engine.disks.values()}
    return sorted(labels.get(v, v) for v in vol_ids)


def _listdir(d):
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def write_through(host, engine, label, data):
    """Write ``data`` at 1 MiB into the disk through the host's
    managed_path (what the VM's qemu opens); return what reads back."""
    disk = engine.disks[label]
    path = os.path.join(host.agent.state_dir, "run", "managedvolumes",
                        "{}_{}".format(engine.sd_id, disk.vol_id))
    if data is not None:
        with open(path, "r+b") as f:
            f.seek(1024 * 1024)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    with open(path, "rb") as f:
        f.seek(1024 * 1024)
        return f.read(len(data) if data else 64)




def device_size(host, engine, label):
    """The size of the disk's device as the host's managed_path shows it."""
    disk = engine.disks[label]
    path = os.path.join(host.agent.state_dir, "run", "managedvolumes",
                        "{}_{}".format(engine.sd_id, disk.vol_id))
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def shim_env(cluster):
    """How the shim reaches the cluster's hosts (a callable: a rebooted
    host listens on a new port).  Names of the shim's host settings
    (args.ENV_HOST_*); a shim without them ignores them."""
    def env():
        return {
            "MANAGEDVOLUME_ENGINE_HOST_CERT": cluster.cert_file,
            "MANAGEDVOLUME_ENGINE_HOST_KEY": cluster.key_file,
            "MANAGEDVOLUME_ENGINE_HOST_CA": cluster.ca_file,
            "MANAGEDVOLUME_ENGINE_HOST_ADDRESSES": ",".join(
                "{}={}".format(name, host.address)
                for name, host in sorted(cluster.hosts.items())
                if host.up),
        }
    return env
