"""Forward a request to the warm service, if one is there to trust.

The command's side of warm mode (the service is ``warm.py``).  This runs
in every command, so it imports nothing heavy: when the service answers,
the command never loads logging configuration, threads or cinderlib (the
whole forwarding command loads a dozen small modules; see client.py).

Requests carry backend and database passwords.  A request is only sent to
a socket that is a socket, owned by our uid, with no group or other
permissions (the service creates it so); anything else, or nobody
listening, means "run it yourself".  Once a request was sent it is never
run a second time: a lost answer is an ``error:`` line, not a retry.
"""

import _socket
import json
import os
import stat

from . import outcome

# Extra time a warm child gets over its request's own timeout before the
# service kills it (the child normally answers "did not finish" itself).
KILL_GRACE = 10.0
READ_TIMEOUT = 10.0


def forward(request, socket_path):
    """Have the warm service at ``socket_path`` run ``request``.

    Returns its ``outcome.Outcome``, or None when no usable service listens
    there (run the request in-process then).
    """
    if not _trusted_socket(socket_path):
        return None
    # The C module: ``socket`` builds its enums at import, ~1 ms of every
    # command's life, for nothing this needs.
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(READ_TIMEOUT)
        try:
            sock.connect(socket_path)
            sock.sendall(request.to_json().encode("utf-8") + b"\n")
        except OSError:
            # Stale socket file, or a service going away: nothing was run.
            return None
        # No timeout (--timeout 0), no limit: the service answers when the
        # operation ends (or kills the child of a timed request and closes
        # the socket).
        sock.settimeout(None if request.timeout is None else
                        request.timeout + KILL_GRACE + 5)
        try:
            data = _read_all(sock)
        except OSError as e:
            data = b""
            reason = e.strerror or type(e).__name__
        else:
            reason = "connection closed"
        if not data:
            return outcome.error(
                "warm service at {} lost the request ({}); it may or may "
                "not have run".format(socket_path, reason))
        return outcome.Outcome.from_dict(json.loads(data))
    finally:
        sock.close()


# Private helpers

def _trusted_socket(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        _warn("%s is not a socket; not forwarding", path)
        return False
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        _warn("Socket %s is not private to uid %d (owner %d, mode %o); not "
              "forwarding secrets to it", path, os.getuid(), st.st_uid,
              stat.S_IMODE(st.st_mode))
        return False
    return True


def _warn(msg, *args):
    import logging
    logging.getLogger("vdsm_managedvolume.engine.forward").warning(msg,
                                                                   *args)


def _read_all(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
