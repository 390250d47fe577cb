"""The request as routing sees it: an ordered, case-insensitive header multi-map, who sent the
request, and the parts of the request line that routes match on. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import unquote


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
