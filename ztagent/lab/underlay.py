"""The underlay as the demo sees it: frames read with AF_PACKET on node-a's underlay port,
each TCP flow's segments, a flow's bytes in order, and whether they are a chain of TLS records."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from ztagent.lab import netns
from ztagent.lab.topology import Plan

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33
CAPTURE_MAX_SECONDS = 30.0
CAPTURE_MAX_BYTES = 64 * 1024 * 1024
TLS_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})


@dataclass
class Segment:
    seq: int
    syn: bool
    data: bytes


@dataclass
class Capture:
    frames: int = 0
    captured_bytes: int = 0
    flows: dict[tuple[str, int, str, int], list[Segment]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _parse(frame: bytes, out: Capture) -> None:
    """Record the TCP segment of an IPv4 frame (everything on the underlay is the lab's)."""
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
        return
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6 or len(ip) < ihl + 20:
        return
    total = struct.unpack("!H", ip[2:4])[0]
    src = socket.inet_ntoa(ip[12:16])
    dst = socket.inet_ntoa(ip[16:20])
    tcp = ip[ihl:total]
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    offset = (tcp[12] >> 4) * 4
    syn = bool(tcp[13] & 0x02)
    data = bytes(tcp[offset:])
    out.flows.setdefault((src, sport, dst, dport), []).append(Segment(seq, syn, data))


def capture_underlay(
    plan: Plan, stop: threading.Event, ready: threading.Event, out: Capture
) -> None:
    """Read frames on node-a's underlay port until `stop` (bounded in time and bytes)."""
    port = plan.node("node-a").underlay_port

    def run() -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 * 1024 * 1024)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
            sock.bind((port, ETH_P_ALL))
            sock.settimeout(0.2)
            ready.set()
            deadline = time.monotonic() + CAPTURE_MAX_SECONDS
            while not stop.is_set() and time.monotonic() < deadline:
                if out.captured_bytes >= CAPTURE_MAX_BYTES:
                    out.errors.append(f"capture stopped at {CAPTURE_MAX_BYTES} bytes")
                    break
                try:
                    frame = sock.recv(262144)
                except TimeoutError:
                    continue
                out.frames += 1
                out.captured_bytes += len(frame)
                _parse(frame, out)
        finally:
            sock.close()
            ready.set()

    netns.run_in(plan.underlay_netns, run, CAPTURE_MAX_SECONDS + 10.0)


def reassemble(segments: list[Segment]) -> tuple[bytes, bool]:
    """The flow's bytes in sequence order from its first segment (or its SYN), stopping at
    the first gap; and whether the SYN was seen (so the stream starts at its beginning)."""
    syn = next((s for s in segments if s.syn), None)
    start = (syn.seq + 1) & 0xFFFFFFFF if syn else segments[0].seq
    pieces = sorted(((s.seq - start) & 0xFFFFFFFF, s.data) for s in segments if s.data)
    out = bytearray()
    for rel, data in pieces:
        if rel > 0x7FFFFFFF:
            continue
        if rel > len(out):
            break
        out += data[len(out) - rel :]
    return bytes(out), syn is not None


def tls_walk(stream: bytes, from_start: bool) -> tuple[bool, int, str]:
    """Whether `stream` is a chain of TLS records (resynchronising when the capture began
    mid-stream); the number of records and the first record type."""
    starts = [0] if from_start else range(min(len(stream), 20000))
    for first in starts:
        pos = first
        count = 0
        while pos + 5 <= len(stream):
            kind, major, minor, length = stream[pos], stream[pos + 1], stream[pos + 2], 0
            length = struct.unpack("!H", stream[pos + 3 : pos + 5])[0]
            if kind not in TLS_TYPES or major != 3 or minor > 4 or length > 16384 + 2048:
                break
            pos += 5 + length
            count += 1
        if pos + 5 > len(stream) and count > 0:
            return True, count, f"0x{stream[first]:02x}"
    return False, 0, ""
