"""The waypoint's clusters: one per destination (service host, subset, port), as Envoy builds them.

A `Cluster` holds a destination's DestinationRule state: its balancer, connection pool counters
and outlier detector, and its endpoints (re-read when the proxy state changes version).
`Clusters` owns the clusters of one L7 config version; `set_config` drops them all. Picking an
endpoint and recording what an endpoint answered are decisions over these pure objects; nothing
here does I/O or reads a clock (`now` is the caller's monotonic time).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from ztagent.istio.balancer import Balancer, HashInput, new_balancer
from ztagent.istio.connection_pool import ConnectionPool
from ztagent.istio.destination import DEFAULT_POLICY, EffectivePolicy, rule_for_host
from ztagent.istio.outlier import LocalOrigin, OutlierDetector
from ztagent.istio.routing import Request
from ztagent.model.store import ProxyState
from ztagent.model.workload import Service, Workload
from ztagent.waypoint.config import WaypointConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """One endpoint as the pool knows it: address, target port, HTTP version, tunnel source."""

    ip: str
    port: int
    http2: bool
    identity: str
    source_ip: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload of a cluster, with the labels subsets select on."""

    workload: Workload
    labels: Mapping[str, str] = field(hash=False)

    @property
    def key(self) -> str:
        return self.workload.uid


@dataclass
class Cluster:
    """One destination (service host, subset, port) and its DestinationRule state, as Envoy
    builds a cluster: balancer, connection pool counters, outlier detector."""

    service: Service
    subset_labels: Mapping[str, str]
    port: int
    policy: EffectivePolicy
    http2: bool
    balancer: Balancer[Endpoint]
    pool: ConnectionPool
    outlier: OutlierDetector | None
    known: frozenset[str] = frozenset()
    endpoints_version: int = -1
    endpoints: list[Endpoint] = field(default_factory=list)


def protocol_is_http2(protocol: str, downstream_http2: bool) -> bool:
    """Whether the upstream speaks HTTP/2: by the port's protocol, else as the client did."""
    if protocol in ("http2", "grpc", "grpc-web"):
        return True
    if protocol == "http":
        return False
    return downstream_http2


class Clusters:
    """The clusters of the current L7 config over the proxy state's endpoints."""

    def __init__(self, state: ProxyState, rng: random.Random) -> None:
        self.state = state
        self.config = WaypointConfig.empty()
        self.rng = rng
        self._clusters: dict[tuple[str, str, int, bool], Cluster] = {}

    def set_config(self, config: WaypointConfig) -> None:
        self.config = config
        self._clusters.clear()

    def cluster(
        self, host: str, subset: str, port: int, downstream_http2: bool, now: float
    ) -> Cluster | None:
        """The cluster of `host`/`subset`/`port` (None: no such service or subset)."""
        key = (host, subset, port, downstream_http2)
        cluster = self._clusters.get(key)
        if cluster is not None:
            return cluster
        service = self.state.service_by_hostname(host)
        if service is None:
            return None
        rule = rule_for_host(self.config.destination_rules.rules, host)
        labels: Mapping[str, str] = {}
        policy = DEFAULT_POLICY
        if rule is not None:
            try:
                policy = rule.policy(subset or None, port)
            except KeyError:
                return None
            found = rule.subset(subset) if subset else None
            labels = found.labels if found is not None else {}
        elif subset:
            return None
        protocol = self.config.protocol(host, port)
        outlier = None
        if policy.outlier_detection is not None:
            outlier = OutlierDetector(policy.outlier_detection, now)
        cluster = self._clusters[key] = Cluster(
            service=service,
            subset_labels=labels,
            port=port,
            policy=policy,
            http2=protocol_is_http2(protocol, downstream_http2),
            balancer=new_balancer(policy.load_balancer, self.rng),
            pool=ConnectionPool(policy.connection_pool),
            outlier=outlier,
        )
        return cluster

    def endpoints(self, cluster: Cluster, now: float) -> list[Endpoint]:
        """The cluster's healthy endpoints, outlier-ejected ones left out."""
        if cluster.endpoints_version != self.state.version:
            cluster.endpoints = self._subset_endpoints(cluster)
            cluster.endpoints_version = self.state.version
        found = cluster.endpoints
        outlier = cluster.outlier
        if outlier is not None:
            keys = frozenset(e.key for e in found)
            if keys != cluster.known:
                outlier.update_endpoints(keys)
                cluster.known = keys
            outlier.sweep(now)
            return outlier.usable(found)
        return found

    def _subset_endpoints(self, cluster: Cluster) -> list[Endpoint]:
        service = self.state.service(cluster.service.key) or cluster.service
        found: list[Endpoint] = []
        for workload in self.state.endpoints(service):
            if (
                not workload.healthy
                or self.state.target_port(service, workload, cluster.port) is None
            ):
                continue
            labels = self.config.labels_for(workload)
            if all(labels.get(k) == v for k, v in cluster.subset_labels.items()):
                found.append(Endpoint(workload, labels))
        return found

    def pick(
        self, cluster: Cluster, request: Request, tried: set[str], now: float
    ) -> Endpoint | None:
        """The balancer's choice among the endpoints, preferring those not `tried` yet."""
        endpoints = self.endpoints(cluster, now)
        fresh = [e for e in endpoints if e.key not in tried] or endpoints
        key = None
        lb = cluster.policy.load_balancer
        if lb.consistent_hash is not None:
            key = lb.consistent_hash.key_for(
                HashInput(
                    headers={k: v for k, v in request.headers},
                    source_ip=request.source.address,
                )
            )
        return cluster.balancer.pick(fresh, key)

    def upstream_key(
        self, cluster: Cluster, workload: Workload, source_ip: str = ""
    ) -> UpstreamKey | None:
        """Where a request to `workload` in `cluster` goes (None: no such port on it)."""
        target = self.state.target_port(cluster.service, workload, cluster.port)
        if target is None:
            return None
        ip = str(workload.addresses[0])
        return UpstreamKey(ip, target, cluster.http2, str(workload.identity), source_ip)

    @staticmethod
    def record(cluster: Cluster, key: str, result: int | LocalOrigin, now: float) -> None:
        """An endpoint's response status, or a failure seen locally, for outlier detection."""
        outlier = cluster.outlier
        if outlier is None:
            return
        if isinstance(result, LocalOrigin):
            ejection = outlier.record_local(key, result, now)
        else:
            ejection = outlier.record_status(key, result, now)
        if ejection is not None:
            log.info(
                "outlier detection ejected %s for %.1fs (%s)",
                key,
                ejection.duration,
                ejection.cause.value,
            )
