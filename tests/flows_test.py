"""oVirt's Managed Block Storage flows end to end (tests/flowengine.py).

Three real agents (host-a, host-b, host-c: own state dirs, ports,
certificates, boot ids, host names) serve the whole module; each flow gets
its own backend (FileDriver with loop devices) and database, SQLite or
PostgreSQL, and ends with ``flowengine.check``: every host's journal,
links and udev rules, the loop devices and the shim's connections agree
with what the engine believes.  docs/flows.md draws each flow.

A flow written before its feature lands is marked
``xfail(strict=True, reason="needs <branch>")``: strict, so the mark must
go the moment the feature makes it pass (the migration, fence and reboot
flows went through that).
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import threading

import pytest

from . import agentutil
from . import flowengine
from .flowengine import StepFailed, check

pytestmark = pytest.mark.root

HOSTS = ("host-a", "host-b", "host-c")
DATA = b"written by the VM before it moved"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("agents, loop devices and UTS namespaces need root")
    cluster = flowengine.Cluster(tmp_path_factory.mktemp("flows"))
    hosts = [cluster.add_host(name) for name in HOSTS]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
            list(pool.map(lambda h: h.start(), hosts))
        yield cluster
    finally:
        cluster.stop()


def _backend(request, tmp_path):
    kind = getattr(request, "param", "sqlite")
    if kind == "postgresql":
        return flowengine.postgres_backend(
            tmp_path, request.getfixturevalue("pg_cluster"))
    if kind == "exporting":
        return flowengine.exporting_backend(tmp_path)
    return flowengine.sqlite_backend(tmp_path)


@pytest.fixture
def backend(request, tmp_path):
    return _backend(request, tmp_path)


@pytest.fixture
def engine(cluster, backend, engine_service, engine_shim):
    for host in cluster.hosts.values():
        if not host.up:
            host.boot()
    eng = flowengine.Engine(engine_shim, backend, cluster.hosts,
                            shim_env=flowengine.shim_env(cluster))
    yield eng
    _clean_up(eng, cluster, backend)


def _clean_up(eng, cluster, backend):
    """Leave the module's hosts as a flow found them, pass or fail."""
    try:
        eng.cleanup()
    except Exception:
        pass
    for host in cluster.hosts.values():
        if not host.up:
            host.boot()
        for info in host.volumes_info():
            host.call("ManagedVolume.detach_volume",
                      {"vol_id": info["vol_id"], "sd_id": eng.sd_id})
    for dev in backend.loop_devices():
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def vm1_on_a(engine):
    """The opening most flows share: a disk "os", a VM "vm1" with it,
    run on host-a."""
    engine.add_disk("os")
    engine.add_vm("vm1", "os")
    engine.run_vm("vm1", "host-a")


# The driver whose exports and per-host grants are visible and whose
# steps can be killed (tests.flowexports, tests.engine_kill_test).
exporting = pytest.mark.parametrize("backend", ["exporting"], indirect=True)

both_databases = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql",
                                       marks=pytest.mark.postgres)],
    indirect=True)


# Run, stop

@both_databases
def test_run_vm_attaches_every_disk_and_stop_vm_leaves_nothing(engine):
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")

    engine.run_vm("vm1", "host-a")
    check(engine)
    a = engine.hosts["host-a"]
    assert flowengine.write_through(a, engine, "data", DATA) == DATA

    engine.stop_vm("vm1")
    check(engine)
    engine.cleanup()
    check(engine)


def test_a_failed_run_detaches_what_was_attached(engine):
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")
    # The second disk's attach fails on the host: the VM goes down and
    # ProcessDownVmCommand disconnects the disk that was attached; the
    # shim keeps the failed disk's connection until its next disconnect.
    engine.fail_next("host-a", "ManagedVolume.attach_volume", skip=1)
    with pytest.raises(StepFailed):
        engine.run_vm("vm1", "host-a")
    check(engine)

    engine.run_vm("vm1", "host-a")
    check(engine)
    engine.stop_vm("vm1")
    check(engine)


def test_a_run_whose_second_attach_fails_reruns_on_another_host(engine):
    """RunVmCommandBase.rerun runs the command again on the next host
    without ProcessDownVmCommand: the first disk's ATTACHED_VDS_ID is
    overwritten by the second host's, and ovirt-engine never detaches it
    on the first (an ovirt-engine leak).  The host keeps the record of
    this boot, the shim its connection (the host says it has the
    volume); a later run on that host gets 927 for that disk, until an
    admin detaches it there (or the host reboots)."""
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")
    engine.fail_next("host-a", "ManagedVolume.attach_volume", skip=1)

    assert engine.run_vm("vm1", "host-a", rerun_on=["host-b"]) == "host-b"
    assert flowengine.journals(engine) == {
        "host-a": [("os", False)], "host-b": sorted(
            [("os", False), ("data", False)],
            key=lambda j: engine.disks[j[0]].vol_id),
        "host-c": []}
    check(engine)
    engine.stop_vm("vm1")
    assert flowengine.journals(engine)["host-a"] == [("os", False)]
    check(engine)

    _runs_there_once_an_admin_detached(engine, "host-a")


def test_a_run_whose_attach_answers_too_late_leaves_the_disk_on_the_host(
        engine):
    """The host attached the disk but the engine gave up waiting
    (VDS_NETWORK_ERROR): RunVmCommand.runVm sets the VM Unknown on that
    host, VmAnalyzer.proceedDisappearedVm sets it Down once the host
    reports no such VM, and ProcessDownVmCommand finds no
    ATTACHED_VDS_ID: nothing detaches the disk there.  The next run
    elsewhere works; on that host it gets 927 until an admin detaches."""
    engine.add_disk("os")
    engine.add_vm("vm1", "os")
    engine.lose_next_reply("host-a", "ManagedVolume.attach_volume")
    with pytest.raises(StepFailed, match="no answer in time"):
        engine.run_vm("vm1", "host-a")
    assert engine.vms["vm1"].status == "unknown"
    engine.vm_disappeared("vm1")
    assert flowengine.journals(engine)["host-a"] == [("os", False)]
    check(engine)

    assert engine.run_vm("vm1", "host-a", rerun_on=["host-b"]) == "host-b"
    engine.stop_vm("vm1")
    check(engine)
    _runs_there_once_an_admin_detached(engine, "host-a")


def _runs_there_once_an_admin_detached(engine, host):
    """vm1's disk "os", left attached on ``host`` where the engine
    forgot it: vm1 cannot run there (the attach's 927) until an admin
    detaches it; then it runs, and stopped it leaves no connection."""
    with pytest.raises(StepFailed, match="is already attached"):
        engine.run_vm("vm1", host)
    engine.admin_detach(host, "os")
    engine.run_vm("vm1", host)
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    check(engine)


# Hot plug, hot unplug

def test_hot_plug_and_hot_unplug_of_a_disk_of_a_running_vm(engine):
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os")
    engine.run_vm("vm1", "host-a")
    a = engine.hosts["host-a"]

    engine.add_disk_to_vm("vm1", "data")
    engine.hot_plug("vm1", "data")
    check(engine)
    assert flowengine.write_through(a, engine, "data", DATA) == DATA
    # Plugged into a running VM: RemoveDiskCommand refuses, no shim call.
    with pytest.raises(StepFailed, match="VM_IS_NOT_DOWN"):
        engine.remove_disk("data")

    engine.hot_unplug("vm1", "data")
    assert [label for label, _ in flowengine.journals(engine)["host-a"]] \
        == ["os"]
    check(engine)
    # Unplugged, it may be removed while the VM runs.
    engine.remove_disk("data")
    check(engine)
    engine.stop_vm("vm1")
    check(engine)


def test_a_hot_plug_whose_vm_step_fails_keeps_the_disk_until_the_vm_stops(
        engine):
    """vdsm's VM.hotplugDisk fails after saveDevices attached the disk:
    HotPlugDiskToVmCommand undoes nothing.  The disk stays attached on
    the VM's host (ATTACHED_VDS_ID set, the device unplugged); a retry
    gets 927 (ovirt-engine attaches again), the engine lets the disk be
    removed (it is unplugged) and the shim refuses while the host has it;
    stopping the VM detaches it (ProcessDownVmCommand walks unplugged
    disks too), then it is removed."""
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os")
    engine.run_vm("vm1", "host-a")
    engine.add_disk_to_vm("vm1", "data")

    with pytest.raises(StepFailed, match="hotplugDisk"):
        engine.hot_plug("vm1", "data", fail_vm_step=True)
    assert engine.disks["data"].attached == "host-a"
    assert "data" not in engine.vms["vm1"].plugged
    check(engine)

    with pytest.raises(StepFailed, match="is already attached"):
        engine.hot_plug("vm1", "data")
    check(engine)

    with pytest.raises(StepFailed, match="is still attached on host host-a"):
        engine.remove_disk("data")
    a = engine.hosts["host-a"]
    assert flowengine.write_through(a, engine, "data", DATA) == DATA
    check(engine)

    engine.stop_vm("vm1")
    check(engine)
    engine.remove_disk("data")
    check(engine)


def test_a_hot_plug_whose_attach_fails_leaves_the_vm_as_it_was(engine):
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os")
    engine.run_vm("vm1", "host-a")
    engine.add_disk_to_vm("vm1", "data")
    engine.fail_next("host-a", "ManagedVolume.attach_volume")

    with pytest.raises(StepFailed, match="attach_volume"):
        engine.hot_plug("vm1", "data")
    check(engine)
    engine.hot_plug("vm1", "data")
    check(engine)
    engine.stop_vm("vm1")
    check(engine)


@pytest.mark.parametrize("first", ["plugged", "unplugged"])
def test_hot_unplug_then_migrate_leaves_the_unplugged_disk_attached(
        engine, first):
    """A hot unplug is refused while the VM migrates (isVmStatusIn Up,
    Paused, Down), so the order users hit is unplug, then migrate.
    MigrateVmCommand attaches *every* disk of the VM to the destination,
    the unplugged one included (updateDisksFromDb loads them all), but
    reportCompleted's disconnectManagedBlockStorageDisks stops its
    allMatch walk at that disk (no ATTACHED_VDS_ID: "attach has likely
    failed").  ovirt-engine's bug: the unplugged disk stays on the
    destination (DEST_VDS_ID), and when it comes first in the VM's disk
    map (a HashMap: any order) the source keeps the plugged disk too.
    The hosts and the shim agree with what the engine believes; nothing
    of ours can tell that nobody uses those attachments."""
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", *(("os", "data") if first == "plugged"
                           else ("data", "os")))
    engine.run_vm("vm1", "host-a")
    engine.hot_unplug("vm1", "data")
    check(engine)

    assert engine.migrate("vm1", "host-b")
    b_has = ["data", "os"]
    a_has = [] if first == "plugged" else ["os"]
    held = {h: sorted(label for label, _ in j)
            for h, j in flowengine.journals(engine).items()}
    assert held == {"host-a": a_has, "host-b": b_has, "host-c": []}
    check(engine)

    engine.stop_vm("vm1")
    held = {h: sorted(label for label, _ in j)
            for h, j in flowengine.journals(engine).items()}
    assert held == {"host-a": a_has,
                    "host-b": ["data"] if first == "plugged" else b_has,
                    "host-c": []}
    check(engine)


# An agent restarted or killed

@pytest.mark.parametrize("how", ["restart", "kill -9"])
def test_an_agent_restarted_under_a_running_vm_keeps_its_disks(engine, how):
    """vdsm restarted (systemctl restart) or killed and restarted by
    systemd while a VM runs: same boot, so the journal's replay keeps
    both attachments (links, rules, devices), and the VM's stop then
    leaves nothing."""
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")
    engine.run_vm("vm1", "host-a")
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "data", DATA)
    before = flowengine.journals(engine)

    if how == "restart":
        a.restart()
    else:
        a.crash()
        a.start()
    assert flowengine.journals(engine) == before
    check(engine)
    assert flowengine.write_through(a, engine, "data", None)[:len(DATA)] \
        == DATA

    engine.stop_vm("vm1")
    check(engine)


@pytest.mark.parametrize("point,again_on", [
    ("attach.after_connect", "host-b"),
    ("attach.after_link", "host-a"),
])
def test_an_agent_killed_in_a_run_vms_attach(engine, point, again_on):
    """The agent dies (SIGKILL) inside a RunVmCommand's attach, while
    another VM runs on the host: the engine gets VDS_NETWORK_ERROR (the
    VM Unknown, no rerun), systemd restarts the service (same boot) and
    its journal replay rolls the cut attach back and keeps the other
    VM's disk; the host reports no such VM (proceedDisappearedVm:
    ProcessDownVmCommand, nothing recorded to detach), and the VM is
    run again, there or elsewhere."""
    engine.add_disk("other")
    engine.add_vm("vm0", "other")
    engine.run_vm("vm0", "host-a")
    engine.add_disk("os")
    engine.add_vm("vm1", "os")
    a = engine.hosts["host-a"]
    a.arm(point)

    with pytest.raises(StepFailed) as e:
        engine.run_vm("vm1", "host-a")
    assert e.value.network
    a.crashed()
    assert flowengine.journals(engine)["host-a"] == [("other", False)]
    engine.vm_disappeared("vm1")
    check(engine)

    engine.run_vm("vm1", again_on)
    check(engine)
    engine.stop_vm("vm1")
    engine.stop_vm("vm0")
    assert engine.backend.connections() == set()
    check(engine)


@pytest.mark.parametrize("again_on", ["host-a", "host-b"])
def test_an_agent_killed_in_a_stop_vms_detach(engine, vm1_on_a, again_on):
    """The agent dies (SIGKILL) inside ProcessDownVmCommand's detach:
    DisconnectManagedBlockStorageDeviceCommand fails, so no
    disconnect_volume runs and the spec params are not saved (the engine
    still has the disk on A, the shim keeps A's connection).  systemd
    restarts the agent (same boot) and its journal replay finishes the
    detach.  The next run, on A (a first attach, no 927) or elsewhere
    (ATTACHED_VDS_ID overwritten), works, and its stop leaves nothing."""
    a = engine.hosts["host-a"]
    a.arm("detach.after_unlink")

    assert not engine.stop_vm("vm1")
    a.crashed()
    assert flowengine.journals(engine)["host-a"] == []
    assert engine.disks["os"].attached == "host-a"
    check(engine)

    engine.run_vm("vm1", again_on)
    check(engine)
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    check(engine)


@pytest.mark.parametrize("event", ["restart", "kill", "down"])
def test_an_agent_restarted_between_connect_volume_and_attach(engine,
                                                              event):
    """RunVmCommand on A: connect_volume for A answered, then A's agent
    restarts (systemctl restart), or is killed (kill -9 of the agent and
    its daemon, systemd's restart), before the engine's attach_volume
    reaches it; or the attach comes while it is still down.  Up again,
    the agent knows nothing of the volume and attaches it as a first
    attach with the connection_info the shim gave before: the VM runs
    on A.  Down: the engine gets no answer (VDS_NETWORK_ERROR), the VM
    is Unknown on A with no rerun, then Down once A answers and does
    not report it; nothing records A, so the connection the shim made
    stays (a leak the next disconnect_volume ends) and the run again on
    A reuses it.  Either way the stop leaves nothing; other's VM on A
    keeps its disk throughout."""
    engine.add_disk("os")
    engine.add_disk("other")
    engine.add_vm("vm0", "other")
    engine.add_vm("vm1", "os")
    engine.run_vm("vm0", "host-a")
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "other", DATA)
    vol = engine.disks["os"].vol_id
    engine.between_connect_and_attach("host-a", {
        "restart": a.restart,
        "kill": lambda: (a.crash(), a.start()),
        "down": a.stop}[event])

    if event == "down":
        with pytest.raises(StepFailed) as e:
            engine.run_vm("vm1", "host-a", rerun_on=["host-b"])
        assert e.value.network
        assert engine.vms["vm1"].status == "unknown"
        a.start()
        engine.vm_disappeared("vm1")
        assert engine.leaked == {(vol, "host-a")}
        assert flowengine.journals(engine)["host-a"] == [("other", False)]
        check(engine)
        engine.run_vm("vm1", "host-a")
    else:
        assert engine.run_vm("vm1", "host-a",
                             rerun_on=["host-b"]) == "host-a"
    assert flowengine.journals(engine)["host-a"] == sorted(
        [("os", False), ("other", False)],
        key=lambda j: engine.disks[j[0]].vol_id)
    assert flowengine.write_through(a, engine, "other", None)[:len(DATA)] \
        == DATA
    check(engine)
    engine.stop_vm("vm1")
    engine.stop_vm("vm0")
    assert engine.backend.connections() == set()
    check(engine)


# The engine shim killed mid-command

def _kill_point(steps, where):
    """The step number ``Engine.kill_next`` takes: "start" (before the
    first step), or the step after which ``where`` (``name`` or
    ``(name, nth)`` for a name the command takes several times)
    ended."""
    if where == "start":
        return 0
    name, nth = where if isinstance(where, tuple) else (where, 0)
    return [i for i, step in enumerate(steps) if step == name][nth]


# Where connect_volume (a new connection) and save_device are killed:
# before anything, after the export (create_export), after the
# connection's record (CONNECTING), after the grant
# (initialize_connection), after its conn_info (the volume's status
# after it changes nothing the engine sees); save_device after its
# write (killed before it, the engine sees the same failure and the
# shim holds the device-less complete connection "completed" leaves).
# The record exists from the third on.  engine_kill_test kills the
# shim at every step of connect, disconnect and delete; the flows,
# where what the engine or the next command finds differs.
CONNECT_KILLS = {
    "start": "start",
    "exported": "create_export:after",
    "recorded": ("db.set_connection:after", 0),
    "granted": "initialize_connection:after",
    "completed": ("db.set_connection:after", 1),
}


SAVE_KILLS = {"saved": "db.set_connection:after"}


@pytest.mark.slow
@exporting
@pytest.mark.parametrize("command,where", [
    ("connect_volume", name) for name in CONNECT_KILLS] + [
    ("save_device", name) for name in SAVE_KILLS])
def test_a_run_whose_shim_is_killed_reruns_on_another_host(
        engine, command, where):
    """The engine's shim is SIGKILLed inside a RunVmCommand's
    connect_volume (or save_device, after the host attached): a non-zero
    exit for ManagedBlockExecutor, so attachManagedBlockStorageDisks
    returns false and RunVmCommand.runVm reruns the command on another
    host (RunVmCommandBase.rerun, no ProcessDownVmCommand between).
    What the kill left, a connection record to the first host with or
    without its grant, an export, is ended by the stop's
    disconnect_volume (the first host, asked, does not have the volume:
    only a killed save_device leaves it attached there, forgotten by the
    engine as any rerun's first host, until an admin detaches it).  The
    backend's grants and exports follow the connections at every step;
    after the disk's removal nothing is left: no record, no grant, no
    export, no lock, no loop device, no journal record."""
    engine.add_disk("os")
    engine.add_vm("vm1", "os")
    vol = engine.disks["os"].vol_id
    if command == "connect_volume":
        steps = engine.steps("connect_volume", host="host-a")
        at = CONNECT_KILLS[where]
    else:
        steps = engine.steps("save_device", json.dumps({"path": "/dev/x"}),
                             host="host-a", connected=True)
        at = SAVE_KILLS[where]
    with engine.killing(command, _kill_point(steps, at)):
        assert engine.run_vm("vm1", "host-a",
                             rerun_on=["host-b"]) == "host-b"
    states = engine.backend.connection_states()
    if command == "save_device":
        # The host attached: the rerun forgot it there (as a run rerun).
        assert flowengine.journals(engine)["host-a"] == [("os", False)]
        assert states == {(vol, "host-a"): True, (vol, "host-b"): True}
    else:
        assert flowengine.journals(engine)["host-a"] == []
        # Nothing records A: a record the kill left is ended by the next
        # disconnect_volume (the engine reads it as a leak).
        recorded = list(CONNECT_KILLS).index(where) >= 2
        assert ((vol, "host-a") in states) == recorded
        assert engine.leaked == ({(vol, "host-a")} if recorded else set())
    check(engine)
    flowengine.write_through(engine.hosts["host-b"], engine, "os", DATA)

    engine.stop_vm("vm1")
    if command == "save_device":
        assert engine.backend.connections() == {(vol, "host-a")}
        check(engine)
        engine.admin_detach("host-a", "os")
        engine.run_vm("vm1", "host-a")
        assert flowengine.write_through(engine.hosts["host-a"], engine,
                                        "os", None)[:len(DATA)] == DATA
        engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    assert engine.backend.exports() == {vol: {"export": False,
                                              "hosts": []}}
    check(engine)
    assert engine.remove_vm("vm1") == []
    assert engine.backend.exports() == {}
    assert _locks_of(engine, vol) == []
    check(engine)


@exporting
def test_a_connection_never_granted_is_asked_about_only_once_it_is_the_last(
        engine):
    """connect_volume for A is killed after its record, before the
    driver's grant: the RunVm reruns on B, and A's record waits,
    unfinished, for the volume's last complete connection to end (the
    shim ends it with the driver only then: docs/engine.md).  The
    migration B -> C's disconnect_volume asks B and C, not A: its answer
    could not end that record beside C's, and a host that does not
    answer costs the host timeout at every stop or migration.  The VM's
    stop on C leaves no complete connection: A is asked then, and its
    record ended."""
    engine.add_disk("os")
    engine.add_vm("vm1", "os")
    vol = engine.disks["os"].vol_id
    a = engine.hosts["host-a"]
    steps = engine.steps("connect_volume", host="host-a")
    with engine.killing("connect_volume",
                        _kill_point(steps, CONNECT_KILLS["recorded"])):
        assert engine.run_vm("vm1", "host-a",
                             rerun_on=["host-b"]) == "host-b"
    assert engine.backend.connection_states() == {
        (vol, "host-a"): False, (vol, "host-b"): True}
    asked = a.started("ManagedVolume.volumes_info", vol)
    # The driver ends every grant for a connector it has no grant of
    # (Dell SC iSCSI: tests.engine_kill_test's ``unmap-all``): A's
    # record ended beside C's would cut C's VM, which the check sees.
    open(os.path.join(engine.backend.dir, "unmap-all"), "w").close()

    assert engine.migrate("vm1", "host-c")
    assert a.started("ManagedVolume.volumes_info", vol) == asked
    assert engine.backend.connection_states() == {
        (vol, "host-a"): False, (vol, "host-c"): True}
    check(engine)

    engine.stop_vm("vm1")
    assert a.started("ManagedVolume.volumes_info", vol) == asked + 1
    assert engine.backend.connections() == set()
    check(engine)


# Where disconnect_volume (the engine's form: no host, the only
# connection's host asked) is killed: before anything, after the
# connection is marked ending, after its grant's end
# (terminate_connection), after its record's deletion (the export
# left).  The record is left by the first three.  Killed after the
# export's removal the shim holds what a completed disconnect leaves
# and the engine what "start" leaves it: both covered.  Each point
# is followed by a run on one host, the one where a wrong reuse or a
# wrong end would show (a run on the same host reuses what is left).
DISCONNECT_KILLS = {
    "start": "start",
    "ending": "db.set_connection:after",
    "revoked": "terminate_connection:after",
    "deleted": "db.delete_connection:after",
}


@pytest.mark.slow
@exporting
@pytest.mark.parametrize("where,again_on", [
    ("start", "host-b"), ("ending", "host-a"), ("revoked", "host-a"),
    ("deleted", "host-b")])
def test_a_stop_whose_shim_is_killed_in_disconnect_runs_again(
        engine, vm1_on_a, where, again_on):
    """The shim is SIGKILLed inside a stop's disconnect_volume, after
    the host detached: DisconnectManagedBlockStorageDeviceCommand fails,
    the spec params are not saved (the engine still has the disk on A)
    and the connection, or what the kill left of it, stays.  The VM's
    next run, on A (connect_volume reuses or connects again what is
    left; a first attach there) or on B (ATTACHED_VDS_ID overwritten),
    works, and its stop's disconnect_volume ends everything: no record,
    grant or export left, then the disk's removal leaves nothing.
    Killed after the record's deletion, the export (its loop device) is
    left with no record until then."""
    vol = engine.disks["os"].vol_id
    steps = engine.steps("disconnect_volume", host="host-a", connected=True)
    with engine.killing("disconnect_volume", _kill_point(
            steps, DISCONNECT_KILLS[where])):
        assert not engine.stop_vm("vm1")
    assert engine.disks["os"].attached == "host-a"
    assert flowengine.journals(engine)["host-a"] == []
    left = list(DISCONNECT_KILLS).index(where) < 3
    assert set(engine.backend.connections()) == (
        {(vol, "host-a")} if left else set())
    assert engine.leaked == ({(vol, "host-a")} if left else set())
    if where == "deleted":
        # An export (and its loop device) no record names, until the
        # volume's next connect reuses it or its next disconnect_volume
        # or delete_volume removes it.
        assert engine.backend.exports() == {vol: {"export": True,
                                                  "hosts": []}}
        assert len(engine.backend.loop_devices()) == 1
    else:
        check(engine)

    engine.run_vm("vm1", again_on)
    check(engine)
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    assert engine.backend.exports() == {vol: {"export": False,
                                              "hosts": []}}
    check(engine)
    assert engine.remove_vm("vm1") == []
    assert engine.backend.exports() == {}
    check(engine)


# Where delete_volume (no connection left) can be killed: before
# anything, after the driver's delete (the file gone, the record not),
# after the record's deletion (nothing printed).  After the export's
# removal the volume is as at the start (no connection: nothing was
# exported).
DELETE_KILLS = ["start", "delete_volume:after", "db.delete_volume:after"]


@pytest.mark.slow
@exporting
@pytest.mark.parametrize("where", DELETE_KILLS)
def test_a_disk_removal_whose_shim_is_killed_is_removed_again(
        engine, vm1_on_a, where):
    """The shim is SIGKILLed inside RemoveManagedBlockStorageDiskCommand's
    delete_volume (RemoveDiskCommand, its VM down): a non-zero exit, so
    the command returns before removeDiskFromDb and the disk stays in
    the engine, unlocked (endWithFailure); the user removes it again,
    and that delete_volume finishes what the first left (or finds the
    volume gone: "error:", exit 0, a success for the engine).  Nothing
    is left: no record, no export, no file, no lock.  Killed after the
    driver's delete, the disk the engine still lists has no data: its
    VM's run fails at connect_volume and leaves nothing."""
    engine.stop_vm("vm1")
    vol = engine.disks["os"].vol_id
    steps = engine.steps("delete_volume")
    with engine.killing("delete_volume", _kill_point(steps, where)), \
            pytest.raises(StepFailed) as e:
        engine.remove_disk("os")
    assert e.value.killed
    assert "os" in engine.disks
    assert (vol in engine.backend.live_volumes()) == (
        where != "db.delete_volume:after")
    assert os.path.exists(os.path.join(engine.backend.dir,
                                       "volume-" + vol)) == (where == "start")
    assert flowengine.journals(engine) == {h: [] for h in HOSTS}
    if where == "delete_volume:after":
        # The engine still lists the disk, its data gone: a run fails at
        # connect_volume, and leaves nothing (runningFailed).
        with pytest.raises(StepFailed, match="connect_volume"):
            engine.run_vm("vm1", "host-a")
        assert engine.backend.connections() == set()
        assert engine.backend.loop_devices() == []

    engine.remove_disk("os")
    assert engine.vms["vm1"].disks == []
    assert engine.backend.exports() == {}
    assert _locks_of(engine, vol) == []
    check(engine)


def _locks_of(engine, vol_id):
    locks = engine.shim_runner.env["MANAGEDVOLUME_ENGINE_LOCKS_DIR"]
    return [n for n in os.listdir(locks) if vol_id in n]


# Live migration

@both_databases
def test_live_migration_keeps_the_disk_on_the_destination(engine, vm1_on_a):
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)

    assert engine.migrate("vm1", "host-b")
    check(engine)
    b = engine.hosts["host-b"]
    assert flowengine.write_through(b, engine, "os", None)[:len(DATA)] == DATA

    engine.stop_vm("vm1")
    check(engine)


@pytest.mark.parametrize("fail_at", [
    "connect_volume", "attach_volume", "save_device", "migrate"])
def test_a_failed_live_migration_leaves_the_vm_running_on_the_source(
        engine, fail_at):
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")
    engine.run_vm("vm1", "host-a")
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "data", DATA)

    assert not engine.migrate("vm1", "host-b", fail_at=fail_at)
    assert engine.vms["vm1"].run_on == "host-a"
    check(engine)
    assert flowengine.write_through(a, engine, "data", None)[:len(DATA)] \
        == DATA

    engine.stop_vm("vm1")
    check(engine)


def test_a_disk_grown_while_its_vm_migrates_is_grown_on_both_hosts(
        engine, vm1_on_a):
    """ovirt-engine refuses to extend a disk of a migrating VM
    (UpdateDiskCommand: ActionUtils.canExecute(ExtendImageSize) is false
    for MigratingFrom), but an extend validated while the VM was Up runs
    on: ExtendManagedBlockStorageDiskSizeCommand (extend_volume) lands
    while MigrateVmCommand has attached the disk on the destination.
    The host step (ManagedVolume.extend_volume) then runs on both hosts
    that hold the disk, the source (ATTACHED_VDS_ID) and the destination
    (DEST_VDS_ID): after reportCompleted the destination has the new
    size recorded and its device shows it, and the VM's data is there."""
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)
    grown = {}

    def extend():
        grown.update(engine.extend_disk("os", 2))

    assert engine.migrate("vm1", "host-b", during=extend)
    assert grown == {"host-a": 2 * 1024**3, "host-b": 2 * 1024**3}
    b = engine.hosts["host-b"]
    assert flowengine.device_size(b, engine, "os") == 2 * 1024**3
    assert [i["size"] for i in b.volumes_info()] == [2 * 1024**3]
    assert flowengine.write_through(b, engine, "os", None)[:len(DATA)] == DATA
    check(engine)
    engine.stop_vm("vm1")
    check(engine)


@pytest.mark.parametrize("first", ["extend", "detach"])
def test_a_disk_grown_on_a_migrations_source_while_it_is_detached_there(
        engine, tmp_path, first):
    """The extend lands while the VM migrates (as above); its host step
    on the source (ManagedVolume.extend_volume on ATTACHED_VDS_ID) runs
    at the same time as reportCompleted's detach there.  The volume's
    lock on the source orders the two, whichever comes in first: the
    first is held in the connector, under the lock, until the other
    call has come in (its START line), then the storage answers.
    Extend first: the source rescans and answers the new size, then the
    detach leaves nothing.  Detach first: the extend then finds nothing
    attached, NotAttached (-32602) with nothing rescanned.  Either way
    the source holds nothing, the destination the disk at its new size
    with the VM's data, the shim one connection (B)."""
    engine.add_disk("os")
    engine.add_vm("vm1", "os")
    a, b = engine.hosts["host-a"], engine.hosts["host-b"]
    answers = str(tmp_path / "storage-answers")
    engine.hold_in_connector(
        "host-a", "extend" if first == "extend" else "disconnect", answers)
    engine.run_vm("vm1", "host-a")
    flowengine.write_through(a, engine, "os", DATA)
    vol = engine.disks["os"].vol_id
    key = "local-" + os.path.basename(a.volumes_info()[0]["path"])
    mark = len(a.connects())
    source = {}

    def grow_source():
        try:
            source["size"] = engine.grow_on("host-a", "os")
        except StepFailed as e:
            source["error"] = e.__context__

    def held(step):
        return "{}-start {}".format(step, key) in a.connects(mark)

    def answer_once(verb):
        agentutil.wait_for(lambda: a.started(verb, vol) == 1)
        with open(answers, "w"):
            pass

    grow = threading.Thread(target=grow_source)
    if first == "extend":
        # The extend holds the lock in the connector; reportCompleted's
        # detach comes in (migrate, after ``during``) and waits.
        side = threading.Thread(target=answer_once,
                                args=("ManagedVolume.detach_volume",))
    else:
        # reportCompleted's detach holds the lock in the connector's
        # disconnect; the extend comes in and waits.
        def extend_while_detached():
            agentutil.wait_for(lambda: held("disconnect"))
            grow.start()
            answer_once("ManagedVolume.extend_volume")
        side = threading.Thread(target=extend_while_detached)

    def during():
        # ExtendManagedBlockStorageDiskSize: the backend grows the
        # volume; the host step on the destination, then on the source.
        engine.shim("extend_volume", vol, 2, label="os")
        engine.disks["os"].size = 2
        assert engine.grow_on("host-b", "os") == 2 * 1024**3
        if first == "extend":
            grow.start()
            agentutil.wait_for(lambda: held("extend"))
        side.start()

    try:
        assert engine.migrate("vm1", "host-b", during=during)
    finally:
        with open(answers, "w"):
            pass
        side.join(120)
        if grow.ident is not None:
            grow.join(120)
    assert not side.is_alive() and not grow.is_alive()

    calls = [c.split()[0] for c in a.connects(mark) if c.endswith(key)]
    if first == "extend":
        assert source == {"size": 2 * 1024**3}
        assert calls == ["extend-start", "extend", "disconnect-start",
                         "disconnect"]
    else:
        error = source["error"]
        assert error.code == -32602 and vol in str(error), error
        assert calls == ["disconnect-start", "disconnect"]
    assert flowengine.journals(engine) == {
        "host-a": [], "host-b": [("os", False)], "host-c": []}
    assert [i["size"] for i in b.volumes_info()] == [2 * 1024**3]
    assert flowengine.device_size(b, engine, "os") == 2 * 1024**3
    assert flowengine.write_through(b, engine, "os", None)[:len(DATA)] == DATA
    assert engine.backend.connections() == {(vol, "host-b")}
    check(engine)
    engine.stop_vm("vm1")
    check(engine)


def test_a_migration_that_fails_after_it_started_is_rerun_to_another_host(
        engine, vm1_on_a):
    """vdsm reports the VM running on the source again: VmAnalyzer sets
    the rerun flag and MigrateVmCommand.rerun (the VM is Up) runs the
    command again to the next host the scheduler picks, with no
    runningFailed between.  The first destination keeps the disk (its
    DEST_VDS_ID was overwritten: the engine forgot it) and the shim its
    connection (the host says it has the volume); a later run there gets
    927 until an admin detaches it (or the host reboots)."""
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)

    assert engine.migrate("vm1", "host-b", fail_at="migrate",
                          rerun_on=["host-c"])
    assert engine.vms["vm1"].run_on == "host-c"
    assert flowengine.journals(engine) == {
        "host-a": [], "host-b": [("os", False)], "host-c": [("os", False)]}
    check(engine)
    c = engine.hosts["host-c"]
    assert flowengine.write_through(c, engine, "os", None)[:len(DATA)] == DATA

    engine.stop_vm("vm1")
    vol = engine.disks["os"].vol_id
    assert engine.backend.connections() == {(vol, "host-b")}
    check(engine)
    _runs_there_once_an_admin_detached(engine, "host-b")


def test_a_host_to_maintenance_migrates_its_vms_away(engine):
    """MaintenanceVdsCommand migrates every VM of the host
    (MigrateMultipleVmsCommand: MigrateVmToServer one after the other,
    each attaching on its destination); the reportCompleted of each
    comes back on its own, here all at once: each detaches on the
    source and disconnect_volume ends the source's connection only."""
    a = engine.hosts["host-a"]
    for i in range(3):
        engine.add_disk("os{}".format(i))
        engine.add_vm("vm{}".format(i), "os{}".format(i))
        engine.run_vm("vm{}".format(i), "host-a")
        flowengine.write_through(a, engine, "os{}".format(i), DATA)
    engine.add_disk("os3")
    engine.add_disk("data")
    engine.add_vm("vm3", "os3", "data")
    engine.run_vm("vm3", "host-a")
    check(engine)

    placed = engine.maintenance("host-a", ["host-b", "host-c"])
    assert placed == {"vm0": "host-b", "vm1": "host-c", "vm2": "host-b",
                      "vm3": "host-c"}
    assert flowengine.journals(engine)["host-a"] == []
    check(engine)
    for i in range(3):
        host = engine.hosts[placed["vm{}".format(i)]]
        assert flowengine.write_through(host, engine, "os{}".format(i),
                                        None)[:len(DATA)] == DATA

    for name in placed:
        engine.stop_vm(name)
    assert engine.backend.connections() == set()
    check(engine)


@pytest.mark.parametrize("landed", ["first", "last"])
def test_a_host_put_to_maintenance_while_an_ha_restart_lands_on_it(
        engine, tmp_path, landed):
    """A is fenced; HaAutoStartVmsRunner runs its HA VMs one after the
    other, the first scheduled on B (Up then).  While its attach waits
    in B's storage, an admin moves B to maintenance: B is
    PreparingForMaintenance (the scheduler skips it from then on) and
    MigrateMultipleVmsCommand migrates the VMs running on B (run_on_vds:
    not the HA VM, a RunVm sets it only once it created the VM) to C.
    The HA VM's attach answers and it runs on B either while those
    migrations are in flight (``first``: B cannot reach Maintenance,
    the monitoring's retry after HostPreparingForMaintenanceIdleTime
    migrates it) or after their reportCompleted detached on B and
    disconnected beside the held attach (``last``: the monitoring may
    have moved B to Maintenance in between; an admin activates B and
    moves it again, the same migration).  The next HA VMs go to C.
    Every VM reads what it wrote; A boots and drops its records of the
    earlier boot; after the stops nothing is left."""
    a, b, c = (engine.hosts[h] for h in HOSTS)
    engine.add_disk("b0")
    engine.add_vm("vm-b0", "b0")
    engine.add_disk("b1")
    engine.add_disk("b1-data")
    engine.add_vm("vm-b1", "b1", "b1-data")
    ha = ["vm-ha{}".format(i) for i in range(3)]
    for name in ha:
        engine.add_disk(name[3:])
        engine.add_vm(name, name[3:])
        engine.run_vm(name, "host-a")
        flowengine.write_through(a, engine, name[3:], DATA)
    for name in ("vm-b0", "vm-b1"):
        engine.run_vm(name, "host-b")
    for label in ("b0", "b1-data"):
        flowengine.write_through(b, engine, label, DATA)
    check(engine)

    a.crash()                          # fenced: power off
    engine.host_down("host-a")         # its VMs down; detach on A fails
    barrier = str(tmp_path / "storage-answers")
    engine.hold_attaches("host-b", barrier)
    mark = len(b.connects())

    def ha0_lands():
        # B's VMs migrate (their disks attached on C, the memory
        # moving); the HA VM's attach answers and the VM is created.
        open(barrier, "w").close()
        agentutil.wait_for(lambda: engine.vms["vm-ha0"].run_on == "host-b")

    with concurrent.futures.ThreadPoolExecutor(1) as runner:
        restart = runner.submit(engine.ha_restart, ha, ["host-b", "host-c"])
        try:
            agentutil.wait_for(lambda: any(
                line.startswith("connect-start ")
                for line in b.connects(mark)))
            placed = engine.maintenance(
                "host-b", ["host-c"],
                performed=ha0_lands if landed == "first" else None)
            assert placed == {"vm-b0": "host-c", "vm-b1": "host-c"}
            if landed == "last":
                # B's VMs left, each disk detached on B and its
                # connection ended, while the HA VM's attach still waits
                # in B's storage.
                assert engine.attaches_held("host-b", mark)
                assert not restart.done()
        finally:
            open(barrier, "w").close()
        assert restart.result() == {"vm-ha0": "host-b", "vm-ha1": "host-c",
                                    "vm-ha2": "host-c"}
    assert flowengine.journals(engine) == {
        "host-b": [("ha0", False)],
        "host-c": sorted([(label, False) for label in
                          ("b0", "b1", "b1-data", "ha1", "ha2")],
                         key=lambda j: engine.disks[j[0]].vol_id)}
    check(engine)

    # The monitoring's retry (``first``), or the admin's Activate
    # (ActivateVdsCommand -> InitVdsOnUp refreshes B's capabilities)
    # and Maintenance again (``last``).
    if landed == "last":
        engine.refresh_caps("host-b")
    assert engine.maintenance("host-b", ["host-c"]) == {"vm-ha0": "host-c"}
    assert flowengine.journals(engine)["host-b"] == []
    for label in ("ha0", "ha1", "ha2", "b0", "b1-data"):
        assert flowengine.write_through(c, engine, label, None)[
            :len(DATA)] == DATA, label
    check(engine)

    a.boot()                           # new boot id, devices back
    agentutil.wait_for(lambda: a.volumes_info() == [])
    check(engine)
    for name in ha + ["vm-b0", "vm-b1"]:
        engine.stop_vm(name)
    assert engine.backend.connections() == set()
    check(engine)


def test_a_migration_to_a_host_put_to_maintenance_is_cancelled_and_rerun(
        engine, vm1_on_a):
    """The VM migrates from A to B (its disk attached on B, DEST_VDS_ID
    B) when an admin moves B to maintenance:
    MaintenanceNumberOfVdssCommand.cancelIncomingMigrations cancels the
    migration (CancelMigrate), the VM runs on A again, VmAnalyzer sets
    the rerun flag and MigrateVmCommand.rerun performs again to C (B is
    not Up any more), DEST_VDS_ID overwritten: B keeps the disk
    attached, forgotten by the engine, and the shim its connection (B
    says it has the volume) while B goes to Maintenance, until an admin
    detaches it there (or B reboots)."""
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)

    def maintenance_of_b():
        assert engine.maintenance("host-b", ["host-c"]) == {}
        engine.note("engine", "host-a", "migrate vm1 to host-b",
                    "CancelMigrate (cancelIncomingMigrations)")

    assert engine.migrate("vm1", "host-b", fail_at="migrate",
                          rerun_on=["host-c"], during=maintenance_of_b)
    assert engine.vms["vm1"].run_on == "host-c"
    assert flowengine.journals(engine) == {
        "host-a": [], "host-b": [("os", False)], "host-c": [("os", False)]}
    check(engine)
    c = engine.hosts["host-c"]
    assert flowengine.write_through(c, engine, "os", None)[:len(DATA)] == DATA

    engine.admin_detach("host-b", "os")
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    check(engine)


def test_a_host_the_shim_cannot_ask_keeps_its_connection_until_asked(
        engine, vm1_on_a):
    # A migration whose attach fails on B leaves B's connection (nothing
    # records B), then B goes down.
    assert not engine.migrate("vm1", "host-b", fail_at="attach_volume")
    b = engine.hosts["host-b"]
    b.crash()

    # Stopping the VM disconnects: the shim asks A (detached) and cannot
    # ask B, so it ends A's connection only.
    engine.stop_vm("vm1")
    vol = engine.disks["os"].vol_id
    assert engine.backend.connections() == {(vol, "host-b")}
    check(engine)

    # B is back; the next disconnect of the disk asks it, and it ends.
    b.boot()
    engine.run_vm("vm1", "host-a")
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    check(engine)


@exporting
@pytest.mark.parametrize("then", ["stop", "remove"])
def test_a_disconnect_whose_terminate_fails_is_ended_by_the_next_one(
        engine, vm1_on_a, engine_service, then):
    """The driver's terminate_connection of the released host's grant
    fails (the backend does not answer) in the engine's
    disconnect_volume: after a migration's reportCompleted (the source
    A), or a stop.  The shim ends what else it released, logs an ERROR
    and exits 0, keeping A's record "detached" with its grant: the
    engine saves the disk's hosts (ATTACHED_VDS_ID := B after the
    migration) and never learns of it.  The volume's next
    disconnect_volume (the VM's stop on B) or delete_volume (the disk's
    removal) ends it; the check counts it as a leak meanwhile."""
    b = engine.hosts["host-b"]
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)
    vol = engine.disks["os"].vol_id
    engine.fail_next_terminate("disconnect_volume", "host-a", "os")
    if then == "stop":
        assert engine.migrate("vm1", "host-b")
        assert engine.disks["os"].attached == "host-b"
        kept = {(vol, "host-a"): False, (vol, "host-b"): True}
    else:
        engine.stop_vm("vm1")
        assert engine.disks["os"].attached is None
        kept = {(vol, "host-a"): False}
    assert engine.backend.connection_states() == kept
    assert engine.leaked == {(vol, "host-a")}
    failure = "Could not end 1 connection(s) of volume {} (host host-a: " \
              "".format(vol)
    assert "ERROR" in [line for line in engine_service.log().splitlines()
                       if failure in line][-1]
    check(engine)

    if then == "stop":
        assert flowengine.write_through(b, engine, "os", None)[
            :len(DATA)] == DATA
        engine.stop_vm("vm1")
    else:
        engine.remove_disk("os")
    assert engine.backend.connection_states() == {}
    assert engine.leaked == frozenset()
    check(engine)



@exporting
def test_a_kept_end_of_a_host_the_shim_cannot_ask_is_ended_all_the_same(
        engine, vm1_on_a):
    """A's connection, kept "detached" by a disconnect_volume whose
    terminate_connection failed (the migration to B's reportCompleted),
    is ended by the volume's next disconnect_volume even while A cannot
    be asked: a record left unfinished is released without its host's
    answer (ops._released_of: no attach went through it since), and it
    is no complete connection either.  (The harness took such a leak of
    a host it cannot ask for a complete connection the shim keeps.)"""
    vol = engine.disks["os"].vol_id
    engine.fail_next_terminate("disconnect_volume", "host-a", "os")
    assert engine.migrate("vm1", "host-b")
    assert engine.backend.connection_states() == {
        (vol, "host-a"): False, (vol, "host-b"): True}
    a = engine.hosts["host-a"]
    a.crash()
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    assert engine.leaked == frozenset()
    check(engine)
    a.boot()
    check(engine)


# Fence, reboot

@both_databases
def test_fence_a_restart_on_b_then_migrate_back_to_a(engine, vm1_on_a):
    a = engine.hosts["host-a"]

    a.crash()                          # fenced: power off
    engine.host_down("host-a")         # its VMs down; detach on A fails
    engine.run_vm("vm1", "host-b")     # HA restart
    check(engine)

    a.boot()                           # same devices, new boot id
    # Its agent detached the record of the earlier boot at start.
    assert flowengine.journals(engine)["host-a"] == []
    assert engine.migrate("vm1", "host-a")
    check(engine)
    engine.stop_vm("vm1")
    check(engine)


def test_fence_a_restart_on_b_then_stop_on_b(engine, vm1_on_a):
    """The VM never goes back to A: ovirt-engine detaches only on the
    host the VM device names (B now), so A's agent must drop its record
    of the fenced boot by itself, and the shim ends A's connection."""
    a = engine.hosts["host-a"]
    a.crash()
    engine.host_down("host-a")
    engine.run_vm("vm1", "host-b")
    a.boot()
    assert flowengine.journals(engine) == {
        "host-a": [], "host-b": [("os", False)], "host-c": []}
    check(engine)
    engine.stop_vm("vm1")
    assert engine.backend.connections() == set()
    check(engine)


@both_databases
def test_a_host_rebooted_with_its_vms_down_runs_them_again(engine):
    """oVirt/vdsm#433: the device came back at boot, the journal still
    holds its record; the engine's next attach must not get 927."""
    for i in (1, 2):
        engine.add_disk("disk{}".format(i))
        engine.add_vm("vm{}".format(i), "disk{}".format(i))
        engine.run_vm("vm{}".format(i), "host-a")
    a = engine.hosts["host-a"]

    a.crash()
    engine.host_down("host-a")
    a.boot()
    # The records of the previous boot were detached at start: nothing
    # blocks the attach (no 927), nothing waits for a detach.
    assert flowengine.journals(engine)["host-a"] == []
    for i in (1, 2):
        engine.run_vm("vm{}".format(i), "host-a")
    check(engine)
    for i in (1, 2):
        engine.stop_vm("vm{}".format(i))
    check(engine)


# Disk operations while attached

def test_clone_snapshot_and_extend_while_attached(engine, vm1_on_a):
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "os", DATA)

    snap = engine.snapshot_disk("os")
    engine.clone_disk("os", "os-clone")
    # The storage grows the volume, the host sees it (the VM's qemu would
    # after libvirt's blockResize): through the managed_path too.
    assert engine.extend_disk("os", 2) == {"host-a": 2 * 1024**3}
    check(engine)
    assert flowengine.device_size(a, engine, "os") == 2 * 1024**3

    # The clone is a disk of its own: a second VM runs it on host-b.
    engine.add_vm("vm2", "os-clone")
    engine.run_vm("vm2", "host-b")
    b = engine.hosts["host-b"]
    assert flowengine.write_through(b, engine, "os-clone", None)[
        :len(DATA)] == DATA
    check(engine)

    engine.remove_snapshot("os", snap)
    engine.stop_vm("vm2")
    engine.stop_vm("vm1")
    check(engine)


@exporting
def test_a_template_its_vms_and_their_clones_then_removed(engine, vm1_on_a):
    """AddVmTemplateCommand of a VM that is down (a running one is
    refused): CreateAllTemplateDisksCommand clones each of its disks
    (CloneSingleManagedBlockDiskCommand: clone_volume, no host call).
    AddVmCommand from the template clones the template's disks again
    (addManagedBlockDisks: a full clone, never thin), CloneVmCommand
    clones a VM that is down (refused while it runs: no snapshot of
    Managed Block Storage disks).  Each VM runs on its own disks,
    reading what the template's source held, migrates and stops like any
    other.  RemoveVmTemplateCommand is refused while a VM is based on
    the template (VMT_CANNOT_REMOVE_DETECTED_DERIVED_VM, no shim call);
    a VM's disk detached first (DetachDiskFromVm, floating) does not
    count, so the template's volume is deleted while a clone of it
    lives: the backend's clones are volumes of their own, the delete is
    clean and the clone still runs.  Nothing is left on the hosts nor
    on the backend, grants and exports included."""
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "os", DATA)
    with pytest.raises(StepFailed, match="VM_IS_NOT_DOWN"):
        engine.add_template("tpl", "vm1")
    with pytest.raises(StepFailed, match="CLONE_RUNNING_VM_WITH_MBS"):
        engine.clone_vm("vm1", "vm3")
    engine.stop_vm("vm1")

    assert engine.add_template("tpl", "vm1") == ["tpl-os"]
    engine.add_vm_from_template("vm2", "tpl")
    engine.clone_vm("vm1", "vm3")
    check(engine)
    assert len(engine.backend.live_volumes()) == 4

    # A VM from the template: runs, migrates, stops.
    engine.run_vm("vm2", "host-b")
    b, c = engine.hosts["host-b"], engine.hosts["host-c"]
    assert flowengine.write_through(b, engine, "vm2-os", None)[
        :len(DATA)] == DATA
    flowengine.write_through(b, engine, "vm2-os", b"vm2 was here")
    # The clone of the VM runs beside its source.
    engine.run_vm("vm3", "host-a")
    engine.run_vm("vm1", "host-c")
    check(engine)
    assert engine.migrate("vm2", "host-c")
    assert flowengine.write_through(c, engine, "vm2-os", None)[:12] == \
        b"vm2 was here"
    assert engine.backend.exports()[engine.disks["vm2-os"].vol_id] == {
        "export": True, "hosts": [flowengine.grantee(engine, "host-c")]}
    assert flowengine.write_through(a, engine, "vm3-os", None)[
        :len(DATA)] == DATA
    check(engine)

    # The template is refused while vm2 is based on it (no shim call).
    calls = len(engine.trace)
    with pytest.raises(StepFailed, match="DETECTED_DERIVED_VM"):
        engine.remove_template("tpl")
    assert [t[1] for t in engine.trace[calls:]] == ["engine"]
    for name in ("vm1", "vm2", "vm3"):
        engine.stop_vm(name)
    # vm2's disk detached, vm2 removed: the template is no longer in
    # use for the engine, and its volume has a living clone.
    engine.detach_disk_from_vm("vm2", "vm2-os")
    assert engine.remove_vm("vm2") == []
    assert engine.remove_template("tpl") == []
    assert "tpl-os" not in engine.disks
    check(engine)

    engine.add_vm("vm4", "vm2-os")
    engine.run_vm("vm4", "host-a")
    assert flowengine.write_through(a, engine, "vm2-os", None)[:12] == \
        b"vm2 was here"
    engine.stop_vm("vm4")
    assert engine.remove_vm("vm4") == []
    check(engine)
    assert engine.remove_vm("vm3") == []
    assert engine.remove_vm("vm1") == []
    assert engine.backend.live_volumes() == set()
    assert engine.backend.exports() == {}
    check(engine)


def test_a_template_from_a_snapshot_clones_no_managed_block_disk(
        engine, vm1_on_a):
    """AddVmTemplateFromSnapshotCommand: a snapshot whose configuration
    has a plugged Managed Block Storage disk is refused at validation
    (the operation is not one a Managed Block Storage domain supports),
    the VM running or down, before any shim call: the VM, its disks and
    their snapshots are as they were.  A snapshot taken before the VM
    had its disk makes a template, and CreateAllTemplateDisksFromSnapshot
    clones none of the VM's disks (its VM's disk map is empty): no shim
    call either.  The hosts and the backend never see either."""
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "os", DATA)
    snaps = engine.snapshot_vm("vm1")

    def calls_since(mark):
        return [t for t in engine.trace[mark:] if t[1] != "engine"]

    for status in ("up", "down"):
        assert engine.vms["vm1"].status == status
        mark = len(engine.trace)
        with pytest.raises(StepFailed, match="UNSUPPORTED_ACTION_FOR_"
                           "MANAGED_BLOCK_STORAGE"):
            engine.add_template_from_snapshot("tpl", "vm1", snaps)
        assert calls_since(mark) == []
        assert "tpl" not in engine.templates
        check(engine)
        if status == "up":
            engine.stop_vm("vm1")

    # vm2's snapshot has no disk; the disk it has now is not cloned.
    engine.add_vm("vm2")
    assert engine.snapshot_vm("vm2") == {}
    engine.add_disk("late")
    engine.add_disk_to_vm("vm2", "late", activate=True)
    mark = len(engine.trace)
    assert engine.add_template_from_snapshot("tpl2", "vm2", {}) == []
    assert calls_since(mark) == []
    assert engine.backend.live_volumes() == {
        engine.disks["os"].vol_id, engine.disks["late"].vol_id}
    engine.run_vm("vm2", "host-b")
    engine.run_vm("vm1", "host-a")
    assert flowengine.write_through(a, engine, "os", None)[:len(DATA)] == DATA
    check(engine)
    engine.stop_vm("vm1")
    engine.stop_vm("vm2")
    assert engine.remove_template("tpl2") == []
    engine.remove_snapshot("os", snaps["os"])
    assert engine.remove_vm("vm1") == []
    assert engine.remove_vm("vm2") == []
    assert engine.backend.live_volumes() == set()
    check(engine)


def test_a_snapshot_previewed_then_undone(engine, vm1_on_a):
    """A live snapshot is one create_snapshot per disk (no host call).
    TryBackToAllSnapshotsOfVm (the VM down) makes a volume of each
    snapshot and attaches *that* from then on; RestoreAllSnapshots UNDO
    deletes it (the VM down again) and the disk's own volume is the one
    attached.  Each run reads what its volume holds."""
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "os", b"before the snapshot")
    snaps = engine.snapshot_vm("vm1")
    flowengine.write_through(a, engine, "os", b"after the snapshot!")
    check(engine)
    engine.stop_vm("vm1")
    own = engine.disks["os"].vol_id

    engine.preview_snapshot("vm1", snaps)
    preview = engine.disks["os"].vol_id
    assert preview != own
    check(engine)
    engine.run_vm("vm1", "host-b")
    b = engine.hosts["host-b"]
    assert flowengine.journals(engine)["host-b"] == [("os", False)]
    assert b.volumes_info()[0]["vol_id"] == preview
    assert flowengine.write_through(b, engine, "os", None)[:19] == \
        b"before the snapshot"
    check(engine)
    engine.stop_vm("vm1")
    check(engine)

    engine.undo_preview("vm1")
    assert engine.disks["os"].vol_id == own
    assert preview not in engine.backend.live_volumes()
    check(engine)
    engine.run_vm("vm1", "host-a")
    assert flowengine.write_through(a, engine, "os", None)[:19] == \
        b"after the snapshot!"
    engine.stop_vm("vm1")
    engine.remove_snapshot("os", snaps["os"])
    check(engine)


def test_a_snapshot_whose_creation_fails_later_is_removed(engine):
    """The VM's snapshot fails after its Managed Block Storage disks'
    snapshots were made (an image disk's snapshot task, or the live
    snapshot, failed): CreateSnapshotForVmCommand.endVmCommand ends its
    children with failure, and CreateManagedBlockStorageDiskSnapshot-
    Command.endWithFailure runs RemoveManagedBlockStorageSnapshotCommand
    (remove_snapshot naming the volume it snapshotted).  No host call:
    the running VM keeps its disks and what it wrote; nothing is left on
    the backend, and the next snapshot works."""
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")
    engine.run_vm("vm1", "host-a")
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "data", DATA)
    before = flowengine.journals(engine)

    snaps = engine.snapshot_vm("vm1")
    assert len(engine.snapshots) == 2
    engine.snapshot_failed("vm1", snaps)
    assert engine.snapshots == {}
    assert flowengine.journals(engine) == before
    assert flowengine.write_through(a, engine, "data", None)[:len(DATA)] \
        == DATA
    check(engine)

    snap = engine.snapshot_disk("data")
    engine.remove_snapshot("data", snap)
    engine.stop_vm("vm1")
    check(engine)


def test_a_snapshot_previewed_then_committed(engine, vm1_on_a):
    """RestoreAllSnapshotsCommand commit: RestoreAllManagedBlockSnapshots-
    Command.handleCommit keeps the previewed volume P as the disk's
    active image and removes the images whose parent is P's parent (the
    previewed snapshot S1) other than P: the snapshot taken right after
    S1 (remove_snapshot naming the disk).  The disk's earlier volume V
    stays on the backend with S1.  RemoveDiskCommand names the disk's
    id, V: refused while V has S1; once the user removed S1
    (RemoveSnapshotCommand), V is deleted and the active volume P stays
    on the backend, forgotten by the engine (removeDiskFromDb drops the
    image whose id is the disk's only): an ovirt-engine leak an admin
    deletes with the shim's command line."""
    a = engine.hosts["host-a"]
    flowengine.write_through(a, engine, "os", b"at the first snapshot")
    s1 = engine.snapshot_vm("vm1")
    flowengine.write_through(a, engine, "os", b"at the second snapshot")
    s2 = engine.snapshot_vm("vm1")
    engine.stop_vm("vm1")
    own = engine.disks["os"].vol_id

    engine.preview_snapshot("vm1", s1)
    engine.commit_preview("vm1")
    preview = engine.disks["os"].vol_id
    assert list(engine.snapshots) == [s1["os"]]
    assert s2["os"] not in engine.snapshots
    assert {own, preview} <= engine.backend.live_volumes()
    check(engine)
    engine.run_vm("vm1", "host-b")
    b = engine.hosts["host-b"]
    assert b.volumes_info()[0]["vol_id"] == preview
    assert flowengine.write_through(b, engine, "os", None)[:21] == \
        b"at the first snapshot"
    engine.stop_vm("vm1")
    check(engine)

    with pytest.raises(StepFailed, match="has snapshots"):
        engine.remove_disk("os")
    check(engine)
    engine.remove_snapshot("os", s1["os"])
    engine.remove_disk("os")
    assert engine.orphans == {preview}
    assert engine.backend.live_volumes() == {preview}
    check(engine)
    engine.admin_delete_volume(preview)
    check(engine)


@pytest.mark.parametrize("previewed", [0, 1], ids=["oldest", "middle"])
def test_a_commit_with_three_snapshots(engine, vm1_on_a, previewed):
    """Three snapshots S1, S2, S3 of the disk's volume V, the VM down;
    TryBackToAllSnapshotsOfVm of an older one (S1 or S2) makes P from
    it, and RestoreAllSnapshots commit (handleCommit) removes the images
    whose parent is P's parent other than P: the one snapshot taken
    right after the previewed one (S2, or S3).  The other later one (S3
    when S1 is committed) stays, on the backend and in the engine's
    list (its VM configuration marked broken), as does the earlier one
    and V, inactive: handleCommit never removes a volume.  The hosts
    only ever attach the active volume: P runs, migrates and stops
    reading what V held at the committed snapshot, and nothing of V or
    of the snapshots reaches a host.  A snapshot taken after the commit
    is P's; RemoveSnapshotCommand names the disk (V's id) for every one
    of them and the shim finds each under its volume.  The disk's
    removal deletes V (refused while it has snapshots) and leaves P on
    the backend, forgotten (the ovirt-engine leak of the one-snapshot
    commit above); an admin deletes it."""
    a = engine.hosts["host-a"]
    snaps = []
    for i in range(3):
        flowengine.write_through(a, engine, "os",
                                 "at snapshot {}".format(i + 1).encode())
        snaps.append(engine.snapshot_vm("vm1"))
    flowengine.write_through(a, engine, "os", b"after all three")
    engine.stop_vm("vm1")
    own = engine.disks["os"].vol_id
    ids = [s["os"] for s in snaps]
    check(engine)

    engine.preview_snapshot("vm1", snaps[previewed])
    preview = engine.disks["os"].vol_id
    engine.run_vm("vm1", "host-b")
    b, c = engine.hosts["host-b"], engine.hosts["host-c"]
    want = "at snapshot {}".format(previewed + 1).encode()
    assert flowengine.write_through(b, engine, "os", None)[:len(want)] \
        == want
    engine.stop_vm("vm1")

    engine.commit_preview("vm1")
    kept = [s for i, s in enumerate(ids) if i != previewed + 1]
    assert list(engine.snapshots) == kept
    assert engine.backend.live_volumes() == {own, preview}
    check(engine)

    # The committed disk runs, migrates and stops like any other.
    engine.run_vm("vm1", "host-b")
    assert engine.migrate("vm1", "host-c")
    assert [i["vol_id"] for i in c.volumes_info()] == [preview]
    assert flowengine.write_through(c, engine, "os", None)[:len(want)] \
        == want
    flowengine.write_through(c, engine, "os", b"after the commit")
    new = engine.snapshot_disk("os")
    check(engine)
    engine.stop_vm("vm1")
    assert flowengine.journals(engine) == {h: [] for h in HOSTS}
    assert engine.backend.connections() == set()

    with pytest.raises(StepFailed, match="has snapshots"):
        engine.remove_disk("os")
    for snap in kept + [new]:
        engine.remove_snapshot("os", snap)
    engine.remove_disk("os")
    assert engine.orphans == {preview}
    assert engine.backend.live_volumes() == {preview}
    check(engine)
    engine.admin_delete_volume(preview)
    check(engine)


# Remove a VM

def test_remove_a_vm_whose_disk_has_snapshots(engine):
    """RemoveVmCommand drops the VM and its snapshots' records, then
    RemoveAllManagedBlockStorageDisksCommand runs delete_volume of each
    disk with no remove_snapshot before: the shim refuses the disk with
    a snapshot (before it ends any connection) and the other is deleted.
    The user sees the VM removed and the disk left (the event names it);
    nothing is half-deleted: the disk, its volume and its snapshot are
    whole, and removing the disk again is refused the same way, naming
    the snapshot.  The engine no longer lists that snapshot (its VM is
    gone): an admin removes it with the shim's command line, then the
    disk goes."""
    engine.add_disk("os")
    engine.add_disk("data")
    engine.add_vm("vm1", "os", "data")
    engine.run_vm("vm1", "host-a")
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)
    snap = engine.snapshot_disk("os")
    engine.stop_vm("vm1")

    assert engine.remove_vm("vm1") == ["os"]
    assert "vm1" not in engine.vms and "data" not in engine.disks
    assert engine.backend.live_volumes() == {engine.disks["os"].vol_id}
    check(engine)
    with pytest.raises(StepFailed, match="has snapshots " + snap):
        engine.remove_disk("os")
    check(engine)

    # The disk is whole: a new VM runs it and reads what the old wrote.
    engine.add_vm("vm2", "os")
    engine.run_vm("vm2", "host-b")
    assert flowengine.write_through(engine.hosts["host-b"], engine, "os",
                                    None)[:len(DATA)] == DATA
    engine.stop_vm("vm2")
    assert engine.remove_vm("vm2") == ["os"]
    engine.remove_snapshot("os", snap)
    engine.remove_disk("os")
    check(engine)


# Disk copy through a host

def test_a_disk_copied_through_a_host_leaves_nothing_attached(
        engine, vm1_on_a):
    """CopyManagedBlockDiskCommand attaches the new disk and the source
    on one host of the pool with no VM (connect_volume and attach_volume
    only: no save_device, no VM device records the host), the host
    copies from path to path, then both are detached (detach_volume,
    disconnect_volume naming the disk only).  The copy is a disk of its
    own: a VM runs it elsewhere and reads what the source held."""
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)
    engine.stop_vm("vm1")

    engine.copy_disk("os", "os-copy", "host-b")
    assert flowengine.journals(engine)["host-b"] == []
    check(engine)

    engine.add_vm("vm2", "os-copy")
    engine.run_vm("vm2", "host-c")
    c = engine.hosts["host-c"]
    assert flowengine.write_through(c, engine, "os-copy", None)[
        :len(DATA)] == DATA
    engine.run_vm("vm1", "host-b")
    check(engine)
    engine.stop_vm("vm1")
    engine.stop_vm("vm2")
    assert engine.backend.connections() == set()
    check(engine)


def test_a_disk_copy_whose_source_attach_fails_removes_the_new_disk(engine):
    """The target is made and attached, the source's attach fails on the
    host: CopyManagedBlockDiskCommand.endWithFailure detaches both (the
    source's detach is of a volume the host does not hold: success, and
    disconnect_volume ends the connection its connect_volume made) and
    removes the target (delete_volume).  Nothing is left, and the copy
    done again works."""
    engine.add_disk("os")
    engine.fail_next("host-b", "ManagedVolume.attach_volume", skip=1)
    with pytest.raises(StepFailed, match="attach_volume"):
        engine.copy_disk("os", "os-copy", "host-b")
    assert "os-copy" not in engine.disks
    assert engine.backend.connections() == set()
    check(engine)

    engine.copy_disk("os", "os-copy", "host-b")
    check(engine)


def test_a_disk_copied_to_and_from_an_image_domain(engine, vm1_on_a, tmp_path):
    """CopyManagedBlockDiskCommand with one side vdsm's: to an image
    domain, the host attaches the source only (the target is made the
    image way) and detaches it after the copy; from an image domain, the
    shim makes the new disk and the host attaches that one only.  No VM
    device records the host; nothing stays attached; the copies read
    what the source held."""
    flowengine.write_through(engine.hosts["host-a"], engine, "os", DATA)
    engine.stop_vm("vm1")
    image = str(tmp_path / "image")
    with open(image, "wb") as f:
        f.truncate(1024**3)

    engine.copy_disk_to_image("os", image, "host-b")
    assert flowengine.journals(engine)["host-b"] == []
    with open(image, "rb") as f:
        f.seek(1024 * 1024)
        assert f.read(len(DATA)) == DATA
    check(engine)

    engine.copy_image_to_disk(image, "os-back", "host-c")
    assert flowengine.journals(engine)["host-c"] == []
    check(engine)
    engine.add_vm("vm2", "os-back")
    engine.run_vm("vm2", "host-a")
    assert flowengine.write_through(engine.hosts["host-a"], engine,
                                    "os-back", None)[:len(DATA)] == DATA
    engine.stop_vm("vm2")
    assert engine.backend.connections() == set()
    check(engine)


@pytest.mark.parametrize("direction", ["to image", "from image"])
def test_a_copy_with_an_image_domain_whose_attach_fails(engine, tmp_path,
                                                        direction):
    """The one attach of the copy fails on the host:
    CopyManagedBlockDiskCommand.endWithFailure detaches that volume (a
    detach of a volume the host does not hold: success, and
    disconnect_volume ends the connection connect_volume made) and, from
    an image domain, removes the new disk.  Nothing is left and the copy
    done again works."""
    engine.add_disk("os")
    image = str(tmp_path / "image")
    with open(image, "wb") as f:
        f.truncate(1024**3)
    engine.fail_next("host-b", "ManagedVolume.attach_volume")
    if direction == "to image":
        with pytest.raises(StepFailed, match="attach_volume"):
            engine.copy_disk_to_image("os", image, "host-b")
    else:
        with pytest.raises(StepFailed, match="attach_volume"):
            engine.copy_image_to_disk(image, "copy", "host-b")
        assert "copy" not in engine.disks
    assert engine.backend.connections() == set()
    check(engine)

    if direction == "to image":
        engine.copy_disk_to_image("os", image, "host-b")
    else:
        engine.copy_image_to_disk(image, "copy", "host-b")
    check(engine)


# Many VMs

# On PostgreSQL, as ovirt-engine keeps cinderlib's database, and on SQLite:
# 32 shim processes writing one SQLite file at once queue for its write
# lock (engine/runner.py, _queue_sqlite_writers) instead of failing with
# "database is locked".
@pytest.mark.slow
@both_databases
def test_32_vms_started_at_once_on_one_host(engine):
    labels = ["disk{:02d}".format(i) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        disks = list(pool.map(engine.add_disk, labels))
    assert len(disks) == 32
    for label in labels:
        engine.add_vm("vm-" + label, label)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda d: engine.run_vm("vm-" + d, "host-c"), labels))
    check(engine)
    assert len(engine.backend.loop_devices()) == 32

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda d: engine.stop_vm("vm-" + d), labels))
    check(engine)


@pytest.mark.slow
def test_50_ha_vms_restarted_at_once_on_one_host_after_a_fence(
        engine, tmp_path):
    """A host with 50 highly available VMs is fenced: every VM goes down
    (RestartVdsVmsOperation.restartVms -> ProcessDownVmCommand: the
    detach on the fenced host fails, its connections stay in the shim)
    and the VMs are restarted on the other host, 50 RunVmCommands at
    once (each connect_volume, attach_volume, save_device).
    HaAutoStartVmsRunner itself runs them one after the other from its
    thread; at once is what API clients starting VMs in parallel make,
    the harder case.  Meanwhile the engine asks that host
    Host.getCapabilities (VdsManager.refreshCapabilities), which must
    answer while the attaches wait on a slow storage (held in the
    connector until the test lets them go: an order, not a time).  The
    fenced host boots (new boot id; its agent's start detaches the 50
    records of the earlier boot), 10 VMs migrate back to it at once,
    and every host, link, rule, loop device and the shim's connections
    agree."""
    labels = ["ha{:02d}".format(i) for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(engine.add_disk, labels))
    for label in labels:
        engine.add_vm("vm-" + label, label)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda d: engine.run_vm("vm-" + d, "host-a"), labels))
    a = engine.hosts["host-a"]
    b = engine.hosts["host-b"]
    assert len(a.volumes_info()) == 50

    a.crash()                          # fenced: power off
    engine.host_down("host-a")         # 50 ProcessDownVmCommands
    barrier = str(tmp_path / "storage-answers")
    engine.hold_attaches("host-b", barrier)
    mark = len(b.connects())
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        runs = [pool.submit(engine.run_vm, "vm-" + d, "host-b")
                for d in labels]
        try:
            agentutil.wait_for(lambda: sum(
                line.startswith("connect-start ")
                for line in b.connects(mark)) >= 8)
            for _ in range(3):
                caps = engine.refresh_caps("host-b")
                assert caps["connector_info"]["host"] == "host-b"
            # Every getCapabilities answered before any attach got past
            # the storage.
            assert engine.attaches_held("host-b", mark)
            assert not any(run.done() for run in runs)
        finally:
            open(barrier, "w").close()
        assert [run.result() for run in runs] == ["host-b"] * 50
    assert len(b.volumes_info()) == 50
    check(engine)

    a.boot()                           # new boot id, devices back
    agentutil.wait_for(lambda: a.volumes_info() == [])
    check(engine)

    back = ["vm-" + d for d in labels[:10]]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        assert all(pool.map(lambda vm: engine.migrate(vm, "host-a"), back))
    held = {h: len(j) for h, j in flowengine.journals(engine).items()}
    assert held == {"host-a": 10, "host-b": 40, "host-c": 0}
    check(engine)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(engine.stop_vm, ["vm-" + d for d in labels]))
    assert engine.backend.connections() == set()
    check(engine)


@pytest.mark.slow
def test_migrations_rolled_back_beside_completed_ones_under_50_vms(engine):
    """50 VMs run on A; 20 of them are selected and migrated to B
    (MigrateVMActionRunner: each MigrateVmCommand.perform in turn
    attaches the VM's disks on B and starts its migration).  Of the ten
    with two disks, five fail on B at their second disk, after the first
    was attached there: runningFailed detaches from B what has
    DEST_VDS_ID (the first disk; the second's walk stops, its connection
    to B stays for the next disconnect_volume), while the migrations
    started before are in flight; two more fail at their first disk.
    The 13 others complete at once (reportCompleted: detach on A,
    disconnect_volume).  The shim must end B's connection only for the
    rolled-back disks (A still runs those VMs) and A's only for the
    migrated ones.  Each VM reads what it wrote where it runs; after the
    50 stops (at once) nothing is left."""
    labels = ["m{:02d}".format(i) for i in range(50)]
    data = ["d{:02d}".format(i) for i in range(10)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(engine.add_disk, labels + data))
    for i, label in enumerate(labels):
        engine.add_vm("vm-" + label, label, *data[i:i + 1])
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda d: engine.run_vm("vm-" + d, "host-a"), labels))
    a, b = engine.hosts["host-a"], engine.hosts["host-b"]
    for label in data:
        flowengine.write_through(a, engine, label, label.encode())
    for label in data[:5] + labels[10:12]:
        engine.fail_attaches("host-b", label)
    check(engine)

    moving = ["vm-" + d for d in labels[:20]]
    placed = engine.migrate_many(moving, "host-b")
    stayed = {"vm-" + d for d in labels[:5] + labels[10:12]}
    assert placed == {name: "host-a" if name in stayed else "host-b"
                      for name in moving}
    # Migrated: five VMs of two disks, eight of one.
    held = {h: len(j) for h, j in flowengine.journals(engine).items()}
    assert held == {"host-a": 60 - 18, "host-b": 18, "host-c": 0}
    check(engine)
    for i, label in enumerate(data):
        host = a if i < 5 else b
        assert flowengine.write_through(host, engine, label, None)[:3] \
            == label.encode()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(engine.stop_vm, ["vm-" + d for d in labels]))
    assert engine.backend.connections() == set()
    check(engine)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "kill -9"])
def test_an_agent_restarted_while_32_attaches_are_in_flight(
        engine, tmp_path, how):
    """32 RunVmCommands at once on C (each may rerun on B), and C's
    agent goes down while at least 8 of their attaches wait in its
    connector: a restart (systemctl restart: SIGTERM) lets the attaches
    in flight finish and answer, and refuses new ones (935, the engine
    reruns those on B, or no answer: the VM Unknown); a kill -9 of the
    agent and its daemon cuts them (VDS_NETWORK_ERROR: the VM Unknown,
    no rerun).  The agent starts again (same boot) and its journal's
    replay rolls back every cut attach: C holds exactly the disks of the
    VMs that came up there.  The VMs left Unknown go Down
    (VmAnalyzer.proceedDisappearedVm) and run again on C; every stop
    leaves nothing."""
    labels = ["r{:02d}".format(i) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(engine.add_disk, labels))
    for label in labels:
        engine.add_vm("vm-" + label, label)
    c = engine.hosts["host-c"]
    barrier = str(tmp_path / "storage-answers")
    engine.hold_attaches("host-c", barrier)
    mark = len(c.connects())

    def run(label):
        try:
            return engine.run_vm("vm-" + label, "host-c",
                                 rerun_on=["host-b"])
        except StepFailed as e:
            assert e.network, e
            return "unknown"

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        runs = [pool.submit(run, label) for label in labels]
        try:
            agentutil.wait_for(lambda: sum(
                line.startswith("connect-start ")
                for line in c.connects(mark)) >= 8)
            if how == "restart":
                c.agent.proc.send_signal(signal.SIGTERM)
                c.agent.wait_notify("STOPPING=1")
            else:
                c.crash()
        finally:
            open(barrier, "w").close()
        if how == "restart":
            c.stop()
        c.start()
        outcomes = [r.result() for r in runs]
    if how == "restart":
        # The held attaches finished: their VMs run on C.
        assert outcomes.count("host-c") >= 8, outcomes
    else:
        assert outcomes.count("unknown") >= 8, outcomes
    assert set(outcomes) <= {"host-c", "host-b", "unknown"}
    assert sorted(i["vol_id"] for i in c.volumes_info()) == sorted(
        engine.disks[label].vol_id
        for label, where in zip(labels, outcomes) if where == "host-c")
    check(engine)

    def again(label):
        engine.vm_disappeared("vm-" + label)
        return engine.run_vm("vm-" + label, "host-c")

    unknown = [label for label, where in zip(labels, outcomes)
               if where == "unknown"]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert set(pool.map(again, unknown)) <= {"host-c"}
    assert len(c.volumes_info()) == outcomes.count("host-c") + len(unknown)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(engine.stop_vm, ["vm-" + d for d in labels]))
    assert engine.backend.connections() == set()
    check(engine)
