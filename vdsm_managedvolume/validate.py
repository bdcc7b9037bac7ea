"""Input validation: one tiny function per kind of input.

Everything a caller sends is checked here before the service touches the
host: the ids become file names (``<run_dir>/<sd_id>_<vol_id>``, udev rule
files, lock files), so ``../../etc/x`` must never get that far, and a
malformed ``connection_info`` must fail before a device is connected, not
after.

Each function returns the normalised value and raises
``errors.InvalidParams(name=..., reason=...)`` naming the parameter and
what is wrong with it.  UUIDs are accepted in any case and normalised to
lower case, so that ``ABC...`` and ``abc...`` are one volume; only the
canonical 36-character hyphenated form is accepted (no braces, no urn:,
no bare hex), because that is what vdsm and the engine send.
"""

import math
import os
import re

from . import errors
from . import jsontext
from . import mask

# The sd_id of a volume that belongs to no storage domain: vdsm's default
# for the optional sd_id param (its defaultvalue in the schema YAML).
BLANK_UUID = "00000000-0000-0000-0000-000000000000"

_UUID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

# The largest connection_info accepted, as JSON.  Real ones are a few
# hundred bytes (an iSCSI multipath one with 8 portals ~2 KiB); the
# journal stores it and every volumes_info returns it.
MAX_CONNECTION_INFO = 64 * 1024

# json.dumps(value, allow_nan=False), without making an encoder per call.
_ENCODER = jsontext.Encoder(allow_nan=False)

_RBD_NAME_RE = re.compile(
    r"[A-Za-z0-9_.:+@=,-]+(/[A-Za-z0-9_.:+@=,-]+){1,2}\Z")

# What the privsep channel (msgpack) and every consumer of the journal
# can carry: integers of 64 bits, strings of Unicode scalar values.  A
# lone UTF-16 surrogate ("\ud800" in JSON) or a 400-digit integer parses
# as JSON and fits in SQLite's text, but cannot be sent to the daemon:
# refused here, before anything is journaled.
MIN_INT = -(2 ** 63)
MAX_INT = 2 ** 63 - 1

_SURROGATE_RE = re.compile("[\ud800-\udfff]")

# Vendor adapter names become a program name and an entry point name.
_ADAPTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def uuid(name, value):
    """Return ``value`` as a canonical lower-case UUID string."""
    if not isinstance(value, str):
        raise errors.InvalidParams(
            name=name, reason="expected a UUID string, got {}".format(
                type(value).__name__))
    lowered = value.lower()
    if not _UUID_RE.match(lowered):
        raise errors.InvalidParams(
            name=name, reason="{} is not a canonical UUID".format(
                _shown(value)))
    # The regex matched the canonical form (str(uuid.UUID(lowered)) would
    # give it back unchanged): no parse, four times per attach+detach.
    return lowered


def uuid_list(name, value):
    """Return a list of canonical UUIDs (None and () mean empty)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise errors.InvalidParams(
            name=name, reason="expected a list of UUIDs, got {}".format(
                type(value).__name__))
    return [uuid("{}[{}]".format(name, i), v) for i, v in enumerate(value)]


def size(name, value):
    """Return a size in bytes: a positive integer, or None (not given)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidParams(
            name=name, reason="expected a size in bytes, got {}".format(
                type(value).__name__))
    if not 0 < value <= MAX_INT:
        raise errors.InvalidParams(
            name=name, reason="{} is not a size in bytes between 1 and "
            "{}".format(value, MAX_INT))
    return value


def boolean(name, value):
    if not isinstance(value, bool):
        raise errors.InvalidParams(
            name=name, reason="expected a boolean, got {!r}".format(value))
    return value


def connection_info(name, value):
    """Return a JSON-normalised copy of a ManagedVolumeConnection.

    Required: ``driver_volume_type`` (non-empty string) and ``data`` (a
    mapping).  Optional: ``adapter`` (a vendor name; null means absent).
    The fields of ``data`` each type needs are its transport's to check
    (``transports``).
    The copy went through JSON, so comparing it to a stored record is
    comparing like with like (no tuples, no non-string keys).
    """
    if not isinstance(value, dict):
        raise errors.InvalidParams(
            name=name, reason="expected an object, got {}".format(
                type(value).__name__))
    dvt = value.get("driver_volume_type")
    if not isinstance(dvt, str) or not dvt:
        raise errors.InvalidParams(
            name=name + ".driver_volume_type",
            reason="expected a non-empty string, got {}".format(_shown(dvt)))
    if not isinstance(value.get("data"), dict):
        raise errors.InvalidParams(
            name=name + ".data",
            reason="expected an object, got {}".format(
                type(value.get("data")).__name__))
    if "adapter" in value and value["adapter"] is not None:
        adapter(name + ".adapter", value["adapter"])
    # transportable() refuses, naming the field, everything json.dumps
    # would (types that are not JSON, NaN and infinities) and more.
    transportable(name, value)
    text = _ENCODER.encode(value)
    size = len(text.encode("utf-8"))
    if size > MAX_CONNECTION_INFO:
        raise errors.InvalidParams(
            name=name, reason="{} bytes as JSON, more than the {} "
            "allowed".format(size, MAX_CONNECTION_INFO))
    normalised = jsontext.loads(text)
    if normalised.get("adapter", "") is None:
        del normalised["adapter"]
    return normalised


def transportable(name, value):
    """Raise InvalidParams naming the first value inside ``value`` that
    the privsep channel or the journal cannot carry.

    Refused: strings (keys too) holding a lone surrogate or a NUL
    character (no storage protocol uses them; a NUL cannot reach a path
    or an argument), integers outside the signed 64-bit range, NaN and
    infinities (``1e400`` parses as infinity), and anything that is not
    a JSON type.  Iterative: depth is the schema's business, not a
    reason to hit Python's recursion limit here.

    Nothing under a secret key (``mask.is_secret_key``: auth_password,
    keyring...) nor a value a list names as a secret (``["auth_password",
    value]``, ``mask.secret_items``) is ever shown in the error, neither
    a value nor a key: the error reaches the caller and the log.
    """
    # A node's path is made only for an error (``_path``): (parent, key)
    # under a mapping, (parent, index) in a list, (parent, None) under a
    # secret key (its keys are not shown).
    stack = [(name, value, mask.is_secret_key(name.rpartition(".")[2]))]
    while stack:
        path, v, secret = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str) or "\0" in k or \
                        _SURROGATE_RE.search(k):
                    shown = "(not shown)" if secret else _shown(k)
                    if not isinstance(k, str):
                        raise errors.InvalidParams(
                            name=_path(path), reason="key {} is not a "
                            "string".format(shown))
                    _check_text(_path(path), k, "key " + shown)
                stack.append(((path, None if secret else k), item,
                              secret or mask.is_secret_key(k)))
        elif isinstance(v, (list, tuple)):
            # A secret named by the item before it (a [key, value] pair,
            # an argv's "-v"), as mask hides it.
            named = () if secret else mask.secret_items(v)
            for i, item in enumerate(v):
                stack.append(((path, i), item, secret or i in named))
        elif isinstance(v, str):
            if "\0" in v or _SURROGATE_RE.search(v):
                _check_text(_path(path), v, "value")
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not MIN_INT <= v <= MAX_INT:
                raise errors.InvalidParams(
                    name=_path(path), reason="integer {}is outside the "
                    "signed 64-bit range{}".format(
                        "" if secret else _shown(v) + " ",
                        _HIDDEN if secret else ""))
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise errors.InvalidParams(
                    name=_path(path), reason="{} is not a finite number (a "
                    "JSON number too large for a double, such as 1e400, "
                    "reads as infinity){}".format(
                        "value" if secret else v, _HIDDEN if secret else ""))
        else:
            raise errors.InvalidParams(
                name=_path(path), reason="value of type {} is not a JSON "
                "type".format(type(v).__name__))
    return value


def device_path(name, value):
    """A ``local`` device path: an absolute, normalised path without NUL.

    Only the text is checked here; what the path names (a block device
    in the configured directories, not used by the host) is
    ``devices.check_local``'s.
    """
    if not isinstance(value, str) or not value:
        raise errors.InvalidParams(
            name=name, reason="expected a device path, got {}".format(
                _shown(value)))
    _check_text(name, value, "path")
    if not os.path.isabs(value):
        raise errors.InvalidParams(
            name=name, reason="{} is not an absolute path".format(
                _shown(value)))
    if os.path.normpath(value) != value or value.startswith("//"):
        raise errors.InvalidParams(
            name=name, reason="{} is not a normalised path (no '.', '..', "
            "'//' or trailing '/')".format(_shown(value)))
    return value


def rbd_name(name, value):
    """An rbd image name, "pool/image" or "pool/namespace/image": it
    becomes /dev/rbd/<value>, a link target and a udev rule match
    (checked by ``transports.rbd``)."""
    if (not isinstance(value, str) or not _RBD_NAME_RE.match(value)
            or any(p in (".", "..") for p in value.split("/"))):
        raise errors.InvalidParams(
            name=name, reason="expected \"pool/image\", got {}".format(
                _shown(value)))
    return value


def adapter(name, value):
    if not isinstance(value, str) or not _ADAPTER_RE.match(value):
        raise errors.InvalidParams(
            name=name, reason="{} is not a valid adapter name".format(
                _shown(value)))
    return value


def driver_type(connection_info, allowed):
    """Raise UnsupportedDriverType (930) unless the type is allowed.

    Checked before connecting: vdsm checked it after the device was
    already attached.
    """
    dvt = connection_info["driver_volume_type"]
    if dvt not in allowed:
        raise errors.UnsupportedDriverType(
            driver_volume_type=dvt[:_SHOWN_MAX], allowed=", ".join(allowed))
    return dvt


# Private helpers

# Bad values are quoted in errors so that the caller sees what was wrong,
# but never more than this: a 1 MB "vol_id" must not come back in full.
_SHOWN_MAX = 80

# What an error says instead of a value under a secret key.
_HIDDEN = " (a secret's value: not shown)"


def _check_text(path, text, what):
    if "\0" in text:
        raise errors.InvalidParams(
            name=path, reason="{} holds a NUL character".format(what))
    m = _SURROGATE_RE.search(text)
    if m:
        raise errors.InvalidParams(
            name=path, reason="{} holds a lone UTF-16 surrogate "
            "(\\u{:04x}), which is not a Unicode character".format(
                what, ord(m.group())))


def _path(node):
    """The name of a node ``transportable`` walked: a string, or
    (parent node, key under a mapping, index in a list, or None under
    a secret key, whose keys are not shown)."""
    steps = []
    while not isinstance(node, str):    # iterative: any depth
        node, step = node
        steps.append(step)
    path = node
    for step in reversed(steps):
        if step is None:
            path += "[...]"
        elif isinstance(step, int):
            path = "{}[{}]".format(path, step)
        else:
            path = _child(path, step)
    return path


def _child(path, key):
    if re.match(r"[A-Za-z_][A-Za-z0-9_-]{0,63}\Z", key):
        return "{}.{}".format(path, key)
    return "{}[{}]".format(path, _shown(key))


def _shown(value):
    text = repr(value)
    if len(text) > _SHOWN_MAX:
        text = text[:_SHOWN_MAX] + "..."
    return text
