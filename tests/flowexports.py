"""The backend of the flows whose shim is killed mid-command.

tests.engine_kill_test's ExportingDriver (per-volume exports and
per-host grants kept in ``exports.json``, every driver call and database
write a numbered step, the process SIGKILLed at the step ``kill-at``
names), on the FileDriver's loop devices, so that real agents attach
what it grants: its ``remove_export`` also detaches the volume's loop
device, as the FileDriver's does (the loop device is the volume's one
export, filedriver.py).  Built in the shim's processes that import it by
name (``flowengine.exporting_backend``); importing this module imports
nothing of cinder.
"""


def __getattr__(name):
    if name != "ExportingDriver":
        raise AttributeError(name)
    from vdsm_managedvolume.engine.filedriver import FileDriver

    from . import engine_kill_test

    class ExportingDriver(engine_kill_test.ExportingDriver):
        def remove_export(self, context, volume):
            # One step: the export and its loop device go together.
            with engine_kill_test._step(self._dir, "remove_export"):
                FileDriver.remove_export(self, context, volume)
                self._change(volume.id, export=False)

    return ExportingDriver
