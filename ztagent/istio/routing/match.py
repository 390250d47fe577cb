"""Match conditions of a route: how a path, header, query parameter, method, scheme or
authority is tested (`ValueMatch`), and `RequestMatch`, one condition on a whole request.

`ValueMatch` is the routing test of one value (Istio's VirtualService StringMatch, Gateway API
path, header and query matches: exact, prefix, whole-segment prefix, RE2 regex, presence);
Istio's AuthorizationPolicy strings are a different syntax, `ztagent.model.policy.StringMatch`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from ztagent.istio.routing.re2 import compile_re2
from ztagent.istio.routing.request import Request


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SEGMENT_PREFIX = "segment-prefix"
    """Gateway API PathPrefix: whole path segments; `value` has no trailing "/"."""
    REGEX = "regex"
    PRESENT = "present"
    """The header or parameter exists, whatever its value."""


@dataclass(frozen=True, slots=True)
class ValueMatch:
    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    """Exact and prefix only; Envoy ignores the flag for regular expressions."""
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def regex(cls, value: str) -> ValueMatch:
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
    match: ValueMatch
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
    match: ValueMatch

    def matches(self, request: Request) -> bool:
        value = request.query_param(self.name)
        return value is not None and self.match.matches(value)


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """One match condition: every field given must hold. `RequestMatch()` matches all."""

    path: ValueMatch | None = None
    method: ValueMatch | None = None
    scheme: ValueMatch | None = None
    authority: ValueMatch | None = None
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
