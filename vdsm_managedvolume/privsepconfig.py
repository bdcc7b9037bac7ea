"""The privsep daemon's configuration file: what root may do, from
managedvolume.conf.

The daemon (brick.py) runs as root and acts only on what this file says:
os-brick's ``[oslo_concurrency] lock_path``, the size of its thread pool,
the connector override (what it imports; tests only) and the udev rule
settings (``UDEV_KEYS``: where its udev entrypoints write, and what).  A
call's arguments never say any of it.  Both sides use this module: the
client (privileged.py) writes or checks the file before it starts the
daemon, the daemon checks it again before it serves and reads its
``SECTION`` back through oslo.config.

Who may write what root reads
-----------------------------
The file is ``cfg.privsep_config`` (``/etc/vdsm/managedvolume-privsep.conf``).

- A root service rewrites it from managedvolume.conf at every daemon
  start (``write_config``, atomically, root's, mode 0644).
- A service that is not root (vdsm) never writes it: it must exist,
  belong to root and not be writable by group or others, in a directory
  of the same kind (``unsafe_config``), else HelperFailed asking the admin
  to run ``managedvolume-tool configure`` as root (the RPM's %post does);
  a file that differs from what managedvolume.conf says now is only
  warned about (``prepare_config``).
- The daemon refuses to serve unless ``unsafe_config`` finds nothing
  (under sudo also for every directory above the file).
- No oslo.log option is ever written: ``log_config_append`` would make
  root run code.
"""

import logging
import os
import stat
import tempfile

from . import errors
from . import fileutil

LOG = logging.getLogger(__name__)

# The daemon's oslo.config section (its options: brick.OPTS).
SECTION = "managedvolume_privileged"

# The managedvolume.conf settings the daemon's udev entrypoints use
# (brick.add_udev_rule / remove_udev_rule): written into its configuration
# file here, declared as its options and read back by brick.py.  Never
# taken from a call's arguments.
UDEV_KEYS = ("udev_rules_dir", "udev_owner", "chown", "udevadm",
             "multipath_dir", "rbd_dir")


# The daemon runs each call in a thread of a pool; calls beyond its size
# queue (while their deadline runs).  oslo.privsep's default is the CPU
# count: two attaches at once on this kind of host.  We size it for every
# operation the agent may run at once ([agent] max_operations), plus room
# for a connector_info refresh and a rollback, and never below this.
THREAD_POOL_SIZE = 16
THREAD_POOL_SPARE = 4


def write_config(cfg):
    """Write the daemon's oslo.config file (root only); return its path.

    Root-owned, mode 0644, replaced atomically.  A process that is not
    root must not call this (see ``prepare_config``).
    """
    path = cfg.privsep_config
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o755, exist_ok=True)
    private_dir(cfg.brick_lock_dir)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".privsep-",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(config_text(cfg))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        fileutil.rm_file(tmp, log=LOG)
        raise
    return path



def config_text(cfg):
    """The daemon's oslo.config file made from ``cfg``.

    Nothing here may come from a call: only from managedvolume.conf.  No
    oslo.log option either (``log_config_append`` would run code as root).
    """
    debug = str(cfg.log_level).upper() == "DEBUG"
    return (
        "# Written by vdsm-managedvolume from managedvolume.conf for its\n"
        "# privsep daemon, which runs as root: keep it root's, mode 0644.\n"
        "# 'managedvolume-tool configure' rewrites it (a service running\n"
        "# as root at every daemon start).\n"
        "[DEFAULT]\n"
        "debug = {debug}\n"
        "\n"
        "[oslo_concurrency]\n"
        "lock_path = {lock_path}\n"
        "\n"
        "[{section}]\n"
        "thread_pool_size = {pool}\n"
        "connector_override = {override}\n"
        "root_helper = {root_helper}\n"
        "# Where add_udev_rule/remove_udev_rule may write, and what.\n"
        "{udev}"
    ).format(debug=debug, lock_path=cfg.brick_lock_dir, section=SECTION,
             pool=thread_pool_size(cfg),
             override=cfg.connector_override, root_helper=cfg.root_helper,
             udev="".join("{} = {}\n".format(key, getattr(cfg, key))
                          for key in UDEV_KEYS))


def thread_pool_size(cfg):
    """The daemon's ``thread_pool_size``: calls it runs at once."""
    return max(THREAD_POOL_SIZE, cfg.max_operations + THREAD_POOL_SPARE)


def prepare_config(cfg):
    """Make sure the daemon's configuration file can be used; return its
    path.

    Root writes it.  Anyone else only checks it: HelperFailed when it is
    missing or not safe for root to read (``unsafe_config``), a warning
    when it differs from what managedvolume.conf says now.
    """
    path = cfg.privsep_config
    if os.geteuid() == 0:
        return write_config(cfg)
    try:
        # os-brick's lock_path; configure creates it on a vdsm host.
        private_dir(cfg.brick_lock_dir)
    except OSError as e:
        LOG.warning("Cannot create %s: %s", cfg.brick_lock_dir, e.strerror)
    reason = unsafe_config(path)
    if reason:
        raise errors.HelperFailed(
            "cannot start the privsep daemon: its configuration {} {}; "
            "run 'managedvolume-tool configure' as root to write it"
            .format(path, reason))
    try:
        with open(path) as f:
            current = f.read()
    except OSError as e:
        raise errors.HelperFailed(
            "cannot read the privsep daemon's configuration {}: {}"
            .format(path, e.strerror))
    if current != config_text(cfg):
        LOG.warning("%s does not match %s: run 'managedvolume-tool "
                    "configure' as root to update it", path,
                    cfg.source or "the configuration")
    return path


def private_dir(path):
    """Make directory ``path`` (os-brick's lock_path) its owner's alone,
    mode 0700; return whether it was made or its mode changed.

    os-brick's external locks are lockf'ed files in it: anyone who can
    open one can lock it (a shared lock needs only read access) and hang
    every attach and detach of its kind.  The daemon reaches it as root
    (CAP_DAC_OVERRIDE) whoever owns it.  An existing directory with
    looser permissions is tightened when it is ours to chmod (an
    OSError otherwise).
    """
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            return True
        except FileExistsError:
            pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(20, "not a directory", path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
        return True
    return False


def unsafe_config(path, ancestors=False):
    """Why root must not read the configuration file ``path``, or None.

    Safe: a regular file (not a symlink) owned by root, not writable by
    group or others, in a directory owned by root and not writable by
    group or others (else its owner could swap the file by a rename).
    ``ancestors``: also every directory above it owned by root and not
    writable by group or others unless sticky (/tmp).
    """
    if not os.path.isabs(path):
        return "is not an absolute path"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return "cannot be examined ({})".format(e.strerror)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    reason = _unsafe_owner(st, sticky_ok=False)
    if reason:
        return reason
    directory = os.path.dirname(os.path.normpath(path))
    dirs = [directory]
    if ancestors:
        d = directory
        while d != os.path.dirname(d):
            d = os.path.dirname(d)
            dirs.append(d)
    for i, d in enumerate(dirs):
        where = "in" if i == 0 else "under"
        try:
            st = os.lstat(d)
            if stat.S_ISLNK(st.st_mode):
                if i == 0:
                    return "is in {}, a symlink".format(d)
                st = os.stat(d)
        except OSError as e:
            return "is {} {}, which cannot be examined ({})".format(
                where, d, e.strerror)
        reason = _unsafe_owner(st, sticky_ok=i > 0)
        if reason:
            return "is {} directory {}, which {}".format(where, d, reason)
    return None

# Private helpers

def _unsafe_owner(st, sticky_ok):
    if st.st_uid != 0:
        return "belongs to uid {}, not root".format(st.st_uid)
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return "is writable by group or others (mode {:04o})".format(
            stat.S_IMODE(st.st_mode))
    return None
