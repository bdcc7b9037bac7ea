"""The host commands each connector needs, and which of them are missing.

os-brick runs the initiator tools of the host; without them a connect
fails with a message about the storage ("Unable to find target portal")
while the cause, a missing command, is hundreds of lines down the log.
The service adds the missing command to a failed connect's error (926)
and ``managedvolume-tool check`` warns, for each allowed driver type,
about the commands it lacks.

What os-brick runs, per ``driver_volume_type``, is each transport's
``host_tools`` (vdsm_managedvolume/transports/): iscsiadm, multipath and
multipathd for iSCSI (vdsm's path is /dev/mapper/<id>), multipath and
multipathd for FC, nvme for NVMe-oF, rbd for the kernel RBD mapping.
Other types (local, lightos, storpool, vendor adapters) need no command
known here.
"""

import os

from . import transports

# {driver_volume_type: its commands}, {command: EL package or Debian
# package}, from the transports.
TOOLS = {name: tuple(cmd for cmd, _ in transports.get(name).host_tools)
         for name in transports.names() if transports.get(name).host_tools}

PACKAGES = {cmd: package for name in transports.names()
            for cmd, package in transports.get(name).host_tools}

# Where root (the privsep daemon) finds them, whatever our own PATH is.
SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def missing(driver_volume_type):
    """The commands ``driver_volume_type`` needs that this host lacks."""
    return [tool for tool in TOOLS.get(driver_volume_type, ())
            if not _found(tool)]


def explain(driver_volume_type):
    """A sentence naming the missing commands and their packages, or ""."""
    tools = missing(driver_volume_type)
    if not tools:
        return ""
    packages = []
    for tool in tools:
        if PACKAGES[tool] not in packages:
            packages.append(PACKAGES[tool])
    return "{} not installed on this host ({} needs {}: install {})".format(
        ", ".join(tools), driver_volume_type,
        "it" if len(tools) == 1 else "them", "; ".join(packages))


# Private helpers

def _found(tool):
    dirs = list(SEARCH_PATH) + [
        d for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and d not in SEARCH_PATH]
    return any(os.access(os.path.join(d, tool), os.X_OK) for d in dirs)
