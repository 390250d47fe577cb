"""The control plane's Kubernetes API side: resources from a cluster, callers from TokenReview.

`KubernetesSource` owns reading the cluster. It lists, then watches, every kind the control
plane cares about (`DEFAULT_KINDS`: Namespace, Pod, Service, EndpointSlice, the Istio
networking and security kinds, Gateway API Gateway and HTTPRoute), keeps the current set of
objects keyed by (group, kind, namespace, name), and hands the whole set to a callback as a
`SourceBatch`, the same shape the YAML-directory source produces, after the initial list of
every kind and after every change. Objects stay plain dicts in the API's JSON form (camelCase,
as in YAML documents) with `apiVersion` and `kind` set; each becomes a `Resource` named
`kubernetes:<Kind>/<namespace>/<name>` (`kubernetes:<Kind>/<name>` when cluster-scoped).

The watch follows the API's rules: resume from the last `resourceVersion` (bookmarks
included) after a dropped stream, with a backoff of 100 ms doubling to 15 s; relist on
410 Gone. A kind whose group or CRD the server does not serve is logged once and skipped, and
looked for again every minute. Istio and Gateway API kinds use the first version of
`KindSpec.versions` the server serves, else the server's preferred version. An object without
a usable envelope (no name, no namespace for a namespaced kind) becomes a `ResourceError` in
the batch; nothing about one object stops the others.

`TokenReviewAuthenticator` is the cluster mode's `Authenticator`: it asks the API server to
review the caller's bearer token (authentication.k8s.io/v1 TokenReview, audience `istio-ca`)
and turns the reviewed service account, pod and node into a `Caller`. When the API cannot
answer, it raises `AuthenticationUnavailable`, so the CA can tell the caller to retry rather
than that its token is bad.

`load_api_client` builds a client from the in-cluster service account when
`KUBERNETES_SERVICE_HOST` is set, else from `KUBECONFIG` or `~/.kube/config`.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio import client as _k8s_client
from kubernetes_asyncio import config as _k8s_config
from kubernetes_asyncio.client import ApiClient

from ztagent.control.auth import (
    AUDIENCE,
    AuthenticationError,
    AuthenticationUnavailable,
    Caller,
    service_account_identity,
)
from ztagent.control.sources import SourceBatch
from ztagent.errors import LocalError
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.istio.envelope import Resource, ResourceError

log = logging.getLogger(__name__)

# The library is untyped: everything from it goes through `Any`.
_client_module: Any = _k8s_client
_config_module: Any = _k8s_config

FILE_PREFIX = "kubernetes:"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

DEFAULT_BACKOFF_INITIAL = 0.1
DEFAULT_BACKOFF_MAX = 15.0
DEFAULT_REDISCOVER_INTERVAL = 60.0
DEFAULT_WATCH_TIMEOUT = 300
DEFAULT_PAGE_SIZE = 500
DEFAULT_REQUEST_TIMEOUT = 30.0
MAX_EVENT_BYTES = 16 * 1024 * 1024
"""The largest watch event accepted (etcd keeps objects far smaller)."""
MAX_LIST_BYTES = 256 * 1024 * 1024
"""The largest list page accepted."""
MAX_REVIEW_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One kind to list and watch: its group, kind, resource (plural) and versions.

    `versions` are in order of preference; for a non-core group the first one the server
    serves is used, else the server's preferred version of the group.
    """

    group: str
    kind: str
    plural: str
    versions: tuple[str, ...]
    namespaced: bool = True

    @property
    def label(self) -> str:
        """`Kind.group` (just `Kind` for the core group), as logs name it."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def path(self, version: str) -> str:
        """The collection's path across all namespaces."""
        if self.group:
            return f"/apis/{self.group}/{version}/{self.plural}"
        return f"/api/{version}/{self.plural}"

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


_ISTIO_VERSIONS = ("v1", "v1beta1")
_ISTIO_NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")
_GATEWAY_VERSIONS = ("v1", "v1beta1")

DEFAULT_KINDS: tuple[KindSpec, ...] = (
    KindSpec("", "Namespace", "namespaces", ("v1",), namespaced=False),
    KindSpec("", "Pod", "pods", ("v1",)),
    KindSpec("", "Service", "services", ("v1",)),
    KindSpec("discovery.k8s.io", "EndpointSlice", "endpointslices", ("v1",)),
    KindSpec("networking.istio.io", "ServiceEntry", "serviceentries", _ISTIO_NETWORKING_VERSIONS),
    KindSpec(
        "networking.istio.io", "VirtualService", "virtualservices", _ISTIO_NETWORKING_VERSIONS
    ),
    KindSpec(
        "networking.istio.io", "DestinationRule", "destinationrules", _ISTIO_NETWORKING_VERSIONS
    ),
    KindSpec("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", _ISTIO_VERSIONS),
    KindSpec("security.istio.io", "PeerAuthentication", "peerauthentications", _ISTIO_VERSIONS),
    KindSpec(
        "security.istio.io", "RequestAuthentication", "requestauthentications", _ISTIO_VERSIONS
    ),
    KindSpec("gateway.networking.k8s.io", "Gateway", "gateways", _GATEWAY_VERSIONS),
    KindSpec("gateway.networking.k8s.io", "HTTPRoute", "httproutes", _GATEWAY_VERSIONS),
)


# --- the API client -----------------------------------------------------------------------------


async def load_api_client() -> ApiClient:
    """A client for the cluster this process runs in, else the kubeconfig's current context.

    In-cluster when `KUBERNETES_SERVICE_HOST` is set (service-account token and CA, the
    token re-read as the kubelet rotates it); otherwise `KUBECONFIG` (a `:`-separated list)
    or `~/.kube/config`. Raises `LocalError` when neither gives a usable configuration.
    """
    configuration = _client_module.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            _config_module.load_incluster_config(client_configuration=configuration)
        else:
            path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            await _config_module.load_kube_config(
                config_file=path, client_configuration=configuration, persist_config=False
            )
    except (_config_module.ConfigException, OSError, ValueError) as exc:
        raise LocalError(f"no Kubernetes API configuration: {exc}") from None
    client: ApiClient = _client_module.ApiClient(configuration)
    return client


class _ApiError(Exception):
    """A request the API answered with an error status, or a stream it broke off."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class _Gone(Exception):
    """410 Gone: the resource version is too old to watch from; relist."""


class _Missing(Exception):
    """The server does not serve the kind (its group or CRD is not installed)."""


async def _request(
    client: Any,
    method: str,
    path: str,
    *,
    query: Mapping[str, str] | None = None,
    body: Any = None,
    timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """The raw response (any status); the caller reads and releases it."""
    response: aiohttp.ClientResponse = await client.call_api(
        path,
        method,
        query_params=dict(query or {}),
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=timeout,
    )
    return response


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    async for chunk in response.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise _ApiError(response.status, f"response larger than {limit} bytes")
    return bytes(data)


def _status_message(data: bytes, status: int) -> str:
    """The `message` of a `Status` body, else the start of the body."""
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        return str(decoded["message"])
    text = data[:200].decode("utf-8", "replace").strip()
    return text or f"status {status}"


async def _get_json(client: Any, path: str, query: Mapping[str, str] | None = None) -> Any:
    """GET `path` and decode its JSON; 404 is `_Missing`, 410 `_Gone`, others `_ApiError`."""
    timeout = aiohttp.ClientTimeout(total=DEFAULT_REQUEST_TIMEOUT)
    response = await _request(client, "GET", path, query=query, timeout=timeout)
    try:
        data = await _read_body(response, MAX_LIST_BYTES)
        status = response.status
    finally:
        response.release()
    if status == 404:
        raise _Missing(path)
    if status == 410:
        raise _Gone(_status_message(data, status))
    if not 200 <= status < 300:
        raise _ApiError(status, _status_message(data, status))
    try:
        return json.loads(data)
    except ValueError as exc:
        raise _ApiError(status, f"{path}: not JSON: {exc}") from None


async def _lines(response: aiohttp.ClientResponse, limit: int) -> AsyncIterator[bytes]:
    """The non-blank lines of a streamed body; each watch event is one line of JSON."""
    buffer = bytearray()
    async for chunk in response.content.iter_any():
        start = len(buffer)
        buffer += chunk
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            start = 0
            if line.strip():
                yield line
        if len(buffer) > limit:
            raise _ApiError(0, f"watch event larger than {limit} bytes")
    if bytes(buffer).strip():
        yield bytes(buffer)


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


# --- the source ---------------------------------------------------------------------------------


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
            except _Gone:
                log.info("%s: resource version expired (410 Gone); listing again", spec.label)
                state.resource_version = None
                gone = 1 if state.events else gone + 1
                if gone > 1:
                    await pause("410 Gone again right after a list")
            except _Missing:
                last_reason = ""
                self._set_missing(state)
                await asyncio.sleep(self._rediscover_interval)
            except (_ApiError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
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
        """The versions to try, best first; `_Missing` when the group is not served."""
        if not spec.group:
            return list(spec.versions)
        group = await _get_json(self._api_client, f"/apis/{quote(spec.group)}")
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
            raise _Missing(spec.group)
        return versions

    async def _list(self, state: _KindState, versions: Sequence[str]) -> None:
        spec = state.spec
        for version in versions:
            try:
                items, resource_version = await self._list_version(spec, version)
            except _Missing:
                continue
            break
        else:
            raise _Missing(spec.label)
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
            page = await _get_json(self._api_client, spec.path(version), query)
            if not isinstance(page, dict):
                raise _ApiError(200, f"{spec.path(version)}: a list must be a mapping")
            page_items = page.get("items")
            if page_items is None:
                page_items = []
            if not isinstance(page_items, list):
                raise _ApiError(200, f"{spec.path(version)}: items must be a list")
            items.extend(page_items)
            metadata = page.get("metadata")
            metadata = metadata if isinstance(metadata, dict) else {}
            token = metadata.get("continue") or ""
            if not isinstance(token, str):
                token = ""
            if not token:
                resource_version = metadata.get("resourceVersion")
                if not isinstance(resource_version, str) or not resource_version:
                    raise _ApiError(200, f"{spec.path(version)}: the list has no resourceVersion")
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
        response = await _request(self._api_client, "GET", path, query=query, timeout=timeout)
        try:
            if response.status != 200:
                data = await _read_body(response, MAX_REVIEW_BYTES)
                if response.status == 404:
                    raise _Missing(path)
                if response.status == 410:
                    raise _Gone(_status_message(data, response.status))
                raise _ApiError(response.status, _status_message(data, response.status))
            try:
                async for line in _lines(response, MAX_EVENT_BYTES):
                    try:
                        event = json.loads(line)
                    except ValueError as exc:
                        raise _ApiError(0, f"watch event is not JSON: {exc}") from None
                    if self._apply(state, event):
                        self._notify()
            except _ApiError:
                state.resource_version = None  # an event may be lost: list again
                raise
        finally:
            response.close()

    def _apply(self, state: _KindState, event: object) -> bool:
        """Apply one watch event; whether the set changed."""
        spec = state.spec
        if not isinstance(event, dict):
            raise _ApiError(0, "watch event is not a mapping")
        kind = event.get("type")
        obj = event.get("object")
        if kind == "ERROR":
            status = obj if isinstance(obj, dict) else {}
            code = status.get("code")
            message = status.get("message") or status.get("reason") or "watch error"
            if code == 410 or status.get("reason") in ("Expired", "Gone"):
                raise _Gone(str(message))
            raise _ApiError(code if isinstance(code, int) else 0, str(message))
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


# --- TokenReview --------------------------------------------------------------------------------


def _extra(extra: object, key: str) -> str | None:
    """The first non-empty value of `status.user.extra[key]` (a list of strings)."""
    if not isinstance(extra, dict):
        return None
    values = extra.get(key)
    if isinstance(values, str):
        values = [values]
    if isinstance(values, list):
        for value in values:
            if isinstance(value, str) and value:
                return value
    return None


class TokenReviewAuthenticator:
    """Authenticates bearer tokens with the API server's TokenReview.

    A token is accepted when the review says `authenticated` for one of `audiences` and its
    user is a service account; the `Caller` has that account's identity in `trust_domain`,
    the pod (`namespace/name`) and node the token is bound to. A pod-bound token that names
    no node (API servers before 1.30) is completed with `pod_node`, a lookup of the pod's
    node by `namespace/name`.

    A rejected token raises `AuthenticationError`; an API that cannot answer (connection
    failure, timeout, 5xx, 429, or 401/403 to the control plane's own credentials) raises
    `AuthenticationUnavailable`.
    """

    def __init__(
        self,
        api_client: ApiClient | None = None,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        audiences: Sequence[str] = (AUDIENCE,),
        pod_node: Callable[[str], str | None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not audiences:
            raise LocalError("TokenReviewAuthenticator needs at least one audience")
        self._api_client: Any = api_client
        self._owned = api_client is None
        self._lock = asyncio.Lock()
        self.trust_domain = trust_domain
        self.audiences = tuple(audiences)
        self.pod_node = pod_node
        self._timeout = timeout

    async def close(self) -> None:
        """Close the client this authenticator created (not one passed in)."""
        if self._owned and self._api_client is not None:
            client, self._api_client = self._api_client, None
            await client.close()

    async def _client(self) -> Any:
        if self._api_client is None:
            async with self._lock:
                if self._api_client is None:
                    try:
                        self._api_client = await load_api_client()
                    except LocalError as exc:
                        raise AuthenticationUnavailable(f"cannot review tokens: {exc}") from None
        return self._api_client

    async def _review(self, token: str) -> dict[str, Any]:
        client = await self._client()
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(self.audiences)},
        }
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            response = await _request(client, "POST", TOKEN_REVIEW_PATH, body=body, timeout=timeout)
            try:
                data = await _read_body(response, MAX_REVIEW_BYTES)
                status = response.status
            finally:
                response.release()
        except _ApiError as exc:
            raise AuthenticationUnavailable(f"TokenReview failed: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise AuthenticationUnavailable(
                f"TokenReview failed: the Kubernetes API is unreachable: {reason}"
            ) from None
        except Exception as exc:  # the client library's own failures (credentials, config)
            log.exception("TokenReview request failed")
            raise AuthenticationUnavailable(
                f"TokenReview failed: {type(exc).__name__}: {exc}"
            ) from None
        if not 200 <= status < 300:
            message = _status_message(data, status)
            if status >= 500 or status in (401, 403, 429):
                raise AuthenticationUnavailable(f"TokenReview failed: HTTP {status}: {message}")
            raise AuthenticationError(f"TokenReview refused: HTTP {status}: {message}")
        try:
            review = json.loads(data)
        except ValueError:
            review = None
        if not isinstance(review, dict):
            raise AuthenticationUnavailable("TokenReview failed: the answer is not a JSON object")
        return review

    async def authenticate(self, token: str) -> Caller:
        if not token:
            raise AuthenticationError("token rejected: empty token")
        review = await self._review(token)
        status = review.get("status")
        if not isinstance(status, dict):
            raise AuthenticationUnavailable("TokenReview failed: the answer has no status")
        if status.get("authenticated") is not True:
            error = status.get("error")
            detail = f": {error}" if isinstance(error, str) and error else ""
            raise AuthenticationError(f"token rejected by the Kubernetes API{detail}")
        granted = status.get("audiences")
        granted_list = (
            [a for a in granted if isinstance(a, str)] if isinstance(granted, list) else []
        )
        if not set(granted_list) & set(self.audiences):
            raise AuthenticationError(
                f"token rejected: not valid for audience {', '.join(self.audiences)}"
                + (f" (valid for {', '.join(granted_list)})" if granted_list else "")
            )
        user = status.get("user")
        user = user if isinstance(user, dict) else {}
        username = user.get("username")
        if not isinstance(username, str) or not username:
            raise AuthenticationError("token rejected: the review names no user")
        identity = service_account_identity(username, self.trust_domain)
        extra = user.get("extra")
        node = _extra(extra, EXTRA_NODE_NAME)
        pod_name = _extra(extra, EXTRA_POD_NAME)
        pod = f"{identity.namespace}/{pod_name}" if pod_name else None
        if node is None and pod is not None and self.pod_node is not None:
            node = self.pod_node(pod)
        return Caller(identity, node=node, pod=pod)


__all__ = [
    "DEFAULT_KINDS",
    "AuthenticationUnavailable",
    "KindSpec",
    "KubernetesSource",
    "TokenReviewAuthenticator",
    "load_api_client",
]
