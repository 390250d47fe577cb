"""Two `ztagent node` agents against the foundation's HBONE pair, side by side, on loopback.

    .venv/bin/python -m benchmarks.bench_node [--quick] [--runs 3] [--json out.json]

Configurations (see benchmarks/README.md):

    hbone-pair    client -> `ztagent hbone connect --listen` -> `ztagent hbone serve` -> server
    node-agents   client (bound to 127.0.110.1) -> SOCKS5 of node-a -> HBONE -> node-b
                  (inbound on 127.0.120.1:15008) -> server on 127.0.120.1

One load generator (uvloop, in this process) drives both: single-stream throughput into a
discard server, new connections per second, and request/response latency over a kept
connection; with the CPU and RSS of the two processes of each configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.metadata
import ipaddress
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from benchmarks import certs as bench_certs
from benchmarks.bench_tunnels import (
    IperfServer,
    Runner,
    percentile,
    run_iperf,
    settle_time_wait,
    tool_version,
)
from benchmarks.common import LOOPBACK, Metric, raise_nofile_limit, run_server_forever
from benchmarks.loadgen import LatencyResult, RateResult
from benchmarks.pairs import (
    Chain,
    HbonePair,
    Launcher,
    PairEnv,
    PairFailed,
    Proc,
    wait_listening,
)

T = TypeVar("T")
MIB = 1024 * 1024

# Addresses of this benchmark; the node integration tests use 127.0.1.x/127.0.2.x (agents)
# and 127.0.10.x/127.0.20.x (workloads), so the two can run on one host.
TRUST_DOMAIN = "cluster.local"
CLIENT_IP = "127.0.110.1"
SERVER_IP = "127.0.120.1"
NODE_IPS = {"node-a": "127.0.101.1", "node-b": "127.0.102.1"}
SOCKS5_PORT = 15080
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
INBOUND_PORT = 15008
ECHO_PORT = 18080
DISCARD_PORT = 18081

READY_TIMEOUT = 30.0
OP_TIMEOUT = 5.0
MAX_ERRORS = 200
REQUEST = b"q" * 64
CHUNK = 256 * 1024
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    quick: bool
    runs: int
    stream_seconds: float
    stream_warmup: float
    stream_max_bytes: int
    iperf_seconds: int
    iperf_omit: int
    rate_seconds: float
    rate_concurrency: int
    rate_max: int
    kept_max: int
    kept_seconds: float

    @classmethod
    def make(cls, quick: bool, runs: int) -> Settings:
        if quick:
            return cls(quick, runs, 2.0, 0.25, 8 << 30, 2, 0, 1.5, 32, 30_000, 3_000, 1.0)
        return cls(quick, runs, 5.0, 0.5, 32 << 30, 5, 1, 5.0, 32, 100_000, 20_000, 3.0)


METRICS = [
    Metric("tput1", "Throughput, 1 stream (uvloop streamer -> discard)", "Gbit/s", True, 2),
    Metric("tput1_cpu", "  CPU of the two processes (100 = 1 core)", "%", False, 0),
    Metric("tput1_per_core", "  throughput per core of the two processes", "Gbit/s/core", True, 2),
    Metric("iperf1", "Throughput, 1 stream, iperf3 (hbone-pair only)", "Gbit/s", True, 2),
    Metric("cps", "New connections per second (32 in flight)", "conn/s", True, 0),
    Metric("cps_cpu", "  CPU of the two processes", "%", False, 0),
    Metric("cps_cpu_per_conn", "  CPU time of the two processes per connection", "us", False, 0),
    Metric("kept_p50", "Latency p50, one kept connection (64 B echo)", "us", False, 0),
    Metric("kept_p99", "Latency p99, one kept connection (64 B echo)", "us", False, 0),
]


# --------------------------------------------------------------------------- discard server


class Discard(asyncio.BufferedProtocol):
    """Reads everything into one shared buffer and drops it."""

    buffer = memoryview(bytearray(CHUNK))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def eof_received(self) -> bool:
        return False


async def serve_discard(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Discard, host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class Target:
    """Where the load generator connects, and what it asks the SOCKS5 proxy for (if any)."""

    connect: tuple[str, int]
    socks5_dest: tuple[str, int] | None = None
    source_ip: str | None = None


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def _socks5(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, dest: tuple[str, int]
) -> None:
    await loop.sock_sendall(sock, b"\x05\x01\x00")
    if await _recv_exact(loop, sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5: unexpected method selection")
    ip = ipaddress.ip_address(dest[0])
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    await loop.sock_sendall(sock, b"\x05\x01\x00" + atyp + ip.packed + struct.pack("!H", dest[1]))
    head = await _recv_exact(loop, sock, 4)
    if head[0] != 5 or head[1] != 0:
        raise ConnectionError(f"SOCKS5 CONNECT refused: {head!r}")
    if head[3] == 1:
        await _recv_exact(loop, sock, 6)
    elif head[3] == 4:
        await _recv_exact(loop, sock, 18)
    elif head[3] == 3:
        await _recv_exact(loop, sock, (await _recv_exact(loop, sock, 1))[0] + 2)
    else:
        raise ConnectionError(f"SOCKS5: unexpected address type in {head!r}")


async def open_stream(target: Target) -> socket.socket:
    """A connected non-blocking socket; through the SOCKS5 handshake when the target has one."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.source_ip is not None:
            # Pick the port at connect(), by 4-tuple, like an unbound socket does.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((target.source_ip, 0))
        await loop.sock_connect(sock, target.connect)
        if target.socks5_dest is not None:
            await _socks5(loop, sock, target.socks5_dest)
        return sock
    except BaseException:
        sock.close()
        raise


async def _echo(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, REQUEST)
    await _recv_exact(loop, sock, len(REQUEST))


async def one_exchange(target: Target) -> None:
    """Connect (and SOCKS5), send 64 bytes, read the echo, close."""
    sock = await open_stream(target)
    try:
        await _echo(sock)
    finally:
        sock.close()


async def send_only(target: Target) -> None:
    """Connect (and SOCKS5), send 64 bytes, close: a check of the path to the discard server."""
    sock = await open_stream(target)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, REQUEST)
    finally:
        sock.close()


async def connection_rate(
    target: Target, duration: float, concurrency: int, max_count: int
) -> RateResult:
    started = completed = errors = 0
    first_error = ""
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker() -> None:
        nonlocal started, completed, errors, first_error
        while started < max_count and errors < MAX_ERRORS and time.perf_counter() < deadline:
            started += 1
            try:
                await asyncio.wait_for(one_exchange(target), OP_TIMEOUT)
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors += 1
                first_error = first_error or repr(exc)
                await asyncio.sleep(0.01)
            else:
                completed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return RateResult(completed, errors, time.perf_counter() - t0, first_error)


async def latency_kept(target: Target, max_count: int, duration: float) -> LatencyResult:
    result = LatencyResult()
    try:
        sock = await asyncio.wait_for(open_stream(target), OP_TIMEOUT)
    except (OSError, TimeoutError, ConnectionError) as exc:
        result.errors, result.first_error = 1, repr(exc)
        return result
    try:
        # One untimed exchange first: a lazily opened tunnel is not counted.
        await asyncio.wait_for(_echo(sock), OP_TIMEOUT)
        deadline = time.perf_counter() + duration
        while len(result.samples) < max_count and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await asyncio.wait_for(_echo(sock), OP_TIMEOUT)
            result.samples.append(time.perf_counter() - t0)
    except (OSError, TimeoutError, ConnectionError) as exc:
        result.errors += 1
        result.first_error = repr(exc)
    finally:
        sock.close()
    return result


@dataclass
class StreamResult:
    gbits: float
    bytes_sent: int
    seconds: float
    error: str = ""


async def stream_throughput(
    target: Target, seconds: float, warmup: float, max_bytes: int
) -> StreamResult:
    """Write 256 KiB chunks as fast as the path takes them, read nothing back. The rate is
    counted from the end of ``warmup`` (buffers along the path are full by then) to the end."""
    loop = asyncio.get_running_loop()
    sock = await asyncio.wait_for(open_stream(target), OP_TIMEOUT)
    chunk = bytes(CHUNK)
    sent = 0
    mark_sent, mark_t = 0, 0.0
    try:
        t0 = time.perf_counter()
        deadline = t0 + warmup + seconds
        now = t0
        while sent < max_bytes and now < deadline:
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), OP_TIMEOUT)
            sent += len(chunk)
            now = time.perf_counter()
            if not mark_t and now >= t0 + warmup:
                mark_sent, mark_t = sent, now
    except (OSError, TimeoutError, ConnectionError) as exc:
        return StreamResult(0.0, sent, time.perf_counter() - t0, repr(exc))
    finally:
        sock.close()
    if not mark_t or now <= mark_t:
        return StreamResult(0.0, sent, now - t0, "budget spent during warm-up")
    window = now - mark_t
    return StreamResult((sent - mark_sent) * 8 / window / 1e9, sent - mark_sent, window)


# --------------------------------------------------------------------------- configurations


@dataclass
class Config:
    name: str
    description: str
    bulk: Target
    conn: Target
    bulk_procs: list[Proc]
    conn_procs: list[Proc]
    iperf_port: int | None = None
    iperf_server_port: int | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    start_rss: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)

    def all_procs(self) -> list[Proc]:
        seen: dict[int, Proc] = {}
        for proc in self.bulk_procs + self.conn_procs:
            seen[proc.popen.pid] = proc
        return list(seen.values())

    def check_alive(self) -> None:
        for proc in self.all_procs():
            if not proc.alive():
                raise PairFailed(proc.failure())

    def record(self, key: str, value: float) -> None:
        self.runs.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.runs.get(key)
        return statistics.median(values) if values else None


def _addr(host: str, port: int) -> str:
    return f"{host}:{port}"


def start_servers(launcher: Launcher, host: str, echo_port: int, discard_port: int) -> None:
    echo = launcher.spawn(
        f"echo-{host}",
        [sys.executable, "-m", "benchmarks.echo_server", "--listen", _addr(host, echo_port)],
    )
    discard = launcher.spawn(
        f"discard-{host}",
        [sys.executable, "-m", "benchmarks.bench_node", "--discard", _addr(host, discard_port)],
    )
    for port, proc in ((echo_port, echo), (discard_port, discard)):
        wait_listening_on(host, port, [proc])


def wait_listening_on(host: str, port: int, procs: list[Proc], timeout: float = 20.0) -> None:
    if host == LOOPBACK:
        wait_listening(port, procs, timeout)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise PairFailed(proc.failure())
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise PairFailed(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def free_port_on(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_hbone_pair(env: PairEnv, iperf: bool) -> Config:
    echo_port, discard_port = free_port_on(LOOPBACK), free_port_on(LOOPBACK)
    start_servers(env.launcher, LOOPBACK, echo_port, discard_port)
    pair = HbonePair()
    bulk = pair.start_chain(env, "bulk", discard_port)
    conn = pair.start_chain(env, "conn", echo_port)
    config = Config(
        "hbone-pair",
        "ztagent hbone connect --listen -> ztagent hbone serve; client to the entry port",
        bulk=Target((LOOPBACK, bulk.port)),
        conn=Target((LOOPBACK, conn.port)),
        bulk_procs=_chain_procs(bulk),
        conn_procs=_chain_procs(conn),
    )
    if iperf:
        # A third chain towards the iperf3 server's port; the caller starts the server there.
        config.iperf_server_port = free_port_on(LOOPBACK)
        config.iperf_port = pair.start_chain(env, "iperf", config.iperf_server_port).port
    return config


def _chain_procs(chain: Chain) -> list[Proc]:
    # Client side first, then server side.
    return [p for p in (chain.entry, chain.exit) if p is not None]


def local_config() -> dict[str, Any]:
    def workload(name: str, ip: str, node: str) -> dict[str, Any]:
        return {
            "uid": f"Kubernetes//Pod/bench/{name}-0",
            "name": name,
            "namespace": "bench",
            "serviceAccount": name,
            "workloadIps": [ip],
            "protocol": "HBONE",
            "node": node,
            "network": "",
        }

    return {
        "workloads": [
            workload("client", CLIENT_IP, "node-a"),
            workload("server", SERVER_IP, "node-b"),
        ],
        "services": [],
        "policies": [],
    }


def agent_argv(node: str, config_path: Path, ca_dir: Path, log_level: str) -> list[str]:
    ip = NODE_IPS[node]
    return [
        sys.executable,
        "-m",
        "ztagent",
        "--log-level",
        log_level,
        "node",
        "--local-xds-path",
        str(config_path),
        "--node-name",
        node,
        "--trust-domain",
        TRUST_DOMAIN,
        "--ca-dir",
        str(ca_dir),
        "--inbound-addr",
        "workloads",
        "--inbound-plaintext-addr",
        "workloads",
        "--outbound-addr",
        "off",
        "--socks5-addr",
        _addr(ip, SOCKS5_PORT),
        "--admin-addr",
        _addr(ip, ADMIN_PORT),
        "--metrics-addr",
        _addr(ip, METRICS_PORT),
        "--readiness-addr",
        _addr(ip, READINESS_PORT),
        "--drain-timeout",
        "1",
    ]


def ready_status(node: str) -> int:
    conn = http.client.HTTPConnection(NODE_IPS[node], READINESS_PORT, timeout=2.0)
    try:
        conn.request("GET", "/healthz/ready")
        return conn.getresponse().status
    finally:
        conn.close()


def wait_agents_ready(agents: dict[str, Proc], timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(agents)
    last: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for node, proc in list(pending.items()):
            if not proc.alive():
                raise PairFailed(proc.failure())
            try:
                status = ready_status(node)
            except (OSError, http.client.HTTPException) as exc:
                last[node] = repr(exc)
                continue
            last[node] = f"HTTP {status}"
            if status == 200:
                del pending[node]
        if pending:
            time.sleep(0.1)
    if pending:
        names = ", ".join(f"{n} ({last.get(n, 'no answer')})" for n in pending)
        raise PairFailed(f"not ready after {timeout:.0f}s: {names}")


def start_node_agents(launcher: Launcher, log_level: str) -> Config:
    from ztagent.identity.ca import CertificateAuthority

    start_servers(launcher, SERVER_IP, ECHO_PORT, DISCARD_PORT)
    workdir = launcher.workdir
    ca_dir = workdir / "node-ca"
    CertificateAuthority.create(ca_dir, TRUST_DOMAIN)
    config_path = workdir / "local-config.yaml"
    config_path.write_text(yaml.safe_dump(local_config(), sort_keys=False))
    agents = {
        node: launcher.spawn(node, agent_argv(node, config_path, ca_dir, log_level))
        for node in ("node-a", "node-b")
    }
    wait_agents_ready(agents)
    procs = [agents["node-a"], agents["node-b"]]
    wait_listening_on(SERVER_IP, INBOUND_PORT, procs)
    socks5 = (NODE_IPS["node-a"], SOCKS5_PORT)
    return Config(
        "node-agents",
        "client on 127.0.110.1 -> node-a SOCKS5 -> HBONE -> node-b on 127.0.120.1:15008 -> server",
        bulk=Target(socks5, (SERVER_IP, DISCARD_PORT), CLIENT_IP),
        conn=Target(socks5, (SERVER_IP, ECHO_PORT), CLIENT_IP),
        bulk_procs=procs,
        conn_procs=procs,
    )


# --------------------------------------------------------------------------- measuring


def cpu_of(procs: list[Proc]) -> float:
    return sum(p.cpu_seconds() for p in procs)


def with_cpu(procs: list[Proc], action: Callable[[], T]) -> tuple[T, float]:
    cpu0, t0 = cpu_of(procs), time.perf_counter()
    result = action()
    cpu1, t1 = cpu_of(procs), time.perf_counter()
    return result, 100.0 * (cpu1 - cpu0) / max(t1 - t0, 1e-9)


def measure(
    config: Config,
    settings: Settings,
    runner: Runner,
    iperf: IperfServer | None,
    iperf_binary: str | None,
) -> None:
    def run(coro: Coroutine[Any, Any, T]) -> T:
        return runner.run(coro)

    config.check_alive()
    stream, cpu = with_cpu(
        config.bulk_procs,
        lambda: run(
            stream_throughput(
                config.bulk,
                settings.stream_seconds,
                settings.stream_warmup,
                settings.stream_max_bytes,
            )
        ),
    )
    if stream.error:
        config.notes.append(f"tput1: {stream.error}")
        print(f"    tput1      error: {stream.error}", flush=True)
    else:
        config.record("tput1", stream.gbits)
        config.record("tput1_cpu", cpu)
        if cpu > 0:
            config.record("tput1_per_core", stream.gbits / (cpu / 100.0))
        print(f"    tput1      {stream.gbits:8.2f} Gbit/s   CPU {cpu:4.0f}%", flush=True)

    if iperf is not None and iperf_binary is not None and config.iperf_port is not None:
        config.check_alive()
        try:
            gbits = run_iperf(
                iperf_binary, config.iperf_port, settings.iperf_seconds, settings.iperf_omit, 1
            )
        except RuntimeError as exc:
            config.notes.append(f"iperf1: {exc}")
            print(f"    iperf1     {exc}", flush=True)
            iperf.restart()
        else:
            config.record("iperf1", gbits)
            print(f"    iperf1     {gbits:8.2f} Gbit/s", flush=True)

    config.check_alive()
    settle_time_wait()
    rate, cpu = with_cpu(
        config.conn_procs,
        lambda: run(
            connection_rate(
                config.conn, settings.rate_seconds, settings.rate_concurrency, settings.rate_max
            )
        ),
    )
    if rate.completed:
        config.record("cps", rate.per_second)
        config.record("cps_cpu", cpu)
        config.record("cps_cpu_per_conn", cpu / 100.0 / rate.per_second * 1e6)
    err = f"   ({rate.errors} errors: {rate.first_error})" if rate.errors else ""
    if rate.errors:
        config.notes.append(f"cps: {rate.errors} errors, first: {rate.first_error}")
    print(f"    cps        {rate.per_second:8.0f} conn/s   CPU {cpu:4.0f}%{err}", flush=True)

    config.check_alive()
    lat = run(latency_kept(config.conn, settings.kept_max, settings.kept_seconds))
    if lat.errors:
        config.notes.append(f"kept: {lat.errors} errors, first: {lat.first_error}")
    if lat.samples:
        p50, p99 = percentile(lat.samples, 0.50) * 1e6, percentile(lat.samples, 0.99) * 1e6
        config.record("kept_p50", p50)
        config.record("kept_p99", p99)
        print(
            f"    kept lat   p50 {p50:7.0f} us  p99 {p99:7.0f} us  ({len(lat.samples)} requests)",
            flush=True,
        )
    else:
        print(f"    kept lat   no samples ({lat.first_error})", flush=True)


def record_rss(config: Config, into: dict[str, int], peak: bool) -> None:
    """Client-side and server-side process RSS; for hbone-pair the largest over its chains."""
    for role, index in (("client-side", 0), ("server-side", 1)):
        values = []
        for procs in (config.bulk_procs, config.conn_procs):
            if len(procs) > index:
                values.append(procs[index].peak_rss() if peak else procs[index].rss())
        if values:
            into[role] = max(values)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_report(configs: list[Config], settings: Settings) -> None:
    print()
    print(f"Results: median of {settings.runs} run(s){' (quick)' if settings.quick else ''}")
    by_name = {c.name: c for c in configs}
    base, node = by_name.get("hbone-pair"), by_name.get("node-agents")
    print()
    print(f"  {'figure':<58}{'hbone-pair':>12}{'node-agents':>13}{'node/pair':>11}")
    for metric in METRICS:
        values = [c.median(metric.key) if c else None for c in (base, node)]
        if all(v is None for v in values):
            continue
        ratio = f"{values[1] / values[0]:.2f}x" if values[0] and values[1] is not None else ""
        label = f"{metric.title} [{metric.unit}]"
        print(
            f"  {label:<58}{fmt(values[0], metric.digits):>12}"
            f"{fmt(values[1], metric.digits):>13}{ratio:>11}"
        )
    for label, attr in (("RSS after start", "start_rss"), ("peak RSS (VmHWM)", "peak_rss")):
        for role in ("client-side", "server-side"):
            vals = [
                getattr(c, attr).get(role) / MIB if c and role in getattr(c, attr) else None
                for c in (base, node)
            ]
            if all(v is None for v in vals):
                continue
            ratio = f"{vals[1] / vals[0]:.2f}x" if vals[0] and vals[1] is not None else ""
            title = f"{label}, {role} [MiB]"
            print(f"  {title:<58}{fmt(vals[0], 1):>12}{fmt(vals[1], 1):>13}{ratio:>11}")

    print()
    print("Runs")
    for metric in METRICS:
        for config in configs:
            measured = config.runs.get(metric.key)
            if measured:
                runs = " ".join(fmt(v, metric.digits) for v in measured)
                print(f"  {metric.key:<18}{config.name:<13}{runs}")
    noted = [c for c in configs if c.notes]
    if noted:
        print()
        print("Notes")
        for config in noted:
            for note in config.notes:
                print(f"  {config.name}: {note}")


def environment(iperf_binary: str | None) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": importlib.metadata.version("uvloop"),
        "iperf3": tool_version([iperf_binary, "--version"]) if iperf_binary else None,
    }


def write_json(
    path: Path, configs: list[Config], settings: Settings, iperf_binary: str | None
) -> None:
    data = {
        "settings": asdict(settings),
        "environment": environment(iperf_binary),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": {m.key: {"title": m.title.strip(), "unit": m.unit} for m in METRICS},
        "configurations": {
            c.name: {
                "description": c.description,
                "median": {k: c.median(k) for k in c.runs},
                "runs": c.runs,
                "rss_after_start_bytes": c.start_rss,
                "peak_rss_bytes": c.peak_rss,
                "notes": c.notes,
            }
            for c in configs
        },
    }
    base, node = (
        next((c for c in configs if c.name == n), None) for n in ("hbone-pair", "node-agents")
    )
    if base and node:
        data["ratio_node_over_pair"] = {
            k: (node.median(k) or 0.0) / b
            for k in base.runs
            if (b := base.median(k)) and node.median(k) is not None
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_node", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short measurements (1-2 s each)")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (medians)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--agent-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level of the node agents (info keeps the access log on; default info)",
    )
    parser.add_argument("--discard", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.discard:
        host, _, port = args.discard.rpartition(":")
        run_server_forever(serve_discard(host, int(port)), 3600.0)
        return 0
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be between 1 and 20")

    raise_nofile_limit(65_536)
    settings = Settings.make(args.quick, args.runs)
    iperf_binary = shutil.which("iperf3")
    if iperf_binary is None:
        print("note: iperf3 is not installed: no iperf3 figure for hbone-pair")

    configs: list[Config] = []
    failed = ""
    runner = Runner()
    with tempfile.TemporaryDirectory(prefix="ztagent-bench-node-") as tmp:
        launcher = Launcher(Path(tmp))
        try:
            env = PairEnv(launcher, bench_certs.generate(Path(tmp) / "certs"))
            print("Starting hbone-pair", flush=True)
            try:
                pair = start_hbone_pair(env, iperf=iperf_binary is not None)
            except (PairFailed, OSError) as exc:
                print(f"hbone-pair failed to start: {exc}", file=sys.stderr)
                return 1
            iperf: IperfServer | None = None
            if iperf_binary and pair.iperf_server_port is not None:
                iperf = IperfServer(launcher, iperf_binary, pair.iperf_server_port)
                try:
                    iperf.start()
                except PairFailed as exc:
                    print(f"note: no iperf3 figure: {exc}", flush=True)
                    iperf = None
            print("Starting node-agents", flush=True)
            try:
                node = start_node_agents(launcher, args.agent_log_level)
            except (PairFailed, OSError) as exc:
                print(f"node agents failed to start: {exc}", file=sys.stderr)
                for proc in launcher.procs:
                    if proc.name in NODE_IPS:
                        print(f"--- {proc.name} log tail ---\n{proc.log_tail(30)}", file=sys.stderr)
                return 1
            configs = [pair, node]
            for config in configs:
                record_rss(config, config.start_rss, peak=False)
                try:
                    runner.run(asyncio.wait_for(one_exchange(config.conn), 15))
                    runner.run(asyncio.wait_for(send_only(config.bulk), 15))
                except (OSError, TimeoutError, ConnectionError) as exc:
                    logs = "\n".join(
                        f"--- {p.name} log tail ---\n{p.log_tail(30)}" for p in config.all_procs()
                    )
                    print(
                        f"{config.name}: no exchange end to end: {exc!r}\n{logs}", file=sys.stderr
                    )
                    return 1
                print(f"  ok {config.name}: {config.description}", flush=True)

            for run in range(1, settings.runs + 1):
                order = configs if run % 2 else list(reversed(configs))
                for config in order:
                    print(f"Run {run}/{settings.runs}: {config.name}", flush=True)
                    try:
                        measure(
                            config,
                            settings,
                            runner,
                            iperf if config.name == "hbone-pair" else None,
                            iperf_binary,
                        )
                    except PairFailed as exc:
                        failed = f"{config.name}: {exc}"
                        print(f"  !! {failed}", file=sys.stderr, flush=True)
                        break
                if failed:
                    break
            for config in configs:
                record_rss(config, config.peak_rss, peak=True)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            runner.close()
            launcher.stop_all()

    print_report(configs, settings)
    if args.json:
        write_json(args.json, configs, settings, iperf_binary)
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
