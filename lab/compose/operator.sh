#!/bin/bash
# lab/compose/operator.sh - the compose lab's operator (/usr/local/bin/migctl-operator in
# the node image): what an operator does on their own machine before nodes join, then the join
# service while they do (docs/real-machines.md, "Certificates").
#
# In STATE (the host's lab/compose/state/, bind-mounted):
#   tls/                    the CA (private/ca.key stays here) and the operator's client.crt/key
#   inventory.json          for `migctl --inventory lab/compose/inventory.json` on the host
#   registry/redis.conf     the registry's Redis, with a password of its own (kept across runs)
#   nodes/NODE/             mounted read-only in NODE only, at /etc/migctl/lab:
#       join.token              a one-time token (minted at every start; a node that holds its
#                               certificate already ignores it)
#       inventory.json          the other nodes, for its agent
#       registry.url            the registry's URL, with its password
#   run/NODE/               NODE's engine socket and its logs, for the host
# No key of a node is ever here: each node makes its own and joins with its token.
#
# Environment: MIGCTL_NODES (names, space-separated), MIGCTL_COMPOSE_NET (the /24's prefix),
# MIGCTL_OPERATOR (this service's address, which the tokens name).
set -euo pipefail
umask 022

STATE=/operator
NODES=(${MIGCTL_NODES:-nodeA nodeB nodeC})
NET=${MIGCTL_COMPOSE_NET:-10.198.77}
OPERATOR=${MIGCTL_OPERATOR:-$NET.9}
JOIN_PORT=50050
log() { echo "[migctl-operator] $*" >&2; }

rm -f "$STATE/ready"
mkdir -p "$STATE/tls" "$STATE/registry" "$STATE/nodes" "$STATE/run"
chmod 700 "$STATE/tls" "$STATE/registry" "$STATE/nodes"
migctl certs init --dir "$STATE/tls" --client client >/dev/null
log "CA and the operator's certificate in $STATE/tls"

conf=$STATE/registry/redis.conf
password=$(awk '$1 == "requirepass" {print $2}' "$conf" 2>/dev/null || true)
if [[ -z $password ]]; then
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && printf 'bind 0.0.0.0\nport 6379\nrequirepass %s\nsave ""\nappendonly no\n' \
        "$password" >"$conf.tmp" && mv "$conf.tmp" "$conf")
fi

for i in "${!NODES[@]}"; do
    n=${NODES[$i]}
    mkdir -p "$STATE/nodes/$n" "$STATE/run/$n"
    (umask 077 &&
        migctl certs token --dir "$STATE/tls" --server "$OPERATOR:$JOIN_PORT" "$n" \
            >"$STATE/nodes/$n/join.token" &&
        echo "redis://:$password@$NET.10:6379/0" >"$STATE/nodes/$n/registry.url")
done
python3 - "$STATE" "$NET" "${NODES[@]}" <<'PY'
import json, os, sys
state, net, nodes = sys.argv[1], sys.argv[2], sys.argv[3:]

def write(path, data):
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(f"{path}.tmp", path)

addresses = {n: f"{net}.{11 + i}:50051" for i, n in enumerate(nodes)}
# tls_dir is relative to the inventory's own folder: the host reads it at lab/compose/state
write(f"{state}/inventory.json",
      {"tls_dir": "tls", "nodes": {n: {"address": a} for n, a in addresses.items()}})
for n in nodes:
    write(f"{state}/nodes/{n}/inventory.json",
          {"nodes": {m: {"address": a, "peer_address": f"{m}:50051"}
                     for m, a in addresses.items()}})
PY
log "tokens for ${NODES[*]}; the join service on :$JOIN_PORT"
touch "$STATE/ready"
exec migctl certs serve --dir "$STATE/tls" --listen "0.0.0.0:$JOIN_PORT"
