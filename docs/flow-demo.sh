#!/bin/bash
# One of oVirt's flows, narrated: a live migration of a VM's Managed Block
# Storage disk from host-a to host-b, the calls in ovirt-engine's order,
# against two real agents and the real engine shim (embedded FileDriver,
# loop devices, SQLite).  See docs/flows.md for the picture.
#
#   sudo docs/flow-demo.sh        (root: loop devices, privsep, namespaces)
#
# Everything lives in a temp dir and is removed at the end; no loop device
# is left behind.  tests/flows_test.py runs this flow and the others.
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=$REPO/.venv/bin
for cmd in python managedvolume-cinderlib-client managedvolume-agent; do
    if [ ! -x "$BIN/$cmd" ]; then
        echo "flow-demo: $BIN/$cmd not found: run 'make venv' first" >&2
        exit 1
    fi
done
cd "$REPO"
# The engine shim and the agents take their settings from the harness,
# not from whatever this shell exported.
for name in $(env | sed -n 's/^\(MANAGEDVOLUME_[A-Z_]*\)=.*/\1/p'); do
    unset "$name"
done
exec "$BIN/python" -m tests.flowdemo
