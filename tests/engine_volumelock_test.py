"""volumelock: one shim command at a time per volume (in this process:
flock conflicts between two open files of one process as between two
processes; tests/engine_ops_test.py runs it across real commands)."""

import logging
import os
import stat
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume.engine import volumelock

from .agentutil import wait_for


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


class _Waiter:
    """A connect_volume in a thread of its own, waiting for ``vol_id``'s
    lock once started and holding it until ``close()``; ``got`` is set
    once it holds it."""

    def __init__(self, locks, vol_id):
        self.got = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run,
                                        args=(locks, vol_id))

    def _run(self, locks, vol_id):
        with volumelock.held(locks, [vol_id], "connect_volume (flow w)", 30):
            self.got.set()
            self._done.wait(30)

    def start(self):
        self._thread.start()

    def close(self):
        self._done.set()
        if self._thread.ident is not None:
            self._thread.join(30)


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_waiter_whose_lock_file_went_away_locks_the_one_at_the_path(
        tmp_path, caplog, how):
    """A command waiting on a lock file that is removed (ENGINE_TMP
    emptied at an engine restart) or replaced: once the holder is done,
    its lock on that file would exclude nobody, beside whoever locks the
    file now at the path."""
    caplog.set_level(logging.INFO, logger=volumelock.__name__)
    locks = str(tmp_path)
    lock_path = volumelock.path(locks, "v1")
    waiter = _Waiter(locks, "v1")
    try:
        with volumelock.held(locks, ["v1"], "disconnect_volume (flow d)",
                             1):
            waiter.start()
            wait_for(lambda: "Waiting for volume v1" in caplog.text)
            os.unlink(lock_path)
            if how == "replaced":
                open(lock_path, "w").close()
        assert waiter.got.wait(30)
        with open(lock_path) as f:
            assert f.read() == "connect_volume (flow w) (pid {})\n".format(
                os.getpid())
        # The waiter holds the volume: nobody else gets it.
        with pytest.raises(errors.EngineBusy):
            with volumelock.held(locks, ["v1"], "save_device (flow s)",
                                 0.2):
                pass
    finally:
        waiter.close()


def test_a_holder_removes_its_lock_file_and_its_waiter_locks_a_new_one(
        tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=volumelock.__name__)
    locks = str(tmp_path)
    lock_path = volumelock.path(locks, "v1")
    waiter = _Waiter(locks, "v1")
    try:
        with volumelock.held(locks, ["v1", "v2"], "delete_volume (flow d)",
                             1, discard=["v1"]):
            waiter.start()
            wait_for(lambda: "Waiting for volume v1" in caplog.text)
        # The holder's own file is gone; v2's (not discarded) stays.
        assert os.path.exists(volumelock.path(locks, "v2"))
        assert waiter.got.wait(30)
        # The waiter holds the new file: nobody else gets the volume.
        with pytest.raises(errors.EngineBusy):
            with volumelock.held(locks, ["v1"], "save_device (flow s)",
                                 0.2):
                pass
    finally:
        waiter.close()
    # Nobody waiting: removed for good.
    with volumelock.held(locks, ["v1"], "delete_volume (flow e)", 1,
                         discard=["v1"]):
        pass
    assert not os.path.exists(lock_path)
