"""The benchmark scripts (bench/): each prints its figure beside a named
baseline measured in the same run, and fails with a clear message
instead of a traceback.  Nothing here asserts a time: the scripts run
with a few iterations and their output's shape is checked.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from vdsm_managedvolume import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")


@pytest.fixture
def bench_module(monkeypatch):
    """Import a script of bench/ as a module (it imports its neighbours,
    benchutil, by their top-level names: removed again after the test)."""
    before = set(sys.modules)

    def load(name):
        monkeypatch.syspath_prepend(BENCH)
        spec = importlib.util.spec_from_file_location(
            "bench_" + name, os.path.join(BENCH, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in set(sys.modules) - before:
        if name in ("benchutil", "attach"):
            del sys.modules[name]


def _script(name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(BENCH, name)] + list(args),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=600)


def test_logcost_prints_each_line_beside_vdsm_logging_and_the_ratio():
    p = _script("logcost.py", "--lines", "20", "--rounds", "1")
    assert p.returncode == 0, p.stderr
    for kind in ("plain", "start", "secret", "debug off"):
        assert re.search(r"^{} +[\d.]+ us +[\d.]+ us +[\d.]+x$".format(kind),
                         p.stdout, re.M), p.stdout


def test_privsep_rt_without_root_exits_with_a_message(bench_module,
                                                      monkeypatch):
    privsep_rt = bench_module("privsep_rt")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["privsep_rt.py"])
    with pytest.raises(SystemExit) as e:
        privsep_rt.main()
    assert "needs root" in str(e.value.code)


def test_privsep_rt_a_failing_call_ends_the_run_with_its_error(
        bench_module):
    privsep_rt = bench_module("privsep_rt")

    class Failing:
        label = "a failing client"
        pid = os.getpid()

        def pair(self, ci):
            raise errors.HelperFailed("connector failed")

    figures = privsep_rt.Figures()
    with pytest.raises(SystemExit) as e:
        privsep_rt.run(Failing(), {}, 4, 2, figures)
    assert "a failing client" in str(e.value.code)
    assert "connector failed" in str(e.value.code)
    assert figures.calls == 0


@pytest.mark.root
@pytest.mark.slow
def test_privsep_rt_prints_ours_beside_oslo_privseps_client():
    p = _script("privsep_rt.py", "--pairs", "4", "--threads", "2",
                "--rounds", "1")
    assert p.returncode == 0, p.stderr
    for threads in (1, 2):
        assert "\n{} thread(s), per round trip:".format(threads) in p.stdout
    assert len(re.findall(r"^  privileged\.Brick \(ours\) ", p.stdout,
                          re.M)) == 2, p.stdout
    assert len(re.findall(r"^  oslo\.privsep client \(baseline\) ",
                          p.stdout, re.M)) == 2, p.stdout
    assert len(re.findall(r"^  baseline vs ours .*: p50 [\d.]+x, "
                          r"calls/s [\d.]+x", p.stdout, re.M)) == 2, p.stdout


def test_load_prints_the_callers_ceiling_beside_the_measured_ratio(
        bench_module):
    load = bench_module("load")
    # One caller: 100 pairs/s (10 ms per pair); 32 callers: 300 pairs/s
    # with the agent spending 2 + 0.5 ms of CPU per pair: one core busy
    # gives 400 pairs/s, 4x one caller's.
    r = {"tput1": 100.0, "cpu1": (0.002, 0.001),
         "tputN": 300.0, "cpuN": (0.002, 0.0005),
         "tput1_slow": 50.0, "cpu1_slow": (0.002, 0.001),
         "tputN_slow": 250.0, "cpuN_slow": (0.003, 0.001)}
    args = argparse.Namespace(callers=32, array_sleep=0.005)
    loop, slow = load._scaling(r, args)
    assert loop.startswith("32 callers / 1 caller, loop device: 3.0x "
                           "measured (300 vs 100 pairs/s), estimated "
                           "ceiling 4.0x ")
    assert "the agent was 0.30 cores busy with 1 caller, 0.75 with 32" \
        in loop
    assert "(an estimate, not a bound: " in loop
    assert slow.startswith("32 callers / 1 caller, fake array, 5.00 ms per "
                           "attach: 5.0x measured (250 vs 50 pairs/s), "
                           "estimated ceiling 5.0x ")


def test_load_prints_the_median_ratio_of_alternating_rounds(bench_module):
    load = bench_module("load")
    # Three rounds of 1 caller and 32 callers, alternating: the ratio
    # printed is the median of the rounds' ratios, with their range, and
    # the pairs per second those of all the rounds together.
    ones = [(100.0, (0.002, 0.001)), (50.0, (0.004, 0.001)),
            (100.0, (0.002, 0.001))]
    manys = [(300.0, (0.002, 0.0005)), (250.0, (0.002, 0.0005)),
             (200.0, (0.002, 0.0005))]
    r = {"scales": [m[0] / o[0] for o, m in zip(ones, manys)],
         "tput1_slow": 50.0, "cpu1_slow": (0.002, 0.001),
         "tputN_slow": 250.0, "cpuN_slow": (0.003, 0.001)}
    # Each round as _throughput returns it: rate, CPU per pair, the
    # busier process's, each process's (one here).
    ones = [(t, c, sum(c), [c]) for t, c in ones]
    manys = [(t, c, sum(c), [c]) for t, c in manys]
    r["tput1"], r["cpu1"], r["busy1"], r["each1"] = load._combined(ones)
    r["tputN"], r["cpuN"], r["busyN"], r["eachN"] = load._combined(manys)
    # Pooled: all pairs over all the time (a harmonic mean of the rates),
    # all the CPU over all the pairs.
    assert r["tput1"] == pytest.approx(75.0)
    assert r["tputN"] == pytest.approx(3 / (1 / 300 + 1 / 250 + 1 / 200))
    assert r["cpu1"] == pytest.approx((0.008 / 3, 0.001))
    args = argparse.Namespace(callers=32, array_sleep=0.005)
    loop, slow = load._scaling(r, args)
    assert loop.startswith("32 callers / 1 caller, loop device: 3.0x "
                           "measured (median of 3 alternating rounds, "
                           "2.0-5.0x; all rounds 243 vs 75 pairs/s), ")
    assert slow.startswith("32 callers / 1 caller, fake array, 5.00 ms per "
                           "attach: 5.0x measured (250 vs 50 pairs/s), ")
