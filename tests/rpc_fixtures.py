"""Fixtures for the rpc tests (see conftest.py).

``FakeService`` implements the Service interface (brief: service.py) in
memory, so that the schema, API and dispatch layers can be tested without
os-brick, privsep or a journal.  It records every call and can be told to
raise an error (``fail[verb] = errors.X(...)``).
"""

import copy

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import mask

BLANK_UUID = "00000000-0000-0000-0000-000000000000"
VOL_ID = "11111111-2222-3333-4444-555555555555"
VOL_ID2 = "66666666-7777-8888-9999-000000000000"
SD_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SECRET = "s3cr3t-chap"

ISCSI_CONNECTION = {
    "driver_volume_type": "iscsi",
    "data": {
        "target_portal": "10.0.0.1:3260",
        "target_iqn": "iqn.2009-01.com.example:storage.1",
        "target_lun": 26,
        "target_discovered": True,
        "auth_method": "CHAP",
        "auth_username": "user",
        "auth_password": SECRET,
    },
}

CONNECTOR_INFO = {
    "initiator": "iqn.1994-05.com.redhat:3f2b2be7ebc",
    "ip": "10.0.0.2",
    "host": "host1",
    "platform": "x86_64",
    "os_type": "linux",
    "multipath": True,
    "enforce_multipath": True,
    "do_local_attach": False,
}


class FakeService:

    def __init__(self, cfg=None):
        self.cfg = cfg or config.Config()
        self.volumes = {}
        self.calls = []
        self.fail = {}
        self.connector = dict(CONNECTOR_INFO)

    def start(self):
        pass

    def close(self):
        pass

    def attach_volume(self, vol_id, connection_info, sd_id=BLANK_UUID):
        self._called("attach_volume", vol_id, connection_info, sd_id)
        if vol_id in self.volumes:
            raise errors.AlreadyAttached(vol_id=vol_id,
                                         path=self.volumes[vol_id]["path"])
        path = "/dev/mapper/fake-" + vol_id[:8]
        info = {
            "vol_id": vol_id,
            "path": path,
            "attachment": {"path": "/dev/sdx", "type": "block",
                           "multipath_id": "fake-" + vol_id[:8]},
            "managed_path": "/run/vdsm/managedvolumes/{}_{}".format(
                sd_id, vol_id),
        }
        self.volumes[vol_id] = dict(
            info, connection_info=copy.deepcopy(connection_info))
        return info

    def detach_volume(self, vol_id, sd_id=BLANK_UUID):
        self._called("detach_volume", vol_id, sd_id)
        self.volumes.pop(vol_id, None)

    def extend_volume(self, vol_id, sd_id=BLANK_UUID, new_size=None):
        self._called("extend_volume", vol_id, sd_id, new_size)
        if vol_id not in self.volumes:
            raise errors.NotAttached(vol_id=vol_id, reason="no record")
        v = self.volumes[vol_id]
        v["size"] = new_size or v.get("size") or 1024**3
        return {"vol_id": vol_id, "path": v["path"], "size": v["size"]}

    def volumes_info(self, vol_ids=(), include_secrets=False):
        self._called("volumes_info", list(vol_ids), include_secrets)
        wanted = set(vol_ids) or set(self.volumes)
        result = []
        for vol_id in sorted(wanted & set(self.volumes)):
            v = self.volumes[vol_id]
            info = {"vol_id": vol_id,
                    "connection_info": copy.deepcopy(v["connection_info"]),
                    "path": v["path"], "attachment": v["attachment"],
                    "managed_path": v["managed_path"], "exists": True}
            if not include_secrets:
                info = mask.mask(info)
            result.append(info)
        return result

    def connector_info(self, refresh=False):
        self._called("connector_info", refresh)
        return dict(self.connector)

    def caps(self):
        self._called("caps")
        try:
            return {"connector_info": self.connector_info()}
        except errors.NotSupported:
            return {}

    def reconcile(self, apply=True):
        return []

    # Private helpers

    def _called(self, verb, *args):
        self.calls.append((verb,) + args)
        error = self.fail.get(verb)
        if error is not None:
            raise error


@pytest.fixture
def fake_service():
    return FakeService()


@pytest.fixture
def dispatcher(fake_service):
    from vdsm_managedvolume import jsonrpc
    return jsonrpc.Dispatcher(fake_service)
