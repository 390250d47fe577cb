"""`ztagent control` at scale: cold translation, memory, push time and ACK time.

    .venv/bin/python -m benchmarks.bench_control [--quick] [--json out.json]
    .venv/bin/python -m benchmarks.bench_control --pods 1000 --services 500 --policies 200 \\
        --namespaces 20 --nodes 10 --clients 1,10 --edits 10

One run (see benchmarks/README.md):

1. generates a directory of YAML (Namespaces, Pods, Services, AuthorizationPolicies; one
   file per namespace and kind) in a temporary directory;
2. in this process: `read_directory`, `translate_resources`, `build_resources` of it, the
   resource counts and their serialized size, and `ControlPlane.apply_now()` (translate +
   build + diff for every attached stream) for the full config and after one-object edits;
3. starts `ztagent control` on the empty directory (baseline) and on the generated one, and
   reads each one's RSS once it answers 200 on /ready;
4. connects real `XdsClient`s (TLS, bearer tokens of node agents) to the second one, times
   their initial sync, then edits one file at a time (an AuthorizationPolicy, a Pod label)
   and times the change from the write to every client's `on_update` with the new content
   and to every client's ACK having been written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import ipaddress
import json
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml

from benchmarks.bench_tunnels import percentile
from benchmarks.common import LOOPBACK, Metric, free_port
from benchmarks.pairs import Launcher, PairFailed, Proc
from ztagent.control.auth import TOKEN_SIGNING_KEY, TokenSigner
from ztagent.control.server import DEBOUNCE_AFTER, ControlPlane
from ztagent.control.sources import SourceBatch, parse_documents, read_directory
from ztagent.control.translate import TranslateOptions, translate_resources
from ztagent.control.xds import build_resources
from ztagent.identity.ca import ROOT_CERT, CertificateAuthority
from ztagent.istio.envelope import Resource
from ztagent.model.policy import Authorization
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.xds.adsclient import XdsClient
from ztagent.xds.client import DeltaClient
from ztagent.xds.connection import ControlPlaneConnection, node_identity
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.stream import ADDRESS_TYPE, AUTHORIZATION_TYPE, DeltaStream

T = TypeVar("T")
MIB = 1024 * 1024
TRUST_DOMAIN = "cluster.local"
CLUSTER_ID = "Kubernetes"
POLL_INTERVAL = 0.25  # ControlSettings.poll_interval: how often the directory is checked
NODE_AGENT = ("istio-system", "ztunnel")  # in the default --trusted-node-agents
READY_TIMEOUT = 120.0
SYNC_TIMEOUT = 120.0
EDIT_TIMEOUT = 15.0
SETTLE_SECONDS = 1.0
MAX_EDIT_FAILURES = 3


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    pods: int
    services: int
    policies: int
    namespaces: int
    nodes: int


@dataclass(frozen=True)
class Settings:
    quick: bool
    sizes: Sizes
    clients: tuple[int, ...]
    edits: int
    repeats: int
    sync_repeats: int
    seed: int


FULL = Sizes(pods=1000, services=500, policies=200, namespaces=20, nodes=10)
QUICK = Sizes(pods=60, services=30, policies=12, namespaces=3, nodes=3)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_control",
        description=(__doc__ or "").split("\n")[0],
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes ({QUICK.pods} pods, {QUICK.services} services, {QUICK.policies} "
        "policies), 1 and 3 clients, 3 edits: a smoke run of some 15 s",
    )
    parser.add_argument("--pods", type=int, help=f"default {FULL.pods}")
    parser.add_argument("--services", type=int, help=f"default {FULL.services}")
    parser.add_argument("--policies", type=int, help=f"default {FULL.policies}")
    parser.add_argument("--namespaces", type=int, help=f"default {FULL.namespaces}")
    parser.add_argument("--nodes", type=int, help=f"default {FULL.nodes}")
    parser.add_argument(
        "--clients",
        help="connected clients for the push measurements, ascending (default 1,10; --quick 1,3)",
    )
    parser.add_argument("--edits", type=int, help="edits of each kind per client count (10)")
    parser.add_argument(
        "--repeats", type=int, help="repeats of the in-process timings, median (default 3)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the edit timing jitter")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    sizes = Sizes(
        pods=args.pods if args.pods is not None else base.pods,
        services=args.services if args.services is not None else base.services,
        policies=args.policies if args.policies is not None else base.policies,
        namespaces=args.namespaces if args.namespaces is not None else base.namespaces,
        nodes=args.nodes if args.nodes is not None else base.nodes,
    )
    if not 1 <= sizes.namespaces <= 99:
        parser.error("--namespaces must be between 1 and 99")
    if not 1 <= sizes.nodes <= 10_000:
        parser.error("--nodes must be between 1 and 10000")
    for name in ("pods", "services", "policies"):
        value = getattr(sizes, name)
        if not sizes.namespaces <= value <= 100_000:
            parser.error(f"--{name} must be between --namespaces and 100000")
    clients_text = args.clients or ("1,3" if args.quick else "1,10")
    try:
        clients = tuple(int(c) for c in clients_text.split(","))
    except ValueError:
        parser.error(f"--clients: expected numbers separated by commas, got {clients_text!r}")
    if not clients or list(clients) != sorted(set(clients)) or not 1 <= clients[0] <= clients[-1]:
        parser.error("--clients: ascending distinct numbers, at least 1")
    if clients[-1] > 100:
        parser.error("--clients: at most 100")
    edits = args.edits if args.edits is not None else (3 if args.quick else 10)
    if not 1 <= edits <= 100:
        parser.error("--edits must be between 1 and 100")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if not 1 <= repeats <= 20:
        parser.error("--repeats must be between 1 and 20")
    settings = Settings(
        quick=args.quick,
        sizes=sizes,
        clients=clients,
        edits=edits,
        repeats=repeats,
        sync_repeats=2 if args.quick else 3,
        seed=args.seed,
    )
    return settings, args.json


# --------------------------------------------------------------------------- the YAML


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one (larger ones first)."""
    share, extra = divmod(total, parts)
    return [share + (1 if i < extra else 0) for i in range(parts)]


def namespace_name(index: int) -> str:
    return f"ns-{index:02d}"


@dataclass(frozen=True)
class Edit:
    """What the edited objects (first Pod and first policy of the first namespace) carry."""

    pod_version: str = "v1"
    policy_port: int = 8080


@dataclass
class Layout:
    """The generated directory: file name -> documents, and the objects the edits touch."""

    sizes: Sizes
    files: dict[str, list[dict[str, Any]]]
    pod_file: str
    policy_file: str
    edited_pod: tuple[str, str]  # namespace, name
    edited_policy: tuple[str, str]


def generate(sizes: Sizes, edit: Edit = Edit()) -> Layout:
    pods = spread(sizes.pods, sizes.namespaces)
    services = spread(sizes.services, sizes.namespaces)
    policies = spread(sizes.policies, sizes.namespaces)
    files: dict[str, list[dict[str, Any]]] = {}
    files["namespaces.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": namespace_name(n),
                "labels": {"istio.io/dataplane-mode": "ambient"},
            },
        }
        for n in range(sizes.namespaces)
    ]
    pod_ip = ipaddress.IPv4Address("10.128.0.1")
    service_ip = ipaddress.IPv4Address("10.96.0.1")
    pod_index = service_index = 0
    for n in range(sizes.namespaces):
        ns = namespace_name(n)
        apps = services[n]
        docs: list[dict[str, Any]] = []
        for j in range(pods[n]):
            first = n == 0 and j == 0
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"pod-{j}",
                        "namespace": ns,
                        "labels": {
                            "app": f"app-{j % apps}",
                            "version": edit.pod_version if first else "v1",
                        },
                    },
                    "spec": {
                        "nodeName": f"node-{pod_index % sizes.nodes}",
                        "serviceAccountName": f"sa-{j % 5}",
                        "containers": [
                            {
                                "name": "app",
                                "ports": [{"name": "http", "containerPort": 8080}],
                            }
                        ],
                    },
                    "status": {
                        "podIP": str(pod_ip + pod_index),
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
            pod_index += 1
        files[f"{ns}-pods.yaml"] = docs
        files[f"{ns}-services.yaml"] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{k}", "namespace": ns},
                "spec": {
                    "selector": {"app": f"app-{k}"},
                    "clusterIP": str(service_ip + service_index + k),
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": "http"},
                        {"name": "grpc", "port": 9090},
                    ],
                },
            }
            for k in range(apps)
        ]
        service_index += apps
        docs = []
        for m in range(policies[n]):
            first = n == 0 and m == 0
            deny = m % 4 == 3
            rule: dict[str, Any] = (
                {"from": [{"source": {"ipBlocks": [f"192.0.2.{m % 250}/32"]}}]}
                if deny
                else {
                    "from": [
                        {
                            "source": {
                                "principals": [f"{TRUST_DOMAIN}/ns/{ns}/sa/sa-{m % 5}"],
                                "namespaces": [ns],
                            }
                        }
                    ],
                    "to": [
                        {
                            "operation": {
                                "ports": [str(edit.policy_port if first else 8080 + m % 10)]
                            }
                        }
                    ],
                }
            )
            docs.append(
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "AuthorizationPolicy",
                    "metadata": {"name": f"pol-{m}", "namespace": ns},
                    "spec": {
                        "selector": {"matchLabels": {"app": f"app-{m % apps}"}},
                        "action": "DENY" if deny else "ALLOW",
                        "rules": [rule],
                    },
                }
            )
        files[f"{ns}-policies.yaml"] = docs
    ns0 = namespace_name(0)
    return Layout(
        sizes,
        files,
        pod_file=f"{ns0}-pods.yaml",
        policy_file=f"{ns0}-policies.yaml",
        edited_pod=(ns0, "pod-0"),
        edited_policy=(ns0, "pol-0"),
    )


def render(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def write_atomically(path: Path, text: str) -> None:
    """Write as editors and ConfigMap updates do: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: the directory reader skips it
    tmp.write_text(text)
    os.replace(tmp, path)


def write_layout(layout: Layout, directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, docs in layout.files.items():
        text = render(docs)
        (directory / name).write_text(text)
        total += len(text.encode())
    return total


# --------------------------------------------------------------------------- what changed


def policy_ports(policy: Authorization) -> set[int]:
    return {
        port
        for rule in policy.rules
        for clause in rule.clauses
        for match in clause.matches
        for port in match.destination_ports
    }


def has_policy_port(snapshot: ConfigSnapshot, key: tuple[str, str], port: int) -> bool:
    for policy in snapshot.policies:
        if (policy.namespace, policy.name) == key:
            return port in policy_ports(policy)
    return False


def has_pod_revision(snapshot: ConfigSnapshot, key: tuple[str, str], revision: str) -> bool:
    for workload in snapshot.workloads:
        if (workload.namespace, workload.name) == key:
            return workload.canonical_revision == revision
    return False


Check = Callable[[ConfigSnapshot], bool]


@dataclass(frozen=True)
class Change:
    """One edit: the file to rewrite with its new text, and how a client recognizes it."""

    kind: str  # "policy" or "pod"
    file: str
    text: str
    check: Check


def make_change(layout: Layout, kind: str, sequence: int) -> Change:
    """Edit `sequence` (1, 2, ...) of `kind`; every edit differs from the one before."""
    if kind == "policy":
        port = 20_000 + sequence
        edited = generate(layout.sizes, Edit(policy_port=port))
        key = layout.edited_policy
        return Change(
            kind,
            layout.policy_file,
            render(edited.files[layout.policy_file]),
            lambda s: has_policy_port(s, key, port),
        )
    revision = f"e{sequence}"
    edited = generate(layout.sizes, Edit(pod_version=revision))
    pod = layout.edited_pod
    return Change(
        kind,
        layout.pod_file,
        render(edited.files[layout.pod_file]),
        lambda s: has_pod_revision(s, pod, revision),
    )


# --------------------------------------------------------------------------- in-process


def timed(action: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    result = action()
    return result, time.perf_counter() - t0


def median_time(repeats: int, action: Callable[[], T]) -> tuple[T, float]:
    results = [timed(action) for _ in range(repeats)]
    return results[-1][0], statistics.median(t for _, t in results)


def replace_file(batch: SourceBatch, name: str, text: str) -> SourceBatch:
    """`batch` with the resources of file `name` read from `text` instead (same order)."""
    fresh = parse_documents(text, name)
    out: list[Resource] = []
    done = False
    for resource in batch.resources:
        if resource.file != name:
            out.append(resource)
        elif not done:
            out.extend(fresh.resources)
            done = True
    return SourceBatch(tuple(out), batch.errors + fresh.errors)


def response_resources(responses: list[ads.DeltaDiscoveryResponse]) -> int:
    return sum(len(r.resources) + len(r.removed_resources) for r in responses)


class Figures:
    """Every figure of the run by key, with the notes (problems met)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.samples: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.metrics: dict[str, Metric] = {}

    def set(self, metric: Metric, value: float) -> None:
        self.metrics[metric.key] = metric
        self.values[metric.key] = value

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def ms(key: str, title: str, digits: int = 1) -> Metric:
    return Metric(key, title, "ms", False, digits)


def count(key: str, title: str) -> Metric:
    return Metric(key, title, "", True, 0)


def cold_figures(
    directory: Path, layout: Layout, settings: Settings, figures: Figures
) -> SourceBatch:
    """read_directory / translate / build_resources, counts and sizes (this process)."""
    options = TranslateOptions(cluster_id=CLUSTER_ID, trust_domain=TRUST_DOMAIN)
    batch, read_s = median_time(settings.repeats, lambda: read_directory(directory))
    result, translate_s = median_time(
        settings.repeats, lambda: translate_resources(batch.resources, options)
    )
    snapshot = result.snapshot
    resources, build_s = median_time(settings.repeats, lambda: build_resources(snapshot))
    figures.set(ms("read_ms", "read_directory (YAML parse of every file)"), read_s * 1e3)
    figures.set(ms("translate_ms", "translate_resources"), translate_s * 1e3)
    figures.set(ms("build_ms", "build_resources (protobuf, digests)"), build_s * 1e3)
    figures.set(count("documents", "documents read"), len(batch.resources))
    figures.set(count("workloads", "workloads (Address)"), len(snapshot.workloads))
    figures.set(count("services", "services (Address)"), len(snapshot.services))
    figures.set(count("policies", "policies (Authorization)"), len(snapshot.policies))
    figures.set(
        count("config_errors", "resources rejected"), len(batch.errors) + len(snapshot.errors)
    )
    address_bytes = sum(len(r.body.value) for r in resources[ADDRESS_TYPE].values())
    authz_bytes = sum(len(r.body.value) for r in resources[AUTHORIZATION_TYPE].values())
    figures.set(
        Metric("address_bytes", "serialized Address resources", "B", False, 0), address_bytes
    )
    figures.set(
        Metric("authorization_bytes", "serialized Authorization resources", "B", False, 0),
        authz_bytes,
    )
    # One new client's full state: the two responses DeltaStream answers a wildcard with.
    stream = DeltaStream("bench")
    node = node_identity(
        instance_ip=LOOPBACK,
        pod_name="bench",
        pod_namespace=NODE_AGENT[0],
        node_name="node-0",
        cluster_id=CLUSTER_ID,
    )
    full = [
        response
        for request in DeltaClient(node).connect_requests()
        for response in stream.receive(request, resources)[0]
    ]
    figures.set(
        Metric("full_sync_bytes", "full-state responses of one client", "B", False, 0),
        sum(r.ByteSize() for r in full),
    )
    expected = {"workloads": layout.sizes.pods, "services": layout.sizes.services}
    expected["policies"] = layout.sizes.policies
    for key, want in expected.items():
        if figures.values[key] != want:
            figures.note(f"{key}: {figures.values[key]:.0f}, expected {want}")
    for error in (*batch.errors, *snapshot.errors):
        figures.note(f"config error: {error}")
    if not has_policy_port(snapshot, layout.edited_policy, Edit().policy_port):
        raise PairFailed(f"policy {layout.edited_policy} is not in the translation")
    if not has_pod_revision(snapshot, layout.edited_pod, Edit().pod_version):
        raise PairFailed(f"pod {layout.edited_pod} is not in the translation")
    return batch


async def apply_figures(
    batch: SourceBatch, layout: Layout, settings: Settings, figures: Figures
) -> None:
    """`ControlPlane.apply_now()` with the clients' streams attached (no network)."""
    options = TranslateOptions(cluster_id=CLUSTER_ID, trust_domain=TRUST_DOMAIN)
    streams = settings.clients[-1]
    cold: list[float] = []
    for _ in range(settings.repeats):
        plane = ControlPlane(options)
        plane.publish(batch)
        cold.append(timed(plane.apply_now)[1])
    figures.set(
        ms("apply_cold_ms", "apply_now, full config, no clients"), statistics.median(cold) * 1e3
    )

    plane = ControlPlane(options)
    plane.publish(batch)
    plane.apply_now()
    sent: list[list[ads.DeltaDiscoveryResponse]] = []
    node = node_identity(
        instance_ip=LOOPBACK,
        pod_name="bench",
        pod_namespace=NODE_AGENT[0],
        node_name="node-0",
        cluster_id=CLUSTER_ID,
    )
    sync_s: list[float] = []
    for i in range(streams):
        attached = plane.attach(DeltaStream(f"bench-{i}"), sent.append, f"bench-{i}")
        requests = DeltaClient(node).connect_requests()
        t0 = time.perf_counter()
        for request in requests:
            plane.receive(attached, request)
        sync_s.append(time.perf_counter() - t0)
    figures.set(
        ms("stream_sync_ms", "full-state responses for one new stream (DeltaStream)"),
        statistics.median(sync_s) * 1e3,
    )
    rounds = max(settings.repeats, 3)
    current = batch
    for kind in ("policy", "pod"):
        times: list[float] = []
        for sequence in range(1, rounds + 1):
            change = make_change(layout, kind, sequence)
            current = replace_file(current, change.file, change.text)  # edits add up
            plane.publish(current)
            sent.clear()
            times.append(timed(plane.apply_now)[1])
            pushed = [response_resources(r) for r in sent]
            if len(sent) != streams or any(n != 1 for n in pushed):
                figures.note(
                    f"apply_now after a {kind} edit pushed {pushed} resources to "
                    f"{len(sent)} of {streams} streams (expected 1 each)"
                )
        figures.set(
            ms(f"apply_{kind}_ms", f"apply_now after a {kind} edit, {streams} streams"),
            statistics.median(times) * 1e3,
        )
    plane.publish(batch)
    plane.apply_now()
    sent.clear()
    same: list[float] = []
    for _ in range(rounds):
        plane.publish(batch)
        same.append(timed(plane.apply_now)[1])
    if sent:
        figures.note(f"apply_now with no change pushed {len(sent)} responses")
    figures.set(
        ms("apply_same_ms", f"apply_now with no change, {streams} streams"),
        statistics.median(same) * 1e3,
    )


# --------------------------------------------------------------------------- the process


@dataclass
class Control:
    proc: Proc
    listen: int
    admin: int
    ready_s: float = 0.0

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, self.admin, timeout=5.0)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def check_alive(self) -> None:
        if not self.proc.alive():
            raise PairFailed(self.proc.failure())


def start_control(launcher: Launcher, name: str, config_dir: Path, ca_dir: Path) -> Control:
    listen, admin = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "ztagent",
        "control",
        "--config-dir",
        str(config_dir),
        "--ca-dir",
        str(ca_dir),
        "--listen",
        f"{LOOPBACK}:{listen}",
        "--admin",
        f"{LOOPBACK}:{admin}",
        "--trust-domain",
        TRUST_DOMAIN,
        "--cluster-id",
        CLUSTER_ID,
    ]
    t0 = time.perf_counter()
    control = Control(launcher.spawn(name, argv), listen, admin)
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        control.check_alive()
        try:
            status, _ = control.get("/ready")
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
        else:
            last = f"HTTP {status}"
            if status == 200:
                control.ready_s = time.perf_counter() - t0
                return control
        time.sleep(0.05)
    raise PairFailed(f"{name}: not ready after {READY_TIMEOUT:.0f}s ({last})")


_SAMPLE = re.compile(r"^(\w+)(?:\{[^}]*\})? ([0-9.eE+-]+)$")


def scrape(control: Control) -> dict[str, float]:
    """The control plane's /metrics, summed over labels: name -> value."""
    status, body = control.get("/metrics")
    if status != 200:
        raise PairFailed(f"/metrics answered {status}")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        match = _SAMPLE.match(line)
        if match:
            values[match[1]] = values.get(match[1], 0.0) + float(match[2])
    return values


# --------------------------------------------------------------------------- the clients


class BenchClient(XdsClient):
    """An `XdsClient` that timestamps the snapshot a change is awaited in, and its ACK.

    `XdsClient._stream` writes the ACK of a response (`call.write`) and then yields the
    response: the moment the generator yields is the moment the ACK was handed to gRPC.
    """

    def __init__(self, connection: ControlPlaneConnection, node_name: str) -> None:
        node = node_identity(
            instance_ip=LOOPBACK,
            pod_name=f"ztunnel-{node_name}",
            pod_namespace=NODE_AGENT[0],
            node_name=node_name,
            cluster_id=CLUSTER_ID,
        )
        super().__init__(connection, node, self._updated)
        self.name = node_name
        self.check: Check | None = None
        self.seen_at: float | None = None
        self.acked_at: float | None = None
        self.acks_at_seen = 0
        self.task: asyncio.Task[None] | None = None

    def expect(self, check: Check) -> None:
        self.check, self.seen_at, self.acked_at = check, None, None

    def _updated(self, snapshot: ConfigSnapshot) -> None:
        if self.check is not None and self.seen_at is None and self.check(snapshot):
            self.seen_at = time.perf_counter()
            self.acks_at_seen = self.core.acks

    async def _stream(self) -> AsyncIterator[ads.DeltaDiscoveryResponse]:
        async for response in super()._stream():
            if self.seen_at is not None and self.acked_at is None:
                self.acked_at = time.perf_counter()
            yield response


class SeparateChannel(ControlPlaneConnection):
    """A connection whose channel does not share its TCP connection with other channels.

    gRPC shares one subchannel (TCP connection) between channels to the same target with the
    same options; node agents are separate processes with a connection each.
    """

    def channel(self) -> Any:
        import grpc

        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_ca.read_bytes())
        return grpc.aio.secure_channel(
            self.target,
            credentials,
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )


class Clients:
    """The connected `BenchClient`s; every one is cancelled by `close`."""

    def __init__(self, control: Control, ca_dir: Path, workdir: Path, nodes: int) -> None:
        self.control = control
        self.ca_dir = ca_dir
        self.workdir = workdir
        self.nodes = nodes
        self.signer = TokenSigner(ca_dir / TOKEN_SIGNING_KEY, trust_domain=TRUST_DOMAIN)
        self.connected: list[BenchClient] = []
        self._made = 0

    def make(self) -> BenchClient:
        node = f"node-{self._made % self.nodes}"
        token_path = self.workdir / f"token-{self._made}"
        self._made += 1
        token_path.write_text(self.signer.issue(*NODE_AGENT, node=node))
        connection = SeparateChannel(
            f"{LOOPBACK}:{self.control.listen}", self.ca_dir / ROOT_CERT, token_path, CLUSTER_ID
        )
        return BenchClient(connection, node)

    async def sync(self, clients: list[BenchClient]) -> list[float]:
        """Start `clients` together; the seconds from the start to each one's sync."""
        t0 = time.perf_counter()
        done: list[float] = []

        async def one(client: BenchClient) -> None:
            await client.synced.wait()
            done.append(time.perf_counter() - t0)

        for client in clients:
            client.task = asyncio.create_task(client.run(), name=f"xds {client.name}")
        waiting = asyncio.gather(*(one(c) for c in clients))
        try:
            await self._bounded(waiting, SYNC_TIMEOUT, clients)
        except BaseException:
            for client in clients:
                await stop_client(client)
            raise
        return done

    async def _bounded(
        self, awaitable: asyncio.Future[Any], timeout: float, clients: list[BenchClient]
    ) -> None:
        deadline = time.monotonic() + timeout
        while not awaitable.done():
            self.control.check_alive()
            if time.monotonic() > deadline:
                awaitable.cancel()
                errors = {c.name: c.last_error for c in clients if not c.synced.is_set()}
                raise PairFailed(f"not synced after {timeout:.0f}s: {errors}")
            await asyncio.wait({awaitable}, timeout=0.2)
        awaitable.result()

    async def close(self) -> None:
        for client in self.connected:
            await stop_client(client)
        self.connected.clear()


async def stop_client(client: BenchClient) -> None:
    if client.task is not None:
        client.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(client.task, 5.0)
        client.task = None


@dataclass
class EditResult:
    update: list[float] = field(default_factory=list)  # write -> last client's on_update
    ack: list[float] = field(default_factory=list)  # write -> last client's ACK written
    per_client_update: list[float] = field(default_factory=list)  # every client, every edit
    failures: int = 0


async def run_edit(
    config_dir: Path, change: Change, clients: list[BenchClient], control: Control
) -> tuple[float, float, list[float]] | str:
    for client in clients:
        client.expect(change.check)
    path = config_dir / change.file
    t0 = time.perf_counter()
    write_atomically(path, change.text)
    deadline = time.monotonic() + EDIT_TIMEOUT
    while any(c.acked_at is None for c in clients):
        if time.monotonic() > deadline:
            late = [c.name for c in clients if c.acked_at is None]
            return f"{change.kind} edit: no ACK after {EDIT_TIMEOUT:.0f}s from {late}"
        control.check_alive()
        await asyncio.sleep(0.002)
    seen = [c.seen_at - t0 for c in clients if c.seen_at is not None]
    acked = [c.acked_at - t0 for c in clients if c.acked_at is not None]
    for client in clients:
        if client.core.acks < client.acks_at_seen:
            return f"{change.kind} edit: {client.name} counted no ACK"
        client.check = None
    return max(seen), max(acked), seen


async def edit_rounds(
    config_dir: Path,
    layout: Layout,
    clients: list[BenchClient],
    control: Control,
    settings: Settings,
    sequence: Iterator[int],
    rng: random.Random,
) -> dict[str, EditResult]:
    """`settings.edits` edits of each kind, alternating, each after a random pause of up to
    one poll interval (so the writes fall at every phase of the directory poll)."""
    results = {"policy": EditResult(), "pod": EditResult()}
    for _ in range(settings.edits):
        for kind, result in results.items():
            if result.failures >= MAX_EDIT_FAILURES:
                continue
            change = make_change(layout, kind, next(sequence))
            await asyncio.sleep(DEBOUNCE_AFTER + rng.uniform(0.0, POLL_INTERVAL))
            outcome = await run_edit(config_dir, change, clients, control)
            if isinstance(outcome, str):
                result.failures += 1
                print(f"    !! {outcome}", flush=True)
                # Wait for the change to land anyway, so the next edit starts clean.
                await asyncio.sleep(2.0)
                continue
            update, ack, per_client = outcome
            result.update.append(update)
            result.ack.append(ack)
            result.per_client_update.extend(per_client)
    return results


# --------------------------------------------------------------------------- the run


def rss_mib(proc: Proc) -> float:
    return proc.rss() / MIB


async def process_figures(
    launcher: Launcher,
    workdir: Path,
    config_dir: Path,
    layout: Layout,
    settings: Settings,
    figures: Figures,
) -> None:
    ca_dir = workdir / "ca"
    CertificateAuthority.load_or_create(ca_dir, TRUST_DOMAIN)
    TokenSigner(ca_dir / TOKEN_SIGNING_KEY, trust_domain=TRUST_DOMAIN)  # the key, before start
    empty_dir = workdir / "empty"
    empty_dir.mkdir()

    print("Starting ztagent control with an empty directory (baseline)", flush=True)
    empty = start_control(launcher, "control-empty", empty_dir, ca_dir)
    await asyncio.sleep(SETTLE_SECONDS)
    figures.set(Metric("ready_empty_s", "start to /ready, empty", "s", False, 2), empty.ready_s)
    figures.set(
        Metric("rss_empty_mib", "RSS after ready, empty", "MiB", False, 1), rss_mib(empty.proc)
    )
    empty.proc.stop()

    print("Starting ztagent control with the generated directory", flush=True)
    control = start_control(launcher, "control", config_dir, ca_dir)
    await asyncio.sleep(SETTLE_SECONDS)
    full_rss = rss_mib(control.proc)
    figures.set(
        Metric("ready_full_s", "start to /ready, full config", "s", False, 2), control.ready_s
    )
    figures.set(Metric("rss_full_mib", "RSS after ready, full config", "MiB", False, 1), full_rss)
    figures.set(
        Metric("rss_config_mib", "RSS of the config (full - empty)", "MiB", False, 1),
        full_rss - figures.values["rss_empty_mib"],
    )

    clients = Clients(control, ca_dir, workdir, layout.sizes.nodes)
    rng = random.Random(settings.seed)
    sequence = iter(range(1, 1_000_000))
    try:
        # A fresh client alone, several times: connect -> synced with the full config.
        alone: list[float] = []
        for _ in range(settings.sync_repeats):
            client = clients.make()
            alone.extend(await clients.sync([client]))
            await stop_client(client)
        figures.set(
            ms("sync_one_ms", "initial sync, one client alone", 0), statistics.median(alone) * 1e3
        )
        figures.samples["sync_one_ms"] = [t * 1e3 for t in alone]

        for target in settings.clients:
            new = [clients.make() for _ in range(target - len(clients.connected))]
            if new:
                times = await clients.sync(new)
                clients.connected.extend(new)
                if len(new) > 1:
                    figures.set(
                        ms(f"sync_{len(new)}_ms", f"initial sync, {len(new)} clients at once", 0),
                        max(times) * 1e3,
                    )
            print(f"  {target} client(s) synced; editing", flush=True)
            before = scrape(control)
            results = await edit_rounds(
                config_dir, layout, clients.connected, control, settings, sequence, rng
            )
            after = scrape(control)
            pushes = after.get("pilot_xds_push_time_count", 0) - before.get(
                "pilot_xds_push_time_count", 0
            )
            if pushes > 0:
                total = after["pilot_xds_push_time_sum"] - before.get("pilot_xds_push_time_sum", 0)
                figures.set(
                    ms(
                        f"server_push_ms_c{target}",
                        f"server push time (pilot_xds_push_time), {target} clients",
                    ),
                    total / pushes * 1e3,
                )
            for kind, result in results.items():
                record_edits(figures, kind, target, result, settings.edits)
            edits = sum(len(r.update) + r.failures for r in results.values())
            responses = after.get("pilot_xds_pushes_total", 0) - before.get(
                "pilot_xds_pushes_total", 0
            )
            if edits and responses != edits * target:
                figures.note(
                    f"{target} clients: {responses:.0f} responses for {edits} one-object "
                    f"edits (expected {edits * target}, one per client and edit)"
                )
            await check_server_acks(control, clients.connected, figures)
        figures.set(
            Metric(
                "rss_clients_mib",
                f"RSS after the edits, {settings.clients[-1]} clients",
                "MiB",
                False,
                1,
            ),
            rss_mib(control.proc),
        )
        figures.set(
            Metric("peak_rss_mib", "peak RSS (VmHWM)", "MiB", False, 1),
            control.proc.peak_rss() / MIB,
        )
    finally:
        await clients.close()


async def check_server_acks(control: Control, clients: list[BenchClient], figures: Figures) -> None:
    """The control plane counted as many ACKs from these clients as they sent (it may take a
    moment for the last ones to arrive)."""
    sent = sum(c.core.acks for c in clients)
    received = -1
    for _ in range(20):
        status, body = control.get("/debug/config_dump")
        if status == 200:
            received = sum(int(c.get("acks", 0)) for c in json.loads(body).get("clients", []))
            if received >= sent:
                return
        await asyncio.sleep(0.1)
    figures.note(f"the clients sent {sent} ACKs, the control plane counted {received}")


def record_edits(figures: Figures, kind: str, clients: int, result: EditResult, edits: int) -> None:
    label = f"{kind} edit, {clients} client{'s' if clients > 1 else ''}"
    if result.failures:
        figures.note(f"{label}: {result.failures} of the edits had no ACK in time")
    for what, samples in (("update", result.update), ("ack", result.ack)):
        if not samples:
            continue
        key = f"{kind}_{what}_c{clients}"
        figures.samples[f"{key}_ms"] = [t * 1e3 for t in samples]
        title = "on_update" if what == "update" else "ACK written"
        figures.set(
            ms(f"{key}_p50_ms", f"{label}: write -> {title}, median", 0),
            statistics.median(samples) * 1e3,
        )
        figures.set(
            ms(f"{key}_p95_ms", f"{label}: write -> {title}, p95", 0),
            percentile(samples, 0.95) * 1e3,
        )
    if result.per_client_update:
        figures.samples[f"{kind}_update_each_c{clients}_ms"] = [
            t * 1e3 for t in result.per_client_update
        ]
    if len(result.update) < edits:
        figures.note(f"{label}: {len(result.update)} of {edits} edits measured")


# --------------------------------------------------------------------------- report


SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Cold, in this process (median of --repeats)",
        (
            "read_ms",
            "translate_ms",
            "build_ms",
            "documents",
            "workloads",
            "services",
            "policies",
            "config_errors",
            "address_bytes",
            "authorization_bytes",
            "full_sync_bytes",
        ),
    ),
    (
        "Push computation, in this process (ControlPlane.apply_now: translate + build + diff)",
        (
            "apply_cold_ms",
            "apply_policy_ms",
            "apply_pod_ms",
            "apply_same_ms",
            "stream_sync_ms",
        ),
    ),
    (
        "ztagent control process",
        (
            "ready_empty_s",
            "ready_full_s",
            "rss_empty_mib",
            "rss_full_mib",
            "rss_config_mib",
            "rss_clients_mib",
            "peak_rss_mib",
        ),
    ),
]


def fmt(value: float, metric: Metric) -> str:
    return f"{value:,.{metric.digits}f}"


def print_report(settings: Settings, figures: Figures, yaml_bytes: int, files: int) -> None:
    s = settings.sizes
    print()
    print(
        f"Control plane: {s.pods} pods, {s.services} services, {s.policies} policies in "
        f"{s.namespaces} namespaces on {s.nodes} nodes ({files} files, "
        f"{yaml_bytes / MIB:.2f} MiB of YAML){' (quick)' if settings.quick else ''}"
    )

    def row(key: str) -> None:
        metric = figures.metrics.get(key)
        if metric is None or key not in figures.values:
            return
        unit = f" [{metric.unit}]" if metric.unit else ""
        print(f"  {metric.title + unit:<72}{fmt(figures.values[key], metric):>12}")

    for title, keys in SECTIONS:
        print()
        print(title)
        for key in keys:
            row(key)
    print()
    print("Initial sync over TLS (XdsClient.run() start -> synced, client decodes everything)")
    for key in sorted(k for k in figures.values if k.startswith("sync_")):
        row(key)
    print()
    print(
        f"File change -> clients, over {settings.edits} edits of each kind "
        f"(includes up to {POLL_INTERVAL * 1e3:.0f} ms of directory poll and "
        f"{DEBOUNCE_AFTER * 1e3:.0f} ms of debounce)"
    )
    print(f"  {'':<30}{'on_update p50':>14}{'p95':>8}{'ACK p50':>10}{'p95':>8}{'processing':>12}")
    for clients in settings.clients:
        for kind in ("policy", "pod"):
            values = [
                figures.values.get(f"{kind}_{what}_c{clients}_{q}_ms")
                for what in ("update", "ack")
                for q in ("p50", "p95")
            ]
            cells = "".join(
                f"{'-' if v is None else f'{v:,.0f}':>{w}}"
                for v, w in zip(values, (14, 8, 10, 8), strict=True)
            )
            net = figures.values.get(f"{kind}_net_c{clients}_ms")
            net_text = "-" if net is None else f"{net:,.0f}"
            label = f"{kind} edit, {clients} client{'s' if clients > 1 else ''} [ms]"
            print(f"  {label:<30}{cells}{net_text:>12}")
        server = figures.values.get(f"server_push_ms_c{clients}")
        if server is not None:
            print(
                f"  {'  server push time (mean)':<30}{server:>14,.1f} ms "
                "(pilot_xds_push_time: poll noticed -> queued, minus debounce)"
            )
    print(
        "  processing = mean on_update - debounce - mean poll wait "
        f"({POLL_INTERVAL * 1e3 / 2:.0f} ms): an estimate of the work and the transport"
    )
    if figures.notes:
        print()
        print("Notes")
        for note in figures.notes:
            print(f"  {note}")


def derive(settings: Settings, figures: Figures) -> None:
    """Mean write -> on_update minus the debounce and the mean wait for the next directory poll
    (the writes fall at random phases of the poll): an estimate of the rest, the work."""
    fixed = (DEBOUNCE_AFTER + POLL_INTERVAL / 2) * 1e3
    for clients in settings.clients:
        for kind in ("policy", "pod"):
            samples = figures.samples.get(f"{kind}_update_c{clients}_ms")
            if samples:
                figures.set(
                    ms(
                        f"{kind}_net_c{clients}_ms",
                        f"{kind} edit, {clients} clients: mean on_update - debounce - mean poll",
                        0,
                    ),
                    statistics.fmean(samples) - fixed,
                )


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": importlib.metadata.version("grpcio"),
        "protobuf": importlib.metadata.version("protobuf"),
        "pyyaml": importlib.metadata.version("pyyaml"),
    }


def write_json(
    path: Path, settings: Settings, figures: Figures, yaml_bytes: int, files: int
) -> None:
    data = {
        "settings": asdict(settings),
        "generated": {"files": files, "yaml_bytes": yaml_bytes},
        "fixed_delays_ms": {
            "poll_interval": POLL_INTERVAL * 1e3,
            "debounce": DEBOUNCE_AFTER * 1e3,
        },
        "environment": environment(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "figures": figures.values,
        "metrics": {k: {"title": m.title, "unit": m.unit} for k, m in figures.metrics.items()},
        "samples": figures.samples,
        "notes": figures.notes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def run(settings: Settings, workdir: Path, launcher: Launcher) -> tuple[Figures, int, int]:
    figures = Figures()
    layout = generate(settings.sizes)
    config_dir = workdir / "config"
    yaml_bytes = write_layout(layout, config_dir)
    files = len(layout.files)
    print(f"Generated {files} files ({yaml_bytes / MIB:.2f} MiB) in {config_dir}", flush=True)
    print("Cold read, translation and build", flush=True)
    batch = cold_figures(config_dir, layout, settings, figures)
    print("ControlPlane.apply_now", flush=True)
    await apply_figures(batch, layout, settings, figures)
    await process_figures(launcher, workdir, config_dir, layout, settings, figures)
    derive(settings, figures)
    return figures, yaml_bytes, files


def main(argv: list[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    failed = ""
    with tempfile.TemporaryDirectory(prefix="ztagent-bench-control-") as tmp:
        launcher = Launcher(Path(tmp))
        try:
            figures, yaml_bytes, files = asyncio.run(run(settings, Path(tmp), launcher))
        except (PairFailed, OSError) as exc:
            failed = str(exc)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            launcher.stop_all()
        if failed:
            print(f"failed: {failed}", file=sys.stderr)
            for proc in launcher.procs:
                print(f"--- {proc.name} log tail ---\n{proc.log_tail(30)}", file=sys.stderr)
            return 1
    print_report(settings, figures, yaml_bytes, files)
    if json_path:
        write_json(json_path, settings, figures, yaml_bytes, files)
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
