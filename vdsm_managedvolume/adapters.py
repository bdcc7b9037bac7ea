"""Vendor connector plug-ins ("adapters").

A storage domain may name an ``adapter``: the engine then sends
``connection_info["adapter"] = "<name>"`` and the host must connect the
volume with that vendor's connector instead of os-brick's built-in one
(vdsm ran ``managedvolume-helper-<adapter>``).  Here an adapter is a Python
callable registered under the entry point group::

    vdsm_managedvolume.adapters

How a vendor ships one
----------------------
In the vendor's package (any name), declare the entry point, e.g. in
``setup.cfg``::

    [options.entry_points]
    vdsm_managedvolume.adapters =
        acme = acme_brick.connector:factory

or in ``pyproject.toml``::

    [project.entry-points."vdsm_managedvolume.adapters"]
    acme = "acme_brick.connector:factory"

and install it into the same Python environment as vdsm-managedvolume (the
RPM's python3 site-packages).  ``factory`` is called in the privileged
daemon, as root, once per operation::

    factory(root_helper, *, protocol, use_multipath, device_scan_attempts,
            **kwargs) -> connector

(accept ``**kwargs``: more keywords may be passed in the future).  The
connector needs two methods, os-brick's interface:

    connect_volume(data: dict) -> dict
        ``data`` is connection_info["data"]; return the attachment
        (``path``, ``type``, optionally ``scsi_wwn``, ``multipath_id``),
        plain JSON types.  Path resolution then follows vdsm's rules by
        connection_info["driver_volume_type"].
    disconnect_volume(data: dict, device_info: dict | None) -> None
        ``device_info`` is what connect_volume returned (None when
        unknown).  Must succeed when the volume is not connected.

Any os-brick connector class fits (``factory`` may simply be a subclass of
``os_brick.initiator.connectors.base.BaseLinuxConnector``).  Exceptions
become error 926 with their message (secrets masked).

The adapter name is checked in the unprivileged service before anything is
connected (``check``): an unknown name is error 934 listing what is
installed.  The entry point is loaded only in the daemon (``load``), so the
service never imports vendor code.  Installing or removing an adapter takes
effect for the next operation (new daemons re-read the entry points; a
running daemon sees new distributions too, as ``importlib.metadata`` scans
sys.path on every call).
"""

from importlib import metadata

from . import errors

GROUP = "vdsm_managedvolume.adapters"


def installed():
    """Sorted names of the adapters installed in this environment."""
    return sorted({ep.name for ep in _entry_points()})


def check(name):
    """Raise errors.UnknownAdapter unless ``name`` is None/"" or installed."""
    if not name:
        return
    names = installed()
    if name not in names:
        raise errors.UnknownAdapter(adapter=name, group=GROUP,
                                    installed=", ".join(names) or "none")


def load(name):
    """Return the factory registered as ``name`` (daemon side)."""
    for ep in _entry_points():
        if ep.name == name:
            return ep.load()
    raise errors.UnknownAdapter(adapter=name, group=GROUP,
                                installed=", ".join(installed()) or "none")


# Private helpers

def _entry_points():
    return metadata.entry_points(group=GROUP)
