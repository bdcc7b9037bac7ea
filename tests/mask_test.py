import logging

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


def test_log_lines_carry_flow_id_and_never_secrets(caplog):
    handler = logging.StreamHandler()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    keep = Keep()
    keep.setFormatter(logging.Formatter(log.FORMAT))
    log.install_filter(keep)
    logger = logging.getLogger("test.mask")
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    try:
        with log.flow("flow-42"):
            logger.info("attaching %s", CONN)
            logger.info("raw %r", CONN["data"])
            try:
                raise RuntimeError("iscsiadm failed: password=%s" %
                                   CONN["data"]["auth_password"])
            except RuntimeError:
                logger.exception("connect failed")
    finally:
        logger.removeHandler(keep)
    assert records and all("flow=flow-42" in r for r in records)
    for r in records:
        for s in SECRETS:
            assert s not in r
    del handler
