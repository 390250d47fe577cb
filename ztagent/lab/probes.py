"""What the lab asks its running processes, from inside their network namespaces: an HTTP GET,
a TCP connect, the readiness of the agents, the waypoint and the control plane, and the
control plane's config dump."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from ztagent.lab import netns
from ztagent.lab.topology import LabError, Node, Plan


def http_get(
    netns_name: str, address: tuple[str, int], path: str, timeout: float = 3.0
) -> tuple[int, bytes]:
    """GET from inside `netns_name`; raises OSError / HTTPException on failure."""

    def get() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    return netns.run_in(netns_name, get, timeout + 5.0)


def tcp_open(netns_name: str, address: tuple[str, int], timeout: float = 1.0) -> bool:
    def probe() -> bool:
        try:
            with socket.create_connection(address, timeout=timeout):
                return True
        except OSError:
            return False

    return netns.run_in(netns_name, probe, timeout + 5.0)


def readiness(plan: Plan, node: Node) -> str:
    """ "ready", "HTTP <code>" or the error reaching the agent's readiness endpoint."""
    return _ready(node.netns, node.readiness)


def waypoint_readiness(plan: Plan) -> str:
    """The same for the waypoint, asked from inside its pod."""
    pod = plan.waypoint
    return _ready(pod.netns, pod.readiness)


def _ready(netns_name: str, address: tuple[str, int]) -> str:
    try:
        status, _ = http_get(netns_name, address, "/healthz/ready", 2.0)
    except (OSError, http.client.HTTPException, LabError) as exc:
        return f"unreachable ({exc})"
    return "ready" if status == 200 else f"HTTP {status}"


def control_ready(plan: Plan) -> str:
    try:
        status, body = http_get(plan.underlay_netns, plan.control_admin, "/ready", 1.0)
    except (OSError, http.client.HTTPException, LabError) as exc:
        return f"unreachable ({exc.__class__.__name__})"
    return "ready" if status == 200 else body.decode(errors="replace").strip() or str(status)


def control_dump(plan: Plan) -> dict[str, Any]:
    status, body = http_get(plan.underlay_netns, plan.control_admin, "/debug/config_dump", 3.0)
    if status != 200:
        raise LabError(f"control plane /debug/config_dump: HTTP {status}")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise LabError("control plane /debug/config_dump: not a JSON object")
    return data
