"""connector_info: os-brick's connector properties, cached.

The engine reads a host's connector_info from getCapabilities and hands
it to the storage to export a volume to that host.  Fetching it runs
os-brick in the privsep daemon (~300 ms; vdsm runs a helper process for
every getCapabilities), so ``Cache`` keeps the value and fetches it again
only when what it is made of changes: the initiator name and NVMe host
ids (``CONNECTOR_SOURCES``), the host name, the addresses
(``ADDRESS_SOURCES``), or after ``connector_info_ttl``.  The value is
also written to ``connector_info_cache`` (a JSON file on tmpfs) for
vdsm's after_get_caps hook and for the next start of the service.
"""

import json
import logging
import os
import socket
import tempfile
import threading
import time

from . import errors
from . import fileutil

# Where the facts connector_info is made of live.  A change of any of
# them (or of the host name / addresses) refreshes the cached value.
CONNECTOR_SOURCES = (
    "/etc/iscsi/initiatorname.iscsi",
    "/etc/nvme/hostnqn",
    "/etc/nvme/hostid",
)
ADDRESS_SOURCES = ("/proc/net/fib_trie", "/proc/net/if_inet6")

# How often a cached connector_info looks at its sources (~30 us each).
FINGERPRINT_INTERVAL = 1.0

# The service's logger: these lines are the service's to the admin.
log = logging.getLogger("managedvolume.service")


class Cache:
    """connector_info, cached until what it is made of changes.

    The cached path is a couple of attribute reads and a clock read; once
    per FINGERPRINT_INTERVAL it also stats the sources (~30 us).  A
    refresh calls the privileged daemon (~300 ms) and writes the value to
    ``cache_file`` (0644 JSON) for the after_get_caps hook.

    A new cache starts from that file when it exists (an agent restarted:
    the file is on tmpfs, so it is from this boot), as a stale value of
    the file's age: getCapabilities answers at once while the privsep
    daemon starts, and the first such call refreshes it in the
    background.
    """

    def __init__(self, brick, ttl, cache_file):
        self._brick = brick
        self._ttl = ttl
        self._cache_file = cache_file
        self._lock = threading.Lock()
        self._value = None
        self._expires = 0.0
        self._next_check = 0.0
        self._fingerprint = None
        self._fetched = 0.0
        # The background refresh running, if any; its own lock, never held
        # while the daemon is asked (self._lock is, by _refresh).
        self._background = None
        self._background_lock = threading.Lock()
        self._load(cache_file)

    def get(self, refresh=False, stale_ok=False):
        """The value; refreshed first when ``refresh``, when there is none
        yet, or when it is stale (ttl passed, a source changed).

        ``stale_ok``: a stale value is returned at once and refreshed in a
        background thread (one at a time) instead: what the control plane
        (getCapabilities) wants, since a slow or restarting privsep daemon
        must never make a healthy host look dead to the engine.
        """
        value = self._value
        if not refresh and value is not None:
            now = time.monotonic()
            if now < self._expires:
                if now < self._next_check:
                    return _copy(value)
                if _fingerprint() == self._fingerprint:
                    self._next_check = now + FINGERPRINT_INTERVAL
                    return _copy(value)
                stale = "its sources changed"
            else:
                stale = "older than connector_info_ttl"
            if stale_ok:
                self._refresh_in_background(value, stale)
                return _copy(value)
            log.info("connector_info is stale (%s), refreshing", stale)
        return _copy(self._refresh(refresh, value))

    def age(self):
        """Seconds since the value was fetched; None when there is none."""
        if self._value is None:
            return None
        return time.monotonic() - self._fetched

    def last(self):
        return _copy(self._value) if self._value is not None else None

    def _refresh(self, forced, seen):
        with self._lock:
            if not forced and self._value is not seen:
                # Another thread refreshed while we waited for the lock.
                return self._value
            fingerprint = _fingerprint()
            value = self._brick.connector_properties()
            now = time.monotonic()
            self._fingerprint = fingerprint
            self._fetched = now
            self._expires = now + self._ttl
            self._next_check = now + FINGERPRINT_INTERVAL
            self._value = value
            _write_json(self._cache_file, value)
            return value

    def _load(self, path):
        """Start from the value a previous process wrote, stale."""
        try:
            with open(path) as f:
                value = json.load(f)
            age = max(0.0, time.time() - os.stat(path).st_mtime)
        except (OSError, ValueError):
            return
        if isinstance(value, dict) and value:
            self._value = value
            self._fetched = time.monotonic() - age  # _expires 0: stale

    def _refresh_in_background(self, seen, why):
        with self._background_lock:
            if self._background is not None or self._value is not seen:
                return
            log.info("connector_info is stale (%s): serving the value of "
                     "%.0f seconds ago while refreshing it", why,
                     time.monotonic() - self._fetched)
            self._background = threading.Thread(
                target=self._background_refresh, args=(seen,),
                name="connector-info", daemon=True)
            self._background.start()

    def _background_refresh(self, seen):
        try:
            self._refresh(False, seen)
        except errors.NotSupported as e:
            # os-brick is gone: caps must say so, not serve the old value.
            log.warning("Cannot refresh connector_info: %s", e)
            with self._lock:
                if self._value is seen:
                    self._value = None
        except Exception as e:
            # The stale value stays; the next caller tries again.
            log.warning("Cannot refresh connector_info: %s", e)
        finally:
            with self._background_lock:
                self._background = None


# Private helpers

def _fingerprint():
    """Cheap summary of everything connector_info is derived from."""
    parts = []
    for path in CONNECTOR_SOURCES:
        try:
            st = os.stat(path)
            parts.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append(None)
    parts.append(socket.gethostname())
    for path in ADDRESS_SOURCES:
        try:
            with open(path, "rb") as f:
                parts.append(hash(f.read()))
        except OSError:
            parts.append(None)
    return tuple(parts)


def _copy(value):
    # Callers may edit what they get; the cache must not change with it.
    return {k: list(v) if isinstance(v, list) else v
            for k, v in value.items()}


def _write_json(path, value):
    # A temp name of its own: the agent and a tool may refresh at once.
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                                   prefix=".connector_info.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(value, f, sort_keys=True)
        os.rename(tmp, path)
    except OSError as e:
        log.warning("Cannot write %s: %s", path, e)
        if tmp is not None:
            fileutil.rm_file(tmp, log=log)
