"""Reading fields of untrusted configuration: the error type and the wording of messages.

Shared by the ztunnel local-config loader and the Kubernetes/Istio translation, so a bad value
is reported the same way wherever it comes from.
"""

from __future__ import annotations

import json
import re


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
