#!/usr/bin/env bash
# Create the mesh CA for the standalone overlay, once per cluster:
#   - Secret    ztagent-system/cacerts              (ca-cert.pem, ca-key.pem, root-cert.pem,
#                                                   cert-chain.pem: istiod's plugged-in CA layout)
#   - ConfigMap ztagent-system/ztagent-ca-root-cert (root-cert.pem, trusted by the node agents)
#
# Usage: daemonset/make-ca-secret.sh [CA_DIR]
#   CA_DIR: an existing CA directory to upload (default: a new CA made with `ztagent ca init`).
# Environment:
#   KUBECTL        kubectl command (default: kubectl; e.g. "k3s kubectl")
#   NAMESPACE      default ztagent-system
#   ZTAGENT_IMAGE  run `ztagent ca init` in this image (podman, else docker) when the
#                  `ztagent` command is not installed here
# Existing objects are left alone (the CA must not change under running agents): delete them
# first to replace the CA.
set -euo pipefail

NAMESPACE="${NAMESPACE:-ztagent-system}"
read -r -a KUBECTL <<<"${KUBECTL:-kubectl}"

log() { printf '==> %s\n' "$*"; }

if "${KUBECTL[@]}" -n "$NAMESPACE" get secret cacerts >/dev/null 2>&1; then
    log "secret $NAMESPACE/cacerts exists: keeping it"
    exit 0
fi

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

if [[ $# -ge 1 ]]; then
    ca_dir="$1"
else
    ca_dir="$workdir/ca"
    if command -v ztagent >/dev/null 2>&1; then
        ztagent ca init "$ca_dir"
    elif [[ -n "${ZTAGENT_IMAGE:-}" ]]; then
        engine="$(command -v podman || command -v docker || true)"
        if [[ -z "$engine" ]]; then
            echo "make-ca-secret.sh: ZTAGENT_IMAGE is set but neither podman nor docker is installed" >&2
            exit 1
        fi
        mkdir -p "$ca_dir"
        "$engine" run --rm --user 0 -v "$ca_dir:/ca" "$ZTAGENT_IMAGE" ca init /ca
    else
        echo "make-ca-secret.sh: no ztagent command: install ztagent or set ZTAGENT_IMAGE" >&2
        exit 1
    fi
fi

for file in ca-cert.pem ca-key.pem root-cert.pem cert-chain.pem; do
    if [[ ! -s "$ca_dir/$file" ]]; then
        echo "make-ca-secret.sh: $ca_dir/$file is missing (not a cacerts directory)" >&2
        exit 1
    fi
done

if ! "${KUBECTL[@]}" get namespace "$NAMESPACE" >/dev/null 2>&1; then
    "${KUBECTL[@]}" create namespace "$NAMESPACE"
    "${KUBECTL[@]}" label namespace "$NAMESPACE" istio.io/dataplane-mode=none
fi
log "creating secret $NAMESPACE/cacerts"
"${KUBECTL[@]}" -n "$NAMESPACE" create secret generic cacerts \
    --from-file=ca-cert.pem="$ca_dir/ca-cert.pem" \
    --from-file=ca-key.pem="$ca_dir/ca-key.pem" \
    --from-file=root-cert.pem="$ca_dir/root-cert.pem" \
    --from-file=cert-chain.pem="$ca_dir/cert-chain.pem"
log "creating configmap $NAMESPACE/ztagent-ca-root-cert"
"${KUBECTL[@]}" -n "$NAMESPACE" create configmap ztagent-ca-root-cert \
    --from-file=root-cert.pem="$ca_dir/root-cert.pem" \
    --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -
