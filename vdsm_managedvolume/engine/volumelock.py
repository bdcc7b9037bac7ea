"""One shim command at a time per volume, across processes.

ovirt-engine runs one process per operation, and runs some of them at once
on the same volume: ``ProcessDownVmCommand`` takes no VM lock, so a VM's
stop (``disconnect_volume``) overlaps a new start of the same VM on the
same host (``connect_volume``), an HA restart or a user's Run.  Each of
those reads the volume's connections, decides, and writes:

    disconnect_volume   read H's connection, ask H (up to --host-timeout),
                        terminate it, delete its record
    connect_volume      read H's connection, reuse it (clear its device)
                        or create one
    save_device         read the connections, write one's device

Interleaved, connect_volume handed the engine the connection a running
disconnect was ending (the host attached a LUN whose mapping was gone),
and two connects of one host made two connections.  cinderlib's file
locks (``file_locks_path``) only serialise what drivers lock themselves.

So each operation that reads-decides-writes a volume's records, or
changes what exists under a volume id, holds an exclusive lock on
``<locks dir>/volume-<id>.lock`` (``ops.LOCKS`` says which ids) for its
whole run:

- ``flock``: the kernel releases it when the holding process ends, however
  it ends (a command given up at its timeout exits, a warm child is
  killed): a lock is never left behind.  It is the shim's processes that
  must agree, all on the engine's machine, whatever the database (SQLite
  or PostgreSQL).  The locks directory is the one cinderlib's own locks
  use: every process on a backend shares it (docs/engine.md).
- Waiting is bounded (``--lock-timeout``, 120 s by default: a disconnect
  holds the lock while it asks the hosts, 10 s each at once).  A command
  that cannot get the lock in time fails, naming the volume and the
  command holding it (its holder writes what it is into the file).
- A lock is a lock on the file *at the path*: after ``flock`` succeeds,
  the file it holds must still be the one at ``volume-<id>.lock`` (same
  device and inode), else it is closed and the path opened again.  A
  process waiting on a file that was removed (or replaced) meanwhile
  would otherwise get a lock nobody else takes any more, beside the
  process that created the new file and locked that.
- So a holder may remove its file before it lets go (``held(discard=)``):
  its waiters then find their file gone and lock the new one.
  ``delete_volume`` removes its volume's (``ops.DISCARDS``), so that the
  directory does not keep a file for every volume ever made.  The files
  of volumes deleted otherwise stay (a few dozen bytes each).  A
  process of a version without the check (a warm service not restarted
  since an upgrade) waiting on a removed file would still take it for
  the volume's lock.
- What the check cannot help: a holder whose file someone *else* removes
  while it runs.  So the locks are never under ENGINE_TMP, which
  ovirt-engine empties at every start and stop (``ovirt-engine.py.in``
  via ``ovirt_engine.service.TempDir.create``, an ``rmtree`` first)
  while a warm service's children outlive the engine; and ENGINE_TMP is
  only in the environment of the engine's own commands, so an admin's
  command locked elsewhere.  The default is one place per machine
  (``args.default_locks_dir``: ``/var/lib/ovirt-engine/managedvolume-
  engine/locks`` on an engine), ``MANAGEDVOLUME_ENGINE_LOCKS_DIR`` in
  the adapter's settings another, which an admin's command gets by
  running the adapter.
- The directory must be the running user's (``args.locks_dir``): a
  lock file root made in the engine's (ovirt's) directory would lock
  the engine's commands out of that volume.
- The locks directory is the request's (a warm child locks where the
  command that forwarded it would have): cinderlib's ``file_locks_path``
  stays the first request's, as cinderlib is set up once per process.
"""

import errno
import fcntl
import logging
import os
import time
from contextlib import contextmanager

from vdsm_managedvolume import errors

from . import args as argsmod

log = logging.getLogger(__name__)

# Polling interval while waiting (flock has no timeout of its own).
_POLL = 0.05


@contextmanager
def held(locks_dir, vol_ids, holder, timeout, discard=()):
    """Hold the lock of every id in ``vol_ids`` (sorted, so that two
    commands locking the same ids never deadlock) for the block.

    ``holder`` says what holds it (command and flow), for the error of a
    command that waits in vain.  Raises ``errors.EngineBusy`` after
    ``timeout`` seconds.  The files of the ids in ``discard`` are
    removed before their locks are released, however the block ended
    (removing one is always safe: a waiter then locks a new file).
    """
    locked = []
    if vol_ids:
        # A warm child's request may name a directory its service was
        # not set up with: checked for every command.
        argsmod.locks_dir(locks_dir)
    try:
        deadline = time.monotonic() + timeout
        for vol_id in sorted(set(vol_ids)):
            locked.append((vol_id, _acquire(locks_dir, vol_id, holder,
                                            deadline, timeout)))
        yield
    finally:
        for vol_id, fd in reversed(locked):
            try:
                if vol_id in discard:
                    _remove(locks_dir, vol_id, fd)
                else:
                    # A command waiting next reads its holder, not ours.
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)        # releases the flock


def path(locks_dir, vol_id):
    return os.path.join(locks_dir, "volume-{}.lock".format(vol_id))


# Private helpers

def _acquire(locks_dir, vol_id, holder, deadline, timeout):
    lock_path = path(locks_dir, vol_id)
    waiting = False
    while True:
        fd = _open(locks_dir, lock_path)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if not waiting:
                    log.info("Waiting for volume %s: %s holds it", vol_id,
                             _holder(fd))
                    waiting = True
                if time.monotonic() >= deadline:
                    raise errors.EngineBusy(id=vol_id, holder=_holder(fd),
                                            timeout=_seconds(timeout))
                time.sleep(_POLL)
            if _at_path(fd, lock_path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, "{} (pid {})\n".format(
                    holder, os.getpid()).encode("utf-8", "replace"), 0)
                if waiting:
                    log.info("Got volume %s", vol_id)
                return fd
        except BaseException:
            os.close(fd)
            raise
        # Removed or replaced while we waited: this lock excludes nobody.
        os.close(fd)
        log.debug("The lock file of volume %s was removed or replaced "
                  "while waiting; opening it again", vol_id)


def _open(locks_dir, lock_path):
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(lock_path, flags, 0o600)
    except FileNotFoundError:
        # Made before locking, but someone may have removed it since.
        argsmod.locks_dir(locks_dir)
        return os.open(lock_path, flags, 0o600)


def _at_path(fd, lock_path):
    """Whether the open file ``fd`` is the one at ``lock_path`` now."""
    mine = os.fstat(fd)
    try:
        there = os.stat(lock_path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _remove(locks_dir, vol_id, fd):
    """Remove the lock file of ``vol_id``, held through ``fd``.  Only a
    holder removes one, so the file at the path is ours, unless someone
    else emptied the directory: then there is nothing to remove."""
    lock_path = path(locks_dir, vol_id)
    try:
        if _at_path(fd, lock_path):
            os.unlink(lock_path)
    except OSError as e:
        log.warning("Could not remove the lock file %s: %s", lock_path, e)


def _holder(fd):
    """What the file says holds it (the holder may be just starting)."""
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another command"


def _seconds(value):
    return "{:g}".format(value)
