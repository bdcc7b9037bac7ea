"""The command line as ovirt-engine passes it, parsed
(``vdsm_managedvolume/engine/args.py``): Java's boolean strings, ids that
must be UUIDs, sizes in whole GiB, secrets kept out of reprs.  What the
whole process prints is engine_client_test.py's.
"""

import json

import pytest

from vdsm_managedvolume.engine.args import FILE_DRIVER

from .engine_fixtures import new_id

SECRET = "s3cr3t-Backend-pw"
# A driver JSON as args.parse requires it (the class is only named here).
FILE_JSON = json.dumps({"volume_driver": FILE_DRIVER})


@pytest.mark.parametrize("value,expected", [
    ("true", True), ("True", True), ("false", False), ("FALSE", False),
    ("1", True), ("0", False)])
def test_refresh_parses_javas_boolean_strings(value, expected):
    from vdsm_managedvolume.engine import args
    _, request = args.parse(["storage_stats", FILE_JSON, "sqlite://", "c",
                             value], environ={})
    assert request.args["refresh"] is expected


def test_request_repr_and_secrets_hide_passwords():
    from vdsm_managedvolume.engine import args
    _, request = args.parse(
        ["connect_volume", json.dumps({"volume_driver": "x.Driver",
                                       "san_password": SECRET,
                                       "nested": {"chap_secret": "x" * 8}}),
         "postgresql+psycopg2://u:p%40ss%3Aword@h/db", "c", new_id(),
         '{"host": "h"}'], environ={})
    text = repr(request)
    assert SECRET not in text and "p%40ss" not in text
    assert request.secrets() == sorted([SECRET, "p@ss:word", "x" * 8],
                                       key=len, reverse=True)


@pytest.mark.parametrize("argv,message", [
    (["create_volume", "not-a-uuid", "1"],
     "volume_id must be a UUID, got 'not-a-uuid'"),
    (["delete_volume", "../etc"], "volume_id must be a UUID, got '../etc'"),
    (["clone_volume", "VOL", "x" * 200],
     "cloned_vol_id must be a UUID, got '{}'...".format("x" * 80)),
    (["remove_snapshot", "snap", "VOL"],
     "snapshot_id must be a UUID, got 'snap'"),
    (["create_volume_from_snapshot", "VOL", ""],
     "snapshot_id must be a UUID, got ''"),
    # Forms uuid.UUID() would take: one volume under several names.
    (["delete_volume", "{12345678-1234-1234-1234-123456789abc}"],
     "volume_id must be a UUID"),
    (["delete_volume", "12345678123412341234123456789abc"],
     "volume_id must be a UUID"),
    (["delete_volume", "12345678-1234-1234-1234-123456789abc\n"],
     "volume_id must be a UUID"),
])
def test_volume_and_snapshot_ids_must_be_uuids(argv, message):
    from vdsm_managedvolume import errors
    from vdsm_managedvolume.engine import args
    argv = [a.replace("VOL", new_id()) for a in argv]
    with pytest.raises(errors.EngineUsage) as e:
        args.parse([argv[0], FILE_JSON, "sqlite://", "c"] + argv[1:],
                   environ={})
    # Exact where the whole message is given; quoting at most 80
    # characters of the value, on one line.
    assert str(e.value).startswith(message)
    assert len(str(e.value)) < 130 and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [
    "0", "-1", "1.5", "+1", " 1", "1_0", "\u0661", "ten", "", "1e3"])
def test_sizes_must_be_positive_whole_numbers_of_gib(value):
    from vdsm_managedvolume import errors
    from vdsm_managedvolume.engine import args
    with pytest.raises(errors.EngineUsage) as e:
        args.parse(["extend_volume", FILE_JSON, "sqlite://", "c", new_id(),
                    value], environ={})
    assert str(e.value) == "size must be a positive whole number of GiB, " \
                           "got {!r}".format(value)
    _, request = args.parse(["create_volume_from_snapshot", FILE_JSON,
                             "sqlite://", "c", new_id(), new_id(), "3"],
                            environ={})
    assert request.args["size"] == 3
