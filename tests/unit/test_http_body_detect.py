"""Protocol detection, header rules and the streamed Body of the HTTP stack, in memory."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.http.body import Body, BodyError
from ztagent.http.detect import HTTP2_PREFACE, detect_protocol
from ztagent.http.messages import HOP_BY_HOP, clean_headers


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout=5)

    asyncio.run(bounded())


# ------------------------------------------------------------------ detect_protocol


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "more"),
        (HTTP2_PREFACE, "http2"),
        (HTTP2_PREFACE + b"\x00\x00\x12\x04", "http2"),
        (HTTP2_PREFACE[:10], "more"),
        (b"PRI", "more"),
        (b"GET / HTTP/1.1\r\n", "http1"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
        (b"POST /a/b?x=1 HTTP/1.0\r\n", "http1"),
        (b"OPTIONS * HTTP/1.1\r\n", "http1"),
        (b"GET http://a.example/x HTTP/1.1\r\n", "http1"),
        (b"M-SEARCH * HTTP/1.1\r\n", "http1"),
        (b"G", "more"),
        (b"GET", "more"),
        (b"GET ", "more"),
        (b"GET /index", "more"),
        (b"GET / ", "more"),
        (b"GET / HTTP/1.", "more"),
        (b"GET / HTTP/1.1", "more"),
        (b"GET / HTTP/1.1\r", "more"),
        (b"GET / HTTP/2.0\r\n", "tcp"),
        (b"GET / HTTP/1.2", "tcp"),
        (b"GET / HTTP/1.1\n", "tcp"),
        (b"GET  / HTTP/1.1\r\n", "tcp"),
        (b"GET / HTTP/1.1 \r\n", "tcp"),
        (b"G(T / HTTP/1.1\r\n", "tcp"),
        (b" GET / HTTP/1.1\r\n", "tcp"),
        (b"\x16\x03\x01\x02\x00\x01", "tcp"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "tcp"),
        (b"PRX", "more"),  # still a possible method
        (b"PRI\x00", "tcp"),
        (b"GET /\x00 HTTP/1.1\r\n", "tcp"),
        (b"hello world foo bar", "tcp"),
    ],
)
def test_detect_protocol(data: bytes, expected: str) -> None:
    assert detect_protocol(data) == expected


def test_detect_protocol_caps_the_request_line_wait() -> None:
    long_target = b"GET /" + b"a" * 9000
    assert detect_protocol(long_target[:8000]) == "more"
    assert detect_protocol(long_target) == "tcp"


@given(st.binary(max_size=64))
def test_detect_protocol_is_consistent_with_longer_input(data: bytes) -> None:
    """A decided answer never changes with more bytes; "tcp" only when no extension is HTTP."""
    answer = detect_protocol(data)
    assert answer in {"http2", "http1", "tcp", "more"}
    if answer in {"http1", "http2", "tcp"}:
        assert detect_protocol(data + b"more bytes\r\n") == answer


@given(st.sampled_from([b"GET / HTTP/1.1\r\n", b"DELETE /x?y=1 HTTP/1.0\r\n", HTTP2_PREFACE]))
def test_every_prefix_of_a_valid_start_waits_for_more(full: bytes) -> None:
    for cut in range(len(full)):
        assert detect_protocol(full[:cut]) == "more"


# ------------------------------------------------------------------ headers


def test_clean_headers_drops_hop_by_hop_and_keeps_te_trailers() -> None:
    raw = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Drop"),
        (b"X-Drop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers, deflate"),
        (b"Transfer-Encoding", b"chunked"),
        (b":path", b"/"),
        (b"Content-Type", b"text/plain"),
    ]
    assert clean_headers(raw) == [("te", "trailers"), ("content-type", "text/plain")]
    assert {"connection", "te", "host", "transfer-encoding", "upgrade"} <= HOP_BY_HOP
    assert clean_headers([(b"te", b"gzip")]) == []


# ------------------------------------------------------------------ Body


def test_body_reads_in_order_then_trailers() -> None:
    async def main() -> None:
        body = Body(length=6)
        await body.feed(b"abc")
        await body.feed(b"def")
        body.end([("grpc-status", "0")])
        assert body.length == 6
        assert await body.read() == b"abc"
        assert await body.read() == b"def"
        assert await body.read() == b""
        assert await body.read() == b""
        assert body.trailers == [("grpc-status", "0")]
        assert body.bytes_read == 6

    run(main)


def test_body_feed_waits_above_limit_until_read() -> None:
    async def main() -> None:
        body = Body(limit=10)
        await body.feed(b"x" * 10)  # at the limit: does not wait
        blocked = asyncio.ensure_future(body.feed(b"y" * 5))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert body.buffered == 15
        assert await body.read() == b"x" * 10
        await asyncio.wait_for(blocked, 1)
        assert await body.read() == b"y" * 5
        body.end()
        assert await body.read() == b""

    run(main)


def test_body_read_waits_for_data() -> None:
    async def main() -> None:
        body = Body()
        reader = asyncio.ensure_future(body.read())
        await asyncio.sleep(0.01)
        assert not reader.done()
        await body.feed(b"late")
        assert await asyncio.wait_for(reader, 1) == b"late"

    run(main)


def test_body_fail_reaches_reader_and_producer() -> None:
    async def main() -> None:
        body = Body(limit=4)
        await body.feed(b"1234")
        producer = asyncio.ensure_future(body.feed(b"5"))
        await asyncio.sleep(0.01)
        body.fail(ConnectionResetError("peer reset"))
        with pytest.raises(BodyError, match="peer reset"):
            await asyncio.wait_for(producer, 1)
        with pytest.raises(BodyError):
            await body.read()
        with pytest.raises(BodyError):
            await body.feed(b"more")
        assert body.failed and body.buffered == 0

    run(main)


def test_body_fail_wakes_a_waiting_reader() -> None:
    async def main() -> None:
        body = Body()
        reader = asyncio.ensure_future(body.read())
        await asyncio.sleep(0.01)
        body.fail(BodyError("gone"))
        with pytest.raises(BodyError, match="gone"):
            await asyncio.wait_for(reader, 1)

    run(main)


def test_body_fail_after_full_read_is_ignored() -> None:
    async def main() -> None:
        body = Body.of(b"done")
        assert await body.read() == b"done"
        assert await body.read() == b""
        body.fail(BodyError("late"))
        assert await body.read() == b""

    run(main)


def test_body_on_consumed_counts_reads_and_drops() -> None:
    async def main() -> None:
        consumed: list[int] = []
        body = Body(on_consumed=consumed.append)
        body.put_nowait(b"abc")
        body.put_nowait(b"de")
        assert await body.read() == b"abc"
        body.fail(BodyError("cancel"))
        assert consumed == [3, 2]

    run(main)


def test_body_empty_and_of() -> None:
    async def main() -> None:
        empty = Body.empty()
        assert empty.length == 0 and empty.ended and empty.exhausted
        assert await empty.read() == b""
        full = Body.of(b"payload")
        assert full.length == 7 and not full.exhausted
        assert [c async for c in full] == [b"payload"]
        assert full.exhausted

    run(main)


def test_body_rejects_data_after_end() -> None:
    async def main() -> None:
        body = Body()
        body.end()
        with pytest.raises(RuntimeError):
            await body.feed(b"x")

    run(main)
