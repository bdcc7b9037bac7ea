"""udev rules giving qemu's user the devices of managed volumes.

A connected device belongs to root; qemu runs as ``qemu`` and needs to open
it.  Like vdsm, we write one rule file per volume::

    /etc/udev/rules.d/99-vdsm-managed_<sd_id>_<vol_id>.rules

holding one line that matches the device and runs chown on it::

    SYMLINK=="mapper/3600a0b8", RUN+="/usr/bin/chown vdsm:qemu $env{DEVNAME}"
    SYMLINK=="rbd/pool/vol-1", RUN+="/usr/bin/chown vdsm:qemu $env{DEVNAME}"
    KERNEL=="nvme0n3", RUN+="/usr/bin/chown vdsm:qemu $env{DEVNAME}"

(the last one, since ours, with a guard: ``KERNEL=="nvme0n3",
ATTR{wwid}=="eui.0025385b71b07e2f", RUN+=...``, see below)

How the device is matched is the transports' business
(``transports.udev_match``, from the path alone): ``SYMLINK==`` for
device-mapper and rbd paths (they are symlinks to ``dm-N`` / ``rbdN``,
whose kernel names change on every connect), and for any other path that
is a symlink; ``KERNEL==`` for a plain ``/dev/xxx``.  The value is the
path relative to ``/dev``, as udev spells it.  This module keeps the
file: its name, its one line, how it is written, checked and removed.

A kernel name is not the volume's: the kernel gives it to the next
device that comes (NVMe's ``nvmeXnY`` in connect order at each boot, a
loop minor when its file is detached), and a rule outlives its device
(a vanished device's record is kept, and files in /etc/udev/rules.d
survive a reboot: udev's coldplug applies them before the agent starts
and reconciles).  A bare ``KERNEL==`` rule (vdsm's) then gives whatever
device takes the name to qemu's user (the class of OSSA-2023-003).  So a
``KERNEL==`` rule also matches a sysfs attribute of the device the rule
was written for (``ATTR{...}``, read by udev from the same sysfs file):
the first the device has (``GUARDS``) in a value a rule can hold (no
quote, space or glob character): its loop backing file, its WWID
(NVMe's ``wwid``: the same namespace in every boot), its serial, and
only then its ``diskseq`` (Linux 5.15+), never given twice within a
boot but counted afresh at each one (so a rule of an ended boot
guarded by it alone may still match by chance at coldplug, until
reconcile removes it).  A device with none of them (an older kernel, a
device without an identity) gets vdsm's bare rule.
This guard was chosen over removing rules once their device is seen
gone: the rule fires on the udev event of the device that takes the
name, and at coldplug, before anything of ours can see the old device
gone; the guard makes a leftover rule match nothing else whenever it
runs.  (Reconcile also removes a bare ``KERNEL==`` rule of a record
whose device is gone, and keeps a guarded one, which can only ever give
that device back its owner: ``service``.)  The file name is vdsm's and
the contract's, and the match still starts with ``KERNEL==``.
``SYMLINK==`` rules need no guard: the link is the volume's own name (a
multipath WWID, the rbd pool/image, StorPool's global id).

Never ``OWNER``/``GROUP``/``MODE``: udev then resets the SELinux label to
the default and running VMs pause (https://bugzilla.redhat.com/1147910).

After writing the rule, a "change" event for the device makes udev apply
it now.  For a block device we write ``change`` to its
``/sys/dev/block/MAJ:MIN/uevent`` ourselves: that is exactly what
``udevadm trigger --action=change <path>`` does for one device, without
the ~2 ms fork and exec (it was 40% of an attach).  Anything else (no
sysfs entry, not a block device) falls back to running udevadm, on the
CPUs the privsep daemon runs its commands on, not on the agent's one
core (``[privsep] daemon_cpu_affinity``, ``affinity``).  The
trigger is bounded by a timeout, and a missing udevadm or a failing
trigger is a warning, not a failure: the device is connected and
correct, only its owner may lag until the next event.

Who calls this module: the service itself when it is root; otherwise
(inside vdsm, user vdsm) the privsep daemon, through its narrow
``add_udev_rule`` / ``remove_udev_rule`` entrypoints (brick.py), which
check the ids and the path (``check_device_path``) first.  Reading rules
(``rule_ok``, ``list_rules``) needs no privilege.

Rules are written atomically (temp file + rename): udev reads rule files
at any time and must never see half a line.  The temp name does not end
in ``.rules``, so udev ignores it.

They are not fsync'ed, by choice, and the journal write that follows
them does not wait for them: a rule matters only in the boot that wrote
it, while its device is connected.  A crash of the agent loses nothing
(the kernel has the file).  A crash of the host ends the boot and the
connection with it: at the next start every record is from another boot,
and reconcile removes its rule (and link) whatever became of the file
(complete, empty, missing; a torn line is one udev refuses to parse, and
is removed the same way).  A durable rule would only make a rule of the
ended boot, naming a device name the new boot may give to another device,
more likely to be there at the next boot (at coldplug, before that
reconcile: the ``KERNEL==`` guard above is what keeps such a rule to its
own device).  Within one boot ``rule_ok``
finds a rule that is missing or not the expected line, and reconcile
writes it again.
"""

import logging
import os
import re
import subprocess

from . import affinity
from . import devices
from . import fileutil
from . import gate
from . import transports

log = logging.getLogger("managedvolume.udev")

PREFIX = "99-vdsm-managed_"
SUFFIX = ".rules"
TRIGGER_TIMEOUT = 10.0

_RULE_NAME_RE = re.compile(
    r"99-vdsm-managed_(?P<sd_id>[0-9a-f-]{36})_(?P<vol_id>[0-9a-f-]{36})"
    r"\.rules\Z")
_TEMP_NAME_RE = re.compile(
    r"\.99-vdsm-managed_(?P<sd_id>[0-9a-f-]{36})_(?P<vol_id>[0-9a-f-]{36})"
    r"\.rules\.tmp\Z")

# Characters allowed in a matched device name: a quote or a newline in a
# path coming back from a connector must not become a second rule running
# as root.
_SAFE_DEVICE_RE = re.compile(r"[A-Za-z0-9/._:+@=,-]+\Z")

# The sysfs attributes (of /sys/dev/block/MAJ:MIN) a KERNEL== rule also
# matches, the first one the device has (see the module docstring).
GUARDS = ("loop/backing_file", "wwid", "serial", "diskseq")


class UnsafePath(ValueError):
    """The device path cannot be put in a udev rule safely."""


def rule_path(rules_dir, sd_id, vol_id):
    return fileutil.join(rules_dir, "{}{}_{}{}".format(
        PREFIX, sd_id, vol_id, SUFFIX))


def rule_text(path, owner, chown, cfg=None, number=None, backing=None):
    """The rule line matching ``path`` and chown-ing it to ``owner``.

    How the device is matched is ``transports.udev_match`` (``cfg``'s
    multipath and rbd directories; None: the defaults under /dev); a
    ``KERNEL==`` match is guarded by an attribute of the device now at
    ``path`` (``guard``; ``number``: its (major, minor), ``backing``: a
    loop device's backing file, when the caller has just read them).
    """
    key, device = transports.udev_match(path, cfg)
    for value, what in ((device, "device path"), (owner, "owner"),
                        (chown, "chown command")):
        if not _SAFE_DEVICE_RE.match(value or ""):
            raise UnsafePath("unsafe {} for a udev rule: {!r}".format(
                what, value))
    return '{}=="{}", {}RUN+="{} {} $env{{DEVNAME}}"\n'.format(
        key, device, guard(path, number, backing) if key == "KERNEL"
        else "",
        chown, owner)


def guard(path, number=None, backing=None):
    """``ATTR{name}=="value", `` of the first of ``GUARDS`` the block
    device at ``path`` has in a value a rule can hold; "" when there is
    no block device or none of them (``number``: its (major, minor),
    ``backing``: its ``loop/backing_file``, when the caller has just
    read them: an attach has, for its device's identity, and the
    attribute is not read again)."""
    if number is None:
        number = devices.device_number(path)
        if number is None:
            return ""
    for name in GUARDS:
        if backing and name == "loop/backing_file":
            value = backing
        else:
            value = _read_attr(devices.sysfs_path(*number, name))
        if value and _SAFE_DEVICE_RE.match(value):
            return 'ATTR{{{}}}=="{}", '.format(name, value)
    return ""


def temp_path(rules_dir, sd_id, vol_id):
    """Where ``add_rule`` writes the rule before renaming it."""
    return fileutil.join(rules_dir, ".{}.tmp".format(
        rule_path(rules_dir, sd_id, vol_id).rpartition("/")[2]))


def parse_temp_name(name):
    """(sd_id, vol_id) of a temp file name written by ``add_rule``, or
    None for any other name."""
    m = _TEMP_NAME_RE.match(name)
    return (m.group("sd_id"), m.group("vol_id")) if m else None


def check_device_path(path, device_dirs=("/dev",)):
    """Raise UnsafePath unless ``path`` is a normalised absolute path under
    one of ``device_dirs``, in characters a rule can hold.

    The privileged daemon writes rules for an unprivileged caller: this is
    what keeps it to rules about devices (no ``..``, no ``/etc/shadow``).
    """
    if (not isinstance(path, str) or not os.path.isabs(path)
            or os.path.normpath(path) != path
            or not _SAFE_DEVICE_RE.match(path)):
        raise UnsafePath("unsafe device path for a udev rule: {!r}".format(
            path))
    if not any(fileutil.is_under(path, d) for d in device_dirs):
        raise UnsafePath("device path {!r} is not under {}".format(
            path, ", ".join(device_dirs)))
    return path


def add_rule(cfg, sd_id, vol_id, path, number=None, backing=None):
    """Write the rule of a volume atomically (mode 0644); return its path.

    Five system calls: open the temp file, fchmod (the umask must not
    decide the mode), one write, close, rename (and, for a ``KERNEL==``
    rule, the reads of its guard).  The rules directory is made only
    when it is missing.  ``number``: the device's (major, minor) when
    the caller has just read it, ``backing`` a loop device's backing
    file (``guard``).
    """
    text = rule_text(path, cfg.udev_owner, cfg.chown, cfg, number, backing)
    dst = rule_path(cfg.udev_rules_dir, sd_id, vol_id)
    tmp = temp_path(cfg.udev_rules_dir, sd_id, vol_id)
    # O_NOFOLLOW: a symlink planted under the temp name must not make us
    # (root) truncate its target.
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
             | os.O_NOFOLLOW)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(cfg.udev_rules_dir, mode=0o755, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.rename(tmp, dst)
    log.debug("Created udev rule %s: %r", dst, text)
    return dst


def remove_rule(cfg, sd_id, vol_id, temp=False):
    """Remove the rule of a volume (``temp``: the leftover temp file of
    an interrupted ``add_rule`` instead); return whether there was one."""
    if temp:
        dst = temp_path(cfg.udev_rules_dir, sd_id, vol_id)
    else:
        dst = rule_path(cfg.udev_rules_dir, sd_id, vol_id)
    try:
        os.unlink(dst)
    except FileNotFoundError:
        return False
    log.debug("Removed udev rule %s", dst)
    return True


def has_rule(cfg, sd_id, vol_id):
    return os.path.exists(rule_path(cfg.udev_rules_dir, sd_id, vol_id))


def bare_kernel_rule(cfg, sd_id, vol_id):
    """Whether the volume has a rule matching a kernel name with no guard
    (``KERNEL==`` and no ``ATTR{...}``: vdsm's rule, or ours for a device
    with nothing to guard it by)."""
    try:
        with open(rule_path(cfg.udev_rules_dir, sd_id, vol_id)) as f:
            text = f.read(4096)     # one line: the rule is ours
    except OSError:
        return False
    return text.startswith("KERNEL==") and "ATTR{" not in text


def rule_ok(cfg, sd_id, vol_id, path):
    """Whether the volume's rule exists and is exactly the rule for
    ``path`` (not torn, not stale, not edited)."""
    try:
        with open(rule_path(cfg.udev_rules_dir, sd_id, vol_id)) as f:
            current = f.read()
        expected = rule_text(path, cfg.udev_owner, cfg.chown, cfg)
    except (OSError, UnsafePath):
        return False
    return current == expected


def list_rules(cfg):
    """[(sd_id, vol_id, file path)] of every managed volume rule file."""
    try:
        names = os.listdir(cfg.udev_rules_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        m = _RULE_NAME_RE.match(name)
        if m:
            found.append((m.group("sd_id"), m.group("vol_id"),
                          os.path.join(cfg.udev_rules_dir, name)))
    return found


def list_temp_files(cfg):
    """Leftover temp files of an interrupted ``add_rule``."""
    try:
        names = os.listdir(cfg.udev_rules_dir)
    except FileNotFoundError:
        return []
    return [os.path.join(cfg.udev_rules_dir, n) for n in sorted(names)
            if n.startswith("." + PREFIX) and n.endswith(".tmp")]


def trigger(cfg, path, timeout=TRIGGER_TIMEOUT, number=None):
    """Send a "change" uevent for the device at ``path``; return success.

    ``number``: the device's (major, minor) when the caller has just read
    it (``devices.block_number``); None: looked up here.
    Failures are logged as warnings and reported as False, never raised.
    """
    uevent = _sysfs_uevent(path, number)
    if uevent is not None:
        try:
            _write_uevent(uevent)
            return True
        except FileNotFoundError:
            pass    # no sysfs entry (sysfs not mounted, a container)
        except OSError as e:
            log.debug("Cannot write %s (%s), trying udevadm", uevent, e)
    return _udevadm_trigger(cfg, path, timeout)


def _sysfs_uevent(path, number=None):
    """``/sys/dev/block/MAJ:MIN/uevent`` of a block device, or None.
    Whether it exists is found by opening it (``_write_uevent``)."""
    if number is None:
        number = devices.device_number(path)
        if number is None:
            return None
    return devices.sysfs_path(*number, "uevent")


def _write_uevent(uevent):
    """Write "change" to a sysfs ``uevent`` file: open, one write, close
    (no buffered text file; sysfs must not be created in or truncated)."""
    fd = os.open(uevent, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"change")
    finally:
        os.close(fd)


def _udevadm_trigger(cfg, path, timeout):
    cmd = [cfg.udevadm, "trigger", "--action=change", path]
    # Not on the agent's one core: where the privsep daemon runs its
    # commands, as vdsm runs every command it starts on every CPU
    # (``affinity``; in the daemon, and in an agent not pinned, nothing
    # changes).
    cpus = affinity.daemon_cpus(cfg.daemon_cpu_affinity)
    try:
        with gate.released(), affinity.spawning_on(cpus, "udevadm",
                                                   quiet=True):
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, timeout=timeout)
    except FileNotFoundError:
        log.warning("Cannot trigger udev for %s: %s not found; the device "
                    "owner may be updated only on the next udev event",
                    path, cfg.udevadm)
        return False
    except subprocess.TimeoutExpired:
        log.warning("udevadm trigger for %s did not finish within %s "
                    "seconds", path, timeout)
        return False
    except OSError as e:
        log.warning("Cannot run %s: %s", cfg.udevadm, e)
        return False
    if res.returncode != 0:
        log.warning("udevadm trigger for %s failed (rc=%d): %s", path,
                    res.returncode, res.stderr.decode("utf-8", "replace")
                    .strip())
        return False
    return True


# Private helpers

def _read_attr(path):
    """A sysfs attribute, stripped (udev ignores trailing whitespace
    too); None when it is absent or unreadable.  One read: an attribute
    is a page at most."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
