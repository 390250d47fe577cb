"""Istio's ServiceEntry as the mesh reads it: hosts and addresses, ports, inline endpoints or a
workload selector. `read_service_entry` takes a `Resource` and returns a `ServiceEntry`, or
raises `Invalid` naming the field path; the services and workloads it becomes are the control
plane's assembly. Pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ztagent.fields import Invalid, port, show
from ztagent.fields import at as _at
from ztagent.fields import labels as _labels
from ztagent.fields import mapping as _map
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.fields import strings as _strings
from ztagent.istio.envelope import Resource
from ztagent.istio.kubernetes import Meta, read_meta, read_spec, service_account
from ztagent.model.policy import cidr_match
from ztagent.model.workload import IPAddress


@dataclass(slots=True)
class ServiceEntryPort:
    number: int
    name: str
    target: int


@dataclass(slots=True)
class ServiceEntryEndpoint:
    address: str
    ip: IPAddress | None
    ports: dict[str, int]
    labels: dict[str, str]
    network: str
    service_account: str
    index: int


@dataclass(slots=True)
class ServiceEntry:
    meta: Meta
    hosts: list[str]
    addresses: list[IPAddress]
    ports: list[ServiceEntryPort]
    endpoints: list[ServiceEntryEndpoint]
    selector: dict[str, str] | None
    subject_alt_names: list[str]


def read_service_entry(resource: Resource, trust_domain: str) -> ServiceEntry:
    meta = read_meta(resource)
    spec = read_spec(resource)
    hosts = _strings(spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise Invalid("spec.hosts", "is required (at least one host)")
    addresses: list[IPAddress] = []
    for i, text in enumerate(_strings(spec.get("addresses"), "spec.addresses")):
        path = _at("spec.addresses", i)
        network = cidr_match(text, path).network
        if network.prefixlen != network.max_prefixlen:
            raise Invalid(path, f"{show(text)}: CIDR ranges are not supported, give addresses")
        addresses.append(network.network_address)
    ports: list[ServiceEntryPort] = []
    for i, item in enumerate(_list(spec.get("ports"), "spec.ports")):
        path = _at("spec.ports", i)
        data = _map(item, path)
        number = port(data.get("number"), _at(path, "number"))
        if any(p.number == number for p in ports):
            raise Invalid(_at(path, "number"), f"port {number} is listed twice")
        target = data.get("targetPort")
        ports.append(
            ServiceEntryPort(
                number,
                _str(data.get("name"), _at(path, "name")),
                number if target in (None, 0) else port(target, _at(path, "targetPort")),
            )
        )
    endpoints: list[ServiceEntryEndpoint] = []
    for i, item in enumerate(_list(spec.get("endpoints"), "spec.endpoints")):
        path = _at("spec.endpoints", i)
        data = _map(item, path)
        address = _str(data.get("address"), _at(path, "address"))
        ip: IPAddress | None = None
        if address.startswith("unix://"):
            raise Invalid(_at(path, "address"), "unix domain socket endpoints are not supported")
        if address:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
        elif not data.get("network"):
            raise Invalid(_at(path, "address"), "is required")
        endpoint_ports: dict[str, int] = {}
        for name, number in _map(data.get("ports"), _at(path, "ports")).items():
            endpoint_ports[name] = port(number, _at(_at(path, "ports"), name))
        account = service_account(
            data.get("serviceAccount"), _at(path, "serviceAccount"), meta.namespace, trust_domain
        )
        endpoints.append(
            ServiceEntryEndpoint(
                address=address,
                ip=ip,
                ports=endpoint_ports,
                labels=_labels(data.get("labels"), _at(path, "labels")),
                network=_str(data.get("network"), _at(path, "network")),
                service_account=account,
                index=i,
            )
        )
    selector: dict[str, str] | None = None
    if spec.get("workloadSelector") is not None:
        ws = _map(spec.get("workloadSelector"), "spec.workloadSelector")
        selector = _labels(ws.get("labels"), "spec.workloadSelector.labels") or None
        if endpoints:
            raise Invalid("spec.workloadSelector", "cannot be used together with endpoints")
    sans = _strings(spec.get("subjectAltNames"), "spec.subjectAltNames")
    return ServiceEntry(meta, hosts, addresses, ports, endpoints, selector, sans)
