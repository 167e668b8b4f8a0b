#!/usr/bin/env bash
# Regenerates the Python stubs from proto/migctl.proto. The stubs are committed and never edited
# by hand; tests/test_proto.py fails when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/migctl.proto
echo "[gen-proto] proto/migctl_pb2.py proto/migctl_pb2_grpc.py proto/migctl_pb2.pyi"
