"""The node agent's settings: one dataclass, read from flags and the environment in one place,
with ztunnel's variable names where one exists (flag wins over environment)."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ztagent.errors import LocalError
from ztagent.fields import parse_go_duration
from ztagent.hbone.frames import parse_authority
from ztagent.identity.command import parse_duration
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.names import (
    ADMIN_PORT,
    DEFAULT_ROOT_NAMESPACE,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
    SOCKS5_PORT,
    STATS_PORT,
)
from ztagent.xds.connection import DEFAULT_ROOT_CA, DEFAULT_TOKEN_PATH, parse_address

WORKLOADS = "workloads"  # bind on every local workload IP (loopback labs, tests)
OFF = "off"

Bind = tuple[str, int] | str  # an address, WORKLOADS or OFF


@dataclass(frozen=True)
class NodeSettings:
    local_xds_path: str
    node_name: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    secret_ttl: timedelta = timedelta(hours=24)
    log_format: str = "text"
    ca_dir: str = "/var/run/ztagent/ca"
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    outbound_addr: Bind = ("0.0.0.0", OUTBOUND_PORT)
    inbound_addr: Bind = ("0.0.0.0", HBONE_PORT)
    inbound_plaintext_addr: Bind = ("0.0.0.0", INBOUND_PLAINTEXT_PORT)
    socks5_addr: Bind = ("127.0.0.1", SOCKS5_PORT)
    admin_addr: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_addr: tuple[str, int] = ("0.0.0.0", STATS_PORT)
    readiness_addr: tuple[str, int] = ("0.0.0.0", READINESS_PORT)
    deny_unknown: bool = False
    drain_timeout: float = 5.0
    handover_socket: str = ""
    """Unix socket for hitless upgrades (see `ztagent.node.handover`); empty: none."""
    half_close_timeout: float = 60.0
    capture: bool = False
    uplink: str = "eth0"
    # SO_MARK on the agent's own connections, so capture never steers them back to it.
    mark: int = 0x539
    kernel_headers: str | None = None
    xds_address: str = ""
    """gRPC target `host:port` of an istiod-compatible xDS server; empty: local config."""
    ca_address: str = ""
    """gRPC target of an istiod-compatible CA; empty: the embedded CA."""
    xds_root_ca: str = DEFAULT_ROOT_CA
    ca_root_ca: str = DEFAULT_ROOT_CA
    token_path: str = DEFAULT_TOKEN_PATH
    pod_name: str = ""
    pod_namespace: str = ""
    instance_ip: str = ""


# (flag, environment variable or None, default, help)
_FLAGS: list[tuple[str, str | None, str, str]] = [
    (
        "--local-xds-path",
        "LOCAL_XDS_PATH",
        "",
        "ztunnel local-config YAML with workloads, services and policies; watched for changes",
    ),
    ("--node-name", "NODE_NAME", "", "this node's name: workloads with this node are local"),
    ("--trust-domain", "TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN, "SPIFFE trust domain"),
    ("--cluster-id", "CLUSTER_ID", "Kubernetes", "cluster name for metrics and baggage"),
    ("--secret-ttl", "SECRET_TTL", "24h", "lifetime of workload certificates (e.g. 24h, 90m)"),
    ("--log-format", "LOG_FORMAT", "text", "log format: text or json"),
    (
        "--xds-address",
        "XDS_ADDRESS",
        "",
        "istiod-compatible xDS server, https://HOST:PORT (instead of --local-xds-path)",
    ),
    (
        "--ca-address",
        "CA_ADDRESS",
        "",
        "istiod-compatible CA, https://HOST:PORT (default: the embedded CA in --ca-dir)",
    ),
    (
        "--xds-root-ca",
        "XDS_ROOT_CA",
        DEFAULT_ROOT_CA,
        "root certificate that signs the xDS server's certificate",
    ),
    (
        "--ca-root-ca",
        "CA_ROOT_CA",
        DEFAULT_ROOT_CA,
        "root certificate that signs the CA server's certificate",
    ),
    (
        "--token-path",
        "TOKEN_PATH",
        DEFAULT_TOKEN_PATH,
        "bearer token for the xDS server and the CA (re-read on every connection)",
    ),
    ("--pod-name", "POD_NAME", "", "this agent's pod name (xDS node id)"),
    ("--pod-namespace", "POD_NAMESPACE", "", "this agent's namespace (xDS node id)"),
    ("--instance-ip", "INSTANCE_IP", "", "this agent's IP (xDS node id)"),
    (
        "--ca-dir",
        None,
        "/var/run/ztagent/ca",
        "embedded CA directory in istiod's cacerts layout (created when missing)",
    ),
    ("--root-namespace", None, DEFAULT_ROOT_NAMESPACE, "namespace whose policies apply mesh-wide"),
    (
        "--outbound-addr",
        None,
        f"0.0.0.0:{OUTBOUND_PORT}",
        "transparent listener for captured outbound connections, or 'off'",
    ),
    (
        "--inbound-addr",
        None,
        f"0.0.0.0:{HBONE_PORT}",
        "HBONE listener; 'workloads' binds port 15008 on every local workload IP",
    ),
    (
        "--inbound-plaintext-addr",
        None,
        f"0.0.0.0:{INBOUND_PLAINTEXT_PORT}",
        "plaintext inbound listener; 'workloads' binds 15006 on every local workload IP; 'off'",
    ),
    (
        "--socks5-addr",
        None,
        f"127.0.0.1:{SOCKS5_PORT}",
        "SOCKS5 listener for clients that are not captured, or 'off'",
    ),
    (
        "--admin-addr",
        None,
        f"127.0.0.1:{ADMIN_PORT}",
        "admin API: /config_dump, /logging, /quitquitquit",
    ),
    (
        "--metrics-addr",
        None,
        f"0.0.0.0:{STATS_PORT}",
        "Prometheus metrics: /metrics, /stats/prometheus",
    ),
    ("--readiness-addr", None, f"0.0.0.0:{READINESS_PORT}", "readiness: /healthz/ready"),
    (
        "--unknown-destination",
        None,
        "passthrough",
        "what to do with connections to addresses not in the mesh: passthrough or deny",
    ),
    (
        "--drain-timeout",
        "CONNECTION_TERMINATION_DEADLINE",
        "5",
        "how long open connections may take to finish on shutdown or handover (seconds, or a "
        "duration such as 25s)",
    ),
    (
        "--handover-socket",
        None,
        "",
        "Unix socket for hitless upgrades: an agent started with the same path takes over "
        "from the running one without dropping a connection (default: none)",
    ),
    (
        "--half-close-timeout",
        None,
        "60",
        "seconds a plain relay waits in silence for the other side after one side's FIN",
    ),
    ("--uplink", None, "eth0", "the node's uplink device, for inbound capture (with --capture)"),
    ("--mark", None, "0x539", "SO_MARK of the agent's own connections (with --capture)"),
    (
        "--kernel-headers",
        "BCC_KERNEL_SOURCE",
        "",
        "kernel build tree BCC compiles against (default: found, or built from Debian's headers)",
    ),
]


def add_flags(parser: argparse.ArgumentParser) -> None:
    for flag, env, default, text in _FLAGS:
        where = f" [env {env}]" if env else ""
        parser.add_argument(
            flag, default=None, help=f"{text} (default: {default or 'none'}){where}"
        )
    parser.add_argument(
        "--capture",
        action="store_true",
        help="capture enrolled pods' traffic with eBPF in this network namespace (needs root)",
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="remove capture leftovers (filters, rules, routes) of an earlier agent, then exit",
    )


def _value(args: argparse.Namespace, flag: str) -> str:
    for name, env, default, _ in _FLAGS:
        if name == flag:
            given = getattr(args, flag.lstrip("-").replace("-", "_"))
            if given is not None:
                return str(given)
            if env and os.environ.get(env):
                return os.environ[env]
            return default
    raise KeyError(flag)


def _address(flag: str, text: str, special: tuple[str, ...] = ()) -> Any:
    if text in special:
        return text
    try:
        return parse_authority(text)
    except ValueError as exc:
        raise LocalError(f"{flag}: {exc}") from None


def from_args(args: argparse.Namespace) -> NodeSettings:

    def v(flag: str) -> str:
        return _value(args, flag)

    xds_address = parse_address(v("--xds-address"), "--xds-address") if v("--xds-address") else ""
    ca_address = parse_address(v("--ca-address"), "--ca-address") if v("--ca-address") else ""
    if bool(v("--local-xds-path")) == bool(xds_address):
        raise LocalError(
            "give the configuration with exactly one of --local-xds-path (LOCAL_XDS_PATH) and "
            "--xds-address (XDS_ADDRESS)"
        )
    if v("--log-format") not in ("text", "json"):
        raise LocalError(f"--log-format must be text or json, not {v('--log-format')!r}")
    if v("--unknown-destination") not in ("passthrough", "deny"):
        raise LocalError("--unknown-destination must be passthrough or deny")
    try:
        mark = int(v("--mark"), 0)
    except ValueError:
        raise LocalError(f"--mark: {v('--mark')!r} is not a number") from None
    drain = _seconds("--drain-timeout", v("--drain-timeout"))
    half_close = _seconds("--half-close-timeout", v("--half-close-timeout"))
    return NodeSettings(
        local_xds_path=v("--local-xds-path"),
        node_name=v("--node-name"),
        trust_domain=v("--trust-domain"),
        cluster_id=v("--cluster-id"),
        secret_ttl=parse_duration(v("--secret-ttl")),
        log_format=v("--log-format"),
        ca_dir=v("--ca-dir"),
        root_namespace=v("--root-namespace"),
        outbound_addr=_address("--outbound-addr", v("--outbound-addr"), (OFF,)),
        inbound_addr=_address("--inbound-addr", v("--inbound-addr"), (WORKLOADS,)),
        inbound_plaintext_addr=_address(
            "--inbound-plaintext-addr", v("--inbound-plaintext-addr"), (WORKLOADS, OFF)
        ),
        socks5_addr=_address("--socks5-addr", v("--socks5-addr"), (OFF,)),
        admin_addr=_address("--admin-addr", v("--admin-addr")),
        metrics_addr=_address("--metrics-addr", v("--metrics-addr")),
        readiness_addr=_address("--readiness-addr", v("--readiness-addr")),
        deny_unknown=v("--unknown-destination") == "deny",
        drain_timeout=drain,
        handover_socket=v("--handover-socket"),
        half_close_timeout=half_close,
        capture=bool(getattr(args, "capture", False)),
        uplink=v("--uplink"),
        mark=mark,
        kernel_headers=v("--kernel-headers") or None,
        xds_address=xds_address,
        ca_address=ca_address,
        xds_root_ca=v("--xds-root-ca"),
        ca_root_ca=v("--ca-root-ca"),
        token_path=v("--token-path"),
        pod_name=v("--pod-name") or socket.gethostname(),
        pod_namespace=v("--pod-namespace") or DEFAULT_ROOT_NAMESPACE,
        instance_ip=v("--instance-ip"),
    )


def _seconds(flag: str, text: str) -> float:
    """Seconds from a number (`25`) or a Go duration (`25s`, as ztunnel's variables take)."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = float(parse_go_duration(text))
        except ValueError:
            raise LocalError(f"{flag}: {text!r} is not a number of seconds or a duration") from None
    if not 0 <= seconds < 86400:
        raise LocalError(f"{flag}: {text!r} must be between 0 and 24h")
    return seconds
