#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, start a 2-node lab, run the seed's toy
# container on nodeA and migrate it to nodeB while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MIGCTL=.venv/bin/migctl
$MIGCTL lab up --nodes 2
$MIGCTL lab toy nodeA
echo "[demo] letting toytsm count for 5 s on nodeA"
sleep 5
$MIGCTL migrate --from nodeA --to nodeB toytsm
eval "$($MIGCTL lab env nodeB)"
echo "[demo] the last lines toytsm printed on nodeB (the count goes on from nodeA's):"
sleep 2
docker logs toytsm | tail -n 3
echo "[demo] the lab stays up: try 'eval \$($MIGCTL lab env nodeB); docker ps', then"
echo "       '$MIGCTL migrate --from nodeB --to nodeA toytsm'; remove it with '$MIGCTL lab down'"
