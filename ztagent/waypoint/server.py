"""The `ztagent waypoint` process: control plane clients, its certificate, the HBONE listener
and the admin, metrics and readiness servers around the `Waypoint` engine."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from ztagent.errors import LocalError
from ztagent.hbone.client import HboneClient
from ztagent.hbone.frames import format_authority
from ztagent.hbone.server import HboneServer
from ztagent.hbone.tls import TlsConfig
from ztagent.identity.manager import CertificateManager
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import ProxyState
from ztagent.telemetry.admin import (
    Readiness,
    build_admin_server,
    build_metrics_server,
    build_readiness_server,
)
from ztagent.telemetry.requests import RequestMetrics
from ztagent.telemetry.tracing import OtlpExporter
from ztagent.waypoint.config import build_config
from ztagent.waypoint.proxy import Waypoint
from ztagent.waypoint.settings import WaypointSettings
from ztagent.xds.adsclient import XdsClient
from ztagent.xds.caclient import CaClient
from ztagent.xds.connection import ControlPlaneConnection, node_identity
from ztagent.xds.convert import ADDRESS_TYPE, L7_TYPE

log = logging.getLogger(__name__)


class WaypointServer:
    """The process: control plane clients, certificate, HBONE listener, admin servers."""

    def __init__(self, settings: WaypointSettings) -> None:
        self.settings = s = settings
        self.identity = s.identity
        self.state = ProxyState(s.node_name)
        self.readiness = Readiness("config", "certificate")
        self.metrics = RequestMetrics()
        self.exporter = (
            OtlpExporter(s.otlp_endpoint, f"{s.gateway}.{s.pod_namespace}")
            if s.otlp_endpoint
            else None
        )
        self.ca = CaClient(
            ControlPlaneConnection(
                s.ca_address, Path(s.ca_root_ca), Path(s.token_path), s.cluster_id
            ),
            s.secret_ttl,
        )
        self.certs = CertificateManager(self.ca.fetch)
        self._tls: TlsConfig | None = None
        self._client: HboneClient | None = None
        self.waypoint = Waypoint(
            gateway=(s.pod_namespace, s.gateway),
            identity=self.identity,
            state=self.state,
            client_for=self._hbone_client,
            metrics=self.metrics,
            exporter=self.exporter,
            cluster_id=s.cluster_id,
        )
        self.hbone = HboneServer(self._tls_for, self.waypoint.decide)
        node = node_identity(
            instance_ip=s.instance_ip,
            pod_name=s.pod_name,
            pod_namespace=s.pod_namespace,
            node_name=s.node_name,
            cluster_id=s.cluster_id,
        )
        self.xds = XdsClient(
            ControlPlaneConnection(
                s.xds_address, Path(s.xds_root_ca), Path(s.token_path), s.cluster_id
            ),
            node,
            self._apply_addresses,
            types=(ADDRESS_TYPE, L7_TYPE),
            on_l7=self._apply_l7,
        )
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -------------------------------------------------------------- config

    def _apply_addresses(self, snapshot: ConfigSnapshot) -> None:
        change = self.state.replace(snapshot)
        log.info(
            "xDS addresses version %d: %d workloads, %d services",
            change.version,
            len(snapshot.workloads),
            len(snapshot.services),
        )

    def _apply_l7(self, objects: list[dict[str, Any]]) -> None:
        config = build_config(objects)
        self.waypoint.set_config(config)
        log.info("L7 config: %d objects, %d errors", len(objects), len(config.errors))

    # -------------------------------------------------------------- certificates

    def _tls_config(self) -> TlsConfig | None:
        cert = self.certs.get_cached(self.identity)
        if cert is None:
            return None
        if self._tls is None or self._tls.certificate is not cert:
            self._tls = TlsConfig(cert)
        return self._tls

    def _tls_for(self, _address: tuple[str, int]) -> TlsConfig | None:
        return self._tls_config()

    async def _hbone_client(self) -> HboneClient:
        await self.certs.get(self.identity)
        tls = self._tls_config()
        if tls is None:
            raise LocalError(f"no certificate for {self.identity}")
        client = self._client
        if client is None or client.tls is not tls:
            if client is not None:
                for conn in client.pool.connections():
                    conn.drain()
            client = self._client = HboneClient(tls)
        return client

    # -------------------------------------------------------------- admin

    def dump(self) -> Any:
        config = self.waypoint.config
        return {
            "waypoint": {
                "gateway": f"{self.settings.pod_namespace}/{self.settings.gateway}",
                "identity": str(self.identity),
                "tunnels": self.waypoint.tunnels,
                "requests": self.waypoint.requests,
                "upstream_connections": self.waypoint.upstreams.connections(),
            },
            "xds": {
                "address": self.settings.xds_address,
                "connected": self.xds.connected,
                "last_error": self.xds.last_error,
            },
            "services": [s.key for s in self.state.services],
            "workloads": [w.uid for w in self.state.workloads],
            "l7": config.summary(),
            "errors": [str(e) for e in config.errors],
        }

    # -------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        servers = [
            build_admin_server(self.dump, self._stop.set),
            build_metrics_server(self.metrics.render),
            build_readiness_server(self.readiness.ready, self.readiness.reason),
        ]
        for server, address in zip(
            servers, (s.admin_addr, s.metrics_addr, s.readiness_addr), strict=True
        ):
            try:
                await server.start(*address)
            except OSError as exc:
                where = format_authority(*address)
                raise LocalError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self.certs.start()
        self._spawn(self._certificate())
        self._spawn(self.xds.run())
        if self.exporter is not None:
            self.exporter.start()
        log.info("waiting for the first xDS sync from %s", s.xds_address)
        await self.xds.synced.wait()
        self.readiness.done("config")
        await self.hbone.listen(*s.listen)
        log.info(
            "waypoint %s/%s (%s) listening for HBONE on %s",
            s.pod_namespace,
            s.gateway,
            self.identity,
            format_authority(*s.listen),
        )
        try:
            await self._stop.wait()
        finally:
            await self.hbone.drain(timeout=5.0)
            self.waypoint.close()
            if self._client is not None:
                self._client.close()
            if self.exporter is not None:
                await self.exporter.close()
            for task in list(self._tasks):
                task.cancel()
            await self.certs.stop()
            await self.ca.close()
            for server in servers:
                await server.close()
        return 0

    async def _certificate(self) -> None:
        while True:
            try:
                await self.certs.get(self.identity)
            except Exception as exc:
                log.error("certificate for %s: %s; retrying", self.identity, exc)
                await asyncio.sleep(1.0)
                continue
            self.readiness.done("certificate")
            return

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
