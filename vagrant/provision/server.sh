#!/usr/bin/env bash
# The control-plane VM: k3s server without flannel, then Calico in routed mode.
#
# Why Calico: the node agent's capture needs what a routed CNI gives (DESIGN.md): every pod on
# a veth pair whose host side is in the node's network namespace, reached through a per-pod
# /32 route, no bridge. Flannel (also in host-gw mode) and kube-router put the host-side veths
# on a bridge, where same-node traffic is switched and never reaches the routing the agent's
# steering depends on. Calico runs here with BGP between the nodes and no encapsulation
# (the VMs share one L2 network), so pod traffic crosses the underlay as plain routed IP.
set -euo pipefail

: "${NODE_IP:?}" "${K3S_VERSION:?}" "${K3S_TOKEN:?}" "${CALICO_VERSION:?}"
POD_CIDR="${POD_CIDR:-10.42.0.0/16}"

if ! command -v k3s >/dev/null 2>&1; then
    curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION="$K3S_VERSION" K3S_TOKEN="$K3S_TOKEN" \
        INSTALL_K3S_EXEC="server --node-ip=$NODE_IP --advertise-address=$NODE_IP \
--flannel-backend=none --disable-network-policy --disable=traefik --disable=servicelb \
--cluster-cidr=$POD_CIDR --write-kubeconfig-mode=0600" sh -
fi

kubectl() { k3s kubectl "$@"; }

until kubectl get --raw /readyz >/dev/null 2>&1; do sleep 2; done

if ! kubectl get namespace tigera-operator >/dev/null 2>&1; then
    kubectl create -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/tigera-operator.yaml"
fi
until kubectl get crd installations.operator.tigera.io >/dev/null 2>&1; do sleep 2; done
kubectl apply -f - <<YAML
apiVersion: operator.tigera.io/v1
kind: Installation
metadata:
  name: default
spec:
  calicoNetwork:
    bgp: Enabled
    containerIPForwarding: Enabled
    # eth0 is the provider's NAT interface (the same address on every VM); eth1 is the lab network.
    nodeAddressAutodetectionV4:
      interface: eth1
    ipPools:
      - cidr: $POD_CIDR
        blockSize: 26
        encapsulation: None
        natOutgoing: Enabled
        nodeSelector: all()
---
apiVersion: operator.tigera.io/v1
kind: APIServer
metadata:
  name: default
spec: {}
YAML

echo "==> waiting for this node to be Ready (Calico up)"
kubectl wait --for=condition=Ready "node/$(hostname)" --timeout=600s
