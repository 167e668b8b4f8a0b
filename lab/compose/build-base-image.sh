#!/usr/bin/env bash
# lab/compose/build-base-image.sh - what a machine without an image registry needs before
# `docker-compose up --build` (the compose lab): a stock node image and the locked wheels.
#
#   bash lab/compose/build-base-image.sh [--tag migctl-node-base:bookworm] [--keep] [--force]
#
# The base image is a node as an operator finds it, without migctl: Debian bookworm
# (debootstrap --variant=minbase from the machine's own Debian mirror, or $MIGCTL_MIRROR; with
# bookworm-updates and -security), Debian's docker.io, python3 (3.11.2) with venv, iproute2 and
# redis-server (the registry service), and the CRIU this host uses (scripts/setup.sh):
# /opt/migctl/bin/criu and, when that is the wrapper around CRIU from Debian sid, its private
# prefix /opt/migctl/criu, copied as is; when it is the distribution's CRIU, the image gets
# Debian's `criu` package instead. It is imported into the engine of $DOCKER_HOST with
# `docker import` (no registry, no Dockerfile) and labelled with a digest of its inputs; when
# the engine has TAG with the same digest the build is skipped (--force builds anyway).
#
# lab/compose/wheels/ gets requirements-agent.lock's wheels (hashes checked), downloaded here
# for Debian 12's python3, so that the node image's build (lab/compose/Dockerfile) installs
# migctl without reaching PyPI. Machines with a registry and PyPI need neither: the Dockerfile
# takes any BASE with those packages and installs from PyPI when the folder is empty.
# Needs root, debootstrap, and scripts/setup.sh run before (CRIU, .venv-system). About a minute.
set -euo pipefail
umask 022
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TAG=migctl-node-base:bookworm
KEEP=0
FORCE=0
SUITE=bookworm
PACKAGES=(docker.io iproute2 python3 python3-venv ca-certificates procps redis-server)
CRIU_WRAPPER=/opt/migctl/bin/criu
CRIU_PREFIX=/opt/migctl/criu

while [[ $# -gt 0 ]]; do
    case $1 in
        --tag) TAG=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
say() { printf '[build-base-image +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() {
    printf '[build-base-image] FAILED: %s\n' "$*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
command -v docker >/dev/null || die "the docker client is missing"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "no Docker engine answers at ${DOCKER_HOST:-the default socket} (see lab/compose/hostd.sh)"
[[ -e $CRIU_WRAPPER ]] || die "$CRIU_WRAPPER is missing: run scripts/setup.sh first (it picks a CRIU that works here)"

SYSTEM_PY=$REPO_ROOT/.venv-system/bin/python # Debian 12's python3, as the image's
[[ -x $SYSTEM_PY ]] || die "$SYSTEM_PY is missing: run scripts/setup.sh first"
WHEELS=$REPO_ROOT/lab/compose/wheels
LOCK=$REPO_ROOT/requirements-agent.lock

# The wheels first (quick when present): pip checks every file against the lock's hashes
say "wheels of $(basename "$LOCK") for $("$SYSTEM_PY" -c 'import sys; print(sys.version.split()[0])') into $WHEELS"
mkdir -p "$WHEELS"
"$SYSTEM_PY" -m pip download -q --disable-pip-version-check --require-hashes --no-deps \
    --only-binary=:all: -d "$WHEELS" -r "$LOCK" >"${TMPDIR:-/tmp}/migctl-wheels.log" 2>&1 ||
    { tail -n 20 "${TMPDIR:-/tmp}/migctl-wheels.log" >&2; die "pip download of the locked wheels failed"; }
# only what the lock names stays (an older lock's wheels would be installed by nobody)
"$SYSTEM_PY" - "$WHEELS" "$LOCK" <<'PY'
import re, sys
from pathlib import Path
wheels, lock = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
pinned = {(re.sub(r"[-_.]+", "_", n).lower(), v) for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", lock, re.M)}
for w in wheels.glob("*.whl"):
    name, version = w.name.split("-")[:2]
    if (re.sub(r"[-_.]+", "_", name).lower(), version) not in pinned:
        w.unlink()
PY

inputs_digest() { # what the image is made of, as one sha256
    {
        cat "${BASH_SOURCE[0]}"
        sha256sum "$(readlink -f "$CRIU_WRAPPER")"
        [[ -d $CRIU_PREFIX ]] && find "$CRIU_PREFIX" -type f -printf '%P %s %T@\n' | sort
    } | sha256sum | cut -c1-32
}
INPUTS=$(inputs_digest)
if [[ $FORCE -eq 0 && $(docker image inspect -f '{{index .Config.Labels "migctl.inputs"}}' "$TAG" 2>/dev/null) == "$INPUTS" ]]; then
    say "$TAG is up to date (inputs $INPUTS): not rebuilt"
    exit 0
fi

# the machine's own Debian mirror (deb822 .sources first, then one-line lists), as setup.sh does
mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri=$(awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { u = ""; s = ""; t = ""; e = ""
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^[Ee]nabled:/) e = $i
                if ($i ~ /^[Uu][Rr][Ii][Ss]:/) { u = $i; sub(/^[^:]*:[ \t]*/, "", u) }
                if ($i ~ /^[Ss]uites:/) { s = $i; sub(/^[^:]*:[ \t]*/, "", s) }
                if ($i ~ /^[Tt]ypes:/) t = $i }
              split(u, us, /[ \t]+/)
              if (t ~ /deb([ \t]|$)/ && e !~ /[Nn][Oo]/ && us[1] != "" && s ~ suite && s !~ /security/ && us[1] !~ /security/) { print us[1]; exit } }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $i !~ /=/) { u = $i; s = $(i + 1); break }
                if (s ~ suite && u !~ /security/ && s !~ /security/) { print u; exit } }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    echo http://deb.debian.org/debian
}
MIRROR=${MIGCTL_MIRROR:-$(mirror)}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/migctl-base-build.XXXXXX")
ROOT=$WORK/root
cleanup() {
    if [[ $KEEP -eq 1 ]]; then
        say "kept $WORK"
    else
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT

# Everything that mounts (debootstrap's second stage, /proc for apt) runs in a private mount
# namespace: whatever happens, no mount is left behind on the host.
in_root() { # in_root CMD... : run CMD chrooted in ROOT with /proc and /dev
    unshare --mount --propagation private -- /bin/sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" &&
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
            DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"' sh "$ROOT" "$@"
}

say "debootstrap --variant=minbase $SUITE from $MIRROR into $ROOT"
unshare --mount --propagation private -- debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

say "apt-get install ${PACKAGES[*]}"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d" # no service starts in the chroot
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [[ $MIRROR == */debian || $MIRROR == */debian/ ]] &&
        echo "deb ${MIRROR%/}-security $SUITE-security main"
} >"$ROOT/etc/apt/sources.list"
CRIU_PKG=()
if [[ -L $CRIU_WRAPPER && $(readlink -f "$CRIU_WRAPPER") == /usr/sbin/criu ]]; then
    CRIU_PKG=(criu) # setup.sh found the distribution's CRIU good: the image gets the same package
fi
{
    in_root apt-get -q update &&
        in_root apt-get -q -y install --no-install-recommends "${PACKAGES[@]}" "${CRIU_PKG[@]}"
} >"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install in the image root failed"; }

say "CRIU from $CRIU_WRAPPER"
mkdir -p "$ROOT/opt/migctl/bin"
if [[ ${#CRIU_PKG[@]} -gt 0 ]]; then
    ln -sfn /usr/sbin/criu "$ROOT/opt/migctl/bin/criu"
else
    [[ -d $CRIU_PREFIX ]] || die "$CRIU_WRAPPER is a wrapper but $CRIU_PREFIX is missing: re-run scripts/setup.sh"
    cp -a "$CRIU_PREFIX" "$ROOT/opt/migctl/criu" # the wrapper's absolute paths hold in the image
    cp -a "$CRIU_WRAPPER" "$ROOT/opt/migctl/bin/criu"
fi
in_root /opt/migctl/bin/criu --version >"$WORK/criu.log" 2>&1 ||
    { cat "$WORK/criu.log" >&2; die "criu does not run in the image root"; }
say "$(head -n1 "$WORK/criu.log") in the image"
say "trimming"
rm -f "$ROOT/usr/sbin/policy-rc.d"
: >"$ROOT/etc/resolv.conf" # the engine provides it at run time
echo migctl-node-base >"$ROOT/etc/hostname"
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* \
    "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* "$ROOT"/var/log/*.log "$ROOT"/tmp/* \
    "$ROOT"/root/.cache

OLD_ID=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
say "docker import -> $TAG ($(du -sh --one-file-system "$ROOT" | cut -f1))"
tar -C "$ROOT" --numeric-owner --one-file-system --exclude='./dev/*' --exclude='./proc/*' \
    --exclude='./sys/*' -c . |
    docker import \
        -c 'ENV PATH=/opt/migctl/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c "LABEL org.opencontainers.image.title=migctl-node-base migctl.inputs=$INPUTS" \
        -m "a stock node: Debian $SUITE, docker.io, CRIU, python3" - "$TAG" >/dev/null
if [[ -n $OLD_ID && $OLD_ID != $(docker image inspect -f '{{.Id}}' "$TAG") ]]; then
    docker rmi "$OLD_ID" >/dev/null 2>&1 || true # the previous build, unless a container uses it
fi
say "done: $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
