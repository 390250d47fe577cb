#!/usr/bin/env bash
# Set up, then build the ambient lab (two nodes, eight app pods and a waypoint, eBPF capture,
# HBONE between the nodes) and run its demo (mesh and waypoint L7 checks). Needs root.
# Running it again rebuilds the lab.
# Extra arguments go to `ztagent lab up` and `ztagent lab demo` (e.g. --prefix, --dir).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

./scripts/setup.sh
"$REPO_ROOT/.venv/bin/ztagent" lab up "$@"
exec "$REPO_ROOT/.venv/bin/ztagent" lab demo "$@"
