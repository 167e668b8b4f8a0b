#!/usr/bin/env bash
# Regenerates the Python stubs and docs/api.md from proto/migctl.proto. Neither is edited by
# hand; tests/test_proto.py and tests/test_api_docs.py fail when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/migctl.proto
echo "[gen-proto] proto/migctl_pb2.py proto/migctl_pb2_grpc.py proto/migctl_pb2.pyi"
"$PY" scripts/gen-api-docs.py
