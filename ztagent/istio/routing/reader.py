"""What reading a VirtualService and an HTTPRoute share: the per-resource state (`Reader`:
notes, short-name resolution, route sources), the creation timestamp, RE2 and header-name
fields. Every other field reader is the shared one in `ztagent.fields`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ztagent.fields import Invalid, kube_type_name, mapping, show, string
from ztagent.istio.envelope import Resource
from ztagent.istio.routing.re2 import compile_re2
from ztagent.istio.routing.table import RouteOptions, RouteSource
from ztagent.names import qualify_host, service_hostname


@dataclass(slots=True)
class Reader:
    """Per-resource reading state: where notes go, and how short names resolve."""

    options: RouteOptions
    kind: str
    namespace: str
    name: str
    created: datetime | None
    notes: list[tuple[str, str]] = field(default_factory=list)

    def note(self, path: str, reason: str) -> None:
        self.notes.append((path, reason))

    def qualify(self, host: str) -> str:
        """Istio's short-name rule: a name without dots is a Service in this namespace."""
        return qualify_host(host, self.namespace, self.options.domain_suffix)

    def service(self, name: str, namespace: str) -> str:
        """The hostname of the Kubernetes Service `name` in `namespace`."""
        return service_hostname(name, namespace, self.options.domain_suffix)

    def source(self, rule: int, match: int = 0, rule_name: str = "") -> RouteSource:
        return RouteSource(
            self.kind, self.namespace, self.name, rule, match, self.created, rule_name
        )


def created_at(resource: Resource) -> datetime | None:
    """`metadata.creationTimestamp` in UTC, or None when the object has none."""
    metadata = mapping(resource.body.get("metadata"), "metadata")
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
        raise Invalid(path, f"must be a timestamp, got {kube_type_name(value)}")
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def regex(value: str, path: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """An RE2 pattern field, compiled."""
    try:
        return compile_re2(value, ignore_case=ignore_case)
    except ValueError as exc:
        raise Invalid(path, f"{show(value)}: {exc}") from None


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")


def header_name(value: object, path: str, *, pseudo: bool = False) -> str:
    """An HTTP field name (RFC 9110 token); with `pseudo`, a leading ":" is allowed."""
    name = string(value, path)
    check = name[1:] if pseudo and name.startswith(":") else name
    if not _HEADER_NAME.fullmatch(check):
        raise Invalid(path, f"{show(name)} is not a valid header name")
    return name


def header_value(value: object, path: str) -> str:
    """An HTTP field value: no control characters but tab."""
    text = string(value, path)
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
        raise Invalid(path, "header value contains control characters")
    return text
