#!/usr/bin/env bash
# Re-resolves requirements.lock: every runtime, extra and dev dependency of pyproject.toml at an exact
# version, with the hashes of every file PyPI has for it, for any platform and Python >= 3.11.
# scripts/setup.sh installs only this file (pip --require-hashes); run this after changing
# pyproject.toml's dependencies, or to take newer releases (--upgrade, or
# --upgrade-package NAME), then scripts/gen-proto.sh if grpcio-tools moved, and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
"$UV" pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
    --generate-hashes --index-url https://pypi.org/simple \
    --custom-compile-command "bash scripts/lock.sh" -o requirements.lock "$@"
# what a node's agent needs, with the Redis registry and the build backend
# (the compose lab's node image, lab/compose/Dockerfile)
"$UV" pip compile pyproject.toml --extra registry --extra build --universal --python-version 3.11 \
    --generate-hashes --index-url https://pypi.org/simple \
    --custom-compile-command "bash scripts/lock.sh" -o requirements-agent.lock "$@"
