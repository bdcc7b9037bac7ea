"""The RPMs and the files they ship, inspected as an admin (and rpm) would.

The module builds the RPMs once with ``scripts/build-rpm.sh`` (what ``make
rpm`` runs; a couple of seconds) into a temporary topdir, then queries them
with ``rpm -qp``, unpacks them with ``rpm2archive`` and runs the packaged
tool.  Tests of the shipped data files (unit, tmpfiles, config, sudoers,
logging example, man pages) that need no build come first.
"""

import ast
import configparser
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

import vdsm_managedvolume
from vdsm_managedvolume import agent
from vdsm_managedvolume import config
from vdsm_managedvolume import privileged
from vdsm_managedvolume import tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = vdsm_managedvolume.__version__
HOST = "vdsm-managedvolume-{}-1.noarch.rpm".format(VERSION)
COMMON = "vdsm-managedvolume-common-{}-1.noarch.rpm".format(VERSION)
ENGINE = "vdsm-managedvolume-engine-{}-1.noarch.rpm".format(VERSION)
VDSM = "vdsm-managedvolume-vdsm-{}-1.noarch.rpm".format(VERSION)
BINARY = (HOST, COMMON, ENGINE, VDSM)
DROP_IN = "/usr/lib/systemd/system/vdsmd.service.d/50-managedvolume.conf"
SITE = "/usr/share/vdsm-managedvolume/vdsm-site"
HOOK = "/usr/libexec/vdsm/hooks/after_get_caps/50_managedvolume"
SUDOERS = "/etc/sudoers.d/50_vdsm_managedvolume"
ADAPTER = "/usr/share/ovirt-engine/managedblock/managedvolume-adapter"
ADAPTER_CONF = "/etc/ovirt-engine/managedvolume-adapter.conf"
WARM_UNIT = "/usr/lib/systemd/system/managedvolume-cinderlib.service"

# Fedora/CentOS package names of what the host side imports.
HOST_REQUIRES = ("python3-os-brick", "python3-oslo-privsep",
                 "python3-oslo-service", "python3-pyyaml")


def data(name):
    return os.path.join(REPO, "data", name)


def man_pages():
    d = os.path.join(REPO, "docs", "man")
    return sorted(os.path.join(d, n) for n in os.listdir(d))


# Shipped files (no build needed)

def test_shipped_config_is_what_config_renders():
    with open(data("managedvolume.conf")) as f:
        assert f.read() == config.render(commented=True), \
            "regenerate: managedvolume-tool dump-config --defaults " \
            "--commented > data/managedvolume.conf"


def test_shipped_config_sets_no_key_so_upgrades_bring_new_defaults():
    # %config(noreplace): a shipped file setting every key kept each
    # host on the defaults of the version first installed.
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(data("managedvolume.conf"))
    assert parser.sections() == list(config.SECTIONS)
    assert [dict(parser.items(s)) for s in parser.sections()] == \
        [{}] * len(config.SECTIONS)
    with open(data("managedvolume.conf")) as f:
        text = f.read()
    for section, keys in config.SECTIONS.items():
        for key in keys:
            assert "\n#{} = ".format(key) in text, key


def test_shipped_config_loads_to_the_defaults():
    cfg = config.load(data("managedvolume.conf"))
    defaults = config.Config()
    for key in config.FIELDS:
        if key not in config.NOT_KEYS:
            assert getattr(cfg, key) == getattr(defaults, key), key


def test_tmpfiles_entry_creates_the_default_run_dirs():
    entries = {}
    with open(data("tmpfiles.conf")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                kind, path, mode, user, group, age = line.split()
                entries[path] = (kind, mode, user, group, age)
    cfg = config.Config()
    for path in (cfg.run_dir, cfg.state_run_dir, cfg.lock_dir):
        # Never cleaned by age: links of attached volumes live there.
        assert entries[path] == ("d", "0755", "vdsm", "kvm", "-"), path


def test_unit_is_notify_and_stops_the_agent_before_its_daemon():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(data("managedvolume-agent.service"))
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split()[0] == "/usr/bin/managedvolume-agent"
    assert service["KillMode"] == "mixed"
    assert "HUP" in service["ExecReload"]
    # The default configuration's stop fits; a longer one extends it
    # (STOPPING=1's EXTEND_TIMEOUT_USEC, agent_process_test).
    cfg = config.Config()
    assert float(service["TimeoutStopSec"]) >= \
        agent.stop_bound(cfg) + agent.EXIT_SLACK
    with open(data("managedvolume-agent.service")) as f:
        comment = " ".join(f.read().replace("#", "").split())
    assert "shutdown_timeout + {:g} s at most".format(
        agent.stop_bound(cfg) - cfg.shutdown_timeout) in comment
    assert "{:g} s by default, and {:g} s to exit".format(
        agent.stop_bound(cfg), agent.EXIT_SLACK) in comment
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_does_not_restart_an_agent_with_a_configuration_error():
    # Restart=on-failure alone restarted a bad file every 5 s forever.
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(data("managedvolume-agent.service"))
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == [
        str(agent.EXIT_CONFIG)]


def test_warm_unit_serves_the_engine_user_on_the_adapter_confs_socket():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(data("managedvolume-cinderlib.service"))
    service = unit["Service"]
    argv = service["ExecStart"].split()
    assert argv[:2] == ["/usr/bin/managedvolume-cinderlib-client", "--serve"]
    socket_path = argv[argv.index("--socket") + 1]
    # Its own runtime directory, private to the user the engine runs as.
    assert service["User"] == "ovirt"
    assert os.path.dirname(socket_path) == "/run/" + service[
        "RuntimeDirectory"]
    assert service["RuntimeDirectoryMode"] == "0700"
    # Not a directory the cold runs use as their own.
    from vdsm_managedvolume.engine import args
    assert not socket_path.startswith("/run/managedvolume-engine/")
    # The adapter's settings name that socket, for the admin to uncomment.
    with open(data("managedvolume-adapter.conf")) as f:
        assert "\n#{}={}\n".format(args.ENV_SOCKET, socket_path) in f.read()
    # SIGTERM to the service only; its grace fits the stop timeout.
    from vdsm_managedvolume.engine import warm
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > warm.STOP_GRACE
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_sudoers_rule_allows_the_command_privileged_runs_for_vdsm(
        monkeypatch):
    # vdsm (not root) starting the daemon with the default configuration.
    monkeypatch.setattr(privileged.os, "geteuid", lambda: 36)
    monkeypatch.setattr(privileged, "_privsep_helper",
                        lambda: "/usr/bin/privsep-helper")
    cmd = privileged.helper_command(config.Config())

    assert cmd[0] == "sudo"
    assert _sudoers_allows(" ".join(cmd[1:]))
    assert not _sudoers_allows(" ".join(cmd[1:]).replace(
        "vdsm_managedvolume.brick.context", "os_brick.privileged.default"))
    # No wildcard: not one argument more (tests/sudo_boundary_test.py).
    assert not _sudoers_allows(" ".join(cmd[1:] + [
        "--log-config-append", "/home/x.conf"]))


def test_vdsmd_drop_in_puts_the_shipped_sitecustomize_first(tmp_path):
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(data("vdsmd-managedvolume.conf"))
    assert unit["Service"]["Environment"] == "PYTHONPATH=" + SITE


def test_sitecustomize_installs_the_vdsm_hook_without_importing_vdsm():
    code = ("import sys; "
            "print('vdsm' in sys.modules, 'sitecustomize' in sys.modules)")
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        cwd="/", env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [data("vdsm-site"), REPO])))
    assert p.returncode == 0
    assert "not registered" not in p.stderr, p.stderr
    assert p.stdout.split() == ["False", "True"]


def test_sudoers_snippet_is_valid_when_visudo_is_available():
    visudo = shutil.which("visudo")
    if visudo is None:
        pytest.skip("visudo not installed")
    subprocess.run([visudo, "-c", "-q", "-f", data("sudoers")], check=True)


def test_logger_example_logs_to_a_file_with_flow_id_and_masked_secrets(
        tmp_path):
    logfile = tmp_path / "managedvolume.log"
    conf = tmp_path / "logger.conf"
    with open(data("managedvolume-logger.conf")) as f:
        conf.write_text(f.read().replace("/var/log/vdsm/managedvolume.log",
                                         str(logfile)))
    code = """if True:
        import logging, os, signal
        from vdsm_managedvolume import config, log
        cfg = config.Config(log_config={conf!r})
        log.setup(cfg)
        with log.flow("flow-42"):
            logging.getLogger("managedvolume.service").info(
                "attach %s", {{"auth_password": "s3cr3t"}})
            logging.getLogger("managedvolume.service").debug("not shown")
        os.rename({log!r}, {log!r} + ".1")
        log.reopen()
        logging.getLogger("vdsm_managedvolume.brick").warning("after")
    """.format(conf=str(conf), log=str(logfile))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=REPO))

    rotated = (tmp_path / "managedvolume.log.1").read_text()
    assert "[flow=flow-42]" in rotated
    assert "s3cr3t" not in rotated and "********" in rotated
    assert "not shown" not in rotated
    assert "after" in logfile.read_text()


# Man pages and docs

@pytest.mark.parametrize("device", ["ps", "utf8"])
@pytest.mark.parametrize("page", man_pages(), ids=os.path.basename)
def test_man_page_renders_without_warnings(page, device):
    # utf8 is a terminal (78 columns, continuous rendering): where a table
    # too wide for 80 columns warns.
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff not installed")
    p = subprocess.run([groff, "-t", "-man", "-T" + device, "-ww", "-z",
                        page], capture_output=True, text=True)
    assert p.returncode == 0
    assert p.stderr == ""


@pytest.mark.parametrize("page", man_pages(), ids=os.path.basename)
def test_man_page_reads_in_80_columns_without_warnings(page):
    # What an admin runs; man-db adds its own preprocessing and widths.
    man = shutil.which("man")
    if man is None:
        pytest.skip("man not installed")
    p = subprocess.run([man, "-l", page], capture_output=True, text=True,
                       env=dict(os.environ, MANWIDTH="80", MANPAGER="cat",
                                PAGER="cat"))
    assert p.returncode == 0
    assert p.stderr == ""
    assert p.stdout.strip()
    # Examples (.EX) are not filled: a long one runs past the terminal.
    wide = [line for line in p.stdout.splitlines() if len(line) > 80]
    assert wide == []


def test_readme_shows_how_to_read_every_man_page_from_the_tree():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for page in man_pages():
        assert "man -l {}".format(os.path.relpath(page, REPO)) in readme


def test_tool_man_page_json_and_file_locations_render_as_written():
    # A word starting with a double quote is groff's argument quoting:
    # the JSON example lost its quotes; the privsep configuration was
    # said to be in /run.
    man = shutil.which("man")
    if man is None:
        pytest.skip("man not installed")
    page = os.path.join(REPO, "docs", "man", "managedvolume-tool.8")
    out = subprocess.run([man, "-l", page], capture_output=True, text=True,
                         env=dict(os.environ, MANWIDTH="200",
                                  MANPAGER="cat", PAGER="cat")).stdout
    text = " ".join(out.split())
    assert '{"ok": false, "error": {"code": ..., "message": ...}}' in text
    assert "/etc/vdsm/managedvolume-privsep.conf The privsep daemon's " \
        "configuration" in text
    assert "privsep daemon's configuration." not in text.split(
        "/run/vdsm/managedvolume ")[1][:200]


def test_config_man_page_and_readme_document_every_key():
    with open(os.path.join(REPO, "docs", "man",
                           "managedvolume.conf.5")) as f:
        man = f.read().replace("\\", "")
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for section, keys in config.SECTIONS.items():
        assert "[{}]".format(section) in man
        for key in keys:
            assert re.search(r"^\.(TP\n\.)?BR? .*\b{}\b".format(key), man,
                             re.M), key
            default = config._format(getattr(config.Config(), key))
            row = "| {} | `{}` | {} |".format(
                section, key, "`{}`".format(default) if default
                else "(empty)")
            assert row in readme, row


def test_tool_man_page_documents_every_command_and_option():
    with open(os.path.join(REPO, "docs", "man",
                           "managedvolume-tool.8")) as f:
        man = f.read().replace("\\-", "-")
    parser = tool._parser()
    sub = next(a for a in parser._actions
               if a.__class__.__name__ == "_SubParsersAction")
    for name, subparser in sub.choices.items():
        assert ".SS {}".format(name) in man, name
        for action in subparser._actions:
            for opt in action.option_strings:
                if opt.startswith("--"):
                    assert opt in man, (name, opt)


def test_readme_keeps_the_two_command_quick_start():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()
                if line.startswith("    make ")]
    assert commands == ["make run", "make check"]


def test_readme_and_docs_links_point_at_files_in_the_tree():
    for doc in ["README.md"] + ["docs/" + n for n in os.listdir(
            os.path.join(REPO, "docs")) if n.endswith(".md")]:
        with open(os.path.join(REPO, doc)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            path = os.path.join(REPO, os.path.dirname(doc), target)
            assert os.path.exists(path), "{}: {}".format(doc, target)


def test_readme_files_table_names_every_module_and_only_those():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    table = readme.split("### Files", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+\.py)`", table))
    modules = {n for _, _, names in os.walk(
        os.path.join(REPO, "vdsm_managedvolume"))
        for n in names if n.endswith(".py") and n != "__init__.py"}
    assert modules <= named, modules - named
    assert named <= modules, named - modules


def test_readme_troubleshooting_covers_every_error_code():
    from vdsm_managedvolume import errors
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.Error)
             and (925 <= cls.code <= 935 or cls.code < -32000)}
    assert len(codes) == 16
    for code in codes:
        assert "\n| {} | ".format(code) in readme, code


def test_operations_guide_lists_every_package_and_what_common_holds():
    with open(os.path.join(REPO, "managedvolume.spec")) as f:
        spec = f.read()
    with open(os.path.join(REPO, "docs", "operations.md")) as f:
        guide = f.read()
    packages = ["vdsm-managedvolume"] + [
        "vdsm-managedvolume-" + sub
        for sub in re.findall(r"^%package (\S+)$", spec, re.M)]
    rows = dict(re.findall(r"^\| `(vdsm-managedvolume[\w-]*)` \|(.*)$",
                           guide, re.M))
    assert sorted(rows) == sorted(packages)
    modules = re.search(r"^%global common_modules (\S+)$", spec,
                        re.M).group(1)
    assert set(modules.split(",")) == _shim_imports()
    assert "`vdsm_managedvolume/{{{}}}.py`".format(modules) in \
        rows["vdsm-managedvolume-common"]
    assert "not the host package" in rows["vdsm-managedvolume-engine"]


def test_spec_version_fallback_is_the_package_version():
    with open(os.path.join(REPO, "managedvolume.spec")) as f:
        spec = f.read()
    assert "%{{!?mv_version: %global mv_version {}}}".format(VERSION) in spec
    assert re.search(r"^\* .* - {}-\d+$".format(re.escape(VERSION)), spec,
                     re.M), "add a %changelog entry for " + VERSION


def test_the_engine_shim_declares_setproctitle_in_both_packagings():
    # It hides the secrets the engine passes on argv from /proc: without
    # it that silently did nothing.
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    extra = cfg["options.extras_require"]["engine"].split()
    assert "setproctitle" in extra
    with open(os.path.join(REPO, "managedvolume.spec")) as f:
        spec = f.read()
    engine = spec.split("%package engine", 1)[1].split("%description", 1)[0]
    assert re.search(r"^Requires:\s+python3-setproctitle$", engine, re.M)


# The built RPMs

@pytest.fixture(scope="module")
def rpms(tmp_path_factory):
    if not shutil.which("rpmbuild"):
        pytest.skip("rpmbuild not installed (apt-get install rpm)")
    top = tmp_path_factory.mktemp("rpm")
    out = top / "dist"
    p = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "build-rpm.sh")],
        env=dict(os.environ, RPM_TOPDIR=str(top / "topdir"),
                 RPM_OUTDIR=str(out)),
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    built = sorted(os.path.basename(line) for line in p.stdout.split())
    assert built == sorted(BINARY + (
        "vdsm-managedvolume-{}-1.src.rpm".format(VERSION),))
    return out


@pytest.fixture(scope="module")
def unpacked(rpms, tmp_path_factory):
    if not shutil.which("rpm2archive"):
        pytest.skip("rpm2archive not installed")
    root = tmp_path_factory.mktemp("unpacked")
    for name in BINARY:
        with open(rpms / name, "rb") as f:
            archive = subprocess.run(["rpm2archive", "-"], stdin=f,
                                     capture_output=True, check=True).stdout
        tgz = root.parent / (name + ".tgz")
        tgz.write_bytes(archive)
        with tarfile.open(tgz) as tar:
            tar.extractall(root, filter="tar")
    return root


def rpmq(rpms, name, *args):
    return subprocess.run(["rpm", "-qp", *args, str(rpms / name)],
                          capture_output=True, text=True,
                          check=True).stdout


def files(rpms, name):
    return set(rpmq(rpms, name, "--qf", "[%{FILENAMES}\n]").split())


def modes(rpms, name):
    """{path: "drwxr-xr-x"-style mode} of the files ``name`` holds."""
    return dict(line.split(" ", 1)[::-1] for line in rpmq(
        rpms, name, "--qf",
        "[%{FILEMODES:perms} %{FILENAMES}\n]").splitlines())


def sitelib(paths):
    (lib,) = {p.split("/vdsm_managedvolume/")[0] for p in paths
              if "/vdsm_managedvolume/" in p}
    return lib


@pytest.mark.slow
def test_rpms_are_noarch_and_carry_the_package_version(rpms):
    for name in BINARY:
        assert rpmq(rpms, name, "--qf", "%{VERSION} %{ARCH}") == \
            "{} noarch".format(VERSION)


@pytest.mark.slow
def test_host_rpm_holds_package_hook_schema_config_unit_and_man_pages(rpms):
    got = files(rpms, HOST)
    lib = sitelib(got)
    expected = {
        HOOK,
        "/usr/bin/managedvolume-agent", "/usr/bin/managedvolume-client",
        "/usr/bin/managedvolume-tool",
        lib + "/vdsm_managedvolume/service.py",
        lib + "/vdsm_managedvolume/tool.py",
        lib + "/vdsm_managedvolume/schema/managedvolume-api.yml",
        "/usr/share/vdsm-managedvolume/managedvolume-api.yml",
        "/etc/vdsm/managedvolume.conf",
        "/etc/vdsm/managedvolume-logger.conf",
        "/usr/lib/systemd/system/managedvolume-agent.service",
        "/usr/lib/tmpfiles.d/vdsm-managedvolume.conf",
        "/run/vdsm/managedvolumes", "/run/vdsm/managedvolume",
        "/usr/share/doc/vdsm-managedvolume/vdsm-integration.md",
    }
    assert expected <= got, expected - got
    for page in man_pages():
        name = os.path.basename(page)
        if "cinderlib" not in name:
            section = name.rsplit(".", 1)[1]
            assert any(f.startswith("/usr/share/man/man{}/{}".format(
                section, name)) for f in got), name
    # Every module of the tree is packaged: here, or in -common.
    shared = _shim_imports()
    for module in os.listdir(os.path.join(REPO, "vdsm_managedvolume")):
        if module.endswith(".py"):
            path = lib + "/vdsm_managedvolume/" + module
            assert (path in got) == (module[:-3] not in shared), module
    # /etc/udev/rules.d belongs to systemd-udev, required instead.
    assert "/etc/udev/rules.d" not in got


@pytest.mark.slow
def test_engine_shim_is_in_the_engine_rpm_only(rpms):
    host, engine = files(rpms, HOST), files(rpms, ENGINE)
    lib = sitelib(host)
    assert not any("/vdsm_managedvolume/engine" in f for f in host)
    assert "/usr/bin/managedvolume-cinderlib-client" not in host
    assert lib + "/vdsm_managedvolume/engine/__init__.py" in engine
    assert "/usr/bin/managedvolume-cinderlib-client" in engine
    assert any("managedvolume-cinderlib-client.1" in f for f in engine)
    # Where ovirt-engine looks for the domain's "adapter": "managedvolume".
    assert modes(rpms, ENGINE)[ADAPTER] == "-rwxr-xr-x"
    assert not any(ADAPTER in f or ADAPTER_CONF in f for f in host)
    assert WARM_UNIT in engine and WARM_UNIT not in host


@pytest.mark.slow
def test_engine_rpm_ships_the_adapter_running_the_installed_client(
        rpms, unpacked):
    with open(str(unpacked) + ADAPTER) as f:
        script = f.read()
    assert script.startswith("#!/bin/sh\n")
    assert "\nclient=/usr/bin/managedvolume-cinderlib-client\n" in script
    assert 'exec "$client" "$@"' in script
    flags = rpmq(rpms, ENGINE, "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]")
    assert "cn {}\n".format(ADAPTER_CONF) in flags    # %config(noreplace)


@pytest.mark.slow
def test_vdsm_registration_is_an_opt_in_package_requiring_vdsm(rpms):
    assert files(rpms, VDSM) == {
        os.path.dirname(DROP_IN), DROP_IN, SITE,
        SITE + "/sitecustomize.py", SUDOERS}
    assert not files(rpms, HOST) & files(rpms, VDSM)
    requires = set(rpmq(rpms, VDSM, "--requires").splitlines())
    assert {"vdsm", "sudo"} <= requires
    assert "vdsm-managedvolume = {}-1".format(VERSION) in requires
    sudoers = rpmq(rpms, VDSM, "--qf",
                   "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} "
                   "%{FILEFLAGS:fflags} %{FILENAMES}\n]")
    assert "-r--r----- root:root cn {}\n".format(SUDOERS) in sudoers
    # vdsmd is never restarted by a scriptlet: only reloaded units.
    scripts = rpmq(rpms, VDSM, "--scripts")
    assert "daemon-reload" in scripts
    assert "systemctl restart" not in scripts
    assert "try-restart" not in scripts


@pytest.mark.slow
def test_config_files_are_noreplace_and_run_dirs_belong_to_vdsm(rpms):
    attrs = {}
    for line in rpmq(rpms, HOST, "--qf",
                     "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} "
                     "%{FILEFLAGS:fflags} %{FILENAMES}\n]").splitlines():
        fields = line.split()
        flags = fields[2] if len(fields) == 4 else ""
        attrs[fields[-1]] = (fields[0], fields[1], flags)
    for conf in ("/etc/vdsm/managedvolume.conf",
                 "/etc/vdsm/managedvolume-logger.conf"):
        assert attrs[conf][2] == "cn", conf        # %config(noreplace)
    # Written by configure in %post, root's; owned so that it goes with
    # the package.
    assert attrs["/etc/vdsm/managedvolume-privsep.conf"] == (
        "-rw-r--r--", "root:root", "g")
    assert attrs[HOOK][0] == "-rwxr-xr-x"
    assert attrs["/usr/bin/managedvolume-tool"][0] == "-rwxr-xr-x"
    for d in ("/run/vdsm/managedvolumes", "/run/vdsm/managedvolume"):
        assert attrs[d][:2] == ("drwxr-xr-x", "vdsm:kvm")


@pytest.mark.slow
def test_host_rpm_requires_fedora_names_of_its_dependencies(rpms):
    requires = set(rpmq(rpms, HOST, "--requires").splitlines())
    for name in HOST_REQUIRES + ("systemd-udev",):
        assert name in requires, name
    # No dependency on vdsm itself: the hook dir is owned, not required.
    assert not any(r.split()[0] in ("vdsm", "vdsm-hook") for r in requires)


@pytest.mark.slow
def test_common_rpm_holds_exactly_the_modules_the_engine_shim_imports(rpms):
    got = files(rpms, COMMON)
    lib = sitelib(got)
    pkg = lib + "/vdsm_managedvolume/"
    shared = _shim_imports()
    assert shared == {"__init__", "errors", "log", "mask", "stompclient",
                      "stompframe"}, \
        "the shim imports another module: add it to common_modules " \
        "in managedvolume.spec and to docs/operations.md"
    python = {f for f in got if f.endswith((".py", ".pyc"))}
    assert {f for f in python if f.endswith(".py")} == {
        pkg + m + ".py" for m in shared}
    for m in shared:
        assert any(re.fullmatch(re.escape(pkg + "__pycache__/" + m) +
                                r"\.cpython-\d+(\.opt-\d)?\.pyc", f)
                   for f in python), m
    assert len(python) == 2 * len(shared), python
    # The distribution's metadata (both sides' console scripts) and the
    # license, which the other packages get through their Requires.
    dist_info = lib + "/vdsm_managedvolume-{}.dist-info/".format(VERSION)
    assert dist_info + "entry_points.txt" in got
    assert dist_info + "METADATA" in got
    assert "/usr/share/licenses/vdsm-managedvolume-common/LICENSE" in got
    assert not any(f.startswith("/usr/bin/") for f in got)


@pytest.mark.slow
def test_no_file_belongs_to_two_packages(rpms):
    owners = {}
    for name in BINARY:
        for path, mode in modes(rpms, name).items():
            owners.setdefault(path, []).append((name, mode))
    shared = {path: owned for path, owned in owners.items()
              if len(owned) > 1}
    for path, owned in shared.items():
        assert all(mode.startswith("d") for _, mode in owned), (path, owned)
    # Only the Python package's directories: -common owns them for the
    # engine machine, the host package lists its modules in them.
    lib = sitelib(files(rpms, COMMON))
    assert set(shared) == {lib + "/vdsm_managedvolume",
                           lib + "/vdsm_managedvolume/__pycache__"}


@pytest.mark.slow
def test_engine_rpm_requires_common_and_cinderlib_not_the_host_package(
        rpms):
    requires = set(rpmq(rpms, ENGINE, "--requires").splitlines())
    assert "python3-cinderlib" in requires
    assert "python3-setproctitle" in requires
    assert "vdsm-managedvolume-common = {}-1".format(VERSION) in requires
    assert not any(r.split()[0] in ("vdsm-managedvolume", "vdsm")
                   for r in requires), requires
    host = set(rpmq(rpms, HOST, "--requires").splitlines())
    assert "vdsm-managedvolume-common = {}-1".format(VERSION) in host
    # Nothing of the host's runs on the engine machine at install: no user
    # vdsm, no database, no agent; the engine package only tells systemd
    # about its optional warm service (preset, which leaves it disabled;
    # disabled on erase; restarted on upgrade when running).
    assert rpmq(rpms, COMMON, "--scripts") == ""
    scripts = rpmq(rpms, ENGINE, "--scripts")
    for word in ("useradd", "managedvolume-tool", "managedvolume-agent",
                 "tmpfiles"):
        assert word not in scripts
    unit = "managedvolume-cinderlib.service"
    assert "--no-reload preset " + unit in _scriptlet(rpms, "POSTIN",
                                                      ENGINE)
    assert "disable --now " + unit in _scriptlet(rpms, "PREUN", ENGINE)
    assert "try-restart " + unit in _scriptlet(rpms, "POSTUN", ENGINE)


@pytest.mark.slow
def test_engine_rpm_ships_its_guide_next_to_its_man_page(rpms):
    got = files(rpms, ENGINE)
    assert "/usr/share/doc/vdsm-managedvolume-engine/engine.md" in got
    assert "/usr/share/man/man1/managedvolume-cinderlib-client.1" in {
        f.rsplit(".gz", 1)[0] for f in got}


@pytest.mark.slow
def test_man_pages_cite_doc_files_their_own_package_ships(rpms):
    contents = {name: files(rpms, name) for name in BINARY}
    cited = 0
    for page in man_pages():
        name = os.path.basename(page)
        section = name.rsplit(".", 1)[1]
        (owner,) = [rpm for rpm, got in contents.items() if any(
            f.startswith("/usr/share/man/man{}/{}".format(section, name))
            for f in got)]
        with open(page) as f:
            text = re.sub(r"\\[%&]", "", f.read())
        for path in re.findall(r"/usr/share/doc/[^\s)]+[^\s).,;]", text):
            assert path in contents[owner], (name, path, owner)
            cited += 1
    assert cited >= 2


@pytest.mark.slow
def test_scriptlets_configure_the_database_and_drive_systemd(rpms):
    scripts = rpmq(rpms, HOST, "--scripts")
    post = _scriptlet(rpms, "POSTIN")
    assert "/usr/bin/managedvolume-tool configure" in post
    assert "systemctl --no-reload preset managedvolume-agent.service" in post
    assert "systemd-tmpfiles --create vdsm-managedvolume.conf" in post
    assert "disable --now managedvolume-agent.service" in \
        _scriptlet(rpms, "PREUN")
    assert "try-restart managedvolume-agent.service" in \
        _scriptlet(rpms, "POSTUN")
    assert "useradd -r -u 36 -g kvm" in _scriptlet(rpms, "PREIN")
    for kind in ("preinstall", "postinstall", "preuninstall",
                 "postuninstall"):
        assert kind + " scriptlet" in scripts


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["PREIN", "POSTIN", "PREUN", "POSTUN"])
def test_scriptlets_are_valid_shell(rpms, tag, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text(_scriptlet(rpms, tag))
    subprocess.run(["sh", "-n", str(script)], check=True)


@pytest.mark.slow
def test_postun_restarts_only_on_upgrade(rpms, tmp_path):
    # Run %preun/%postun with a fake systemctl: $1 = 0 is an erase,
    # $1 = 1 an upgrade.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fake = bindir / "systemctl"
    fake.write_text("#!/bin/sh\necho \"$@\" >> {}\n".format(calls))
    fake.chmod(0o755)
    for tag in ("PREUN", "POSTUN"):
        script = tmp_path / tag
        script.write_text(_scriptlet(rpms, tag).replace(
            "/usr/bin/systemctl", str(fake)))
        for arg in ("0", "1"):
            subprocess.run(["sh", str(script), arg], check=True)
    lines = calls.read_text().splitlines()
    assert lines == [
        "--no-reload disable --now managedvolume-agent.service",  # erase
        "daemon-reload",                                          # erase
        "daemon-reload",                                          # upgrade
        "try-restart managedvolume-agent.service",                # upgrade
    ]


@pytest.mark.slow
def test_packaged_files_hold_no_build_paths(unpacked):
    bad = (REPO.encode(), b"BUILDROOT", sys.prefix.encode())
    for dirpath, _, names in os.walk(unpacked):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                content = f.read()
            for b in bad:
                assert b not in content, (path, b)
    for script in ("managedvolume-agent", "managedvolume-tool",
                   "managedvolume-client", "managedvolume-cinderlib-client"):
        with open(unpacked / "usr" / "bin" / script) as f:
            assert f.readline() == "#!/usr/bin/python3\n", script
    with open(str(unpacked) + HOOK) as f:
        assert f.readline() == "#!/usr/bin/python3\n"


@pytest.mark.slow
def test_packaged_tool_runs_and_ships_its_own_default_config(unpacked):
    lib = sitelib(str(p)[len(str(unpacked)):]
                  for p in unpacked.rglob("*.py"))
    env = dict(os.environ, PYTHONPATH=str(unpacked) + lib)
    env.pop("MANAGEDVOLUME_CONFIG", None)
    tool_script = str(unpacked / "usr" / "bin" / "managedvolume-tool")

    p = subprocess.run([sys.executable, tool_script, "--version"], env=env,
                       capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "managedvolume-tool " + VERSION
    p = subprocess.run([sys.executable, tool_script, "dump-config",
                        "--defaults", "--commented"], env=env, cwd="/",
                       capture_output=True, text=True, check=True)
    with open(unpacked / "etc" / "vdsm" / "managedvolume.conf") as f:
        assert p.stdout == f.read()
    p = subprocess.run(
        [sys.executable, "-c",
         "import vdsm_managedvolume.tool as t; print(t.__file__)"],
        env=env, cwd="/", capture_output=True, text=True, check=True)
    assert p.stdout.startswith(str(unpacked))
    schema = json.loads(subprocess.run(
        [sys.executable, tool_script, "dump-schema", "--json"], env=env,
        cwd="/", capture_output=True, text=True, check=True).stdout)
    assert "ManagedVolume.attach_volume" in schema


STAMPED = ("__init__.py", "privsep.py", "brick.py")


def _builds(package_dir):
    """{file: its BUILD} for the files stamp-build stamps."""
    out = {}
    for name in STAMPED:
        with open(os.path.join(package_dir, name)) as f:
            [out[name]] = re.findall(r'^BUILD = "([^"]*)"$', f.read(), re.M)
    return out


@pytest.mark.slow
def test_common_and_host_packages_carry_one_build_id(rpms, unpacked):
    # __init__.py is -common's, privsep.py and brick.py the host
    # package's: one id, not the source tree's, of this version-release.
    lib = sitelib(files(rpms, COMMON))
    assert lib + "/vdsm_managedvolume/__init__.py" in files(rpms, COMMON)
    assert lib + "/vdsm_managedvolume/privsep.py" in files(rpms, HOST)
    [build] = set(_builds(str(unpacked) + lib + "/vdsm_managedvolume")
                  .values())
    assert re.fullmatch(re.escape(VERSION) + r"-1\.[0-9a-f]{12}", build)


def test_stamp_build_ids_differ_with_the_sources_only(tmp_path):
    def stamped(name, edit=None):
        tree = tmp_path / name
        shutil.copytree(os.path.join(REPO, "vdsm_managedvolume"),
                        str(tree / "vdsm_managedvolume"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        if edit:
            with open(tree / "vdsm_managedvolume" / "mask.py", "a") as f:
                f.write(edit)
        p = subprocess.run(
            ["bash", os.path.join(REPO, "scripts", "stamp-build"), "9.9-1",
             str(tree)], capture_output=True, text=True, check=True)
        builds = _builds(str(tree / "vdsm_managedvolume"))
        assert set(builds.values()) == {p.stdout.strip()}
        return p.stdout.strip()

    one = stamped("one")
    assert one.startswith("9.9-1.")
    assert stamped("same") == one
    assert stamped("other", "# another build\n") != one
    # A tree stamped already (or whose line changed) is refused.
    p = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "stamp-build"), "9.9-1",
         str(tmp_path / "one")], capture_output=True, text=True)
    assert p.returncode != 0
    assert "does not hold one" in p.stderr


@pytest.mark.slow
@pytest.mark.root
def test_packaged_daemon_refuses_to_start_beside_another_builds_common(
        rpms, unpacked, tmp_path, monkeypatch):
    # A privsep daemon runs the packaged files; then one whose -common
    # (__init__.py) is of another build, as between the two packages'
    # steps of one RPM transaction: it refuses to start, and the call
    # fails with 926 naming both builds, sent to no daemon.
    if os.geteuid() != 0:
        pytest.skip("the privsep daemon needs root")
    from vdsm_managedvolume import errors
    from vdsm_managedvolume import privsep
    lib = sitelib(files(rpms, COMMON))
    copy = tmp_path / "root"
    shutil.copytree(str(unpacked) + lib, str(copy))
    pkg = copy / "vdsm_managedvolume"
    [build] = set(_builds(str(pkg)).values())
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(copy)] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p]))
    cfg = config.with_state_dir(config.Config(), str(tmp_path / "state"))
    b = privileged.Brick(cfg)
    try:
        assert b.connector_properties()["multipath"] is True
        theirs = b._daemon.channel.call(
            privsep.ENTRYPOINTS + "handshake", (privsep.identity(),), 30)
        assert (theirs["build"], theirs["path"]) == (build, str(pkg))
        b.stop()
        init = pkg / "__init__.py"
        init.write_text(init.read_text().replace(
            'BUILD = "{}"'.format(build), 'BUILD = "{}-1.0123456789ab"'
            .format(VERSION)))
        with pytest.raises(errors.HelperFailed) as e:
            b.connector_properties()
        assert e.value.code == 926
        assert e.value.unsent
        assert "exited with code {}".format(privsep.EXIT_REFUSED) in str(
            e.value)
        assert ("its files are of two builds: in {}, __init__.py is of "
                "build {}-1.0123456789ab, privsep.py is of build {}, "
                "brick.py is of build {}".format(pkg, VERSION, build, build)
                ) in str(e.value)
    finally:
        b.stop()


@pytest.mark.slow
def test_rpms_install_together_into_an_empty_root(rpms, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True)
    p = subprocess.run(
        ["rpm", "--root", str(root), "-i", "--nodeps", "--noscripts",
         "--notriggers"] + [str(rpms / name) for name in BINARY],
        capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (root / "usr" / "bin" / "managedvolume-cinderlib-client").exists()
    for path, rpm in (("/etc/vdsm/managedvolume.conf", HOST),
                      ("/usr/bin/managedvolume-cinderlib-client", ENGINE),
                      (sitelib(files(rpms, COMMON)) +
                       "/vdsm_managedvolume/mask.py", COMMON)):
        q = subprocess.run(["rpm", "--root", str(root), "-qf", path],
                           capture_output=True, text=True, check=True)
        assert q.stdout.strip() == rpm[:-len(".noarch.rpm")] + ".noarch"
    # Both sides depend on -common: it cannot go while they are there.
    e = subprocess.run(["rpm", "--root", str(root), "--test", "-e",
                        "vdsm-managedvolume-common"],
                       capture_output=True, text=True)
    assert e.returncode != 0
    assert "vdsm-managedvolume-engine" in e.stderr
    assert "vdsm-managedvolume-{}".format(VERSION) in e.stderr


@pytest.mark.slow
def test_engine_and_common_alone_install_and_run_a_cinderlib_operation(
        rpms, tmp_path):
    # An engine machine: only -common and -engine, scriptlets enabled (the
    # root has no shell: any scriptlet would fail the transaction).
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True)
    p = subprocess.run(
        ["rpm", "--root", str(root), "-i", "--nodeps",
         str(rpms / COMMON), str(rpms / ENGINE)],
        capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    installed = subprocess.run(
        ["rpm", "--root", str(root), "-qa", "--qf", "%{NAME}\n"],
        capture_output=True, text=True, check=True).stdout.split()
    assert sorted(installed) == ["vdsm-managedvolume-common",
                                 "vdsm-managedvolume-engine"]
    lib = sitelib(files(rpms, COMMON))
    pkg = str(root) + lib + "/vdsm_managedvolume"
    assert os.path.exists(pkg + "/engine/client.py")
    assert not os.path.exists(pkg + "/config.py")
    # Only the adapter's settings (commented defaults) under /etc.
    etc = [os.path.relpath(os.path.join(d, n), str(root))
           for d, _, names in os.walk(str(root / "etc")) for n in names]
    assert etc == [ADAPTER_CONF.lstrip("/")]
    units = [os.path.relpath(os.path.join(d, n), str(root))
             for d, _, names in os.walk(str(root / "usr" / "lib" / "systemd"))
             for n in names]
    assert units == [WARM_UNIT.lstrip("/")]

    # The installed command, on the installed package and the venv's
    # cinderlib: -S keeps the venv's editable install of this tree (a .pth
    # finder) off the path, so nothing can come from the tree.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MANAGEDVOLUME_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root) + lib, sysconfig.get_paths()["purelib"]])
    env["MANAGEDVOLUME_ENGINE_LOCKS_DIR"] = str(tmp_path / "locks")
    env["ENGINE_LOG"] = str(tmp_path / "log")    # not /var/log/ovirt-engine
    python = [sys.executable, "-S"]
    host_only = subprocess.run(
        python + ["-c", "import vdsm_managedvolume.config"], env=env,
        cwd="/", capture_output=True, text=True)
    assert "No module named 'vdsm_managedvolume.config'" in \
        host_only.stderr, host_only.stderr

    command = python + [str(root / "usr" / "bin" /
                            "managedvolume-cinderlib-client")]
    usage = subprocess.run(command, env=env, cwd="/", capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 2, usage.stderr
    assert usage.stdout.startswith("error:expected SUB-COMMAND")

    driver = json.dumps({
        "volume_driver": "vdsm_managedvolume.engine.filedriver.FileDriver",
        "volume_backend_name": "file",
        "file_volume_dir": str(tmp_path / "vols")})
    db_url = "sqlite:///{}".format(tmp_path / "cinderlib.db")
    vol_id = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"
    run = subprocess.run(
        command + ["--cold", "create_volume", driver, db_url, "flow-1",
                   vol_id, "1"],
        env=env, cwd="/", capture_output=True, text=True, timeout=240)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert any(vol_id in name for name in os.listdir(tmp_path / "vols"))
    with open(tmp_path / "log" / "managedblock" / "managedvolume.log") as f:
        assert "[flow=flow-1] create_volume done" in f.read()


# Private helpers

def _shim_imports():
    """The modules of vdsm_managedvolume (outside engine/) the shim needs.

    Every import in vdsm_managedvolume/engine/*.py, static or inside a
    function, closed over what those modules import in turn; always the
    package's ``__init__``.
    """
    pkg = os.path.join(REPO, "vdsm_managedvolume")
    todo = [os.path.join(pkg, "engine", n)
            for n in os.listdir(os.path.join(pkg, "engine"))
            if n.endswith(".py")]
    found = {"__init__"}
    while todo:
        path = todo.pop()
        in_engine = os.path.basename(os.path.dirname(path)) == "engine"
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = ("vdsm_managedvolume.engine" if in_engine
                              else "vdsm_managedvolume")
                    for _ in range(node.level - 1):
                        parent = parent.rsplit(".", 1)[0]
                    base = parent + ("." + base if base else "")
                names = [base + "." + a.name for a in node.names] + [base]
            for name in names:
                parts = name.split(".")
                if (parts[0] == "vdsm_managedvolume" and len(parts) > 1
                        and parts[1] != "engine"):
                    module = os.path.join(pkg, parts[1] + ".py")
                    if os.path.exists(module) and parts[1] not in found:
                        found.add(parts[1])
                        todo.append(module)
    return found


def _scriptlet(rpms, tag, name=HOST):
    return rpmq(rpms, name, "--qf", "%{" + tag + "}")


def _sudoers_allows(command):
    """Whether the data/sudoers Cmnd_Alias matches ``command``.

    sudo splits both on white space and matches each argument with
    fnmatch-style wildcards; that is what this does.
    """
    with open(data("sudoers")) as f:
        text = f.read().replace("\\\n", " ")
    alias = re.search(r"^Cmnd_Alias MANAGEDVOLUME_PRIVSEP = (.*)$", text,
                      re.M).group(1).split()
    args = command.split()
    return len(args) == len(alias) and all(
        fnmatch.fnmatchcase(a, pattern) for a, pattern in zip(args, alias))
