"""Istio's AuthorizationPolicy: `policy` reads one into the model both enforcement points share;
`l4` lowers it to what the node agent enforces on connections (ztunnel's RBAC over the
workload API's `Authorization`) and decides connections; `waypoint` picks the policies attached
by `targetRefs` and `l7` decides the waypoint's requests."""
