#!/bin/sh
# Regenerate meshcni/api/agent_pb2*.py from agent.proto (needs grpcio-tools in the venv:
# .venv/bin/pip install grpcio-tools). The output is committed; users never run this.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. meshcni/api/agent.proto
