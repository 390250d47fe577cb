"""Admin, metrics and readiness servers on 127.0.0.1, driven by urllib and raw sockets.

The servers run in a uvloop event loop on a thread of the test; clients are the standard
library's, so the HTTP framing is checked against an implementation we did not write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from ztagent.http.messages import Request, Response
from ztagent.http.server import HttpServer
from ztagent.telemetry.admin import (
    LogLevels,
    Readiness,
    build_admin_server,
    build_metrics_server,
    build_readiness_server,
)
from ztagent.telemetry.metrics import ConnectionLabels, Metrics

pytestmark = pytest.mark.integration

TIMEOUT = 5.0


@dataclass
class Agent:
    loop: asyncio.AbstractEventLoop
    admin: HttpServer
    metrics_server: HttpServer
    readiness_server: HttpServer
    metrics: Metrics
    readiness: Readiness
    dump: dict[str, Any]
    shutdowns: list[str] = field(default_factory=list)

    def url(self, server: HttpServer, path: str) -> str:
        return server.url + path

    def run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(TIMEOUT)


def _fetch(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("content-type", ""), e.read()


def _raw(addr: tuple[str, int], data: bytes) -> bytes:
    """Send `data`, half-close, read until the server closes (bounded by size and timeout)."""
    with socket.create_connection(addr, timeout=TIMEOUT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        for _ in range(1000):
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def agent() -> Iterator[Agent]:
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="admin-loop", daemon=True)
    thread.start()
    metrics = Metrics()
    readiness = Readiness("config", "certificates")
    dump: dict[str, Any] = {"workloads": [{"name": "echo", "namespace": "prod"}], "version": 1}
    shutdowns: list[str] = []
    saved_levels = {n: logging.getLogger(n).level for n in (None, "ztagent")}
    servers: list[HttpServer] = []
    try:
        admin = build_admin_server(lambda: dump, lambda: shutdowns.append("quit"), LogLevels())
        metrics_server = build_metrics_server(metrics.render)
        readiness_server = build_readiness_server(readiness.ready, readiness.reason)
        a = Agent(
            loop, admin, metrics_server, readiness_server, metrics, readiness, dump, shutdowns
        )
        for s in (admin, metrics_server, readiness_server):
            servers.append(s)
            a.run(s.start("127.0.0.1", 0))
        yield a
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(s.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
        for n, lvl in saved_levels.items():
            logging.getLogger(n).setLevel(lvl)


def test_config_dump_json(agent: Agent) -> None:
    status, ctype, body = _fetch(agent.url(agent.admin, "/config_dump"))
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == agent.dump
    agent.dump["version"] = 2
    assert json.loads(_fetch(agent.url(agent.admin, "/config_dump"))[2])["version"] == 2
    assert _fetch(agent.url(agent.admin, "/nope"))[0] == 404
    status, _, body = _fetch(agent.url(agent.admin, "/"))
    assert status == 200 and b"/quitquitquit" in body


def test_logging_level_change_takes_effect(agent: Agent) -> None:
    logging.getLogger().setLevel(logging.INFO)
    probe = logging.getLogger("ztagent.some.module")
    assert not probe.isEnabledFor(logging.DEBUG)
    status, _, body = _fetch(agent.url(agent.admin, "/logging?level=debug"), "POST")
    assert status == 200 and body.decode().strip().endswith("debug")
    assert probe.isEnabledFor(logging.DEBUG)
    assert _fetch(agent.url(agent.admin, "/logging?level=error"))[0] == 405
    assert probe.isEnabledFor(logging.DEBUG)
    status, _, body = _fetch(agent.url(agent.admin, "/logging?level=error"), "POST")
    assert status == 200 and not probe.isEnabledFor(logging.WARNING)
    status, _, body = _fetch(agent.url(agent.admin, "/logging"))
    assert status == 200 and body.endswith(b",error\n") and b"ztagent=error" in body
    assert _fetch(agent.url(agent.admin, "/logging?level=verbose"), "POST")[0] == 400


def test_quitquitquit_calls_callback(agent: Agent) -> None:
    assert _fetch(agent.url(agent.admin, "/quitquitquit"))[0] == 405
    assert agent.shutdowns == []
    status, _, body = _fetch(agent.url(agent.admin, "/quitquitquit"), "POST")
    assert (status, body) == (200, b"shutdown now\n")
    assert agent.shutdowns == ["quit"]


def test_readiness_flips(agent: Agent) -> None:
    url = agent.url(agent.readiness_server, "/healthz/ready")
    status, _, body = _fetch(url)
    assert status == 503 and b"pending: certificates, config" in body
    agent.loop.call_soon_threadsafe(agent.readiness.done, "config")
    agent.loop.call_soon_threadsafe(agent.readiness.done, "certificates")
    agent.run(asyncio.sleep(0))
    assert _fetch(url)[:3] == (200, "text/plain; charset=utf-8", b"ready\n")


def test_metrics_text_parses(agent: Agent) -> None:
    labels = ConnectionLabels(
        reporter="destination",
        source_workload="sleep",
        source_workload_namespace="default",
        destination_workload="echo",
        destination_workload_namespace="prod",
        connection_security_policy="mutual_tls",
    )

    async def traffic() -> None:
        agent.metrics.opened(labels)
        agent.metrics.received(labels, 1234)
        agent.metrics.sent(labels, 99)
        agent.metrics.closed(labels)

    agent.run(traffic())
    for path in ("/metrics", "/stats/prometheus"):
        status, ctype, body = _fetch(agent.url(agent.metrics_server, path))
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        received = families["istio_tcp_received_bytes"].samples
        assert [(s.labels["destination_workload"], s.value) for s in received] == [("echo", 1234)]
        assert families["istio_tcp_connections_closed"].samples[0].value == 1
        assert "istio_build" in families


def test_malformed_request_gets_400_and_server_keeps_serving(agent: Agent) -> None:
    addr = agent.admin.address
    reply = _raw(addr, b"THIS IS NOT HTTP\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in reply.lower()
    reply = _raw(addr, b"GET /config_dump HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    reply = _raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    reply = _raw(addr, b"POST /logging HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ")
    reply = _raw(addr, b"DELETE /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405 ")
    assert _fetch(agent.url(agent.admin, "/config_dump"))[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(agent: Agent) -> None:
    request = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = _raw(agent.readiness_server.address, request * 3 + last)
    assert reply.count(b"HTTP/1.1 503 ") == 4


def test_handler_exception_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    loop = uvloop.new_event_loop()

    def boom(req: Request) -> Response:
        raise RuntimeError("handler bug")

    async def fine(req: Request) -> Response:
        return Response.text(f"hello {req.arg('who')} {req.method} {len(req.body)}\n")

    server = HttpServer({"/boom": boom, "/fine": fine})
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(TIMEOUT)
        with caplog.at_level(logging.ERROR, logger="ztagent.http.server"):
            assert _fetch(server.url + "/boom")[0] == 500
        assert any("handler bug" in (r.exc_text or "") for r in caplog.records)
        assert _fetch(server.url + "/fine?who=me%20too")[2] == b"hello me too GET 0\n"
        req = urllib.request.Request(server.url + "/fine", data=b"x" * 5000, method="POST")
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            assert resp.read() == b"hello None POST 5000\n"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def test_slow_or_idle_connection_is_closed_and_others_served() -> None:
    loop = uvloop.new_event_loop()
    server = HttpServer({"/": lambda req: Response.text("ok\n")}, head_timeout=0.3)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        addr = asyncio.run_coroutine_threadsafe(server.start(), loop).result(TIMEOUT)
        with socket.create_connection(addr, timeout=TIMEOUT) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert _fetch(server.url + "/")[2] == b"ok\n"
            assert slow.recv(100) == b""
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def test_at_the_cap_the_idle_connection_closes_and_busy_ones_stay() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(req: Request) -> Response:
            await release.wait()
            return Response.text("slow\n")

        server = HttpServer(
            {"/slow": slow, "/": lambda req: Response.text("ok\n")}, max_connections=2
        )
        addr = await server.start()
        try:
            busy_r, busy_w = await asyncio.open_connection(*addr)
            busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            idle_r, idle_w = await asyncio.open_connection(*addr)
            await asyncio.sleep(0.1)
            # A third connection closes the idle one, not the one being answered.
            r, w = await asyncio.open_connection(*addr)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(r.read(1000), TIMEOUT)).startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(idle_r.read(100), TIMEOUT) == b""
            w.close()
            idle_w.close()
            # Both slots busy: a new connection is refused.
            other_r, other_w = await asyncio.open_connection(*addr)
            other_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.1)
            r, w = await asyncio.open_connection(*addr)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                refused = await asyncio.wait_for(r.read(1000), TIMEOUT)
            except ConnectionResetError:  # closed with our request unread
                refused = b""
            assert refused == b""
            w.close()
            release.set()
            for reader in (busy_r, other_r):
                reply = await asyncio.wait_for(reader.readuntil(b"slow\n"), TIMEOUT)
                assert reply.startswith(b"HTTP/1.1 200 ")
            busy_w.close()
            other_w.close()
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 20))
