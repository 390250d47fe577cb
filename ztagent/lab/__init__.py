"""`ztagent lab`: a two-node ambient mesh on one Linux host, built from network namespaces.

`topology` plans names and addresses from the settings, `resources` turns the plan into the
Kubernetes and Istio objects the control plane serves, `netns` runs `ip`, `state` records
what was made so `down` can always remove it, `apps` is the pods' echo app (HTTP and gRPC),
`command` is `ztagent lab up|demo|status|down`, `demo` holds the mesh checks and
`waypoint_demo` the waypoint's L7 checks.
"""
