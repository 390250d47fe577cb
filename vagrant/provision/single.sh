#!/usr/bin/env bash
# Single-VM mode: the network-namespace lab (`ztagent lab`) inside one Debian 12 VM.
# scripts/demo.sh installs what it needs (Debian packages, kernel headers, the virtualenv),
# builds the lab and runs its demo checks. Run it again with:
#   vagrant ssh -c 'sudo /ztagent/scripts/demo.sh'
set -euo pipefail
cd /ztagent
exec ./scripts/demo.sh
