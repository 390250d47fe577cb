"""The waypoint proxy: L7 routing and policy from Istio and Gateway API resources.

Pure pieces (no I/O): `routes` (VirtualService and HTTPRoute matching), `resilience` (retries,
faults), `destination` (DestinationRule load balancing, connection pools, outlier detection),
`authz` (L7 AuthorizationPolicy) and `jwt` (RequestAuthentication). The proxy itself is not
built yet.
"""
