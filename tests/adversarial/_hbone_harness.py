"""What the HBONE and SOCKS5 adversarial tests share: a PKI, a real `ztagent hbone serve`
process, a raw HTTP/2-over-mTLS peer that writes whatever frames it likes, a well-behaved
client that times one tunnel end to end, and the server process's RSS and descriptors."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from ztagent.hbone.events import ResponseReceived
from ztagent.hbone.frames import Flag, FrameType, pack_frame
from ztagent.hbone.headers import encode_headers
from ztagent.hbone.session import HboneSession, Role
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.spiffe import Identity

SERVER_ID = "spiffe://cluster.local/ns/prod/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/test/sa/client"


@dataclass
class Creds:
    cert: Path
    key: Path
    roots: Path

    def flags(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key), "--ca", str(self.roots)]

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.load_verify_locations(cafile=str(self.roots))
        context.load_cert_chain(str(self.cert), str(self.key))
        context.set_alpn_protocols(["h2"])
        return context


@dataclass
class Pki:
    server: Creds
    client: Creds


def make_pki(base: Path) -> Pki:
    ca = CertificateAuthority.create(base / "ca", "cluster.local")

    def issue(identity: str, name: str) -> Creds:
        cert = ca.issue(Identity.parse(identity))
        where = base / name
        creds = Creds(
            where.with_suffix(".pem"), where.with_suffix(".key"), where.with_suffix(".roots")
        )
        cert.write(creds.cert, creds.key, creds.roots)
        return creds

    return Pki(issue(SERVER_ID, "server"), issue(CLIENT_ID, "client"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> None:
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


@contextlib.contextmanager
def hbone_serve(pki: Pki) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`ztagent hbone serve` on a free loopback port; stopped (killed if need be) after."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "ztagent",
        "hbone",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        *pki.server.flags(),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, port)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def fds(pid: int) -> int:
    return int(psutil.Process(pid).num_fds())


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


class RawPeer:
    """An mTLS HTTP/2 peer that writes any bytes; the session only parses what comes back."""

    def __init__(
        self, pki: Pki, port: int, timeout: float = 5.0, rcvbuf: int | None = None
    ) -> None:
        raw = socket.socket()
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        self.sock = pki.client.client_context().wrap_socket(raw)
        self._buffer = b""
        session = HboneSession(Role.CLIENT)
        session.initiate()  # the preface, SETTINGS and the connection window
        self.sock.sendall(b"".join(bytes(c) for c in session.data_to_send()))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.send(pack_frame(ftype, flags, sid, payload))

    def wait_for(
        self, ftypes: tuple[int, ...], timeout: float = 5.0
    ) -> tuple[int, int, int, bytes] | None:
        """Read until a frame of one of `ftypes`: (type, flags, stream, payload); None if
        the connection ends or time runs out first. (Frames are parsed here, not by a
        session: the raw peer's streams are unknown to one.)"""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            while len(self._buffer) >= 9:
                word, flags, sid = struct.unpack(">IBI", self._buffer[:9])
                length, ftype = word >> 8, word & 0xFF
                if len(self._buffer) < 9 + length:
                    break
                payload = self._buffer[9 : 9 + length]
                self._buffer = self._buffer[9 + length :]
                if ftype in ftypes:
                    return ftype, flags, sid, payload
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return None
            if not data:
                return None
            self._buffer += data
        return None

    def goaway_code(self, timeout: float = 5.0) -> int | None:
        """Read until GOAWAY; its error code, or None without one."""
        frame = self.wait_for((FrameType.GOAWAY,), timeout)
        return None if frame is None else int(struct.unpack(">I", frame[3][4:8])[0])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def good_tunnel(pki: Pki, port: int, echo_port: int, timeout: float = 10.0) -> float:
    """Handshake, CONNECT to the echo server, one echoed message: the seconds it took."""
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with pki.client.client_context().wrap_socket(raw) as sock:
        session = HboneSession(Role.CLIENT)
        session.initiate()
        sid = session.open_stream(f"127.0.0.1:{echo_port}")
        session.send_data(sid, b"hello")
        sock.sendall(b"".join(bytes(c) for c in session.data_to_send()))
        status = 0
        echoed = b""
        while echoed != b"hello":
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed (status {status}, echoed {echoed!r})")
            for event in session.receive_data(data, time.monotonic()):
                if isinstance(event, ResponseReceived):
                    status = event.status
                    assert status == 200, status
                elif hasattr(event, "data") and getattr(event, "stream_id", 0) == sid:
                    echoed += bytes(event.data)
            out = session.data_to_send()
            if out:
                sock.sendall(b"".join(bytes(c) for c in out))
    return time.monotonic() - started


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port whose connects hang: a listener with a full backlog that never
    accepts (the kernel drops further SYNs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        yield port
    finally:
        filler.close()
        listener.close()


def connect_headers(sid: int, authority: str) -> bytes:
    """A HEADERS frame (END_HEADERS) opening a CONNECT to `authority` on stream `sid`."""
    block = encode_headers([(":method", "CONNECT"), (":authority", authority)])
    return pack_frame(FrameType.HEADERS, Flag.END_HEADERS, sid, block)


def rst_stream(sid: int, code: int = 8) -> bytes:
    return pack_frame(FrameType.RST_STREAM, 0, sid, struct.pack(">I", code))
