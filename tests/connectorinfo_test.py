"""connector_info, cached (connectorinfo.py), through the Service verbs
that serve it (``connector_info``, ``caps``) over the in-process fake
brick."""

import json
import os
import stat

import pytest

from vdsm_managedvolume import connectorinfo
from vdsm_managedvolume import errors
from vdsm_managedvolume import service

from .agentutil import wait_for


def test_connector_info_is_cached_and_persisted(inproc_service, inproc_brick):
    svc = inproc_service
    first = svc.connector_info()
    for _ in range(100):
        assert svc.connector_info() == first
    assert inproc_brick.calls.count(("connector_properties",)) == 1
    path = svc.cfg.connector_info_cache
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with open(path) as f:
        assert json.load(f) == first
    svc.connector_info(refresh=True)
    assert inproc_brick.calls.count(("connector_properties",)) == 2


def test_connector_info_copy_cannot_corrupt_the_cache(inproc_service):
    info = inproc_service.connector_info()
    info["wwpns"].append("evil")
    info["host"] = "evil"
    assert inproc_service.connector_info()["wwpns"] == ["1000"]
    assert inproc_service.connector_info()["host"] == "test"


def test_connector_info_refreshes_after_ttl(host_cfg, inproc_brick,
                                            monkeypatch):
    host_cfg.connector_info_ttl = 0
    svc = service.Service(host_cfg, brick=inproc_brick)
    svc.connector_info()
    svc.connector_info()
    assert inproc_brick.calls.count(("connector_properties",)) == 2


def test_connector_info_refreshes_when_initiator_name_changes(
        inproc_service, inproc_brick, tmp_path, monkeypatch):
    initiator = tmp_path / "initiatorname.iscsi"
    initiator.write_text("InitiatorName=iqn.a\n")
    monkeypatch.setattr(connectorinfo, "CONNECTOR_SOURCES", (str(initiator),))
    monkeypatch.setattr(connectorinfo, "FINGERPRINT_INTERVAL", 0)
    svc = inproc_service
    svc.connector_info()
    svc.connector_info()
    assert inproc_brick.calls.count(("connector_properties",)) == 1
    initiator.write_text("InitiatorName=iqn.b-longer\n")
    inproc_brick.properties["initiator"] = "iqn.b-longer"
    assert svc.connector_info()["initiator"] == "iqn.b-longer"
    assert inproc_brick.calls.count(("connector_properties",)) == 2


def test_connector_info_refreshes_when_hostname_changes(
        inproc_service, inproc_brick, monkeypatch):
    monkeypatch.setattr(connectorinfo, "FINGERPRINT_INTERVAL", 0)
    svc = inproc_service
    svc.connector_info()
    monkeypatch.setattr(connectorinfo.socket, "gethostname", lambda: "renamed")
    svc.connector_info()
    svc.connector_info()
    assert inproc_brick.calls.count(("connector_properties",)) == 2


def test_not_supported_propagates_and_caps_drop_the_key(inproc_service,
                                                        inproc_brick):
    inproc_brick.unsupported = True
    with pytest.raises(errors.NotSupported) as e:
        inproc_service.connector_info()
    assert e.value.code == 925
    assert inproc_service.caps() == {}


def test_caps_report_connector_info(inproc_service, inproc_brick):
    assert inproc_service.caps() == {"connector_info": inproc_brick.properties}


def test_caps_fall_back_to_last_value_when_the_helper_fails(
        inproc_service, inproc_brick):
    known = inproc_service.connector_info()
    inproc_brick.fail_properties = True
    inproc_service._connector._expires = 0
    assert inproc_service.caps() == {"connector_info": known}
    with pytest.raises(errors.HelperFailed):
        inproc_service.connector_info(refresh=True)


def test_concurrent_connector_info_callers_share_one_refresh(
        inproc_service, inproc_brick, monkeypatch):
    import threading
    import time
    real = inproc_brick.connector_properties

    def slow():
        time.sleep(0.2)
        return real()

    monkeypatch.setattr(inproc_brick, "connector_properties", slow)
    results = []
    threads = [threading.Thread(
        target=lambda: results.append(inproc_service.connector_info()))
        for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8
    assert all(r == results[0] for r in results)
    assert inproc_brick.calls.count(("connector_properties",)) == 1
    cache_dir = os.path.dirname(inproc_service.cfg.connector_info_cache)
    assert not [n for n in os.listdir(cache_dir) if n.endswith(".tmp")]


def test_caps_serve_a_stale_connector_info_while_a_slow_refresh_runs(
        inproc_service, inproc_brick, monkeypatch):
    import threading
    known = inproc_service.connector_info()
    entered = threading.Event()
    release = threading.Event()
    released = []
    real = inproc_brick.connector_properties

    def blocked():
        entered.set()
        # Released by the test only after caps answered: a caps call
        # waiting for this refresh would leave it to the timeout.
        released.append(release.wait(60))
        return dict(real(), initiator="iqn.refreshed")

    monkeypatch.setattr(inproc_brick, "connector_properties", blocked)
    inproc_service._connector._expires = 0          # stale now
    try:
        assert inproc_service.caps() == {"connector_info": known}
        assert entered.wait(30)
        # The refresh is stuck in the helper: caps still answer, with
        # the age of what they serve.
        assert inproc_service.caps() == {"connector_info": known}
        assert inproc_service.connector_info_age() >= 0
        # Nor do they wait for a refresh someone else asked for.
        asked = threading.Thread(
            target=lambda: inproc_service.connector_info(refresh=True))
        asked.start()
        assert inproc_service.caps() == {"connector_info": known}
    finally:
        release.set()
    asked.join(60)
    wait_for(lambda: inproc_service.caps()["connector_info"]["initiator"]
             == "iqn.refreshed")
    assert released == [True] * len(released) and released


def test_caps_keep_the_stale_value_when_the_background_refresh_fails(
        inproc_service, inproc_brick):
    known = inproc_service.connector_info()
    inproc_brick.fail_properties = True
    inproc_service._connector._expires = 0
    assert inproc_service.caps() == {"connector_info": known}
    wait_for(lambda: inproc_service._connector._background is None)
    assert inproc_service.caps() == {"connector_info": known}


def test_a_restarted_service_serves_the_cached_file_while_it_refreshes(
        host_cfg, inproc_brick):
    first = service.Service(host_cfg, brick=inproc_brick)
    known = first.connector_info()
    first.close()
    inproc_brick.properties["initiator"] = "iqn.after-restart"
    calls = inproc_brick.calls.count(("connector_properties",))
    again = service.Service(host_cfg, brick=inproc_brick)
    try:
        # At once, from the file, with its age; refreshed behind it.
        assert again.caps() == {"connector_info": known}
        assert again.connector_info_age() >= 0
        wait_for(lambda: again.caps()["connector_info"]["initiator"]
                 == "iqn.after-restart")
        assert inproc_brick.calls.count(("connector_properties",)) == \
            calls + 1
    finally:
        again.close()


def test_caps_drop_a_stale_value_once_os_brick_is_gone(
        inproc_service, inproc_brick):
    inproc_service.connector_info()
    inproc_brick.unsupported = True
    inproc_service._connector._expires = 0
    inproc_service.caps()
    wait_for(lambda: inproc_service.caps() == {})
