"""The node agent's side of waypoints, end to end on loopback.

The two-node lab of `nodelab` runs, and a stand-in waypoint takes its place in the mesh: a real
`HboneServer` in this process, on the waypoint pod's IP, holding a certificate for the
waypoint's identity from the lab's CA. It records every CONNECT and hands it to its own echo
server (a real waypoint would tunnel on to the chosen endpoint; here the echo behind the
stand-in shows that the bytes went through it and not to the destination).

    waypoint  prod/waypoint  127.0.50.1 (node-a, same node as sleep)   HBONE on :15008
    service   waypoint.prod.svc.cluster.local  VIP 127.0.50.100
    echo behind the stand-in                   127.0.50.9:8080

The inbound tests play the waypoint's second hop: an HBONE client with the waypoint's
certificate and a `forwarded` header opens a tunnel to echo through node-b.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration import nodelab
from tests.integration.nodelab import (
    APP_PORT,
    ECHO_ID,
    ECHO_IP,
    ECHO_SERVICE,
    ECHO_SERVICE_KEY,
    ECHO_UID,
    ECHO_VIP,
    NODE_A,
    PLAIN_ID,
    PLAIN_IP,
    SLEEP_ID,
    SLEEP_IP,
    TRUST_DOMAIN,
    VIP_PORT,
    EchoServers,
    Lab,
    Socks5Refused,
    metric_sum,
)
from ztagent.hbone.client import HboneClient, Tunnel, TunnelRefused
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.server import Allow, HboneServer, InboundRequest
from ztagent.hbone.tls import TlsConfig
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.spiffe import Identity

pytestmark = pytest.mark.integration

T = TypeVar("T")

WAYPOINT_IP = "127.0.50.1"
WAYPOINT_VIP = "127.0.50.100"
WAYPOINT_HBONE = (WAYPOINT_IP, 15008)
BACKEND = ("127.0.50.9", APP_PORT)
WAYPOINT_UID = "Kubernetes//Pod/prod/waypoint-0"
WAYPOINT_SERVICE = "waypoint.prod.svc.cluster.local"
WAYPOINT_KEY = f"prod/{WAYPOINT_SERVICE}"
WAYPOINT_ID = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/waypoint"
WAYPOINT_PRINCIPAL = "cluster.local/ns/prod/sa/waypoint"
USE_WAYPOINT = {"destination": WAYPOINT_KEY}

OPENED = "istio_tcp_connections_opened_total"
TIMEOUT = 10.0


# --------------------------------------------------------------------------- config


def waypoint_config(*, backed: bool = True, pod_waypoint: bool = False) -> dict[str, Any]:
    """The base config plus the waypoint's workload and Service, and echo's Service using
    the waypoint. `backed=False` leaves the waypoint Service without endpoints (its
    deployment scaled to zero); with `pod_waypoint` the echo workload uses the waypoint too
    (plain never does)."""
    config = nodelab.base_config()
    if backed:
        config["workloads"].append(
            nodelab.workload(
                WAYPOINT_UID,
                "waypoint",
                "prod",
                "waypoint",
                WAYPOINT_IP,
                "TCP",
                NODE_A,
                services={WAYPOINT_KEY: {15008: 15008}},
            )
        )
    config["services"].append(
        {
            "name": "waypoint",
            "namespace": "prod",
            "hostname": WAYPOINT_SERVICE,
            "vips": [f"/{WAYPOINT_VIP}"],
            "ports": {15008: 15008},
        }
    )
    for service in config["services"]:
        if f"{service['namespace']}/{service['hostname']}" == ECHO_SERVICE_KEY:
            service["waypoint"] = dict(USE_WAYPOINT)
    if pod_waypoint:
        for item in config["workloads"]:
            if item["uid"] == ECHO_UID:
                item["waypoint"] = dict(USE_WAYPOINT)
    return config


def echo_policy(name: str, action: str, match: dict[str, Any]) -> dict[str, Any]:
    """A policy selecting echo with one rule of one match."""
    return {
        "name": name,
        "namespace": "prod",
        "scope": "WorkloadSelector",
        "action": action,
        "dryRun": False,
        "rules": [[[match]]],
    }


def deny_waypoint_config() -> dict[str, Any]:
    policy = echo_policy("deny-waypoint", "Deny", {"principals": [{"Exact": WAYPOINT_PRINCIPAL}]})
    return nodelab.with_policy(nodelab.base_config(), policy, listed_by=[ECHO_UID])


# --------------------------------------------------------------------------- the stand-in


class LoopThread:
    """An asyncio loop in a daemon thread, for the in-process HBONE ends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="loop")

    def start(self) -> None:
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(cancel_rest(), 5.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass(frozen=True)
class Seen:
    authority: str
    peer_identity: str
    forwarded: str | None
    peer_ip: str


class StandInWaypoint:
    """A real HBONE server on the waypoint's address; each CONNECT is recorded and sent on
    to `backend` in plain TCP."""

    def __init__(self, loop: LoopThread, tls: TlsConfig, backend: tuple[str, int]) -> None:
        self.loop = loop
        self.backend = backend
        self.server = HboneServer(tls, self._decide)
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def _decide(self, request: InboundRequest) -> Allow:
        with self._lock:
            self._seen.append(
                Seen(
                    request.authority,
                    str(request.peer_identity),
                    request.header("forwarded"),
                    request.peer_address[0],
                )
            )
        return Allow(self.backend)

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def listen(self, address: tuple[str, int]) -> None:
        self.loop.run(self.server.listen(*address))

    def close(self) -> None:
        async def close() -> None:
            self.server.close()

        self.loop.run(close())


def tunnel_from_waypoint(loop: LoopThread, client: HboneClient, tunnel: Tunnel) -> socket.socket:
    """Open `tunnel` with the waypoint's client; returns the app end of it (a blocking socket
    whose bytes go through the tunnel). Raises `TunnelRefused` as the client does."""
    ours, theirs = socket.socketpair()

    async def open_it() -> None:
        leg = TcpLeg()
        theirs.setblocking(False)
        await asyncio.get_running_loop().create_connection(lambda: leg, sock=theirs)
        try:
            await client.open(leg, tunnel)
        except BaseException:
            leg.abort()
            raise

    try:
        loop.run(open_it())
    except BaseException:
        ours.close()
        theirs.close()
        raise
    ours.settimeout(TIMEOUT)
    return ours


# --------------------------------------------------------------------------- fixtures


@dataclass
class WaypointLab:
    lab: Lab
    waypoint: StandInWaypoint
    backend: EchoServers
    loop: LoopThread
    ca: CertificateAuthority


@pytest.fixture(scope="module", autouse=True)
def exclusive() -> Iterator[None]:
    with nodelab.exclusive():
        yield


@pytest.fixture(scope="module")
def wlab_module(exclusive: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WaypointLab]:
    workdir: Path = tmp_path_factory.mktemp("waypointlab")
    loop = LoopThread()
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(nodelab.node_lab(workdir))
        backend = stack.enter_context(nodelab.echo_servers([BACKEND]))
        ca = CertificateAuthority.load(lab.ca_dir)
        loop.start()
        stack.callback(loop.stop)
        waypoint = StandInWaypoint(loop, TlsConfig(ca.issue(Identity.parse(WAYPOINT_ID))), BACKEND)
        waypoint.listen(WAYPOINT_HBONE)
        stack.callback(waypoint.close)
        yield WaypointLab(lab, waypoint, backend, loop, ca)


@pytest.fixture
def w(wlab_module: WaypointLab) -> WaypointLab:
    """The running lab with the base config in place and the stand-in listening."""
    for agent in wlab_module.lab.agents:
        assert agent.alive(), f"{agent.node} is not running\n{agent.log_tail()}"
    wlab_module.lab.restore()
    return wlab_module


def exchange(lab: Lab, dest: tuple[str, int], size: int = 32 * 1024, seed: int = 3) -> None:
    payload = nodelab.pattern(size, seed)
    with contextlib.closing(lab.connect(dest)) as sock:
        assert nodelab.echo_exchange(sock, payload) == payload


def new_seen(w: WaypointLab, before: int) -> list[Seen]:
    return w.waypoint.seen[before:]


# --------------------------------------------------------------------------- outbound


def test_service_vip_goes_through_the_waypoint_with_the_vip_as_authority(w: WaypointLab) -> None:
    lab = w.lab
    lab.apply(waypoint_config())
    seen, echo_count, backend_count = len(w.waypoint.seen), lab.apps.count(), w.backend.count()
    before = lab.a.metrics()
    log_a = lab.a.log_offset()

    exchange(lab, (ECHO_VIP, VIP_PORT))

    [request] = new_seen(w, seen)
    assert request.authority == f"{ECHO_VIP}:{VIP_PORT}"
    assert request.peer_identity == SLEEP_ID
    assert request.forwarded is not None
    assert request.forwarded.startswith(f'for="{SLEEP_IP}:')
    assert f"host={ECHO_SERVICE}" in request.forwarded
    assert w.backend.count() == backend_count + 1
    assert lab.apps.count() == echo_count, "the destination was reached directly"

    line = lab.a.wait_log("connection complete", "outbound", f"dst.addr={ECHO_VIP}:80", since=log_a)
    assert f"dst.hbone_addr={WAYPOINT_IP}:15008" in line
    assert f"dst.service={ECHO_SERVICE}" in line

    def counted(samples: list[nodelab.Sample]) -> bool:
        labels = {
            "reporter": "source",
            "source_principal": SLEEP_ID,
            "destination_service": ECHO_SERVICE,
            "connection_security_policy": "mutual_tls",
        }
        return metric_sum(samples, OPENED, **labels) - metric_sum(before, OPENED, **labels) >= 1

    lab.a.wait_samples(counted, "an opened connection to the echo service")


def test_pod_address_goes_through_the_workload_waypoint(w: WaypointLab) -> None:
    lab = w.lab
    lab.apply(waypoint_config(pod_waypoint=True))
    seen, echo_count = len(w.waypoint.seen), lab.apps.count()

    exchange(lab, (ECHO_IP, APP_PORT))

    [request] = new_seen(w, seen)
    assert request.authority == f"{ECHO_IP}:{APP_PORT}"
    assert request.peer_identity == SLEEP_ID
    assert lab.apps.count() == echo_count


def test_workload_without_waypoint_goes_direct(w: WaypointLab) -> None:
    lab = w.lab
    lab.apply(waypoint_config(pod_waypoint=True))
    seen = len(w.waypoint.seen)
    direct = lab.apps.count((PLAIN_IP, APP_PORT))

    exchange(lab, (PLAIN_IP, APP_PORT))

    assert new_seen(w, seen) == []
    assert lab.apps.count((PLAIN_IP, APP_PORT)) == direct + 1


def test_waypoint_without_endpoints_refuses(w: WaypointLab) -> None:
    lab = w.lab
    lab.apply(waypoint_config(backed=False))
    seen, echo_count, backend_count = len(w.waypoint.seen), lab.apps.count(), w.backend.count()
    log_a = lab.a.log_offset()

    with pytest.raises(Socks5Refused):
        lab.connect((ECHO_VIP, VIP_PORT)).close()

    lab.a.wait_log("refused", f"waypoint {WAYPOINT_KEY}:15008 has no healthy instance", since=log_a)
    assert new_seen(w, seen) == []
    assert lab.apps.count() == echo_count
    assert w.backend.count() == backend_count


def test_local_waypoint_address_is_left_to_the_waypoint(w: WaypointLab) -> None:
    """The waypoint runs on node-a: node-a does not listen on its address (the stand-in
    holds it), yet reaches it over HBONE like any other."""
    lab = w.lab
    log_a = lab.a.log_offset()
    lab.apply(waypoint_config())
    dump = lab.a.config_dump()
    [service] = [s for s in dump["services"] if s["key"] == ECHO_SERVICE_KEY]
    assert service["waypoint"] == {"destination": WAYPOINT_KEY, "hbone_mtls_port": 15008}
    exchange(lab, (ECHO_VIP, VIP_PORT))
    assert "cannot listen" not in lab.a.log(log_a)


# --------------------------------------------------------------------------- inbound


def waypoint_tunnel(w: WaypointLab, source_ip: str = WAYPOINT_IP) -> Tunnel:
    """A tunnel to echo that names sleep as the client, sent from `source_ip` (the waypoint
    pod's address unless a test plays another peer)."""
    return Tunnel(
        via=(ECHO_IP, nodelab.INBOUND_PORT),
        target=(ECHO_IP, APP_PORT),
        expected_identities=frozenset({Identity.parse(ECHO_ID)}),
        source=(SLEEP_IP, 40000),
        source_ip=source_ip,
        host=ECHO_SERVICE,
    )


@contextlib.contextmanager
def client_as(w: WaypointLab, identity: str) -> Iterator[HboneClient]:
    client = HboneClient(TlsConfig(w.ca.issue(Identity.parse(identity))))
    try:
        yield client
    finally:

        async def close() -> None:
            client.close()

        w.loop.run(close())


@pytest.fixture
def waypoint_client(wlab_module: WaypointLab) -> Iterator[HboneClient]:
    with client_as(wlab_module, WAYPOINT_ID) as client:
        yield client


@pytest.fixture
def plain_client(wlab_module: WaypointLab) -> Iterator[HboneClient]:
    """A mesh peer that is not echo's waypoint: the `plain` workload's identity."""
    with client_as(wlab_module, PLAIN_ID) as client:
        yield client


def allow_sleep_ip_config() -> dict[str, Any]:
    """Echo behind the waypoint, and an ALLOW policy on echo naming sleep's address only."""
    policy = echo_policy("allow-sleep-ip", "Allow", {"sourceIps": [f"{SLEEP_IP}/32"]})
    return nodelab.with_policy(waypoint_config(), policy, listed_by=[ECHO_UID])


def test_inbound_from_the_waypoint_reaches_the_workload(
    w: WaypointLab, waypoint_client: HboneClient
) -> None:
    lab = w.lab
    lab.apply(waypoint_config())
    echo_count = lab.apps.count((ECHO_IP, APP_PORT))
    log_b = lab.b.log_offset()

    sock = tunnel_from_waypoint(w.loop, waypoint_client, waypoint_tunnel(w))
    with contextlib.closing(sock):
        payload = nodelab.pattern(16 * 1024, seed=5)
        assert nodelab.echo_exchange(sock, payload) == payload

    assert lab.apps.count((ECHO_IP, APP_PORT)) == echo_count + 1
    # The client is the one in `forwarded`; the peer is the waypoint.
    line = lab.b.wait_log("connection complete", "inbound", WAYPOINT_ID, since=log_b)
    assert f"src.addr={SLEEP_IP}" in line
    assert "src.workload=sleep" in line


def test_inbound_from_the_waypoint_is_denied_by_policy(
    w: WaypointLab, waypoint_client: HboneClient
) -> None:
    lab = w.lab
    lab.apply(deny_waypoint_config())
    echo_count = lab.apps.count((ECHO_IP, APP_PORT))

    with pytest.raises(TunnelRefused) as refused:
        tunnel_from_waypoint(w.loop, waypoint_client, waypoint_tunnel(w)).close()

    assert refused.value.code == 401
    assert lab.apps.count((ECHO_IP, APP_PORT)) == echo_count
    # Sleep itself is still allowed: the policy names the waypoint only.
    exchange(lab, (ECHO_IP, APP_PORT))


def test_forwarded_is_trusted_from_the_destinations_waypoint(
    w: WaypointLab, waypoint_client: HboneClient
) -> None:
    """The waypoint speaks for the original client: an ALLOW on sleep's IP lets it through."""
    lab = w.lab
    lab.apply(allow_sleep_ip_config())
    log_b = lab.b.log_offset()

    sock = tunnel_from_waypoint(w.loop, waypoint_client, waypoint_tunnel(w))
    with contextlib.closing(sock):
        assert nodelab.echo_exchange(sock, b"ping") == b"ping"

    line = lab.b.wait_log("connection complete", "inbound", WAYPOINT_ID, since=log_b)
    assert f"src.addr={SLEEP_IP}" in line


def test_forwarded_from_another_peer_does_not_change_the_source(
    w: WaypointLab, plain_client: HboneClient
) -> None:
    """A mesh peer that is not the destination's waypoint cannot claim sleep's address to pass
    an ALLOW on source IPs: policy and the access log see its own address."""
    lab = w.lab
    lab.apply(allow_sleep_ip_config())
    echo_count = lab.apps.count((ECHO_IP, APP_PORT))
    log_b = lab.b.log_offset()

    with pytest.raises(TunnelRefused) as refused:
        tunnel_from_waypoint(w.loop, plain_client, waypoint_tunnel(w, PLAIN_IP)).close()

    assert refused.value.code == 401
    assert lab.apps.count((ECHO_IP, APP_PORT)) == echo_count
    line = lab.b.wait_log("inbound", PLAIN_ID, since=log_b)
    assert f"src.addr={PLAIN_IP}" in line
    assert "src.workload=plain" in line
    assert "src.workload=sleep" not in line

    # The waypoint's identity from an address that is not the waypoint's is not trusted either.
    with client_as(w, WAYPOINT_ID) as client, pytest.raises(TunnelRefused):
        tunnel_from_waypoint(w.loop, client, waypoint_tunnel(w, "127.0.50.7")).close()
