"""The protocol-neutral shapes of HTTP messages and the header rules every side applies.

Two kinds of message live here. Streamed ones, for the waypoint: `RequestHead`/`ResponseHead`
with a `Body` (see `ztagent.http.body`), carrying the same meaning whichever HTTP version
produced them. Whole ones, for the small admin, metrics and readiness servers: `Request` and
`Response` with the body in memory.

Heads hold lower-case header names without pseudo-headers and without hop-by-hop headers
(`HOP_BY_HOP`, plus any named in `Connection`), except `te: trailers`, which gRPC needs and
HTTP/2 allows. `content-length` may appear in a head; when a message is sent, the Body's
`length` decides the framing and any `content-length` header is replaced by it (except for
responses that have no body: HEAD, 204, 304, where the headers pass as they are).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ztagent.http.body import Body

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "http2-settings",
        "host",
    }
)

NO_BODY_STATUSES = frozenset({204, 304})
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


# ------------------------------------------------------------------ streamed messages


@dataclass(slots=True)
class RequestHead:
    method: str
    authority: str
    path: str
    headers: list[tuple[str, str]]
    scheme: str = "http"
    protocol: str = "HTTP/1.1"


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]


class UpstreamError(Exception):
    """The upstream failed before a response head arrived. `reset` is True when the connection
    or stream was reset or closed (Envoy's "reset"), False for e.g. a protocol error."""

    def __init__(self, message: str, *, reset: bool) -> None:
        super().__init__(message)
        self.reset = reset


Handler = Callable[[RequestHead, Body], Awaitable[tuple[ResponseHead, Body]]]
"""Serves one streamed request: the response head and its Body."""


# ------------------------------------------------------------------ whole messages


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    peer: str = ""

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter `name` ("" for a bare `?name`)."""
        values = self.query.get(name)
        return values[-1] if values else default

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def text(
        cls, body: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, (("content-type", content_type),), body.encode())

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        body = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
        return cls(status, (("content-type", "application/json"),), body.encode())

    @classmethod
    def method_not_allowed(cls, *allow: str) -> Response:
        return cls(405, (("allow", ", ".join(allow)),), b"method not allowed\n")


# ------------------------------------------------------------------ header rules


def dec(value: bytes) -> str:
    return value.decode("latin-1")


def enc(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def clean_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Lower-case names; drop pseudo-headers, hop-by-hop headers and those named in
    `Connection`; keep `te: trailers`."""
    pairs = [(dec(n).lower(), dec(v)) for n, v in raw]
    named = {
        token.strip().lower()
        for name, value in pairs
        if name == "connection"
        for token in value.split(",")
    }
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        if name.startswith(":"):
            continue
        if name == "te":
            if "trailers" in (t.strip().lower() for t in value.split(",")):
                out.append(("te", "trailers"))
            continue
        if name in HOP_BY_HOP or name in named:
            continue
        out.append((name, value))
    return out


def content_length(headers: Iterable[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            with contextlib.suppress(ValueError):
                length = int(value.split(",")[0].strip())
                if length >= 0:
                    return length
            return None
    return None


def framed(headers: list[tuple[str, str]], length: int | None) -> list[tuple[str, str]]:
    """`headers` with content-length replaced by `length` (none when unknown)."""
    out = [(n, v) for n, v in headers if n != "content-length"]
    if length is not None:
        out.append(("content-length", str(length)))
    return out


def has_no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def peer_text(peer: Any) -> str:
    """A socket's peer name as "host:port" ("[v6]:port")."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")
