"""Pod-to-pod benchmark across the two nodes of the ambient lab, three paths side by side.

    .venv/bin/python -m benchmarks.bench_lab [--quick] [--runs 3] [--json out.json]
        [--prefix ztlb-] [--pod-cidr 10.247.0.0/17] [--underlay-cidr 10.247.128.0/24]
        [--dir /tmp/ztagent-bench-lab]

Brings up `ztagent lab` with its own prefix, ranges and state directory, then measures from a
pod on node-a to a pod on node-b: `direct` (a-legacy -> b-legacy, not enrolled), `mesh`
(a-sleep -> b-echo: eBPF capture, both agents, HBONE) and `stunnel` (an stunnel mTLS pair
between a-legacy and b-legacy). Figures: iperf3 throughput (1 and 4 streams), new
connections per second, request latency over new connections and over one kept connection,
and the CPU of the relaying processes. The lab is taken down at the end, whatever happens.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]
import uvloop

from benchmarks import certs as bench_certs
from benchmarks import loadgen
from benchmarks.bench_tunnels import Settings, environment, percentile, run_iperf
from benchmarks.certs import CertSet
from benchmarks.common import Metric, raise_nofile_limit
from benchmarks.pairs import REPO_ROOT, Launcher, Proc
from ztagent.lab import netns, state
from ztagent.lab.topology import Plan, Pod, make_plan
from ztagent.lab.topology import Settings as LabSettings

DEFAULT_PREFIX = "ztlb-"
DEFAULT_POD_CIDR = "10.247.0.0/17"
DEFAULT_UNDERLAY_CIDR = "10.247.128.0/24"
DEFAULT_DIR = Path("/tmp/ztagent-bench-lab")
LAB_UP_TIMEOUT = 240.0
LAB_DOWN_TIMEOUT = 120.0
START_TIMEOUT = 20.0
CLIENT_SLACK = 60.0
LOG_TIMEOUT = 5.0
TIME_WAIT_SETTLED = 2_000
TIME_WAIT_MAX_WAIT = 65.0
MAX_PROCESS_SECONDS = 3600
PATH_NAMES = ("direct", "mesh", "stunnel")


class BenchError(Exception):
    """A path or server that cannot be used; the message says why."""


# --------------------------------------------------------------------------- client side
# `python -m benchmarks.bench_lab client MODE --target IP:PORT ...` runs inside the source
# pod's namespace (`ip netns exec`) and prints one JSON object.


def client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lab client")
    parser.add_argument("mode", choices=("one", "rate", "fresh", "kept"))
    parser.add_argument("--target", required=True, help="IP:PORT of the echo server")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--max", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    host, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    raise_nofile_limit(65_536)
    # The load generator of bench_tunnels connects to loadgen.LOOPBACK: here, the target pod.
    vars(loadgen)["LOOPBACK"] = host
    out: dict[str, Any]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.mode == "one":
            try:
                runner.run(asyncio.wait_for(loadgen.one_exchange(port), 15.0))
                out = {"ok": True}
            except (OSError, TimeoutError, ConnectionError) as exc:
                out = {"ok": False, "error": repr(exc)}
        elif args.mode == "rate":
            rate = runner.run(
                loadgen.connection_rate(port, args.seconds, args.concurrency, args.max)
            )
            out = {
                "completed": rate.completed,
                "errors": rate.errors,
                "seconds": rate.seconds,
                "first_error": rate.first_error,
            }
        else:
            coro = (
                loadgen.latency_fresh(port, args.max, args.seconds)
                if args.mode == "fresh"
                else loadgen.latency_persistent(port, args.max, args.seconds)
            )
            lat = runner.run(coro)
            out = {"count": len(lat.samples), "errors": lat.errors, "first_error": lat.first_error}
            if lat.samples:
                out["p50"] = percentile(lat.samples, 0.50) * 1e6
                out["p99"] = percentile(lat.samples, 0.99) * 1e6
    print(json.dumps(out), flush=True)
    return 0


def run_client(
    src_netns: str,
    mode: str,
    target: tuple[str, int],
    seconds: float = 1.0,
    max_count: int = 1000,
    concurrency: int = 32,
) -> dict[str, Any]:
    argv = [
        "ip",
        "netns",
        "exec",
        src_netns,
        sys.executable,
        "-m",
        "benchmarks.bench_lab",
        "client",
        mode,
        "--target",
        f"{target[0]}:{target[1]}",
        "--seconds",
        str(seconds),
        "--max",
        str(max_count),
        "--concurrency",
        str(concurrency),
    ]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + CLIENT_SLACK,
            check=False,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"load generator ({mode}) in {src_netns} timed out") from exc
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        detail = (done.stderr or done.stdout).strip()[-500:]
        raise BenchError(f"load generator ({mode}) in {src_netns} failed: {detail}") from exc
    return result


# --------------------------------------------------------------------------- namespaces


def tcp_table(ns: str) -> list[list[str]]:
    """Rows of /proc/net/tcp as seen in namespace ``ns`` (IPv4 is all the lab uses)."""
    out = netns.exec_in(ns, ["cat", "/proc/net/tcp"], check=False)
    return [line.split() for line in out.splitlines()[1:] if line.strip()]


def listening(ns: str, port: int) -> bool:
    suffix = f":{port:04X}"
    return any(len(row) > 3 and row[1].endswith(suffix) and row[3] == "0A" for row in tcp_table(ns))


def time_wait_count(namespaces: Sequence[str]) -> int:
    return sum(1 for ns in namespaces for row in tcp_table(ns) if len(row) > 3 and row[3] == "06")


def settle_time_wait(namespaces: Sequence[str]) -> None:
    """TIME_WAIT is per namespace: wait until the namespaces the next connection-rate run
    uses (source, destination, agents) hold few enough of them. Bounded by the kernel's
    60 s TIME_WAIT."""
    deadline = time.monotonic() + TIME_WAIT_MAX_WAIT
    count = time_wait_count(namespaces)
    if count <= TIME_WAIT_SETTLED:
        return
    print(f"    (waiting for {count} TIME_WAIT sockets to expire)", flush=True)
    while count > TIME_WAIT_SETTLED and time.monotonic() < deadline:
        time.sleep(1.0)
        count = time_wait_count(namespaces)


def free_port_in(ns: str, ip: str) -> int:
    def pick() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
            port: int = sock.getsockname()[1]
            return port

    return netns.run_in(ns, pick, 10.0)


def wait_listening_in(ns: str, port: int, procs: Sequence[Proc]) -> None:
    """Wait for a listener on ``port`` in ``ns`` (read from /proc: no probe connection, which
    iperf3 would count as a failed test); fail early when a process exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise BenchError(proc.failure())
        if listening(ns, port):
            return
        time.sleep(0.05)
    names = ", ".join(p.name for p in procs)
    raise BenchError(f"nothing listening on port {port} in {ns} after {START_TIMEOUT:g}s ({names})")


def spawn_in(launcher: Launcher, name: str, ns: str, argv: Sequence[str]) -> Proc:
    # `ip netns exec` execs the command: the pid is the server's own.
    return launcher.spawn(name, ["ip", "netns", "exec", ns, *argv])


# --------------------------------------------------------------------------- servers


class IperfServer:
    """`iperf3 -s` bound to a pod's address, in the pod's namespace."""

    def __init__(self, launcher: Launcher, binary: str, pod: Pod) -> None:
        self.launcher = launcher
        self.binary = binary
        self.pod = pod
        self.port = free_port_in(pod.netns, pod.ip)
        self.proc: Proc | None = None
        self.generation = 0

    def start(self) -> None:
        self.generation += 1
        self.proc = spawn_in(
            self.launcher,
            f"iperf3-{self.pod.key}-{self.generation}",
            self.pod.netns,
            [self.binary, "-s", "-B", self.pod.ip, "-p", str(self.port)],
        )
        wait_listening_in(self.pod.netns, self.port, [self.proc])

    def restart(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.start()


def start_echo(launcher: Launcher, pod: Pod) -> tuple[int, Proc]:
    port = free_port_in(pod.netns, pod.ip)
    proc = spawn_in(
        launcher,
        f"echo-{pod.key}",
        pod.netns,
        [
            sys.executable,
            "-m",
            "benchmarks.echo_server",
            "--listen",
            f"{pod.ip}:{port}",
            "--max-seconds",
            str(MAX_PROCESS_SECONDS),
        ],
    )
    wait_listening_in(pod.netns, port, [proc])
    return port, proc


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def stunnel_config(
    client: bool, accept: tuple[str, int], connect: tuple[str, int], cert: Path, key: Path, ca: Path
) -> str:
    """The same settings as bench_tunnels' `stunnel` pair (mTLS, TLS 1.3, session resumption
    on, TCP_NODELAY), on the pods' addresses."""
    lines = [
        "foreground = yes",
        "pid =",
        "syslog = no",
        "debug = 4",
        "[bench]",
        f"client = {'yes' if client else 'no'}",
        f"accept = {accept[0]}:{accept[1]}",
        f"connect = {connect[0]}:{connect[1]}",
        f"cert = {cert}",
        f"key = {key}",
        f"CAfile = {ca}",
        "verifyChain = yes",
        "requireCert = yes",
        "sslVersionMin = TLSv1.3",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
        "sessionResume = yes",
    ]
    return "\n".join(lines) + "\n"


def start_stunnel_chain(
    launcher: Launcher,
    binary: str,
    certs: CertSet,
    label: str,
    src: Pod,
    dst: Pod,
    target_port: int,
) -> tuple[int, list[Proc]]:
    """stunnel server in ``dst``'s namespace towards ``dst``:target_port, stunnel client in
    ``src``'s namespace towards the server; returns the client's port (on ``src``'s IP)."""
    server_port = free_port_in(dst.netns, dst.ip)
    client_port = free_port_in(src.netns, src.ip)
    procs: list[Proc] = []
    for role, pod, client, accept, connect, cert, key in (
        (
            "server",
            dst,
            False,
            (dst.ip, server_port),
            (dst.ip, target_port),
            certs.server_cert,
            certs.server_key,
        ),
        (
            "client",
            src,
            True,
            (src.ip, client_port),
            (dst.ip, server_port),
            certs.client_cert,
            certs.client_key,
        ),
    ):
        conf = launcher.workdir / f"stunnel-{label}-{role}.conf"
        conf.write_text(stunnel_config(client, accept, connect, cert, key, certs.ca_cert))
        procs.append(spawn_in(launcher, f"stunnel-{label}-{role}", pod.netns, [binary, str(conf)]))
        wait_listening_in(pod.netns, accept[1], procs)
    return client_port, procs


# --------------------------------------------------------------------------- paths


METRICS = [
    Metric("tput1", "Throughput, 1 stream", "Gbit/s", True, 2),
    Metric("tput1_cpu", "  relay CPU during 1 stream (100 = 1 core)", "%", False, 0),
    Metric("tput4", "Throughput, 4 streams", "Gbit/s", True, 2),
    Metric("tput4_cpu", "  relay CPU during 4 streams (100 = 1 core)", "%", False, 0),
    Metric("cps", "New connections per second (32 in flight)", "conn/s", True, 0),
    Metric("cps_cpu", "  relay CPU during new connections", "%", False, 0),
    Metric("cps_cpu_us", "  relay CPU time per new connection", "us", False, 0),
    Metric("fresh_p50", "Latency p50, new connection per request (1 in flight)", "us", False, 0),
    Metric("fresh_p99", "Latency p99, new connection per request (1 in flight)", "us", False, 0),
    Metric("kept_p50", "Latency p50, one kept connection (1 in flight)", "us", False, 0),
    Metric("kept_p99", "Latency p99, one kept connection (1 in flight)", "us", False, 0),
]


def no_processes() -> list[psutil.Process]:
    return []


@dataclass
class LabPath:
    name: str
    description: str
    src: Pod
    dst: Pod
    relay_label: str
    """What the CPU figures count: `-` (nothing relays), the agents, or the stunnel pair."""
    tw_namespaces: list[str]
    echo: tuple[str, int] | None = None
    bulk: tuple[str, int] | None = None
    iperf: IperfServer | None = None
    relay_pids: Callable[[], list[psutil.Process]] = field(default=no_processes)
    status: str = "ok"
    message: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status == "ok"

    def fail(self, message: str) -> None:
        self.status = "failed"
        self.message = message
        print(f"  !! {self.name}: {message}", flush=True)

    def skip(self, message: str) -> None:
        self.status = "skipped"
        self.message = message
        print(f"  -- {self.name}: skipped: {message}", flush=True)

    def record(self, key: str, value: float) -> None:
        self.runs.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.runs.get(key)
        return statistics.median(values) if values else None

    def relay_cpu(self) -> float:
        total = 0.0
        for proc in self.relay_pids():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


def agent_processes(plan: Plan) -> list[psutil.Process]:
    """The two agents (and their children) from the lab's state file."""
    st = state.load(plan.state_path)
    if st is None:
        raise BenchError(f"no lab state in {plan.state_path}")
    out: list[psutil.Process] = []
    for node in plan.nodes:
        rec = next((p for p in st.processes if p.name == node.name), None)
        if rec is None or not state.is_running(rec.pid, rec.start_time or None):
            raise BenchError(f"the agent of {node.name} is not running")
        root = psutil.Process(rec.pid)
        out += [root, *root.children(recursive=True)]
    return out


def proc_group(procs: Sequence[Proc]) -> Callable[[], list[psutil.Process]]:
    def members() -> list[psutil.Process]:
        return [member for proc in procs for member in proc.processes()]

    return members


# --------------------------------------------------------------------------- measurements


def with_cpu(path: LabPath, action: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``action``; also return the relays' CPU seconds and their % of one core."""
    cpu0, t0 = path.relay_cpu(), time.perf_counter()
    result = action()
    cpu1, t1 = path.relay_cpu(), time.perf_counter()
    used = cpu1 - cpu0
    return result, used, 100.0 * used / max(t1 - t0, 1e-9)


def cpu_text(path: LabPath, cpu: float) -> str:
    return f"   {path.relay_label} CPU {cpu:4.0f}%" if path.relay_label != "-" else ""


def measure_throughput(path: LabPath, settings: Settings, binary: str | None) -> None:
    if binary is None or path.iperf is None or path.bulk is None:
        return
    target = path.bulk
    for streams, key in ((1, "tput1"), (4, "tput4")):

        def action(streams: int = streams) -> float:
            return run_iperf(
                binary,
                target[1],
                settings.throughput_seconds,
                settings.throughput_omit,
                streams,
                host=target[0],
                netns=path.src.netns,
            )

        try:
            gbits, _, cpu = with_cpu(path, action)
        except (BenchError, RuntimeError) as exc:
            path.notes.append(f"{key}: {exc}")
            print(f"    {key}: {exc}", flush=True)
            path.iperf.restart()
            continue
        path.record(key, gbits)
        if path.relay_label != "-":
            path.record(f"{key}_cpu", cpu)
        print(f"    {key:<10} {gbits:8.2f} Gbit/s{cpu_text(path, cpu)}", flush=True)


def measure_requests(path: LabPath, settings: Settings) -> None:
    """Latency first (at most a few thousand connections), then the connection rate, whose
    many closed connections would otherwise slow every later connect() in the namespace."""
    assert path.echo is not None
    target = path.echo
    settle_time_wait(path.tw_namespaces)
    for mode, count, seconds in (
        ("fresh", settings.fresh_max, settings.fresh_seconds),
        ("kept", settings.kept_max, settings.kept_seconds),
    ):
        lat = run_client(path.src.netns, mode, target, seconds, count)
        if lat["errors"]:
            path.notes.append(f"{mode}: {lat['errors']} errors, first: {lat['first_error']}")
        if "p50" not in lat:
            print(f"    {mode}: no samples ({lat['first_error']})", flush=True)
            continue
        path.record(f"{mode}_p50", lat["p50"])
        path.record(f"{mode}_p99", lat["p99"])
        print(
            f"    {mode + ' lat':<10} p50 {lat['p50']:7.0f} us  p99 {lat['p99']:7.0f} us"
            f"  ({lat['count']} requests)",
            flush=True,
        )

    time_wait = time_wait_count(path.tw_namespaces)
    rate, used, cpu = with_cpu(
        path,
        lambda: run_client(
            path.src.netns,
            "rate",
            target,
            settings.rate_seconds,
            settings.rate_max,
            settings.rate_concurrency,
        ),
    )
    completed = int(rate["completed"])
    per_second = completed / rate["seconds"] if rate["seconds"] > 0 else 0.0
    if completed:
        path.record("cps", per_second)
        if path.relay_label != "-":
            path.record("cps_cpu", cpu)
            path.record("cps_cpu_us", used / completed * 1e6)
    err = ""
    if rate["errors"]:
        err = f"   ({rate['errors']} errors: {rate['first_error']})"
        path.notes.append(f"cps: {rate['errors']} errors, first: {rate['first_error']}")
    print(
        f"    {'cps':<10} {per_second:8.0f} conn/s{cpu_text(path, cpu)}"
        f"   ({time_wait} TIME_WAIT before, {time_wait_count(path.tw_namespaces)} after){err}",
        flush=True,
    )


# --------------------------------------------------------------------------- the lab


def lab_command(action: str, plan: Plan) -> list[str]:
    s = plan.settings
    return [
        sys.executable,
        "-m",
        "ztagent",
        "lab",
        action,
        "--prefix",
        s.prefix,
        "--pod-cidr",
        s.pod_cidr,
        "--underlay-cidr",
        s.underlay_cidr,
        "--dir",
        str(s.directory),
    ]


def lab_up(plan: Plan) -> None:
    print(f"Lab up (prefix {plan.prefix}, state in {plan.directory})", flush=True)
    try:
        done = subprocess.run(
            lab_command("up", plan),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=LAB_UP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"`ztagent lab up` did not finish in {LAB_UP_TIMEOUT:g}s") from exc
    for line in done.stdout.splitlines():
        if line.startswith("lab:"):
            print(f"  {line}", flush=True)
    if done.returncode != 0:
        raise BenchError(f"`ztagent lab up` failed:\n{(done.stderr or done.stdout).strip()}")


def lab_down(plan: Plan) -> None:
    print(f"Lab down (prefix {plan.prefix})", flush=True)
    try:
        done = subprocess.run(
            lab_command("down", plan),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=LAB_DOWN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"  `ztagent lab down` did not finish in {LAB_DOWN_TIMEOUT:g}s", file=sys.stderr)
        return
    for line in (done.stdout + done.stderr).splitlines():
        print(f"  {line}", flush=True)


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def check_captured(plan: Plan, dst: Pod, port: int, offset: int) -> str | None:
    """None when node-b's access log shows a completed connection to dst:port (the proof
    exchange went through the mesh), else why not."""
    log = plan.log_path(dst.node)
    needle = f"dst.addr={dst.ip}:{port}"
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with log.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        if any("connection complete" in line and needle in line for line in text.splitlines()):
            return None
        time.sleep(0.2)
    return f"no 'connection complete' line for {needle} in {log}: the path was not captured"


def build_paths(
    plan: Plan, launcher: Launcher, certs: CertSet, iperf_binary: str | None
) -> list[LabPath]:
    a_legacy, b_legacy = plan.pod("a-legacy"), plan.pod("b-legacy")
    a_sleep, b_echo = plan.pod("a-sleep"), plan.pod("b-echo")
    node_ns = [n.netns for n in plan.nodes]
    st = state.load(plan.state_path)
    paths = [
        LabPath(
            "direct",
            "a-legacy -> b-legacy, not enrolled: routed by the nodes, nothing relays",
            a_legacy,
            b_legacy,
            "-",
            [a_legacy.netns, b_legacy.netns],
        ),
        LabPath(
            "mesh",
            "a-sleep -> b-echo, enrolled: eBPF capture, node-a agent, HBONE, node-b agent",
            a_sleep,
            b_echo,
            "agents",
            [a_sleep.netns, b_echo.netns, *node_ns],
            relay_pids=lambda: agent_processes(plan),
        ),
        LabPath(
            "stunnel",
            "a-legacy -> stunnel client (in a-legacy) -> mTLS -> stunnel server (in b-legacy)",
            a_legacy,
            b_legacy,
            "stunnel",
            [a_legacy.netns, b_legacy.netns],
        ),
    ]
    print("Servers in the destination pods", flush=True)
    echo_ports: dict[str, int] = {}
    iperfs: dict[str, IperfServer] = {}
    for pod in (b_legacy, b_echo):
        echo_ports[pod.key], _ = start_echo(launcher, pod)
        if iperf_binary:
            server = IperfServer(launcher, iperf_binary, pod)
            server.start()
            iperfs[pod.key] = server
        print(f"  {pod.key}: echo on {pod.ip}:{echo_ports[pod.key]}", flush=True)
    for path in paths[:2]:
        path.echo = (path.dst.ip, echo_ports[path.dst.key])
        path.iperf = iperfs.get(path.dst.key)
        if path.iperf is not None:
            path.bulk = (path.dst.ip, path.iperf.port)
    if st is None or not st.capture:
        paths[1].skip("the lab's agents run without --capture: enrolled traffic is not steered")

    stunnel = paths[2]
    binary = stunnel_binary()
    if binary is None:
        stunnel.skip("stunnel is not installed (apt-get install stunnel4)")
    else:
        first = len(launcher.procs)
        try:
            port, procs = start_stunnel_chain(
                launcher, binary, certs, "conn", a_legacy, b_legacy, echo_ports[b_legacy.key]
            )
            stunnel.echo = (a_legacy.ip, port)
            if b_legacy.key in iperfs:
                stunnel.iperf = iperfs[b_legacy.key]
                port, more = start_stunnel_chain(
                    launcher, binary, certs, "bulk", a_legacy, b_legacy, iperfs[b_legacy.key].port
                )
                stunnel.bulk = (a_legacy.ip, port)
                procs += more
            stunnel.relay_pids = proc_group(procs)
        except (BenchError, OSError) as exc:
            for proc in launcher.procs[first:]:
                proc.stop()
            stunnel.skip(f"failed to start: {exc}")

    for path in paths:
        if not path.active or path.echo is None:
            continue
        offset = log_size(str(plan.log_path(path.dst.node)))
        proof = run_client(path.src.netns, "one", path.echo)
        if not proof.get("ok"):
            path.fail(f"no echo from {path.src.key} to {path.echo}: {proof.get('error')}")
            continue
        if path.name == "mesh":
            why = check_captured(plan, path.dst, path.echo[1], offset)
            if why:
                path.fail(why)
                continue
        print(f"  ok {path.name}: {path.description}", flush=True)
    return paths


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_report(paths: list[LabPath], settings: Settings) -> None:
    print()
    print(
        f"Results, pod -> pod across nodes: median of {settings.runs} run(s)"
        f"{' (quick)' if settings.quick else ''}"
    )
    for path in paths:
        first = (path.message.splitlines() or [""])[0]
        if not path.active:
            print(f"  {path.name}: {path.status}: {first}")
    shown = [p for p in paths if p.runs]
    if not shown:
        return
    print("  relay CPU: mesh = both agents, stunnel = the stunnel client and server")
    for metric in METRICS:
        values = {p.name: p.median(metric.key) for p in shown}
        if all(v is None for v in values.values()):
            continue
        better = "higher" if metric.higher_is_better else "lower"
        print()
        print(f"{metric.title} ({metric.unit}, {better} is better)")
        print(f"  {'path':<10}{'median':>12}   {'runs':<30}{'vs direct':>10}{'vs stunnel':>12}")
        for path in shown:
            value = values[path.name]
            runs = " ".join(fmt(v, metric.digits) for v in path.runs.get(metric.key, []))
            ratios = ""
            for base_name, width in (("direct", 10), ("stunnel", 12)):
                base = values.get(base_name)
                cell = f"{value / base:.2f}x" if value is not None and base else ""
                ratios += f"{cell:>{width}}"
            print(f"  {path.name:<10}{fmt(value, metric.digits):>12}   {runs:<30}{ratios}")
    noted = [p for p in paths if p.notes]
    if noted:
        print()
        print("Notes")
        for path in noted:
            for note in path.notes:
                print(f"  {path.name}: {note}")


def write_json(
    out: Path, paths: list[LabPath], settings: Settings, plan: Plan, iperf: str | None
) -> None:
    data = {
        "settings": asdict(settings),
        "lab": {
            "prefix": plan.prefix,
            "pod_cidr": plan.settings.pod_cidr,
            "underlay_cidr": plan.settings.underlay_cidr,
        },
        "environment": environment(iperf),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": {m.key: {"title": m.title.strip(), "unit": m.unit} for m in METRICS},
        "paths": {
            p.name: {
                "status": p.status,
                "message": p.message,
                "description": p.description,
                "source": p.src.key,
                "destination": p.dst.key,
                "relay_cpu": p.relay_label,
                "median": {k: p.median(k) for k in p.runs},
                "runs": p.runs,
                "notes": p.notes,
            }
            for p in paths
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["client"]:
        return client_main(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_lab", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short measurements (1-2 s each)")
    parser.add_argument("--runs", type=int, default=3, help="runs per path; medians are shown")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="lab name prefix")
    parser.add_argument("--pod-cidr", default=DEFAULT_POD_CIDR, help="lab pod range")
    parser.add_argument("--underlay-cidr", default=DEFAULT_UNDERLAY_CIDR, help="lab node range")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="lab state directory")
    parser.add_argument(
        "--only",
        default="tput,requests",
        help="comma-separated measurement groups: tput, requests (default: both)",
    )
    args = parser.parse_args(args_list)
    groups = set(args.only.split(","))
    if not groups <= {"tput", "requests"}:
        parser.error("--only takes tput, requests")
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be between 1 and 20")
    if os.geteuid() != 0:
        print("the lab benchmark needs root (network namespaces, eBPF)", file=sys.stderr)
        return 1
    settings = Settings.make(args.quick, args.runs, 0)
    plan = make_plan(LabSettings(args.prefix, args.pod_cidr, args.underlay_cidr, args.dir))
    iperf_binary = shutil.which("iperf3")
    if iperf_binary is None:
        print("note: iperf3 is not installed, throughput is not measured (apt-get install iperf3)")

    signal.signal(signal.SIGTERM, _terminate)
    workdir = args.dir.resolve() / "bench"
    paths: list[LabPath] = []
    launcher: Launcher | None = None
    try:
        lab_up(plan)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        launcher = Launcher(workdir)
        certs = bench_certs.generate(workdir / "certs")
        paths = build_paths(plan, launcher, certs, iperf_binary)
        for run in range(1, settings.runs + 1):
            order = paths if run % 2 else list(reversed(paths))
            for path in order:
                if not path.active:
                    continue
                print(f"Run {run}/{settings.runs}: {path.name}", flush=True)
                try:
                    if "tput" in groups:
                        measure_throughput(path, settings, iperf_binary)
                    if "requests" in groups:
                        measure_requests(path, settings)
                except (BenchError, psutil.Error, ValueError, KeyError) as exc:
                    path.fail(f"{type(exc).__name__}: {exc}")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        # Clean-up is bounded (process stops, `lab down`): let it finish on a second SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if launcher is not None:
            launcher.stop_all()
        lab_down(plan)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    print_report(paths, settings)
    if args.json:
        write_json(args.json, paths, settings, plan, iperf_binary)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
