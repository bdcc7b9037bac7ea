"""One class per ``driver_volume_type``, chosen by the type (os-brick's way).

Everything that differs from one transport to another lives here, one
module per family; the service keeps the state machine (journal, locks,
links, rules) and the privsep daemon the calls to os-brick, and both ask
``get(driver_volume_type)`` the rest::

    check(cfg, connection_info)     before anything happens on the host:
                                    the fields os-brick's connector would
                                    certainly fail on (``fields(data)``,
                                    skipped for a vendor adapter), and a
                                    transport's own rules (rbd: data.name
                                    is "pool/image"; local: device_path
                                    is an allowed block device the host
                                    does not use); InvalidParams names
                                    the field
    connector_kwargs                keywords for os-brick's connector
                                    factory (rbd: do_local_attach)
    connector_data(connection_info, attachment=None)
                                    the data handed to connect,
                                    disconnect and extend
    path(cfg, vol_id, connection_info, attachment)
                                    the device path after connect
    stable_links                    how the udev rule matches that path
                                    (``udev_match`` below)
    host_tools                      the commands its connector runs
                                    (``hosttools``: which are missing)
    identity(path, st=None)         what the device at that path is,
                                    recorded at attach and compared before
                                    a disconnect or a re-attach

The paths are vdsm's (its ``managedvolume._resolve_path``; see
docs/dependencies.md, "vdsm's conventions for a verb"): iSCSI and Fibre
Channel are ``<multipath_dir>/<multipath_id>`` (928 without a multipath
id), rbd is ``<rbd_dir>/<pool>/<volume>`` from ``data.name``, every other
type is the path os-brick's connector returned.

A size refresh (extend) is the same call for every type: os-brick's
``connector.extend_volume`` in the privsep daemon with
``connector_data``, then the size read from sysfs (``devices.size``);
what each connector does is told in its module's docstring.

udev rules are matched by path, not by type: reconcile checks rules whose
volume it no longer knows, and the daemon writing a rule gets a path
only.  ``udev_match`` derives the match from the directories the
transports declare (``stable_links``), so it is defined here once.

Adding a transport: a ``Transport`` subclass in a module of its family,
a line in ``_CLASSES``, and its test (tests/transports_test.py).
"""

import os

from .. import config
from .. import fileutil
from . import base
from . import local
from . import nvme
from . import rbd
from . import scsi
from . import storpool

_CLASSES = (scsi.ISCSI, scsi.FibreChannel, rbd.RBD, nvme.NVMeOF,
            nvme.LightOS, storpool.StorPool, local.Local)

_BY_TYPE = {cls.name: cls() for cls in _CLASSES}
_DEFAULT = base.Transport()


def get(driver_volume_type):
    """The transport of ``driver_volume_type`` (the default one for a type
    without a class of its own)."""
    return _BY_TYPE.get(driver_volume_type, _DEFAULT)


def names():
    """The types that have a class of their own."""
    return sorted(_BY_TYPE)


def link_dirs(cfg=None):
    """[(directory, its name under /dev as udev spells it)] of the stable
    links the transports' paths are (``cfg``: None for the defaults)."""
    found = []
    for t in _BY_TYPE.values():
        if t.stable_links is not None:
            key, udev_dir = t.stable_links
            pair = (getattr(cfg if cfg is not None else config.Config, key),
                    udev_dir)
            if pair not in found:
                found.append(pair)
    return found


def device_dirs(cfg=None):
    """The directories a device path may be in: /dev and the configured
    stable link directories (which tests move out of /dev)."""
    return ("/dev",) + tuple(d for d, _ in link_dirs(cfg))


def udev_match(path, cfg=None):
    """(key, name): how a udev rule matches the device at ``path``.

    ``SYMLINK`` and the link's name under /dev for a path in a stable
    link directory (``mapper/<id>``, ``rbd/<pool>/<volume>``: the kernel
    names ``dm-N``/``rbdN`` change on every connect; a directory
    configured outside /dev, in tests, is named as /dev's would be), and
    for any other path that is a symlink; else ``KERNEL`` and the path
    relative to /dev (``nvme0n3``).
    """
    for directory, udev_dir in link_dirs(cfg):
        if fileutil.is_under(path, directory):
            return "SYMLINK", os.path.join(
                udev_dir, os.path.relpath(path, directory))
    key = "SYMLINK" if os.path.islink(path) else "KERNEL"
    if path.startswith("/dev/") and os.path.normpath(path) == path:
        return key, path[5:]    # relpath's answer, a tenth of its cost
    return key, os.path.relpath(path, "/dev")

