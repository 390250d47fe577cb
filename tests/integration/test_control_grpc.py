"""`ztagent control` over real gRPC with TLS: delta ADS with a raw grpc client (initial
snapshot, add/update/remove, NACK, reconnect with initial versions, two views), the CA's
authorization rules, and the node agent's own xDS client against it."""

from __future__ import annotations

import asyncio
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
from ztagent.control.xds import ADDRESS_TYPE, AUTHORIZATION_TYPE
from ztagent.identity.keys import create_csr, generate_key
from ztagent.identity.spiffe import Identity
from ztagent.node.xds import ControlPlaneConnection, XdsClient, node_identity
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as ads_grpc
from ztagent.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc

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
