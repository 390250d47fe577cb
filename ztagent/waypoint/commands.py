"""What the waypoint's pipeline tells the proxy to do: the commands and the values they carry.

`Pipeline.request` (in `pipeline`) returns one `Step`: `Respond` (a local reply), `Delay` (wait,
then `Pipeline.resume`), `Forward` (to a cluster, with its `Mirror`s) or `ForwardToWorkload` (a
pod-addressed request). `Pipeline.tunnel` admits a CONNECT (`Downstream`) or `Refuse`s it. This
module also holds Envoy's response flags, the canned local replies (`NO_HEALTHY_UPSTREAM`,
`UPSTREAM_TIMEOUT`, ...) and the helpers that build them, the replay limit, and
`with_request_id`, which finishes every response's headers. Frozen dataclasses, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ztagent.http.messages import RequestHead
from ztagent.identity.spiffe import Identity
from ztagent.istio import routing
from ztagent.istio.connection_pool import ConnectionPool, Overflow
from ztagent.istio.resilience import RetryPolicy
from ztagent.istio.routing import Headers, Request, RouteChoice
from ztagent.model.workload import Service, Workload
from ztagent.telemetry.tracing import REQUEST_ID, Span
from ztagent.waypoint.cluster import Cluster, UpstreamKey

REPLAY_LIMIT = 64 * 1024
"""Largest request body (of known length) kept whole so that retries and mirrors can resend it."""

# Envoy's response flags.
NO_FLAGS = "-"
FLAG_NO_ROUTE = "NR"
FLAG_NO_HEALTHY = "UH"
FLAG_CONNECT = "UF"
FLAG_OVERFLOW = "UO"
FLAG_RESET = "UC"
FLAG_TIMEOUT = "UT"
FLAG_RETRY_LIMIT = "URX"
FLAG_FAULT_ABORT = "FI"
FLAG_FAULT_DELAY = "DI"
FLAG_RBAC = "RBAC"
FLAG_JWT = "UAEX"

GRPC_CONTENT_TYPE = "application/grpc"


def replayable(length: int | None) -> bool:
    """Whether a request body of declared `length` is read whole before forwarding, so that
    retries and mirrors can resend it (Envoy's retry buffer)."""
    return length is not None and length <= REPLAY_LIMIT


@dataclass(frozen=True, slots=True)
class Downstream:
    """One tunnel into the waypoint: who sent it and where the client was going."""

    peer_identity: Identity
    client_ip: str
    """The original client's IP: the CONNECT's `forwarded: for=` when it is an address of a
    workload with the peer's identity, else the peer's own address."""
    target: tuple[str, int]
    """The CONNECT `:authority`: service VIP:port or workload IP:port."""
    service: Service | None
    workload: Workload | None
    source: Workload | None


def with_request_id(headers: list[tuple[str, str]], request_id: str) -> list[tuple[str, str]]:
    """The response headers with the request's `x-request-id` added when they carry none
    (a local reply, or an upstream that did not echo it)."""
    if any(k == REQUEST_ID for k, _ in headers):
        return headers
    return [*headers, (REQUEST_ID, request_id)]


def grpc_status(
    headers: Sequence[tuple[str, str]], trailers: Sequence[tuple[str, str]] = ()
) -> int | None:
    """A response's grpc-status (the head's, else the trailers'), None without a valid one."""
    for name, value in (*headers, *trailers):
        if name == "grpc-status":
            try:
                return int(value)
            except ValueError:
                continue
    return None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse a tunnel (the CONNECT is answered with `status`)."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client from the waypoint itself (`headers` complete, length included)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    flags: str = NO_FLAGS


def respond(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    flags: str = NO_FLAGS,
    *,
    content_type: str = "text/plain",
) -> Respond:
    """A local reply: `headers`, a content-type when there is a body, the content-length."""
    out = [*headers]
    if body and not any(k == "content-type" for k, _ in out):
        out.append(("content-type", content_type))
    out.append(("content-length", str(len(body))))
    return Respond(status, tuple(out), body, flags)


def grpc_respond(grpc_status: int, message: str, flags: str) -> Respond:
    """A trailers-only gRPC answer: HTTP 200 with grpc-status and grpc-message, no body."""
    headers = (
        ("content-type", GRPC_CONTENT_TYPE),
        ("grpc-status", str(grpc_status)),
        ("grpc-message", message),
    )
    return Respond(200, headers, b"", flags)


def overflow_respond(overflow: Overflow) -> Respond:
    """A connection pool limit refused the request (Envoy's UO)."""
    return respond(
        overflow.status,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        [("x-envoy-overloaded", "true")],
        flags=FLAG_OVERFLOW,
    )


def connect_failure_respond(detail: str) -> Respond:
    """No connection to the chosen endpoint (Envoy's UF)."""
    return respond(
        503,
        f"upstream connect error or disconnect/reset before headers. reset reason: "
        f"connection failure, {detail}".encode(),
        flags=FLAG_CONNECT,
    )


def workload_connect_failure(detail: str) -> Respond:
    """A pod-addressed request whose workload could not be reached."""
    return respond(503, f"upstream connect error: {detail}".encode(), flags=FLAG_CONNECT)


NO_HEALTHY_UPSTREAM = respond(503, b"no healthy upstream", flags=FLAG_NO_HEALTHY)
UPSTREAM_TIMEOUT = respond(504, b"upstream request timeout", flags=FLAG_TIMEOUT)
UPSTREAM_RESET = respond(
    503,
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: connection termination",
    flags=FLAG_RESET,
)
RESPONSE_BODY_RESET = respond(
    503, b"upstream reset before the response body ended", flags=FLAG_RESET
)
INTERNAL_ERROR = respond(500, b"internal error", flags=NO_FLAGS)


@dataclass(frozen=True, slots=True)
class Mirror:
    """Send a copy of the request to `host`/`subset`/`port` (Host gets `-shadow`); the
    response is read and dropped. Only replayable bodies are mirrored."""

    host: str
    port: int
    subset: str
    head: RequestHead
    http2: bool
    request: Request
    """What the mirror's balancer hashes on."""


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """Where one mirrored copy goes; its pool request slot is taken (release it when done)."""

    cluster: Cluster
    key: UpstreamKey


@dataclass(frozen=True, slots=True)
class Forward:
    """Send `head` upstream to `cluster` (after reading a replayable body and starting the
    mirrors), attempt by attempt through a `RetryState`; then `reply_flags` and
    `response_headers` finish the response. `cluster` None: the destination has no cluster
    (unknown host or subset); once the mirrors are started, `Pipeline.retry_state` answers
    `NO_HEALTHY_UPSTREAM`."""

    cluster: Cluster | None
    head: RequestHead
    request: Request
    source_ip: str
    retry: RetryPolicy | None
    timeout: float | None
    """Seconds for the whole request, retries included (the route's `timeout`), or None."""
    mirrors: tuple[Mirror, ...]
    choice: RouteChoice
    destination: routing.Destination
    flags: str
    """The flags the request carries so far (a fault delay's DI)."""

    def reply_flags(self, flags: str) -> str:
        """The response's flags: its own, else those this request picked up on the way."""
        return self.flags if flags == NO_FLAGS else flags

    def response_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The response headers after the route's then the destination's edits."""
        return list(self.choice.response_headers(Headers.of(headers), self.destination))


@dataclass(frozen=True, slots=True)
class ForwardToWorkload:
    """A pod-addressed request: no routes apply; send `head` to the workload itself."""

    workload: Workload
    key: UpstreamKey
    pool: ConnectionPool
    head: RequestHead

    def failed(self, detail: str) -> Respond:
        """The answer when the workload could not be reached (no retries: no route)."""
        return workload_connect_failure(detail)


@dataclass(frozen=True, slots=True)
class Routed:
    """A forward decided up to the destination draw, held over a fault delay."""

    choice: RouteChoice
    action: routing.Forward
    request: Request
    head: RequestHead
    down: Downstream
    span: Span
    replayable: bool


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait `seconds` (a fault delay), then `Pipeline.resume` says what follows."""

    seconds: float
    then: Respond | Routed


Step = Respond | Delay | Forward | ForwardToWorkload
