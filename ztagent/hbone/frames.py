"""HTTP/2 wire constants and the few byte-level helpers HBONE needs (RFC 9113): frame
types, flags, error and setting codes, the session's `Settings`, frame packing, and the
`ip:port` form of a CONNECT's `:authority`. Header blocks (HPACK) are in `headers.py`.

Pure data: no state, no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# 24-bit length and 8-bit type share the first word; then flags, then the stream id.
FRAME_HEADER = struct.Struct(">IBI")
FRAME_HEADER_SIZE = 9
SETTING = struct.Struct(">HI")
U32 = struct.Struct(">I")
GOAWAY_HEAD = struct.Struct(">II")
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384


class FrameType:
    """Frame type codes (plain ints: they are compared on every frame)."""

    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    """Frame flags (plain ints: enum flag arithmetic is slow on the hot path)."""

    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SettingCode:
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Settings:
    """What one side of an HBONE connection advertises and enforces (ztunnel's values)."""

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB
    max_concurrent_streams: int = 200
    max_header_list_size: int = 16 * 1024
    # Compressed bytes of one header block, CONTINUATIONs included: a flood guard. A block
    # within the header list limit is never larger than the list (HPACK only shrinks), so the
    # same 16 KiB (Envoy caps both with `max_request_headers_kb`, 60 by default).
    max_header_block: int = 16 * 1024
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0


def pack_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return FRAME_HEADER.pack((length << 8) | ftype, flags, stream_id)


def pack_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack((len(payload) << 8) | ftype, flags, stream_id) + payload


def ascii_digits(text: str) -> bool:
    """Only 0-9 (`str.isdigit` also takes other scripts' digits, which `int` then reads)."""
    return text.isascii() and text.isdigit()


def parse_port(text: str) -> int:
    """A TCP port in ASCII digits, 1-65535; ValueError otherwise. The one place a port from a
    peer is read, so one header cannot mean two ports."""
    if not ascii_digits(text) or len(text) > 5 or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def parse_authority(authority: str) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` -> (ip, port); ValueError with the reason otherwise. An
    IPv4-mapped IPv6 address comes back as the IPv4 address it stands for."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host:
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"authority {authority!r}: brackets are for IPv6 only")
    elif ":" in host:
        raise ValueError(f"authority {authority!r}: IPv6 needs brackets")
    try:
        port = parse_port(port_text)
    except ValueError:
        raise ValueError(f"authority {authority!r}: bad port") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        ip = socket.inet_ntop(family, socket.inet_pton(family, host))  # normal form
    except OSError:
        raise ValueError(f"authority {authority!r}: host is not an IP address") from None
    if family == socket.AF_INET6:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
        if mapped is not None:
            ip = str(mapped)
    return ip, port


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
