#!/usr/bin/env bash
# lab/compose/build-node-image.sh - build the compose lab's node image without a registry or a
# Dockerfile: a Debian root made with debootstrap, imported into the Docker engine of
# $DOCKER_HOST with `docker import`.
#
#   bash lab/compose/build-node-image.sh [--tag migctl-node:latest] [--git-rev REV] [--keep] [--force]
#
# The image is labelled with a digest of its inputs (this script, the entry point, the runc
# wrapper, the code, the CRIU and the Python it copies); when the engine already has TAG with
# the same digest the build is skipped (--force builds anyway).
# The image holds:
#   - Debian bookworm (debootstrap --variant=minbase, from the machine's own Debian mirror,
#     or $MIGCTL_MIRROR; with bookworm-updates and -security) with docker.io, iproute2, python3
#   - the Python the repo's .venv runs on: Debian's python3 if that is it, else a copy of that
#     installation (e.g. pyenv's 3.11.7: Debian 12's 3.11.2 lacks tarfile's extraction filters)
#   - the CRIU this host uses (scripts/setup.sh): /opt/migctl/bin/criu and, when that is the
#     wrapper around CRIU from Debian sid, its private prefix /opt/migctl/criu, copied as is;
#     when it is the distribution's CRIU, the image gets Debian's `criu` package instead
#   - /etc/criu/runc.conf (tcp-established, skip-in-flight, file-locks; tcp-close is migctl-runc's), /etc/docker/daemon.json (experimental,
#     migctl-runc as the default runtime)
#   - this checkout's code (working tree, or --git-rev REV) installed with its dependencies
#     into /opt/migctl/venv (pip, from PyPI: requirements-agent.lock's versions) -> /opt/migctl/venv/bin/migagent
#   - lab/compose/entrypoint.sh as /usr/local/bin/migctl-node (the image's entry point)
# Needs root, debootstrap, and scripts/setup.sh run before (for CRIU). About 1.5-2 minutes.
set -euo pipefail
umask 022
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TAG=migctl-node:latest
GIT_REV=""
KEEP=0
FORCE=0
SUITE=bookworm
PACKAGES=(docker.io iproute2 python3 python3-venv ca-certificates procps redis-server)
CRIU_WRAPPER=/opt/migctl/bin/criu
CRIU_PREFIX=/opt/migctl/criu

while [[ $# -gt 0 ]]; do
    case $1 in
        --tag) TAG=$2; shift 2 ;;
        --git-rev) GIT_REV=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
say() { printf '[build-node-image +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() {
    printf '[build-node-image] FAILED: %s\n' "$*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
command -v docker >/dev/null || die "the docker client is missing"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "no Docker engine answers at ${DOCKER_HOST:-the default socket} (see lab/compose/hostd.sh)"
[[ -e $CRIU_WRAPPER ]] || die "$CRIU_WRAPPER is missing: run scripts/setup.sh first (it picks a CRIU that works here)"

CODE=(pyproject.toml requirements-agent.lock LICENSE migctl agent client common proto)
HOST_PY=$REPO_ROOT/.venv/bin/python
[[ -x $HOST_PY ]] || HOST_PY=$(command -v python3)
inputs_digest() { # what the image is made of, as one sha256 (the code without caches)
    {
        cat "${BASH_SOURCE[0]}" "$REPO_ROOT/lab/compose/entrypoint.sh" "$REPO_ROOT/agent/runtime/migctl-runc"
        if [[ -n $GIT_REV ]]; then
            git -C "$REPO_ROOT" rev-parse "$GIT_REV^{tree}"
        else
            tar -C "$REPO_ROOT" --exclude=__pycache__ --exclude='*.pyc' --sort=name \
                --mtime=@0 --owner=0 --group=0 --numeric-owner -c "${CODE[@]}"
        fi
        sha256sum "$(readlink -f "$CRIU_WRAPPER")"
        [[ -d $CRIU_PREFIX ]] && find "$CRIU_PREFIX" -type f -printf '%P %s %T@\n' | sort
        "$HOST_PY" -c 'import sys; print(sys.version, sys.base_prefix)'
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

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/migctl-node-build.XXXXXX")
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
mkdir -p "$ROOT/opt/migctl/bin" "$ROOT/etc/criu" "$ROOT/etc/docker"
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
printf 'tcp-established\nskip-in-flight\nfile-locks\n' >"$ROOT/etc/criu/runc.conf"
# the direct checkpoint path (agent/runtime/direct.py): runc behind migctl-runc
install -m 0755 "$REPO_ROOT/agent/runtime/migctl-runc" "$ROOT/opt/migctl/bin/migctl-runc"
cat >"$ROOT/etc/docker/daemon.json" <<'JSON'
{"experimental": true,
 "runtimes": {"migctl": {"path": "/opt/migctl/bin/migctl-runc"}},
 "default-runtime": "migctl"}
JSON

say "migctl code ($([[ -n $GIT_REV ]] && echo "git $GIT_REV" || echo "working tree of $REPO_ROOT")) + venv"
SRC=$ROOT/opt/migctl/src
mkdir -p "$SRC"
if [[ -n $GIT_REV ]]; then
    git -C "$REPO_ROOT" archive "$GIT_REV" "${CODE[@]}" | tar -C "$SRC" -x
    REV=$(git -C "$REPO_ROOT" rev-parse --short "$GIT_REV")
else
    tar -C "$REPO_ROOT" --exclude=__pycache__ --exclude='*.pyc' -c "${CODE[@]}" | tar -C "$SRC" -x
    REV="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_ROOT" diff --quiet HEAD -- "${CODE[@]}" 2>/dev/null || echo +wip)"
fi
# pip runs in the image root, for the image's own Python (markers such as python_full_version
# must be those of the image's interpreter), with the host's CA bundle: machines behind a
# TLS-inspecting proxy trust its CA there, and the image root's bundle does not have it.
CA=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[[ -f $CA ]] || CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
PIP_ENV=()
if [[ -f $CA ]]; then
    cp "$CA" "$ROOT/tmp/host-ca.crt"
    PIP_ENV+=(PIP_CERT=/tmp/host-ca.crt)
fi
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_DEFAULT_TIMEOUT; do
    [[ -n ${!v:-} && ${!v} != *file:* ]] && PIP_ENV+=("$v=${!v}")
done
# The agent runs on the Python the repo's .venv uses (what the tests run): Debian's python3
# when that is it, otherwise a copy of that installation at the same path (a pyenv build has
# its library path compiled in). Debian 12's python3 is 3.11.2, older than some of the standard
# library the code uses (tarfile extraction filters, 3.11.4).
read -r PY_PREFIX PY_VER PY_FULL < <("$HOST_PY" -c 'import sys; print(sys.base_prefix, "%d.%d" % sys.version_info[:2], sys.version.split()[0])')
if [[ $PY_PREFIX == /usr ]]; then
    IMAGE_PY=/usr/bin/python$PY_VER
else
    rel=${PY_PREFIX#/}
    say "Python $PY_FULL: copying $PY_PREFIX (as $HOST_PY's base) into the image"
    mapfile -t libpython < <(cd / && ls -d "$rel"/lib/libpython"$PY_VER"*.so* 2>/dev/null)
    tar -C / --exclude="$rel/lib/python$PY_VER/site-packages/*" --exclude="$rel/lib/python$PY_VER/test" \
        --exclude="$rel/lib/python$PY_VER/idlelib" --exclude="$rel/lib/python$PY_VER/tkinter" \
        --exclude="$rel/lib/python$PY_VER/turtledemo" --exclude="$rel/lib/python$PY_VER/config-*/*.a" \
        --exclude="$rel/lib/python$PY_VER/lib-dynload/_tkinter*" \
        -c "$rel/bin/python$PY_VER" "$rel/lib/python$PY_VER" "${libpython[@]}" |
        tar -C "$ROOT" -x
    IMAGE_PY=$PY_PREFIX/bin/python$PY_VER
fi
missing=$(in_root /bin/sh -c "ldd $IMAGE_PY $(dirname "$IMAGE_PY")/../lib/python$PY_VER/lib-dynload/*.so 2>/dev/null" | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
[[ -z $missing ]] || say "warning: libraries missing in the image for Python's modules: $missing"
{
    # the locked versions (hashes checked), then migctl itself from them, built without an
    # isolated environment: nothing is resolved in the image either
    in_root "$IMAGE_PY" -m venv /opt/migctl/venv &&
        in_root "${PIP_ENV[@]}" /opt/migctl/venv/bin/pip install -q --no-cache-dir \
            --disable-pip-version-check --require-hashes --no-deps \
            -r /opt/migctl/src/requirements-agent.lock &&
        in_root "${PIP_ENV[@]}" /opt/migctl/venv/bin/pip install -q --no-cache-dir \
            --disable-pip-version-check --no-deps --no-build-isolation /opt/migctl/src
} >"$WORK/pip.log" 2>&1 || { tail -n 30 "$WORK/pip.log" >&2; die "pip install of migctl in the image root failed (PyPI)"; }
rm -f "$ROOT/tmp/host-ca.crt"
in_root /opt/migctl/venv/bin/migagent --help >/dev/null 2>"$WORK/migagent.log" ||
    { cat "$WORK/migagent.log" >&2; die "migagent does not start in the image root"; }
install -m 755 "$REPO_ROOT/lab/compose/entrypoint.sh" "$ROOT/usr/local/bin/migctl-node"

say "trimming"
rm -f "$ROOT/usr/sbin/policy-rc.d"
: >"$ROOT/etc/resolv.conf" # the engine provides it at run time
echo migctl-node >"$ROOT/etc/hostname"
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* \
    "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* "$ROOT"/var/log/*.log "$ROOT"/tmp/* \
    "$ROOT"/root/.cache

OLD_ID=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
say "docker import -> $TAG ($(du -sh --one-file-system "$ROOT" | cut -f1))"
tar -C "$ROOT" --numeric-owner --one-file-system --exclude='./dev/*' --exclude='./proc/*' \
    --exclude='./sys/*' -c . |
    docker import \
        -c 'ENTRYPOINT ["/usr/local/bin/migctl-node"]' \
        -c 'ENV PATH=/opt/migctl/bin:/opt/migctl/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'EXPOSE 50051' \
        -c "LABEL org.opencontainers.image.title=migctl-node org.opencontainers.image.revision=$REV migctl.inputs=$INPUTS" \
        -m "migctl node: Debian $SUITE, docker.io, CRIU, migctl $REV" - "$TAG" >/dev/null
if [[ -n $OLD_ID && $OLD_ID != $(docker image inspect -f '{{.Id}}' "$TAG") ]]; then
    docker rmi "$OLD_ID" >/dev/null 2>&1 || true # the previous build, unless a container uses it
fi
say "done: $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'), migctl $REV)"
