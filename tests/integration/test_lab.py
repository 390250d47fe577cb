"""`ztagent lab` end to end, as root: up, status, the pods' apps, down, a crash of `up`, demo.

Everything the lab makes here has the prefix `ztlt-` and addresses in 10.246.0.0/16; the state
directory is the test's own. Every test takes the lab down on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ztagent.lab import apps, demo, netns, probes, processes, state, waypoint_demo
from ztagent.lab.configdir import read_resources, write_resources
from ztagent.lab.topology import APP_PORT, Node, Plan, Pod, Settings, make_plan

PREFIX = "ztlt-"
POD_CIDR = "10.246.0.0/17"
UNDERLAY_CIDR = "10.246.128.0/24"
COMMAND_TIMEOUT = 180.0
LOCK_PATH = Path(tempfile.gettempdir()) / "ztagent-lab-test.lock"

IS_ROOT = os.geteuid() == 0
if not IS_ROOT:
    print("test_lab: skipped, the lab needs root (network namespaces)", file=sys.stderr)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not IS_ROOT, reason="the lab needs root (network namespaces, veths)"),
]


def _lab_command() -> list[str]:
    from ztagent.cli import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if "lab" in getattr(action, "choices", {}):
            return [sys.executable, "-m", "ztagent", "lab"]
    return [sys.executable, "-m", "ztagent.lab.command"]


def lab(
    directory: Path, action: str, *arguments: str, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    command = [
        *_lab_command(),
        action,
        *arguments,
        "--prefix",
        PREFIX,
        "--pod-cidr",
        POD_CIDR,
        "--underlay-cidr",
        UNDERLAY_CIDR,
        "--dir",
        str(directory),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def ours(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(PREFIX)]


def leftovers(directory: Path, pids: list[tuple[int, int]]) -> list[str]:
    found = [f"netns {n}" for n in ours(netns.list_netns())]
    found += [f"link {n}" for n in ours(netns.links())]
    found += [f"process {pid}" for pid, started in pids if state.is_running(pid, started)]
    if (directory / "state.json").exists():
        found.append("state file")
    return found


def recorded_pids(directory: Path) -> list[tuple[int, int]]:
    st = state.load(directory / "state.json")
    return [(p.pid, p.start_time) for p in st.processes] if st else []


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One lab test at a time on this host: the prefix and ranges are fixed."""
    with LOCK_PATH.open("a") as f:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{LOCK_PATH} held for 600s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "lab"
    with exclusive():
        try:
            yield directory
        finally:
            done = lab(directory, "down")
            for name in ours(netns.list_netns()):
                netns.delete_netns(name)
            assert done.returncode == 0, done.stderr


def settings(directory: Path) -> Settings:
    return Settings(PREFIX, POD_CIDR, UNDERLAY_CIDR, directory)


def call_from(pod_netns: str, ip: str, port: int, path: str) -> dict[str, object]:
    status, body = netns.run_in(pod_netns, lambda: apps.request(ip, port, path, 0, 10.0))
    assert status == 200, body
    answer: dict[str, object] = json.loads(body)
    return answer


def test_up_status_apps_down(lab_dir: Path) -> None:
    plan = make_plan(settings(lab_dir))
    done = lab(lab_dir, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[7/7]" in done.stdout

    assert sorted(ours(netns.list_netns())) == sorted(plan.namespaces)
    status = lab(lab_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for node in plan.nodes:
        line = next(line for line in status.stdout.splitlines() if line.startswith(node.name))
        assert node.ip in line and line.rstrip().endswith("ready"), status.stdout
    for pod in plan.pods:
        line = next(line for line in status.stdout.splitlines() if line.startswith(pod.key + " "))
        enrolled = "yes" if pod.enrolled else "no"
        assert pod.ip in line and pod.node in line and f" {enrolled} " in line, status.stdout
    for name in ("namespaces.yaml", "pods.yaml", "services.yaml", "waypoint.yaml"):
        assert (lab_dir / "config" / name).exists()
    assert "control plane: " in status.stdout and ", ready); config errors: 0" in status.stdout
    assert (lab_dir / "logs" / "node-a.log").exists()
    assert (lab_dir / "logs" / "control.log").exists()

    # Every pod's app answers with its own name, and a call between non-enrolled pods on
    # different nodes is direct: the app sees the caller's address.
    legacy_b, legacy_a = plan.pod("b-legacy"), plan.pod("a-legacy")
    for pod in plan.app_pods:
        answer = call_from(legacy_b.netns, pod.ip, 8080, f"/hello-{pod.key}")
        assert answer["pod"] == pod.key and answer["path"] == f"/hello-{pod.key}"
    answer = call_from(legacy_b.netns, legacy_a.ip, 8080, "/direct")
    assert str(answer["peer"]).rsplit(":", 1)[0] == legacy_b.ip

    pids = recorded_pids(lab_dir)
    st = state.load(lab_dir / "state.json")
    assert st is not None
    waypoint = 1 if st.waypoint else 0
    assert len(pids) == len(plan.app_pods) + len(plan.nodes) + 1 + waypoint  # + control plane
    line = next(line for line in status.stdout.splitlines() if line.startswith("waypoint: "))
    assert plan.waypoint.ip in line
    assert line.endswith(", ready)") if st.waypoint else "not started" in line, line
    done = lab(lab_dir, "down")
    assert done.returncode == 0, done.stderr
    assert leftovers(lab_dir, pids) == []
    again = lab(lab_dir, "down")
    assert again.returncode == 0, again.stderr
    assert lab(lab_dir, "status").returncode != 0


def test_down_after_up_killed_midway(lab_dir: Path) -> None:
    command = [
        *_lab_command(),
        "up",
        "--prefix",
        PREFIX,
        "--pod-cidr",
        POD_CIDR,
        "--underlay-cidr",
        UNDERLAY_CIDR,
        "--dir",
        str(lab_dir),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if recorded_pids(lab_dir) or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "up finished before it could be killed"
        assert ours(netns.list_netns()), "up made no namespace before being killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    pids = recorded_pids(lab_dir)
    done = lab(lab_dir, "down")
    assert done.returncode == 0, done.stderr
    assert leftovers(lab_dir, pids) == []


def _capture_flag() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "ztagent", "node", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--capture" in done.stdout


def test_demo_passes(lab_dir: Path) -> None:
    if not _capture_flag():
        pytest.skip("`ztagent node` has no --capture yet: the mesh checks need it")
    done = lab(lab_dir, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    demo = lab(lab_dir, "demo")
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
        for p in sorted((lab_dir / "logs").glob("node-*.log"))
    )
    lines = [line for line in demo.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 7 + len(waypoint_demo.CHECK_NAMES), demo.stdout + demo.stderr
    assert all(line.startswith("PASS") for line in lines[:7]), demo.stdout + demo.stderr + logs
    st = state.load(lab_dir / "state.json")
    assert st is not None
    if st.waypoint:
        assert demo.returncode == 0, demo.stdout + demo.stderr + logs
        assert f"{len(lines)}/{len(lines)} checks passed" in demo.stdout
    else:
        assert demo.returncode == 1 and "7/14 checks passed" in demo.stdout, demo.stdout


# --------------------------------------------------------------------------- capture at runtime


def lab_up_with_capture(directory: Path) -> Plan:
    if not _capture_flag():
        pytest.skip("`ztagent node` has no --capture yet")
    done = lab(directory, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    st = state.load(directory / "state.json")
    assert st is not None and st.capture, "the lab's agents run without --capture"
    return make_plan(settings(directory))


def node_logs(plan: Plan) -> str:
    return "\n".join(
        f"--- {node.name}\n{plan.log_path(node.name).read_text(errors='replace')[-3000:]}"
        for node in plan.nodes
        if plan.log_path(node.name).exists()
    )


def peer_seen(source: Pod, dest: Pod, path: str) -> str:
    """The address `dest`'s echo app saw for a call from `source`."""
    answer = call_from(source.netns, dest.ip, APP_PORT, path)
    assert answer["pod"] == dest.key, answer
    return str(answer["peer"]).rsplit(":", 1)[0]


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def set_enrolled(plan: Plan, key: str, enrolled: bool) -> None:
    """Opt a pod out with `istio.io/dataplane-mode: none`, or back in, in the Pod object."""
    path = plan.resources_dir / "pods.yaml"
    pods = read_resources(path)
    found = [p for p in pods if p["metadata"]["name"] == key]
    assert len(found) == 1, f"{key} not in {path}"
    labels = found[0]["metadata"].setdefault("labels", {})
    if enrolled:
        labels.pop("istio.io/dataplane-mode", None)
    else:
        labels["istio.io/dataplane-mode"] = "none"
    write_resources(path, pods)


def tc_filters(node: Node, devices: list[str]) -> dict[str, list[str]]:
    """The ids of the BPF programs on each device's ingress and egress hooks, as tc lists them."""
    out: dict[str, list[str]] = {}
    for dev in devices:
        for hook in ("ingress", "egress"):
            text = netns.exec_in(node.netns, ["tc", "filter", "show", "dev", dev, hook])
            out[f"{dev} {hook}"] = re.findall(r"\bbpf\b.*?\bid (\d+)", text)
    return out


def test_unenrol_and_reenrol_at_runtime_without_reload(lab_dir: Path) -> None:
    plan = lab_up_with_capture(lab_dir)
    node_a = plan.node("node-a")
    sleep, b_legacy = plan.pod("a-sleep"), plan.pod("b-legacy")
    a_legacy = plan.pod("a-legacy")
    devices = ["eth0", sleep.host_veth]
    before = tc_filters(node_a, devices)
    assert before[f"{sleep.host_veth} ingress"] and before["eth0 ingress"], before

    # b-legacy is not enrolled: only node-a's capture can change what it sees.
    assert peer_seen(sleep, b_legacy, "/enrolled") == node_a.ip, node_logs(plan)
    assert peer_seen(a_legacy, b_legacy, "/legacy") == a_legacy.ip

    set_enrolled(plan, sleep.key, False)
    assert wait_until(lambda: peer_seen(sleep, b_legacy, "/unenrolled") == sleep.ip, 10.0), (
        "a-sleep still captured 10s after it opted out\n" + node_logs(plan)
    )

    set_enrolled(plan, sleep.key, True)
    assert wait_until(lambda: peer_seen(sleep, b_legacy, "/reenrolled") == node_a.ip, 10.0), (
        "a-sleep not captured again 10s after it opted back in\n" + node_logs(plan)
    )
    log = plan.log_path("node-a").read_text(errors="replace")
    assert f"released ['{sleep.ip}']" in log and f"enrolled ['{sleep.ip}']" in log, log[-3000:]
    assert tc_filters(node_a, devices) == before


def test_same_node_enrolled_pods(lab_dir: Path) -> None:
    plan = lab_up_with_capture(lab_dir)
    node_a = plan.node("node-a")
    sleep, a_echo = plan.pod("a-sleep"), plan.pod("a-echo")
    assert peer_seen(sleep, a_echo, "/same-node") == node_a.ip, node_logs(plan)

    size = 1024 * 1024
    sent = apps.payload(size)
    status, body = netns.run_in(
        sleep.netns, lambda: apps.request(a_echo.ip, APP_PORT, "/upload", size, 15.0)
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["received"] == size
    assert answer["sha256"] == hashlib.sha256(sent).hexdigest()
    assert str(answer["peer"]).rsplit(":", 1)[0] == node_a.ip
    status, body = netns.run_in(
        sleep.netns, lambda: apps.request(a_echo.ip, APP_PORT, f"/bytes/{size}", 0, 15.0)
    )
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(sent).digest()

    result = demo.check_policy(plan, sleep, a_echo, True)
    assert result.ok, result.detail + "\n" + node_logs(plan)
    assert "refused" in result.detail
    assert not (plan.resources_dir / f"{demo.POLICY_NAME}.yaml").exists()
    assert peer_seen(sleep, a_echo, "/after-policy") == node_a.ip


# --------------------------------------------------------------------------- agent killed


class CountingListener:
    """A TCP server in a pod's namespace that counts the connections it accepts and answers
    each one's first bytes with b"pong:" + those bytes."""

    def __init__(self, pod_netns: str, address: tuple[str, int]) -> None:
        def bind() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
            sock.settimeout(0.2)
            return sock

        self.sock = netns.run_in(pod_netns, bind)
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            with conn:
                try:
                    conn.settimeout(2.0)
                    conn.sendall(b"pong:" + conn.recv(64))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()


def dial(pod_netns: str, address: tuple[str, int], timeout: float = 3.0) -> bytes | str:
    """Connect from a pod, send b"ping"; the answer, or the error as text."""

    def run() -> bytes | str:
        try:
            with socket.create_connection(address, timeout=timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(b"ping")
                answer = sock.recv(64)
                return answer if answer else "closed without an answer"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    return netns.run_in(pod_netns, run, timeout * 2 + 5.0)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_agent_killed_or_stopped_then_restarted(lab_dir: Path, stop: signal.Signals) -> None:
    """A crashed agent and one stopped cleanly alike leave the capture in place: enrolled
    pods' connections are refused, never carried in plaintext, until an agent runs again."""
    plan = lab_up_with_capture(lab_dir)
    node_b = plan.node("node-b")
    sleep, a_legacy, b_echo = plan.pod("a-sleep"), plan.pod("a-legacy"), plan.pod("b-echo")
    target = (b_echo.ip, 9090)
    listener = CountingListener(b_echo.netns, target)
    try:
        assert dial(sleep.netns, target) == b"pong:ping", node_logs(plan)
        assert listener.peers == [node_b.ip]

        st = state.load(plan.state_path)
        assert st is not None
        agent = next(p for p in reversed(st.processes) if p.name == node_b.name)
        assert state.is_running(agent.pid, agent.start_time)
        os.kill(agent.pid, stop)
        assert wait_until(lambda: not state.is_running(agent.pid, agent.start_time), 15.0)

        listener.peers.clear()
        for source in (sleep, a_legacy):
            started = time.monotonic()
            outcome = dial(source.netns, target, 3.0)
            assert isinstance(outcome, str), f"{source.key} got {outcome!r} with no agent"
            assert time.monotonic() - started < 10.0
            with pytest.raises((OSError, http.client.HTTPException)):
                netns.run_in(
                    source.netns, lambda: apps.request(b_echo.ip, APP_PORT, "/no-agent", 0, 3.0)
                )
        time.sleep(1.0)
        assert listener.peers == [], "connections reached b-echo while node-b had no agent"

        records = {p.name: p for p in st.processes}
        env = {k: v for k, v in os.environ.items() if k not in processes.AGENT_ENV_DROPPED}
        records[node_b.name] = processes.start_process(
            plan, st, node_b.name, node_b.netns, processes.agent_command(plan, node_b, True), env
        )
        processes.wait_agents(plan, records)

        flows = wait_until(lambda: dial(sleep.netns, target) == b"pong:ping", 20.0)
        assert flows, "no answer 20s after node-b's agent restarted\n" + node_logs(plan)
        assert set(listener.peers) == {node_b.ip}
        assert dial(a_legacy.netns, target) == b"pong:ping"
        assert peer_seen(sleep, b_echo, "/restarted") == node_b.ip
    finally:
        listener.close()


# --------------------------------------------------------------------------- start-up errors

SCRATCH_NETNS = f"{PREFIX}x"


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    """A namespace with lo and an `eth0` (one end of a veth pair), deleted on the way out."""
    with exclusive():
        netns.delete_netns(SCRATCH_NETNS)
        netns.add_netns(SCRATCH_NETNS)
        try:
            netns.ip(
                "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", netns=SCRATCH_NETNS
            )
            netns.ip("link", "set", "eth0", "up", netns=SCRATCH_NETNS)
            yield SCRATCH_NETNS
        finally:
            for pid in netns.netns_pids(SCRATCH_NETNS):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            netns.delete_netns(SCRATCH_NETNS)
            assert SCRATCH_NETNS not in netns.list_netns()


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory another user can read (pytest's tmp_path is root's alone), with a config."""
    directory = Path(tempfile.mkdtemp(prefix="ztlt-start-"))
    try:
        directory.chmod(0o755)
        config = directory / "config.yaml"
        config.write_text("workloads: []\nservices: []\npolicies: []\n")
        config.chmod(0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def agent_start(
    ns: str, directory: Path, prefix: list[str], env: dict[str, str], timeout: float = 60.0
) -> tuple[int | None, str]:
    """Start `ztagent node --capture` in `ns`; (exit status or None if still running after
    `timeout` or once it reported having started, stderr + stdout)."""
    out_path = directory / "agent.out"
    node = [
        sys.executable,
        "-m",
        "ztagent",
        "node",
        "--capture",
        "--local-xds-path",
        str(directory / "config.yaml"),
        "--node-name",
        "node-x",
        "--ca-dir",
        str(directory / "ca"),
        "--socks5-addr",
        "off",
    ]
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *prefix, *node],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if "node agent node-x started" in out_path.read_text(errors="replace"):
                break
            time.sleep(0.2)
        code = proc.poll()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    return code, out_path.read_text(errors="replace")


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("ztagent: error:")]


def test_capture_as_non_root_fails_clearly(world_readable_dir: Path) -> None:
    if not _capture_flag():
        pytest.skip("`ztagent node` has no --capture yet")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    ca = world_readable_dir / "ca"
    ca.mkdir()
    os.chown(ca, 65534, 65534)
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with scratch_netns() as ns:
        code, output = agent_start(ns, world_readable_dir, drop, dict(os.environ))
        filters = netns.exec_in(ns, ["tc", "filter", "show", "dev", "eth0", "ingress"])
    assert code not in (None, 0), output
    errors = error_lines(output)
    assert len(errors) == 1 and "root" in errors[0], output
    assert "Traceback" not in output
    assert filters.strip() == ""


def test_capture_without_kernel_headers_fails_clearly(world_readable_dir: Path) -> None:
    if not _capture_flag():
        pytest.skip("`ztagent node` has no --capture yet")
    empty = world_readable_dir / "no-headers"
    empty.mkdir()
    env = {**os.environ, "BCC_KERNEL_SOURCE": str(empty)}
    with scratch_netns() as ns:
        code, output = agent_start(ns, world_readable_dir, [], env)
    assert code not in (None, 0), output
    errors = error_lines(output)
    assert len(errors) == 1 and "linux-headers" in errors[0], output
    assert "Traceback" not in output


# --------------------------------------------------------------------------- control plane


def refused(source: Pod, dest: Pod, path: str) -> bool:
    try:
        netns.run_in(source.netns, lambda: apps.request(dest.ip, APP_PORT, path, 0, 2.0))
    except (OSError, http.client.HTTPException):
        return True
    return False


def control_record(plan: Plan) -> state.Process:
    st = state.load(plan.state_path)
    assert st is not None
    return next(p for p in reversed(st.processes) if p.name == "control")


def test_control_plane_policy_edits_outage_and_bad_files(lab_dir: Path) -> None:
    plan = lab_up_with_capture(lab_dir)
    node_b = plan.node("node-b")
    sleep, b_echo = plan.pod("a-sleep"), plan.pod("b-echo")
    policy = plan.resources_dir / f"{demo.POLICY_NAME}.yaml"
    assert peer_seen(sleep, b_echo, "/before") == node_b.ip, node_logs(plan)

    # A policy file written by a user is enforced within 2 s.
    started = time.monotonic()
    write_resources(policy, [demo.policy_document(sleep, b_echo)])
    assert wait_until(lambda: refused(sleep, b_echo, "/deny"), 2.0, 0.05), node_logs(plan)
    enforced_after = time.monotonic() - started
    assert enforced_after < 2.0, enforced_after
    policy.unlink()
    assert wait_until(lambda: not refused(sleep, b_echo, "/allow"), 2.0, 0.05)

    # A malformed file is reported by name; everything else keeps being served.
    broken = plan.resources_dir / "broken.yaml"
    broken.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: bad, namespace: demo}\nspec: {action: PERMIT}\n"
        "---\nkind: [unclosed\n"
    )
    errors: list[str] = []

    def reported() -> bool:
        errors[:] = probes.control_dump(plan).get("errors") or []
        return any("AuthorizationPolicy demo/bad" in e for e in errors) and any(
            "broken.yaml#1" in e for e in errors
        )

    assert wait_until(reported, 5.0), errors
    assert any("spec.action" in e for e in errors), errors
    assert peer_seen(sleep, b_echo, "/with-bad-file") == node_b.ip
    status = lab(lab_dir, "status")
    assert "config errors: 2" in status.stdout, status.stdout
    broken.unlink()

    # The control plane dies: the agents keep the last config and traffic keeps flowing.
    record = control_record(plan)
    os.kill(record.pid, signal.SIGKILL)
    assert wait_until(lambda: not state.is_running(record.pid, record.start_time), 10.0)
    for i in range(3):
        assert peer_seen(sleep, b_echo, f"/no-control-{i}") == node_b.ip, node_logs(plan)
        time.sleep(0.5)
    assert probes.readiness(plan, node_b) == "ready"

    # A policy written while it is down applies once it is back: the agents resync.
    write_resources(policy, [demo.policy_document(sleep, b_echo)])
    st = state.load(plan.state_path)
    assert st is not None
    processes.wait_control(plan, processes.start_control(plan, st))
    assert wait_until(lambda: refused(sleep, b_echo, "/resynced"), 20.0, 0.1), node_logs(plan)
    policy.unlink()
    assert wait_until(lambda: not refused(sleep, b_echo, "/allowed-again"), 5.0, 0.1)
    log = plan.log_path("node-a").read_text(errors="replace")
    assert "keeping the last config, reconnecting" in log, log[-3000:]


# --------------------------------------------------------------------------- hitless upgrade

UPGRADE_CONNECTIONS = 100
TRANSFER_BYTES = 256 * 1024 * 1024
CHUNK = 1024 * 1024


class LineEcho:
    """A TCP server in a pod's namespace that echoes every line on every connection it holds."""

    def __init__(self, pod_netns: str, address: tuple[str, int]) -> None:
        def bind() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(256)
            sock.settimeout(0.2)
            return sock

        self.sock = netns.run_in(pod_netns, bind)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _echo(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.settimeout(60.0)
            try:
                for line in lines:
                    conn.sendall(line)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._accept.join(5.0)
        self.sock.close()


class HashSink:
    """Accepts one connection in a pod's namespace, hashes everything until EOF, then answers
    with the byte count and the SHA-256."""

    def __init__(self, pod_netns: str, address: tuple[str, int]) -> None:
        def bind() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1)
            sock.settimeout(120.0)
            return sock

        self.sock = netns.run_in(pod_netns, bind)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(120.0)
            digest, count = hashlib.sha256(), 0
            try:
                while data := conn.recv(CHUNK):
                    digest.update(data)
                    count += len(data)
                conn.sendall(f"{count} {digest.hexdigest()}".encode())
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5.0)


def connect_from(pod_netns: str, address: tuple[str, int]) -> socket.socket:
    def run() -> socket.socket:
        sock = socket.create_connection(address, timeout=10.0)
        sock.settimeout(10.0)
        return sock

    return netns.run_in(pod_netns, run, 30.0)


def round_trip(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    answer = b""
    while not answer.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    return answer


def listening_pids(node_netns: str, port: int) -> set[int]:
    """Pids with a TCP listener on `port` in the node's namespace (from `ss`)."""
    out = subprocess.run(
        ["ip", "netns", "exec", node_netns, "ss", "-Htlnp", f"sport = :{port}"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_upgrade_drops_no_connection_and_still_fails_closed(lab_dir: Path) -> None:
    plan = lab_up_with_capture(lab_dir)
    node_b = plan.node("node-b")
    sleep, b_echo = plan.pod("a-sleep"), plan.pod("b-echo")
    st = state.load(plan.state_path)
    assert st is not None
    old = next(p for p in reversed(st.processes) if p.name == node_b.name)
    echo = LineEcho(b_echo.netns, (b_echo.ip, 9092))
    sink = HashSink(b_echo.netns, (b_echo.ip, 9093))
    probe = CountingListener(b_echo.netns, (b_echo.ip, 9094))
    conns: list[socket.socket] = []
    try:
        conns = [connect_from(sleep.netns, (b_echo.ip, 9092)) for _ in range(UPGRADE_CONNECTIONS)]
        for i, conn in enumerate(conns):
            assert round_trip(conn, b"before %d\n" % i) == b"before %d\n" % i, node_logs(plan)

        # The transfer: half before the upgrade, half after the new agent has taken over.
        block = hashlib.sha256(b"ztagent").digest() * (CHUNK // 32)
        sent = hashlib.sha256()
        transfer = connect_from(sleep.netns, (b_echo.ip, 9093))
        for _ in range(TRANSFER_BYTES // CHUNK // 2):
            transfer.sendall(block)
            sent.update(block)

        # New connections during the upgrade: every one answered, none slower than 1 s.
        probing = threading.Event()
        outcomes: list[tuple[float, bytes | str]] = []

        def probe_loop() -> None:
            while not probing.is_set():
                started = time.monotonic()
                outcome = dial(sleep.netns, (b_echo.ip, 9094), 5.0)
                outcomes.append((time.monotonic() - started, outcome))
                time.sleep(0.1)

        prober = threading.Thread(target=probe_loop, daemon=True)
        prober.start()
        upgraded = lab(lab_dir, "upgrade", "node-b")
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr + node_logs(plan)
        time.sleep(1.0)
        probing.set()
        prober.join(15.0)

        st = state.load(plan.state_path)
        assert st is not None
        new = next(p for p in reversed(st.processes) if p.name == node_b.name)
        assert new.pid != old.pid
        log_b = plan.log_path(node_b.name).read_text(errors="replace")
        assert "handover: a new agent takes over; draining" in log_b, node_logs(plan)
        assert "took over in" in log_b, node_logs(plan)
        # The old agent accepts nothing any more; the new one holds every listener.
        assert old.pid not in listening_pids(node_b.netns, 15008)
        assert new.pid in listening_pids(node_b.netns, 15008)

        for _ in range(TRANSFER_BYTES // CHUNK - TRANSFER_BYTES // CHUNK // 2):
            transfer.sendall(block)
            sent.update(block)
        transfer.shutdown(socket.SHUT_WR)
        answer = b""
        while data := transfer.recv(256):
            answer += data
        transfer.close()
        assert answer.decode() == f"{TRANSFER_BYTES} {sent.hexdigest()}", node_logs(plan)

        for i, conn in enumerate(conns):
            assert round_trip(conn, b"after %d\n" % i) == b"after %d\n" % i, (i, node_logs(plan))
        failed = [o for o in outcomes if not isinstance(o[1], bytes) or o[1] != b"pong:ping"]
        assert outcomes and not failed, failed
        assert max(t for t, _ in outcomes) < 1.0, sorted(t for t, _ in outcomes)[-5:]

        # Once its connections end, the old agent exits.
        for conn in conns:
            conn.close()
        conns = []
        assert wait_until(lambda: not state.is_running(old.pid, old.start_time), 15.0), node_logs(
            plan
        )

        # A crash of the new agent still fails closed.
        os.kill(new.pid, signal.SIGKILL)
        assert wait_until(lambda: not state.is_running(new.pid, new.start_time), 10.0)
        probe.peers.clear()
        outcome = dial(sleep.netns, (b_echo.ip, 9094), 3.0)
        assert isinstance(outcome, str), f"answered with no agent on node-b: {outcome!r}"
        time.sleep(1.0)
        assert probe.peers == [], "a connection reached b-echo while node-b had no agent"
    finally:
        for conn in conns:
            conn.close()
        echo.close()
        sink.close()
        probe.close()
