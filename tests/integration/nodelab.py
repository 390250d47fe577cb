"""Two `ztagent node` processes on one host, app servers on workload IPs, and clients for them.

The lab is two nodes sharing one ztunnel local-config file (so an edit reaches both):

    node-a (admin etc. on 127.0.1.1)   sleep  test/sleep  127.0.10.1  HBONE
    node-b (admin etc. on 127.0.2.1)   echo   prod/echo   127.0.20.1  HBONE
                                       plain  prod/plain  127.0.20.2  TCP
    service echo.prod.svc.cluster.local  VIP 127.0.30.1:80 -> echo:8080

Both agents get their certificates from one embedded CA directory, created once, so they
trust the same root. The app servers (echo on 127.0.20.1:8080 and 127.0.20.2:8080) run in
threads of the test process and remember every connection they accepted. Clients reach the
mesh through an agent's SOCKS5 listener with their socket bound to a workload IP first, as
the agent requires the source to be one of its local workloads.

Everything here stays on 127.0.0.0/8, every wait is bounded, and every process and socket
is closed on the way out.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ztagent.identity.ca import CertificateAuthority
from ztagent.model.policy import (
    Authorization,
    CidrMatch,
    Match,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)

T = TypeVar("T")

# --------------------------------------------------------------------------- the topology

TRUST_DOMAIN = "cluster.local"
NODE_A = "node-a"
NODE_B = "node-b"

SLEEP_IP = "127.0.10.1"
ECHO_IP = "127.0.20.1"
PLAIN_IP = "127.0.20.2"
ECHO_VIP = "127.0.30.1"
APP_PORT = 8080
VIP_PORT = 80

SLEEP_UID = "Kubernetes//Pod/test/sleep-0"
ECHO_UID = "Kubernetes//Pod/prod/echo-0"
PLAIN_UID = "Kubernetes//Pod/prod/plain-0"

SLEEP_ID = f"spiffe://{TRUST_DOMAIN}/ns/test/sa/sleep"
ECHO_ID = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/echo"
PLAIN_ID = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/plain"

ECHO_SERVICE = "echo.prod.svc.cluster.local"
ECHO_SERVICE_KEY = f"prod/{ECHO_SERVICE}"
BASE_POLICY_KEY = "prod/deny-9999"

SOCKS5_PORT = 15080
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
INBOUND_PORT = 15008
PLAINTEXT_PORT = 15006
OUTBOUND_PORT = 15001

AGENT_IPS = {NODE_A: "127.0.1.1", NODE_B: "127.0.2.1"}

READY_TIMEOUT = 20.0
CONFIG_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0

_AGENT_ENV = (
    "LOCAL_XDS_PATH",
    "NODE_NAME",
    "TRUST_DOMAIN",
    "CLUSTER_ID",
    "SECRET_TTL",
    "LOG_FORMAT",
    "XDS_ADDRESS",
    "CA_ADDRESS",
)


def workload(
    uid: str,
    name: str,
    namespace: str,
    service_account: str,
    ip: str,
    protocol: str,
    node: str,
    *,
    services: Mapping[str, Mapping[int, int]] | None = None,
    policies: Iterable[str] = (),
) -> dict[str, Any]:
    """One workload in ztunnel's local-config shape."""
    out: dict[str, Any] = {
        "uid": uid,
        "name": name,
        "namespace": namespace,
        "serviceAccount": service_account,
        "workloadIps": [ip],
        "protocol": protocol,
        "node": node,
        "network": "",
    }
    if services:
        out["services"] = {key: dict(ports) for key, ports in services.items()}
    if policies:
        out["authorizationPolicies"] = list(policies)
    return out


def base_config() -> dict[str, Any]:
    """The lab's config: sleep on node-a, echo and plain on node-b, echo's service, and one
    harmless policy (deny port 9999 in prod) so the policy list is never empty."""
    return {
        "workloads": [
            workload(SLEEP_UID, "sleep", "test", "sleep", SLEEP_IP, "HBONE", NODE_A),
            workload(
                ECHO_UID,
                "echo",
                "prod",
                "echo",
                ECHO_IP,
                "HBONE",
                NODE_B,
                services={ECHO_SERVICE_KEY: {VIP_PORT: APP_PORT}},
            ),
            workload(PLAIN_UID, "plain", "prod", "plain", PLAIN_IP, "TCP", NODE_B),
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "prod",
                "hostname": ECHO_SERVICE,
                "vips": [f"/{ECHO_VIP}"],
                "ports": {VIP_PORT: APP_PORT},
                "subjectAltNames": [ECHO_ID],
            }
        ],
        "policies": [
            {
                "name": "deny-9999",
                "namespace": "prod",
                "scope": "Namespace",
                "action": "Deny",
                "dryRun": False,
                "rules": [[[{"destinationPorts": [9999]}]]],
            }
        ],
    }


def with_policy(
    config: Mapping[str, Any], policy: Mapping[str, Any], *, listed_by: Iterable[str] = ()
) -> dict[str, Any]:
    """A copy of `config` with `policy` added and listed in the `authorizationPolicies` of the
    workloads whose uid is in `listed_by` (for WORKLOAD_SELECTOR policies)."""
    out = copy.deepcopy(dict(config))
    out.setdefault("policies", []).append(copy.deepcopy(dict(policy)))
    key = f"{policy['namespace']}/{policy['name']}"
    chosen = set(listed_by)
    for item in out["workloads"]:
        if item.get("uid") in chosen:
            item.setdefault("authorizationPolicies", []).append(key)
    return out


def _string_match_yaml(match: StringMatch) -> dict[str, Any]:
    if match.kind is StringMatchKind.PRESENCE:
        return {"Presence": []}
    name = {
        StringMatchKind.EXACT: "Exact",
        StringMatchKind.PREFIX: "Prefix",
        StringMatchKind.SUFFIX: "Suffix",
    }[match.kind]
    return {name: match.value}


def _match_yaml(match: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def strings(key: str, values: tuple[StringMatch, ...]) -> None:
        if values:
            out[key] = [_string_match_yaml(v) for v in values]

    def cidrs(key: str, values: tuple[CidrMatch, ...]) -> None:
        if values:
            out[key] = [str(v) for v in values]

    def ports(key: str, values: tuple[int, ...]) -> None:
        if values:
            out[key] = list(values)

    def accounts(key: str, values: tuple[ServiceAccountMatch, ...]) -> None:
        if values:
            out[key] = [
                {"namespace": v.namespace, "serviceAccount": v.service_account} for v in values
            ]

    strings("namespaces", match.namespaces)
    strings("notNamespaces", match.not_namespaces)
    strings("principals", match.principals)
    strings("notPrincipals", match.not_principals)
    cidrs("sourceIps", match.source_ips)
    cidrs("notSourceIps", match.not_source_ips)
    cidrs("destinationIps", match.destination_ips)
    cidrs("notDestinationIps", match.not_destination_ips)
    ports("destinationPorts", match.destination_ports)
    ports("notDestinationPorts", match.not_destination_ports)
    accounts("serviceAccounts", match.service_accounts)
    accounts("notServiceAccounts", match.not_service_accounts)
    return out


_SCOPE_YAML = {
    "GLOBAL": "Global",
    "NAMESPACE": "Namespace",
    "WORKLOAD_SELECTOR": "WorkloadSelector",
}
_ACTION_YAML = {"ALLOW": "Allow", "DENY": "Deny"}


def policy_yaml(policy: Authorization) -> dict[str, Any]:
    """An `Authorization` in ztunnel's local-config YAML shape (nested rule/clause lists)."""
    return {
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": _SCOPE_YAML[policy.scope.value],
        "action": _ACTION_YAML[policy.action.value],
        "dryRun": policy.dry_run,
        "rules": [
            [[_match_yaml(m) for m in clause.matches] for clause in rule.clauses]
            for rule in policy.rules
        ],
    }


def write_config(path: Path, config: Mapping[str, Any] | str) -> None:
    """Replace the file at once (write aside, then rename), so a watcher never reads half."""
    text = config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Expected:
    """What an agent's /config_dump shows once it has applied a (valid) config."""

    workloads: dict[str, tuple[str, ...]]
    """uid -> sorted authorization_policies."""
    services: frozenset[str]
    policies: frozenset[str]

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Expected:
        return cls(
            workloads={
                w["uid"]: tuple(sorted(w.get("authorizationPolicies") or ()))
                for w in config.get("workloads") or ()
            },
            services=frozenset(
                f"{s['namespace']}/{s['hostname']}" for s in config.get("services") or ()
            ),
            policies=frozenset(
                f"{p['namespace']}/{p['name']}" for p in config.get("policies") or ()
            ),
        )

    def shown_by(self, dump: Mapping[str, Any]) -> bool:
        workloads = {
            w["uid"]: tuple(sorted(w.get("authorization_policies") or ()))
            for w in dump.get("workloads") or ()
        }
        return (
            workloads == self.workloads
            and {s["key"] for s in dump.get("services") or ()} == self.services
            and {p["key"] for p in dump.get("policies") or ()} == self.policies
        )


# --------------------------------------------------------------------------- waiting


class Timeout(AssertionError):
    pass


def wait_for(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> T:
    """Call `check` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            result = None
            last_error = exc
        if result:
            return result
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:g}s waiting for {what}"
            if last_error is not None:
                message += f" (last error: {last_error!r})"
            if detail is not None:
                message += "\n" + detail()
            raise Timeout(message)
        time.sleep(interval)


# --------------------------------------------------------------------------- HTTP


def http_request(
    address: tuple[str, int], path: str, method: str = "GET", timeout: float = 5.0
) -> tuple[int, bytes]:
    """One request without any proxy from the environment; returns (status, body)."""
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def select_samples(samples: Iterable[Sample], name: str, **labels: str) -> list[Sample]:
    """Samples called `name` (e.g. `istio_tcp_connections_opened_total`) whose labels include
    every `labels` item."""
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def metric_sum(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in select_samples(samples, name, **labels))


# --------------------------------------------------------------------------- agents


def ztagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztagent", *args]


def _listening(pid: int, address: tuple[str, int]) -> bool:
    with contextlib.suppress(psutil.Error):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if (
                conn.status == psutil.CONN_LISTEN
                and conn.laddr.port == address[1]
                and conn.laddr.ip in (address[0], "0.0.0.0", "::")
            ):
                return True
    return False


@dataclass
class Agent:
    """One running `ztagent node`; its addresses, its stderr file, and readers for them."""

    node: str
    ip: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    config_path: Path

    @property
    def socks5(self) -> tuple[str, int]:
        return (self.ip, SOCKS5_PORT)

    @property
    def admin(self) -> tuple[str, int]:
        return (self.ip, ADMIN_PORT)

    @property
    def metrics_address(self) -> tuple[str, int]:
        return (self.ip, METRICS_PORT)

    @property
    def readiness(self) -> tuple[str, int]:
        return (self.ip, READINESS_PORT)

    # -- logs

    def log(self, since: int = 0) -> str:
        """stderr from byte offset `since`."""
        try:
            with self.stderr_path.open("rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_offset(self) -> int:
        try:
            return self.stderr_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log()
        return f"--- {self.node} stderr (last {chars} chars) ---\n{text[-chars:]}"

    def wait_log(self, *needles: str, since: int = 0, timeout: float = 5.0) -> str:
        """Wait for one line of stderr (after `since`) that contains every needle."""

        def find() -> str | None:
            for line in self.log(since).splitlines():
                if all(n in line for n in needles):
                    return line
            return None

        return wait_for(find, timeout, f"{self.node} to log {needles!r}", self.log_tail)

    def wait_log_text(self, *needles: str, since: int = 0, timeout: float = 5.0) -> str:
        """Wait until stderr (after `since`) contains every needle, anywhere."""

        def find() -> str | None:
            text = self.log(since)
            return text if all(n in text for n in needles) else None

        return wait_for(find, timeout, f"{self.node} to log {needles!r}", self.log_tail)

    # -- HTTP endpoints

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready_status(self) -> int:
        return http_request(self.readiness, "/healthz/ready")[0]

    def config_dump(self) -> dict[str, Any]:
        status, body = http_request(self.admin, "/config_dump")
        if status != 200:
            raise AssertionError(f"{self.node} /config_dump answered {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def metrics_text(self) -> str:
        status, body = http_request(self.metrics_address, "/metrics")
        if status != 200:
            raise AssertionError(f"{self.node} /metrics answered {status}")
        return body.decode()

    def metrics(self) -> list[Sample]:
        return parse_metrics(self.metrics_text())

    # -- waits

    def wait_listening(self, address: tuple[str, int], timeout: float = READY_TIMEOUT) -> None:
        def check() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"{self.node} exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            return _listening(self.proc.pid, address)

        wait_for(check, timeout, f"{self.node} to listen on {address}", self.log_tail)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def check() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"{self.node} exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            return self.ready_status() == 200

        wait_for(check, timeout, f"{self.node} to be ready", self.log_tail, interval=0.1)

    def wait_config(self, expected: Expected, timeout: float = CONFIG_TIMEOUT) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            dump = self.config_dump()
            return dump if expected.shown_by(dump) else None

        return wait_for(check, timeout, f"{self.node} to apply the config", self.log_tail)

    def wait_samples(
        self, check: Callable[[list[Sample]], bool], what: str, timeout: float = 5.0
    ) -> list[Sample]:
        def probe() -> list[Sample] | None:
            samples = self.metrics()
            return samples if check(samples) else None

        return wait_for(probe, timeout, f"{self.node} metrics: {what}", self.log_tail)


def agent_command(node: str, ip: str, config_path: Path, ca_dir: Path, *extra: str) -> list[str]:
    return ztagent(
        "node",
        "--local-xds-path",
        str(config_path),
        "--node-name",
        node,
        "--ca-dir",
        str(ca_dir),
        "--inbound-addr",
        "workloads",
        "--inbound-plaintext-addr",
        "workloads",
        "--outbound-addr",
        "off",
        "--socks5-addr",
        f"{ip}:{SOCKS5_PORT}",
        "--admin-addr",
        f"{ip}:{ADMIN_PORT}",
        "--metrics-addr",
        f"{ip}:{METRICS_PORT}",
        "--readiness-addr",
        f"{ip}:{READINESS_PORT}",
        "--drain-timeout",
        "1",
        *extra,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL if it does not exit within `timeout`; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    return proc.returncode


@contextlib.contextmanager
def agent_process(
    node: str,
    ip: str,
    config_path: Path,
    ca_dir: Path,
    workdir: Path,
    *extra: str,
    wait_ready: bool = True,
) -> Iterator[Agent]:
    """Start `ztagent node` for `node` with every listener of its own on `ip`; wait until it
    is ready (or, with `wait_ready=False`, until its readiness port listens); stop it after."""
    env = {k: v for k, v in os.environ.items() if k not in _AGENT_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    stderr_path = workdir / f"{node}-{ip}.stderr"
    cmd = agent_command(node, ip, config_path, ca_dir, *extra)
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
    try:
        agent = Agent(node, ip, proc, stderr_path, config_path)
        if wait_ready:
            agent.wait_ready()
        else:
            agent.wait_listening(agent.readiness)
        yield agent
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- app servers


@dataclass
class AppConnection:
    """One connection an app server accepted: who it saw, what it echoed, whether it ended."""

    peer: tuple[str, int]
    local: tuple[str, int]
    sock: socket.socket
    received: int = 0
    closed: threading.Event = field(default_factory=threading.Event)
    close_reason: str = ""


class EchoServers:
    """Echo servers on several addresses, in threads; `connections` lists every accepted one."""

    def __init__(self, addresses: Iterable[tuple[str, int]]) -> None:
        self.addresses = list(addresses)
        self.connections: list[AppConnection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for address in self.addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
            self._listeners.append(sock)
            thread = threading.Thread(
                target=self._accept_loop, args=(sock,), daemon=True, name=f"accept {address}"
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for sock in self._listeners:
            sock.close()
        for conn in conns:
            conn.sock.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([listener], [], [], 0.1)
            if not readable:
                continue
            try:
                sock, peer = listener.accept()
            except OSError:
                continue
            conn = AppConnection(peer=(peer[0], peer[1]), local=sock.getsockname()[:2], sock=sock)
            with self._lock:
                self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: AppConnection) -> None:
        sock = conn.sock
        sock.settimeout(0.2)
        reason = "eof"
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(262144)
                except TimeoutError:
                    continue
                if not data:
                    break
                conn.received += len(data)
                sock.sendall(data)
            else:
                reason = "stopped"
        except OSError as exc:
            reason = repr(exc)
        finally:
            conn.close_reason = reason
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            conn.closed.set()

    def accepted(self, local: tuple[str, int] | None = None) -> list[AppConnection]:
        with self._lock:
            conns = list(self.connections)
        return [c for c in conns if local is None or c.local == local]

    def count(self, local: tuple[str, int] | None = None) -> int:
        return len(self.accepted(local))


@contextlib.contextmanager
def echo_servers(addresses: Iterable[tuple[str, int]]) -> Iterator[EchoServers]:
    servers = EchoServers(addresses)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


# --------------------------------------------------------------------------- SOCKS5


class Socks5Error(Exception):
    """The proxy broke the protocol or closed before answering."""


class Socks5Refused(Socks5Error):
    """The proxy answered CONNECT with a non-zero reply code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 CONNECT refused with reply 0x{code:02x}")
        self.code = code


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise Socks5Error(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def socks5_connect(
    proxy: tuple[str, int],
    source_ip: str,
    dest: tuple[str, int],
    timeout: float = 10.0,
) -> socket.socket:
    """CONNECT to `dest` through the SOCKS5 proxy from a socket bound to `source_ip`.

    Returns the connected socket (blocking, with `timeout`); raises `Socks5Refused` on a
    non-zero reply and `Socks5Error` on anything else that is not a success.
    """
    ip = ipaddress.ip_address(dest[0])
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source_ip, 0))
        sock.connect(proxy)
        sock.sendall(b"\x05\x01\x00")
        method = recv_exact(sock, 2)
        if method != b"\x05\x00":
            raise Socks5Error(f"unexpected method selection {method!r}")
        atyp = b"\x01" if ip.version == 4 else b"\x04"
        sock.sendall(b"\x05\x01\x00" + atyp + ip.packed + struct.pack("!H", dest[1]))
        head = recv_exact(sock, 4)
        if head[0] != 5:
            raise Socks5Error(f"unexpected reply {head!r}")
        if head[1] != 0:
            raise Socks5Refused(head[1])
        if head[3] == 1:
            recv_exact(sock, 4 + 2)
        elif head[3] == 4:
            recv_exact(sock, 16 + 2)
        elif head[3] == 3:
            recv_exact(sock, recv_exact(sock, 1)[0] + 2)
        else:
            raise Socks5Error(f"unexpected address type in reply {head!r}")
        return sock
    except BaseException:
        sock.close()
        raise


# --------------------------------------------------------------------------- data helpers


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def echo_exchange(sock: socket.socket, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send `payload` (from a thread) while reading the same number of bytes back."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(received) < len(payload):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"echoed {len(received)} of {len(payload)} bytes in {timeout}s")
            sock.settimeout(left)
            chunk = sock.recv(min(262144, len(payload) - len(received)))
            if not chunk:
                raise AssertionError(
                    f"connection closed after {len(received)} of {len(payload)} echoed bytes"
                )
            received += chunk
    finally:
        sender.join(timeout)
    if errors:
        raise errors[0]
    return bytes(received)


def closed_by_peer(sock: socket.socket, timeout: float) -> str | None:
    """Wait up to `timeout` for the peer to close `sock`: "eof", "reset", or None if open.
    Data that still arrives is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return "reset"
        if not data:
            return "eof"


# --------------------------------------------------------------------------- the lab

LOCK_PATH = Path(tempfile.gettempdir()) / "ztagent-nodelab.lock"
LOCK_TIMEOUT = 600.0


@contextlib.contextmanager
def exclusive(timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the host-wide lab lock: the lab's addresses are fixed, so two test runs at once
    would take each other's ports. Waits at most `timeout` seconds for another run."""
    with LOCK_PATH.open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Timeout(f"another node lab held {LOCK_PATH} for {timeout:g}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Lab:
    workdir: Path
    config_path: Path
    ca_dir: Path
    a: Agent
    b: Agent
    apps: EchoServers
    config: dict[str, Any]

    @property
    def agents(self) -> tuple[Agent, Agent]:
        return (self.a, self.b)

    def diagnostics(self) -> str:
        return "\n".join(agent.log_tail() for agent in self.agents)

    def apply(self, config: Mapping[str, Any], timeout: float = CONFIG_TIMEOUT) -> None:
        """Write `config` (valid) to the shared file and wait until both agents show it."""
        self.config = copy.deepcopy(dict(config))
        write_config(self.config_path, self.config)
        expected = Expected.of(self.config)
        for agent in self.agents:
            agent.wait_config(expected, timeout)

    def write(self, config: Mapping[str, Any] | str) -> None:
        """Write the shared file without waiting for the agents."""
        self.config = copy.deepcopy(dict(config)) if not isinstance(config, str) else {}
        write_config(self.config_path, config)

    def restore(self) -> None:
        """Back to the base config, if anything else is in the file."""
        base = base_config()
        if self.config != base or not all(
            Expected.of(base).shown_by(agent.config_dump()) for agent in self.agents
        ):
            self.apply(base)

    def connect(
        self, dest: tuple[str, int], source_ip: str = SLEEP_IP, timeout: float = 10.0
    ) -> socket.socket:
        """A SOCKS5 connection through node-a from `source_ip` (sleep by default)."""
        return socks5_connect(self.a.socks5, source_ip, dest, timeout)


@contextlib.contextmanager
def node_lab(workdir: Path) -> Iterator[Lab]:
    """App servers, the shared CA and config, and both agents, ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca_dir = workdir / "ca"
    CertificateAuthority.create(ca_dir, TRUST_DOMAIN)
    config_path = workdir / "local-config.yaml"
    config = base_config()
    write_config(config_path, config)
    with (
        echo_servers([(ECHO_IP, APP_PORT), (PLAIN_IP, APP_PORT)]) as apps,
        agent_process(NODE_A, AGENT_IPS[NODE_A], config_path, ca_dir, workdir) as a,
        agent_process(NODE_B, AGENT_IPS[NODE_B], config_path, ca_dir, workdir) as b,
    ):
        lab = Lab(workdir, config_path, ca_dir, a, b, apps, config)
        expected = Expected.of(config)
        for agent in lab.agents:
            agent.wait_config(expected)
        # Inbound listeners on the workload IPs are up once node-b is ready; check anyway so a
        # first test does not race them.
        b.wait_listening((ECHO_IP, INBOUND_PORT))
        yield lab
