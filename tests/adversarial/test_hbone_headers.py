"""Header quirks a hostile peer can use to make one request mean two things: a second
`:authority`, a port in non-ASCII digits, an IPv4-mapped IPv6 destination."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import hpack
import pytest

from tests.adversarial._hbone_harness import Pki, RawPeer, echo_server, hbone_serve, make_pki
from tests.adversarial._socks5_harness import ask, request_v6, socks5_listener
from ztagent.hbone.frames import ErrorCode, Flag, FrameType, pack_frame, parse_authority
from ztagent.hbone.headers import decode_simple_headers, encode_headers
from ztagent.socks5.handshake import Reply

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, int, int]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with echo_server() as echo, hbone_serve(pki) as (port, _proc):
        yield pki, port, echo


def _answer(peer: RawPeer) -> tuple[str, int]:
    """The server's answer to stream 1: ("status", code) or ("reset", error code)."""
    frame = peer.wait_for((FrameType.HEADERS, FrameType.RST_STREAM))
    assert frame is not None, "no answer"
    ftype, _flags, sid, payload = frame
    assert sid == 1
    if ftype == FrameType.RST_STREAM:
        return "reset", int(struct.unpack(">I", payload)[0])
    headers = decode_simple_headers(payload)
    assert headers is not None
    return "status", int(dict(headers)[":status"])


def test_a_second_authority_is_refused(server: tuple[Pki, int, int]) -> None:
    pki, port, echo = server
    peer = RawPeer(pki, port)
    try:
        block = encode_headers(
            [
                (":method", "CONNECT"),
                (":authority", f"127.0.0.1:{echo}"),
                (":authority", "127.0.0.1:9"),
            ]
        )
        peer.frame(FrameType.HEADERS, Flag.END_HEADERS, 1, block)
        assert _answer(peer) == ("reset", ErrorCode.PROTOCOL_ERROR)
    finally:
        peer.close()


def test_a_port_in_full_width_digits_is_refused(server: tuple[Pki, int, int]) -> None:
    pki, port, echo = server
    wide = "".join(chr(0xFF10 + int(d)) for d in str(echo))  # FULLWIDTH DIGIT ZERO..NINE
    peer = RawPeer(pki, port)
    try:
        # Huffman-coded through the full HPACK encoder: the full decoder's path.
        block = hpack.Encoder().encode(
            [(":method", "CONNECT"), (":authority", f"127.0.0.1:{wide}")]
        )
        peer.send(pack_frame(FrameType.HEADERS, Flag.END_HEADERS, 1, block))
        assert _answer(peer) == ("status", 400)
    finally:
        peer.close()


def test_ports_are_ascii_digits_only() -> None:
    assert parse_authority("127.0.0.1:80") == ("127.0.0.1", 80)
    for bad in (
        "127.0.0.1:\uff18\uff10",
        "127.0.0.1:\u0668\u0660",
        "127.0.0.1:+80",
        "127.0.0.1:000080",
    ):
        with pytest.raises(ValueError, match="bad port"):
            parse_authority(bad)


def test_ipv4_mapped_authority_is_the_ipv4_address() -> None:
    assert parse_authority("[::ffff:10.0.0.1]:80") == ("10.0.0.1", 80)


def test_socks5_ipv4_mapped_destination_is_looked_up_as_ipv4() -> None:
    with socks5_listener() as running:
        assert ask(running.port, request_v6("::ffff:10.0.0.1", 8080)) == Reply.SUCCEEDED
        assert running.handed_on == [("10.0.0.1", 8080)]
