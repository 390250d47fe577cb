"""The per-stream state of an HBONE session and the two ways a peer's frames fail
(RFC 9113 5.4): a stream error resets one stream, a connection error ends the connection.
Pure data, used by `session.py` only."""

from __future__ import annotations

from ztagent.hbone.frames import ErrorCode


class ConnectionFault(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class StreamFault(Exception):
    def __init__(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.stream_id = stream_id
        self.code = code


class Stream:
    __slots__ = (
        "id",
        "local_closed",
        "opened",
        "pending",
        "pending_end",
        "recv_window",
        "remote_closed",
        "responded",
        "send_window",
        "unacked",
    )

    def __init__(
        self, stream_id: int, send_window: int, recv_window: int, opened: float = 0.0
    ) -> None:
        self.id = stream_id
        self.opened = opened
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0
        self.local_closed = False
        self.remote_closed = False
        self.responded = False
        self.pending = bytearray()
        self.pending_end = False
