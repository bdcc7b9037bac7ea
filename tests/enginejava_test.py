"""ovirt-engine's own JSON-RPC client (vdsm-jsonrpc-java) drives real
agents: every verb and error shape as the engine decodes them, heart-beats
over an idle connection, concurrent calls on one connection, TLS 1.2 and
1.3, plain TCP and its connect race.

scripts/enginejava.py builds the library and the engine-like driver from
the harness (../shared/enginejava, read only) into a temporary directory
with Debian's JDK and jars, and judges each scenario; this module runs its
quick set, one test per scenario.  ``make interop`` runs the full set.
Latencies are printed, not asserted (docs/interop.md).
"""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_spec = importlib.util.spec_from_file_location(
    "enginejava", os.path.join(REPO, "scripts", "enginejava.py"))
enginejava = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(enginejava)

# The engine sequence attaches a loop device; the agents run privsep.
pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def classpath(tmp_path_factory):
    harness = enginejava.find_harness()
    if harness is None:
        pytest.skip("no enginejava harness beside the repository (set "
                    "{})".format(enginejava.HARNESS_ENV))
    lack = enginejava.missing()
    if lack:
        pytest.skip("missing {} (scripts/install-sysdeps.sh installs {})"
                    .format(" ".join(lack), " ".join(enginejava.PACKAGES)))
    return enginejava.build(harness,
                            str(tmp_path_factory.mktemp("enginejava-build")))


@pytest.fixture(scope="module")
def agents(tmp_path_factory, classpath):
    base = str(tmp_path_factory.mktemp("enginejava"))
    device = enginejava.LoopDevice(base)
    started = {}
    try:
        for mode in ("tls", "plain"):
            path = os.path.join(base, mode)
            os.makedirs(path)
            started[mode] = enginejava.Agent(
                path, insecure=(mode == "plain")).start()
        yield started, device.path, os.path.join(base, "out")
    finally:
        for agent in started.values():
            assert agent.stop() == 0
        device.detach()


@pytest.mark.parametrize("scenario", enginejava.scenarios(full=False),
                         ids=lambda s: s.name)
def test_engine_client_passes_scenario(scenario, agents, classpath):
    started, device, out = agents
    result = enginejava.run_scenario(classpath, scenario,
                                     started[scenario.mode], device, out)
    print("{}: {}".format(result.name, result.detail))
    assert result.ok, "{} (client logs under {})".format(
        result.detail, os.path.join(out, scenario.name))
