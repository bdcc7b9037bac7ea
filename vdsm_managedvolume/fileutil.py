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


def is_under(path, directory):
    """Whether ``path`` names something inside ``directory`` (by name,
    normalised, no symlink resolved; ``directory`` itself is not)."""
    return os.path.normpath(path).startswith(
        os.path.normpath(directory) + os.sep)
