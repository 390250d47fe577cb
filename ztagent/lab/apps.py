"""The pod echo app: a tiny HTTP/1.1 server that answers with what it saw, and a client.

Server: `python -m ztagent.lab.apps --listen IP:PORT --name POD [--version V] [--grpc-port P]`.
Every response carries the header `x-lab-pod: POD` and is JSON: `{"pod", "version", "peer"
("ip:port" of the connection it accepted), "path", "method", "status", "received" (request body
bytes), "sha256" (of the body)}`. `POST` bodies of any size are read and counted, with a
Content-Length or chunked. Besides:

- `GET /bytes/N` answers N bytes of a fixed pattern instead;
- `GET|POST /status/CODE` answers with that status;
- a request with `x-lab-fail-percent: N` is answered 503 with probability N/100 (failures
  that come from upstream, as a waypoint's retries see them);
- `GET /lab/health?fail=1` (`fail=0` undoes it), accepted only from the pod's own address,
  makes the app unhealthy: from then on every request but `/lab/health` is answered 503;
- with `--grpc-port`, the same process serves gRPC: `/ztlab.Echo/Call` (no proto file: raw
  bytes in, JSON bytes `{"pod", "version", "received"}` out).

Client (used by the demo, and handy by hand inside a pod namespace):
`python -m ztagent.lab.apps --get http://IP:PORT/path [--post-bytes N]` prints the reply;
`python -m ztagent.lab.apps --grpc IP:PORT [--post-bytes N]` makes one gRPC call.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc

MAX_BODY = 256 * 1024 * 1024
MAX_BYTES_REPLY = 64 * 1024 * 1024
PAYLOAD_LINE = b"ztlab plaintext payload line %08d; if you can read this on the wire it leaked\n"
POD_HEADER = "x-lab-pod"
FAIL_PERCENT_HEADER = "x-lab-fail-percent"
HEALTH_PATH = "/lab/health"
GRPC_METHOD = "/ztlab.Echo/Call"
GRPC_SERVICE, _, GRPC_CALL = GRPC_METHOD[1:].partition("/")
CHUNK = 262144


def payload(size: int) -> bytes:
    """A recognisable payload of `size` bytes (each line names the lab)."""
    out = bytearray()
    n = 0
    while len(out) < size:
        out += PAYLOAD_LINE % n
        n += 1
    return bytes(out[:size])


class AppState:
    """What the app's handlers share: its name, version, health and dice."""

    def __init__(self, name: str, version: str, seed: int | None = None) -> None:
        self.name = name
        self.version = version
        self.unhealthy = False
        self.random = random.Random(seed)
        self.lock = threading.Lock()

    def roll(self, percent: float) -> bool:
        """True with probability `percent`/100."""
        with self.lock:
            return self.random.random() * 100.0 < percent


class BodyError(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ztlab-echo/1"
    # One write per response (headers and body are written separately; with Nagle's
    # algorithm the body would wait for the client's delayed ACK, ~40 ms per request).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    app: AppState

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(
        self, body: bytes, content_type: str = "application/json", status: int = 200
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header(POD_HEADER, self.app.name)
        if status in (204, 304) or 100 <= status < 200:
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> tuple[int, str]:
        """Read the request body (Content-Length or chunked): (bytes, sha256 hex)."""
        digest = hashlib.sha256()
        total = 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BodyError("bad chunk size") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    raise BodyError("body too large")
                left = size
                while left > 0:
                    chunk = self.rfile.read(min(left, CHUNK))
                    if not chunk:
                        raise BodyError("body cut short")
                    digest.update(chunk)
                    left -= len(chunk)
                self.rfile.readline(1024)
            return total, digest.hexdigest()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BodyError("bad Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise BodyError("body too large")
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, CHUNK))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        return length - left, digest.hexdigest()

    def _answer(self) -> None:
        try:
            received, sha256 = self._read_body()
        except BodyError as exc:
            self.close_connection = True
            self._reply(json.dumps({"error": str(exc)}).encode() + b"\n", status=413)
            return
        url = urlsplit(self.path)
        if url.path == HEALTH_PATH:
            self._health(url.query)
            return
        status = 200
        if self.app.unhealthy:
            status = 503
        else:
            try:
                percent = float(self.headers.get(FAIL_PERCENT_HEADER) or 0)
            except ValueError:
                percent = 0.0
            if percent > 0 and self.app.roll(percent):
                status = 503
        if status == 200 and url.path.startswith("/status/"):
            code = url.path[len("/status/") :]
            if not code.isdigit() or not 100 <= int(code) <= 599:
                self._reply(b'{"error": "status out of range"}\n', status=400)
                return
            status = int(code)
        if status == 200 and url.path.startswith("/bytes/"):
            try:
                size = int(url.path[len("/bytes/") :])
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_BYTES_REPLY:
                self._reply(b'{"error": "size out of range"}\n', status=400)
                return
            self._reply(payload(size), "application/octet-stream")
            return
        peer = self.client_address
        body = {
            "pod": self.app.name,
            "version": self.app.version,
            "peer": f"{peer[0]}:{peer[1]}",
            "path": self.path,
            "method": self.command,
            "status": status,
            "received": received,
            "sha256": sha256,
        }
        self._reply(json.dumps(body).encode() + b"\n", status=status)

    def _health(self, query: str) -> None:
        """Toggle the unhealthy mode; only the pod itself may (a mesh caller cannot)."""
        own = self.connection.getsockname()[0]
        if self.client_address[0] != own:
            self._reply(b'{"error": "only from the pod itself"}\n', status=403)
            return
        fail = parse_qs(query).get("fail", [""])[-1]
        if fail in ("1", "0"):
            self.app.unhealthy = fail == "1"
        answer = {"pod": self.app.name, "unhealthy": self.app.unhealthy}
        self._reply(json.dumps(answer).encode() + b"\n")

    do_GET = _answer
    do_POST = _answer
    do_PUT = _answer
    do_DELETE = _answer
    do_HEAD = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def grpc_handler(app: AppState) -> grpc.GenericRpcHandler:
    """`/ztlab.Echo/Call`: bytes in, the app's JSON answer out (no serializers, no proto)."""

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        answer = {"pod": app.name, "version": app.version, "received": len(request)}
        return json.dumps(answer).encode()

    return grpc.method_handlers_generic_handler(
        GRPC_SERVICE, {GRPC_CALL: grpc.unary_unary_rpc_method_handler(call)}
    )


def start_grpc(host: str, port: int, app: AppState) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc_handler(app),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    server.start()
    return server


def serve(
    host: str, port: int, name: str, version: str = "v1", grpc_port: int | None = None
) -> None:
    app = AppState(name, version)
    handler = type("Handler", (_Handler,), {"app": app})
    grpc_server = start_grpc(host, grpc_port, app) if grpc_port else None
    try:
        with _Server((host, port), handler) as server:
            server.serve_forever()
    finally:
        if grpc_server is not None:
            grpc_server.stop(0)


def grpc_call(host: str, port: int, body: bytes = b"", timeout: float = 10.0) -> dict[str, Any]:
    """One `/ztlab.Echo/Call` with `body`; the JSON answer. Raises `grpc.RpcError`.
    gRPC's own threads open the connection: run this in a process inside the namespace."""
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"{host}:{port}", options=options) as channel:
        method: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_METHOD)
        reply = method(body, timeout=timeout)
    answer: dict[str, Any] = json.loads(reply)
    return answer


def request(
    host: str,
    port: int,
    path: str = "/",
    post_bytes: int = 0,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request (a POST of `post_bytes` pattern bytes when > 0); returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if post_bytes > 0:
            conn.request("POST", path, body=payload(post_bytes))
        else:
            conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {value!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztagent.lab.apps", description=__doc__)
    parser.add_argument("--listen", type=_address, help="serve on IP:PORT")
    parser.add_argument("--name", default="pod", help="pod name reported in every answer")
    parser.add_argument("--version", default="v1", help="version reported in every answer")
    parser.add_argument("--grpc-port", type=int, help="also serve gRPC on this port")
    parser.add_argument("--get", metavar="URL", help="make one request to URL and print it")
    parser.add_argument("--grpc", type=_address, metavar="IP:PORT", help="one gRPC call")
    parser.add_argument("--post-bytes", type=int, default=0, help="POST this many bytes")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.listen:
        serve(args.listen[0], args.listen[1], args.name, args.version, args.grpc_port)
        return 0
    if args.grpc:
        try:
            answer = grpc_call(args.grpc[0], args.grpc[1], payload(args.post_bytes), args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code()}: {exc.details()}", file=sys.stderr)
            return 1
        print(json.dumps(answer))
        return 0
    if args.get:
        url = urlsplit(args.get)
        try:
            status, body = request(
                url.hostname or "",
                url.port or 80,
                url.path or "/",
                args.post_bytes,
                args.timeout,
            )
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write(body.decode(errors="replace"))
        return 0 if status == 200 else 1
    parser.error("one of --listen, --get or --grpc is required")
    return 2


if __name__ == "__main__":
    sys.exit(main())
