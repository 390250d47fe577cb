"""What the demo sends from inside a pod: one request to the echo app (`call`, with its JSON
answer) and keep-alive HTTP/1.1 sessions (`Session`, each answer with the pod that sent it)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztagent.lab import apps, netns
from ztagent.lab.apps import POD_HEADER
from ztagent.lab.topology import Plan, Pod

REQUEST_TIMEOUT = 10.0


class CallError(Exception):
    pass


def call(
    plan: Plan, source: Pod, dest: tuple[str, int], path: str, post_bytes: int = 0
) -> dict[str, Any]:
    """An HTTP request from inside `source`'s namespace; the echo app's JSON answer."""
    try:
        status, body = netns.run_in(
            source.netns, lambda: apps.request(dest[0], dest[1], path, post_bytes, 15.0), 30.0
        )
    except (OSError, http.client.HTTPException) as exc:
        raise CallError(f"{type(exc).__name__}: {exc}") from None
    if status != 200:
        raise CallError(f"HTTP {status}: {body[:200]!r}")
    try:
        answer: dict[str, Any] = json.loads(body)
    except ValueError:
        raise CallError(f"not the echo app's answer: {body[:200]!r}") from None
    return answer


@dataclass(frozen=True)
class Answer:
    status: int
    pod: str
    """Who answered (the app's `x-lab-pod` header); empty when the app did not."""
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace").strip()


class Session:
    """Keep-alive HTTP/1.1 requests to one address; its socket lives in the namespace of the
    thread that first sends (use it inside `netns.run_in`)."""

    def __init__(self, host: str, port: int, timeout: float = REQUEST_TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connections = 0

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Answer:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.connections += 1
            try:
                self.conn.request("GET", path, headers=dict(headers or {}))
                response = self.conn.getresponse()
                body = response.read()
                if response.will_close:
                    self.close()
                return Answer(response.status, response.getheader(POD_HEADER, ""), body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A keep-alive connection the other side closed between requests: once more.
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
