#!/usr/bin/env bash
# The whole cluster lab in one command: VMs, k3s, image, ztagent, demo apps, checks.
# Extra arguments go to `vagrant up` (e.g. --provider=virtualbox).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# One VM at a time: workers join the server, which must be up first.
vagrant up --no-parallel "$@"
vagrant provision ztagent-server --provision-with deploy
