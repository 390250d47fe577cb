"""HTTP/2 header blocks as HBONE uses them: a stateless HPACK encoder, a decoder for the blocks
it writes (anything else goes to the full `hpack` decoder), and the validation of a CONNECT's
request header list. Pure functions: no state, no I/O.
"""

from __future__ import annotations

import hpack

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


def decode_block(decoder: hpack.Decoder, block: bytes, max_list_size: int) -> list[tuple[str, str]]:
    """Decode a header block: the blocks `encode_headers` writes without touching the decoder,
    the rest through it. Octets are read as Latin-1 on both paths, so one block means the
    same whichever decodes it. Raises `hpack.OversizedHeaderListError` past `max_list_size`
    (RFC 9113 size: name + value + 32 per field), other `hpack.HPACKError`s if malformed."""
    simple = decode_simple_headers(block)
    if simple is None:
        return [
            (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
            for k, v in decoder.decode(block, raw=True)
        ]
    if sum(len(k) + len(v) + 32 for k, v in simple) > max_list_size:
        raise hpack.OversizedHeaderListError("header list too large")
    return simple


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


# ------------------------------------------------------------ request validation

_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


class MalformedRequest(ValueError):
    """A request header list that RFC 9113 8.2-8.3 does not allow."""


def request_target(headers: list[tuple[str, str]]) -> tuple[str, str]:
    """Validate a request header list (RFC 9113 8.2-8.3); returns (method, authority)."""
    method = authority = ""
    seen_regular = False
    seen_pseudo: set[str] = set()
    for name, value in headers:
        if name != name.lower() or not name:
            raise MalformedRequest(f"header name {name!r}")
        if name.startswith(":"):
            if seen_regular:
                raise MalformedRequest("pseudo-header after headers")
            if name in seen_pseudo:
                # RFC 9113 8.3: each pseudo-header at most once (h2 and Envoy refuse a second
                # `:authority` instead of letting the last one win).
                raise MalformedRequest(f"duplicate {name}")
            seen_pseudo.add(name)
            if name == ":method":
                method = value
            elif name == ":authority":
                authority = value
            elif name not in (":scheme", ":path"):
                raise MalformedRequest(f"pseudo-header {name}")
        else:
            seen_regular = True
            if name in _CONNECTION_HEADERS or (name == "te" and value != "trailers"):
                raise MalformedRequest(f"header {name}")
    if not method:
        raise MalformedRequest("request without :method")
    return method, authority
