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
import logging
import os
from typing import Any

from ztagent.errors import LocalError
from ztagent.hbone.frames import parse_authority
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.waypoint.settings import WaypointSettings

log = logging.getLogger(__name__)


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
    ("--trust-domain", "TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN, "SPIFFE trust domain"),
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
    from ztagent.xds.connection import parse_address

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
    from ztagent.fdlimit import raise_nofile_limit
    from ztagent.identity.manager import check_secret_ttl

    check_secret_ttl(settings.secret_ttl)
    raise_nofile_limit()
    from ztagent.waypoint.server import WaypointServer

    async def main() -> int:
        return await WaypointServer(settings).run()

    result: int = uvloop.run(main())
    return result
