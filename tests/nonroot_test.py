"""The service when it is not root: udev rules through the privsep daemon.

Inside vdsm the service runs as user ``vdsm``: it cannot write
``/etc/udev/rules.d`` nor a device's sysfs ``uevent``.  It then asks the
daemon (``add_udev_rule`` / ``remove_udev_rule``), which checks the ids and
the device path and rebuilds the rule itself.

What is proven here, and how:

- the daemon's entrypoints, for real, through a real daemon: what they
  write, where, and what they refuse;
- the routing, with the service in this (root) process forced to
  ``udev_writer = daemon``: the in-process ``udev`` writers are replaced by
  ones that fail, so every rule written or removed must have come from the
  daemon;
- the whole thing as a really unprivileged process: a Service in a child
  running as uid/gid 65534 (``nobody``), whose state dir it owns, and whose
  ``udev_rules_dir`` belongs to root.  It starts its daemon the way vdsm
  does through sudo, with a root helper: here a small broker in the test
  process (root) that runs ``privsep-helper`` for it, handing the helper
  the child's stdout (no sudoers rule is installed on the test machine).
  The daemon's configuration is root's, written by the test (as
  ``managedvolume-tool configure`` would): the child never writes it,
  and refuses to start a daemon when it is missing or its own.
  What this does not prove: the packaged sudoers rule itself (see
  tests/sudo_boundary_test.py for the pieces of that).
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import log
from vdsm_managedvolume import privileged
from vdsm_managedvolume import privsep
from vdsm_managedvolume import privsepconfig
from vdsm_managedvolume import service
from vdsm_managedvolume import udev

from . import fakebrick
from .host_fixtures import (REPO, fake_udevadm, iscsi_connection, make_cfg,
                            new_id, udevadm_calls)

pytestmark = pytest.mark.root

SD = "5f8b1c3e-2a47-4b9e-8d11-0c6a7e9b2f40"
VOL = "9c2d7a61-3e5f-4f0a-b8c4-1d2e3f4a5b6c"
NOBODY = 65534


@pytest.fixture(scope="module")
def daemon_cfg(tmp_path_factory, session_fakebrick_dir):
    return make_cfg(tmp_path_factory.mktemp("nonroot"), udev_writer="daemon")


@pytest.fixture(scope="module")
def daemon_brick(daemon_cfg):
    """A real daemon whose configuration names daemon_cfg's udev paths."""
    b = privileged.Brick(daemon_cfg)
    yield b
    b.stop()


@pytest.fixture
def rules_dir(daemon_cfg):
    yield daemon_cfg.udev_rules_dir
    shutil.rmtree(daemon_cfg.udev_rules_dir, ignore_errors=True)


@pytest.fixture
def daemon_service(tmp_path, daemon_cfg, daemon_brick, rules_dir,
                   real_fakebrick_dir, monkeypatch):
    """A root Service forced to write rules through the daemon, unable to
    write them itself."""
    def refuse(*a, **kw):
        raise AssertionError("the service wrote a udev rule itself")

    cfg = make_cfg(tmp_path, udev_writer="daemon",
                   udev_rules_dir=daemon_cfg.udev_rules_dir,
                   multipath_dir=daemon_cfg.multipath_dir,
                   rbd_dir=daemon_cfg.rbd_dir, udevadm=daemon_cfg.udevadm)
    svc = service.Service(cfg, brick=daemon_brick)
    svc.start()
    for name in ("add_rule", "remove_rule", "trigger"):
        monkeypatch.setattr(udev, name, refuse)
    yield svc
    monkeypatch.undo()
    svc.close()


# Who writes the rules

def test_udev_writer_typo_is_a_config_error(host_cfg):
    host_cfg.udev_writer = "deamon"
    with pytest.raises(errors.ConfigError, match="udev_writer"):
        service.Service(host_cfg, brick=object())


def test_root_service_writes_rules_without_a_daemon_round_trip(
        inproc_service, inproc_brick):
    svc = inproc_service
    vol_id = new_id()
    svc.attach_volume(vol_id, iscsi_connection(svc.cfg), SD)
    svc.detach_volume(vol_id, SD)
    assert [c[0] for c in inproc_brick.calls] == ["connect", "disconnect"]


def test_daemon_writer_routes_every_rule_operation_to_the_brick(
        host_cfg, inproc_brick):
    host_cfg.udev_writer = "daemon"
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.start()
    try:
        vol_id = new_id()
        res = svc.attach_volume(vol_id, iscsi_connection(host_cfg), SD)
        svc.detach_volume(vol_id, SD)
    finally:
        svc.close()
    assert [c[:3] for c in inproc_brick.calls if "udev" in c[0]] == [
        ("add_udev_rule", SD, vol_id),
        ("remove_udev_rule", SD, vol_id)]
    assert inproc_brick.calls[1][3] == res["path"]


# The daemon's entrypoints, for real

def test_daemon_writes_the_rule_it_builds_and_triggers_the_device(
        daemon_brick, daemon_cfg, rules_dir):
    path = os.path.join(daemon_cfg.multipath_dir, "36001405abcdef")
    dst = daemon_brick.add_udev_rule(SD, VOL, path)
    assert dst == udev.rule_path(rules_dir, SD, VOL)
    with open(dst) as f:
        assert f.read() == (
            'SYMLINK=="mapper/36001405abcdef", RUN+="/usr/bin/chown '
            'vdsm:qemu $env{DEVNAME}"\n')
    st = os.stat(dst)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    assert os.listdir(rules_dir) == [os.path.basename(dst)]
    assert udevadm_calls(daemon_cfg)[-1] == \
        "trigger --action=change " + path

    assert daemon_brick.remove_udev_rule(SD, VOL) is True
    assert daemon_brick.remove_udev_rule(SD, VOL) is False
    assert os.listdir(rules_dir) == []


def test_daemon_normalises_upper_case_ids(daemon_brick, rules_dir):
    dst = daemon_brick.add_udev_rule(SD.upper(), VOL.upper(), "/dev/loop7")
    assert dst == udev.rule_path(rules_dir, SD, VOL)
    assert daemon_brick.remove_udev_rule(SD.upper(), VOL) is True


@pytest.mark.parametrize("sd_id, vol_id, name", [
    ("../../../etc/udev", VOL, "sd_id"),
    (SD, "x/../../y", "vol_id"),
    (SD, None, "vol_id"),
])
def test_daemon_refuses_ids_that_are_not_uuids(daemon_brick, rules_dir,
                                               sd_id, vol_id, name):
    with pytest.raises(errors.InvalidParams) as e:
        daemon_brick.add_udev_rule(sd_id, vol_id, "/dev/loop7")
    assert e.value.name == name
    with pytest.raises(errors.InvalidParams):
        daemon_brick.remove_udev_rule(sd_id, vol_id)
    assert not os.path.exists(rules_dir) or os.listdir(rules_dir) == []


@pytest.mark.parametrize("path", [
    "/etc/shadow",
    "/dev/../etc/shadow",
    "dev/sda",
    "/dev//sda",
    '/dev/mapper/x", RUN+="/bin/sh -c evil',
    "/dev/mapper/x\nKERNEL==\"sda\"",
    "/dev/sd a",
    "",
    None,
])
def test_daemon_refuses_paths_that_are_not_plain_device_paths(
        daemon_brick, rules_dir, path):
    with pytest.raises(errors.HelperFailed, match="UnsafePath"):
        daemon_brick.add_udev_rule(SD, VOL, path)
    assert not os.path.exists(rules_dir) or os.listdir(rules_dir) == []


def test_daemon_entrypoints_take_no_file_name_or_text():
    # Read from the source: importing brick here would drag oslo.privsep's
    # daemon side (and eventlet) into the test process.
    import ast
    with open(os.path.join(REPO, "vdsm_managedvolume", "brick.py")) as f:
        tree = ast.parse(f.read())
    params = {node.name: [a.arg for a in node.args.args]
              for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert params["add_udev_rule"] == [
        "sd_id", "vol_id", "path", "deadline", "flow_id"]
    assert params["remove_udev_rule"] == [
        "sd_id", "vol_id", "temp", "deadline", "flow_id"]
    # The one path taken: a ceph conf to delete, only one os-brick could
    # have written (rbd.conf_problem; privileged_test).
    assert params["delete_rbd_conf"] == ["path", "holding", "deadline",
                                         "flow_id"]


def test_daemon_removes_the_temp_file_only_when_asked(daemon_brick,
                                                      rules_dir):
    daemon_brick.add_udev_rule(SD, VOL, "/dev/loop7")
    tmp = udev.temp_path(rules_dir, SD, VOL)
    open(tmp, "w").close()
    assert daemon_brick.remove_udev_rule(SD, VOL, temp=True) is True
    assert os.listdir(rules_dir) == [
        os.path.basename(udev.rule_path(rules_dir, SD, VOL))]
    assert daemon_brick.remove_udev_rule(SD, VOL) is True


# The service routing through the real daemon

def test_service_attach_and_detach_write_rules_only_through_the_daemon(
        daemon_service, flow_records):
    svc = daemon_service
    pid = svc._brick.daemon_pid()
    vol_id = new_id()
    ci = iscsi_connection(svc.cfg)
    with log.flow("flow-udev"):
        res = svc.attach_volume(vol_id, ci, SD)
    rule = udev.rule_path(svc.cfg.udev_rules_dir, SD, vol_id)
    assert udev.rule_ok(svc.cfg, SD, vol_id, res["path"])
    assert os.readlink(res["managed_path"]) == res["path"]
    assert udevadm_calls(svc.cfg)[-1] == \
        "trigger --action=change " + res["path"]
    wrote = [r for r in flow_records.records
             if r.getMessage().startswith("Wrote udev rule " + rule)]
    assert [(r.process, r.flow_id) for r in wrote] == [(pid, "flow-udev")]

    svc.detach_volume(vol_id, SD)
    assert not os.path.exists(rule)
    assert ci["data"]["fake_key"] not in fakebrick.connected()
    assert svc.volumes_info() == []


def test_reconcile_removes_orphan_rules_through_the_daemon(daemon_service):
    svc = daemon_service
    svc._brick.add_udev_rule(SD, VOL, "/dev/loop7")
    tmp = udev.temp_path(svc.cfg.udev_rules_dir, SD, new_id())
    open(tmp, "w").close()
    assert sorted(e["action"] for e in svc.reconcile(apply=False)) == [
        "remove-rule", "remove-temp-rule"]
    assert [e["result"] for e in svc.reconcile()] == ["done", "done"]
    assert os.listdir(svc.cfg.udev_rules_dir) == []
    assert svc.reconcile() == []


def test_reconcile_recreates_a_missing_rule_through_the_daemon(
        daemon_service):
    svc = daemon_service
    vol_id = new_id()
    res = svc.attach_volume(vol_id, iscsi_connection(svc.cfg), SD)
    os.unlink(udev.rule_path(svc.cfg.udev_rules_dir, SD, vol_id))
    entry, = svc.reconcile()
    assert (entry["action"], entry["result"]) == ("recreate-rule", "done")
    assert udev.rule_ok(svc.cfg, SD, vol_id, res["path"])
    svc.detach_volume(vol_id, SD)


# A really unprivileged service

# The root helper the child runs instead of sudo (a shell script: the
# child, as nobody, cannot exec this Python, which lives under /root).
# It leaves its argv in the broker's spool directory and waits for the
# helper's exit code.
BROKER_CLIENT = """#!/bin/sh
spool=$1; shift
req=$(mktemp "$spool/req.XXXXXX") || exit 1
printf '%s\\n' "$@" > "$req.args"
mv "$req.args" "$req.ready"
while [ ! -e "$req.rc" ]; do sleep 0.02; done
exit "$(cat "$req.rc")"
"""


class Broker:
    """Runs privsep-helper as root for an unprivileged client: our sudo.

    Like the sudoers rule, it runs nothing but privsep-helper with our
    context.  The helper's output goes to ``output`` (the client cannot
    hand us its stdout through the spool).
    """

    def __init__(self, spool, env, output):
        self.spool = spool
        self.env = env
        self.output = output
        self.started = []
        self._stop = threading.Event()
        os.makedirs(spool, mode=0o1777, exist_ok=True)
        os.chmod(spool, 0o1777)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self):
        self._stop.set()
        self._thread.join(10)

    def _serve(self):
        while not self._stop.wait(0.02):
            for name in sorted(os.listdir(self.spool)):
                if name.endswith(".ready"):
                    self._run(os.path.join(self.spool, name[:-6]))

    def _run(self, req):
        with open(req + ".ready") as f:
            argv = f.read().splitlines()
        os.unlink(req + ".ready")
        rc = 126
        if argv[argv.index("--privsep_context") + 1] == privsep.CONTEXT:
            cmd = [privileged._privsep_helper()] + argv
            self.started.append(cmd)
            with open(self.output, "ab") as out:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out,
                                    env=self.env).returncode
        with open(req + ".rc.tmp", "w") as f:
            f.write(str(rc))
        os.rename(req + ".rc.tmp", req + ".rc")


def run_as(uid, func):
    """Run ``func()`` in a forked child with uid/gid ``uid``; return its
    JSON-able result (or raise what it raised, as text).

    Forked, not exec'd: this Python lives where nobody may not read.
    Everything the child imports lazily must be imported here first.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            result = {"ok": func()}
        except BaseException as e:
            import traceback
            result = {"error": "".join(traceback.format_exception(e))}
        finally:
            try:
                os.write(w, json.dumps(result).encode())
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result.get("error")
    return result["ok"]


@pytest.mark.slow
def test_unprivileged_service_attaches_and_detaches_through_the_daemon(
        tmp_path):
    # What the child lazily imports (it could not read the stdlib later).
    import msgpack  # noqa: F401
    import oslo_privsep.comm  # noqa: F401

    # Everything the child writes lives in a directory it owns; pytest's
    # tmp_path (0700, root) is not traversable for it.
    base = os.path.realpath(
        subprocess.check_output(["mktemp", "-d", "/tmp/mv-nonroot-XXXX"])
        .decode().strip())
    broker = None
    try:
        os.chmod(base, 0o755)
        fake_dir = os.path.join(base, "fakebrick")
        os.makedirs(fake_dir, mode=0o755)
        fake_udevadm(base)
        client = os.path.join(base, "broker-client")
        with open(client, "w") as f:
            f.write(BROKER_CLIENT)
        os.chmod(client, 0o755)
        rules_dir = os.path.join(base, "rules.d")   # root's, 0755
        os.makedirs(rules_dir, mode=0o755)
        # The daemon's configuration, root's in a root directory.
        etc = os.path.join(base, "etc")
        os.makedirs(etc, mode=0o755)
        privsep_config = os.path.join(etc, "privsep.conf")
        with open(privsep_config, "w") as f:
            f.write(privsepconfig.config_text(make_cfg(
                base, udev_rules_dir=rules_dir,
                privsep_config=privsep_config)))
        os.chown(base, NOBODY, NOBODY)

        env = dict(os.environ, PYTHONPATH=REPO)
        env[fakebrick.ENV_DIR] = fake_dir
        # Not sudo: the fake connectors are refused under sudo.
        for name in ("SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND"):
            env.pop(name, None)
        broker = Broker(os.path.join(base, "spool"), env,
                        os.path.join(str(tmp_path), "helper.out"))
        sd_id, vol_id = new_id(), new_id()

        def child():
            cfg = make_cfg(base, udev_rules_dir=rules_dir,
                           privsep_config=privsep_config)
            # As vdsm's would be: "sudo privsep-helper --config-file X".
            cfg.helper_command = shlex.join(
                [client, broker.spool, "--config-file",
                 cfg.privsep_config_file])
            svc = service.Service(cfg)
            svc.start()
            out = {"uid": os.geteuid(), "writer": svc.udev_writer,
                   "can_write_rules": os.access(rules_dir, os.W_OK)}
            try:
                ci = iscsi_connection(cfg)
                res = svc.attach_volume(vol_id, ci, sd_id)
                out["attach"] = res
                out["rule_ok"] = udev.rule_ok(cfg, sd_id, vol_id,
                                              res["path"])
                out["key"] = ci["data"]["fake_key"]
                out["link_uid"] = os.lstat(res["managed_path"]).st_uid
                out["rule_uid"] = os.stat(udev.rule_path(
                    rules_dir, sd_id, vol_id)).st_uid
                out["db_uid"] = os.stat(cfg.db_path).st_uid
                svc.detach_volume(vol_id, sd_id)
                out["rule_after_detach"] = os.path.exists(
                    udev.rule_path(rules_dir, sd_id, vol_id))
                out["records_after_detach"] = svc.volumes_info()
            finally:
                svc.close()
            return out

        out = run_as(NOBODY, child)

        assert out["uid"] == NOBODY
        assert out["can_write_rules"] is False
        assert out["writer"] == "daemon"
        assert out["rule_ok"] is True
        assert out["rule_uid"] == 0           # written by the daemon
        assert out["link_uid"] == NOBODY      # the link: not via the daemon
        assert out["db_uid"] == NOBODY
        assert out["attach"]["managed_path"] == os.path.join(
            base, "state", "run", "managedvolumes",
            "{}_{}".format(sd_id, vol_id))
        assert out["rule_after_detach"] is False
        assert out["records_after_detach"] == []
        assert os.listdir(rules_dir) == []
        assert out["key"] not in fakebrick.connected(fake_dir)
        assert len(broker.started) == 1       # one long-lived daemon
        assert broker.started[0][1:] == [
            "--config-file", privsep_config,
            "--privsep_context", privsep.CONTEXT,
            "--privsep_sock_path", os.path.join(
                base, "state", "run", "managedvolume", "privsep.sock")]
        st = os.stat(privsep_config)        # never rewritten by the child
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
        with open(os.path.join(base, "udevadm.log")) as f:
            assert f.read() == "trigger --action=change {}\n".format(
                out["attach"]["path"])
    finally:
        if broker is not None:
            broker.close()
        shutil.rmtree(base, ignore_errors=True)
