"""`KubernetesSource`: lists and watches the cluster's kinds and publishes them as a batch.

It keeps the current set of objects keyed by (group, kind, namespace, name) and hands the
whole set to a callback as a `SourceBatch` after the initial list of every kind and after
every change. Each object becomes a `Resource` named `kubernetes:<Kind>/<namespace>/<name>`
(`kubernetes:<Kind>/<name>` when cluster-scoped), or a `ResourceError` when its envelope is
unusable. The watch rules (resume, backoff, relist on 410, rediscovery) are described in the
package's docstring.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio.client import ApiClient

from ztagent.control.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    MAX_EVENT_BYTES,
    MAX_REVIEW_BYTES,
    ApiError,
    Gone,
    Missing,
    get_json,
    load_api_client,
    read_body,
    read_lines,
    request,
    status_message,
)
from ztagent.control.kube.kinds import DEFAULT_KINDS, KindSpec
from ztagent.control.sources import SourceBatch
from ztagent.errors import LocalError
from ztagent.istio.envelope import Resource, ResourceError

log = logging.getLogger(__name__)

FILE_PREFIX = "kubernetes:"

DEFAULT_BACKOFF_INITIAL = 0.1
DEFAULT_BACKOFF_MAX = 15.0
DEFAULT_REDISCOVER_INTERVAL = 60.0
DEFAULT_WATCH_TIMEOUT = 300
DEFAULT_PAGE_SIZE = 500


# --- objects -> resources -----------------------------------------------------------------------


def _file(kind: str, namespace: str, name: str) -> str:
    if not name:
        return FILE_PREFIX + kind
    return f"{FILE_PREFIX}{kind}/{namespace}/{name}" if namespace else f"{FILE_PREFIX}{kind}/{name}"


def _names(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """Whatever (namespace, name, uid) can be read, for naming an error."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return "", "", ""
    values = [metadata.get(key) for key in ("namespace", "name", "uid")]
    namespace, name, uid = (v if isinstance(v, str) else "" for v in values)
    return namespace, name, uid


def _entry(spec: KindSpec, version: str, obj: object) -> Resource | ResourceError:
    """One API object as a `Resource` with `apiVersion` and `kind` set, or why it cannot be."""
    if not isinstance(obj, dict):
        reason = f"an object must be a mapping, got {type(obj).__name__}"
        return ResourceError(spec.kind, 0, None, "", reason, _file(spec.kind, "", ""))
    namespace, name, _ = _names(obj)
    shown_key = f"{namespace}/{name}" if namespace and name else (name or None)

    def error(path: str, reason: str) -> ResourceError:
        return ResourceError(
            spec.kind, 0, shown_key, path, reason, _file(spec.kind, namespace, name)
        )

    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return error("metadata", "is required (a mapping with a name)")
    if not name:
        return error("metadata.name", "is required (a non-empty string)")
    raw_namespace = metadata.get("namespace")
    if spec.namespaced:
        if not isinstance(raw_namespace, str) or not raw_namespace:
            return error("metadata.namespace", "is required (a non-empty string)")
    elif raw_namespace not in (None, ""):
        return error("metadata.namespace", f"{spec.kind} is not namespaced")
    body = dict(obj)
    api_version = spec.api_version(version)
    body["apiVersion"] = api_version
    body["kind"] = spec.kind
    return Resource(
        _file(spec.kind, namespace, name), 0, api_version, spec.kind, name, namespace, body
    )


def _resource_version(obj: object) -> str | None:
    if isinstance(obj, dict):
        metadata = obj.get("metadata")
        if isinstance(metadata, dict):
            value = metadata.get("resourceVersion")
            if isinstance(value, str) and value:
                return value
    return None


class _Status(enum.Enum):
    PENDING = "pending"
    SYNCED = "synced"
    MISSING = "missing"


@dataclass(slots=True)
class _KindState:
    spec: KindSpec
    status: _Status = _Status.PENDING
    version: str | None = None
    resource_version: str | None = None
    objects: dict[tuple[str, str], Resource] = field(default_factory=dict)
    errors: dict[str, ResourceError] = field(default_factory=dict)
    """Objects without a usable envelope, by uid (else by what can be read of them)."""
    events: int = 0
    """Events applied since the current watch started."""


def _error_key(obj: object, error: ResourceError) -> str:
    if isinstance(obj, dict):
        namespace, name, uid = _names(obj)
        if uid:
            return "uid:" + uid
        if name:
            return f"name:{namespace}/{name}"
    return "error:" + str(error)


class KubernetesSource:
    """Lists and watches `kinds` and publishes the current set of objects as a `SourceBatch`.

    `run(publish)` runs until cancelled. `publish` is first called once every kind has been
    listed (or found not served), then after every change; a burst of changes that arrives
    together is published once. The batch's resources are sorted by (group, kind, namespace,
    name), its errors by their text.
    """

    def __init__(
        self,
        *,
        api_client: ApiClient | None = None,
        kinds: Sequence[KindSpec] = DEFAULT_KINDS,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        rediscover_interval: float = DEFAULT_REDISCOVER_INTERVAL,
        watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if not kinds:
            raise LocalError("KubernetesSource needs at least one kind")
        labels = [spec.label for spec in kinds]
        if len(set(labels)) != len(labels):
            raise LocalError(f"KubernetesSource: a kind is listed twice in {labels}")
        self._api_client: Any = api_client
        self._states = [_KindState(spec) for spec in kinds]
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._rediscover_interval = rediscover_interval
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._changed = asyncio.Event()

    @property
    def synced(self) -> bool:
        """Whether every kind has been listed once (or found not served)."""
        return all(state.status is not _Status.PENDING for state in self._states)

    @property
    def missing(self) -> tuple[str, ...]:
        """The kinds the server does not serve at the moment, as `Kind.group`."""
        return tuple(s.spec.label for s in self._states if s.status is _Status.MISSING)

    def batch(self) -> SourceBatch:
        """The current set of objects."""
        resources: list[Resource] = []
        errors: list[ResourceError] = []
        for state in self._states:
            resources.extend(state.objects.values())
            errors.extend(state.errors.values())
        resources.sort(key=lambda r: (r.group, r.kind, r.namespace, r.name))
        errors.sort(key=str)
        return SourceBatch(tuple(resources), tuple(errors))

    def pod_node(self, pod: str) -> str | None:
        """The `spec.nodeName` of pod `namespace/name` in the current set, if it is there."""
        namespace, _, name = pod.partition("/")
        for state in self._states:
            if state.spec.group == "" and state.spec.kind == "Pod":
                resource = state.objects.get((namespace, name))
                if resource is None:
                    return None
                spec = resource.body.get("spec")
                node = spec.get("nodeName") if isinstance(spec, dict) else None
                return node if isinstance(node, str) and node else None
        return None

    async def run(self, publish: Callable[[SourceBatch], None]) -> None:
        """List and watch until cancelled, calling `publish` with every new state."""
        owned = self._api_client is None
        if owned:
            self._api_client = await load_api_client()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._publisher(publish))
                for state in self._states:
                    group.create_task(self._run_kind(state))
        finally:
            if owned:
                client, self._api_client = self._api_client, None
                await client.close()

    # --- publishing ---

    def _notify(self) -> None:
        self._changed.set()

    async def _publisher(self, publish: Callable[[SourceBatch], None]) -> None:
        while True:
            await self._changed.wait()
            # Let the rest of a burst (the other events of a chunk, other kinds' lists) land.
            await asyncio.sleep(0)
            self._changed.clear()
            if not self.synced:
                continue
            batch = self.batch()
            try:
                publish(batch)
            except Exception:
                log.exception("publishing the Kubernetes resources failed")

    # --- one kind ---

    async def _run_kind(self, state: _KindState) -> None:
        spec = state.spec
        backoff = self._backoff_initial
        last_reason = ""  # of the current run of failures; repeats are logged at debug
        gone = 0  # 410s in a row with no event in between

        def recovered() -> None:
            nonlocal backoff, last_reason
            backoff = self._backoff_initial
            if last_reason:
                log.info("%s: the watch is back", spec.label)
            last_reason = ""

        async def pause(reason: str) -> None:
            nonlocal backoff, last_reason
            level = logging.DEBUG if reason == last_reason else logging.WARNING
            log.log(level, "%s: %s; retrying in %.3gs", spec.label, reason, backoff)
            last_reason = reason
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

        while True:
            state.events = 0
            try:
                if state.resource_version is None:
                    versions = await self._discover(spec)
                    await self._list(state, versions)
                    recovered()
                started = time.monotonic()
                await self._watch(state)
                if state.events or time.monotonic() - started >= 1.0:
                    gone = 0
                    recovered()
                else:
                    await pause("the watch ended at once")
            except Gone:
                log.info("%s: resource version expired (410 Gone); listing again", spec.label)
                state.resource_version = None
                gone = 1 if state.events else gone + 1
                if gone > 1:
                    await pause("410 Gone again right after a list")
            except Missing:
                last_reason = ""
                self._set_missing(state)
                await asyncio.sleep(self._rediscover_interval)
            except (ApiError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                if state.events:
                    gone = 0
                    backoff = self._backoff_initial
                await pause(str(exc) or type(exc).__name__)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: unexpected error", spec.label)
                await pause(str(exc) or type(exc).__name__)

    def _set_missing(self, state: _KindState) -> None:
        spec = state.spec
        if state.status is not _Status.MISSING:
            log.info(
                "%s is not served by the Kubernetes API (CRD not installed?); skipping it, "
                "looking again every %gs",
                spec.label,
                self._rediscover_interval,
            )
        changed = bool(state.objects or state.errors) or state.status is _Status.PENDING
        state.status = _Status.MISSING
        state.version = None
        state.resource_version = None
        state.objects.clear()
        state.errors.clear()
        if changed:
            self._notify()

    async def _discover(self, spec: KindSpec) -> list[str]:
        """The versions to try, best first; `Missing` when the group is not served."""
        if not spec.group:
            return list(spec.versions)
        group = await get_json(self._api_client, f"/apis/{quote(spec.group)}")
        served: list[str] = []
        preferred = ""
        if isinstance(group, dict):
            for item in group.get("versions") or ():
                if isinstance(item, dict) and isinstance(item.get("version"), str):
                    served.append(item["version"])
            pref = group.get("preferredVersion")
            if isinstance(pref, dict) and isinstance(pref.get("version"), str):
                preferred = pref["version"]
        versions = [v for v in spec.versions if v in served]
        if not versions:
            versions = [preferred] if preferred else served[:1]
        if not versions:
            raise Missing(spec.group)
        return versions

    async def _list(self, state: _KindState, versions: Sequence[str]) -> None:
        spec = state.spec
        for version in versions:
            try:
                items, resource_version = await self._list_version(spec, version)
            except Missing:
                continue
            break
        else:
            raise Missing(spec.label)
        objects: dict[tuple[str, str], Resource] = {}
        errors: dict[str, ResourceError] = {}
        for obj in items:
            entry = _entry(spec, version, obj)
            if isinstance(entry, Resource):
                objects[(entry.namespace, entry.name)] = entry
            else:
                log.warning("%s", entry)
                errors[_error_key(obj, entry)] = entry
        if state.status is _Status.MISSING:
            log.info("%s is served again (%s)", spec.label, spec.api_version(version))
        elif version != state.version and spec.group and version != spec.versions[0]:
            log.info("%s: using %s", spec.label, spec.api_version(version))
        changed = (
            state.status is not _Status.SYNCED
            or version != state.version
            or _versions(objects) != _versions(state.objects)
            or errors.keys() != state.errors.keys()
        )
        state.version = version
        state.objects = objects
        state.errors = errors
        state.resource_version = resource_version
        state.status = _Status.SYNCED
        if changed:
            self._notify()

    async def _list_version(self, spec: KindSpec, version: str) -> tuple[list[Any], str]:
        """Every item of the collection (page by page) and the list's resource version."""
        items: list[Any] = []
        token = ""
        while True:
            query = {"limit": str(self._page_size)}
            if token:
                query["continue"] = token
            page = await get_json(self._api_client, spec.path(version), query)
            if not isinstance(page, dict):
                raise ApiError(200, f"{spec.path(version)}: a list must be a mapping")
            page_items = page.get("items")
            if page_items is None:
                page_items = []
            if not isinstance(page_items, list):
                raise ApiError(200, f"{spec.path(version)}: items must be a list")
            items.extend(page_items)
            metadata = page.get("metadata")
            metadata = metadata if isinstance(metadata, dict) else {}
            token = metadata.get("continue") or ""
            if not isinstance(token, str):
                token = ""
            if not token:
                resource_version = metadata.get("resourceVersion")
                if not isinstance(resource_version, str) or not resource_version:
                    raise ApiError(200, f"{spec.path(version)}: the list has no resourceVersion")
                return items, resource_version

    async def _watch(self, state: _KindState) -> None:
        """Follow the watch from `state.resource_version` until the server ends it."""
        spec = state.spec
        assert state.version is not None and state.resource_version is not None
        query = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": state.resource_version,
            "timeoutSeconds": str(self._watch_timeout),
        }
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=DEFAULT_REQUEST_TIMEOUT,
            sock_read=self._watch_timeout + DEFAULT_REQUEST_TIMEOUT,
        )
        path = spec.path(state.version)
        response = await request(self._api_client, "GET", path, query=query, timeout=timeout)
        try:
            if response.status != 200:
                data = await read_body(response, MAX_REVIEW_BYTES)
                if response.status == 404:
                    raise Missing(path)
                if response.status == 410:
                    raise Gone(status_message(data, response.status))
                raise ApiError(response.status, status_message(data, response.status))
            try:
                async for line in read_lines(response, MAX_EVENT_BYTES):
                    try:
                        event = json.loads(line)
                    except ValueError as exc:
                        raise ApiError(0, f"watch event is not JSON: {exc}") from None
                    if self._apply(state, event):
                        self._notify()
            except ApiError:
                state.resource_version = None  # an event may be lost: list again
                raise
        finally:
            response.close()

    def _apply(self, state: _KindState, event: object) -> bool:
        """Apply one watch event; whether the set changed."""
        spec = state.spec
        if not isinstance(event, dict):
            raise ApiError(0, "watch event is not a mapping")
        kind = event.get("type")
        obj = event.get("object")
        if kind == "ERROR":
            status = obj if isinstance(obj, dict) else {}
            code = status.get("code")
            message = status.get("message") or status.get("reason") or "watch error"
            if code == 410 or status.get("reason") in ("Expired", "Gone"):
                raise Gone(str(message))
            raise ApiError(code if isinstance(code, int) else 0, str(message))
        resource_version = _resource_version(obj)
        if kind == "BOOKMARK":
            if resource_version is not None:
                state.resource_version = resource_version
            return False
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: ignoring a watch event of type %r", spec.label, kind)
            return False
        if resource_version is not None:
            state.resource_version = resource_version
        state.events += 1
        assert state.version is not None
        entry = _entry(spec, state.version, obj)
        if isinstance(entry, Resource):
            key = (entry.namespace, entry.name)
            _, _, uid = _names(entry.body)
            error_gone = state.errors.pop("uid:" + uid, None) is not None if uid else False
            error_gone |= state.errors.pop(f"name:{entry.namespace}/{entry.name}", None) is not None
            if kind == "DELETED":
                return state.objects.pop(key, None) is not None or error_gone
            state.objects[key] = entry
            return True
        error_key = _error_key(obj, entry)
        if kind == "DELETED":
            return state.errors.pop(error_key, None) is not None
        log.warning("%s", entry)
        state.errors[error_key] = entry
        return True


def _versions(objects: Mapping[tuple[str, str], Resource]) -> dict[tuple[str, str], Any]:
    return {key: _resource_version(r.body) or id(r) for key, r in objects.items()}


__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_REDISCOVER_INTERVAL",
    "DEFAULT_WATCH_TIMEOUT",
    "FILE_PREFIX",
    "KubernetesSource",
]
