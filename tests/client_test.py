"""managedvolume-client: vdsm-client's syntax, output, errors, exit codes.

First against a stub transport (parsing, help, formatting), then end to end
against a real ``managedvolume-agent`` started with ``--state-dir``.
"""

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vdsm_managedvolume import client
from vdsm_managedvolume import config
from vdsm_managedvolume import mask
from vdsm_managedvolume import stompclient

from tests import lifeline
from tests.rpc_fixtures import ISCSI_CONNECTION, SECRET, VOL_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


class StubTransport:
    """Stands in for stompclient.Client; records what it was asked."""

    def __init__(self, result=True, error=None, connect_error=None):
        self.result = result
        self.error = error
        self.connect_error = connect_error
        self.connected = None
        self.calls = []
        self.closed = False

    def __call__(self, host, port, ssl_context, timeout):
        if self.connect_error:
            raise self.connect_error
        self.connected = (host, port, ssl_context, timeout)
        return self

    def call(self, method, params, flow_id):
        self.calls.append((method, params, flow_id))
        if self.error:
            raise self.error
        return self.result

    def close(self):
        self.closed = True


def run(args, transport=None, stdin=None, monkeypatch=None):
    """Run main(); return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr = out, err
    if stdin is not None:
        # Bytes beneath, as a real standard input has (-f - reads them).
        if isinstance(stdin, str):
            stdin = stdin.encode("utf-8")
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        client.main(args, connect=transport or StubTransport())
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdout, sys.stderr, sys.stdin = old
    return code, out.getvalue(), err.getvalue()


# Output

def test_prints_result_like_vdsm_client():
    result = {"vol_id": VOL_ID, "path": "/dev/x", "b": [1, 2]}
    code, out, err = run(["--insecure", "ManagedVolume", "attach_volume",
                          "-f", "-"], StubTransport(result),
                         stdin=json.dumps({"vol_id": VOL_ID}))
    assert code == 0
    assert out == json.dumps(result, indent=4, sort_keys=True) + "\n"
    assert err == ""


def test_true_result():
    code, out, _ = run(["--insecure", "ManagedVolume", "detach_volume",
                        "vol_id=" + VOL_ID])
    assert (code, out) == (0, "true\n")


def test_server_error_is_vdsm_client_shape():
    error = stompclient.remote_error(
        -32602, "Invalid parameter vol_id: 'x' is not a canonical UUID")
    code, out, err = run(["--insecure", "ManagedVolume", "detach_volume",
                          "vol_id=x"], StubTransport(error=error))
    assert code == 1
    assert out == ""
    assert err == (
        "managedvolume-client: Command ManagedVolume.detach_volume with "
        "args {'vol_id': 'x'} failed:\n"
        "(code=-32602, message=Invalid parameter vol_id: 'x' is not a "
        "canonical UUID)\n")


def test_error_args_are_masked():
    error = stompclient.remote_error(927, "already attached")
    params = {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION}
    code, _, err = run(["--insecure", "ManagedVolume", "attach_volume",
                        "-f", "-"], StubTransport(error=error),
                       stdin=json.dumps(params))
    assert code == 1
    assert "(code=927, message=already attached)" in err
    assert SECRET not in err
    assert mask.MASK in err


def test_connection_failure_exits_1():
    transport = StubTransport(connect_error=ConnectionRefusedError(
        111, "Connection refused"))
    code, _, err = run(["--insecure", "-p", "1", "ManagedVolume",
                        "volumes_info"], transport)
    assert code == 1
    assert err.startswith("managedvolume-client: Connection to "
                          "localhost:1 with use_tls=False, timeout=60")
    assert "Connection refused" in err


def test_timeout_exits_1():
    transport = StubTransport(error=stompclient.Timeout(timeout=5.0))
    code, _, err = run(["--insecure", "--timeout", "5", "ManagedVolume",
                        "volumes_info"], transport)
    assert code == 1
    assert "timed out after 5.0 seconds" in err
    assert transport.closed


def test_timeout_says_the_call_may_still_complete_and_how_to_see_it():
    transport = StubTransport(error=stompclient.Timeout(timeout=5.0))
    code, _, err = run(["--insecure", "--timeout", "5", "ManagedVolume",
                        "detach_volume", "vol_id=" + VOL_ID], transport)
    assert code == 1
    assert "is not cancelled: it may still complete on the host" in err
    assert "managedvolume-client ManagedVolume volumes_info " \
        "vol_ids='[\"{}\"]'".format(VOL_ID) in err


def test_ctrl_c_during_a_call_says_it_may_still_complete(capsys):
    transport = StubTransport(error=KeyboardInterrupt())
    code = client.main(["--insecure", "ManagedVolume", "detach_volume",
                        "vol_id=" + VOL_ID], connect=transport)
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted: the call was sent and is not cancelled" in err
    assert transport.closed


def test_without_state_dir_a_running_dev_agent_nearby_is_named(
        tmp_path, monkeypatch):
    # vdsm's PKI is missing on a development machine; make run's agent
    # holds .state/run/managedvolume/agent.lock.
    import fcntl
    if os.path.exists(config.Config.ca_file):
        pytest.skip("vdsm's PKI exists on this host")
    run_dir = tmp_path / ".state" / "run" / "managedvolume"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # The source tree is the one whose venv runs us: not this one, where
    # a developer's own `make run` may be serving .state.
    monkeypatch.setattr(sys, "executable",
                        str(tmp_path / "tree" / ".venv" / "bin" / "python"))
    code, _, err = run(["ManagedVolume", "volumes_info"], StubTransport())
    assert code == 2 and "an agent is running" not in err   # none: no hint
    with open(run_dir / "agent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        code, _, err = run(["ManagedVolume", "volumes_info"],
                           StubTransport())
    assert code == 2
    assert "an agent is running with --state-dir .state here: did you " \
        "mean 'managedvolume-client --state-dir .state ...'?" in err


# Params

def test_name_value_params_are_strings():
    transport = StubTransport()
    run(["--insecure", "ManagedVolume", "detach_volume",
         "vol_id=" + VOL_ID, "sd_id=123"], transport)
    assert transport.calls == [("ManagedVolume.detach_volume",
                                {"vol_id": VOL_ID, "sd_id": "123"}, None)]


def test_typed_params_are_read_as_json():
    transport = StubTransport(result=[])
    run(["--insecure", "ManagedVolume", "volumes_info",
         "include_secrets=true", 'vol_ids=["{}"]'.format(VOL_ID)],
        transport)
    assert transport.calls[0][1] == {"include_secrets": True,
                                     "vol_ids": [VOL_ID]}


def test_typed_param_that_is_not_json_stays_a_string():
    transport = StubTransport(result=[])
    _, _, err = run(["--insecure", "ManagedVolume", "volumes_info",
                     "include_secrets=yes"], transport)
    assert transport.calls[0][1] == {"include_secrets": "yes"}
    # A flag asking for secrets is no secret on argv.
    assert "warning" not in err


def test_list_typed_bare_after_the_shell_ate_its_quotes_gets_a_hint():
    # The user typed vol_ids=["<uuid>"]; the shell passed vol_ids=[<uuid>].
    transport = StubTransport(result=[])
    code, _, err = run(["--insecure", "ManagedVolume", "volumes_info",
                        "vol_ids=[{}]".format(VOL_ID)], transport)
    assert code == 2
    assert transport.calls == []
    assert "quote the whole argument: vol_ids='[\"<uuid>\", ...]'" in err


def test_value_may_hold_equal_signs():
    transport = StubTransport()
    run(["--insecure", "ManagedVolume", "detach_volume", "vol_id=a=b"],
        transport)
    assert transport.calls[0][1] == {"vol_id": "a=b"}


def test_params_from_file(tmp_path):
    params = {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION}
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    for args in (["-f", str(path), "ManagedVolume", "attach_volume"],
                 ["ManagedVolume", "attach_volume", "-f", str(path)]):
        transport = StubTransport()
        code, _, _ = run(["--insecure"] + args, transport)
        assert code == 0
        assert transport.calls[0][1] == params


def test_flow_id_is_sent():
    transport = StubTransport()
    run(["--insecure", "--flow-id", "flow-1", "ManagedVolume",
         "detach_volume", "vol_id=" + VOL_ID], transport)
    assert transport.calls[0][2] == "flow-1"


@pytest.mark.parametrize("args, stdin, message", [
    (["ManagedVolume", "detach_volume", "vol_id"], None, "Invalid param"),
    (["ManagedVolume", "detach_volume", "-f", "-", "vol_id=x"], "{}",
     "Conflicting command line parameters"),
    (["ManagedVolume", "detach_volume", "-f", "-"], "", "File is empty"),
    (["ManagedVolume", "detach_volume", "-f", "-"], "{",
     "standard input is not JSON: Expecting"),
    (["ManagedVolume", "detach_volume", "-f", "-"], b"\xff\xfe",
     "standard input is not UTF-8 JSON: byte 0xff at position 0"),
    (["ManagedVolume", "detach_volume", "-f", "-"], "[1]", "JSON object"),
    (["ManagedVolume", "detach_volume", "-f", "/nonexistent"], None,
     "No such file"),
    # Python's json reads these as infinity/NaN and would send the
    # non-JSON word Infinity: refused here, naming where they were.
    (["ManagedVolume", "attach_volume", "-f", "-"],
     '{"vol_id": "x", "connection_info": {"data": {"x": 1e400}}}',
     "standard input: 1e400 is not a finite number"),
    (["ManagedVolume", "detach_volume", "-f", "-"], '{"vol_id": NaN}',
     "standard input: NaN is not a finite number"),
    (["ManagedVolume", "volumes_info", "vol_ids=[-Infinity]"], None,
     "vol_ids: -Infinity is not a finite number"),
    (["ManagedVolume", "nope"], None, "invalid choice"),
    (["Nope", "verb"], None, "invalid choice"),
    (["ManagedVolume"], None, "required"),
    ([], None, "required"),
])
def test_usage_errors_exit_2(args, stdin, message):
    transport = StubTransport()
    code, out, err = run(["--insecure"] + args, transport, stdin=stdin)
    assert code == 2
    assert message in err
    assert transport.calls == []


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe", "is not UTF-8 JSON: byte 0xff at position 0"),
    (b'{"vol_id": "caf\xe9"}', "is not UTF-8 JSON: byte 0xe9 at position "
                                "15"),
    (b"{'vol_id': 1}", "is not JSON: Expecting property name"),
])
def test_a_params_file_that_is_not_utf8_json_is_a_usage_error_naming_it(
        tmp_path, content, message):
    path = tmp_path / "params.json"
    path.write_bytes(content)
    transport = StubTransport()
    code, out, err = run(["--insecure", "-f", str(path), "ManagedVolume",
                          "detach_volume"], transport)
    assert code == 2
    assert "error: {} {}".format(path, message) in err
    assert "Traceback" not in err
    assert transport.calls == []


DEEP = "[" * 10000 + "]" * 10000


@pytest.mark.parametrize("timeout", [
    "nan", "inf", "-inf", "-1", "0", "1e300", "86401", "soon"])
def test_a_timeout_that_is_no_sane_number_of_seconds_is_a_usage_error(
        timeout):
    transport = StubTransport()
    code, out, err = run(["--insecure", "--timeout=" + timeout,
                          "ManagedVolume", "volumes_info"], transport)
    assert code == 2
    assert "invalid timeout" in err
    assert "Traceback" not in err
    assert transport.calls == []


@pytest.mark.parametrize("port", ["70000", "65536", "0", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error_not_wrapped(port):
    # -p 70000 connected to port 4464; -p -1 failed with exit 1.
    transport = StubTransport()
    code, out, err = run(["--insecure", "-p", port, "ManagedVolume",
                          "volumes_info"], transport)
    assert code == 2
    assert "invalid port {!r}: a number from 1 to 65535".format(port) in err
    assert transport.calls == []


def test_help_documents_the_exit_statuses(capsys):
    # They were only in the man page.
    with pytest.raises(SystemExit):
        client.main(["--help"])
    out = capsys.readouterr().out
    assert "\nexit status:\n" in out
    for code in ("0", "1", "2", "130"):
        assert "\n  {} ".format(code) in out


def test_a_timeout_up_to_a_day_is_taken():
    transport = StubTransport()
    code, out, err = run(["--insecure", "--timeout", "86400",
                          "ManagedVolume", "volumes_info"], transport)
    assert code == 0, err
    assert transport.connected[3] == 86400.0


@pytest.mark.parametrize("args, stdin", [
    (["-f", "-"], '{"vol_ids": ' + DEEP + "}"),
    (["-f", "-"], '{"vol_ids": ' + "[" * 101 + "]" * 101 + "}"),
    (["vol_ids=" + DEEP], None),
    (["vol_ids=" + "[" * 150 + "]" * 150], None),
])
def test_deeply_nested_json_params_are_a_usage_error(args, stdin):
    # 10,000 levels ended in a RecursionError traceback.
    transport = StubTransport()
    code, out, err = run(["--insecure", "ManagedVolume", "volumes_info"]
                         + args, transport, stdin=stdin)
    assert code == 2
    assert "nested more than {} levels".format(client.MAX_NESTING) in err
    assert "Traceback" not in err
    assert transport.calls == []


def test_json_params_nested_up_to_the_limit_are_sent():
    transport = StubTransport()
    deep = "[" * client.MAX_NESTING + "]" * client.MAX_NESTING
    code, out, err = run(["--insecure", "ManagedVolume", "volumes_info",
                          "-f", "-"], transport,
                         stdin='{"vol_ids": ' + deep[1:-1] + "}")
    assert code == 0, err
    assert len(transport.calls) == 1


# Help from the schema

def test_namespace_help_lists_verbs_with_descriptions():
    code, out, _ = run(["ManagedVolume", "-h"])
    assert code == 0
    for verb, text in (("attach_volume", "Attach a managed volume"),
                       ("detach_volume", "Detach a managed volume"),
                       ("volumes_info", "Report the managed volumes")):
        assert verb in out
        assert text in out


def test_verb_help_shows_params_types_defaults():
    code, out, _ = run(["ManagedVolume", "attach_volume", "-h"])
    assert code == 0
    assert "vol_id (UUID)" in out
    assert "connection_info (ManagedVolumeConnection)" in out
    assert "driver_volume_type (string)" in out
    assert ('sd_id (UUID, default "00000000-0000-0000-0000-000000000000")'
            in out)
    code, out, _ = run(["ManagedVolume", "volumes_info", "-h"])
    assert "vol_ids ([UUID], default [])" in out
    assert "include_secrets (boolean, default false)" in out


def test_top_help_lists_namespaces():
    code, out, _ = run(["-h"])
    assert code == 0
    assert "ManagedVolume" in out and "Host" in out
    assert "--state-dir DIR" in out


def _help_examples(text):
    """The command lines under 'example:'/'examples:' in a help text."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("example"):
            inside = True
        elif inside and line.startswith("  managedvolume-client "):
            lines.append(line.split("#")[0].split()[1:])
        else:
            inside = False
    return lines


def _run_example(argv, tmp_path):
    argv = [a.replace("<UUID>", VOL_ID).replace("<vol_id>", VOL_ID)
            .replace("'", "") for a in argv]
    # the file an -f example names holds the required params
    for name in ("params.json", "attach.json"):
        (tmp_path / name).write_text(json.dumps(
            {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION}))
    transport = StubTransport()
    code, _, err = run(["--insecure"] + argv, transport)
    return code, err, transport


def test_every_help_has_examples_that_run_and_fits_80_columns(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["-h"])
    assert code == 0
    assert [line for line in out.splitlines() if len(line) > 79] == []
    examples = _help_examples(out)
    assert len(examples) >= 4
    helps = [out]
    for namespace, verbs in (("Host", ["getCapabilities"]),
                             ("ManagedVolume", ["attach_volume",
                                                "detach_volume",
                                                "extend_volume",
                                                "volumes_info"])):
        for verb in verbs:
            code, out, _ = run([namespace, verb, "-h"])
            assert code == 0
            assert [line for line in out.splitlines()
                    if len(line) > 79] == []
            mine = _help_examples(out)
            assert len(mine) == 1, out
            assert mine[0][:2] == [namespace, verb]
            examples += mine
            helps.append(out)
    for argv in examples:
        if "--state-dir" in argv:
            continue        # needs make run's PKI (tests/readme_test.py)
        code, err, transport = _run_example(argv, tmp_path)
        assert code == 0, (argv, err)
        method = [a for a in argv if a in ("Host", "ManagedVolume")][0]
        assert transport.calls[0][0].startswith(method + "."), argv


# TLS files

def opts(*args):
    return client.option_parser(client.schema_module.load()).parse_args(
        list(args) + ["ManagedVolume", "volumes_info"])


def test_default_tls_files_are_vdsm_pki():
    assert client.tls_files(opts()) == (
        "/etc/pki/vdsm/certs/vdsmcert.pem", "/etc/pki/vdsm/keys/vdsmkey.pem",
        "/etc/pki/vdsm/certs/cacert.pem")


def test_state_dir_uses_agent_dev_pki(tmp_path):
    d = str(tmp_path)
    assert client.tls_files(opts("--state-dir", d)) == (
        os.path.join(d, "pki", "client-cert.pem"),
        os.path.join(d, "pki", "client-key.pem"),
        os.path.join(d, "pki", "cacert.pem"))
    # The agent's own view of the same state dir.
    cfg = config.with_state_dir(config.Config(), d)
    assert client.tls_files(opts("--state-dir", d))[2] == cfg.ca_file


def test_explicit_tls_files_win():
    assert client.tls_files(opts("--cert", "c", "--key", "k",
                                 "--cacert", "ca")) == ("c", "k", "ca")


def test_cert_without_key_is_usage_error():
    with pytest.raises(client.UsageError):
        client.tls_files(opts("--cert", "c"))


def test_missing_tls_files_exit_2_naming_them_and_what_makes_them(
        tmp_path):
    code, _, err = run(["--state-dir", str(tmp_path), "ManagedVolume",
                        "volumes_info"])
    assert code == 2
    assert "TLS files not found: {}".format(
        tmp_path / "pki" / "client-cert.pem") in err
    assert "the agent started with --state-dir {} creates its " \
        "development PKI".format(tmp_path) in err
    (tmp_path / "ca.pem").write_text("not a certificate")
    code, _, err = run(["--cacert", str(tmp_path / "ca.pem"),
                        "--cert", str(tmp_path / "c"),
                        "--key", str(tmp_path / "k"),
                        "ManagedVolume", "volumes_info"])
    assert code == 2
    assert "TLS files not found: {}, {}\n".format(
        tmp_path / "c", tmp_path / "k") in err


def test_insecure_has_no_tls():
    transport = StubTransport(result=[])
    run(["--insecure", "ManagedVolume", "volumes_info"], transport)
    assert transport.connected == ("localhost", 54321, None, 60)


# End to end, against a real agent

@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    state = tmp_path_factory.mktemp("agent")
    fake = state / "fakebrick"
    dev = state / "dev" / "mapper"
    dev.mkdir(parents=True)
    conf = state / "managedvolume.conf"
    conf.write_text(
        "[paths]\nmultipath_dir = {}\n"
        "[privsep]\nconnector_override = tests.fakebrick\n".format(dev))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, MANAGEDVOLUME_CONFIG=str(conf),
               MANAGEDVOLUME_FAKEBRICK_DIR=str(fake))
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "managedvolume-agent"), "--state-dir",
         str(state), "--listen", "127.0.0.1:{}".format(port)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    watcher = lifeline.watch(proc, str(state))
    try:
        _wait_for_port(proc, port)
        yield Agent(str(state), port, str(dev), env)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if watcher is not None:
            lifeline.cut(watcher)


class Agent:

    def __init__(self, state, port, dev, env):
        self.state = state
        self.port = port
        self.dev = dev
        self.env = env

    def client(self, *args, stdin=None):
        """Run the managedvolume-client console script; (rc, out, err)."""
        cmd = [os.path.join(VENV_BIN, "managedvolume-client"),
               "--state-dir", self.state, "-p", str(self.port)]
        p = subprocess.run(cmd + list(args), input=stdin,
                           capture_output=True, text=True, timeout=120,
                           env=self.env)
        return p.returncode, p.stdout, p.stderr

    def log(self):
        with open(os.path.join(self.state, "log", "agent.log")) as f:
            return f.read()


def test_e2e_volumes_info_empty(agent):
    assert agent.client("ManagedVolume", "volumes_info") == (0, "[]\n", "")


def test_e2e_detach_not_attached_is_true(agent):
    rc, out, err = agent.client("ManagedVolume", "detach_volume",
                                "vol_id=" + VOL_ID)
    assert (rc, out) == (0, "true\n"), err


def test_e2e_invalid_uuid(agent):
    rc, out, err = agent.client("ManagedVolume", "detach_volume",
                                "vol_id=../../etc")
    assert rc == 1
    assert err.startswith(
        "managedvolume-client: Command ManagedVolume.detach_volume with "
        "args {'vol_id': '../../etc'} failed:\n(code=-32602, "
        "message=Invalid parameter vol_id:")


def test_e2e_type_error_names_param(agent):
    rc, _, err = agent.client(
        "ManagedVolume", "attach_volume", "-f", "-",
        stdin=json.dumps({"vol_id": VOL_ID, "connection_info": {
            "driver_volume_type": "iscsi"}}))
    assert rc == 1
    assert ("(code=-32602, message=Invalid parameter connection_info.data:"
            " missing)") in err


def test_e2e_driver_type_not_allowed_and_flow_id_logged(agent):
    rc, _, err = agent.client(
        "--flow-id", "e2e-flow-930", "ManagedVolume", "attach_volume",
        "-f", "-", stdin=json.dumps({
            "vol_id": VOL_ID, "connection_info": {
                "driver_volume_type": "nfs",
                "data": {"auth_password": SECRET}}}))
    assert rc == 1
    assert "(code=930, message=Unsupported driver_volume_type 'nfs'" in err
    assert SECRET not in err
    log = agent.log()
    assert "[flow=e2e-flow-930]" in log
    assert SECRET not in log


def test_e2e_insecure_client_against_tls_agent_fails(agent):
    rc, _, err = agent.client("--insecure", "ManagedVolume", "volumes_info")
    assert rc == 1
    assert err.startswith("managedvolume-client:")


def test_e2e_foreign_ca_is_refused(agent, tmp_path):
    from vdsm_managedvolume import pki
    ca_key, ca_cert = pki.create_ca("foreign")
    key, cert = pki.create_cert(ca_key, ca_cert, "intruder", server=False)
    pki.write_key(str(tmp_path / "k.pem"), key)
    pki.write_cert(str(tmp_path / "c.pem"), cert)
    rc, _, err = agent.client("--cert", str(tmp_path / "c.pem"),
                              "--key", str(tmp_path / "k.pem"),
                              "ManagedVolume", "volumes_info")
    assert rc == 1


@pytest.mark.root
@pytest.mark.slow
def test_e2e_attach_info_detach_cycle(agent):
    connection = {"driver_volume_type": "iscsi", "data": dict(
        ISCSI_CONNECTION["data"], fake_dev_dir=agent.dev)}
    rc, out, err = agent.client(
        "--flow-id", "e2e-attach", "ManagedVolume", "attach_volume", "-f",
        "-", stdin=json.dumps({"vol_id": VOL_ID,
                               "connection_info": connection}))
    assert rc == 0, err
    info = json.loads(out)
    assert info["vol_id"] == VOL_ID
    assert info["path"].startswith(agent.dev + "/")

    rc, out, err = agent.client("ManagedVolume", "volumes_info")
    assert rc == 0, err
    [vol] = json.loads(out)
    assert vol["connection_info"]["data"]["auth_password"] == mask.MASK
    rc, out, err = agent.client("ManagedVolume", "volumes_info",
                                "include_secrets=true")
    assert rc == 1
    assert "(code=-32602, message=Invalid parameter include_secrets: " \
        "secrets are not sent over the API (read them on the host: " \
        "managedvolume-tool list --secrets; the host's [volumes] " \
        "remote_secrets allows it))" in err
    assert SECRET not in out + err

    rc, out, err = agent.client("ManagedVolume", "attach_volume", "-f", "-",
                                stdin=json.dumps({
                                    "vol_id": VOL_ID,
                                    "connection_info": connection}))
    assert rc == 1
    assert "(code=927," in err

    rc, out, err = agent.client("ManagedVolume", "detach_volume",
                                "vol_id=" + VOL_ID)
    assert (rc, out) == (0, "true\n"), err
    assert agent.client("ManagedVolume", "volumes_info")[1] == "[]\n"
    assert SECRET not in agent.log()


def test_e2e_get_capabilities(agent):
    rc, out, err = agent.client("Host", "getCapabilities")
    assert rc == 0, err
    caps = json.loads(out)
    assert caps["managedvolume"]["allowed_types"] == list(
        config.DEFAULT_ALLOWED_TYPES)


# Private helpers

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(proc, port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("agent exited {}: {}".format(
                proc.returncode, proc.stderr.read().decode()[-2000:]))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("agent did not listen on {}".format(port))


def test_version_names_the_program_and_package_version(capsys):
    from vdsm_managedvolume import __version__
    from vdsm_managedvolume import client
    with pytest.raises(SystemExit) as e:
        client.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == \
        "managedvolume-client " + __version__


def test_a_connection_closed_during_the_handshake_names_a_full_server():
    # The agent closes a newcomer at once when all its places are taken:
    # the hint must not send the admin to --insecure alone.
    import ssl
    from vdsm_managedvolume import client
    opts = argparse.Namespace(use_tls=True)
    for error in (ssl.SSLEOFError(8, "EOF occurred"),
                  ConnectionResetError(104, "reset")):
        assert "too many connections" in client._hint(opts, error)
    assert "--insecure" in client._hint(
        opts, ssl.SSLError(1, "CERTIFICATE_VERIFY_FAILED"))


def test_a_handshake_timeout_names_a_plain_tcp_server():
    # An agent that does not answer TLS clients on its plain port.
    import socket
    from vdsm_managedvolume import client
    opts = argparse.Namespace(use_tls=True)
    hint = client._hint(opts, socket.timeout(
        "_ssl.c:989: The handshake operation timed out"))
    assert "serve plain TCP (then use --insecure)" in hint
    assert client._hint(argparse.Namespace(use_tls=False), socket.timeout(
        "_ssl.c:989: The handshake operation timed out")) == ""


def test_the_stomp_client_never_sends_a_non_finite_number():
    # json.dumps would write the non-JSON word Infinity, refused by the
    # agent as -32700 naming a word the caller never wrote.
    sent = []
    c = stompclient.Client.__new__(stompclient.Client)
    c.reply_to = "r"
    c._send = lambda *args, **kwargs: sent.append(args)
    with pytest.raises(ValueError):
        c.call("ManagedVolume.volumes_info", {"x": float("inf")})
    assert sent == []
