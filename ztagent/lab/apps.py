"""The pod echo app: a tiny HTTP/1.1 server that answers with what it saw, and a client.

Server: `python -m ztagent.lab.apps --listen IP:PORT --name POD`. Every response is JSON:
`{"pod", "peer" ("ip:port" of the connection it accepted), "path", "method", "received"
(request body bytes), "sha256" (of the body)}`. `GET /bytes/N` answers N bytes of a fixed
pattern instead. `POST` bodies of any size are read and counted.

Client (used by the demo, and handy by hand inside a pod namespace):
`python -m ztagent.lab.apps --get http://IP:PORT/path [--post-bytes N]` prints the reply.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MAX_BODY = 256 * 1024 * 1024
MAX_BYTES_REPLY = 64 * 1024 * 1024
PAYLOAD_LINE = b"ztlab plaintext payload line %08d; if you can read this on the wire it leaked\n"


def payload(size: int) -> bytes:
    """A recognisable payload of `size` bytes (each line names the lab)."""
    out = bytearray()
    n = 0
    while len(out) < size:
        out += PAYLOAD_LINE % n
        n += 1
    return bytes(out[:size])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ztlab-echo/1"
    pod_name = "pod"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            self.send_error(413)
            return
        digest = hashlib.sha256()
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 262144))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        if self.path.startswith("/bytes/"):
            try:
                size = int(self.path[len("/bytes/") :])
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_BYTES_REPLY:
                self.send_error(400, "size out of range")
                return
            self._reply(payload(size), "application/octet-stream")
            return
        peer = self.client_address
        body = {
            "pod": self.pod_name,
            "peer": f"{peer[0]}:{peer[1]}",
            "path": self.path,
            "method": self.command,
            "received": length - left,
            "sha256": digest.hexdigest(),
        }
        self._reply(json.dumps(body).encode() + b"\n")

    do_GET = _answer
    do_POST = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(host: str, port: int, name: str) -> None:
    handler = type("Handler", (_Handler,), {"pod_name": name})
    with _Server((host, port), handler) as server:
        server.serve_forever()


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
    parser.add_argument("--get", metavar="URL", help="make one request to URL and print it")
    parser.add_argument("--post-bytes", type=int, default=0, help="POST this many bytes")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.listen:
        serve(args.listen[0], args.listen[1], args.name)
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
    parser.error("one of --listen or --get is required")
    return 2


if __name__ == "__main__":
    sys.exit(main())
