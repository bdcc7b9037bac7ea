"""volumelock: one shim command at a time per volume (in this process:
flock conflicts between two open files of one process as between two
processes; tests/engine_ops_test.py runs it across real commands)."""

import os
import stat

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume.engine import volumelock


def test_a_locks_directory_removed_since_setup_is_made_again(tmp_path):
    # A warm service outlives its locks directory under ENGINE_TMP, which
    # ovirt-engine re-creates at every start.
    locks = str(tmp_path / "engine-tmp" / "locks")
    with volumelock.held(locks, ["v1"], "connect_volume (flow f)", 1):
        assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700
        with open(volumelock.path(locks, "v1")) as f:
            assert f.read() == "connect_volume (flow f) (pid {})\n".format(
                os.getpid())
    # Released: the next waiter reads its holder, not ours.
    with open(volumelock.path(locks, "v1")) as f:
        assert f.read() == ""


def test_a_command_waits_in_vain_and_names_the_holder(tmp_path):
    locks = str(tmp_path)
    with volumelock.held(locks, ["v2", "v1"], "disconnect_volume (flow d)",
                         1):
        with pytest.raises(errors.EngineBusy) as e:
            with volumelock.held(locks, ["v1"], "connect_volume (flow c)",
                                 0.2):
                pass
        assert str(e.value) == (
            "Volume v1 is busy: disconnect_volume (flow d) (pid {}) holds "
            "it; gave up after 0.2 seconds".format(os.getpid()))
        # A volume nobody holds is not held up by another's lock.
        with volumelock.held(locks, ["v3"], "save_device (flow s)", 0.2):
            pass
    with volumelock.held(locks, ["v1"], "connect_volume (flow c)", 0.2):
        pass
