#!/usr/bin/env bash
# Regenerates the Python stubs and docs/api.md from proto/migctl.proto, and the reader of
# CRIU's images from agent/runtime/criu/images.proto. Neither is edited by
# hand; tests/test_proto.py and tests/test_api_docs.py fail when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. migctl/proto/migctl.proto
echo "[gen-proto] proto/migctl_pb2.py proto/migctl_pb2_grpc.py proto/migctl_pb2.pyi"
# the part of CRIU's image format the destination checks (agent/runtime/criu/images.py)
"$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. migctl/agent/runtime/criu/images.proto
echo "[gen-proto] agent/runtime/criu/images_pb2.py agent/runtime/criu/images_pb2.pyi"
"$PY" scripts/gen-api-docs.py
