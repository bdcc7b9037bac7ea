"""The embedded backend: sparse files, copies, loop devices (volumefile),
and FileDriver driven through cinderlib with loop devices (as root).

volumefile is tested in-process (it does not import cinder); the driver is
driven in a child process through cinderlib, like the shim would.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vdsm_managedvolume.engine import volumefile

from .engine_fixtures import ROOT
from .engine_fixtures import loop_devices_under

MiB = 1024**2
GiB = 1024**3


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def allocated(path):
    return os.stat(path).st_blocks * 512


def test_create_makes_a_sparse_file_of_the_size(tmp_path):
    path = str(tmp_path / "v")
    volumefile.create(path, 10 * GiB)
    assert os.path.getsize(path) == 10 * GiB
    assert allocated(path) == 0
    with pytest.raises(FileExistsError):
        volumefile.create(path, GiB)


def test_grow_never_shrinks(tmp_path):
    path = str(tmp_path / "v")
    volumefile.create(path, 2 * GiB)
    volumefile.grow(path, GiB)
    assert os.path.getsize(path) == 2 * GiB
    volumefile.grow(path, 3 * GiB)
    assert os.path.getsize(path) == 3 * GiB


def test_sparse_copy_copies_data_and_keeps_holes(tmp_path):
    src = str(tmp_path / "src")
    dst = str(tmp_path / "dst")
    volumefile.create(src, 4 * GiB)
    write_at(src, 0, b"head" * 1024)
    write_at(src, 2 * GiB, b"middle" * 4096)
    write_at(src, 4 * GiB - 4096, b"t" * 4096)      # up to the very end
    how = volumefile.copy(src, dst, reflink=False)
    assert how == "sparse"
    assert os.path.getsize(dst) == 4 * GiB
    with open(src, "rb") as s, open(dst, "rb") as d:
        for offset, length in ((0, 4096), (2 * GiB, 6 * 4096),
                               (4 * GiB - 4096, 4096), (GiB, 4096)):
            s.seek(offset)
            d.seek(offset)
            assert s.read(length) == d.read(length)
    # Holes stayed holes: a few MiB allocated, not 4 GiB.
    assert allocated(dst) < 4 * MiB


def test_copy_of_an_empty_volume_allocates_nothing(tmp_path):
    src = str(tmp_path / "src")
    volumefile.create(src, 8 * GiB)
    volumefile.copy(src, str(tmp_path / "dst"))
    assert allocated(str(tmp_path / "dst")) == 0


def test_copy_reflinks_where_the_filesystem_can_and_falls_back(tmp_path):
    src = str(tmp_path / "src")
    volumefile.create(src, GiB)
    write_at(src, MiB, b"data")
    how = volumefile.copy(src, str(tmp_path / "dst"))
    # ext4/tmpfs cannot share extents (sparse); XFS/btrfs can (reflink).
    assert how in ("reflink", "sparse")
    with open(str(tmp_path / "dst"), "rb") as f:
        f.seek(MiB)
        assert f.read(4) == b"data"


def test_copy_refuses_to_overwrite(tmp_path):
    src = str(tmp_path / "src")
    volumefile.create(src, MiB)
    volumefile.create(str(tmp_path / "dst"), MiB)
    with pytest.raises(FileExistsError):
        volumefile.copy(src, str(tmp_path / "dst"))


def test_remove_of_a_missing_file_is_fine(tmp_path):
    volumefile.remove(str(tmp_path / "nothing"))


@pytest.mark.root
def test_loop_device_is_found_resized_online_and_detached(tmp_path):
    path = str(tmp_path / "v")
    volumefile.create(path, 64 * MiB)
    dev = volumefile.loop_attach(path)
    try:
        assert volumefile.loop_devices(path) == [dev]
        assert blockdev_size(dev) == 64 * MiB
        volumefile.grow(path, 128 * MiB)
        volumefile.loop_resize(dev)
        assert blockdev_size(dev) == 128 * MiB
        # Written through the device, read through the file.
        with open(dev, "r+b") as f:
            f.seek(100 * MiB)
            f.write(b"through-the-device")
            f.flush()
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            f.seek(100 * MiB)
            assert f.read(18) == b"through-the-device"
    finally:
        volumefile.loop_detach(dev)
    assert volumefile.loop_devices(path) == []
    # Detaching again (someone else did it) is not an error.
    volumefile.loop_detach(dev)


def blockdev_size(dev):
    out = subprocess.run(["blockdev", "--getsize64", dev], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


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
    c1.disconnect()
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
