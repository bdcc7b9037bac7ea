#!/bin/bash
# Builds the noarch RPMs (vdsm-managedvolume, -common, -engine, -vdsm) and
# the source RPM from this tree with rpmbuild.  `make rpm` calls it.
#
# Works on Fedora/EL and on Debian's `rpm` package (no python or systemd
# macros there: managedvolume.spec defines fallbacks; BuildRequires cannot
# be satisfied from an empty rpm database, so they are not checked).
#
# The source tarball is made from the working tree as it is, uncommitted
# changes included (git's tracked and untracked-but-not-ignored files), so
# that what you test is what you package.
#
# Environment (all optional):
#   RPM_TOPDIR   rpmbuild's _topdir              (default: build/rpm)
#   RPM_OUTDIR   where the finished RPMs go      (default: dist)
#   PYTHON       interpreter that runs pip in %install; it needs pip and
#                setuptools (default: /usr/bin/python3 on RPM systems; else
#                .venv/bin/python when present, else python3 wrapped in a
#                throwaway venv when its install scheme is not posix_prefix)
#   RPM_RELEASE  the Release number             (default: 1)
#
# Prints the paths of the RPMs it built, one per line, on stdout.
set -eu -o pipefail

cd "$(dirname "$0")/.."
top=$(pwd)

if ! command -v rpmbuild >/dev/null; then
    echo "build-rpm: rpmbuild not found (Debian: apt-get install rpm;" \
         "EL: dnf install rpm-build)" >&2
    exit 1
fi

topdir=$(realpath -m "${RPM_TOPDIR:-build/rpm}")
outdir=$(realpath -m "${RPM_OUTDIR:-dist}")
release=${RPM_RELEASE:-1}

rm -rf "$topdir"
mkdir -p "$topdir"/{SOURCES,SPECS,BUILD,BUILDROOT,RPMS,SRPMS} "$outdir"

# The RPM system's own python3 is the right one there; elsewhere the tree's
# venv has pip and setuptools of known versions.
on_rpm_system=0
rpm -q rpm >/dev/null 2>&1 && on_rpm_system=1
if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ $on_rpm_system = 0 ] && [ -x .venv/bin/python ]; then
    python=$top/.venv/bin/python
elif [ -x /usr/bin/python3 ]; then
    python=/usr/bin/python3
else
    python=$(command -v python3)
fi

# pip installs with --prefix /usr into the interpreter's default scheme.
# Debian's python3 defaults to /usr/local/lib/.../dist-packages there, an
# RPM wants /usr/lib/pythonX.Y/site-packages (posix_prefix): a throwaway
# venv on top of it (system site-packages: pip, setuptools) has that.
# (On EL, rpmbuild's environment makes the system python do it right.)
if [ $on_rpm_system = 0 ]; then
    scheme=$("$python" -c 'import sysconfig; print(sysconfig.get_default_scheme())')
    if [ "$scheme" != posix_prefix ] && [ "$scheme" != venv ]; then
        "$python" -m venv --system-site-packages --without-pip "$topdir/venv"
        python=$topdir/venv/bin/python
    fi
fi

version=$("$python" -c 'import ast, sys
for node in ast.parse(open("vdsm_managedvolume/__init__.py").read()).body:
    if isinstance(node, ast.Assign) and node.targets[0].id == "__version__":
        print(node.value.value)')
name=vdsm-managedvolume

# The tarball: <name>-<version>/ holding the tree's files.
stage=$topdir/stage/$name-$version
mkdir -p "$stage"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$stage"
else
    tar --exclude=./.venv --exclude=./.state --exclude=./build \
        --exclude=./dist --exclude=./.git --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -xf - -C "$stage"
fi
tar -C "$topdir/stage" -czf "$topdir/SOURCES/$name-$version.tar.gz" \
    "$name-$version"
rm -rf "$topdir/stage"
cp managedvolume.spec "$topdir/SPECS/"

args=(--define "_topdir $topdir"
      --define "mv_version $version"
      --define "mv_release $release")
if [ $on_rpm_system = 0 ]; then
    # Debian: the build dependencies live in dpkg's database, not rpm's.
    args+=(--nodeps --define "__python3 $python"
           --define "_build_id_links none")
fi

log=$topdir/rpmbuild.log
if ! rpmbuild "${args[@]}" -ba "$topdir/SPECS/managedvolume.spec" \
        >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "build-rpm: rpmbuild failed; full log: $log" >&2
    exit 1
fi

find "$topdir/RPMS" "$topdir/SRPMS" -name '*.rpm' -print0 \
    | while IFS= read -r -d '' rpm; do
        cp "$rpm" "$outdir/"
        echo "$outdir/$(basename "$rpm")"
    done
