import json

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import validate

UUID = "0d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"


def test_uuid_accepts_canonical_form_and_normalises_case():
    assert validate.uuid("vol_id", UUID) == UUID
    assert validate.uuid("vol_id", UUID.upper()) == UUID


@pytest.mark.parametrize("bad", [
    "../x",
    "../../etc/passwd",
    UUID + "/..",
    "{" + UUID + "}",
    "urn:uuid:" + UUID,
    UUID.replace("-", ""),
    UUID + "\n",
    "",
    UUID[:-1] + "g",
])
def test_uuid_rejects_anything_that_is_not_a_canonical_uuid(bad):
    with pytest.raises(errors.InvalidParams) as e:
        validate.uuid("vol_id", bad)
    assert e.value.name == "vol_id"
    assert e.value.code == -32602


@pytest.mark.parametrize("bad", [None, 42, b"x", [UUID]])
def test_uuid_rejects_non_strings(bad):
    with pytest.raises(errors.InvalidParams, match="vol_id"):
        validate.uuid("vol_id", bad)


def test_uuid_list_names_the_bad_item():
    assert validate.uuid_list("vol_ids", None) == []
    assert validate.uuid_list("vol_ids", (UUID.upper(),)) == [UUID]
    with pytest.raises(errors.InvalidParams) as e:
        validate.uuid_list("vol_ids", [UUID, "nope"])
    assert e.value.name == "vol_ids[1]"
    with pytest.raises(errors.InvalidParams):
        validate.uuid_list("vol_ids", UUID)


def test_connection_info_returns_a_json_normalised_copy():
    ci = {"driver_volume_type": "iscsi", "data": {"luns": (1, 2)},
          "adapter": None}
    out = validate.connection_info("connection_info", ci)
    assert out == {"driver_volume_type": "iscsi", "data": {"luns": [1, 2]}}
    assert out is not ci


@pytest.mark.parametrize("bad, name", [
    ([], "connection_info"),
    ({}, "connection_info.driver_volume_type"),
    ({"driver_volume_type": "", "data": {}},
     "connection_info.driver_volume_type"),
    ({"driver_volume_type": 3, "data": {}},
     "connection_info.driver_volume_type"),
    ({"driver_volume_type": "iscsi"}, "connection_info.data"),
    ({"driver_volume_type": "iscsi", "data": []}, "connection_info.data"),
    ({"driver_volume_type": "iscsi", "data": {}, "adapter": 1},
     "connection_info.adapter"),
    ({"driver_volume_type": "iscsi", "data": {}, "adapter": "../x"},
     "connection_info.adapter"),
    ({"driver_volume_type": "iscsi", "data": {"x": object()}},
     "connection_info.data.x"),
])
def test_connection_info_names_the_bad_field(bad, name):
    with pytest.raises(errors.InvalidParams) as e:
        validate.connection_info("connection_info", bad)
    assert e.value.name == name


def test_boolean_is_strict():
    assert validate.boolean("refresh", True) is True
    with pytest.raises(errors.InvalidParams, match="refresh"):
        validate.boolean("refresh", "yes")


def test_driver_type_not_allowed_is_930():
    ci = {"driver_volume_type": "nfs", "data": {}}
    with pytest.raises(errors.UnsupportedDriverType) as e:
        validate.driver_type(ci, ("iscsi", "rbd"))
    assert e.value.code == 930
    assert "nfs" in str(e.value)
    assert validate.driver_type({"driver_volume_type": "rbd"},
                                ("iscsi", "rbd")) == "rbd"


def test_bad_values_are_quoted_but_bounded():
    huge = "x" * 100000
    for call in (lambda: validate.uuid("vol_id", huge),
                 lambda: validate.adapter("connection_info.adapter", huge),
                 lambda: validate.connection_info(
                     "connection_info",
                     {"driver_volume_type": 7, "data": {}})):
        with pytest.raises(errors.InvalidParams) as e:
            call()
        assert len(str(e.value)) < 200
    with pytest.raises(errors.UnsupportedDriverType) as e:
        validate.driver_type({"driver_volume_type": huge, "data": {}},
                             ("iscsi",))
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("data, name, reason", [
    # What the privsep channel (msgpack) cannot carry: such a record
    # could be journaled but never connected nor disconnected.
    ({"target_iqn": "iqn\ud800"}, "connection_info.data.target_iqn",
     "lone UTF-16 surrogate"),
    ({"\udfff": 1}, "connection_info.data", "lone UTF-16 surrogate"),
    ({"luns": [1, 2 ** 64]}, "connection_info.data.luns[1]",
     "outside the signed 64-bit range"),
    ({"lun": -(2 ** 63) - 1}, "connection_info.data.lun",
     "outside the signed 64-bit range"),
    ({"x": {"y z": float("inf")}}, "connection_info.data.x['y z']",
     "not a finite number"),
    ({"device_path": "/dev/loop0\0"}, "connection_info.data.device_path",
     "NUL"),
])
def test_values_the_channel_cannot_carry_are_refused_naming_the_field(
        data, name, reason):
    ci = {"driver_volume_type": "iscsi", "data": data}
    with pytest.raises(errors.InvalidParams) as e:
        validate.connection_info("connection_info", ci)
    assert e.value.name == name
    assert reason in str(e.value)


def test_64_bit_integers_and_other_unicode_pass():
    data = {"lun": 2 ** 63 - 1, "min": -(2 ** 63), "name": "\u00e9\U0001f600"}
    ci = {"driver_volume_type": "iscsi", "data": data}
    assert validate.connection_info("connection_info", ci)["data"] == data


@pytest.mark.parametrize("path, reason", [
    (None, "expected a device path"),
    ("", "expected a device path"),
    ("dev/loop0", "not an absolute path"),
    ("/dev/../etc/shadow", "not a normalised path"),
    ("/dev//loop0", "not a normalised path"),
    ("//dev/loop0", "not a normalised path"),
    ("/dev/loop0/", "not a normalised path"),
    ("/dev/loop0\0x", "NUL"),
])
def test_device_path_must_be_absolute_normalised_text(path, reason):
    with pytest.raises(errors.InvalidParams) as e:
        validate.device_path("connection_info.data.device_path", path)
    assert e.value.name == "connection_info.data.device_path"
    assert reason in str(e.value)


def test_device_path_accepts_a_plain_absolute_path():
    assert validate.device_path("p", "/dev/drbd/by-res/r0/0") == \
        "/dev/drbd/by-res/r0/0"


def _padded(size):
    """An iscsi connection_info whose JSON is exactly ``size`` bytes."""
    ci = {"driver_volume_type": "iscsi", "data": {"pad": ""}}
    base = len(json.dumps(ci))
    ci["data"]["pad"] = "x" * (size - base)
    assert len(json.dumps(ci).encode()) == size
    return ci


def test_connection_info_is_bounded_in_size_as_json():
    limit = validate.MAX_CONNECTION_INFO
    assert validate.connection_info("connection_info", _padded(limit))
    with pytest.raises(errors.InvalidParams) as e:
        validate.connection_info("connection_info", _padded(limit + 1))
    assert e.value.name == "connection_info"
    assert str(limit + 1) in str(e.value)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("bad, name", [
    (float("nan"), "connection_info.data.target_lun"),
    (float("-inf"), "connection_info.data.target_lun"),
    ([1, float("nan")], "connection_info.data.target_lun[1]")])
def test_connection_info_refuses_nan_and_infinities(bad, name):
    ci = {"driver_volume_type": "iscsi", "data": {"target_lun": bad}}
    with pytest.raises(errors.InvalidParams) as e:
        validate.connection_info("connection_info", ci)
    assert e.value.name == name
    assert "not a finite number" in str(e.value)


@pytest.mark.parametrize("good", [
    "pool/image", "pool/namespace/image", "rbd-pool.1/volume-0d4b0fe1",
    "p:x/v@snap"])
def test_rbd_name_accepts_pool_image_and_pool_namespace_image(good):
    assert validate.rbd_name("connection_info.data.name", good) == good


@pytest.mark.parametrize("bad", [
    None, 7, "", "image", "pool/", "/image", "pool//image", "a/b/c/d",
    "pool/..", "../image", "pool/./image", "pool/im age", "pool/im\nage",
    "pool/image/"])
def test_rbd_name_is_checked_before_it_becomes_a_device_path(bad):
    # Applied to rbd's data.name by transports.rbd (transports_test).
    with pytest.raises(errors.InvalidParams) as e:
        validate.rbd_name("connection_info.data.name", bad)
    assert e.value.name == "connection_info.data.name"


def test_connection_info_leaves_the_fields_of_a_type_to_its_transport():
    ci = {"driver_volume_type": "iscsi", "data": {"name": "../x"}}
    assert validate.connection_info("connection_info", ci) == ci


@pytest.mark.parametrize("data, name", [
    ({"auth_password": 99999999999999999999999}, "data.auth_password"),
    ({"auth_password": -99999999999999999999999}, "data.auth_password"),
    ({"keyring": {"inner": 99999999999999999999999}}, "data.keyring[...]"),
    ({"keyring": {"AQBsecretkeyname==": 1e400}}, "data.keyring[...]"),
    ({"discovery_auth_password": [float("nan")]},
     "data.discovery_auth_password[0]"),
    # A secret a list names by the item before it, as mask hides it.
    ({"options": [["auth_password", 99999999999999999999999]]},
     "data.options[0][1]"),
    ({"argv": ["-n", "node.session.auth.password", "-v",
               99999999999999999999999]}, "data.argv[3]"),
])
def test_a_value_under_a_secret_key_is_never_shown_in_the_error(data, name):
    # The error reaches the caller and the log (which masked only the
    # word after "auth_password: ", leaving the number).
    with pytest.raises(errors.InvalidParams) as e:
        validate.connection_info(
            "connection_info", {"driver_volume_type": "iscsi", "data": data})
    reason = e.value.reason
    assert e.value.name == "connection_info." + name
    for shown in ("99999", "inf ", "nan", "AQBsecretkeyname"):
        assert shown not in reason
    assert "not shown" in reason


def test_a_valid_connection_info_makes_no_field_names(monkeypatch):
    # Names (connection_info.data.target_portals[1]...) are for errors:
    # a valid value, every attach's, is walked without making them.
    made = []
    real = validate._child
    monkeypatch.setattr(validate, "_child",
                        lambda path, key: made.append(key) or real(path, key))
    ci = {"driver_volume_type": "iscsi", "data": {
        "target_portals": ["10.0.0.1:3260", "10.0.0.2:3260"],
        "target_lun": 1, "auth_password": "s3cret",
        "nested": {"a": [{"b": None, "c": True, "d": 1.5}]}}}
    assert validate.connection_info("connection_info", ci) == ci
    assert made == []


@pytest.mark.parametrize("data, name", [
    ({"nested": {"a-b": [0, {"x y": "\0"}]}},
     "connection_info.data.nested.a-b[1]['x y']"),
    ({"list": [["k\ud800", 1]]}, "connection_info.data.list[0][0]"),
    # A bad key is named by the mapping holding it, hidden under a
    # secret's.
    ({"keyring": {"inner": {"k\0": 1}}}, "connection_info.data.keyring[...]"),
    ({"keyring": {"inner": {"k": [1e400]}}},
     "connection_info.data.keyring[...][...][0]"),
])
def test_a_bad_value_deep_inside_is_named_by_its_whole_path(data, name):
    with pytest.raises(errors.InvalidParams) as e:
        validate.connection_info(
            "connection_info", {"driver_volume_type": "iscsi", "data": data})
    assert e.value.name == name


def test_a_bad_value_nested_deeper_than_the_recursion_limit_is_named():
    import sys
    depth = sys.getrecursionlimit() + 100
    inner = value = {}
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    inner["b"] = float("inf")
    with pytest.raises(errors.InvalidParams) as e:
        validate.transportable("ci", value)
    assert e.value.name == "ci" + ".a" * depth + ".b"
