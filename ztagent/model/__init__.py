"""The mesh as the node agent sees it: workloads, services and L4 policies, and their sources.

`workload` and `policy` hold the immutable values (Istio's workload and security API),
`localconfig` reads ztunnel's local config file, `store` indexes one snapshot for lookups, and
`watch` keeps the store in step with the file.
"""

from ztagent.model.localconfig import ConfigError, load_local_config, parse_local_config
from ztagent.model.policy import (
    Action,
    Authorization,
    CidrMatch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztagent.model.snapshot import ConfigSnapshot, ObjectError
from ztagent.model.store import KeyChanges, ProxyState, StateChange
from ztagent.model.workload import (
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)

__all__ = [
    "Action",
    "Authorization",
    "CidrMatch",
    "Clause",
    "ConfigError",
    "ConfigSnapshot",
    "GatewayAddress",
    "IPAddress",
    "KeyChanges",
    "Match",
    "NamespacedHostname",
    "NetworkAddress",
    "ObjectError",
    "ProxyState",
    "Rule",
    "Scope",
    "Service",
    "ServiceAccountMatch",
    "StateChange",
    "StringMatch",
    "TunnelProtocol",
    "Workload",
    "WorkloadStatus",
    "load_local_config",
    "parse_local_config",
]
