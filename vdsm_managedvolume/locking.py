"""One lock per volume, held across threads and processes.

vdsm had no lock at all: two concurrent attach calls on one vol_id both
connected, and the loser's rollback disconnected the winner's device.
Here every operation on a volume runs under ``volume_lock(vol_id)``:

- between processes (the agent, ``managedvolume-tool``, a second agent
  started by mistake): ``fcntl.flock`` on ``<lock_dir>/<vol_id>.lock``.  The
  file is opened anew for every acquisition, because flock locks belong to
  an open file description: two opens in one process exclude each other
  just like two processes do.  The kernel drops the lock when its holder
  dies, so a crash never leaves a volume locked.
- between threads of one process: a ``threading.Lock`` per volume taken
  first, so waiting threads sleep on a real lock instead of polling.

Lock files are never unlinked: unlinking a lock file someone else is
about to lock is the classic flock race (two holders of two different
inodes).  One empty file per volume operated on in this boot (lock_dir
is on tmpfs) is the price; a detach of a volume without a record or a
lock file makes none (``Service._unknown``), so ids a client merely
names do not accumulate.

The wait is bounded (``cfg.lock_timeout``): an operation stuck on a hung
device must not make every later call on that volume hang with it; they
fail with ``VolumeBusy`` (932) and the caller may retry.
"""

import fcntl
import os
import threading
import time

from . import errors
from . import fileutil
from . import gate

# Polling bounds for the flock part (another process holds the lock).
_MIN_DELAY = 0.001
_MAX_DELAY = 0.05

_registry_lock = threading.Lock()
_thread_locks = {}   # path -> [threading.Lock, users]


class volume_lock:
    """Hold the lock of ``vol_id`` for the duration of the block.

    ``vol_id`` must already be validated (it becomes a file name).
    ``timeout`` 0 means "try once".  Raise ``errors.VolumeBusy`` when the
    lock could not be taken in time.

    A class, not a generator (contextlib.contextmanager): two locks per
    attach+detach, and a generator's context manager costs three Python
    calls more and a StopIteration at every exit.
    """

    __slots__ = ("_lock_dir", "_vol_id", "_timeout", "_path", "_tlock",
                 "_fd")

    def __init__(self, lock_dir, vol_id, timeout):
        self._lock_dir = lock_dir
        self._vol_id = vol_id
        self._timeout = timeout

    def __enter__(self):
        vol_id, timeout = self._vol_id, self._timeout
        path = self._path = lock_path(self._lock_dir, vol_id)
        deadline = time.monotonic() + timeout
        tlock = self._tlock = _acquire_thread_lock(path, vol_id, timeout)
        try:
            self._fd = _acquire_file_lock(path, vol_id, timeout, deadline)
        except BaseException:
            _release_thread_lock(path, tlock)
            raise

    def __exit__(self, *exc):
        try:
            # Closing the only descriptor of this open file drops the lock.
            os.close(self._fd)
        finally:
            _release_thread_lock(self._path, self._tlock)


def lock_path(lock_dir, vol_id):
    return fileutil.join(lock_dir, vol_id + ".lock")


# Private helpers

def _acquire_thread_lock(path, vol_id, timeout):
    with _registry_lock:
        entry = _thread_locks.setdefault(path, [threading.Lock(), 0])
        entry[1] += 1
    acquired = entry[0].acquire(blocking=False)
    if not acquired and timeout > 0:
        # Its holder may wait for a run slot (``gate``): never wait
        # holding one.
        with gate.released():
            acquired = entry[0].acquire(timeout=timeout)
    if not acquired:
        _forget(path, entry)
        raise errors.VolumeBusy(vol_id=vol_id, timeout=timeout)
    return entry


def _release_thread_lock(path, entry):
    entry[0].release()
    _forget(path, entry)


def _forget(path, entry):
    with _registry_lock:
        entry[1] -= 1
        if entry[1] == 0:
            del _thread_locks[path]


def _acquire_file_lock(path, vol_id, timeout, deadline):
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        # Another process holds it: poll without a run slot (``gate``).
        with gate.released():
            delay = _MIN_DELAY
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.VolumeBusy(vol_id=vol_id, timeout=timeout)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_DELAY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    pass
    except BaseException:
        os.close(fd)
        raise


def _open_lock_file(path):
    """Open (creating) the lock file at ``path``.

    Its directory is made only when it is missing (the first lock, or
    after someone removed it), not checked at every acquisition.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return os.open(path, flags, 0o600)
