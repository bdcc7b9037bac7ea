"""Fixtures for the host tests (see conftest.py).

Two kinds of brick, one interface (``privileged.Brick``):

- ``InProcessBrick`` runs the same fake connectors (``tests.fakebrick``)
  in the test process: fast, for the service's own logic and for races
  with many processes (one privsep daemon each would cost seconds).
- ``real_brick`` (session scope) is the real ``privileged.Brick`` with its
  real privsep daemon, loading ``tests.fakebrick`` inside the daemon
  (``cfg.connector_override``) and the real os-brick for ``local``.  The
  daemon costs seconds to start, so one serves the whole session; every
  test uses its own vol_ids and fake keys.

Fake state lives under ``$MANAGEDVOLUME_FAKEBRICK_DIR``; the session's
directory is exported before the daemon starts, so both the daemon and the
in-process connectors see it.
"""

import os
import pathlib
import stat
import subprocess
import sys
import tempfile
import uuid

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import privileged

from . import fakebrick

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def make_cfg(base, **overrides):
    """A Config with every written path under ``base``.

    Device directories (multipath, rbd) are under ``base/dev`` so that the
    fake connectors can create the device links there; udevadm is a fake
    that records its argv in ``base/udevadm.log``.
    """
    base = str(base)
    cfg = config.with_state_dir(config.Config(), os.path.join(base, "state"))
    cfg.multipath_dir = os.path.join(base, "dev", "mapper")
    cfg.rbd_dir = os.path.join(base, "dev", "rbd")
    cfg.udevadm = fake_udevadm(base)
    cfg.boot_id_file = os.path.join(base, "boot_id")
    if not os.path.exists(cfg.boot_id_file):
        new_boot(cfg)
    cfg.connector_override = "tests.fakebrick"
    cfg.lock_timeout = 30.0
    cfg.timeout = 30.0
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def new_boot(cfg, empty_run_dir=False):
    """"Reboot" the host of ``cfg``: a new boot id; ``empty_run_dir``: the
    tmpfs run dir (managed links) is emptied, as a real boot does; the
    fake connections stay, as an earlier boot's (``fakebrick.reboot``).
    Returns the new boot id."""
    boot_id = str(uuid.uuid4())
    with open(cfg.boot_id_file, "w") as f:
        f.write(boot_id + "\n")
    if empty_run_dir and os.path.isdir(cfg.run_dir):
        for name in os.listdir(cfg.run_dir):
            os.unlink(os.path.join(cfg.run_dir, name))
    if os.environ.get(fakebrick.ENV_DIR):
        fakebrick.reboot()
    return boot_id


def fake_udevadm(base, rc=0):
    path = os.path.join(base, "udevadm")
    if not os.path.exists(path):
        os.makedirs(base, exist_ok=True)
        with open(path, "w") as f:
            f.write('#!/bin/sh\necho "$@" >> "{}"\nexit {}\n'.format(
                os.path.join(base, "udevadm.log"), rc))
        os.chmod(path, 0o755)
    return path


def udevadm_calls(cfg):
    log = os.path.join(os.path.dirname(cfg.udevadm), "udevadm.log")
    try:
        with open(log) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def iscsi_connection(cfg, key=None, **knobs):
    """A fake iSCSI connection_info whose device appears in multipath_dir."""
    key = key or "k-" + uuid.uuid4().hex[:12]
    data = {
        "target_iqn": "iqn.2026-11.org.example:" + key,
        "target_portal": "192.0.2.1:3260",
        "target_lun": 1,
        "auth_method": "CHAP",
        "auth_username": "chapuser",
        "auth_password": "chap-secret-" + key,
        "fake_key": key,
        "fake_dev_dir": cfg.multipath_dir,
    }
    data.update(knobs)
    return {"driver_volume_type": "iscsi", "data": data}


FAKE_ISCSIADM = """#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *--login*)
    while [ ! -e {release} ]; do sleep 0.05; done
    echo "login-end $*" >> {log}
    exit 0 ;;
  *"-m session"*) echo "iscsiadm: No active sessions." >&2; exit 21 ;;
esac
exit 0
"""


def hung_iscsiadm(base, monkeypatch):
    """Put an ``iscsiadm`` whose logins hang first on the PATH (the
    daemon, started as root, inherits it); return the file it logs its
    argv to and the file that, once it exists, ends the logins."""
    bin_dir = os.path.join(str(base), "bin")
    os.makedirs(bin_dir, exist_ok=True)
    log = os.path.join(str(base), "iscsiadm.log")
    release = os.path.join(str(base), "logins-release")
    path = os.path.join(bin_dir, "iscsiadm")
    with open(path, "w") as f:
        f.write(FAKE_ISCSIADM.format(log=log, release=release))
    os.chmod(path, 0o755)
    monkeypatch.setenv("PATH", "{}:{}".format(bin_dir, os.environ["PATH"]))
    return pathlib.Path(log), pathlib.Path(release)


def hung_iscsi_info(key=None):
    """A multipath iSCSI volume on two portals, for os-brick's own
    connector (``fakebrick``'s ``fake_os_brick``), whose logins hang
    under ``hung_iscsiadm``.  Its target IQN is the test's own: a
    disconnect waits for any live ``iscsiadm --login`` of its targets
    (brick._wait_earlier), those of a test running beside it too."""
    key = key or "hung-" + uuid.uuid4().hex[:12]
    portals = ["192.0.2.1:3260", "192.0.2.2:3260"]
    iqn = "iqn.2003-01.org.example:" + key
    return {"driver_volume_type": "iscsi",
            "data": {"target_portal": portals[0], "target_iqn": iqn,
                     "target_lun": 1, "target_portals": portals,
                     "target_iqns": [iqn, iqn], "target_luns": [1, 1],
                     "fake_os_brick": True}}


def rbd_connection(cfg, name=None, **knobs):
    name = name or "pool/volume-" + uuid.uuid4().hex[:12]
    data = {"name": name, "hosts": ["192.0.2.2"], "ports": ["6789"],
            "auth_username": "admin",
            "keyring": "[client.admin]\n\tkey = AQBsecret==",
            "fake_dev_dir": cfg.rbd_dir}
    data.update(knobs)
    return {"driver_volume_type": "rbd", "data": data}


def new_id():
    return str(uuid.uuid4())


def connected(key):
    return key in fakebrick.connected()


class InProcessBrick:
    """privileged.Brick's interface, running tests.fakebrick in-process.

    ``local`` connections are handled like os-brick's LocalConnector
    ({'type': 'local', 'path': data['device_path']}, nothing to undo).
    The udev calls (for a service that is not root) write into
    ``cfg.udev_rules_dir`` here, checking what the daemon checks.
    """

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.calls = []
        self.properties = {"initiator": "iqn.1994-05.com.redhat:test",
                           "host": "test", "multipath": True,
                           "wwpns": ["1000"]}
        self.unsupported = False
        self.fail_properties = False

    def connector_properties(self):
        self.calls.append(("connector_properties",))
        if self.unsupported:
            raise errors.NotSupported("os-brick cannot be imported")
        if self.fail_properties:
            raise errors.HelperFailed("properties failed")
        return dict(self.properties)

    def connect(self, connection_info):
        self.calls.append(("connect", connection_info))
        privileged.check_sendable("connect", (connection_info,))
        conn = self._connector(connection_info)
        if conn is None:
            return {"type": "local",
                    "path": connection_info["data"]["device_path"]}
        try:
            return conn.connect_volume(_data(connection_info))
        except fakebrick.FakeConnectorError as e:
            raise errors.ConnectorFailed(str(e))

    def disconnect(self, connection_info, attachment, connecting=True):
        # connecting (the daemon's wait for earlier daemons' logins): no
        # daemon here, nothing to wait for.
        self.calls.append(("disconnect", connection_info, attachment))
        privileged.check_sendable("disconnect", (connection_info, attachment))
        conn = self._connector(connection_info)
        if conn is None:
            return
        try:
            conn.disconnect_volume(_data(connection_info, attachment),
                                   attachment)
        except fakebrick.FakeConnectorError as e:
            raise errors.ConnectorFailed(str(e))

    def extend(self, connection_info):
        """os-brick's extend_volume: the fake's rescan; ``local`` runs
        nothing and reports the device's size, as LocalConnector does."""
        self.calls.append(("extend", connection_info))
        conn = self._connector(connection_info)
        if conn is None:
            from vdsm_managedvolume import devices
            return devices.size(connection_info["data"]["device_path"])
        try:
            return conn.extend_volume(_data(connection_info))
        except fakebrick.FakeConnectorError as e:
            raise errors.HelperFailed(str(e))

    def add_udev_rule(self, sd_id, vol_id, path):
        from vdsm_managedvolume import transports
        from vdsm_managedvolume import udev
        self.calls.append(("add_udev_rule", sd_id, vol_id, path))
        try:
            udev.check_device_path(path, transports.device_dirs(self.cfg))
            dst = udev.add_rule(self.cfg, sd_id, vol_id, path)
        except udev.UnsafePath as e:
            raise errors.HelperFailed("UnsafePath: {}".format(e))
        udev.trigger(self.cfg, path)
        return dst

    def remove_udev_rule(self, sd_id, vol_id, temp=False):
        from vdsm_managedvolume import udev
        self.calls.append(("remove_udev_rule", sd_id, vol_id, temp))
        return udev.remove_rule(self.cfg, sd_id, vol_id, temp=temp)

    def delete_rbd_conf(self, path, holding=None):
        """brick.delete_rbd_conf, checking what the daemon checks."""
        from vdsm_managedvolume.transports import rbd
        self.calls.append(("delete_rbd_conf", path))
        problem = rbd.conf_problem(path, tempfile.gettempdir())
        if problem:
            raise errors.InvalidParams(name="path", reason=problem)
        if holding is not None:
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:
                return False
            if not any(k in text for k in holding):
                return False
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def stop(self):
        pass

    def daemon_pid(self):
        return None

    def _connector(self, connection_info):
        return fakebrick.get_connector(
            connection_info["driver_volume_type"], connection_info, "sudo")


@pytest.fixture
def fakebrick_dir(tmp_path, monkeypatch):
    """A private fake-connector state dir (in-process brick tests)."""
    d = tmp_path / "fakebrick"
    d.mkdir()
    monkeypatch.setenv(fakebrick.ENV_DIR, str(d))
    yield str(d)
    fakebrick.remove_confs(str(d))


@pytest.fixture
def host_cfg(tmp_path):
    return make_cfg(tmp_path)


@pytest.fixture
def inproc_brick(fakebrick_dir, host_cfg):
    return InProcessBrick(cfg=host_cfg)


@pytest.fixture
def inproc_service(host_cfg, inproc_brick):
    """A started Service over the in-process fake brick."""
    from vdsm_managedvolume import service
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    yield svc
    svc.close()


# The real privsep daemon (one per session)

@pytest.fixture(scope="session")
def session_fakebrick_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fakebrick"))
    old = os.environ.get(fakebrick.ENV_DIR)
    os.environ[fakebrick.ENV_DIR] = d
    yield d
    fakebrick.remove_confs(d)
    if old is None:
        os.environ.pop(fakebrick.ENV_DIR, None)
    else:
        os.environ[fakebrick.ENV_DIR] = old


@pytest.fixture(scope="session")
def real_brick_cfg(tmp_path_factory, session_fakebrick_dir):
    return make_cfg(tmp_path_factory.mktemp("brick"))


@pytest.fixture(scope="session")
def real_brick(real_brick_cfg):
    """The real privileged.Brick and its privsep daemon (as root)."""
    if os.geteuid() != 0:
        pytest.skip("the privsep daemon needs root")
    from vdsm_managedvolume import privileged
    brick = privileged.Brick(real_brick_cfg)
    yield brick
    brick.stop()


@pytest.fixture
def real_fakebrick_dir(session_fakebrick_dir, monkeypatch):
    # The in-process helpers (fakebrick.connected) read the env too.
    monkeypatch.setenv(fakebrick.ENV_DIR, session_fakebrick_dir)
    return session_fakebrick_dir


@pytest.fixture
def real_service(tmp_path, real_brick, real_fakebrick_dir):
    """A started Service with its own paths over the session's daemon."""
    from vdsm_managedvolume import service
    cfg = make_cfg(tmp_path)
    svc = service.Service(cfg, brick=real_brick)
    svc.start()
    yield svc
    svc.close()


@pytest.fixture
def flow_records(caplog):
    """caplog at DEBUG with the flow id set on every record as in
    production (log.ContextFilter on the handler)."""
    from vdsm_managedvolume import log
    caplog.set_level("DEBUG")
    log.install_filter(caplog.handler)
    return caplog


# Loop devices (as root)

class LoopDevice:

    def __init__(self, backing, size=4 * 1024 * 1024):
        with open(backing, "wb") as f:
            f.truncate(size)
        self.backing = backing
        self.path = subprocess.check_output(
            ["losetup", "--find", "--show", backing]).decode().strip()

    def detach(self):
        # Loop devices are shared by the machine: never detach a minor
        # that someone else attached since (see reattach).
        if self.current_backing() == self.backing:
            subprocess.run(["losetup", "-d", self.path], check=False)

    def current_backing(self):
        name = os.path.basename(self.path)
        try:
            with open("/sys/block/{}/loop/backing_file".format(name)) as f:
                return f.read().strip()
        except OSError:
            return None

    def reattach(self, backing):
        """Detach, then attach ``backing`` on the same minor (another
        device behind the same name).  Skips the test if another process
        took the minor in between."""
        with open(backing, "wb") as f:
            f.truncate(4 * 1024 * 1024)
        subprocess.check_call(["losetup", "-d", self.path])
        res = subprocess.run(["losetup", self.path, backing],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            self.backing = None
            pytest.skip("another process took {} between detach and "
                        "attach: {}".format(self.path, res.stdout.decode()))
        self.backing = backing


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    dev = LoopDevice(str(tmp_path / "backing.img"))
    yield dev
    dev.detach()


def is_symlink(path):
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _data(connection_info, attachment=None):
    """What the daemon hands the connector (brick._data): the
    transport's connector_data."""
    from vdsm_managedvolume import transports
    return transports.get(connection_info["driver_volume_type"]) \
        .connector_data(connection_info, attachment)
