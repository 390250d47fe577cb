"""What Istio's resources mean: one reader per kind, pure (no I/O, no asyncio), imported by the
control plane, the node agent and the waypoint and importing none of them.

`envelope` reads the object envelope every kind shares; `kubernetes` (Namespaces, Pods,
Services), `serviceentry`, `gateway` (waypoints), `peerauthentication`, `authorization/` (one
AuthorizationPolicy model, lowered to the node agent's L4 form in `l4` and evaluated per request
in `l7`), `jwt` (RequestAuthentication), `routing/` (VirtualService and HTTPRoute, compiled into
route tables), `destination` and `connection_pool` (DestinationRule) read the kinds; `resilience`,
`balancer` and `outlier` hold Envoy's retry, load-balancing and outlier-detection semantics the
waypoint applies; `localconfig` writes ztunnel's local config form.
"""
