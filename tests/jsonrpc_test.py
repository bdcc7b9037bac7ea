"""JSON-RPC 2.0 dispatch: vdsm's answers, byte for byte where it matters."""

import json
import logging

import pytest

from vdsm_managedvolume import api
from vdsm_managedvolume import errors
from vdsm_managedvolume import jsonrpc
from vdsm_managedvolume import log as logmod
from vdsm_managedvolume import mask

from tests.rpc_fixtures import (
    BLANK_UUID, CONNECTOR_INFO, ISCSI_CONNECTION, SD_ID, SECRET, VOL_ID,
    VOL_ID2, FakeService)


def call(dispatcher, method, params=None, id="1", flow_id=None, wrap=True):
    request = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    data = json.dumps([request] if wrap else request).encode()
    return json.loads(dispatcher.handle(data, flow_id))


def test_one_element_array_gets_single_object(dispatcher):
    res = call(dispatcher, "ManagedVolume.detach_volume", {"vol_id": VOL_ID})
    assert res == {"jsonrpc": "2.0", "id": "1", "result": True}


def test_contract_detach_bytes(dispatcher):
    data = (b'[{"jsonrpc": "2.0", "method": "ManagedVolume.detach_volume", '
            b'"params": {"vol_id": "' + VOL_ID.encode() + b'"}, '
            b'"id": "4e2c4e4c-2d7b-4b8a-9a51-3b0c2b9e7f10"}]')
    assert dispatcher.handle(data, "myflow") == (
        b'{"jsonrpc": "2.0", "id": "4e2c4e4c-2d7b-4b8a-9a51-3b0c2b9e7f10", '
        b'"result": true}')


def test_single_object_request(dispatcher):
    res = call(dispatcher, "ManagedVolume.volumes_info", {}, wrap=False)
    assert res == {"jsonrpc": "2.0", "id": "1", "result": []}


def test_attach_named_params(dispatcher, fake_service):
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION,
                "sd_id": SD_ID})
    assert res["result"]["vol_id"] == VOL_ID
    assert res["result"]["managed_path"].endswith(SD_ID + "_" + VOL_ID)
    assert fake_service.calls == [
        ("attach_volume", VOL_ID, ISCSI_CONNECTION, SD_ID)]


def test_positional_params_in_schema_order(dispatcher, fake_service):
    call(dispatcher, "ManagedVolume.attach_volume",
         [VOL_ID, ISCSI_CONNECTION])
    call(dispatcher, "ManagedVolume.detach_volume", [VOL_ID, SD_ID])
    assert fake_service.calls == [
        ("attach_volume", VOL_ID, ISCSI_CONNECTION, BLANK_UUID),
        ("detach_volume", VOL_ID, SD_ID)]


def test_extend_positional_and_named_with_the_optional_new_size(
        dispatcher, fake_service):
    call(dispatcher, "ManagedVolume.attach_volume",
         [VOL_ID, ISCSI_CONNECTION])
    res = call(dispatcher, "ManagedVolume.extend_volume", [VOL_ID])
    assert res["result"]["size"] == 1024**3
    res = call(dispatcher, "ManagedVolume.extend_volume",
               {"vol_id": VOL_ID, "new_size": 2 * 1024**3})
    assert res["result"] == {"vol_id": VOL_ID, "size": 2 * 1024**3,
                             "path": "/dev/mapper/fake-" + VOL_ID[:8]}
    assert fake_service.calls[1:] == [
        ("extend_volume", VOL_ID, BLANK_UUID, None),
        ("extend_volume", VOL_ID, BLANK_UUID, 2 * 1024**3)]
    res = call(dispatcher, "ManagedVolume.extend_volume",
               {"vol_id": VOL_ID, "new_size": "2G"})
    assert res["error"]["code"] == -32602
    assert "new_size" in res["error"]["message"]


def test_params_may_be_omitted(dispatcher, fake_service):
    res = call(dispatcher, "ManagedVolume.volumes_info")
    assert res["result"] == []
    assert fake_service.calls == [("volumes_info", [], False)]


def test_volumes_info_masks_by_default_and_on_request_not(dispatcher):
    call(dispatcher, "ManagedVolume.attach_volume",
         {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    masked = call(dispatcher, "ManagedVolume.volumes_info", {})
    assert masked["result"][0]["connection_info"]["data"][
        "auth_password"] == mask.MASK
    clear = call(dispatcher, "ManagedVolume.volumes_info",
                 {"include_secrets": True})
    assert clear["result"][0]["connection_info"]["data"][
        "auth_password"] == SECRET


def test_get_capabilities(dispatcher):
    res = call(dispatcher, "Host.getCapabilities", {})
    assert res["result"]["connector_info"] == CONNECTOR_INFO
    assert "version" in res["result"]["managedvolume"]


def test_get_capabilities_without_os_brick(dispatcher, fake_service):
    fake_service.fail["connector_info"] = errors.NotSupported("no os_brick")
    res = call(dispatcher, "Host.getCapabilities")
    assert "connector_info" not in res["result"]


# Errors

def assert_error(res, code, id="1"):
    assert set(res) == {"jsonrpc", "id", "error"}
    assert res["id"] == id
    # vdsm's shape: code and message, never data.
    assert set(res["error"]) == {"code", "message"}
    assert res["error"]["code"] == code
    return res["error"]["message"]


@pytest.mark.parametrize("data", [b"", b"{", b"[{]", b"\xff\xfe\x00"])
def test_parse_error_has_null_id(dispatcher, data):
    assert_error(json.loads(dispatcher.handle(data)), -32700, id=None)


@pytest.mark.parametrize("message, id", [
    ([], None),
    (42, None),
    ("x", None),
    ([1], None),
    ({"jsonrpc": "1.0", "method": "Host.getCapabilities", "id": "a"}, "a"),
    ({"jsonrpc": "2.0", "method": 7, "id": "a"}, "a"),
    ({"jsonrpc": "2.0", "method": "Host.getCapabilities", "id": "a",
      "params": "x"}, "a"),
    ({"jsonrpc": "2.0", "method": "Host.getCapabilities", "id": {}}, None),
    ({"jsonrpc": "2.0", "method": "Host.getCapabilities", "id": True}, None),
])
def test_invalid_request(dispatcher, message, id):
    res = json.loads(dispatcher.handle(json.dumps(message).encode()))
    assert_error(res, -32600, id=id)


def test_invalid_request_without_id_is_answered(dispatcher):
    # A request we cannot trust is not a notification.
    res = dispatcher.handle(b'{"jsonrpc": "2.0", "method": 1}')
    assert_error(json.loads(res), -32600, id=None)


def test_method_not_found(dispatcher):
    msg = assert_error(call(dispatcher, "ManagedVolume.nope"), -32601)
    assert "ManagedVolume.nope" in msg
    assert_error(call(dispatcher, "nodot"), -32601)


@pytest.mark.parametrize("params, name", [
    ({}, "vol_id"),
    ({"vol_id": 1}, "vol_id"),
    ({"vol_id": VOL_ID, "bogus": 1}, "bogus"),
    ([VOL_ID, BLANK_UUID, 3], "params"),
])
def test_invalid_params_names_the_parameter(dispatcher, params, name):
    msg = assert_error(call(dispatcher, "ManagedVolume.detach_volume",
                            params), -32602)
    assert msg.startswith("Invalid parameter {}:".format(name))


def test_invalid_params_never_reach_the_service(dispatcher, fake_service):
    call(dispatcher, "ManagedVolume.attach_volume",
         {"vol_id": VOL_ID, "connection_info": {"data": {}}})
    assert fake_service.calls == []


def test_service_validation_error_is_invalid_params(dispatcher, fake_service):
    fake_service.fail["detach_volume"] = errors.InvalidParams(
        name="vol_id", reason="'x' is not a canonical UUID")
    msg = assert_error(call(dispatcher, "ManagedVolume.detach_volume",
                            {"vol_id": "x"}), -32602)
    assert msg == "Invalid parameter vol_id: 'x' is not a canonical UUID"


@pytest.mark.parametrize("error", [
    errors.NotSupported("no os_brick"),
    errors.HelperFailed("boom"),
    errors.AlreadyAttached(vol_id=VOL_ID, path="/dev/mapper/x"),
    errors.UnsupportedDevice(vol_id=VOL_ID, driver_volume_type="iscsi"),
    errors.ConnectionMismatch(vol_id=VOL_ID),
    errors.UnsupportedDriverType(driver_volume_type="nfs", allowed="iscsi"),
    errors.HelperTimeout(operation="connect", timeout=120),
    errors.VolumeBusy(vol_id=VOL_ID, timeout=60),
    errors.AgentBusy(workers=8, queued=64),
    errors.UnknownAdapter(adapter="x", group="g", installed="none"),
    errors.StoreError("disk full"),
])
def test_our_error_codes_pass_through(dispatcher, fake_service, error):
    fake_service.fail["attach_volume"] = error
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    assert assert_error(res, error.code) == str(error)


def test_internal_error_is_masked_and_has_no_traceback(dispatcher,
                                                       fake_service):
    fake_service.fail["attach_volume"] = RuntimeError(
        "auth_password='{}' leaked".format(SECRET))
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    msg = assert_error(res, -32603)
    assert SECRET not in msg
    assert "Traceback" not in msg
    assert "RuntimeError" in msg


def test_service_error_reaches_the_wire_masked_once(dispatcher, fake_service,
                                                   monkeypatch):
    fake_service.fail["attach_volume"] = errors.HelperFailed(
        "login failed with auth_password=" + SECRET)
    texts = []
    real = mask.mask_text

    def counting(text):
        if isinstance(text, str) and SECRET in text:
            texts.append(text)
        return real(text)

    monkeypatch.setattr(mask, "mask_text", counting)
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    msg = assert_error(res, errors.HelperFailed.code)
    assert SECRET not in msg and "login failed" in msg
    # The API layer masks it building its status; the log lines and the
    # JSON-RPC error only ever see that masked text.
    assert len(texts) == 1


def test_unserializable_result_is_internal_error(dispatcher, fake_service):
    fake_service.volumes_info = lambda *a: [{1, 2}]
    msg = assert_error(call(dispatcher, "ManagedVolume.volumes_info"),
                       -32603)
    assert "Traceback" not in msg


def test_bug_in_dispatch_is_internal_error(dispatcher, monkeypatch):
    def broken(*a):
        raise ValueError("password=" + SECRET)
    monkeypatch.setattr(dispatcher.schema, "args", broken)
    msg = assert_error(call(dispatcher, "ManagedVolume.volumes_info"),
                       -32603)
    assert SECRET not in msg


# Notifications and batches

def test_notification_gets_no_reply(dispatcher, fake_service):
    data = json.dumps([{"jsonrpc": "2.0", "method":
                        "ManagedVolume.detach_volume",
                        "params": {"vol_id": VOL_ID}}]).encode()
    assert dispatcher.handle(data) is None
    assert fake_service.calls == [("detach_volume", VOL_ID, BLANK_UUID)]


def test_failing_notification_gets_no_reply(dispatcher):
    data = b'{"jsonrpc": "2.0", "method": "ManagedVolume.nope"}'
    assert dispatcher.handle(data) is None


def test_batch_gets_array_without_notifications(dispatcher):
    batch = [
        {"jsonrpc": "2.0", "method": "ManagedVolume.volumes_info",
         "id": 1},
        {"jsonrpc": "2.0", "method": "ManagedVolume.detach_volume",
         "params": {"vol_id": VOL_ID}},
        {"jsonrpc": "2.0", "method": "ManagedVolume.nope", "id": 3},
        5,
    ]
    res = json.loads(dispatcher.handle(json.dumps(batch).encode()))
    assert isinstance(res, list)
    assert res[0] == {"jsonrpc": "2.0", "id": 1, "result": []}
    assert_error(res[1], -32601, id=3)
    assert_error(res[2], -32600, id=None)
    assert len(res) == 3


def test_batch_of_notifications_gets_no_reply(dispatcher):
    batch = [{"jsonrpc": "2.0", "method": "ManagedVolume.volumes_info"}] * 2
    assert dispatcher.handle(json.dumps(batch).encode()) is None


def test_null_id_is_answered(dispatcher):
    res = call(dispatcher, "ManagedVolume.volumes_info", id=None)
    assert res == {"jsonrpc": "2.0", "id": None, "result": []}


# Logging

@pytest.fixture
def logged(caplog):
    handler_filter = logmod.ContextFilter()
    caplog.handler.addFilter(handler_filter)
    with caplog.at_level(logging.DEBUG):
        yield caplog
    caplog.handler.removeFilter(handler_filter)


def test_every_call_logged_with_flow_id(dispatcher, logged):
    call(dispatcher, "ManagedVolume.attach_volume",
         {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION},
         flow_id="flow-123")
    call(dispatcher, "ManagedVolume.nope", flow_id="flow-456")
    ours = [r for r in logged.records
            if r.name.startswith("managedvolume.")]
    assert ours
    by_flow = {r.flow_id for r in ours}
    assert by_flow == {"flow-123", "flow-456"}
    text = "\n".join(r.getMessage() for r in ours)
    assert "RPC call ManagedVolume.attach_volume succeeded" in text
    assert "RPC call ManagedVolume.nope failed (error -32601)" in text


def run_calls_with_secrets(dispatcher, fake_service):
    fake_service.fail["attach_volume"] = errors.HelperFailed(
        "login failed with auth_password=" + SECRET)
    call(dispatcher, "ManagedVolume.attach_volume",
         {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    fake_service.fail.clear()
    call(dispatcher, "ManagedVolume.attach_volume",
         {"vol_id": VOL_ID2, "connection_info": ISCSI_CONNECTION})
    call(dispatcher, "ManagedVolume.volumes_info", {"include_secrets": True})


def test_secrets_never_logged(dispatcher, fake_service, logged):
    run_calls_with_secrets(dispatcher, fake_service)
    assert logged.records
    for r in logged.records:
        assert SECRET not in r.getMessage()


def test_secrets_never_logged_without_log_filter(dispatcher, fake_service,
                                                 caplog):
    # Inside vdsm our records reach vdsm's handlers, which do not have our
    # filter: the messages must be masked at the source.
    with caplog.at_level(logging.DEBUG):
        run_calls_with_secrets(dispatcher, fake_service)
    assert caplog.records
    for r in caplog.records:
        assert SECRET not in r.getMessage()


def test_dispatchers_do_not_share_services():
    a, b = FakeService(), FakeService()
    da, db = jsonrpc.Dispatcher(a), jsonrpc.Dispatcher(b)
    call(da, "ManagedVolume.detach_volume", {"vol_id": VOL_ID})
    call(db, "ManagedVolume.detach_volume", {"vol_id": VOL_ID2})
    assert a.calls == [("detach_volume", VOL_ID, BLANK_UUID)]
    assert b.calls == [("detach_volume", VOL_ID2, BLANK_UUID)]


def test_id_too_large_for_a_double_is_invalid_request(dispatcher):
    # 1e400 parses as infinity, which no response can carry back.
    res = dispatcher.handle(b'{"jsonrpc": "2.0", "method": '
                            b'"Host.getCapabilities", "id": 1e400}')
    msg = assert_error(json.loads(res), -32600, id=None)
    assert "id" in msg and "finite" in msg


def test_wire_values_cannot_forge_log_lines(dispatcher, logged):
    # The method name goes to the log as the client sent it: a newline,
    # a CR, a NUL or a bidi override must not start or disguise a line.
    method = "Host.x\nINFO forged line\r\x00\u202eevil"
    call(dispatcher, method, flow_id="flow\nforged")
    lines = [logged.handler.format(r) for r in logged.records]
    text = "\n".join(lines)
    assert "\nINFO forged" not in text
    assert "\r" not in text and "\x00" not in text
    assert "\u202e" not in text
    assert "Host.x\\nINFO forged line\\r\\x00\\u202eevil" in text
    assert all("flow_forged" == r.flow_id for r in logged.records
               if r.name.startswith("managedvolume."))


@pytest.mark.parametrize("body, operation", [
    (b'[{"jsonrpc": "2.0", "method": "ManagedVolume.attach_volume"}]', True),
    (b'{"method": "ManagedVolume.detach_volume", "id": 1}', True),
    (b'{"method": "ManagedVolume.extend_volume", "id": 1}', True),
    # JSON may spell the letters of a method name as \u escapes.
    (b'{"method": "ManagedVolume.\\u0061ttach_volume", "id": 1}', True),
    (b'{"method": "Host.getCapabilities", "id": 1}', False),
    (b'{"method": "ManagedVolume.volumes_info", "id": 1}', False),
    (b'not json at all', False),
])
def test_is_operation_never_misses_an_operation(body, operation):
    assert jsonrpc.is_operation(body) is operation
    if operation:
        message = jsonrpc.parse(body)
        request = message[0] if isinstance(message, list) else message
        assert request["method"] in api.OPERATIONS


# Refusing without running (the agent's 933)

@pytest.mark.parametrize("body,expected", [
    ('[{"jsonrpc": "2.0", "method": "m", "id": "a"}]',
     {"jsonrpc": "2.0", "id": "a", "error": {"code": 933, "message": "M"}}),
    ('{"jsonrpc": "2.0", "method": "m", "id": 7}',
     {"jsonrpc": "2.0", "id": 7, "error": {"code": 933, "message": "M"}}),
    ('[{"jsonrpc": "2.0", "method": "m", "id": "a"}, '
     '{"jsonrpc": "2.0", "method": "n"}, '
     '{"jsonrpc": "2.0", "method": "m", "id": "b"}]',
     [{"jsonrpc": "2.0", "id": "a", "error": {"code": 933, "message": "M"}},
      {"jsonrpc": "2.0", "id": "b", "error": {"code": 933, "message": "M"}}]),
    ('{"jsonrpc": "2.0", "method": "m"}', None),
    ("{oops", {"jsonrpc": "2.0", "id": None,
               "error": {"code": 933, "message": "M"}}),
])
def test_refuse_answers_every_request_id(body, expected):
    class Busy(errors.AgentBusy):
        msg = "M"
    data = jsonrpc.refuse(body.encode(), Busy())
    assert (json.loads(data) if data else None) == expected
    # The bytes on the wire: one JSON text, as the agent has always sent.
    if expected is not None:
        assert data == json.dumps(expected).encode()


class _Busy(errors.AgentBusy):
    msg = "M"


_REFUSED_WHOLE = {"jsonrpc": "2.0", "id": None,
                  "error": {"code": 933, "message": "M"}}


@pytest.mark.parametrize("body", [
    b"[]",
    json.dumps([{"jsonrpc": "2.0", "method": "m", "id": i}
                for i in range(jsonrpc.MAX_BATCH + 1)]).encode(),
    # What ``handle`` refuses to parse is refused whole, not read for ids
    # another way: UTF-16.
    '{"jsonrpc": "2.0", "method": "m", "id": 1}'.encode("utf-16"),
], ids=["empty", "over-max-batch", "utf-16"])
def test_refuse_answers_a_message_handle_refuses_whole_with_one_error(
        dispatcher, body):
    # One error with a null id, never one per entry: refuse runs in the
    # agent's I/O thread while the pools are full.
    assert json.loads(jsonrpc.refuse(body, _Busy())) == _REFUSED_WHOLE
    answer = json.loads(dispatcher.handle(body))
    assert answer["id"] is None and answer["error"]["code"] in (-32600,
                                                                -32700)


def test_refuse_reads_the_ids_of_a_message_nested_too_deeply_to_run(
        monkeypatch):
    # Refusing runs nothing: the ids are read without walking the
    # nesting (the I/O thread's work while the pools are full).
    def no_walk(value, limit):
        raise AssertionError("refuse walked the message")
    monkeypatch.setattr(jsonrpc.schema_module, "too_deep", no_walk)
    body = (b'{"jsonrpc": "2.0", "method": "m", "id": 1, "params": ' +
            b"[" * (jsonrpc.MAX_DEPTH + 1) + b"]" * (jsonrpc.MAX_DEPTH + 1) +
            b"}")
    assert json.loads(jsonrpc.refuse(body, _Busy())) == dict(
        _REFUSED_WHOLE, id=1)


def test_refuse_answers_the_ids_handle_answers(dispatcher):
    batch = [{"jsonrpc": "2.0", "method": "Host.getCapabilities", "id": 1},
             {"jsonrpc": "2.0", "method": "Host.getCapabilities"},
             {"jsonrpc": "2.0", "method": "No.such", "id": "x"}]
    for message in (batch, batch[:1], batch[0], batch[1]):
        body = json.dumps(message).encode()
        handled, refused = dispatcher.handle(body), jsonrpc.refuse(
            body, _Busy())
        if handled is None:
            assert refused is None
            continue
        handled, refused = json.loads(handled), json.loads(refused)
        assert type(handled) is type(refused)
        ids = [r["id"] for r in (handled if isinstance(handled, list)
                                 else [handled])]
        assert ids == [r["id"] for r in (
            refused if isinstance(refused, list) else [refused])]


@pytest.mark.parametrize("message", [
    42,
    [42],
    [42, "x", None, {"jsonrpc": "2.0", "method": "m", "id": 1}],
    [{"id": "a"}, {"method": "n"}, {"jsonrpc": "2.0", "id": [1]},
     {"jsonrpc": "2.0", "method": 3, "id": "b"},
     {"jsonrpc": "2.0", "method": "m", "params": 1, "id": "c"},
     {"jsonrpc": "1.0", "method": "m"},
     {"jsonrpc": "2.0", "method": "Host.getCapabilities", "id": 2}],
], ids=["lone-number", "batch-of-a-number", "non-objects", "invalid"])
def test_refuse_gives_invalid_requests_the_error_handle_gives(
        dispatcher, message):
    # A busy agent answers what is not a valid request as handle does
    # (-32600, a null id when the id cannot be trusted), and refuses the
    # valid requests with an id.
    body = json.dumps(message).encode()
    handled = json.loads(dispatcher.handle(body))
    refused = json.loads(jsonrpc.refuse(body, _Busy()))
    if not isinstance(handled, list):
        handled, refused = [handled], [refused]
    assert len(refused) == len(handled)
    for h, r in zip(handled, refused):
        assert r["id"] == h["id"]
        if "error" in h and h["error"]["code"] == -32600:
            assert r == h
        else:
            assert r == dict(_REFUSED_WHOLE, id=h["id"])


@pytest.mark.parametrize("body", [b"{oops", b"[]", b"[1]", b"42"])
def test_errors_about_unknown_ids_are_told_apart(dispatcher, body):
    assert jsonrpc.is_unknown_id_error(dispatcher.handle(body))


def test_errors_and_results_of_known_ids_are_not_unknown_id_errors(
        dispatcher):
    ok = dispatcher.handle(json.dumps(
        {"jsonrpc": "2.0", "method": "Host.getCapabilities", "id": "1"}))
    bad = dispatcher.handle(json.dumps(
        {"jsonrpc": "2.0", "method": "No.such", "id": "1"}))
    assert b'"result"' in ok and b'"error"' in bad
    assert not jsonrpc.is_unknown_id_error(ok)
    assert not jsonrpc.is_unknown_id_error(bad)


def test_params_are_walked_for_their_depth_once_per_request(
        dispatcher, fake_service, monkeypatch):
    # schema.bind bounds each param's nesting; the API class it calls
    # does not walk them again (vdsm's own path does: security_test).
    walked = []
    real = jsonrpc.schema_module.check_depth

    def counting(name, value, *args):
        walked.append(name)
        return real(name, value, *args)

    monkeypatch.setattr(jsonrpc.schema_module, "check_depth", counting)
    nested = dict(ISCSI_CONNECTION, data=dict(
        ISCSI_CONNECTION["data"],
        deep=json.loads("[" * 20 + "]" * 20)))     # more brackets than 24
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": nested})
    assert res["result"]["vol_id"] == VOL_ID
    assert sorted(walked) == ["connection_info", "vol_id"]


def test_a_message_with_few_brackets_is_not_walked_for_its_depth(
        dispatcher, fake_service, monkeypatch):
    # It cannot nest deeper than it has brackets.
    def no_walk(*args):
        raise AssertionError("walked")

    monkeypatch.setattr(jsonrpc.schema_module, "too_deep", no_walk)
    monkeypatch.setattr(jsonrpc.schema_module, "check_depth", no_walk)
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    assert res["result"]["vol_id"] == VOL_ID


@pytest.mark.parametrize("wrap", [True, False])
def test_a_param_one_level_too_deep_is_refused_however_few_its_brackets(
        dispatcher, fake_service, wrap):
    limit = jsonrpc.schema_module.MAX_PARAM_DEPTH
    deep = json.loads("[" * (limit + 1) + "]" * (limit + 1))
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": dict(
                   ISCSI_CONNECTION, data={"x": deep})}, wrap=wrap)
    assert res["error"]["code"] in (-32600, -32602)
    assert "nested deeper than" in res["error"]["message"]
    assert fake_service.calls == []


def test_a_result_is_masked_on_its_json_only_when_it_may_show_a_secret(
        dispatcher, fake_service, monkeypatch):
    walked = []
    real = mask.mask

    def counted(obj, _depth=0):
        if _depth == 0:
            walked.append(obj)
        return real(obj, _depth)

    monkeypatch.setattr(mask, "mask", counted)
    res = call(dispatcher, "ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})
    assert res["result"]["vol_id"] == VOL_ID
    assert walked == []     # encoded once: nothing in it to hide

    real_attach = fake_service.attach_volume

    def leaky(*args):
        info = real_attach(*args)
        info["attachment"]["auth_password"] = SECRET
        return info

    monkeypatch.setattr(fake_service, "attach_volume", leaky)
    data = json.dumps([{"jsonrpc": "2.0", "id": "2", "params": {
        "vol_id": VOL_ID2, "connection_info": ISCSI_CONNECTION},
        "method": "ManagedVolume.attach_volume"}]).encode()
    text = dispatcher.handle(data, None)
    assert SECRET.encode() not in text
    assert json.loads(text)["result"]["attachment"]["auth_password"] == \
        mask.MASK
    assert len(walked) == 1
