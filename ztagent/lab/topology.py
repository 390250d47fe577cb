"""The lab's plan as pure data: nodes, pods, addresses and names, all derived from `Settings`.

Two nodes (`node-a`, `node-b`) are network namespaces joined by veths to a bridge in an
underlay namespace. Each pod is a namespace with an `eth0` veth to its node, a /32 address
from its node's pod range and a default route via a link-local gateway (169.254.1.1, answered
by proxy ARP on the node side, as Calico does). Every namespace and link name starts with the
prefix; every address comes from the pod and underlay ranges, so the lab owns all of them.

Pods in the enrolled namespace `demo`: `a-sleep` (the caller), `a-echo`/`b-echo` (the `echo`
Service), `a-web1`/`b-web1` (app web v1) and `b-web2` (web v2) behind the `web` Service, which
uses the waypoint, and `b-waypt`, the waypoint itself (opted out of capture). `a-legacy` and
`b-legacy` are in `legacy`, not enrolled. Service VIPs come from the last /24 of the pod range.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ztagent.errors import LocalError
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.names import (
    ADMIN_PORT,
    CONTROL_MONITORING_PORT,
    CONTROL_PORT,
    HBONE_PORT,
    READINESS_PORT,
    STATS_PORT,
    service_hostname,
)

DEFAULT_PREFIX = "ztlab-"
DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_UNDERLAY_CIDR = "10.245.0.0/24"
TRUST_DOMAIN = DEFAULT_TRUST_DOMAIN
GATEWAY = "169.254.1.1"
APP_PORT = 8080
SERVICE_PORT = 80
ENROLLED_NAMESPACE = "demo"
LEGACY_NAMESPACE = "legacy"
SERVICE_HOST = service_hostname("echo", ENROLLED_NAMESPACE)
GRPC_PORT = 9090
WAYPOINT_NAME = "waypoint"
WAYPOINT_SERVICE_ACCOUNT = "waypoint"
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
METRICS_PORT = STATS_PORT
CONTROL_ADMIN_PORT = CONTROL_MONITORING_PORT
AGENT_NAMESPACE = "ztagent-system"
AGENT_SERVICE_ACCOUNT = "ztagent"
MAX_IFNAME = 15
MAX_POD_KEY = 9
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,7}$")


class LabError(LocalError):
    """A lab setting or step that cannot work; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    prefix: str = DEFAULT_PREFIX
    pod_cidr: str = DEFAULT_POD_CIDR
    underlay_cidr: str = DEFAULT_UNDERLAY_CIDR
    directory: Path = Path(".lab")


class _AdminPorts:
    """Where an agent or waypoint on `ip` serves its admin API, metrics and readiness."""

    ip: str

    @property
    def admin(self) -> tuple[str, int]:
        return (self.ip, ADMIN_PORT)

    @property
    def metrics(self) -> tuple[str, int]:
        return (self.ip, METRICS_PORT)

    @property
    def readiness(self) -> tuple[str, int]:
        return (self.ip, READINESS_PORT)


@dataclass(frozen=True)
class Node(_AdminPorts):
    name: str
    """The node name in the config (`node-a`)."""
    letter: str
    netns: str
    ip: str
    """Underlay address of the node's `eth0`."""
    underlay_port: str
    """The node veth's peer on the underlay bridge."""
    pod_cidr: str


@dataclass(frozen=True)
class Pod(_AdminPorts):
    key: str
    """Short name, unique in the lab (`a-sleep`); the namespace and host veth derive from it."""
    app: str
    node: str
    namespace: str
    netns: str
    ip: str
    host_veth: str
    version: str = "v1"
    account: str = ""
    """The service account; the app's name when empty."""
    waypoint: bool = False
    """The pod runs the waypoint proxy (`ztagent waypoint`) instead of the echo app."""
    grpc: bool = False
    """The echo app also serves gRPC on `GRPC_PORT`."""

    @property
    def enrolled(self) -> bool:
        """In the mesh: in the ambient namespace and not opted out (a waypoint is not captured)."""
        return self.namespace == ENROLLED_NAMESPACE and not self.waypoint

    @property
    def service_account(self) -> str:
        return self.account or self.app

    @property
    def labels(self) -> dict[str, str]:
        """The Pod object's labels."""
        if self.waypoint:
            return {LABEL_GATEWAY_NAME: WAYPOINT_NAME, LABEL_DATAPLANE_MODE: "none"}
        return {"app": self.app, "version": self.version}

    @property
    def identity(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uid(self) -> str:
        return f"Kubernetes//Pod/{self.namespace}/{self.key}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, APP_PORT)

    @property
    def grpc_address(self) -> tuple[str, int]:
        return (self.ip, GRPC_PORT)

    @property
    def hbone(self) -> tuple[str, int]:
        """Where a waypoint pod listens for HBONE."""
        return (self.ip, HBONE_PORT)


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target: int | str
    """A container port number, or the name of one."""
    app_protocol: str = ""


@dataclass(frozen=True)
class LabService:
    """A Kubernetes Service of the lab, in the enrolled namespace, with its own VIP."""

    name: str
    vip: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[ServicePort, ...]
    labels: tuple[tuple[str, str], ...] = ()
    namespace: str = ENROLLED_NAMESPACE

    @property
    def hostname(self) -> str:
        return service_hostname(self.name, self.namespace)

    def port(self, name: str) -> int:
        for port in self.ports:
            if port.name == name:
                return port.port
        raise LabError(f"service {self.name} has no port {name!r}")


@dataclass(frozen=True)
class Plan:
    settings: Settings
    underlay_netns: str
    bridge: str
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]
    services: tuple[LabService, ...]

    @property
    def service_vip(self) -> str:
        """The `echo` Service's VIP."""
        return self.service("echo").vip

    def service(self, name: str) -> LabService:
        for service in self.services:
            if service.name == name:
                return service
        raise LabError(f"no service {name!r} in the lab")

    @property
    def app_pods(self) -> tuple[Pod, ...]:
        """The pods that run the echo app (every pod but the waypoint)."""
        return tuple(p for p in self.pods if not p.waypoint)

    @property
    def waypoint(self) -> Pod:
        """The waypoint's pod."""
        return next(p for p in self.pods if p.waypoint)

    @property
    def directory(self) -> Path:
        return self.settings.directory

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def resources_dir(self) -> Path:
        """The Kubernetes/Istio YAML `ztagent control` serves (watched: edits apply)."""
        return self.directory / "config"

    @property
    def control_ip(self) -> str:
        """The control plane's address, on the underlay bridge (the underlay's .2)."""
        return str(ipaddress.ip_network(self.settings.underlay_cidr).network_address + 2)

    @property
    def control_address(self) -> tuple[str, int]:
        return (self.control_ip, CONTROL_PORT)

    @property
    def control_admin(self) -> tuple[str, int]:
        return (self.control_ip, CONTROL_ADMIN_PORT)

    def token_path(self, name: str) -> Path:
        """The token of a node agent (by node name) or of the waypoint (by pod key)."""
        return self.directory / "tokens" / f"{name}.token"

    @property
    def jwt_dir(self) -> Path:
        """The signing key the demo's RequestAuthentication trusts."""
        return self.directory / "jwt"

    @property
    def ca_dir(self) -> Path:
        return self.directory / "ca"

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def handover_socket(self, node: str) -> Path:
        """The node agent's hitless-upgrade socket (`ztagent node --handover-socket`), short
        enough for a Unix socket path wherever the lab directory is."""
        return Path("/run/ztagent") / f"{self.prefix}{node}.handover"

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace, in creation order."""
        return (
            self.underlay_netns,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods),
        )

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name!r} in the lab")

    def pod(self, key: str) -> Pod:
        for pod in self.pods:
            if pod.key == key:
                return pod
        raise LabError(f"no pod {key!r} in the lab (pods: {', '.join(p.key for p in self.pods)})")

    def pods_of(self, node: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.node == node)


@dataclass(frozen=True)
class PodSpec:
    key: str
    app: str
    node_letter: str
    namespace: str
    version: str = "v1"
    account: str = ""
    waypoint: bool = False
    grpc: bool = False


# In address order per node: new pods go at the end so existing addresses do not move.
POD_SPECS: tuple[PodSpec, ...] = (
    PodSpec("a-sleep", "sleep", "a", ENROLLED_NAMESPACE),
    PodSpec("a-echo", "echo", "a", ENROLLED_NAMESPACE),
    PodSpec("a-legacy", "legacy", "a", LEGACY_NAMESPACE),
    PodSpec("a-web1", "web", "a", ENROLLED_NAMESPACE, "v1", grpc=True),
    PodSpec("b-echo", "echo", "b", ENROLLED_NAMESPACE),
    PodSpec("b-legacy", "legacy", "b", LEGACY_NAMESPACE),
    PodSpec("b-web1", "web", "b", ENROLLED_NAMESPACE, "v1", grpc=True),
    PodSpec("b-web2", "web", "b", ENROLLED_NAMESPACE, "v2", grpc=True),
    PodSpec(
        "b-waypt",
        WAYPOINT_NAME,
        "b",
        ENROLLED_NAMESPACE,
        account=WAYPOINT_SERVICE_ACCOUNT,
        waypoint=True,
    ),
)
NODE_LETTERS = ("a", "b")


def lab_services(vip_range: ipaddress.IPv4Network) -> tuple[LabService, ...]:
    """The Services, VIPs in order from the first address of `vip_range`: `echo`, `web` (L7
    scenarios, through the waypoint) and `waypoint` (the address agents send web traffic to)."""
    base = vip_range.network_address
    return (
        LabService(
            name="echo",
            vip=str(base + 1),
            selector=(("app", "echo"),),
            ports=(ServicePort("http", SERVICE_PORT, "http"),),
        ),
        LabService(
            name="web",
            vip=str(base + 2),
            selector=(("app", "web"),),
            ports=(
                ServicePort("http", SERVICE_PORT, APP_PORT),
                ServicePort("grpc", GRPC_PORT, GRPC_PORT, "grpc"),
            ),
            labels=((LABEL_USE_WAYPOINT, WAYPOINT_NAME),),
        ),
        LabService(
            name=WAYPOINT_NAME,
            vip=str(base + 3),
            selector=((LABEL_GATEWAY_NAME, WAYPOINT_NAME),),
            ports=(ServicePort("mesh", HBONE_PORT, HBONE_PORT),),
        ),
    )


def _network(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise LabError(f"{what} {value!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise LabError(f"{what} {value!r}: only IPv4 ranges are supported")
    return net


def make_plan(settings: Settings) -> Plan:
    """The whole lab from its settings; raises `LabError` for settings that cannot work."""
    prefix = settings.prefix
    if not _PREFIX_RE.match(prefix):
        raise LabError(
            f"prefix {prefix!r}: 1 to 8 characters, lower-case letters, digits and '-', "
            "starting with a letter (names must fit Linux's 15-character interface names)"
        )
    pods_net = _network(settings.pod_cidr, "--pod-cidr")
    underlay = _network(settings.underlay_cidr, "--underlay-cidr")
    if pods_net.prefixlen > 22:
        raise LabError(f"--pod-cidr {pods_net}: must be /22 or larger (one /24 per node + VIPs)")
    if underlay.prefixlen > 27:
        raise LabError(f"--underlay-cidr {underlay}: must be /27 or larger")
    if pods_net.overlaps(underlay):
        raise LabError(f"--pod-cidr {pods_net} and --underlay-cidr {underlay} overlap")
    node_ranges = list(pods_net.subnets(new_prefix=24))
    nodes = tuple(
        Node(
            name=f"node-{letter}",
            letter=letter,
            netns=f"{prefix}node-{letter}",
            ip=str(underlay.network_address + 11 + i),
            underlay_port=f"{prefix}node-{letter}",
            pod_cidr=str(node_ranges[i + 1]),
        )
        for i, letter in enumerate(NODE_LETTERS)
    )
    pods: list[Pod] = []
    for letter in NODE_LETTERS:
        node = next(n for n in nodes if n.letter == letter)
        base = ipaddress.ip_network(node.pod_cidr).network_address
        specs = [s for s in POD_SPECS if s.node_letter == letter]
        for index, spec in enumerate(specs):
            if len(spec.key) > MAX_POD_KEY:
                raise LabError(f"pod key {spec.key!r} is longer than {MAX_POD_KEY} characters")
            pods.append(
                Pod(
                    key=spec.key,
                    app=spec.app,
                    node=node.name,
                    namespace=spec.namespace,
                    netns=f"{prefix}{spec.key}",
                    ip=str(base + 10 + index),
                    host_veth=f"{prefix}{spec.key}",
                    version=spec.version,
                    account=spec.account,
                    waypoint=spec.waypoint,
                    grpc=spec.grpc,
                )
            )
    for name in (*(p.host_veth for p in pods), *(n.underlay_port for n in nodes)):
        if len(name) > MAX_IFNAME:
            raise LabError(f"interface name {name!r} is longer than {MAX_IFNAME} characters")
    return Plan(
        settings=settings,
        underlay_netns=f"{prefix}underlay",
        bridge=f"{prefix}br",
        nodes=nodes,
        pods=tuple(pods),
        services=lab_services(node_ranges[-1]),
    )
