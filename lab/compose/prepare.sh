#!/usr/bin/env bash
# lab/compose/prepare.sh - certificates and inventories for the compose lab (docker-compose.yml).
# Idempotent: run it before `docker-compose up` (again after adding nodes; good certs are kept).
#
#   lab/compose/tls/                   the lab's CA, a certificate per node and the client's
#                                      (python -m migctl.agent.certs lab/compose/tls nodeA nodeB nodeC):
#                                      ca.crt + client.*, private/ca.key, nodes/NODE/ (see certs)
#   lab/compose/nodes/NODE/etc/        mounted read-only at /etc/migctl in NODE's container:
#       tls/ca.crt, tls/NODE.crt, tls/NODE.key   (only its own key, not the CA's)
#       inventory.json                           (for agents that ask the other nodes)
#       registry.url                             the registry's URL, with its password
#   lab/compose/registry/redis.conf    the registry service's Redis: a password of its own
#                                      (kept across runs), no persistence
#   lab/compose/nodes/NODE/run/        mounted at /run/migctl-node: NODE's engine socket
#                                      (docker.sock) and its dockerd.log, for the host
#   lab/compose/inventory.json         for `migctl --inventory`: each node at its fixed address
#                                      on the compose network (NET.11, .12, ...:50051), which the
#                                      host and the other nodes reach alike; docker_host = the
#                                      node's engine socket above
#   lab/compose/inventory.ports.json   the same nodes at their published ports on 127.0.0.1
#                                      (5006x), with peer_address NODE:50051 for the agents: for
#                                      clients that cannot route to the compose network; needs a
#                                      client that sends peer_address as the source's address
#
# MIGCTL_COMPOSE_NET (default 10.198.77) is the compose network's /24 prefix, the same variable
# docker-compose.yml reads; it must overlap no route of the host.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
NET=${MIGCTL_COMPOSE_NET:-10.198.77}
NODES=(nodeA nodeB nodeC)
PY=$REPO_ROOT/.venv/bin/python
[[ -x $PY ]] || PY=python3

say() { printf '[compose-prepare] %s\n' "$*" >&2; }

"$PY" - "$NET" <<'PY'
import ipaddress, subprocess, sys
net = ipaddress.ip_network(f"{sys.argv[1]}.0/24")
for line in subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True,
                           check=True).stdout.splitlines():
    w = line.split()
    if w[0] == "default":
        continue
    dev = w[w.index("dev") + 1] if "dev" in w else ""
    route = ipaddress.ip_network(w[0] if "/" in w[0] else f"{w[0]}/32", strict=False)
    if route == net and dev.startswith("br-"):
        continue  # the compose network itself, from an earlier `up`
    if route.overlaps(net):
        sys.exit(f"[compose-prepare] {net} overlaps the host route '{line.strip()}': "
                 "export MIGCTL_COMPOSE_NET=A.B.C (a free /24) for this script and docker-compose")
PY

cd "$REPO_ROOT"
mkdir -p "$HERE/registry"
chmod 700 "$HERE/registry"
conf=$HERE/registry/redis.conf
password=$(awk '$1 == "requirepass" {print $2}' "$conf" 2>/dev/null || true)
if [[ -z $password ]]; then
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && printf 'bind 0.0.0.0\nport 6379\nrequirepass %s\nsave ""\nappendonly no\n' \
        "$password" >"$conf.tmp" && mv "$conf.tmp" "$conf")
fi
PYTHONPATH=$REPO_ROOT "$PY" -m migctl.agent.certs "$HERE/tls" "${NODES[@]}" --client client
for n in "${NODES[@]}"; do
    etc=$HERE/nodes/$n/etc
    mkdir -p "$etc/tls" "$HERE/nodes/$n/run"
    src=$HERE/tls/nodes/$n # that node's own bundle only: never the CA key or another node's
    install -m 644 "$src/ca.crt" "$etc/tls/ca.crt"
    install -m 644 "$src/$n.crt" "$etc/tls/$n.crt"
    install -m 600 "$src/$n.key" "$etc/tls/$n.key"
    (umask 077 && echo "redis://:$password@$NET.10:6379/0" >"$etc/registry.url")
done

"$PY" - "$HERE" "$NET" "${NODES[@]}" <<'PY'
import json, os, sys
here, net, nodes = sys.argv[1], sys.argv[2], sys.argv[3:]

def write(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)

direct = {n: {"address": f"{net}.{11 + i}:50051",
              "docker_host": f"unix://{here}/nodes/{n}/run/docker.sock"}
          for i, n in enumerate(nodes)}
write(f"{here}/inventory.json", {"tls_dir": f"{here}/tls", "nodes": direct})
ports = {n: {"address": f"127.0.0.1:{50061 + i}", "peer_address": f"{n}:50051",
             "docker_host": f"unix://{here}/nodes/{n}/run/docker.sock"}
         for i, n in enumerate(nodes)}
write(f"{here}/inventory.ports.json", {"tls_dir": f"{here}/tls", "nodes": ports})
for n in nodes:  # what the agents read: the addresses of the compose network
    write(f"{here}/nodes/{n}/etc/inventory.json",
          {"nodes": {m: {"address": d["address"], "peer_address": f"{m}:50051"}
                     for m, d in direct.items()}})
PY
say "certificates in $HERE/tls, node files in $HERE/nodes/, inventory $HERE/inventory.json, registry $NET.10:6379"
say "nodes: $(for i in "${!NODES[@]}"; do printf '%s=%s.%d:50051 ' "${NODES[$i]}" "$NET" $((11 + i)); done)"
