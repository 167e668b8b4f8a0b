#!/usr/bin/env bash
# scripts/setup.sh - host setup for migctl (Debian 12 hosts, run as root).
#
#   1. system packages (docker.io, containerd, runc, iproute2, rsync, busybox-static,
#      redis-server, tar, xz-utils, procps, util-linux, for the compose lab docker-compose and
#      debootstrap, for the lock tests' static helpers gcc and libc6-dev) - never leaves a daemon
#      running
#   2. a CRIU that really works on the running kernel:
#        /opt/migctl/bin/criu  (wrapper or symlink; put /opt/migctl/bin first on
#                               dockerd's PATH so runc finds it)
#        /opt/migctl/criu/     (private prefix when CRIU comes from Debian sid)
#   3. /etc/criu/runc.conf with tcp-established, skip-in-flight and file-locks (tcp-close is the
#      wrapper's, per call), and the runc wrapper
#      /opt/migctl/bin/migctl-runc (the direct checkpoint path); fs.pipe-max-size of at least
#      4 MiB (post-copy)
#   4. .venv in the repo root: requirements.lock (exact versions and hashes; scripts/lock.sh
#      updates it), then migctl itself editable (editable_mode=compat: fast start-up)
#   5. a quick self-check of the installed tools
#
# Idempotent and safe to re-run; non-interactive (CI=true, no stdin).
# Logs of the noisy commands go to /opt/migctl/log/.
set -euo pipefail
umask 022

export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROBE="$REPO_ROOT/scripts/criu-probe.sh"

MIGCTL_HOME=/opt/migctl
CRIU_PREFIX=$MIGCTL_HOME/criu
CRIU_WRAPPER=$MIGCTL_HOME/bin/criu
CRIU_APT=$MIGCTL_HOME/criu-apt
LOG_DIR=$MIGCTL_HOME/log
RUNC_CONF=/etc/criu/runc.conf
VENV="$REPO_ROOT/.venv"
SYSTEM_VENV="$REPO_ROOT/.venv-system"  # the distribution's python3, when it is another

APT_PACKAGES=(docker.io containerd runc iproute2 rsync busybox-static redis-server
    tar xz-utils procps util-linux docker-compose debootstrap gcc libc6-dev)
# daemons whose packages may try to start them on install (invoke-rc.d)
WATCHED_DAEMONS=(dockerd containerd redis-server)

SETUP_START=$(date +%s%N)
APT_UPDATED=0

say() { printf '[setup] %s\n' "$*"; }
die() {
    printf '[setup] FAILED: %s\n' "$*" >&2
    exit 1
}
elapsed_ms() { echo $((($(date +%s%N) - $1) / 1000000)); }

# show the tail of a log on failure
show_log() {
    [[ -s "$1" ]] || return 0
    echo "---- last lines of $1 ----" >&2
    tail -n "${2:-25}" "$1" >&2 || true
    echo "----" >&2
}

[[ $EUID -eq 0 ]] || die "must run as root (apt-get, /opt/migctl, /etc/criu)"
mkdir -p "$LOG_DIR" "$MIGCTL_HOME/bin"

# ---------------------------------------------------------------------------
# apt helpers
# ---------------------------------------------------------------------------
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
    -o Dpkg::Options::=--force-confold -q -y)

# run_apt LOG apt-get-args... : retries while another apt/dpkg holds a lock
run_apt() {
    local log=$1 deadline=$((SECONDS + 300)) rc attempt
    shift
    attempt=$(mktemp)
    while true; do
        rc=0
        apt-get "${APT_OPTS[@]}" "$@" >"$attempt" 2>&1 </dev/null || rc=$?
        cat "$attempt" >>"$log"
        [[ $rc -eq 0 ]] && { rm -f "$attempt"; return 0; }
        if grep -qE 'Could not get lock|Unable to acquire|is another process using it' "$attempt" &&
            ((SECONDS < deadline)); then
            say "apt: lock held by another apt/dpkg, waiting..."
            echo "---- retry after lock wait ----" >>"$log"
            sleep 5
            continue
        fi
        rm -f "$attempt"
        return $rc
    done
}

apt_update_once() {
    [[ $APT_UPDATED -eq 1 ]] && return 0
    local t0 log="$LOG_DIR/apt-update.log"
    t0=$(date +%s%N)
    : >"$log"
    say "apt: apt-get update ..."
    run_apt "$log" update || {
        show_log "$log"
        die "apt-get update failed (see $log)"
    }
    APT_UPDATED=1
    say "apt: update done ($(elapsed_ms "$t0") ms)"
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# pids of the watched daemons, one "name pid" a line
daemon_pids() {
    local d
    for d in "${WATCHED_DAEMONS[@]}"; do
        pgrep -x "$d" 2>/dev/null | sed "s/^/$d /" || true
    done
}

# apt_install LOG pkgs... : installs without leaving any daemon running
apt_install() {
    local log=$1 created_policy=0 before after rc=0 name pid ppid args line i
    shift
    before=$(daemon_pids)
    # keep invoke-rc.d from starting services during the install
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, created by migctl scripts/setup.sh\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    run_apt "$log" install --no-install-recommends "$@" || rc=$?
    if [[ $created_policy -eq 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    # stop exactly the daemons that the install started (not ones running before)
    after=$(daemon_pids)
    while read -r line; do
        [[ -n "$line" ]] || continue
        grep -qxF "$line" <<<"$before" && continue
        name=${line%% *}
        pid=${line##* }
        # only a service started by a package script: daemonized (parent is init)
        # and not a lab daemon with its own --data-root (someone else's)
        ppid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        if [[ "$ppid" != 1 || "$args" == *--data-root* ]]; then
            say "apt: note: $name pid $pid appeared during the install but is not a package-started service ($args); left alone"
            continue
        fi
        say "apt: the install started $name (pid $pid): stopping exactly that pid"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    done <<<"$after"
    return $rc
}

# ---------------------------------------------------------------------------
# 1. system packages
# ---------------------------------------------------------------------------
step_packages() {
    local t0 missing=() p log="$LOG_DIR/apt-install.log"
    t0=$(date +%s%N)
    for p in "${APT_PACKAGES[@]}"; do
        if pkg_installed "$p"; then
            say "$p: already installed ($(pkg_version "$p"))"
        else
            missing+=("$p")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "packages: nothing to install"
    else
        say "packages: installing ${missing[*]} ..."
        apt_update_once
        : >"$log"
        apt_install "$log" "${missing[@]}" || {
            show_log "$log"
            die "apt-get install ${missing[*]} failed (see $log)"
        }
        for p in "${missing[@]}"; do
            pkg_installed "$p" || die "package $p could not be installed (see $log)"
            say "$p: installed ($(pkg_version "$p"))"
        done
        say "packages: done ($(elapsed_ms "$t0") ms)"
    fi
    local b
    for b in dockerd containerd runc nsenter ip rsync busybox redis-server; do
        command -v "$b" >/dev/null || die "'$b' not found on PATH after installing packages"
    done
    if pgrep -x dockerd >/dev/null; then
        say "note: a dockerd is running on this host (pids: $(pgrep -x dockerd | tr '\n' ' ')) - not started by this script"
    fi
}

# ---------------------------------------------------------------------------
# 2. CRIU
# ---------------------------------------------------------------------------
criu_version_of() {
    "$1" --version 2>/dev/null | awk '/^Version:/{print $2; exit}' || true
}

# probe BINARY -> 0/1, keeps the probe's output in PROBE_OUT
PROBE_OUT=""
probe() {
    local rc=0
    PROBE_OUT=$(bash "$PROBE" "$1" 2>&1) || rc=$?
    return $rc
}
# one-line reason from a failed probe
probe_reason() {
    local first detail
    first=$(grep -m1 '^criu-probe: FAIL' <<<"$PROBE_OUT" | sed 's/^criu-probe: FAIL //' || true)
    detail=$(grep -v -e '^criu-probe:' -e '^----' <<<"$PROBE_OUT" | grep -m1 -E 'Error|error|failed' |
        sed -E 's/^\([ 0-9.]*\) *//' | cut -c1-140 || true)
    echo "${first:-probe failed}${detail:+ [$detail]}"
}

write_wrapper() { # write_wrapper PREFIX TRIPLET LDSO LIBPATH
    local tmp="$CRIU_WRAPPER.tmp.$$"
    cat >"$tmp" <<EOF
#!/bin/sh
# criu wrapper written by migctl scripts/setup.sh
# CRIU from Debian sid, unpacked into $1 with its own libraries and loader
# (it needs a newer glibc than the host's). Runs it through its own ld.so so
# that only criu itself uses those libraries, not the programs it executes.
exec "$3" --library-path "$4" "$1/usr/sbin/criu" "\$@"
EOF
    chmod 755 "$tmp"
    mv -f "$tmp" "$CRIU_WRAPPER"
}

# fetch CRIU from Debian sid with a private apt state and unpack it into CRIU_PREFIX
install_sid_criu() {
    local log="$LOG_DIR/criu-sid.log" uri keyring arch triplet ldso d libpath=() t0 new debs
    t0=$(date +%s%N)
    : >"$log"

    # the machine's own Debian mirror (deb822 .sources first, then one-line lists)
    uri=""
    keyring=""
    local f codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ -n "$codename" ]] || codename=bookworm
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        # first enabled stanza with the host's suite that is not the security archive
        read -r uri keyring < <(awk -v codename="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                u = ""; s = ""; k = ""; t = ""; e = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^[Ee]nabled:/)              { e = $i }
                    if ($i ~ /^[Uu][Rr][Ii][Ss]:/)        { u = $i; sub(/^[^:]*:[ \t]*/, "", u) }
                    if ($i ~ /^[Ss]uites:/)               { s = $i; sub(/^[^:]*:[ \t]*/, "", s) }
                    if ($i ~ /^[Ss]igned-[Bb]y:/)         { k = $i; sub(/^[^:]*:[ \t]*/, "", k) }
                    if ($i ~ /^[Tt]ypes:/)                { t = $i }
                }
                split(u, us, /[ \t]+/)
                if (t ~ /deb([ \t]|$)/ && e !~ /[Nn][Oo]/ && u != "" && s ~ codename &&
                    s !~ /security/ && us[1] !~ /security/) {
                    print us[1], (k ~ /^\//) ? k : "-"; exit
                }
            }' "$f") || true
        [[ -n "$uri" ]] && break
    done
    if [[ -z "$uri" ]]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f "$f" ]] || continue
            uri=$(awk -v codename="$codename" '$1 == "deb" {
                    for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $i !~ /=/) { u = $i; s = $(i + 1); break }
                    if (s ~ codename && u !~ /security/ && s !~ /security/) { print u; exit }
                    u = "" }' "$f")
            [[ -n "$uri" ]] && break
        done
    fi
    [[ -n "$uri" ]] || die "criu: cannot find the machine's Debian mirror in /etc/apt/sources.list{,.d} (needed to fetch CRIU from sid)"
    [[ "$keyring" == "-" ]] && keyring=""
    [[ -z "$keyring" && -f /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
        keyring=/usr/share/keyrings/debian-archive-keyring.gpg

    arch=$(dpkg --print-architecture)
    case "$arch" in
        amd64) triplet=x86_64-linux-gnu ;;
        arm64) triplet=aarch64-linux-gnu ;;
        *) die "criu: no recipe for architecture $arch" ;;
    esac

    say "criu: fetching criu from Debian sid ($uri) with a private apt state in $CRIU_APT"
    mkdir -p "$CRIU_APT"/{lists/partial,archives/partial,etc/sources.list.d,etc/preferences.d,cache}
    : >"$CRIU_APT/status"
    if [[ -n "$keyring" ]]; then
        echo "deb [signed-by=$keyring] $uri sid main" >"$CRIU_APT/etc/sources.list"
    else
        echo "deb $uri sid main" >"$CRIU_APT/etc/sources.list"
    fi
    rm -f "$CRIU_APT"/archives/*.deb
    local popts=(
        -o "APT::Architecture=$arch"
        -o "APT::Architectures=$arch"
        -o "Dir::Etc::SourceList=$CRIU_APT/etc/sources.list"
        -o "Dir::Etc::SourceParts=$CRIU_APT/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$CRIU_APT/etc/preferences"
        -o "Dir::Etc::PreferencesParts=$CRIU_APT/etc/preferences.d"
        -o "Dir::State::Status=$CRIU_APT/status"
        -o "Dir::State::Lists=$CRIU_APT/lists"
        -o "Dir::State::extended_states=$CRIU_APT/extended_states"
        -o "Dir::Cache=$CRIU_APT/cache"
        -o "Dir::Cache::Archives=$CRIU_APT/archives"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Get::List-Cleanup=true"
        -o "Acquire::Languages=none"
    )
    run_apt "$log" "${popts[@]}" update || {
        show_log "$log"
        die "criu: 'apt-get update' of Debian sid from $uri failed (see $log)"
    }
    run_apt "$log" "${popts[@]}" install --download-only --no-install-recommends criu || {
        show_log "$log"
        die "criu: downloading criu and its libraries from Debian sid failed (see $log)"
    }
    mapfile -t debs < <(find "$CRIU_APT/archives" -maxdepth 1 -name '*.deb' | sort)
    [[ ${#debs[@]} -gt 0 ]] || die "criu: apt downloaded no packages from sid (see $log)"
    local criu_deb
    criu_deb=$(printf '%s\n' "${debs[@]}" | grep -m1 '/criu_' || true)
    [[ -n "$criu_deb" ]] || die "criu: the sid download has no criu package (see $log)"
    say "criu: downloaded ${#debs[@]} packages ($(du -ch "${debs[@]}" | awk 'END{print $1}')), criu $(dpkg-deb -f "$criu_deb" Version)"

    # unpack into a fresh directory, then swap it into place
    new="$CRIU_PREFIX.new.$$"
    rm -rf "$new"
    mkdir -p "$new"
    for d in "${debs[@]}"; do
        dpkg-deb -x "$d" "$new" >>"$log" 2>&1 || die "criu: dpkg -x $(basename "$d") failed (see $log)"
    done
    [[ -x "$new/usr/sbin/criu" ]] || die "criu: no usr/sbin/criu in the unpacked sid packages"
    rm -rf "$CRIU_PREFIX.old"
    [[ -e "$CRIU_PREFIX" ]] && mv "$CRIU_PREFIX" "$CRIU_PREFIX.old"
    mv "$new" "$CRIU_PREFIX"
    rm -rf "$CRIU_PREFIX.old"
    printf '%s\n' "${debs[@]##*/}" >"$CRIU_PREFIX/.migctl-packages"
    rm -f "${debs[@]}" # keep the private apt state small; lists stay for a re-run

    # loader and library directories as they really are in the unpacked tree
    ldso=""
    for d in usr/lib/$triplet lib/$triplet usr/lib64 lib64; do
        for f in "$CRIU_PREFIX/$d"/ld-linux*.so.*; do
            [[ -f "$f" && ! -L "$f" ]] && { ldso=$f; break 2; }
        done
    done
    [[ -z "$ldso" ]] && for f in "$CRIU_PREFIX"/usr/lib/$triplet/ld-linux*.so.* "$CRIU_PREFIX"/lib/$triplet/ld-linux*.so.*; do
        [[ -e "$f" ]] && { ldso=$(readlink -f "$f"); break; }
    done
    [[ -n "$ldso" && -e "$ldso" ]] || die "criu: no dynamic loader (ld-linux*.so.*) in the unpacked sid packages"
    for d in usr/lib/$triplet lib/$triplet usr/lib64 lib64 usr/lib lib; do
        [[ -d "$CRIU_PREFIX/$d" && ! -L "$CRIU_PREFIX/$d" ]] || continue
        compgen -G "$CRIU_PREFIX/$d/lib*.so*" >/dev/null || continue
        libpath+=("$CRIU_PREFIX/$d")
    done
    [[ ${#libpath[@]} -gt 0 ]] || die "criu: no library directory in the unpacked sid packages"
    local lp
    lp=$(
        IFS=:
        echo "${libpath[*]}"
    )
    write_wrapper "$CRIU_PREFIX" "$triplet" "$ldso" "$lp"
    say "criu: unpacked into $CRIU_PREFIX (loader ${ldso#"$CRIU_PREFIX"/}, libraries ${lp//$CRIU_PREFIX\//}) and wrote $CRIU_WRAPPER ($(elapsed_ms "$t0") ms)"
}

step_criu() {
    local t0 ver dist=/usr/sbin/criu installed_dist=0 reason
    t0=$(date +%s%N)
    [[ -f "$PROBE" ]] || die "criu: probe script $PROBE is missing"

    # a) what we installed before
    if [[ -e "$CRIU_WRAPPER" || -L "$CRIU_WRAPPER" ]]; then
        if probe "$CRIU_WRAPPER"; then
            say "criu: already installed, $CRIU_WRAPPER passes the probe (version $(criu_version_of "$CRIU_WRAPPER"); $(elapsed_ms "$t0") ms)"
            return 0
        fi
        say "criu: existing $CRIU_WRAPPER fails the probe ($(probe_reason)); reinstalling"
    fi

    # b) the distribution's criu
    if ! pkg_installed criu; then
        say "criu: installing the distribution package criu to try it ..."
        apt_update_once
        local log="$LOG_DIR/apt-criu.log"
        : >"$log"
        if apt_install "$log" criu; then
            installed_dist=1
        else
            show_log "$log" 10
            say "criu: the distribution package criu could not be installed (see $log)"
        fi
    fi
    if pkg_installed criu && [[ -x "$dist" ]]; then
        ver=$(criu_version_of "$dist")
        if probe "$dist"; then
            ln -sfn "$dist" "$CRIU_WRAPPER.tmp.$$"
            mv -Tf "$CRIU_WRAPPER.tmp.$$" "$CRIU_WRAPPER"
            say "criu: using distribution criu $ver: probe passed -> $CRIU_WRAPPER -> $dist"
            say "criu: OK (version $ver; $(elapsed_ms "$t0") ms)"
            return 0
        fi
        reason=$(probe_reason)
        say "criu: using distribution criu $ver? no: probe failed ($reason)"
        if [[ $installed_dist -eq 1 ]]; then
            # do not leave a broken criu on the default PATH where runc would find it
            say "criu: removing the distribution criu $ver again (installed by this run, does not work here)"
            run_apt "$LOG_DIR/apt-criu.log" remove criu || say "criu: warning: could not remove criu $ver"
        else
            say "criu: note: broken distribution criu $ver stays in $dist (installed before); keep $MIGCTL_HOME/bin first on PATH"
        fi
    fi

    # c) CRIU from Debian sid into a private prefix
    say "criu: -> installing criu from Debian sid into $CRIU_PREFIX"
    install_sid_criu
    if ! probe "$CRIU_WRAPPER"; then
        echo "$PROBE_OUT" >&2
        die "criu: no working CRIU could be had: neither the distribution criu nor Debian sid's criu ($(criu_version_of "$CRIU_WRAPPER")) in $CRIU_PREFIX passes the probe ($(probe_reason))"
    fi
    say "criu: probe: ${PROBE_OUT#criu-probe: }"
    say "criu: OK (version $(criu_version_of "$CRIU_WRAPPER"), $CRIU_WRAPPER; $(elapsed_ms "$t0") ms)"
}

# ---------------------------------------------------------------------------
# 3. /etc/criu/runc.conf
# ---------------------------------------------------------------------------
step_runc_conf() {
    local opt added=()
    mkdir -p "$(dirname "$RUNC_CONF")"
    [[ -e "$RUNC_CONF" ]] || : >"$RUNC_CONF"
    # tcp-established: containers with connected clients can be checkpointed at all.
    # skip-in-flight: a server that clients keep connecting to has connections not yet
    # accepted at any moment, and CRIU refuses to dump those; they are dropped, clients retry.
    # file-locks: services hold flock, POSIX and OFD locks (MariaDB, SQLite); CRIU refuses to
    # dump them without it, and with it they are taken again at the restore
    for opt in tcp-established skip-in-flight file-locks; do
        if ! grep -qxE "[[:space:]]*$opt[[:space:]]*" "$RUNC_CONF"; then
            # make sure the file ends with a newline before appending
            [[ -s "$RUNC_CONF" && -n "$(tail -c1 "$RUNC_CONF")" ]] && echo >>"$RUNC_CONF"
            echo "$opt" >>"$RUNC_CONF"
            added+=("$opt")
        fi
    done
    # tcp-close is migctl-runc's, per call (it closes connections unless a migration keeps
    # them): here it would hold for every call, as runc has CRIU read this file last. Earlier
    # versions of this script put it here.
    if grep -qxE "[[:space:]]*tcp-close[[:space:]]*" "$RUNC_CONF"; then
        sed -i -E '/^[[:space:]]*tcp-close[[:space:]]*$/d' "$RUNC_CONF"
        say "runc.conf: removed tcp-close from $RUNC_CONF (migctl-runc gives it per call)"
    fi
    if [[ ${#added[@]} -eq 0 ]]; then
        say "runc.conf: has tcp-established, skip-in-flight and file-locks ($RUNC_CONF)"
    else
        say "runc.conf: added ${added[*]} to $RUNC_CONF"
    fi
}

# The runc wrapper of the direct checkpoint path (agent/runtime/direct.py). The lab registers
# the checkout's copy itself; a real node's daemon.json names this one (docs/runtime.md).
step_runc_wrapper() {
    local src="$REPO_ROOT/agent/runtime/migctl-runc" dst="$MIGCTL_HOME/bin/migctl-runc"
    if cmp -s "$src" "$dst"; then
        say "migctl-runc: up to date ($dst)"
    else
        install -D -m 0755 "$src" "$dst"
        say "migctl-runc: installed $dst"
    fi
}

# Post-copy (`--memory-transfer post-copy`): CRIU's lazy page server sizes its pipes to 4 MiB.
# Beyond fs.pipe-max-size that needs CAP_SYS_RESOURCE, which hosts run in containers or
# sandboxed VMs drop even for root; CRIU ignores the failure, and its first page read then
# fails ("page-pipe: tee: 65536"). Raised here (never lowered); the agent checks it too.
PIPE_MAX_FOR_CRIU=4194304
step_pipe_size() {
    local now
    now=$(cat /proc/sys/fs/pipe-max-size)
    if [[ $now -ge $PIPE_MAX_FOR_CRIU ]]; then
        say "fs.pipe-max-size: $now (CRIU's lazy page server fits)"
    elif echo "$PIPE_MAX_FOR_CRIU" >/proc/sys/fs/pipe-max-size 2>/dev/null; then
        say "fs.pipe-max-size: raised from $now to $PIPE_MAX_FOR_CRIU for CRIU's lazy page server"
    else
        say "fs.pipe-max-size: $now and cannot be raised here: post-copy will be refused"
    fi
}

# ---------------------------------------------------------------------------
# 4. Python environment
# ---------------------------------------------------------------------------
# install_venv VENV PYTHON: VENV with requirements.lock and migctl itself (editable)
install_venv() {
    local venv=$1 py=$2 t0 pyver stamp log="$LOG_DIR/pip.log" vstamp="$1/.migctl-setup-stamp"
    t0=$(date +%s%N)
    pyver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "python: $py is $pyver, migctl needs >= 3.11"

    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        :
    else
        [[ -e "$venv" ]] && say "python: $venv is unusable, recreating it"
        rm -rf "$venv"
        "$py" -m venv "$venv" || die "python: '$py -m venv $venv' failed"
        say "python: created $venv with $py ($pyver)"
    fi

    stamp="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/requirements.lock" | sha256sum | cut -d' ' -f1) $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])') $REPO_ROOT editable=compat"
    if [[ -f "$vstamp" && "$(cat "$vstamp")" == "$stamp" ]] &&
        "$venv/bin/python" -c 'import importlib.metadata as m; m.version("migctl"); m.version("pytest")' 2>/dev/null; then
        say "python: already set up ($venv, python $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])'), pyproject.toml and requirements.lock unchanged)"
        return 0
    fi
    say "python: installing requirements.lock (exact versions, hashes checked) into $venv ..."
    : >"$log"
    # the lock holds every dependency, runtime and dev, and the build backend: nothing is
    # resolved here, so a fresh machine gets the versions the project was tested with
    (cd "$REPO_ROOT" && "$venv/bin/python" -m pip install -q --require-hashes --no-deps \
        -r requirements.lock) >>"$log" 2>&1 </dev/null || {
        show_log "$log"
        die "python: pip install -r requirements.lock failed (see $log)"
    }
    # compat: a plain path entry in a .pth file. The default editable finder costs every
    # Python process of the venv ~60 ms at start-up (importlib machinery), which every
    # migctl and migctl-delta command would pay.
    (cd "$REPO_ROOT" && "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation \
        -e . --config-settings editable_mode=compat) >>"$log" 2>&1 </dev/null || {
        show_log "$log"
        die "python: pip install -e . failed (see $log)"
    }
    "$venv/bin/python" -m pip check >>"$log" 2>&1 || {
        show_log "$log"
        die "python: the installed packages do not fit together (pip check; see $log)"
    }
    echo "$stamp" >"$vstamp"
    say "python: installed migctl $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("migctl"))') + the locked dependencies into $venv ($(elapsed_ms "$t0") ms)"
}

step_python() {
    local py
    py=$(command -v python3.11 || command -v python3 || true)
    [[ -n "$py" ]] || die "python: neither python3.11 nor python3 on PATH"
    install_venv "$VENV" "$py"
}

# The distribution's own python (Debian 12's is 3.11.2, older than the one on PATH here):
# scripts/test.sh runs the data plane's and the hostile-peer unit tests under it too.
step_python_system() {
    local sys=/usr/bin/python3
    if [[ ! -x $sys ]] || ! "$sys" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        say "python: no distribution python3 >= 3.11 with venv at $sys; its tests are left out"
        return 0
    fi
    if [[ "$("$sys" -c 'import sys; print(sys.version)')" == "$("$VENV/bin/python" -c 'import sys; print(sys.version)')" ]]; then
        say "python: the distribution's python is the one of $VENV"
        return 0
    fi
    install_venv "$SYSTEM_VENV" "$sys"
}

# ---------------------------------------------------------------------------
# 5. self-check
# ---------------------------------------------------------------------------
step_selfcheck() {
    local out bad=0
    out=$(dockerd --version 2>&1) || bad=1
    say "check: dockerd: $out"
    out=$("$CRIU_WRAPPER" --version 2>&1 | tr '\n' ' ') || bad=1
    say "check: $CRIU_WRAPPER: $out"
    out=$(containerd --version 2>&1) || bad=1
    say "check: containerd: $out"
    out=$(runc --version 2>&1 | head -n1) || bad=1
    say "check: runc: $out"
    out=$(grep -vE '^[[:space:]]*(#|$)' "$RUNC_CONF" | tr '\n' ' ')
    say "check: $RUNC_CONF: $out"
    if pgrep -x dockerd >/dev/null; then
        say "check: note: dockerd running (pids $(pgrep -x dockerd | tr '\n' ' ')), not started by this script"
    else
        say "check: no dockerd running (start one per node with PATH=$MIGCTL_HOME/bin:\$PATH)"
    fi
    [[ $bad -eq 0 ]] || die "self-check failed (see the lines above)"
}

say "migctl host setup ($REPO_ROOT), kernel $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME")"
step_packages
step_criu
step_runc_conf
step_runc_wrapper
step_pipe_size
step_python
step_python_system
step_selfcheck
say "done in $(elapsed_ms "$SETUP_START") ms"
