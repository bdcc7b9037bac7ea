"""One class per ``driver_volume_type``, chosen by the type (os-brick's way).

What differs from one transport to another lives here, one module per
family; the service keeps the state machine (journal, locks, links,
rules) and asks ``get(driver_volume_type)`` the rest::

    check(cfg, connection_info)     checks of its own before anything
                                    happens on the host (local: the
                                    device_path must be an allowed block
                                    device the host does not use)
    path(cfg, vol_id, connection_info, attachment)
                                    the device path after connect
    identity(path)                  what the device at that path is,
                                    recorded at attach and compared before
                                    a disconnect or a re-attach

The paths are vdsm's (its ``managedvolume._resolve_path``; see
docs/dependencies.md, "vdsm's conventions for a verb"): iSCSI and Fibre
Channel are ``<multipath_dir>/<multipath_id>`` (928 without a multipath
id), rbd is ``<rbd_dir>/<pool>/<volume>`` from ``data.name``, every other
type is the path os-brick's connector returned.

Adding a transport: a ``Transport`` subclass in its own module, a line in
``_CLASSES``, and its test.
"""

from . import base
from . import local
from . import rbd
from . import scsi

_CLASSES = (scsi.ISCSI, scsi.FibreChannel, rbd.RBD, local.Local)

_BY_TYPE = {cls.name: cls() for cls in _CLASSES}
_DEFAULT = base.Transport()


def get(driver_volume_type):
    """The transport of ``driver_volume_type`` (the default one for a type
    without a class of its own: nvmeof, lightos, storpool, ...)."""
    return _BY_TYPE.get(driver_volume_type, _DEFAULT)


def names():
    """The types that have a class of their own."""
    return sorted(_BY_TYPE)
