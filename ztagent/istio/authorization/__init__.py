"""Istio's AuthorizationPolicy: `l4` is what the node agent enforces on connections (ztunnel's
RBAC over the workload API's `Authorization`), `l7` what the waypoint evaluates per request."""
