#!/usr/bin/env bash
# The test command on a fresh machine: set up (idempotent), check the code, run the tests.
#   bash scripts/test.sh               every test; end-to-end tests start their own lab
#                                      (namespaces, engines, agents) and remove it afterwards,
#                                      unless one was up already, which they reuse
#   bash scripts/test.sh --fast        only the tests that need no lab (-m "not lab and not
#                                      compose"): the loop while changing code
#   bash scripts/test.sh --lab-link-rate 100mbit
#                                      every test, with every pair of lab nodes shaped to that
#                                      rate (the suite must pass unshaped and shaped)
# Any other argument goes to pytest (a file, -k EXPR, -x ...).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
    if [[ "$a" == --fast ]]; then
        args+=(-m "not lab and not compose")
    else
        args+=("$a")
    fi
done
bash scripts/setup.sh
.venv/bin/ruff check .
if [[ -x .venv-system/bin/pytest ]]; then
    # the distribution's python (Debian 12: 3.11.2, without tarfile's extraction filters):
    # the archive, delta and hostile-peer unit tests must hold there too
    echo "[test] under $(.venv-system/bin/python -c 'import sys; print(sys.version.split()[0])') (the distribution's python3):"
    .venv-system/bin/pytest -q -p no:cacheprovider -m "not lab and not compose" \
        tests/test_tree.py tests/test_hostile_data.py tests/test_exact_files.py \
        tests/test_delta.py tests/test_bounds.py tests/test_criu_images.py \
        tests/test_criu_mounts.py tests/test_seccomp_filters.py tests/test_authz.py
fi
.venv/bin/pytest -v -p no:cacheprovider "${args[@]}"
