#!/usr/bin/env bash
# lab/compose/hostd.sh - a private Docker engine on this host to run the compose lab with,
# for machines that have no Docker engine running (only the `docker` client, as on the
# project's test machines). It touches nothing of any other engine or lab:
#
#   data root   /var/lib/migctl-compose/docker     (and daemon.json, dockerd.log, tmp/ there)
#   exec root   /run/migctl-compose                (socket: /run/migctl-compose/docker.sock)
#   networks    docker0 = BASE.0.1/24, new networks from BASE.128.0/17; the compose lab uses
#               BASE.77.0/24 (MIGCTL_COMPOSE_NET). BASE (default 10.198, env MIGCTL_COMPOSE_BASE)
#               is refused if BASE.0.0/16 overlaps any route of the host.
#
#   bash lab/compose/hostd.sh start    # prints: export DOCKER_HOST=unix:///run/migctl-compose/docker.sock
#   bash lab/compose/hostd.sh status
#   bash lab/compose/hostd.sh stop     # stops exactly that dockerd (by its pid file), removes
#                                      # the iptables chains and the ip_forward setting it added
#   bash lab/compose/hostd.sh purge    # stop, then remove /var/lib/migctl-compose and /run/migctl-compose
set -euo pipefail

HOME_DIR=/var/lib/migctl-compose
EXEC_ROOT=/run/migctl-compose
SOCK=$EXEC_ROOT/docker.sock
PIDFILE=$HOME_DIR/docker.pid
CONFIG=$HOME_DIR/daemon.json
LOG=$HOME_DIR/dockerd.log
SAVED=$HOME_DIR/host-before.env # what the host had before our first start (for `stop`)
BASE=${MIGCTL_COMPOSE_BASE:-10.198}
DOCKER_CHAINS=(DOCKER DOCKER-USER DOCKER-ISOLATION-STAGE-1 DOCKER-ISOLATION-STAGE-2)

say() { printf '[hostd] %s\n' "$*" >&2; }
die() {
    printf '[hostd] FAILED: %s\n' "$*" >&2
    exit 1
}

our_pid() { # the pid of our dockerd, if it runs
    local pid
    [[ -f $PIDFILE ]] || return 1
    pid=$(cat "$PIDFILE")
    [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--config-file $CONFIG" &&
        echo "$pid"
}

answers() { DOCKER_HOST=unix://$SOCK docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

check_routes() { # refuse a BASE whose /16 overlaps a route of the host (docker's own excepted)
    python3 - "$BASE" <<'PY'
import ipaddress, subprocess, sys
base = ipaddress.ip_network(f"{sys.argv[1]}.0.0/16")
for line in subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                           text=True, check=True).stdout.splitlines():
    words = line.split()
    dest = words[0]
    if dest in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
        dest = words[1] if dest != "default" else "0.0.0.0/0"
        if dest == "0.0.0.0/0":
            continue
    dev = words[words.index("dev") + 1] if "dev" in words else ""
    if dev == "docker0" or dev.startswith("br-"):
        continue  # our own engine's bridges (a restart)
    try:
        net = ipaddress.ip_network(dest if "/" in dest else f"{dest}/32", strict=False)
    except ValueError:
        continue
    if net.overlaps(base) and not net.is_loopback:
        sys.exit(f"{base} overlaps the host route '{line.strip()}': "
                 "set MIGCTL_COMPOSE_BASE to another A.B prefix (e.g. 10.197)")
PY
}

start() {
    [[ $EUID -eq 0 ]] || die "must run as root"
    command -v dockerd >/dev/null || die "dockerd is missing: run scripts/setup.sh (docker.io)"
    if pid=$(our_pid) && answers; then
        say "already running (pid $pid)"
        echo "export DOCKER_HOST=unix://$SOCK"
        return 0
    fi
    check_routes || die "no usable address range (see above)"
    mkdir -p "$HOME_DIR/docker" "$HOME_DIR/tmp" "$EXEC_ROOT"
    if [[ ! -f $SAVED ]]; then
        # remember the host's forwarding and iptables state, to put it back on `stop`
        local chains=""
        for c in "${DOCKER_CHAINS[@]}"; do
            iptables -w -n -L "$c" >/dev/null 2>&1 && chains+=" filter:$c"
            iptables -w -t nat -n -L "$c" >/dev/null 2>&1 && chains+=" nat:$c"
        done
        {
            echo "IP_FORWARD=$(sysctl -n net.ipv4.ip_forward)"
            echo "FORWARD_POLICY=$(iptables -w -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
            echo "CHAINS_BEFORE='${chains# }'"
        } >"$SAVED"
    fi
    cat >"$CONFIG" <<JSON
{
  "data-root": "$HOME_DIR/docker",
  "exec-root": "$EXEC_ROOT",
  "hosts": ["unix://$SOCK"],
  "pidfile": "$PIDFILE",
  "bip": "$BASE.0.1/24",
  "default-address-pools": [{"base": "$BASE.128.0/17", "size": 24}],
  "log-driver": "json-file",
  "log-opts": {"max-size": "20m", "max-file": "2"}
}
JSON
    say "starting dockerd (config $CONFIG, log $LOG)"
    TMPDIR=$HOME_DIR/tmp setsid dockerd --config-file "$CONFIG" >>"$LOG" 2>&1 </dev/null &
    local i
    for ((i = 0; i < 120; i++)); do
        answers && break
        kill -0 $! 2>/dev/null || { tail -n 20 "$LOG" >&2; die "dockerd exited"; }
        sleep 0.5
    done
    answers || { tail -n 20 "$LOG" >&2; die "dockerd did not answer within 60 s"; }
    say "running (pid $(our_pid)), docker0 $BASE.0.1/24"
    echo "export DOCKER_HOST=unix://$SOCK"
}

stop() {
    local pid i
    if pid=$(our_pid); then
        say "stopping dockerd pid $pid"
        kill -TERM "$pid"
        for ((i = 0; i < 600; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd pid $pid still runs after 60 s: SIGKILL"
            kill -KILL "$pid" || true
        fi
    else
        say "not running"
    fi
    # containerd started by our dockerd: it exits with it; make sure (by its config path)
    for pid in $(pgrep -x containerd || true); do
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$EXEC_ROOT/containerd/" &&
            { say "stopping our containerd pid $pid"; kill -TERM "$pid" || true; }
    done
    if [[ -f $SAVED ]]; then
        # shellcheck disable=SC1090
        . "$SAVED"
        local c table
        for c in "${DOCKER_CHAINS[@]}"; do
            for table in filter nat; do
                [[ " $CHAINS_BEFORE " == *" $table:$c "* ]] && continue
                iptables -w -t "$table" -n -L "$c" >/dev/null 2>&1 || continue
                # drop the jumps to the chain, then the chain itself
                iptables -w -t "$table" -S | awk -v c="$c" '$1 == "-A" && / -j / { for (i = 1; i <= NF; i++) if ($i == "-j" && $(i+1) == c) print }' |
                    while read -r rule; do
                        # shellcheck disable=SC2086
                        iptables -w -t "$table" ${rule/-A/-D} || true
                    done
                iptables -w -t "$table" -F "$c" || true
            done
        done
        for c in "${DOCKER_CHAINS[@]}"; do
            for table in filter nat; do
                [[ " $CHAINS_BEFORE " == *" $table:$c "* ]] && continue
                iptables -w -t "$table" -X "$c" 2>/dev/null || true
            done
        done
        # masquerade rules docker adds for its subnets
        iptables -w -t nat -S POSTROUTING | grep -F -- "-s $BASE." | grep -F MASQUERADE |
            while read -r rule; do
                # shellcheck disable=SC2086
                iptables -w -t nat ${rule/-A/-D} || true
            done
        # the default bridge's accept rules, and the bridge itself (a restart would make them again)
        iptables -w -S FORWARD | grep -E -- '-(i|o) docker0( |$)' |
            while read -r rule; do
                # shellcheck disable=SC2086
                iptables -w ${rule/-A/-D} || true
            done
        if ip -4 addr show dev docker0 2>/dev/null | grep -qF "inet $BASE.0.1/24"; then
            ip link del docker0 && say "removed our docker0 ($BASE.0.1/24)"
        fi
        [[ -n ${FORWARD_POLICY:-} ]] && iptables -w -P FORWARD "$FORWARD_POLICY" || true
        [[ -n ${IP_FORWARD:-} ]] && sysctl -q -w "net.ipv4.ip_forward=$IP_FORWARD" || true
        rm -f "$SAVED"
        say "host forwarding and iptables put back as before start (ip_forward=${IP_FORWARD:-?})"
    fi
}

purge() {
    stop
    local m
    # mounts our engine left below its directories (overlays, netns, shm)
    for m in $(awk '{print $2}' /proc/mounts | grep -E "^($HOME_DIR|$EXEC_ROOT)/" | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$HOME_DIR" "$EXEC_ROOT"
    say "removed $HOME_DIR and $EXEC_ROOT"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    purge) purge ;;
    status)
        if pid=$(our_pid) && answers; then
            echo "running (pid $pid): export DOCKER_HOST=unix://$SOCK"
        else
            echo "not running"
            exit 1
        fi
        ;;
    *) die "usage: $0 start|status|stop|purge" ;;
esac
