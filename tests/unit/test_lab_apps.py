"""The lab's echo app on loopback: status codes, injected failures, the unhealthy mode,
chunked bodies and gRPC in the same process."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

from ztagent.lab import apps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[int, int]]:
    http_port, grpc_port = free_port(), free_port()
    thread = threading.Thread(
        target=apps.serve, args=("127.0.0.1", http_port, "pod-x", "v7", grpc_port), daemon=True
    )
    thread.start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", http_port), timeout=0.1).close()
            break
        except OSError:
            threading.Event().wait(0.05)
    yield http_port, grpc_port


def get(
    port: int, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_answer_names_pod_and_version(app: tuple[int, int]) -> None:
    status, headers, body = get(app[0], "/hello")
    answer = json.loads(body)
    assert status == 200 and headers[apps.POD_HEADER] == "pod-x"
    assert (answer["pod"], answer["version"], answer["path"]) == ("pod-x", "v7", "/hello")


@pytest.mark.parametrize("code", [201, 404, 418, 503])
def test_status_path(app: tuple[int, int], code: int) -> None:
    status, headers, body = get(app[0], f"/status/{code}", body=b"x")
    assert status == code and headers[apps.POD_HEADER] == "pod-x"
    assert json.loads(body)["status"] == code


def test_fail_percent(app: tuple[int, int]) -> None:
    assert get(app[0], "/", {apps.FAIL_PERCENT_HEADER: "100"})[0] == 503
    assert get(app[0], "/", {apps.FAIL_PERCENT_HEADER: "0"})[0] == 200
    statuses = [get(app[0], "/", {apps.FAIL_PERCENT_HEADER: "50"})[0] for _ in range(200)]
    assert 50 < statuses.count(503) < 150


def test_unhealthy_mode(app: tuple[int, int]) -> None:
    port = app[0]
    assert json.loads(get(port, "/lab/health?fail=1")[2])["unhealthy"] is True
    try:
        assert [get(port, f"/x{i}")[0] for i in range(4)] == [503] * 4
    finally:
        assert json.loads(get(port, "/lab/health?fail=0")[2])["unhealthy"] is False
    assert get(port, "/x")[0] == 200


def test_chunked_body_is_read_whole(app: tuple[int, int]) -> None:
    data = apps.payload(300_000)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]

    conn = http.client.HTTPConnection("127.0.0.1", app[0], timeout=5)
    try:
        conn.request("POST", "/up", body=chunks(), encode_chunked=True)
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert answer["received"] == len(data)
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()


def test_grpc_call(app: tuple[int, int]) -> None:
    assert apps.grpc_call("127.0.0.1", app[1], b"abc") == {
        "pod": "pod-x",
        "version": "v7",
        "received": 3,
    }
    with grpc.insecure_channel(f"127.0.0.1:{app[1]}") as channel:
        other: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/ztlab.Echo/Nope")
        with pytest.raises(grpc.RpcError) as info:
            other(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
