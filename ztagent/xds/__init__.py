"""Istio control-plane wire types and the delta ADS protocol, below the control plane, the node
agent and the waypoint (it imports none of them).

- `convert`: our model <-> Istio's wire messages (workload Address, Authorization) and the
  waypoints' `L7Resource`, with the checks applied to untrusted resources.
- `stream`: the server side of one delta ADS stream (`DeltaStream`), without I/O, with the caps
  a hostile client meets.
- `client`: the client side (`DeltaClient`), without I/O.
- `adsclient`: `XdsClient`, the client state machine over a gRPC stream, reconnecting.
- `connection`: the gRPC target, TLS channel, token headers and node identity.
- `caclient`: `CaClient`, workload certificates from an istiod-compatible CA.

The .proto sources are in ``proto/``; the Python modules in ``gen/`` are generated from them
(``scripts/gen-protos.sh``).
"""
