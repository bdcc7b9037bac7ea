# Installed by vdsm-managedvolume-vdsm for vdsmd only: the drop-in
# /usr/lib/systemd/system/vdsmd.service.d/50-managedvolume.conf puts this
# directory first on vdsmd's PYTHONPATH.  It only installs an import hook
# (api.install_vdsm_hook); the ManagedVolume verbs are registered when vdsm
# builds its JSON-RPC bridge.  See docs/vdsm-integration.md.
try:
    from vdsm_managedvolume import api
    api.install_vdsm_hook()
except Exception as e:  # vdsm must start whatever happens here
    import sys
    sys.stderr.write("vdsm-managedvolume: not registered: %s\n" % e)
