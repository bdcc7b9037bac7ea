"""managedvolume-tool: the admin's view of a host's managed volumes.

One console script, one sub-command per question an admin asks::

    configure    make the host ready: directories, database (created or
                 migrated to this version's schema), ownership, the
                 privsep daemon's root-owned configuration
    list         what the journal holds: state, path, age, stale (secrets
                 masked unless --secrets; read-only)
    reconcile    what a crash or a reboot left behind, and (--apply) fix it
    check        a doctor: every prerequisite of attach/detach, one line each
    dump-schema  the API schema YAML (the one source of the verbs)
    dump-config  the effective configuration, as an INI file

The tool works on the same configuration and the same journal as the agent
(``--config``, ``--state-dir``), through the same layers: ``store`` for
records, ``service.Service`` for reconcile, ``privileged.Brick`` for the
privsep daemon.  It never talks to a running agent; the per-volume locks
make it safe to run beside one.

Output is for people by default and for scripts with ``--json``.  Exit
codes mean the same thing for every sub-command::

    0  ok: nothing wrong (check: warnings only; reconcile: nothing to do)
    1  problems found or an operation failed (check: a check failed;
       reconcile: work pending in a dry run, or an action failed)
    2  usage or configuration error (bad option, unreadable config file)

The RPM's %post runs ``managedvolume-tool configure`` on every install and
upgrade, so it must be idempotent and quiet about what is already right.
"""

import argparse
import dataclasses
import datetime
import grp
import importlib.util
import json
import logging
import os
import pwd
import stat
import sys
import tempfile
import textwrap

import vdsm_managedvolume
from . import cli
from . import config
from . import errors
from . import log as mvlog
from . import mask
from . import store
from . import validate

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

# Owner of what configure creates on a vdsm host: vdsm runs the verbs as
# this user, the standalone agent runs as root (which needs no ownership).
DEFAULT_OWNER = "vdsm:kvm"

# Certificates expiring sooner than this are reported as a warning.
CERT_WARN_DAYS = 30

log = logging.getLogger("managedvolume.tool")

EXAMPLES = """\
examples:
  managedvolume-tool check                    # after installing; any doubt
  managedvolume-tool list -l 9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10
  managedvolume-tool reconcile                # dry run: what would be done
  managedvolume-tool reconcile --apply
  managedvolume-tool --state-dir .state list  # make run's agent
  managedvolume-tool check --json --skip-privsep | jq -e .ok

"""

EPILOG = """\
exit status:
  0  ok (check: warnings only; reconcile: nothing to do or all fixed)
  1  problems found or an operation failed (check: a check failed;
     reconcile: work pending in a dry run, or an action failed)
  2  usage or configuration error

Global options may be given before or after the sub-command.  See
managedvolume-tool(8) and managedvolume.conf(5).
"""


@cli.entry_point
def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("managedvolume-tool: error: a sub-command is required",
              file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "force", False) and not args.apply:
        # Silently a dry run before: the admin believed it forced.
        parser.error("reconcile: --force needs --apply")
    mvlog.setup(level="DEBUG" if args.verbose else "WARNING",
                stream=sys.stderr)
    try:
        cfg = config.load(args.config, state_dir=args.state_dir)
    except errors.ConfigError as e:
        print("managedvolume-tool: {}".format(e), file=sys.stderr)
        return EXIT_USAGE
    _hint_state_dir(cfg, args)
    try:
        return args.func(cfg, args)
    except errors.ConfigError as e:
        _fail(args, e)
        return EXIT_USAGE
    except errors.Error as e:
        _fail(args, e)
        return EXIT_PROBLEMS
    except BrokenPipeError:
        raise  # The reader went away: cli.entry_point ends quietly.
    except OSError as e:
        # Permissions, a full disk: the admin needs the path, not a
        # traceback.
        _fail(args, errors.Error(str(e)))
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        return EXIT_PROBLEMS


# Sub-commands.  Each takes (cfg, args), prints its report and returns the
# exit code.

def configure(cfg, args):
    """Create what the package writes, create or migrate the database."""
    owner = _owner(cfg, args.owner)
    actions = []

    # The database's directory is usually vdsm's (/var/lib/vdsm/storage):
    # given to the owner only when we created it.  The run directories are
    # ours.
    db_dir = os.path.dirname(os.path.abspath(cfg.db_path))
    for path, ours in ((db_dir, False), (cfg.run_dir, True),
                       (cfg.state_run_dir, True), (cfg.lock_dir, True),
                       (cfg.brick_lock_dir, True)):
        created = not os.path.isdir(path)
        if path == cfg.brick_lock_dir:
            # os-brick's lock files: nobody else's to lock (0700).
            from . import privsepconfig
            if privsepconfig.private_dir(path) and not created:
                actions.append({"action": "chmod", "path": path,
                                "detail": "0700"})
        elif created:
            os.makedirs(path, mode=0o755, exist_ok=True)
        if created:
            actions.append({"action": "created", "path": path})
        if owner and (ours or created):
            _chown(path, owner, actions)

    # The privsep daemon's configuration: root reads it, so root writes
    # it, from this configuration (a service not running as root only
    # checks it).  Before the database: it needs nothing but the file.
    action = _write_privsep_config(cfg)
    if action:
        actions.append(action)

    # Not ours (systemd-udev owns it) but attach needs it to exist.
    if not os.path.isdir(cfg.udev_rules_dir):
        os.makedirs(cfg.udev_rules_dir, mode=0o755, exist_ok=True)
        actions.append({"action": "created", "path": cfg.udev_rules_dir})

    existed = os.path.exists(cfg.db_path)
    with store.open(cfg.db_path) as db:
        info = db.version_info()
    actions.append({
        "action": "opened" if existed else "created",
        "path": cfg.db_path,
        "version": info["version"],
        "detail": "schema version {} ({})".format(
            info["version"], info["description"]),
    })
    os.chmod(cfg.db_path, 0o600)
    if owner:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(cfg.db_path + suffix):
                _chown(cfg.db_path + suffix, owner, actions)

    if args.json:
        _print_json({"ok": True, "config": cfg.source or None,
                     "owner": owner and ":".join(owner[2:]),
                     "actions": actions})
    else:
        for a in actions:
            detail = a.get("detail") or a.get("owner") or ""
            print("{:<8} {}{}".format(a["action"], a["path"],
                                      "  " + detail if detail else ""))
    return EXIT_OK


def list_volumes(cfg, args):
    """Print the journal's records (no database yet: nothing attached).

    The journal is opened read-only (never migrated: a schema not this
    program's is an error); each record says whether it is stale and why,
    as volumes_info does.
    """
    records = []
    try:
        vol_ids = validate.uuid_list("VOL_ID", args.vol_ids)
    except errors.InvalidParams as e:
        print("managedvolume-tool: list: {}".format(e), file=sys.stderr)
        return EXIT_USAGE
    if os.path.exists(cfg.db_path):
        with store.open_read_only(cfg.db_path) as db:
            records = db.volumes(vol_ids)
    stale = _stale_fields(cfg, records)
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for rec, fields in zip(records, stale):
        if not args.secrets:
            rec = mask.mask(rec)
        rec.update(fields)
        rec["age"] = _age_seconds(rec.get("created"), now)
        rec["exists"] = (os.path.exists(rec["path"]) if rec.get("path")
                         else None)
        rec["driver_volume_type"] = (rec.get("connection_info") or {}).get(
            "driver_volume_type")
        rows.append(rec)

    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print(_no_db_yet(cfg) or "no {} in {}".format(
            "record of " + ", ".join(vol_ids) if vol_ids
            else "managed volumes recorded", cfg.db_path))
        return EXIT_OK
    table = [("VOL_ID", "STATE", "TYPE", "AGE", "PATH", "STALE")]
    for r in rows:
        path = r.get("path") or "-"
        if r["exists"] is False:
            path += " (missing)"
        table.append((r["vol_id"], r["state"],
                      r["driver_volume_type"] or "-",
                      _format_age(r["age"]), path,
                      r.get("stale_reason") or "-"))
    _print_table(table)
    if args.verbose_records:
        for r in rows:
            print()
            print("{}:".format(r["vol_id"]))
            for key in ("sd_id", "managed_path", "multipath_id", "size",
                        "created", "updated"):
                print("  {:<15} {}".format(key, r.get(key) or "-"))
            if r.get("extending") is not None:
                print("  {:<15} {}".format(
                    "extending", "interrupted (to {} bytes); reconcile "
                    "records the size".format(r["extending"] or "any")))
            print("  {:<15} {}".format("connection_info", json.dumps(
                r.get("connection_info"), sort_keys=True)))
            print("  {:<15} {}".format("attachment", json.dumps(
                r.get("attachment"), sort_keys=True)))
    return EXIT_OK


def reconcile(cfg, args):
    """Report (and with --apply, fix) what the journal and host disagree on.

    Dry run: the exit code is 1 when anything would be done, so that a
    monitoring script can run ``managedvolume-tool reconcile`` as a probe.
    Stale records of this boot (device gone or changed) or of an unknown
    one are reported with their reason, not counted: the service cannot
    tell whether the engine still wants them; re-attaching fixes them,
    detaching removes them.  Those made in another boot are detached
    (``detach-stale``).
    A dry run opens the journal read-only and changes nothing on disk
    but the lock file of a volume that never had one (it takes each
    volume's lock to see whether an operation holds it: "busy"), and that
    only in a lock directory that exists: it makes no directory (after a
    reboot, before the agent starts, /run has none, and then no operation
    can hold a lock: nothing is busy).
    """
    report = []
    if os.path.exists(cfg.db_path):
        svc = _open_service(cfg, read_only=not args.apply)
        try:
            report = svc.reconcile(apply=args.apply,
                                   force=args.apply and args.force)
        finally:
            svc.close()
    report = [mask.mask(r) for r in report]
    pending = [r for r in report if r.get("result") == "planned"]
    failed = [r for r in report if _failed(r.get("result"))]

    if args.json:
        _print_json({"apply": args.apply, "volumes": report,
                     "pending": len(pending), "failed": len(failed)})
    elif not report:
        print(_no_db_yet(cfg) or "nothing to reconcile: journal, links and "
              "udev rules agree")
    else:
        table = [("VOL_ID", "STATE", "ACTION", "RESULT", "DETAIL")]
        for r in report:
            table.append((r.get("vol_id") or "-", r.get("state") or "-",
                          r.get("action") or "-", r.get("result") or "-",
                          r.get("path") or r.get("reason") or ""))
        _print_table(table)
        if pending:
            print("\n{} action(s) planned; run with --apply to act"
                  .format(len(pending)))
    if failed or pending:
        return EXIT_PROBLEMS
    return EXIT_OK


def check(cfg, args):
    """Run every check; each yields (name, status, message)."""
    # Read-only checks first; the privsep daemon's start, last, makes its
    # socket and lock file and nothing else (_check_privsep).
    checks = [
        _check_config,
        _check_os_brick,
        _check_lock_path,
        _check_database,
        _check_certificates,
        _check_udevadm,
        _check_host_tools,
        _check_udev_owner,
        _check_run_dir,
        _check_privsep,
    ]
    results = []
    for func in checks:
        try:
            found = list(func(cfg, args))
        except Exception as e:
            name = func.__name__[len("_check_"):].replace("_", "-")
            found = [(name, "fail", mask.mask_text(
                "{}: {}".format(type(e).__name__, e)))]
        results.extend(found)

    failed = [r for r in results if r[1] == "fail"]
    if args.json:
        _print_json({"ok": not failed, "checks": [
            {"name": n, "status": s, "message": m} for n, s, m in results]})
    else:
        for name, status, message in results:
            print("{:<5} {:<14} {}".format(
                {"ok": "ok", "warn": "WARN", "fail": "FAIL",
                 "skip": "skip"}[status], name, message))
        print()
        warned = sum(1 for r in results if r[1] == "warn")
        print("{} problem(s), {} warning(s)".format(len(failed), warned))
    return EXIT_PROBLEMS if failed else EXIT_OK


def dump_schema(cfg, args):
    from . import schema
    if args.json:
        _print_json(schema.read())
    else:
        sys.stdout.write(schema.read_text())
    return EXIT_OK


def dump_config(cfg, args):
    if args.defaults:
        cfg = config.Config()
    if args.json:
        _print_json({section: {key: _jsonable(getattr(cfg, key))
                               for key in keys}
                     for section, keys in config.SECTIONS.items()})
    else:
        sys.stdout.write(config.render(cfg, commented=args.commented))
    return EXIT_OK


# Checks.  Each is a generator of (name, status, message), status one of
# ok, warn, fail, skip.

def _check_config(cfg, args):
    problems = config.environment_problems(cfg)
    if cfg.source:
        loaded = "loaded {}".format(cfg.source)
    else:
        loaded = "no file ({} absent): defaults".format(
            config.DEFAULT_CONFIG_FILE)
    if problems:
        yield "config", "fail", "{}, but the agent would not start: {}" \
            .format(loaded, "; ".join(p.reason for p in problems))
    else:
        yield "config", "ok", loaded
    if cfg.state_dir:
        yield "state-dir", "ok", "every written path under {}".format(
            cfg.state_dir)


def _check_os_brick(cfg, args):
    # find_spec, not import: importing os-brick costs ~3 s and replaces
    # time.sleep process-wide; the privsep check imports it where it runs.
    for module, what in (("os_brick", "os-brick"),
                         ("oslo_privsep", "oslo.privsep")):
        spec = importlib.util.find_spec(module)
        if spec is None:
            yield what, "fail", ("not importable: attach and detach fail "
                                 "with 925 (install python3-{})"
                                 .format(what.replace(".", "-")))
        else:
            yield what, "ok", "importable ({}{})".format(
                os.path.dirname(spec.origin or ""), _dist_version(what))


def _check_privsep(cfg, args):
    """The privsep daemon's configuration (read only), then the daemon:
    started only where ``configure`` made what a start would otherwise
    create or repair (the lock directories, lock_path's mode 0700, the
    configuration file), so that the doctor reports them missing instead
    of making them and calling them ok.  As root, the daemon reads a
    private copy of its configuration: a start as root rewrites the file
    it is given, and the installed one is configure's to write."""
    if args.skip_privsep:
        yield "privsep", "skip", "skipped (--skip-privsep)"
        return
    if importlib.util.find_spec("os_brick") is None:
        yield "privsep", "skip", "os-brick missing"
        return
    config_ok = True
    for name, status, message in _check_privsep_config(cfg):
        config_ok = config_ok and status != "fail"
        yield name, status, message
    missing = [p for p in (cfg.state_run_dir, cfg.lock_dir,
                           cfg.brick_lock_dir) if not os.path.isdir(p)]
    if missing or not config_ok:
        yield "privsep", "fail", (
            "daemon not started: {}; run 'managedvolume-tool configure' "
            "first".format("{} missing".format(", ".join(missing))
                           if missing else "its configuration is not "
                           "usable"))
        return
    if _open_mode(os.stat(cfg.brick_lock_dir)):
        yield "privsep", "fail", (
            "daemon not started: it would make {} mode 0700 (see "
            "lock-files); run 'managedvolume-tool configure' first".format(
                cfg.brick_lock_dir))
        return
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory(prefix="mv-check-") as tmp:
            copy = dataclasses.replace(
                cfg, privsep_config=os.path.join(tmp, "privsep.conf"))
            props, pid = _start_daemon(copy, args)
    else:
        # Read only (privsepconfig.prepare_config): the daemon is started
        # through sudo with the installed file.
        props, pid = _start_daemon(cfg, args)
    found = ", ".join("{} {}".format(k, props[k])
                      for k in ("host", "initiator", "nqn") if props.get(k))
    yield "privsep", "ok", "daemon started (pid {}), connector: {}".format(
        pid, found or "{} properties".format(len(props)))


def _check_privsep_config(cfg):
    from . import privsepconfig
    path = cfg.privsep_config
    try:
        with open(path) as f:
            current = f.read()
    except FileNotFoundError:
        yield "privsep-config", "fail", (
            "{} does not exist; run 'managedvolume-tool configure' as "
            "root".format(path))
        return
    except OSError as e:
        yield "privsep-config", "fail", "cannot read {}: {}".format(
            path, e.strerror)
        return
    reason = privsepconfig.unsafe_config(path)
    if reason:
        yield "privsep-config", "fail", (
            "{} {}: root must not read it; run 'managedvolume-tool "
            "configure' as root".format(path, reason))
    elif current != privsepconfig.config_text(cfg):
        yield "privsep-config", "warn", (
            "{} does not match {}; run 'managedvolume-tool configure' as "
            "root".format(path, cfg.source or "the configuration"))
    else:
        yield "privsep-config", "ok", path


def _start_daemon(cfg, args):
    """Start a privsep daemon, ask it for the connector properties, stop
    it; (properties, its pid)."""
    from . import privileged
    from . import privsep
    # os-brick's warnings about what this host lacks (no iSCSI initiator
    # name, no nvme CLI) are not problems of ours; -v shows them.
    daemon_log = logging.getLogger(privsep.DAEMON_LOGGER)
    if not args.verbose:
        daemon_log.setLevel(logging.ERROR)
    brick = privileged.Brick(cfg)
    try:
        return brick.connector_properties(), brick.daemon_pid()
    finally:
        brick.stop()
        daemon_log.setLevel(logging.NOTSET)


def _check_lock_path(cfg, args):
    for name, path in (("lock-dir", cfg.lock_dir),
                       ("lock-path", cfg.brick_lock_dir)):
        status, message = _writable_dir(path)
        yield name, status, message
    yield from _check_lock_files(cfg)


def _check_lock_files(cfg):
    """os-brick's lock files (and lock_path itself) must be nobody
    else's to open for writing: an external lock file writable by group
    or others, which a privsep daemon running with umask 0 made, lets
    any local user lockf it and hang every attach and detach of its
    kind.  Lock files are recreated on demand: removing them, with no
    operation running, is the fix (and so is lock_path mode 0700)."""
    path = cfg.brick_lock_dir
    try:
        st = os.stat(path)
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return      # _writable_dir said so
    except OSError as e:
        yield "lock-files", "fail", "cannot list {}: {}".format(
            path, e.strerror)
        return
    problems = []
    open_dir = _open_mode(st)
    if open_dir:
        problems.append("{} has mode {:04o} (expected 0700)".format(
            path, open_dir))
    loose = []
    for name in names:
        try:
            mode = os.lstat(os.path.join(path, name)).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode) and mode & 0o022:
            loose.append("{} ({:04o})".format(name, stat.S_IMODE(mode)))
    if loose:
        shown = ", ".join(loose[:5]) + (
            " and {} more".format(len(loose) - 5) if len(loose) > 5 else "")
        problems.append("lock files writable by group or others: {}"
                        .format(shown))
    if open_dir:
        yield "lock-files", "fail", (
            "{}: other local users could lock os-brick's lock files and "
            "hang every attach and detach; run 'managedvolume-tool "
            "configure' (lock_path 0700){}".format(
                "; ".join(problems), "; with no operation running, remove "
                "the lock files" if loose else ""))
    elif problems:
        # Only root and lock_path's owner can reach them now.
        yield "lock-files", "warn", (
            "{} in {} (made by a privsep daemon running with umask 0); "
            "with no operation running, remove them".format(
                problems[0], path))
    else:
        yield "lock-files", "ok", "{}: mode 0700, {} lock file(s), none " \
            "writable by group or others".format(path, len(names))


def _open_mode(st):
    """lock_path's mode (``st``: its stat) when group or others have any
    bit of it, else 0: such a lock_path is what lock-files fails, and
    what a privsep daemon's start would quietly make 0700."""
    mode = stat.S_IMODE(st.st_mode)
    return mode if mode & 0o077 else 0


def _check_database(cfg, args):
    path = cfg.db_path
    if not os.path.exists(path):
        yield "database", "fail", ("{} does not exist; run "
                                   "'managedvolume-tool configure'"
                                   .format(path))
        return
    mode = os.stat(path).st_mode & 0o777
    # Read only: the doctor does not migrate what it examines.
    info = store.inspect(path)
    count = info["records"]
    if info["version"] != store.VERSION:
        yield "database", "fail", "{}: schema version {}, expected {}".format(
            path, info["version"], store.VERSION)
    else:
        yield "database", "ok", "{}: schema version {}, {} record(s)".format(
            path, info["version"], count)
    if mode & 0o077:
        yield "database-mode", "warn", (
            "{} has mode {:04o}: records hold connection secrets, "
            "expected 0600".format(path, mode))


def _check_certificates(cfg, args):
    paths = {"key": cfg.key_file, "cert": cfg.cert_file, "ca": cfg.ca_file}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        if cfg.state_dir:
            yield "certificates", "warn", (
                "missing {}: the agent creates a development PKI under "
                "--state-dir at first start".format(", ".join(missing)))
        else:
            yield "certificates", "fail", (
                "missing {}: the agent cannot serve TLS".format(
                    ", ".join(missing)))
        return
    yield from _check_key_mode(paths["key"])
    yield from _verify_certificates(paths["key"], paths["cert"], paths["ca"])


def _check_key_mode(path):
    """Only its owner may write the TLS private key, and no one but its
    owner and group may read it: anyone reading it can pose as this host.
    Its group may read it: ovirt-engine's host deploy installs vdsm's key
    vdsm:kvm 0440 (role ovirt-host-deploy-vdsm-certificates, "Add vdsm
    key files"); vdsm-gencerts makes it under umask 077."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o027:
        yield "key-mode", "fail", (
            "{} has mode {:04o}: the TLS private key is {}; chmod 0440 "
            "(as ovirt-engine's host deploy sets vdsm's key) or 0600 it"
            .format(path, mode, "readable or writable by others"
                    if mode & 0o007 else "writable by its group"))
    else:
        yield "key-mode", "ok", "{} mode {:04o}".format(path, mode)


def _check_udevadm(cfg, args):
    for name, path in (("udevadm", cfg.udevadm), ("chown", cfg.chown)):
        if os.access(path, os.X_OK):
            yield name, "ok", path
        else:
            yield name, "fail", ("{} is not executable: device ownership "
                                 "rules cannot be applied".format(path))


def _check_host_tools(cfg, args):
    """A warning per allowed driver type whose initiator commands are
    missing (its attaches would fail with 926)."""
    from . import hosttools
    checked = False
    for dvt in cfg.allowed_types:
        if dvt not in hosttools.TOOLS:
            continue
        checked = True
        reason = hosttools.explain(dvt)
        if reason:
            yield "tools", "warn", "{}: {}; its attaches fail with 926" \
                .format(dvt, reason)
        else:
            yield "tools", "ok", "{}: {}".format(
                dvt, ", ".join(hosttools.TOOLS[dvt]))
    if not checked:
        yield "tools", "ok", "no allowed type needs a host command"


def _check_udev_owner(cfg, args):
    user, _, group = cfg.udev_owner.partition(":")
    unknown = []
    try:
        pwd.getpwnam(user)
    except KeyError:
        unknown.append("user " + user)
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            unknown.append("group " + group)
    if unknown:
        yield "udev-owner", "warn", (
            "{} unknown: the udev rules' chown {} will fail (is vdsm "
            "installed?)".format(", ".join(unknown), cfg.udev_owner))
    else:
        yield "udev-owner", "ok", cfg.udev_owner


def _check_run_dir(cfg, args):
    path = cfg.run_dir
    fstype, mountpoint = _filesystem(path)
    where = "{} ({} on {})".format(path, fstype or "?", mountpoint or "?")
    if not os.path.isdir(path):
        yield "run-dir", "fail", ("{} does not exist; run "
                                  "'managedvolume-tool configure'"
                                  .format(path))
    elif fstype == "tmpfs":
        yield "run-dir", "ok", where + ": links vanish at reboot"
    else:
        # Links on a persistent filesystem survive a reboot and point at
        # devices that are gone; reconcile copes, but a host should not.
        yield "run-dir", "warn" if cfg.state_dir else "fail", (
            where + ": not tmpfs, managed_path links survive reboots")


# Private helpers

def _parser():
    # Global options are accepted before and after the sub-command: the
    # same definitions on both parsers, SUPPRESS so that the sub-parser
    # does not overwrite a value given before it with its default.
    common = argparse.ArgumentParser(add_help=False,
                                     argument_default=argparse.SUPPRESS)
    _add_globals(common)
    # tool(8): --version too, before or after the command.
    common.add_argument(
        "--version", action="version",
        version="managedvolume-tool " + vdsm_managedvolume.__version__)

    parser = argparse.ArgumentParser(
        prog="managedvolume-tool",
        description=_fill(
            "Administer managed (cinderlib) volumes on this host: set up, "
            "inspect, reconcile and diagnose."),
        epilog=EXAMPLES + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--version", action="version",
        version="managedvolume-tool " + vdsm_managedvolume.__version__)
    _add_globals(parser)
    parser.set_defaults(config=None, state_dir=None, json=False,
                        verbose=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, help, description=None):
        p = sub.add_parser(
            name, parents=[common], help=help,
            description=_fill(description or help),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("configure", configure,
            "create directories, create or migrate the database",
            "Create the directories the package writes, create the "
            "database or migrate it to this version's schema, and give "
            "them to vdsm's user; as root, write the privsep daemon's "
            "configuration (privsep_config) from this configuration.  "
            "Idempotent; the RPM runs it on every install and upgrade: "
            "run it again after changing managedvolume.conf.")
    p.add_argument(
        "--owner", metavar="USER:GROUP",
        help="owner of the database and run directories (default: {} when "
             "that user exists, running as root, without --state-dir; "
             "'' to leave ownership alone)".format(DEFAULT_OWNER))

    p = add("list", list_volumes,
            "list recorded volumes: state, type, age, path, stale",
            "List the journal's records: state, driver type, age, path "
            "(marked missing when the device is gone) and why a record is "
            "stale (made in another boot, device gone or changed), as "
            "volumes_info says.  Read-only: the journal is never migrated "
            "(a schema of another version is an error).  Secrets in "
            "connection_info are masked unless --secrets.")
    p.add_argument("vol_ids", nargs="*", metavar="VOL_ID",
                   help="only these volumes (default: all)")
    p.add_argument("-l", "--long", dest="verbose_records",
                   action="store_true",
                   help="also show sd_id, managed_path, multipath_id, "
                        "timestamps, connection_info and attachment")
    p.add_argument("--secrets", action="store_true",
                   help="show connection_info and attachment unmasked "
                        "(CHAP passwords, keyrings: with -l or --json). "
                        "The one way to read them: the agent does not "
                        "send them (volumes_info include_secrets is "
                        "refused unless [volumes] remote_secrets)")

    p = add("reconcile", reconcile,
            "find (and with --apply fix) what a crash or reboot left",
            "Compare the journal with the host: half-done attaches are "
            "rolled back, half-done detaches finished, missing links and "
            "udev rules of attached volumes of this boot recreated, links "
            "and rules that no record owns removed; records made in another "
            "boot detached (detach-stale); other stale records (device "
            "gone, or the device at their path no longer the one "
            "attached, or an unknown boot) are reported with the reason "
            "and kept, the links and rules of those of an unknown boot "
            "or with a changed device removed.  Without --apply only "
            "reports what it would do (exit 1 when anything would be "
            "done).  The agent does the same at every start.")
    p.add_argument("--apply", action="store_true",
                   help="act on what is found (default: dry run)")
    p.add_argument("--force", action="store_true",
                   help="with --apply: forget a record whose rollback or "
                        "detach fails (result 'forgotten'), with a warning; "
                        "check the host for what it may have left")

    p = add("check", check,
            "diagnose the host: os-brick, privsep, locks, database, PKI",
            "Check every prerequisite of attach and detach, one line "
            "each: config (what would stop the agent: listen, log_file, "
            "log_config), state-dir, os-brick and oslo.privsep importable, "
            "lock-dir, lock-path and lock-files (os-brick's lock path "
            "0700, no lock file others may write), database (schema "
            "version, mode), certificates, key-mode, cert-key, cert-ca, "
            "cert-expiry and ca-expiry, udevadm and chown present, tools "
            "(each allowed type's initiator commands), udev-owner known, "
            "run-dir on tmpfs, privsep-config (present, root's, current), "
            "and last privsep: the daemon starts and answers (bounded by "
            "properties_timeout), started only where 'configure' made what "
            "it needs.  Exit 1 when a check fails.")
    p.add_argument("--skip-privsep", action="store_true",
                   help="do not start the privsep daemon (needs root or "
                        "the sudoers rule)")

    add("dump-schema", dump_schema,
        "print the API schema YAML (--json: as JSON)",
        "Print the API schema YAML in vdsm's vdsm-api.yml format: the one "
        "source of the verbs' names, parameters, defaults, types and "
        "error codes.  --json: the parsed schema as JSON.")

    p = add("dump-config", dump_config,
            "print the effective configuration (--json: as JSON)",
            "Print the effective configuration as an INI file that "
            "config.load() reads back: the file, --state-dir and defaults "
            "applied.  The shipped /etc/vdsm/managedvolume.conf is the "
            "output of --defaults --commented.")
    p.add_argument("--defaults", action="store_true",
                   help="print the built-in defaults instead")
    p.add_argument("--commented", action="store_true",
                   help="every key commented out, as the package ships "
                        "the file")
    return parser


def _fill(text):
    return textwrap.fill(text, 78, break_on_hyphens=False)


def _add_globals(parser):
    parser.add_argument(
        "--config", metavar="FILE",
        help="configuration file (default: $MANAGEDVOLUME_CONFIG or {})"
             .format(config.DEFAULT_CONFIG_FILE))
    parser.add_argument(
        "--state-dir", metavar="DIR",
        help="put every path the package writes under DIR (the embedded "
             "default of 'make run')")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages to stderr")


def _owner(cfg, spec):
    """(uid, gid, user, group) to give our files to, or None."""
    if spec is None:
        if cfg.state_dir or os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(DEFAULT_OWNER.split(":")[0])
        except KeyError:
            return None
        spec = DEFAULT_OWNER
    if not spec:
        return None
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise errors.ConfigError("--owner {}: no user {!r}".format(
            spec, user))
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise errors.ConfigError("--owner {}: no group {!r}".format(
            spec, group))
    group = group or grp.getgrgid(gid).gr_name
    return pw.pw_uid, gid, user, group


# A missing database is no error (nothing was ever attached; the service
# creates it on first use), but it may also mean a wrong --config or
# --state-dir: say which file was looked at.
def _hint_state_dir(cfg, args):
    """On a development machine, vdsm's paths are empty and ``make run``'s
    agent uses ``.state``: say so before reporting on the wrong host."""
    if args.state_dir or cfg.source or os.path.exists(cfg.db_path):
        return
    hint = config.state_dir_hint("managedvolume-tool")
    if hint:
        print("managedvolume-tool: note: nothing at the default paths ({} "
              "does not exist); {}".format(cfg.db_path, hint),
              file=sys.stderr)


def _no_db_yet(cfg):
    if os.path.exists(cfg.db_path):
        return None
    return ("no database at {}: nothing was ever attached here "
            "('managedvolume-tool configure' creates it)".format(cfg.db_path))


def _stale_fields(cfg, records):
    """volumes_info's ``stale`` (and ``stale_reason``) of each record,
    from service.Service's stale_reason."""
    if not records:
        return []
    from . import service
    svc = service.Service(cfg)
    try:
        return [service.stale_fields(svc.stale_reason(rec))
                for rec in records]
    finally:
        svc.close()


def _open_service(cfg, read_only=False):
    """A Service with its journal open, without start()'s reconcile.

    start() reconciles with apply=True; a dry run must not, and opens the
    journal read-only: it changes nothing in it, not even an older schema
    (a running agent or vdsm may own it; ``configure`` migrates).
    """
    from . import service
    svc = service.Service(cfg)
    try:
        svc.open(read_only=read_only)
    except BaseException:
        svc.close()
        raise
    return svc


def _write_privsep_config(cfg):
    """Write the privsep daemon's configuration when it is missing, stale
    or not safely root's; return the action, None when it was right."""
    # privsepconfig needs only the standard library at import (configure
    # runs in %post without os-brick).
    from . import privsepconfig
    path = cfg.privsep_config
    if os.geteuid() != 0:
        return {"action": "skipped", "path": path,
                "detail": "not root: the privsep daemon's configuration "
                          "must be root's"}
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = None
    if (old == privsepconfig.config_text(cfg)
            and privsepconfig.unsafe_config(path) is None):
        return None
    privsepconfig.write_config(cfg)
    return {"action": "created" if old is None else "updated",
            "path": path,
            "detail": "privsep daemon configuration (root's, 0644)"}


def _chown(path, owner, actions):
    uid, gid, user, group = owner
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
        actions.append({"action": "chown", "path": path,
                        "owner": "{}:{}".format(user, group)})


def _writable_dir(path):
    if not os.path.isdir(path):
        return "fail", ("{} does not exist; run 'managedvolume-tool "
                        "configure'".format(path))
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".check-"):
            pass
    except OSError as e:
        return "fail", "{} is not writable: {}".format(path, e.strerror)
    return "ok", "{} writable".format(path)


def _verify_certificates(key_path, cert_path, ca_path):
    """Key matches cert, cert signed by the CA, neither expired."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        yield "certificates", "skip", "python3-cryptography not installed"
        return
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_path, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError, TypeError) as e:
        # Never echo key material: the exception names the problem only.
        yield "certificates", "fail", "cannot load: {}".format(
            type(e).__name__ if not isinstance(e, OSError) else e)
        return

    pem = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.PEM
    if key.public_key().public_bytes(enc, pem) != \
            cert.public_key().public_bytes(enc, pem):
        yield "cert-key", "fail", "{} does not match {}".format(
            key_path, cert_path)
    else:
        yield "cert-key", "ok", "key matches {}".format(cert_path)

    try:
        cert.verify_directly_issued_by(ca)
    except Exception as e:
        yield "cert-ca", "fail", "{} is not signed by {}: {}".format(
            cert_path, ca_path, e or type(e).__name__)
    else:
        yield "cert-ca", "ok", "signed by {}".format(
            ca.subject.rfc4514_string())

    now = datetime.datetime.now(datetime.timezone.utc)
    for name, c, path in (("cert-expiry", cert, cert_path),
                          ("ca-expiry", ca, ca_path)):
        before, after = _validity(c)
        if now < before:
            yield name, "fail", "{} not valid before {}".format(path, before)
        elif now > after:
            yield name, "fail", "{} expired on {}".format(path, after)
        elif after - now < datetime.timedelta(days=CERT_WARN_DAYS):
            yield name, "warn", "{} expires on {}".format(path, after)
        else:
            yield name, "ok", "{} valid until {}".format(path, after)


def _validity(cert):
    try:
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        utc = datetime.timezone.utc
        return (cert.not_valid_before.replace(tzinfo=utc),
                cert.not_valid_after.replace(tzinfo=utc))


def _filesystem(path):
    """(fstype, mountpoint) of the mount holding ``path`` (or its parent)."""
    path = os.path.realpath(path)
    best = (None, None)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        mountpoint = fields[4].replace("\\040", " ")
        fstype = fields[sep + 1]
        inside = (path == mountpoint or mountpoint == "/" or
                  path.startswith(mountpoint.rstrip("/") + "/"))
        # Later lines win on ties: they are mounted on top.
        if inside and len(mountpoint) >= len(best[1] or ""):
            best = (fstype, mountpoint)
    return best


def _dist_version(name):
    from importlib import metadata
    try:
        return ", version " + metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def _age_seconds(timestamp, now):
    if not timestamp:
        return None
    try:
        then = datetime.datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    return max(0, int((now - then).total_seconds()))


def _format_age(seconds):
    """Two largest units, as ps and kubectl show ages: 3d4h, 5m12s, 9s."""
    if seconds is None:
        return "-"
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units[:-1]):
        if seconds >= size:
            rest, rest_size = units[i + 1]
            return "{}{}{}{}".format(seconds // size, unit,
                                     seconds % size // rest_size, rest)
    return "{}s".format(seconds)


def _failed(result):
    return isinstance(result, str) and result.startswith("failed")


def _print_table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths))
              .rstrip())


def _print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _fail(args, error):
    message = mask.mask_text(str(error))
    if args.json:
        _print_json({"ok": False, "error": {"code": error.code,
                                            "message": message}})
    if isinstance(error, errors.ConfigError):
        # A usage error (exit 2), said as a bad config file is: code 100
        # is no wire code and means nothing to an admin.
        print("managedvolume-tool: {}".format(message), file=sys.stderr)
        return
    print("managedvolume-tool: {} failed: (code={}, message={})".format(
        args.command, error.code, message), file=sys.stderr)



if __name__ == "__main__":
    sys.exit(main())
