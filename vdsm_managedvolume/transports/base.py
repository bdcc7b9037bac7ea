"""What every transport does unless it says otherwise."""

from .. import devices
from .. import errors


class Transport:
    """The default: os-brick's attachment path, sysfs identity, no checks
    of its own (nvmeof, lightos, storpool and any other type)."""

    name = None

    def check(self, cfg, connection_info):
        """Raise InvalidParams if ``connection_info`` cannot be attached
        on this host; nothing has happened yet."""

    def path(self, cfg, vol_id, connection_info, attachment):
        """The device path after connect (``attachment`` is what the
        connector returned, a dict)."""
        path = attachment.get("path")
        if not isinstance(path, str) or not path:
            raise errors.HelperFailed(
                "connector returned no device path for volume {}".format(
                    vol_id))
        return path

    def identity(self, path):
        """What the device at ``path`` is (``devices.identity``), None
        when there is no block device."""
        return devices.identity(path)
