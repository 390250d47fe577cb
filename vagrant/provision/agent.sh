#!/usr/bin/env bash
# A worker VM: k3s agent joining the server.
set -euo pipefail

: "${NODE_IP:?}" "${SERVER_IP:?}" "${K3S_VERSION:?}" "${K3S_TOKEN:?}"

if ! command -v k3s >/dev/null 2>&1; then
    curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION="$K3S_VERSION" K3S_TOKEN="$K3S_TOKEN" \
        K3S_URL="https://$SERVER_IP:6443" INSTALL_K3S_EXEC="agent --node-ip=$NODE_IP" sh -
fi
systemctl is-active --quiet k3s-agent
