"""FileDriver, the embedded cinder backend
(``vdsm_managedvolume/engine/filedriver.py``), driven through every
operation by cinderlib with loop devices (as root), in a child process like
the shim would.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from .engine_fixtures import ROOT
from .engine_fixtures import loop_devices_under

GiB = 1024**3


DRIVE = textwrap.dedent("""
    import json, os, subprocess, sys
    from vdsm_managedvolume.engine import runner
    runner.select_threading_backend()
    import cinderlib as cl
    base = sys.argv[1]
    cl.setup(file_locks_path=base + "/locks", disable_logs=False,
             persistence_config={"storage": "db",
                                 "connection": "sqlite:///" + base + "/db"})
    be = cl.Backend("file",
        volume_driver="vdsm_managedvolume.engine.filedriver.FileDriver",
        file_volume_dir=base + "/vols", file_volume_use_loop=True)
    out = {}
    def size(dev):
        return int(subprocess.run(["blockdev", "--getsize64", dev],
                   capture_output=True, text=True, check=True).stdout)
    vol = be.create_volume(1, id="11111111-2222-3333-4444-555555555555")
    c1 = vol.connect({"host": "src"})
    c2 = vol.connect({"host": "dst"})
    dev = c1.conn_info["data"]["device_path"]
    out["shared_device"] = dev == c2.conn_info["data"]["device_path"]
    out["is_block"] = dev.startswith("/dev/loop")
    with open(dev, "r+b") as f:
        f.write(b"written-before-snapshot")
    vol.extend(2)
    out["online_size"] = size(dev)
    snap = vol.create_snapshot()
    from_snap = snap.create_volume(size=3)
    clone = vol.clone()
    # Ended as the shim ends a connection: cinderlib's c1.disconnect()
    # would remove the export (the loop device) under "dst".
    from vdsm_managedvolume.engine import ops
    ops._end(vol, c1)
    out["kept_for_other_host"] = os.path.exists(dev) and size(dev) > 0
    c3 = from_snap.connect({"host": "src"})
    dev3 = c3.conn_info["data"]["device_path"]
    with open(dev3, "rb") as f:
        out["snapshot_data"] = f.read(23).decode()
    out["from_snapshot_size"] = size(dev3)
    c3.disconnect()
    c2.disconnect()
    stats = be.stats(refresh=True)
    out["provisioned"] = stats["pools"][0]["provisioned_capacity_gb"]
    # A crash left a loop device behind: delete still finds and detaches it.
    subprocess.run(["losetup", "-f", base + "/vols/volume-" + clone.id],
                   check=True)
    for v in (from_snap, clone):
        v.delete()
    snap.delete()
    vol.delete()
    out["files"] = sorted(os.listdir(base + "/vols"))
    print(json.dumps(out), flush=True)
    os._exit(0)
""")


@pytest.mark.root
def test_driver_serves_every_operation_with_loop_devices(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DRIVE, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    leaked = loop_devices_under(str(tmp_path))
    for dev in leaked:
        subprocess.run(["losetup", "-d", dev])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == {
        "shared_device": True,
        "is_block": True,
        "online_size": 2 * GiB,
        "kept_for_other_host": True,
        "snapshot_data": "written-before-snapshot",
        "from_snapshot_size": 3 * GiB,
        "provisioned": 2 + 2 + 3,   # volume, clone, volume from snapshot
        "files": [],
    }
    assert leaked == []
