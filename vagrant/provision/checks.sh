#!/usr/bin/env bash
# The checks of `ztagent lab demo`, against the Vagrant cluster: one PASS/FAIL line each,
# exit 0 only when all pass. Runs on the server VM (k3s kubectl); run it again with
#   vagrant ssh ztagent-server -c 'sudo /ztagent/vagrant/provision/checks.sh'
set -uo pipefail

kubectl() { k3s kubectl "$@"; }
passed=0
failed=0
pass() { printf 'PASS  %s: %s\n' "$1" "$2"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s: %s\n' "$1" "$2"; failed=$((failed + 1)); }

pod_ip() { kubectl -n "$1" get pod -l "app=$2" -o jsonpath='{.items[0].status.podIP}'; }
node_of() { kubectl -n "$1" get pod -l "app=$2" -o jsonpath='{.items[0].spec.nodeName}'; }
node_ip() {
    kubectl get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'
}
# call NAMESPACE CLIENT URL: the echo app's JSON answer on stdout; non-zero when the call failed.
call() {
    kubectl -n "$1" exec "deploy/$2" -- python -m ztagent.lab.apps --get "$3" --timeout 5
}
peer_ip() { python3 -c 'import json, sys; print(json.load(sys.stdin)["peer"].rsplit(":", 1)[0])'; }
inbound_count() {
    # istio_tcp_connections_opened_total reported by the destination's agent, summed.
    curl -s --max-time 5 "http://$1:15020/stats/prometheus" | awk '
        /^istio_tcp_connections_opened_total\{/ && /reporter="destination"/ { n += $NF }
        END { printf "%d\n", n }'
}

# 1. every node runs a ready agent, and the control plane is ready
desired="$(kubectl -n ztagent-system get ds ztagent -o jsonpath='{.status.desiredNumberScheduled}')"
ready="$(kubectl -n ztagent-system get ds ztagent -o jsonpath='{.status.numberReady}')"
if [[ -n "$desired" && "$desired" == "$ready" ]]; then
    pass "agents" "$ready/$desired node agents ready"
else
    fail "agents" "${ready:-0}/${desired:-?} node agents ready"
fi
if kubectl -n ztagent-system rollout status deploy/ztagent-control --timeout=10s >/dev/null; then
    pass "control plane" "ztagent-control ready"
else
    fail "control plane" "ztagent-control not ready"
fi

# 2. same-node and cross-node calls in `demo` go through the agents: the echo app sees the
#    connection come from its node's agent (the node IP), not from the client pod.
client_ip="$(pod_ip demo sleep)"
for target in echo-a echo-b; do
    node="$(node_of demo "$target")"
    want="$(node_ip "$node")"
    before="$(inbound_count "$want")"
    if answer="$(call demo sleep "http://$(pod_ip demo "$target"):8080/$target")"; then
        seen="$(peer_ip <<<"$answer")"
        if [[ "$seen" == "$want" ]]; then
            pass "mesh call sleep -> $target" "$target on $node saw its agent ($seen)"
        elif [[ "$seen" == "$client_ip" ]]; then
            fail "mesh call sleep -> $target" "$target saw the client's own address: not captured"
        else
            fail "mesh call sleep -> $target" "$target saw $seen, expected $node's agent $want"
        fi
    else
        fail "mesh call sleep -> $target" "call failed"
    fi
    after="$(inbound_count "$want")"
    if [[ "$after" -gt "$before" ]]; then
        pass "metrics $node" "istio_tcp_connections_opened_total{reporter=destination} $before -> $after"
    else
        fail "metrics $node" "istio_tcp_connections_opened_total{reporter=destination} stayed at $after"
    fi
done

# 3. the agent's log names the HBONE connection for the cross-node call
agent_pod="$(kubectl -n ztagent-system get pod -l app.kubernetes.io/component=node-agent \
    --field-selector "spec.nodeName=$(node_of demo echo-b)" -o jsonpath='{.items[0].metadata.name}')"
if kubectl -n ztagent-system logs "$agent_pod" --since=2m | grep -q 'spiffe://cluster.local/ns/demo/sa/sleep'; then
    pass "access log" "$agent_pod logged a connection from spiffe://cluster.local/ns/demo/sa/sleep"
else
    fail "access log" "$agent_pod has no connection from the demo/sleep identity in the last 2 min"
fi

# 4. a namespace that is not enrolled is not captured: the echo sees the client pod itself
legacy_client="$(pod_ip legacy sleep)"
if answer="$(call legacy sleep "http://$(pod_ip legacy echo):8080/legacy")"; then
    seen="$(peer_ip <<<"$answer")"
    if [[ "$seen" == "$legacy_client" ]]; then
        pass "not enrolled" "legacy/echo saw the client's own address ($seen): direct"
    else
        fail "not enrolled" "legacy/echo saw $seen, expected the client $legacy_client"
    fi
else
    fail "not enrolled" "call failed"
fi

# 5. an L4 DENY policy on echo-b refuses demo/sleep; removing it lets calls through again
url="http://$(pod_ip demo echo-b):8080/policy"
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo-b
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/demo/sa/sleep"]
YAML
denied=no
for _ in $(seq 1 20); do
    if ! call demo sleep "$url" >/dev/null 2>&1; then
        denied=yes
        break
    fi
    sleep 1
done
kubectl -n demo delete authorizationpolicy deny-sleep >/dev/null
allowed=no
for _ in $(seq 1 20); do
    if call demo sleep "$url" >/dev/null 2>&1; then
        allowed=yes
        break
    fi
    sleep 1
done
if [[ "$denied" == yes && "$allowed" == yes ]]; then
    pass "policy" "DENY for demo/sleep refused the call; allowed again once removed"
else
    fail "policy" "denied while the policy existed: $denied; allowed after removal: $allowed"
fi

printf '%d passed, %d failed\n' "$passed" "$failed"
[[ "$failed" -eq 0 ]]
