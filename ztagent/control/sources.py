"""Kubernetes and Istio resources read from a directory of YAML files.

A directory holds any number of `.yaml`, `.yml` and `.json` files (searched recursively, hidden
entries skipped, so a mounted ConfigMap's `..data` links are read once), each with one or more
documents separated by `---` lines, as `kubectl apply -f DIR` accepts them. Every document
must be a mapping with `apiVersion`, `kind` and `metadata.name`; the reader checks only that
envelope, the translation checks the rest.

Errors never stop the read: a file that cannot be read, a document that is not YAML or lacks
its envelope, is reported as a `ResourceError` naming the file and the document's index (0 for
the first document of the file, counting only documents that hold something), and every other
document is still returned. Documents are split on their `---` lines before parsing, so a
syntax error in one document does not hide the documents after it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from ztagent.istio.envelope import Resource, ResourceError, envelope
from ztagent.model.localconfig import MAX_CONFIG_BYTES

SUFFIXES = (".yaml", ".yml", ".json")
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it (about 8x faster on large directories)."""

_DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$")
_DOCUMENT_END = re.compile(r"^\.\.\.[ \t]*$")
_BLANK_OR_COMMENT = re.compile(r"^\s*(?:#.*)?$")


@dataclass(frozen=True, slots=True)
class SourceBatch:
    """Everything read from one file or directory: the resources and the errors."""

    resources: tuple[Resource, ...] = ()
    errors: tuple[ResourceError, ...] = ()


def _split(text: str) -> Iterator[tuple[int, str]]:
    """The documents of a YAML stream with the line each starts on (1-based)."""
    lines = text.splitlines(keepends=True)
    start = 0
    chunk: list[str] = []
    for number, line in enumerate(lines):
        stripped = line.rstrip("\r\n")
        if _DOCUMENT_START.match(stripped):
            yield start + 1, "".join(chunk)
            # Content after `--- ` on the same line belongs to the new document.
            rest = stripped[3:].strip()
            chunk = [rest + "\n"] if rest and not rest.startswith("#") else []
            start = number
            continue
        if _DOCUMENT_END.match(stripped):
            yield start + 1, "".join(chunk)
            chunk = []
            start = number + 1
            continue
        chunk.append(line)
    yield start + 1, "".join(chunk)


def _has_content(chunk: str) -> bool:
    return any(not _BLANK_OR_COMMENT.match(line) for line in chunk.splitlines())


def _yaml_problem(exc: yaml.YAMLError, first_line: int) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"not valid YAML: {problem} at line {first_line + mark.line}"
    return "not valid YAML: " + " ".join(str(exc).split())


def parse_documents(text: str | bytes, file: str = "<input>") -> SourceBatch:
    """Read every document of one YAML (or JSON) stream; `file` names it in errors."""
    if len(text) > MAX_CONFIG_BYTES:
        error = ResourceError("", None, None, "", f"larger than {MAX_CONFIG_BYTES} bytes", file)
        return SourceBatch(errors=(error,))
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            error = ResourceError("", None, None, "", f"not UTF-8 text: {exc.reason}", file)
            return SourceBatch(errors=(error,))
    resources: list[Resource] = []
    errors: list[ResourceError] = []
    index = 0
    for first_line, chunk in _split(text):
        if not _has_content(chunk):
            continue
        try:
            document = yaml.load(chunk, Loader=_LOADER)
        except yaml.YAMLError as exc:
            errors.append(ResourceError("", index, None, "", _yaml_problem(exc, first_line), file))
            index += 1
            continue
        except (RecursionError, ValueError, TypeError, OverflowError) as exc:
            errors.append(ResourceError("", index, None, "", f"not valid YAML: {exc}", file))
            index += 1
            continue
        if document is None:
            continue
        result = envelope(document, file, index)
        if isinstance(result, Resource):
            resources.append(result)
        else:
            errors.append(result)
        index += 1
    return SourceBatch(tuple(resources), tuple(errors))


def _files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.endswith(SUFFIXES):
                yield Path(dirpath) / name


def read_file(path: str | Path, *, name: str | None = None) -> SourceBatch:
    """Read one file; `name` (default: the path) is how errors and resources name it."""
    label = str(path) if name is None else name
    try:
        size = os.stat(path).st_size
        if size > MAX_CONFIG_BYTES:
            reason = f"larger than {MAX_CONFIG_BYTES} bytes"
            return SourceBatch(errors=(ResourceError("", None, None, "", reason, label),))
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = f"cannot read: {exc.strerror or exc}"
        return SourceBatch(errors=(ResourceError("", None, None, "", reason, label),))
    return parse_documents(data, label)


def read_directory(root: str | Path) -> SourceBatch:
    """Read every YAML/JSON file under `root` in name order; files are named relative to it.

    A `root` that is a file is read alone. A missing or unreadable `root` is one error.
    """
    root = Path(root)
    if root.is_file():
        return read_file(root, name=root.name)
    if not root.is_dir():
        reason = "no such directory" if not root.exists() else "not a directory"
        return SourceBatch(errors=(ResourceError("", None, None, "", reason, str(root)),))
    resources: list[Resource] = []
    errors: list[ResourceError] = []
    for path in _files(root):
        batch = read_file(path, name=path.relative_to(root).as_posix())
        resources.extend(batch.resources)
        errors.extend(batch.errors)
    return SourceBatch(tuple(resources), tuple(errors))


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): one object, whatever file or version holds it."""
    return (resource.group, resource.kind, resource.namespace, resource.name)


class DirectorySource:
    """A watched directory: `poll()` re-reads the files that changed and says whether the set
    of resources did; `batch` is the current set.

    Polling stats every file (250 ms by default in `run`), which behaves the same with editors
    that replace files and with Kubernetes ConfigMap symlink swaps. A file whose documents
    cannot all be read keeps its last good objects: those of the previous read that the new
    read lacks stay served (and the errors are reported), so a typo never withdraws config.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._files: dict[str, SourceBatch] = {}
        self._root_error: ResourceError | None = None
        self.batch = SourceBatch()

    def _scan(self) -> dict[str, tuple[int, int, int]] | None:
        if self.root.is_file():
            paths = {self.root.name: self.root}
        elif self.root.is_dir():
            paths = {p.relative_to(self.root).as_posix(): p for p in _files(self.root)}
        else:
            return None
        stats = {}
        for name, path in paths.items():
            try:
                st = path.stat()
            except OSError:
                continue
            stats[name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return stats

    def poll(self) -> bool:
        """One check; True when the resources or errors changed."""
        stats = self._scan()
        if stats is None:
            reason = "no such directory" if not self.root.exists() else "not a directory"
            error = ResourceError("", None, None, "", reason, str(self.root))
            changed = error != self._root_error
            self._root_error = error  # keep serving what was read before
            if changed:
                self.batch = SourceBatch(self.batch.resources, (error,))
            return changed
        root_changed = self._root_error is not None
        self._root_error = None
        if stats == self._stats and not root_changed:
            return False
        files: dict[str, SourceBatch] = {}
        for name in stats:
            if name in self._files and self._stats.get(name) == stats[name]:
                files[name] = self._files[name]
                continue
            path = self.root if self.root.is_file() else self.root / name
            fresh = read_file(path, name=name)
            old = self._files.get(name)
            if fresh.errors and old is not None:
                have = {resource_id(r) for r in fresh.resources}
                kept = tuple(r for r in old.resources if resource_id(r) not in have)
                fresh = SourceBatch(fresh.resources + kept, fresh.errors)
            files[name] = fresh
        self._stats = stats
        self._files = files
        batch = SourceBatch(
            tuple(r for b in files.values() for r in b.resources),
            tuple(e for b in files.values() for e in b.errors),
        )
        changed = batch != self.batch
        self.batch = batch
        return changed


__all__ = [
    "SUFFIXES",
    "DirectorySource",
    "Resource",
    "ResourceError",
    "SourceBatch",
    "parse_documents",
    "read_directory",
    "read_file",
    "resource_id",
]
