"""Telling HTTP/2, HTTP/1.x and opaque TCP apart from the first bytes of a stream."""

from __future__ import annotations

import asyncio
import re
from typing import Literal

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_REQUEST_LINE = 8 * 1024
"""How long `detect_protocol` waits for an HTTP/1.x request line before calling it TCP."""

Protocol = Literal["http2", "http1", "tcp", "more"]

_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e\x80-\xff]+ HTTP/1\.[01]\r\n")


def detect_protocol(data: bytes) -> Protocol:
    """From the first bytes of a stream: the HTTP/2 preface -> "http2"; an HTTP/1.x request line
    (token method, SP, target, SP, HTTP/1.0 or HTTP/1.1, CRLF) -> "http1"; "more" while the bytes
    so far are a prefix of either and shorter than needed (at most 8 KiB for a request line);
    anything else -> "tcp"."""
    if not data:
        return "more"
    if data.startswith(HTTP2_PREFACE):
        return "http2"
    if HTTP2_PREFACE.startswith(data):
        return "more"
    end = data.find(b"\r\n", 0, MAX_REQUEST_LINE)
    if end >= 0:
        return "http1" if _REQUEST_LINE.fullmatch(data, 0, end + 2) else "tcp"
    if len(data) >= MAX_REQUEST_LINE:
        return "tcp"
    return "more" if _is_request_line_prefix(data) else "tcp"


def _is_request_line_prefix(data: bytes) -> bool:
    """Whether `data` (no CRLF in it) can still grow into a valid HTTP/1.x request line."""
    parts = data.split(b" ")
    if len(parts) > 3:
        return False
    method = parts[0]
    if not all(c in _TOKEN_CHARS for c in method):
        return False
    if len(parts) == 1:
        return True
    if not method:
        return False
    target = parts[1]
    if any(c <= 0x20 or c == 0x7F for c in target):
        return False
    if len(parts) == 2:
        return True
    if not target:
        return False
    version = parts[2]
    return any((v + b"\r").startswith(version) for v in (b"HTTP/1.0", b"HTTP/1.1"))


async def sniff_protocol(reader: asyncio.StreamReader) -> tuple[Protocol, bytes]:
    """Read from `reader` until `detect_protocol` decides; returns the answer and the bytes read
    (to pass on as `early`). At end of stream an undecided prefix counts as "tcp"."""
    data = b""
    while True:
        kind = detect_protocol(data)
        if kind != "more":
            return kind, data
        chunk = await reader.read(MAX_REQUEST_LINE)
        if not chunk:
            return "tcp", data
        data += chunk
