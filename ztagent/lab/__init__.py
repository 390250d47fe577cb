"""`ztagent lab`: a two-node ambient mesh on one Linux host, built from network namespaces.

`topology` plans names and addresses from the settings, `resources` turns the plan into the
Kubernetes and Istio objects the control plane serves, `configdir` writes them (with the CA
and tokens), `netns` runs `ip`, `state` records what was made so `down` can always remove it,
`processes` starts and waits for the control plane, agents, waypoint and `apps` (the pods'
echo app, HTTP and gRPC), `probes` asks them how they are. `command` is the command line of
`ztagent lab up|demo|status|down`: `lifecycle` (up, down), `status`, and `demo`, the mesh
checks, with `waypoint_demo` the waypoint's L7 checks; the checks send `traffic`, read the
`underlay` and print through `report`.
"""
