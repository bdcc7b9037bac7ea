"""managedvolume-tool: each sub-command run as an admin runs it.

Most tests run the real console entry point in a subprocess (exit codes,
stdout/stderr as a shell sees them) on a ``--state-dir`` under tmp_path;
the few that must fake the host (os-brick missing) call ``tool.main``
in-process.
"""

import datetime
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile

import pytest

import vdsm_managedvolume
from vdsm_managedvolume import boot
from vdsm_managedvolume import config
from vdsm_managedvolume import pki
from vdsm_managedvolume import store
from vdsm_managedvolume import tool
from vdsm_managedvolume import udev

VOL_ID = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"
VOL_ID2 = "0b7e53c4-8f7d-4f7c-9b66-5e0c3f1d2a11"
SD_ID = "00000000-0000-0000-0000-000000000000"
SECRET = "s3cr3t-chap-p4ss"

ISCSI = {
    "driver_volume_type": "iscsi",
    "data": {
        "target_portal": "192.0.2.10:3260",
        "target_iqn": "iqn.2010-10.org.openstack:volume-1",
        "target_lun": 1,
        "auth_method": "CHAP",
        "auth_username": "user",
        "auth_password": SECRET,
    },
}


def run(*args, check=None, env=None):
    """Run managedvolume-tool; return the CompletedProcess."""
    cmd = [sys.executable, "-m", "vdsm_managedvolume.tool", *args]
    full_env = dict(os.environ, PYTHONPATH=_repo())
    full_env.pop("MANAGEDVOLUME_CONFIG", None)
    full_env.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env,
                       timeout=120)
    if check is not None:
        assert p.returncode == check, (p.stdout, p.stderr)
    return p


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
def cfg(state):
    return config.with_state_dir(config.Config(), state)


@pytest.fixture
def configured(state, cfg):
    run("--state-dir", state, "configure", check=0)
    return cfg


# configure

def test_configure_creates_directories_and_database(state, cfg):
    p = run("--state-dir", state, "configure", check=0)

    for d in (cfg.run_dir, cfg.state_run_dir, cfg.lock_dir,
              cfg.brick_lock_dir, cfg.udev_rules_dir):
        assert os.path.isdir(d)
        assert d in p.stdout
    assert os.stat(cfg.db_path).st_mode & 0o777 == 0o600
    with store.open(cfg.db_path) as db:
        assert db.version_info()["version"] == store.VERSION
    assert "created" in p.stdout


def test_configure_makes_os_brick_lock_path_its_owners_alone(state, cfg):
    run("--state-dir", state, "configure", check=0)
    assert os.stat(cfg.brick_lock_dir).st_mode & 0o777 == 0o700
    os.chmod(cfg.brick_lock_dir, 0o755)     # made by an older version

    p = run("--state-dir", state, "--json", "configure", check=0)

    assert os.stat(cfg.brick_lock_dir).st_mode & 0o777 == 0o700
    assert {"action": "chmod", "path": cfg.brick_lock_dir,
            "detail": "0700"} in json.loads(p.stdout)["actions"]


def test_configure_twice_changes_nothing_the_second_time(state, cfg):
    run("--state-dir", state, "configure", check=0)
    p = run("--state-dir", state, "--json", "configure", check=0)

    report = json.loads(p.stdout)
    assert report["ok"] is True
    assert [a["action"] for a in report["actions"]] == ["opened"]
    assert report["actions"][0]["version"] == store.VERSION


def test_configure_migrates_a_vdsm_database_in_place(state, cfg):
    # vdsm's managedvolumedb, schema version 1, with one attached volume.
    os.makedirs(os.path.dirname(cfg.db_path))
    conn = sqlite3.connect(cfg.db_path)
    conn.executescript("""
        CREATE TABLE versions (version INTEGER PRIMARY KEY,
                               description TEXT, updated datetime);
        INSERT INTO versions VALUES (1, 'Initial version',
                                     '2024-01-02 03:04:05.000000');
        CREATE TABLE volumes (vol_id TEXT PRIMARY KEY, path TEXT,
                              connection_info TEXT, attachment TEXT,
                              multipath_id TEXT, updated datetime);
        CREATE UNIQUE INDEX multipath_id ON volumes (multipath_id);
    """)
    conn.execute("INSERT INTO volumes VALUES (?, ?, ?, ?, ?, ?)",
                 (VOL_ID, "/dev/mapper/3600a", json.dumps(ISCSI),
                  json.dumps({"path": "/dev/sda", "type": "block"}),
                  "3600a", "2024-01-02 03:04:05.000000"))
    conn.commit()
    conn.close()

    run("--state-dir", state, "configure", check=0)

    with store.open(cfg.db_path) as db:
        assert db.version_info()["version"] == store.VERSION
        rec = db.get_volume(VOL_ID)
    assert rec["state"] == "attached"
    assert rec["path"] == "/dev/mapper/3600a"


def test_configure_needs_neither_os_brick_nor_yaml(state, cfg):
    # The RPM's %post runs it; it must work with the standard library and
    # the package alone.
    code = ("import sys\n"
            "for m in ('os_brick', 'oslo_privsep', 'oslo_config', 'yaml',"
            " 'cryptography'):\n"
            "    sys.modules[m] = None\n"
            "from vdsm_managedvolume import tool\n"
            "sys.exit(tool.main(['--state-dir', {!r}, 'configure']))\n"
            .format(state))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo(),
                   capture_output=True)
    assert os.path.exists(cfg.db_path)


@pytest.mark.root
def test_configure_gives_database_and_run_dirs_to_owner(state, cfg):
    p = run("--state-dir", state, "--json", "configure",
            "--owner", "nobody:nogroup", check=0)

    import pwd
    nobody = pwd.getpwnam("nobody").pw_uid
    for path in (cfg.db_path, cfg.run_dir, cfg.lock_dir):
        assert os.stat(path).st_uid == nobody
    # Not ours: the udev rules directory stays root's.
    assert os.stat(cfg.udev_rules_dir).st_uid == 0
    chowned = {a["path"] for a in json.loads(p.stdout)["actions"]
               if a["action"] == "chown"}
    assert cfg.db_path in chowned


def test_configure_with_unknown_owner_fails_before_touching_anything(
        state, cfg):
    p = run("--state-dir", state, "configure", "--owner",
            "no-such-user-xyz:no-such-group", check=2)
    # Not KeyError's garbled text nor the internal code 100.
    assert p.stderr == (
        "managedvolume-tool: Configuration error: --owner "
        "no-such-user-xyz:no-such-group: no user 'no-such-user-xyz'\n")
    assert not os.path.exists(cfg.db_path)
    p = run("--state-dir", state, "configure", "--owner",
            "root:no-such-group", check=2)
    assert p.stderr == (
        "managedvolume-tool: Configuration error: --owner "
        "root:no-such-group: no group 'no-such-group'\n")
    assert not os.path.exists(state)


# list

def _add_records(cfg, tmp_path):
    device = tmp_path / "device"
    device.write_bytes(b"")
    with store.open(cfg.db_path) as db:
        db.add_volume(VOL_ID, SD_ID, ISCSI)
        db.update_volume(VOL_ID, state="attached", path=str(device),
                         attachment={"path": str(device), "type": "block"},
                         managed_path="/run/x", size=1073741824)
        db.add_volume(VOL_ID2, SD_ID, {"driver_volume_type": "rbd",
                                       "data": {"name": "pool/v",
                                                "keyring": SECRET}})
        db.update_volume(VOL_ID2, state="attached",
                         path=str(tmp_path / "gone"))
    return device


def test_list_without_database_says_nothing_is_recorded(state):
    p = run("--state-dir", state, "list", check=0)
    assert "no database at {}/lib/managedvolume.db: nothing was ever " \
        "attached here".format(state) in p.stdout


def test_list_shows_state_type_age_and_path_and_masks_secrets(
        configured, state, tmp_path):
    device = _add_records(configured, tmp_path)

    p = run("--state-dir", state, "list", "-l", check=0)

    lines = p.stdout.splitlines()
    assert lines[0].split() == ["VOL_ID", "STATE", "TYPE", "AGE", "PATH",
                                "STALE"]
    row1 = next(line for line in lines if line.startswith(VOL_ID2))
    row2 = next(line for line in lines if line.startswith(VOL_ID))
    assert row1.split()[1:3] == ["attached", "rbd"]
    assert row1.split()[5] == "(missing)"
    assert row2.split()[1:3] == ["attached", "iscsi"]
    assert row2.split()[3].endswith("s")        # age in seconds: "0m3s"
    assert row2.split()[4] == str(device)
    assert "auth_username" in p.stdout          # -l shows connection_info
    assert "  size            1073741824" in lines
    assert SECRET not in p.stdout + p.stderr


def test_list_json_is_masked_and_filterable(configured, state, tmp_path):
    _add_records(configured, tmp_path)

    p = run("list", VOL_ID, "--json", "--state-dir", state, check=0)

    records = json.loads(p.stdout)
    assert [r["vol_id"] for r in records] == [VOL_ID]
    rec = records[0]
    assert rec["state"] == "attached"
    assert rec["exists"] is True
    assert rec["age"] >= 0
    assert rec["connection_info"]["data"]["auth_password"] == "********"
    assert rec["connection_info"]["data"]["auth_username"] == "user"
    assert SECRET not in p.stdout


def test_list_secrets_shows_them_to_root_on_the_host(configured, state,
                                                     tmp_path):
    # The agent refuses include_secrets ([volumes] remote_secrets): this
    # is where an admin reads them.
    _add_records(configured, tmp_path)

    p = run("list", "--json", "--secrets", "--state-dir", state, check=0)
    records = {r["vol_id"]: r for r in json.loads(p.stdout)}
    assert records[VOL_ID2]["connection_info"]["data"]["keyring"] == SECRET
    p = run("list", "-l", "--secrets", "--state-dir", state, check=0)
    assert SECRET in p.stdout


def test_list_shows_which_records_are_stale_and_why(configured, state,
                                                    tmp_path):
    device = tmp_path / "device"
    device.write_bytes(b"")
    this_boot = boot.current(configured)
    with store.open(configured.db_path) as db:
        # Attached in this boot, its device there: live.
        db.add_volume(VOL_ID, SD_ID, ISCSI, boot_id=this_boot)
        db.update_volume(VOL_ID, state="attached", path=str(device))
        # Attached before the host rebooted.
        db.add_volume(VOL_ID2, SD_ID, ISCSI, boot_id="an-earlier-boot")
        db.update_volume(VOL_ID2, state="attached", path=str(device))

    p = run("--state-dir", state, "list", check=0)
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:]}
    assert rows[VOL_ID].endswith("  -")
    assert rows[VOL_ID2].endswith("  made in another boot")

    p = run("--state-dir", state, "list", "--json", check=0)
    records = {r["vol_id"]: r for r in json.loads(p.stdout)}
    assert records[VOL_ID]["stale"] is False
    assert "stale_reason" not in records[VOL_ID]
    assert records[VOL_ID2]["stale"] is True
    assert records[VOL_ID2]["stale_reason"] == "made in another boot"


def _journal_content(cfg):
    """The database file's bytes and its write-ahead log's (a reader may
    create the log empty, as SQLite does for any reader of WAL)."""
    content = []
    for path in (cfg.db_path, cfg.db_path + "-wal"):
        try:
            with open(path, "rb") as f:
                content.append(f.read())
        except FileNotFoundError:
            content.append(b"")
    return content


def test_list_reads_the_journal_without_changing_it(configured, state,
                                                    tmp_path):
    _add_records(configured, tmp_path)
    before = _journal_content(configured)

    run("--state-dir", state, "list", "-l", check=0)

    assert _journal_content(configured) == before


@pytest.mark.parametrize("version", [1, store.VERSION + 1])
def test_list_of_a_journal_of_another_schema_fails_and_leaves_it(
        state, cfg, version):
    # Version 1 is vdsm's own schema: configure (or the agent) migrates
    # it; a newer one is another version's.  list only reads.
    os.makedirs(os.path.dirname(cfg.db_path))
    with sqlite3.connect(cfg.db_path) as db:
        db.executescript(store.MIGRATIONS[0][2])
        db.execute("CREATE TABLE versions (version INTEGER PRIMARY KEY, "
                   "description TEXT, updated datetime)")
        db.execute("INSERT INTO versions VALUES (?, 'test', NULL)",
                   (version,))
    db.close()

    p = run("--state-dir", state, "list", check=1)

    assert "code=935" in p.stderr
    assert "schema version {}, {} this program's {}".format(
        version, "older than" if version == 1 else "newer than",
        store.VERSION) in p.stderr
    assert ("managedvolume-tool configure' migrates it" in p.stderr) == (
        version == 1)
    assert store.inspect(cfg.db_path)["version"] == version


def test_list_of_an_unrecorded_volume_names_it(configured, state,
                                               tmp_path):
    _add_records(configured, tmp_path)
    other = "1f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"
    p = run("--state-dir", state, "list", other, check=0)
    assert p.stdout.startswith("no record of {} in ".format(other))


def test_list_of_an_invalid_id_says_so(configured, state):
    p = run("--state-dir", state, "list", "not-a-uuid", check=2)
    assert "VOL_ID[0]" in p.stderr and "'not-a-uuid' is not a canonical " \
        "UUID" in p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("column, text", [
    ("connection_info", "{not json"),
    ("connection_info", '"str"'),
    ("attachment", "[1, 2]"),
    ("identity", "{not json"),
])
def test_one_corrupt_record_is_listed_stale_and_forgotten_only_by_force(
        configured, state, tmp_path, column, text):
    # It failed every list and reconcile (a traceback for JSON of the
    # wrong type), and the agent could not start.
    _add_records(configured, tmp_path)
    with sqlite3.connect(configured.db_path) as db:
        db.execute("UPDATE volumes SET {} = ? WHERE vol_id = ?".format(
            column), (text, VOL_ID))
    db.close()

    p = run("--state-dir", state, "list", check=0)
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:]}
    assert "corrupt record: {}".format(column) in rows[VOL_ID]
    assert "reconcile --apply --force' forgets it" in rows[VOL_ID]
    assert VOL_ID2 in rows
    assert "Traceback" not in p.stderr
    p = run("--state-dir", state, "list", "--json", check=0)
    records = {r["vol_id"]: r for r in json.loads(p.stdout)}
    assert records[VOL_ID]["stale"] is True
    assert records[VOL_ID]["corrupt"].startswith(column)

    for args in (["reconcile"], ["reconcile", "--apply"]):
        p = run("--state-dir", state, "--json", *args, check=0)
        entry, = [v for v in json.loads(p.stdout)["volumes"]
                  if v["vol_id"] == VOL_ID]
        assert (entry["action"], entry["result"]) == ("stale", "kept")
        assert entry["reason"].startswith("corrupt record: " + column)

    p = run("--state-dir", state, "--json", "reconcile", "--apply",
            "--force", check=0)
    entry, = [v for v in json.loads(p.stdout)["volumes"]
              if v["vol_id"] == VOL_ID]
    assert (entry["action"], entry["result"]) == (
        "forget", "forgotten: corrupt record")
    with store.open(configured.db_path) as db:
        assert [r["vol_id"] for r in db.volumes()] == [VOL_ID2]


# reconcile

def test_reconcile_forgets_a_record_the_channel_cannot_carry(
        configured, state):
    # Journaled before attach refused lone surrogates: its connect could
    # never be sent, so nothing is connected; no daemon is needed.
    ci = {"driver_volume_type": "iscsi",
          "data": {"target_iqn": "iqn.x:\ud800", "target_lun": 1}}
    with store.open(configured.db_path) as db:
        db.add_volume(VOL_ID, SD_ID, ci)
    p = run("--state-dir", state, "--json", "reconcile", "--apply", check=0)
    assert [(v["action"], v["result"])
            for v in json.loads(p.stdout)["volumes"]] == [
        ("rollback", "done")]
    assert "cannot be sent to the privsep daemon" in p.stderr
    with store.open(configured.db_path) as db:
        assert db.volumes() == []


def _orphan_link(cfg):
    os.makedirs(cfg.run_dir, exist_ok=True)
    link = os.path.join(cfg.run_dir, "{}_{}".format(SD_ID, VOL_ID))
    os.symlink("/dev/null", link)
    return link


def test_reconcile_on_a_consistent_host_finds_nothing(configured, state):
    p = run("--state-dir", state, "reconcile", check=0)
    assert "nothing to reconcile" in p.stdout


def test_reconcile_dry_run_reports_and_changes_nothing(configured, state):
    link = _orphan_link(configured)

    p = run("--state-dir", state, "reconcile", check=1)

    assert "remove-link" in p.stdout
    assert "planned" in p.stdout
    assert "--apply" in p.stdout
    assert os.path.islink(link)


def _journal_files(cfg):
    """{suffix: bytes} of the journal and its -wal file (a reader of a WAL
    database may create an empty -wal: the same as none)."""
    found = {}
    for suffix in ("", "-wal"):
        try:
            with open(cfg.db_path + suffix, "rb") as f:
                found[suffix] = f.read()
        except FileNotFoundError:
            pass
    return {k: v for k, v in found.items() if v}


def test_reconcile_dry_run_opens_the_journal_read_only(configured, state):
    with store.open(configured.db_path) as db:
        db.add_volume(VOL_ID, SD_ID, ISCSI)      # an interrupted attach
    before = _journal_files(configured)

    p = run("--state-dir", state, "--json", "reconcile", check=1)

    assert [(v["action"], v["result"])
            for v in json.loads(p.stdout)["volumes"]] == [
        ("rollback", "planned")]
    assert _journal_files(configured) == before


def test_reconcile_dry_run_after_a_reboot_makes_no_lock_directory(
        configured, state):
    # /run is a tmpfs: after a reboot, before the agent starts, the lock
    # directory is gone.  No operation can hold a lock in it then: the
    # dry run plans without one, and makes nothing.
    with store.open(configured.db_path) as db:
        db.add_volume(VOL_ID, SD_ID, ISCSI)      # an interrupted attach
    shutil.rmtree(configured.lock_dir)
    # udev rules are on disk: they outlive the reboot, a leftover's too.
    other = "3c0e7a6e-57f8-4bd4-9a8f-6f4c3d1b2a10"
    os.makedirs(configured.udev_rules_dir, exist_ok=True)
    with open(udev.rule_path(configured.udev_rules_dir, SD_ID, other),
              "w") as f:
        f.write("# a leftover\n")

    p = run("--state-dir", state, "--json", "reconcile", check=1)

    assert [(v["action"], v["result"])
            for v in json.loads(p.stdout)["volumes"]] == [
        ("rollback", "planned"), ("remove-rule", "planned")]
    assert not os.path.exists(configured.lock_dir)


def test_reconcile_dry_run_leaves_a_vdsm_journal_unmigrated(state, cfg):
    # A dry run on a host where vdsm (or an older agent) owns the journal:
    # migrating it is configure's job, never a look's.
    os.makedirs(os.path.dirname(cfg.db_path))
    with sqlite3.connect(cfg.db_path) as db:
        db.executescript(store.MIGRATIONS[0][2])
        db.execute("CREATE TABLE versions (version INTEGER PRIMARY KEY, "
                   "description TEXT, updated datetime)")
        db.execute("INSERT INTO versions VALUES (1, 'test', NULL)")
    db.close()
    before = _journal_files(cfg)

    p = run("--state-dir", state, "reconcile", check=1)

    assert "code=935" in p.stderr
    assert "'managedvolume-tool configure' migrates it" in p.stderr
    assert store.inspect(cfg.db_path)["version"] == 1
    assert _journal_files(cfg) == before
    assert not os.path.exists(cfg.run_dir)
    assert not os.path.exists(cfg.lock_dir)


def test_reconcile_apply_removes_a_link_no_record_owns(configured, state):
    link = _orphan_link(configured)

    p = run("--state-dir", state, "--json", "reconcile", "--apply", check=0)

    report = json.loads(p.stdout)
    assert report["apply"] is True
    assert report["failed"] == 0
    assert [(v["action"], v["result"]) for v in report["volumes"]] == [
        ("remove-link", "done")]
    assert not os.path.lexists(link)
    run("--state-dir", state, "reconcile", check=0)


def test_reconcile_reports_a_stale_record_without_failing(
        configured, state, tmp_path):
    with store.open(configured.db_path) as db:
        db.add_volume(VOL_ID, SD_ID, ISCSI, state="attached")
        db.update_volume(VOL_ID, path=str(tmp_path / "gone"))

    p = run("--state-dir", state, "--json", "reconcile", check=0)

    (entry,) = json.loads(p.stdout)["volumes"]
    assert (entry["vol_id"], entry["action"], entry["result"]) == (
        VOL_ID, "stale", "kept")
    assert SECRET not in p.stdout


@pytest.mark.root
@pytest.mark.slow
def test_reconcile_apply_rolls_back_an_interrupted_attach(
        configured, state, tmp_path):
    # A crash between "attaching" and "attached": the real privsep daemon
    # runs the (no-op) local disconnect, then the record goes.
    local = {"driver_volume_type": "local",
             "data": {"device_path": str(tmp_path / "dev")}}
    with store.open(configured.db_path) as db:
        db.add_volume(VOL_ID, SD_ID, local)

    dry = run("--state-dir", state, "--json", "reconcile", check=1)
    assert [(v["action"], v["result"])
            for v in json.loads(dry.stdout)["volumes"]] == [
        ("rollback", "planned")]

    p = run("--state-dir", state, "--json", "reconcile", "--apply", check=0)
    assert [(v["action"], v["result"])
            for v in json.loads(p.stdout)["volumes"]] == [
        ("rollback", "done")]
    with store.open(configured.db_path) as db:
        assert db.volumes() == []


# check

def _checks(p):
    return {c["name"]: c for c in json.loads(p.stdout)["checks"]}


def test_check_on_a_configured_state_dir_passes_with_warnings(
        configured, state):
    pki.ensure_dev_pki(configured)

    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)

    checks = _checks(p)
    assert json.loads(p.stdout)["ok"] is True
    for name in ("config", "os-brick", "oslo.privsep", "lock-dir",
                 "lock-path", "lock-files", "database", "key-mode",
                 "cert-key", "cert-ca",
                 "cert-expiry", "ca-expiry", "udevadm", "chown"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["privsep"]["status"] == "skip"
    assert "schema version {}".format(store.VERSION) in \
        checks["database"]["message"]


def test_check_flags_os_brick_lock_files_others_could_lock(
        configured, state):
    # A privsep daemon running with umask 0 made them 0666: any local
    # user could lockf one and hang every attach and detach.
    pki.ensure_dev_pki(configured)
    lock = os.path.join(configured.brick_lock_dir, "os-brick-connect_volume")
    with open(lock, "w"):
        pass
    os.chmod(lock, 0o666)
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)
    found = _checks(p)["lock-files"]
    assert found["status"] == "warn"    # lock_path 0700: nobody reaches it
    assert "os-brick-connect_volume (0666)" in found["message"]

    os.chmod(configured.brick_lock_dir, 0o755)
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=1)
    found = _checks(p)["lock-files"]
    assert found["status"] == "fail"
    assert "0755" in found["message"]
    assert "os-brick-connect_volume (0666)" in found["message"]

    os.unlink(lock)
    run("--state-dir", state, "configure", check=0)
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)
    assert _checks(p)["lock-files"]["status"] == "ok"


def test_check_help_names_every_check_it_runs(configured, state):
    pki.ensure_dev_pki(configured)
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)
    names = set(_checks(p)) | {"privsep", "privsep-config"}
    text = " ".join(run("check", "--help", check=0).stdout.split())
    assert [n for n in sorted(names) if n not in text] == []


def test_check_human_output_has_one_line_per_check_and_a_summary(
        configured, state):
    pki.ensure_dev_pki(configured)
    p = run("--state-dir", state, "check", "--skip-privsep", check=0)
    lines = p.stdout.splitlines()
    assert any(line.split()[:2] == ["ok", "database"] for line in lines)
    assert lines[-1].startswith("0 problem(s)")


def test_check_fails_without_a_database(state):
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=1)
    checks = _checks(p)
    assert checks["database"]["status"] == "fail"
    assert "configure" in checks["database"]["message"]
    assert checks["run-dir"]["status"] == "fail"


def test_check_fails_when_key_does_not_match_certificate(configured, state):
    pki.ensure_dev_pki(configured)
    other_key = _new_key()
    pki.write_key(configured.key_file, other_key)

    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=1)

    assert _checks(p)["cert-key"]["status"] == "fail"


def test_check_fails_when_the_private_key_is_readable_by_others(
        configured, state):
    pki.ensure_dev_pki(configured)
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)
    assert _checks(p)["key-mode"]["status"] == "ok"
    # vdsm's key as ovirt-engine's host deploy installs it (vdsm:kvm).
    os.chmod(configured.key_file, 0o440)
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)
    assert _checks(p)["key-mode"]["status"] == "ok"
    for mode in (0o644, 0o604, 0o660):
        os.chmod(configured.key_file, mode)
        p = run("--state-dir", state, "--json", "check", "--skip-privsep",
                check=1)
        found = _checks(p)["key-mode"]
        assert found["status"] == "fail"
        assert "{:04o}".format(mode) in found["message"]
        assert configured.key_file in found["message"]


def test_check_fails_when_certificate_is_from_another_ca(configured, state):
    pki.ensure_dev_pki(configured)
    ca_key, ca_cert = pki.create_ca("some other CA")
    pki.write_cert(configured.ca_file, ca_cert)

    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=1)

    checks = _checks(p)
    assert checks["cert-ca"]["status"] == "fail"
    assert checks["cert-key"]["status"] == "ok"


def test_check_fails_on_an_expired_certificate(configured, state):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    pki.ensure_dev_pki(configured)
    ca_key, ca_cert = pki.load_ca(configured.ca_file,
                                  os.path.join(state, "pki", pki.CA_KEY))
    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                         "localhost")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    pki.write_key(configured.key_file, key)
    pki.write_cert(configured.cert_file, cert)

    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=1)

    checks = _checks(p)
    assert checks["cert-expiry"]["status"] == "fail"
    assert "expired" in checks["cert-expiry"]["message"]
    assert checks["cert-ca"]["status"] == "ok"


def test_check_warns_on_missing_dev_pki_under_state_dir(configured, state):
    p = run("--state-dir", state, "--json", "check", "--skip-privsep",
            check=0)
    assert _checks(p)["certificates"]["status"] == "warn"


def test_check_fails_on_missing_pki_on_a_host(configured, tmp_path):
    conf = tmp_path / "host.conf"
    conf.write_text("[agent]\nkey_file = {0}/k\ncert_file = {0}/c\n"
                    "ca_file = {0}/ca\n".format(tmp_path))
    # A host configuration: explicit paths, no --state-dir.
    cfg = configured
    conf.write_text(conf.read_text() + "[paths]\ndb_path = {}\n"
                    "run_dir = {}\nlock_dir = {}\n".format(
                        cfg.db_path, cfg.run_dir, cfg.lock_dir))

    p = run("--config", str(conf), "--json", "check", "--skip-privsep",
            check=1)

    assert _checks(p)["certificates"]["status"] == "fail"


def test_check_accepts_a_run_dir_on_tmpfs(tmp_path):
    if tool._filesystem("/dev/shm")[0] != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        conf = tmp_path / "c.conf"
        conf.write_text("[paths]\nrun_dir = {}\n".format(shm))
        p = run("--config", str(conf), "--json", "check", "--skip-privsep")
    run_dir = _checks(p)["run-dir"]
    assert run_dir["status"] == "ok"
    assert "tmpfs" in run_dir["message"]


def test_check_fails_on_a_host_run_dir_that_is_not_tmpfs(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[paths]\nrun_dir = {}\n".format(tmp_path))
    p = run("--config", str(conf), "--json", "check", "--skip-privsep")
    if tool._filesystem(str(tmp_path))[0] == "tmpfs":
        pytest.skip("tmp_path is on tmpfs here")
    assert _checks(p)["run-dir"]["status"] == "fail"


def test_check_reports_missing_os_brick_as_a_failure(
        configured, monkeypatch, capsys):
    real = tool.importlib.util.find_spec
    monkeypatch.setattr(
        tool.importlib.util, "find_spec",
        lambda name, *a: None if name == "os_brick" else real(name, *a))
    monkeypatch.setattr(tool.mvlog, "setup", lambda **kw: None)

    rc = tool.main(["--state-dir", configured.state_dir, "--json", "check"])

    checks = {c["name"]: c for c in
              json.loads(capsys.readouterr().out)["checks"]}
    assert rc == tool.EXIT_PROBLEMS
    assert checks["os-brick"]["status"] == "fail"
    assert "925" in checks["os-brick"]["message"]
    assert checks["privsep"]["status"] == "skip"


@pytest.mark.root
@pytest.mark.slow
def test_check_starts_the_privsep_daemon(configured, state):
    pki.ensure_dev_pki(configured)
    p = run("--state-dir", state, "--json", "check", check=0)
    privsep = _checks(p)["privsep"]
    assert privsep["status"] == "ok"
    assert "daemon started" in privsep["message"]
    assert _checks(p)["privsep-config"]["status"] == "ok"


@pytest.mark.root
def test_check_before_configure_reports_what_is_missing_and_makes_nothing(
        state):
    # A monitoring probe run before configure went green: starting the
    # daemon made the lock directories and its configuration.
    p = run("--state-dir", state, "--json", "check", check=1)
    checks = _checks(p)
    for name in ("lock-dir", "lock-path", "privsep-config", "privsep"):
        assert checks[name]["status"] == "fail", checks[name]
        assert "run 'managedvolume-tool configure'" in \
            checks[name]["message"]
    assert "daemon not started" in checks["privsep"]["message"]
    assert not os.path.exists(state)


@pytest.mark.root
def test_check_with_lock_path_open_to_others_does_not_tighten_it(
        configured, state):
    os.chmod(configured.brick_lock_dir, 0o755)
    p = run("--state-dir", state, "--json", "check", check=1)
    checks = _checks(p)
    assert checks["lock-files"]["status"] == "fail"
    assert checks["privsep"]["status"] == "fail"
    assert "daemon not started" in checks["privsep"]["message"]
    assert os.stat(configured.brick_lock_dir).st_mode & 0o777 == 0o755


@pytest.mark.root
@pytest.mark.slow
def test_check_reports_a_stale_privsep_config_and_leaves_it(
        configured, state):
    pki.ensure_dev_pki(configured)
    with open(configured.privsep_config, "a") as f:
        f.write("# edited\n")
    with open(configured.privsep_config) as f:
        before = f.read()
    p = run("--state-dir", state, "--json", "check", check=0)
    checks = _checks(p)
    assert checks["privsep-config"]["status"] == "warn"
    assert "does not match" in checks["privsep-config"]["message"]
    assert checks["privsep"]["status"] == "ok"     # on a private copy
    with open(configured.privsep_config) as f:
        assert f.read() == before


@pytest.mark.parametrize("command", ["check", "dump-config"])
def test_an_invalid_log_level_is_a_configuration_error(tmp_path, command):
    # The agent died of a ValueError traceback at start; check and
    # dump-config took it.
    conf = tmp_path / "c.conf"
    conf.write_text("[logging]\nlog_level = NOPE\n")
    p = run("--config", str(conf), command, check=2)
    assert "log_level = 'NOPE' is not a log level" in p.stderr
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("text, message", [
    ("[agent]\nlisten = nosuchhost.invalid\n",
     "listen = 'nosuchhost.invalid' cannot be resolved"),
    ("[logging]\nlog_config = /nonexistent/logger.conf\n",
     "log_config = '/nonexistent/logger.conf' cannot be read"),
    ("[logging]\nlog_file = /dev/null/x/agent.log\n",
     "log_file = '/dev/null/x/agent.log': its directory cannot be created"),
])
def test_check_fails_on_what_would_stop_the_agent(tmp_path, text, message):
    # check said "ok config" and the agent died of a traceback.
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    p = run("--config", str(conf), "--state-dir", str(tmp_path / "s"),
            "--json", "check", "--skip-privsep", check=1)
    found = _checks(p)["config"]
    assert found["status"] == "fail"
    assert message in found["message"]
    assert "c.conf [" in found["message"]


def test_a_port_out_of_range_is_a_configuration_error_for_the_tool(
        tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[agent]\nport = 70000\n")
    for command in ("check", "dump-config"):
        p = run("--config", str(conf), command, check=2)
        assert "port = 70000 is out of range (0-65535)" in p.stderr


@pytest.mark.parametrize("command", ["check", "dump-config", "list"])
def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(
        tmp_path, command):
    conf = tmp_path / "u.conf"
    conf.write_bytes(b"[agent]\nport = 5\xff\n")
    p = run("--config", str(conf), "--state-dir", str(tmp_path / "s"),
            command, check=2)
    assert p.stderr == ("managedvolume-tool: Configuration error: cannot "
                        "read {}: not UTF-8 (byte 0xff on line 2)\n"
                        .format(conf))


@pytest.mark.parametrize("command", ["check", "dump-config"])
@pytest.mark.parametrize("text, message", [
    ("[volumes]\nshared_devices = ture\n",
     "shared_devices = 'ture' is not a boolean"),
    ("[volumes]\nudev_writer = bogus\n",
     "udev_writer = 'bogus' is not one of auto, service, daemon"),
    ("[volumes]\nlock_timeout = nan\n",
     "lock_timeout = nan is not a finite number"),
])
def test_a_config_typo_is_refused_by_check_and_dump_config(
        tmp_path, command, text, message):
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    p = run("--config", str(conf), command, check=2)
    assert "c.conf [volumes]: " + message in p.stderr
    assert len(p.stderr.splitlines()) == 1


def test_filesystem_finds_the_mount_holding_a_path():
    assert tool._filesystem("/proc/self")[0] == "proc"
    assert tool._filesystem("/")[1] == "/"


# dump-schema, dump-config

def test_dump_schema_prints_the_shipped_yaml():
    p = run("dump-schema", check=0)
    path = os.path.join(_repo(), "vdsm_managedvolume", "schema",
                        "managedvolume-api.yml")
    with open(path) as f:
        assert p.stdout == f.read()


def test_dump_schema_json_holds_the_verbs():
    p = run("dump-schema", "--json", check=0)
    schema = json.loads(p.stdout)
    assert "types" in schema
    for verb in ("attach_volume", "detach_volume", "volumes_info"):
        assert "ManagedVolume." + verb in schema


def test_dump_config_defaults_is_what_config_renders():
    p = run("dump-config", "--defaults", check=0)
    assert p.stdout == config.render()


def test_dump_config_commented_reads_back_to_the_defaults(tmp_path):
    p = run("dump-config", "--defaults", "--commented", check=0)
    assert p.stdout == config.render(commented=True)
    conf = tmp_path / "c.conf"
    conf.write_text(p.stdout)
    cfg = config.load(str(conf))
    assert cfg.origins == {}        # no key set: every one a default


def test_dump_config_reads_back_to_the_same_configuration(state, tmp_path):
    conf = tmp_path / "in.conf"
    conf.write_text("[volumes]\nallowed_types = iscsi, rbd\n"
                    "[agent]\nport = 54323\n")
    p = run("--config", str(conf), "--state-dir", state, "dump-config",
            check=0)
    out = tmp_path / "out.conf"
    out.write_text(p.stdout)

    want = config.load(str(conf), state_dir=state)
    got = config.load(str(out))
    for key in config.FIELDS:
        if key not in config.NOT_KEYS:
            assert getattr(got, key) == getattr(want, key), key


def test_dump_config_json_is_grouped_by_section():
    p = run("dump-config", "--defaults", "--json", check=0)
    doc = json.loads(p.stdout)
    assert set(doc) == set(config.SECTIONS)
    assert doc["volumes"]["allowed_types"] == list(
        config.DEFAULT_ALLOWED_TYPES)


# usage and exit codes

@pytest.mark.parametrize("args", [["--version"], ["list", "--version"],
                                  ["check", "--version"]])
def test_version_prints_the_package_version(args):
    # tool(8): global options before or after the command.
    p = run(*args, check=0)
    assert p.stdout.strip() == "managedvolume-tool " + \
        vdsm_managedvolume.__version__


def test_reconcile_force_without_apply_is_a_usage_error(state):
    # It was a silent dry run: the admin believed the record forgotten.
    p = run("--state-dir", state, "reconcile", "--force", check=2)
    assert "--force needs --apply" in p.stderr
    assert not os.path.exists(state)


def test_help_documents_the_exit_codes():
    p = run("--help", check=0)
    for code in ("0", "1", "2"):
        assert "\n  {}  ".format(code) in p.stdout


@pytest.mark.parametrize("args", [
    [],
    ["no-such-command"],
    ["list", "--no-such-option"],
])
def test_usage_errors_exit_2(args):
    p = run(*args, check=2)
    assert "usage:" in p.stderr


def test_missing_explicit_config_file_exits_2(tmp_path):
    p = run("--config", str(tmp_path / "missing.conf"), "list", check=2)
    assert "does not exist" in p.stderr


def test_config_with_unknown_key_exits_2(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[volumes]\nalowed_types = iscsi\n")
    p = run("--config", str(conf), "dump-config", check=2)
    assert "alowed_types" in p.stderr


def test_config_from_environment_is_used(tmp_path):
    conf = tmp_path / "env.conf"
    conf.write_text("[agent]\nport = 4242\n")
    p = run("dump-config", "--json", check=0,
            env={"MANAGEDVOLUME_CONFIG": str(conf)})
    assert json.loads(p.stdout)["agent"]["port"] == 4242


def test_an_unwritable_state_dir_is_a_clear_error_with_exit_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = run("--state-dir", str(blocker / "state"), "configure", check=1)
    assert "Not a directory" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_corrupt_database_is_a_clear_error_with_exit_1(state, cfg):
    os.makedirs(os.path.dirname(cfg.db_path))
    with open(cfg.db_path, "w") as f:
        f.write("this is not a database\n" * 100)

    p = run("--state-dir", state, "list", check=1)

    assert "code=935" in p.stderr
    assert "Traceback" not in p.stderr


def test_format_age_shows_two_largest_units():
    assert tool._format_age(9) == "9s"
    assert tool._format_age(312) == "5m12s"
    assert tool._format_age(3 * 86400 + 4 * 3600 + 5) == "3d4h"
    assert tool._format_age(None) == "-"


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _repo():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_state_dir_a_running_dev_agent_nearby_is_named(tmp_path):
    import fcntl
    cfg = config.Config()
    if os.path.exists(cfg.db_path) or os.path.exists(
            config.DEFAULT_CONFIG_FILE):
        pytest.skip("this host has vdsm's paths")
    run_dir = tmp_path / ".state" / "run" / "managedvolume"
    run_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=_repo())
    env.pop("MANAGEDVOLUME_CONFIG", None)
    cmd = [sys.executable, "-m", "vdsm_managedvolume.tool", "list"]
    with open(run_dir / "agent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                           cwd=str(tmp_path), timeout=60)
    assert "an agent is running with --state-dir .state here: did you " \
        "mean 'managedvolume-tool --state-dir .state ...'?" in p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=60)
    # (an agent of this source tree's own `make run` may still be named,
    # by its absolute path)
    assert "--state-dir .state here" not in p.stderr


def test_check_warns_for_each_allowed_type_whose_host_tools_are_missing(
        configured, state, tmp_path, monkeypatch, capsys):
    from vdsm_managedvolume import hosttools
    bin_dir = tmp_path / "sbin"
    bin_dir.mkdir()
    (bin_dir / "nvme").write_text("#!/bin/sh\n")
    (bin_dir / "nvme").chmod(0o755)
    monkeypatch.setattr(hosttools, "SEARCH_PATH", (str(bin_dir),))
    monkeypatch.setenv("PATH", str(bin_dir))
    tool.main(["--state-dir", state, "--json", "check", "--skip-privsep"])
    checks = [c for c in json.loads(capsys.readouterr().out)["checks"]
              if c["name"] == "tools"]
    by_type = {c["message"].split(":")[0]: c for c in checks}
    assert set(by_type) == {"iscsi", "fibre_channel", "rbd", "nvmeof"}
    assert by_type["nvmeof"]["status"] == "ok"
    iscsi = by_type["iscsi"]
    assert iscsi["status"] == "warn"
    assert "iscsiadm, multipath, multipathd not installed" in \
        iscsi["message"]
    assert "iscsi-initiator-utils or open-iscsi" in iscsi["message"]
    assert by_type["rbd"]["message"].startswith(
        "rbd: rbd not installed on this host")


def test_help_shows_examples_that_parse_and_fits_80_columns(capsys):
    with pytest.raises(SystemExit) as e:
        tool._parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if len(line) > 79] == []
    examples = [line.split("#")[0].split("|")[0].split()[1:]
                for line in out.splitlines()
                if line.startswith("  managedvolume-tool ")]
    assert len(examples) >= 4
    for argv in examples:
        assert tool._parser().parse_args(argv).func
