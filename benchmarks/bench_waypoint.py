"""Requests through the waypoint vs. L4 only, side by side in the ambient lab.

    .venv/bin/python -m benchmarks.bench_waypoint [--duration 10] [--connections 8]
        [--rate 1000] [--json out.json] [--prefix ztwb-] [--dir /tmp/ztagent-bench-waypoint]

Brings up `ztagent lab` with its own prefix, ranges and state directory. From a-sleep (node-a,
captured), HTTP/1.1 keep-alive POSTs of 1 KiB:
- `l4`: to the `echo` Service VIP (a-echo, b-echo): node agents and HBONE only;
- `waypoint`: to the `web` Service VIP (a-web1, b-web1, b-web2), which uses the waypoint on
  node-b: node-a agent -> HBONE -> waypoint (HTTP parsing, routing, policy) -> HBONE -> endpoint.
Figures per path: requests/s with `--connections` closed-loop clients, p50/p90/p99 latency;
then an open-loop run at `--rate` requests/s measuring the waypoint's CPU (cores) and RSS.
The lab is taken down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from benchmarks.bench_lab import lab_command
from ztagent.lab import state
from ztagent.lab.topology import Plan, make_plan
from ztagent.lab.topology import Settings as LabSettings

DEFAULT_PREFIX = "ztwb-"
DEFAULT_POD_CIDR = "10.248.0.0/17"
DEFAULT_UNDERLAY_CIDR = "10.248.128.0/24"
DEFAULT_DIR = Path("/tmp/ztagent-bench-waypoint")
BODY = b"b" * 1024
MAX_REQUESTS = 2_000_000
REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ client (in the pod netns)


def _request(host: str) -> bytes:
    return (
        f"POST /bench HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _client(target: str, connections: int, duration: float, rate: float) -> dict[str, Any]:
    host, _, port = target.rpartition(":")
    request = _request(host)
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    interval = connections / rate if rate > 0 else 0.0

    async def worker(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        next_at = time.monotonic() + index * (interval / max(connections, 1))
        try:
            while time.monotonic() < deadline and len(latencies) < MAX_REQUESTS:
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval
                started = time.perf_counter()
                status = await asyncio.wait_for(_exchange(reader, writer, request), 10)
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    results = await asyncio.gather(*(worker(i) for i in range(connections)), return_exceptions=True)
    elapsed = time.monotonic() - started
    errors += sum(1 for r in results if isinstance(r, BaseException))
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0
        )

    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
    }


def client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_waypoint client")
    parser.add_argument("--target", required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    result = asyncio.run(_client(args.target, args.connections, args.duration, args.rate))
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------ driver


def _run_client(
    plan: Plan, target: str, connections: int, duration: float, rate: float
) -> dict[str, Any]:
    pod = plan.pod("a-sleep")
    command = [
        "ip",
        "netns",
        "exec",
        pod.netns,
        sys.executable,
        "-m",
        "benchmarks.bench_waypoint",
        "client",
        "--target",
        target,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--rate",
        str(rate),
    ]
    out = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=duration + 60, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _process(plan: Plan, name: str) -> psutil.Process:
    st = state.load(plan.state_path)
    assert st is not None
    for record in st.processes:
        if record.name == name:
            return psutil.Process(record.pid)
    raise RuntimeError(f"no process {name!r} in the lab state")


def _with_usage(procs: list[psutil.Process], action: Any) -> tuple[dict[str, Any], float, float]:
    """Run `action`; the CPU (cores) of `procs` and the peak RSS (MiB) while it ran."""

    def tree(p: psutil.Process) -> list[psutil.Process]:
        return [p, *p.children(recursive=True)]

    members = [m for p in procs for m in tree(p)]
    before = sum(m.cpu_times().user + m.cpu_times().system for m in members)
    started = time.monotonic()
    result = action()
    elapsed = time.monotonic() - started
    after = sum(m.cpu_times().user + m.cpu_times().system for m in members)
    rss = max(m.memory_info().rss for m in members) / 2**20
    return result, (after - before) / elapsed, rss


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "client":
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(prog="bench_waypoint", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--pod-cidr", default=DEFAULT_POD_CIDR)
    parser.add_argument("--underlay-cidr", default=DEFAULT_UNDERLAY_CIDR)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_waypoint: needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    plan = make_plan(LabSettings(args.prefix, args.pod_cidr, args.underlay_cidr, args.dir))
    report: dict[str, Any] = {
        "settings": vars(args) | {"json": str(args.json), "dir": str(args.dir)}
    }
    try:
        subprocess.run(lab_command("up", plan), check=True, timeout=300)
        targets = {
            "l4": f"{plan.service('echo').vip}:80",
            "waypoint": f"{plan.service('web').vip}:80",
        }
        agents = [_process(plan, n.name) for n in plan.nodes]
        waypoint = _process(plan, f"waypoint-{plan.waypoint.key}")
        for name, target in targets.items():
            _run_client(plan, target, args.connections, 2.0, 0)  # warm-up
            closed = _run_client(plan, target, args.connections, args.duration, 0)
            fixed = _run_client(plan, target, args.connections, args.duration, args.rate)
            report[name] = {"closed_loop": closed, "open_loop": fixed}
        # CPU and RSS at the fixed rate, waypoint path, measured separately per process group.
        target = targets["waypoint"]
        run = lambda: _run_client(plan, target, args.connections, args.duration, args.rate)  # noqa: E731
        result, waypoint_cpu, waypoint_rss = _with_usage([waypoint], run)
        report["waypoint_usage"] = {
            "rate": result["rps"],
            "waypoint_cpu_cores": waypoint_cpu,
            "waypoint_rss_mib": waypoint_rss,
        }
        result, agent_cpu, agent_rss = _with_usage(agents, run)
        report["agents_usage_waypoint_path"] = {
            "rate": result["rps"],
            "agents_cpu_cores": agent_cpu,
            "agent_rss_mib_max": agent_rss,
        }
    finally:
        subprocess.run(lab_command("down", plan), timeout=120, check=False)
    l4, wp = report["l4"]["closed_loop"], report["waypoint"]["closed_loop"]
    print(f"{'path':10} {'rps':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}", end="")
    print(f"  (closed loop, {args.connections} connections)")
    for name in ("l4", "waypoint"):
        r = report[name]["closed_loop"]
        print(f"{name:10} {r['rps']:8.0f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f}")
    rps_ratio, p50_ratio = wp["rps"] / l4["rps"], wp["p50_ms"] / l4["p50_ms"]
    print(f"waypoint/l4: rps ratio {rps_ratio:.2f}, p50 ratio {p50_ratio:.2f}")
    for name in ("l4", "waypoint"):
        r = report[name]["open_loop"]
        print(f"{name:10} at {r['rps']:.0f} rps: p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms")
    u = report["waypoint_usage"]
    cores, rss = u["waypoint_cpu_cores"], u["waypoint_rss_mib"]
    print(f"waypoint at {u['rate']:.0f} rps: {cores:.2f} cores, RSS {rss:.1f} MiB")
    a = report["agents_usage_waypoint_path"]
    print(f"node agents (both) at {a['rate']:.0f} rps: {a['agents_cpu_cores']:.2f} cores")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
