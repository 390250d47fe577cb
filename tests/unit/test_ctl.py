"""`ztagent ctl`: tables and JSON from a config dump, and fetching it from the admin port."""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ztagent import ctl
from ztagent.errors import LocalError

DUMP: dict[str, Any] = {
    "node": "node-a",
    "version": 3,
    "config_source": "/etc/ztunnel/local.yaml",
    "errors": ['workloads[2] (uid "bad"): workloads[2].workloadIps: is required'],
    "workloads": [
        {
            "uid": "c//v1/Pod/default/web-0",
            "name": "web-0",
            "namespace": "default",
            "node": "node-a",
            "addresses": ["/10.0.0.1", "/fd00::1"],
            "protocol": "HBONE",
            "identity": "spiffe://cluster.local/ns/default/sa/web",
            "service_account": "web",
            "workload_name": "web",
            "canonical_name": "web",
            "canonical_revision": "v1",
            "status": "HEALTHY",
            "cluster_id": "Kubernetes",
            "services": {"default/web.default.svc": {"80": 8080}},
            "authorization_policies": [],
            "waypoint": None,
            "local": True,
        },
        {
            "uid": "c//v1/Pod/default/web-1",
            "name": "web-1",
            "namespace": "default",
            "node": "node-b",
            "addresses": ["/10.0.1.1"],
            "protocol": "HBONE",
            "identity": "spiffe://cluster.local/ns/default/sa/web",
            "service_account": "web",
            "workload_name": "web",
            "canonical_name": "web",
            "canonical_revision": "v1",
            "status": "UNHEALTHY",
            "cluster_id": "Kubernetes",
            "services": {"default/web.default.svc": {"80": 8080}},
            "authorization_policies": [],
            "waypoint": None,
            "local": False,
        },
        {
            "uid": "c//v1/Pod/shop/cart-7f9c",
            "name": "cart-7f9c",
            "namespace": "shop",
            "node": "node-a",
            "addresses": ["net1/10.0.2.7"],
            "protocol": "NONE",
            "identity": "spiffe://cluster.local/ns/shop/sa/cart",
            "service_account": "cart",
            "workload_name": "cart",
            "canonical_name": "cart",
            "canonical_revision": "",
            "status": "HEALTHY",
            "cluster_id": "Kubernetes",
            "services": {},
            "authorization_policies": ["shop/allow-web"],
            "waypoint": {"destination": "shop/waypoint.shop.svc", "hbone_mtls_port": 15008},
            "local": True,
        },
    ],
    "services": [
        {
            "key": "default/web.default.svc",
            "name": "web",
            "namespace": "default",
            "hostname": "web.default.svc",
            "vips": ["/10.96.0.10"],
            "ports": {"80": 8080},
            "subject_alt_names": [],
            "endpoints": ["c//v1/Pod/default/web-0", "c//v1/Pod/default/web-1"],
            "waypoint": None,
        },
        {
            "key": "shop/cart.shop.svc",
            "name": "cart",
            "namespace": "shop",
            "hostname": "cart.shop.svc",
            "vips": ["/10.96.0.20", "net1/10.96.0.21"],
            "ports": {"443": 8443},
            "subject_alt_names": [],
            "endpoints": [],
            "waypoint": {"destination": "/10.0.9.9", "hbone_mtls_port": 15008},
        },
    ],
    "policies": [
        {
            "key": "istio-system/strict",
            "name": "strict",
            "namespace": "istio-system",
            "scope": "GLOBAL",
            "action": "DENY",
            "dry_run": False,
            "rules": [[[{"not_principals": ["*"]}]]],
        },
        {
            "key": "shop/allow-web",
            "name": "allow-web",
            "namespace": "shop",
            "scope": "WORKLOAD_SELECTOR",
            "action": "ALLOW",
            "dry_run": True,
            "rules": [[[{"service_accounts": ["default/web"]}]]],
        },
    ],
    "certificates": [
        {
            "identity": "spiffe://cluster.local/ns/default/sa/web",
            "state": "available",
            "not_before": "2024-05-01T11:59:00Z",
            "not_after": "2024-05-02T12:00:00Z",
            "refresh_at": "2024-05-02T00:00:30Z",
            "chain_length": 2,
            "error": None,
        },
        {
            "identity": "spiffe://cluster.local/ns/shop/sa/cart",
            "state": "failed",
            "not_before": None,
            "not_after": None,
            "refresh_at": None,
            "chain_length": 0,
            "error": "CA unreachable",
        },
    ],
}

WORKLOADS_TABLE = """\
NAMESPACE  POD-NAME   ADDRESS           NODE    WAYPOINT                PROTOCOL
default    web-0      10.0.0.1,fd00::1  node-a  None                    HBONE
default    web-1      10.0.1.1          node-b  None                    HBONE
shop       cart-7f9c  10.0.2.7          node-a  shop/waypoint.shop.svc  NONE
"""

SERVICES_TABLE = """\
NAMESPACE  SERVICE-NAME  SERVICE-VIP            WAYPOINT   ENDPOINTS
default    web           10.96.0.10             None       1/2
shop       cart          10.96.0.20,10.96.0.21  /10.0.9.9  0/0
"""

POLICIES_TABLE = """\
NAMESPACE     POLICY-NAME  ACTION           SCOPE
istio-system  strict       DENY             GLOBAL
shop          allow-web    ALLOW (dry run)  WORKLOAD_SELECTOR
"""

CERTIFICATES_TABLE = "".join(
    line + "\n"
    for line in (
        "IDENTITY                                  STATE      NOT-AFTER             "
        "REFRESH-AT            ERROR",
        "spiffe://cluster.local/ns/default/sa/web  available  2024-05-02T12:00:00Z  "
        "2024-05-02T00:00:30Z  -",
        "spiffe://cluster.local/ns/shop/sa/cart    failed     -                     "
        "-                     CA unreachable",
    )
)


# ------------------------------------------------------------------------------ rendering


def test_format_table_widths_from_content() -> None:
    text = ctl.format_table(["A", "LONGER"], [["wide cell", "x"], ["y", ""]])
    assert text == "A          LONGER\nwide cell  x\ny\n"
    assert ctl.format_table(["ONE", "TWO"], []) == "ONE  TWO\n"


def test_workloads_table() -> None:
    assert ctl.render(DUMP, "workloads") == WORKLOADS_TABLE


def test_workloads_filters() -> None:
    by_node = ctl.render(DUMP, "workloads", node="node-a")
    assert [line.split()[1] for line in by_node.splitlines()[1:]] == ["web-0", "cart-7f9c"]
    both = ctl.render(DUMP, "workloads", node="node-a", namespace="shop")
    assert [line.split()[1] for line in both.splitlines()[1:]] == ["cart-7f9c"]
    none = ctl.render(DUMP, "workloads", namespace="nowhere")
    assert none.splitlines() == ["NAMESPACE  POD-NAME  ADDRESS  NODE  WAYPOINT  PROTOCOL"]


def test_services_table() -> None:
    assert ctl.render(DUMP, "services") == SERVICES_TABLE


def test_policies_table() -> None:
    assert ctl.render(DUMP, "policies") == POLICIES_TABLE
    shop = ctl.render(DUMP, "policies", namespace="shop")
    assert len(shop.splitlines()) == 2
    assert "allow-web" in shop


def test_certificates_table() -> None:
    assert ctl.render(DUMP, "certificates") == CERTIFICATES_TABLE
    shop = ctl.render(DUMP, "certificates", namespace="shop")
    assert shop.splitlines()[1].startswith("spiffe://cluster.local/ns/shop/sa/cart ")
    assert len(shop.splitlines()) == 2


def test_all_table() -> None:
    text = ctl.render(DUMP, "all")
    assert text == "\n".join(
        [
            WORKLOADS_TABLE,
            SERVICES_TABLE,
            POLICIES_TABLE,
            CERTIFICATES_TABLE,
            "CONFIG ERRORS (1)\n"
            '  workloads[2] (uid "bad"): workloads[2].workloadIps: is required\n',
        ]
    )
    clean = ctl.render({**DUMP, "errors": []}, "all")
    assert "CONFIG ERRORS" not in clean


def test_json_output() -> None:
    workloads = json.loads(ctl.render(DUMP, "workloads", "json", namespace="default"))
    assert workloads == DUMP["workloads"][:2]
    certificates = json.loads(ctl.render(DUMP, "certificates", "json"))
    assert certificates == DUMP["certificates"]
    everything = json.loads(ctl.render(DUMP, "all", "json"))
    assert everything == DUMP
    shop = json.loads(ctl.render(DUMP, "all", "json", namespace="shop", node="node-a"))
    assert [w["name"] for w in shop["workloads"]] == ["cart-7f9c"]
    assert [s["name"] for s in shop["services"]] == ["cart"]
    assert [p["name"] for p in shop["policies"]] == ["allow-web"]
    assert [c["identity"] for c in shop["certificates"]] == [
        "spiffe://cluster.local/ns/shop/sa/cart"
    ]
    assert shop["node"] == "node-a"
    assert shop["errors"] == DUMP["errors"]


def test_missing_sections_and_fields_render() -> None:
    assert ctl.render({}, "all").count("\n") == 7
    text = ctl.render({"workloads": [{"name": "w"}]}, "workloads")
    assert text.splitlines()[1].split() == ["-", "w", "-", "-", "None", "-"]


def test_malformed_dump() -> None:
    with pytest.raises(LocalError, match="'workloads' is not a list of objects"):
        ctl.render({"workloads": {"a": 1}}, "workloads")
    with pytest.raises(LocalError, match="'services' is not a list of objects"):
        ctl.render({"services": [1]}, "services")
    with pytest.raises(LocalError, match="unknown section"):
        ctl.render(DUMP, "secrets")
    with pytest.raises(LocalError, match="unknown output format"):
        ctl.render(DUMP, "workloads", "yaml")


# ------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztagent")
    sub = parser.add_subparsers(dest="command", required=True)
    ctl.register(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    result: int = args.handler(args)
    return result


def test_arguments() -> None:
    args = _parser().parse_args(["ctl", "workloads"])
    assert args.admin_addr == "127.0.0.1:15000"
    assert args.output == "table"
    assert args.namespace is None
    assert args.node is None
    args = _parser().parse_args(
        ["ctl", "all", "--admin-addr", "[::1]:15001", "-o", "json", "--node", "n"]
    )
    assert (args.admin_addr, args.output, args.node) == ("[::1]:15001", "json", "n")
    args = _parser().parse_args(["ctl", "certificates", "--namespace", "shop"])
    assert args.namespace == "shop"
    assert not hasattr(args, "node")


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl"],
        ["ctl", "secrets"],
        ["ctl", "workloads", "-o", "yaml"],
        ["ctl", "workloads", "--admin-addr", "localhost"],
        ["ctl", "services", "--node", "n"],
    ],
)
def test_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2


class _Admin(http.server.BaseHTTPRequestHandler):
    body: bytes = b""
    status: int = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[tuple[str, type[_Admin]]]:
    handler = type("Admin", (_Admin,), {"body": json.dumps(DUMP).encode(), "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_handlers_against_a_served_dump(
    admin: tuple[str, type[_Admin]], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, handler = admin
    assert _run(["ctl", "workloads", "--admin-addr", addr]) == 0
    assert capsys.readouterr().out == WORKLOADS_TABLE
    assert handler.paths == ["/config_dump"]

    assert _run(["ctl", "services", "--admin-addr", addr, "--namespace", "shop"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [SERVICES_TABLE.splitlines()[0], SERVICES_TABLE.splitlines()[2]]

    assert _run(["ctl", "policies", "--admin-addr", addr]) == 0
    assert capsys.readouterr().out == POLICIES_TABLE

    assert _run(["ctl", "certificates", "--admin-addr", addr, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == DUMP["certificates"]

    assert _run(["ctl", "workloads", "--admin-addr", addr, "-o", "json", "--node", "node-b"]) == 0
    assert [w["name"] for w in json.loads(capsys.readouterr().out)] == ["web-1"]

    assert _run(["ctl", "all", "--admin-addr", addr, "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == DUMP

    assert _run(["ctl", "all", "--admin-addr", addr]) == 0
    assert capsys.readouterr().out == ctl.render(DUMP, "all")


def test_bad_answers(admin: tuple[str, type[_Admin]]) -> None:
    addr, handler = admin
    handler.body = b"<html>not json</html>"
    with pytest.raises(LocalError, match=r"/config_dump: the answer is not valid JSON"):
        _run(["ctl", "workloads", "--admin-addr", addr])
    handler.body = b"[1, 2]"
    with pytest.raises(LocalError, match="the answer is not a JSON object"):
        _run(["ctl", "workloads", "--admin-addr", addr])
    handler.body = b"not found\n"
    handler.status = 404
    with pytest.raises(LocalError, match="the agent answered HTTP 404"):
        _run(["ctl", "workloads", "--admin-addr", addr])


def test_unreachable_agent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    with pytest.raises(LocalError) as exc:
        _run(["ctl", "workloads", "--admin-addr", addr])
    message = str(exc.value)
    assert message.startswith(f"cannot reach the agent at http://{addr}/config_dump: ")
    assert "\n" not in message
