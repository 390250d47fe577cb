"""The HBONE session: HTTP/2 CONNECT tunnels over one connection, without I/O.

Bytes go in with `receive_data(data, now)`, events come out; calls such as `open_stream`,
`respond`, `send_data` queue bytes that `data_to_send()` hands to whoever owns the socket.
Time is an input: `next_deadline()` says when the session next needs `handle_timer(now)`.

Only the subset of HTTP/2 that HBONE uses is accepted: CONNECT requests (a client opens,
a server answers with a status), DATA both ways, flow control, SETTINGS, PING, GOAWAY,
RST_STREAM. Everything outside that is answered the way RFC 9113 says: a stream error
(RST_STREAM) when only one tunnel is affected, a connection error (GOAWAY, then nothing
more) when the peer broke the connection's state.

DATA is the hot path: a frame's payload is handed out as slices of the caller's buffer as
it arrives (a 1 MiB frame is never gathered), and `send_data_inplace` frames data that the
caller already read behind a 9-byte gap, so payload bytes are never copied here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import hpack

from ztagent.errors import LocalError
from ztagent.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    DataReceived,
    Event,
    GoAwayReceived,
    Headers,
    PingAcknowledged,
    ResponseReceived,
    SendUnblocked,
    SettingsReceived,
    StreamEnded,
    StreamReset,
)
from ztagent.hbone.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    GOAWAY_HEAD,
    MAX_WINDOW,
    PREFACE,
    SETTING,
    U32,
    ErrorCode,
    Flag,
    FrameType,
    SettingCode,
    Settings,
    pack_frame,
)
from ztagent.hbone.headers import (
    MalformedRequest,
    decode_simple_headers,
    encode_headers,
    request_target,
)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _StreamError(Exception):
    def __init__(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.stream_id = stream_id
        self.code = code


# ----------------------------------------------------------------------------- state


class _Stream:
    __slots__ = (
        "id",
        "local_closed",
        "pending",
        "pending_end",
        "recv_window",
        "remote_closed",
        "responded",
        "send_window",
        "unacked",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0
        self.local_closed = False
        self.remote_closed = False
        self.responded = False
        self.pending = bytearray()
        self.pending_end = False


# Reading states for the frame parser.
_HEADER, _PAYLOAD, _DATA_PAD_LENGTH, _DATA, _DATA_PADDING = range(5)


class HboneSession:
    """One HBONE connection's HTTP/2 state, for either role."""

    def __init__(self, role: Role, settings: Settings | None = None, now: float = 0.0) -> None:
        self.role = role
        self.settings = settings or Settings()
        self._out: list[bytes | memoryview] = []
        self._streams: dict[int, _Stream] = {}
        self._decoder = hpack.Decoder(max_header_list_size=self.settings.max_header_list_size)
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._highest_remote_id = 0
        self.closed = False
        self.draining = False
        self.goaway_received = False
        # Peer's settings and our credit towards it.
        self.peer_max_concurrent_streams = 100 if role is Role.CLIENT else 2**31 - 1
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._send_window = DEFAULT_WINDOW
        # Our receive side.
        self._recv_window = self.settings.connection_window
        self._conn_unacked = 0
        self._preface_left = len(PREFACE) if role is Role.SERVER else 0
        self._state = _HEADER
        self._partial = bytearray()
        self._ftype = 0
        self._flags = 0
        self._fstream = 0
        self._left = 0  # payload bytes of the current frame still to read
        self._pad = 0
        self._header_block = bytearray()
        self._continuation_stream = 0  # stream whose header block awaits CONTINUATION
        self._continuation_flags = 0
        # Keepalive.
        self._last_received = now
        self._ping_outstanding = False

    # ------------------------------------------------------------------ public: state

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def can_open_stream(self) -> bool:
        return (
            not self.closed
            and not self.draining
            and not self.goaway_received
            and self.role is Role.CLIENT
            and len(self._streams) < self.peer_max_concurrent_streams
            and self._next_stream_id < MAX_WINDOW
        )

    # -------------------------------------------------------------- public: sending

    def initiate(self) -> None:
        """Queue the connection preface: (client magic), SETTINGS, connection window."""
        s = self.settings
        pairs = [
            (SettingCode.INITIAL_WINDOW_SIZE, s.stream_window),
            (SettingCode.MAX_FRAME_SIZE, s.max_frame_size),
            (SettingCode.MAX_HEADER_LIST_SIZE, s.max_header_list_size),
        ]
        if self.role is Role.CLIENT:
            pairs.append((SettingCode.ENABLE_PUSH, 0))
        else:
            pairs.append((SettingCode.MAX_CONCURRENT_STREAMS, s.max_concurrent_streams))
        payload = b"".join(SETTING.pack(code, value) for code, value in pairs)
        if self.role is Role.CLIENT:
            self._out.append(PREFACE)
        self._out.append(pack_frame(FrameType.SETTINGS, 0, 0, payload))
        extra = s.connection_window - DEFAULT_WINDOW
        if extra > 0:
            self._out.append(pack_frame(FrameType.WINDOW_UPDATE, 0, 0, U32.pack(extra)))

    def data_to_send(self) -> list[bytes | memoryview]:
        out = self._out
        self._out = []
        return out

    def open_stream(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Client: start a CONNECT tunnel to `authority`; returns its stream id."""
        if not self.can_open_stream:
            raise LocalError("HBONE connection cannot open another stream")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        block = [(":method", "CONNECT"), (":authority", authority), *headers]
        self._streams[stream_id] = _Stream(
            stream_id, self._peer_initial_window, self.settings.stream_window
        )
        self._send_headers(stream_id, block, end_stream=False)
        return stream_id

    def respond(self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Server: answer a CONNECT. Any status but 200 also ends the stream."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.responded:
            return
        stream.responded = True
        end = status != 200
        self._send_headers(stream_id, [(":status", str(status)), *headers], end_stream=end)
        if end:
            stream.local_closed = True
            if not stream.remote_closed:
                # The tunnel is refused: tell the peer to stop sending (RFC 9113 8.1).
                self._out.append(
                    pack_frame(FrameType.RST_STREAM, 0, stream_id, U32.pack(ErrorCode.NO_ERROR))
                )
            self._streams.pop(stream_id, None)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> bool:
        """Queue tunnel bytes. Returns False when flow control held some back: the rest is
        kept (copied) and sent when credit arrives, signalled by `SendUnblocked`."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return True
        if stream.pending:
            stream.pending += data
            stream.pending_end = stream.pending_end or end_stream
            return False
        view = memoryview(data)
        sent = self._emit_data(stream, view, end_stream)
        if sent < len(view):
            stream.pending = bytearray(view[sent:])
            stream.pending_end = end_stream
            return False
        return True

    def send_data_inplace(self, stream_id: int, buffer: memoryview, length: int) -> bool:
        """Queue `length` bytes at `buffer[9:]` as one DATA frame, writing its header into
        `buffer[:9]` so the payload is not copied. The caller must hand `data_to_send()` to
        the socket before it reuses `buffer`. Falls back to `send_data` when the frame
        does not fit the windows or the peer's frame size."""
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or stream.pending
            or length > stream.send_window
            or length > self._send_window
            or length > self._peer_max_frame
            or stream.local_closed
        ):
            return self.send_data(stream_id, buffer[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length])
        FRAME_HEADER.pack_into(buffer, 0, length << 8, 0, stream_id)
        stream.send_window -= length
        self._send_window -= length
        self._out.append(buffer[: FRAME_HEADER_SIZE + length])
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (the app sent EOF)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        if stream.pending:
            stream.pending_end = True
            return
        self._emit_data(stream, memoryview(b""), True)

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        if self._streams.pop(stream_id, None) is not None and not self.closed:
            self._out.append(pack_frame(FrameType.RST_STREAM, 0, stream_id, U32.pack(code)))

    def acknowledge(self, stream_id: int, length: int, stream_level: bool = True) -> None:
        """Return receive credit for `length` delivered bytes. The connection window is always
        reopened; the stream window only with `stream_level` (withheld while the app is slow,
        which is how backpressure reaches the peer without stalling other tunnels)."""
        self._conn_unacked += length
        if self._conn_unacked >= self.settings.connection_window // 4:
            self._out.append(
                pack_frame(FrameType.WINDOW_UPDATE, 0, 0, U32.pack(self._conn_unacked))
            )
            self._recv_window += self._conn_unacked
            self._conn_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.unacked += length
        if stream_level:
            self._ack_stream(stream, force=False)

    def release_stream_credit(self, stream_id: int) -> None:
        """The app caught up: give back all stream credit withheld so far."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._ack_stream(stream, force=True)

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        self._out.append(pack_frame(FrameType.PING, 0, 0, payload[:8].ljust(8, b"\0")))

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY(NO_ERROR); open tunnels finish, new ones are refused."""
        if self.closed or self.draining:
            return
        self.draining = True
        self._out.append(
            pack_frame(
                FrameType.GOAWAY,
                0,
                0,
                GOAWAY_HEAD.pack(self._highest_remote_id, ErrorCode.NO_ERROR),
            )
        )

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self._out.append(
            pack_frame(
                FrameType.GOAWAY,
                0,
                0,
                GOAWAY_HEAD.pack(self._highest_remote_id, code) + reason.encode()[:256],
            )
        )
        self._streams.clear()

    # ------------------------------------------------------------------ public: time

    def next_deadline(self) -> float | None:
        if self.closed:
            return None
        s = self.settings
        if self._ping_outstanding:
            return self._last_received + s.keepalive_timeout
        return self._last_received + s.keepalive_interval

    def handle_timer(self, now: float) -> list[Event]:
        if self.closed:
            return []
        s = self.settings
        if now - self._last_received >= s.keepalive_timeout:
            self.close(ErrorCode.NO_ERROR, "keepalive timeout")
            return [ConnectionTerminated(ErrorCode.NO_ERROR, "keepalive timeout", remote=False)]
        if not self._ping_outstanding and now - self._last_received >= s.keepalive_interval:
            self._ping_outstanding = True
            self.ping(b"ztkeepal")
        return []

    # -------------------------------------------------------------- public: receiving

    def receive_data(self, data: bytes | memoryview, now: float = 0.0) -> list[Event]:
        if self.closed:
            return []
        self._last_received = now
        self._ping_outstanding = False
        events: list[Event] = []
        try:
            self._receive(memoryview(data), events)
        except _ConnectionError as exc:
            self.close(exc.code, exc.reason)
            events.append(ConnectionTerminated(exc.code, exc.reason, remote=False))
        return events

    # ---------------------------------------------------------------- internals: parse

    def _receive(self, view: memoryview, events: list[Event]) -> None:
        pos = 0
        end = len(view)
        if self._preface_left:
            take = min(self._preface_left, end)
            offset = len(PREFACE) - self._preface_left
            if view[:take] != PREFACE[offset : offset + take]:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            self._preface_left -= take
            pos = take
        while pos < end and not self.closed:
            state = self._state
            if state == _HEADER:
                if self._partial or end - pos < FRAME_HEADER_SIZE:
                    take = min(FRAME_HEADER_SIZE - len(self._partial), end - pos)
                    self._partial += view[pos : pos + take]
                    pos += take
                    if len(self._partial) < FRAME_HEADER_SIZE:
                        return
                    word, flags, sid = FRAME_HEADER.unpack(self._partial)
                    self._partial.clear()
                else:
                    word, flags, sid = FRAME_HEADER.unpack_from(view, pos)
                    pos += FRAME_HEADER_SIZE
                self._begin_frame(word >> 8, word & 0xFF, flags, sid & MAX_WINDOW, events)
            elif state == _DATA:
                take = min(self._left, end - pos)
                self._left -= take
                if self._fstream in self._streams:
                    events.append(DataReceived(self._fstream, view[pos : pos + take]))
                else:
                    self.acknowledge(self._fstream, take)
                pos += take
                if self._left == 0:
                    self._end_data_payload(events)
            elif state == _PAYLOAD:
                take = min(self._left, end - pos)
                self._partial += view[pos : pos + take]
                self._left -= take
                pos += take
                if self._left == 0:
                    payload = bytes(self._partial)
                    self._partial.clear()
                    self._state = _HEADER
                    self._dispatch(payload, events)
            elif state == _DATA_PAD_LENGTH:
                self._pad = view[pos]
                pos += 1
                self._left -= 1
                if self._pad > self._left:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA padding too long")
                self._left -= self._pad
                self.acknowledge(self._fstream, self._pad + 1, stream_level=True)
                self._state = _DATA if self._left else _DATA_PADDING
                if self._state == _DATA_PADDING and not self._pad:
                    self._end_data_payload(events)
            else:  # _DATA_PADDING
                take = min(self._pad, end - pos)
                self._pad -= take
                pos += take
                if self._pad == 0:
                    self._end_data_payload(events)

    def _begin_frame(
        self, length: int, ftype: int, flags: int, sid: int, events: list[Event]
    ) -> None:
        if length > self.settings.max_frame_size:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
        if self._continuation_stream and (
            ftype != FrameType.CONTINUATION or sid != self._continuation_stream
        ):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        self._ftype, self._flags, self._fstream, self._left = ftype, flags, sid, length
        if ftype == FrameType.DATA:
            self._begin_data(length, flags, sid)
            if length == 0:
                self._end_data_payload(events)
            elif flags & Flag.PADDED:
                self._state = _DATA_PAD_LENGTH
            else:
                self._state = _DATA
            return
        if length == 0:
            self._state = _HEADER
            self._dispatch(b"", events)
        else:
            self._state = _PAYLOAD

    def _begin_data(self, length: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._recv_window:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_window -= length
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we closed: the bytes are discarded (and acknowledged)
        if stream.remote_closed:
            raise _ConnectionError(ErrorCode.STREAM_CLOSED, f"DATA after END_STREAM on {sid}")
        if length > stream.recv_window:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, f"stream {sid} window exceeded")
        stream.recv_window -= length

    def _end_data_payload(self, events: list[Event]) -> None:
        self._state = _HEADER
        if self._flags & Flag.END_STREAM:
            stream = self._streams.get(self._fstream)
            if stream is not None:
                stream.remote_closed = True
                events.append(StreamEnded(stream.id))
                self._maybe_forget(stream)

    def _is_idle(self, sid: int) -> bool:
        if (sid & 1) == (1 if self.role is Role.CLIENT else 0):  # our own stream ids
            return sid >= self._next_stream_id
        return sid > self._highest_remote_id

    def _dispatch(self, payload: bytes, events: list[Event]) -> None:
        ftype, flags, sid = self._ftype, self._flags, self._fstream
        try:
            if ftype == FrameType.HEADERS:
                self._on_headers(payload, flags, sid, events)
            elif ftype == FrameType.CONTINUATION:
                self._on_continuation(payload, flags, sid, events)
            elif ftype == FrameType.SETTINGS:
                self._on_settings(payload, flags, sid, events)
            elif ftype == FrameType.WINDOW_UPDATE:
                self._on_window_update(payload, sid, events)
            elif ftype == FrameType.PING:
                self._on_ping(payload, flags, sid, events)
            elif ftype == FrameType.RST_STREAM:
                self._on_rst_stream(payload, sid, events)
            elif ftype == FrameType.GOAWAY:
                self._on_goaway(payload, sid, events)
            elif ftype == FrameType.PRIORITY:
                if sid == 0 or len(payload) != 5:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed PRIORITY")
            elif ftype == FrameType.PUSH_PROMISE:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
            # Unknown frame types are ignored (RFC 9113 5.5).
        except _StreamError as exc:
            self._streams.pop(exc.stream_id, None)
            self._out.append(pack_frame(FrameType.RST_STREAM, 0, exc.stream_id, U32.pack(exc.code)))
            events.append(StreamReset(exc.stream_id, exc.code, remote=False))

    # --------------------------------------------------------------- internals: frames

    def _on_headers(self, payload: bytes, flags: int, sid: int, events: list[Event]) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & Flag.PADDED:
            if not payload:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS too short")
            start = 1
            end -= payload[0]
        if flags & Flag.PRIORITY:
            start += 5
        if start > end:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding too long")
        self._header_block = bytearray(payload[start:end])
        self._check_block_size()
        if flags & Flag.END_HEADERS:
            self._header_block_done(sid, flags, events)
        else:
            self._continuation_stream = sid
            self._continuation_flags = flags

    def _on_continuation(self, payload: bytes, flags: int, sid: int, events: list[Event]) -> None:
        if sid == 0 or sid != self._continuation_stream:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._header_block += payload
        self._check_block_size()
        if flags & Flag.END_HEADERS:
            self._continuation_stream = 0
            self._header_block_done(sid, self._continuation_flags, events)

    def _check_block_size(self) -> None:
        if len(self._header_block) > self.settings.max_header_block:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def _header_block_done(self, sid: int, flags: int, events: list[Event]) -> None:
        block = bytes(self._header_block)
        self._header_block = bytearray()
        simple = decode_simple_headers(block)
        try:
            if simple is not None:
                if (
                    sum(len(k) + len(v) + 32 for k, v in simple)
                    > self.settings.max_header_list_size
                ):
                    raise hpack.OversizedHeaderListError("header list too large")
                headers: Headers = simple
            else:
                headers = [(str(k), str(v)) for k, v in self._decoder.decode(block, raw=False)]
        except hpack.OversizedHeaderListError:
            # The decoder state stayed consistent; only this request is refused.
            self._note_remote_stream(sid)
            raise _StreamError(sid, ErrorCode.REFUSED_STREAM, "header list too large") from None
        except (hpack.HPACKError, UnicodeDecodeError, ValueError) as exc:
            raise _ConnectionError(
                ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}"
            ) from None
        end_stream = bool(flags & Flag.END_STREAM)
        if self.role is Role.SERVER:
            self._on_request(sid, headers, end_stream, events)
        else:
            self._on_response(sid, headers, end_stream, events)

    def _note_remote_stream(self, sid: int) -> None:
        if sid > self._highest_remote_id:
            self._highest_remote_id = sid

    def _on_request(
        self, sid: int, headers: Headers, end_stream: bool, events: list[Event]
    ) -> None:
        stream = self._streams.get(sid)
        if stream is not None:
            # Trailers: only as the end of the client's data.
            if not end_stream:
                raise _StreamError(sid, ErrorCode.PROTOCOL_ERROR, "HEADERS mid-stream")
            stream.remote_closed = True
            events.append(StreamEnded(sid))
            self._maybe_forget(stream)
            return
        if sid % 2 == 0 or sid <= self._highest_remote_id:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"bad new stream id {sid}")
        self._highest_remote_id = sid
        if self.draining:
            raise _StreamError(sid, ErrorCode.REFUSED_STREAM, "draining")
        if len(self._streams) >= self.settings.max_concurrent_streams:
            raise _StreamError(sid, ErrorCode.REFUSED_STREAM, "too many streams")
        try:
            method, authority = request_target(headers)
        except MalformedRequest as exc:
            raise _StreamError(sid, ErrorCode.PROTOCOL_ERROR, str(exc)) from None
        stream = _Stream(sid, self._peer_initial_window, self.settings.stream_window)
        stream.remote_closed = end_stream
        self._streams[sid] = stream
        events.append(ConnectRequest(sid, method, authority, headers))

    def _on_response(
        self, sid: int, headers: Headers, end_stream: bool, events: list[Event]
    ) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
            return
        if stream.responded:
            if not end_stream:
                raise _StreamError(sid, ErrorCode.PROTOCOL_ERROR, "HEADERS mid-stream")
            stream.remote_closed = True
            events.append(StreamEnded(sid))
            self._maybe_forget(stream)
            return
        status_text = next((v for k, v in headers if k == ":status"), "")
        if not (len(status_text) == 3 and status_text.isascii() and status_text.isdigit()):
            raise _StreamError(sid, ErrorCode.PROTOCOL_ERROR, "response without :status")
        status = int(status_text)
        if 100 <= status < 200:
            return  # informational
        stream.responded = True
        rest = [(k, v) for k, v in headers if not k.startswith(":")]
        events.append(ResponseReceived(sid, status, rest))
        if end_stream:
            stream.remote_closed = True
            events.append(StreamEnded(sid))
            self._maybe_forget(stream)

    def _on_settings(self, payload: bytes, flags: int, sid: int, events: list[Event]) -> None:
        if sid != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length")
        for offset in range(0, len(payload), 6):
            code, value = SETTING.unpack_from(payload, offset)
            if code == SettingCode.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                if delta > 0:
                    self._flush_pending(events)
            elif code == SettingCode.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 16_777_215:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self._peer_max_frame = value
            elif code == SettingCode.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif code == SettingCode.ENABLE_PUSH and value > 1:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad ENABLE_PUSH")
        self._out.append(pack_frame(FrameType.SETTINGS, Flag.ACK, 0))
        events.append(SettingsReceived(self.peer_max_concurrent_streams))

    def _on_window_update(self, payload: bytes, sid: int, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = U32.unpack(payload)[0] & MAX_WINDOW
        if sid == 0:
            if increment == 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_pending(events)
            return
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle {sid}")
            return
        if increment == 0:
            raise _StreamError(sid, ErrorCode.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise _StreamError(sid, ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
        if stream.pending or stream.pending_end:
            self._flush_stream(stream, events)

    def _on_ping(self, payload: bytes, flags: int, sid: int, events: list[Event]) -> None:
        if sid != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING length")
        if flags & Flag.ACK:
            events.append(PingAcknowledged(payload))
        else:
            self._out.append(pack_frame(FrameType.PING, Flag.ACK, 0, payload))

    def _on_rst_stream(self, payload: bytes, sid: int, events: list[Event]) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length")
        if self._is_idle(sid):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle {sid}")
        if self._streams.pop(sid, None) is not None:
            events.append(StreamReset(sid, U32.unpack(payload)[0], remote=True))

    def _on_goaway(self, payload: bytes, sid: int, events: list[Event]) -> None:
        if sid != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length")
        last, code = GOAWAY_HEAD.unpack_from(payload)
        last &= MAX_WINDOW
        self.goaway_received = True
        events.append(GoAwayReceived(last, code, payload[8:]))
        if self.role is Role.CLIENT:
            for stream_id in [s for s in self._streams if s > last]:
                del self._streams[stream_id]
                events.append(StreamReset(stream_id, ErrorCode.REFUSED_STREAM, remote=True))

    # --------------------------------------------------------------- internals: send

    def _send_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        block = encode_headers(headers)
        max_frame = self._peer_max_frame
        flags = Flag.END_STREAM if end_stream else 0
        if len(block) <= max_frame:
            self._out.append(pack_frame(FrameType.HEADERS, flags | Flag.END_HEADERS, sid, block))
            return
        chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
        self._out.append(pack_frame(FrameType.HEADERS, flags, sid, chunks[0]))
        for i, chunk in enumerate(chunks[1:], start=2):
            last = Flag.END_HEADERS if i == len(chunks) else 0
            self._out.append(pack_frame(FrameType.CONTINUATION, last, sid, chunk))

    def _emit_data(self, stream: _Stream, view: memoryview, end_stream: bool) -> int:
        """Queue as much of `view` as the windows allow; returns the bytes taken."""
        total = len(view)
        sent = 0
        while sent < total:
            size = min(total - sent, stream.send_window, self._send_window, self._peer_max_frame)
            if size <= 0:
                return sent
            last = end_stream and sent + size == total
            flags = Flag.END_STREAM if last else 0
            self._out.append(FRAME_HEADER.pack((size << 8), flags, stream.id))
            self._out.append(view[sent : sent + size])
            stream.send_window -= size
            self._send_window -= size
            sent += size
        if end_stream and total == 0:
            self._out.append(FRAME_HEADER.pack(0, Flag.END_STREAM, stream.id))
        if end_stream:
            stream.local_closed = True
            self._maybe_forget(stream)
        return sent

    def _flush_pending(self, events: list[Event]) -> None:
        for stream in list(self._streams.values()):
            if stream.pending or stream.pending_end:
                self._flush_stream(stream, events)
                if self._send_window <= 0:
                    return

    def _flush_stream(self, stream: _Stream, events: list[Event]) -> None:
        data, end = stream.pending, stream.pending_end
        if data:
            # The queued frames keep their own copy: `pending` is edited below.
            sent = self._emit_data(stream, memoryview(bytes(data)), end)
            del data[:sent]
            if data:
                return
        elif end:
            self._emit_data(stream, memoryview(b""), True)
        stream.pending_end = False
        events.append(SendUnblocked(stream.id))

    def _ack_stream(self, stream: _Stream, force: bool) -> None:
        if stream.remote_closed or not stream.unacked:
            return
        if force or stream.unacked >= self.settings.stream_window // 4:
            self._out.append(
                pack_frame(FrameType.WINDOW_UPDATE, 0, stream.id, U32.pack(stream.unacked))
            )
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._streams.pop(stream.id, None)
