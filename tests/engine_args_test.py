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


def _usage_error(argv, environ=None):
    from vdsm_managedvolume import errors
    from vdsm_managedvolume.engine import args
    with pytest.raises(errors.EngineUsage) as e:
        args.parse(argv, environ={} if environ is None else environ)
    return str(e.value)


def test_a_raw_at_in_the_db_urls_user_or_password_is_refused():
    # SQLAlchemy ends the password at the first '@': its errors printed
    # the rest ("could not translate host name "SECRET2@127.0.0.1"").
    from vdsm_managedvolume.engine import args
    for url in ("postgresql+psycopg2://engine:DB@SECRET2@127.0.0.1:1/ovirt",
                "postgresql://engine@corp@127.0.0.1/ovirt",
                "postgresql://engine:a/b@SECRET2@h/db"):
        message = _usage_error(["storage_stats", FILE_JSON, url, "c",
                                "true"])
        assert "percent-encode '@'" in message and "%40" in message
        assert "SECRET2" not in message
    # Percent-encoded, and SQLite paths (no user) holding '@', are fine.
    for url in ("postgresql+psycopg2://engine:DB%40SECRET2@127.0.0.1:1/ov",
                "sqlite:////var/lib/a@b/x@y.db"):
        _, request = args.parse(["storage_stats", FILE_JSON, url, "c",
                                 "true"], environ={})
        assert request.db_url.split("?")[0] == url


@pytest.mark.parametrize("url,query", [
    # The engine's URL: libpq's connect timeout and keepalives added.
    ("postgresql+psycopg2://engine:pw@db.example:5432/ovirt_cinderlib",
     "connect_timeout=10&keepalives=1&keepalives_idle=30&"
     "keepalives_interval=10&keepalives_count=3"),
    # What the URL sets is kept, the rest added after it.
    ("postgresql://engine@/ovirt?host=/run/postgresql&connect_timeout=3&"
     "keepalives_idle=5",
     "host=/run/postgresql&connect_timeout=3&keepalives_idle=5&"
     "keepalives=1&keepalives_interval=10&keepalives_count=3"),
    ("postgresql://h/db?connect_timeout=1&keepalives=0&keepalives_idle=1&"
     "keepalives_interval=1&keepalives_count=1",
     "connect_timeout=1&keepalives=0&keepalives_idle=1&"
     "keepalives_interval=1&keepalives_count=1"),
    # An '@' in the query string is not the end of a user part (with a
    # user, a second '@' is refused: DB_URL's check above).
    ("postgresql://h/db?sslrootcert=/etc/pki/a@b.pem",
     "sslrootcert=/etc/pki/a@b.pem&connect_timeout=10&keepalives=1&"
     "keepalives_idle=30&keepalives_interval=10&keepalives_count=3"),
    # Not psycopg2: its arguments would be unknown there.
    ("postgresql+pg8000://engine@h/db", None),
    ("sqlite:////var/lib/x.db", None),
])
def test_a_postgresql_url_gets_a_connect_timeout_and_keepalives(url,
                                                                 query):
    from vdsm_managedvolume.engine import args
    _, request = args.parse(["storage_stats", FILE_JSON, url, "c", "true"],
                            environ={})
    if query is None:
        assert request.db_url == url
    else:
        assert request.db_url == url.split("?")[0] + "?" + query


def test_a_missing_sub_command_never_echoes_the_driver_json():
    # The engine's argv without its sub-command starts with the driver
    # JSON: quoted masked, and at most QUOTE_MAX characters of it.
    from vdsm_managedvolume.engine import args
    driver = json.dumps({"volume_driver": FILE_DRIVER,
                         "san_password": SECRET, "x": "y" * 500})
    message = _usage_error([driver, "sqlite://", "c", new_id()])
    assert message.startswith("unknown sub-command '{")
    assert SECRET not in message
    assert len(message) < args.QUOTE_MAX + 300


@pytest.mark.parametrize("option", [["--log-level", "NOPE"],
                                    ["--log-level=verbose"]])
def test_a_log_level_that_is_no_level_is_a_usage_error(option):
    from vdsm_managedvolume.engine import args
    argv = ["storage_stats", FILE_JSON, "sqlite://", "c", "true"]
    assert "must be one of DEBUG, INFO" in _usage_error(option + argv)
    message = _usage_error(argv, {args.ENV_LOG_LEVEL: "NOPE"})
    assert message.startswith(args.ENV_LOG_LEVEL + " must be one of")
    for value, level in (("debug", "DEBUG"), ("Warning", "WARNING"),
                         ("", "INFO"), ("warn", "WARNING"),
                         ("FATAL", "CRITICAL"), ("NOTSET", "DEBUG")):
        opts, request = args.parse(["--log-level", value] + argv,
                                   environ={})
        assert opts.log_level == request.log_level == level


@pytest.mark.parametrize("cid", ["a\rb", "a\tb", "a\x00b", "\x1b[2J",
                                 "a\u2028b", "bad\udcffbytes", ""])
def test_a_correlation_id_must_be_printable_utf8(cid):
    # \r splits Java's readLine; a non-UTF-8 id (a surrogate escape from
    # argv's bytes) failed only when the answer was printed, after the
    # operation had run.
    message = _usage_error(["storage_stats", FILE_JSON, "sqlite://", cid,
                            "true"])
    assert message.startswith("invalid correlation id")
    message.encode("utf-8")


@pytest.mark.parametrize("cid", ["error-1", "flow 1", "fl\u00f6w-\u6d41"])
def test_printable_correlation_ids_are_taken_as_they_are(cid):
    from vdsm_managedvolume.engine import args
    _, request = args.parse(["storage_stats", FILE_JSON, "sqlite://", cid,
                             "true"], environ={})
    assert request.correlation_id == cid


@pytest.mark.parametrize("connector", [
    "{}", '{"host": ["a"]}', '{"host": ""}', '{"host": "  "}',
    '{"host": 5}', '{"host": null, "initiator": "iqn.x"}'])
def test_a_connector_needs_a_host_name(connector):
    # Each such connect made a connection no host name could end.
    message = _usage_error(["connect_volume", FILE_JSON, "sqlite://", "c",
                            new_id(), connector])
    assert message.startswith("connector_info has no host")
    message = _usage_error(["disconnect_volume", FILE_JSON, "sqlite://",
                            "c", new_id(), connector])
    assert message.startswith("connector has no host")


@pytest.mark.parametrize("conn_id", ['""', "5", "null", '["x"]'])
def test_a_connectors_connection_id_is_a_non_empty_string(conn_id):
    connector = '{{"host": "h", "connection_id": {}}}'.format(conn_id)
    message = _usage_error(["disconnect_volume", FILE_JSON, "sqlite://",
                            "c", new_id(), connector])
    assert message == "connector's connection_id must be a non-empty string"


@pytest.mark.parametrize("force", ['"true"', "1", "null"])
def test_a_connectors_force_is_a_boolean(force):
    # "true" as a string must not force: nothing is done instead.
    connector = '{{"host": "h", "force": {}}}'.format(force)
    message = _usage_error(["disconnect_volume", FILE_JSON, "sqlite://",
                            "c", new_id(), connector])
    assert message == "connector's force must be true or false"


def test_sizes_are_at_most_what_the_size_column_holds():
    from vdsm_managedvolume.engine import args
    for value in (str(2 ** 31), "99999999999999999999999", "9" * 5000,
                  "0" * 5000 + "3" * 11):
        message = _usage_error(["create_volume", FILE_JSON, "sqlite://",
                                "c", new_id(), value])
        assert message.startswith(
            "size must be at most 2147483647 GiB, got "), message
        assert len(message) < 150
    _, request = args.parse(["extend_volume", FILE_JSON, "sqlite://", "c",
                             new_id(), str(2 ** 31 - 1)], environ={})
    assert request.args["size"] == args.MAX_SIZE


@pytest.mark.parametrize("option", ["--timeout", "--host-timeout"])
def test_timeouts_have_an_upper_bound(option):
    # 1e10 s overflowed the wait (OverflowError: an internal error).
    from vdsm_managedvolume.engine import args
    argv = ["storage_stats", FILE_JSON, "sqlite://", "c", "true"]
    for value in ("1e10", "604801", "1e300"):
        message = _usage_error([option, value] + argv)
        assert message.startswith(
            "{} must be a positive number of seconds up to 604800".format(
                option)), message
    opts, request = args.parse([option, "604800"] + argv, environ={})
    assert 604800 in (request.timeout, request.hosts.get("timeout"))
    assert "up to 604800" in _usage_error(argv, {args.ENV_TIMEOUT: "1e10"})


def test_deeply_nested_json_arguments_are_usage_errors():
    # 10,000 levels was a RecursionError (internal error, exit 1); what
    # json reads but deeper than MAX_DEPTH would fail the recursive code
    # that masks and copies it.
    from vdsm_managedvolume.engine import args
    deep = "[" * 10000 + "]" * 10000
    fits = {"host": "h"}
    for _ in range(args.MAX_DEPTH - 1):
        fits = {"a": fits}
    too_deep = json.dumps({"host": "h", "x": [fits]})
    vol = new_id()
    for argv, name in [
            (["connect_volume", FILE_JSON, "sqlite://", "c", vol, deep],
             "connector_info"),
            (["connect_volume", FILE_JSON, "sqlite://", "c", vol, too_deep],
             "connector_info"),
            (["save_device", FILE_JSON, "sqlite://", "c", vol,
              '{"a": %s}' % deep], "device"),
            (["disconnect_volume", FILE_JSON, "sqlite://", "c", vol,
              '{"host": "h", "a": %s}' % deep], "connector"),
            (["storage_stats", '{"volume_driver": "x.Y", "a": %s}' % deep,
              "sqlite://", "c", "true"], "DRIVER_JSON")]:
        assert _usage_error(argv) == "{} is nested more than {} levels " \
                                     "deep".format(name, args.MAX_DEPTH)
    fits["host"] = "h"
    _, request = args.parse(["connect_volume", FILE_JSON, "sqlite://", "c",
                             vol, json.dumps(fits)], environ={})
    assert request.args["connector_info"] == fits
