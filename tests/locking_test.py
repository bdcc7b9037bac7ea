import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import locking

VOL = "0d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"
VOL2 = "1d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"

HOLDER = """
import sys, time
from vdsm_managedvolume import locking
with locking.volume_lock(sys.argv[1], sys.argv[2], 10):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _hold_in_child(lock_dir, vol_id, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, lock_dir, vol_id,
                          str(seconds)], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"locked\n"
    return p


def test_threads_of_one_process_exclude_each_other(tmp_path):
    inside = []
    overlaps = []
    lock = threading.Lock()

    def work():
        with locking.volume_lock(str(tmp_path), VOL, 10):
            with lock:
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
            time.sleep(0.01)
            with lock:
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


def test_another_process_holding_the_lock_makes_us_busy(tmp_path):
    p = _hold_in_child(str(tmp_path), VOL, 30)
    try:
        with pytest.raises(errors.VolumeBusy) as e:
            with locking.volume_lock(str(tmp_path), VOL, 0.2):
                pass
        assert e.value.code == 932
        assert VOL in str(e.value)
        # Another volume is not blocked.
        with locking.volume_lock(str(tmp_path), VOL2, 0.2):
            pass
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_process_is_released(tmp_path):
    p = _hold_in_child(str(tmp_path), VOL, 30)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with locking.volume_lock(str(tmp_path), VOL, 5):
        pass


def test_waiter_gets_the_lock_when_the_holder_releases_it(tmp_path):
    p = _hold_in_child(str(tmp_path), VOL, 0.3)
    try:
        with locking.volume_lock(str(tmp_path), VOL, 20):
            assert p.wait(20) == 0
    finally:
        p.kill()


def test_busy_thread_waiter_times_out(tmp_path):
    entered = threading.Event()
    release = threading.Event()

    def hold():
        with locking.volume_lock(str(tmp_path), VOL, 5):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        entered.wait(5)
        with pytest.raises(errors.VolumeBusy):
            with locking.volume_lock(str(tmp_path), VOL, 0.1):
                pass
        with pytest.raises(errors.VolumeBusy):
            with locking.volume_lock(str(tmp_path), VOL, 0):
                pass
    finally:
        release.set()
        t.join()
    assert locking._thread_locks == {}


def test_lock_files_are_never_unlinked(tmp_path):
    with locking.volume_lock(str(tmp_path), VOL, 1):
        pass
    path = locking.lock_path(str(tmp_path), VOL)
    ino = os.stat(path).st_ino
    with locking.volume_lock(str(tmp_path), VOL, 1):
        pass
    assert os.stat(path).st_ino == ino


def test_a_missing_lock_dir_is_made_at_the_first_lock_and_again_if_removed(
        tmp_path):
    lock_dir = str(tmp_path / "run" / "locks")
    for _ in range(2):
        with locking.volume_lock(lock_dir, VOL, 1):
            assert os.path.exists(locking.lock_path(lock_dir, VOL))
        os.unlink(locking.lock_path(lock_dir, VOL))
        os.rmdir(lock_dir)


def test_exception_in_block_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        with locking.volume_lock(str(tmp_path), VOL, 1):
            raise RuntimeError("boom")
    with locking.volume_lock(str(tmp_path), VOL, 0):
        pass
