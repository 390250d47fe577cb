"""Admin, metrics and readiness routes called in memory, without sockets."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from ztagent.http.messages import Request, Response
from ztagent.http.server import Route
from ztagent.telemetry.admin import (
    LogLevels,
    Readiness,
    admin_routes,
    metrics_routes,
    readiness_routes,
)
from ztagent.telemetry.metrics import CONTENT_TYPE, ConnectionLabels, Metrics


def call(routes: dict[str, Route], method: str, path: str, **query: str) -> Response:
    req = Request(method, path, {k: (v,) for k, v in query.items()})
    result = routes[path](req)
    if isinstance(result, Response):
        return result
    return asyncio.run(_await(result))


async def _await(aw: object) -> Response:
    result = await aw  # type: ignore[misc]
    assert isinstance(result, Response)
    return result


@pytest.fixture
def restore_levels() -> Iterator[None]:
    names = ["", "ztagent", "ztagent.access"]
    saved = {n: logging.getLogger(n or None).level for n in names}
    try:
        yield
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n or None).setLevel(lvl)


def test_config_dump_is_provider_json() -> None:
    dump = {"workloads": [{"name": "echo"}], "version": 3}
    routes = admin_routes(lambda: dump, lambda: None)
    resp = call(routes, "GET", "/config_dump")
    assert resp.status == 200
    assert ("content-type", "application/json") in resp.headers
    assert json.loads(resp.body) == dump
    assert call(routes, "POST", "/config_dump").status == 405


def test_index_lists_endpoints() -> None:
    body = call(admin_routes(dict, lambda: None), "GET", "/").body.decode()
    for path in ("/config_dump", "/logging", "/quitquitquit"):
        assert path in body


def test_quitquitquit_calls_shutdown_on_post_only() -> None:
    calls: list[int] = []
    routes = admin_routes(dict, lambda: calls.append(1))
    assert call(routes, "GET", "/quitquitquit").status == 405
    assert calls == []
    resp = call(routes, "POST", "/quitquitquit")
    assert (resp.status, resp.body, calls) == (200, b"shutdown now\n", [1])


def test_logging_show_set_and_reset(restore_levels: None) -> None:
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("ztagent").setLevel(logging.NOTSET)
    routes = admin_routes(dict, lambda: None, LogLevels())
    shown = call(routes, "GET", "/logging").body.decode()
    assert shown.startswith("current log level is ") and shown.rstrip().endswith("info")

    resp = call(routes, "POST", "/logging", level="debug")
    assert resp.status == 200
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("ztagent").level == logging.DEBUG

    resp = call(routes, "POST", "/logging", level="ztagent.access=error,warn")
    assert resp.status == 200
    assert logging.getLogger("ztagent.access").level == logging.ERROR
    assert logging.getLogger().level == logging.WARNING
    assert "ztagent.access=error" in resp.body.decode()

    resp = call(routes, "POST", "/logging", level="loud")
    assert resp.status == 400 and b"usage" in resp.body
    assert logging.getLogger().level == logging.WARNING

    for method in ("GET", "HEAD"):
        assert call(routes, method, "/logging", level="debug").status == 405
        assert call(routes, method, "/logging", reset="").status == 405
    assert logging.getLogger().level == logging.WARNING

    call(routes, "POST", "/logging", reset="")
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("ztagent").level == logging.NOTSET


def test_metrics_routes_render() -> None:
    m = Metrics()
    m.opened(ConnectionLabels(source_workload="a"))
    routes = metrics_routes(m.render)
    for path in ("/metrics", "/stats/prometheus"):
        resp = call(routes, "GET", path)
        assert resp.status == 200
        assert ("content-type", CONTENT_TYPE) in resp.headers
        assert b"istio_tcp_connections_opened_total{" in resp.body


def test_readiness_flips() -> None:
    r = Readiness("config", "certificates")
    routes = readiness_routes(r.ready, r.reason)
    resp = call(routes, "GET", "/healthz/ready")
    assert resp.status == 503
    assert resp.body == b"not ready, pending: certificates, config\n"
    r.done("config")
    r.done("certificates")
    assert call(routes, "GET", "/healthz/ready").status == 200
    assert call(readiness_routes(lambda: False), "GET", "/healthz/ready").body == b"not ready\n"
