"""What a route does with a request: forward it to weighted destinations (`Forward`), answer
with a redirect (`Redirect`) or a fixed response (`DirectResponse`) — together `RouteAction` —
and the edits on the way: header operations, path and authority rewrites, mirrors. Pure;
randomness is an argument."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ztagent.istio.resilience import RandomSource, chance, draw
from ztagent.istio.routing.match import MATCH_ALL, RequestMatch, ValueMatch
from ztagent.istio.routing.re2 import re2_substitution
from ztagent.istio.routing.request import Headers, Request


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header edits, applied as Envoy does: remove, then set (replace), then add (append)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: Headers) -> Headers:
        for name in self.remove:
            headers = headers.remove(name)
        for name, value in self.set:
            headers = headers.set(name, value)
        for name, value in self.add:
            headers = headers.add(name, value)
        return headers

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a forwarded request goes: a service host, an optional port and subset."""

    host: str
    port: int | None = None
    """None: the port the request was addressed to."""
    subset: str = ""
    weight: int = 1
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    authority: str | None = None
    """Authority to send, from this destination's header edits."""

    def port_for(self, request: Request) -> int:
        return request.port if self.port is None else self.port


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to one of `destinations`, chosen by weight."""

    destinations: tuple[Destination, ...]

    def __post_init__(self) -> None:
        if not self.destinations:
            raise ValueError("Forward needs at least one destination")
        if len(self.destinations) > 1 and not any(d.weight > 0 for d in self.destinations):
            raise ValueError("total destination weight is 0")

    def choose(self, rng: RandomSource) -> Destination:
        """A destination with probability weight/total; a single one is chosen without a
        draw, a weight-0 one never when there are several."""
        if len(self.destinations) == 1:
            return self.destinations[0]
        total = sum(d.weight for d in self.destinations)
        point = draw(rng) * total
        chosen = self.destinations[0]
        for dest in self.destinations:
            if dest.weight <= 0:
                continue
            chosen = dest
            if point < dest.weight:
                break
            point -= dest.weight
        return chosen


class PortMode(enum.Enum):
    """Where a redirect's port comes from when none is given."""

    KEEP = "keep"
    """Envoy's default: keep the request's Host as sent (dropping a port made meaningless by a
    scheme change, such as :80 on a redirect to https)."""
    REQUEST = "from-request-port"
    """The port the request was addressed to."""
    PROTOCOL_DEFAULT = "from-protocol-default"
    """No port: the scheme's default."""


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer with a redirect (`Location` built from the request and these fields)."""

    status: int = 301
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    port_mode: PortMode = PortMode.KEEP
    path: str | None = None
    """Replace the whole path."""
    prefix: str | None = None
    """Replace the matched prefix."""
    segments: bool = False
    """Gateway API prefix replacement (whole segments, see `replace_segment_prefix`)."""

    def location(self, request: Request, match: RequestMatch = MATCH_ALL) -> str:
        scheme = self.scheme or request.scheme
        port = self.port
        if port is None and self.port_mode is PortMode.REQUEST:
            port = request.port
        if self.host is not None:
            host = self.host
        else:
            host = request.authority
            name, sep, tail = _split_host_port(host)
            if sep:
                default = _DEFAULT_PORTS.get(request.scheme)
                if (
                    port is not None
                    or self.port_mode is PortMode.PROTOCOL_DEFAULT
                    or (scheme != request.scheme and tail == str(default))
                ):
                    host = name
        if port is not None and _DEFAULT_PORTS.get(scheme) != port:
            host = f"{_split_host_port(host)[0]}:{port}"
        path = request.path_only
        query = request.query
        if self.path is not None:
            path = self.path
            if "?" in path:
                query = ""
        elif self.prefix is not None:
            path = _replace_prefix(path, self.prefix, match, segments=self.segments)
        return f"{scheme}://{host}{path}{query}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host_port(authority: str) -> tuple[str, str, str]:
    """(host, ":" or "", port) of an authority, IPv6 literals included."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1 and authority[end + 1 : end + 2] == ":":
            return authority[: end + 1], ":", authority[end + 2 :]
        return authority, "", ""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, sep, port
    return authority, "", ""


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


RouteAction = Forward | Redirect | DirectResponse
"""What a route does; not an AuthorizationPolicy action (`ztagent.model.policy.Action`)."""


def replace_segment_prefix(path: str, prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: `prefix` (a matched PathPrefix, trailing "/" ignored)
    is replaced by `replacement` (trailing "/" ignored) keeping the segment separator:
    ("/foo/bar", "/foo", "/xyz") -> "/xyz/bar"; ("/foo/bar", "/foo", "/") -> "/bar";
    ("/foo", "/foo", "") -> "/"."""
    stem = prefix.rstrip("/")
    rest = path[len(stem) :]
    out = replacement.rstrip("/") + rest
    if not out.startswith("/"):
        out = "/" + out
    return out


def _replace_prefix(path: str, replacement: str, match: RequestMatch, *, segments: bool) -> str:
    if segments:
        prefix = match.path.value if match.path is not None else ""
        return replace_segment_prefix(path, prefix, replacement)
    length = match.path.matched_length(path) if match.path is not None else 1
    if match.path is None and not path.startswith("/"):
        length = 0
    return replacement + path[length:]


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Rewrite of the forwarded request: at most one path rewrite, and/or the authority."""

    prefix: str | None = None
    """Envoy prefix_rewrite: replace the matched prefix (the whole path after an exact or
    regex match, "/" when the route matched without a path)."""
    segment_prefix: str | None = None
    """Gateway API ReplacePrefixMatch (see `replace_segment_prefix`)."""
    full_path: str | None = None
    """Gateway API ReplaceFullPath."""
    regex: ValueMatch | None = None
    """VirtualService uriRegexRewrite: every match of `regex` is replaced by `substitution`."""
    substitution: str = ""
    authority: str | None = None

    def __post_init__(self) -> None:
        given = [self.prefix, self.segment_prefix, self.full_path, self.regex]
        if sum(x is not None for x in given) > 1:
            raise ValueError("at most one path rewrite")

    def path(self, request: Request, match: RequestMatch = MATCH_ALL) -> str:
        """The rewritten `:path` (query string kept)."""
        path = request.path_only
        if self.prefix is not None:
            path = _replace_prefix(path, self.prefix, match, segments=False)
        elif self.segment_prefix is not None:
            path = _replace_prefix(path, self.segment_prefix, match, segments=True)
        elif self.full_path is not None:
            path = self.full_path
        elif self.regex is not None:
            assert self.regex.pattern is not None
            path = self.regex.pattern.sub(re2_substitution(self.substitution), path)
        return path + request.query


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy `percent` of the route's requests to `destination` (responses ignored)."""

    destination: Destination
    percent: float = 100.0

    def should_mirror(self, rng: RandomSource) -> bool:
        return chance(rng, self.percent)
