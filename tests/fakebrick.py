"""Fake os-brick connectors for what this kernel cannot do.

Loaded INSIDE the privsep daemon when ``cfg.connector_override =
"tests.fakebrick"``: the daemon asks ``get_connector()`` first and falls
back to os-brick's own factory when it returns None, so ``local`` (and
anything not faked here) stays the real os-brick connector.

Faked protocols and what ``connect_volume`` returns (os-brick's shapes):

    iscsi, fibre_channel
        {"type": "block", "scsi_wwn": "36001405<hex>",
         "multipath_id": "36001405<hex>", "path": "/dev/dm-<N>"}
    rbd (data.name = "pool/volume")
        {"type": "block", "path": "/dev/rbd/<pool>/<volume>"}
    nvmeof (data.target_nqn)
        {"type": "block", "path": "<fake_dev_dir>/nvme-<key>"} (or
        "/dev/nvme0n1" without fake_dev_dir)
    local, only with ``fake_wait``, ``fake_sleep``, ``fake_wait_extend``
    or ``fake_wait_disconnect`` (``SlowLocalConnector``)
        os-brick's own answer, {"type": "local", "path": device_path},
        after the wait

``extend_volume`` (os-brick's rescan) makes the device what the storage
holds: the test grows the "LUN" with ``set_array_size(key, size)``
(``array/<key>``), as the engine's extend makes the array grow it, and the
device stand-in (``devices/<key>``, a sparse file) takes that length at
connect and at extend, not before.  It returns the device's size in
bytes, as os-brick's connectors do.  With ``fake_device`` (a real block
device) the size is that device's.

State (so that tests can see what is "connected") lives under
``$MANAGEDVOLUME_FAKEBRICK_DIR`` (required):

    connected/<key>     JSON of the attachment while connected
    earlier/<key>       connected in an earlier boot (``reboot()``)
    disconnected/<key>  what the last disconnect of <key> ended
                        (``come_back()``)
    devices/<key>       a file standing in for the block device (empty
                        unless array/<key> gives a size)
    array/<key>         the size the storage gives the volume (bytes)
    conf/brickrbd_<x>   an RBD connection's ceph conf, written where
                        os-brick writes it (see below): {"path", "key"}
    calls.log           one line per event: "connect-start <key>" (before
                        any sleep or failure), "connect <key>",
                        "connect-failed <key>", "disconnect <key>",
                        "disconnect-failed <key>", "disconnect-wrong
                        <key>", "disconnect-blind <key>" (below),
                        "extend-start <key>",
                        "extend <key>", "extend-failed <key>"

``<key>`` is ``data["fake_key"]`` when given, else derived from the target
(iscsi: target_iqn + target_lun, fc: target_wwn + target_lun, rbd: name,
nvmeof: target_nqn, "/" replaced by "_").

Device node stand-ins: when ``data["fake_dev_dir"]`` is given, connect
creates a symlink where the service will look for the device, pointing
to ``data["fake_device"]`` (e.g. a real loop device) or to
``devices/<key>``; disconnect removes it:

    iscsi/fc: <fake_dev_dir>/<multipath_id>  (point cfg.multipath_dir here)
    rbd:      <fake_dev_dir>/<pool>/<volume>  (point cfg.rbd_dir here)
    nvmeof:   <fake_dev_dir>/nvme-<key>, or with ``fake_kernel_name``
              <fake_dev_dir>/<kernel name of fake_device>: a name given
              at each connect, as /dev/nvmeXnY is (fake_device may be
              a link the test points at another device, as a namespace
              comes back under another name after a reboot)

Knobs in ``connection_info["data"]`` (all optional):

    fake_no_multipath   true: no multipath_id; path is "/dev/sd<x>" (928)
    fake_no_wwn         true: no scsi_wwn either
    fake_wwn            use this WWN (and multipath_id) instead of a hash
    fake_fail           raise FakeConnectorError at connect; a string is
                        the message, true means a message quoting
                        data["auth_password"] (to prove masking)
    fake_fail_disconnect  the same at disconnect
    fake_sleep          seconds to sleep in connect before connecting
                        (-> HelperTimeout with a short cfg.timeout)
    fake_sleep_disconnect  the same for disconnect
    fake_wait_disconnect  the same as fake_wait, at disconnect (after
                        "disconnect-start <key>")
    fake_wait_extend    the same as fake_wait, at extend (after
                        "extend-start <key>"; local only)
    fake_fail_extend    the same as fake_fail, at extend
    fake_sleep_extend   the same as fake_sleep, at extend
    fake_wait           a path: connect, after "connect-start", waits
                        until that file exists (at most WAIT_LIMIT s,
                        then it records "connect-expired <key>" and
                        goes on): a barrier a test opens by creating
                        the file, so that it knows calls are in the
                        connector without guessing how long they take
    fake_log_thread     log "fake thread <key>" (INFO, logger
                        tests.fakebrick) from a thread spawned the way
                        os-brick spawns them (os_brick.executor.Thread),
                        after any fake_sleep: only inside the daemon
    fake_brick_lock     true: connect takes os-brick's external lock
                        "connect_volume" as its iSCSI connector does
                        (os-brick-connect_volume in lock_path)
    fake_brick_lock_wait  a path: the same, and connect holds that lock
                        (recording "connect-locked <key>") until the
                        file exists (at most WAIT_LIMIT s): a slow,
                        healthy holder
    fake_blind_disconnect  true: a disconnect without device_info is
                        taken (the test kills the caller between the
                        connect and its record; see below)
    fake_command_wait   a path: connect (after any fake_sleep) runs a
                        command that waits until that file exists,
                        through os-brick's rootwrap.execute as os-brick
                        runs iscsiadm (a command hung on a dead
                        portal; its argv ends with "fakebrick-command
                        <key>"), then the command "true", then records
                        "connect-after-command <key>": only inside the
                        daemon
    fake_os_brick       true: no fake, os-brick's own connector for the
                        protocol (with a fake iscsiadm on the daemon's
                        PATH: real os-brick code paths)
    fake_key            the state key (see above)

Disconnect is idempotent: disconnecting what is not connected succeeds,
as os-brick's connectors mostly do.  Disconnecting what is connected
needs the ``device_info`` its connect returned, equal in every field
(``_check_device_info`` says which field each os-brick connector uses):
anything else fails ("disconnect-wrong <key>" in calls.log, the
connection kept), so that a caller losing or mixing up its attachment
record shows.  A disconnect with no device_info at all is what a caller
that died between the connect and its record can do: taken only with
``fake_blind_disconnect`` ("disconnect-blind <key>"), and then, as
os-brick's RBD connector, the conf it wrote stays (``confs()``).  After
``reboot()`` (host_fixtures.new_boot) a connection of the earlier boot is
disconnected with its device_info or none.

RBD with a ``keyring`` (as cinderlib gives it outside OpenStack): every
connect writes a new ceph conf holding it, as os-brick does
(``tempfile.mkstemp(prefix="brickrbd_")``: /tmp/brickrbd_*, where the
daemon's ``delete_rbd_conf`` deletes), noted in ``conf/<its name>``, and
returns its path as ``attachment["conf"]``; disconnect deletes it only
when device_info names it and the device was there (os-brick's
``disconnect_volume`` deletes it after ``rbd unmap`` only).  A
disconnect takes a device_info whose conf is another of the volume's
confs, still there (``rbd unmap`` needs a
conf with the keyring, any of them); one whose conf is gone fails.
``confs()`` lists those still there, ``remove_confs()`` deletes them
(fixtures, at teardown).
"""

import hashlib
import json
import logging
import os
import tempfile
import time

ENV_DIR = "MANAGEDVOLUME_FAKEBRICK_DIR"

log = logging.getLogger("tests.fakebrick")

FAKED = ("iscsi", "fibre_channel", "rbd", "nvmeof")

WAIT_LIMIT = 60.0


class FakeConnectorError(Exception):
    """What a failing fake connector raises (like os-brick's errors)."""


def get_connector(protocol, connection_info, root_helper, **kw):
    """Return a fake connector for ``protocol``, or None to use os-brick."""
    protocol = (protocol or "").lower()
    if ((connection_info or {}).get("data") or {}).get("fake_os_brick"):
        return None
    if protocol in ("iscsi", "fibre_channel"):
        return FakeSCSIConnector(protocol)
    if protocol == "rbd":
        return FakeRBDConnector()
    if protocol == "nvmeof":
        return FakeNVMeConnector()
    if protocol == "local" and any(
            ((connection_info or {}).get("data") or {}).get(knob)
            for knob in SlowLocalConnector.KNOBS):
        return SlowLocalConnector(root_helper, **kw)
    return None


def state_dir():
    d = os.environ.get(ENV_DIR)
    if not d:
        raise FakeConnectorError(
            "{} is not set in the privsep daemon's environment"
            .format(ENV_DIR))
    return d


def connected(directory=None):
    """The keys currently "connected" (for tests, in the test process)."""
    return _names(directory, "connected")


def confs(directory=None):
    """The names of the RBD ceph confs connect wrote that are still
    there."""
    return sorted(name for name, note in _conf_notes(directory)
                  if os.path.exists(note["path"]))


def remove_confs(directory=None):
    """Delete the ceph confs connect wrote (for fixtures: they are in the
    temp dir, as os-brick's)."""
    for name, note in _conf_notes(directory):
        _silent_remove(note["path"])


def reboot(directory=None):
    """The host rebooted (for tests): what is connected stays (iscsid
    logs in again at boot, os-brick sets node.startup automatic) but was
    connected in an earlier boot: no connect of this boot returned its
    device_info, and a disconnect may go without it (os-brick then works
    from connection_info) or with the earlier boot's."""
    d = directory or state_dir()
    os.makedirs(os.path.join(d, "earlier"), exist_ok=True)
    for key in connected(d):
        open(os.path.join(d, "earlier", key), "a").close()


def come_back(key, directory=None):
    """Bring back the connection ``key`` that a disconnect ended (for
    tests): os-brick's iSCSI disconnect deletes the node record
    (``iscsiadm -o delete``) without syncing it, so after a power loss
    the record may be back and iscsid logs in at boot (node.startup
    automatic), device and multipath map included.  Then ``reboot()``.
    Returns whether there was such a connection."""
    d = directory or state_dir()
    try:
        with open(os.path.join(d, "disconnected", key)) as f:
            gone = json.load(f)
    except FileNotFoundError:
        return False
    device = os.path.join(d, "devices", key)
    open(device, "a").close()
    if gone["link"]:
        os.makedirs(os.path.dirname(gone["link"]), exist_ok=True)
        _silent_remove(gone["link"])
        os.symlink(gone["target"] or device, gone["link"])
    os.makedirs(os.path.join(d, "connected"), exist_ok=True)
    with open(os.path.join(d, "connected", key), "w") as f:
        json.dump(gone["attachment"], f)
    os.unlink(os.path.join(d, "disconnected", key))
    return True


def set_array_size(key, size, directory=None):
    """Grow (or set) the storage's size of volume ``key`` (for tests): the
    host sees it after its next connect or extend."""
    d = os.path.join(directory or state_dir(), "array")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, key), "w") as f:
        f.write(str(int(size)))


def calls(directory=None):
    """The lines of calls.log (for tests)."""
    try:
        with open(os.path.join(directory or state_dir(), "calls.log")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class FakeConnector:

    protocol = None

    def check_device_info(self, data, key, attachment, device_info):
        _check_device_info(data, key, attachment, device_info)

    def connect_volume(self, data):
        key = self.key(data)
        _record("connect-start", key)
        _wait_for_file(data.get("fake_wait"), "connect", key)
        _sleep(data.get("fake_sleep"))
        if data.get("fake_command_wait"):
            _command_wait(data["fake_command_wait"], key)
        if data.get("fake_log_thread"):
            _log_from_brick_thread(key)
        if data.get("fake_brick_lock") or data.get("fake_brick_lock_wait"):
            from os_brick.initiator.connectors import base
            base.synchronized("connect_volume", external=True)(
                _hold_lock)(key, data.get("fake_brick_lock_wait"))
        if data.get("fake_fail"):
            _record("connect-failed", key)
            raise FakeConnectorError(_failure(data, "fake_fail", "Login"))
        attachment = self.attachment(data, key)
        d = state_dir()
        os.makedirs(os.path.join(d, "connected"), exist_ok=True)
        os.makedirs(os.path.join(d, "devices"), exist_ok=True)
        device = os.path.join(d, "devices", key)
        open(device, "a").close()
        _rescan(device, key)
        link = self.link(data, attachment)
        if link:
            os.makedirs(os.path.dirname(link), exist_ok=True)
            _silent_remove(link)
            os.symlink(data.get("fake_device") or device, link)
        with open(os.path.join(d, "connected", key), "w") as f:
            json.dump(attachment, f)
        _silent_remove(os.path.join(d, "earlier", key))
        _silent_remove(os.path.join(d, "disconnected", key))
        _record("connect", key)
        return attachment

    def disconnect_volume(self, data, device_info, force=False,
                          ignore_errors=False):
        key = self.key(data)
        _record("disconnect-start", key)
        _wait_for_file(data.get("fake_wait_disconnect"), "disconnect", key)
        _sleep(data.get("fake_sleep_disconnect"))
        if data.get("fake_fail_disconnect"):
            _record("disconnect-failed", key)
            raise FakeConnectorError(
                _failure(data, "fake_fail_disconnect", "Logout"))
        d = state_dir()
        path = os.path.join(d, "connected", key)
        try:
            with open(path) as f:
                attachment = json.load(f)
        except FileNotFoundError:
            attachment = None
        earlier = os.path.join(d, "earlier", key)
        if attachment is not None and not (
                os.path.exists(earlier)
                and device_info in (None, {}, attachment)):
            self.check_device_info(data, key, attachment, device_info)
        else:
            attachment = device_info or {}
        link = self.link(data, attachment)
        # os-brick's RBD disconnect unmaps, and deletes its conf, only
        # when "rbd showmapped" lists the image (_find_root_device).
        mapped = not link or os.path.lexists(link)
        if link:
            _silent_remove(link)
        if os.path.exists(path):
            # What a power loss may bring back (come_back).
            os.makedirs(os.path.join(d, "disconnected"), exist_ok=True)
            with open(os.path.join(d, "disconnected", key), "w") as f:
                json.dump({"attachment": attachment, "link": link,
                           "target": data.get("fake_device")}, f)
        # As os-brick's RBD connector: the ceph conf (with the keyring)
        # goes only when device_info names it and the device was there.
        conf = (device_info or {}).get("conf")
        if conf and mapped and any(note["path"] == conf
                                   for _, note in _conf_notes(d)):
            _silent_remove(conf)
        _silent_remove(path)
        _silent_remove(earlier)
        _silent_remove(os.path.join(d, "devices", key))
        _record("disconnect", key)

    def extend_volume(self, data):
        key = self.key(data)
        _record("extend-start", key)
        _sleep(data.get("fake_sleep_extend"))
        if data.get("fake_fail_extend"):
            _record("extend-failed", key)
            raise FakeConnectorError(
                _failure(data, "fake_fail_extend", "Rescan"))
        d = state_dir()
        if not os.path.exists(os.path.join(d, "connected", key)):
            _record("extend-failed", key)
            raise FakeConnectorError(
                "Couldn't find any volume paths on the host to extend "
                "volume {}".format(key))
        if data.get("fake_device"):
            from vdsm_managedvolume import devices
            size = devices.size(data["fake_device"])
        else:
            size = _rescan(os.path.join(d, "devices", key), key)
        _record("extend", key)
        return size

    def key(self, data):
        return data.get("fake_key") or self._key(data).replace("/", "_")


class FakeSCSIConnector(FakeConnector):
    """iSCSI / Fibre Channel with multipath, as os-brick reports them."""

    def __init__(self, protocol):
        self.protocol = protocol

    def _key(self, data):
        if self.protocol == "iscsi":
            target = data.get("target_iqn") or data.get("target_iqns")
        else:
            target = data.get("target_wwn")
        return "{}-{}-{}".format(self.protocol, _flat(target),
                                 data.get("target_lun", 0))

    def attachment(self, data, key):
        digest = hashlib.sha1(key.encode()).hexdigest()
        wwn = data.get("fake_wwn") or "36001405" + digest[:24]
        if data.get("fake_no_multipath"):
            att = {"type": "block",
                   "path": "/dev/sd" + chr(ord("a") + int(digest, 16) % 26)}
            if not data.get("fake_no_wwn"):
                att["scsi_wwn"] = wwn
            return att
        att = {"type": "block",
               "multipath_id": wwn,
               "path": "/dev/dm-{}".format(int(digest[:6], 16) % 1000)}
        if not data.get("fake_no_wwn"):
            att["scsi_wwn"] = wwn
        return att

    def link(self, data, attachment):
        dev_dir = data.get("fake_dev_dir")
        mpath = attachment.get("multipath_id")
        if dev_dir and mpath:
            return os.path.join(dev_dir, mpath)
        return None


class FakeRBDConnector(FakeConnector):
    """RBD with do_local_attach: the kernel's /dev/rbd/<pool>/<volume>."""

    protocol = "rbd"

    def _key(self, data):
        return "rbd-" + str(data.get("name", ""))

    def attachment(self, data, key):
        att = {"type": "block",
               "path": "/dev/rbd/{}".format(data.get("name", ""))}
        if data.get("keyring"):
            # os-brick's _local_attach_volume outside OpenStack: at every
            # connect a new ceph conf holding the keyring (its
            # _create_ceph_conf), returned as "conf" and deleted by a
            # disconnect given it.
            fd, att["conf"] = tempfile.mkstemp(prefix="brickrbd_")
            with os.fdopen(fd, "w") as f:
                f.write("[global]\nmon_host = {}\n{}\n".format(
                    ",".join(data.get("hosts") or ()), data["keyring"]))
            notes = os.path.join(state_dir(), "conf")
            os.makedirs(notes, exist_ok=True)
            with open(os.path.join(notes, os.path.basename(att["conf"])),
                      "w") as f:
                json.dump({"path": att["conf"], "key": key}, f)
        return att

    def check_device_info(self, data, key, attachment, device_info):
        """As os-brick's: ``rbd unmap`` (and ``rbd showmapped``) take
        the conf given, whichever connect wrote it, as long as it is
        there (it holds the keyring)."""
        conf = (device_info or {}).get("conf")
        if conf and conf != attachment.get("conf") and any(
                note["path"] == conf and note["key"] == key
                for _, note in _conf_notes(None)):
            if not os.path.exists(conf):
                _record("disconnect-wrong", key)
                raise FakeConnectorError(
                    "disconnect of {}: its ceph conf {} is gone".format(
                        key, conf))
            device_info = dict(device_info, conf=attachment.get("conf"))
        _check_device_info(data, key, attachment, device_info)

    def link(self, data, attachment):
        dev_dir = data.get("fake_dev_dir")
        name = data.get("name")
        if dev_dir and name:
            return os.path.join(dev_dir, *name.split("/"))
        return None


class FakeNVMeConnector(FakeConnector):
    """NVMe-oF: os-brick returns the namespace's block device path."""

    protocol = "nvmeof"

    def _key(self, data):
        return "nvmeof-" + str(data.get("target_nqn", ""))

    def attachment(self, data, key):
        dev_dir = data.get("fake_dev_dir")
        if dev_dir and data.get("fake_kernel_name"):
            path = os.path.join(dev_dir, os.path.basename(
                os.path.realpath(data["fake_device"])))
        elif dev_dir:
            path = os.path.join(dev_dir, "nvme-" + key)
        else:
            path = "/dev/nvme0n1"
        return {"type": "block", "path": path}

    def link(self, data, attachment):
        if data.get("fake_dev_dir"):
            return attachment["path"]
        return None


# Private helpers

class SlowLocalConnector:
    """os-brick's own ``local`` connector, slowed down: its connect first
    records "connect-start <key>", then waits for ``fake_wait`` and
    sleeps ``fake_sleep``, then runs os-brick's connect and records
    "connect <key>"; its disconnect and extend likewise record
    "disconnect-start"/"extend-start", wait for ``fake_wait_disconnect``/
    ``fake_wait_extend``, run os-brick's, and record "disconnect"/
    "extend".  A storage that takes its time (the flow tests' loop
    devices, which os-brick's local connector returns at once), or a
    call a test holds in the connector, under the volume's lock, while
    another call of the volume comes in; everything else is os-brick's.
    ``<key>``: ``fake_key``, else "local-" and the device's name."""

    KNOBS = ("fake_wait", "fake_sleep", "fake_wait_disconnect",
             "fake_wait_extend")

    def __init__(self, root_helper, **kw):
        from os_brick.initiator import connector
        self._brick = connector.InitiatorConnector.factory(
            "local", root_helper, **kw)

    def __getattr__(self, name):
        return getattr(self._brick, name)

    def connect_volume(self, data):
        key = self._key(data)
        _record("connect-start", key)
        _wait_for_file(data.get("fake_wait"), "connect", key)
        _sleep(data.get("fake_sleep"))
        attachment = self._brick.connect_volume(data)
        _record("connect", key)
        return attachment

    def disconnect_volume(self, data, device_info, *args, **kwargs):
        key = self._key(data)
        _record("disconnect-start", key)
        _wait_for_file(data.get("fake_wait_disconnect"), "disconnect", key)
        self._brick.disconnect_volume(data, device_info, *args, **kwargs)
        _record("disconnect", key)

    def extend_volume(self, data, *args, **kwargs):
        key = self._key(data)
        _record("extend-start", key)
        _wait_for_file(data.get("fake_wait_extend"), "extend", key)
        size = self._brick.extend_volume(data, *args, **kwargs)
        _record("extend", key)
        return size

    @staticmethod
    def _key(data):
        return data.get("fake_key") or "local-" + os.path.basename(
            str(data.get("device_path")))


def _check_device_info(data, key, attachment, device_info):
    """Refuse a disconnect not given what connect returned, as os-brick's
    connectors need it: iSCSI and FC take ``path`` for the device the
    I/O went through (``utils.get_dev_path``: whether it was a multipath,
    which single path to flush; without it nothing is flushed), NVMe-oF
    ``path`` for the namespace to flush (without it, searched from the
    target: "assuming it's not there"), RBD ``conf`` for the ceph conf
    it wrote with the keyring (``rbd unmap`` needs it; deleted only when
    given) and, without a local attach, ``path`` for the handle to
    close; every connector's ``connect_volume_undo_prepare_result``
    ``path`` (an encrypted volume's link).

    Without device_info (the connect's answer never reached the caller:
    it died, or lost power, between the connect and its record) os-brick
    does what it can from connection_info alone: allowed only with the
    knob ``fake_blind_disconnect`` (the test crashes the caller there).
    """
    if not device_info:
        if data.get("fake_blind_disconnect"):
            _record("disconnect-blind", key)
            return
        _record("disconnect-wrong", key)
        raise FakeConnectorError(
            "disconnect of {} got no device_info; connect returned {!r}"
            .format(key, attachment))
    given = dict(device_info)
    if given != attachment:
        _record("disconnect-wrong", key)
        raise FakeConnectorError(
            "disconnect of {} got device_info {!r}; connect returned {!r}"
            .format(key, given, attachment))


def _conf_notes(directory):
    """[(name, {"path", "key"})] of the ceph confs connect wrote."""
    d = os.path.join(directory or state_dir(), "conf")
    notes = []
    for name in _names(directory, "conf"):
        try:
            with open(os.path.join(d, name)) as f:
                notes.append((name, json.load(f)))
        except (OSError, ValueError):
            continue
    return notes


def _names(directory, kind):
    try:
        return sorted(os.listdir(os.path.join(directory or state_dir(),
                                              kind)))
    except FileNotFoundError:
        return []


def _flat(value):
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _failure(data, knob, what):
    value = data.get(knob)
    if isinstance(value, str):
        return value
    return ("{} failed for target {}: authentication with "
            "auth_username={} auth_password={} refused".format(
                what, data.get("target_iqn") or data.get("name"),
                data.get("auth_username"), data.get("auth_password")))


def _log_from_brick_thread(key):
    from os_brick import executor
    t = executor.Thread(target=log.info, args=("fake thread %s", key))
    t.start()
    t.join()


def _hold_lock(key, release):
    if release:
        _record("connect-locked", key)
        _wait_for_file(release, "connect-locked", key)


def _rescan(device, key):
    """Give the device stand-in the storage's size (when one is set);
    return its size."""
    try:
        with open(os.path.join(state_dir(), "array", key)) as f:
            size = int(f.read())
    except FileNotFoundError:
        return os.path.getsize(device)
    with open(device, "r+b") as f:
        f.truncate(size)
    return size


def _command_wait(path, key):
    from os_brick.privileged import rootwrap
    rootwrap.execute(
        "sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.05; done', path,
        "fakebrick-command", key, run_as_root=True)
    rootwrap.execute("true", run_as_root=True)
    _record("connect-after-command", key)


def _sleep(seconds):
    if seconds:
        time.sleep(float(seconds))


def _wait_for_file(path, step, key):
    """Wait for the barrier ``path`` at most WAIT_LIMIT s; when it was
    not opened by then, record "<step>-expired <key>" (a test's failure
    then names the barrier it held and how long it held it) and go on."""
    if not path:
        return
    deadline = time.monotonic() + WAIT_LIMIT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    if not os.path.exists(path):
        log.warning("%s %s: barrier %s not opened within %s s: going on",
                    step, key, path, WAIT_LIMIT)
        _record(step + "-expired", key)


def _record(what, key):
    d = state_dir()
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "calls.log"), "a") as f:
        f.write("{} {}\n".format(what, key))


def _silent_remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
