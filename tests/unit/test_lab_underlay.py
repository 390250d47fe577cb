"""How `lab demo` reads the underlay: TCP segments out of Ethernet frames, a flow's bytes in
sequence order, and whether they are TLS records."""

from __future__ import annotations

import socket
import struct

from ztagent.lab.underlay import Capture, Segment, _parse, reassemble, tls_walk


def frame(
    src: str, sport: int, dst: str, dport: int, seq: int, data: bytes, syn: bool = False
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02 if syn else 0x10, 0, 0, 0)
    total = 20 + len(tcp) + len(data)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        6,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return b"\x00" * 12 + b"\x08\x00" + ip + tcp + data + b"\x00" * 4  # Ethernet padding


def tls(kind: int, body: bytes) -> bytes:
    return bytes([kind, 3, 3]) + struct.pack("!H", len(body)) + body


def test_frames_become_segments_per_flow() -> None:
    out = Capture()
    _parse(frame("10.0.0.1", 40000, "10.0.0.2", 15008, 99, b"", syn=True), out)
    _parse(frame("10.0.0.1", 40000, "10.0.0.2", 15008, 100, b"hello"), out)
    _parse(b"\x00" * 12 + b"\x86\xdd" + b"\x00" * 60, out)  # IPv6: not the lab's
    assert out.flows == {
        ("10.0.0.1", 40000, "10.0.0.2", 15008): [
            Segment(99, True, b""),
            Segment(100, False, b"hello"),
        ]
    }


def test_reassembly_orders_segments_and_stops_at_a_gap() -> None:
    segments = [Segment(10, False, b"cd"), Segment(7, True, b""), Segment(8, False, b"ab")]
    assert reassemble(segments) == (b"abcd", True)
    assert reassemble([Segment(8, False, b"ab"), Segment(20, False, b"zz")]) == (b"ab", False)
    # Retransmitted bytes are taken once; sequence numbers wrap around.
    start = 0xFFFFFFFE
    wrapped = [
        Segment(start, False, b"abc"),
        Segment(start + 1, False, b"bcd"),
        Segment(2, False, b"ef"),
    ]
    assert reassemble(wrapped) == (b"abcdef", False)


def test_tls_records_are_recognised_and_plaintext_is_not() -> None:
    stream = tls(0x16, b"h" * 50) + tls(0x17, b"x" * 300) + tls(0x17, b"y" * 10)
    assert tls_walk(stream, True) == (True, 3, "0x16")
    assert tls_walk(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True) == (False, 0, "")
    # Joined mid-stream: the walk finds the first record boundary.
    assert tls_walk(stream[7:], False) == (True, 2, "0x17")
