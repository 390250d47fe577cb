"""The waypoint in-process on loopback with real HBONE, TLS, HTTP/1.1, HTTP/2 and gRPC.

Topology (all in one event loop, addresses in 127.0.91.0/24):
  client (curl / httpx / grpc) -> local TCP listener -> HBONE (as `sleep`) -> waypoint
  -> HBONE to the endpoint's "node agent" (an HboneServer on endpoint-IP:15008 holding the
  endpoint's identity) -> the endpoint's HTTP server (HTTP/1.1 on 8080, gRPC on 9090).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.hbone.client import HboneClient, Tunnel
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.server import HboneServer, allow_authority
from ztagent.hbone.tls import TlsConfig
from ztagent.http.body import Body
from ztagent.http.h1 import serve_http1
from ztagent.http.messages import RequestHead, ResponseHead
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.spiffe import Identity
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import ProxyState
from ztagent.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztagent.telemetry.requests import RequestMetrics
from ztagent.waypoint.config import build_config
from ztagent.waypoint.proxy import Waypoint

pytestmark = pytest.mark.integration

NS = "demo"
HOST = f"web.{NS}.svc.cluster.local"
VIP = "127.0.91.100"
WAYPOINT_IP = "127.0.91.1"
CLIENT_ID = Identity("cluster.local", NS, "sleep")
CLIENT_IP = "127.0.91.50"
WAYPOINT_ID = Identity("cluster.local", NS, "waypoint")
ENDPOINTS = {
    "web-v1-a": ("127.0.91.11", "v1"),
    "web-v1-b": ("127.0.91.12", "v1"),
    "web-v2": ("127.0.91.13", "v2"),
}
ISSUER = "https://issuer.test"


@dataclass
class Backend:
    name: str
    ip: str
    version: str
    fail: int = 0  # answer 503 to the next `fail` requests
    hits: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        received = 0
        while chunk := await body.read():
            received += len(chunk)
        self.hits += 1
        if head.path.startswith("/slow"):
            await asyncio.sleep(0.5)
        headers = dict(head.headers)
        self.seen.append({"path": head.path, "headers": headers, "authority": head.authority})
        status = 200
        if self.fail > 0:
            self.fail -= 1
            status = 503
        elif head.path.startswith("/status/"):
            status = int(head.path.split("/")[2])
        data = json.dumps(
            {"pod": self.name, "version": self.version, "path": head.path, "received": received}
        ).encode()
        return ResponseHead(status, [("content-type", "application/json")]), Body.of(data)


def _workload(name: str, ip: str, version: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{NS}/{name}",
        name=name,
        namespace=NS,
        addresses=(ipaddress.ip_address(ip),),
        tunnel_protocol=TunnelProtocol.HBONE,
        service_account=f"web-{version}",
        canonical_name="web",
        canonical_revision=version,
        node="node-b",
        services={f"{NS}/{HOST}": {80: 8080, 9090: 9090}},
    )


def _service() -> Service:
    return Service(
        name="web",
        namespace=NS,
        hostname=HOST,
        addresses=(NetworkAddress("", ipaddress.ip_address(VIP)),),
        ports={80: 8080, 9090: 9090},
    )


def _k8s_service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "grpc", "port": 9090, "targetPort": 9090, "appProtocol": "grpc"},
            ],
        },
    }


@dataclass
class Lab:
    loop: asyncio.AbstractEventLoop
    waypoint: Waypoint
    backends: dict[str, Backend]
    port: int  # local listener that tunnels to the waypoint, as a node agent would
    key: ec.EllipticCurvePrivateKey
    jwks: dict[str, Any]

    def configure(self, *objects: dict[str, Any]) -> None:
        config = build_config([_k8s_service(), *objects])
        assert not config.errors, config.errors
        self.loop.call_soon_threadsafe(self.waypoint.set_config, config)
        time.sleep(0.05)

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:80{path}"

    def client(self, *, http2: bool = False) -> httpx.Client:
        transport = httpx.HTTPTransport(http1=not http2, http2=http2, local_address=None)
        return httpx.Client(
            transport=transport,
            timeout=10.0,
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"host": f"{HOST}"},
        )

    def token(self, **claims: Any) -> str:
        body = {"iss": ISSUER, "sub": "alice", "aud": "web", "exp": int(time.time()) + 600}
        body.update(claims)
        return pyjwt.encode(body, self.key, algorithm="ES256", headers={"kid": "k1"})

    def reset(self) -> None:
        for backend in self.backends.values():
            backend.hits = 0
            backend.fail = 0
            backend.seen.clear()


class _GrpcEcho:
    def __init__(self, name: str) -> None:
        self.name = name

    def call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return json.dumps({"pod": self.name, "got": request.decode()}).encode()


def _grpc_server(name: str, ip: str) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo = _GrpcEcho(name)
    handler = grpc.method_handlers_generic_handler(
        "ztlab.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo.call)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{ip}:9090")
    server.start()
    return server


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("wp")
    ca = CertificateAuthority.create(base / "ca", "cluster.local")
    loop = asyncio.new_event_loop()
    ready: futures.Future[Lab] = futures.Future()
    stop = asyncio.Event()
    grpc_servers = [_grpc_server(name, ip) for name, (ip, _) in ENDPOINTS.items()]

    async def main() -> None:
        backends = {name: Backend(name, ip, version) for name, (ip, version) in ENDPOINTS.items()}
        servers: list[Any] = []
        hbone_servers: list[HboneServer] = []
        for backend in backends.values():
            identity = Identity("cluster.local", NS, f"web-{backend.version}")
            tls = TlsConfig(ca.issue(identity))
            hbone = HboneServer(tls, allow_authority)
            await hbone.listen(backend.ip, 15008)
            hbone_servers.append(hbone)

            async def on_client(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend = backend
            ) -> None:
                with contextlib.suppress(Exception):
                    await serve_http1(reader, writer, b.handle)
                writer.close()

            servers.append(await asyncio.start_server(on_client, backend.ip, 8080))
        state = ProxyState("node-b")
        workloads = tuple(_workload(n, ip, v) for n, (ip, v) in ENDPOINTS.items())
        # The client the tunnels name in `forwarded` (its agent sends with its identity).
        workloads += (
            Workload(
                uid=f"Kubernetes//Pod/{NS}/sleep",
                name="sleep",
                namespace=NS,
                addresses=(ipaddress.ip_address(CLIENT_IP),),
                tunnel_protocol=TunnelProtocol.HBONE,
                service_account=CLIENT_ID.service_account,
                node="node-a",
            ),
        )
        state.replace(ConfigSnapshot(workloads=workloads, services=(_service(),)))
        waypoint_tls = TlsConfig(ca.issue(WAYPOINT_ID))
        client_holder: list[HboneClient] = []

        async def client_for() -> HboneClient:
            if not client_holder:
                client_holder.append(HboneClient(waypoint_tls))
            return client_holder[0]

        waypoint = Waypoint(
            gateway=(NS, "waypoint"),
            identity=WAYPOINT_ID,
            state=state,
            client_for=client_for,
            metrics=RequestMetrics(),
        )
        waypoint_server = HboneServer(waypoint_tls, waypoint.decide)
        await waypoint_server.listen(WAYPOINT_IP, 15008)
        sleep = HboneClient(TlsConfig(ca.issue(CLIENT_ID)))
        tunnels: set[asyncio.Task[Any]] = set()

        class Outbound(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                leg = TcpLeg()
                transport.set_protocol(leg)
                leg.connection_made(transport)
                tunnel = Tunnel(
                    via=(WAYPOINT_IP, 15008),
                    target=(VIP, self.port),
                    expected_identities=frozenset({WAYPOINT_ID}),
                    source=(CLIENT_IP, 40000),
                )
                tunnels.add(loop.create_task(sleep.open(leg, tunnel)))

            port = 80

        class OutboundGrpc(Outbound):
            port = 9090

        listener = await loop.create_server(Outbound, "127.0.0.1", 0)
        grpc_listener = await loop.create_server(OutboundGrpc, "127.0.0.1", 0)
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": "k1", "alg": "ES256", "use": "sig"})
        lab = Lab(
            loop, waypoint, backends, listener.sockets[0].getsockname()[1], key, {"keys": [jwk]}
        )
        lab.grpc_port = grpc_listener.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        ready.set_result(lab)
        await stop.wait()
        listener.close()
        grpc_listener.close()
        sleep.close()
        waypoint_server.close()
        waypoint.close()
        for c in client_holder:
            c.close()
        for h in hbone_servers:
            h.close()
        for s in servers:
            s.close()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=20)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        for server in grpc_servers:
            server.stop(0)
        loop.close()


DR = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "web", "namespace": NS},
    "spec": {
        "host": "web",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
}


def _vs(*http: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"hosts": ["web"], "http": list(http)},
    }


def _to(subset: str, weight: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": {"host": "web", "subset": subset}}
    if weight is not None:
        out["weight"] = weight
    return out


def test_no_config_goes_to_the_service(lab: Lab) -> None:
    lab.reset()
    lab.configure()
    with lab.client() as client:
        answers = [client.get("/hello").json()["pod"] for _ in range(30)]
    assert set(answers) == set(ENDPOINTS)
    seen = lab.backends[answers[0]].seen[0]
    assert seen["authority"] == HOST
    assert seen["headers"]["x-forwarded-for"] == CLIENT_IP
    assert "x-request-id" in seen["headers"] and "traceparent" in seen["headers"]


def test_weighted_split_and_header_match(lab: Lab) -> None:
    lab.reset()
    lab.configure(
        DR,
        _vs(
            {"match": [{"headers": {"x-canary": {"exact": "v2"}}}], "route": [_to("v2")]},
            {"route": [_to("v1", 80), _to("v2", 20)]},
        ),
    )
    with lab.client() as client:
        versions = [client.get("/").json()["version"] for _ in range(1000)]
        canary = {client.get("/", headers={"x-canary": "v2"}).json()["version"] for _ in range(20)}
    share = versions.count("v2") / len(versions)
    assert 0.15 <= share <= 0.25, share  # 20% +- 4 standard deviations
    assert canary == {"v2"}


def test_route_miss_is_404_and_direct_response(lab: Lab) -> None:
    lab.reset()
    lab.configure(DR, _vs({"match": [{"uri": {"prefix": "/only"}}], "route": [_to("v1")]}))
    with lab.client() as client:
        assert client.get("/only/x").status_code == 200
        assert client.get("/other").status_code == 404


def test_retries_hide_upstream_failures(lab: Lab) -> None:
    lab.reset()
    lab.configure(
        DR,
        _vs({"route": [_to("v2")], "retries": {"attempts": 3, "retryOn": "5xx"}}),
    )
    lab.backends["web-v2"].fail = 2
    with lab.client() as client:
        response = client.get("/r")
    assert response.status_code == 200
    assert lab.backends["web-v2"].hits == 3


def test_no_retries_shows_the_failure(lab: Lab) -> None:
    lab.reset()
    lab.configure(DR, _vs({"route": [_to("v2")], "retries": {"attempts": 0}}))
    lab.backends["web-v2"].fail = 1
    with lab.client() as client:
        assert client.get("/r").status_code == 503
        assert client.get("/r").status_code == 200


def test_l7_authorization_and_jwt(lab: Lab) -> None:
    lab.reset()
    target = [{"kind": "Service", "group": "", "name": "web"}]
    lab.configure(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-admin", "namespace": NS},
            "spec": {
                "targetRefs": target,
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": NS},
            "spec": {
                "targetRefs": target,
                "jwtRules": [
                    {"issuer": ISSUER, "audiences": ["web"], "jwks": json.dumps(lab.jwks)}
                ],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "need-jwt", "namespace": NS},
            "spec": {
                "targetRefs": target,
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"requestPrincipals": ["*"]}}],
                        "to": [{"operation": {"paths": ["/secure/*"]}}],
                    },
                    {"to": [{"operation": {"notPaths": ["/secure/*"]}}]},
                ],
            },
        },
    )
    with lab.client() as client:
        denied = client.get("/admin/x")
        assert denied.status_code == 403
        assert denied.text == "RBAC: access denied"
        assert client.get("/ok").status_code == 200
        assert client.get("/secure/x").status_code == 403
        bad = client.get(
            "/secure/x", headers={"authorization": "Bearer " + lab.token()[:-4] + "AAAA"}
        )
        assert bad.status_code == 401
        expired = lab.token(exp=int(time.time()) - 3600)
        assert (
            client.get("/secure/x", headers={"authorization": f"Bearer {expired}"}).status_code
            == 401
        )
        good = client.get("/secure/x", headers={"authorization": f"Bearer {lab.token()}"})
        assert good.status_code == 200
    # the token is not forwarded by default
    assert all("authorization" not in s["headers"] for b in lab.backends.values() for s in b.seen)


def test_http2_prior_knowledge_with_curl_and_httpx(lab: Lab) -> None:
    lab.reset()
    lab.configure()
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-H",
            f"host: {HOST}",
            "-w",
            "\\n%{http_version} %{http_code}",
            f"http://127.0.0.1:{lab.port}/h2",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout.splitlines()
    assert out[-1] == "2 200"
    assert json.loads(out[0])["path"] == "/h2"
    with lab.client(http2=True) as client:
        response = client.post("/upload", content=b"x" * 100_000)
        assert response.http_version == "HTTP/2"
        assert response.json()["received"] == 100_000


def test_grpc_unary_routed_by_path(lab: Lab) -> None:
    lab.reset()
    lab.configure(
        DR,
        _vs(
            {"match": [{"uri": {"prefix": "/ztlab.Echo/"}}], "route": [_to("v2")]},
            {"route": [_to("v1")]},
        ),
    )
    port = lab.grpc_port  # type: ignore[attr-defined]
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.default_authority", f"{HOST}:9090")]
    ) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/ztlab.Echo/Call")
        answers = {json.loads(call(b"hi", timeout=10))["pod"] for _ in range(5)}
        assert answers == {"web-v2"}
        with pytest.raises(grpc.RpcError) as info:
            call(b"missing", timeout=10)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_outlier_detection_ejects_and_readmits(lab: Lab) -> None:
    lab.reset()
    dr = json.loads(json.dumps(DR))
    dr["spec"]["trafficPolicy"] = {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "outlierDetection": {
            "consecutive5xxErrors": 2,
            "interval": "0.2s",
            "baseEjectionTime": "1s",
            "maxEjectionPercent": 100,
        },
    }
    lab.configure(dr, _vs({"route": [_to("v1")], "retries": {"attempts": 0}}))
    lab.backends["web-v1-a"].fail = 1000
    with lab.client() as client:
        statuses = [client.get("/o").status_code for _ in range(10)]
        assert statuses.count(503) == 2  # two consecutive failures, then ejected
        lab.backends["web-v1-a"].fail = 0
        before = lab.backends["web-v1-a"].hits
        assert all(client.get("/o").status_code == 200 for _ in range(10))
        assert lab.backends["web-v1-a"].hits == before  # still ejected
        time.sleep(1.4)
        for _ in range(10):
            client.get("/o")
        assert lab.backends["web-v1-a"].hits > before  # readmitted


def test_trace_context_propagated_and_spans_exported(lab: Lab) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ztagent.telemetry.tracing import OtlpExporter

    posted: list[dict[str, Any]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            posted.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            return

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
        exporter = OtlpExporter(endpoint, "waypoint.demo", interval=0.2)
        lab.loop.call_soon_threadsafe(setattr, lab.waypoint, "exporter", exporter)
        lab.reset()
        lab.configure()
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = "00f067aa0ba902b7"
        with lab.client() as client:
            client.get("/traced", headers={"traceparent": f"00-{trace}-{parent}-01"})
            client.get("/untraced")
        upstream = [s["headers"] for b in lab.backends.values() for s in b.seen]
        traced = next(h for h in upstream if h["traceparent"].split("-")[1] == trace)
        assert traced["traceparent"].split("-")[2] != parent  # the waypoint's span is the parent
        assert traced["x-b3-traceid"] == trace
        assert all(h.get("x-request-id") for h in upstream)
        deadline = time.monotonic() + 10
        spans: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(spans) < 2:
            spans = [
                span
                for batch in posted
                for rs in batch["resourceSpans"]
                for ss in rs["scopeSpans"]
                for span in ss["spans"]
            ]
            time.sleep(0.1)
        assert len(spans) == 2
        mine = next(s for s in spans if s["traceId"] == trace)
        assert mine["parentSpanId"] == parent and mine["kind"] == 2
    finally:
        lab.loop.call_soon_threadsafe(setattr, lab.waypoint, "exporter", None)
        collector.shutdown()
        collector.server_close()


def test_httproute_filters_and_404(lab: Lab) -> None:
    lab.reset()
    lab.configure(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/gw"}}],
                        "filters": [
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {
                                    "set": [{"name": "x-via", "value": "gw"}]
                                },
                            },
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {
                                    "add": [{"name": "x-out", "value": "1"}]
                                },
                            },
                            {
                                "type": "URLRewrite",
                                "urlRewrite": {
                                    "path": {
                                        "type": "ReplacePrefixMatch",
                                        "replacePrefixMatch": "/new",
                                    }
                                },
                            },
                        ],
                        "backendRefs": [{"name": "web", "port": 80}],
                    }
                ],
            },
        }
    )
    with lab.client() as client:
        response = client.get("/gw/page")
        assert response.status_code == 200
        assert response.headers["x-out"] == "1"
        assert response.json()["path"] == "/new/page"
        assert client.get("/elsewhere").status_code == 404
    seen = [s for b in lab.backends.values() for s in b.seen]
    assert [s["headers"]["x-via"] for s in seen] == ["gw"]


def test_fault_injection_timeout_and_mirror(lab: Lab) -> None:
    lab.reset()
    lab.configure(
        DR,
        _vs(
            {
                "match": [{"uri": {"prefix": "/abort"}}],
                "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                "route": [_to("v1")],
            },
            {
                "match": [{"uri": {"prefix": "/delay"}}],
                "fault": {"delay": {"fixedDelay": "0.3s", "percentage": {"value": 100}}},
                "route": [_to("v1")],
            },
            {"match": [{"uri": {"prefix": "/slow"}}], "timeout": "0.2s", "route": [_to("v1")]},
            {
                "route": [_to("v1")],
                "mirror": {"host": "web", "subset": "v2"},
                "mirrorPercentage": {"value": 100},
            },
        ),
    )
    with lab.client() as client:
        assert client.get("/abort").status_code == 418
        started = time.monotonic()
        assert client.get("/delay").status_code == 200
        assert time.monotonic() - started >= 0.3
        assert client.get("/slow").status_code == 504
        assert client.get("/mirrored").json()["version"] == "v1"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not lab.backends["web-v2"].seen:
        time.sleep(0.05)
    shadow = lab.backends["web-v2"].seen
    assert [s["authority"] for s in shadow] == [f"{HOST}-shadow"]


def test_connection_pool_overflow_and_consistent_hash(lab: Lab) -> None:
    lab.reset()
    dr = json.loads(json.dumps(DR))
    dr["spec"]["trafficPolicy"] = {
        "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}},
        "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}},
    }
    lab.configure(dr, _vs({"route": [_to("v1")], "retries": {"attempts": 0}}))

    def get(path: str, user: str) -> httpx.Response:
        with lab.client() as client:
            return client.get(path, headers={"x-user": user})

    with futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: get("/slow", "same"), range(6)))
    statuses = sorted(r.status_code for r in results)
    assert 503 in statuses and 200 in statuses, statuses
    overflowed = next(r for r in results if r.status_code == 503)
    assert overflowed.headers.get("x-envoy-overloaded") == "true"
    pods = {get("/h", "alice").json()["pod"] for _ in range(10)}
    assert len(pods) == 1
