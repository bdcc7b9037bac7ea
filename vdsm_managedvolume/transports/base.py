"""What every transport does unless it says otherwise."""

import os

from .. import devices
from .. import errors

# How fields of connection_info["data"] are named in errors.
DATA = "connection_info.data"


class Transport:
    """The default: os-brick's attachment path, matched by its kernel name
    in the udev rule, sysfs identity, no checks of its own (any type
    without a class of its own)."""

    name = None

    # The directory of this type's stable links (a Config attribute) and
    # its name under /dev as udev spells it, or None: the device is then
    # matched by the path os-brick returned (its kernel name, or the link
    # when that path is a symlink).  See ``transports.udev_match``.
    stable_links = None

    # The host commands os-brick's connector runs, as (command, the EL
    # package or the Debian package holding it): ``hosttools`` names the
    # missing ones in a failed connect's error and in the tool's check.
    host_tools = ()

    # Keywords of this type for os-brick's connector factory, beside
    # use_multipath and device_scan_attempts (daemon side).
    connector_kwargs = {}

    # Whether the privsep daemon may make os-brick's connector of this
    # type once and use it for every call, several at once (brick.py,
    # ``_connector``): only where the connector keeps nothing of a call
    # on itself.  Not by default: FC's connect keeps the device it
    # found on the connector (``self.host_device``), safe only under
    # os-brick's per-host lock.
    reuse_connector = False

    # Whether the record of what connect made (attachment, path,
    # multipath_id, device identity) is synced before the udev rule and
    # the managed link (store.py, "Commits and fsyncs").  After a power
    # loss, disconnect needs that attachment (RBD's keyring file is
    # removed only when it is given back; a vendor's handle), vdsm hides
    # the multipath map a record names from its own LUN list (its
    # multipath.getMPDevsIter asks our journal) while the boot's iSCSI
    # login brings that map back, and a re-attach compares the device it
    # gets with the recorded identity.  A connect of a real transport
    # takes network round trips: one fsync more is noise there.
    sync_connection = True

    def check(self, cfg, connection_info):
        """Raise InvalidParams, naming the field, if ``connection_info``
        cannot be attached on this host; nothing has happened yet.

        The default checks the fields os-brick's connector reads
        (``fields``), unless a vendor adapter connects the volume: its
        connector reads what it likes.
        """
        if not connection_info.get("adapter"):
            self.fields(connection_info["data"])

    def fields(self, data):
        """Raise InvalidParams when os-brick's connector would certainly
        fail on ``data`` (a required key missing, a value of the wrong
        type); shapes the connector accepts all pass."""

    def connector_data(self, connection_info, attachment=None):
        """The ``data`` handed to the connector's connect, disconnect
        (with the ``attachment`` connect returned) and extend (daemon
        side): a copy of connection_info["data"]."""
        return dict(connection_info.get("data") or {})

    def path(self, cfg, vol_id, connection_info, attachment):
        """The device path after connect (``attachment`` is what the
        connector returned, a dict)."""
        path = attachment.get("path")
        if not isinstance(path, str) or not path:
            raise errors.HelperFailed(
                "connector returned no device path for volume {}".format(
                    vol_id))
        return path

    def identity(self, path, st=None):
        """What the device at ``path`` is (``devices.identity``), None
        when there is no block device (``st``: its ``devices.examine``,
        when the caller has it)."""
        return devices.identity(path, st)

    def connect_command(self, connection_info):
        """What tells a command os-brick's connect of ``connection_info``
        runs whose effect a disconnect that ran before it ended would
        miss (an iSCSI login, an ``rbd map``): a function of a process's
        argv giving a short name for logs (never the argv: it may hold
        a password), or None for a process that is not one; None when
        this type has no such command; its ``programs`` attribute, a
        set of command names (/proc/PID/comm), lets ``procs`` skip every
        other process without reading its argv.  A disconnect waits for
        these (``procs``, ``brick._wait_earlier``): they outlive the
        daemon that started them."""
        return None


def command_matcher(program, verbs, options, values, name):
    """A ``connect_command`` match function: a process runs ``program``
    (the base name of argv[0], or of argv[1] for a script run by its
    interpreter), has one of ``verbs`` among its arguments, and one of
    ``options`` followed by one of ``values`` (``-T <iqn>``) or joined
    to it by "=" (``--nqn=<nqn>``); it answers ``name``.  Its
    ``programs`` tell ``procs`` which command names to read the argv
    of."""
    def match(argv):
        if program not in (os.path.basename(a) for a in argv[:2]):
            return None
        if not any(verb in argv for verb in verbs):
            return None
        for i, arg in enumerate(argv):
            if arg in options and i + 1 < len(argv) and \
                    argv[i + 1] in values:
                return name
            option, joined, value = arg.partition("=")
            if joined and option in options and value in values:
                return name
        return None

    match.programs = frozenset([program])
    return match


# Helpers for fields(): each raises InvalidParams naming the field.

def field_name(key, *more):
    """``connection_info.data.<key>[i]...``"""
    name = "{}.{}".format(DATA, key)
    for index in more:
        name += "[{}]".format(index)
    return name


def required(data, key, kind=None, prefix=""):
    """``data[key]``, present and not null (of ``kind`` when given).
    ``prefix`` names where ``data`` sits in connection_info["data"] when
    it is nested ("volume_replicas[0].")."""
    name = field_name(prefix + key)
    if data.get(key) is None:
        raise errors.InvalidParams(
            name=name, reason="missing (os-brick's connector needs it)")
    if kind is not None:
        of_kind(name, data[key], kind)
    return data[key]


def of_kind(name, value, kind):
    """Raise InvalidParams unless ``value`` is of ``kind`` (str, list,
    dict or int)."""
    if not isinstance(value, kind):
        raise errors.InvalidParams(
            name=name, reason="expected {}, got {}".format(
                _KIND_NAMES[kind], type(value).__name__))
    return value


def list_of(name, value, kind, length=None):
    """A non-empty list of ``kind`` values (each of ``length`` items
    when ``kind`` is list and ``length`` given)."""
    of_kind(name, value, list)
    if not value:
        raise errors.InvalidParams(name=name, reason="expected a non-empty "
                                   "list")
    for i, item in enumerate(value):
        of_kind("{}[{}]".format(name, i), item, kind)
        if length is not None and len(item) != length:
            raise errors.InvalidParams(
                name="{}[{}]".format(name, i), reason="expected {} items, "
                "got {}".format(length, len(item)))
    return value


_KIND_NAMES = {str: "a string", list: "a list", dict: "an object",
               int: "an integer"}
