#!/usr/bin/env bash
# The test command on a fresh machine: set up (idempotent), check the code, run every test.
# End-to-end tests start their own lab (namespaces, engines, agents) and remove it afterwards,
# unless one was up already, which they reuse.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/pytest -v -p no:cacheprovider "$@"
