"""`lab status`: nodes, pods, enrolment, and the health of every lab process; exit 0 only
when all of it is up."""

from __future__ import annotations

import http.client
from typing import Any

from ztagent.lab import netns, state
from ztagent.lab.probes import control_dump, control_ready, readiness, waypoint_readiness
from ztagent.lab.topology import WAYPOINT_NAME, LabError, Plan
from ztagent.names import HBONE_PORT


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def print_status(plan: Plan) -> int:
    netns.require_root()
    st = state.load(plan.state_path)
    if st is None and not any(netns.netns_exists(n) for n in plan.namespaces):
        print(f"no lab in {plan.directory} (prefix {plan.prefix})")
        return 1
    config: dict[str, Any] = {}
    control = control_ready(plan)
    if control == "ready":
        try:
            config = control_dump(plan)
        except (OSError, ValueError, http.client.HTTPException, LabError) as exc:
            print(f"control plane: {exc}")
    protocols = {
        str(w.get("name")): str(w.get("protocol", ""))
        for w in config.get("workloads") or []
        if isinstance(w, dict)
    }
    procs = {p.name: p for p in (st.processes if st else [])}
    ok = True
    rows = [["NODE", "NETNS", "UNDERLAY IP", "PODS", "AGENT PID", "AGENT"]]
    for node in plan.nodes:
        rec = procs.get(node.name)
        if rec is None:
            pid, health = "-", "not started"
        elif not state.is_running(rec.pid, rec.start_time or None):
            pid, health = str(rec.pid), "not running"
        else:
            pid, health = str(rec.pid), readiness(plan, node)
        ok = ok and health == "ready"
        exists = netns.netns_exists(node.netns)
        ok = ok and exists
        rows.append(
            [
                node.name,
                node.netns if exists else f"{node.netns} (missing)",
                node.ip,
                node.pod_cidr,
                pid,
                health,
            ]
        )
    print(_table(rows))
    print()
    rows = [["POD", "NAMESPACE", "IP", "NODE", "ENROLLED", "NETNS", "APP"]]
    for pod in plan.pods:
        exists = netns.netns_exists(pod.netns)
        enrolled = "yes" if protocols.get(pod.key, "").upper() == "HBONE" else "no"
        rec = procs.get(f"app-{pod.key}") or procs.get(f"waypoint-{pod.key}")
        app = "-"
        if rec is not None:
            running = state.is_running(rec.pid, rec.start_time or None)
            app = f"pid {rec.pid}" if running else "not running"
            ok = ok and running
        ok = ok and exists
        rows.append(
            [
                pod.key,
                pod.namespace,
                pod.ip,
                pod.node,
                enrolled,
                pod.netns if exists else "missing",
                app,
            ]
        )
    print(_table(rows))
    print()
    waypoint = plan.waypoint
    rec = procs.get(f"waypoint-{waypoint.key}")
    if rec is None:
        health = "not started" + ("" if st and st.waypoint else " (no `waypoint` command)")
    elif not state.is_running(rec.pid, rec.start_time or None):
        health = f"pid {rec.pid}, not running"
        ok = False
    else:
        ready = waypoint_readiness(plan)
        health = f"pid {rec.pid}, {ready}"
        ok = ok and ready == "ready"
    print(
        f"waypoint: {WAYPOINT_NAME} in {waypoint.key} on {waypoint.ip}:{HBONE_PORT} "
        f"({waypoint.node}; {health})"
    )
    capture = "on" if st and st.capture else "off"
    phase = st.phase if st else "unknown"
    rec = procs.get("control")
    running = rec is not None and state.is_running(rec.pid, rec.start_time or None)
    ok = ok and control == "ready"
    print(
        f"control plane: {plan.control_ip}:{plan.control_address[1]} "
        f"({'pid ' + str(rec.pid) if rec and running else 'not running'}, {control}); "
        f"config errors: {len(config.get('errors') or [])}"
    )
    print(f"state: {phase}; capture: {capture}; config: {plan.resources_dir}; logs: {plan.log_dir}")
    return 0 if ok else 1
