"""Ceph RBD, mapped by the kernel (os-brick's ``do_local_attach``).

The kernel names the device ``/dev/rbdN`` (N changes at every map) and
udev links it as ``<rbd_dir>/<pool>/<volume>``: that stable link is the
path, from ``data.name``, and what the udev rule matches (``SYMLINK==
"rbd/<pool>/<volume>"``).

Special cases, all here:

- the connector is created, and every call's data carries,
  ``do_local_attach``: the image is mapped on this host (``rbd map``),
  as vdsm's managedvolume-helper does with its own RBD connector,
  instead of being opened by librbd inside qemu;
- disconnect also hands the connector the device path connect returned,
  as ``data.device_path``, for connectors that find the mapping by it;
- ``data.name`` must be "pool/image" or "pool/namespace/image"
  (``validate.rbd_name``) before anything happens, even with a vendor
  adapter: it becomes a path, a link target and a udev rule.  Without
  an adapter only "pool/image": os-brick 7's connector splits the name
  into exactly two parts.

- outside OpenStack (a ``keyring`` in the data, as cinderlib gives it)
  os-brick writes a ceph conf holding the keyring at every connect, in
  the privsep daemon's temp dir (``tempfile.mkstemp(prefix=
  "brickrbd_")``, readable by root only), returns it as
  ``attachment["conf"]``, and deletes the one its disconnect is given
  (``rbd_privsep.delete_if_exists``, once ``rbd unmap`` worked).  A
  connect made again over a record of this boot writes another: the one
  the record no longer names (the old one after a successful re-attach,
  the new one when the volume stays attached as it was) is deleted by
  the daemon the same way (``brick.delete_rbd_conf``, only a file named
  as os-brick names them, right in its temp dir: ``conf_problem``
  given the temp dir).  So is the one a disconnect is given when the
  device was already gone (os-brick deletes it only after ``rbd
  unmap``), and those of a failed attach that no record names
  (``service._drop_unnamed_confs``; a rollback forgetting the record
  deletes them before it does: ``service._forget_attach``).  What a
  crash or a connect cut after os-brick wrote its conf leaves, the
  service's next start deletes (``service._sweep_confs``): confs no
  record names, older than ``[privsep] timeout`` + 60 s, made by root,
  holding a keyring of one of its records (the daemon reads it:
  another program's confs stay), a younger one once old enough; a
  connect cut at its deadline may write its conf after its record
  went: that keyring is swept ``[privsep] timeout`` + 61 s later (one
  scheduler thread, ``scheduler``).  No sweep deletes the conf of an
  attach or extend in flight (``service._InFlight``).
  os-brick gives a disconnect's conf to ``rbd`` as root and deletes it,
  so the daemon refuses a disconnect whose attachment names any conf
  but one os-brick could have written (named so, a regular file of its
  own user with one link, or gone: ``conf_problem``,
  ``brick._check_rbd_conf``): a caller of the daemon cannot have root
  read or delete another file that way.

Host command: rbd (``rbd map``, ``rbd showmapped``, ``rbd unmap``).

Size refresh (os-brick's ``extend_volume``): nothing to rescan, the
kernel refreshes a mapped image's size itself; the connector reads it.
"""

import os
import re
import stat

from .. import errors
from .. import validate
from . import base

# A ceph conf os-brick's connector writes: tempfile.mkstemp's name, its
# prefix and mkstemp's letters (tempfile._RandomNameSequence).
_CONF_NAME = re.compile(r"brickrbd_[a-z0-9_]+\Z")


def conf_problem(path, temp_dir=None):
    """Why ``path`` is not a ceph conf os-brick's RBD connector wrote in
    this process (``mkstemp("brickrbd_")``: named so, a regular file of
    this process's user with no other link), or None; None too for a
    path where nothing is (os-brick's delete does nothing then, and
    ``rbd`` reads no conf).  A conf given as root to ``rbd`` (``--conf``)
    and deleted afterwards must be one of os-brick's own: not a link,
    not a file another user made or linked under that name.  Not tied
    to a temp dir unless ``temp_dir`` is given (what the daemon deletes
    on its own: right in its temp dir): a daemon started with another
    TMPDIR (or that fell back to /var/tmp) must still detach what an
    earlier one attached."""
    if not isinstance(path, str) or "\0" in path:
        return "not a path"
    if temp_dir is not None and os.path.dirname(path) != temp_dir:
        return "not in {}".format(temp_dir)
    if not os.path.isabs(path):
        return "not an absolute path"
    if not _CONF_NAME.match(os.path.basename(path)):
        return "not named as os-brick names its ceph confs (brickrbd_*)"
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return "cannot be checked: {}".format(e.strerror)
    return conf_stat_problem(st)


def conf_stat_problem(st):
    """Why a file of stat result ``st`` (lstat of the path, or fstat of
    it once opened) is not what os-brick's mkstemp made: a regular file
    of this process's user with no other link; or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return "owned by uid {}, not {}".format(st.st_uid, os.geteuid())
    if st.st_nlink != 1:
        return "has {} links".format(st.st_nlink)
    return None


class RBD(base.Transport):
    name = "rbd"
    stable_links = ("rbd_dir", "rbd")
    connector_kwargs = {"do_local_attach": True}
    host_tools = (("rbd", "ceph-common"),)

    def check(self, cfg, connection_info):
        validate.rbd_name(base.field_name("name"),
                          connection_info["data"].get("name"))
        super().check(cfg, connection_info)

    def fields(self, data):
        # os-brick 7's RBDConnector splits data.name into exactly two
        # parts (pool, volume = name.split('/')) at connect, showmapped
        # and disconnect: a namespace would fail there, so it is refused
        # here unless a vendor adapter's connector does the mapping.
        if data["name"].count("/") != 1:
            raise errors.InvalidParams(
                name=base.field_name("name"), reason="os-brick's RBD "
                "connector takes only \"pool/image\" (no namespace), got "
                "{!r}".format(data["name"]))

    def connector_data(self, connection_info, attachment=None):
        data = super().connector_data(connection_info)
        data.setdefault("do_local_attach", True)
        if attachment and attachment.get("path"):
            data["device_path"] = attachment["path"]
        return data

    def path(self, cfg, vol_id, connection_info, attachment):
        return os.path.join(cfg.rbd_dir, connection_info["data"]["name"])

    def connect_command(self, connection_info):
        """An ``rbd map`` of the connection's image: os-brick's
        ``RBDConnector._local_attach_volume`` runs ``rbd map <image>
        --pool <pool> ...`` (``rbd device map <pool>/<image>`` is the
        newer spelling), in the connect's own thread."""
        name = (connection_info.get("data") or {}).get("name")
        if not isinstance(name, str) or name.count("/") != 1:
            return None
        pool, image = name.split("/")

        def match(argv):
            if "rbd" not in (os.path.basename(a) for a in argv[:2]):
                return None
            if "map" not in argv:
                return None
            if name in argv:
                return "rbd map"
            for i, arg in enumerate(argv[:-1]):
                if (arg in ("--pool", "-p") and argv[i + 1] == pool
                        and image in argv):
                    return "rbd map"
            return None

        match.programs = frozenset(["rbd"])
        return match
