"""The node agent: the workload model, certificates, listeners, policy and telemetry, wired.

This module owns the wiring and the asyncio lifecycle. Decisions live elsewhere and are pure:
routing in `routing.py`, authorization in `ztagent.istio.authorization.l4`, the HTTP/2 tunnel in
`ztagent.hbone`, metrics and logs in `ztagent.telemetry`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztagent.errors import LocalError, ZtagentError
from ztagent.fdlimit import refused_counter, serve_guarded
from ztagent.hbone.client import HboneClient, TunnelRefused
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.frames import format_authority
from ztagent.hbone.listen import listening_socket
from ztagent.hbone.server import Allow, Deny, HboneServer, InboundRequest
from ztagent.hbone.tls import TlsConfig
from ztagent.http.server import HttpServer
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.manager import CertificateManager
from ztagent.identity.spiffe import Identity
from ztagent.istio.authorization.l4 import ConnectionAttributes, Verdict, evaluate
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import ProxyState, StateChange
from ztagent.model.watch import ConfigWatcher
from ztagent.model.workload import TunnelProtocol, Workload
from ztagent.names import HBONE_PORT
from ztagent.node import handover, inbound, outbound
from ztagent.node.dump import CertificateStatus, config_dump
from ztagent.node.inbound import PLAINTEXT_PORT, InboundRefused
from ztagent.node.listeners import (
    Address,
    HeldConnection,
    migrate_accept_queues,
)
from ztagent.node.outbound import OpenTunnel, OutboundRefused, Relay
from ztagent.node.relay import AppLeg, PlainRelay
from ztagent.node.routing import RoundRobin
from ztagent.node.settings import WORKLOADS, NodeSettings
from ztagent.redirect import Capture
from ztagent.redirect.checks import check_all
from ztagent.socks5.handshake import Reply
from ztagent.socks5.listener import ReplyFn, Socks5Listener, tunnel_response
from ztagent.telemetry.accesslog import AccessLog, ConnectionRecord
from ztagent.telemetry.admin import (
    Readiness,
    build_admin_server,
    build_metrics_server,
    build_readiness_server,
)
from ztagent.telemetry.metrics import (
    ConnectionLabels,
    Metrics,
    ResponseFlags,
)
from ztagent.xds.adsclient import XdsClient
from ztagent.xds.caclient import CaClient
from ztagent.xds.connection import ControlPlaneConnection, node_identity

log = logging.getLogger(__name__)


@dataclass
class _Inbound:
    """An open inbound connection, kept so a policy change can re-check it."""

    attributes: ConnectionAttributes
    workload_uid: str
    close: Callable[[str], None]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


class NodeAgent:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        if settings.capture:
            # Before anything is written or opened: a machine that cannot capture says so.
            check_all(settings.kernel_headers)
        self.state = ProxyState(settings.node_name, root_namespace=settings.root_namespace)
        self.metrics = Metrics()
        self._fd_exhausted = refused_counter(self.metrics.registry)
        self.access_log = AccessLog()
        self.readiness = Readiness("config", "certificates")
        self.ca: CertificateAuthority | None = None
        self.ca_client: CaClient | None = None
        if settings.ca_address:
            self.ca_client = CaClient(
                ControlPlaneConnection(
                    settings.ca_address,
                    Path(settings.ca_root_ca),
                    Path(settings.token_path),
                    settings.cluster_id,
                ),
                settings.secret_ttl,
            )
        else:
            self.ca = CertificateAuthority.load_or_create(settings.ca_dir, settings.trust_domain)
        self.certs = CertificateManager(self._issue)
        self.hbone = HboneServer(self._tls_for_address, self._decide_inbound)
        self.watcher: ConfigWatcher | None = None
        self.xds: XdsClient | None = None
        if settings.xds_address:
            node = node_identity(
                instance_ip=settings.instance_ip,
                pod_name=settings.pod_name,
                pod_namespace=settings.pod_namespace,
                node_name=settings.node_name,
                cluster_id=settings.cluster_id,
            )
            connection = ControlPlaneConnection(
                settings.xds_address,
                Path(settings.xds_root_ca),
                Path(settings.token_path),
                settings.cluster_id,
            )
            self.xds = XdsClient(connection, node, self._apply_xds)
        else:
            self.watcher = ConfigWatcher(
                settings.local_xds_path,
                self.state,
                self._on_config_change,
                trust_domain=settings.trust_domain,
            )
        self._pick = RoundRobin()
        self._tls: dict[Identity, TlsConfig] = {}
        self._clients: dict[Identity, HboneClient] = {}
        self._inbound: dict[object, _Inbound] = {}
        self._cert_errors: dict[Identity, str] = {}
        self._workload_labels: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._bound_workloads: set[str] = set()
        self._plain_servers: dict[str, asyncio.AbstractServer] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._http: list[HttpServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._certs_task: asyncio.Task[None] | None = None
        # The agent's own connections carry this mark so capture leaves them alone.
        self._mark: int | None = settings.mark if settings.capture else None
        self.capture: Capture | None = None
        self._enrolled: set[str] = set()
        # Hitless upgrade (see `handover`): listeners share their ports with a successor.
        self._reuse_port = bool(settings.handover_socket)
        self._handover: handover.HandoverServer | None = None
        self._handed_over = False
        self._taking_over = False
        self._attach_capture = True  # False until a predecessor has handed over
        self._capture_live = False  # attached: stays when the agent stops (fail closed)
        self._open_connections = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._taking_over = bool(s.handover_socket) and handover.predecessor(s.handover_socket)
        if self._taking_over:
            log.info("an agent serves %s: taking over from it", s.handover_socket)
        if s.capture:
            # First, so a machine that cannot capture says so before anything listens. The
            # program is attached only once its maps hold the enrolled pods (below): a program
            # with empty maps would let their traffic pass untouched.
            self.capture = Capture(mark=s.mark, headers=s.kernel_headers)
            self.capture.start()
            self._attach_capture = not self._taking_over
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._http = [
            build_admin_server(self.dump, self._stop.set),
            build_metrics_server(self.metrics.render),
            build_readiness_server(self.readiness.ready, self.readiness.reason),
        ]
        try:
            if not self._taking_over:
                await self._start_http(retry_for=0.0)
            self.certs.start()
            # The first config before the listeners open: nothing is captured or forwarded on
            # an empty model (an unknown destination would otherwise pass through in plaintext).
            if self.xds is not None:
                self._spawn(self.xds.run())
                log.info("waiting for the first xDS sync from %s", s.xds_address)
                await self.xds.synced.wait()
            elif self.watcher is not None:
                await self.watcher.check()
                self._spawn(self.watcher.run())
            await self._listen()
            if self._taking_over:
                await self._take_over()
            if self.capture is not None:
                self._attach_capture = True
                self._sync_capture(self.capture)
                self.capture.attach(s.uplink)
                self._capture_live = True
            if s.handover_socket:
                self._handover = handover.HandoverServer(s.handover_socket, self._hand_over)
                await self._handover.start()
            log.info(
                "node agent %s started: config %s, certificates %s, trust domain %s",
                s.node_name or "(no name)",
                self.config_source,
                s.ca_address or f"embedded CA {s.ca_dir}",
                s.trust_domain,
            )
            await self._stop.wait()
            await self._drain()
        finally:
            if self._handover is not None:
                await self._handover.close()
            if self.capture is not None:
                # Fail closed: once attached, the capture outlives the agent (its program finds
                # no listener and resets captured SYNs) until an agent starts again or
                # `ztagent node --cleanup` removes it. After a handover the program, rules and
                # routes are the successor's; while a takeover has not happened, the
                # predecessor's. Only a start that never attached removes what it added.
                keep = self._capture_live or self._handed_over or self._taking_over
                if self._capture_live and not self._handed_over:
                    log.info(
                        "capture left in place: enrolled pods' connections are refused until an "
                        "agent runs again (`ztagent node --cleanup` removes it)"
                    )
                self.capture.stop(release=not keep)
        return 0

    async def _start_http(self, retry_for: float) -> None:
        """Open the admin, metrics and readiness servers; after a takeover the predecessor may
        take a moment to release their ports, so binding is retried for `retry_for` seconds."""
        s = self.settings
        deadline = time.monotonic() + retry_for
        for server, address in zip(
            self._http, (s.admin_addr, s.metrics_addr, s.readiness_addr), strict=True
        ):
            while True:
                try:
                    await server.start(*address)
                    break
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                        continue
                    where = format_authority(*address)
                    raise LocalError(f"cannot listen on {where}: {exc.strerror or exc}") from None

    async def _take_over(self) -> None:
        """Our listeners are open beside the predecessor's: ask it to stop accepting and to
        release its ports, then take the ports it released."""
        started = time.monotonic()
        try:
            await handover.request_takeover(self.settings.handover_socket)
        except handover.HandoverError as exc:
            raise LocalError(f"hitless upgrade failed: {exc}") from None
        self._taking_over = False
        await self._start_http(retry_for=handover.HANDSHAKE_TIMEOUT)
        log.info("took over in %.0f ms", (time.monotonic() - started) * 1000)

    async def _hand_over(self) -> None:
        """A successor's listeners are open beside ours: stop accepting (connections still in
        our accept queues move to its listeners), release the admin, metrics and readiness
        ports, and drain what we hold."""
        self._handed_over = True
        migrate_accept_queues()
        self._stop_accepting()
        for http in self._http:
            await http.close()
        self._stop.set()

    def _socket(self, address: tuple[str, int], *, transparent: bool) -> socket.socket:
        return listening_socket(address, transparent=transparent, reuse_port=self._reuse_port)

    def _stop_accepting(self) -> None:
        for server in self._servers + list(self._plain_servers.values()):
            server.close()
        self.hbone.stop_listening()

    async def _listen(self) -> None:
        s = self.settings
        if isinstance(s.inbound_addr, tuple):
            await self.hbone.listen(*s.inbound_addr, transparent=True, reuse_port=self._reuse_port)
        if isinstance(s.inbound_plaintext_addr, tuple):
            self._servers.append(
                serve_guarded(
                    self._plain_inbound_protocol,
                    listening_socket(
                        s.inbound_plaintext_addr, transparent=True, reuse_port=self._reuse_port
                    ),
                    name="inbound_plaintext",
                    counter=self._fd_exhausted,
                )
            )
        if isinstance(s.outbound_addr, tuple):
            self._servers.append(
                serve_guarded(
                    lambda: HeldConnection(self._on_captured),
                    listening_socket(
                        s.outbound_addr, transparent=True, reuse_port=self._reuse_port
                    ),
                    name="outbound",
                    counter=self._fd_exhausted,
                )
            )
        if isinstance(s.socks5_addr, tuple):
            self._servers.append(
                serve_guarded(
                    self._socks5_protocol,
                    self._socket(s.socks5_addr, transparent=False),
                    name="socks5",
                    counter=self._fd_exhausted,
                )
            )
        await self._bind_workloads()

    async def _drain(self) -> None:
        timeout = self.settings.drain_timeout
        log.info(
            "draining: no new connections, %ss for %d open ones", timeout, self._open_connections
        )
        deadline = time.monotonic() + timeout
        self._stop_accepting()
        await self.hbone.drain(timeout=timeout)
        while (self._inbound or self._open_connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._open_connections:
            log.info("drain deadline: closing %d open connections", self._open_connections)
        for client in self._clients.values():
            client.close()
        for task in self._tasks:
            task.cancel()
        await self.certs.stop()
        for http in self._http:
            await http.close()

    def stop(self) -> None:
        self._stop.set()

    def _opened(self, labels: ConnectionLabels) -> None:
        self._open_connections += 1
        self.metrics.opened(labels)

    def _closed(self, labels: ConnectionLabels) -> None:
        self._open_connections -= 1
        self.metrics.closed(labels)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection handling failed", exc_info=task.exception())

    # ------------------------------------------------------------ configuration

    @property
    def config_source(self) -> str:
        s = self.settings
        return f"xds {s.xds_address}" if s.xds_address else s.local_xds_path

    def _apply_xds(self, snapshot: ConfigSnapshot) -> None:
        change = self.state.replace(snapshot)
        log.info(
            "xDS config version %d: %d workloads, %d services, %d policies",
            change.version,
            len(snapshot.workloads),
            len(snapshot.services),
            len(snapshot.policies),
        )
        try:
            self._on_config_change(change)
        except Exception:  # the stream must survive a failing consumer
            log.exception("applying xDS config version %d failed", change.version)
        if self.xds is not None and not self.xds.core.synced:
            self.readiness.pending("config")

    def _on_config_change(self, change: StateChange) -> None:
        self.readiness.done("config")
        self.metrics.set_config_version(self.state.version)
        for identity in change.local_identities_added:
            self.certs.prefetch(identity)
        for identity in change.local_identities_removed:
            self.certs.release(identity)
            self.metrics.drop_cert(str(identity))
            self._tls.pop(identity, None)
            client = self._clients.pop(identity, None)
            if client is not None:
                client.close()
        for uid in change.workloads.removed:
            # Series name workloads as their labels do (see `_labels`): bounded cardinality.
            known = self._workload_labels.pop(uid, None)
            if known is not None:
                self.metrics.forget_workload(*known)
        for workload in self.state.workloads:
            self._workload_labels[workload.uid] = (
                workload.namespace,
                workload.workload_name or workload.name,
            )
        if self._certs_task is None or self._certs_task.done():
            self._certs_task = asyncio.get_running_loop().create_task(self._await_certs())
        if change.policy_relevant or change.workloads:
            self._recheck_inbound()
        self._spawn(self._bind_workloads())
        if self.capture is not None:
            self._sync_capture(self.capture)

    def _sync_capture(self, capture: Capture) -> None:
        """Enrolment follows the model: local HBONE workloads are captured, other local pods
        only get the program on their veth (for traffic to enrolled pods on this node). The
        maps are filled before the program is attached, and while a predecessor still serves
        (`_attach_capture` false) only the maps are: its program stays on the devices."""
        wanted: set[str] = set()
        attach = self._attach_capture
        for workload in self.state.local_workloads():
            for address in workload.addresses:
                ip = str(address)
                if address.version != 4:
                    continue
                try:
                    ifindex = capture.host_veth_for(ip)
                    if workload.tunnel_protocol is TunnelProtocol.HBONE and not (
                        self.state.is_waypoint(workload)
                    ):
                        capture.enrol_pod(ip, ifindex, attach=attach)
                        wanted.add(ip)
                    elif attach:
                        capture.attach_pod_veth(ifindex)
                except LocalError as exc:
                    log.error("cannot capture %s (%s): %s", workload.name, ip, exc)
        for ip in self._enrolled - wanted:
            capture.unenrol_pod(ip)
        added, removed = wanted - self._enrolled, self._enrolled - wanted
        if added or removed:
            log.info("capture: enrolled %s, released %s", sorted(added), sorted(removed))
        self._enrolled = wanted

    async def _await_certs(self) -> None:
        identities = self.state.local_identities()
        results = await asyncio.gather(
            *(self.certs.get(i) for i in identities), return_exceptions=True
        )
        failed = [i for i, r in zip(identities, results, strict=True) if isinstance(r, Exception)]
        if failed:
            self.readiness.pending("certificates")
        else:
            self.readiness.done("certificates")

    async def _issue(self, identity: Identity) -> WorkloadCertificate:
        try:
            if self.ca_client is not None:
                cert = await self.ca_client.fetch(identity)
            else:
                assert self.ca is not None
                cert = self.ca.issue(identity, self.settings.secret_ttl)
        except ZtagentError as exc:
            self._cert_errors[identity] = str(exc)
            raise
        self._cert_errors.pop(identity, None)
        self.metrics.set_cert_expiry(str(identity), cert.not_after.timestamp())
        return cert

    async def _bind_workloads(self) -> None:
        """In `workloads` mode, listen on each local workload IP (and stop for those gone)."""
        s = self.settings
        # A local waypoint takes HBONE on its own address itself: not listened for here.
        wanted = {
            str(ip)
            for w in self.state.local_workloads()
            if not self.state.is_waypoint(w)
            for ip in w.addresses
        }
        for ip in sorted(wanted - self._bound_workloads):
            try:
                if s.inbound_addr == WORKLOADS:
                    await self.hbone.listen(ip, HBONE_PORT, reuse_port=self._reuse_port)
                if s.inbound_plaintext_addr == WORKLOADS:
                    self._plain_servers[ip] = serve_guarded(
                        self._plain_inbound_protocol,
                        listening_socket(
                            (ip, PLAINTEXT_PORT), transparent=False, reuse_port=self._reuse_port
                        ),
                        name="inbound_plaintext",
                        counter=self._fd_exhausted,
                    )
            except (LocalError, OSError) as exc:
                log.error("cannot listen for workload %s: %s", ip, exc)
                continue
            self._bound_workloads.add(ip)
        for ip in sorted(self._bound_workloads - wanted):
            self.hbone.unlisten(ip, HBONE_PORT)
            server = self._plain_servers.pop(ip, None)
            if server is not None:
                server.close()
            self._bound_workloads.discard(ip)

    # ------------------------------------------------------------- certificates

    def _tls_config(self, identity: Identity) -> TlsConfig | None:
        cert = self.certs.get_cached(identity)
        if cert is None:
            return None
        tls = self._tls.get(identity)
        if tls is None or tls.certificate is not cert:
            tls = self._tls[identity] = TlsConfig(cert)
        return tls

    def _tls_for_address(self, address: tuple[str, int]) -> TlsConfig | None:
        workload = self.state.local_workload_by_ip(_ip(address[0]))
        return None if workload is None else self._tls_config(workload.identity)

    async def _client_for(self, identity: Identity) -> HboneClient:
        await self.certs.get(identity)
        tls = self._tls_config(identity)
        if tls is None:
            raise LocalError(f"no certificate for {identity}")
        client = self._clients.get(identity)
        if client is None or client.tls is not tls:
            # A rotated certificate: new tunnels use it; the old pool's connections drain.
            if client is not None:
                for conn in client.pool.connections():
                    conn.drain()
            client = self._clients[identity] = HboneClient(tls, mark=self._mark)
        return client

    # ------------------------------------------------------------------ reports

    def _refused(self, labels: ConnectionLabels, record: ConnectionRecord) -> None:
        self._opened(labels)
        self.metrics.failed(labels)
        self._closed(labels)
        self.access_log.record(record)

    def _report_refusal(self, refused: InboundRefused | OutboundRefused) -> None:
        _log_dry_run(refused.verdict, refused.record)
        if refused.labels is not None and refused.record is not None:
            self._refused(refused.labels, refused.record)

    # ---------------------------------------------------------------- inbound

    def _decide_inbound(self, request: InboundRequest) -> Allow | Deny:
        decision = inbound.decide_hbone(self.state, request, self.settings.cluster_id)
        if isinstance(decision, InboundRefused):
            self._report_refusal(decision)
            return Deny(decision.status, decision.reason)
        _log_dry_run(decision.verdict, decision.record)
        labels, record = decision.labels, decision.record
        attributes, workload = decision.attributes, decision.workload

        def on_leg(leg: TcpLeg) -> None:
            started = time.monotonic()
            self._opened(labels)

            def close(reason: str) -> None:
                if leg.conn is not None:
                    leg.conn.drop_leg(leg, reason)

            self._inbound[leg] = _Inbound(attributes, workload.uid, close)

            def done(leg: TcpLeg, error: str | None) -> None:
                self._inbound.pop(leg, None)
                self.metrics.received(labels, leg.bytes_out)
                self.metrics.sent(labels, leg.bytes_in)
                if error and error.startswith("upstream connect failed"):
                    self.metrics.failed(labels.with_response_flags(ResponseFlags.CONNECT))
                self._closed(labels)
                duration = time.monotonic() - started
                self.access_log.record(
                    record.finished(leg.bytes_in, leg.bytes_out, duration, error)
                )

            leg.on_done = done

        return Allow(decision.address, mark=self._mark, on_leg=on_leg)

    def _plain_inbound_protocol(self) -> asyncio.Protocol:
        return HeldConnection(self._on_plain_inbound)

    def _on_captured(
        self, transport: asyncio.Transport, peer: Address, local: Address, held: list[bytes]
    ) -> None:
        """A connection the capture steered to the outbound listener: its local address is the
        original destination."""
        self._spawn(self.outbound(transport, peer, local, early=held))

    def _on_plain_inbound(
        self, transport: asyncio.Transport, peer: Address, local: Address, held: list[bytes]
    ) -> None:
        self._spawn(self.inbound_plain(transport, peer, local, held))

    def _socks5_protocol(self) -> asyncio.Protocol:
        return Socks5Listener(self._service_address, self._socks5_connect)

    def _service_address(self, hostname: str) -> str | None:
        service = self.state.service_by_hostname(hostname)
        if service is None or not service.addresses:
            return None
        return str(service.addresses[0].address)

    def _socks5_connect(
        self,
        transport: asyncio.Transport,
        client: tuple[str, int],
        destination: tuple[str, int],
        early: list[bytes],
        reply: ReplyFn,
    ) -> None:
        self._spawn(self.outbound(transport, client, destination, early=early, reply=reply))

    async def inbound_plain(
        self,
        transport: asyncio.Transport,
        peer: tuple[str, int],
        local: tuple[str, int],
        early: list[bytes],
    ) -> None:
        decision = inbound.decide_plaintext(self.state, peer, local, self.settings.cluster_id)
        if isinstance(decision, InboundRefused):
            self._report_refusal(decision)
            transport.abort()
            return
        _log_dry_run(decision.verdict, decision.record)
        await self._relay_plain(
            transport,
            decision.address,
            decision.labels,
            decision.record,
            inbound=decision.attributes,
            workload=decision.workload,
            early=early,
        )

    async def _relay_plain(
        self,
        transport: asyncio.Transport,
        address: tuple[str, int],
        labels: ConnectionLabels,
        record: ConnectionRecord,
        *,
        inbound: ConnectionAttributes | None = None,
        workload: Workload | None = None,
        early: list[bytes],
        reply: ReplyFn | None = None,
    ) -> None:
        started = time.monotonic()
        key = object()

        def done(relay: PlainRelay, error: str | None) -> None:
            self._inbound.pop(key, None)
            self.metrics.received(labels, relay.bytes_from_client)
            self.metrics.sent(labels, relay.bytes_to_client)
            self._closed(labels)
            sent, received = relay.bytes_from_client, relay.bytes_to_client
            duration = time.monotonic() - started
            self.access_log.record(record.finished(sent, received, duration, error))

        relay = PlainRelay(done, half_close_timeout=self.settings.half_close_timeout)
        self._opened(labels)
        if inbound is not None and workload is not None:
            self._inbound[key] = _Inbound(inbound, workload.uid, relay.abort)
        try:
            await relay.connect(
                transport,
                address,
                mark=self._mark,
                early=early,
                reply=reply(Reply.SUCCEEDED, None) if reply else b"",
            )
        except (OSError, TimeoutError) as exc:
            self._inbound.pop(key, None)
            self.metrics.failed(labels.with_response_flags(ResponseFlags.CONNECT))
            self._closed(labels)
            self.access_log.record(record.failed(f"connect failed: {exc}"))
            if reply is not None:
                transport.write(reply(Reply.CONNECTION_REFUSED, None))
                transport.close()
            else:
                transport.abort()

    def _recheck_inbound(self) -> None:
        """Close open inbound connections that the current policies no longer allow."""
        for key, entry in list(self._inbound.items()):
            workload = self.state.workload(entry.workload_uid)
            if workload is None:
                entry.close("its workload left")
                continue
            verdict = evaluate(entry.attributes, self.state.policies_for(workload))
            if not verdict.allowed:
                log.info("closing %s: %s", entry.attributes, verdict.reason)
                self._inbound.pop(key, None)
                entry.close(f"policy changed: {verdict.reason}")

    # --------------------------------------------------------------- outbound

    async def outbound(
        self,
        transport: asyncio.Transport,
        client: tuple[str, int],
        destination: tuple[str, int],
        *,
        early: list[bytes],
        reply: ReplyFn | None = None,
    ) -> None:
        """One outbound connection (captured, or asked for through SOCKS5). `early` holds the
        client's bytes read so far; it may grow until the connection is handed over."""
        decision = outbound.decide(
            self.state,
            client,
            destination,
            pick=self._pick,
            cluster=self.settings.cluster_id,
            deny_unknown=self.settings.deny_unknown,
        )
        if isinstance(decision, OutboundRefused):
            log.info("outbound %s -> %s refused: %s", client, destination, decision.reason)
            self._report_refusal(decision)
            if reply is not None:
                transport.write(reply(Reply.NOT_ALLOWED, None))
                transport.close()
            else:
                transport.abort()
            return
        if isinstance(decision, Relay):
            _log_dry_run(decision.verdict, decision.record)
            await self._relay_plain(
                transport,
                decision.address,
                decision.labels,
                decision.record,
                inbound=decision.inbound,
                workload=decision.workload,
                early=early,
                reply=reply,
            )
            return
        route = decision.route
        if route.waypoint is not None:
            log.debug(
                "outbound %s -> %s via waypoint %s at %s",
                client,
                destination,
                route.waypoint.name,
                format_authority(*route.via),
            )
        await self._tunnel(transport, decision, early, reply)

    async def _tunnel(
        self,
        transport: asyncio.Transport,
        decision: OpenTunnel,
        early: list[bytes],
        reply: ReplyFn | None,
    ) -> None:
        started = time.monotonic()
        labels, record = decision.labels, decision.record
        leg = AppLeg()
        leg.held = early
        if reply is not None:
            leg.on_response = tunnel_response(reply)
        transport.set_protocol(leg)
        leg.connection_made(transport)
        self._opened(labels)

        def done(leg: TcpLeg, error: str | None) -> None:
            self.metrics.sent(labels, leg.bytes_in)
            self.metrics.received(labels, leg.bytes_out)
            self._closed(labels)
            duration = time.monotonic() - started
            self.access_log.record(record.finished(leg.bytes_in, leg.bytes_out, duration, error))

        leg.on_done = done
        try:
            hbone = await self._client_for(decision.source.identity)
            await hbone.open(leg, decision.tunnel)
        except TunnelRefused as exc:
            flags = ResponseFlags.DENY if exc.code == 401 else ResponseFlags.CONNECT
            self.metrics.failed(labels.with_response_flags(flags))
            leg.finished(str(exc))  # once: a no-op when the tunnel already reported it
        except ZtagentError as exc:
            self.metrics.failed(labels.with_response_flags(ResponseFlags.CONNECT))
            leg.finished(str(exc))
            if reply is not None and leg.transport is not None:
                leg.transport.write(reply(Reply.HOST_UNREACHABLE, None))
                leg.transport.close()
            else:
                leg.abort()

    # ------------------------------------------------------------------ admin

    def dump(self) -> Any:
        statuses = []
        for identity in sorted(self.state.local_identities(), key=str):
            cert = self.certs.get_cached(identity)
            error = self._cert_errors.get(identity)
            state = "available" if cert else ("failed" if error else "pending")
            statuses.append(CertificateStatus(identity, state, cert, error))
        return config_dump(
            self.state,
            statuses,
            config_source=self.config_source,
            node=self.settings.node_name,
        )


# ---------------------------------------------------------------------- helpers


def _log_dry_run(verdict: Verdict | None, record: ConnectionRecord | None) -> None:
    for name in verdict.dry_run_matches if verdict is not None else ():
        where = f"{record.src_addr} -> {record.dst_addr}" if record is not None else ""
        log.info("dry-run policy %s matched %s", name, where)
