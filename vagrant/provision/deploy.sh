#!/usr/bin/env bash
# On the server, once every worker has joined: the CA, ztagent (standalone overlay), the demo
# apps, then the checks.
set -euo pipefail

: "${WORKERS:?}"
IMAGE="${ZTAGENT_IMAGE:-localhost/ztagent:0.1.0}"
kubectl() { k3s kubectl "$@"; }

want=$((WORKERS + 1))
echo "==> waiting for $want Ready nodes"
for _ in $(seq 1 180); do
    ready="$(kubectl get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)"
    [[ "$ready" -ge "$want" ]] && break
    sleep 5
done
kubectl wait --for=condition=Ready nodes --all --timeout=60s

KUBECTL="k3s kubectl" ZTAGENT_IMAGE="$IMAGE" /ztagent/daemonset/make-ca-secret.sh
kubectl apply -k /ztagent/vagrant/kustomize
kubectl -n ztagent-system rollout status deployment/ztagent-control --timeout=300s
kubectl -n ztagent-system rollout status daemonset/ztagent --timeout=300s

kubectl apply -f /ztagent/vagrant/demo/namespaces.yaml
kubectl apply -f /ztagent/vagrant/demo/apps.yaml
for ns in demo legacy; do
    kubectl -n "$ns" wait --for=condition=Available deployment --all --timeout=300s
done

exec /ztagent/vagrant/provision/checks.sh
