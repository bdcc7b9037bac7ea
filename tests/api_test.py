"""The vdsm-convention API classes, the return-key table, caps, register."""

import inspect
import sys
import logging
import types

import pytest

from vdsm_managedvolume import __version__
from vdsm_managedvolume import api
from vdsm_managedvolume import errors
from vdsm_managedvolume import log
from vdsm_managedvolume import mask
from vdsm_managedvolume import schema

from tests.rpc_fixtures import (
    BLANK_UUID, CONNECTOR_INFO, ISCSI_CONNECTION, SD_ID, SECRET, VOL_ID,
    FakeService)

S = schema.load()


@pytest.fixture
def service():
    svc = FakeService()
    with api.using(svc):
        yield svc


@pytest.mark.parametrize("name", sorted(S.methods))
def test_api_signatures_match_schema(name):
    method = S.method(name)
    cls = api.NAMESPACES[method.namespace]
    sig = inspect.signature(getattr(cls, method.verb))
    params = list(sig.parameters.values())[1:]  # self
    assert [p.name for p in params] == method.param_names
    for p, sp in zip(params, method.params):
        if sp.required:
            assert p.default is inspect.Parameter.empty, p.name
        else:
            # vdsm passes the schema default; ours must agree with it.
            default = p.default
            if isinstance(default, tuple):
                default = list(default)
            assert default == sp.default, p.name


def test_every_api_method_is_in_the_schema():
    for namespace, cls in api.NAMESPACES.items():
        for verb, _ in inspect.getmembers(cls, inspect.isfunction):
            if not verb.startswith("_"):
                S.method("{}.{}".format(namespace, verb))


def test_classes_take_ctor_args():
    for cls in api.NAMESPACES.values():
        assert cls.ctorArgs == []
        cls(*cls.ctorArgs)


def test_return_key_table():
    assert api.RETURN_KEYS["ManagedVolume_attach_volume"] == "result"
    assert api.RETURN_KEYS["ManagedVolume_volumes_info"] == "result"
    assert api.RETURN_KEYS["ManagedVolume_extend_volume"] == "result"
    assert "ManagedVolume_detach_volume" not in api.RETURN_KEYS
    assert api.command_info() == {
        "ManagedVolume_attach_volume": {"ret": "result"},
        "ManagedVolume_extend_volume": {"ret": "result"},
        "ManagedVolume_volumes_info": {"ret": "result"},
    }


def test_attach_returns_vdsm_response(service):
    res = api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION, SD_ID)
    assert res["status"] == {"code": 0, "message": "Done"}
    assert res["result"]["vol_id"] == VOL_ID
    assert service.calls == [
        ("attach_volume", VOL_ID, ISCSI_CONNECTION, SD_ID)]


def test_detach_returns_status_only(service):
    res = api.ManagedVolume().detach_volume(VOL_ID)
    assert res == {"status": {"code": 0, "message": "Done"}}
    assert service.calls == [("detach_volume", VOL_ID, BLANK_UUID)]


def test_extend_returns_result_with_size(service):
    api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION, SD_ID)
    res = api.ManagedVolume().extend_volume(VOL_ID, SD_ID, 2 * 1024**3)
    assert res["status"] == {"code": 0, "message": "Done"}
    assert res["result"] == {"vol_id": VOL_ID,
                             "path": "/dev/mapper/fake-" + VOL_ID[:8],
                             "size": 2 * 1024**3}
    assert service.calls[-1] == ("extend_volume", VOL_ID, SD_ID,
                                 2 * 1024**3)


def test_extend_of_unknown_volume_is_invalid_vol_id(service):
    res = api.ManagedVolume().extend_volume(VOL_ID)
    assert res["status"]["code"] == -32602
    assert "vol_id" in res["status"]["message"]
    assert "not attached on this host" in res["status"]["message"]
    assert service.calls == [("extend_volume", VOL_ID, BLANK_UUID, None)]


def test_service_error_becomes_status(service):
    service.fail["attach_volume"] = errors.UnsupportedDriverType(
        driver_volume_type="nfs", allowed="iscsi")
    res = api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    assert res == {"status": {"code": 930, "message": str(
        service.fail["attach_volume"])}}
    assert "result" not in res


def test_error_message_is_masked(service):
    service.fail["attach_volume"] = errors.HelperFailed(
        "iscsiadm failed: auth_password={}".format(SECRET))
    res = api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    assert res["status"]["code"] == 926
    assert SECRET not in res["status"]["message"]
    assert mask.MASK in res["status"]["message"]


def test_unexpected_exception_is_masked_internal_error(service, caplog):
    service.fail["detach_volume"] = KeyError("password=" + SECRET)
    with caplog.at_level(logging.ERROR, logger="managedvolume.api"):
        res = api.ManagedVolume().detach_volume(VOL_ID)
    status = res["status"]
    assert status["code"] == -32603
    assert "KeyError" in status["message"]
    assert SECRET not in status["message"]
    assert "Traceback" not in status["message"]
    # The traceback is for the log.
    assert any(r.exc_info for r in caplog.records)


def test_volumes_info_masks_secrets_by_default(service):
    api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    res = api.ManagedVolume().volumes_info()
    assert res["status"]["code"] == 0
    [info] = res["result"]
    assert info["connection_info"]["data"]["auth_password"] == mask.MASK
    assert service.calls[-1] == ("volumes_info", [], False)


def test_volumes_info_include_secrets(service):
    api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    res = api.ManagedVolume().volumes_info([VOL_ID], True)
    [info] = res["result"]
    assert info["connection_info"]["data"]["auth_password"] == SECRET
    assert service.calls[-1] == ("volumes_info", [VOL_ID], True)


def test_results_are_masked(service):
    # Whatever the service returns, secrets do not leave in a result.
    service.attach_volume = lambda *a: {"vol_id": VOL_ID, "path": "/dev/x",
                                        "attachment": {"keyring": SECRET},
                                        "managed_path": "/run/x"}
    res = api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    assert res["result"]["attachment"]["keyring"] == mask.MASK


def test_call_log_masks_params(service, caplog):
    with caplog.at_level(logging.DEBUG, logger="managedvolume.api"):
        api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "START ManagedVolume.attach_volume" in text
    assert "FINISH ManagedVolume.attach_volume ok" in text
    assert VOL_ID in text
    assert SECRET not in text


def finish_lines(caplog):
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("FINISH ")]


def test_finish_lines_name_what_attach_and_detach_did(service, caplog):
    # As vdsm's FINISH return=: at INFO, where the device is and what a
    # detach found (the service says it at DEBUG only).
    service.detach_volume = lambda vol_id, sd_id: {
        "vol_id": vol_id, "path": "/dev/mapper/fake", "was": "attached"}
    with caplog.at_level(logging.INFO, logger="managedvolume.api"):
        res = api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
        det = api.ManagedVolume().detach_volume(VOL_ID)
    assert det == {"status": api.DONE}
    attached, detached = finish_lines(caplog)
    assert attached.startswith(
        "FINISH ManagedVolume.attach_volume ok vol_id={} path={} "
        "managed_path={} (".format(VOL_ID, res["result"]["path"],
                                   res["result"]["managed_path"]))
    assert detached.startswith(
        "FINISH ManagedVolume.detach_volume ok vol_id={} "
        "path=/dev/mapper/fake was=attached (".format(VOL_ID))


def test_finish_line_of_a_detach_of_nothing_says_so(service, caplog):
    service.detach_volume = lambda vol_id, sd_id: {
        "vol_id": vol_id, "path": None, "was": None}
    with caplog.at_level(logging.INFO, logger="managedvolume.api"):
        api.ManagedVolume().detach_volume(VOL_ID)
    line, = finish_lines(caplog)
    assert line.startswith("FINISH ManagedVolume.detach_volume ok "
                           "vol_id={} not attached (".format(VOL_ID))


def test_finish_line_of_an_outcome_it_cannot_read_says_ok(service, caplog):
    service.detach_volume = lambda vol_id, sd_id: None
    service.attach_volume = lambda *a: "odd"
    with caplog.at_level(logging.INFO, logger="managedvolume.api"):
        api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
        api.ManagedVolume().detach_volume(VOL_ID)
    assert [line.split(" (")[0] for line in finish_lines(caplog)] == [
        "FINISH ManagedVolume.attach_volume ok",
        "FINISH ManagedVolume.detach_volume ok"]


def test_finish_line_masks_what_it_shows(caplog):
    # The outcome reaches the line unmasked when the dispatcher masks
    # the result later (mask_later), and inside vdsm no filter of ours
    # is on the handlers (none here either): the line masks it itself.
    svc = FakeService()
    svc.attach_volume = lambda *a: {
        "vol_id": VOL_ID, "path": "/dev/x?auth_password=" + SECRET,
        "attachment": {"keyring": SECRET},
        "managed_path": "/run/x@user:" + SECRET + "@host"}
    svc.detach_volume = lambda *a: {
        "vol_id": VOL_ID, "path": "/dev/x?auth_password=" + SECRET,
        "was": "attached"}
    with caplog.at_level(logging.INFO, logger="managedvolume.api"), \
            api.using(svc, checked=True, mask_later=True) as bound:
        res = api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
        api.ManagedVolume().detach_volume(VOL_ID)
    assert bound.unmasked and res["result"]["attachment"]["keyring"] == SECRET
    attached, detached = finish_lines(caplog)
    assert attached.startswith(
        "FINISH ManagedVolume.attach_volume ok vol_id={} "
        "path=/dev/x?auth_password=".format(VOL_ID))
    assert detached.startswith(
        "FINISH ManagedVolume.detach_volume ok vol_id={} "
        "path=/dev/x?auth_password=".format(VOL_ID))
    assert SECRET not in caplog.text


def test_start_line_masks_connection_info_once_and_only_when_written(
        service, monkeypatch, caplog):
    calls = []
    real = mask.mask

    def counting(obj, _depth=0):
        if obj is ISCSI_CONNECTION:
            calls.append(obj)
        return real(obj, _depth)

    monkeypatch.setattr(mask, "mask", counting)
    with caplog.at_level(logging.WARNING, logger="managedvolume.api"):
        api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    assert calls == []
    with caplog.at_level(logging.INFO, logger="managedvolume.api"):
        api.ManagedVolume().attach_volume(VOL_ID, ISCSI_CONNECTION)
    assert len(calls) == 1
    [start] = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("START ")]
    assert start.startswith(
        "START ManagedVolume.attach_volume(vol_id='{}', ".format(VOL_ID))
    assert "'auth_password': '{}'".format(mask.MASK) in start
    assert SECRET not in start


def test_get_caps_has_connector_info_and_self(service):
    res = api.Host().getCapabilities()
    assert res["status"]["code"] == 0
    assert res["info"] == {
        "connector_info": CONNECTOR_INFO,
        "managedvolume": {"version": __version__,
                          "allowed_types": list(service.cfg.allowed_types)},
    }


@pytest.mark.parametrize("error", [
    errors.NotSupported("No module named 'os_brick'"),
    errors.HelperTimeout(operation="connector_properties", timeout=30),
])
def test_get_caps_without_connector_info_is_not_an_error(service, error):
    service.fail["caps"] = error
    caps = api.get_caps(service)
    assert "connector_info" not in caps
    assert caps["managedvolume"]["version"] == __version__


def test_get_caps_when_service_reports_none(service):
    service.fail["connector_info"] = errors.NotSupported("no os_brick")
    assert "connector_info" not in api.get_caps(service)


def test_injected_service_is_used_without_binding():
    svc = FakeService()
    api.set_service(svc)
    try:
        api.ManagedVolume().detach_volume(VOL_ID)
    finally:
        api.set_service(None)
    assert svc.calls == [("detach_volume", VOL_ID, BLANK_UUID)]


def test_register_imports_the_whole_client_but_not_os_brick():
    # vdsm registers the verbs at its start: an upgrade after it must not
    # mix the old api with the new service at the first verb.
    import json
    import subprocess
    script = """
import json, sys, types
from vdsm_managedvolume import api
def missing():
    return [m for m in api.CLIENT_MODULES
            if "vdsm_managedvolume." + m not in sys.modules]
before = missing()
api.register(types.SimpleNamespace())
print(json.dumps([before, missing(), "os_brick" in sys.modules]))
"""
    before, after, os_brick = json.loads(subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        check=True).stdout)
    assert "service" in before and "privileged" in before
    assert after == []
    assert os_brick is False


def test_register_into_vdsm_modules():
    """What the bootstrap does inside vdsm, against stand-ins of vdsm's
    API module, Bridge module and Schema instance."""
    vdsm_api = types.SimpleNamespace(ManagedVolume=object, Global=object)
    bridge = types.SimpleNamespace(command_info={
        "Host_getCapabilities": {"ret": "info"}})
    vdsm_schema = types.SimpleNamespace(
        _types={"UUID": {"type": "alias"}, "VmParams": {}},
        _methods={"Host.getCapabilities": {"vdsm": True},
                  "ManagedVolume.attach_volume": {"old": True}})

    api.register(vdsm_api, bridge, vdsm_schema)

    assert vdsm_api.ManagedVolume is api.ManagedVolume
    assert vdsm_api.Global is object
    assert bridge.command_info["ManagedVolume_attach_volume"] == {
        "ret": "result"}
    assert bridge.command_info["Host_getCapabilities"] == {"ret": "info"}
    assert "ManagedVolume_detach_volume" not in bridge.command_info
    # vdsm's own getCapabilities stays; ours replace the ManagedVolume ones.
    assert vdsm_schema._methods["Host.getCapabilities"] == {"vdsm": True}
    attach = vdsm_schema._methods["ManagedVolume.attach_volume"]
    assert [p["name"] for p in attach["params"]] == [
        "vol_id", "connection_info", "sd_id"]
    info = vdsm_schema._methods["ManagedVolume.volumes_info"]
    # vdsm's spelling of a list default, resolved by vdsm's DEFAULT_VALUES.
    assert info["params"][0]["defaultvalue"] == "[]"
    assert "VmParams" in vdsm_schema._types
    assert "ManagedVolumeConnection" in vdsm_schema._types


# vdsm's side, with a stand-in vdsm package: what the sitecustomize of the
# systemd drop-in does, then a call dispatched the way vdsm's Bridge does.

FAKE_VDSM = {
    "vdsm/__init__.py": "",
    "vdsm/API.py": '''
class APIBase:
    ctorArgs = []
    def __init__(self, *args):
        pass

class ManagedVolume(APIBase):
    def attach_volume(self, vol_id, connection_info):
        return {"status": {"code": 0, "message": "Done"}, "result": "vdsm"}
''',
    "vdsm/api/__init__.py": "",
    "vdsm/api/vdsmapi.py": '''
DEFAULT_VALUES = {"{}": {}, "()": (), "[]": []}

class Schema:
    def __init__(self):
        self._types = {"UUID": {"type": "alias", "sourcetype": "string"}}
        self._methods = {
            "Host.getCapabilities": {"vdsm": True},
            "ManagedVolume.attach_volume": {"params": [
                {"name": "vol_id"}, {"name": "connection_info"}]},
        }

    def get_args(self, name):
        return self._methods[name].get("params", [])

    def get_arg_names(self, name):
        return [a["name"] for a in self.get_args(name)]

    def get_default_arg_names(self, name):
        return frozenset(a["name"] for a in self.get_args(name)
                         if "defaultvalue" in a)

    def get_default_arg_values(self, name):
        return [DEFAULT_VALUES.get(a["defaultvalue"], a["defaultvalue"])
                for a in self.get_args(name) if "defaultvalue" in a]
''',
    "vdsm/rpc/__init__.py": "",
    "vdsm/rpc/Bridge.py": '''
from vdsm import API
from vdsm.api import vdsmapi

command_info = {"Host_getCapabilities": {"ret": "info"}}


class DynamicBridge:
    def __init__(self):
        self._schema = vdsmapi.Schema()

    def call(self, className, methodName, argobj):
        # vdsm's _dynamicMethod, reduced to what matters here.
        name = className + "." + methodName
        default_args = self._schema.get_default_arg_names(name)
        default_values = self._schema.get_default_arg_values(name)
        args = ()
        for arg in self._schema.get_arg_names(name):
            if arg in default_args:
                if arg in argobj:
                    args += (argobj[arg],)
                else:
                    args += (default_values[0],)
                default_values = default_values[1:]
            elif arg in argobj:
                args += (argobj[arg],)
        api = getattr(API, className)(*())
        result = getattr(api, methodName)(*args)
        if result["status"]["code"]:
            raise RuntimeError(result["status"])
        cmd = className + "_" + methodName
        ret = command_info.get(cmd, {}).get("ret")
        return None if ret is None else result[ret]
''',
}


@pytest.fixture
def fake_vdsm(tmp_path, monkeypatch):
    for path, text in FAKE_VDSM.items():
        f = tmp_path / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_meta_path = list(sys.meta_path)
    yield
    sys.meta_path[:] = saved_meta_path
    for name in list(sys.modules):
        if name == "vdsm" or name.startswith("vdsm."):
            del sys.modules[name]


def test_vdsm_hook_registers_when_bridge_is_built(fake_vdsm):
    api.install_vdsm_hook()
    api.install_vdsm_hook()  # idempotent
    import vdsm.API
    from vdsm.rpc import Bridge

    assert vdsm.API.ManagedVolume is not api.ManagedVolume  # lazy
    bridge = Bridge.DynamicBridge()
    assert vdsm.API.ManagedVolume is api.ManagedVolume
    assert Bridge.command_info["ManagedVolume_volumes_info"] == {
        "ret": "result"}
    assert bridge._schema._methods["Host.getCapabilities"] == {"vdsm": True}

    svc = FakeService()
    with api.using(svc):
        info = bridge.call("ManagedVolume", "attach_volume", {
            "vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
        assert info["vol_id"] == VOL_ID
        assert bridge.call("ManagedVolume", "detach_volume",
                           {"vol_id": VOL_ID}) is None
        assert bridge.call("ManagedVolume", "volumes_info", {}) == []
    assert svc.calls == [
        ("attach_volume", VOL_ID, ISCSI_CONNECTION, BLANK_UUID),
        ("detach_volume", VOL_ID, BLANK_UUID),
        ("volumes_info", [], False)]


def test_vdsm_starts_even_if_registration_fails(fake_vdsm, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("broken package")
    monkeypatch.setattr(api, "register", broken)
    api.install_vdsm_hook()
    from vdsm.rpc import Bridge
    bridge = Bridge.DynamicBridge()
    assert "Host.getCapabilities" in bridge._schema._methods


_LONG = "x" * (mask.MAX_LOGGED_ARG - 20)


@pytest.mark.parametrize("value", [
    {"driver_volume_type": "local", "data": {"device_path": "/dev/loop7"}},
    ISCSI_CONNECTION,
    {"driver_volume_type": "rbd", "data": {"keyring": ["a", "b"]}},
    {"driver_volume_type": "x", "data": {"url": "iscsi://u:s3cret@h/x"}},
    ["auth_password", "s3cret"],
    ["-n", "node.session.auth.password", "-v", "s3cret"],
    # A password whose marker (the "@") comes after the cut.
    {"d": {"a": _LONG + " admin:s3cret" + "y" * 40 + "@10.0.0.1"}},
    {"d": {"ſecret": "plain", "k": "AQ" + "B" * 36 + "=="}},
    {"d": [1, 2.5, True, None, "tab\there", "\u202e"]},
])
def test_start_line_of_a_json_request_shows_what_masking_shows(value):
    args = {"vol_id": VOL_ID, "connection_info": value}
    assert str(api._Args(args, json=True)) == str(api._Args(args))
    assert "s3cret" not in str(api._Args(args, json=True))


@pytest.mark.parametrize("value", [
    {"driver_volume_type": "local", "data": {"device_path": "/dev/loop7"}},
    ISCSI_CONNECTION,
    {"driver_volume_type": "x", "data": {"url": "iscsi://u:s3cret@h/x"}},
    ["auth_password", "s3cret"],
    {"d": {"a": _LONG + " admin:s3cret" + "y" * 40 + "@10.0.0.1"}},
    {"d": {"a": "y" * (mask.MAX_LOGGED_ARG + 1)}},
    {"d": {"ſecret": "plain", "k": "AQ" + "B" * 36 + "=="}},
    {"d": [1, 2.5, True, None, "tab\there", "\u202e"]},
])
def test_start_line_made_whole_is_the_one_args_shows_or_none(value):
    # A line made whole (one scan) is what _Args's line would be,
    # written as it is; anything to mask, escape or cut is left to it.
    args = {"vol_id": VOL_ID, "connection_info": value, "sd_id": SD_ID}
    line = api._start_line("ManagedVolume.attach_volume", args)
    shown = "START ManagedVolume.attach_volume({})".format(
        api._Args(args, json=True))
    if line is None:
        assert log.clean_line(shown) is None or any(
            len(repr(v)) > mask.MAX_LOGGED_ARG for v in args.values())
    else:
        assert type(line) is log.Line and line == shown
    if value is ISCSI_CONNECTION or "s3cret" in repr(value):
        assert line is None


def test_start_line_of_a_local_attach_is_made_whole():
    args = {"vol_id": VOL_ID, "connection_info": {
        "driver_volume_type": "local", "data": {"device_path": "/dev/x"}},
        "sd_id": SD_ID}
    assert api._start_line("ManagedVolume.attach_volume", args) == (
        "START ManagedVolume.attach_volume(vol_id='{}', connection_info="
        "{{'driver_volume_type': 'local', 'data': {{'device_path': "
        "'/dev/x'}}}}, sd_id='{}')".format(VOL_ID, SD_ID))


_EDGES = [True, False, None, 0, -1, 2.5, float("nan"), float("inf"),
          float("-inf"), "", "x", "it's", 'say "hi"', {}, [], {"a": 1},
          ["b"], "secre", "toke", "passw", "auth", "ke", "A", "one_ti",
          "crede", "Q", "ey", "word", "ret", "en", "ntial", "_pass", "y"]


def test_two_reprs_side_by_side_hold_no_marker_neither_holds():
    # _start_line's one scan of the line stands for _Args's scan of the
    # reprs joined without separators (and the line's).
    for a in _EDGES:
        for b in _EDGES:
            ra, rb = repr(a), repr(b)
            assert mask.plainly_clean(ra + rb) == (
                mask.plainly_clean(ra) and mask.plainly_clean(rb)), (ra, rb)


def test_finish_line_made_whole_only_of_plain_clean_values():
    text = "FINISH %s ok vol_id=%s path=%s (%.3f s)"
    line = api._finish_line(text, ("X.y", VOL_ID, "/dev/loop0", 0.0012))
    assert type(line) is log.Line
    assert line == "FINISH X.y ok vol_id={} path=/dev/loop0 (0.001 s)".format(
        VOL_ID)
    assert api._finish_line(text, ("X.y", VOL_ID, None, 1.0)) == (
        "FINISH X.y ok vol_id={} path=None (1.000 s)".format(VOL_ID))
    for odd in ("/dev/x?auth_password=s3cret", "/dev/\x1b", b"/dev/x",
                ["/dev/x"]):
        assert api._finish_line(text, ("X.y", VOL_ID, odd, 1.0)) is None


def test_start_line_of_a_plain_json_request_masks_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("masked")

    monkeypatch.setattr(mask, "mask", refuse)
    monkeypatch.setattr(mask, "mask_params", refuse)
    args = {"vol_id": VOL_ID, "connection_info": {
        "driver_volume_type": "local", "data": {"device_path": "/dev/x"}}}
    assert str(api._Args(args, json=True)) == (
        "vol_id='{}', connection_info={{'driver_volume_type': 'local', "
        "'data': {{'device_path': '/dev/x'}}}}".format(VOL_ID))


def test_a_finish_line_that_cannot_be_formatted_goes_the_old_way():
    # (A value whose formatting raises: logging's own handling decides,
    # as before the one-scan line, instead of the call failing.)
    assert api._finish_line("FINISH %s ok n=%d (%.3f s)",
                            ("attach_volume", "not a number", 0.1)) is None
