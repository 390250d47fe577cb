"""The Kubernetes API source and TokenReview authentication against a fake API server.

There is no cluster here: `FakeApi` is an aiohttp server on 127.0.0.1 that speaks the subset
of the Kubernetes API the control plane uses (group discovery, paged lists with a
resourceVersion, line-delimited JSON watch streams, TokenReview), with hooks to inject watch
events, break streams, expire resource versions and make the API fail.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import pytest
from aiohttp import web
from kubernetes_asyncio.client import ApiClient, Configuration

from ztagent.control import kube
from ztagent.control.auth import AuthenticationError
from ztagent.control.kube import (
    DEFAULT_KINDS,
    AuthenticationUnavailable,
    KindSpec,
    KubernetesSource,
    TokenReviewAuthenticator,
)
from ztagent.control.sources import SourceBatch
from ztagent.control.translate import translate_resources
from ztagent.errors import LocalError
from ztagent.identity.spiffe import Identity
from ztagent.model.workload import TunnelProtocol

T = TypeVar("T")
TIMEOUT = 10.0

Key = tuple[str, str]  # (group, plural)
DROP = object()
CLOSE = object()


class FakeApi:
    """An in-memory Kubernetes API subset; `served` maps each non-core group to its versions."""

    def __init__(self, served: dict[str, list[str]] | None = None) -> None:
        self.served = (
            served
            if served is not None
            else {
                "discovery.k8s.io": ["v1"],
                "networking.istio.io": ["v1", "v1beta1", "v1alpha3"],
                "security.istio.io": ["v1", "v1beta1"],
            }
        )
        self.rv = 100
        self.store: dict[Key, dict[tuple[str, str], dict[str, Any]]] = {}
        self.history: dict[Key, list[tuple[int, dict[str, Any]]]] = {}
        self.oldest: dict[Key, int] = {}
        self.watchers: dict[Key, set[asyncio.Queue[Any]]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.reviews: list[dict[str, Any]] = []
        self.review_answers: dict[str, tuple[int, Any]] = {}
        self.page_size_seen: list[str] = []
        self.failing: dict[str, int] = {}  # path -> HTTP status its lists answer with
        self.authorization: set[str] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    # --- state changes ---

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, group: str, plural: str, obj: dict[str, Any], *, notify: bool = True) -> None:
        key = (group, plural)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        rv = self._bump()
        meta["resourceVersion"] = str(rv)
        objects = self.store.setdefault(key, {})
        name = (meta.get("namespace", ""), meta.get("name", ""))
        kind = "MODIFIED" if name in objects else "ADDED"
        objects[name] = obj
        self._record(key, rv, {"type": kind, "object": obj}, notify)

    def delete(self, group: str, plural: str, namespace: str, name: str) -> None:
        key = (group, plural)
        obj = self.store[key].pop((namespace, name))
        rv = self._bump()
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(rv)
        self._record(key, rv, {"type": "DELETED", "object": obj}, True)

    def _record(self, key: Key, rv: int, event: dict[str, Any], notify: bool) -> None:
        self.history.setdefault(key, []).append((rv, event))
        if notify:
            self.send(key, event)

    def send(self, key: Key, item: Any) -> None:
        """Push an event (a mapping, raw bytes, DROP or CLOSE) to the current watchers."""
        for queue in self.watchers.get(key, ()):
            queue.put_nowait(item)

    def expire(self, key: Key) -> None:
        """Compact: watches from before now get 410 Gone, current watchers an ERROR event."""
        self.oldest[key] = self.rv
        self.history[key] = []
        status = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410}
        self.send(key, {"type": "ERROR", "object": {**status, "message": "too old"}})

    def watch_count(self, key: Key) -> int:
        return len(self.watchers.get(key, ()))

    def list_count(self, path: str) -> int:
        return sum(1 for m, p, q in self.requests if p == path and "watch" not in q and m == "GET")

    def watch_versions(self, path: str) -> list[str]:
        return [q["resourceVersion"] for m, p, q in self.requests if p == path and "watch" in q]

    # --- HTTP ---

    def _key(self, request: web.Request) -> tuple[Key, str]:
        info = request.match_info
        return (info.get("group", ""), info["plural"]), info["version"]

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        group = request.match_info["group"]
        self.requests.append(("GET", request.path, dict(request.query)))
        versions = self.served.get(group)
        if versions is None:
            return _status(404, "NotFound", f"the server could not find {request.path}")
        return web.json_response(
            {
                "kind": "APIGroup",
                "apiVersion": "v1",
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {
                    "groupVersion": f"{group}/{versions[0]}",
                    "version": versions[0],
                },
            }
        )

    async def collection(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("GET", request.path, dict(request.query)))
        self.authorization.add(request.headers.get("Authorization", ""))
        if request.path in self.failing:
            return _status(self.failing[request.path], "InternalError", "storage is down")
        key, version = self._key(request)
        group = key[0]
        if group and version not in self.served.get(group, []):
            return _status(404, "NotFound", f"the server could not find {request.path}")
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, key, version)
        return self._list(request, key, version)

    def _list(self, request: web.Request, key: Key, version: str) -> web.StreamResponse:
        limit = int(request.query.get("limit", "0") or 0)
        self.page_size_seen.append(request.query.get("limit", ""))
        items = [copy.deepcopy(o) for _, o in sorted(self.store.get(key, {}).items())]
        start = int(request.query.get("continue", "0") or 0)
        end = start + limit if limit else len(items)
        metadata: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if end < len(items):
            metadata["continue"] = str(end)
        return web.json_response(
            {"kind": "List", "apiVersion": version, "metadata": metadata, "items": items[start:end]}
        )

    async def _watch(self, request: web.Request, key: Key, version: str) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion", "0"))
        if since < self.oldest.get(key, 0):
            return _status(410, "Expired", "too old resource version")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for rv, event in self.history.get(key, []):
            if rv > since:
                queue.put_nowait(event)
        self.watchers.setdefault(key, set()).add(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(request)
            while True:
                item = await queue.get()
                if item is CLOSE:
                    break
                if item is DROP:
                    assert request.transport is not None
                    request.transport.abort()
                    raise asyncio.CancelledError
                data = item if isinstance(item, bytes) else json.dumps(item).encode() + b"\n"
                await response.write(data)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self.watchers[key].discard(queue)
        return response

    async def token_review(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("POST", request.path, {}))
        self.reviews.append(body)
        code, answer = self.review_answers.get(
            body["spec"]["token"], (201, {"authenticated": False})
        )
        if code != 201:
            return _status(code, "InternalError", "etcd is sad")
        return web.json_response({**body, "status": answer}, status=201)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/{version}/{plural}", self.collection)
        app.router.add_get("/apis/{group}", self.discovery)
        app.router.add_get("/apis/{group}/{version}/{plural}", self.collection)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.token_review)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        for queues in self.watchers.values():
            for queue in list(queues):
                queue.put_nowait(CLOSE)
        if self._runner is not None:
            await self._runner.cleanup()


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "status": "Failure", "reason": reason, "message": message}
    return web.json_response({**body, "code": code}, status=code)


def client_for(url: str) -> ApiClient:
    return ApiClient(Configuration(host=url))


@asynccontextmanager
async def fake_api(served: dict[str, list[str]] | None = None) -> AsyncIterator[FakeApi]:
    fake = FakeApi(served)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


class Recorder:
    """Collects published batches; `until` waits (bounded) for one that passes a check."""

    def __init__(self) -> None:
        self.batches: list[SourceBatch] = []
        self._event = asyncio.Event()

    def __call__(self, batch: SourceBatch) -> None:
        self.batches.append(batch)
        self._event.set()

    async def until(
        self, check: Callable[[SourceBatch], bool], timeout: float = TIMEOUT
    ) -> SourceBatch:
        async def wait() -> SourceBatch:
            while True:
                if self.batches and check(self.batches[-1]):
                    return self.batches[-1]
                self._event.clear()
                await self._event.wait()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            last = self.batches[-1] if self.batches else None
            raise AssertionError(f"no matching batch in {timeout}s; last: {last}") from None


@asynccontextmanager
async def running(
    fake: FakeApi, kinds: tuple[KindSpec, ...] = DEFAULT_KINDS, **options: Any
) -> AsyncIterator[tuple[KubernetesSource, Recorder]]:
    client = client_for(fake.url)
    options.setdefault("backoff_initial", 0.01)
    options.setdefault("backoff_max", 0.05)
    source = KubernetesSource(api_client=client, kinds=kinds, **options)
    recorder = Recorder()
    task = asyncio.create_task(source.run(recorder))
    try:
        yield source, recorder
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        await client.close()


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 30)

    return asyncio.run(bounded())


async def eventually(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async def wait() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


# --- objects ---

POD_GROUP = ("", "pods")
NS_GROUP = ("", "namespaces")
SVC_GROUP = ("", "services")


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-ns-{name}", "labels": labels or {}}}


def pod(ns: str, name: str, ip: str, node: str = "node-a", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def service(ns: str, name: str, cluster_ip: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-svc-{ns}-{name}"},
        "spec": {"selector": {"app": name}, "clusterIP": cluster_ip, "ports": [{"port": 80}]},
    }


def names(batch: SourceBatch, kind: str | None = None) -> list[str]:
    return [
        f"{r.kind}/{r.namespace}/{r.name}" if r.namespace else f"{r.kind}/{r.name}"
        for r in batch.resources
        if kind is None or r.kind == kind
    ]


def seeded(fake: FakeApi) -> None:
    fake.put(*NS_GROUP, namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    fake.put(*NS_GROUP, namespace("legacy"))
    fake.put(*POD_GROUP, pod("shop", "web-1", "10.244.1.10", app="web"))
    fake.put(*SVC_GROUP, service("shop", "web", "10.96.0.10"))
    fake.put(
        "security.istio.io",
        "authorizationpolicies",
        {
            "metadata": {"name": "allow-web", "namespace": "shop"},
            "spec": {"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]},
        },
    )
    fake.put(
        "networking.istio.io",
        "serviceentries",
        {
            "metadata": {"name": "external", "namespace": "shop"},
            "spec": {"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "tls"}]},
        },
    )


# --- the source ---


def test_initial_batch_has_every_kind_in_api_form_and_skips_missing_crds(caplog):
    caplog.set_level(logging.INFO, logger="ztagent.control.kube")

    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake, page_size=1) as (source, recorder):
                batch = await recorder.until(lambda b: True)
                assert source.synced
                assert names(batch) == [
                    "Namespace/legacy",
                    "Namespace/shop",
                    "Pod/shop/web-1",
                    "Service/shop/web",
                    "ServiceEntry/shop/external",
                    "AuthorizationPolicy/shop/allow-web",
                ]
                assert batch.errors == ()
                by_kind = {r.kind: r for r in batch.resources}
                pod_resource = by_kind["Pod"]
                assert pod_resource.file == "kubernetes:Pod/shop/web-1"
                assert pod_resource.index == 0
                assert pod_resource.api_version == "v1"
                assert pod_resource.body["apiVersion"] == "v1"
                assert pod_resource.body["kind"] == "Pod"
                assert pod_resource.body["status"]["podIPs"] == [{"ip": "10.244.1.10"}]
                legacy = batch.resources[0]
                assert legacy.file == "kubernetes:Namespace/legacy"
                assert (legacy.name, legacy.namespace) == ("legacy", "")
                assert by_kind["ServiceEntry"].api_version == "networking.istio.io/v1"
                assert by_kind["AuthorizationPolicy"].group == "security.istio.io"
                # The Gateway API group is not installed: skipped, not fatal, logged once.
                assert source.missing == (
                    "Gateway.gateway.networking.k8s.io",
                    "HTTPRoute.gateway.networking.k8s.io",
                )
                # Lists are paged (one object a page here) and the pages joined.
                assert "1" in fake.page_size_seen
                assert fake.list_count("/api/v1/namespaces") == 2
                # Only one publish for the initial state.
                await asyncio.sleep(0.1)
                assert len(recorder.batches) == 1
        missing_logs = [r for r in caplog.records if "Gateway.gateway" in r.getMessage()]
        assert len(missing_logs) == 1

    run(main)


def test_published_batch_translates_into_workloads():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (_, recorder):
                batch = await recorder.until(lambda b: True)
        translation = translate_resources(batch.resources)
        workloads = {w.uid: w for w in translation.snapshot.workloads}
        web = workloads["Kubernetes//Pod/shop/web-1"]
        assert web.tunnel_protocol is TunnelProtocol.HBONE
        assert web.node == "node-a"
        assert web.service_account == "web"
        assert "shop/web.shop.svc.cluster.local" in web.services
        services = {s.hostname for s in translation.snapshot.services}
        assert "web.shop.svc.cluster.local" in services
        assert "api.example.com" in services
        assert [p.name for p in translation.snapshot.policies] == ["allow-web"]
        assert translation.snapshot.errors == ()

    run(main)


def test_watch_events_add_update_and_delete():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (_, recorder):
                await recorder.until(lambda b: True)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                fake.put(*POD_GROUP, pod("shop", "web-2", "10.244.1.11"))
                batch = await recorder.until(lambda b: "Pod/shop/web-2" in names(b))
                assert names(batch, "Pod") == ["Pod/shop/web-1", "Pod/shop/web-2"]

                moved = pod("shop", "web-2", "10.244.1.11", node="node-b")
                fake.put(*POD_GROUP, moved)

                def on_b(b: SourceBatch) -> bool:
                    pods = {r.name: r for r in b.resources if r.kind == "Pod"}
                    return bool(pods["web-2"].body["spec"]["nodeName"] == "node-b")

                await recorder.until(on_b)

                fake.delete(*POD_GROUP, "shop", "web-1")
                batch = await recorder.until(lambda b: "Pod/shop/web-1" not in names(b))
                assert names(batch, "Pod") == ["Pod/shop/web-2"]

                # A cluster-scoped kind and an Istio kind change too.
                fake.put(*NS_GROUP, namespace("new"))
                fake.delete("security.istio.io", "authorizationpolicies", "shop", "allow-web")
                batch = await recorder.until(
                    lambda b: (
                        "Namespace/new" in names(b)
                        and "AuthorizationPolicy/shop/allow-web" not in names(b)
                    )
                )
                # Watches resumed from the list's version: no relist happened.
                assert fake.list_count("/api/v1/pods") == 1

    run(main)


def test_a_burst_of_events_is_published_once():
    async def main() -> None:
        async with fake_api() as fake, running(fake) as (_, recorder):
            await recorder.until(lambda b: True)
            await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
            before = len(recorder.batches)
            events = []
            for i in range(20):
                obj = pod("shop", f"p{i}", f"10.244.2.{i + 1}")
                obj["metadata"]["resourceVersion"] = str(1000 + i)
                events.append(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
            fake.send(POD_GROUP, b"".join(events))  # one chunk
            batch = await recorder.until(lambda b: len(names(b, "Pod")) == 20)
            await asyncio.sleep(0.1)
            assert len(recorder.batches) == before + 1
            assert batch is recorder.batches[-1]

    run(main)


def test_bookmark_moves_the_resume_version_without_publishing():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (_, recorder):
                await recorder.until(lambda b: True)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                published = len(recorder.batches)
                bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}}
                fake.send(POD_GROUP, bookmark)
                await asyncio.sleep(0.1)
                assert len(recorder.batches) == published
                fake.send(POD_GROUP, DROP)
                await eventually(lambda: fake.watch_versions("/api/v1/pods")[-1:] == ["150"])
                assert fake.list_count("/api/v1/pods") == 1

    run(main)


def test_reconnects_after_a_dropped_watch_and_gets_what_was_missed():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (_, recorder):
                await recorder.until(lambda b: True)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                # A partial event, then the connection dies mid-stream.
                fake.send(POD_GROUP, b'{"type": "ADDED", "obj')
                fake.send(POD_GROUP, DROP)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 0)
                # A change while nobody watches: replayed from the resume version.
                fake.put(*POD_GROUP, pod("shop", "late", "10.244.1.30"), notify=False)
                batch = await recorder.until(lambda b: "Pod/shop/late" in names(b))
                assert "Pod/shop/web-1" in names(batch)
                versions = fake.watch_versions("/api/v1/pods")
                assert len(versions) >= 2
                assert versions[0] == versions[1]  # resumed, not relisted
                assert fake.list_count("/api/v1/pods") == 1

    run(main)


def test_410_gone_relists_and_the_state_is_right_after():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (_, recorder):
                await recorder.until(lambda b: True)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                # Changes the watch never reports, then the history is compacted.
                fake.put(*POD_GROUP, pod("shop", "hidden", "10.244.1.40"), notify=False)
                fake.store[POD_GROUP].pop(("shop", "web-1"))
                fake.expire(POD_GROUP)
                batch = await recorder.until(lambda b: "Pod/shop/hidden" in names(b))
                assert names(batch, "Pod") == ["Pod/shop/hidden"]
                assert fake.list_count("/api/v1/pods") == 2
                # Watching resumes from the new list.
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                fake.put(*POD_GROUP, pod("shop", "after", "10.244.1.41"))
                batch = await recorder.until(lambda b: "Pod/shop/after" in names(b))
                assert names(batch, "Pod") == ["Pod/shop/after", "Pod/shop/hidden"]

    run(main)


def test_410_on_the_watch_request_relists():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (_, recorder):
                await recorder.until(lambda b: True)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                fake.send(POD_GROUP, DROP)
                fake.oldest[POD_GROUP] = fake.rv + 5  # every resume version is now too old
                fake.rv += 5
                await eventually(lambda: fake.list_count("/api/v1/pods") >= 2)
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                fake.put(*POD_GROUP, pod("shop", "again", "10.244.1.50"))
                await recorder.until(lambda b: "Pod/shop/again" in names(b))

    run(main)


def test_malformed_objects_become_errors_and_the_rest_is_published():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            fake.put(*SVC_GROUP, {"metadata": {"namespace": "shop", "uid": "u-noname"}})
            async with running(fake) as (_, recorder):
                batch = await recorder.until(lambda b: True)
                assert "Service/shop/web" in names(batch)
                assert [str(e) for e in batch.errors] == [
                    "Service: metadata.name: is required (a non-empty string) "
                    "(kubernetes:Service#0)"
                ]
                await eventually(lambda: fake.watch_count(POD_GROUP) == 1)
                # Through the watch: a pod without a namespace, then a good one in the same burst.
                bad = pod("shop", "nons", "10.244.1.60")
                del bad["metadata"]["namespace"]
                fake.put(*POD_GROUP, bad)
                fake.put(*POD_GROUP, pod("shop", "good", "10.244.1.61"))
                batch = await recorder.until(lambda b: "Pod/shop/good" in names(b))
                errors = [str(e) for e in batch.errors]
                assert (
                    "Pod nons: metadata.namespace: is required (a non-empty string) "
                    "(kubernetes:Pod/nons#0)"
                ) in errors
                assert len(errors) == 2
                # An event that is not an object at all: relisted, nothing lost.
                fake.send(POD_GROUP, b"not json\n")
                await eventually(lambda: fake.list_count("/api/v1/pods") == 2)
                batch = await recorder.until(lambda b: "Pod/shop/good" in names(b))
                assert "Pod/shop/web-1" in names(batch)

    run(main)


def test_version_fallback_and_a_crd_installed_later():
    served = {"networking.istio.io": ["v1alpha3"], "security.istio.io": ["v1beta1"]}
    kinds = tuple(s for s in DEFAULT_KINDS if s.group != "discovery.k8s.io")

    async def main() -> None:
        async with fake_api(served) as fake:
            seeded(fake)
            async with running(fake, kinds, rediscover_interval=0.1) as (source, recorder):
                batch = await recorder.until(lambda b: True)
                versions = {r.kind: r.api_version for r in batch.resources}
                assert versions["ServiceEntry"] == "networking.istio.io/v1alpha3"
                assert versions["AuthorizationPolicy"] == "security.istio.io/v1beta1"
                assert "Gateway.gateway.networking.k8s.io" in source.missing
                # The Gateway API CRDs get installed.
                fake.served["gateway.networking.k8s.io"] = ["v1"]
                fake.put(
                    "gateway.networking.k8s.io",
                    "gateways",
                    {
                        "metadata": {"name": "waypoint", "namespace": "shop"},
                        "spec": {"gatewayClassName": "istio-waypoint", "listeners": []},
                    },
                )
                batch = await recorder.until(lambda b: "Gateway/shop/waypoint" in names(b))
                gateway = next(r for r in batch.resources if r.kind == "Gateway")
                assert gateway.api_version == "gateway.networking.k8s.io/v1"
                await eventually(lambda: source.missing == ())
                # And removed again: its objects leave the set.
                del fake.served["gateway.networking.k8s.io"]
                fake.send(("gateway.networking.k8s.io", "gateways"), CLOSE)
                batch = await recorder.until(lambda b: "Gateway/shop/waypoint" not in names(b))
                assert "Pod/shop/web-1" in names(batch)

    run(main)


def test_list_errors_back_off_then_recover():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            fake.failing["/api/v1/pods"] = 500
            slow = {"backoff_initial": 0.01, "backoff_max": 0.04}
            async with running(fake, DEFAULT_KINDS, **slow) as (source, recorder):
                await asyncio.sleep(0.5)
                # 0.01, 0.02, 0.04, 0.04, ...: about a dozen tries in half a second.
                tries = fake.list_count("/api/v1/pods")
                assert 4 <= tries <= 20, tries
                assert not source.synced
                assert recorder.batches == []
                del fake.failing["/api/v1/pods"]
                batch = await recorder.until(lambda b: True)
                assert "Pod/shop/web-1" in names(batch)
                assert source.synced

    run(main)


def test_default_backoff_is_100ms_doubling_to_15s():
    assert (kube.DEFAULT_BACKOFF_INITIAL, kube.DEFAULT_BACKOFF_MAX) == (0.1, 15.0)
    assert kube.DEFAULT_REDISCOVER_INTERVAL == 60.0


def test_kubeconfig_is_used_when_no_client_is_given(tmp_path, monkeypatch):
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            kubeconfig = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": fake.url}}],
                "users": [{"name": "u", "user": {"token": "secret-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
            path = tmp_path / "config"
            path.write_text(json.dumps(kubeconfig))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            monkeypatch.setenv("KUBECONFIG", str(path))
            source = KubernetesSource(kinds=DEFAULT_KINDS[:2])
            recorder = Recorder()
            task = asyncio.create_task(source.run(recorder))
            try:
                batch = await recorder.until(lambda b: True)
            finally:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, TIMEOUT)
            assert names(batch) == ["Namespace/legacy", "Namespace/shop", "Pod/shop/web-1"]
            assert fake.authorization == {"Bearer secret-token"}

            auth = TokenReviewAuthenticator()
            try:
                fake.review_answers["t"] = (201, reviewed({"username": WEB_USER}))
                caller = await auth.authenticate("t")
            finally:
                await auth.close()
            assert caller.account == "shop/web"

    run(main)


def test_no_configuration_is_a_local_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(LocalError, match="no Kubernetes API configuration"):
        run(kube.load_api_client)

    async def review() -> None:
        await TokenReviewAuthenticator().authenticate("t")

    with pytest.raises(AuthenticationUnavailable, match="cannot review tokens"):
        run(review)


def test_api_down_at_start_retries_and_is_not_synced():
    async def main() -> None:
        async with fake_api() as fake:
            url = fake.url
        # Nothing listens on the port now.
        client = client_for(url)
        source = KubernetesSource(api_client=client, backoff_initial=0.01, backoff_max=0.02)
        recorder = Recorder()
        task = asyncio.create_task(source.run(recorder))
        try:
            await asyncio.sleep(0.3)
            assert not task.done()
            assert not source.synced
            assert recorder.batches == []
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, TIMEOUT)
            await client.close()

    run(main)


def test_pod_node_looks_up_the_current_pods():
    async def main() -> None:
        async with fake_api() as fake:
            seeded(fake)
            async with running(fake) as (source, recorder):
                await recorder.until(lambda b: True)
                assert source.pod_node("shop/web-1") == "node-a"
                assert source.pod_node("shop/nope") is None

    run(main)


def test_kind_specs_cover_what_the_control_plane_reads():
    labels = {s.label for s in DEFAULT_KINDS}
    assert {
        "Namespace",
        "Pod",
        "Service",
        "EndpointSlice.discovery.k8s.io",
        "ServiceEntry.networking.istio.io",
        "VirtualService.networking.istio.io",
        "DestinationRule.networking.istio.io",
        "AuthorizationPolicy.security.istio.io",
        "PeerAuthentication.security.istio.io",
        "RequestAuthentication.security.istio.io",
        "Gateway.gateway.networking.k8s.io",
        "HTTPRoute.gateway.networking.k8s.io",
    } == labels
    for spec in DEFAULT_KINDS:
        if spec.group in ("networking.istio.io", "security.istio.io", "gateway.networking.k8s.io"):
            assert spec.versions[0] == "v1"


# --- TokenReview ---

WEB_USER = "system:serviceaccount:shop:web"


def reviewed(user: dict[str, Any], audiences: list[str] | None = None) -> dict[str, Any]:
    return {"authenticated": True, "user": user, "audiences": audiences or ["istio-ca"]}


def test_token_review_success_gives_identity_pod_and_node():
    async def main() -> None:
        async with fake_api() as fake:
            fake.review_answers["good"] = (
                201,
                reviewed(
                    {
                        "username": WEB_USER,
                        "uid": "u1",
                        "groups": ["system:serviceaccounts"],
                        "extra": {
                            "authentication.kubernetes.io/pod-name": ["web-1"],
                            "authentication.kubernetes.io/pod-uid": ["p1"],
                            "authentication.kubernetes.io/node-name": ["node-a"],
                        },
                    }
                ),
            )
            async with client_for(fake.url) as client:
                auth = TokenReviewAuthenticator(client, trust_domain="example.org")
                caller = await auth.authenticate("good")
        assert caller.identity == Identity("example.org", "shop", "web")
        assert caller.pod == "shop/web-1"
        assert caller.node == "node-a"
        [review] = fake.reviews
        assert review["apiVersion"] == "authentication.k8s.io/v1"
        assert review["kind"] == "TokenReview"
        assert review["spec"] == {"token": "good", "audiences": ["istio-ca"]}

    run(main)


def test_token_review_falls_back_to_the_pod_lookup_for_the_node():
    async def main() -> None:
        async with fake_api() as fake:
            extra = {"authentication.kubernetes.io/pod-name": ["web-1"]}
            fake.review_answers["old"] = (201, reviewed({"username": WEB_USER, "extra": extra}))
            fake.review_answers["unbound"] = (201, reviewed({"username": WEB_USER}))
            lookups: list[str] = []

            def pod_node(key: str) -> str | None:
                lookups.append(key)
                return "node-z"

            async with client_for(fake.url) as client:
                auth = TokenReviewAuthenticator(
                    client, pod_node=pod_node, audiences=["x", "istio-ca"]
                )
                caller = await auth.authenticate("old")
                unbound = await auth.authenticate("unbound")
        assert (caller.pod, caller.node) == ("shop/web-1", "node-z")
        assert lookups == ["shop/web-1"]
        assert (unbound.pod, unbound.node) == (None, None)
        assert fake.reviews[0]["spec"]["audiences"] == ["x", "istio-ca"]

    run(main)


def test_token_review_rejections():
    async def main() -> None:
        async with fake_api() as fake:
            fake.review_answers["bad"] = (
                201,
                {"authenticated": False, "error": "invalid bearer token"},
            )
            fake.review_answers["other-aud"] = (201, reviewed({"username": WEB_USER}, ["kube-api"]))
            fake.review_answers["user"] = (201, reviewed({"username": "alice"}))
            fake.review_answers["boom"] = (500, None)
            fake.review_answers["slow"] = (429, None)
            async with client_for(fake.url) as client:
                auth = TokenReviewAuthenticator(client)
                outcomes: dict[str, BaseException] = {}
                for token in ("bad", "other-aud", "user", "boom", "slow", ""):
                    with pytest.raises(AuthenticationError) as info:
                        await auth.authenticate(token)
                    outcomes[token] = info.value
        assert not isinstance(outcomes["bad"], AuthenticationUnavailable)
        assert "invalid bearer token" in str(outcomes["bad"])
        assert not isinstance(outcomes["other-aud"], AuthenticationUnavailable)
        assert "audience istio-ca" in str(outcomes["other-aud"])
        assert "kube-api" in str(outcomes["other-aud"])
        assert "not a service account" in str(outcomes["user"])
        assert isinstance(outcomes["boom"], AuthenticationUnavailable)
        assert "HTTP 500" in str(outcomes["boom"])
        assert "etcd is sad" in str(outcomes["boom"])
        assert isinstance(outcomes["slow"], AuthenticationUnavailable)
        assert not isinstance(outcomes[""], AuthenticationUnavailable)
        assert len(fake.reviews) == 5  # the empty token never reached the API
        for error in outcomes.values():
            assert "other-aud" not in str(error)  # tokens are not echoed

    run(main)


def test_token_review_api_down_is_unavailable():
    async def main() -> None:
        async with fake_api() as fake:
            url = fake.url
        async with client_for(url) as client:
            auth = TokenReviewAuthenticator(client, timeout=2.0)
            with pytest.raises(AuthenticationUnavailable) as info:
                await auth.authenticate("good")
        assert "unreachable" in str(info.value)

    run(main)
