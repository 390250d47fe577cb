"""Cheap-frame floods: frames that cost the peer nothing but the server work (empty
CONTINUATIONs, oversized header blocks, PRIORITY, WINDOW_UPDATE) end the connection with
GOAWAY ENHANCE_YOUR_CALM; a PING flood whose answers are read cannot starve other clients."""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.adversarial._hbone_harness import (
    Pki,
    RawPeer,
    echo_server,
    good_tunnel,
    hbone_serve,
    make_pki,
)
from ztagent.hbone.frames import ErrorCode, Flag, FrameType, pack_frame
from ztagent.hbone.headers import encode_headers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, int, int]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with echo_server() as echo, hbone_serve(pki) as (port, _proc):
        yield pki, port, echo


def _empty_continuations(peer: RawPeer) -> None:
    peer.frame(FrameType.HEADERS, 0, 1, encode_headers([(":method", "CONNECT")]))
    for _ in range(100):
        peer.send(pack_frame(FrameType.CONTINUATION, 0, 1) * 1000)


def _big_header_blocks(peer: RawPeer) -> None:
    # Each stream: a ~63 KB literal header block in 4 frames, refused for its size.
    value = "x" * 15_000
    for sid in range(1, 400, 2):
        block = encode_headers(
            [(":method", "CONNECT"), (":authority", "127.0.0.1:9")]
            + [(f"x-pad-{i}", value) for i in range(4)]
        )
        chunks = [block[i : i + 16_000] for i in range(0, len(block), 16_000)]
        frames = pack_frame(FrameType.HEADERS, 0, sid, chunks[0])
        for i, chunk in enumerate(chunks[1:], start=2):
            flags = Flag.END_HEADERS if i == len(chunks) else 0
            frames += pack_frame(FrameType.CONTINUATION, flags, sid, chunk)
        peer.send(frames)


def _many_continuations(peer: RawPeer) -> None:
    block = encode_headers([(":method", "CONNECT"), (":authority", "127.0.0.1:9")])
    frames = pack_frame(FrameType.HEADERS, 0, 1, block[:1])
    for _ in range(20):
        frames += pack_frame(FrameType.CONTINUATION, 0, 1, b"\x00")  # empty-literal names
    peer.send(frames)


def _priority(peer: RawPeer) -> None:
    frame = pack_frame(FrameType.PRIORITY, 0, 3, struct.pack(">IB", 0, 16))
    for _ in range(100):
        peer.send(frame * 1000)


def _window_updates(peer: RawPeer) -> None:
    frame = pack_frame(FrameType.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1))
    for _ in range(100):
        peer.send(frame * 1000)


def _empty_data(peer: RawPeer) -> None:
    peer.frame(
        FrameType.HEADERS,
        Flag.END_HEADERS,
        1,
        encode_headers([(":method", "CONNECT"), (":authority", "127.0.0.1:9")]),
    )
    for _ in range(100):
        peer.send(pack_frame(FrameType.DATA, 0, 1) * 1000)


@pytest.mark.parametrize(
    "flood",
    [
        _empty_continuations,
        _big_header_blocks,
        _many_continuations,
        _priority,
        _window_updates,
        _empty_data,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_flood_ends_with_enhance_your_calm(
    server: tuple[Pki, int, int], flood: Callable[[RawPeer], None]
) -> None:
    pki, port, echo = server
    peer = RawPeer(pki, port)
    try:
        # The server may close the connection while we are still sending.
        with contextlib.suppress(OSError):
            flood(peer)
        assert peer.goaway_code() == ErrorCode.ENHANCE_YOUR_CALM
    finally:
        peer.close()
    assert good_tunnel(pki, port, echo) < 2.0


def test_ping_flood_read_by_the_attacker_does_not_starve_a_new_client(
    server: tuple[Pki, int, int],
) -> None:
    pki, port, echo = server
    peer = RawPeer(pki, port)
    peer.sock.settimeout(0.001)
    stop = threading.Event()
    pings = pack_frame(FrameType.PING, 0, 0, b"p" * 8) * 2000
    sent = 0

    def flood() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                peer.send(pings)
                sent += 2000
                while True:
                    peer.sock.recv(1 << 20)  # read the answers, as a careful attacker would
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        latencies = [good_tunnel(pki, port, echo) for _ in range(5)]
    finally:
        stop.set()
        thread.join(10)
        peer.close()
    print(f"{sent} PINGs; good client worst {max(latencies):.3f}s")
    assert max(latencies) < 1.0
