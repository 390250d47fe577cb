"""Tunnel leg states: the transition table alone, then legs driven through two in-memory
`HboneConnection`s (a client and a server session pumping bytes into each other)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import cast

import pytest

from ztagent.errors import LocalError
from ztagent.hbone.connection import ConnectionInfo, HboneConnection, TcpLeg
from ztagent.hbone.events import ConnectRequest
from ztagent.hbone.session import HboneSession, Role
from ztagent.hbone.state import (
    CLOSED,
    HOLDING,
    OPENING,
    RELAYING,
    TRANSITIONS,
    TunnelEvent,
    TunnelState,
    next_state,
)
from ztagent.hbone.transport import TlsTransport
from ztagent.identity.spiffe import Identity

# ------------------------------------------------------------------- the table


def test_client_leg_opens_then_relays() -> None:
    state = next_state(HOLDING, TunnelEvent.CONNECT_SENT)
    assert state is OPENING
    assert next_state(state, TunnelEvent.ESTABLISHED) is RELAYING


def test_server_leg_relays_once_accepted() -> None:
    assert next_state(HOLDING, TunnelEvent.ACCEPTED) is RELAYING


@pytest.mark.parametrize("state", [HOLDING, OPENING, RELAYING])
def test_every_live_state_can_be_released(state: TunnelState) -> None:
    assert next_state(state, TunnelEvent.RELEASED) is CLOSED


def test_closed_is_final() -> None:
    for event in TunnelEvent:
        with pytest.raises(LocalError, match="when closed"):
            next_state(CLOSED, event)


def test_pairs_outside_the_table_raise() -> None:
    allowed = {
        (HOLDING, TunnelEvent.CONNECT_SENT),
        (HOLDING, TunnelEvent.ACCEPTED),
        (OPENING, TunnelEvent.ESTABLISHED),
        (HOLDING, TunnelEvent.RELEASED),
        (OPENING, TunnelEvent.RELEASED),
        (RELAYING, TunnelEvent.RELEASED),
    }
    assert set(TRANSITIONS) == allowed
    for state, event in itertools.product(TunnelState, TunnelEvent):
        if (state, event) in allowed:
            continue
        with pytest.raises(LocalError, match=f"{event.value} when {state.value}"):
            next_state(state, event)


def test_every_state_is_reachable_from_holding() -> None:
    seen = {HOLDING}
    frontier = [HOLDING]
    while frontier:
        state = frontier.pop()
        for (source, _event), target in TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(TunnelState)


# ---------------------------------------------------------- legs on connections

PEER = Identity.parse("spiffe://cluster.local/ns/demo/sa/peer")


class FakeTls:
    """Stands for a `TlsTransport`: what the connection writes is kept for the pump."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.congested = False
        self.queued_total = self.sent_total = 0  # everything written is taken at once

    def write_chunks(self, chunks: Iterable[bytes | memoryview]) -> None:
        self.out.append(b"".join(bytes(c) for c in chunks))

    def close(self) -> None:
        self.closed = True


class FakeApp:
    """Stands for the app side's `asyncio.Transport`."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.aborted = False
        self.eof = False

    def write(self, data: bytes | memoryview) -> None:
        self.written += data

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0


def app_sends(leg: TcpLeg, data: bytes) -> None:
    """What the event loop does when the app's socket has `data` for a buffered protocol."""
    buffer = leg.get_buffer(len(data))
    buffer[: len(data)] = data
    leg.buffer_updated(len(data))


def app_leg() -> tuple[TcpLeg, FakeApp]:
    leg = TcpLeg()
    app = FakeApp()
    leg.connection_made(cast(asyncio.Transport, app))
    return leg, app


class Link:
    """A client and a server `HboneConnection` joined through their fake TLS transports."""

    def __init__(self, on_request: Callable[[HboneConnection, ConnectRequest], None]) -> None:
        loop = asyncio.get_running_loop()
        info = ConnectionInfo(PEER, ("127.0.0.1", 1), ("127.0.0.1", 2))
        self.client = HboneConnection(loop, HboneSession(Role.CLIENT), info)
        self.server = HboneConnection(loop, HboneSession(Role.SERVER), info, on_request=on_request)
        self.client_tls, self.server_tls = FakeTls(), FakeTls()
        self.client.start(cast(TlsTransport, self.client_tls))
        self.server.start(cast(TlsTransport, self.server_tls))
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            to_server, self.client_tls.out = b"".join(self.client_tls.out), []
            to_client, self.server_tls.out = b"".join(self.server_tls.out), []
            if not to_server and not to_client:
                return
            if to_server:
                self.server.tls_data(memoryview(to_server))
            if to_client:
                self.client.tls_data(memoryview(to_client))

    def open(self, leg: TcpLeg) -> None:
        """What `HboneClient.open` does once it has a stream."""
        sid = self.client.session.open_stream("10.0.0.1:80")
        self.client.attach(leg, sid)
        self.client.start_relay(leg)

    def close(self) -> None:
        self.client.close()
        self.server.close()


def test_client_leg_holds_then_opens_then_relays() -> None:
    async def main() -> None:
        server_legs: list[TcpLeg] = []

        def on_request(conn: HboneConnection, event: ConnectRequest) -> None:
            leg = TcpLeg()
            conn.attach(leg, event.stream_id)
            server_legs.append(leg)

        link = Link(on_request)
        leg, app = app_leg()
        app_sends(leg, b"hello ")  # before the tunnel exists: held, reading paused
        assert leg.state is HOLDING and leg.held == [b"hello "] and not app.reading
        link.open(leg)
        assert leg.state is OPENING and leg.held is None and app.reading
        app_sends(leg, b"world")  # before the response: follows the CONNECT
        link.pump()
        (server_leg,) = server_legs
        # The server has not connected its side yet: the tunnel's bytes are kept.
        assert server_leg.state is HOLDING and server_leg.early == [b"hello ", b"world"]
        assert leg.state is OPENING

        server_app = FakeApp()
        server_leg.connection_made(cast(asyncio.Transport, server_app))
        link.server.accept(server_leg)
        assert server_leg.state is RELAYING and server_leg.early is None
        assert bytes(server_app.written) == b"hello world"
        link.pump()
        assert leg.state is RELAYING

        app_sends(server_leg, b"back")
        link.pump()
        assert bytes(app.written) == b"back"

        done: list[tuple[TcpLeg, str | None]] = []
        leg.on_done = server_leg.on_done = lambda leg, error: done.append((leg, error))
        leg.eof_received()
        link.pump()
        assert server_app.eof
        server_leg.eof_received()
        link.pump()
        assert app.eof
        assert leg.state is CLOSED and server_leg.state is CLOSED
        assert sorted(error or "" for _, error in done) == ["", ""]
        assert app.closed and server_app.closed and not app.aborted
        link.close()

    asyncio.run(main())


@pytest.mark.parametrize("told", [True, False])
def test_refused_client_leg_runs_its_response_hook_then_closes(told: bool) -> None:
    async def main() -> None:
        def on_request(conn: HboneConnection, event: ConnectRequest) -> None:
            conn.session.respond(event.stream_id, 401)

        link = Link(on_request)
        leg, app = app_leg()
        statuses: list[int] = []

        def hook(transport: asyncio.Transport, status: int) -> bool:
            statuses.append(status)
            if told:
                transport.write(b"refused")
            return told

        leg.on_response = hook
        errors: list[str | None] = []
        leg.on_done = lambda _leg, error: errors.append(error)
        link.open(leg)
        link.pump()
        assert statuses == [401] and leg.on_response is None
        assert leg.state is CLOSED and errors == ["HBONE 401"]
        # The app heard why: closed after the answer. Nothing said: aborted.
        assert (app.closed, app.aborted) == (told, not told)
        assert bytes(app.written) == (b"refused" if told else b"")
        link.close()

    asyncio.run(main())


def test_response_hook_speaks_before_tunnel_bytes() -> None:
    async def main() -> None:
        def on_request(conn: HboneConnection, event: ConnectRequest) -> None:
            leg, _app = app_leg()
            conn.attach(leg, event.stream_id)
            conn.accept(leg)
            app_sends(leg, b"payload")

        link = Link(on_request)
        leg, app = app_leg()

        def hook(transport: asyncio.Transport, status: int) -> bool:
            transport.write(f"[{status}]".encode())
            return True

        leg.on_response = hook
        link.open(leg)
        link.pump()
        assert leg.state is RELAYING
        assert bytes(app.written) == b"[200]payload"
        link.close()

    asyncio.run(main())


def test_leg_whose_app_left_before_relaying_is_released() -> None:
    async def main() -> None:
        link = Link(lambda conn, event: None)
        leg = TcpLeg()  # never given a transport
        errors: list[str | None] = []
        leg.on_done = lambda _leg, error: errors.append(error)
        link.open(leg)
        assert leg.state is CLOSED and leg.conn is None
        assert errors == ["app left before the tunnel was up"]
        link.close()

    asyncio.run(main())


def test_closing_the_connection_releases_every_leg() -> None:
    async def main() -> None:
        server_legs: list[TcpLeg] = []

        def on_request(conn: HboneConnection, event: ConnectRequest) -> None:
            leg = TcpLeg()
            conn.attach(leg, event.stream_id)
            server_legs.append(leg)

        link = Link(on_request)
        opening, opening_app = app_leg()
        link.open(opening)
        link.pump()
        link.client.close()
        link.server.close()
        assert opening.state is CLOSED and opening_app.aborted
        assert [leg.state for leg in server_legs] == [CLOSED]

    asyncio.run(main())
