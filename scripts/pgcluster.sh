#!/bin/bash
# A private, throw-away PostgreSQL cluster for the engine shim's tests.
#
#   pgcluster.sh start [PORT]   print PGCLUSTER_DIR=..., PGCLUSTER_PORT=...,
#                               PGCLUSTER_USER=..., PGCLUSTER_DB=...
#   pgcluster.sh stop DIR       stop it and remove DIR
#   pgcluster.sh run [PORT]     start, print as start does and then
#                               PGCLUSTER_READY, keep the cluster until
#                               stdin ends, then stop it
#
# run is for a caller that may be killed (the test fixtures): the caller
# holds the write end of run's stdin, and whenever it ends, SIGKILL
# included, the kernel closes it and run stops the cluster.  (A parent
# death signal cannot do this: pg_ctl forks the server away from its
# parent, and both the fork and runuser's change of user clear it.)  Give
# run a session of its own, so that a signal to the caller's process
# group does not end run before it has stopped the cluster.  run writes
# the caller's pid in DIR/owner (tests/leftovers.py: the next test run
# stops a cluster whose owner is gone, should run have been killed too)
# as it makes DIR, before the cluster starts: a run killed while starting
# it leaves no cluster without an owner.
#
# The cluster listens on 127.0.0.1 only, at PORT or a free port, with its
# unix socket in a directory of its own (never /var/run/postgresql), and
# lives entirely under a fresh temp directory.  It has a role
# $PGCLUSTER_USER (default "cinder", allowed to create databases: one per
# test) owning database $PGCLUSTER_DB (default "cinder"), whose password is
# read from the environment variable PGCLUSTER_PASSWORD, never from argv.
# TCP connections need that password (scram-sha-256), so the tests exercise
# DB passwords for real.
#
# Installs nothing: scripts/install-sysdeps.sh installs Debian's postgresql.
# As root, the server runs as user postgres (it refuses to run as root).
set -eu

die() { echo "pgcluster: $*" >&2; exit 1; }

bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return; }
    die "postgresql binaries (initdb) not found; run scripts/install-sysdeps.sh"
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local port=${1:-$(free_port)}
    local user=${PGCLUSTER_USER:-cinder}
    local db=${PGCLUSTER_DB:-cinder}
    [ -n "${PGCLUSTER_PASSWORD:-}" ] || die "set PGCLUSTER_PASSWORD"
    local bin; bin=$(bindir)
    local dir; dir=$(mktemp -d "${TMPDIR:-/tmp}/pgcluster.XXXXXX")
    # run's caller, before anything runs: a run killed from here on
    # leaves a directory the next test run recognises and stops.
    if [ -n "${PGCLUSTER_OWNER:-}" ]; then
        echo "$PGCLUSTER_OWNER" >"$dir/owner"
    fi
    chmod 0755 "$dir"
    mkdir -m 0700 "$dir/data"
    mkdir -m 0755 "$dir/socket"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir/data" "$dir/socket"
    fi
    # Local (unix socket) connections are trusted: only the owner of this
    # private socket dir gets there.  TCP needs the password.
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust \
        --auth-host=scram-sha-256 -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; die "initdb failed"; }
    cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/socket'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 100
shared_buffers = 16MB
# Dynamic shared memory in DIR/data/pg_dynshmem, not /dev/shm: a server
# killed with SIGKILL leaves nothing outside DIR.
dynamic_shared_memory_type = mmap
EOF
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w \
        -t 60 start >/dev/null \
        || { cat "$dir/data/server.log" >&2; stop "$dir"; die "start failed"; }
    # The password goes through stdin (a here-document), never argv.
    local quoted=${PGCLUSTER_PASSWORD//\'/\'\'}
    as_owner "$bin/psql" -h "$dir/socket" -p "$port" -U postgres -d postgres \
        -q -v ON_ERROR_STOP=1 -v user="$user" -v db="$db" -f - >/dev/null <<EOF
CREATE ROLE :"user" LOGIN CREATEDB PASSWORD '$quoted';
CREATE DATABASE :"db" OWNER :"user";
EOF
    echo "PGCLUSTER_DIR=$dir"
    echo "PGCLUSTER_PORT=$port"
    echo "PGCLUSTER_USER=$user"
    echo "PGCLUSTER_DB=$db"
}

stop() {
    local dir=${1:?usage: pgcluster.sh stop DIR}
    case "$dir" in
        */pgcluster.*) ;;
        *) die "refusing to remove $dir (not made by pgcluster.sh start)" ;;
    esac
    local bin; bin=$(bindir)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop \
            >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

run() {
    local out dir
    out=$(PGCLUSTER_OWNER=$PPID start "$@") || exit 1
    dir=$(sed -n 's/^PGCLUSTER_DIR=//p' <<<"$out")
    # The caller may be gone before it reads what we print.
    trap '' PIPE
    { echo "$out"; echo PGCLUSTER_READY; } 2>/dev/null || true
    exec >/dev/null 2>&1
    # In the background, so that a signal's trap runs at once.
    cat <&0 >/dev/null &
    trap 'kill $! 2>/dev/null; stop "$dir"; exit 1' TERM INT
    wait $! || true
    stop "$dir"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    run) shift; run "$@" ;;
    bindir) bindir ;;
    *) echo "usage: $0 start [PORT] | run [PORT] | stop DIR | bindir" >&2
       exit 2 ;;
esac
