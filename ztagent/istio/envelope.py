"""The envelope every Kubernetes object shares: `apiVersion`, `kind`, `metadata.name` and
`metadata.namespace`, read into a `Resource`, or a `ResourceError` naming the object, the field
and the reason. Every reader of an Istio or Kubernetes kind takes a `Resource` and reports its
problems as `ResourceError`s, whatever source (YAML directory, Kubernetes API, xDS) it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztagent.model.snapshot import ObjectError


@dataclass(frozen=True, slots=True)
class ResourceError(ObjectError):
    """An error about one resource (or one file), as an `ObjectError` the agent can show.

    `kind` is the resource's kind (`""` when the document has none), `key` its `ns/name`
    (just `name` for cluster-scoped kinds), `path` the field path inside the document,
    `file` and `index` where the document was read from.
    """

    file: str = ""

    @property
    def location(self) -> str:
        """`file#index`, or the file alone for an error about the whole file."""
        if not self.file:
            return "" if self.index is None else f"#{self.index}"
        return self.file if self.index is None else f"{self.file}#{self.index}"

    def __str__(self) -> str:
        if self.kind and self.key:
            head = f"{self.kind} {self.key}"
        elif self.kind:
            head = self.kind
        else:
            head = self.location or "<input>"
        text = f"{head}: {self.path}: {self.reason}" if self.path else f"{head}: {self.reason}"
        if (self.kind or self.key) and self.location:
            text += f" ({self.location})"
        return text


@dataclass(frozen=True, slots=True)
class Resource:
    """One document with a valid envelope; `body` is the whole parsed document."""

    file: str
    index: int
    api_version: str
    kind: str
    name: str
    namespace: str
    """`metadata.namespace`, or `""` when the document does not give one."""
    body: Mapping[str, Any]

    @property
    def group(self) -> str:
        """The API group: `""` for the core group (`v1`), else the part before the `/`."""
        group, slash, _ = self.api_version.rpartition("/")
        return group if slash else ""

    @property
    def location(self) -> str:
        return f"{self.file}#{self.index}"


def envelope(document: object, file: str, index: int) -> Resource | ResourceError:
    """One Kubernetes object as a `Resource`, or what is wrong with its envelope."""

    def error(path: str, reason: str, kind: str = "", key: str | None = None) -> ResourceError:
        return ResourceError(kind, index, key, path, reason, file)

    if not isinstance(document, Mapping):
        what = "a list" if isinstance(document, list) else type(document).__name__
        return error("", f"a resource must be a mapping, got {what}")
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    metadata = document.get("metadata")
    if not isinstance(kind, str) or not kind:
        return error("kind", "is required (a non-empty string)")
    if not isinstance(api_version, str) or not api_version:
        return error("apiVersion", "is required (a non-empty string)", kind)
    if not isinstance(metadata, Mapping):
        return error("metadata", "is required (a mapping with a name)", kind)
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        return error("metadata.name", "is required (a non-empty string)", kind)
    namespace = metadata.get("namespace")
    if namespace is None:
        namespace = ""
    if not isinstance(namespace, str):
        return error("metadata.namespace", "must be a string", kind, name)
    return Resource(file, index, api_version, kind, name, namespace, document)
