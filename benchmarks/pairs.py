"""Relay pairs under test, and the processes that make them.

A pair is an entry relay (clients connect to it in plaintext) and an exit relay (it connects
to the target), with mutual TLS between the two. ``Pair.start_chain`` starts one such chain
towards one target port and returns the port clients use. To add a pair, write a subclass and
list it in ``ALL_PAIRS``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from benchmarks.certs import CertSet
from benchmarks.common import LOOPBACK, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
MAX_PROCESS_SECONDS = 3600


class PairFailed(Exception):
    """A pair could not be started, or stopped working."""


@dataclass
class Proc:
    """A process this benchmark started, in its own session (so its children go with it)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self) -> str:
        tail = self.log_tail()
        where = f" (log {self.log_path})"
        return f"{self.name} exited with code {self.popen.returncode}{where}" + (
            f":\n{tail}" if tail else ""
        )

    def processes(self) -> list[psutil.Process]:
        """The process and its descendants."""
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def peak_rss(self) -> int:
        """Sum of the high-water RSS (VmHWM) of the process and its descendants."""
        total = 0
        for proc in self.processes():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def stop(self) -> None:
        members = self.processes()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        # Anything of ours still there (psutil checks the pid was not reused) is killed.
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


@dataclass
class Launcher:
    """Starts processes, remembers every one of them so they can all be stopped."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str]) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def wait_listening(port: int, procs: Sequence[Proc], timeout: float = START_TIMEOUT) -> None:
    """Wait until something accepts on 127.0.0.1:port; fail early if a process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise PairFailed(proc.failure())
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    names = ", ".join(p.name for p in procs)
    raise PairFailed(f"nothing listening on {LOOPBACK}:{port} after {timeout:.0f}s ({names})")


def port_listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (read from /proc, no connection made)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(suffix) and fields[3] == "0A":
                return True
    return False


@dataclass
class Chain:
    """One running entry/exit relay chain towards one target."""

    port: int
    entry: Proc | None = None
    exit: Proc | None = None

    def relays(self) -> list[Proc]:
        return [p for p in (self.entry, self.exit) if p is not None]

    def check_alive(self) -> None:
        for proc in self.relays():
            if not proc.alive():
                raise PairFailed(proc.failure())


@dataclass
class PairEnv:
    launcher: Launcher
    certs: CertSet

    @property
    def workdir(self) -> Path:
        return self.launcher.workdir


def _addr(port: int) -> str:
    return f"{LOOPBACK}:{port}"


class Pair:
    name = ""
    description = ""

    def unavailable(self) -> str | None:
        """Why this pair cannot run here, or None."""
        return None

    def start_chain(self, env: PairEnv, label: str, target_port: int) -> Chain:
        raise NotImplementedError


class DirectPair(Pair):
    name = "direct"
    description = "no relay: the client talks to the server"

    def start_chain(self, env: PairEnv, label: str, target_port: int) -> Chain:
        return Chain(port=target_port)


class PythonTlsRelayPair(Pair):
    name = "python-tls-relay"
    description = "benchmarks/tls_relay.py: uvloop BufferedProtocol relays, one TLS conn per conn"

    def start_chain(self, env: PairEnv, label: str, target_port: int) -> Chain:
        certs = env.certs
        exit_port, entry_port = free_port(), free_port()
        base = [sys.executable, "-m", "benchmarks.tls_relay"]
        limit = ["--max-seconds", str(MAX_PROCESS_SECONDS)]
        exit_proc = env.launcher.spawn(
            f"{self.name}-{label}-exit",
            [
                *base,
                "exit",
                "--listen",
                _addr(exit_port),
                "--connect",
                _addr(target_port),
                "--cert",
                str(certs.server_cert),
                "--key",
                str(certs.server_key),
                "--ca",
                str(certs.ca_cert),
                *limit,
            ],
        )
        wait_listening(exit_port, [exit_proc])
        entry_proc = env.launcher.spawn(
            f"{self.name}-{label}-entry",
            [
                *base,
                "entry",
                "--listen",
                _addr(entry_port),
                "--connect",
                _addr(exit_port),
                "--cert",
                str(certs.client_cert),
                "--key",
                str(certs.client_key),
                "--ca",
                str(certs.ca_cert),
                *limit,
            ],
        )
        wait_listening(entry_port, [entry_proc, exit_proc])
        return Chain(port=entry_port, entry=entry_proc, exit=exit_proc)


def _stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


class StunnelPair(Pair):
    name = "stunnel"
    description = "stunnel4 client and server, mTLS TLS 1.3, one TLS conn per conn"
    # stunnel's default: its client resumes TLS sessions, so most handshakes are abbreviated.
    session_resume = True

    def unavailable(self) -> str | None:
        if _stunnel_binary() is None:
            return "stunnel is not installed (apt-get install stunnel4, or ./benchmarks/setup.sh)"
        return None

    def _config(
        self, client: bool, accept: int, connect: int, cert: Path, key: Path, ca: Path
    ) -> str:
        lines = [
            "foreground = yes",
            "pid =",
            "syslog = no",
            "debug = 4",
            "[bench]",
            f"client = {'yes' if client else 'no'}",
            f"accept = {_addr(accept)}",
            f"connect = {_addr(connect)}",
            f"cert = {cert}",
            f"key = {key}",
            f"CAfile = {ca}",
            "verifyChain = yes",
            "requireCert = yes",
            "sslVersionMin = TLSv1.3",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            f"sessionResume = {'yes' if self.session_resume else 'no'}",
        ]
        return "\n".join(lines) + "\n"

    def start_chain(self, env: PairEnv, label: str, target_port: int) -> Chain:
        binary = _stunnel_binary()
        assert binary is not None
        certs = env.certs
        exit_port, entry_port = free_port(), free_port()
        procs: list[Proc] = []
        for role, accept, connect, cert, key in (
            ("exit", exit_port, target_port, certs.server_cert, certs.server_key),
            ("entry", entry_port, exit_port, certs.client_cert, certs.client_key),
        ):
            conf = env.workdir / f"{self.name}-{label}-{role}.conf"
            conf.write_text(
                self._config(role == "entry", accept, connect, cert, key, certs.ca_cert)
            )
            procs.append(env.launcher.spawn(f"{self.name}-{label}-{role}", [binary, str(conf)]))
            wait_listening(accept, procs)
        return Chain(port=entry_port, entry=procs[1], exit=procs[0])


class StunnelFullHandshakePair(StunnelPair):
    name = "stunnel-noresume"
    description = "stunnel4 pair with session resumption off: a full handshake per conn"
    session_resume = False


class HbonePair(Pair):
    name = "hbone"
    description = "ztagent hbone connect/serve: HTTP/2 CONNECT streams over pooled mTLS tunnels"

    def start_chain(self, env: PairEnv, label: str, target_port: int) -> Chain:
        certs = env.certs
        serve_port, entry_port = free_port(), free_port()
        base = [sys.executable, "-m", "ztagent", "--log-level", "warning", "hbone"]
        exit_proc = env.launcher.spawn(
            f"{self.name}-{label}-exit",
            [
                *base,
                "serve",
                "--listen",
                _addr(serve_port),
                "--cert",
                str(certs.server_cert),
                "--key",
                str(certs.server_key),
                "--ca",
                str(certs.ca_cert),
            ],
        )
        wait_listening(serve_port, [exit_proc])
        entry_proc = env.launcher.spawn(
            f"{self.name}-{label}-entry",
            [
                *base,
                "connect",
                "--via",
                _addr(serve_port),
                "--target",
                _addr(target_port),
                "--cert",
                str(certs.client_cert),
                "--key",
                str(certs.client_key),
                "--ca",
                str(certs.ca_cert),
                "--listen",
                _addr(entry_port),
            ],
        )
        wait_listening(entry_port, [entry_proc, exit_proc])
        return Chain(port=entry_port, entry=entry_proc, exit=exit_proc)


ALL_PAIRS: list[Pair] = [
    DirectPair(),
    PythonTlsRelayPair(),
    StunnelPair(),
    StunnelFullHandshakePair(),
    HbonePair(),
]
DEFAULT_PAIRS = ["direct", "python-tls-relay", "stunnel", "hbone"]
