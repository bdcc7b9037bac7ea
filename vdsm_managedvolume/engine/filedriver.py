"""FileDriver: a cinder volume driver keeping each volume in a sparse file.

No in-tree cinder driver works on a machine without device-mapper, iSCSI,
NFS or RBD, yet the whole chain (engine shim -> cinderlib -> host agent ->
os-brick -> a block device a VM could use) should run on one laptop.  This
driver is the smallest real backend that makes that possible::

    file_volume_dir/
        volume-<uuid>      one sparse file per volume, size = volume.size GiB
        snapshot-<uuid>    a point-in-time copy of its volume's file

Copies (snapshots, clones, volumes from snapshots) are reflinks where the
filesystem can share extents, sparse copies otherwise (``volumefile``).

Connections use the ``local`` protocol, which os-brick's LocalConnector
attaches as ``data.device_path`` without looking further:

- ``file_volume_use_loop = false`` (default): the path of the file itself;
  fine for reading and writing through the host's ``managed_path`` symlink.
- ``file_volume_use_loop = true`` (root): a loop device backed by the file,
  a real block device.  Every connection of a volume shares its one device
  (on one machine both ends of a live migration are the same host); extend
  resizes it online; remove_export, or delete, detaches it.

The loop device is the volume's one export, as an LVM volume's iSCSI
target is: ``terminate_connection`` only answers whether another host's
connection still shares it (True/False, cinder's contract), and
``remove_export`` takes it away.  A caller that removes the export while
another connection is left (cinderlib's ``Connection.disconnect()`` does)
cuts that host's device, as it would with LVM.

Options, in the backend's driver JSON beside ``volume_driver``::

    {"volume_driver": "vdsm_managedvolume.engine.filedriver.FileDriver",
     "volume_backend_name": "file",
     "file_volume_dir": "/var/lib/managedvolume-file",
     "file_volume_use_loop": false}
"""

import glob
import logging
import os

from oslo_config import cfg

from cinder import exception
from cinder.volume import configuration
from cinder.volume import driver

from . import volumefile

log = logging.getLogger(__name__)

GiB = 1024**3

file_opts = [
    cfg.StrOpt("file_volume_dir",
               default="/var/lib/managedvolume-file",
               help="Directory holding one sparse file per volume "
                    "(an absolute path)."),
    cfg.BoolOpt("file_volume_use_loop",
                default=False,
                help="Expose volumes as loop devices (needs root) instead "
                     "of the file paths."),
]

cfg.CONF.register_opts(file_opts, group=configuration.SHARED_CONF_GROUP)


class FileDriver(driver.VolumeDriver):
    """Volumes as sparse files, optionally behind loop devices."""

    VERSION = "1.0.0"
    CI_WIKI_NAME = "vdsm-managedvolume"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(file_opts)
        self._dir = None
        self._use_loop = False

    # Setup

    def do_setup(self, context):
        path = self.configuration.file_volume_dir
        if not os.path.isabs(path or ""):
            # Resolved against the working directory, a cold command and
            # the warm service (whose cwd is /) would use two directories.
            raise exception.VolumeBackendAPIException(
                data="file_volume_dir {!r} is not an absolute path".format(
                    path))
        self._dir = os.path.abspath(path)
        self._use_loop = bool(self.configuration.file_volume_use_loop)
        os.makedirs(self._dir, exist_ok=True)

    def check_for_setup_error(self):
        if not os.access(self._dir, os.W_OK | os.X_OK):
            raise exception.VolumeBackendAPIException(
                data="file_volume_dir {} is not writable".format(self._dir))
        if self._use_loop and not os.path.exists("/dev/loop-control"):
            raise exception.VolumeBackendAPIException(
                data="file_volume_use_loop needs loop devices "
                     "(/dev/loop-control is missing)")

    # Volumes

    def create_volume(self, volume):
        path = self._volume_path(volume)
        log.info("Creating %s GiB volume file %s", volume.size, path)
        volumefile.create(path, volume.size * GiB)

    def delete_volume(self, volume):
        path = self._volume_path(volume)
        for dev in volumefile.loop_devices(path):
            _call(volumefile.loop_detach, dev)
        log.info("Deleting volume file %s", path)
        volumefile.remove(path)

    def extend_volume(self, volume, new_size):
        path = self._volume_path(volume)
        log.info("Extending volume file %s to %s GiB", path, new_size)
        volumefile.grow(path, new_size * GiB)
        for dev in volumefile.loop_devices(path):
            # Online: whoever uses the device sees the new size now.
            _call(volumefile.loop_resize, dev)

    def create_cloned_volume(self, volume, src_vref):
        dst = self._volume_path(volume)
        volumefile.copy(self._volume_path(src_vref), dst)
        volumefile.grow(dst, volume.size * GiB)

    # Snapshots

    def create_snapshot(self, snapshot):
        volumefile.copy(self._volume_path(snapshot.volume),
                        self._snapshot_path(snapshot))

    def delete_snapshot(self, snapshot):
        volumefile.remove(self._snapshot_path(snapshot))

    def create_volume_from_snapshot(self, volume, snapshot):
        # cinderlib leaves growing to the driver (docs/dependencies.md,
        # "cinderlib"): the new volume may be larger than the snapshot's
        # volume was.
        dst = self._volume_path(volume)
        volumefile.copy(self._snapshot_path(snapshot), dst)
        volumefile.grow(dst, volume.size * GiB)

    # Exports and connections

    def ensure_export(self, context, volume):
        pass

    def create_export(self, context, volume, connector):
        pass

    def remove_export(self, context, volume):
        if not self._use_loop:
            return
        for dev in volumefile.loop_devices(self._volume_path(volume)):
            _call(volumefile.loop_detach, dev)

    def initialize_connection(self, volume, connector, **kwargs):
        path = self._volume_path(volume)
        if not os.path.exists(path):
            raise exception.VolumeBackendAPIException(
                data="volume file {} is missing".format(path))
        if self._use_loop:
            devices = volumefile.loop_devices(path)
            device_path = (devices[0] if devices
                           else _call(volumefile.loop_attach, path))
        else:
            device_path = path
        return {"driver_volume_type": "local",
                "data": {"device_path": device_path}}

    def terminate_connection(self, volume, connector, **kwargs):
        """Whether the export stays shared with another host's connection:
        nothing else to end per host (the ``local`` protocol has no
        per-host mapping), the export goes with ``remove_export``."""
        return connector is not None and _other_hosts(volume, connector)

    # Stats

    def _update_volume_stats(self):
        st = os.statvfs(self._dir)
        provisioned = 0
        for path in glob.glob(os.path.join(self._dir, "volume-*")):
            try:
                provisioned += os.stat(path).st_size
            except FileNotFoundError:
                pass
        self._stats = {
            "volume_backend_name": (
                self.configuration.safe_get("volume_backend_name") or "file"),
            "vendor_name": "vdsm-managedvolume",
            "driver_version": self.VERSION,
            "storage_protocol": "local",
            "total_capacity_gb": round(st.f_blocks * st.f_frsize / GiB, 2),
            "free_capacity_gb": round(st.f_bavail * st.f_frsize / GiB, 2),
            "provisioned_capacity_gb": round(provisioned / GiB, 2),
            "thin_provisioning_support": True,
            "thick_provisioning_support": False,
            "max_over_subscription_ratio": 20.0,
            "reserved_percentage": 0,
            "multiattach": True,
        }

    # Private helpers

    def _volume_path(self, volume):
        return os.path.join(self._dir, "volume-{}".format(volume.id))

    def _snapshot_path(self, snapshot):
        return os.path.join(self._dir, "snapshot-{}".format(snapshot.id))


def _other_hosts(volume, connector):
    """Whether ``volume`` stays connected to a host other than ``connector``'s.

    terminate_connection is called before the connection's record is
    deleted (by cinderlib, and by the shim's ``ops._end``), so the
    attachment being removed is still in the list.
    """
    host = connector.get("host")
    try:
        attachments = list(volume.volume_attachment or ())
    except Exception:
        return False
    for att in attachments:
        info = att.connection_info or {}
        if info.get("conn") and (info.get("connector") or {}).get(
                "host") != host:
            return True
    return False


def _call(func, *args):
    """Run a volumefile command, failing the way cinder drivers fail."""
    try:
        return func(*args)
    except volumefile.CommandFailed as e:
        raise exception.VolumeBackendAPIException(data=str(e))
