"""The lab's processes: the command line of the control plane, each node agent, the waypoint
and each pod's echo app; starting them inside their namespaces (recorded in the state file)
and waiting until each is ready or has exited."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from ztagent.identity.ca import ROOT_CERT
from ztagent.lab import state
from ztagent.lab.probes import control_ready, readiness, tcp_open, waypoint_readiness
from ztagent.lab.report import say
from ztagent.lab.topology import (
    AGENT_NAMESPACE,
    AGENT_SERVICE_ACCOUNT,
    APP_PORT,
    GRPC_PORT,
    WAYPOINT_NAME,
    LabError,
    Node,
    Plan,
    Pod,
)

READY_TIMEOUT = 60.0
APP_TIMEOUT = 15.0
PROGRESS_EVERY = 5.0


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


def process_env() -> dict[str, str]:
    """This environment without the variables that `ztagent node`, `waypoint` and `control`
    would read in place of the flags the lab gives them."""
    return {k: v for k, v in os.environ.items() if k not in AGENT_ENV_DROPPED}


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


def start_control(plan: Plan, st: state.State) -> state.Process:
    env = process_env()
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


def control_plane_flags(plan: Plan, token_name: str) -> list[str]:
    """How a lab process reaches `ztagent control`: xDS and CA addresses, the root that
    verifies them, and its token."""
    control = f"{plan.control_ip}:{plan.control_address[1]}"
    root = str((plan.ca_dir / ROOT_CERT).resolve())
    return [
        "--xds-address",
        f"https://{control}",
        "--ca-address",
        f"https://{control}",
        "--xds-root-ca",
        root,
        "--ca-root-ca",
        root,
        "--token-path",
        str(plan.token_path(token_name).resolve()),
    ]


def agent_command(plan: Plan, node: Node, capture: bool) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "ztagent",
        "node",
        *control_plane_flags(plan, node.name),
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
        "--handover-socket",
        str(plan.handover_socket(node.name)),
    ]
    if capture:
        command += ["--capture", "--uplink", "eth0"]
    return command


def waypoint_command(plan: Plan) -> list[str]:
    """`ztagent waypoint` for the lab's waypoint pod, on the pod's own address."""
    pod = plan.waypoint

    def at(address: tuple[str, int]) -> str:
        return f"{address[0]}:{address[1]}"

    return [
        sys.executable,
        "-m",
        "ztagent",
        "waypoint",
        *control_plane_flags(plan, pod.key),
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


def wait_agents(
    plan: Plan, records: dict[str, state.Process], nodes: list[Node] | None = None
) -> None:
    start = time.monotonic()
    deadline = start + READY_TIMEOUT
    next_progress = start + PROGRESS_EVERY
    waiting = list(plan.nodes if nodes is None else nodes)
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


def wait_takeover(plan: Plan, node: Node, record: state.Process, offset: int) -> None:
    """Wait until the new agent of `node` says it took over (its log past `offset`)."""
    deadline = time.monotonic() + READY_TIMEOUT
    path = Path(record.log)
    while True:
        if not state.is_running(record.pid, record.start_time):
            raise LabError(
                f"the new agent of {node.name} exited; its log ({record.log}) ends with:\n"
                + _log_tail(record.log)
            )
        with contextlib.suppress(OSError), path.open("rb") as log:
            log.seek(offset)
            if b"took over in" in log.read():
                return
        if time.monotonic() >= deadline:
            raise LabError(f"the new agent of {node.name} did not take over in {READY_TIMEOUT:g}s")
        time.sleep(0.1)


def start_waypoint(plan: Plan, st: state.State) -> state.Process:
    pod = plan.waypoint
    env = process_env()
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
