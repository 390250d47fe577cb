"""L7 routing of the waypoint: VirtualService and HTTPRoute -> route tables -> per-request choices.

This module owns the route model and everything that is a pure function of configuration and
one request: reading Istio `VirtualService` (networking.istio.io v1/v1beta1/v1alpha3) and
Gateway API `HTTPRoute` (gateway.networking.k8s.io v1/v1beta1) into one model, choosing the
route for a request, choosing a weighted destination, rewriting the path and authority,
computing redirects and header edits. It does no I/O and never reads a clock; randomness is an
argument. Retry, fault and mirror decisions live in `resilience`; load balancing, connection
pools and outlier detection belong to `destination`; policy to `authz` and `jwt`.

Reading: `parse_routes(resources)` returns a `RouteConfig` holding every valid resource and a
`ResourceError` (kind, `ns/name`, field path, reason) for each bad one; a bad resource is left
out whole and the others still route. `RouteConfig.table(service, port)` builds the
`RouteTable` a waypoint uses for one service port, and `RouteTable.select(request)` answers
with a `RouteChoice`.

Semantics follow istiod's waypoint translation (pilot listener_waypoint.go, route.go,
kube/gateway conversion.go) and Envoy:

- A VirtualService applies to a service when it lives in the service's namespace or the
  waypoint's, one of its `hosts` (short names resolved in its own namespace; `*.suffix`
  wildcards allowed) matches the service hostname, and its `gateways` are empty or include
  `mesh`. Several such VirtualServices are merged in (creationTimestamp, namespace, name)
  order, oldest first, and the first matching route wins across them (istiod merges them
  the same way; with a catch-all in the oldest, the oldest effectively wins).
- A match with `port` applies only on that service port; a match with `sourceLabels` is
  dropped (ambient has no source labels: istiod drops it too), as is one with `gateways` not
  including `mesh`, a `sourceNamespace` other than the waypoint's, or a JWT-claim header.
- When VirtualService routes exist for the port and none matches, the answer is 404, as
  Envoy answers a route miss; when no VirtualService has routes for the port, the request
  goes to the original service with Istio's default retry policy. When any HTTPRoute binds
  the service, its VirtualServices are not used: istiod would concatenate both by age, which
  mixes the two APIs' precedence rules, so this waypoint takes the HTTPRoutes alone. A
  route miss then is 404 and a port no HTTPRoute binds goes to the service.
- HTTPRoute binds through `parentRefs` of kind Service (group "" or "core"), optionally one
  `port`; `hostnames` are ignored for Service parents, as istiod does. Routes from all
  HTTPRoutes of a service are ordered by Gateway API precedence: Exact path, then the longest
  PathPrefix, then RegularExpression; then a method match, more header matches, more query
  matches; ties by oldest creationTimestamp, then namespace/name, then rule and match order.
- Weights are relative (Istio no longer requires a sum of 100): with more than one
  destination a weight-0 destination is never chosen and an all-zero total is an error; a
  single destination's weight is ignored. HTTPRoute weights default to 1 and a rule whose
  backends all weigh 0 answers 500.
- Durations in VirtualService are Go durations ("1s", "0.5s", "100ms", "1m30s": istiod reads
  them with time.ParseDuration) of at least 1 ms and whole milliseconds; HTTPRoute durations
  use the Gateway API form ("10s", "500ms", "1h30m"), "0s" meaning no timeout.
- Regular expressions have RE2 syntax; they are translated for Python's `re` and constructs
  RE2 lacks (backreferences, lookaround, atomic groups, possessive quantifiers) are rejected.
  Paths, headers and query values must match the whole value.
- VirtualService `uri` prefix matches are plain string prefixes; HTTPRoute PathPrefix
  matches whole segments ("/foo" matches "/foo" and "/foo/bar", not "/foobar").
  Matching looks at the path without its query string. A VirtualService `rewrite.uri`
  replaces what the match matched (Envoy's prefix_rewrite); HTTPRoute ReplacePrefixMatch
  follows the Gateway API table, also for a "/" prefix ("/foo" -> "/xyz/foo").
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from ztagent.istio.envelope import Resource, ResourceError
from ztagent.istio.resilience import (
    DEFAULT_RETRY_POLICY,
    FaultPolicy,
    GrpcStatus,
    RandomSource,
    RetryPolicy,
    chance,
    draw,
    retry_policy,
)
from ztagent.model.fields import Invalid, join, show, type_name

log = logging.getLogger(__name__)

DEFAULT_DOMAIN_SUFFIX = "cluster.local"
MESH_GATEWAY = "mesh"
VIRTUAL_SERVICE = "VirtualService"
HTTP_ROUTE = "HTTPRoute"
MAX_REGEX_LENGTH = 1024
MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024
MAX_HTTPROUTE_WEIGHT = 1_000_000

_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("networking.istio.io", VIRTUAL_SERVICE): ("v1", "v1beta1", "v1alpha3"),
    ("gateway.networking.k8s.io", HTTP_ROUTE): ("v1", "v1beta1"),
}

# --- requests and headers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Headers:
    """An ordered, case-insensitive multi-map of HTTP header fields (immutable)."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, data: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> Headers:
        items = data.items() if isinstance(data, Mapping) else data
        return cls(tuple((str(k), str(v)) for k, v in items))

    def get_all(self, name: str) -> tuple[str, ...]:
        key = name.lower()
        return tuple(v for k, v in self.pairs if k.lower() == key)

    def get(self, name: str) -> str | None:
        """The first value of `name`, or None."""
        key = name.lower()
        return next((v for k, v in self.pairs if k.lower() == key), None)

    def joined(self, name: str) -> str | None:
        """All values of `name` joined by "," (how Envoy matches repeated headers), or None."""
        values = self.get_all(name)
        return ",".join(values) if values else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def remove(self, name: str) -> Headers:
        key = name.lower()
        return Headers(tuple((k, v) for k, v in self.pairs if k.lower() != key))

    def set(self, name: str, value: str) -> Headers:
        return Headers((*self.remove(name).pairs, (name, value)))

    def add(self, name: str, value: str) -> Headers:
        return Headers((*self.pairs, (name, value)))


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Who sent the request, as the waypoint learnt it from the HBONE tunnel."""

    namespace: str = ""
    principal: str = ""
    address: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """The parts of one HTTP request that routing looks at."""

    method: str
    path: str
    """The request target as sent (`:path`), query string included."""
    authority: str = ""
    scheme: str = "http"
    headers: Headers = Headers()
    port: int = 80
    """The service port the request was addressed to."""
    source: SourceInfo = SourceInfo()

    @property
    def path_only(self) -> str:
        """The path without query string or fragment (what path matches look at)."""
        end = len(self.path)
        for mark in "?#":
            index = self.path.find(mark)
            if index != -1:
                end = min(end, index)
        return self.path[:end]

    @property
    def query(self) -> str:
        """The query string with its leading `?`, or ""."""
        path = self.path.split("#", 1)[0]
        index = path.find("?")
        return "" if index == -1 else path[index:]

    def query_param(self, name: str) -> str | None:
        """The first value of query parameter `name`, percent-decoded; "" when it has no
        value; None when absent."""
        for part in self.query[1:].split("&"):
            if not part:
                continue
            key, _, value = part.partition("=")
            if unquote(key) == name:
                return unquote(value)
        return None

    def header(self, name: str) -> str | None:
        """A header for matching; pseudo-headers and `host` read the request line."""
        lowered = name.lower()
        if lowered in (":authority", "host"):
            return self.authority
        if lowered == ":method":
            return self.method
        if lowered == ":path":
            return self.path
        if lowered == ":scheme":
            return self.scheme
        return self.headers.joined(name)


# --- RE2 ---------------------------------------------------------------------------------------

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_REPEAT = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
_RE2_MAX_REPEAT = 1000


def _re2_group(pattern: str, i: int) -> tuple[str, int]:
    """Translate the opening of a group at `pattern[i] == "("`; returns (text, next index)."""
    rest = pattern[i + 2 :] if pattern.startswith("(?", i) else None
    if rest is None:
        return "(", i + 1
    if rest.startswith(("=", "!", "<=", "<!")):
        raise ValueError("lookahead and lookbehind assertions are not supported by RE2")
    if rest.startswith(">"):
        raise ValueError("atomic groups (?>...) are not supported by RE2")
    if rest.startswith("("):
        raise ValueError("conditional groups are not supported by RE2")
    if rest.startswith("P="):
        raise ValueError("backreferences are not supported by RE2")
    if rest.startswith("#"):
        raise ValueError("comment groups (?#...) are not supported by RE2")
    if rest.startswith("P<"):
        return "(?P<", i + 4
    if rest.startswith("<"):
        return "(?P<", i + 3
    end = i + 2
    while end < len(pattern) and pattern[end] not in ":)":
        flag = pattern[end]
        if flag == "U":
            raise ValueError("the ungreedy flag U is not supported")
        if flag not in "ims-":
            raise ValueError(f"unknown group flag {flag!r}")
        end += 1
    return pattern[i:end], end


def re2_to_python(pattern: str) -> str:
    """Rewrite an RE2 pattern into Python `re` syntax with the same meaning.

    Raises ValueError for RE2 syntax errors this check sees and for Python-only constructs
    (RE2 would reject them); anything else is left to `re.compile`."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    class_body = 0
    after_repeat = False
    while i < n:
        c = pattern[i]
        repeat = False
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("trailing backslash")
            e = pattern[i + 1]
            if e in "123456789":
                raise ValueError("backreferences are not supported by RE2")
            if e in "pP":
                raise ValueError("Unicode classes (\\p, \\P) are not supported")
            if e in "QECNuU":
                raise ValueError(f"\\{e} is not supported")
            if e == "Z":
                raise ValueError("\\Z is not RE2 syntax (use \\z or $)")
            if e == "z" and not in_class:
                out.append("\\Z")
            elif e == "x" and pattern.startswith("{", i + 2):
                end = pattern.find("}", i + 3)
                digits = pattern[i + 3 : end] if end != -1 else ""
                if not digits or not re.fullmatch(r"[0-9A-Fa-f]{1,6}", digits):
                    raise ValueError("bad \\x{...} escape")
                code = int(digits, 16)
                if code > 0x10FFFF:
                    raise ValueError("bad \\x{...} escape")
                out.append(f"\\U{code:08x}")
                i = end + 1
                after_repeat = False
                continue
            else:
                out.append(pattern[i : i + 2])
            i += 2
        elif in_class:
            if c == "]" and i > class_body:
                in_class = False
                out.append(c)
            elif pattern.startswith("[:", i) and (end := pattern.find(":]", i + 2)) != -1:
                name = pattern[i + 2 : end]
                if name.startswith("^"):
                    raise ValueError("negated POSIX classes [:^name:] are not supported")
                if name not in _POSIX_CLASSES:
                    raise ValueError(f"unknown POSIX class [:{name}:]")
                out.append(_POSIX_CLASSES[name])
                i = end + 2
                continue
            elif c == "[":
                out.append("\\[")
            elif c in "&~|-" and pattern.startswith(c, i + 1):
                # Python reserves doubled set operators for future use; RE2 reads literals.
                out.append(c + "\\" + c)
                i += 2
                continue
            else:
                out.append(c)
            i += 1
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            class_body = i
            after_repeat = False
            continue
        elif c == "(":
            text, i = _re2_group(pattern, i)
            out.append(text)
            after_repeat = False
            continue
        elif c in "*+?":
            if after_repeat and c == "+":
                raise ValueError("possessive quantifiers are not supported by RE2")
            repeat = not (after_repeat and c == "?")
            out.append(c)
            i += 1
        elif c == "{" and (m := _REPEAT.match(pattern, i)):
            if after_repeat:
                raise ValueError("bad repetition operator")
            low = int(m.group(1))
            high = int(m.group(3)) if m.group(3) else low
            if max(low, high) > _RE2_MAX_REPEAT:
                raise ValueError(f"repeat count above {_RE2_MAX_REPEAT}")
            out.append(m.group(0))
            i = m.end()
            repeat = True
        else:
            # RE2 reads a brace that opens no repetition (such as "{,3}") literally.
            out.append("\\{" if c == "{" else c)
            i += 1
        after_repeat = repeat
    if in_class:
        raise ValueError("missing closing ]")
    return "".join(out)


def compile_re2(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Compile an RE2 pattern; ValueError with the reason when RE2 (or this check) rejects it.
    `\\d`, `\\w`, `\\s` and `\\b` are ASCII-only, as in RE2."""
    if not pattern:
        raise ValueError("regular expression must not be empty")
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"regular expression is longer than {MAX_REGEX_LENGTH} characters")
    translated = re2_to_python(pattern)
    flags = re.ASCII | (re.IGNORECASE if ignore_case else 0)
    try:
        return re.compile(translated, flags)
    except re.error as exc:
        raise ValueError(f"not a valid RE2 regular expression: {exc.msg}") from None
    except (OverflowError, RecursionError):
        raise ValueError("regular expression is too complex") from None


def re2_substitution(template: str) -> Callable[[re.Match[str]], str]:
    """An RE2 substitution string (`\\0`..`\\9` groups, `\\\\` a backslash) as a function."""
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "\\":
            nxt = template[i + 1 : i + 2]
            if nxt.isdigit():
                parts.append("".join(literal))
                literal = []
                parts.append(int(nxt))
            elif nxt == "\\":
                literal.append("\\")
            else:
                raise ValueError(f"invalid escape \\{nxt} in rewrite (use \\0 to \\9 or \\\\)")
            i += 2
            continue
        literal.append(c)
        i += 1
    parts.append("".join(literal))

    def substitute(match: re.Match[str]) -> str:
        return "".join(p if isinstance(p, str) else (match.group(p) or "") for p in parts)

    return substitute


# --- matching ----------------------------------------------------------------------------------


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SEGMENT_PREFIX = "segment-prefix"
    """Gateway API PathPrefix: whole path segments; `value` has no trailing "/"."""
    REGEX = "regex"
    PRESENT = "present"
    """The header or parameter exists, whatever its value."""


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    """Exact and prefix only; Envoy ignores the flag for regular expressions."""
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def regex(cls, value: str) -> StringMatch:
        return cls(MatchKind.REGEX, value, pattern=compile_re2(value))

    def matches(self, text: str) -> bool:
        kind = self.kind
        if kind is MatchKind.PRESENT:
            return True
        if kind is MatchKind.REGEX:
            assert self.pattern is not None
            return self.pattern.fullmatch(text) is not None
        value = self.value
        if self.ignore_case:
            text, value = text.lower(), value.lower()
        if kind is MatchKind.EXACT:
            return text == value
        if kind is MatchKind.PREFIX:
            return text.startswith(value)
        return text == value or text.startswith(value + "/") or (not value and text == "")

    def matched_length(self, text: str) -> int:
        """How much of `text` a path rewrite treats as matched (Envoy's rule: the prefix for
        prefix matches, the whole path for exact and regex matches)."""
        if self.kind in (MatchKind.PREFIX, MatchKind.SEGMENT_PREFIX):
            return len(self.value)
        if self.kind is MatchKind.PRESENT:
            return 1 if text.startswith("/") else 0
        return len(text)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    match: StringMatch
    invert: bool = False
    """VirtualService `withoutHeaders`: a missing header counts as "" (or, for a presence
    match, the header must be absent)."""

    def matches(self, request: Request) -> bool:
        value = request.header(self.name)
        if self.invert:
            if self.match.kind is MatchKind.PRESENT:
                return value is None
            return not self.match.matches(value or "")
        return value is not None and self.match.matches(value)


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: str
    match: StringMatch

    def matches(self, request: Request) -> bool:
        value = request.query_param(self.name)
        return value is not None and self.match.matches(value)


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """One match condition: every field given must hold. `RequestMatch()` matches all."""

    path: StringMatch | None = None
    method: StringMatch | None = None
    scheme: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryMatch, ...] = ()
    port: int | None = None

    def matches(self, request: Request) -> bool:
        if self.port is not None and request.port != self.port:
            return False
        if self.path is not None and not self.path.matches(request.path_only):
            return False
        for name, matcher in (
            (request.method, self.method),
            (request.scheme, self.scheme),
            (request.authority, self.authority),
        ):
            if matcher is not None and not matcher.matches(name):
                return False
        return all(h.matches(request) for h in self.headers) and all(
            q.matches(request) for q in self.query_params
        )


MATCH_ALL = RequestMatch()

# --- actions -----------------------------------------------------------------------------------


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


Action = Forward | Redirect | DirectResponse


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
    regex: StringMatch | None = None
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


# --- routes and tables -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteSource:
    """Which resource and rule a route came from (for logs, metrics and precedence ties)."""

    kind: str
    namespace: str
    name: str
    rule: int
    """Index in `spec.http` (VirtualService) or `spec.rules` (HTTPRoute); -1 for defaults."""
    match: int = 0
    """Index in the rule's matches (HTTPRoute rules become one route per match)."""
    created: datetime | None = None
    rule_name: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        if self.rule < 0:
            return f"{self.kind} {self.key}"
        where = "http" if self.kind == VIRTUAL_SERVICE else "rules"
        return f"{self.kind} {self.key} {where}[{self.rule}]"


@dataclass(frozen=True, slots=True)
class Route:
    """One ordered routing rule: any of `matches` selects it; then its action and policies."""

    source: RouteSource
    action: Action
    matches: tuple[RequestMatch, ...] = (MATCH_ALL,)
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    rewrite: Rewrite | None = None
    timeout: float | None = None
    """Seconds for the whole request including retries, or None for no limit."""
    retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
    fault: FaultPolicy | None = None
    mirrors: tuple[Mirror, ...] = ()

    def first_match(self, request: Request) -> RequestMatch | None:
        return next((m for m in self.matches if m.matches(request)), None)


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The route chosen for one request, the match that chose it, and what follows from it."""

    route: Route
    match: RequestMatch
    matched: bool
    """False when no route matched and the table's fallback answered."""

    @property
    def action(self) -> Action:
        return self.route.action

    def upstream_path(self, request: Request) -> str:
        rewrite = self.route.rewrite
        return request.path if rewrite is None else rewrite.path(request, self.match)

    def upstream_authority(self, request: Request, destination: Destination) -> str:
        """Route-level rewrite wins over a destination's own authority header edit."""
        rewrite = self.route.rewrite
        if rewrite is not None and rewrite.authority is not None:
            return rewrite.authority
        if destination.authority is not None:
            return destination.authority
        return request.authority

    def upstream_headers(self, request: Request, destination: Destination) -> Headers:
        """Request headers after the route's then the destination's edits."""
        headers = self.route.request_headers.apply(request.headers)
        return destination.request_headers.apply(headers)

    def response_headers(self, headers: Headers, destination: Destination | None) -> Headers:
        headers = self.route.response_headers.apply(headers)
        return headers if destination is None else destination.response_headers.apply(headers)

    def location(self, request: Request) -> str:
        """The redirect target; only for a `Redirect` action."""
        action = self.route.action
        if not isinstance(action, Redirect):
            raise TypeError("the chosen route does not redirect")
        return action.location(request, self.match)


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The routes of one service port, in order, and what to do when none matches."""

    host: str
    port: int
    routes: tuple[Route, ...]
    fallback: Route

    def select(self, request: Request) -> RouteChoice:
        for route in self.routes:
            match = route.first_match(request)
            if match is not None:
                return RouteChoice(route, match, True)
        return RouteChoice(self.fallback, MATCH_ALL, False)


# --- reading fields ----------------------------------------------------------------------------


def _at(path: str, key: str | int) -> str:
    return join(path, key, quote_odd=True)


def _type(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return "a number"
    return type_name(value)


def _map(value: object, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(path, f"must be a mapping, got {_type(value)}")
    for key in value:
        if not isinstance(key, str):
            raise Invalid(path, f"key {show(key)} must be a string")
    return value


def _list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(path, f"must be a list, got {_type(value)}")
    return value


def _str(value: object, path: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise Invalid(path, f"must be a string, got {_type(value)}")
    return value


def _bool(value: object, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise Invalid(path, f"must be a boolean, got {_type(value)}")
    return value


def _int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(path, f"must be an integer, got {_type(value)}")
    if not low <= value <= high:
        raise Invalid(path, f"{value} is not in {low}-{high}")
    return value


def _number(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(path, f"must be a number, got {_type(value)}")
    number = float(value)
    if not low <= number <= high:
        raise Invalid(path, f"{show(value)} is not in {low:g}-{high:g}")
    return number


def _only(data: Mapping[str, Any], path: str, known: Iterable[str]) -> None:
    allowed = set(known)
    for key in data:
        if key not in allowed:
            raise Invalid(_at(path, key), "unknown field")


def _strings(value: object, path: str) -> list[str]:
    out = []
    for i, item in enumerate(_list(value, path)):
        if not isinstance(item, str):
            raise Invalid(_at(path, i), f"must be a string, got {_type(item)}")
        if not item:
            raise Invalid(_at(path, i), "must not be empty")
        out.append(item)
    return out


def _port(value: object, path: str) -> int:
    return _int(value, path, 1, 65535)


def _regex(value: str, path: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    try:
        return compile_re2(value, ignore_case=ignore_case)
    except ValueError as exc:
        raise Invalid(path, f"{show(value)}: {exc}") from None


_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_go_duration(text: str) -> Fraction:
    """Seconds in a Go duration string ("1.5s", "100ms", "1m30s", "0"); ValueError if bad."""
    body = text[1:] if text[:1] == "+" else text
    if body == "0":
        return Fraction(0)
    if not body:
        raise ValueError("empty duration")
    total = Fraction(0)
    pos = 0
    while pos < len(body):
        m = _GO_DURATION.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += Fraction(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return total / 1_000_000_000


def _istio_duration(value: object, path: str) -> float:
    """A VirtualService duration: Go syntax, at least 1 ms, whole milliseconds."""
    if not isinstance(value, str):
        raise Invalid(path, f'must be a duration string such as "1s", got {_type(value)}')
    try:
        seconds = parse_go_duration(value)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not a duration (such as 1s, 0.5s, 100ms)") from None
    if seconds < Fraction(1, 1000):
        raise Invalid(path, f"{show(value)}: duration must be at least 1ms")
    if (seconds * 1000).denominator != 1:
        raise Invalid(path, f"{show(value)}: only durations to ms precision are supported")
    return float(seconds)


_GATEWAY_DURATION = re.compile(r"(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}")
_GATEWAY_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")


def _gateway_duration(value: object, path: str) -> float:
    """A Gateway API duration (GEP-2257): up to four `<1-5 digits><h|m|s|ms>` parts."""
    if not isinstance(value, str):
        raise Invalid(path, f'must be a duration string such as "10s", got {_type(value)}')
    if not _GATEWAY_DURATION.fullmatch(value):
        raise Invalid(path, f"{show(value)} is not a Gateway API duration (such as 10s, 500ms)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * scale[u] for n, u in _GATEWAY_PART.findall(value))


def _created(resource: Resource) -> datetime | None:
    metadata = _map(resource.body.get("metadata"), "metadata")
    value = metadata.get("creationTimestamp")
    if value is None:
        return None
    path = "metadata.creationTimestamp"
    if isinstance(value, datetime):
        stamp = value
    elif isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            raise Invalid(path, f"{show(value)} is not an RFC 3339 timestamp") from None
    else:
        raise Invalid(path, f"must be a timestamp, got {_type(value)}")
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def _creation_order(created: datetime | None, namespace: str, name: str) -> tuple[Any, ...]:
    """Oldest first; resources without a timestamp before all others, then namespace/name."""
    return (created is not None, created or datetime.min.replace(tzinfo=UTC), namespace, name)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")


def _header_name(value: object, path: str, *, pseudo: bool = False) -> str:
    name = _str(value, path)
    check = name[1:] if pseudo and name.startswith(":") else name
    if not _HEADER_NAME.fullmatch(check):
        raise Invalid(path, f"{show(name)} is not a valid header name")
    return name


def _header_value(value: object, path: str) -> str:
    text = _str(value, path)
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
        raise Invalid(path, "header value contains control characters")
    return text


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def _editable(name: str, path: str) -> None:
    """Istio's rule for header edits: no pseudo-headers, no Host (use the authority)."""
    if name.lower() == "host":
        raise Invalid(path, "cannot edit the Host header (set the authority instead)")
    if name.startswith(":"):
        raise Invalid(path, f'{show(name)}: header cannot have ":" prefix')
    _header_name(name, path)


_PSEUDO_HEADERS = (":method", ":scheme", ":authority", ":path", ":status")


# --- parsed resources --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """Mesh settings the waypoint needs to read routes the way istiod does."""

    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    waypoint_namespace: str = ""
    """The waypoint's own namespace: its VirtualServices and HTTPRoutes apply to every
    service it serves; a `sourceNamespace` match compares against it."""


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A service the waypoint serves: Kubernetes name and namespace, and its hostname."""

    name: str
    namespace: str
    hostname: str

    @classmethod
    def kubernetes(
        cls, name: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    ) -> ServiceRef:
        return cls(name, namespace, f"{name}.{namespace}.svc.{domain_suffix}")


@dataclass(frozen=True, slots=True)
class VirtualServiceRoutes:
    namespace: str
    name: str
    created: datetime | None
    hosts: tuple[str, ...]
    """Fully qualified hostnames or wildcards (`*`, `*.suffix`)."""
    routes: tuple[Route, ...]

    def binds(self, hostname: str) -> bool:
        return any(host_matches(pattern, hostname) for pattern in self.hosts)


@dataclass(frozen=True, slots=True)
class ParentRef:
    """An HTTPRoute parent of kind Service."""

    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRoutes:
    namespace: str
    name: str
    created: datetime | None
    parents: tuple[ParentRef, ...]
    routes: tuple[Route, ...]
    """One route per (rule, match) in rule order, each with a single match."""

    def binds(self, service: ServiceRef, port: int | None) -> bool:
        return any(
            p.name == service.name
            and p.namespace == service.namespace
            and (port is None or p.port is None or p.port == port)
            for p in self.parents
        )


def host_matches(pattern: str, hostname: str) -> bool:
    """Istio host matching: exact, `*` for all, `*.suffix` for any name ending in `.suffix`."""
    pattern, hostname = pattern.lower(), hostname.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return hostname.endswith(pattern[1:])
    return pattern == hostname


def default_route(host: str, namespace: str = "") -> Route:
    """The route to the original service when no configured route applies."""
    source = RouteSource("default", namespace, host, -1)
    return Route(source, Forward((Destination(host),)))


def not_found_route(host: str, namespace: str = "") -> Route:
    """Envoy's answer to a route miss (response flag NR)."""
    return Route(RouteSource("not-found", namespace, host, -1), DirectResponse(404), retry=None)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Every VirtualService and HTTPRoute the waypoint read, and the errors of those left out."""

    virtual_services: tuple[VirtualServiceRoutes, ...] = ()
    http_routes: tuple[HTTPRouteRoutes, ...] = ()
    errors: tuple[ResourceError, ...] = ()
    notes: tuple[ResourceError, ...] = ()
    """Resources (or parts) accepted with a caveat, or ignored on purpose."""
    options: RouteOptions = RouteOptions()

    def _applies(self, namespace: str, service: ServiceRef) -> bool:
        return namespace in (service.namespace, self.options.waypoint_namespace)

    def table(self, service: ServiceRef, port: int) -> RouteTable:
        """The routes the waypoint applies to requests addressed to `service` on `port`."""
        http_routes = [
            hr
            for hr in self.http_routes
            if self._applies(hr.namespace, service) and hr.binds(service, None)
        ]
        if http_routes:
            entries = [
                route for hr in http_routes if hr.binds(service, port) for route in hr.routes
            ]
            entries.sort(key=_gateway_precedence)
            fallback = not_found_route(service.hostname, service.namespace)
            if not entries:
                fallback = default_route(service.hostname, service.namespace)
            return RouteTable(service.hostname, port, tuple(entries), fallback)

        bound = [
            vs
            for vs in self.virtual_services
            if self._applies(vs.namespace, service) and vs.binds(service.hostname)
        ]
        bound.sort(key=lambda vs: _creation_order(vs.created, vs.namespace, vs.name))
        routes: list[Route] = []
        for vs in bound:
            for route in vs.routes:
                matches = tuple(m for m in route.matches if m.port in (None, port))
                if matches:
                    routes.append(
                        route if matches == route.matches else replace(route, matches=matches)
                    )
        fallback = (
            not_found_route(service.hostname, service.namespace)
            if routes
            else default_route(service.hostname, service.namespace)
        )
        return RouteTable(service.hostname, port, tuple(routes), fallback)


_PATH_RANK = {MatchKind.EXACT: 3, MatchKind.SEGMENT_PREFIX: 2, MatchKind.REGEX: 1}


def _gateway_precedence(route: Route) -> tuple[Any, ...]:
    match = route.matches[0]
    path = match.path
    rank = _PATH_RANK.get(path.kind, 0) if path is not None else 2
    length = len(path.value) if path is not None else 0
    source = route.source
    return (
        -rank,
        -length,
        match.method is None,
        -len(match.headers),
        -len(match.query_params),
        *_creation_order(source.created, source.namespace, source.name),
        source.rule,
        source.match,
    )


# --- VirtualService ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Reader:
    """Per-resource reading state: where notes go, and how short names resolve."""

    options: RouteOptions
    kind: str
    namespace: str
    name: str
    created: datetime | None
    notes: list[tuple[str, str]] = field(default_factory=list)

    def note(self, path: str, reason: str) -> None:
        self.notes.append((path, reason))

    def fqdn(self, host: str) -> str:
        """Istio's short-name rule: a name without dots is a Service in this namespace."""
        if host == "*" or "." in host or ":" in host:
            return host
        return f"{host}.{self.namespace}.svc.{self.options.domain_suffix}"

    def source(self, rule: int, match: int = 0, rule_name: str = "") -> RouteSource:
        return RouteSource(
            self.kind, self.namespace, self.name, rule, match, self.created, rule_name
        )


_STRING_MATCH_KEYS = ("exact", "prefix", "regex")


def _vs_string_match(
    value: object, path: str, *, allow_empty_prefix: bool = False, ignore_case: bool = False
) -> StringMatch | None:
    """An Istio StringMatch; `{}` (or regex "*") is a presence match, returned as PRESENT."""
    data = _map(value, path)
    _only(data, path, _STRING_MATCH_KEYS)
    given = [k for k in _STRING_MATCH_KEYS if k in data]
    if len(given) > 1:
        raise Invalid(path, f"only one of exact, prefix, regex may be set (got {', '.join(given)})")
    if not given:
        return StringMatch(MatchKind.PRESENT)
    key = given[0]
    text = _str(data[key], _at(path, key))
    if key == "exact":
        return StringMatch(MatchKind.EXACT, text, ignore_case)
    if key == "prefix":
        if not text and not allow_empty_prefix:
            raise Invalid(_at(path, key), "prefix string match should not be empty")
        return StringMatch(MatchKind.PREFIX, text, ignore_case)
    if text == "*":
        return StringMatch(MatchKind.PRESENT)
    if not text:
        raise Invalid(_at(path, key), "regex string match should not be empty")
    return StringMatch(MatchKind.REGEX, text, pattern=_regex(text, _at(path, key)))


def _request_attr(value: object, path: str) -> StringMatch | None:
    """uri/scheme/method/authority: an empty StringMatch constrains nothing."""
    if value is None:
        return None
    match = _vs_string_match(value, path)
    return None if match is None or match.kind is MatchKind.PRESENT else match


_JWT_CLAIM_PREFIX = "@request.auth.claims"


def _vs_match(reader: _Reader, value: object, path: str) -> RequestMatch | None:
    """One HTTPMatchRequest, or None when it can never apply in a waypoint (with a note)."""
    data = _map(value, path)
    _only(
        data,
        path,
        [
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "withoutHeaders",
            "queryParams",
            "port",
            "ignoreUriCase",
            "sourceLabels",
            "sourceNamespace",
            "gateways",
            "statPrefix",
        ],
    )
    _str(data.get("name"), _at(path, "name"))
    _str(data.get("statPrefix"), _at(path, "statPrefix"))
    ignore_case = _bool(data.get("ignoreUriCase"), _at(path, "ignoreUriCase"))
    uri: StringMatch | None = None
    if data.get("uri") is not None:
        uri = _vs_string_match(
            data["uri"], _at(path, "uri"), allow_empty_prefix=True, ignore_case=ignore_case
        )
        if uri is not None and uri.kind is MatchKind.PRESENT:
            uri = None
    scheme = _request_attr(data.get("scheme"), _at(path, "scheme"))
    method = _request_attr(data.get("method"), _at(path, "method"))
    authority = _request_attr(data.get("authority"), _at(path, "authority"))
    headers: list[HeaderMatch] = []
    drop: str | None = None
    for key, invert in (("headers", False), ("withoutHeaders", True)):
        hpath = _at(path, key)
        for name, item in sorted(_map(data.get(key), hpath).items()):
            ipath = _at(hpath, name)
            if item is None and not invert:
                raise Invalid(ipath, "header match cannot be null")
            if name.startswith(_JWT_CLAIM_PREFIX):
                _vs_string_match(item, ipath)
                drop = f"{ipath}: JWT claim routing is not supported; the match is dropped"
                continue
            if name.startswith(":") and name not in _PSEUDO_HEADERS:
                raise Invalid(ipath, f"{show(name)} is not a pseudo-header")
            _header_name(name, ipath, pseudo=True)
            matcher = _vs_string_match(item, ipath)
            assert matcher is not None
            headers.append(HeaderMatch(name, matcher, invert))
    query: list[QueryMatch] = []
    qpath = _at(path, "queryParams")
    for name, item in sorted(_map(data.get("queryParams"), qpath).items()):
        if item is None:
            raise Invalid(_at(qpath, name), "query param match cannot be null")
        matcher = _vs_string_match(item, _at(qpath, name))
        assert matcher is not None
        query.append(QueryMatch(name, matcher))
    port = None
    if data.get("port") not in (None, 0):
        port = _port(data["port"], _at(path, "port"))
    gateways = _strings(data.get("gateways"), _at(path, "gateways"))
    labels = _map(data.get("sourceLabels"), _at(path, "sourceLabels"))
    source_ns = _str(data.get("sourceNamespace"), _at(path, "sourceNamespace"))
    if gateways and MESH_GATEWAY not in gateways:
        drop = f"{_at(path, 'gateways')}: does not include mesh; the match is dropped"
    elif labels:
        drop = f"{_at(path, 'sourceLabels')}: ambient has no source labels; the match is dropped"
    elif source_ns and source_ns != reader.options.waypoint_namespace:
        drop = (
            f"{_at(path, 'sourceNamespace')}: compared with the waypoint's namespace "
            f"({reader.options.waypoint_namespace or 'unknown'}); the match is dropped"
        )
    if drop is not None:
        where, _, reason = drop.partition(": ")
        reader.note(where, reason)
        return None
    return RequestMatch(uri, method, scheme, authority, tuple(headers), tuple(query), port)


def _destination(reader: _Reader, value: object, path: str) -> Destination:
    data = _map(value, path)
    if value is None:
        raise Invalid(path, "is required")
    _only(data, path, ("host", "subset", "port"))
    host = _str(data.get("host"), _at(path, "host"))
    if not host:
        raise Invalid(_at(path, "host"), "is required")
    if host == "*" or "*" in host:
        raise Invalid(_at(path, "host"), f"{show(host)}: a destination host cannot be a wildcard")
    subset = _str(data.get("subset"), _at(path, "subset"))
    if subset and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", subset):
        raise Invalid(_at(path, "subset"), f"{show(subset)} is not a valid subset name")
    port = None
    if data.get("port") is not None:
        ppath = _at(path, "port")
        pdata = _map(data["port"], ppath)
        _only(pdata, ppath, ("number",))
        if pdata.get("number") not in (None, 0):
            port = _port(pdata["number"], _at(ppath, "number"))
    return Destination(reader.fqdn(host), port, subset)


def _vs_headers(value: object, path: str) -> tuple[HeaderOps, HeaderOps, str | None]:
    """Istio `headers`: request and response edits, and an authority set through them."""
    data = _map(value, path)
    _only(data, path, ("request", "response"))
    out: list[HeaderOps] = []
    authority: str | None = None
    for side in ("request", "response"):
        spath = _at(path, side)
        ops = _map(data.get(side), spath)
        _only(ops, spath, ("set", "add", "remove"))
        edits: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
        for verb in ("set", "add"):
            vpath = _at(spath, verb)
            for name, item in sorted(_map(ops.get(verb), vpath).items()):
                ipath = _at(vpath, name)
                _header_name(name, ipath, pseudo=True)
                text = _header_value(item, ipath)
                if side == "request" and _is_authority(name):
                    if authority is not None:
                        raise Invalid(ipath, "authority header cannot be set multiple times")
                    authority = text
                    continue
                _editable(name, ipath)
                edits[verb].append((name, text))
        removes = []
        for i, name in enumerate(_strings(ops.get("remove"), _at(spath, "remove"))):
            _editable(name, _at(_at(spath, "remove"), i))
            removes.append(name)
        out.append(HeaderOps(tuple(edits["set"]), tuple(edits["add"]), tuple(removes)))
    return out[0], out[1], authority


def _percentage(value: object, path: str) -> float:
    data = _map(value, path)
    _only(data, path, ("value",))
    percent = _number(data.get("value", 0), _at(path, "value"), 0.0, 100.0)
    if 0 < percent < 0.0001:
        raise Invalid(_at(path, "value"), f"{percent} is neither 0 nor in [0.0001, 100]")
    return percent


def _vs_fault(reader: _Reader, value: object, path: str) -> FaultPolicy | None:
    data = _map(value, path)
    _only(data, path, ("delay", "abort"))
    if data.get("delay") is None and data.get("abort") is None:
        raise Invalid(path, "HTTP fault injection must have an abort and/or a delay")
    delay = None
    delay_percent = 0.0
    if data.get("delay") is not None:
        dpath = _at(path, "delay")
        d = _map(data["delay"], dpath)
        _only(d, dpath, ("fixedDelay", "exponentialDelay", "percentage", "percent"))
        if d.get("exponentialDelay") is not None:
            raise Invalid(_at(dpath, "exponentialDelay"), "exponentialDelay is not supported")
        if d.get("fixedDelay") is None:
            raise Invalid(_at(dpath, "fixedDelay"), "is required")
        delay = _istio_duration(d["fixedDelay"], _at(dpath, "fixedDelay"))
        if d.get("percentage") is not None:
            delay_percent = _percentage(d["percentage"], _at(dpath, "percentage"))
        elif d.get("percent") is not None:
            delay_percent = float(_int(d["percent"], _at(dpath, "percent"), 0, 100))
        else:
            reader.note(_at(dpath, "percentage"), "not set: no request is delayed")
    status = grpc = None
    abort_percent = 0.0
    if data.get("abort") is not None:
        apath = _at(path, "abort")
        a = _map(data["abort"], apath)
        _only(a, apath, ("httpStatus", "grpcStatus", "http2Error", "percentage"))
        kinds = [k for k in ("httpStatus", "grpcStatus", "http2Error") if a.get(k) is not None]
        if len(kinds) != 1:
            raise Invalid(apath, "exactly one of httpStatus, grpcStatus, http2Error is required")
        if kinds[0] == "http2Error":
            raise Invalid(_at(apath, "http2Error"), "HTTP/2 abort fault injection is not supported")
        if kinds[0] == "httpStatus":
            status = _int(a["httpStatus"], _at(apath, "httpStatus"), 200, 599)
        else:
            name = _str(a["grpcStatus"], _at(apath, "grpcStatus"))
            if name not in GrpcStatus.__members__:
                raise Invalid(
                    _at(apath, "grpcStatus"), f"{show(name)} is not a gRPC status such as NOT_FOUND"
                )
            grpc = int(GrpcStatus[name])
        if a.get("percentage") is not None:
            abort_percent = _percentage(a["percentage"], _at(apath, "percentage"))
        else:
            reader.note(_at(apath, "percentage"), "not set: no request is aborted")
    return FaultPolicy(delay, delay_percent, status, grpc, abort_percent)


def _vs_retries(value: object, path: str) -> RetryPolicy | None:
    data = _map(value, path)
    _only(
        data,
        path,
        [
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ],
    )
    attempts = _int(data.get("attempts", 0), _at(path, "attempts"), 0, 2**31 - 1)
    retry_on = _str(data.get("retryOn"), _at(path, "retryOn"))
    per_try = None
    if data.get("perTryTimeout") is not None:
        per_try = _istio_duration(data["perTryTimeout"], _at(path, "perTryTimeout"))
    if data.get("retryRemoteLocalities") is not None:
        _bool(data["retryRemoteLocalities"], _at(path, "retryRemoteLocalities"))
    if attempts == 0 and (
        per_try is not None or retry_on or data.get("retryRemoteLocalities") is not None
    ):
        raise Invalid(path, "http retry policy configured when attempts are set to 0 (disabled)")
    backoff = None
    if data.get("backoff") is not None:
        backoff = _istio_duration(data["backoff"], _at(path, "backoff"))
    ignore = None
    if data.get("retryIgnorePreviousHosts") is not None:
        ignore = _bool(data["retryIgnorePreviousHosts"], _at(path, "retryIgnorePreviousHosts"))
    try:
        return retry_policy(
            attempts=attempts,
            retry_on=retry_on or None,
            per_try_timeout=per_try,
            backoff=backoff,
            ignore_previous_hosts=ignore,
        )
    except ValueError as exc:
        raise Invalid(_at(path, "retryOn"), str(exc)) from None


def _vs_redirect(value: object, path: str, matches: list[RequestMatch]) -> Redirect:
    data = _map(value, path)
    _only(
        data,
        path,
        ("uri", "authority", "port", "derivePort", "scheme", "redirectCode", "prefixRewrite"),
    )
    uri = _str(data.get("uri"), _at(path, "uri")) or None
    prefix = _str(data.get("prefixRewrite"), _at(path, "prefixRewrite")) or None
    authority = _str(data.get("authority"), _at(path, "authority")) or None
    scheme = _str(data.get("scheme"), _at(path, "scheme")) or None
    if uri and prefix:
        raise Invalid(path, "redirect may only specify one of uri or prefixRewrite")
    if prefix:
        for m in matches:
            if m.path is not None and m.path.kind is not MatchKind.PREFIX:
                raise Invalid(
                    _at(path, "prefixRewrite"), "requires all uri matches to be prefix matches"
                )
    if scheme not in (None, "http", "https"):
        raise Invalid(_at(path, "scheme"), 'must be "http" or "https"')
    if data.get("port") is not None and data.get("derivePort") is not None:
        raise Invalid(path, "only one of port and derivePort may be set")
    port = None
    mode = PortMode.KEEP
    if data.get("port") not in (None, 0):
        port = _port(data["port"], _at(path, "port"))
    if data.get("derivePort") is not None:
        derive = _str(data["derivePort"], _at(path, "derivePort"))
        if derive == "FROM_REQUEST_PORT":
            mode = PortMode.REQUEST
        elif derive == "FROM_PROTOCOL_DEFAULT":
            mode = PortMode.PROTOCOL_DEFAULT
        else:
            raise Invalid(
                _at(path, "derivePort"),
                f"{show(derive)} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
            )
    if not (uri or prefix or authority or scheme or port or data.get("derivePort")):
        raise Invalid(path, "redirect must specify uri, authority, scheme, or port")
    code = data.get("redirectCode")
    status = 301 if code in (None, 0) else _int(code, _at(path, "redirectCode"), 300, 399)
    if status not in (301, 302, 303, 307, 308):
        raise Invalid(_at(path, "redirectCode"), f"redirect code {status} is not supported")
    return Redirect(status, scheme, authority, port, mode, uri, prefix)


def _vs_direct_response(value: object, path: str) -> DirectResponse:
    data = _map(value, path)
    _only(data, path, ("status", "body"))
    if data.get("status") is None:
        raise Invalid(_at(path, "status"), "is required")
    status = _int(data["status"], _at(path, "status"), 200, 599)
    bpath = _at(path, "body")
    body_data = _map(data.get("body"), bpath)
    _only(body_data, bpath, ("string", "bytes"))
    if "string" in body_data and "bytes" in body_data:
        raise Invalid(bpath, "only one of string and bytes may be set")
    body = b""
    if "string" in body_data:
        try:
            body = _str(body_data["string"], _at(bpath, "string")).encode()
        except UnicodeEncodeError:  # a lone surrogate, which YAML and JSON escapes can give
            raise Invalid(_at(bpath, "string"), "is not valid Unicode text") from None
    elif "bytes" in body_data:
        text = _str(body_data["bytes"], _at(bpath, "bytes"))
        try:
            body = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(_at(bpath, "bytes"), "is not base64") from None
    if len(body) > MAX_DIRECT_RESPONSE_BYTES:
        raise Invalid(bpath, "a direct response body must be smaller than 1MB")
    return DirectResponse(status, body)


def _vs_rewrite(value: object, path: str) -> Rewrite:
    data = _map(value, path)
    _only(data, path, ("uri", "uriRegexRewrite", "authority"))
    uri = _str(data.get("uri"), _at(path, "uri")) or None
    authority = _str(data.get("authority"), _at(path, "authority")) or None
    regex = None
    substitution = ""
    if data.get("uriRegexRewrite") is not None:
        rpath = _at(path, "uriRegexRewrite")
        r = _map(data["uriRegexRewrite"], rpath)
        _only(r, rpath, ("match", "rewrite"))
        text = _str(r.get("match"), _at(rpath, "match"))
        substitution = _str(r.get("rewrite"), _at(rpath, "rewrite"))
        if not text or not substitution:
            raise Invalid(rpath, "uriRegexRewrite requires both match and rewrite")
        regex = StringMatch(MatchKind.REGEX, text, pattern=_regex(text, _at(rpath, "match")))
        try:
            re2_substitution(substitution)
        except ValueError as exc:
            raise Invalid(_at(rpath, "rewrite"), str(exc)) from None
        if uri is not None:
            raise Invalid(path, "rewrite may only contain one of uri or uriRegexRewrite")
    if uri is None and regex is None and authority is None:
        raise Invalid(path, "rewrite must specify at least one of uri, uriRegexRewrite, authority")
    return Rewrite(prefix=uri, regex=regex, substitution=substitution, authority=authority)


def _vs_route(reader: _Reader, value: object, path: str, index: int) -> Route | None:
    data = _map(value, path)
    _only(
        data,
        path,
        [
            "name",
            "match",
            "route",
            "redirect",
            "directResponse",
            "delegate",
            "rewrite",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "mirrorPercent",
            "mirror_percent",
            "corsPolicy",
            "headers",
        ],
    )
    rule_name = _str(data.get("name"), _at(path, "name"))
    if data.get("delegate") is not None:
        raise Invalid(_at(path, "delegate"), "delegate is not supported by the waypoint")
    if data.get("corsPolicy") is not None:
        reader.note(_at(path, "corsPolicy"), "CORS is not applied by the waypoint")
    raw_matches = _list(data.get("match"), _at(path, "match"))
    matches: list[RequestMatch] = []
    for i, item in enumerate(raw_matches):
        if item is None:
            matches.append(MATCH_ALL)
            continue
        match = _vs_match(reader, item, _at(_at(path, "match"), i))
        if match is not None:
            matches.append(match)
    has = {k: data.get(k) is not None for k in ("redirect", "directResponse", "fault", "rewrite")}
    dests = _list(data.get("route"), _at(path, "route"))
    has["route"] = bool(dests)
    if has["redirect"]:
        for other in ("route", "fault", "rewrite", "directResponse"):
            if has[other]:
                raise Invalid(path, f"HTTP route cannot contain both {other} and redirect")
    elif has["directResponse"]:
        for other in ("route", "fault", "rewrite"):
            if has[other]:
                raise Invalid(path, f"HTTP route cannot contain both {other} and directResponse")
    elif not dests:
        raise Invalid(path, "HTTP route, redirect or directResponse is required")

    request_ops, response_ops, header_authority = _vs_headers(
        data.get("headers"), _at(path, "headers")
    )
    rewrite = None
    if has["rewrite"]:
        rewrite = _vs_rewrite(data["rewrite"], _at(path, "rewrite"))
        if rewrite.authority is not None and header_authority is not None:
            raise Invalid(path, "authority header cannot be set multiple times")
    if header_authority is not None:
        rewrite = (
            Rewrite(authority=header_authority)
            if rewrite is None
            else replace(rewrite, authority=header_authority)
        )
    action: Action
    if has["redirect"]:
        action = _vs_redirect(data["redirect"], _at(path, "redirect"), matches)
    elif has["directResponse"]:
        action = _vs_direct_response(data["directResponse"], _at(path, "directResponse"))
    else:
        action = _vs_destinations(reader, dests, _at(path, "route"))
    timeout = None
    if data.get("timeout") is not None:
        timeout = _istio_duration(data["timeout"], _at(path, "timeout"))
    retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
    if data.get("retries") is not None:
        retry = _vs_retries(data["retries"], _at(path, "retries"))
    fault = _vs_fault(reader, data["fault"], _at(path, "fault")) if has["fault"] else None
    mirrors = _vs_mirrors(reader, data, path)
    if raw_matches and not matches:
        return None
    return Route(
        reader.source(index, rule_name=rule_name),
        action,
        tuple(matches) if matches else (MATCH_ALL,),
        request_ops,
        response_ops,
        rewrite,
        timeout,
        retry if isinstance(action, Forward) else None,
        fault,
        mirrors if isinstance(action, Forward) else (),
    )


def _vs_destinations(reader: _Reader, items: list[Any], path: str) -> Forward:
    dests: list[Destination] = []
    for i, item in enumerate(items):
        ipath = _at(path, i)
        data = _map(item, ipath)
        if item is None:
            raise Invalid(ipath, "must not be null")
        _only(data, ipath, ("destination", "weight", "headers"))
        dest = _destination(reader, data.get("destination"), _at(ipath, "destination"))
        weight = _int(data.get("weight", 0), _at(ipath, "weight"), 0, 2**31 - 1)
        req, resp, authority = _vs_headers(data.get("headers"), _at(ipath, "headers"))
        dests.append(Destination(dest.host, dest.port, dest.subset, weight, req, resp, authority))
    if len(dests) > 1:
        if sum(d.weight for d in dests) == 0:
            raise Invalid(path, "total destination weight = 0")
        dests = [d for d in dests if d.weight > 0]
    return Forward(tuple(dests))


def _vs_mirrors(reader: _Reader, data: Mapping[str, Any], path: str) -> tuple[Mirror, ...]:
    out: list[Mirror] = []
    if data.get("mirror") is not None:
        dest = _destination(reader, data["mirror"], _at(path, "mirror"))
        percent = 100.0
        if data.get("mirrorPercentage") is not None:
            percent = _percentage(data["mirrorPercentage"], _at(path, "mirrorPercentage"))
        else:
            for key in ("mirrorPercent", "mirror_percent"):
                if data.get(key) is not None:
                    percent = float(_int(data[key], _at(path, key), 0, 100))
        if percent > 0:
            out.append(Mirror(dest, percent))
    for i, item in enumerate(_list(data.get("mirrors"), _at(path, "mirrors"))):
        ipath = _at(_at(path, "mirrors"), i)
        m = _map(item, ipath)
        if item is None:
            raise Invalid(ipath, "mirror cannot be null")
        _only(m, ipath, ("destination", "percentage"))
        dest = _destination(reader, m.get("destination"), _at(ipath, "destination"))
        percent = 100.0
        if m.get("percentage") is not None:
            percent = _percentage(m["percentage"], _at(ipath, "percentage"))
        if percent > 0:
            out.append(Mirror(dest, percent))
    return tuple(out)


def _read_virtual_service(reader: _Reader, resource: Resource) -> VirtualServiceRoutes | None:
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    hosts = _strings(spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise Invalid("spec.hosts", "is required (at least one host)")
    _strings(spec.get("exportTo"), "spec.exportTo")
    gateways = _strings(spec.get("gateways"), "spec.gateways")
    for key in ("tcp", "tls"):
        if _list(spec.get(key), f"spec.{key}"):
            reader.note(
                f"spec.{key}", "TCP and TLS routes are not applied by the waypoint's L7 routing"
            )
    routes: list[Route] = []
    for i, item in enumerate(_list(spec.get("http"), "spec.http")):
        route = _vs_route(reader, item, _at("spec.http", i), i)
        if route is not None:
            routes.append(route)
    if gateways and MESH_GATEWAY not in gateways:
        reader.note("spec.gateways", "does not include mesh: not applied by waypoints")
        return None
    return VirtualServiceRoutes(
        reader.namespace,
        reader.name,
        reader.created,
        tuple(reader.fqdn(h) for h in hosts),
        tuple(routes),
    )


# --- HTTPRoute ---------------------------------------------------------------------------------

_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}
_SUPPORTED_FILTERS = frozenset(
    {
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "RequestMirror",
    }
)
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F", "#")


def _gw_path_value(value: str, path: str) -> None:
    if not value.startswith("/"):
        raise Invalid(path, f"{show(value)}: must be an absolute path")
    for part in _BAD_PATH_PARTS:
        if part in value:
            raise Invalid(path, f"{show(value)} must not contain {show(part)}")
    if value.endswith(("/..", "/.")):
        raise Invalid(path, f"{show(value)} must not end with /. or /..")


def _gw_match(value: object, path: str) -> RequestMatch:
    data = _map(value, path)
    _only(data, path, ("path", "headers", "queryParams", "method"))
    ppath = _at(path, "path")
    pdata = _map(data.get("path"), ppath)
    _only(pdata, ppath, ("type", "value"))
    kind = _str(pdata.get("type"), _at(ppath, "type"), "PathPrefix")
    text = _str(pdata.get("value"), _at(ppath, "value"), "/")
    vpath = _at(ppath, "value")
    if kind == "Exact":
        _gw_path_value(text, vpath)
        matcher = StringMatch(MatchKind.EXACT, text)
    elif kind == "PathPrefix":
        _gw_path_value(text, vpath)
        matcher = StringMatch(MatchKind.SEGMENT_PREFIX, text.rstrip("/"))
    elif kind == "RegularExpression":
        matcher = StringMatch(MatchKind.REGEX, text, pattern=_regex(text, vpath))
    else:
        raise Invalid(
            _at(ppath, "type"), f"{show(kind)} is not Exact, PathPrefix or RegularExpression"
        )
    headers: list[HeaderMatch] = []
    seen: set[str] = set()
    hpath = _at(path, "headers")
    for i, item in enumerate(_list(data.get("headers"), hpath)):
        ipath = _at(hpath, i)
        h = _map(item, ipath)
        _only(h, ipath, ("type", "name", "value"))
        name = _header_name(h.get("name"), _at(ipath, "name"))
        hm = _gw_value_match(h, ipath)
        if name.lower() not in seen:
            seen.add(name.lower())
            headers.append(HeaderMatch(name.lower(), hm))
    query: list[QueryMatch] = []
    qseen: set[str] = set()
    qpath = _at(path, "queryParams")
    for i, item in enumerate(_list(data.get("queryParams"), qpath)):
        ipath = _at(qpath, i)
        q = _map(item, ipath)
        _only(q, ipath, ("type", "name", "value"))
        name = _header_name(q.get("name"), _at(ipath, "name"))
        qm = _gw_value_match(q, ipath)
        if name not in qseen:
            qseen.add(name)
            query.append(QueryMatch(name, qm))
    method = None
    if data.get("method") is not None:
        text = _str(data["method"], _at(path, "method"))
        if text not in _METHODS:
            raise Invalid(_at(path, "method"), f"{show(text)} is not one of {', '.join(_METHODS)}")
        method = StringMatch(MatchKind.EXACT, text)
    return RequestMatch(matcher, method, None, None, tuple(headers), tuple(query))


def _gw_value_match(data: Mapping[str, Any], path: str) -> StringMatch:
    kind = _str(data.get("type"), _at(path, "type"), "Exact")
    if data.get("value") is None:
        raise Invalid(_at(path, "value"), "is required")
    value = _str(data.get("value"), _at(path, "value"))
    if kind == "Exact":
        return StringMatch(MatchKind.EXACT, value)
    if kind == "RegularExpression":
        return StringMatch(MatchKind.REGEX, value, pattern=_regex(value, _at(path, "value")))
    raise Invalid(_at(path, "type"), f"{show(kind)} is not Exact or RegularExpression")


def _gw_header_modifier(value: object, path: str) -> HeaderOps:
    data = _map(value, path)
    _only(data, path, ("set", "add", "remove"))
    lists: dict[str, list[tuple[str, str]]] = {}
    for verb in ("set", "add"):
        vpath = _at(path, verb)
        seen: set[str] = set()
        entries: list[tuple[str, str]] = []
        for i, item in enumerate(_list(data.get(verb), vpath)):
            ipath = _at(vpath, i)
            h = _map(item, ipath)
            _only(h, ipath, ("name", "value"))
            name = _header_name(h.get("name"), _at(ipath, "name"))
            text = _header_value(h.get("value"), _at(ipath, "value"))
            if name.lower() in seen:
                continue  # "Subsequent entries with an equivalent header name MUST be ignored"
            seen.add(name.lower())
            entries.append((name.lower(), text))
        lists[verb] = entries
    removes = []
    for i, name in enumerate(_strings(data.get("remove"), _at(path, "remove"))):
        removes.append(_header_name(name, _at(_at(path, "remove"), i)).lower())
    return HeaderOps(tuple(lists["set"]), tuple(lists["add"]), tuple(removes))


def _gw_path_modifier(value: object, path: str) -> tuple[str, str]:
    """(type, value) of an HTTPPathModifier."""
    data = _map(value, path)
    _only(data, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = _str(data.get("type"), _at(path, "type"))
    field_name = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}
    if kind not in field_name:
        raise Invalid(
            _at(path, "type"), f"{show(kind)} is not ReplaceFullPath or ReplacePrefixMatch"
        )
    other = "replacePrefixMatch" if kind == "ReplaceFullPath" else "replaceFullPath"
    if data.get(other) is not None:
        raise Invalid(_at(path, other), f"must not be set when type is {kind}")
    key = field_name[kind]
    if data.get(key) is None:
        raise Invalid(_at(path, key), f"is required when type is {kind}")
    text = _str(data[key], _at(path, key))
    if text and not text.startswith("/"):
        raise Invalid(_at(path, key), f"{show(text)}: must be an absolute path")
    if kind == "ReplaceFullPath" and not text:
        raise Invalid(_at(path, key), "must not be empty")
    return kind, text


def _backend(
    reader: _Reader, data: Mapping[str, Any], path: str, known: Iterable[str]
) -> Destination:
    _only(data, path, known)
    group = _str(data.get("group"), _at(path, "group"))
    kind = _str(data.get("kind"), _at(path, "kind"), "Service")
    name = _str(data.get("name"), _at(path, "name"))
    if not name:
        raise Invalid(_at(path, "name"), "is required")
    namespace = _str(data.get("namespace"), _at(path, "namespace")) or reader.namespace
    port = None if data.get("port") is None else _port(data["port"], _at(path, "port"))
    if group in ("", "core") and kind == "Service":
        if port is None:
            raise Invalid(_at(path, "port"), "is required for a Service backend")
        host = f"{name}.{namespace}.svc.{reader.options.domain_suffix}"
    elif group == "networking.istio.io" and kind == "Hostname":
        host = name
    else:
        raise Invalid(
            _at(path, "kind"),
            f"{show((group + '/' if group else '') + kind)} is not a supported backend "
            "(Service, or networking.istio.io Hostname)",
        )
    return Destination(host, port)


def _gw_filters(
    reader: _Reader, items: list[Any], path: str, matches: list[RequestMatch], backends: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"mirrors": []}
    seen: set[str] = set()
    for i, item in enumerate(items):
        ipath = _at(path, i)
        data = _map(item, ipath)
        _only(data, ipath, ("type", *_FILTER_FIELDS.values()))
        kind = _str(data.get("type"), _at(ipath, "type"))
        if kind not in _FILTER_FIELDS:
            raise Invalid(_at(ipath, "type"), f"{show(kind)} is not a filter type")
        key = _FILTER_FIELDS[kind]
        for other in _FILTER_FIELDS.values():
            if other != key and data.get(other) is not None:
                raise Invalid(_at(ipath, other), f"must not be set for a {kind} filter")
        if kind not in _SUPPORTED_FILTERS:
            raise Invalid(_at(ipath, "type"), f"{kind} filters are not supported by the waypoint")
        if kind != "RequestMirror" and kind in seen:
            raise Invalid(_at(ipath, "type"), f"{kind} may appear only once per rule")
        seen.add(kind)
        if data.get(key) is None:
            raise Invalid(_at(ipath, key), f"is required for a {kind} filter")
        cpath = _at(ipath, key)
        config = _map(data[key], cpath)
        if kind == "RequestHeaderModifier":
            out["request_headers"] = _gw_header_modifier(config, cpath)
        elif kind == "ResponseHeaderModifier":
            out["response_headers"] = _gw_header_modifier(config, cpath)
        elif kind == "RequestMirror":
            out["mirrors"].append(_gw_mirror(reader, config, cpath))
        elif kind == "URLRewrite":
            out["rewrite"] = _gw_rewrite(config, cpath, matches)
        else:
            out["redirect"] = _gw_redirect(config, cpath, matches)
    if "redirect" in out and "rewrite" in out:
        raise Invalid(path, "RequestRedirect and URLRewrite cannot be used on the same rule")
    if "redirect" in out and backends:
        reader.note(path, "a rule with RequestRedirect answers the redirect; backendRefs unused")
    return out


def _requires_prefix_matches(matches: list[RequestMatch], path: str) -> None:
    for m in matches:
        if m.path is None or m.path.kind is not MatchKind.SEGMENT_PREFIX:
            raise Invalid(path, "ReplacePrefixMatch requires PathPrefix matches only")


def _gw_rewrite(data: Mapping[str, Any], path: str, matches: list[RequestMatch]) -> Rewrite:
    _only(data, path, ("hostname", "path"))
    hostname = _str(data.get("hostname"), _at(path, "hostname")) or None
    full = prefix = None
    if data.get("path") is not None:
        kind, text = _gw_path_modifier(data["path"], _at(path, "path"))
        if kind == "ReplaceFullPath":
            full = text
        else:
            _requires_prefix_matches(matches, _at(path, "path"))
            prefix = text
    return Rewrite(segment_prefix=prefix, full_path=full, authority=hostname)


def _gw_redirect(data: Mapping[str, Any], path: str, matches: list[RequestMatch]) -> Redirect:
    _only(data, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = _str(data.get("scheme"), _at(path, "scheme")) or None
    if scheme not in (None, "http", "https"):
        raise Invalid(_at(path, "scheme"), 'must be "http" or "https"')
    hostname = _str(data.get("hostname"), _at(path, "hostname")) or None
    port = None if data.get("port") is None else _port(data["port"], _at(path, "port"))
    status = 302
    if data.get("statusCode") is not None:
        status = _int(data["statusCode"], _at(path, "statusCode"), 300, 399)
        if status not in (301, 302, 303, 307, 308):
            raise Invalid(_at(path, "statusCode"), f"{status} is not 301, 302, 303, 307 or 308")
    full = prefix = None
    if data.get("path") is not None:
        kind, text = _gw_path_modifier(data["path"], _at(path, "path"))
        if kind == "ReplaceFullPath":
            full = text
        else:
            _requires_prefix_matches(matches, _at(path, "path"))
            prefix = text
    mode = PortMode.PROTOCOL_DEFAULT if scheme is not None else PortMode.REQUEST
    return Redirect(status, scheme, hostname, port, mode, full, prefix, segments=True)


def _gw_mirror(reader: _Reader, data: Mapping[str, Any], path: str) -> Mirror:
    _only(data, path, ("backendRef", "percent", "fraction"))
    if data.get("backendRef") is None:
        raise Invalid(_at(path, "backendRef"), "is required")
    bpath = _at(path, "backendRef")
    dest = _backend(
        reader,
        _map(data["backendRef"], bpath),
        bpath,
        ("group", "kind", "name", "namespace", "port"),
    )
    if data.get("percent") is not None and data.get("fraction") is not None:
        raise Invalid(path, "only one of percent and fraction may be set")
    percent = 100.0
    if data.get("percent") is not None:
        percent = float(_int(data["percent"], _at(path, "percent"), 0, 100))
    elif data.get("fraction") is not None:
        fpath = _at(path, "fraction")
        f = _map(data["fraction"], fpath)
        _only(f, fpath, ("numerator", "denominator"))
        if f.get("numerator") is None:
            raise Invalid(_at(fpath, "numerator"), "is required")
        numerator = _int(f["numerator"], _at(fpath, "numerator"), 0, 2**31 - 1)
        denominator = _int(f.get("denominator", 100), _at(fpath, "denominator"), 1, 2**31 - 1)
        if numerator > denominator:
            raise Invalid(fpath, "numerator must not be greater than denominator")
        percent = 100.0 * numerator / denominator
    return Mirror(dest, percent)


def _gw_retry(value: object, path: str) -> RetryPolicy | None:
    data = _map(value, path)
    _only(data, path, ("attempts", "backoff", "codes"))
    attempts = (
        2
        if data.get("attempts") is None
        else _int(data["attempts"], _at(path, "attempts"), 0, 2**31 - 1)
    )
    codes: list[int] = []
    for i, code in enumerate(_list(data.get("codes"), _at(path, "codes"))):
        codes.append(_int(code, _at(_at(path, "codes"), i), 400, 599))
    backoff = None
    if data.get("backoff") is not None:
        backoff = _gateway_duration(data["backoff"], _at(path, "backoff"))
        if backoff <= 0:
            raise Invalid(_at(path, "backoff"), "must be greater than 0")
    if attempts == 0:
        return None
    retry_on = {"connect-failure", "refused-stream", "unavailable", "cancelled"}
    if codes:
        retry_on.add("retriable-status-codes")
    return RetryPolicy(
        attempts,
        frozenset(retry_on),
        frozenset(codes),
        backoff_base=backoff if backoff is not None else DEFAULT_RETRY_POLICY.backoff_base,
    )


def _gw_rule(reader: _Reader, value: object, path: str, index: int) -> list[Route]:
    data = _map(value, path)
    _only(
        data,
        path,
        ("name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"),
    )
    rule_name = _str(data.get("name"), _at(path, "name"))
    if data.get("sessionPersistence") is not None:
        reader.note(_at(path, "sessionPersistence"), "session persistence is not applied")
    mpath = _at(path, "matches")
    matches = [
        _gw_match(item, _at(mpath, i)) for i, item in enumerate(_list(data.get("matches"), mpath))
    ]
    if not matches:
        matches = [RequestMatch(StringMatch(MatchKind.SEGMENT_PREFIX, ""))]
    bpath = _at(path, "backendRefs")
    backends = _list(data.get("backendRefs"), bpath)
    filters = _gw_filters(
        reader,
        _list(data.get("filters"), _at(path, "filters")),
        _at(path, "filters"),
        matches,
        bool(backends),
    )
    dests: list[Destination] = []
    for i, item in enumerate(backends):
        ipath = _at(bpath, i)
        b = _map(item, ipath)
        dest = _backend(
            reader, b, ipath, ("group", "kind", "name", "namespace", "port", "weight", "filters")
        )
        weight = (
            1
            if b.get("weight") is None
            else _int(b["weight"], _at(ipath, "weight"), 0, MAX_HTTPROUTE_WEIGHT)
        )
        fpath = _at(ipath, "filters")
        req = resp = NO_HEADER_OPS
        seen: set[str] = set()
        for j, f in enumerate(_list(b.get("filters"), fpath)):
            jpath = _at(fpath, j)
            fd = _map(f, jpath)
            _only(fd, jpath, ("type", *_FILTER_FIELDS.values()))
            kind = _str(fd.get("type"), _at(jpath, "type"))
            if kind not in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                raise Invalid(_at(jpath, "type"), f"{show(kind)} is not supported on a backendRef")
            if kind in seen:
                raise Invalid(_at(jpath, "type"), f"{kind} may appear only once per backendRef")
            seen.add(kind)
            key = _FILTER_FIELDS[kind]
            ops = _gw_header_modifier(fd.get(key), _at(jpath, key))
            if kind == "RequestHeaderModifier":
                req = ops
            else:
                resp = ops
        if weight > 0:
            dests.append(Destination(dest.host, dest.port, "", weight, req, resp))
    action: Action
    if "redirect" in filters:
        action = filters["redirect"]
    elif not dests:
        action = DirectResponse(500)
    else:
        action = Forward(tuple(dests))

    timeout: float | None = None
    backend_timeout: float | None = None
    if data.get("timeouts") is not None:
        tpath = _at(path, "timeouts")
        t = _map(data["timeouts"], tpath)
        _only(t, tpath, ("request", "backendRequest"))
        if t.get("request") is not None:
            timeout = _gateway_duration(t["request"], _at(tpath, "request")) or None
        if t.get("backendRequest") is not None:
            backend_timeout = (
                _gateway_duration(t["backendRequest"], _at(tpath, "backendRequest")) or None
            )
        if timeout is not None and backend_timeout is not None and backend_timeout > timeout:
            raise Invalid(
                _at(tpath, "backendRequest"),
                "backendRequest timeout cannot be longer than request timeout",
            )
    retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
    if data.get("retry") is not None:
        retry = _gw_retry(data["retry"], _at(path, "retry"))
        if retry is not None and backend_timeout is not None:
            retry = replace(retry, per_try_timeout=backend_timeout)
    elif backend_timeout is not None:
        timeout = backend_timeout
    forwards = isinstance(action, Forward)
    return [
        Route(
            reader.source(index, j, rule_name),
            action,
            (match,),
            filters.get("request_headers", NO_HEADER_OPS),
            filters.get("response_headers", NO_HEADER_OPS),
            filters.get("rewrite"),
            timeout if forwards else None,
            retry if forwards else None,
            None,
            tuple(filters["mirrors"]) if forwards else (),
        )
        for j, match in enumerate(matches)
    ]


def _read_http_route(reader: _Reader, resource: Resource) -> HTTPRouteRoutes | None:
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("parentRefs", "hostnames", "rules", "useDefaultGateways"))
    _strings(spec.get("hostnames"), "spec.hostnames")
    parents: list[ParentRef] = []
    for i, item in enumerate(_list(spec.get("parentRefs"), "spec.parentRefs")):
        ppath = _at("spec.parentRefs", i)
        p = _map(item, ppath)
        _only(p, ppath, ("group", "kind", "namespace", "name", "sectionName", "port"))
        group = _str(p.get("group"), _at(ppath, "group"), "gateway.networking.k8s.io")
        kind = _str(p.get("kind"), _at(ppath, "kind"), "Gateway")
        name = _str(p.get("name"), _at(ppath, "name"))
        if not name:
            raise Invalid(_at(ppath, "name"), "is required")
        if group not in ("", "core") or kind != "Service":
            continue
        if p.get("sectionName") is not None:
            raise Invalid(
                _at(ppath, "sectionName"), "is not supported for Service parents (use port)"
            )
        namespace = _str(p.get("namespace"), _at(ppath, "namespace")) or reader.namespace
        port = None if p.get("port") is None else _port(p["port"], _at(ppath, "port"))
        parents.append(ParentRef(namespace, name, port))
    routes: list[Route] = []
    for i, item in enumerate(_list(spec.get("rules"), "spec.rules")):
        routes.extend(_gw_rule(reader, item, _at("spec.rules", i), i))
    if not parents:
        reader.note("spec.parentRefs", "no Service parent: not a waypoint route")
        return None
    return HTTPRouteRoutes(
        reader.namespace, reader.name, reader.created, tuple(parents), tuple(routes)
    )


# --- entry point -------------------------------------------------------------------------------


def parse_routes(resources: Iterable[Resource], options: RouteOptions | None = None) -> RouteConfig:
    """Read every VirtualService and HTTPRoute in `resources`; other kinds are ignored.

    Never raises for bad input: a bad resource is left out with a `ResourceError`."""
    options = options or RouteOptions()
    errors: list[ResourceError] = []
    notes: list[ResourceError] = []
    virtual_services: list[VirtualServiceRoutes] = []
    http_routes: list[HTTPRouteRoutes] = []
    seen: dict[tuple[str, str, str], Resource] = {}
    for resource in resources:
        versions = _KINDS.get((resource.group, resource.kind))
        if versions is None:
            continue
        namespace = resource.namespace or "default"
        key = f"{namespace}/{resource.name}"

        def error(path: str, reason: str, res: Resource = resource, key: str = key) -> None:
            errors.append(ResourceError(res.kind, res.index, key, path, reason, res.file))

        version = resource.api_version.rpartition("/")[2]
        if version not in versions:
            supported = ", ".join(f"{resource.group}/{v}" for v in versions)
            error("apiVersion", f"{show(resource.api_version)} is not supported (use {supported})")
            continue
        identity = (resource.kind, namespace, resource.name)
        if identity in seen:
            error("", f"duplicate of the one in {seen[identity].location}")
            continue
        seen[identity] = resource
        reader: _Reader | None = None
        try:
            reader = _Reader(options, resource.kind, namespace, resource.name, _created(resource))
            if resource.kind == VIRTUAL_SERVICE:
                vs = _read_virtual_service(reader, resource)
                if vs is not None:
                    virtual_services.append(vs)
            else:
                hr = _read_http_route(reader, resource)
                if hr is not None:
                    http_routes.append(hr)
        except Invalid as exc:
            error(exc.path, exc.reason)
            continue
        except RecursionError:
            error("", "nested too deeply")
            continue
        for path, reason in reader.notes:
            notes.append(
                ResourceError(resource.kind, resource.index, key, path, reason, resource.file)
            )
            log.debug("%s %s: %s: %s", resource.kind, key, path, reason)
    return RouteConfig(
        tuple(virtual_services), tuple(http_routes), tuple(errors), tuple(notes), options
    )
