"""`ztagent waypoint`: run one waypoint instance.

The waypoint connects to an istiod-compatible control plane (ours or istiod) with its own
service account token: delta xDS for workloads/services (where endpoints are) and for its L7
configuration (VirtualService, HTTPRoute, DestinationRule, AuthorizationPolicy,
RequestAuthentication, Services), and the CA for its own certificate. It listens for HBONE on
15008, and serves `/config_dump` (admin), `/metrics` (istio_requests_total and friends,
reporter="waypoint") and `/healthz/ready` (ready once config and certificate are there).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from ztagent.errors import LocalError
from ztagent.hbone.frames import format_authority, parse_authority
from ztagent.identity.spiffe import Identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WaypointSettings:
    xds_address: str
    ca_address: str
    xds_root_ca: str
    ca_root_ca: str
    token_path: str
    pod_name: str
    pod_namespace: str
    service_account: str
    instance_ip: str
    node_name: str
    gateway: str
    listen: tuple[str, int]
    admin_addr: tuple[str, int]
    metrics_addr: tuple[str, int]
    readiness_addr: tuple[str, int]
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    secret_ttl: timedelta = timedelta(hours=24)
    otlp_endpoint: str = ""
    log_format: str = "text"

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.pod_namespace, self.service_account)


# (flag, environment variable, default, help)
_FLAGS: list[tuple[str, str, str, str]] = [
    ("--xds-address", "XDS_ADDRESS", "", "control plane xDS, https://HOST:PORT (required)"),
    ("--ca-address", "CA_ADDRESS", "", "control plane CA, https://HOST:PORT (default: xDS)"),
    (
        "--xds-root-ca",
        "XDS_ROOT_CA",
        "/var/run/secrets/istio/root-cert.pem",
        "root certificate of the xDS server",
    ),
    (
        "--ca-root-ca",
        "CA_ROOT_CA",
        "/var/run/secrets/istio/root-cert.pem",
        "root certificate of the CA server",
    ),
    (
        "--token-path",
        "TOKEN_PATH",
        "/var/run/secrets/tokens/istio-token",
        "service account token (audience istio-ca) for xDS and the CA",
    ),
    ("--pod-name", "POD_NAME", "", "this waypoint's pod name"),
    ("--pod-namespace", "POD_NAMESPACE", "", "this waypoint's namespace (required)"),
    (
        "--service-account",
        "SERVICE_ACCOUNT",
        "",
        "this waypoint's service account (default: the gateway name, as Istio deploys it)",
    ),
    ("--instance-ip", "INSTANCE_IP", "", "this waypoint's pod IP"),
    ("--node-name", "NODE_NAME", "", "the node it runs on"),
    ("--gateway", "GATEWAY_NAME", "waypoint", "the Gateway (class istio-waypoint) it serves"),
    ("--listen", "HBONE_ADDR", "0.0.0.0:15008", "HBONE listener"),
    ("--admin-addr", "ADMIN_ADDR", "127.0.0.1:15000", "admin API: /config_dump"),
    ("--metrics-addr", "METRICS_ADDR", "0.0.0.0:15020", "Prometheus metrics: /metrics"),
    ("--readiness-addr", "READINESS_ADDR", "0.0.0.0:15021", "readiness: /healthz/ready"),
    ("--trust-domain", "TRUST_DOMAIN", "cluster.local", "SPIFFE trust domain"),
    ("--cluster-id", "CLUSTER_ID", "Kubernetes", "cluster name (xDS node, metrics)"),
    ("--secret-ttl", "SECRET_TTL", "24h", "lifetime of the waypoint's certificate"),
    (
        "--otlp-endpoint",
        "OTLP_ENDPOINT",
        "",
        "export spans over OTLP/HTTP (JSON) to this http:// collector, e.g. http://HOST:4318",
    ),
    ("--log-format", "LOG_FORMAT", "text", "log format: text or json"),
]


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "waypoint",
        help="run a waypoint proxy (L7 routing and policy for services that opt in)",
        description="Run a waypoint: it terminates HBONE from node agents (port 15008), "
        "applies RequestAuthentication and AuthorizationPolicy attached by targetRefs, routes "
        "with VirtualService or HTTPRoute, applies DestinationRule traffic policy, and opens "
        "HBONE to the chosen endpoint's node agent. Services use it with the label "
        "istio.io/use-waypoint=<gateway name>. Every flag can also come from the environment "
        "variable named in its help; the flag wins.",
    )
    for flag, env, default, text in _FLAGS:
        parser.add_argument(
            flag,
            default=os.environ.get(env, default),
            help=f"{text} [env {env}; default {default or 'none'}]",
        )
    parser.set_defaults(handler=run)


def _address(value: str, flag: str) -> tuple[str, int]:
    try:
        return parse_authority(value)
    except ValueError as exc:
        raise LocalError(f"{flag} {value!r}: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> WaypointSettings:
    from ztagent.identity.command import parse_duration

    if not args.xds_address:
        raise LocalError("--xds-address is required (the control plane's https://HOST:PORT)")
    if not args.pod_namespace:
        raise LocalError("--pod-namespace is required")
    if args.otlp_endpoint and not args.otlp_endpoint.startswith("http://"):
        raise LocalError(f"--otlp-endpoint {args.otlp_endpoint!r}: only http:// is supported")
    from ztagent.node.xds import parse_address

    xds_address = parse_address(args.xds_address, "--xds-address")
    return WaypointSettings(
        xds_address=xds_address,
        ca_address=parse_address(args.ca_address, "--ca-address")
        if args.ca_address
        else xds_address,
        xds_root_ca=args.xds_root_ca,
        ca_root_ca=args.ca_root_ca,
        token_path=args.token_path,
        pod_name=args.pod_name,
        pod_namespace=args.pod_namespace,
        service_account=args.service_account or args.gateway,
        instance_ip=args.instance_ip,
        node_name=args.node_name,
        gateway=args.gateway,
        listen=_address(args.listen, "--listen"),
        admin_addr=_address(args.admin_addr, "--admin-addr"),
        metrics_addr=_address(args.metrics_addr, "--metrics-addr"),
        readiness_addr=_address(args.readiness_addr, "--readiness-addr"),
        trust_domain=args.trust_domain,
        cluster_id=args.cluster_id,
        secret_ttl=parse_duration(args.secret_ttl),
        otlp_endpoint=args.otlp_endpoint,
        log_format=args.log_format,
    )


def run(args: argparse.Namespace) -> int:
    import uvloop

    from ztagent.telemetry.accesslog import configure_logging

    settings = settings_from_args(args)
    configure_logging(args.log_level, settings.log_format)

    async def main() -> int:
        return await WaypointServer(settings).run()

    result: int = uvloop.run(main())
    return result


class WaypointServer:
    """The process: control plane clients, certificate, HBONE listener, admin servers."""

    def __init__(self, settings: WaypointSettings) -> None:
        from ztagent.hbone.client import HboneClient
        from ztagent.hbone.server import HboneServer
        from ztagent.hbone.tls import TlsConfig
        from ztagent.identity.manager import CertificateManager
        from ztagent.model.store import ProxyState
        from ztagent.node.xds import CaClient, ControlPlaneConnection, XdsClient, node_identity
        from ztagent.telemetry.admin import Readiness
        from ztagent.telemetry.requests import RequestMetrics
        from ztagent.telemetry.tracing import OtlpExporter
        from ztagent.waypoint.config import build_config
        from ztagent.waypoint.proxy import Waypoint
        from ztagent.xds.convert import ADDRESS_TYPE, L7_TYPE

        self.settings = s = settings
        self._build_config = build_config
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
        self._client_type = HboneClient
        self._tls_type = TlsConfig
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

    def _apply_addresses(self, snapshot: Any) -> None:
        change = self.state.replace(snapshot)
        log.info(
            "xDS addresses version %d: %d workloads, %d services",
            change.version,
            len(snapshot.workloads),
            len(snapshot.services),
        )
        self.waypoint.state_changed()

    def _apply_l7(self, objects: list[dict[str, Any]]) -> None:
        config = self._build_config(objects)
        self.waypoint.set_config(config)
        log.info("L7 config: %d objects, %d errors", len(objects), len(config.errors))

    # -------------------------------------------------------------- certificates

    def _tls_config(self) -> Any:
        cert = self.certs.get_cached(self.identity)
        if cert is None:
            return None
        if self._tls is None or self._tls.certificate is not cert:
            self._tls = self._tls_type(cert)
        return self._tls

    def _tls_for(self, _address: tuple[str, int]) -> Any:
        return self._tls_config()

    async def _hbone_client(self) -> Any:
        await self.certs.get(self.identity)
        tls = self._tls_config()
        if tls is None:
            raise LocalError(f"no certificate for {self.identity}")
        client = self._client
        if client is None or client.tls is not tls:
            if client is not None:
                for conn in client.pool.connections():
                    conn.drain()
            client = self._client = self._client_type(tls)
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
        from ztagent.telemetry.admin import (
            build_admin_server,
            build_metrics_server,
            build_readiness_server,
        )

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
