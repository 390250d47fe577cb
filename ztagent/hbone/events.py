"""What an `HboneSession` reports: one event per thing that happened on the connection.

The session returns them from `receive_data` and `handle_timer`; the connection owner
(`connection.py`) acts on them. Plain data: no state, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Server side: the peer asked for a tunnel. The session has answered nothing: the
    owner checks that `method` is CONNECT and `authority` an address, then responds."""

    stream_id: int
    method: str
    authority: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client side: the final status of a CONNECT."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel payload. `data` is a slice of the buffer given to `receive_data`: use or copy it
    before that buffer is reused. Acknowledge it with `acknowledge` once it has been delivered."""

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the tunnel (END_STREAM)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The tunnel is gone: reset by the peer (`remote`) or by this session after a stream error."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class SendUnblocked:
    """Flow-control credit arrived and queued data for this stream went out; read more."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    max_concurrent_streams: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The session is closed; the owner should flush `data_to_send()` and close the socket."""

    error_code: int
    reason: str
    remote: bool


Event = (
    ConnectRequest
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | SendUnblocked
    | SettingsReceived
    | PingAcknowledged
    | GoAwayReceived
    | ConnectionTerminated
)
