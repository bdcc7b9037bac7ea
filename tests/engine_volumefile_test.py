"""The embedded backend's files: sparse files, copies (reflink or sparse),
loop devices (``vdsm_managedvolume/engine/volumefile.py``), tested
in-process (volumefile does not import cinder).
"""

import os
import subprocess

import pytest

from vdsm_managedvolume.engine import volumefile

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


def test_a_file_create_could_not_size_is_removed(tmp_path):
    # Left behind, it made every retry of the volume fail "File exists".
    path = str(tmp_path / "v")
    with pytest.raises(OverflowError):
        volumefile.create(path, 2 ** 63)      # more than off_t holds
    assert not os.path.exists(path)
    volumefile.create(path, GiB)
    assert os.path.getsize(path) == GiB


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
