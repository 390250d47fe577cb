"""How a node agent or a waypoint reaches the control plane: the gRPC target, the TLS
channel (the server verified against the root cert) and the bearer token and `clusterid`
headers ztunnel sends (`ControlPlaneConnection`, shared by xDS and the CA), and the node it
says it is (`node_identity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from ztagent.errors import LocalError
from ztagent.names import namespace_hostname
from ztagent.xds.gen.envoy.config.core.v3 import base_pb2

DEFAULT_ROOT_CA = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN_PATH = "/var/run/secrets/tokens/istio-token"


def node_identity(
    *, instance_ip: str, pod_name: str, pod_namespace: str, node_name: str, cluster_id: str
) -> base_pb2.Node:
    """ztunnel's node: id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` and its metadata."""
    node = base_pb2.Node(
        id=f"ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{namespace_hostname(pod_namespace)}"
    )
    node.metadata.update(
        {
            "NAME": pod_name,
            "NAMESPACE": pod_namespace,
            "INSTANCE_IPS": instance_ip,
            "NODE_NAME": node_name,
            "CLUSTER_ID": cluster_id,
        }
    )
    return node


def parse_address(text: str, flag: str) -> str:
    """`https://host:port` or `host:port` -> the gRPC target `host:port`."""
    target = text.strip()
    for scheme in ("https://", "grpcs://"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
    if target.startswith("http://"):
        raise LocalError(f"{flag}: plaintext ({text}) is not allowed; use https://")
    target = target.rstrip("/")
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise LocalError(f"{flag}: expected https://HOST:PORT or HOST:PORT, got {text!r}")
    return target


@dataclass(frozen=True, slots=True)
class ControlPlaneConnection:
    """How to reach and authenticate to the control plane (shared by xDS and the CA)."""

    target: str
    root_ca: Path
    token_path: Path
    cluster_id: str

    def channel(self) -> grpc.aio.Channel:
        try:
            roots = self.root_ca.read_bytes()
        except OSError as exc:
            raise LocalError(
                f"cannot read the control plane's root cert {self.root_ca}: {exc}"
            ) from None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(
            self.target,
            credentials,
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        try:
            token = self.token_path.read_text().strip()
        except OSError as exc:
            raise LocalError(f"cannot read the token {self.token_path}: {exc}") from None
        return (("authorization", f"Bearer {token}"), ("clusterid", self.cluster_id))
