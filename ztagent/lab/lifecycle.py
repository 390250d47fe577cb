"""`lab up` and `lab down`: build the network, write the config, start the processes in
order (control plane, echo apps, agents, waypoint); stop them all and delete every namespace.

Everything made is recorded in the state file as it is made, so `down` removes a partial lab
too."""

from __future__ import annotations

import time

from ztagent.lab import netns, state
from ztagent.lab.configdir import write_config
from ztagent.lab.processes import (
    agent_command,
    app_command,
    capture_supported,
    process_env,
    start_control,
    start_process,
    start_waypoint,
    wait_agents,
    wait_apps,
    wait_control,
    wait_takeover,
    wait_waypoint,
    waypoint_supported,
)
from ztagent.lab.report import say
from ztagent.lab.status import print_status
from ztagent.lab.topology import GATEWAY, LabError, Plan
from ztagent.names import HBONE_PORT


def up(plan: Plan) -> int:
    netns.require_root()
    try:
        return _up(plan)
    except LabError as exc:
        raise LabError(
            f"{exc}\nthe partial lab is recorded in {plan.state_path}; "
            f"`ztagent lab down --dir {plan.directory}` removes it"
        ) from None


def _up(plan: Plan) -> int:
    if plan.state_path.exists() or any(netns.netns_exists(n) for n in plan.namespaces):
        say("a previous lab is here; taking it down first")
        down(plan)
    plan.directory.mkdir(parents=True, exist_ok=True)
    st = state.State(plan.prefix, plan.settings.pod_cidr, plan.settings.underlay_cidr)
    state.save(plan.state_path, st)
    started = time.monotonic()
    say(f"[1/7] Kubernetes objects, CA and tokens in {plan.directory}")
    write_config(plan)
    say(f"[2/7] network: {len(plan.namespaces)} namespaces, underlay {plan.settings.underlay_cidr}")
    build_network(plan, st)
    say(f"[3/7] control plane on {plan.control_ip}:{plan.control_address[1]} (xDS + CA, TLS)")
    wait_control(plan, start_control(plan, st))
    say(f"[4/7] echo apps in {len(plan.app_pods)} pods")
    records: dict[str, state.Process] = {}
    for pod in plan.app_pods:
        records[pod.key] = start_process(plan, st, f"app-{pod.key}", pod.netns, app_command(pod))
    wait_apps(plan, records)
    capture = capture_supported()
    st.capture = capture
    mode = "with eBPF capture" if capture else "WITHOUT capture (this ztagent has no --capture)"
    say(f"[5/7] agents {mode}, configured over xDS")
    for node in plan.nodes:
        command = agent_command(plan, node, capture)
        records[node.name] = start_process(plan, st, node.name, node.netns, command, process_env())
    wait_agents(plan, records)
    waypoint = plan.waypoint
    if waypoint_supported():
        say(f"[6/7] waypoint in {waypoint.key} on {waypoint.ip}:{HBONE_PORT} ({waypoint.node})")
        st.waypoint = True
        wait_waypoint(plan, start_waypoint(plan, st))
    else:
        say("[6/7] no waypoint: this ztagent has no `waypoint` command (L7 checks will FAIL)")
    st.phase = "up"
    state.save(plan.state_path, st)
    say(f"[7/7] up in {time.monotonic() - started:.1f}s; config: {plan.resources_dir}")
    print_status(plan)
    return 0


def upgrade(plan: Plan, names: list[str]) -> int:
    """Replace the node agents of `names` (default: every node) without dropping a
    connection: a new agent takes over from the running one (`--handover-socket`), which
    drains what it holds and exits."""
    netns.require_root()
    st = state.load(plan.state_path)
    if st is None or st.phase != "up":
        raise LabError(f"no lab is up in {plan.directory}; `ztagent lab up` first")
    nodes = [plan.node(name) for name in names] if names else list(plan.nodes)
    for node in nodes:
        old = next((p for p in reversed(st.processes) if p.name == node.name), None)
        log_path = plan.log_path(node.name)
        offset = log_path.stat().st_size if log_path.exists() else 0
        started = time.monotonic()
        say(f"upgrading the agent of {node.name}: a new agent takes over")
        command = agent_command(plan, node, st.capture)
        record = start_process(plan, st, node.name, node.netns, command, process_env())
        wait_takeover(plan, node, record, offset)
        say(f"agent {node.name} took over in {time.monotonic() - started:.1f}s")
        wait_agents(plan, {node.name: record}, [node])
        if old is not None and state.is_running(old.pid, old.start_time):
            say(f"the previous agent of {node.name} (pid {old.pid}) drains its connections")
    return 0


def down(plan: Plan) -> int:
    """Stop every lab process, delete every lab namespace. Idempotent."""
    netns.require_root()
    st = state.load(plan.state_path)
    names = list(dict.fromkeys([*(st.namespaces if st else []), *plan.namespaces]))
    targets: list[tuple[int, int | None]] = []
    if st:
        targets += [(p.pid, p.start_time or None) for p in st.processes]
    for name in names:
        targets += [(pid, None) for pid in netns.netns_pids(name)]
    unique: dict[int, int | None] = {}
    for pid, started in targets:
        unique.setdefault(pid, started)
    stopped = state.stop(list(unique.items()))
    if stopped:
        say(f"stopped {len(stopped)} process(es)")
    for node in plan.nodes:  # left behind by an agent that was killed
        plan.handover_socket(node.name).unlink(missing_ok=True)
    removed = 0
    for name in reversed(names):
        if netns.netns_exists(name):
            netns.delete_netns(name)
            removed += 1
    say(f"removed {removed} namespace(s)")
    state.remove(plan.state_path)
    return 0


# --------------------------------------------------------------------------- network


def _record_netns(plan: Plan, st: state.State, name: str) -> None:
    if name not in st.namespaces:
        st.namespaces.append(name)
        state.save(plan.state_path, st)
    netns.add_netns(name)


def build_network(plan: Plan, st: state.State) -> None:
    under = plan.underlay_netns
    _record_netns(plan, st, under)
    netns.ip("link", "add", plan.bridge, "type", "bridge", netns=under)
    netns.ip("link", "set", plan.bridge, "up", netns=under)
    prefixlen = plan.settings.underlay_cidr.split("/")[1]
    netns.ip("addr", "add", f"{plan.control_ip}/{prefixlen}", "dev", plan.bridge, netns=under)
    for node in plan.nodes:
        _record_netns(plan, st, node.netns)
        netns.ip(
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            node.underlay_port,
            netns=node.netns,
        )
        netns.ip("link", "set", node.underlay_port, "netns", under, netns=node.netns)
        netns.ip("link", "set", node.underlay_port, "master", plan.bridge, "up", netns=under)
        netns.ip("addr", "add", f"{node.ip}/{prefixlen}", "dev", "eth0", netns=node.netns)
        netns.ip("link", "set", "eth0", "up", netns=node.netns)
        # The pods' gateway: a link-scoped local address, so ARP for it is answered on every
        # pod veth and it is never picked as a source address.
        netns.ip("addr", "add", f"{GATEWAY}/32", "dev", "lo", "scope", "link", netns=node.netns)
        netns.sysctl(node.netns, "net.ipv4.ip_forward", "1")
    for node in plan.nodes:
        # Pods that talk to the control plane themselves (the waypoint) get answers back.
        netns.ip("route", "add", node.pod_cidr, "via", node.ip, netns=under)
        for other in plan.nodes:
            if other.name != node.name:
                netns.ip("route", "add", other.pod_cidr, "via", other.ip, netns=node.netns)
    for pod in plan.pods:
        node = plan.node(pod.node)
        _record_netns(plan, st, pod.netns)
        netns.ip(
            "link", "add", "eth0", "type", "veth", "peer", "name", pod.host_veth, netns=pod.netns
        )
        netns.ip("link", "set", pod.host_veth, "netns", node.netns, netns=pod.netns)
        netns.ip("link", "set", pod.host_veth, "up", netns=node.netns)
        netns.sysctl(node.netns, f"net.ipv4.conf.{pod.host_veth}.proxy_arp", "1")
        netns.sysctl(node.netns, f"net.ipv4.neigh.{pod.host_veth}.proxy_delay", "0")
        netns.ip("route", "add", f"{pod.ip}/32", "dev", pod.host_veth, netns=node.netns)
        netns.ip("addr", "add", f"{pod.ip}/32", "dev", "eth0", netns=pod.netns)
        netns.ip("link", "set", "eth0", "up", netns=pod.netns)
        netns.ip("route", "add", GATEWAY, "dev", "eth0", "scope", "link", netns=pod.netns)
        netns.ip(
            "route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink", netns=pod.netns
        )
