#!/usr/bin/env bash
# The main job: set the node up (idempotent), then bring up the lab, send real pod-to-pod traffic through the
# captured datapath, print the evidence and tear everything down.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/meshcni" lab demo --hold-listeners "$@"
