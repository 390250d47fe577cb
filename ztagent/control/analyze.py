"""Offline checks of Kubernetes and Istio resources, like `istioctl analyze`.

`analyze` reads nothing and changes nothing: it takes the resources of a directory (and the
errors the reader found), translates them as the control plane would, and reports what would
be rejected or would not behave as written:

- `SchemaError` (Error): a document or field the reader or the translation rejects, or that a
  waypoint would reject (VirtualService, HTTPRoute, DestinationRule, and AuthorizationPolicy
  and RequestAuthentication attached by `targetRefs`, checked as the control plane checks the
  objects it serves to waypoints; `jwksUri` files are not read here).
- `TranslationNote` (Info): a resource accepted with a caveat or skipped on purpose.
- `SelectorMatchesNothing` (Warning): an AuthorizationPolicy or PeerAuthentication whose
  `selector.matchLabels` selects no pod in its namespace (any namespace for an
  AuthorizationPolicy in the root namespace).
- `L7PolicyWithoutWaypoint` (Warning): a selector or namespace AuthorizationPolicy with HTTP-level
  fields while some workload it applies to has no waypoint; the node agent drops such ALLOW
  rules and strips such DENY rules to their L4 part.
- `ReferencedHostNotFound` (Warning): a DestinationRule `host`, or a VirtualService `hosts`
  entry or route destination, that matches no Service or ServiceEntry host. A name without a
  dot is `<name>.<namespace>.svc.<suffix>` in the object's namespace, `<name>.<namespace>` gets
  `.svc.<suffix>` appended, `*` prefixes match as wildcards.
- `SubsetMatchesNothing` (Warning): a DestinationRule subset whose labels match no pod selected
  by the host's Service (or no endpoint/pod of the host's ServiceEntry).
- `StrictMtlsNonEnrolledClient` (Warning): a PeerAuthentication that makes at least one mesh
  workload STRICT while at least one pod anywhere is not enrolled in the mesh. Which pods call
  which is not known offline: the check is only that such a plaintext client exists, and any
  call it makes to a STRICT workload is refused.
- `ConflictingPolicies` (Info): an ALLOW and a DENY AuthorizationPolicy in the same namespace with
  the same selector and identical rules; the DENY always wins, so the ALLOW does nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ztagent.control.sources import read_directory
from ztagent.control.translate import TranslateOptions, translate_resources
from ztagent.control.xds import waypoint_resources
from ztagent.errors import LocalError
from ztagent.istio.authorization.l4 import STATIC_STRICT_POLICY_NAME
from ztagent.istio.envelope import Resource, ResourceError
from ztagent.istio.kubernetes import selects
from ztagent.model.workload import TunnelProtocol, Workload
from ztagent.names import service_hostname

Level = Literal["Error", "Warning", "Info"]
_LEVEL_ORDER = {"Error": 0, "Warning": 1, "Info": 2}

SCHEMA_ERROR = "SchemaError"
TRANSLATION_NOTE = "TranslationNote"
SELECTOR_MATCHES_NOTHING = "SelectorMatchesNothing"
L7_WITHOUT_WAYPOINT = "L7PolicyWithoutWaypoint"
HOST_NOT_FOUND = "ReferencedHostNotFound"
SUBSET_MATCHES_NOTHING = "SubsetMatchesNothing"
STRICT_NON_ENROLLED = "StrictMtlsNonEnrolledClient"
CONFLICTING_POLICIES = "ConflictingPolicies"

_L7_NOTE_MARKS = ("cannot check", "enforced without")


@dataclass(frozen=True, slots=True)
class Finding:
    """One reported problem; `file` is `file#index` (or the file alone, or empty)."""

    level: Level
    code: str
    kind: str
    namespace: str
    name: str
    field: str
    message: str
    file: str

    def __str__(self) -> str:
        parts = []
        if self.kind:
            key = f"{self.namespace}/{self.name}" if self.namespace else self.name
            parts.append(f"{self.kind} {key}" if key else self.kind)
        if self.file:
            parts.append(self.file)
        where = f" ({' '.join(parts)})" if parts else ""
        text = f"{self.field}: {self.message}" if self.field else self.message
        return f"{self.level} [{self.code}]{where} {text}"


# --- small readers of raw documents (the translation validated the kinds it knows) ------------


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _string_map(value: object) -> dict[str, str]:
    return {k: v for k, v in _mapping(value).items() if isinstance(k, str) and isinstance(v, str)}


def _namespace(resource: Resource) -> str:
    return resource.namespace or "default"


def _spec(resource: Resource) -> dict[str, Any]:
    return _mapping(resource.body.get("spec"))


def _labels(resource: Resource) -> dict[str, str]:
    return _string_map(_mapping(resource.body.get("metadata")).get("labels"))


def _match_labels(resource: Resource) -> dict[str, str] | None:
    selector = _spec(resource).get("selector")
    if not isinstance(selector, dict):
        return None
    labels = _string_map(selector.get("matchLabels"))
    return labels or None


def _finding(level: Level, code: str, resource: Resource, field: str, message: str) -> Finding:
    return Finding(
        level,
        code,
        resource.kind,
        _namespace(resource),
        resource.name,
        field,
        message,
        resource.location,
    )


def _from_error(level: Level, code: str, error: ResourceError) -> Finding:
    namespace, _, name = (error.key or "").rpartition("/")
    return Finding(
        level, code, error.kind, namespace, name, error.path, error.reason, error.location
    )


@dataclass(slots=True)
class _Index:
    options: TranslateOptions
    pods: list[Resource]
    services: list[Resource]
    entries: list[Resource]
    bad: set[tuple[str, str, str]]
    workloads: dict[tuple[str, str], Workload]

    def pods_in(self, namespace: str | None) -> list[Resource]:
        return [p for p in self.pods if namespace is None or _namespace(p) == namespace]

    def usable(self, resource: Resource) -> bool:
        return (resource.kind, _namespace(resource), resource.name) not in self.bad


# --- the analyzers ------------------------------------------------------------------------------


def _selector_matches_nothing(index: _Index, resources: Sequence[Resource]) -> list[Finding]:
    out: list[Finding] = []
    root = index.options.root_namespace
    for res in resources:
        if res.kind not in ("AuthorizationPolicy", "PeerAuthentication") or not index.usable(res):
            continue
        selector = _match_labels(res)
        if selector is None:
            continue
        namespace = _namespace(res)
        everywhere = res.kind == "AuthorizationPolicy" and namespace == root
        pods = index.pods_in(None if everywhere else namespace)
        if not any(selects(selector, _labels(p)) for p in pods):
            where = "any namespace" if everywhere else f"namespace {namespace}"
            shown = json.dumps(selector, sort_keys=True)
            message = f"selects no pod in {where} (matchLabels {shown})"
            out.append(_finding("Warning", SELECTOR_MATCHES_NOTHING, res, "spec.selector", message))
    return out


def _l7_without_waypoint(
    index: _Index, resources: Sequence[Resource], notes: Sequence[ResourceError]
) -> tuple[list[Finding], set[int]]:
    """The L7 notes of policies applying to a workload without a waypoint (and their ids)."""
    by_key = {
        (r.kind, f"{_namespace(r)}/{r.name}"): r
        for r in resources
        if r.kind == "AuthorizationPolicy"
    }
    root = index.options.root_namespace
    out: list[Finding] = []
    used: set[int] = set()
    for number, note in enumerate(notes):
        if note.kind != "AuthorizationPolicy" or not note.path.startswith("spec.rules"):
            continue
        if not any(mark in note.reason for mark in _L7_NOTE_MARKS):
            continue
        res = by_key.get((note.kind, note.key or ""))
        if res is None:
            continue
        namespace = _namespace(res)
        selector = _match_labels(res)
        pods = index.pods_in(None if namespace == root else namespace)
        if selector is not None:
            pods = [p for p in pods if selects(selector, _labels(p))]
        missing = sorted(
            f"{_namespace(p)}/{p.name}"
            for p in pods
            if (w := index.workloads.get((_namespace(p), p.name))) is not None
            and w.tunnel_protocol is TunnelProtocol.HBONE
            and w.waypoint is None
        )
        if not missing:
            continue
        used.add(number)
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        message = (
            f"{note.reason}; needs a waypoint; the node agent drops/strips it "
            f"for workloads without one ({shown})"
        )
        out.append(_finding("Warning", L7_WITHOUT_WAYPOINT, res, note.path, message))
    return out, used


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*" or host == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) or (
            host.startswith("*.") and host[1:].endswith(pattern[1:])
        )
    if host.startswith("*."):
        return pattern.endswith(host[1:])
    return pattern == host


def _qualify(host: str, namespace: str, suffix: str) -> str:
    """A referenced host as a pod's DNS search path resolves it: `name` in `namespace`, and
    also `name.namespace` (one dot), which Istio's `qualify_host` keeps as written; the check
    looks for a Service either way."""
    if "*" in host:
        return host
    dots = host.count(".")
    if dots == 0:
        return service_hostname(host, namespace, suffix)
    if dots == 1:
        name, _, host_namespace = host.partition(".")
        return service_hostname(name, host_namespace, suffix)
    return host


def _known_hosts(index: _Index) -> dict[str, Resource]:
    suffix = index.options.domain_suffix
    hosts: dict[str, Resource] = {}
    for svc in index.services:
        hosts.setdefault(service_hostname(svc.name, _namespace(svc), suffix), svc)
    for entry in index.entries:
        for host in _spec(entry).get("hosts") or []:
            if isinstance(host, str):
                hosts.setdefault(host, entry)
    return hosts


def _resolve(
    index: _Index, known: Mapping[str, Resource], host: str, namespace: str
) -> list[Resource]:
    fqdn = _qualify(host, namespace, index.options.domain_suffix)
    if fqdn in known:
        return [known[fqdn]]
    return [res for name, res in known.items() if _host_matches(fqdn, name)]


def _route_hosts(spec: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    for protocol in ("http", "tcp", "tls"):
        routes = spec.get(protocol)
        if not isinstance(routes, list):
            continue
        for i, route in enumerate(routes):
            destinations = _mapping(route).get("route")
            if not isinstance(destinations, list):
                continue
            for j, item in enumerate(destinations):
                host = _mapping(_mapping(item).get("destination")).get("host")
                if isinstance(host, str) and host:
                    yield f"spec.{protocol}[{i}].route[{j}].destination.host", host


def _hosts_and_subsets(index: _Index, resources: Sequence[Resource]) -> list[Finding]:
    known = _known_hosts(index)
    out: list[Finding] = []
    for res in resources:
        if res.group != "networking.istio.io":
            continue
        namespace = _namespace(res)
        spec = _spec(res)
        if res.kind == "VirtualService":
            checks: list[tuple[str, str]] = []
            gateways = spec.get("gateways")
            if not isinstance(gateways, list) or not gateways or "mesh" in gateways:
                hosts = spec.get("hosts")
                for i, host in enumerate(hosts if isinstance(hosts, list) else []):
                    if isinstance(host, str) and host:
                        checks.append((f"spec.hosts[{i}]", host))
            checks.extend(_route_hosts(spec))
            for path, host in checks:
                if not _resolve(index, known, host, namespace):
                    message = f"host {json.dumps(host)} matches no Service or ServiceEntry"
                    out.append(_finding("Warning", HOST_NOT_FOUND, res, path, message))
        elif res.kind == "DestinationRule":
            host = spec.get("host")
            if not isinstance(host, str) or not host:
                out.append(
                    _finding("Error", SCHEMA_ERROR, res, "spec.host", "is required (a host name)")
                )
                continue
            targets = _resolve(index, known, host, namespace)
            if not targets:
                message = f"host {json.dumps(host)} matches no Service or ServiceEntry"
                out.append(_finding("Warning", HOST_NOT_FOUND, res, "spec.host", message))
                continue
            out.extend(_subsets(index, res, spec, targets))
    return out


def _backends(index: _Index, target: Resource) -> list[dict[str, str]] | None:
    """The label sets of the endpoints behind a Service/ServiceEntry; None when unknown."""
    spec = _spec(target)
    namespace = _namespace(target)
    if target.kind == "Service":
        selector = _string_map(spec.get("selector"))
        if not selector:
            return None
        return [_labels(p) for p in index.pods_in(namespace) if selects(selector, _labels(p))]
    endpoints = spec.get("endpoints")
    if isinstance(endpoints, list) and endpoints:
        return [_string_map(_mapping(e).get("labels")) for e in endpoints]
    selector = _string_map(_mapping(spec.get("workloadSelector")).get("labels"))
    if selector:
        return [_labels(p) for p in index.pods_in(namespace) if selects(selector, _labels(p))]
    return None


def _subsets(
    index: _Index, res: Resource, spec: Mapping[str, Any], targets: Sequence[Resource]
) -> list[Finding]:
    subsets = spec.get("subsets")
    if not isinstance(subsets, list):
        return []
    backends: list[dict[str, str]] = []
    for target in targets:
        found = _backends(index, target)
        if found is None:
            return []
        backends.extend(found)
    out: list[Finding] = []
    for i, subset in enumerate(subsets):
        data = _mapping(subset)
        labels = _string_map(data.get("labels"))
        if not labels or any(selects(labels, b) for b in backends):
            continue
        name = data.get("name")
        shown = json.dumps(labels, sort_keys=True)
        message = f"subset {json.dumps(name)} labels {shown} match no pod behind {spec['host']}"
        out.append(
            _finding("Warning", SUBSET_MATCHES_NOTHING, res, f"spec.subsets[{i}].labels", message)
        )
    return out


def _strict_non_enrolled(index: _Index, resources: Sequence[Resource]) -> list[Finding]:
    pods = {(_namespace(p), p.name) for p in index.pods}
    plaintext = sorted(
        f"{ns}/{name}"
        for (ns, name), w in index.workloads.items()
        if (ns, name) in pods and w.tunnel_protocol is not TunnelProtocol.HBONE
    )
    if not plaintext:
        return []
    strict_key = f"{index.options.root_namespace}/{STATIC_STRICT_POLICY_NAME}"
    strict = [
        (ns, name)
        for (ns, name), w in index.workloads.items()
        if w.tunnel_protocol is TunnelProtocol.HBONE and strict_key in w.authorization_policies
    ]
    root = index.options.root_namespace
    out: list[Finding] = []
    for res in resources:
        if res.kind != "PeerAuthentication" or not index.usable(res):
            continue
        spec = _spec(res)
        modes = [_mapping(spec.get("mtls")).get("mode")]
        modes += [_mapping(m).get("mode") for m in _mapping(spec.get("portLevelMtls")).values()]
        if "STRICT" not in modes:
            continue
        namespace = _namespace(res)
        selector = _match_labels(res)
        labels = {(_namespace(p), p.name): _labels(p) for p in index.pods}
        governed = sorted(
            f"{ns}/{name}"
            for ns, name in strict
            if (namespace == root or ns == namespace)
            and (selector is None or selects(selector, labels.get((ns, name), {})))
        )
        if not governed:
            continue
        message = (
            f"STRICT mTLS on {len(governed)} workload(s) (e.g. {governed[0]}) while "
            f"{len(plaintext)} pod(s) are not enrolled in the mesh (e.g. {plaintext[0]}); "
            "their plaintext calls to these workloads are refused"
        )
        out.append(_finding("Warning", STRICT_NON_ENROLLED, res, "spec.mtls", message))
    return out


def _conflicting(index: _Index, resources: Sequence[Resource]) -> list[Finding]:
    groups: dict[tuple[str, str, str], dict[str, list[Resource]]] = {}
    for res in resources:
        if res.kind != "AuthorizationPolicy" or not index.usable(res):
            continue
        spec = _spec(res)
        if spec.get("targetRef") is not None or spec.get("targetRefs"):
            continue
        action = spec.get("action") or "ALLOW"
        if action not in ("ALLOW", "DENY"):
            continue
        selector = json.dumps(_match_labels(res), sort_keys=True)
        rules = json.dumps(spec.get("rules") or [], sort_keys=True, default=str)
        key = (_namespace(res), selector, rules)
        groups.setdefault(key, {}).setdefault(str(action), []).append(res)
    out: list[Finding] = []
    for actions in groups.values():
        if "ALLOW" in actions and "DENY" in actions:
            deny = actions["DENY"][0]
            for allow in actions["ALLOW"]:
                message = (
                    f"same scope and rules as DENY policy {_namespace(deny)}/{deny.name}; "
                    "the DENY wins, so this ALLOW never applies"
                )
                out.append(_finding("Info", CONFLICTING_POLICIES, allow, "spec.rules", message))
    return out


# --- entry point --------------------------------------------------------------------------------


def analyze(
    resources: Iterable[Resource],
    options: TranslateOptions | None = None,
    *,
    read_errors: Iterable[ResourceError] = (),
) -> list[Finding]:
    """Every finding about `resources` (and the reader's `read_errors`), most severe first."""
    options = options or TranslateOptions()
    resources = list(resources)
    translation = translate_resources(resources, options)
    snapshot = translation.snapshot
    findings = [_from_error("Error", SCHEMA_ERROR, e) for e in read_errors]
    findings += [
        _from_error("Error", SCHEMA_ERROR, e)
        for e in snapshot.errors
        if isinstance(e, ResourceError)
    ]
    reported = {(e.kind, e.key, e.path, e.reason) for e in snapshot.errors}
    findings += [
        _from_error("Error", SCHEMA_ERROR, e)
        for e in waypoint_resources(resources, options).errors
        if (e.kind, e.key, e.path, e.reason) not in reported
    ]
    bad = set()
    for error in snapshot.errors:
        if isinstance(error, ResourceError) and error.key:
            ns, _, name = error.key.rpartition("/")
            bad.add((error.kind, ns, name))
    workloads = {(w.namespace, w.name): w for w in snapshot.workloads if "//Pod/" in w.uid}
    index = _Index(
        options,
        [r for r in resources if r.kind == "Pod" and r.group == ""],
        [r for r in resources if r.kind == "Service" and r.group == ""],
        [r for r in resources if r.kind == "ServiceEntry" and r.group == "networking.istio.io"],
        bad,
        workloads,
    )
    l7, used = _l7_without_waypoint(index, resources, translation.notes)
    findings += l7
    findings += [
        _from_error("Info", TRANSLATION_NOTE, note)
        for number, note in enumerate(translation.notes)
        if number not in used
    ]
    findings += _selector_matches_nothing(index, resources)
    findings += _hosts_and_subsets(index, resources)
    findings += _strict_non_enrolled(index, resources)
    findings += _conflicting(index, resources)
    return sorted(findings, key=lambda f: (_LEVEL_ORDER[f.level], f.file, f.code, f.field))


def _run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.exists():
        raise LocalError(f"{directory}: no such file or directory")
    batch = read_directory(directory)
    options = TranslateOptions(root_namespace=args.root_namespace)
    findings = analyze(batch.resources, options, read_errors=batch.errors)
    if args.output == "json":
        print(json.dumps([asdict(f) for f in findings], indent=2))
    elif findings:
        for finding in findings:
            print(finding)
    else:
        print(f"\u2714 No validation issues found when analyzing {directory}.")
    sys.stdout.flush()
    return 1 if any(f.level == "Error" for f in findings) else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `analyze [DIR] [-o text|json] [--root-namespace NS]` to the `ztagent` parser."""
    parser = subparsers.add_parser(
        "analyze",
        help="check a directory of Kubernetes/Istio YAML offline, like istioctl analyze",
        description="Read every YAML/JSON file under DIR, translate it as `ztagent control` "
        "would, and report errors, warnings and notes. Exit status 1 when there is any error.",
    )
    parser.add_argument("directory", nargs="?", default=".", metavar="DIR", help="default: .")
    parser.add_argument(
        "-o", "--output", choices=["text", "json"], default="text", help="text (default) or json"
    )
    parser.add_argument(
        "--root-namespace",
        default=TranslateOptions().root_namespace,
        metavar="NS",
        help=f"the mesh root namespace (default {TranslateOptions().root_namespace})",
    )
    parser.set_defaults(handler=_run)


__all__ = ["Finding", "analyze", "register"]
