"""HBONE session logic in memory: two sessions pumping bytes into each other."""

from __future__ import annotations

import typing

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztagent.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    ResponseReceived,
    SendUnblocked,
    StreamEnded,
    StreamReset,
)
from ztagent.hbone.frames import (
    PREFACE,
    U32,
    ErrorCode,
    Flag,
    FrameType,
    MiB,
    Settings,
    format_authority,
    pack_frame,
    parse_authority,
)
from ztagent.hbone.headers import decode_simple_headers, encode_headers
from ztagent.hbone.session import HboneSession, Role


def _bytes(session: HboneSession) -> bytes:
    return b"".join(bytes(c) for c in session.data_to_send())


class Pair:
    """A client and a server session wired back to back."""

    def __init__(
        self, client_settings: Settings | None = None, server_settings: Settings | None = None
    ) -> None:
        self.client = HboneSession(Role.CLIENT, client_settings)
        self.server = HboneSession(Role.SERVER, server_settings)
        self.client.initiate()
        self.server.initiate()
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            to_server = _bytes(self.client)
            to_client = _bytes(self.server)
            if not to_server and not to_client:
                return
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            if to_client:
                self.client_events += self.client.receive_data(to_client)

    def take(self, side: str) -> list[Event]:
        events = self.client_events if side == "client" else self.server_events
        out = list(events)
        events.clear()
        return out

    def tunnel(self, authority: str = "10.0.0.1:80") -> int:
        sid = self.client.open_stream(authority, [("forwarded", 'for="10.0.0.2:5000"')])
        self.pump()
        request = next(e for e in self.take("server") if isinstance(e, ConnectRequest))
        self.server.respond(request.stream_id, 200)
        self.pump()
        assert any(isinstance(e, ResponseReceived) and e.status == 200 for e in self.take("client"))
        return sid


def data_of(events: list[Event], sid: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid
    )


def terminated(events: list[Event]) -> ConnectionTerminated:
    found = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert found, events
    return found[0]


def test_connect_request_carries_authority_and_headers() -> None:
    pair = Pair()
    sid = pair.client.open_stream("10.1.2.3:8080", [("baggage", "k8s.namespace.name=a")])
    pair.pump()
    (request,) = [e for e in pair.take("server") if isinstance(e, ConnectRequest)]
    assert (request.stream_id, request.method, request.authority) == (
        sid,
        "CONNECT",
        "10.1.2.3:8080",
    )
    assert ("baggage", "k8s.namespace.name=a") in request.headers


def test_data_both_ways_and_half_close() -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.client.send_data(sid, b"ping")
    pair.client.end_stream(sid)
    pair.pump()
    events = pair.take("server")
    assert data_of(events, sid) == b"ping"
    assert StreamEnded(sid) in events
    pair.server.send_data(sid, b"pong", end_stream=True)
    pair.pump()
    events = pair.take("client")
    assert data_of(events, sid) == b"pong"
    assert StreamEnded(sid) in events
    assert pair.client.open_streams == 0 and pair.server.open_streams == 0


def test_refusal_statuses_end_the_stream() -> None:
    pair = Pair()
    for status in (400, 401, 503):
        sid = pair.client.open_stream("10.0.0.1:80")
        pair.pump()
        pair.take("server")
        pair.server.respond(sid, status)
        pair.pump()
        events = pair.take("client")
        assert ResponseReceived(sid, status, []) in events
        assert not pair.server.has_stream(sid)


def test_non_connect_method_reaches_the_owner_for_a_400() -> None:
    pair = Pair()
    encoder = hpack.Encoder()
    block = encoder.encode(
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x:1")]
    )
    events = pair.server.receive_data(
        pack_frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, 1, block)
    )
    (request,) = [e for e in events if isinstance(e, ConnectRequest)]
    assert request.method == "GET"


@pytest.mark.parametrize(
    "headers",
    [
        [(":method", "CONNECT"), (":authority", "a:1"), ("Upper", "x")],
        [(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("connection", "close")],
        [(":method", "CONNECT"), (":protocol", "websocket"), (":authority", "a:1")],
        [(":authority", "a:1")],
    ],
)
def test_malformed_requests_are_stream_errors(headers: list[tuple[str, str]]) -> None:
    server = HboneSession(Role.SERVER)
    server.initiate()
    server.receive_data(PREFACE + pack_frame(FrameType.SETTINGS, 0, 0))
    server.data_to_send()
    block = hpack.Encoder().encode(headers)
    events = server.receive_data(pack_frame(FrameType.HEADERS, Flag.END_HEADERS, 1, block))
    assert StreamReset(1, ErrorCode.PROTOCOL_ERROR, remote=False) in events
    assert not server.closed
    sent = _bytes(server)
    assert pack_frame(FrameType.RST_STREAM, 0, 1, U32.pack(ErrorCode.PROTOCOL_ERROR)) in sent


def _server_after_preface(settings: Settings | None = None) -> HboneSession:
    server = HboneSession(Role.SERVER, settings)
    server.initiate()
    server.receive_data(PREFACE + pack_frame(FrameType.SETTINGS, 0, 0))
    server.data_to_send()
    return server


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (pack_frame(FrameType.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.DATA, 0, 5, b"x"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (pack_frame(FrameType.SETTINGS, 0, 0, b"\0\0\0"), ErrorCode.FRAME_SIZE_ERROR),
        (pack_frame(FrameType.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.SETTINGS, 0, 0, b"\0\x04\x80\0\0\0"), ErrorCode.FLOW_CONTROL_ERROR),
        (pack_frame(FrameType.SETTINGS, 0, 0, b"\0\x05\0\0\0\x01"), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.WINDOW_UPDATE, 0, 0, U32.pack(0)), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.WINDOW_UPDATE, 0, 0, b"\0"), ErrorCode.FRAME_SIZE_ERROR),
        (pack_frame(FrameType.PING, 0, 0, b"short"), ErrorCode.FRAME_SIZE_ERROR),
        (pack_frame(FrameType.PING, 0, 3, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.RST_STREAM, 0, 0, U32.pack(0)), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.RST_STREAM, 0, 9, U32.pack(0)), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.PUSH_PROMISE, 0, 1, b"\0\0\0\2"), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (pack_frame(FrameType.HEADERS, Flag.END_HEADERS, 2, b"\x82"), ErrorCode.PROTOCOL_ERROR),
        (
            pack_frame(FrameType.HEADERS, Flag.END_HEADERS, 1, b"\xff\xff\xff"),
            ErrorCode.COMPRESSION_ERROR,
        ),
        (pack_frame(FrameType.GOAWAY, 0, 0, b"\0"), ErrorCode.FRAME_SIZE_ERROR),
        (b"\x00\x00\x01\x02\x00\x00\x00\x00\x01\x00", ErrorCode.PROTOCOL_ERROR),  # bad PRIORITY
    ],
)
def test_malformed_frames_are_connection_errors(frame: bytes, code: ErrorCode) -> None:
    server = _server_after_preface()
    event = terminated(server.receive_data(frame))
    assert event.error_code == code
    assert server.closed
    assert _bytes(server)[3] == FrameType.GOAWAY
    assert server.receive_data(b"anything") == []


def test_bad_preface_is_refused() -> None:
    server = HboneSession(Role.SERVER)
    server.initiate()
    assert (
        terminated(server.receive_data(b"GET / HTTP/1.1\r\n\r\n")).error_code
        == ErrorCode.PROTOCOL_ERROR
    )


def test_frame_larger_than_advertised_is_refused() -> None:
    server = _server_after_preface(Settings(max_frame_size=16384))
    header = (16385 << 8 | FrameType.DATA).to_bytes(4, "big") + b"\0" + U32.pack(1)
    assert terminated(server.receive_data(header)).error_code == ErrorCode.FRAME_SIZE_ERROR


def test_oversized_header_block_is_cut_off() -> None:
    server = _server_after_preface(Settings(max_header_block=1024))
    frames = pack_frame(FrameType.HEADERS, 0, 1, b"\0" * 1000)
    frames += pack_frame(FrameType.CONTINUATION, 0, 1, b"\0" * 1000)
    assert terminated(server.receive_data(frames)).error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_oversized_header_list_refuses_only_that_stream() -> None:
    pair = Pair(server_settings=Settings(max_header_list_size=1024))
    sid = pair.client.open_stream("10.0.0.1:80", [("x-big", "v" * 2000)])
    pair.pump()
    assert StreamReset(sid, ErrorCode.REFUSED_STREAM, remote=True) in pair.take("client")
    # The connection (and its HPACK state) survives: the next tunnel works.
    pair.tunnel()


def test_stream_limit_refuses_extra_streams() -> None:
    pair = Pair(server_settings=Settings(max_concurrent_streams=2))
    assert pair.client.peer_max_concurrent_streams == 2
    pair.tunnel()
    pair.tunnel()
    assert not pair.client.can_open_stream
    # A peer that ignores the limit gets REFUSED_STREAM on the extra stream.
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "1.1.1.1:1")])
    events = pair.server.receive_data(pack_frame(FrameType.HEADERS, Flag.END_HEADERS, 99, block))
    assert StreamReset(99, ErrorCode.REFUSED_STREAM, remote=False) in events


def test_flow_control_windows() -> None:
    small = Settings(stream_window=65535, connection_window=65535)
    pair = Pair(server_settings=small)
    sid = pair.tunnel()
    payload = bytes(range(256)) * 1024  # 256 KiB, four times the window
    assert pair.client.send_data(sid, payload) is False
    pair.pump()
    received = data_of(pair.take("server"), sid)
    assert len(received) == 65535
    # Delivering the bytes returns credit; the queued rest flows as credit arrives.
    total = received
    for _ in range(10):
        pair.server.acknowledge(sid, len(received))
        pair.server.release_stream_credit(sid)
        pair.pump()
        client_events = pair.take("client")
        received = data_of(pair.take("server"), sid)
        total += received
        if len(total) == len(payload):
            assert SendUnblocked(sid) in client_events
            break
    assert total == payload


def test_withheld_stream_credit_does_not_block_other_streams() -> None:
    pair = Pair(server_settings=Settings(stream_window=65535, connection_window=3 * 65535))
    slow = pair.tunnel()
    fast = pair.tunnel()
    pair.client.send_data(slow, b"s" * 65535)
    pair.pump()
    pair.server.acknowledge(slow, 65535, stream_level=False)  # app for `slow` is not reading
    pair.pump()
    for _ in range(4):
        assert pair.client.send_data(fast, b"f" * 65535)
        pair.pump()
        got = data_of(pair.take("server"), fast)
        assert len(got) == 65535
        pair.server.acknowledge(fast, len(got))
        pair.pump()
    assert pair.client.send_data(slow, b"more") is False  # still blocked on its own window


def test_peer_exceeding_our_window_is_a_flow_control_error() -> None:
    pair = Pair(server_settings=Settings(stream_window=100, connection_window=65535))
    sid = pair.tunnel()
    events = pair.server.receive_data(pack_frame(FrameType.DATA, 0, sid, b"x" * 101))
    assert terminated(events).error_code == ErrorCode.FLOW_CONTROL_ERROR


def test_large_frames_arrive_in_slices_without_gathering() -> None:
    pair = Pair()
    sid = pair.tunnel()
    payload = b"a" * (1 * MiB)
    pair.client.send_data(sid, payload)
    wire = _bytes(pair.client)
    events: list[Event] = []
    for i in range(0, len(wire), 7000):
        events += pair.server.receive_data(wire[i : i + 7000])
    chunks = [e for e in events if isinstance(e, DataReceived)]
    assert len(chunks) > 100
    assert data_of(events, sid) == payload


def test_padded_data_is_unpadded() -> None:
    pair = Pair()
    sid = pair.tunnel()
    frame = pack_frame(FrameType.DATA, Flag.PADDED | Flag.END_STREAM, sid, b"\x03abc\0\0\0")
    events = pair.server.receive_data(frame)
    assert data_of(events, sid) == b"abc"
    assert StreamEnded(sid) in events


def test_inplace_framing_writes_the_header_into_the_gap() -> None:
    pair = Pair()
    sid = pair.tunnel()
    buffer = memoryview(bytearray(9 + 5))
    buffer[9:] = b"hello"
    assert pair.client.send_data_inplace(sid, buffer, 5)
    out = pair.client.data_to_send()
    assert len(out) == 1 and out[0].obj is buffer.obj  # type: ignore[union-attr]
    events = pair.server.receive_data(bytes(out[0]))
    assert data_of(events, sid) == b"hello"


def test_goaway_drain_refuses_new_streams_and_lets_old_ones_finish() -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.server.drain()
    pair.pump()
    assert any(isinstance(e, GoAwayReceived) for e in pair.take("client"))
    assert not pair.client.can_open_stream
    pair.client.send_data(sid, b"still here")
    pair.pump()
    assert data_of(pair.take("server"), sid) == b"still here"


def test_goaway_resets_streams_the_server_never_saw() -> None:
    pair = Pair()
    pair.tunnel()
    late = pair.client.open_stream("10.0.0.1:80")
    events = pair.client.receive_data(pack_frame(FrameType.GOAWAY, 0, 0, U32.pack(1) + U32.pack(0)))
    assert StreamReset(late, ErrorCode.REFUSED_STREAM, remote=True) in events


def test_keepalive_ping_then_timeout() -> None:
    pair = Pair()
    assert pair.client.next_deadline() == 10.0
    assert pair.client.handle_timer(10.0) == []
    wire = _bytes(pair.client)
    assert wire[3] == FrameType.PING
    # The peer answers: the connection is alive again.
    pair.server.receive_data(wire)
    assert any(
        isinstance(e, PingAcknowledged) for e in pair.client.receive_data(_bytes(pair.server), 10.5)
    )
    # Silence: a PING at 10 s, and at 20 s without any frame the connection is dropped.
    assert pair.client.next_deadline() == 20.5
    assert pair.client.handle_timer(20.5) == []
    assert _bytes(pair.client)[3] == FrameType.PING
    assert pair.client.next_deadline() == 30.5
    events = pair.client.handle_timer(30.5)
    assert terminated(events).reason == "keepalive timeout"


def test_rst_stream_from_peer() -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.server.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    pair.pump()
    assert StreamReset(sid, ErrorCode.CONNECT_ERROR, remote=True) in pair.take("client")


# ------------------------------------------------------------------ interop with h2


def test_h2_library_client_against_our_server() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.9:443")])
    client.send_data(sid, b"hello over h2")
    server = HboneSession(Role.SERVER)
    server.initiate()
    events = server.receive_data(client.data_to_send())
    (request,) = [e for e in events if isinstance(e, ConnectRequest)]
    assert request.authority == "10.0.0.9:443"
    assert data_of(events, sid) == b"hello over h2"
    server.respond(sid, 200)
    server.send_data(sid, b"x" * 100_000)  # more than h2's default window: flow control applies
    h2_events = client.receive_data(_bytes(server))
    responses = [e for e in h2_events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(responses[0].headers)[b":status"] == b"200"
    chunks = [e for e in h2_events if isinstance(e, h2.events.DataReceived)]
    assert sum(len(e.data) for e in chunks) == 65_535  # h2's default window is honoured
    for chunk in chunks:
        client.acknowledge_received_data(chunk.flow_controlled_length, sid)
    events = server.receive_data(client.data_to_send())
    assert SendUnblocked(sid) in events
    rest = client.receive_data(_bytes(server))
    assert (
        sum(len(e.data) for e in rest if isinstance(e, h2.events.DataReceived)) == 100_000 - 65_535
    )


def test_our_client_against_h2_library_server() -> None:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client = HboneSession(Role.CLIENT)
    client.initiate()
    sid = client.open_stream(
        "10.0.0.9:443", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
    )
    h2_events = server.receive_data(_bytes(client))
    requests = [e for e in h2_events if isinstance(e, h2.events.RequestReceived)]
    assert dict(requests[0].headers)[b":authority"] == b"10.0.0.9:443"
    server.send_headers(sid, [(":status", "200")])
    server.send_data(sid, b"from h2", end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert ResponseReceived(sid, 200, []) in events
    assert data_of(events, sid) == b"from h2"
    assert StreamEnded(sid) in events


# --------------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_server(data: bytes) -> None:
    server = HboneSession(Role.SERVER)
    server.initiate()
    events = server.receive_data(PREFACE + data)
    for event in events:
        assert isinstance(event, typing.get_args(Event))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_frames_after_a_valid_prefix_never_crash_the_client(data: bytes) -> None:
    pair = Pair()
    pair.tunnel()
    pair.client.receive_data(data)


@settings(max_examples=100, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=50_000),
    cuts=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=30),
)
def test_any_chunking_delivers_the_same_bytes(payload: bytes, cuts: list[int]) -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.client.send_data(sid, payload, end_stream=True)
    wire = _bytes(pair.client)
    events: list[Event] = []
    pos = 0
    for cut in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        if pos >= len(wire):
            break
        events += pair.server.receive_data(wire[pos : pos + cut])
        pos += cut
    events += pair.server.receive_data(wire[pos:])
    assert data_of(events, sid) == payload
    assert StreamEnded(sid) in events


@given(st.text(max_size=60))
def test_parse_authority_only_raises_value_error(text: str) -> None:
    try:
        ip, port = parse_authority(text)
    except ValueError:
        return
    assert parse_authority(format_authority(ip, port)) == (ip, port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.1:80", ("10.0.0.1", 80)), ("[fd00::1]:15008", ("fd00::1", 15008))],
)
def test_parse_authority_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1", "host:80", "10.0.0.1:0", "10.0.0.1:70000", "fd00::1:80", "[10.0.0.1]:80", ":80"],
)
def test_parse_authority_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([":authority", ":status", "forwarded", "x-a", "content-type"]),
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
        ),
        max_size=8,
    )
)
def test_our_hpack_encoding_decodes_with_the_hpack_library(headers: list[tuple[str, str]]) -> None:
    decoded = hpack.Decoder().decode(encode_headers(headers), raw=False)
    assert [(str(k), str(v)) for k, v in decoded] == headers


def test_our_hpack_encoding_uses_the_static_table() -> None:
    assert encode_headers([(":status", "200")]) == b"\x88"
    assert encode_headers([(":method", "CONNECT")]) == b"\x02\x07CONNECT"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([":authority", ":status", ":method", "forwarded", "x-b", "via"]),
            st.sampled_from(["200", "GET", "", "10.0.0.1:80", "v" * 200]),
        ),
        max_size=8,
    )
)
def test_fast_decoding_round_trips_our_encoding(headers: list[tuple[str, str]]) -> None:
    assert decode_simple_headers(encode_headers(headers)) == headers


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_fast_decoding_agrees_with_the_library_or_declines(block: bytes) -> None:
    fast = decode_simple_headers(block)
    if fast is None:
        return
    try:
        slow = hpack.Decoder().decode(block, raw=False)
    except Exception:
        return  # the library is stricter about values (e.g. it validates UTF-8)
    assert fast == [(str(k), str(v)) for k, v in slow]


def test_fast_decoding_declines_what_touches_decoder_state() -> None:
    encoder = hpack.Encoder()
    indexed = encoder.encode([("x-seen-twice", "a")])  # incremental indexing (0x40)
    assert decode_simple_headers(indexed) is None
    huffman = hpack.Encoder().encode([("x", "hello")], huffman=True)
    assert decode_simple_headers(huffman) is None
    assert decode_simple_headers(b"\x3f\xe1\x1f") is None  # dynamic table size update
    assert decode_simple_headers(b"\xbe") is None  # dynamic table index 62
