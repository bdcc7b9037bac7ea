#!/bin/bash
# The whole Managed Block Storage chain on one machine, from a shell:
# engine side (managedvolume-cinderlib-client on the embedded FileDriver,
# loop devices, SQLite) and host side (managedvolume-agent over vdsm's wire
# protocol, managedvolume-client as vdsm-client).  See docs/engine.md.
#
#   sudo docs/engine-demo.sh [DB_URL]      (root: loop devices, privsep)
#
# Everything lives in a temp dir and is removed at the end; no file, record
# or loop device is left behind.  On a failure the script says which step
# failed and why, detaches its loop devices and keeps the temp dir with
# the logs (agent, engine shim, warm service) for you to read.
# tests/engine_e2e_test.py runs the same chain with assertions.
set -Eeu

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=$REPO/.venv/bin
for cmd in managedvolume-cinderlib-client managedvolume-agent \
           managedvolume-client; do
    if [ ! -x "$BIN/$cmd" ]; then
        echo "engine-demo: $BIN/$cmd not found: run 'make venv' first" >&2
        exit 1
    fi
done
WORK=$(mktemp -d /tmp/engine-demo.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export MANAGEDVOLUME_ENGINE_LOCKS_DIR=$WORK/locks
export MANAGEDVOLUME_ENGINE_SOCKET=$WORK/run/cinderlib.sock
export MANAGEDVOLUME_ENGINE_LOG_FILE=$WORK/engine.log

# The driver JSON and DB URL go in files: no secret on any command line.
cat > "$WORK/driver.json" <<EOF
{"volume_driver": "vdsm_managedvolume.engine.filedriver.FileDriver",
 "volume_backend_name": "demo",
 "file_volume_dir": "$WORK/volumes",
 "file_volume_use_loop": true}
EOF
echo "${1:-sqlite:///$WORK/cinderlib.db}" > "$WORK/db_url"
chmod 600 "$WORK/driver.json" "$WORK/db_url"

loops_left() {   # the loop devices backed by a file of this demo
    losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null |
        grep -F " $WORK/volumes/" || true
}
cleanup() {
    local status=$?
    [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" || true
    [ -n "${SHIM_PID:-}" ] && kill "$SHIM_PID" 2>/dev/null && wait "$SHIM_PID" || true
    # A failed run may have left a loop device: never leak one.
    loops_left | while read -r dev _; do losetup -d "$dev" || true; done
    if [ "$status" = 0 ]; then
        rm -rf "$WORK"
    else
        rm -rf "$WORK/volumes"
        echo "engine-demo: FAILED (exit $status); logs kept in $WORK:" >&2
        ls "$WORK"/*.log "$WORK"/*.err "$WORK"/agent/log/*.log 2>/dev/null |
            sed 's/^/    /' >&2 || true
    fi
}
trap cleanup EXIT
trap '[ -n "${REPORTED:-}" ] ||
      echo "engine-demo: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

shim() {   # shim SUB-COMMAND ARGS... -> prints the payload, fails on error
    # As ovirt-engine reads it: stderr merged, the first line starting
    # with "error" or "<correlation id>:" is the answer.
    local out line rc=0
    out=$("$BIN/managedvolume-cinderlib-client" "$1" "@$WORK/driver.json" \
          "@$WORK/db_url" demo "${@:2}" 2>&1) || rc=$?
    line=$(printf '%s\n' "$out" | grep -m1 -E '^(error|demo:)' || true)
    if [ "$rc" = 0 ]; then
        case "$line" in
            demo:*) echo "${line#demo:}"; return 0 ;;
            "") return 0 ;;     # a sub-command without a result
        esac
    fi
    echo "engine-demo: $1 failed (exit $rc): ${line:-no answer line}" >&2
    printf '%s\n' "$out" | grep -v -x -F -e "$line" | tail -n 20 |
        sed 's/^/    /' >&2 || true
    REPORTED=1
    return 1
}
host() {   # host Namespace.verb [JSON params]
    local ns=${1%%.*} verb=${1#*.}
    echo "${2:-{\}}" | "$BIN/managedvolume-client" --insecure -a 127.0.0.1 \
        -p "$PORT" --flow-id demo -f - "$ns" "$verb"
}
step() { printf '\n== %s\n' "$*"; }

step "start the host agent (127.0.0.1:$PORT) and the engine's warm service"
"$BIN/managedvolume-agent" --state-dir "$WORK/agent" \
    --listen "127.0.0.1:$PORT" --insecure 2>"$WORK/agent.err" &
AGENT_PID=$!
"$BIN/managedvolume-cinderlib-client" --serve --log-file "$WORK/service.log" &
SHIM_PID=$!
ready=
for _ in $(seq 300); do
    if ! kill -0 "$AGENT_PID" 2>/dev/null || ! kill -0 "$SHIM_PID" 2>/dev/null; then
        break
    fi
    if [ -S "$MANAGEDVOLUME_ENGINE_SOCKET" ] && \
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.2
done
if [ -z "$ready" ]; then
    echo "engine-demo: the agent or the warm service did not start:" >&2
    tail -n 20 "$WORK/agent.err" "$WORK/service.log" >&2 2>/dev/null || true
    exit 1
fi

VOL=$(python3 -c 'import uuid; print(uuid.uuid4())')
CLONE=$(python3 -c 'import uuid; print(uuid.uuid4())')

step "engine: create_volume $VOL (1 GiB)"
shim create_volume "$VOL" 1

step "host: Host.getCapabilities -> connector_info"
CONNECTOR=$(host Host.getCapabilities | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["connector_info"]))')
echo "$CONNECTOR"

step "engine: connect_volume for that host"
CONN=$(shim connect_volume "$VOL" "$CONNECTOR")
echo "$CONN"

step "host: ManagedVolume.attach_volume"
INFO=$(host ManagedVolume.attach_volume "{\"vol_id\": \"$VOL\", \"connection_info\": $CONN}")
echo "$INFO"
MANAGED=$(echo "$INFO" | python3 -c 'import json, sys; print(json.load(sys.stdin)["managed_path"])')

step "I/O through $MANAGED"
echo "hello from the demo" | dd of="$MANAGED" bs=512 seek=1024 conv=notrunc,fsync status=none
dd if="$MANAGED" bs=512 skip=1024 count=1 status=none | head -c 19; echo

step "engine: save_device, get_connection_info"
shim save_device "$VOL" "$(echo "$INFO" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')"
shim get_connection_info "$VOL"

step "host: detach_volume; engine: disconnect_volume (asks the host)"
host ManagedVolume.detach_volume "{\"vol_id\": \"$VOL\"}"
# As ovirt-engine: no host named.  The shim asks every connected host
# (ManagedVolume.volumes_info) and ends the connections of those that no
# longer have the volume.  This demo's agent listens on 127.0.0.1 without
# TLS; an engine's hosts are at their connector's address, with its PKI.
HOSTNAME_=$(echo "$CONNECTOR" | python3 -c 'import json, sys; print(json.load(sys.stdin)["host"])')
MANAGEDVOLUME_ENGINE_HOST_ADDRESSES="$HOSTNAME_=127.0.0.1:$PORT" \
MANAGEDVOLUME_ENGINE_HOST_TLS=false \
    shim disconnect_volume "$VOL"
grep -hF "no longer has volume $VOL" "$WORK/engine.log"

step "engine: extend to 2 GiB, snapshot, volume from snapshot (3 GiB), clone"
shim extend_volume "$VOL" 2
SNAP=$(shim create_snapshot "$VOL"); echo "snapshot $SNAP"
FROM=$(shim create_volume_from_snapshot "$VOL" "$SNAP" 3); echo "volume $FROM"
shim clone_volume "$VOL" "$CLONE"; echo "clone $CLONE"
ls -ls "$WORK/volumes"
shim storage_stats true

step "engine: delete everything"
shim remove_snapshot "$SNAP" "$VOL"
for v in "$FROM" "$CLONE" "$VOL"; do shim delete_volume "$v"; done
VOLUMES_LEFT=$(ls "$WORK/volumes" | wc -l)
LOOPS_LEFT=$(loops_left)
echo "volumes left: $VOLUMES_LEFT"
echo "loop devices left: $(printf '%s' "$LOOPS_LEFT" | grep -c . || true)"
if [ "$VOLUMES_LEFT" != 0 ] || [ -n "$LOOPS_LEFT" ]; then
    echo "engine-demo: FAILED, left behind:" >&2
    ls "$WORK/volumes" >&2
    printf '%s\n' "$LOOPS_LEFT" >&2
    exit 1
fi
echo "demo done: nothing left behind"
