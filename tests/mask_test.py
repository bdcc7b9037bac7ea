import json
import logging
import pprint

import pytest

from vdsm_managedvolume import log
from vdsm_managedvolume import mask

CONN = {
    "driver_volume_type": "iscsi",
    "data": {
        "target_iqn": "iqn.2026-11.org.example:vol",
        "auth_method": "CHAP",
        "auth_username": "chapuser",
        "auth_password": "chap-secret-1",
        "discovery_auth_password": "disc-secret-2",
        "keyring": "[client.admin]\n\tkey = AQBsecret3==",
    },
}
SECRETS = ("chap-secret-1", "disc-secret-2", "AQBsecret3==")


def test_mask_hides_credentials_keeps_the_rest():
    masked = mask.mask(CONN)
    text = repr(masked)
    for s in SECRETS:
        assert s not in text
    assert masked["data"]["auth_username"] == "chapuser"
    assert masked["data"]["auth_method"] == "CHAP"
    assert CONN["data"]["auth_password"] == "chap-secret-1"  # not mutated


def test_mask_text_handles_reprs_urls_and_key_value():
    text = mask.mask_text(
        repr(CONN) + " password=hunter2 postgresql://u:dbpw@127.0.0.1/db")
    for s in SECRETS + ("hunter2", "dbpw"):
        assert s not in text
    assert "chapuser" in text


def test_log_lines_carry_flow_id_and_never_secrets(log_lines):
    logger, records = log_lines
    with log.flow("flow-42"):
        logger.info("attaching %s", CONN)
        logger.info("raw %r", CONN["data"])
        try:
            raise RuntimeError("iscsiadm failed: password=%s" %
                               CONN["data"]["auth_password"])
        except RuntimeError:
            logger.exception("connect failed")
    assert records and all("flow=flow-42" in r for r in records)
    for r in records:
        for s in SECRETS:
            assert s not in r


SECRET = "Zq9-s3cr3t"

# Every shape in which a credential meets its name in free text: reprs,
# JSON (also inside a JSON string), URLs, os-brick's iscsiadm command lines
# (processutils logs them at DEBUG and quotes them in errors), Ceph
# keyrings.
LEAKY_TEXTS = [
    "auth_password=" + SECRET,
    "auth_password = " + SECRET,
    "'auth_password': '%s'" % SECRET,
    '"auth_password" : "%s"' % SECRET,
    "b'auth_password': b'%s'" % SECRET,
    json.dumps(json.dumps({"auth_password": SECRET})),
    "{'auth_password': 'it\\'s-%s'}" % SECRET,
    "PASSWORD: " + SECRET,
    "san_password=%s, san_login=admin" % SECRET,
    "{'auth_key': '%s'}" % SECRET,
    "dhchap_secret=" + SECRET,
    "X-Auth-Token: " + SECRET,
    'ServerPassword="%s"' % SECRET,
    "https://host/api?password%3D" + SECRET,
    "%22auth_password%22%3A%22" + SECRET + "%22",
    "iscsiadm -m node -T iqn.x -p 192.0.2.1:3260 --op update "
    "-n node.session.auth.password -v " + SECRET,
    "iscsiadm -m discoverydb -t sendtargets --op update "
    "-n discovery.sendtargets.auth.password -v " + SECRET,
    "iscsiadm ('--op', 'update', '-n', 'node.session.auth.password', "
    "'-v', '%s'): stdout= stderr=" % SECRET,
    '["-n", "node.session.auth.password_in", "-v", "%s"]' % SECRET,
    "-n node.session.auth.password --value=" + SECRET,
    "node.session.auth.password_in = " + SECRET,
    "postgresql://engine:%s@db.example/engine" % SECRET,
    "auth_password='" + SECRET,     # a message cut after the opening quote
    # A (key, value) pair's repr in free text (mask() masks the pair
    # itself): a tuple, dict.items(), a list, bytes, pprint's line break.
    "('auth_password', '%s')" % SECRET,
    "items: [('lun', 1), ('auth_password', '%s')]" % SECRET,
    '["discovery_auth_password", "%s"]' % SECRET,
    "(b'auth_password', b'%s')" % SECRET,
    "('auth_password',\n '%s')" % SECRET,
    # pprint aligns a pair's value under its key, however deep it is.
    pprint.pformat({"connection_info": {"data": {"items": [
        ("auth_password", "x" * 60 + SECRET)]}}}, width=60),
    "('auth_password', B'%s')" % SECRET,
    "( 'auth_password', '%s')" % SECRET,
    "[('auth_password', '%s'),\n ('lun', 1)]" % SECRET,
    "('auth_password', '%s'" % SECRET,      # a message cut after the pair
    json.dumps(json.dumps({"items": [["auth_password", SECRET], ["lun", 1]]})),
    # user:password@host without a scheme, alone or in a message.
    "admin:%s@10.0.0.1:3260" % SECRET,
    "login to chap.user-1:%s@[fe80::1]:3260 failed" % SECRET,
    "portal='admin:%s@san.example'" % SECRET,
    "target=admin:pa:%s@host" % SECRET,
    # An object's repr as the value: a call, or <...>.
    "password=SecretStr('%s')" % SECRET,
    "('auth_password', SecretStr('%s'))" % SECRET,
    "('auth_password', creds.Password(\n    '%s'))" % SECRET,
    "{'password': <Secret value='%s'>, 'lun': 1}" % SECRET,
    "('auth_password', <Secret %s>)" % SECRET,
    "password=<Secret %s> (a < b)" % SECRET,
    # cinder options marked secret=True without any other secret word.
    "zadara_access_key=" + SECRET,
    '{"synology_one_time_pass": "%s"}' % SECRET,
    "'ACCESS_KEY': '%s'" % SECRET,
]

class Secret:
    """A value whose repr quotes it, as a call (as a dataclass's does)
    or in <...>."""

    def __init__(self, value, angle=False):
        self.value = value
        self.angle = angle

    def __repr__(self):
        form = "<Secret {!r}>" if self.angle else "Secret({!r})"
        return form.format(self.value)


# What mask() masks in a pair that is no string: a number, a list, an
# object.
PAIRS_OF_OTHER_VALUES = [
    ("auth_password", 12345678),
    ("extra_passwords", ["pw-one", "pw-two"]),
    ("auth_password", Secret("pw-one")),
    ("auth_password", Secret("pw-one", angle=True)),
]


@pytest.mark.parametrize("text", LEAKY_TEXTS)
def test_mask_text_hides_the_secret_in_every_known_shape(text):
    masked = mask.mask_text(text)
    assert SECRET not in masked
    assert mask.MASK in masked


# A Ceph secret: 16 bytes of header and key, base64, 40 characters.
CEPH_KEY = "AQBsgnVjAAAAABAA" + "k" * 22 + "=="


@pytest.mark.parametrize("text", [
    "[client.admin]\n\tkey = " + CEPH_KEY + "\n",
    "rbd map failed: --key " + CEPH_KEY,
    "[client.admin]\n\tkey = AQBshortkey==",
])
def test_mask_text_hides_ceph_keys_wherever_they_appear(text):
    masked = mask.mask_text(text)
    assert CEPH_KEY not in masked and "AQBshortkey" not in masked


@pytest.mark.parametrize("text", [
    "auth_username=chapuser auth_method=CHAP target_iqn=iqn.x",
    "Invalid parameter include_secrets: expected boolean, got number",
    "include_secrets=True",
    "rbd: secret_type=ceph secret_uuid=b0e8d3a6-2c4f-4d2e-9d3b-6f1a2c3d4e5f",
    "{'secret_type': 'ceph', 'secret_uuid': 'b0e8d3a6'}",
    "target_portal=192.0.2.1:3260 target_lun=1",
    "auth_password=",
    "('auth_username', 'chapuser')",
    "('lun', 1)",
    "wrong password, 'retrying'",
    "password, 'x'",
    # A quoted name opening a sequence of more than two items is no pair
    # (mask() masks only a pair's value), nor is a pair with no value.
    "('token', 'a', 'b')",
    "argv: ['password-reset', '--user', 'admin']",
    "[\"password-reset\",\n \"--user\", \"admin\"]",
    "os.environ.get('PGPASSWORD', '')",
    "('token', None)",
    json.dumps(json.dumps(["password-reset", "--user", "admin"])),
    # No user:password@host: a time, no password, an e-mail address,
    # git's scp-like address, a user name starting with a digit.
    "meet at 12:30@noon",
    "git@github.com:org/repo.git",
    "mail admin@example.org: 3 errors",
    "10.0.0.1:3260@tcp",
])
def test_mask_text_keeps_what_is_no_secret(text):
    assert mask.mask_text(text) == text


@pytest.mark.parametrize("pair", PAIRS_OF_OTHER_VALUES)
def test_mask_text_masks_what_mask_masks_in_a_pair(pair):
    assert mask.mask(pair)[1] == mask.MASK
    masked = mask.mask_text(repr(pair))
    assert masked == "({!r}, {})".format(pair[0], mask.MASK)


def test_mask_keeps_the_key_and_quotes_around_the_masked_value():
    assert mask.mask_text("'auth_password': 'x1'") == \
        "'auth_password': '********'"
    assert mask.mask_text("-n node.session.auth.password -v x1") == \
        "-n node.session.auth.password -v ********"
    assert mask.mask_text("('auth_password', 'x1')") == \
        "('auth_password', '********')"
    assert mask.mask_text("('auth_password', B'x1')") == \
        "('auth_password', B'********')"


def test_log_file_is_created_0640(tmp_path):
    path = tmp_path / "agent.log"
    handler = log.ReopenableFileHandler(str(path))
    try:
        handler.emit(logging.makeLogRecord({"msg": "hello", "flow_id": "-"}))
        handler.reopen()
    finally:
        handler.close()
    assert (path.stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("text, kept", [
    # os-brick's trace at DEBUG prints its arguments' repr.
    ("{'extra_passwords': ['pw-one', 'pw-two'], 'lun': 1}", ", 'lun': 1}"),
    ('{"extra_passwords": ["pw-one", "pw-two"], "lun": 1}', ', "lun": 1}'),
    ("extra_passwords=('pw-one', 'pw-two') lun=1", " lun=1"),
    ("'secrets': {'a': 'pw-one', 'b': {'c': 'pw-two'}}, 'lun': 1",
     ", 'lun': 1"),
    ("'secrets': ['pw-one', 'pw-two'", ""),
])
def test_mask_text_hides_a_secret_keys_list_or_mapping_whole(text, kept):
    masked = mask.mask_text(text)
    assert "pw-one" not in masked and "pw-two" not in masked
    assert masked.endswith(mask.MASK + kept)


def test_mask_hides_secrets_named_by_key_anywhere_in_lists():
    obj = {"trace": [{"extra_passwords": ["pw-one"]},
                     ("auth_password", "pw-two"),
                     ["iscsiadm", "-n", "node.session.auth.password",
                      "-v", "pw-three"]],
           "pair": ["target_lun", 1]}
    masked = mask.mask(obj)
    assert "pw-" not in repr(masked)
    assert masked["trace"][1] == ("auth_password", mask.MASK)
    assert masked["trace"][2][:4] == ["iscsiadm", "-n",
                                      "node.session.auth.password", "-v"]
    assert masked["pair"] == ["target_lun", 1]


def test_log_line_of_a_list_of_passwords_is_masked(log_lines):
    logger, lines = log_lines
    logger.debug("==> connect_volume: call %s",
                 "{'self': <X>, 'extra_passwords': ['pw-one', 'pw-two']}")
    logger.debug("args %r", {"conn": [{"extra_passwords": ["pw-three"]}]})
    assert lines and not any("pw-" in line for line in lines)


def test_mask_params_masks_values_and_keeps_param_names():
    params = {"vol_id": "v", "connection_info": {
        "driver_volume_type": "iscsi",
        "data": {"auth_password": "s3cret", "target_lun": 1}}}
    shown = mask.mask_params(params)
    assert shown["vol_id"] == "v"
    assert shown["connection_info"]["data"] == {
        "auth_password": mask.MASK, "target_lun": 1}
    assert params["connection_info"]["data"]["auth_password"] == "s3cret"
    # Positional params (a list) are masked the same way.
    assert "s3cret" not in repr(mask.mask_params(
        ["v", {"data": {"auth_password": "s3cret"}}]))


def test_shorten_cuts_long_text_and_says_how_long_it_was():
    assert mask.shorten("abc") == "abc"
    exact = "x" * mask.MAX_LOGGED_ARG
    assert mask.shorten(exact) == exact
    cut = mask.shorten("y" * (mask.MAX_LOGGED_ARG + 5))
    assert cut.startswith("y" * mask.MAX_LOGGED_ARG + "...")
    assert cut.endswith("({} characters)".format(mask.MAX_LOGGED_ARG + 5))


@pytest.mark.parametrize("text", [
    # The patterns ignore case the Unicode way: a long s is an "s".
    "pa\u017f\u017fword=s3cret",
    "AUTH_PASSWORD=s3cret",
    "see postgresql://user:s3cret@db/engine",
    "secret AQBsecretsecretsecretsecretsecret0123ab== here",
])
def test_text_the_quick_check_cannot_clear_is_still_masked(text):
    assert "s3cret" not in mask.mask_text(text) or "AQ" in text
    assert mask.mask_text(text) != text


def test_text_without_any_secret_shape_is_returned_unchanged():
    text = ("FINISH ManagedVolume.detach_volume ok (0.002 s) vol_id="
            "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10 path=/dev/loop3")
    assert mask.mask_text(text) is text


def count_masking(monkeypatch, value):
    """The number of times ``mask.mask`` is asked to mask ``value``."""
    calls = []
    real = mask.mask

    def counting(obj, _depth=0):
        if obj is value:
            calls.append(obj)
        return real(obj, _depth)

    monkeypatch.setattr(mask, "mask", counting)
    return calls


def test_masked_value_is_masked_when_formatted_not_before(monkeypatch):
    calls = count_masking(monkeypatch, CONN)
    value = mask.Masked(CONN)
    assert calls == []
    text = str(value)
    assert len(calls) == 1
    for s in SECRETS:
        assert s not in text
    assert "chapuser" in text and repr(value) == text


def test_masked_params_are_shortened_when_asked():
    params = {"connection_info": CONN, "blob": "x" * 3 * mask.MAX_LOGGED_ARG}
    text = str(mask.Masked(params, params=True, short=True))
    assert len(text) < 2 * mask.MAX_LOGGED_ARG
    assert "chap-secret-1" not in text


def test_masked_object_that_is_no_json_value_is_masked_as_text():
    error = RuntimeError("login failed: auth_password=chap-secret-1")
    text = str(mask.Masked(error))
    assert "chap-secret-1" not in text and "login failed" in text


# plainly_clean: the log filter writes a line as formatted when it holds
# no secret marker, so it must never clear text that mask_text changes.

@pytest.mark.parametrize("text", LEAKY_TEXTS + [
    "[client.admin]\n\tkey = " + CEPH_KEY, "rbd --key " + CEPH_KEY,
    "pa\u017f\u017fword=s3cret", "AUTH_PASSWORD=s3cret",
    "{'extra_passwords': ['a', 'b']}"])
def test_text_mask_text_changes_is_never_plainly_clean(text):
    assert mask.mask_text(text) != text
    assert not mask.plainly_clean(text)


@pytest.mark.parametrize("key", [
    "auth_password", "discovery_auth_password", "auth_x", "Keyring",
    "X_TOKEN", "private_key", "credentials", "passwd", "db_secret",
    "discovery_auth_whatever", "p" * 70 + "_password",
])
def test_a_secret_key_is_never_plainly_clean(key):
    # A mapping's secret key is masked by name: its name must keep the
    # line it is printed in off the fast path.
    assert mask.is_secret_key(key)
    assert not mask.plainly_clean(key)


@pytest.mark.parametrize("key, secret", [
    ("auth_username", False), ("AUTH_METHOD", False), ("lun", False),
    ("x" * 100, False), ("x" * 100 + "token", True), ("Auth_Password", True),
])
def test_is_secret_key_the_same_however_often_and_however_long(key, secret):
    assert [mask.is_secret_key(key) for _ in range(3)] == [secret] * 3


# The non-ASCII letters re.IGNORECASE matches to an ASCII one (the text
# patterns' folding): a long s, a Kelvin sign, the two Turkish i's.
FOLDED = {"s": "\u017f", "k": "\u212a", "i": "\u0130\u0131"}


def folded_spellings(word):
    """``word`` with each letter FOLDED knows replaced, one at a time."""
    return [word[:i] + other + word[i + 1:]
            for i, c in enumerate(word) for other in FOLDED.get(c, "")]


@pytest.mark.parametrize("key", sorted({
    key for word in mask._SECRET_WORDS + ("auth_password",)
    for key in folded_spellings(word)}))
def test_a_key_the_text_patterns_take_for_a_secret_is_one_in_a_mapping(key):
    # "\u017fecret" (a long s) was masked in text ("\u017fecret=x")
    # and shown in a mapping ({"\u017fecret": "x"}): is_secret_key
    # lower-cased the key, the patterns fold case as re.IGNORECASE does.
    assert mask.mask_text("{}=v4lue".format(key)) == key + "=" + mask.MASK
    assert mask.is_secret_key(key)
    assert mask.mask({key: "v4lue"}) == {key: mask.MASK}
    assert mask.mask([key, "v4lue"]) == [key, mask.MASK]
    assert mask.holds_secret({"data": {key: "v4lue"}})


@pytest.mark.parametrize("key", [
    "pa\u00dfword", "PA\u00dfWORD", "\u017fECRET", "s\u0131gning_secret"])
def test_a_key_whose_case_folding_names_a_secret_is_one(key):
    # str.casefold: the German sharp s folds to "ss" as well.
    assert mask.is_secret_key(key)
    assert mask.mask({key: "v4lue"}) == {key: mask.MASK}


@pytest.mark.parametrize("key", [
    "auth_u\u017fername", "\u017fecret_type", "AUTH_METHOD",
    "di\u017fcovery_auth_method"])
def test_a_folded_spelling_of_a_name_that_is_no_secret_is_none(key):
    assert not mask.is_secret_key(key)
    assert mask.mask_text("{}=v4lue".format(key)).endswith("=v4lue")


@pytest.mark.parametrize("text, masked", [
    # A sentence's punctuation glued to a bare secret stays, the secret
    # alone is masked (it ate the full stop, the semicolon, the colon).
    ("login failed: password=s3cret.", "login failed: password=********."),
    ("password=s3cret; retrying", "password=********; retrying"),
    ("auth_password=s3cret: access denied",
     "auth_password=********: access denied"),
    ("password=s3cret...", "password=********..."),
    ("password=s3cret.\nnext line", "password=********.\nnext line"),
    ("-n node.session.auth.password -v s3cret.",
     "-n node.session.auth.password -v ********."),
    ("password%3Ds3cret.", "password%3D********."),
    # A value is never all punctuation shown; more than three is the
    # secret's; punctuation inside the value is the secret's.
    ("password=.", "password=********"),
    ("password=s3cret....", "password=********..."),
    ("password=s3.cr;et", "password=********"),
    ("password=s3cret;user=admin", "password=********"),
    # "!" and "?" end passwords more often than messages: masked.
    ("password=Summer2024!", "password=********"),
    ("password=s3cret?", "password=********"),
    # A pair's value is masked whole when it closes the pair: what ends
    # it is the pair's, not a sentence's.
    ("('auth_password', 12345678.)", "('auth_password', ********)"),
    ("[('auth_password', 12345678.), ('lun', 1)]",
     "[('auth_password', ********), ('lun', 1)]"),
])
def test_punctuation_glued_to_a_bare_secret_is_kept(text, masked):
    assert mask.mask_text(text) == masked


@pytest.mark.parametrize("value", [
    {"items": [("auth_password", "a long secret " * 6 + "TAILSECRET")]},
    {"auth_password": "a long secret " * 6 + "TAILSECRET"},
], ids=["pair", "dict"])
def test_a_value_pprint_splits_into_pieces_is_hidden_whole(value):
    # pprint writes a long string as adjacent literals, one per line.
    text = pprint.pformat({"connection_info": {"data": value}}, width=60)
    assert text.count("'\n") >= 3     # in pieces
    masked = mask.mask_text(text)
    assert "secret" not in masked and "TAILSECRET" not in masked


def test_a_bytes_value_inside_a_json_string_is_hidden():
    for value in (("auth_password", b"s3c'ret"),
                  {"auth_password": b"s3c'ret"}):
        text = json.dumps(repr(value))
        assert '\\"s3c' in text
        assert "s3c" not in mask.mask_text(text)


def test_rbd_secret_type_and_uuid_are_names_not_secrets():
    # A libvirt secret's type and id: "ceph" masked garbled RBD errors.
    data = {"secret_type": "ceph", "secret_uuid": "b0e8", "keyring": "k3y"}
    assert not mask.is_secret_key("secret_type")
    assert not mask.is_secret_key("secret_uuid")
    assert mask.mask(data) == {"secret_type": "ceph", "secret_uuid": "b0e8",
                               "keyring": mask.MASK}


def test_cinders_other_secret_options_are_masked_by_key():
    # zadara_access_key, synology_one_time_pass: secret=True in cinder.
    driver = {"zadara_access_key": SECRET, "synology_one_time_pass": SECRET,
              "zadara_vpsa_host": "vpsa.example", "synology_username": "u"}
    masked = mask.mask(driver)
    assert SECRET not in repr(masked)
    assert masked["zadara_vpsa_host"] == "vpsa.example"
    assert masked["synology_username"] == "u"
    for key in ("zadara_access_key", "synology_one_time_pass"):
        assert mask.is_secret_key(key)
        assert not mask.plainly_clean(key)


@pytest.mark.parametrize("obj, secret", [
    (CONN, True),
    ({"driver_volume_type": "iscsi",
      "data": {"options": [["auth_password", "pw"]]}}, True),
    ({"data": {"conf": "[client.admin]\n\tkey = AQBsecret3=="}}, True),
    ({"data": {"url": "postgresql://u:dbpw@127.0.0.1/db"}}, True),
    ({"driver_volume_type": "iscsi",
      "data": {"auth_method": "CHAP", "auth_username": "u",
               "auth_password": "", "target_lun": 1,
               "pair": ["target_lun", 1]}}, False),
    ({"driver_volume_type": "rbd",
      "data": {"secret_type": "ceph", "secret_uuid": "x"}}, False),
    (None, False),
])
def test_holds_secret_is_whether_mask_hides_anything(obj, secret):
    # What the journal asks of a record's values before it is deleted
    # (store: a record that held a secret is scrubbed from its files).
    assert mask.holds_secret(obj) is secret
    assert (mask.mask(obj) != obj) is secret


def _invalid(data):
    from vdsm_managedvolume import errors, validate
    with pytest.raises(errors.InvalidParams) as e:
        validate.transportable("connection_info.data", data)
    return e.value


@pytest.mark.parametrize("data, reason", [
    ({"auth_password": 2**70}, "integer is outside the signed 64-bit"),
    ({"auth_password": float("inf")}, "value is not a finite number"),
    ({"auth_password": "pw\0"}, "value holds a NUL character"),
    ({"discovery_auth_password": "\ud800"}, "value holds a lone UTF-16"),
    ({"keyring": object()}, "value of type object is not a JSON type"),
])
def test_a_masked_error_keeps_every_word_of_its_reason(log_lines, data,
                                                       reason):
    # "Invalid parameter connection_info.data.auth_password: <reason>":
    # the parameter's name ends in a secret's key, and its colon was
    # taken for the one before a value: the reason's first word was
    # masked ("auth_password: ******** is outside the signed 64-bit
    # range").  Only a secret's value is replaced; validate shows none.
    error = _invalid(data)
    text = str(error)
    assert reason in text
    assert mask.mask_text(text) == text
    # As vdsm-client prints the answer (and masks it again).
    shown = "(code={}, message={})".format(error.code, text)
    assert mask.mask_text(shown) == shown
    logger, lines = log_lines
    logger.warning("Refused: %s", error)
    assert lines[-1].endswith("Refused: " + text)


@pytest.mark.parametrize("reason", [
    "missing", "missing (os-brick's connector needs it)",
    "expected string, got number", "must be an object or an array, got "
    "string", "not a UUID", "nested deeper than 100 levels",
])
def test_the_reasons_schema_and_transports_write_keep_every_word(reason):
    from vdsm_managedvolume import errors
    text = str(errors.InvalidParams(
        name="connection_info.data.discovery_auth_password", reason=reason))
    assert mask.mask_text(text) == text


def test_a_secret_in_an_invalid_parameters_reason_is_still_masked():
    from vdsm_managedvolume import errors
    error = errors.InvalidParams(
        name="connection_info.data.auth_password",
        reason="expected a string, got auth_password=hunter22 (see "
               "postgresql://u:dbpw@db/engine)")
    text = mask.mask_text(str(error))
    assert "hunter22" not in text and "dbpw" not in text
    assert text.startswith("Invalid parameter connection_info.data."
                           "auth_password: expected a string, got ")
    # Another message than InvalidParams': the value is masked.
    for other in ("auth_password: hunter22",
                  "Invalid parameter auth_password=hunter22",
                  "NotInvalid parameter auth_password: hunter22",
                  "Invalid parameter 'auth_password': 'hunter22'",
                  "Invalid parameter auth_password: 'hunter22'",
                  "Invalid parameter auth_password: b'hunter22'",
                  "Invalid parameter auth_password: hunter22"):
        assert "hunter22" not in mask.mask_text(other), other
    # Another's text shaped as ours, a secret of letters only (what the
    # first word of a reason looks like): only this package's reasons
    # keep their first word (review-safety13b L4, L5).
    for other in ("Invalid parameter auth_password: Swordfish is wrong",
                  "error: Invalid parameter chap_secret: Swordfish must "
                  "be 12-16 characters",
                  "Invalid parameter auth_password: swordfish rejected"):
        masked = mask.mask_text(other)
        assert "wordfish" not in masked and mask.MASK in masked, other


def _deep(n):
    value = "leaf"
    for _ in range(n):
        value = [value]
    return value


class _Opaque:
    pass


@pytest.mark.parametrize("result", [
    {"vol_id": "v", "path": "/dev/loop7",
     "attachment": {"type": "local", "path": "/dev/loop7"}},
    {"attachment": {"auth_password": "s3cret", "path": "/dev/x"}},
    {"url": "iscsi://u:s3cret@h/x"}, ["auth_password", "s3cret"],
    ("-n", "node.session.auth.password", "-v", "s3cret"),
    {"d": "pa\u017f\u017fword=s3cret"}, {"d": "\u00e9t\u00e9"},
    {"k": "AQ" + "B" * 36 + "=="}, _deep(mask.MAX_DEPTH + 5),
    _deep(mask.MAX_DEPTH - 5), True, None, {"x": _Opaque()},
    {"x": float("nan")},
])
def test_masked_json_is_the_json_of_the_masked_result(result):
    encoder = json.JSONEncoder(allow_nan=False)

    def expected():
        return encoder.encode({"id": "1", "result": mask.mask(result)})

    try:
        want = expected()
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            mask.masked_json({"id": "1", "result": result}, encoder.encode,
                             "result")
        return
    got = mask.masked_json({"id": "1", "result": result}, encoder.encode,
                           "result")
    assert got == want
    assert "s3cret" not in got
