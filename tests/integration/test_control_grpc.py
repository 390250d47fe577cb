"""`ztagent control` over real gRPC with TLS: delta ADS with a raw grpc client (initial
snapshot, add/update/remove, NACK, reconnect with initial versions, two views), the CA's
authorization rules, the node agent's own xDS client against it, and the waypoints' L7 objects
(served only to clients that subscribe to them, last good version kept, file JWKS inlined)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from ztagent.control.auth import TOKEN_SIGNING_KEY, TokenSigner
from ztagent.control.server import ControlServer, ControlSettings
from ztagent.identity.keys import create_csr, generate_key
from ztagent.identity.spiffe import Identity
from ztagent.xds import convert
from ztagent.xds.adsclient import XdsClient
from ztagent.xds.connection import ControlPlaneConnection, node_identity
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as ads_grpc
from ztagent.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ztagent.xds.gen.ztagent.waypoint.v1 import l7_pb2 as l7_pb
from ztagent.xds.stream import ADDRESS_TYPE, AUTHORIZATION_TYPE, L7_TYPE

TIMEOUT = 10.0

BASE = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, serviceAccountName: db}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
"""

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
    to: [{operation: {ports: ["5432"]}}]
"""

WEB = "Kubernetes//Pod/shop/web"
DB = "Kubernetes//Pod/shop/db"


class Control:
    def __init__(self, server: ControlServer, root: Path) -> None:
        self.server = server
        self.root = root
        self.signer = TokenSigner(root / "ca" / TOKEN_SIGNING_KEY)
        self.roots = (root / "ca" / "root-cert.pem").read_bytes()
        self.target = f"127.0.0.1:{server.port}"

    def write(self, name: str, text: str) -> None:
        path = self.root / "config" / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(textwrap.dedent(text))
        tmp.rename(path)

    def remove(self, name: str) -> None:
        (self.root / "config" / name).unlink()

    def token(self, namespace: str = "ztagent-system", account: str = "ztagent", **kw: Any) -> str:
        return self.signer.issue(namespace, account, **kw)

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(self.roots))

    def metadata(
        self, token: str | None = None, cluster: str = "Kubernetes", *, with_token: bool = True
    ) -> list[Any]:
        md = [("clusterid", cluster)]
        if with_token:
            md.append(("authorization", f"Bearer {token or self.token(node='node-a')}"))
        return md


@asynccontextmanager
async def running(tmp_path: Path, files: dict[str, str]) -> AsyncIterator[Control]:
    (tmp_path / "config").mkdir()
    for name, text in files.items():
        (tmp_path / "config" / name).write_text(text)
    settings = ControlSettings(
        config_dir=tmp_path / "config",
        kubernetes=False,
        listen="127.0.0.1:0",
        admin="127.0.0.1:0",
        ca_dir=tmp_path / "ca",
        trust_domain="cluster.local",
        cluster_id="Kubernetes",
        root_namespace="istio-system",
        domain_suffix="cluster.local",
        trusted_node_agents=frozenset({"ztagent-system/ztagent"}),
        serving_names=("127.0.0.1",),
        poll_interval=0.05,
    )
    server = ControlServer(settings)
    await server.start()
    try:
        for _ in range(200):
            if server.plane.synced:
                break
            await asyncio.sleep(0.02)
        yield Control(server, tmp_path)
    finally:
        await server.stop()


class Stream:
    """A raw delta ADS stream, as any xDS client would open it; one reader task queues what
    arrives, so waiting for "nothing" never leaves a read behind."""

    def __init__(self, control: Control, metadata: list[Any] | None = None) -> None:
        self.channel = control.channel()
        stub = ads_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources(metadata=metadata or control.metadata())
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                await self.queue.put(message)
                if message is grpc.aio.EOF:
                    return
        except grpc.aio.AioRpcError as exc:
            await self.queue.put(exc)

    async def send(self, type_url: str, **fields: Any) -> None:
        await self.call.write(ads.DeltaDiscoveryRequest(type_url=type_url, **fields))

    async def recv(self, timeout: float = TIMEOUT) -> ads.DeltaDiscoveryResponse:
        message = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(message, Exception):
            raise message
        assert isinstance(message, ads.DeltaDiscoveryResponse), message
        return message

    async def recv_types(self) -> dict[str, ads.DeltaDiscoveryResponse]:
        """One (ACKed) response of each type, in whatever order they come."""
        got: dict[str, ads.DeltaDiscoveryResponse] = {}
        while len(got) < 2:
            response = await self.recv()
            assert response.type_url not in got
            got[response.type_url] = response
            await self.ack(response)
        return got

    async def nothing(self, wait: float = 0.6) -> None:
        await asyncio.sleep(wait)
        assert self.queue.empty(), f"unexpected push: {self.queue.get_nowait()}"

    async def ack(self, response: ads.DeltaDiscoveryResponse) -> None:
        await self.send(response.type_url, response_nonce=response.nonce)

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


def names(response: ads.DeltaDiscoveryResponse) -> set[str]:
    return {r.name for r in response.resources}


def run(tmp_path: Path, scenario: Callable[[Control], Awaitable[None]], **files: str) -> None:
    async def main() -> None:
        async with running(tmp_path, files or {"base.yaml": BASE, "policy.yaml": POLICY}) as c:
            await scenario(c)

    asyncio.run(asyncio.wait_for(main(), 60))


# --- delta ADS ---------------------------------------------------------------------------


def test_initial_snapshot_then_add_update_remove(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c)
        await s.send(ADDRESS_TYPE)  # empty first subscription: wildcard
        first = await s.recv()
        assert first.type_url == ADDRESS_TYPE
        assert names(first) == {WEB, DB, "shop/web.shop.svc.cluster.local"}
        assert all(r.version for r in first.resources)
        await s.ack(first)
        await s.send(AUTHORIZATION_TYPE, resource_names_subscribe=["*"])
        policies = await s.recv()
        assert names(policies) == {"shop/db-allow-web"}
        await s.ack(policies)

        # Update: a new label on db changes only db.
        c.write("base.yaml", BASE.replace("labels: {app: db}", "labels: {app: db, version: 'v2'}"))
        update = await s.recv()
        assert names(update) == {DB} and not update.removed_resources
        old = {r.name: r.version for r in first.resources}
        assert update.resources[0].version != old[DB]
        await s.ack(update)

        # Add, then remove, a selector policy: the policy and the workload it selects change.
        c.write("deny.yaml", POLICY.replace("db-allow-web", "db-deny").replace("ALLOW", "DENY"))
        added = await s.recv_types()
        assert names(added[AUTHORIZATION_TYPE]) == {"shop/db-deny"}
        assert names(added[ADDRESS_TYPE]) == {DB}
        c.remove("deny.yaml")
        removed = await s.recv_types()
        assert list(removed[AUTHORIZATION_TYPE].removed_resources) == ["shop/db-deny"]
        assert not removed[AUTHORIZATION_TYPE].resources
        assert names(removed[ADDRESS_TYPE]) == {DB}
        await s.nothing()
        await s.close()

    run(tmp_path, scenario)


def test_nack_is_logged_and_not_resent_until_changed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ztagent.control.server")

    async def scenario(c: Control) -> None:
        s = Stream(c)
        await s.send(AUTHORIZATION_TYPE)
        first = await s.recv()
        await s.send(
            AUTHORIZATION_TYPE,
            response_nonce=first.nonce,
            error_detail={"code": 3, "message": "cannot use shop/db-allow-web"},
        )
        await asyncio.sleep(0.3)
        nacks = [r.getMessage() for r in caplog.records if "NACK" in r.getMessage()]
        assert len(nacks) == 1
        assert "cannot use shop/db-allow-web" in nacks[0]
        assert "cluster.local/ns/ztagent-system/sa/ztagent" in nacks[0]  # the client
        assert "shop/db-allow-web" in nacks[0].split("resources:")[1]
        # An unrelated change: the NACKed policy is not sent again.
        c.write("other.yaml", POLICY.replace("db-allow-web", "other"))
        push = await s.recv()
        assert names(push) == {"shop/other"}
        await s.ack(push)
        await s.nothing()
        # A change to the NACKed policy itself is sent.
        c.write("policy.yaml", POLICY.replace('"5432"', '"5433"'))
        push = await s.recv()
        assert names(push) == {"shop/db-allow-web"}
        await s.close()

    run(tmp_path, scenario)


def test_reconnect_with_initial_versions_gets_only_the_difference(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c)
        await s.send(ADDRESS_TYPE)
        first = await s.recv()
        versions = {r.name: r.version for r in first.resources}
        await s.close()

        # Same versions: the answer holds nothing (but comes, so the client knows it is synced).
        s = Stream(c)
        await s.send(ADDRESS_TYPE, initial_resource_versions=versions)
        again = await s.recv()
        assert not again.resources and not again.removed_resources
        await s.close()

        # While away: db changed, web was deleted; the client also claims one it never had.
        c.write(
            "base.yaml",
            BASE.replace("labels: {app: db}", "labels: {app: db, version: 'v3'}").replace(
                "name: web, namespace: shop, labels", "name: web2, namespace: shop, labels"
            ),
        )
        for _ in range(100):
            if "Kubernetes//Pod/shop/web2" in c.server.plane.resources[ADDRESS_TYPE]:
                break
            await asyncio.sleep(0.05)
        s = Stream(c)
        stale = dict(versions, **{"gone/thing": "123"})
        await s.send(ADDRESS_TYPE, initial_resource_versions=stale)
        diff = await s.recv()
        assert names(diff) == {DB, "Kubernetes//Pod/shop/web2"}
        assert set(diff.removed_resources) == {WEB, "gone/thing"}
        await s.close()

    run(tmp_path, scenario)


def test_two_clients_with_different_views(tmp_path):
    async def scenario(c: Control) -> None:
        everything = Stream(c)
        await everything.send(ADDRESS_TYPE, resource_names_subscribe=["*"])
        await everything.ack(await everything.recv())
        only_web = Stream(c, c.metadata(c.token(node="node-b")))
        await only_web.send(ADDRESS_TYPE, resource_names_subscribe=[WEB])
        first = await only_web.recv()
        assert names(first) == {WEB}
        await only_web.ack(first)

        # A change to db: only the wildcard client's view changed.
        c.write("base.yaml", BASE.replace("labels: {app: db}", "labels: {app: db, version: 'v4'}"))
        push = await everything.recv()
        assert names(push) == {DB}
        await only_web.nothing()
        # A change to web reaches both.
        c.write(
            "base.yaml", BASE.replace("labels: {app: web}", "labels: {app: web, version: 'v5'}")
        )
        assert WEB in names(await everything.recv())
        assert names(await only_web.recv()) == {WEB}
        # Unsubscribing removes it from the narrow client's view.
        await only_web.send(ADDRESS_TYPE, resource_names_unsubscribe=[WEB])
        await only_web.nothing()
        await everything.close()
        await only_web.close()

    run(tmp_path, scenario)


def test_xds_requires_a_valid_token(tmp_path):
    async def scenario(c: Control) -> None:
        for metadata, code in (
            (c.metadata(with_token=False), grpc.StatusCode.UNAUTHENTICATED),
            (c.metadata("not-a-token"), grpc.StatusCode.UNAUTHENTICATED),
            (c.metadata(cluster="other"), grpc.StatusCode.UNAUTHENTICATED),
        ):
            s = Stream(c, metadata)
            await s.send(ADDRESS_TYPE)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.recv()
            assert info.value.code() == code
            await s.close()

    run(tmp_path, scenario)


def test_malformed_file_is_reported_and_the_rest_keeps_serving(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c)
        await s.send(AUTHORIZATION_TYPE)
        before = await s.recv()
        await s.ack(before)
        # A broken edit of the policy file, and a bad new object beside it.
        c.write("policy.yaml", POLICY.replace("action: ALLOW", "action: [ALLOW"))
        c.write(
            "bad.yaml",
            POLICY.replace("db-allow-web", "bad").replace("action: ALLOW", "action: PERMIT"),
        )
        for _ in range(100):
            if len(c.server.plane.errors) >= 2:
                break
            await asyncio.sleep(0.05)
        errors = [str(e) for e in c.server.plane.errors]
        assert any("policy.yaml" in e for e in errors), errors
        assert any("AuthorizationPolicy shop/bad" in e and "spec.action" in e for e in errors)
        # The last good db-allow-web is still served; nothing was withdrawn.
        assert set(c.server.plane.resources[AUTHORIZATION_TYPE]) == {"shop/db-allow-web"}
        await s.nothing()
        await s.close()

    run(tmp_path, scenario)


# --- CA ----------------------------------------------------------------------------------


async def create(
    c: Control,
    identity: str,
    *,
    token: str | None,
    impersonate: str | None = None,
    csr_for: str | None = None,
    cluster: str = "Kubernetes",
) -> ca_pb2.IstioCertificateResponse:
    key = generate_key()
    metadata = Struct()
    if impersonate:
        metadata.update({"ImpersonatedIdentity": impersonate})
    request = ca_pb2.IstioCertificateRequest(
        csr=create_csr(Identity.parse(csr_for or identity), key).decode(),
        validity_duration=3600,
        metadata=metadata,
    )
    md: list[tuple[str, str]] = [("clusterid", cluster)]
    if token:
        md.append(("authorization", f"Bearer {token}"))
    async with c.channel() as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        return await stub.CreateCertificate(request, metadata=md, timeout=TIMEOUT)


def test_ca_rules(tmp_path):
    web = "spiffe://cluster.local/ns/shop/sa/web"
    db = "spiffe://cluster.local/ns/shop/sa/db"

    async def refused(coro: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await coro
        return info.value.code(), info.value.details() or ""

    async def scenario(c: Control) -> None:
        # Own identity: a workload's own token.
        own = await create(c, web, token=c.token("shop", "web"))
        assert len(own.cert_chain) >= 2 and "BEGIN CERTIFICATE" in own.cert_chain[0]
        # A trusted node agent on node-a for a workload on node-a.
        agent_a = c.token(node="node-a")
        ok = await create(c, web, token=agent_a, impersonate=web)
        assert ok.cert_chain[-1].strip() == c.roots.decode().strip()
        # ... but not for db, which runs on node-b.
        code, why = await refused(create(c, db, token=agent_a, impersonate=db))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "node-a" in why
        # An untrusted caller may not impersonate even a workload on its node.
        untrusted = c.token("shop", "web", node="node-b")
        code, why = await refused(create(c, db, token=untrusted, impersonate=db))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not a trusted node agent" in why
        # No token; a token we did not sign; another cluster.
        code, _ = await refused(create(c, web, token=None))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        forged = TokenSigner(tmp_path / "other-key.pem").issue("shop", "web")
        code, _ = await refused(create(c, web, token=forged))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = await refused(create(c, web, token=c.token("shop", "web"), cluster="east"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # A CSR whose SAN differs from the caller's identity.
        code, why = await refused(create(c, web, token=c.token("shop", "web"), csr_for=db))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "CSR asks for" in why
        # ... and from the impersonated identity.
        code, _ = await refused(create(c, web, token=agent_a, impersonate=web, csr_for=db))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        metrics = c.server.metrics.render().decode()
        assert "citadel_server_success_cert_issue_count_total 2.0" in metrics

    run(tmp_path, scenario)


# --- the node agent's client -------------------------------------------------------------


def test_node_agent_client_syncs_and_keeps_config_while_disconnected(tmp_path):
    async def scenario(c: Control) -> None:
        (tmp_path / "token").write_text(c.token(node="node-a"))
        updates: list[Any] = []
        client = XdsClient(
            ControlPlaneConnection(
                c.target, tmp_path / "ca" / "root-cert.pem", tmp_path / "token", "Kubernetes"
            ),
            node_identity(
                instance_ip="10.0.0.1",
                pod_name="ztagent-a",
                pod_namespace="ztagent-system",
                node_name="node-a",
                cluster_id="Kubernetes",
            ),
            updates.append,
        )
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.synced.wait(), TIMEOUT)
            snapshot = updates[-1]
            assert {w.uid for w in snapshot.workloads} == {WEB, DB}
            assert [p.key for p in snapshot.policies] == ["shop/db-allow-web"]
            assert client.core.nacks == 0 and client.core.acks >= 2
            # The control plane goes away: the client keeps its config and retries.
            await c.server.stop()
            await asyncio.sleep(0.5)
            assert not client.connected and client.last_error
            assert {w.uid for w in client.core.snapshot().workloads} == {WEB, DB}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(tmp_path, scenario)


# --- the waypoints' L7 objects -------------------------------------------------------------

L7 = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web, subset: v1}
      weight: 90
    - destination: {host: web, subset: v2}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""

L7_NAMES = {
    "Gateway/shop/waypoint",
    "VirtualService/shop/web",
    "DestinationRule/shop/web",
    "AuthorizationPolicy/shop/web-get",
    "Service/shop/web",
}


def l7_objects(response: ads.DeltaDiscoveryResponse) -> dict[str, dict[str, Any]]:
    """The decoded objects of a response, by resource name."""
    objects = {}
    for resource in response.resources:
        assert resource.resource.type_url == L7_TYPE
        message = l7_pb.L7Resource.FromString(resource.resource.value)
        objects[resource.name] = convert.l7_from_proto(message)
    return objects


async def config_dump(c: Control) -> dict[str, Any]:
    """GET /debug/config_dump on the monitoring port (from a thread: the server runs here)."""
    admin = c.server._admin
    assert admin is not None
    host, port = admin.address

    def get() -> dict[str, Any]:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/debug/config_dump")
            response = conn.getresponse()
            assert response.status == 200
            data: dict[str, Any] = json.loads(response.read())
            return data
        finally:
            conn.close()

    return await asyncio.to_thread(get)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


def test_waypoint_gets_l7_objects_edits_and_keeps_the_last_good_version(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c)
        await s.send(L7_TYPE, resource_names_subscribe=["*"])
        first = await s.recv()
        objects = l7_objects(first)
        assert set(objects) == L7_NAMES
        web = objects["VirtualService/shop/web"]
        assert web["apiVersion"] == "networking.istio.io/v1"
        assert web["spec"]["http"][0]["route"][0]["weight"] == 90
        assert objects["Service/shop/web"]["spec"]["ports"] == [{"port": 80, "targetPort": 8080}]
        await s.ack(first)

        # An edit of the VirtualService: only it is pushed.
        c.write("l7.yaml", L7.replace("weight: 90", "weight: 80"))
        push = await s.recv()
        assert names(push) == {"VirtualService/shop/web"}
        assert l7_objects(push)["VirtualService/shop/web"]["spec"]["http"][0]["route"][0] == {
            "destination": {"host": "web", "subset": "v1"},
            "weight": 80,
        }
        good = push.resources[0].version
        await s.ack(push)

        # An invalid edit: reported with its field, the last good version stays served.
        c.write("l7.yaml", L7.replace("weight: 90", "weight: -1"))
        await until(lambda: any("VirtualService" in str(e) for e in c.server.plane.errors))
        dump = await config_dump(c)
        (error,) = [e for e in dump["errors"] if e.startswith("VirtualService")]
        assert "shop/web" in error and "spec.http[0].route[0].weight" in error
        assert set(dump["waypointResources"]) == L7_NAMES
        served = c.server.plane.resources[L7_TYPE]["VirtualService/shop/web"]
        assert served.version == good
        await s.nothing()

        # Fixed, and the DestinationRule removed: both reach the waypoint.
        c.write(
            "l7.yaml", L7.replace("weight: 90", "weight: 70").replace("kind: Destin", "kind: X")
        )
        push = await s.recv()
        assert names(push) == {"VirtualService/shop/web"}
        assert list(push.removed_resources) == ["DestinationRule/shop/web"]
        await s.ack(push)
        assert not [e for e in (await config_dump(c))["errors"] if e.startswith("VirtualService")]
        metrics = c.server.metrics.render().decode()
        assert 'pilot_xds_pushes_total{type="l7"} 3.0' in metrics
        await s.close()

    run(tmp_path, scenario, **{"base.yaml": BASE, "policy.yaml": POLICY, "l7.yaml": L7})


def test_node_agents_get_no_l7_objects_and_waypoint_clients_do(tmp_path):
    async def scenario(c: Control) -> None:
        (tmp_path / "token").write_text(c.token(node="node-a"))
        connection = ControlPlaneConnection(
            c.target, tmp_path / "ca" / "root-cert.pem", tmp_path / "token", "Kubernetes"
        )

        def node(name: str) -> Any:
            return node_identity(
                instance_ip="10.0.0.1",
                pod_name=name,
                pod_namespace="ztagent-system",
                node_name="node-a",
                cluster_id="Kubernetes",
            )

        agent_updates: list[Any] = []
        agent = XdsClient(connection, node("ztagent-a"), agent_updates.append)
        waypoint_updates: list[Any] = []
        l7_updates: list[list[dict[str, Any]]] = []
        waypoint = XdsClient(
            connection,
            node("waypoint"),
            waypoint_updates.append,
            types=(ADDRESS_TYPE, L7_TYPE),
            on_l7=l7_updates.append,
        )
        raw = Stream(c)
        await raw.send(ADDRESS_TYPE)
        await raw.ack(await raw.recv())
        await raw.send(AUTHORIZATION_TYPE)
        await raw.ack(await raw.recv())
        tasks = [asyncio.create_task(agent.run()), asyncio.create_task(waypoint.run())]
        try:
            await asyncio.wait_for(agent.synced.wait(), TIMEOUT)
            await asyncio.wait_for(waypoint.synced.wait(), TIMEOUT)
            assert {w.uid for w in agent_updates[-1].workloads} == {WEB, DB}
            assert agent.core.l7_objects() == [] and agent.core.nacks == 0
            assert {w.uid for w in waypoint_updates[-1].workloads} == {WEB, DB}
            assert waypoint_updates[-1].policies == ()  # Authorization was not subscribed
            objects = l7_updates[-1]
            assert {
                convert.l7_name(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
                for o in objects
            } == L7_NAMES
            assert waypoint.core.nacks == 0

            # An L7 change reaches the waypoint client with every object, and no node agent.
            count = len(agent_updates)
            c.write("l7.yaml", L7.replace("methods: [GET]", "methods: [GET, HEAD]"))
            await until(lambda: len(l7_updates) > 1)
            policy = next(o for o in l7_updates[-1] if o["kind"] == "AuthorizationPolicy")
            assert policy["spec"]["rules"][0]["to"][0]["operation"]["methods"] == ["GET", "HEAD"]
            assert len(l7_updates[-1]) == len(L7_NAMES)
            await raw.nothing()
            assert len(agent_updates) == count
            dump = await config_dump(c)
            l7_held = sorted(client["resources"].get("l7", 0) for client in dump["clients"])
            assert l7_held == [0, 0, len(L7_NAMES)]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await raw.close()

    run(tmp_path, scenario, **{"base.yaml": BASE, "policy.yaml": POLICY, "l7.yaml": L7})


JWKS = {
    "keys": [
        {
            "kty": "EC",
            "crv": "P-256",
            "kid": "k1",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
            "d": "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI",
        }
    ]
}

REQUEST_AUTHENTICATION = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: web-jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  jwtRules: [{issuer: https://issuer.example, jwksUri: "file://JWKS"}]
"""


def test_request_authentication_file_jwks_is_inlined(tmp_path):
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(JWKS))
    text = REQUEST_AUTHENTICATION.replace("JWKS", str(keys))

    async def scenario(c: Control) -> None:
        s = Stream(c)
        await s.send(L7_TYPE)
        first = await s.recv()
        (rule,) = l7_objects(first)["RequestAuthentication/shop/web-jwt"]["spec"]["jwtRules"]
        assert rule["jwksUri"] == f"file://{keys}"
        inlined = json.loads(rule["jwks"])
        assert inlined == {"keys": [{k: v for k, v in JWKS["keys"][0].items() if k != "d"}]}
        await s.ack(first)

        # The file goes away: an error for that object, and its last good version stays.
        keys.unlink()
        c.write("ra.yaml", text.replace("issuer.example", "issuer.example/v2"))
        await until(lambda: any("RequestAuthentication" in str(e) for e in c.server.plane.errors))
        (error,) = [
            e for e in (await config_dump(c))["errors"] if e.startswith("RequestAuthentication")
        ]
        assert "spec.jwtRules[0].jwksUri" in error and "cannot read" in error
        kept = c.server.plane.l7["RequestAuthentication/shop/web-jwt"]["spec"]["jwtRules"][0]
        assert kept["issuer"] == "https://issuer.example" and json.loads(kept["jwks"]) == inlined
        await s.nothing()
        await s.close()

    run(tmp_path, scenario, **{"base.yaml": BASE, "l7.yaml": L7, "ra.yaml": text})
