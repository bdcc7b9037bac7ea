"""The schema YAML and its loader: format, verbs, params, type checks."""

import inspect

import pytest
import yaml

from vdsm_managedvolume import errors
from vdsm_managedvolume import schema

from tests.rpc_fixtures import BLANK_UUID, ISCSI_CONNECTION, VOL_ID

S = schema.load()


def test_schema_lines_fit_in_80_columns():
    with open(schema.SCHEMA_FILE) as f:
        long_lines = [(i, len(line)) for i, line in enumerate(f, 1)
                      if len(line.rstrip("\n")) > 80]
    assert long_lines == []


def test_schema_file_is_vdsm_format():
    with open(schema.SCHEMA_FILE) as f:
        data = yaml.safe_load(f)
    assert isinstance(data.pop("types"), dict)
    for name, spec in data.items():
        namespace, verb = name.split(".")
        assert {"added", "description"} <= set(spec), name
        for p in spec.get("params", ()):
            assert {"name", "type", "description"} <= set(p), (name, p)


def test_types_use_anchors_for_shared_types():
    with open(schema.SCHEMA_FILE) as f:
        text = f.read()
    assert "UUID: &UUID" in text
    assert "type: *UUID" in text
    # Resolved by the loader: a param's type is the UUID type itself.
    vol_id = S.method("ManagedVolume.attach_volume").params[0]
    assert vol_id.type is S.types["UUID"]
    assert vol_id.type_name == "UUID"


def test_verbs_are_the_contract_ones():
    assert sorted(S.methods) == [
        "Host.getCapabilities",
        "ManagedVolume.attach_volume",
        "ManagedVolume.detach_volume",
        "ManagedVolume.extend_volume",
        "ManagedVolume.volumes_info",
    ]


@pytest.mark.parametrize("name, params", [
    ("ManagedVolume.attach_volume", [
        ("vol_id", "UUID", True, None),
        ("connection_info", "ManagedVolumeConnection", True, None),
        ("sd_id", "UUID", False, BLANK_UUID)]),
    ("ManagedVolume.detach_volume", [
        ("vol_id", "UUID", True, None),
        ("sd_id", "UUID", False, BLANK_UUID)]),
    ("ManagedVolume.extend_volume", [
        ("vol_id", "UUID", True, None),
        ("sd_id", "UUID", False, BLANK_UUID),
        ("new_size", "long", False, None)]),
    ("ManagedVolume.volumes_info", [
        ("vol_ids", "[UUID]", False, []),
        ("include_secrets", "boolean", False, False)]),
    ("Host.getCapabilities", []),
])
def test_params_in_contract_order_with_defaults(name, params):
    method = S.method(name)
    assert [(p.name, p.type_name, p.required, p.default)
            for p in method.params] == params


def test_list_default_is_fresh_each_time():
    p = S.method("ManagedVolume.volumes_info").params[0]
    p.default.append("x")
    assert p.default == []


def test_error_codes_documented_match_errors_module():
    values = S.types["ManagedVolumeErrorCode"]["values"]
    classes = {}
    for cls in _error_classes():
        # The class that defines the code (StoreNotFound inherits 935).
        if 925 <= cls.code <= 935 and "code" in vars(cls):
            assert cls.code not in classes, "code defined twice"
            classes[cls.code] = cls
    assert sorted(values) == sorted(classes) == list(range(925, 936))
    for code, cls in classes.items():
        documented = values[code].split(" - ")[0]
        assert documented == "ManagedVolume" + cls.__name__.replace(
            "VolumeBusy", "Busy"), code


def test_namespaces_and_verbs_listing():
    assert S.namespaces() == ["Host", "ManagedVolume"]
    assert [m.verb for m in S.verbs("ManagedVolume")] == [
        "attach_volume", "detach_volume", "extend_volume", "volumes_info"]
    assert S.method("ManagedVolume.detach_volume").summary.startswith(
        "Detach a managed volume")


def test_unknown_method_is_method_not_found():
    with pytest.raises(errors.MethodNotFound) as e:
        S.method("ManagedVolume.nope")
    assert e.value.code == -32601
    assert "ManagedVolume.nope" in str(e.value)


# Binding params

def test_bind_named_fills_defaults():
    assert S.bind("ManagedVolume.detach_volume", {"vol_id": VOL_ID}) == {
        "vol_id": VOL_ID, "sd_id": BLANK_UUID}


def test_bind_positional_in_schema_order():
    bound = S.bind("ManagedVolume.attach_volume",
                   [VOL_ID, ISCSI_CONNECTION])
    assert list(bound) == ["vol_id", "connection_info", "sd_id"]
    assert bound["connection_info"] == ISCSI_CONNECTION
    assert bound["sd_id"] == BLANK_UUID


def test_bind_missing_params_means_no_params():
    assert S.args("ManagedVolume.volumes_info", None) == [[], False]
    assert S.args("Host.getCapabilities", {}) == []


def test_null_optional_param_takes_default():
    assert S.args("ManagedVolume.volumes_info",
                  {"vol_ids": None, "include_secrets": None}) == [[], False]


@pytest.mark.parametrize("params, name, reason", [
    ({}, "vol_id", "missing"),
    ({"vol_id": None}, "vol_id", "missing"),
    ({"vol_id": 42}, "vol_id", "expected UUID (string), got number"),
    ({"vol_id": VOL_ID, "sd_id": []}, "sd_id", "expected UUID"),
    ({"vol_id": VOL_ID, "force": True}, "force", "unknown parameter"),
])
def test_bind_invalid_params_names_the_param(params, name, reason):
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.detach_volume", params)
    assert e.value.code == -32602
    assert e.value.name == name
    assert reason in e.value.reason
    assert "Invalid parameter {}:".format(name) in str(e.value)


@pytest.mark.parametrize("connection_info, name", [
    ("iscsi", "connection_info"),
    ({"data": {}}, "connection_info.driver_volume_type"),
    ({"driver_volume_type": "iscsi"}, "connection_info.data"),
    ({"driver_volume_type": 3, "data": {}},
     "connection_info.driver_volume_type"),
    ({"driver_volume_type": "iscsi", "data": []}, "connection_info.data"),
    ({"driver_volume_type": "iscsi", "data": {}, "adapter": 1},
     "connection_info.adapter"),
])
def test_nested_type_errors_name_the_property(connection_info, name):
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.attach_volume",
               {"vol_id": VOL_ID, "connection_info": connection_info})
    assert e.value.name == name


def test_connection_data_accepts_any_json_values():
    S.bind("ManagedVolume.attach_volume", {
        "vol_id": VOL_ID, "connection_info": {
            "driver_volume_type": "rbd", "adapter": None, "extra": 1,
            "data": {"name": "pool/vol", "hosts": ["a"], "ports": [6789],
                     "auth_enabled": True, "keyring": None, "x": {}}}})


def test_list_items_are_checked_by_index():
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.volumes_info", {"vol_ids": [VOL_ID, 7]})
    assert e.value.name == "vol_ids[1]"
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.volumes_info", {"vol_ids": VOL_ID})
    assert e.value.name == "vol_ids"


def test_boolean_is_not_a_string_or_int():
    for value in ("true", 1):
        with pytest.raises(errors.InvalidParams) as e:
            S.bind("ManagedVolume.volumes_info", {"include_secrets": value})
        assert e.value.name == "include_secrets"


def test_too_many_positional_params():
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.detach_volume", [VOL_ID, BLANK_UUID, 1])
    assert e.value.name == "params"


def test_params_must_be_object_or_array():
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.detach_volume", "x")
    assert e.value.name == "params"


def test_type_error_messages_never_quote_the_value():
    with pytest.raises(errors.InvalidParams) as e:
        S.bind("ManagedVolume.attach_volume", {
            "vol_id": VOL_ID,
            "connection_info": {"driver_volume_type": ["secret-x"],
                                "data": {}}})
    assert "secret-x" not in str(e.value)


@pytest.mark.parametrize("type_, good, bad", [
    ("int", [0, -3], [1.5, True, "1"]),
    ("uint", [0, 7], [-1]),
    ("float", [1, 1.5], ["1.5", False]),
    ("string", ["", "x"], [1, None]),
    ({"type": "enum", "name": "E", "values": {"a": "", "b": ""}},
     ["a"], ["c"]),
    ({"type": "map", "name": "M", "key-type": "string",
      "value-type": "int"}, [{"a": 1}], [{"a": "x"}, []]),
    ({"type": "union", "name": "U", "values": [
        {"type": "object", "name": "A",
         "properties": [{"name": "a", "type": "int"}]},
        {"type": "object", "name": "B",
         "properties": [{"name": "b", "type": "string"}]}]},
     [{"a": 1}, {"b": "x"}], [{"a": "x"}, {"c": 1}]),
])
def test_type_kinds(type_, good, bad):
    for value in good:
        S.check(type_, value, "p")
    for value in bad:
        with pytest.raises(errors.InvalidParams):
            S.check(type_, value, "p")


def test_load_is_cached():
    assert schema.load() is schema.load()


# Private helpers

def _error_classes():
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, errors.Error)]


@pytest.mark.parametrize("value,depth", [
    (1, 0), ("x", 0), (None, 0), ([], 1), ({}, 1), ((), 1),
    ([1, {"a": (2, "b")}], 3),
    ({"a": [{"b": []}], "c": 1}, 4),
    ([[[]], 1, "x", {}], 3),
])
def test_too_deep_counts_the_levels_of_objects_and_arrays(value, depth):
    assert not schema.too_deep(value, depth)
    if depth:
        assert schema.too_deep(value, depth - 1)


def test_too_deep_walks_any_depth_without_recursion():
    value = []
    for _ in range(200000):
        value = [value, 1]
    assert schema.too_deep(value, 24)
    assert not schema.too_deep(value, 200001)


_VALUES = [None, True, False, 0, -1, 1.5, "", "x", VOL_ID, [], [VOL_ID],
           [VOL_ID, 3], ["x"], {}, {"a": 1}, {"driver_volume_type": "x"},
           {"driver_volume_type": "iscsi", "data": {}},
           {"driver_volume_type": "iscsi", "data": {"a": [1, {"b": None}]}},
           {"driver_volume_type": 3, "data": {}},
           {"driver_volume_type": "x", "data": []},
           {"driver_volume_type": "x", "data": {}, "adapter": "a"},
           {"driver_volume_type": "x", "data": {}, "adapter": 5},
           {"driver_volume_type": "x", "data": {}, "other": 1},
           ISCSI_CONNECTION]


def _types(schema_):
    seen = []
    for method in schema_.methods.values():
        seen.extend(p.type for p in method.params)
    seen.extend(schema_.types.values())
    return seen


@pytest.mark.parametrize("value", _VALUES)
def test_every_type_accepts_a_value_or_names_where_it_is_wrong(value):
    for type_ in _types(S):
        try:
            S.check(type_, value, "p")
        except errors.InvalidParams as e:
            assert e.name == "p" or e.name[1] in ".[", e.name
            assert e.reason
        except TypeError:
            # An enum (a dict of values) asked about an unhashable value:
            # bind raised it always.
            assert isinstance(value, (dict, list))


_NODE = {"type": "object", "name": "Node", "properties": [
    {"name": "value", "type": "int"}]}
_NODE["properties"].append({"name": "next", "type": _NODE,
                            "defaultvalue": None})


@pytest.mark.parametrize("type_, value, name, reason", [
    ("[[int]]", [[1], [2, "y"]], "p[1][1]", "expected int, got string"),
    ("[[int]]", [[1], 3], "p[1]", "expected [int], got number"),
    ({"type": "map", "name": "M", "value-type": [{"type": "map",
                                                  "value-type": "uint"}]},
     {"a": [{"k": 1}, {"k": -1}]}, "p.a[1].k", "expected uint, got number"),
    ({"type": "map", "name": "M", "key-type": "int"}, {"a": 1}, "p",
     "expected int, got string"),
    ({"type": "enum", "name": "E", "values": ["a", 1]}, "b", "p",
     "'b' is not one of a, 1"),
    ({"type": "union", "name": "U", "values": ["int", "boolean"]}, "x",
     "p", "matches none of U (expected int, got string)"),
    ({"type": "union", "name": "U", "values": []}, 1, "p",
     "matches none of U (no members)"),
    (_NODE, {"value": 1, "next": {"next": {}}}, "p.next.value", "missing"),
    (_NODE, {"value": 1, "next": {"value": 2, "x": 1}}, "p.next.x",
     "unknown property of Node (known: next, value)"),
])
def test_a_refused_value_is_named_by_its_path(type_, value, name, reason):
    if isinstance(type_, str):
        type_ = yaml.safe_load(type_)
    with pytest.raises(errors.InvalidParams) as e:
        S.check(type_, value, "p")
    assert (e.value.name, e.value.reason) == (name, reason)


@pytest.mark.parametrize("type_", [
    "nope", {"type": "weird"},
    {"type": "union", "values": ["int", "nope"]},
    {"type": "object", "properties": [{"name": "a", "type": "nope"}]},
])
def test_a_type_unknown_to_the_schema_is_an_internal_error(type_):
    with pytest.raises(errors.InternalError) as e:
        S.check(type_, {"a": "x"} if isinstance(type_, dict) else 1, "p")
    assert "schema: unknown type" in str(e.value)
    assert str(e.value).endswith(" of p.a" if "properties" in type_
                                 else " of p")


def test_each_type_is_compiled_once_not_for_every_request(monkeypatch):
    s = schema.load.__wrapped__()
    s.bind("ManagedVolume.attach_volume", {
        "vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})

    def refuse(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(s, "_compile", refuse)
    assert s.bind("ManagedVolume.attach_volume", {
        "vol_id": VOL_ID, "connection_info": ISCSI_CONNECTION})["vol_id"] \
        == VOL_ID
    with pytest.raises(errors.InvalidParams) as e:
        s.bind("ManagedVolume.attach_volume", {
            "vol_id": 5, "connection_info": ISCSI_CONNECTION})
    assert e.value.name == "vol_id"


def test_a_type_that_nests_itself_is_checked():
    node = {"type": "object", "name": "Node", "properties": [
        {"name": "value", "type": "int"}]}
    node["properties"].append({"name": "next", "type": node,
                               "defaultvalue": None})
    s = schema.Schema({"A.b": {"params": [{"name": "n", "type": node}]}})
    s.bind("A.b", {"n": {"value": 1, "next": {"value": 2}}})
    with pytest.raises(errors.InvalidParams) as e:
        s.bind("A.b", {"n": {"value": 1, "next": {"value": "x"}}})
    assert "n.next.value" in str(e.value)


def test_a_closed_object_refuses_an_unknown_key():
    closed = {"type": "object", "name": "Closed", "properties": [
        {"name": "a", "type": "int"}]}
    s = schema.Schema({"A.b": {"params": [{"name": "o", "type": closed}]}})
    assert s._checker(closed)({"a": 1}) is None
    assert s._checker(closed)({"a": 1, "x": 2}).path == ".x"
    with pytest.raises(errors.InvalidParams) as e:
        s.bind("A.b", {"o": {"a": 1, "x": 2}})
    assert "o.x" in str(e.value) and "unknown property" in str(e.value)
