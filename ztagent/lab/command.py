"""`ztagent lab up | demo | status | down`: a two-node ambient mesh in network namespaces."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ztagent.control.auth import TOKEN_SIGNING_KEY, TokenSigner
from ztagent.identity.ca import ROOT_CERT, CertificateAuthority
from ztagent.identity.certs import write_file
from ztagent.lab import netns, state
from ztagent.lab.resources import lab_resources as lab_resources
from ztagent.lab.topology import (
    AGENT_NAMESPACE,
    AGENT_SERVICE_ACCOUNT,
    APP_PORT,
    GATEWAY,
    GRPC_PORT,
    HBONE_PORT,
    TRUST_DOMAIN,
    WAYPOINT_NAME,
    LabError,
    Node,
    Plan,
    Pod,
    Settings,
    make_plan,
)

READY_TIMEOUT = 60.0
APP_TIMEOUT = 15.0
PROGRESS_EVERY = 5.0
SYSTEM_DIR = Path("/var/lib/ztagent-lab")


def default_dir() -> Path:
    """/var/lib/ztagent-lab when it can be used (root), else ./.lab."""
    if os.geteuid() == 0 and (SYSTEM_DIR.exists() or SYSTEM_DIR.parent.is_dir()):
        return SYSTEM_DIR
    return Path(".lab")


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


# --------------------------------------------------------------------------- config


def write_resources(path: Path, documents: list[dict[str, Any]]) -> None:
    """Replace one YAML file at once, so the control plane never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    os.replace(tmp, path)


def read_resources(path: Path) -> list[dict[str, Any]]:
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise LabError(f"cannot read {path}: {exc}") from None
    if not all(isinstance(d, dict) for d in documents):
        raise LabError(f"{path}: every document must be a mapping")
    return documents


def issue_tokens(plan: Plan) -> None:
    """One token per node agent, bound to its node (the CA lets it ask for that node's pods),
    and the waypoint's, for its own service account and pod (what `ztagent control token
    --namespace demo --service-account waypoint --node node-b --pod b-waypt` writes)."""
    signer = TokenSigner(plan.ca_dir / TOKEN_SIGNING_KEY, trust_domain=TRUST_DOMAIN)
    tokens: list[tuple[str, str]] = []
    for node in plan.nodes:
        token = signer.issue(
            AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, node=node.name, pod=f"ztagent-{node.name}"
        )
        tokens.append((node.name, token))
    waypoint = plan.waypoint
    token = signer.issue(
        waypoint.namespace, waypoint.service_account, node=waypoint.node, pod=waypoint.key
    )
    tokens.append((waypoint.key, token))
    for name, token in tokens:
        path = plan.token_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, token.encode(), 0o600)


# --------------------------------------------------------------------------- HTTP in a netns


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


# --------------------------------------------------------------------------- up


def _help(*words: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ztagent", *words, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout if done.returncode == 0 else ""


def capture_supported() -> bool:
    """Whether this `ztagent node` has the eBPF capture flags."""
    return "--capture" in _help("node")


def waypoint_supported() -> bool:
    """Whether this ztagent has the `waypoint` command (with the flags the lab passes)."""
    return "--gateway" in _help("waypoint")


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


AGENT_ENV_DROPPED = (
    "XDS_ADDRESS",
    "CA_ADDRESS",
    "LOCAL_XDS_PATH",
    "NODE_NAME",
    "XDS_ROOT_CA",
    "CA_ROOT_CA",
    "TOKEN_PATH",
    "POD_NAME",
    "POD_NAMESPACE",
    "INSTANCE_IP",
    "CLUSTER_ID",
    "TRUST_DOMAIN",
)


def start_process(
    plan: Plan,
    st: state.State,
    name: str,
    ns: str,
    command: list[str],
    env: dict[str, str] | None = None,
) -> state.Process:
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    log = plan.log_path(name)
    full = ["ip", "netns", "exec", ns, *command]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    record = state.Process(
        name=name,
        pid=proc.pid,
        start_time=state.start_time(proc.pid) or 0,
        netns=ns,
        command=full,
        log=str(log),
    )
    st.processes.append(record)
    state.save(plan.state_path, st)
    return record


def control_command(plan: Plan) -> list[str]:
    ip = plan.control_ip
    return [
        sys.executable,
        "-m",
        "ztagent",
        "control",
        "--config-dir",
        str(plan.resources_dir.resolve()),
        "--ca-dir",
        str(plan.ca_dir.resolve()),
        "--listen",
        f"{ip}:{plan.control_address[1]}",
        "--admin",
        f"{ip}:{plan.control_admin[1]}",
        "--serving-name",
        ip,
        "--trusted-node-agents",
        f"{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}",
    ]


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


def start_control(plan: Plan, st: state.State) -> state.Process:
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV_DROPPED}
    return start_process(plan, st, "control", plan.underlay_netns, control_command(plan), env)


def wait_control(plan: Plan, record: state.Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if not state.is_running(record.pid, record.start_time):
            raise LabError(f"the control plane exited:\n{_log_tail(record.log)}")
        if control_ready(plan) == "ready":
            return
        if time.monotonic() >= deadline:
            raise LabError(f"the control plane is not ready after {READY_TIMEOUT:g}s")
        time.sleep(0.1)


def agent_command(plan: Plan, node: Node, capture: bool) -> list[str]:
    control = f"{plan.control_ip}:{plan.control_address[1]}"
    root = str((plan.ca_dir / ROOT_CERT).resolve())
    command = [
        sys.executable,
        "-m",
        "ztagent",
        "node",
        "--xds-address",
        f"https://{control}",
        "--ca-address",
        f"https://{control}",
        "--xds-root-ca",
        root,
        "--ca-root-ca",
        root,
        "--token-path",
        str(plan.token_path(node.name).resolve()),
        "--pod-name",
        f"ztagent-{node.name}",
        "--pod-namespace",
        AGENT_NAMESPACE,
        "--instance-ip",
        node.ip,
        "--node-name",
        node.name,
        "--admin-addr",
        f"{node.admin[0]}:{node.admin[1]}",
        "--metrics-addr",
        f"{node.metrics[0]}:{node.metrics[1]}",
        "--readiness-addr",
        f"{node.readiness[0]}:{node.readiness[1]}",
        "--socks5-addr",
        "off",
    ]
    if capture:
        command += ["--capture", "--uplink", "eth0"]
    return command


def waypoint_command(plan: Plan) -> list[str]:
    """`ztagent waypoint` for the lab's waypoint pod, on the pod's own address."""
    pod = plan.waypoint
    control = f"{plan.control_ip}:{plan.control_address[1]}"
    root = str((plan.ca_dir / ROOT_CERT).resolve())

    def at(address: tuple[str, int]) -> str:
        return f"{address[0]}:{address[1]}"

    return [
        sys.executable,
        "-m",
        "ztagent",
        "waypoint",
        "--xds-address",
        f"https://{control}",
        "--ca-address",
        f"https://{control}",
        "--xds-root-ca",
        root,
        "--ca-root-ca",
        root,
        "--token-path",
        str(plan.token_path(pod.key).resolve()),
        "--pod-name",
        pod.key,
        "--pod-namespace",
        pod.namespace,
        "--service-account",
        pod.service_account,
        "--instance-ip",
        pod.ip,
        "--node-name",
        pod.node,
        "--gateway",
        WAYPOINT_NAME,
        "--listen",
        at(pod.hbone),
        "--admin-addr",
        at(pod.admin),
        "--metrics-addr",
        at(pod.metrics),
        "--readiness-addr",
        at(pod.readiness),
    ]


def app_command(pod: Pod) -> list[str]:
    """The echo app of `pod` (with gRPC for the `web` pods)."""
    command = [
        sys.executable,
        "-m",
        "ztagent.lab.apps",
        "--listen",
        f"{pod.ip}:{APP_PORT}",
        "--name",
        pod.key,
        "--version",
        pod.version,
    ]
    if pod.grpc:
        command += ["--grpc-port", str(GRPC_PORT)]
    return command


def _log_tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_apps(plan: Plan, records: dict[str, state.Process]) -> None:
    deadline = time.monotonic() + APP_TIMEOUT
    waiting = list(plan.app_pods)
    while waiting:
        for pod in list(waiting):
            rec = records[pod.key]
            if not state.is_running(rec.pid, rec.start_time):
                raise LabError(f"the echo app in {pod.netns} exited:\n{_log_tail(rec.log)}")
            if tcp_open(pod.netns, pod.address, 0.5) and (
                not pod.grpc or tcp_open(pod.netns, pod.grpc_address, 0.5)
            ):
                waiting.remove(pod)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(p.key for p in waiting)
            raise LabError(f"echo apps not listening after {APP_TIMEOUT:g}s: {names}")
        time.sleep(0.1)


def wait_agents(plan: Plan, records: dict[str, state.Process]) -> None:
    start = time.monotonic()
    deadline = start + READY_TIMEOUT
    next_progress = start + PROGRESS_EVERY
    waiting = list(plan.nodes)
    while waiting:
        for node in list(waiting):
            rec = records[node.name]
            if not state.is_running(rec.pid, rec.start_time):
                raise LabError(
                    f"the agent of {node.name} exited; its log ({rec.log}) ends with:\n"
                    + _log_tail(rec.log)
                )
            if readiness(plan, node) == "ready":
                say(f"agent {node.name} ready ({time.monotonic() - start:.1f}s)")
                waiting.remove(node)
        if not waiting:
            return
        now = time.monotonic()
        if now >= deadline:
            names = ", ".join(n.name for n in waiting)
            raise LabError(
                f"agents not ready after {READY_TIMEOUT:g}s: {names} (logs in {plan.log_dir})"
            )
        if now >= next_progress:
            say(f"waiting for agents ({now - start:.0f}s): {', '.join(n.name for n in waiting)}")
            next_progress = now + PROGRESS_EVERY
        time.sleep(0.2)


def start_waypoint(plan: Plan, st: state.State) -> state.Process:
    pod = plan.waypoint
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV_DROPPED}
    return start_process(plan, st, f"waypoint-{pod.key}", pod.netns, waypoint_command(plan), env)


def wait_waypoint(plan: Plan, record: state.Process) -> None:
    """Until the waypoint answers 200 on /healthz/ready, with a progress line now and then."""
    start = time.monotonic()
    deadline = start + READY_TIMEOUT
    next_progress = start + PROGRESS_EVERY
    while True:
        if not state.is_running(record.pid, record.start_time):
            raise LabError(
                f"the waypoint exited; its log ({record.log}) ends with:\n" + _log_tail(record.log)
            )
        health = waypoint_readiness(plan)
        if health == "ready":
            say(f"waypoint {plan.waypoint.key} ready ({time.monotonic() - start:.1f}s)")
            return
        now = time.monotonic()
        if now >= deadline:
            raise LabError(
                f"the waypoint is not ready after {READY_TIMEOUT:g}s ({health}); log: {record.log}"
            )
        if now >= next_progress:
            say(f"waiting for the waypoint ({now - start:.0f}s): {health}")
            next_progress = now + PROGRESS_EVERY
        time.sleep(0.2)


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
    if plan.ca_dir.exists() and not any(plan.ca_dir.iterdir()):
        plan.ca_dir.rmdir()
    CertificateAuthority.load_or_create(plan.ca_dir, TRUST_DOMAIN)
    for name, documents in lab_resources(plan).items():
        write_resources(plan.resources_dir / name, documents)
    issue_tokens(plan)
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
        env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV_DROPPED}
        records[node.name] = start_process(plan, st, node.name, node.netns, command, env)
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


# --------------------------------------------------------------------------- down


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
    removed = 0
    for name in reversed(names):
        if netns.netns_exists(name):
            netns.delete_netns(name)
            removed += 1
    say(f"removed {removed} namespace(s)")
    state.remove(plan.state_path)
    return 0


# --------------------------------------------------------------------------- status


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


# --------------------------------------------------------------------------- CLI


def _plan(args: argparse.Namespace) -> Plan:
    directory = Path(args.dir) if args.dir else default_dir()
    settings = Settings(args.prefix, args.pod_cidr, args.underlay_cidr, directory)
    st = state.load(directory / "state.json")
    if st is not None and (st.prefix, st.pod_cidr, st.underlay_cidr) != (
        settings.prefix,
        settings.pod_cidr,
        settings.underlay_cidr,
    ):
        if args.lab_command in ("up", "demo", "status") and _explicit(args):
            raise LabError(
                f"{directory} holds a lab with prefix {st.prefix!r}, pods {st.pod_cidr}, "
                f"underlay {st.underlay_cidr}: run `ztagent lab down --dir {directory}` first"
            )
        settings = Settings(st.prefix, st.pod_cidr, st.underlay_cidr, directory)
    return make_plan(settings)


def _explicit(args: argparse.Namespace) -> bool:
    return bool(args.explicit_settings)


class _Setting(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.explicit_settings = True


def _run(args: argparse.Namespace) -> int:
    from ztagent.lab import demo

    plan = _plan(args)
    if args.lab_command == "up":
        return up(plan)
    if args.lab_command == "down":
        return down(plan)
    if args.lab_command == "status":
        return print_status(plan)
    return demo.run(plan)


def register(subparsers: Any) -> None:
    from ztagent.lab.topology import DEFAULT_POD_CIDR, DEFAULT_PREFIX, DEFAULT_UNDERLAY_CIDR

    parser = subparsers.add_parser(
        "lab",
        help="a two-node ambient mesh on this host, in network namespaces (root)",
        description=(
            "Build, check and remove a two-node ambient mesh on this Linux host: an underlay "
            "namespace with a bridge, two node namespaces each running `ztagent node`, and pods "
            "(namespaces with veths and /32 routes) running an HTTP echo app."
        ),
    )
    lab_sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    helps = {
        "up": "build the lab and start the agents (takes down a previous one first)",
        "demo": "run the checks: PASS/FAIL per line, exit 0 only when all pass",
        "status": "nodes, pods, enrolment and agent health",
        "down": "stop every lab process and remove every lab namespace (also after a crash)",
    }
    for name, text in helps.items():
        sub = lab_sub.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=_run, explicit_settings=False)
        sub.add_argument(
            "--prefix",
            default=DEFAULT_PREFIX,
            action=_Setting,
            help=f"name prefix of every namespace and link (default {DEFAULT_PREFIX})",
        )
        sub.add_argument(
            "--pod-cidr",
            default=DEFAULT_POD_CIDR,
            action=_Setting,
            help=f"pod and service range, /22 or larger (default {DEFAULT_POD_CIDR})",
        )
        sub.add_argument(
            "--underlay-cidr",
            default=DEFAULT_UNDERLAY_CIDR,
            action=_Setting,
            help=f"node range (default {DEFAULT_UNDERLAY_CIDR})",
        )
        sub.add_argument(
            "--dir",
            default=None,
            help=f"state, config, CA and logs (default {SYSTEM_DIR} as root, else ./.lab)",
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m ztagent.lab.command ACTION ...`: the same as `ztagent lab ACTION ...`."""
    from ztagent.errors import ZtagentError

    parser = argparse.ArgumentParser(prog="ztagent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    try:
        result: int = args.handler(args)
    except ZtagentError as exc:
        print(f"ztagent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
