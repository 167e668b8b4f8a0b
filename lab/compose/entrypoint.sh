#!/bin/bash
# lab/compose/entrypoint.sh - entry point of the compose lab's node image (/usr/local/bin/migctl-node).
#
# One node = one container running its own Docker engine (experimental, the image's CRIU first
# on PATH) and the migctl agent on :50051. This script stays the parent of both: it stops the
# agent, then the engine (which stops its containers) when the container is stopped, and ends
# the container when either of them dies.
#
#   migctl-node            run the node (the default)
#   migctl-node health     exit 0 when this node's agent answers (the compose healthcheck)
#
# Environment:
#   MIGCTL_NODE         this node's name (nodeA ...), required
#   MIGCTL_TLS_DIR      its key, certificate and the CA's     (default /var/lib/migctl/tls: the
#                       node's volume). Without a certificate there, the node joins first with
#                       the token in $MIGCTL_LAB_DIR/join.token (`migctl certs join`): its key
#                       is made here and never leaves it
#   MIGCTL_LAB_DIR      what the operator handed this node, read-only (default /etc/migctl/lab):
#                       join.token, inventory.json (the other nodes, given to agents that take
#                       --inventory), registry.url (redis://:PASSWORD@HOST:PORT/DB; when it
#                       exists the agent publishes and looks up holdings there)
#   MIGCTL_LISTEN       the agent's address                      (default 0.0.0.0:50051)
#   MIGCTL_RUN_DIR      an extra engine socket and the logs, for the host (default /run/migctl-node)
#   MIGCTL_AGENT_ARGS   more migagent arguments (split on spaces)
set -euo pipefail

NODE=${MIGCTL_NODE:-}
STATE=/var/lib/migctl # a named volume: the agent's catalog, journal and key outlive the container
TLS_DIR=${MIGCTL_TLS_DIR:-$STATE/tls}
LAB_DIR=${MIGCTL_LAB_DIR:-/etc/migctl/lab}
INVENTORY=$LAB_DIR/inventory.json
REGISTRY=$LAB_DIR/registry.url
LISTEN=${MIGCTL_LISTEN:-0.0.0.0:50051}
RUN_DIR=${MIGCTL_RUN_DIR:-/run/migctl-node}
TCP_CLOSE=/etc/migctl/criu-tcp-close.conf # the node installer's
ENGINE_TMP=$STATE/tmp # the engine's TMPDIR, where containerd leaves checkpoint copies
SOCK=/var/run/docker.sock
CONTAINERD=/var/run/docker/containerd/containerd.sock # dockerd's own containerd (exec root)
export PATH=/opt/migctl/bin:/opt/migctl/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "[migctl-node ${NODE:-?}] $*" >&2; }

if [[ ${1:-} == health ]]; then
    exec python3 - "$NODE" "$TLS_DIR" "${LISTEN##*:}" <<'PY'
import sys
from migctl.agent.security import TLSFiles
from migctl.client.api import AgentClient, Node
node, tls_dir, port = sys.argv[1:]
with AgentClient(Node(node, f"127.0.0.1:{port}"), TLSFiles.from_dir(tls_dir, node),
                 timeout=3) as c:
    print(c.info().engine_version)
PY
fi
[[ $# -eq 0 ]] || exec "$@" # any other command (a shell to look around) instead of the node
[[ -n $NODE ]] || { log "set MIGCTL_NODE to this node's name"; exit 2; }
if [[ ! -f $TLS_DIR/$NODE.crt ]]; then
    [[ -f $LAB_DIR/join.token ]] || { log "no certificate in $TLS_DIR and no $LAB_DIR/join.token to join with"; exit 2; }
    for ((i = 0; ; i++)); do # the join service may still be starting
        if migctl certs join --dir "$TLS_DIR" - <"$LAB_DIR/join.token"; then
            break
        fi
        ((i < 30)) || { log "could not join"; exit 2; }
        sleep 1
    done
fi

# CRIU's restore writes /proc/sys (ns_last_pid, ...), which the engine mounts read-only in any
# container that is not privileged
mount -o remount,rw /proc/sys || log "warning: /proc/sys stays read-only: restores will fail"
mkdir -p "$ENGINE_TMP" "$STATE/agent" "$RUN_DIR"
rm -f /var/run/docker.pid # left by an engine killed with its container (the volume stays)

hosts=(-H "unix://$SOCK")
[[ -d $RUN_DIR ]] && hosts+=(-H "unix://$RUN_DIR/docker.sock") # the host's way in
log "starting dockerd (log $RUN_DIR/dockerd.log)"
# containers the engine runs with plain runc close their connections (migctl-runc chooses
# per call; docs/real-machines.md): the node installer's file, as its docker drop-in says
CRIU_CONFIG_FILE=$TCP_CLOSE TMPDIR=$ENGINE_TMP dockerd "${hosts[@]}" \
    >>"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
dockerd_pid=$!
agent_pid=""

stop() {
    trap - TERM INT
    log "stopping"
    [[ -n $agent_pid ]] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" || true
    kill -TERM "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" || true
    log "stopped"
    exit "${1:-0}"
}
trap stop TERM INT

for ((i = 0; i < 240; i++)); do
    docker -H "unix://$SOCK" version --format '{{.Server.Version}}' >/dev/null 2>&1 && break
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
        tail -n 30 "$RUN_DIR/dockerd.log" >&2
        log "dockerd exited"
        exit 1
    fi
    sleep 0.25
done
docker -H "unix://$SOCK" version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    { tail -n 30 "$RUN_DIR/dockerd.log" >&2; log "dockerd did not answer within 60 s"; stop 1; }
log "dockerd $(docker -H "unix://$SOCK" version --format '{{.Server.Version}}') up, experimental=$(docker -H "unix://$SOCK" version --format '{{.Server.Experimental}}'), criu: $(criu --version | head -n1)"

# `lan`: macvlan over this node's eth0 on the compose network, the same at every node, so that
# a container on it keeps its address and its connections when it moves (docs/labs.md); its
# addresses come from the upper half, above the nodes' and the registry's
ipv4=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -n1)
net=${ipv4%.*}
if [[ -n $ipv4 ]] && ! docker -H "unix://$SOCK" network inspect lan >/dev/null 2>&1; then
    docker -H "unix://$SOCK" network create -d macvlan -o parent=eth0 --subnet "$net.0/24" \
        --gateway "$net.1" --ip-range "$net.128/25" lan >/dev/null &&
        log "network lan: macvlan on eth0, $net.0/24, containers from $net.128/25"
fi

args=(--node "$NODE" --listen "$LISTEN" --docker-host "unix://$SOCK" --state-dir "$STATE/agent"
    --engine-tmp "$ENGINE_TMP" --containerd "$CONTAINERD" --tls-dir "$TLS_DIR")
# the agent knows the other nodes from the operator's inventory (its addresses work inside the
# compose network too)
if [[ -f $INVENTORY ]]; then
    args+=(--inventory "$INVENTORY")
fi
# shellcheck disable=SC2206
args+=(${MIGCTL_AGENT_ARGS:-})
log "migagent ${args[*]}"
if [[ -f $REGISTRY ]]; then # not in the line above: the URL holds the registry's password
    log "registry: the URL in $REGISTRY"
    args+=(--registry "$(cat "$REGISTRY")")
fi
migagent "${args[@]}" &
agent_pid=$!

# wait -n returns when either ends (or a signal runs `stop`)
set +e
wait -n "$agent_pid" "$dockerd_pid"
rc=$?
set -e
if ! kill -0 "$agent_pid" 2>/dev/null; then
    log "the agent exited ($rc)"
    agent_pid=""
else
    log "dockerd exited ($rc)"
fi
stop 1
