"""HTTP for the agent and the waypoint: one stack, one concern per module.

`messages` (heads, whole requests and responses, header rules), `body` (streamed bodies with
backpressure), `detect` (HTTP/2, HTTP/1.x or TCP from the first bytes), `h1` (HTTP/1.1 server
connection and client on h11), `h2` (HTTP/2 server and client on h2), `server` (the route-table
server of the admin ports, and serving one stream of either version). It imports nothing of the
control plane, the node agent, the waypoint or the lab.
"""
