"""The command's side of warm mode (``vdsm_managedvolume/engine/forward.py``):
which sockets it trusts.  The service's side is engine_warm_test.py's.
"""

import os
import socket

from vdsm_managedvolume.engine import args as argsmod
from vdsm_managedvolume.engine import forward


def test_forward_refuses_a_socket_owned_by_someone_else(tmp_path):
    path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    try:
        os.chmod(path, 0o600)
        os.chown(path, 4242, 4242) if os.geteuid() == 0 else None
        request = argsmod.Request("storage_stats", {}, "sqlite://", "c",
                                  {"refresh": False})
        if os.geteuid() == 0:
            assert forward.forward(request, path) is None
        # Not a socket at all:
        regular = tmp_path / "regular"
        regular.write_text("")
        regular.chmod(0o600)
        assert forward.forward(request, str(regular)) is None
    finally:
        s.close()
