"""Tracing: context extraction and propagation in memory; the OTLP exporter against a real
HTTP collector on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.errors import LocalError
from ztagent.telemetry.tracing import (
    KIND_CLIENT,
    KIND_SERVER,
    OtlpExporter,
    Span,
    TraceContext,
    encode_spans,
    ensure_request_id,
    extract,
    request_attributes,
    start_span,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "b7ad6b7169203331"

# ---------------------------------------------------------------------------- extract


def test_traceparent_with_tracestate() -> None:
    ctx = extract(
        [
            ("traceparent", f"00-{TRACE}-{SPAN}-01"),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("TraceState", "rojo=00f067aa0ba902b7"),
        ]
    )
    assert ctx == TraceContext(TRACE, SPAN, True, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")


def test_traceparent_flags_and_header_case() -> None:
    ctx = extract([("TraceParent", f"00-{TRACE}-{SPAN}-00")])
    assert ctx == TraceContext(TRACE, SPAN, False, "")
    # Other flag bits are ignored; only the sampled bit counts.
    assert extract([("traceparent", f"00-{TRACE}-{SPAN}-03")]) == TraceContext(TRACE, SPAN, True)


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE.upper()}-{SPAN}-01",  # uppercase hex
        f"00-{'0' * 32}-{SPAN}-01",  # zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # zero span id
        f"ff-{TRACE}-{SPAN}-01",  # forbidden version
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN}-1",  # short flags
        f"00-{TRACE}-{SPAN}-0x",  # non-hex flags
        f"00_{TRACE}_{SPAN}_01",
        f"0-{TRACE}-{SPAN}-01",
        "",
    ],
)
def test_invalid_traceparent_is_none(value: str) -> None:
    # An invalid traceparent is not repaired from B3 either: the trace restarts.
    assert extract([("traceparent", value), ("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]) is None


def test_traceparent_future_version_and_duplicates() -> None:
    ctx = extract([("traceparent", f"01-{TRACE}-{SPAN}-01-whatever")])
    assert ctx == TraceContext(TRACE, SPAN, True)
    assert extract([("traceparent", f"01-{TRACE}-{SPAN}-01x")]) is None
    two = [("traceparent", f"00-{TRACE}-{SPAN}-01"), ("traceparent", f"00-{TRACE}-{PARENT}-01")]
    assert extract(two) is None


def test_traceparent_wins_over_b3() -> None:
    ctx = extract(
        [("b3", f"{'1' * 32}-{'2' * 16}-1"), ("traceparent", f"00-{TRACE}-{SPAN}-01")],
    )
    assert ctx is not None and ctx.trace_id == TRACE
    # tracestate without a traceparent is not a context
    assert extract([("tracestate", "a=b")]) is None


def test_b3_single_header_forms() -> None:
    assert extract([("b3", f"{TRACE}-{SPAN}")]) == TraceContext(TRACE, SPAN, True)
    assert extract([("b3", f"{TRACE}-{SPAN}-0")]) == TraceContext(TRACE, SPAN, False)
    assert extract([("b3", f"{TRACE}-{SPAN}-d-{PARENT}")]) == TraceContext(TRACE, SPAN, True)
    # a 64-bit trace id becomes the low half of a 128-bit one; hex case is tolerated
    ctx = extract([("B3", f"A3CE929D0E0E4736-{SPAN}-1")])
    assert ctx == TraceContext("0000000000000000a3ce929d0e0e4736", SPAN, True)


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "1",
        "d",
        f"{TRACE}",
        f"{TRACE}-{SPAN}-x",
        f"{TRACE}-{SPAN}-1-zz",
        f"{TRACE}-{SPAN}-1-{PARENT}-more",
        f"{'0' * 32}-{SPAN}-1",
        f"{TRACE}-{'0' * 16}",
        f"{TRACE[:20]}-{SPAN}",
        f"{TRACE}-{SPAN[:8]}",
    ],
)
def test_invalid_b3_single_is_none(value: str) -> None:
    assert extract([("b3", value)]) is None


def test_b3_multi_headers() -> None:
    ctx = extract([("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "1")])
    assert ctx == TraceContext(TRACE, SPAN, True)
    ctx = extract([("x-b3-traceid", TRACE[16:]), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0")])
    assert ctx == TraceContext("0" * 16 + TRACE[16:], SPAN, False)
    # no sampling decision: deferred to us, and we sample; debug flag means sampled
    assert extract([("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]) == TraceContext(TRACE, SPAN)
    ctx = extract(
        [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0"), ("x-b3-flags", "1")]
    )
    assert ctx is not None and ctx.sampled
    ctx = extract([("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "true")])
    assert ctx is not None and ctx.sampled


@pytest.mark.parametrize(
    "headers",
    [
        [("x-b3-traceid", TRACE)],
        [("x-b3-spanid", SPAN)],
        [("x-b3-traceid", TRACE), ("x-b3-spanid", "nothex!!nothex!!")],
        [("x-b3-traceid", "0" * 32), ("x-b3-spanid", SPAN)],
        [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "maybe")],
        [("x-b3-traceid", TRACE), ("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)],
        [],
        [("host", "example.com")],
    ],
)
def test_invalid_or_absent_b3_multi_is_none(headers: list[tuple[str, str]]) -> None:
    assert extract(headers) is None


_header_names = st.sampled_from(
    ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"]
)
_header_values = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdefABCDEF-", max_size=80),
    st.sampled_from([TRACE, SPAN, f"00-{TRACE}-{SPAN}-01", "0", "1", "d"]),
)


@given(st.lists(st.tuples(_header_names, _header_values), max_size=6))
def test_extract_never_raises_and_yields_valid_ids(headers: list[tuple[str, str]]) -> None:
    ctx = extract(headers)
    if ctx is not None:
        assert len(ctx.trace_id) == 32 and int(ctx.trace_id, 16) != 0
        assert len(ctx.span_id) == 16 and int(ctx.span_id, 16) != 0
        assert ctx.trace_id == ctx.trace_id.lower() and ctx.span_id == ctx.span_id.lower()
    span = start_span(headers, name="x", rng=random.Random(1), now_ns=1)
    assert extract(span.propagation_headers()) == TraceContext(
        span.trace_id, span.span_id, span.sampled, span.tracestate
    )


# ---------------------------------------------------------------------------- spans


def test_child_span_and_propagation_headers() -> None:
    headers = [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "congo=t61rcWkgMzE")]
    span = start_span(headers, name="reviews:9080/*", rng=random.Random(7), now_ns=1000)
    assert span.trace_id == TRACE
    assert span.parent_span_id == PARENT
    assert span.span_id not in (PARENT, "0" * 16) and len(span.span_id) == 16
    assert span.sampled and span.kind == "SERVER" and span.start_ns == 1000
    assert span.propagation_headers() == [
        ("traceparent", f"00-{TRACE}-{span.span_id}-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", span.span_id),
        ("x-b3-parentspanid", PARENT),
        ("x-b3-sampled", "1"),
    ]


def test_b3_single_form_is_kept_when_the_request_used_it() -> None:
    span = start_span([("b3", f"{TRACE}-{PARENT}-0")], name="x", rng=random.Random(3), now_ns=1)
    assert not span.sampled
    out = dict(span.propagation_headers())
    assert out["b3"] == f"{TRACE}-{span.span_id}-0-{PARENT}"
    assert out["traceparent"] == f"00-{TRACE}-{span.span_id}-00"
    assert out["x-b3-sampled"] == "0"
    assert "tracestate" not in out


def test_new_trace_when_absent() -> None:
    a = start_span([("host", "x")], name="x", kind="CLIENT", rng=random.Random(1), now_ns=5)
    b = start_span([], name="x", rng=random.Random(2), now_ns=5)
    for span in (a, b):
        assert len(span.trace_id) == 32 and int(span.trace_id, 16) != 0
        assert len(span.span_id) == 16 and int(span.span_id, 16) != 0
        assert span.parent_span_id == "" and span.sampled and span.tracestate == ""
        names = [k for k, _ in span.propagation_headers()]
        assert names == ["traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"]
    assert a.trace_id != b.trace_id
    assert start_span([], name="x", rng=random.Random(1)).trace_id == a.trace_id  # seeded
    # an invalid context also starts a new trace
    bad = start_span([("traceparent", "garbage")], name="x", rng=random.Random(1), now_ns=5)
    assert bad.parent_span_id == "" and bad.sampled
    # a bare B3 "do not sample" is honoured by the new trace
    assert not start_span([("b3", "0")], name="x", now_ns=5).sampled
    assert not start_span([("x-b3-sampled", "0")], name="x", now_ns=5).sampled
    with pytest.raises(LocalError):
        start_span([], name="x", kind="PRODUCER")  # type: ignore[arg-type]


def test_inject_replaces_incoming_trace_headers() -> None:
    headers = [
        ("host", "reviews"),
        ("traceparent", f"00-{TRACE}-{PARENT}-01"),
        ("X-B3-SpanId", PARENT),
        ("x-b3-parentspanid", "1111111111111111"),
    ]
    span = start_span(headers, name="x", rng=random.Random(4), now_ns=1)
    out = span.inject(headers)
    assert out[0] == ("host", "reviews")
    assert out[1:] == span.propagation_headers()


def test_ensure_request_id() -> None:
    headers = [("host", "a"), ("X-Request-Id", "abc-123")]
    kept, rid = ensure_request_id(headers)
    assert rid == "abc-123" and kept == headers and kept is not headers
    made, rid = ensure_request_id([("host", "a"), ("x-request-id", "  ")])
    assert uuid.UUID(rid).version == 4
    assert made == [("host", "a"), ("x-request-id", rid)]
    _, other = ensure_request_id([])
    assert other != rid


def test_span_end_and_envoy_attributes() -> None:
    span = start_span([], name="reviews:9080/*", rng=random.Random(5), now_ns=2_000)
    attrs = request_attributes(
        method="GET",
        url="http://reviews:9080/reviews/0",
        status_code=503,
        request_id="rid-1",
        upstream_cluster="outbound|9080||reviews.bookinfo.svc.cluster.local",
        canonical_service="reviews",
        namespace="bookinfo",
        node_id="waypoint~10.0.0.1~waypoint-abc.bookinfo~bookinfo.svc.cluster.local",
        response_flags="UH",
        request_size=0,
        response_size=19,
    )
    span.end(1_000, 503, attrs)  # a clock stepping back never makes a negative duration
    assert span.ended and span.end_ns == 2_000 and span.error
    for key in (
        "http.method",
        "http.url",
        "http.status_code",
        "upstream_cluster",
        "istio.canonical_service",
        "istio.namespace",
        "node_id",
        "response_flags",
        "request_size",
        "response_size",
        "guid:x-request-id",
    ):
        assert key in span.attributes
    assert span.attributes["error"] == "true"
    ok = request_attributes(method="GET", url="/", status_code=404, request_id="r")
    assert "error" not in ok and "node_id" not in ok


def _ended(name: str = "op", status: int = 200, **kw: Any) -> Span:
    span = start_span(kw.pop("headers", []), name=name, now_ns=1_700_000_000_000_000_000, **kw)
    span.end(1_700_000_000_005_000_000, status, {"http.method": "GET", "request_size": 12})
    return span


def test_encode_spans_is_otlp_json() -> None:
    child = _ended(headers=[("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "a=b")])
    root = _ended("client", 500, kind="CLIENT")
    doc = json.loads(encode_spans([child, root], "waypoint.bookinfo"))
    [rs] = doc["resourceSpans"]
    assert rs["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "waypoint.bookinfo"}}
    ]
    [scope] = rs["scopeSpans"]
    first, second = scope["spans"]
    assert first == {
        "traceId": TRACE,
        "spanId": child.span_id,
        "parentSpanId": PARENT,
        "traceState": "a=b",
        "name": "op",
        "kind": KIND_SERVER,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000005000000",
        "attributes": [
            {"key": "http.method", "value": {"stringValue": "GET"}},
            {"key": "request_size", "value": {"intValue": "12"}},
        ],
        "status": {"code": 1},
    }
    assert second["kind"] == KIND_CLIENT and second["status"] == {"code": 2}
    assert "parentSpanId" not in second


# ---------------------------------------------------------------------------- exporter


@dataclass
class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1: records every request. `status` is the answer;
    `close_after` ends each connection after answering (without saying so, as a collector
    with a short idle timeout does); `hang` reads requests and never answers."""

    status: int = 200
    close_after: bool = False
    hang: bool = False
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    connections: int = 0
    received: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    head = event
                    body = b""
                    continue
                if isinstance(event, h11.Data):
                    body += event.data
                    continue
                if isinstance(event, h11.EndOfMessage):
                    headers = {k.decode(): v.decode() for k, v in head.headers}
                    self.requests.append(
                        (head.method.decode(), head.target.decode(), headers, body)
                    )
                    self.received.set()
                    if self.hang:
                        await asyncio.sleep(30)
                    payload = b'{"partialSuccess":{}}'
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=self.status,
                                headers=[
                                    ("content-type", "application/json"),
                                    ("content-length", str(len(payload))),
                                ],
                            )
                        )
                        + conn.send(h11.Data(data=payload))
                        + conn.send(h11.EndOfMessage())
                    )
                    await writer.drain()
                    if self.close_after:
                        return
                    conn.start_next_cycle()
                    continue
                return
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()

    def spans(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _, _, _, body in self.requests:
            for rs in json.loads(body)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    out += ss["spans"]
        return out


@contextlib.asynccontextmanager
async def collector(**kw: Any) -> AsyncIterator[Collector]:
    c = Collector(**kw)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await c.handle(reader, writer)
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    c.port = server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_exporter_posts_otlp_json_batches() -> None:
    async def main() -> None:
        async with collector() as c:
            exporter = OtlpExporter(
                f"http://127.0.0.1:{c.port}/otlp/", "waypoint", max_batch=2, interval=0.05
            )
            spans = [_ended(f"op{i}") for i in range(5)]
            for span in spans:
                exporter.submit(span)
            await _until(lambda: exporter.exported == 5)
            await exporter.close()
            assert [r[:2] for r in c.requests] == [("POST", "/otlp/v1/traces")] * 3
            _, _, headers, body = c.requests[0]
            assert headers["content-type"] == "application/json"
            assert headers["host"] == f"127.0.0.1:{c.port}"
            assert int(headers["content-length"]) == len(body)
            assert json.loads(body) == json.loads(encode_spans(spans[:2], "waypoint"))
            assert [s["name"] for s in c.spans()] == [f"op{i}" for i in range(5)]
            assert c.connections == 1  # one kept-alive connection for every batch
            assert (exporter.dropped, exporter.failed_batches) == (0, 0)

    _run(main())


def test_exporter_sends_on_the_interval_and_ignores_unsampled() -> None:
    async def main() -> None:
        async with collector() as c:
            exporter = OtlpExporter(f"http://127.0.0.1:{c.port}", "waypoint", interval=0.05)
            exporter.start()
            exporter.submit(_ended(headers=[("traceparent", f"00-{TRACE}-{PARENT}-00")]))
            exporter.submit(_ended("kept"))
            await asyncio.wait_for(c.received.wait(), 5)
            await exporter.close()
            assert c.requests[0][1] == "/v1/traces"
            assert [s["name"] for s in c.spans()] == ["kept"]
            with pytest.raises(LocalError):
                exporter.submit(start_span([], name="open", now_ns=1))  # never ended

    _run(main())


def test_exporter_drops_when_the_queue_is_full_and_flushes_on_close() -> None:
    async def main() -> None:
        async with collector() as c:
            exporter = OtlpExporter(
                f"http://127.0.0.1:{c.port}", "waypoint", max_queue=3, interval=60
            )
            for i in range(5):  # no await in between: nothing is sent yet
                exporter.submit(_ended(f"op{i}"))
            assert exporter.queued() == 3 and exporter.dropped == 2
            assert c.requests == []
            await exporter.close()  # the 60 s interval does not delay the flush
            assert [s["name"] for s in c.spans()] == ["op0", "op1", "op2"]
            assert exporter.exported == 3
            exporter.submit(_ended("late"))
            assert exporter.dropped == 3

    _run(main())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_exporter_survives_a_refusing_receiver(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        exporter = OtlpExporter(f"http://127.0.0.1:{_closed_port()}", "waypoint", interval=0.02)
        exporter.submit(_ended())
        await _until(lambda: exporter.failed_batches >= 1)
        exporter.submit(_ended())
        exporter.submit(_ended())
        await _until(lambda: exporter.failed_spans >= 3)
        assert exporter._task is not None and not exporter._task.done()
        started = time.monotonic()
        await exporter.close()
        assert time.monotonic() - started < 3.0
        assert exporter.exported == 0

    with caplog.at_level(logging.WARNING, logger="ztagent.telemetry.tracing"):
        _run(main())
    warnings = [r for r in caplog.records if r.name == "ztagent.telemetry.tracing"]
    assert len(warnings) == 1  # at most once a minute


def test_exporter_counts_error_answers_and_reconnects_after_idle_close() -> None:
    async def main() -> None:
        async with collector(status=503) as c:
            exporter = OtlpExporter(f"http://127.0.0.1:{c.port}", "waypoint", interval=0.02)
            exporter.submit(_ended())
            await _until(lambda: exporter.failed_batches == 1)
            await exporter.close()
            assert len(c.requests) == 1 and exporter.exported == 0
        async with collector(close_after=True) as c:
            exporter = OtlpExporter(f"http://127.0.0.1:{c.port}", "waypoint", interval=0.02)
            for i in range(3):
                exporter.submit(_ended(f"op{i}"))
                await _until(lambda n=i: exporter.exported == n + 1)
            await exporter.close()
            assert exporter.failed_batches == 0
            assert c.connections == 3

    _run(main())


def test_close_is_bounded_with_a_collector_that_never_answers() -> None:
    async def main() -> None:
        async with collector(hang=True) as c:
            exporter = OtlpExporter(f"http://127.0.0.1:{c.port}", "waypoint", interval=60)
            exporter.submit(_ended())
            exporter.submit(_ended())
            started = time.monotonic()
            await exporter.close()
            elapsed = time.monotonic() - started
            assert 1.5 < elapsed < 4.0
            assert len(c.requests) == 1
            assert exporter.dropped == 2 and exporter.exported == 0

    _run(main())


@pytest.mark.parametrize(
    "endpoint",
    ["https://collector:4318", "grpc://collector:4317", "collector:4318", "http://", "http://h:x"],
)
def test_only_http_endpoints(endpoint: str) -> None:
    with pytest.raises(LocalError) as e:
        OtlpExporter(endpoint, "waypoint")
    if endpoint.startswith("https"):
        assert "https is not supported" in str(e.value)
