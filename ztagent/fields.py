"""Reading fields of untrusted configuration: the error type, the wording of messages, and the
one reader of each kind of field (mappings, lists, strings, labels, integers, ports, addresses,
CIDR blocks, Go/protobuf and Gateway API durations).

The only field-reader module: the ztunnel local-config loader, the xDS converter and every
reader of an Istio or Kubernetes kind use it, so a bad value is reported the same way wherever it
comes from and one text is never read two ways.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import Any


class Invalid(Exception):
    """A field of the object being read is wrong; carries the field path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def show(value: object) -> str:
    """Quote a value from the input for a message, short enough for one log line."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def join(path: str, key: str | int, *, quote_odd: bool = False) -> str:
    """`path.key` or `path[i]`; with `quote_odd`, keys that are not identifiers (label keys
    such as `app.kubernetes.io/name`) are written `path["key"]` so the path stays readable."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if quote_odd and not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


# --- Kubernetes-style objects (camelCase YAML as users write it) --------------------------------


def kube_type_name(value: object) -> str:
    """Kubernetes objects say "a number" for any number (its schema's own wording)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "a number"
    return type_name(value)


def at(path: str, key: str | int) -> str:
    """`join` with odd keys quoted, so label keys read well in a field path."""
    return join(path, key, quote_odd=True)


def mapping(value: object, path: str) -> dict[str, Any]:
    """A mapping with string keys; null is an empty mapping."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(path, f"must be a mapping, got {kube_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise Invalid(path, f"key {show(key)} must be a string")
    return value


def sequence(value: object, path: str) -> list[Any]:
    """A list; null is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(path, f"must be a list, got {kube_type_name(value)}")
    return value


def string(value: object, path: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise Invalid(path, f"must be a string, got {kube_type_name(value)}")
    return value


def only(data: Mapping[str, Any], path: str, known: Iterable[str]) -> None:
    """Unknown fields are errors, so a typo is never silently ignored."""
    allowed = set(known)
    for key in data:
        if key not in allowed:
            raise Invalid(at(path, key), "unknown field")


def labels(value: object, path: str) -> dict[str, str]:
    result = mapping(value, path)
    for key, item in result.items():
        if not isinstance(item, str):
            raise Invalid(at(path, key), f"must be a string, got {kube_type_name(item)}")
    return result


def strings(value: object, path: str) -> list[str]:
    """A list of non-empty strings (Istio rejects empty values)."""
    out = []
    for i, item in enumerate(sequence(value, path)):
        if not isinstance(item, str):
            raise Invalid(at(path, i), f"must be a string, got {kube_type_name(item)}")
        if not item:
            raise Invalid(at(path, i), "must not be empty")
        out.append(item)
    return out


# --- numbers, ports, addresses and durations -----------------------------------------------------


def boolean(value: object, path: str) -> bool:
    """A boolean; null is false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise Invalid(path, f"must be a boolean, got {kube_type_name(value)}")
    return value


def integer(value: object, path: str, low: int, high: int) -> int:
    """An integer in `low..high` (a boolean is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(path, f"must be an integer, got {kube_type_name(value)}")
    if not low <= value <= high:
        raise Invalid(path, f"{value} is not in {low}-{high}")
    return value


def number(value: object, path: str, low: float, high: float) -> float:
    """A number (integer or float) in `low..high`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(path, f"must be a number, got {kube_type_name(value)}")
    result = float(value)
    if not low <= result <= high:
        raise Invalid(path, f"{show(value)} is not in {low:g}-{high:g}")
    return result


def port(value: object, path: str, *, low: int = 1, digit_strings: bool = True) -> int:
    """A port number, `low..65535`: an integer, or a string of ASCII digits as protobuf's JSON
    mapping accepts for integer fields (`"8080"`); full-width or other Unicode digits are not
    digits here, so one text is never read two ways. `digit_strings=False` reads the field as
    a Kubernetes schema typed `integer` does (VirtualService, HTTPRoute and Service ports): no
    strings, and `integer`'s wording."""
    if not digit_strings:
        return integer(value, path, low, 65535)
    result: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        result = int(value)
    if result is None or not low <= result <= 65535:
        raise Invalid(path, f"{show(value)} is not a port number ({low}-65535)")
    return result


def ip(value: object, path: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 or IPv6 address string."""
    if not isinstance(value, str):
        raise Invalid(path, f"must be an IP address string, got {kube_type_name(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not an IP address") from None


def cidr(value: object, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR block (`10.0.0.1`, `10.0.0.0/8`), host bits allowed as Istio does."""
    if not isinstance(value, str):
        raise Invalid(path, f"must be an IP or CIDR string, got {kube_type_name(value)}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(path, f"{show(value)} is not an IP address or CIDR block") from None


_GO_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_NANOS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 MICRO SIGN, as Go accepts
    "μs": 1_000,  # U+03BC GREEK SMALL LETTER MU, as Go accepts
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_go_duration(text: str) -> Fraction:
    """Seconds in a Go duration (`time.ParseDuration`: "1.5s", "100ms", "1h30m", "0"), which
    is also the protobuf JSON form ("1.5s") Istio's durations use. ASCII digits only; a `+`
    sign is allowed as in Go, a `-` is not (no duration we read can be negative).
    Raises ValueError with a short reason."""
    body = text[1:] if text[:1] == "+" else text
    if body == "0":
        return Fraction(0)
    if not body:
        raise ValueError("empty duration")
    total = Fraction(0)
    position = 0
    while position < len(body):
        match = _GO_DURATION_PART.match(body, position)
        if match is None:
            raise ValueError(f"invalid duration {text[:40]!r}")
        total += Fraction(match[1]) * _NANOS_PER_UNIT[match[2]]
        position = match.end()
    return total / 1_000_000_000


def duration(value: object, path: str, *, minimum: Fraction = Fraction(1, 1000)) -> float:
    """A duration field as Istio validates one (`ValidateDuration`: at least 1ms and whole
    milliseconds, unless `minimum` says otherwise), in seconds."""
    if not isinstance(value, str):
        raise Invalid(path, f'must be a duration string such as "1s", got {kube_type_name(value)}')
    try:
        seconds = parse_go_duration(value.strip())
    except ValueError:
        raise Invalid(path, f"{show(value)} is not a duration (such as 1s, 0.5s, 100ms)") from None
    if seconds < minimum:
        raise Invalid(path, f"{show(value)}: a duration must be at least {_show_seconds(minimum)}")
    if (seconds * 1000).denominator != 1:
        raise Invalid(
            path,
            f"{show(value)}: only durations to ms precision (whole milliseconds) are supported",
        )
    return float(seconds)


_GATEWAY_DURATION = re.compile(r"(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}")
_GATEWAY_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_GATEWAY_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def gateway_duration(value: object, path: str) -> float:
    """A Gateway API duration (GEP-2257: up to four `<1-5 ASCII digits><h|m|s|ms>` parts, such
    as "10s", "500ms", "1h30m"; no fractions, no sign), in seconds. A different format from
    the Go durations Istio's own kinds use."""
    if not isinstance(value, str):
        raise Invalid(path, f'must be a duration string such as "10s", got {kube_type_name(value)}')
    if not _GATEWAY_DURATION.fullmatch(value):
        raise Invalid(path, f"{show(value)} is not a Gateway API duration (such as 10s, 500ms)")
    return sum(int(n) * _GATEWAY_UNIT_SECONDS[u] for n, u in _GATEWAY_PART.findall(value))


def _show_seconds(seconds: Fraction) -> str:
    if seconds < 1:
        return f"{float(seconds * 1000):g}ms"
    return f"{float(seconds):g}s"
