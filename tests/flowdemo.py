"""A live migration, narrated: what docs/flow-demo.sh runs.

Two real hosts (managedvolume-agent processes named host-a and host-b),
the real engine shim (managedvolume-cinderlib-client's warm service) on the
embedded FileDriver with loop devices and SQLite, and the flow harness's
engine (tests/flowengine.py) making ovirt-engine's calls in its order.
Every call is printed as it happens; after each stage, what each host's
journal holds; at the end the harness's check, then everything is removed.

    .venv/bin/python -m tests.flowdemo      (as root; from the source tree)

Exit status 0 when the flow ended as the engine believes and nothing was
left behind, 1 otherwise.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from . import flowengine
from .engine_fixtures import Service, Shim

DATA = b"hello from vm1, written on host-a"


def main():
    if os.geteuid() != 0:
        print("flow-demo: run as root (loop devices, agents' privsep "
              "daemons)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="flow-demo.")
    service = cluster = backend = None
    ok = False
    try:
        _step("start host-a and host-b (managedvolume-agent, own state "
              "dirs, ports, certificates, boot ids) and the engine shim")
        cluster = flowengine.Cluster(os.path.join(work, "hosts"))
        for name in ("host-a", "host-b"):
            host = cluster.add_host(name).start()
            print("  {}: 127.0.0.1:{}, connector host {!r}".format(
                name, host.agent.port, host.connector["host"]))
        shim = Shim(os.path.join(work, "engine"),
                    os.path.join(work, "engine", "s", "cinderlib.sock"))
        service = Service(shim, os.path.join(work, "engine", "service.log"))
        backend = flowengine.sqlite_backend(os.path.join(work, "backend"))
        engine = flowengine.Engine(shim, backend, cluster.hosts, say=_say,
                                   shim_env=flowengine.shim_env(cluster))

        _step("create a disk and run vm1 on host-a (RunVmCommand)")
        engine.add_disk("disk1")
        engine.add_vm("vm1", "disk1")
        engine.run_vm("vm1", "host-a")
        a, b = cluster.hosts["host-a"], cluster.hosts["host-b"]
        flowengine.write_through(a, engine, "disk1", DATA)
        print("  vm1 wrote {!r} through host-a's managed_path".format(DATA))
        _journals(engine)

        _step("live-migrate vm1 to host-b (MigrateVmCommand.perform, "
              "then reportCompleted)")
        engine.migrate("vm1", "host-b")
        _journals(engine)
        try:
            read = flowengine.write_through(b, engine, "disk1", None)
            print("  vm1 reads {!r} on host-b".format(read[:len(DATA)]))
        except OSError as e:
            read = b""
            print("  vm1 cannot read its disk on host-b: {}".format(e))

        _step("check: hosts' journals, links, udev rules, loop devices and "
              "the shim's connections agree with the engine")
        try:
            flowengine.check(engine)
            print("  all agree")
            checked = read[:len(DATA)] == DATA
        except AssertionError as e:
            print("  DISAGREE:\n    " + str(e).replace("\n", "\n    "))
            checked = False

        _step("stop vm1 (ProcessDownVmCommand) and delete the disk")
        engine.cleanup()
        flowengine.check(engine)
        _journals(engine)
        ok = checked
    except flowengine.StepFailed as e:
        print("  a step failed: {}".format(str(e).splitlines()[0]))
    finally:
        leaked = backend.loop_devices() if backend else []
        for dev in leaked:
            subprocess.run(["losetup", "-d", dev], check=False)
        if service is not None:
            service.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\nloop devices left: {}".format(len(leaked)))
    if ok and not leaked:
        print("demo done: the flow ended as the engine believes, nothing "
              "left behind")
        return 0
    print("demo FAILED (see above)")
    return 1


def _step(text):
    print("\n== " + text)


def _say(line):
    print("  " + line)


def _journals(engine):
    for host, records in flowengine.journals(engine).items():
        held = ", ".join(label + (" (stale)" if stale else "")
                         for label, stale in records) or "nothing"
        print("  journal of {}: {}".format(host, held))
    labels = {d.vol_id: d.label for d in engine.disks.values()}
    conns = sorted("{} -> {}".format(labels.get(v, v), h)
                   for v, h in engine.backend.connections())
    print("  shim's connections: {}".format(", ".join(conns) or "none"))
    print("  loop devices: {}".format(
        " ".join(engine.backend.loop_devices()) or "none"))


if __name__ == "__main__":
    sys.exit(main())
