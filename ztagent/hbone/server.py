"""The HBONE server: accepts mTLS connections and decides each CONNECT through a hook.

The hook (`Decide`) sees who is asking (verified SPIFFE identity), for what (`:authority`, the
address the caller dialed, the request headers), and answers with one outcome: `Allow` (connect
the tunnel to an address, with which socket mark and source address), `Serve` (the tunnel ends
in this process: a `LegHandler` gives its app leg a transport) or `Deny` (the HTTP status).
The node agent plugs its workload lookup and L4 authorization in here; `ztagent hbone serve`
allows every authority.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ztagent.errors import LocalError, RemoteError
from ztagent.hbone.connection import ConnectionInfo, HboneConnection, TcpLeg
from ztagent.hbone.events import ConnectRequest, Headers
from ztagent.hbone.frames import Settings, parse_authority
from ztagent.hbone.session import HboneSession, Role
from ztagent.hbone.tls import TlsConfig
from ztagent.hbone.transport import TlsStream, TlsTransport, connect_socket, make_socket
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
ACCEPTS_PER_CALLBACK = 64


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """One CONNECT, as the hook sees it."""

    stream_id: int
    authority: str
    target: tuple[str, int]
    headers: Headers
    peer_identity: Identity
    local_address: tuple[str, int]
    peer_address: tuple[str, int]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def forwarded_client_ip(self) -> str | None:
        """The client IP in `forwarded: for="ip:port"`, as ztunnel sends it (None if absent or
        not an address: the connection's own peer address stands for the client then)."""
        for part in (self.header("forwarded") or "").split(";"):
            key, _, item = part.strip().partition("=")
            if key.lower() == "for":
                item = item.strip('"')
                try:
                    return parse_authority(item)[0]
                except ValueError:
                    with contextlib.suppress(ValueError):
                        return str(ipaddress.ip_address(item.strip("[]")))
        return None


# Given a tunnel's app leg as soon as it exists.
LegHandler = Callable[[TcpLeg], None]


@dataclass(frozen=True, slots=True)
class Allow:
    """Connect the tunnel to `address`; answered 200 once connected, 503 if that fails."""

    address: tuple[str, int]
    mark: int | None = None
    source_ip: str | None = None
    # Called with the app leg before connecting, so the owner can set `leg.on_done` and
    # keep track of the tunnel.
    on_leg: LegHandler | None = None


@dataclass(frozen=True, slots=True)
class Serve:
    """End the tunnel in this process: `handler` gives the app leg its transport (calls its
    `connection_made`) before it returns; the tunnel is then answered 200 at once, or 503
    if the handler raised."""

    handler: LegHandler


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str = ""


Decision = Allow | Serve | Deny
Decide = Callable[[InboundRequest], Decision]


def allow_authority(request: InboundRequest) -> Allow:
    """Connect every CONNECT to its `:authority` (the `ztagent hbone serve` policy)."""
    return Allow(request.target)


async def connect_leg(
    loop: asyncio.AbstractEventLoop, leg: TcpLeg, allow: Allow, timeout: float = CONNECT_TIMEOUT
) -> None:
    """Open the plaintext TCP connection of a tunnel and bind it to `leg`."""
    sock = make_socket(allow.address, allow.mark, allow.source_ip)
    try:
        await connect_socket(loop, sock, allow.address, timeout)
        await loop.create_connection(lambda: leg, sock=sock)
    except BaseException:
        sock.close()
        raise


class HboneServer:
    def __init__(
        self,
        tls: TlsConfig | Callable[[tuple[str, int]], TlsConfig | None],
        decide: Decide = allow_authority,
        settings: Settings | None = None,
    ) -> None:
        self._tls_for = tls if callable(tls) else (lambda _addr: tls)
        self.decide = decide
        self.settings = settings or Settings()
        self.connections: set[HboneConnection] = set()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------- listening

    async def listen(
        self, host: str, port: int, transparent: bool = False, reuse_port: bool = False
    ) -> tuple[str, int]:
        """Listen on `host:port`; `reuse_port` shares the port with a successor agent's
        listener (SO_REUSEPORT) for a hitless upgrade."""
        loop = self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if transparent:
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise LocalError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self._listeners.append(sock)
        loop.add_reader(sock.fileno(), self._on_accept, sock)
        address = sock.getsockname()
        return address[0], address[1]

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_CALLBACK):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._accept(sock))

    def _spawn(self, coro: object) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, raw: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            local = raw.getsockname()[:2]
            peer = raw.getpeername()[:2]
        except OSError:
            raw.close()
            return
        tls = self._tls_for(local)
        if tls is None:
            log.info("HBONE from %s:%s to %s:%s refused: no certificate for it", *peer, *local)
            raw.close()
            return
        stream = TlsStream(raw, tls.server_context, server_side=True)
        try:
            await asyncio.wait_for(stream.handshake(loop), HANDSHAKE_TIMEOUT)
            identity = tls.check_client(stream.obj)
        except (OSError, ssl.SSLError, RemoteError, TimeoutError) as exc:
            log.info("HBONE handshake from %s:%s failed: %s", peer[0], peer[1], _reason(exc))
            with contextlib.suppress(ssl.SSLError, OSError):
                stream.obj.unwrap()  # best effort: tell the peer (an alert) before closing
            with contextlib.suppress(OSError):
                raw.send(stream.outgoing.read())
            stream.close()
            return
        session = HboneSession(Role.SERVER, self.settings, loop.time())
        conn = HboneConnection(
            loop,
            session,
            ConnectionInfo(identity, local, peer),
            on_request=self._on_request,
            on_closed=self.connections.discard,
        )
        self.connections.add(conn)
        conn.start(TlsTransport(loop, stream, conn))

    # ------------------------------------------------------------------- requests

    def _on_request(self, conn: HboneConnection, event: ConnectRequest) -> None:
        sid = event.stream_id
        if event.method != "CONNECT":
            conn.session.respond(sid, 400)
            return
        try:
            target = parse_authority(event.authority)
        except ValueError as exc:
            log.info("HBONE from %s: %s", conn.info.peer_identity, exc)
            conn.session.respond(sid, 400)
            return
        request = InboundRequest(
            sid,
            event.authority,
            target,
            event.headers,
            conn.info.peer_identity,
            conn.info.local_address,
            conn.info.peer_address,
        )
        try:
            decision = self.decide(request)
        except Exception:
            log.exception("CONNECT decision failed; refusing %s", event.authority)
            decision = Deny(503, "internal error")
        if isinstance(decision, Deny):
            log.info(
                "HBONE %s from %s refused %d %s",
                event.authority,
                conn.info.peer_identity,
                decision.status,
                decision.reason,
            )
            conn.session.respond(sid, decision.status)
            return
        leg = TcpLeg()
        conn.attach(leg, sid)
        if isinstance(decision, Allow):
            if decision.on_leg is not None:
                decision.on_leg(leg)
            self._spawn(self._connect(conn, leg, decision))
            return
        try:
            decision.handler(leg)
        except Exception:
            log.exception("serving %s in-process failed", event.authority)
            conn.refuse(leg, 503, "internal error")
            return
        conn.accept(leg)

    async def _connect(self, conn: HboneConnection, leg: TcpLeg, allow: Allow) -> None:
        loop = asyncio.get_running_loop()
        try:
            await connect_leg(loop, leg, allow)
        except Exception as exc:
            if isinstance(exc, OSError | TimeoutError):
                log.info("HBONE upstream %s:%s failed: %s", *allow.address, _reason(exc))
            else:
                log.exception("HBONE upstream %s:%s failed", *allow.address)
            if leg.conn is conn:
                conn.refuse(leg, 503, f"upstream connect failed: {_reason(exc)}")
            return
        if leg.conn is not conn or conn.closed:
            leg.abort()
            return
        conn.accept(leg)

    # ------------------------------------------------------------------- shutdown

    def unlisten(self, host: str, port: int) -> None:
        """Stop listening on one address (a local workload left); its tunnels go on."""
        for sock in list(self._listeners):
            if sock.getsockname()[:2] == (host, port):
                if self._loop is not None:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
                self._listeners.remove(sock)

    def stop_listening(self) -> None:
        for sock in self._listeners:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()

    async def drain(self, timeout: float = 5.0) -> None:
        """Stop accepting, GOAWAY every connection, wait for open tunnels (bounded)."""
        self.stop_listening()
        for conn in list(self.connections):
            conn.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.close()

    def close(self) -> None:
        self.stop_listening()
        for conn in list(self.connections):
            conn.close()
        for task in list(self._tasks):
            task.cancel()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
