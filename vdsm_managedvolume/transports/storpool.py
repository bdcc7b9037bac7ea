"""StorPool: a volume the local StorPool client attaches.

The connector returns ``/dev/storpool-byid/<global id>``, a link udev
makes: the rule matches it as a link (any symlink path is).

Size refresh (os-brick's ``extend_volume``): the StorPool client on the
host picked the new size up already; the connector waits until the
device shows the size the StorPool API gives.

Fields, as os-brick 7's ``StorPoolConnector`` reads them (it refuses
exactly these itself, after a daemon round trip): client_id and volume
(present), access_mode ("rw" or "ro").
"""

from .. import errors
from . import base
from .base import field_name

ACCESS_MODES = ("rw", "ro")


class StorPool(base.Transport):
    name = "storpool"

    def fields(self, data):
        base.required(data, "client_id")
        base.required(data, "volume")
        mode = base.required(data, "access_mode")
        if mode not in ACCESS_MODES:
            raise errors.InvalidParams(
                name=field_name("access_mode"), reason="expected one of "
                "{}, got {!r}".format(", ".join(ACCESS_MODES), mode)[:120])
