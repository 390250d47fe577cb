#!/usr/bin/env bash
# Set up, then run the ztagent demo. Extra arguments go to the demo.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

./scripts/setup.sh
exec "$REPO_ROOT/.venv/bin/python" -m ztagent.demo "$@"
