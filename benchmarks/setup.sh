#!/usr/bin/env bash
# Everything scripts/setup.sh installs, plus the benchmark's load generator and comparison relay.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$REPO_ROOT/scripts/setup.sh" iperf3 stunnel4
