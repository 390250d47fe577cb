"""The agent's view of the mesh: one `ConfigSnapshot` with the lookups the proxy needs.

`ProxyState` indexes a snapshot once (workload by network and IP, service by VIP, hostname and
key, endpoints of a service, policies by scope) and swaps the whole index on `replace`, so a
reader always sees one consistent version. `replace` reports what changed, by key, so the agent
can re-check open connections and drop certificates of identities that left. Single-threaded
(asyncio) use; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ztagent.identity.spiffe import Identity
from ztagent.model.policy import Authorization, Scope
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.workload import (
    GatewayAddress,
    IPAddress,
    NetworkAddress,
    Service,
    Workload,
)
from ztagent.names import DEFAULT_ROOT_NAMESPACE


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """Keys of one kind of object that appeared, disappeared or changed value."""

    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    updated: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)

    @classmethod
    def between(cls, old: Mapping[str, object], new: Mapping[str, object]) -> KeyChanges:
        return cls(
            added=frozenset(new.keys() - old.keys()),
            removed=frozenset(old.keys() - new.keys()),
            updated=frozenset(k for k in old.keys() & new.keys() if old[k] != new[k]),
        )


@dataclass(frozen=True, slots=True)
class StateChange:
    """What one `replace` changed; `local_identities_*` drive certificate fetch and release."""

    version: int
    workloads: KeyChanges
    services: KeyChanges
    policies: KeyChanges
    local_identities_added: frozenset[Identity] = frozenset()
    local_identities_removed: frozenset[Identity] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.workloads or self.services or self.policies)

    @property
    def policy_relevant(self) -> bool:
        """Open inbound connections need a re-check: policies or workloads' policy lists moved."""
        return bool(self.policies or self.workloads)


class _Index:
    """Every lookup of one snapshot, built once."""

    __slots__ = (
        "by_address",
        "by_hostname",
        "by_key",
        "by_namespace_policy",
        "by_uid",
        "by_vip",
        "endpoints",
        "global_policies",
        "local",
        "policies",
        "snapshot",
        "waypoint_uids",
    )

    def __init__(self, snapshot: ConfigSnapshot, node_name: str, root_namespace: str | None):
        self.snapshot = snapshot
        self.by_uid: dict[str, Workload] = {}
        self.by_address: dict[NetworkAddress, Workload] = {}
        self.endpoints: dict[str, list[Workload]] = {}
        for workload in sorted(snapshot.workloads, key=lambda w: w.uid):
            self.by_uid.setdefault(workload.uid, workload)
            for address in workload.network_addresses:
                self.by_address.setdefault(address, workload)
            for key in workload.services:
                self.endpoints.setdefault(key, []).append(workload)
        self.local = tuple(w for w in self.by_uid.values() if node_name and w.node == node_name)

        self.by_key: dict[str, Service] = {}
        self.by_vip: dict[NetworkAddress, Service] = {}
        self.by_hostname: dict[str, list[Service]] = {}
        for service in sorted(snapshot.services, key=lambda s: s.key):
            self.by_key.setdefault(service.key, service)
            for vip in service.addresses:
                self.by_vip.setdefault(vip, service)
            self.by_hostname.setdefault(service.hostname, []).append(service)

        self.policies: dict[str, Authorization] = {}
        self.global_policies: list[Authorization] = []
        self.by_namespace_policy: dict[str, list[Authorization]] = {}
        for policy in sorted(snapshot.policies, key=lambda p: p.key):
            if policy.key in self.policies:
                continue
            self.policies[policy.key] = policy
            if policy.scope is Scope.GLOBAL:
                if root_namespace is None or policy.namespace == root_namespace:
                    self.global_policies.append(policy)
            elif policy.scope is Scope.NAMESPACE:
                self.by_namespace_policy.setdefault(policy.namespace, []).append(policy)

        gateways = {w.waypoint for w in snapshot.workloads if w.waypoint is not None}
        gateways.update(s.waypoint for s in snapshot.services if s.waypoint is not None)
        self.waypoint_uids = frozenset(
            w.uid for gateway in gateways for w in self.gateway_workloads(gateway)
        )

    def gateway_workloads(self, gateway: GatewayAddress) -> tuple[Workload, ...]:
        service = self.gateway_service(gateway)
        if service is not None:
            return tuple(self.endpoints.get(service.key, ()))
        if gateway.hostname is not None:
            return ()
        assert gateway.address is not None
        workload = self.by_address.get(gateway.address)
        return () if workload is None else (workload,)

    def gateway_service(self, gateway: GatewayAddress) -> Service | None:
        if gateway.hostname is not None:
            hostname = gateway.hostname
            return self.by_key.get(f"{hostname.namespace}/{hostname.hostname}")
        assert gateway.address is not None
        return self.by_vip.get(gateway.address)


class ProxyState:
    """Lookups over the current snapshot, and a version that grows with every `replace`.

    `node_name` is NODE_NAME: workloads with that `node` are local. `root_namespace` is where
    GLOBAL policies must live to apply (istiod only gives GLOBAL scope to policies there);
    None applies every GLOBAL policy, as ztunnel's own store does.
    """

    def __init__(
        self,
        node_name: str = "",
        *,
        root_namespace: str | None = DEFAULT_ROOT_NAMESPACE,
        snapshot: ConfigSnapshot | None = None,
    ) -> None:
        self.node_name = node_name
        self.root_namespace = root_namespace
        self._version = 0
        self._index = _Index(ConfigSnapshot(), node_name, root_namespace)
        self.loaded = False
        """False until the first snapshot arrives; readiness waits for it."""
        if snapshot is not None:
            self.replace(snapshot)

    # --- versions and updates ---

    @property
    def version(self) -> int:
        return self._version

    @property
    def snapshot(self) -> ConfigSnapshot:
        return self._index.snapshot

    def replace(self, snapshot: ConfigSnapshot) -> StateChange:
        """Serve `snapshot` from now on; return what changed relative to the previous one."""
        old = self._index
        new = _Index(snapshot, self.node_name, self.root_namespace)
        old_ids = {w.identity for w in old.local}
        new_ids = {w.identity for w in new.local}
        self._index = new
        self._version += 1
        self.loaded = True
        return StateChange(
            version=self._version,
            workloads=KeyChanges.between(old.by_uid, new.by_uid),
            services=KeyChanges.between(old.by_key, new.by_key),
            policies=KeyChanges.between(old.policies, new.policies),
            local_identities_added=frozenset(new_ids - old_ids),
            local_identities_removed=frozenset(old_ids - new_ids),
        )

    # --- workloads ---

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return tuple(self._index.by_uid.values())

    def workload(self, uid: str) -> Workload | None:
        return self._index.by_uid.get(uid)

    def workload_by_address(self, network: str, ip: IPAddress) -> Workload | None:
        return self._index.by_address.get(NetworkAddress(network, ip))

    def local_workloads(self) -> tuple[Workload, ...]:
        """Workloads on this node (`node == NODE_NAME`), sorted by uid."""
        return self._index.local

    def local_workload_by_ip(self, ip: IPAddress) -> Workload | None:
        """A local workload owning `ip` on any network (the node sees its own pods' IPs)."""
        for workload in self._index.local:
            if ip in workload.addresses:
                return workload
        return None

    def local_identities(self) -> frozenset[Identity]:
        return frozenset(w.identity for w in self._index.local)

    # --- services ---

    @property
    def services(self) -> tuple[Service, ...]:
        return tuple(self._index.by_key.values())

    def service(self, key: str) -> Service | None:
        """A service by its key `namespace/hostname`."""
        return self._index.by_key.get(key)

    def service_by_vip(self, network: str, ip: IPAddress) -> Service | None:
        return self._index.by_vip.get(NetworkAddress(network, ip))

    def service_by_hostname(self, hostname: str, namespace: str | None = None) -> Service | None:
        """The service with this hostname; if several namespaces have one, pass `namespace`
        (without it the first by key is returned)."""
        found = self._index.by_hostname.get(hostname, ())
        for service in found:
            if namespace is None or service.namespace == namespace:
                return service
        return None

    def endpoints(self, service: Service | str) -> tuple[Workload, ...]:
        """Workloads backing a service (those whose `services` name its key), sorted by uid."""
        key = service if isinstance(service, str) else service.key
        return tuple(self._index.endpoints.get(key, ()))

    @staticmethod
    def target_port(service: Service, workload: Workload, port: int) -> int | None:
        """The port on `workload` serving `service`'s `port`, as ztunnel picks it.

        The endpoint's own mapping wins, then the service's target port; None when the
        service has no such port or neither gives a non-zero target.
        """
        if port not in service.ports:
            return None
        target = workload.services.get(service.key, {}).get(port, 0) or service.ports[port]
        return target or None

    # --- waypoints ---

    def waypoint_service(self, gateway: GatewayAddress) -> Service | None:
        """The Service a waypoint address names: by `namespace/hostname`, or the Service whose
        VIP the address is (None for a plain workload address or an unknown name)."""
        return self._index.gateway_service(gateway)

    def waypoint_instances(self, gateway: GatewayAddress) -> tuple[Workload, ...]:
        """The workloads that are the waypoint `gateway` names: the endpoints of its Service,
        or the one workload owning its address. Healthy or not, sorted by uid; empty when the
        name or address is unknown."""
        return self._index.gateway_workloads(gateway)

    def is_own_waypoint(self, workload: Workload, identity: Identity, ip: IPAddress) -> bool:
        """Whether a peer, by its certificate's identity and its connection's address, is an
        instance of a waypoint serving `workload`: the workload's own, or that of one of its
        services (ztunnel `inbound.rs`, `check_from_waypoint`). Only such a peer is trusted for
        the client address it names in `forwarded: for=`."""
        gateways = [workload.waypoint] if workload.waypoint is not None else []
        for key in workload.services:
            service = self._index.by_key.get(key)
            if service is not None and service.waypoint is not None:
                gateways.append(service.waypoint)
        return any(
            instance.identity == identity and ip in instance.addresses
            for gateway in gateways
            for instance in self.waypoint_instances(gateway)
        )

    def speaks_for(self, identity: Identity, network: str, ip: IPAddress) -> bool:
        """Whether `ip` is the address of a workload whose identity is `identity`: a node
        agent sends with the identity of the workload it carries, so it may name that
        workload's address as the client (`forwarded: for=`), and no other."""
        workload = self.workload_by_address(network, ip)
        return workload is not None and workload.identity == identity

    def is_waypoint(self, workload: Workload) -> bool:
        """Whether `workload` is an instance of a waypoint some workload or service uses:
        it takes HBONE on its own address and is never captured or listened for."""
        return workload.uid in self._index.waypoint_uids

    # --- policies ---

    @property
    def policies(self) -> tuple[Authorization, ...]:
        return tuple(self._index.policies.values())

    def policy(self, key: str) -> Authorization | None:
        return self._index.policies.get(key)

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """Every policy applying to `workload`, each once: GLOBAL, NAMESPACE, then selected.

        A key in `authorization_policies` that names no known policy is skipped, as ztunnel
        does while the control plane catches up.
        """
        index = self._index
        chosen: dict[str, Authorization] = {}
        for policy in index.global_policies:
            chosen.setdefault(policy.key, policy)
        for policy in index.by_namespace_policy.get(workload.namespace, ()):
            chosen.setdefault(policy.key, policy)
        for key in workload.authorization_policies:
            found = index.policies.get(key)
            if found is not None:
                chosen.setdefault(key, found)
        return tuple(chosen.values())
