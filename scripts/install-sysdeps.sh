#!/bin/bash
# Installs the Debian packages the test suite uses, when missing:
#   postgresql  - a private cluster for the engine shim's PostgreSQL tests
#   rpm         - rpmbuild/rpm for building and inspecting managedvolume.spec
#   udev        - udevadm, to trigger the ownership rules we write
#   sudo        - visudo, to check the shipped sudoers rule
#   a JDK and the jars vdsm-jsonrpc-java imports - to build ovirt-engine's
#                 JSON-RPC client and drive the agent with it
#                 (tests/enginejava_test.py, scripts/enginejava.py)
# Runs only as root (CI and developers' machines here are root); otherwise it
# says what is missing and lets the tests that need it skip.
set -eu

need=()
command -v losetup >/dev/null || need+=(mount)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v rpmbuild >/dev/null || need+=(rpm)
command -v udevadm >/dev/null || need+=(udev)
command -v visudo >/dev/null || need+=(sudo)
command -v javac >/dev/null || need+=(default-jdk-headless)
[ -e /usr/share/java/jackson-databind.jar ] || need+=(libjackson2-databind-java)
[ -e /usr/share/java/jackson-core.jar ] || need+=(libjackson2-core-java)
[ -e /usr/share/java/jackson-annotations.jar ] || need+=(libjackson2-annotations-java)
[ -e /usr/share/java/slf4j-jdk14.jar ] || need+=(libslf4j-java)
[ -e /usr/share/java/commons-lang3.jar ] || need+=(libcommons-lang3-java)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-sysdeps: not root; missing: ${need[*]} (dependent tests skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's postgresql package starts a cluster of its own on 5432; the tests
# run a private cluster on another port, so the packaged one is not needed.
if command -v pg_ctlcluster >/dev/null; then
    for c in $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}'); do
        pg_ctlcluster ${c%/*} ${c#*/} stop 2>/dev/null || true
    done
fi
