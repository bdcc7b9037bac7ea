"""vdsm's own ``vdsm-client`` (vdsm's code, run by scripts/vdsm-client)
against the real agent: the README's claim that it needs no change, and
the README's recipe for running it on a development machine.

The agent is the real console script (``--insecure`` on loopback:
vdsm-client reads its TLS files from /etc/pki/vdsm only), attaching a
real loop device through os-brick's ``local`` connector.
"""

import json
import os
import subprocess
import sys

import pytest

from .agent_process_test import AgentProcess
from .host_fixtures import LoopDevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "vdsm-client")
VOL_ID = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"

pytestmark = pytest.mark.root


def _vdsm_found():
    p = subprocess.run([sys.executable, SCRIPT, "-h"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    return p.returncode == 0


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    if not _vdsm_found():
        pytest.skip("vdsm's lib not found (../shared/vdsm or "
                    "$MANAGEDVOLUME_VDSM)")
    base = tmp_path_factory.mktemp("vdsmclient")
    agent = AgentProcess(base, insecure=True).start()
    yield agent
    agent.stop()


def vdsm_client(agent, *args, stdin=None):
    p = subprocess.run(
        [sys.executable, SCRIPT, "--insecure", "-a", "127.0.0.1",
         "-p", str(agent.port)] + list(args),
        input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_vdsm_client_gets_connector_info(agent):
    rc, out, err = vdsm_client(agent, "Host", "getCapabilities")
    assert rc == 0, err
    assert "connector_info" in json.loads(out)


def test_vdsm_client_attaches_and_detaches_a_loop_device(agent, tmp_path):
    loop = LoopDevice(str(tmp_path / "vol.img"))
    params = tmp_path / "attach.json"
    params.write_text(json.dumps({
        "vol_id": VOL_ID,
        "connection_info": {"driver_volume_type": "local",
                            "data": {"device_path": loop.path}}}))
    try:
        rc, out, err = vdsm_client(agent, "-f", str(params),
                                   "ManagedVolume", "attach_volume")
        assert rc == 0, err
        result = json.loads(out)
        assert result["path"] == loop.path
        assert os.path.realpath(result["managed_path"]) == loop.path

        # vdsm-client's own failure format, with our code and message.
        rc, out, err = vdsm_client(agent, "-f", str(params),
                                   "ManagedVolume", "attach_volume")
        assert rc == 1
        assert err.startswith(
            "vdsm-client: Command ManagedVolume.attach_volume with args ")
        assert "(code=927, message=Volume {} is already attached".format(
            VOL_ID) in err

        # A list is a JSON value: vdsm-client passes name=value as a
        # string, so it goes in a file.
        query = tmp_path / "info.json"
        query.write_text(json.dumps({"vol_ids": [VOL_ID]}))
        rc, out, err = vdsm_client(agent, "-f", str(query),
                                   "ManagedVolume", "volumes_info")
        assert rc == 0, err
        assert [v["vol_id"] for v in json.loads(out)] == [VOL_ID]

        rc, out, err = vdsm_client(agent, "ManagedVolume", "detach_volume",
                                   "vol_id=" + VOL_ID)
        assert (rc, out.strip()) == (0, "true"), err
        rc, out, err = vdsm_client(agent, "ManagedVolume", "volumes_info")
        assert (rc, json.loads(out)) == (0, []), err
    finally:
        vdsm_client(agent, "ManagedVolume", "detach_volume",
                    "vol_id=" + VOL_ID)
        loop.detach()


def test_vdsm_client_does_not_know_our_extend_volume(agent):
    """vdsm's schema has no extend_volume: the README sends admins to
    managedvolume-client for it."""
    rc, _, err = vdsm_client(agent, "ManagedVolume", "extend_volume",
                             "vol_id=" + VOL_ID)
    assert rc == 2
    assert "invalid choice: 'extend_volume'" in err
