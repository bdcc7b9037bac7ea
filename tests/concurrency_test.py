"""Many callers, one volume: the per-volume lock across threads and
processes.  Many volumes: no global serialisation."""

import multiprocessing
import os
import threading

import pytest

from vdsm_managedvolume import errors
from vdsm_managedvolume import service

from . import fakebrick
from .host_fixtures import InProcessBrick, iscsi_connection, new_id

N = 8


def _outcomes(results):
    ok = [r for r in results if r == "ok"]
    busy = [r for r in results if r == 927]
    return len(ok), len(busy), [r for r in results if r not in ("ok", 927)]


def _race_threads(svc, calls):
    results = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i, func):
        start.wait()
        try:
            func()
            results[i] = "ok"
        except errors.Error as e:
            results[i] = e.code
        except Exception as e:   # pragma: no cover - reported below
            results[i] = repr(e)

    threads = [threading.Thread(target=run, args=(i, f))
               for i, f in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.root
@pytest.mark.slow
def test_racing_identical_attaches_in_threads_one_wins(real_service):
    svc = real_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    results = _race_threads(
        svc, [lambda: svc.attach_volume(vol_id, ci)] * N)
    assert _outcomes(results) == (1, N - 1, [])
    key = ci["data"]["fake_key"]
    assert fakebrick.calls().count("connect " + key) == 1
    assert svc.volumes_info([vol_id])[0]["exists"] is True
    svc.detach_volume(vol_id)


class _BarrierBrick:
    """Delegates to a brick, but every connect first waits for all the
    others: if the service serialised distinct volumes, the barrier
    would break instead of opening."""

    def __init__(self, brick, barrier):
        self._brick = brick
        self._barrier = barrier

    def connect(self, connection_info):
        self._barrier.wait()
        return self._brick.connect(connection_info)

    def __getattr__(self, name):
        return getattr(self._brick, name)


@pytest.mark.root
@pytest.mark.slow
def test_distinct_volumes_attach_in_parallel_threads(tmp_path, real_brick,
                                                     real_fakebrick_dir):
    from .host_fixtures import make_cfg
    cfg = make_cfg(tmp_path)
    barrier = threading.Barrier(4, timeout=30)
    svc = service.Service(cfg, brick=_BarrierBrick(real_brick, barrier))
    svc.start()
    try:
        vols = [(new_id(), iscsi_connection(cfg)) for _ in range(4)]
        results = _race_threads(
            svc, [lambda v=v, c=c: svc.attach_volume(v, c) for v, c in vols])
        assert results == ["ok"] * 4
        assert not barrier.broken
        for v, _ in vols:
            svc.detach_volume(v)
        left = fakebrick.connected()
        assert not [c for _, c in vols if c["data"]["fake_key"] in left]
    finally:
        svc.close()


def test_attach_and_detach_racing_on_one_volume_stay_consistent(
        inproc_service):
    svc = inproc_service
    vol_id, ci = new_id(), iscsi_connection(svc.cfg)
    calls = [lambda: svc.attach_volume(vol_id, ci),
             lambda: svc.detach_volume(vol_id)] * 6
    results = _race_threads(svc, calls)
    assert set(results) <= {"ok", 927}
    recs = svc._db().volumes()
    connected = ci["data"]["fake_key"] in fakebrick.connected()
    assert bool(recs) == connected
    if recs:
        assert recs[0]["state"] == "attached"
        assert os.readlink(recs[0]["managed_path"]) == recs[0]["path"]


# Processes: each its own Service and store connection, the in-process
# fake brick (a privsep daemon per process would cost seconds each).

class _ProcessBarrierBrick(InProcessBrick):

    def __init__(self, barrier):
        super().__init__()
        self._barrier = barrier

    def connect(self, connection_info):
        if self._barrier is not None:
            self._barrier.wait(30)
        return super().connect(connection_info)


def _process_attach(cfg, vol_id, ci, start, barrier, queue):
    svc = service.Service(cfg, brick=_ProcessBarrierBrick(barrier))
    svc.start()
    try:
        start.wait(30)
        svc.attach_volume(vol_id, ci)
        queue.put("ok")
    except errors.Error as e:
        queue.put(e.code)
    except Exception as e:
        queue.put(repr(e))
    finally:
        svc.close()


def _run_processes(cfg, jobs, barrier=None):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(jobs))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_attach,
                         args=(cfg, v, c, start, barrier, queue))
             for v, c in jobs]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


@pytest.mark.slow
def test_racing_identical_attaches_in_processes_one_wins(
        host_cfg, inproc_service):
    vol_id, ci = new_id(), iscsi_connection(host_cfg)
    results = _run_processes(host_cfg, [(vol_id, ci)] * N)
    assert _outcomes(results) == (1, N - 1, [])
    assert fakebrick.calls().count("connect " + ci["data"]["fake_key"]) == 1
    rec, = inproc_service._db().volumes()
    assert rec["state"] == "attached"


@pytest.mark.slow
def test_distinct_volumes_attach_in_parallel_processes(
        host_cfg, inproc_service):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    jobs = [(new_id(), iscsi_connection(host_cfg)) for _ in range(4)]
    results = _run_processes(host_cfg, jobs, barrier=barrier)
    assert results == ["ok"] * 4
    assert len(inproc_service._db().volumes()) == 4
