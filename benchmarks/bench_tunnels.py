"""Side-by-side benchmark of tunnel relay pairs on loopback.

    .venv/bin/python -m benchmarks.bench_tunnels [--quick] [--runs 3] [--json out.json]
        [--pairs direct,python-tls-relay,stunnel,hbone] [--idle-conns 2000]

For each pair (see benchmarks/pairs.py): throughput with 1 and 4 streams (iperf3), new
connections per second, request latency over new connections and over one kept connection,
peak RSS of the relays, and the RSS cost of idle connections. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from benchmarks import certs as bench_certs
from benchmarks import loadgen
from benchmarks.common import LOOPBACK, Metric, free_port, raise_nofile_limit
from benchmarks.pairs import (
    ALL_PAIRS,
    DEFAULT_PAIRS,
    Chain,
    Launcher,
    Pair,
    PairEnv,
    PairFailed,
    Proc,
    port_listening,
    wait_listening,
)

T = TypeVar("T")
MIB = 1024 * 1024


@dataclass
class Settings:
    quick: bool
    runs: int
    throughput_seconds: int
    throughput_omit: int
    rate_seconds: float
    rate_concurrency: int
    rate_max: int
    fresh_max: int
    fresh_seconds: float
    kept_max: int
    kept_seconds: float
    idle_conns: int

    @classmethod
    def make(cls, quick: bool, runs: int, idle_conns: int) -> Settings:
        if quick:
            return cls(quick, runs, 2, 0, 1.5, 32, 30_000, 500, 1.0, 3_000, 1.0, idle_conns)
        return cls(quick, runs, 5, 1, 5.0, 32, 100_000, 3_000, 3.0, 20_000, 3.0, idle_conns)


METRICS = [
    Metric("tput1", "Throughput, 1 stream", "Gbit/s", True, 2),
    Metric("tput1_cpu", "  relay CPU during 1 stream (entry+exit, 100 = 1 core)", "%", False, 0),
    Metric("tput1_per_core", "  throughput per relay core, 1 stream", "Gbit/s/core", True, 2),
    Metric("tput4", "Throughput, 4 streams", "Gbit/s", True, 2),
    Metric("tput4_cpu", "  relay CPU during 4 streams (entry+exit, 100 = 1 core)", "%", False, 0),
    Metric("tput4_per_core", "  throughput per relay core, 4 streams", "Gbit/s/core", True, 2),
    Metric("cps", "New connections per second (32 in flight)", "conn/s", True, 0),
    Metric("cps_cpu", "  relay CPU during new connections (entry+exit)", "%", False, 0),
    Metric("fresh_p50", "Latency p50, new connection per request (1 in flight)", "us", False, 0),
    Metric("fresh_p99", "Latency p99, new connection per request (1 in flight)", "us", False, 0),
    Metric("kept_p50", "Latency p50, one kept connection (1 in flight)", "us", False, 0),
    Metric("kept_p99", "Latency p99, one kept connection (1 in flight)", "us", False, 0),
]


@dataclass
class PairState:
    pair: Pair
    bulk: Chain | None = None
    conn: Chain | None = None
    status: str = "ok"
    message: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    idle: dict[str, Any] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pair.name

    @property
    def active(self) -> bool:
        return self.status == "ok"

    def fail(self, message: str) -> None:
        self.status = "failed"
        self.message = message
        print(f"  !! {self.name}: {message}", flush=True)

    def record(self, key: str, value: float) -> None:
        self.runs.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.runs.get(key)
        return statistics.median(values) if values else None


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Runner:
    """One uvloop event loop for every load-generating coroutine of the benchmark."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        self._runner.close()


class IperfServer:
    def __init__(self, launcher: Launcher, binary: str, port: int) -> None:
        self.launcher = launcher
        self.binary = binary
        self.port = port
        self.proc: Proc | None = None
        self.generation = 0

    def start(self) -> None:
        self.generation += 1
        self.proc = self.launcher.spawn(
            f"iperf3-server-{self.generation}",
            [self.binary, "-s", "-B", LOOPBACK, "-p", str(self.port)],
        )
        # A probe connection would count as a failed test for iperf3: look in /proc instead.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise PairFailed(self.proc.failure())
            if port_listening(self.port):
                return
            time.sleep(0.05)
        raise PairFailed("iperf3 server did not start within 10s")

    def restart(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.start()


def run_iperf(
    binary: str,
    port: int,
    seconds: int,
    omit: int,
    streams: int,
    *,
    host: str = LOOPBACK,
    netns: str | None = None,
) -> float:
    """Gbit/s received by the server (the client runs in `netns` when given); raises
    RuntimeError on failure."""
    argv = ["ip", "netns", "exec", netns] if netns else []
    argv += [binary, "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams)]
    argv += ["-J", "--connect-timeout", "5000"]
    if omit:
        argv += ["-O", str(omit)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + omit + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("iperf3 client timed out") from exc
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3: {done.stderr.strip() or done.stdout[-300:]}") from exc
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    bits = float(report["end"]["sum_received"]["bits_per_second"])
    return bits / 1e9


def relay_cpu(chain: Chain) -> float:
    return sum(p.cpu_seconds() for p in chain.relays())


def with_cpu(chain: Chain, action: Callable[[], T]) -> tuple[T, float]:
    """Run ``action``; also return the relays' CPU use meanwhile, in % of one core."""
    cpu0, t0 = relay_cpu(chain), time.perf_counter()
    result = action()
    cpu1, t1 = relay_cpu(chain), time.perf_counter()
    return result, 100.0 * (cpu1 - cpu0) / max(t1 - t0, 1e-9)


def cpu_text(chain: Chain, cpu: float) -> str:
    return f"   relay CPU {cpu:4.0f}%" if chain.relays() else ""


def measure_throughput(
    state: PairState, settings: Settings, iperf: IperfServer | None, binary: str | None
) -> None:
    if iperf is None or binary is None or state.bulk is None:
        return
    chain = state.bulk
    for streams, key in ((1, "tput1"), (4, "tput4")):
        chain.check_alive()
        try:
            gbits, cpu = with_cpu(
                chain,
                functools.partial(
                    run_iperf,
                    binary,
                    chain.port,
                    settings.throughput_seconds,
                    settings.throughput_omit,
                    streams,
                ),
            )
        except RuntimeError as exc:
            state.notes.append(f"{key}: {exc}")
            print(f"    {key}: {exc}", flush=True)
            iperf.restart()
            continue
        state.record(key, gbits)
        if chain.relays():
            state.record(f"{key}_cpu", cpu)
            if cpu > 0:
                state.record(f"{key}_per_core", gbits / (cpu / 100.0))
        print(f"    {key:<10} {gbits:8.2f} Gbit/s{cpu_text(chain, cpu)}", flush=True)


TIME_WAIT_SETTLED = 2_000
TIME_WAIT_MAX_WAIT = 65.0


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT on this host (state 06 in /proc/net/tcp{,6})."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                next(table, None)
                count += sum(1 for line in table if line.split()[3] == "06")
        except OSError:
            continue
    return count


def settle_time_wait() -> None:
    """Let earlier connection-rate runs' TIME_WAIT sockets expire first: thousands of them
    make every connect() search longer for a free port, which would slow whichever pair runs
    later, relays and load generator alike. Bounded by the kernel's 60 s TIME_WAIT."""
    deadline = time.monotonic() + TIME_WAIT_MAX_WAIT
    count = time_wait_sockets()
    if count <= TIME_WAIT_SETTLED:
        return
    print(f"    (waiting for {count} TIME_WAIT sockets to expire)", flush=True)
    while count > TIME_WAIT_SETTLED and time.monotonic() < deadline:
        time.sleep(1.0)
        count = time_wait_sockets()


def measure_requests(state: PairState, settings: Settings, runner: Runner) -> None:
    chain = state.conn
    assert chain is not None
    chain.check_alive()
    settle_time_wait()
    rate, cpu = with_cpu(
        chain,
        lambda: runner.run(
            loadgen.connection_rate(
                chain.port, settings.rate_seconds, settings.rate_concurrency, settings.rate_max
            )
        ),
    )
    if rate.completed:
        state.record("cps", rate.per_second)
        if chain.relays():
            state.record("cps_cpu", cpu)
    err = f"   ({rate.errors} errors: {rate.first_error})" if rate.errors else ""
    if rate.errors:
        state.notes.append(f"cps: {rate.errors} errors, first: {rate.first_error}")
    print(f"    {'cps':<10} {rate.per_second:8.0f} conn/s{cpu_text(chain, cpu)}{err}", flush=True)

    for prefix, coro in (
        ("fresh", loadgen.latency_fresh(chain.port, settings.fresh_max, settings.fresh_seconds)),
        ("kept", loadgen.latency_persistent(chain.port, settings.kept_max, settings.kept_seconds)),
    ):
        chain.check_alive()
        lat = runner.run(coro)
        if lat.errors:
            state.notes.append(f"{prefix}: {lat.errors} errors, first: {lat.first_error}")
        if not lat.samples:
            print(f"    {prefix}: no samples ({lat.first_error})", flush=True)
            continue
        p50, p99 = percentile(lat.samples, 0.50) * 1e6, percentile(lat.samples, 0.99) * 1e6
        state.record(f"{prefix}_p50", p50)
        state.record(f"{prefix}_p99", p99)
        print(
            f"    {prefix + ' lat':<10} p50 {p50:7.0f} us  p99 {p99:7.0f} us"
            f"  ({len(lat.samples)} requests)",
            flush=True,
        )


def measure_idle(state: PairState, settings: Settings, runner: Runner) -> None:
    chain = state.conn
    if chain is None or chain.entry is None or chain.exit is None:
        return
    entry, exit_ = chain.entry, chain.exit
    time.sleep(0.5)
    before = {"entry": entry.rss(), "exit": exit_.rss()}

    def measure() -> dict[str, int]:
        return {"entry": entry.rss(), "exit": exit_.rss()}

    result = runner.run(
        loadgen.hold_idle_connections(
            chain.port, settings.idle_conns, concurrency=64, settle=1.0, measure=measure
        )
    )
    after: dict[str, int] = result.measured
    opened = max(result.opened, 1)
    per_conn = {role: (after[role] - before[role]) / opened for role in ("entry", "exit")}
    state.idle = {
        "connections": result.opened,
        "errors": result.errors,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_conn": {**per_conn, "total": per_conn["entry"] + per_conn["exit"]},
    }
    if result.errors:
        state.notes.append(f"idle: {result.errors} errors, first: {result.first_error}")
    print(
        f"    idle       {result.opened} conns: entry {per_conn['entry'] / 1024:.1f} KiB/conn,"
        f" exit {per_conn['exit'] / 1024:.1f} KiB/conn"
        + (f"  ({result.errors} errors: {result.first_error})" if result.errors else ""),
        flush=True,
    )


def record_peaks(state: PairState) -> None:
    for label, chain in (("bulk", state.bulk), ("conn", state.conn)):
        if chain is None:
            continue
        for role, proc in (("entry", chain.entry), ("exit", chain.exit)):
            if proc is not None:
                state.peak_rss[f"{label}_{role}"] = proc.peak_rss()


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_report(states: list[PairState], settings: Settings) -> None:
    print()
    print(f"Results: median of {settings.runs} run(s){' (quick)' if settings.quick else ''}")
    for state in states:
        if not state.active:
            first_line = (state.message.splitlines() or [""])[0]
            print(f"  {state.name}: {state.status}: {first_line}")
    shown = [s for s in states if s.runs or s.idle]
    if not shown:
        return
    width = max(len(s.name) for s in shown) + 2

    for metric in METRICS:
        by_pair = {s.name: s.median(metric.key) for s in shown}
        if all(v is None for v in by_pair.values()):
            continue
        base_name = next(
            (n for n in ("stunnel", "python-tls-relay") if by_pair.get(n) is not None), None
        )
        base = by_pair.get(base_name) if base_name else None
        better = "higher" if metric.higher_is_better else "lower"
        print()
        print(f"{metric.title} ({metric.unit}, {better} is better)")
        header = f"  {'pair':<{width}}{'median':>12}   {'runs':<30}"
        if base_name:
            header += f"vs {base_name}"
        print(header)
        for state in shown:
            value = by_pair[state.name]
            runs = " ".join(fmt(v, metric.digits) for v in state.runs.get(metric.key, []))
            ratio = f"{value / base:.2f}x" if value is not None and base else ""
            print(f"  {state.name:<{width}}{fmt(value, metric.digits):>12}   {runs:<30}{ratio}")

    relays = [s for s in shown if s.peak_rss]
    if relays:
        print()
        print("Peak RSS of relay processes (MiB): throughput chain / request chain")
        print(
            f"  {'pair':<{width}}"
            + "".join(f"{h:>12}" for h in ("bulk entry", "bulk exit", "conn entry", "conn exit"))
        )
        for state in relays:
            cells = "".join(
                f"{fmt(state.peak_rss.get(k, 0) / MIB if k in state.peak_rss else None, 1):>12}"
                for k in ("bulk_entry", "bulk_exit", "conn_entry", "conn_exit")
            )
            print(f"  {state.name:<{width}}{cells}")

    idle = [s for s in shown if s.idle]
    if idle:
        print()
        print("RSS per idle connection (KiB), relays fresh, connections held open through the pair")
        print(f"  {'pair':<{width}}{'conns':>8}{'entry':>10}{'exit':>10}{'total':>10}")
        for state in idle:
            per = state.idle["bytes_per_conn"]
            print(
                f"  {state.name:<{width}}{state.idle['connections']:>8}"
                + "".join(f"{per[k] / 1024:>10.1f}" for k in ("entry", "exit", "total"))
            )

    noted = [s for s in states if s.notes]
    if noted:
        print()
        print("Notes")
        for state in noted:
            for note in state.notes:
                print(f"  {state.name}: {note}")


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout + done.stderr).strip().splitlines()
    return next((line for line in text if any(c.isdigit() for c in line)), "")


def environment(iperf_binary: str | None) -> dict[str, Any]:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": importlib.metadata.version("uvloop"),
        "iperf3": tool_version([iperf_binary, "--version"]) if iperf_binary else None,
        "stunnel": tool_version([stunnel, "-version"]) if stunnel else None,
    }


def select_pairs(names: str | None) -> list[Pair]:
    by_name = {p.name: p for p in ALL_PAIRS}
    wanted = [n.strip() for n in (names or ",".join(DEFAULT_PAIRS)).split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown pair(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def start_pairs(
    pairs: list[Pair], env: PairEnv, iperf_port: int | None, echo_port: int
) -> list[PairState]:
    states = []
    for pair in pairs:
        state = PairState(pair)
        states.append(state)
        reason = pair.unavailable()
        if reason:
            state.status, state.message = "skipped", reason
            print(f"  -- {pair.name}: skipped: {reason}", flush=True)
            continue
        first = len(env.launcher.procs)
        try:
            if iperf_port is not None:
                state.bulk = pair.start_chain(env, "bulk", iperf_port)
            state.conn = pair.start_chain(env, "conn", echo_port)
        except (PairFailed, OSError) as exc:
            for proc in env.launcher.procs[first:]:
                proc.stop()
            state.bulk = state.conn = None
            state.status, state.message = "skipped", f"failed to start: {exc}"
            print(f"  -- {pair.name}: skipped: failed to start: {exc}", flush=True)
            continue
        print(f"  ok {pair.name}: {pair.description}", flush=True)
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_tunnels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short measurements (1-2 s each)")
    parser.add_argument("--runs", type=int, default=3, help="runs per pair; medians are shown")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--pairs",
        help=f"comma-separated, from: {', '.join(p.name for p in ALL_PAIRS)} "
        f"(default: {','.join(DEFAULT_PAIRS)})",
    )
    parser.add_argument("--idle-conns", type=int, default=2000, help="idle connections to hold")
    parser.add_argument(
        "--only",
        default="tput,requests,idle",
        help="comma-separated measurement groups: tput, requests, idle (default: all)",
    )
    args = parser.parse_args(argv)
    groups = set(args.only.split(","))
    if not groups <= {"tput", "requests", "idle"}:
        parser.error("--only takes tput, requests, idle")
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be between 1 and 20")
    if not 1 <= args.idle_conns <= 20_000:
        parser.error("--idle-conns must be between 1 and 20000")

    pairs = select_pairs(args.pairs)
    # Each relay holds two sockets per relayed connection; children inherit the limit.
    nofile = raise_nofile_limit(max(65_536, 3 * args.idle_conns + 1_000))
    idle_conns = min(args.idle_conns, max(1, (nofile - 500) // 2))
    if idle_conns < args.idle_conns:
        print(f"note: open-files limit is {nofile}: holding {idle_conns} idle connections")
    settings = Settings.make(args.quick, args.runs, idle_conns)

    iperf_binary = shutil.which("iperf3")
    if iperf_binary is None:
        print(
            "note: iperf3 is not installed, throughput is not measured "
            "(apt-get install iperf3, or ./benchmarks/setup.sh)"
        )

    states: list[PairState] = []
    runner = Runner()
    with tempfile.TemporaryDirectory(prefix="ztagent-bench-") as tmp:
        workdir = Path(tmp)
        launcher = Launcher(workdir)
        try:
            certs = bench_certs.generate(workdir / "certs")
            env = PairEnv(launcher, certs)
            echo_port = free_port()
            iperf_port = free_port() if iperf_binary else None

            print("Starting pairs", flush=True)
            states = start_pairs(pairs, env, iperf_port, echo_port)

            echo = launcher.spawn(
                "echo-server",
                [
                    sys.executable,
                    "-m",
                    "benchmarks.echo_server",
                    "--listen",
                    f"{LOOPBACK}:{echo_port}",
                ],
            )
            wait_listening(echo_port, [echo])
            iperf: IperfServer | None = None
            if iperf_binary and iperf_port is not None:
                iperf = IperfServer(launcher, iperf_binary, iperf_port)
                try:
                    iperf.start()
                except PairFailed as exc:
                    print(f"note: no throughput figures: {exc}", flush=True)
                    iperf = None

            for state in states:
                if state.active and state.conn is not None:
                    try:
                        runner.run(asyncio.wait_for(loadgen.one_exchange(state.conn.port), 15))
                    except (OSError, TimeoutError, ConnectionError) as exc:
                        detail = "; ".join(
                            p.failure() for p in state.conn.relays() if not p.alive()
                        )
                        state.fail(f"no echo through the pair: {exc!r} {detail}")

            if "idle" in groups:
                print(
                    f"Idle connections ({settings.idle_conns} per pair, fresh relays)", flush=True
                )
            for state in states:
                if (
                    "idle" in groups
                    and state.active
                    and state.conn is not None
                    and state.conn.entry is not None
                ):
                    print(f"  {state.name}", flush=True)
                    try:
                        measure_idle(state, settings, runner)
                    except PairFailed as exc:
                        state.fail(str(exc))

            for run in range(1, settings.runs + 1):
                for state in states:
                    if not state.active:
                        continue
                    print(f"Run {run}/{settings.runs}: {state.name}", flush=True)
                    try:
                        if "tput" in groups:
                            measure_throughput(state, settings, iperf, iperf_binary)
                        if "requests" in groups:
                            measure_requests(state, settings, runner)
                    except PairFailed as exc:
                        state.fail(str(exc))
            for state in states:
                record_peaks(state)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            runner.close()
            launcher.stop_all()

    print_report(states, settings)
    if args.json:
        write_json(args.json, states, settings, iperf_binary)
        print(f"\nwrote {args.json}")
    return 0


def write_json(
    path: Path, states: list[PairState], settings: Settings, iperf_binary: str | None
) -> None:
    data = {
        "settings": asdict(settings),
        "environment": environment(iperf_binary),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": {m.key: {"title": m.title.strip(), "unit": m.unit} for m in METRICS},
        "pairs": {
            s.name: {
                "status": s.status,
                "message": s.message,
                "description": s.pair.description,
                "median": {k: s.median(k) for k in s.runs},
                "runs": s.runs,
                "peak_rss_bytes": s.peak_rss,
                "idle": s.idle,
                "notes": s.notes,
            }
            for s in states
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
