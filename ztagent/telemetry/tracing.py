"""Distributed tracing for the waypoint, as Envoy does it for Istio: trace context in and out,
one span per request, spans exported over OTLP/HTTP JSON.

Pure part (no I/O, time and randomness passed in): `extract` reads W3C Trace Context
(`traceparent`, `tracestate`) or B3 (`b3`, or `x-b3-*`) from request headers; `start_span`
makes the waypoint's span, a child of the caller's context or the root of a new trace;
`Span.propagation_headers` is what goes on the upstream request, in both W3C and B3 forms
so applications instrumented with either keep the trace; `ensure_request_id` keeps or makes
Envoy's `x-request-id`.

`OtlpExporter` is the only I/O: an asyncio task that batches ended spans and POSTs them as
OTLP/HTTP JSON to a collector. It must never slow the data path: `submit` only appends to a
bounded queue and drops (and counts) when it is full, export failures drop the batch (counted,
logged at most once a minute), and nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from ztagent import __version__
from ztagent.errors import LocalError, RemoteError
from ztagent.http.body import Body, BodyError, read_all
from ztagent.http.h1 import Http1Client
from ztagent.http.messages import RequestHead, UpstreamError

log = logging.getLogger(__name__)

__all__ = [
    "KIND_CLIENT",
    "KIND_SERVER",
    "TRACE_HEADERS",
    "OtlpExporter",
    "Span",
    "SpanKind",
    "TraceContext",
    "encode_spans",
    "ensure_request_id",
    "extract",
    "request_attributes",
    "start_span",
]

SpanKind = Literal["SERVER", "CLIENT"]
# OTLP's Span.SpanKind numbers.
KIND_SERVER = 2
KIND_CLIENT = 3
_KIND_NUMBERS: Mapping[str, int] = {"SERVER": KIND_SERVER, "CLIENT": KIND_CLIENT}
# OTLP's Status.StatusCode numbers.
_STATUS_OK = 1
_STATUS_ERROR = 2

TRACE_HEADERS = frozenset(
    {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    }
)
REQUEST_ID = "x-request-id"

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEX_RE = re.compile(r"[0-9a-f]+")
_MAX_TRACESTATE = 512  # W3C: vendors must propagate at least 512 characters


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The caller's position in a trace: `span_id` is the caller's span, the parent of ours.
    Ids are lowercase hex (`trace_id` 32 digits, `span_id` 16); `tracestate` is passed on
    unchanged."""

    trace_id: str
    span_id: str
    sampled: bool = True
    tracestate: str = ""


# ---------------------------------------------------------------------------- extract


def _values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [v.strip() for k, v in headers if k.lower() == name]


def _is_hex(value: str, digits: int) -> bool:
    return len(value) == digits and _HEX_RE.fullmatch(value) is not None


def _parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    m = _TRACEPARENT_RE.match(value)
    if m is None:
        return None
    version, trace_id, span_id, flags = m.groups()
    if version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    # A later version may append fields after a "-"; the first four keep their meaning.
    if version != "00" and len(value) > 55 and value[55] != "-":
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 0x01)


def _b3_sampled(value: str | None, flags: str | None = None) -> bool | None:
    """B3's sampling state: True, False, or None for an unreadable value."""
    if flags == "1":  # debug implies sampled
        return True
    if value is None or value == "":
        return True  # deferred: the waypoint samples
    value = value.lower()
    if value in ("1", "d", "true"):
        return True
    if value in ("0", "false"):
        return False
    return None


def _b3_trace_id(value: str) -> str | None:
    value = value.lower()
    if _is_hex(value, 16):
        value = "0" * 16 + value  # 64-bit trace ids are the low half of a 128-bit one
    if not _is_hex(value, 32) or value == _ZERO_TRACE:
        return None
    return value


def _b3_span_id(value: str) -> str | None:
    value = value.lower()
    if not _is_hex(value, 16) or value == _ZERO_SPAN:
        return None
    return value


def _parse_b3_single(value: str) -> TraceContext | None:
    parts = value.split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None  # a bare sampling decision ("0", "1", "d") carries no context
    trace_id = _b3_trace_id(parts[0])
    span_id = _b3_span_id(parts[1])
    sampled = _b3_sampled(parts[2] if len(parts) > 2 else None)
    if len(parts) == 4 and _b3_span_id(parts[3]) is None:
        return None
    if trace_id is None or span_id is None or sampled is None:
        return None
    return TraceContext(trace_id, span_id, sampled)


def extract(headers: Sequence[tuple[str, str]]) -> TraceContext | None:
    """The caller's trace context, from the first form present: W3C `traceparent` (with
    `tracestate`), else B3's single `b3` header, else the `x-b3-*` headers. None when none is
    present, or when the form found is malformed (which then starts a new trace, as the W3C
    spec asks; the other forms are not tried). Header names are matched case-insensitively."""
    traceparent = _values(headers, "traceparent")
    if traceparent:
        if len(traceparent) != 1:
            return None
        parsed = _parse_traceparent(traceparent[0])
        if parsed is None:
            return None
        tracestate = ",".join(v for v in _values(headers, "tracestate") if v)
        if len(tracestate) > _MAX_TRACESTATE:
            tracestate = ""  # W3C: drop it rather than cut an entry in half
        return TraceContext(*parsed, tracestate=tracestate)
    b3 = _values(headers, "b3")
    if b3:
        return _parse_b3_single(b3[0]) if len(b3) == 1 else None
    trace_ids = _values(headers, "x-b3-traceid")
    if not trace_ids:
        return None
    span_ids = _values(headers, "x-b3-spanid")
    if len(trace_ids) != 1 or len(span_ids) != 1:
        return None
    trace_id = _b3_trace_id(trace_ids[0])
    span_id = _b3_span_id(span_ids[0])
    sampled_values = _values(headers, "x-b3-sampled")
    flags_values = _values(headers, "x-b3-flags")
    sampled = _b3_sampled(
        sampled_values[0] if sampled_values else None,
        flags_values[0] if flags_values else None,
    )
    if trace_id is None or span_id is None or sampled is None:
        return None
    return TraceContext(trace_id, span_id, sampled)


def _sampling_only(headers: Sequence[tuple[str, str]]) -> bool | None:
    """A B3 sampling decision sent without ids ("b3: 0", or "x-b3-sampled: 0" alone), which a
    new trace must honour; None when there is none."""
    b3 = _values(headers, "b3")
    if len(b3) == 1 and "-" not in b3[0]:
        return _b3_sampled(b3[0])
    if not _values(headers, "x-b3-traceid"):
        sampled = _values(headers, "x-b3-sampled")
        if len(sampled) == 1:
            return _b3_sampled(sampled[0])
    return None


# ---------------------------------------------------------------------------- spans


@dataclass(slots=True)
class Span:
    """One request as the waypoint saw it. Times are unix nanoseconds; `end_ns` is 0 until
    `end`. `parent_span_id` is "" for the root of a trace."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: SpanKind
    sampled: bool
    start_ns: int
    tracestate: str = ""
    b3_single: bool = False
    end_ns: int = 0
    status_code: int = 0
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.end_ns != 0

    @property
    def error(self) -> bool:
        """Envoy marks a request an error when it got no response (0) or a 5xx."""
        return self.status_code == 0 or self.status_code >= 500

    def end(
        self,
        now_ns: int | None = None,
        status_code: int = 0,
        attributes: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        """Close the span with the HTTP status sent downstream (0: none was) and the
        attributes gathered on the way (see `request_attributes`)."""
        end_ns = time.time_ns() if now_ns is None else now_ns
        self.end_ns = max(end_ns, self.start_ns)
        self.status_code = status_code
        if attributes:
            self.attributes.update(attributes)

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def propagation_headers(self) -> list[tuple[str, str]]:
        """The trace headers for the upstream request, with this span as the caller's span:
        W3C and multi-header B3 always, single-header `b3` when the request came with it."""
        sampled = "1" if self.sampled else "0"
        out = [("traceparent", self.traceparent())]
        if self.tracestate:
            out.append(("tracestate", self.tracestate))
        out += [("x-b3-traceid", self.trace_id), ("x-b3-spanid", self.span_id)]
        if self.parent_span_id:
            out.append(("x-b3-parentspanid", self.parent_span_id))
        out.append(("x-b3-sampled", sampled))
        if self.b3_single:
            b3 = f"{self.trace_id}-{self.span_id}-{sampled}"
            if self.parent_span_id:
                b3 += f"-{self.parent_span_id}"
            out.append(("b3", b3))
        return out

    def inject(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """`headers` without any trace header they came with, plus `propagation_headers()`."""
        kept = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
        return kept + self.propagation_headers()


def _new_id(rng: random.Random, bits: int) -> str:
    value = 0
    while value == 0:
        value = rng.getrandbits(bits)
    return f"{value:0{bits // 4}x}"


_RNG = random.Random()


def start_span(
    headers: Sequence[tuple[str, str]],
    *,
    name: str,
    kind: SpanKind = "SERVER",
    rng: random.Random | None = None,
    now_ns: int | None = None,
) -> Span:
    """The waypoint's span for a request with `headers`: a child of the caller's context, or
    the root of a new sampled trace (not sampled if B3 alone said "0"). `name` is Envoy's
    operation name, usually "<host>:<port>/*" (the route's decorator when set)."""
    if kind not in _KIND_NUMBERS:
        raise LocalError(f"span kind must be SERVER or CLIENT, got {kind!r}")
    rng = rng if rng is not None else _RNG
    start = time.time_ns() if now_ns is None else now_ns
    b3_single = bool(_values(headers, "b3"))
    parent = extract(headers)
    if parent is None:
        sampled = _sampling_only(headers)
        return Span(
            trace_id=_new_id(rng, 128),
            span_id=_new_id(rng, 64),
            parent_span_id="",
            name=name,
            kind=kind,
            sampled=True if sampled is None else sampled,
            start_ns=start,
            b3_single=b3_single,
        )
    return Span(
        trace_id=parent.trace_id,
        span_id=_new_id(rng, 64),
        parent_span_id=parent.span_id,
        name=name,
        kind=kind,
        sampled=parent.sampled,
        start_ns=start,
        tracestate=parent.tracestate,
        b3_single=b3_single,
    )


def ensure_request_id(
    headers: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], str]:
    """Envoy's `x-request-id`: the request's own when it has a non-empty one, else a new
    uuid4 appended. Returns a new header list (the input is not changed) and the id."""
    for k, v in headers:
        if k.lower() == REQUEST_ID and v.strip():
            return list(headers), v.strip()
    request_id = str(uuid.uuid4())
    kept = [(k, v) for k, v in headers if k.lower() != REQUEST_ID]
    return [*kept, (REQUEST_ID, request_id)], request_id


def request_attributes(
    *,
    method: str,
    url: str,
    status_code: int,
    request_id: str,
    upstream_cluster: str = "",
    canonical_service: str = "",
    namespace: str = "",
    node_id: str = "",
    response_flags: str = "-",
    request_size: int = 0,
    response_size: int = 0,
    protocol: str = "",
    user_agent: str = "",
) -> dict[str, str | int | float | bool]:
    """The span tags Envoy with Istio's tracing config sets on a request, with their names.
    Empty optional values are left out, as Envoy does."""
    attrs: dict[str, str | int | float | bool] = {
        "component": "proxy",
        "http.method": method,
        "http.url": url,
        "http.status_code": status_code,
        "response_flags": response_flags or "-",
        "request_size": request_size,
        "response_size": response_size,
        "guid:x-request-id": request_id,
    }
    optional = {
        "http.protocol": protocol,
        "user_agent": user_agent,
        "upstream_cluster": upstream_cluster,
        "istio.canonical_service": canonical_service,
        "istio.namespace": namespace,
        "node_id": node_id,
    }
    attrs.update({k: v for k, v in optional.items() if v})
    if status_code == 0 or status_code >= 500:
        attrs["error"] = "true"
    return attrs


# ---------------------------------------------------------------------------- OTLP JSON


def _any_value(value: str | int | float | bool) -> dict[str, Any]:
    # OTLP JSON follows the protobuf JSON mapping: 64-bit integers are strings.
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


def _span_json(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": _KIND_NUMBERS[span.kind],
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(span.end_ns),
        "attributes": [{"key": k, "value": _any_value(v)} for k, v in span.attributes.items()],
        "status": {"code": _STATUS_ERROR if span.error else _STATUS_OK},
    }
    if span.parent_span_id:
        out["parentSpanId"] = span.parent_span_id
    if span.tracestate:
        out["traceState"] = span.tracestate
    return out


def encode_spans(spans: Iterable[Span], service_name: str) -> bytes:
    """An OTLP `ExportTraceServiceRequest` in its JSON encoding (hex ids, as OTLP/JSON
    requires, not base64)."""
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": service_name}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "ztagent", "version": __version__},
                        "spans": [_span_json(s) for s in spans],
                    }
                ],
            }
        ]
    }
    return json.dumps(body, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- exporter

_TIMEOUT = 5.0
_CLOSE_BUDGET = 2.0
_LOG_EVERY = 60.0
_MAX_RESPONSE = 1 << 20


class OtlpExporter:
    """Sends ended, sampled spans to an OpenTelemetry collector over OTLP/HTTP with JSON
    bodies (`POST {endpoint}/v1/traces`), on one kept-alive HTTP/1.1 connection.

    Only `http://` endpoints are supported: https (TLS to the collector) is not, and is
    refused at construction; run a collector next to the waypoint or behind the mesh.
    Runs in the event loop that calls `start` (or the first `submit`); `close` sends what
    is queued, waiting at most 2 s.
    """

    def __init__(
        self,
        endpoint: str,
        service_name: str,
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
        interval: float = 1.0,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme == "https":
            raise LocalError(
                f"OTLP endpoint {endpoint!r}: https is not supported; use an http:// endpoint"
            )
        if parts.scheme != "http" or not parts.hostname:
            raise LocalError(f"OTLP endpoint {endpoint!r} must be http://host[:port][/path]")
        try:
            port = parts.port or 80
        except ValueError as e:
            raise LocalError(f"OTLP endpoint {endpoint!r}: {e}") from None
        if max_queue < 1 or max_batch < 1 or interval <= 0:
            raise LocalError("max_queue and max_batch must be at least 1, interval above 0")
        self.endpoint = endpoint
        self.service_name = service_name
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.interval = interval
        self._host = parts.hostname
        self._port = port
        self._authority = parts.netloc.rpartition("@")[2]
        path = parts.path.rstrip("/")
        self._path = path if path.endswith("/v1/traces") else f"{path}/v1/traces"
        self._queue: deque[Span] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._client: Http1Client | None = None
        self._last_log = -_LOG_EVERY
        self._unlogged = 0
        # Counters, read by whoever reports on the exporter.
        self.exported = 0
        self.dropped = 0
        self.failed_batches = 0
        self.failed_spans = 0

    # ------------------------------------------------------------ the data path's side

    def start(self) -> None:
        """Start the sending task in the running loop (idempotent)."""
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-exporter")

    def submit(self, span: Span) -> None:
        """Queue an ended span; never blocks. Unsampled spans are ignored; a full queue (or a
        closed exporter) drops the span and counts it in `dropped`."""
        if not span.sampled:
            return
        if not span.ended:
            raise LocalError(f"span {span.span_id} submitted before end()")
        if self._closing or len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append(span)
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: start() later
                self.start()
        if len(self._queue) >= self.max_batch:
            self._wake.set()

    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------ the sending task

    async def _run(self) -> None:
        while not self._closing:
            if len(self._queue) < self.max_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            while self._queue and not self._closing:
                await self._send_batch()
                if len(self._queue) < self.max_batch:
                    break

    def _take_batch(self) -> list[Span]:
        n = min(self.max_batch, len(self._queue))
        return [self._queue.popleft() for _ in range(n)]

    async def _send_batch(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        body = encode_spans(batch, self.service_name)
        try:
            await self._post(body)
        except asyncio.CancelledError:
            self.dropped += len(batch)  # close() ran out of time with this batch in flight
            raise
        except Exception as e:  # any failure ends this batch, never the exporter
            self._close_conn()
            self.failed_batches += 1
            self.failed_spans += len(batch)
            self._log_failure(e, len(batch))
        else:
            self.exported += len(batch)

    def _log_failure(self, error: BaseException, spans: int) -> None:
        self._unlogged += spans
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY:
            return
        self._last_log = now
        log.warning(
            "trace export failed; spans dropped",
            extra={
                "fields": {
                    "endpoint": self.endpoint,
                    "error": str(error) or type(error).__name__,
                    "dropped_since_last_report": self._unlogged,
                }
            },
        )
        self._unlogged = 0

    async def _post(self, body: bytes) -> None:
        reused = self._client is not None
        try:
            await asyncio.wait_for(self._exchange(body), _TIMEOUT)
        except (OSError, UpstreamError) as e:
            if not reused or (isinstance(e, UpstreamError) and not e.reset):
                raise
            # The collector may have closed the idle kept-alive connection: one fresh try.
            self._close_conn()
            await asyncio.wait_for(self._exchange(body), _TIMEOUT)

    async def _exchange(self, body: bytes) -> None:
        client = self._client
        if client is None or not client.reusable:
            self._close_conn()
            reader, writer = await asyncio.open_connection(self._host, self._port)
            client = self._client = Http1Client(reader, writer)
        head = RequestHead(
            "POST",
            self._authority,
            self._path,
            [("content-type", "application/json"), ("user-agent", f"ztagent/{__version__}")],
        )
        response, answer = await client.request(head, Body.of(body))
        try:
            if await read_all(answer, _MAX_RESPONSE) is None:
                raise RemoteError("collector response too large")
        except BodyError as e:
            raise RemoteError(f"collector response cut short: {e}") from None
        finally:
            answer.fail(BodyError("response read"))  # the rest, if any, is unwanted
        if not client.reusable:
            self._close_conn()
        if not 200 <= response.status < 300:
            raise RemoteError(f"collector answered HTTP {response.status}", response.status)

    def _close_conn(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop taking spans and send what is queued, within 2 s; what is left is dropped."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        deadline = asyncio.get_running_loop().time() + _CLOSE_BUDGET
        if task is not None:
            # The task stops after its current batch (if any); cap that wait too.
            try:
                await asyncio.wait_for(asyncio.shield(task), _CLOSE_BUDGET)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            while self._queue:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                await asyncio.wait_for(self._send_batch(), remaining)
        except TimeoutError:
            pass
        self.dropped += len(self._queue)
        self._queue.clear()
        self._close_conn()
