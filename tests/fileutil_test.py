import logging

import pytest

from vdsm_managedvolume import fileutil


def test_rm_file_removes_and_a_missing_file_is_no_error(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    fileutil.rm_file(str(path))
    assert not path.exists()
    fileutil.rm_file(str(path))


def test_rm_file_in_a_directory_fd(tmp_path):
    import os
    (tmp_path / "sock").write_text("")
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fileutil.rm_file("sock", dir_fd=fd)
    finally:
        os.close(fd)
    assert not (tmp_path / "sock").exists()


def test_rm_file_raises_other_errors_or_logs_them_given_a_logger(
        tmp_path, caplog):
    directory = tmp_path / "d"
    directory.mkdir()
    # unlink() of a directory fails with EISDIR/EPERM, not ENOENT.
    with pytest.raises(OSError):
        fileutil.rm_file(str(directory))
    log = logging.getLogger("test.fileutil")
    with caplog.at_level(logging.WARNING, logger="test.fileutil"):
        fileutil.rm_file(str(directory), log=log)
    assert "Cannot remove {}".format(directory) in caplog.text
    assert directory.is_dir()


def test_is_under_compares_normalised_names_not_prefixes():
    assert fileutil.is_under("/dev/mapper/x", "/dev/mapper")
    assert fileutil.is_under("/dev/mapper/../mapper/x", "/dev/mapper/")
    assert not fileutil.is_under("/dev/mapper", "/dev/mapper")
    assert not fileutil.is_under("/dev/mapperx/y", "/dev/mapper")
    assert not fileutil.is_under("/dev/mapper/../sda", "/dev/mapper")
