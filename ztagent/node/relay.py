"""Plain TCP relaying between two sockets the agent holds (passthrough, same-node, plaintext
inbound): two `PlainLeg` protocols joined by a `PlainRelay`.

Reads go into the shared receive buffer and straight into the other leg's transport; a full
transport pauses reading on the other side; EOF is passed on as a half-close; the relay ends
when both directions have ended or either side fails.

A half-closed relay does not wait forever for the other side: a port probe or health check
that connects and closes leaves an upstream that may never answer its FIN, and each such relay
would hold two descriptors for good. Once one direction has ended, the other may stay silent
for at most `HALF_CLOSE_TIMEOUT`; then both sides are closed (bytes still moving reset the
timer, so a slow response after the client's shutdown(SHUT_WR) still arrives).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.transport import connect_socket, make_socket, receive_buffer

CONNECT_TIMEOUT = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)
HALF_CLOSE_TIMEOUT = 60.0
"""Silence allowed in the open direction after the other ended: Linux's tcp_fin_timeout (60 s),
how long the client's own kernel would wait in FIN_WAIT_2 for a peer ignoring its FIN (HAProxy
calls the same bound `timeout client-fin` / `timeout server-fin`)."""


def reset_on_close(transport: asyncio.BaseTransport | None) -> None:
    """SO_LINGER 0: closing `transport` now sends a RST, not a FIN.

    What ztunnel does to the app when its upstream fails: a FIN would tell the app the stream
    ended cleanly, and a transfer cut short would look complete."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class AppLeg(TcpLeg):
    """The app's side of an outbound tunnel: when the tunnel fails it is reset, never ended
    with a FIN (the tunnel code aborts the leg on every failure and closes it on a clean end)."""

    __slots__ = ()

    def abort(self) -> None:
        reset_on_close(self.transport)
        super().abort()


class PlainLeg(asyncio.BufferedProtocol):
    __slots__ = ("eof", "nbytes", "peer", "relay", "transport")

    def __init__(self, relay: PlainRelay) -> None:
        self.relay = relay
        self.peer: PlainLeg | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.nbytes = 0  # read from this side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer().view

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        self.relay.active = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        peer.transport.write(receive_buffer().view[:nbytes])
        if peer.transport.get_write_buffer_size():
            receive_buffer().retained()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer is None or peer.eof:
            self.relay.finish(None)
        else:
            self.relay.half_closed()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        clean = exc is None and self.eof and (self.peer is None or self.peer.eof)
        self.relay.finish(None if clean else str(exc or "connection closed early"))


class PlainRelay:
    """Joins a downstream transport the agent accepted with an upstream it connects."""

    __slots__ = (
        "active",
        "done",
        "downstream",
        "half_close_timeout",
        "on_done",
        "started",
        "timer",
        "upstream",
    )

    def __init__(
        self,
        on_done: Callable[[PlainRelay, str | None], None] | None = None,
        *,
        half_close_timeout: float = HALF_CLOSE_TIMEOUT,
    ) -> None:
        self.downstream = PlainLeg(self)
        self.upstream = PlainLeg(self)
        self.downstream.peer = self.upstream
        self.upstream.peer = self.downstream
        self.on_done = on_done
        self.done = False
        self.started = time.monotonic()
        self.half_close_timeout = half_close_timeout
        self.active = False
        self.timer: asyncio.TimerHandle | None = None

    @property
    def bytes_from_client(self) -> int:
        return self.downstream.nbytes

    @property
    def bytes_to_client(self) -> int:
        return self.upstream.nbytes

    async def connect(
        self,
        downstream: asyncio.Transport,
        address: tuple[str, int],
        *,
        mark: int | None = None,
        early: list[bytes] | None = None,
        reply: bytes = b"",
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        """Connect upstream, then hand `downstream` (paused) to this relay and start it:
        `reply` goes to the client first, `early` (client bytes read so far, a list that may
        grow until the hand-over) upstream."""
        loop = asyncio.get_running_loop()
        sock = make_socket(address, mark, None)
        try:
            await connect_socket(loop, sock, address, timeout)
            await loop.create_connection(lambda: self.upstream, sock=sock)
        except BaseException:
            sock.close()
            raise
        if downstream.is_closing():
            # The client went away while the upstream connected: nothing will ever close it.
            if self.upstream.transport is not None:
                self.upstream.transport.close()
            self.finish("client closed before the upstream connected")
            return
        downstream.set_protocol(self.downstream)
        self.downstream.connection_made(downstream)
        if reply:
            downstream.write(reply)
        held = b"".join(early or ())
        if held and self.upstream.transport is not None:
            self.downstream.nbytes += len(held)
            self.upstream.transport.write(held)
        downstream.resume_reading()

    def half_closed(self) -> None:
        """One direction ended: bound how long the other may stay silent."""
        if self.timer is None and not self.done:
            self.active = False
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.half_close_timeout, self._half_close_check)

    def _half_close_check(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.active:
            self.half_closed()
            return
        for leg in (self.downstream, self.upstream):
            leg.eof = True
        self.finish(None)

    def abort(self, error: str) -> None:
        for leg in (self.downstream, self.upstream):
            if leg.transport is not None:
                leg.transport.abort()
        self.finish(error)

    def finish(self, error: str | None) -> None:
        if self.done:
            return
        if error is None and not (self.downstream.eof and self.upstream.eof):
            return  # one direction still open
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for leg in (self.downstream, self.upstream):
            if leg.transport is not None:
                if error is not None:
                    reset_on_close(leg.transport)  # one side failed: reset the other
                leg.transport.close()
        if self.on_done is not None:
            callback, self.on_done = self.on_done, None
            callback(self, error)
