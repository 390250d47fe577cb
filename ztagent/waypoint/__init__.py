"""The waypoint proxy: L7 routing and policy for the Services and workloads that use it.

What Istio's L7 resources mean lives in `ztagent.istio` (routing, destination, jwt,
authorization); here are the runtime's parts: `config` compiles the resources the control plane
sends into one `WaypointConfig`; `pipeline` (with `commands` and `retry`) decides, per request
and without I/O, what to do; `proxy` carries that out over `ztagent.http`, with `cluster` and
`upstream` for endpoints and upstream connections, `pipe` for L4 tunnels, `server` for the
HBONE listener, xDS and certificates, and `command` for `ztagent waypoint`.
"""
