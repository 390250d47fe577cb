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

from ztagent.errors import RemoteError
from ztagent.hbone.connection import ConnectionInfo, HboneConnection, TcpLeg
from ztagent.hbone.events import ConnectRequest, Headers
from ztagent.hbone.frames import Settings, parse_authority
from ztagent.hbone.listen import listening_socket
from ztagent.hbone.logbudget import LogBudget
from ztagent.hbone.session import HboneSession, Role
from ztagent.hbone.tls import TlsConfig
from ztagent.hbone.transport import (
    TlsStream,
    TlsTransport,
    connect_socket,
    make_socket,
    wait_readable,
)
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# A TLS handshake must finish within this (ztunnel and Envoy's `transport_socket_connect_
# timeout` bound it the same way)...
HANDSHAKE_TIMEOUT = 10.0
# ...and within less as pending handshakes pile up: from half the cap on, the timeout shrinks
# linearly to MIN_HANDSHAKE_TIMEOUT at the cap (Envoy's overload manager `reduce_timeouts`
# scales `TRANSPORT_SOCKET_CONNECT` between a minimum and the configured value the same way).
MIN_HANDSHAKE_TIMEOUT = 1.0
# Connections accepted whose handshake is not done, at most (Envoy's listener
# `max_connections` / `global_downstream_max_connections`, which have no default: sized to the
# listen backlog). At the cap the oldest pending one is closed to admit the new one, so a
# flood of silent connections cannot lock good clients out.
MAX_PENDING_HANDSHAKES = 1024
ACCEPTS_PER_CALLBACK = 64


def handshake_timeout(pending: int, cap: int = MAX_PENDING_HANDSHAKES) -> float:
    """The handshake timeout for a connection accepted while `pending` others wait."""
    half = cap / 2
    if pending <= half:
        return HANDSHAKE_TIMEOUT
    load = min(1.0, (pending - half) / half)
    return HANDSHAKE_TIMEOUT - load * (HANDSHAKE_TIMEOUT - MIN_HANDSHAKE_TIMEOUT)


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
        # Handshakes under way, oldest first (the one closed when the cap is reached).
        self._handshaking: dict[asyncio.Task[None], None] = {}
        self.max_pending_handshakes = MAX_PENDING_HANDSHAKES
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshake_log = LogBudget(log, "failed HBONE handshakes")
        self._request_log = LogBudget(log, "refused HBONE requests")
        self._upstream_log = LogBudget(log, "failed HBONE upstream connects")

    # ------------------------------------------------------------------- listening

    async def listen(
        self, host: str, port: int, transparent: bool = False, reuse_port: bool = False
    ) -> tuple[str, int]:
        """Listen on `host:port`; `reuse_port` shares the port with a successor agent's
        listener (SO_REUSEPORT) for a hitless upgrade."""
        loop = self._loop = asyncio.get_running_loop()
        sock = listening_socket((host, port), transparent=transparent, reuse_port=reuse_port)
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
            pending = self._handshaking
            while len(pending) >= self.max_pending_handshakes:
                oldest = next(iter(pending))
                del pending[oldest]
                oldest.cancel()
            timeout = handshake_timeout(len(pending), self.max_pending_handshakes)
            task = self._spawn(self._accept(sock, timeout))
            pending[task] = None
            task.add_done_callback(self._handshake_over)

    def _handshake_over(self, task: asyncio.Task[None]) -> None:
        self._handshaking.pop(task, None)

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, raw: socket.socket, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            local = raw.getsockname()[:2]
            peer = raw.getpeername()[:2]
        except OSError:
            raw.close()
            return
        tls = self._tls_for(local)
        if tls is None:
            if self._handshake_log.allow(loop.time()):
                log.info("HBONE from %s:%s to %s:%s refused: no certificate", *peer, *local)
            raw.close()
            return
        deadline = loop.time() + timeout
        stream: TlsStream | None = None
        try:
            # No TLS state until the client speaks: a silent connection costs a socket only.
            await asyncio.wait_for(wait_readable(loop, raw), timeout)
            stream = TlsStream(raw, tls.server_context, server_side=True)
            await asyncio.wait_for(stream.handshake(loop), max(0.0, deadline - loop.time()))
            identity = tls.check_client(stream.obj)
        except (OSError, ssl.SSLError, RemoteError, TimeoutError) as exc:
            if self._handshake_log.allow(loop.time()):
                log.info("HBONE handshake from %s:%s failed: %s", peer[0], peer[1], _reason(exc))
            if stream is not None:
                with contextlib.suppress(ssl.SSLError, OSError):
                    stream.obj.unwrap()  # best effort: tell the peer (an alert) before closing
                with contextlib.suppress(OSError):
                    raw.send(stream.outgoing.read())
            raw.close()
            return
        except BaseException:  # cancelled: the cap of pending handshakes, or shutdown
            raw.close()
            raise
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
            if self._request_log.allow(conn.loop.time()):
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
            if self._request_log.allow(conn.loop.time()):
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
            leg.connecting = self._spawn(self._connect(conn, leg, decision))
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
            leg.connecting = None
            if isinstance(exc, OSError | TimeoutError):
                if self._upstream_log.allow(loop.time()):
                    log.info("HBONE upstream %s:%s failed: %s", *allow.address, _reason(exc))
            else:
                log.exception("HBONE upstream %s:%s failed", *allow.address)
            if leg.conn is conn:
                conn.refuse(leg, 503, f"upstream connect failed: {_reason(exc)}")
            return
        leg.connecting = None
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
        for task in list(self._handshaking):
            task.cancel()
        for conn in list(self.connections):
            # A tunnel still connecting upstream will not be one: refuse it now rather than
            # hold the shutdown for its connect timeout.
            for leg in [leg for leg in conn.legs.values() if leg.connecting is not None]:
                leg.cancel_connect()
                conn.refuse(leg, 503, "shutting down")
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
