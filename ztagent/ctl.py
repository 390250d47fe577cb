"""`ztagent ctl ...`: show a running agent's workloads, services, policies and certificates.

Reads the agent's admin `/config_dump` (see `ztagent.node.dump`) and prints it as tables, like
`istioctl ztunnel-config`, or as JSON with `-o json`. Rendering is pure (`render`, `select`
and the `*_table` functions take the dump as a dict); only `fetch_dump` touches the network.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ztagent.errors import LocalError
from ztagent.hbone.frames import format_authority, parse_authority
from ztagent.identity.spiffe import Identity
from ztagent.names import ADMIN_PORT

DEFAULT_ADMIN_ADDR = f"127.0.0.1:{ADMIN_PORT}"
TIMEOUT = 5.0
MAX_DUMP_BYTES = 256 * 1024 * 1024
SECTIONS = ("workloads", "services", "policies", "certificates")

Dump = Mapping[str, Any]
Row = Sequence[str]


# ------------------------------------------------------------------------------- tables


def format_table(headers: Row, rows: Iterable[Row]) -> str:
    """Left-aligned columns two spaces apart, each as wide as its widest cell."""
    table = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    return "\n".join(lines) + "\n"


def _text(value: object) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def _ips(addresses: object) -> str:
    """`net/ip` addresses as their IPs, comma separated."""
    if not isinstance(addresses, list) or not addresses:
        return "-"
    return ",".join(str(a).rpartition("/")[2] for a in addresses)


def _waypoint(waypoint: object) -> str:
    if isinstance(waypoint, Mapping):
        return _text(waypoint.get("destination"))
    return "None"


def _identity_namespace(uri: object) -> str | None:
    identity = Identity.try_parse(uri) if isinstance(uri, str) else None
    return identity.namespace if identity else None


def _section(dump: Dump, name: str) -> list[Mapping[str, Any]]:
    items = dump.get(name, [])
    if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
        raise LocalError(f"config dump: {name!r} is not a list of objects")
    return items


def select(
    dump: Dump, section: str, *, namespace: str | None = None, node: str | None = None
) -> list[Mapping[str, Any]]:
    """The objects of one section, keeping those in `namespace` (and on `node`, workloads)."""
    items = _section(dump, section)
    if namespace is not None:
        if section == "certificates":
            items = [c for c in items if _identity_namespace(c.get("identity")) == namespace]
        else:
            items = [item for item in items if item.get("namespace") == namespace]
    if node is not None and section == "workloads":
        items = [w for w in items if w.get("node") == node]
    return items


def workloads_table(workloads: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        [
            _text(w.get("namespace")),
            _text(w.get("name")),
            _ips(w.get("addresses")),
            _text(w.get("node")),
            _waypoint(w.get("waypoint")),
            _text(w.get("protocol")),
        ]
        for w in workloads
    ]
    return format_table(["NAMESPACE", "POD-NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], rows)


def services_table(services: Iterable[Mapping[str, Any]], dump: Dump) -> str:
    """ENDPOINTS is healthy/total, healthy read from the dump's workloads."""
    healthy = {
        w.get("uid") for w in _section(dump, "workloads") if w.get("status", "HEALTHY") == "HEALTHY"
    }
    rows = []
    for s in services:
        endpoints = s.get("endpoints")
        uids = endpoints if isinstance(endpoints, list) else []
        up = sum(1 for uid in uids if uid in healthy)
        rows.append(
            [
                _text(s.get("namespace")),
                _text(s.get("name")),
                _ips(s.get("vips")),
                _waypoint(s.get("waypoint")),
                f"{up}/{len(uids)}",
            ]
        )
    return format_table(["NAMESPACE", "SERVICE-NAME", "SERVICE-VIP", "WAYPOINT", "ENDPOINTS"], rows)


def policies_table(policies: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        [
            _text(p.get("namespace")),
            _text(p.get("name")),
            _text(p.get("action")) + (" (dry run)" if p.get("dry_run") else ""),
            _text(p.get("scope")),
        ]
        for p in policies
    ]
    return format_table(["NAMESPACE", "POLICY-NAME", "ACTION", "SCOPE"], rows)


def certificates_table(certificates: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        [
            _text(c.get("identity")),
            _text(c.get("state")),
            _text(c.get("not_after")),
            _text(c.get("refresh_at")),
            _text(c.get("error")),
        ]
        for c in certificates
    ]
    return format_table(["IDENTITY", "STATE", "NOT-AFTER", "REFRESH-AT", "ERROR"], rows)


def errors_text(dump: Dump) -> str:
    errors = dump.get("errors") or []
    if not isinstance(errors, list):
        raise LocalError("config dump: 'errors' is not a list")
    lines = [f"CONFIG ERRORS ({len(errors)})", *(f"  {error}" for error in errors)]
    return "\n".join(lines) + "\n"


def render(
    dump: Dump,
    what: str,
    output: str = "table",
    *,
    namespace: str | None = None,
    node: str | None = None,
) -> str:
    """The text `ztagent ctl WHAT -o OUTPUT` prints for `dump`; `what` is a section or `all`."""
    if what != "all" and what not in SECTIONS:
        raise LocalError(f"unknown section {what!r}: expected {', '.join(SECTIONS)} or all")
    if output == "json":
        data: Any
        if what == "all":
            data = dict(dump)
            for section in SECTIONS:
                data[section] = select(dump, section, namespace=namespace, node=node)
        else:
            data = select(dump, what, namespace=namespace, node=node)
        return json.dumps(data, indent=2) + "\n"
    if output != "table":
        raise LocalError(f"unknown output format {output!r}: expected table or json")

    tables: dict[str, Callable[[], str]] = {
        "workloads": lambda: workloads_table(
            select(dump, "workloads", namespace=namespace, node=node)
        ),
        "services": lambda: services_table(select(dump, "services", namespace=namespace), dump),
        "policies": lambda: policies_table(select(dump, "policies", namespace=namespace)),
        "certificates": lambda: certificates_table(
            select(dump, "certificates", namespace=namespace)
        ),
    }
    if what != "all":
        return tables[what]()
    parts = [tables[section]() for section in SECTIONS]
    if dump.get("errors"):
        parts.append(errors_text(dump))
    return "\n".join(parts)


# ------------------------------------------------------------------------------- fetching


def fetch_dump(admin_addr: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """GET http://ADMIN/config_dump and decode it; LocalError with one line on any failure.

    HTTP proxy settings from the environment are ignored: the admin port is local.
    """
    url = f"http://{admin_addr}/config_dump"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read(MAX_DUMP_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise LocalError(f"{url}: the agent answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        detail = getattr(reason, "strerror", None) or str(reason)
        raise LocalError(f"cannot reach the agent at {url}: {detail}") from None
    except TimeoutError:
        raise LocalError(f"cannot reach the agent at {url}: timed out after {timeout:g}s") from None
    except OSError as exc:
        raise LocalError(f"cannot read from the agent at {url}: {exc.strerror or exc}") from None
    if len(body) > MAX_DUMP_BYTES:
        raise LocalError(f"{url}: the answer is larger than {MAX_DUMP_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise LocalError(f"{url}: the answer is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LocalError(f"{url}: the answer is not a JSON object")
    return data


# ------------------------------------------------------------------------------- command line


def _admin_addr(text: str) -> str:
    try:
        ip, port = parse_authority(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return format_authority(ip, port)


def run(args: argparse.Namespace) -> int:
    dump = fetch_dump(args.admin_addr)
    text = render(
        dump,
        args.ctl_command,
        args.output,
        namespace=args.namespace,
        node=getattr(args, "node", None),
    )
    print(text, end="")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ctl workloads|services|policies|certificates|all` to the `ztagent` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin-addr",
        type=_admin_addr,
        default=DEFAULT_ADMIN_ADDR,
        metavar="IP:PORT",
        help=f"the agent's admin endpoint (default {DEFAULT_ADMIN_ADDR})",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table (default) or json",
    )
    common.add_argument("--namespace", metavar="NS", help="only objects in this namespace")
    node = argparse.ArgumentParser(add_help=False)
    node.add_argument("--node", metavar="NAME", help="only workloads on this node")

    ctl = subparsers.add_parser(
        "ctl",
        help="inspect a running agent: workloads, services, policies, certificates",
        description="Show what a running ztagent node agent knows, read from its admin "
        "endpoint's /config_dump, as tables (like istioctl ztunnel-config) or JSON.",
    )
    what = ctl.add_subparsers(dest="ctl_command", metavar="WHAT", required=True)
    helps = {
        "workloads": ("workloads and their addresses, node, waypoint and protocol", [common, node]),
        "services": ("services with their VIPs, waypoint and healthy/total endpoints", [common]),
        "policies": ("authorization policies with action and scope", [common]),
        "certificates": ("local identities' certificates and when they are refreshed", [common]),
        "all": (
            "the workloads, services, policies and certificates tables, then config errors",
            [common, node],
        ),
    }
    for name, (help_text, parents) in helps.items():
        parser = what.add_parser(name, help=help_text, description=help_text, parents=parents)
        parser.set_defaults(handler=run)
