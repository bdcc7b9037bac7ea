"""Live migration and its rollback through the shim, with real hosts.

ovirt-engine never names a host in ``disconnect_volume``: after a
completed migration it means the source, after a failed one the
destination (docs/engine.md, "How ovirt-engine drives the shim").  Here
two real managedvolume-agents (own state dirs, one CA as an engine's
hosts share, each its own hostname in a UTS namespace, so that its
connector_info names it) attach the same volume of the embedded FileDriver
(a real loop device), the shim (warm service) is driven in the engine's
order, and it asks the hosts over vdsm's protocol with the engine's
certificate which connection to end.
"""

import json
import os
import shutil
import socket
import sqlite3
import uuid

import pytest

from .agentutil import wait_for
from .engine_fixtures import loop_devices_under
from .engine_fixtures import new_id

pytestmark = [pytest.mark.root, pytest.mark.slow]

DATA = b"still readable on the host that runs the VM"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = _cannot_name_hosts()
    if why:
        pytest.skip(why)
    a = _agent(str(tmp_path_factory.mktemp("host-a")), "host-a").start()
    b = None
    try:
        # One CA for both hosts and the engine, as in an oVirt setup: B
        # starts with A's development PKI (kept, not re-created).
        b_base = str(tmp_path_factory.mktemp("host-b"))
        shutil.copytree(os.path.join(a.state_dir, "pki"),
                        os.path.join(b_base, "state", "pki"))
        b = _agent(b_base, "host-b").start()
        yield {"host-a": a, "host-b": b}
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()


def _cannot_name_hosts():
    """Why each agent cannot get a hostname of its own (``unshare
    --uts`` needs CAP_SYS_ADMIN: root in a container may lack it), or
    ""."""
    import subprocess
    try:
        p = subprocess.run(["unshare", "--uts", "true"],
                           capture_output=True, text=True, timeout=30)
    except OSError as e:
        return "cannot run unshare: {}".format(e)
    if p.returncode != 0:
        return "unshare --uts fails (needs CAP_SYS_ADMIN): {}".format(
            p.stderr.strip())
    return ""


def _agent(base, name):
    """An agent whose boot id is a file of its own (see _reboot) and
    whose hostname is ``name`` (as flowengine's hosts)."""
    from .agent_process_test import AgentProcess
    boot_id_file = os.path.join(base, "boot_id")
    _new_boot_id(boot_id_file)
    agent = AgentProcess(base, env={"MANAGEDVOLUME_BOOT_ID_FILE":
                                    boot_id_file},
                         argv_prefix=["unshare", "--uts", "sh", "-c",
                                      'hostname "$0" && exec "$@"', name])
    agent.boot_id_file = boot_id_file
    return agent


def _new_boot_id(path):
    with open(path, "w") as f:
        f.write(str(uuid.uuid4()) + "\n")


def _reboot(agent):
    """The host reboots: its tmpfs (run dir: managed links) is empty, the
    boot id is new; the journal and udev rules on disk stay.  The agent
    listens on a new port."""
    agent.stop()
    shutil.rmtree(os.path.join(agent.state_dir, "run"), ignore_errors=True)
    _new_boot_id(agent.boot_id_file)
    agent.start()


class Engine:
    """The engine's side of one disk: the shim and the hosts' verbs."""

    def __init__(self, shim, hosts, tmp_path, addresses=None, port=None):
        self.shim = shim
        self.hosts = hosts
        self.vols = str(tmp_path / "vols")
        self.driver = {
            "volume_driver":
                "vdsm_managedvolume.engine.filedriver.FileDriver",
            "volume_backend_name": "migration",
            "file_volume_dir": self.vols,
            "file_volume_use_loop": True,
        }
        self.db_url = "sqlite:///{}".format(tmp_path / "cinderlib.db")
        cert, key, ca = _engine_pki(hosts["host-a"])
        if addresses is None:
            addresses = {name: "127.0.0.1:{}".format(agent.port)
                         for name, agent in hosts.items()}
        self.options = ["--host-cert", cert, "--host-key", key,
                        "--host-ca", ca, "--host-timeout", "10"]
        if addresses:
            self.options += ["--host-addresses", ",".join(
                "{}={}".format(h, a) for h, a in addresses.items())]
        if port is not None:
            self.options += ["--host-port", str(port)]
        self.base_options = list(self.options)
        self.vol = new_id()

    def run(self, *args, cid="flow"):
        r = self.shim.run(*args, driver=self.driver, db_url=self.db_url,
                          cid=cid, options=self.options)
        assert r.code == 0, r.describe()
        return r

    def connector(self, name, **extra):
        with self.hosts[name].client() as client:
            connector = client.call("Host.getCapabilities")["connector_info"]
        assert connector["host"] == name, connector
        connector.update(extra)
        return connector

    def attach(self, name, **extra):
        """ManagedBlockStorageCommandUtil.saveDevices on host ``name``:
        connect_volume, the host's attach_volume, save_device."""
        conn = self.run("connect_volume", self.vol,
                        json.dumps(self.connector(name, **extra)),
                        cid="c").json("c")
        with self.hosts[name].client() as client:
            info = client.call("ManagedVolume.attach_volume",
                               {"vol_id": self.vol, "connection_info": conn})
        self.run("save_device", self.vol, json.dumps(info))
        return info

    def detach(self, name):
        """The host's half of DisconnectManagedBlockStorageDeviceCommand."""
        with self.hosts[name].client() as client:
            assert client.call("ManagedVolume.detach_volume",
                               {"vol_id": self.vol}) is True

    def reach(self, hosts):
        """Ask the hosts at their current ports (after a reboot)."""
        self.options[self.options.index("--host-addresses") + 1] = \
            ",".join("{}=127.0.0.1:{}".format(name, hosts[name].port)
                     for name in sorted(hosts))

    def volumes_info(self, name):
        with self.hosts[name].client() as client:
            return client.call("ManagedVolume.volumes_info",
                               {"vol_ids": [self.vol]})

    def attached_on(self, name):
        with self.hosts[name].client() as client:
            return [i["vol_id"] for i in client.call(
                "ManagedVolume.volumes_info", {"vol_ids": [self.vol]})]

    def connections(self):
        """{host: saved managed_path} of the shim's connections (the
        managed_path names the agent's own run dir: which host's device)."""
        found = {}
        for name in self.hosts:
            r = self.shim.run("get_connection_info", self.vol, name,
                              driver=self.driver, db_url=self.db_url,
                              cid="i", options=self.options)
            if r.code == 0:
                found[name] = (r.json("i")["device"] or {}).get(
                    "managed_path")
        return found

    def connection_id(self, name):
        """The id of the volume's connection to host ``name``."""
        path = self.db_url[len("sqlite:///"):]
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT id, connection_info FROM "
                              "volume_attachment WHERE volume_id = ? AND "
                              "NOT deleted", (self.vol,)).fetchall()
        [found] = [i for i, info in rows
                   if json.loads(info)["connector"]["host"] == name]
        return found

    def cleanup(self):
        # Every host reachable with the engine's certificate again: the
        # delete refuses a volume whose host cannot be asked.
        self.options = list(self.base_options)
        if "--host-addresses" in self.options:
            self.reach(self.hosts)
        for name in self.hosts:
            if self.attached_on(name):
                self.detach(name)
        self.shim.run("delete_volume", self.vol, driver=self.driver,
                      db_url=self.db_url, options=self.options)
        leaked = loop_devices_under(self.vols)
        for dev in leaked:
            os.system("losetup -d {}".format(dev))
        return leaked


@pytest.fixture
def engine(engine_service, engine_shim, hosts, tmp_path):
    made = []

    def make(**kw):
        e = Engine(engine_shim, hosts, tmp_path, **kw)
        e.run("create_volume", e.vol, 1)
        made.append(e)
        return e
    yield make
    for e in made:
        assert e.cleanup() == []


def _engine_pki(agent):
    """The engine's certificate, key and CA: signed by the hosts' CA."""
    d = os.path.join(agent.state_dir, "pki")
    return (os.path.join(d, "client-cert.pem"),
            os.path.join(d, "client-key.pem"),
            os.path.join(d, "cacert.pem"))


def _write_and_read(path):
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(DATA)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        f.seek(4096)
        return f.read(len(DATA))


def _calls(agent, flow):
    """The verbs ``agent`` was called with in flow ``flow``, in order."""
    return [line.split("START ", 1)[1].split("(", 1)[0]
            for line in agent.log().splitlines()
            if "[flow={}]".format(flow) in line and " START " in line]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_completed_migration_ends_the_source_connection_only(
        engine, engine_service, hosts):
    e = engine()
    src = e.attach("host-a")
    dst = e.attach("host-b")
    assert e.connections() == {"host-a": src["managed_path"],
                               "host-b": dst["managed_path"]}

    # MigrateVmCommand.reportCompleted: the source detaches, then
    # disconnect_volume without a host.
    e.detach("host-a")
    flow = "dis-" + uuid.uuid4().hex[:8]
    e.run("disconnect_volume", e.vol, cid=flow)

    # Only the answer that ends a connection has its host's identity
    # checked: getCapabilities starts os-brick's helper inside vdsm
    # (seconds), and host-b, running the VM, is asked volumes_info only.
    assert _calls(hosts["host-a"], flow) == [
        "ManagedVolume.volumes_info", "Host.getCapabilities"]
    assert _calls(hosts["host-b"], flow) == ["ManagedVolume.volumes_info"]

    assert e.connections() == {"host-b": dst["managed_path"]}
    assert e.attached_on("host-b") == [e.vol]
    assert _write_and_read(dst["managed_path"]) == DATA
    log = engine_service.log()
    assert "host host-a (127.0.0.1:{}) no longer has volume {}".format(
        e.hosts["host-a"].port, e.vol) in log
    assert "Keeping the connection of volume {} to host host-b".format(
        e.vol) in log

    # Stop VM (ProcessDownVmCommand): the last host detaches, the last
    # connection ends, the loop device goes with it.
    e.detach("host-b")
    e.run("disconnect_volume", e.vol)
    assert e.connections() == {}
    assert loop_devices_under(e.vols) == []


def test_failed_migration_ends_the_destination_connection_only(
        engine, hosts):
    # host-b is reached through its connector's ip and --host-port, as
    # without --host-addresses; host-a through the configured address.
    e = engine(addresses={"host-a": "127.0.0.1:{}".format(
        hosts["host-a"].port)}, port=hosts["host-b"].port)
    src = e.attach("host-a")
    e.attach("host-b", ip="127.0.0.1")

    # MigrateVmCommand.runningFailed: the destination detaches, then
    # disconnect_volume without a host, while the VM runs on the source.
    e.detach("host-b")
    e.run("disconnect_volume", e.vol)

    assert e.connections() == {"host-a": src["managed_path"]}
    assert e.attached_on("host-a") == [e.vol]
    assert _write_and_read(src["managed_path"]) == DATA

    # Migrating again after the rollback: host-b connects anew and
    # save_device finds its connection (the one without a device).
    dst = e.attach("host-b", ip="127.0.0.1")
    assert e.connections() == {"host-a": src["managed_path"],
                               "host-b": dst["managed_path"]}


def test_a_host_that_cannot_be_asked_keeps_its_connection(
        engine, engine_service, hosts):
    e = engine()
    e.attach("host-a")
    dst = e.attach("host-b")
    # host-b stops answering (nothing listens on its address any more).
    closed = _free_port()
    e.options[e.options.index("--host-addresses") + 1] = \
        "host-a=127.0.0.1:{},host-b=127.0.0.1:{}".format(
            hosts["host-a"].port, closed)

    e.detach("host-a")
    e.run("disconnect_volume", e.vol)

    assert e.connections() == {"host-b": dst["managed_path"]}
    assert "Keeping the connection of volume {} to host host-b: the host " \
        "cannot be asked".format(e.vol) in engine_service.log()
    assert "127.0.0.1:{}".format(closed) in engine_service.log()


def test_an_answer_from_another_host_keeps_the_connection(
        engine, engine_service, hosts):
    """host-a's address now leads to host-b (a DHCP address given to
    another host, two clones of one name): host-b has no record of the
    volume for host-a, and the shim ended the connection the VM on host-a
    was using."""
    e = engine()
    src = e.attach("host-a")
    e.attach("host-b")
    e.options[e.options.index("--host-addresses") + 1] = \
        "host-a=127.0.0.1:{0},host-b=127.0.0.1:{0}".format(
            hosts["host-b"].port)

    # MigrateVmCommand.runningFailed: host-b detaches.
    e.detach("host-b")
    e.run("disconnect_volume", e.vol)

    assert e.connections() == {"host-a": src["managed_path"]}
    assert _write_and_read(src["managed_path"]) == DATA
    assert "Keeping the connection of volume {} to host host-a: the host " \
        "cannot be asked whether it still uses it (127.0.0.1:{} is not " \
        "that host: host 'host-b' (not 'host-a') (a connection of " \
        "transport local is known by its host's name only: ".format(
            e.vol, hosts["host-b"].port) in engine_service.log()


def test_without_the_engines_certificate_no_connection_ends(
        engine, engine_service, tmp_path):
    e = engine()
    e.attach("host-a")
    e.detach("host-a")
    missing = str(tmp_path / "no-such-engine.cer")
    e.options[e.options.index("--host-cert") + 1] = missing

    e.run("disconnect_volume", e.vol)

    assert list(e.connections()) == ["host-a"]
    assert "cannot load the engine's certificate, key or CA" in \
        engine_service.log()


def test_migrating_back_to_a_host_whose_connection_was_kept(
        engine, hosts):
    e = engine()
    e.attach("host-a")
    e.attach("host-b")
    reachable = e.options[e.options.index("--host-addresses") + 1]
    # The migration A -> B completes while A cannot be asked: A's
    # connection (with A's old device) is kept.
    e.options[e.options.index("--host-addresses") + 1] = \
        "host-a=127.0.0.1:{},host-b=127.0.0.1:{}".format(
            _free_port(), hosts["host-b"].port)
    e.detach("host-a")
    e.run("disconnect_volume", e.vol)
    assert set(e.connections()) == {"host-a", "host-b"}

    # Back to A: connect_volume reuses A's connection and forgets its old
    # device, so save_device (no host) stores A's new device on A's
    # connection, not on B's (the newest).
    e.options[e.options.index("--host-addresses") + 1] = reachable
    b_path = e.connections()["host-b"]
    a = e.attach("host-a")
    assert e.connections() == {"host-a": a["managed_path"], "host-b": b_path}
    e.detach("host-b")
    e.run("disconnect_volume", e.vol)
    assert e.connections() == {"host-a": a["managed_path"]}
    assert e.attached_on("host-a") == [e.vol]


def test_a_rebooted_hosts_leftover_connection_is_ended(
        engine, engine_service, hosts):
    e = engine()
    e.attach("host-a")
    # host-a is fenced while the VM runs there: its detach_volume fails,
    # so ProcessDownVmCommand runs no disconnect_volume and the shim keeps
    # host-a's connection.  HA restarts the VM on host-b.
    dst = e.attach("host-b")
    _reboot(hosts["host-a"])
    e.reach(hosts)
    # host-a's agent detaches its record of the previous boot once it
    # serves (os-brick's local connector leaves the shared loop device
    # alone).
    wait_for(lambda: e.volumes_info("host-a") == [])

    # The next disconnect_volume of the disk asks both hosts: host-a no
    # longer has the volume, its connection ends; host-b runs the VM and
    # keeps its own, the device under it untouched.
    e.run("disconnect_volume", e.vol)

    assert e.connections() == {"host-b": dst["managed_path"]}
    assert _write_and_read(dst["managed_path"]) == DATA
    log = engine_service.log()
    assert "host host-a (127.0.0.1:{}) no longer has volume {}".format(
        hosts["host-a"].port, e.vol) in log
    assert "Keeping the connection of volume {} to host host-b".format(
        e.vol) in log


def test_a_host_whose_device_blinked_keeps_its_connection(
        engine, engine_service, hosts, tmp_path):
    """The VM runs on host-a, whose device is gone for a moment (an NVMe
    controller reconnecting, an iSCSI session dropped) when the rollback
    of a failed migration to host-b disconnects: host-a's record is
    stale in this boot ("device gone"), not released, and its
    connection stays."""
    e = engine()
    # host-a reaches the loop device through a link of its own, which
    # can vanish without taking host-b's device with it.
    conn = e.run("connect_volume", e.vol,
                 json.dumps(e.connector("host-a")), cid="c").json("c")
    dev = tmp_path / "dev"
    dev.mkdir()
    link = str(dev / "nvme0n1")
    loop = conn["data"]["device_path"]
    os.symlink(loop, link)
    conn["data"]["device_path"] = link
    with hosts["host-a"].client() as client:
        src = client.call("ManagedVolume.attach_volume",
                          {"vol_id": e.vol, "connection_info": conn})
    e.run("save_device", e.vol, json.dumps(src))
    e.attach("host-b")

    os.unlink(link)                                 # the device blinks
    info, = e.volumes_info("host-a")
    assert (info["stale"], info["stale_reason"], info["this_boot"]) == \
        (True, "device gone", True)
    # MigrateVmCommand.runningFailed: host-b detaches, then
    # disconnect_volume without a host.
    e.detach("host-b")
    e.run("disconnect_volume", e.vol)
    os.symlink(loop, link)                          # ... and is back

    assert list(e.connections()) == ["host-a"]
    assert e.attached_on("host-a") == [e.vol]
    assert _write_and_read(src["managed_path"]) == DATA
    assert "Keeping the connection of volume {} to host host-a".format(
        e.vol) in engine_service.log()


def test_a_volume_a_host_still_has_attached_is_not_deleted(
        engine, engine_service, hosts):
    """ovirt-engine removes a disk unplugged from a running VM
    (RemoveDiskCommand.validateAllVmsForDiskAreDown looks at plugged
    devices only), and a hot plug whose VM step failed leaves it attached
    on the VM's host: delete_volume asks the connected hosts and refuses
    while one still has the volume; the connection of a host that no
    longer has it (ovirt-engine's leak of a failed attach) is no reason
    to refuse."""
    e = engine()
    src = e.attach("host-a")
    e.run("connect_volume", e.vol, json.dumps(e.connector("host-b")))

    r = e.shim.run("delete_volume", e.vol, driver=e.driver,
                   db_url=e.db_url, cid="d", options=e.options)

    assert r.code == 1, r.describe()
    assert r.error() == (
        "delete_volume failed: Volume {0} is still attached on host "
        "host-a (127.0.0.1:{1}). Once no VM there uses it, detach it "
        "there (vdsm-client -a 127.0.0.1 -p {1} ManagedVolume "
        "detach_volume vol_id={0}), then remove the disk again".format(
            e.vol, hosts["host-a"].port))
    assert set(e.connections()) == {"host-a", "host-b"}
    assert e.attached_on("host-a") == [e.vol]
    assert _write_and_read(src["managed_path"]) == DATA

    # Detached (the VM stopped): the delete ends both connections.
    e.detach("host-a")
    e.run("delete_volume", e.vol)
    assert e.connections() == {}
    assert loop_devices_under(e.vols) == []


def test_a_volume_attached_on_a_host_that_cannot_be_asked_is_not_deleted(
        engine, engine_service, hosts):
    """host-a attached the volume (its device saved) and then cannot be
    asked (down, unreachable, slow, its agent restarting): the shim
    deleted the volume under it.  The delete is refused, naming the host
    and the command that ends its connection once the admin knows no VM
    there uses it; a connection no attach completed through (no device
    saved: host-b's connect whose attach failed) is no reason to
    refuse."""
    from vdsm_managedvolume.engine import hosts as hostsmod
    e = engine()
    src = e.attach("host-a")
    e.run("connect_volume", e.vol, json.dumps(e.connector("host-b")))
    closed = _free_port()
    e.options[e.options.index("--host-addresses") + 1] = \
        "host-a=127.0.0.1:{},host-b=127.0.0.1:{}".format(
            closed, _free_port())

    r = e.shim.run("delete_volume", e.vol, driver=e.driver,
                   db_url=e.db_url, cid="d", options=e.options)

    assert r.code == 1, r.describe()
    identity = hostsmod.identity(e.connector("host-a"),
                                 e.connection_id("host-a"))
    assert r.error().startswith(
        "delete_volume failed: Volume {} was attached on host host-a, "
        "which cannot be asked whether it still has it (127.0.0.1:{}: "
        .format(e.vol, closed))
    assert r.error().endswith(
        "); nothing was done. Make the host reachable and remove the disk "
        "again, or, once no VM there uses the volume (the host is gone "
        "for good, or the volume was detached there), end that connection "
        "as user ovirt (/usr/share/ovirt-engine/managedblock/"
        "managedvolume-adapter disconnect_volume DRIVER_JSON DB_URL "
        "FLOW_ID {} '{}': the storage domain's driver options, the "
        "engine's managed block DB URL, any flow id) and remove the disk "
        "again".format(e.vol, identity))
    assert set(e.connections()) == {"host-a", "host-b"}
    assert _write_and_read(src["managed_path"]) == DATA

    # The admin's override, as the error line gives it; host-a keeps
    # its device (the admin detaches it there, or the host is gone).
    e.run("disconnect_volume", e.vol, identity)
    e.run("delete_volume", e.vol)
    assert e.connections() == {}
    assert "Ending the connection of volume {} to host host-b though the " \
        "host cannot be asked".format(e.vol) in engine_service.log()
    e.detach("host-a")


def test_a_host_whose_root_filesystem_changed_is_still_that_host(
        engine, engine_service, hosts):
    """os-brick's ``uuid`` is the root filesystem's UUID: a restore, a
    reinstall keeping the initiator, an image-based (oVirt Node) upgrade
    change it.  The host is still the connection's, its detach ends the
    connection (it was one that cannot be asked, kept for good)."""
    e = engine()
    e.attach("host-a", uuid="2f0e5b1c-root-fs-before-the-upgrade")
    e.detach("host-a")

    e.run("disconnect_volume", e.vol)

    assert e.connections() == {}
    assert "host host-a (127.0.0.1:{}) no longer has volume {}".format(
        hosts["host-a"].port, e.vol) in engine_service.log()


def test_a_host_of_that_name_with_another_identity_is_told_apart(
        engine, engine_service, hosts):
    """The connection was made for host-a's earlier initiator (a
    reinstall makes a new one, a clone of that name has its own): the
    host answering at host-a's address is not the one the export was
    granted to, and says so apart from another host answering.  Its
    connection stays; the delete names the admin's override."""
    from vdsm_managedvolume.engine import hosts as hostsmod
    e = engine()
    earlier = e.connector("host-a", initiator="iqn.1994-05.com.redhat:old")
    e.attach("host-a", initiator="iqn.1994-05.com.redhat:old")
    e.detach("host-a")

    e.run("disconnect_volume", e.vol)

    assert list(e.connections()) == ["host-a"]
    assert "127.0.0.1:{} is host host-a but not the identity the " \
        "connection was made for: initiator ".format(
            hosts["host-a"].port) in engine_service.log()
    r = e.shim.run("delete_volume", e.vol, driver=e.driver,
                   db_url=e.db_url, cid="d", options=e.options)
    assert r.code == 1, r.describe()
    override = hostsmod.identity(earlier, e.connection_id("host-a"))
    assert "disconnect_volume DRIVER_JSON DB_URL FLOW_ID {} '{}'".format(
        e.vol, override) in r.error()
    e.run("disconnect_volume", e.vol, override)
    assert e.connections() == {}


def test_same_grant_compares_the_identities_a_backend_grants_to():
    from vdsm_managedvolume.engine.hosts import same_grant
    a = {"host": "a", "initiator": "iqn.a", "nqn": "nqn.x"}
    b = {"host": "b", "initiator": "iqn.b", "nqn": "nqn.x"}
    renamed = {"host": "a2", "initiator": "iqn.a"}
    # Every identity both have must agree, without a transport ...
    assert not same_grant(a, b)
    assert same_grant(a, renamed)
    # ... the transport's own alone with one.
    assert same_grant(a, b, "nvmeof")
    assert not same_grant(a, b, "iscsi")
    assert same_grant(a, dict(renamed, nqn="nqn.y"), "iscsi")
    # Port WWNs: one in common, any case; empty or odd entries are none.
    fc1 = {"host": "f", "wwpns": ["50014380242B9750", "x1"]}
    fc2 = {"host": "g", "wwpns": ["50014380242b9750"]}
    assert same_grant(fc1, fc2, "fibre_channel")
    for odd in ("", [""], [None], [], None):
        assert not same_grant({"wwpns": odd}, {"wwpns": odd})
        assert not same_grant({"wwpns": odd}, {"wwpns": odd},
                              "fibre_channel")
    # Nothing in common is no grant shared; the name is never compared.
    assert not same_grant({"host": "a"}, {"host": "a"})
    assert not same_grant(None, a)
