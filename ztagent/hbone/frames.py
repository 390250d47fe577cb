"""HTTP/2 wire constants and the few byte-level helpers HBONE needs (RFC 9113).

Pure data: no state, no I/O. The session in `session.py` is the only user.
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
    # Compressed bytes of one header block, CONTINUATIONs included: a flood guard.
    max_header_block: int = 64 * 1024
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0


def pack_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return FRAME_HEADER.pack((length << 8) | ftype, flags, stream_id)


def pack_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack((len(payload) << 8) | ftype, flags, stream_id) + payload


def parse_authority(authority: str) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` -> (ip, port); ValueError with the reason otherwise."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host:
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"authority {authority!r}: brackets are for IPv6 only")
    elif ":" in host:
        raise ValueError(f"authority {authority!r}: IPv6 needs brackets")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"authority {authority!r}: bad port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        ip = socket.inet_ntop(family, socket.inet_pton(family, host))  # normal form
    except OSError:
        raise ValueError(f"authority {authority!r}: host is not an IP address") from None
    return ip, int(port_text)


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# ------------------------------------------------------------------ HPACK encoding

# RFC 7541 Appendix A: the static table entries a CONNECT exchange can use.
_STATIC_FULL = {
    (":status", "200"): 8,
    (":status", "204"): 9,
    (":status", "206"): 10,
    (":status", "304"): 11,
    (":status", "400"): 12,
    (":status", "404"): 13,
    (":status", "500"): 14,
    (":method", "GET"): 2,
    (":method", "POST"): 3,
}
_STATIC_NAME = {
    ":authority": 1,
    ":method": 2,
    ":path": 4,
    ":scheme": 6,
    ":status": 8,
    "content-length": 28,
    "content-type": 31,
    "date": 33,
    "host": 38,
    "user-agent": 58,
    "via": 60,
}


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode("latin-1")
    return _hpack_int(len(raw), 7, 0) + raw


_STATIC_TABLE = (
    None,
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)


class _NotSimple(Exception):
    pass


def _read_int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise _NotSimple
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(data) or data[pos] & 0x80:  # Huffman-coded
        raise _NotSimple
    length, pos = _read_int(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise _NotSimple
    return data[pos:end].decode("latin-1"), end


def decode_simple_headers(data: bytes) -> list[tuple[str, str]] | None:
    """Decode a header block that leaves the HPACK dynamic table alone (static indexes and
    literals without indexing, no Huffman: what `encode_headers` writes). Returns None for
    anything else, which then goes to the full decoder; nothing here changes decoder state."""
    out = []
    pos = 0
    try:
        while pos < len(data):
            first = data[pos]
            if first & 0x80:
                index, pos = _read_int(data, pos, 7)
                if not 0 < index < len(_STATIC_TABLE):
                    return None
                entry = _STATIC_TABLE[index]
                assert entry is not None
                out.append(entry)
            elif first & 0xE0 in (0x00, 0x10):  # literal without indexing / never indexed
                index, pos = _read_int(data, pos, 4)
                if index:
                    if index >= len(_STATIC_TABLE):
                        return None
                    entry = _STATIC_TABLE[index]
                    assert entry is not None
                    name = entry[0]
                else:
                    name, pos = _read_string(data, pos)
                value, pos = _read_string(data, pos)
                out.append((name, value))
            else:
                return None
    except _NotSimple:
        return None
    return out


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    """HPACK-encode with static-table indexes and literals *without indexing*, no Huffman.

    Never touching the dynamic table makes the encoder stateless (and cheap, which matters
    at thousands of tunnels a second); every HPACK decoder accepts the result.
    """
    out = []
    for name, value in headers:
        index = _STATIC_FULL.get((name, value))
        if index is not None:
            out.append(bytes((0x80 | index,)))
            continue
        name_index = _STATIC_NAME.get(name)
        if name_index is not None:
            out.append(_hpack_int(name_index, 4, 0x00) + _hpack_string(value))
        else:
            out.append(b"\x00" + _hpack_string(name) + _hpack_string(value))
    return b"".join(out)
