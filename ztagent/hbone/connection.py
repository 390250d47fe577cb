"""One live HBONE connection: an `HboneSession` on a `TlsTransport`, and its tunnels' app legs.

Each tunnel's plaintext side is a `TcpLeg` (an asyncio BufferedProtocol). Bytes flow without
copies: a leg reads into the shared receive buffer behind a 9-byte gap and the session writes
the DATA frame header into that gap; tunnel payload arriving over TLS is written to the leg's
transport as a slice of the buffer it was decrypted into.

A leg's place in its tunnel's life is one `TunnelState` (see `state.py` for the transitions).

Backpressure crosses the legs: a leg whose transport is full stops acknowledging its stream
window (the peer stops at 4 MiB); a stream without send credit, or a congested TLS transport,
pauses reading on the legs that feed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ztagent.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    DataReceived,
    Event,
    GoAwayReceived,
    ResponseReceived,
    SendUnblocked,
    SettingsReceived,
    StreamEnded,
    StreamReset,
)
from ztagent.hbone.frames import FRAME_HEADER_SIZE, ErrorCode
from ztagent.hbone.session import HboneSession
from ztagent.hbone.state import HOLDING, TunnelEvent, next_state
from ztagent.hbone.transport import TlsReceiver, TlsTransport, receive_buffer
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)

# Client side: given the app's transport and the CONNECT's response status, tells the app
# what it must hear before any tunnel bytes (a handshake's answer, say) and returns whether
# it told it something: a refused tunnel then closes the app connection instead of aborting it.
ResponseHook = Callable[[asyncio.Transport, int], bool]


class TcpLeg(asyncio.BufferedProtocol):
    """The plaintext TCP side of one tunnel."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "conn",
        "connecting",
        "early",
        "held",
        "local_ended",
        "on_done",
        "on_response",
        "remote_ended",
        "state",
        "stream_id",
        "transport",
        "write_paused",
    )

    def __init__(self) -> None:
        self.conn: HboneConnection | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        # Server side: the upstream connect under way, cancelled if the leg leaves first
        # (a stream reset while its connect is pending must not leave the connect behind).
        self.connecting: asyncio.Task[None] | None = None
        self.state = HOLDING
        self.write_paused = False
        self.local_ended = False
        self.remote_ended = False
        # What arrived while HOLDING, delivered on leaving it: from the tunnel (`early`), and
        # from the app (`held`; the transport may deliver a read before pausing takes hold).
        self.early: list[bytes] | None = None
        self.held: list[bytes] | None = None
        self.bytes_in = 0  # from the app into the tunnel
        self.bytes_out = 0  # from the tunnel to the app
        # Client side: called once with the CONNECT's response, before any tunnel bytes.
        self.on_response: ResponseHook | None = None
        # Called once when the leg leaves its tunnel, with an error text or None (clean end).
        self.on_done: Callable[[TcpLeg, str | None], None] | None = None

    # -- asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        # (Pausing here would not hold: reading starts after this returns. Bytes that come
        # before the tunnel is up are held in `buffer_updated`, which then pauses.)
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer().view[FRAME_HEADER_SIZE:]

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if self.state is not HOLDING and conn is not None:
            conn.leg_data(self, nbytes)
        else:
            view = receive_buffer().view
            if self.held is None:
                self.held = []
            self.held.append(bytes(view[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + nbytes]))
            self.pause_reading()

    def eof_received(self) -> bool:
        self.local_ended = True
        if self.state is not HOLDING and self.conn is not None:
            self.conn.leg_eof(self)
        return True  # keep our writing side open: the tunnel may still carry data back

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        self.transport = None
        if conn is not None:
            conn.leg_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        conn = self.conn
        if conn is not None:
            conn.leg_drained(self)

    # -- helpers
    @property
    def reading(self) -> bool:
        return self.transport is not None and self.transport.is_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def cancel_connect(self) -> None:
        task, self.connecting = self.connecting, None
        if task is not None:
            task.cancel()

    def finished(self, error: str | None) -> None:
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback(self, error)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    peer_identity: Identity
    local_address: tuple[str, int]
    peer_address: tuple[str, int]


RequestHandler = Callable[["HboneConnection", ConnectRequest], None]


class HboneConnection(TlsReceiver):
    """Owns the session, the TLS transport and the legs; does every I/O call for them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        session: HboneSession,
        info: ConnectionInfo,
        on_request: RequestHandler | None = None,
        on_closed: Callable[[HboneConnection], None] | None = None,
    ) -> None:
        self.loop = loop
        self.session = session
        self.info = info
        self.legs: dict[int, TcpLeg] = {}
        self.responses: dict[int, asyncio.Future[int]] = {}
        self.on_request = on_request
        self.on_closed = on_closed
        self.on_settings: Callable[[HboneConnection], None] | None = None
        self.on_stream_closed: Callable[[HboneConnection], None] | None = None
        self.transport: TlsTransport | None = None
        self.closed = False
        self.close_reason: BaseException | None = None
        self.settings_received = loop.create_future()
        self._starved: set[TcpLeg] = set()  # legs paused because TLS is congested
        self._timer: asyncio.TimerHandle | None = None
        # Control frames written but not yet taken by the socket: (queued_total mark, count).
        self._control_marks: deque[tuple[int, int]] = deque()
        self._control_in_queue = 0

    def start(self, transport: TlsTransport) -> None:
        self.transport = transport
        self.session.initiate()
        self.flush()
        self._arm_timer()

    # --------------------------------------------------------------- sending frames

    def flush(self) -> None:
        out = self.session.data_to_send()
        transport = self.transport
        if out and transport is not None:
            transport.write_chunks(out)
            control = self.session.take_control_queued()
            if control and not self.closed:
                self._count_control(transport, control)

    def _count_control(self, transport: TlsTransport, count: int) -> None:
        """Envoy's `max_outbound_control_frames`: a peer that makes us answer (PING, SETTINGS,
        RST_STREAM) but does not read the answers is cut off, not buffered for."""
        marks = self._control_marks
        sent = transport.sent_total
        while marks and marks[0][0] <= sent:
            self._control_in_queue -= marks.popleft()[1]
        if transport.queued_total <= sent:
            return
        marks.append((transport.queued_total, count))
        self._control_in_queue += count
        if self._control_in_queue > self.session.guard.b.max_outbound_control_frames:
            log.info(
                "HBONE connection %s closed: %d control frames unread",
                self.info.peer_address,
                self._control_in_queue,
            )
            marks.clear()
            self._control_in_queue = 0
            self.session.close(ErrorCode.ENHANCE_YOUR_CALM, "outbound control frames not read")
            self.close()

    # ------------------------------------------------------------- TLS side events

    def tls_data(self, data: memoryview) -> None:
        events = self.session.receive_data(data, time.monotonic())
        if events:
            self._handle(events)
        self.flush()

    def tls_yield(self) -> bool:
        return self.session.guard.take_batch()

    def tls_writable(self) -> None:
        starved, self._starved = self._starved, set()
        for leg in starved:
            leg.resume_reading()

    def tls_closed(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.close_reason = exc
            log.debug("HBONE connection to %s closed: %s", self.info.peer_address, exc)
        self._terminate()

    def _handle(self, events: list[Event]) -> None:
        session = self.session
        for event in events:
            if isinstance(event, DataReceived):
                leg = self.legs.get(event.stream_id)
                size = len(event.data)
                if leg is None:
                    session.acknowledge(event.stream_id, size)
                    continue
                leg.bytes_out += size
                transport = leg.transport
                if transport is not None and leg.state is not HOLDING:
                    transport.write(event.data)
                    if transport.get_write_buffer_size():
                        receive_buffer().retained()
                else:
                    if leg.early is None:
                        leg.early = []
                    leg.early.append(bytes(event.data))
                session.acknowledge(event.stream_id, size, stream_level=not leg.write_paused)
            elif isinstance(event, SendUnblocked):
                leg = self.legs.get(event.stream_id)
                if leg is not None:
                    leg.resume_reading()
            elif isinstance(event, StreamEnded):
                leg = self.legs.get(event.stream_id)
                if leg is not None:
                    leg.remote_ended = True
                    transport = leg.transport
                    if (
                        transport is not None
                        and leg.state is not HOLDING
                        and transport.can_write_eof()
                    ):
                        with contextlib.suppress(OSError):  # the app side is already gone
                            transport.write_eof()
                    self._maybe_finish(leg)
            elif isinstance(event, ConnectRequest):
                if self.on_request is not None:
                    self.on_request(self, event)
                else:
                    session.respond(event.stream_id, 400)
            elif isinstance(event, ResponseReceived):
                future = self.responses.pop(event.stream_id, None)
                if future is not None and not future.done():
                    future.set_result(event.status)
                leg = self.legs.get(event.stream_id)
                if leg is not None:
                    told = False
                    hook, leg.on_response = leg.on_response, None
                    if hook is not None and leg.transport is not None:
                        told = hook(leg.transport, event.status)
                    if event.status == 200:
                        leg.state = next_state(leg.state, TunnelEvent.ESTABLISHED)
                    else:
                        app = "close" if told else "abort"
                        self._release(leg, reset=True, app=app, error=f"HBONE {event.status}")
            elif isinstance(event, StreamReset):
                self._stream_gone(event.stream_id)
            elif isinstance(event, SettingsReceived):
                if not self.settings_received.done():
                    self.settings_received.set_result(None)
                if self.on_settings is not None:
                    self.on_settings(self)
            elif isinstance(event, GoAwayReceived):
                if self.on_settings is not None:
                    self.on_settings(self)
                if not self.session.open_streams:
                    self.close()
            elif isinstance(event, ConnectionTerminated):
                log.debug("HBONE connection %s ended: %s", self.info.peer_address, event.reason)
                self.flush()
                self.close()

    def _stream_gone(self, stream_id: int) -> None:
        future = self.responses.pop(stream_id, None)
        if future is not None and not future.done():
            future.set_result(0)
        leg = self.legs.get(stream_id)
        if leg is not None:
            self._release(leg, reset=False, app="abort", error="stream reset")
        else:
            self._stream_closed()

    def _stream_closed(self) -> None:
        if self.on_stream_closed is not None:
            self.on_stream_closed(self)
        session = self.session
        if (session.draining or session.goaway_received) and not session.open_streams:
            self.close()

    # ------------------------------------------------------------- leg side events

    def leg_data(self, leg: TcpLeg, nbytes: int) -> None:
        leg.bytes_in += nbytes
        session = self.session
        if not session.send_data_inplace(leg.stream_id, receive_buffer().view, nbytes):
            leg.pause_reading()
        self.flush()
        transport = self.transport
        if transport is not None and transport.congested and leg.reading:
            leg.pause_reading()
            self._starved.add(leg)

    def leg_eof(self, leg: TcpLeg) -> None:
        self.session.end_stream(leg.stream_id)
        self.flush()
        self._maybe_finish(leg)

    def leg_drained(self, leg: TcpLeg) -> None:
        self.session.release_stream_credit(leg.stream_id)
        self.flush()

    def leg_lost(self, leg: TcpLeg, exc: Exception | None) -> None:
        clean = leg.local_ended and leg.remote_ended and exc is None
        error = None if clean else (str(exc) if exc else "app closed the connection early")
        self._release(leg, reset=not clean, app="none", error=error)

    def _maybe_finish(self, leg: TcpLeg) -> None:
        if leg.local_ended and leg.remote_ended:
            self._release(leg, reset=False, app="close", error=None)

    def drop_leg(self, leg: TcpLeg, error: str = "tunnel failed") -> None:
        """The tunnel failed or is no longer allowed: reset its stream, abort the app side."""
        self._release(leg, reset=True, app="abort", error=error)

    def refuse(self, leg: TcpLeg, status: int, error: str) -> None:
        """Server side: answer the CONNECT with `status` instead of a tunnel."""
        self.session.respond(leg.stream_id, status)
        self.flush()
        self._release(leg, reset=False, app="abort", error=error)

    def _release(self, leg: TcpLeg, *, reset: bool, app: str, error: str | None) -> None:
        """The one way a leg leaves this connection: stream, app side, then `leg.finished`."""
        if self.legs.get(leg.stream_id) is not leg:
            return
        del self.legs[leg.stream_id]
        leg.conn = None
        leg.cancel_connect()
        leg.state = next_state(leg.state, TunnelEvent.RELEASED)
        self._starved.discard(leg)
        if reset and self.session.has_stream(leg.stream_id):
            self.session.reset_stream(leg.stream_id, ErrorCode.CANCEL)
            self.flush()
        if app == "abort":
            leg.abort()
        elif app == "close" and leg.transport is not None:
            leg.transport.close()
        leg.finished(error)
        self._stream_closed()

    def attach(self, leg: TcpLeg, stream_id: int) -> None:
        """Bind a leg to a stream of this connection; flushes bytes that arrived early."""
        leg.conn = self
        leg.stream_id = stream_id
        self.legs[stream_id] = leg

    def accept(self, leg: TcpLeg) -> None:
        """Server side: answer the leg's CONNECT with 200 and start relaying."""
        self.session.respond(leg.stream_id, 200)
        self._relay(leg, TunnelEvent.ACCEPTED)
        self.flush()

    def start_relay(self, leg: TcpLeg) -> None:
        """Client side: the CONNECT is out; the app's bytes follow it (see `state`)."""
        self._relay(leg, TunnelEvent.CONNECT_SENT)

    def _relay(self, leg: TcpLeg, event: TunnelEvent) -> None:
        """Leave HOLDING: deliver the bytes kept from the tunnel, send those held from the app
        and let the app's bytes flow."""
        if leg.transport is None:
            self._release(leg, reset=True, app="none", error="app left before the tunnel was up")
            return
        leg.state = next_state(leg.state, event)
        early, leg.early = leg.early or (), None
        held, leg.held = leg.held or (), None
        transport = leg.transport
        if transport is not None:
            for chunk in early:
                transport.write(chunk)
            if leg.remote_ended and transport.can_write_eof():
                transport.write_eof()
        blocked = False
        for chunk in held:
            leg.bytes_in += len(chunk)
            blocked = not self.session.send_data(leg.stream_id, chunk) or blocked
        if leg.local_ended:
            self.session.end_stream(leg.stream_id)
        self.flush()
        if not blocked:
            leg.resume_reading()
        self._maybe_finish(leg)

    # ----------------------------------------------------------------- lifecycle

    def _arm_timer(self) -> None:
        deadline = self.session.next_deadline()
        if deadline is None or self.closed:
            return
        delay = max(0.0, deadline - time.monotonic())
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        events = self.session.handle_timer(time.monotonic())
        if events:
            self._handle(events)
        self.flush()
        self._arm_timer()

    def drain(self) -> None:
        """GOAWAY: no new tunnels; close once the open ones finish."""
        self.session.drain()
        self.flush()
        if not self.session.open_streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        if not self.session.closed:
            self.session.close()
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._terminate()

    def _terminate(self) -> None:
        if self.closed and not self.legs and not self.responses:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.transport.closed:
            self.transport.close()
        for future in self.responses.values():
            if not future.done():
                future.set_result(0)
        self.responses.clear()
        legs, self.legs = self.legs, {}
        for leg in legs.values():
            leg.conn = None
            leg.cancel_connect()
            leg.state = next_state(leg.state, TunnelEvent.RELEASED)
            leg.abort()
            leg.finished("HBONE connection closed")
        if not self.settings_received.done():
            self.settings_received.set_result(None)
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback(self)
