"""Small file helpers several layers share."""

import errno
import os


def rm_file(path, dir_fd=None, log=None):
    """Remove ``path``; one already gone is not an error.

    Any other failure is raised, or, given a logger ``log``, logged as a
    warning and swallowed (clean-up code that must go on).  The same
    contract as vdsm's ``fileutils.rm_file``, plus the logging variant.
    """
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        if log is None:
            raise
        log.warning("Cannot remove %s: %s", path, e)


def join(directory, name):
    """``os.path.join(directory, name)``: the same path, made directly
    for two strings when ``name`` is not absolute (the journal's volume
    paths: lock files, udev rules, managed links, several per call),
    without os.path.join's generic checks (bytes, path-like objects,
    more parts); any other arguments are os.path.join's."""
    if type(directory) is not str or type(name) is not str or \
            name.startswith("/"):
        return os.path.join(directory, name)
    if not directory or directory.endswith("/"):
        return directory + name
    return directory + "/" + name


def is_under(path, directory):
    """Whether ``path`` names something inside ``directory`` (by name,
    normalised, no symlink resolved; ``directory`` itself is not)."""
    return os.path.normpath(path).startswith(
        os.path.normpath(directory) + os.sep)
