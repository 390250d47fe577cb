"""What one HTTP/2 peer may cost an HBONE connection: the budgets a session checks as frames
come in, without I/O (time is an input). Each answers None (within budget) or the reason the
connection ends with GOAWAY ENHANCE_YOUR_CALM.

    rapid reset (CVE-2023-44487)   RST_STREAM received: a token bucket (nghttp2's
                                   `stream_reset_rate_limit`); streams reset before they lived
                                   a second, as a share of all closed (Envoy's premature reset)
    cheap frames                   consecutive frames with an empty payload, CONTINUATIONs per
                                   header block, PRIORITY per stream, WINDOW_UPDATE per DATA
                                   frame sent (Envoy's flood budgets; nghttp2's CONTINUATIONs)
"""

from __future__ import annotations

from dataclasses import dataclass

from ztagent.hbone.frames import Flag, FrameType


@dataclass(frozen=True, slots=True)
class Budgets:
    # nghttp2 `nghttp2_option_set_stream_reset_rate_limit`: a burst of 1000 RST_STREAM,
    # refilled at 33 a second.
    reset_burst: int = 1000
    reset_rate: float = 33.0
    # Envoy `overload.premature_reset_total_stream_count` (500) and
    # `premature_reset_min_stream_lifetime_seconds` (1): once 500 streams closed, at least
    # half of them reset within a second of opening ends the connection.
    premature_reset_streams: int = 500
    premature_reset_lifetime: float = 1.0
    # Envoy `max_consecutive_inbound_frames_with_empty_payload` (1).
    max_consecutive_empty_frames: int = 1
    # nghttp2 `NGHTTP2_DEFAULT_MAX_CONTINUATIONS` (8).
    max_continuations: int = 8
    # Envoy `max_inbound_priority_frames_per_stream` (100).
    max_priority_per_stream: int = 100
    # Envoy `max_inbound_window_update_frames_per_data_frame_sent` (10).
    max_window_updates_per_data_sent: int = 10
    # Envoy `max_outbound_control_frames` (1000): control frames (PING and SETTINGS acks,
    # RST_STREAM, WINDOW_UPDATE, GOAWAY) written but not yet taken by the peer's socket.
    max_outbound_control_frames: int = 1000
    # Non-DATA frames in one read past which the connection lets the event loop run others
    # and reads in small pieces (a flood of cheap frames must not starve other connections).
    frames_per_batch: int = 500


DEFAULT_BUDGETS = Budgets()


class FloodGuard:
    """The running counts of one connection against its `Budgets`."""

    __slots__ = (
        "_empty_run",
        "_reset_tokens",
        "_reset_updated",
        "b",
        "batch_frames",
        "closed_streams",
        "continuations",
        "data_sent",
        "premature_resets",
        "priority_frames",
        "streams_opened",
        "window_updates",
    )

    def __init__(self, budgets: Budgets = DEFAULT_BUDGETS, now: float = 0.0) -> None:
        self.b = budgets
        self._reset_tokens = float(budgets.reset_burst)
        self._reset_updated = now
        self.streams_opened = 0
        self.closed_streams = 0
        self.premature_resets = 0
        self._empty_run = 0
        self.continuations = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.data_sent = 0
        self.batch_frames = 0

    # ----------------------------------------------------------------- rapid reset

    def rst_received(self, now: float) -> str | None:
        b = self.b
        tokens = self._reset_tokens + (now - self._reset_updated) * b.reset_rate
        self._reset_updated = now
        tokens = min(float(b.reset_burst), tokens) - 1
        self._reset_tokens = max(tokens, 0.0)
        if tokens < 0:
            return "too many RST_STREAM frames"
        return None

    def stream_opened(self) -> None:
        self.streams_opened += 1

    def stream_closed(self, lifetime: float, reset: bool) -> str | None:
        b = self.b
        self.closed_streams += 1
        if reset and lifetime < b.premature_reset_lifetime:
            self.premature_resets += 1
        if (
            self.closed_streams >= b.premature_reset_streams
            and self.premature_resets * 2 >= self.closed_streams
        ):
            return f"{self.premature_resets} of {self.closed_streams} streams reset prematurely"
        return None

    # ---------------------------------------------------------------- cheap frames

    def frame(self, ftype: int, length: int, flags: int) -> str | None:
        """Called for every frame header received."""
        b = self.b
        if ftype == FrameType.DATA:  # the data path: one test for the common case
            if length or flags & Flag.END_STREAM:
                self._empty_run = 0
                return None
            self._empty_run += 1
            if self._empty_run > b.max_consecutive_empty_frames:
                return "too many frames with an empty payload"
            return None
        self.batch_frames += 1
        if length == 0 and (
            ftype in (FrameType.HEADERS, FrameType.CONTINUATION) and not flags & Flag.END_HEADERS
        ):
            self._empty_run += 1
            if self._empty_run > b.max_consecutive_empty_frames:
                return "too many frames with an empty payload"
        elif ftype in (FrameType.HEADERS, FrameType.CONTINUATION):
            self._empty_run = 0
        if ftype == FrameType.HEADERS:
            self.continuations = 0
        elif ftype == FrameType.CONTINUATION:
            self.continuations += 1
            if self.continuations > b.max_continuations:
                return "too many CONTINUATION frames"
        elif ftype == FrameType.PRIORITY:
            self.priority_frames += 1
            if self.priority_frames > b.max_priority_per_stream * (1 + self.streams_opened):
                return "too many PRIORITY frames"
        elif ftype == FrameType.WINDOW_UPDATE:
            self.window_updates += 1
            # Envoy's formula: 1 + 2 * (streams + per-DATA budget * DATA frames sent).
            allowed = 1 + 2 * (
                self.streams_opened + b.max_window_updates_per_data_sent * self.data_sent
            )
            if self.window_updates > allowed:
                return "too many WINDOW_UPDATE frames"
        return None

    def take_batch(self) -> bool:
        """Whether the frames since the last call spent a batch (time to yield); starts anew."""
        spent = self.batch_frames >= self.b.frames_per_batch
        self.batch_frames = 0
        return spent
