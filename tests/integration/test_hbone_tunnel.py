"""HBONE end to end on loopback: real `ztagent hbone` processes, real TLS, real HTTP/2.

The app servers here (echo, sha256 sink) run in threads of the test; the tunnel ends are
separate processes started from the command line, exactly as a user would run them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.certs import load_pem_certs
from ztagent.identity.keys import load_key
from ztagent.identity.spiffe import Identity

pytestmark = pytest.mark.integration

SERVER_ID = "spiffe://cluster.local/ns/prod/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/test/sa/client"
OPENSSL = shutil.which("openssl")


# ------------------------------------------------------------------------ fixtures


@dataclass
class Creds:
    cert: Path
    key: Path
    roots: Path

    def flags(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key), "--ca", str(self.roots)]


def _issue(ca: CertificateAuthority, identity: str, where: Path) -> Creds:
    cert = ca.issue(Identity.parse(identity))
    creds = Creds(where.with_suffix(".pem"), where.with_suffix(".key"), where.with_suffix(".roots"))
    cert.write(creds.cert, creds.key, creds.roots)
    return creds


@dataclass
class Pki:
    server: Creds
    client: Creds
    foreign_client: Creds  # another root
    other_domain_client: Creds  # same root, trust domain other.local
    ca: CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(base / "ca", "cluster.local")
    other_root = CertificateAuthority.create(base / "ca2", "cluster.local")
    # The same root signing for another trust domain (the CA itself refuses to: build one).
    other_domain = CertificateAuthority(
        ca.signing_cert,
        load_key((base / "ca" / "ca-key.pem").read_bytes()),
        [],
        load_pem_certs(ca.roots_pem),
        trust_domain="other.local",
    )
    return Pki(
        server=_issue(ca, SERVER_ID, base / "server"),
        client=_issue(ca, CLIENT_ID, base / "client"),
        foreign_client=_issue(other_root, CLIENT_ID, base / "foreign"),
        other_domain_client=_issue(
            other_domain, "spiffe://other.local/ns/test/sa/client", base / "otherdomain"
        ),
        ca=ca,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Wait for `proc` to listen on `port` (asked of the kernel: a probe connection would
    itself open a tunnel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"process exited: {err}")
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def ztagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztagent", *args]


@contextlib.contextmanager
def running(cmd: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(262144):
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads to EOF, answers `<length> <sha256>`."""

    def handle(self) -> None:
        digest = hashlib.sha256()
        total = 0
        while data := self.request.recv(1 << 20):
            digest.update(data)
            total += len(data)
        self.request.sendall(f"{total} {digest.hexdigest()}".encode())


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


@contextlib.contextmanager
def app_server(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sink_port() -> Iterator[int]:
    with app_server(_Sink) as port:
        yield port


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with app_server(_Echo) as port:
        yield port


@pytest.fixture(scope="module")
def hbone_server(pki: Pki) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    cmd = ztagent("hbone", "serve", "--listen", f"127.0.0.1:{port}", *pki.server.flags())
    with running(cmd, port) as proc:
        yield port, proc


@contextlib.contextmanager
def forwarder(
    pki: Pki, hbone_port: int, target: int, *extra: str
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    cmd = ztagent(
        "hbone",
        "connect",
        "--via",
        f"127.0.0.1:{hbone_port}",
        "--target",
        f"127.0.0.1:{target}",
        "--listen",
        f"127.0.0.1:{port}",
        *pki.client.flags(),
        *extra,
    )
    with running(cmd, port) as proc:
        yield port, proc


def send_and_hash(port: int, payload_size: int, seed: int = 0) -> None:
    """Send `payload_size` pseudo-random bytes through the tunnel; the sink's answer must match."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        left = payload_size
        while left:
            chunk = block[: min(left, len(block))]
            sock.sendall(chunk)
            digest.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(4096):
            answer += data
    assert answer.decode() == f"{payload_size} {digest.hexdigest()}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("size", [1, 1 << 20, 256 << 20], ids=["1B", "1MiB", "256MiB"])
def test_data_integrity(
    pki: Pki, hbone_server: tuple[int, object], sink_port: int, size: int
) -> None:
    with forwarder(pki, hbone_server[0], sink_port) as (port, _):
        send_and_hash(port, size)


def _hbone_connections(proc: subprocess.Popen[bytes], server_port: int) -> int:
    conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    return sum(
        1 for c in conns if c.raddr and c.raddr.port == server_port and c.status == "ESTABLISHED"
    )


@pytest.mark.parametrize(("max_streams", "connections"), [("200", 1), ("100", 2)])
def test_200_concurrent_streams_over_pooled_connections(
    pki: Pki, hbone_server: tuple[int, object], sink_port: int, max_streams: str, connections: int
) -> None:
    server_port = hbone_server[0]
    with forwarder(pki, server_port, sink_port, "--max-streams", max_streams) as (port, proc):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(200)]
        try:
            payloads = [os.urandom(32 * 1024 + i) for i in range(200)]

            def run(i: int) -> None:
                sock = socks[i]
                sock.sendall(payloads[i])
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while data := sock.recv(4096):
                    answer += data
                expected = f"{len(payloads[i])} {hashlib.sha256(payloads[i]).hexdigest()}"
                assert answer.decode() == expected

            # All 200 connections are open (and tunnelled) before any finishes.
            deadline = time.monotonic() + 20
            while (
                _hbone_connections(proc, server_port) < connections and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            with ThreadPoolExecutor(max_workers=200) as pool:
                list(pool.map(run, range(200)))
            assert _hbone_connections(proc, server_port) == connections
        finally:
            for sock in socks:
                sock.close()


def test_stdio_tunnel(pki: Pki, hbone_server: tuple[int, object], echo_port: int) -> None:
    payload = os.urandom(300_000)
    result = subprocess.run(
        ztagent(
            "hbone",
            "connect",
            "--via",
            f"127.0.0.1:{hbone_server[0]}",
            "--target",
            f"127.0.0.1:{echo_port}",
            "--expect-identity",
            SERVER_ID,
            *pki.client.flags(),
        ),
        input=payload,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload
    assert SERVER_ID.encode() in result.stderr


def _connect_stdio(
    pki_flags: list[str], hbone_port: int, target: int, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ztagent(
            "hbone",
            "connect",
            "--via",
            f"127.0.0.1:{hbone_port}",
            "--target",
            f"127.0.0.1:{target}",
            *pki_flags,
            *extra,
        ),
        input=b"hello",
        capture_output=True,
        timeout=60,
    )


def _one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode != 0
    lines = [
        line for line in result.stderr.decode().splitlines() if line.startswith("ztagent: error:")
    ]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr.decode()
    return lines[0]


def test_wrong_server_identity_is_refused(
    pki: Pki, hbone_server: tuple[int, object], echo_port: int
) -> None:
    result = _connect_stdio(
        pki.client.flags(),
        hbone_server[0],
        echo_port,
        "--expect-identity",
        "spiffe://cluster.local/ns/prod/sa/other",
    )
    assert "is not the expected one" in _one_error_line(result)


def test_server_from_another_root_is_refused(
    pki: Pki, hbone_server: tuple[int, object], echo_port: int
) -> None:
    flags = [
        "--cert",
        str(pki.client.cert),
        "--key",
        str(pki.client.key),
        "--ca",
        str(pki.foreign_client.roots),
    ]
    result = _connect_stdio(flags, hbone_server[0], echo_port)
    assert "CERTIFICATE_VERIFY_FAILED" in _one_error_line(result)


@pytest.mark.parametrize("who", ["foreign_client", "other_domain_client"])
def test_clients_the_server_does_not_trust_are_refused(pki: Pki, echo_port: int, who: str) -> None:
    port = free_port()
    cmd = ztagent("hbone", "serve", "--listen", f"127.0.0.1:{port}", *pki.server.flags())
    with running(cmd, port) as server:
        creds: Creds = getattr(pki, who)
        flags = ["--cert", str(creds.cert), "--key", str(creds.key), "--ca", str(pki.server.roots)]
        result = _connect_stdio(flags, port, echo_port)
        _one_error_line(result)
        assert result.stdout == b""
        server.terminate()
        log = server.stderr.read().decode() if server.stderr else ""
    reason = "not in trust domain cluster.local" if who == "other_domain_client" else "failed"
    assert "handshake" in log and reason in log


def test_refused_connect_is_an_error(pki: Pki, hbone_server: tuple[int, object]) -> None:
    closed = free_port()  # nothing listens there: the server answers 503
    result = _connect_stdio(pki.client.flags(), hbone_server[0], closed)
    assert "refused with 503" in _one_error_line(result)


def test_bad_certificate_file_is_one_clear_line(
    pki: Pki, tmp_path: Path, hbone_server: tuple[int, object]
) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    flags = ["--cert", str(bogus), "--key", str(pki.client.key), "--ca", str(pki.client.roots)]
    result = _connect_stdio(flags, hbone_server[0], 1)
    assert str(bogus) in _one_error_line(result)


# ------------------------------------------------------------- openssl interop


def _s_client(port: int, *extra: str, hold: float = 0.0) -> subprocess.CompletedProcess[str]:
    """Run `openssl s_client`; `hold` keeps its stdin open so it reads what the server says
    after the handshake (in TLS 1.3 a client-certificate refusal arrives then)."""
    assert OPENSSL
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", "h2", *extra]
    # s_client prints what the server sends after the handshake (HTTP/2 SETTINGS): binary,
    # not always valid UTF-8.
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    try:
        time.sleep(hold)
        out, err = proc.communicate("", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_openssl_s_client_handshakes_with_alpn_h2(
    pki: Pki, hbone_server: tuple[int, object]
) -> None:
    result = _s_client(
        hbone_server[0],
        "-cert",
        str(pki.client.cert),
        "-key",
        str(pki.client.key),
        "-CAfile",
        str(pki.client.roots),
        "-verify_return_error",
    )
    out = result.stdout + result.stderr
    assert "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384" in out
    assert "ALPN protocol: h2" in out
    assert "Verify return code: 0 (ok)" in out


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_tls12_is_refused(pki: Pki, hbone_server: tuple[int, object]) -> None:
    result = _s_client(
        hbone_server[0],
        "-tls1_2",
        "-cert",
        str(pki.client.cert),
        "-key",
        str(pki.client.key),
        "-CAfile",
        str(pki.client.roots),
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "protocol version" in out or "no protocols available" in out


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_client_without_certificate_is_refused(pki: Pki) -> None:
    port = free_port()
    cmd = ztagent("hbone", "serve", "--listen", f"127.0.0.1:{port}", *pki.server.flags())
    with running(cmd, port) as server:
        result = _s_client(port, "-CAfile", str(pki.client.roots), hold=1.0)
        out = result.stdout + result.stderr
        assert "alert certificate required" in out
        server.terminate()
        log = server.stderr.read().decode() if server.stderr else ""
    assert "handshake" in log and "failed" in log
