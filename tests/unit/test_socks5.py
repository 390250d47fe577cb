"""SOCKS5 handshake parsing in memory: good requests, malformed input, and properties."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztagent.errors import LocalError
from ztagent.socks5.handshake import (
    AddressType,
    ConnectRequested,
    Event,
    Failed,
    NeedMore,
    Reply,
    Socks5Handshake,
    encode_reply,
)

GREETING = b"\x05\x01\x00"


def connect_v4(ip: str, port: int) -> bytes:
    return b"\x05\x01\x00\x01" + ipaddress.IPv4Address(ip).packed + struct.pack("!H", port)


def connect_v6(ip: str, port: int) -> bytes:
    return b"\x05\x01\x00\x04" + ipaddress.IPv6Address(ip).packed + struct.pack("!H", port)


def connect_name(name: bytes, port: int) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port)


def feed(chunks: list[bytes]) -> tuple[Event, bytes]:
    """Feed chunks until a terminal event; return it and everything queued to send."""
    hs = Socks5Handshake()
    out = b""
    event: Event = NeedMore()
    for chunk in chunks:
        event = hs.receive_data(chunk)
        out += hs.data_to_send()
        if not isinstance(event, NeedMore):
            break
    return event, out


def test_connect_ipv4_in_one_chunk_with_early_data() -> None:
    event, out = feed([GREETING + connect_v4("127.0.2.1", 8080) + b"GET / HTTP/1.1\r\n"])
    assert out == b"\x05\x00"
    assert event == ConnectRequested("127.0.2.1", 8080, AddressType.IPV4, b"GET / HTTP/1.1\r\n")


def test_connect_ipv6_and_domain() -> None:
    event, _ = feed([GREETING, connect_v6("fd00::1", 443)])
    assert event == ConnectRequested("fd00::1", 443, AddressType.IPV6)
    event, _ = feed([b"\x05\x02\x02\x00", connect_name(b"echo.prod.svc.cluster.local", 80)])
    assert event == ConnectRequested("echo.prod.svc.cluster.local", 80, AddressType.DOMAIN)


def test_need_more_until_complete() -> None:
    hs = Socks5Handshake()
    assert isinstance(hs.receive_data(b"\x05"), NeedMore)
    assert isinstance(hs.receive_data(b"\x01"), NeedMore)
    assert hs.data_to_send() == b""
    assert isinstance(hs.receive_data(b"\x00\x05\x01"), NeedMore)
    assert hs.data_to_send() == b"\x05\x00"
    rest = connect_v4("10.0.0.1", 1)[2:]
    for b in rest[:-1]:
        assert isinstance(hs.receive_data(bytes([b])), NeedMore)
    assert hs.receive_data(rest[-1:]) == ConnectRequested("10.0.0.1", 1, AddressType.IPV4)
    assert hs.done
    with pytest.raises(LocalError):
        hs.receive_data(b"more")


def test_no_acceptable_method() -> None:
    event, out = feed([b"\x05\x02\x01\x02"])
    assert out == b""
    assert isinstance(event, Failed) and event.reply == b"\x05\xff"
    event, _ = feed([b"\x05\x00"])
    assert isinstance(event, Failed) and event.reply == b"\x05\xff"


def test_not_socks5() -> None:
    event, _ = feed([b"\x04\x01\x00\x50" + bytes(4) + b"\x00"])
    assert isinstance(event, Failed) and event.reply == b"" and "version" in event.reason
    event, _ = feed([b"GET / HTTP/1.1\r\n\r\n"])
    assert isinstance(event, Failed) and event.reply == b""


@pytest.mark.parametrize("cmd", [0x02, 0x03, 0x09])
def test_unsupported_commands(cmd: int) -> None:
    event, _ = feed([GREETING, bytes([5, cmd, 0, 1]) + bytes(6)])
    assert isinstance(event, Failed)
    assert event.reply[:2] == b"\x05\x07"


def test_unsupported_address_type() -> None:
    event, _ = feed([GREETING, b"\x05\x01\x00\x02"])
    assert isinstance(event, Failed) and event.reply[:2] == b"\x05\x08"


@pytest.mark.parametrize("name", [b"", b"bad name", b"-lead", b"\xff\xfe", b"a/b"])
def test_bad_domain_names(name: bytes) -> None:
    event, _ = feed([GREETING, connect_name(name, 80)])
    assert isinstance(event, Failed) and event.reply[:2] == b"\x05\x01"


def test_bad_request_version() -> None:
    event, _ = feed([GREETING, b"\x04\x01\x00\x01" + bytes(6)])
    assert isinstance(event, Failed) and event.reply[:2] == b"\x05\x01"


def test_eof_during_handshake() -> None:
    event, _ = feed([b"\x05\x01", b""])
    assert isinstance(event, Failed) and event.reply == b"" and "greeting" in event.reason
    event, _ = feed([GREETING, b"\x05\x01", b""])
    assert isinstance(event, Failed) and "request" in event.reason


@pytest.mark.parametrize(
    ("code", "bound", "expected"),
    [
        (Reply.SUCCEEDED, ("127.0.0.1", 40000), b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"),
        (Reply.CONNECTION_REFUSED, None, b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
        (Reply.HOST_UNREACHABLE, ("::1", 1), b"\x05\x04\x00\x04" + bytes(15) + b"\x01\x00\x01"),
    ],
)
def test_reply_encoding(code: int, bound: tuple[str, int] | None, expected: bytes) -> None:
    assert Socks5Handshake().reply(code, bound) == expected


def test_reply_codes() -> None:
    assert [int(r) for r in Reply] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(LocalError):
        encode_reply(0, ("example.com", 1))
    with pytest.raises(LocalError):
        encode_reply(0, ("1.2.3.4", 70000))


# ------------------------------------------------------------------------------ properties


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_never_raise(chunks: list[bytes]) -> None:
    event, out = feed(chunks)
    assert out in (b"", b"\x05\x00")
    if isinstance(event, Failed):
        assert event.reply in (b"", b"\x05\xff") or event.reply[:2] in (
            b"\x05\x01",
            b"\x05\x07",
            b"\x05\x08",
        )


_requests = st.one_of(
    st.builds(
        connect_v4,
        st.ip_addresses(v=4).map(str),
        st.integers(0, 65535),
    ),
    st.builds(connect_v6, st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
    st.builds(
        connect_name,
        st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True).map(str.encode),
        st.integers(0, 65535),
    ),
)


@settings(max_examples=300)
@given(
    _requests,
    st.lists(st.integers(0, 0xFE), min_size=0, max_size=5),
    st.binary(max_size=40),
    st.data(),
)
def test_any_split_parses_the_same(
    request: bytes, methods: list[int], early: bytes, data: st.DataObject
) -> None:
    methods = [*methods, 0x00]
    wire = bytes([5, len(methods), *methods]) + request + early
    whole, whole_out = feed([wire])
    assert isinstance(whole, ConnectRequested)
    assert whole_out == b"\x05\x00"
    assert whole.early_data == early
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=12)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    # The early data may arrive after the request completed; only the part in the same
    # chunk as the request's last byte is handed back.
    request_end = len(wire) - len(early)
    hs = Socks5Handshake()
    out = b""
    consumed = 0
    event: Event = NeedMore()
    for chunk in chunks:
        event = hs.receive_data(chunk)
        out += hs.data_to_send()
        consumed += len(chunk)
        if not isinstance(event, NeedMore):
            break
    assert isinstance(event, ConnectRequested)
    assert (event.host, event.port, event.atyp) == (whole.host, whole.port, whole.atyp)
    assert event.early_data == wire[request_end:consumed]
    assert out == b"\x05\x00"
