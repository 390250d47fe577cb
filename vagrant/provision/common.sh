#!/usr/bin/env bash
# Every cluster VM: packages, kernel headers for BCC (the node agent compiles its eBPF program
# against them, mounted from the host), and the ztagent image, built here and handed to k3s.
set -euo pipefail

IMAGE="${ZTAGENT_IMAGE:-localhost/ztagent:0.1.0}"
K3S_IMAGES=/var/lib/rancher/k3s/agent/images

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    ca-certificates curl podman python3 "linux-headers-$(uname -r)"

# k3s (kube-proxy, Calico) needs forwarding; no swap for the kubelet.
cat >/etc/sysctl.d/90-ztagent-lab.conf <<'CONF'
net.ipv4.ip_forward = 1
CONF
sysctl --system >/dev/null
swapoff -a

echo "==> building $IMAGE"
podman build -q -t "$IMAGE" -f /ztagent/daemonset/Containerfile /ztagent
# k3s imports every archive in this directory when it starts.
mkdir -p "$K3S_IMAGES"
rm -f "$K3S_IMAGES/ztagent.tar"
podman save -o "$K3S_IMAGES/ztagent.tar" "$IMAGE"
if command -v k3s >/dev/null 2>&1 && k3s ctr version >/dev/null 2>&1; then
    # Re-provisioning a running node: import now.
    k3s ctr images import "$K3S_IMAGES/ztagent.tar"
fi
