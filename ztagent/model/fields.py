"""Reading fields of untrusted configuration: the error type and the wording of messages.

Shared by the ztunnel local-config loader and the Kubernetes/Istio translation, so a bad value
is reported the same way wherever it comes from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
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
