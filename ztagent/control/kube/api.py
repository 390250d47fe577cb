"""The Kubernetes API client: configuration, requests with bounded bodies, watch lines.

`load_api_client` builds a client from the in-cluster service account when
`KUBERNETES_SERVICE_HOST` is set, else from `KUBECONFIG` or `~/.kube/config`. The request
helpers read a body up to a cap and turn error statuses into `ApiError`, `Gone` (410) and
`Missing` (404: the server does not serve the kind).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as _k8s_client
from kubernetes_asyncio import config as _k8s_config
from kubernetes_asyncio.client import ApiClient

from ztagent.errors import LocalError

# The library is untyped: everything from it goes through `Any`.
_client_module: Any = _k8s_client
_config_module: Any = _k8s_config

DEFAULT_REQUEST_TIMEOUT = 30.0
MAX_EVENT_BYTES = 16 * 1024 * 1024
"""The largest watch event accepted (etcd keeps objects far smaller)."""
MAX_LIST_BYTES = 256 * 1024 * 1024
"""The largest list page accepted."""
MAX_REVIEW_BYTES = 1024 * 1024


async def load_api_client() -> ApiClient:
    """A client for the cluster this process runs in, else the kubeconfig's current context.

    In-cluster when `KUBERNETES_SERVICE_HOST` is set (service-account token and CA, the
    token re-read as the kubelet rotates it); otherwise `KUBECONFIG` (a `:`-separated list)
    or `~/.kube/config`. Raises `LocalError` when neither gives a usable configuration.
    """
    configuration = _client_module.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            _config_module.load_incluster_config(client_configuration=configuration)
        else:
            path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            await _config_module.load_kube_config(
                config_file=path, client_configuration=configuration, persist_config=False
            )
    except (_config_module.ConfigException, OSError, ValueError) as exc:
        raise LocalError(f"no Kubernetes API configuration: {exc}") from None
    client: ApiClient = _client_module.ApiClient(configuration)
    return client


class ApiError(Exception):
    """A request the API answered with an error status, or a stream it broke off."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class Gone(Exception):
    """410 Gone: the resource version is too old to watch from; relist."""


class Missing(Exception):
    """The server does not serve the kind (its group or CRD is not installed)."""


async def request(
    client: Any,
    method: str,
    path: str,
    *,
    query: Mapping[str, str] | None = None,
    body: Any = None,
    timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """The raw response (any status); the caller reads and releases it."""
    response: aiohttp.ClientResponse = await client.call_api(
        path,
        method,
        query_params=dict(query or {}),
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=timeout,
    )
    return response


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    async for chunk in response.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise ApiError(response.status, f"response larger than {limit} bytes")
    return bytes(data)


def status_message(data: bytes, status: int) -> str:
    """The `message` of a `Status` body, else the start of the body."""
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        return str(decoded["message"])
    text = data[:200].decode("utf-8", "replace").strip()
    return text or f"status {status}"


async def get_json(client: Any, path: str, query: Mapping[str, str] | None = None) -> Any:
    """GET `path` and decode its JSON; 404 is `Missing`, 410 `Gone`, others `ApiError`."""
    timeout = aiohttp.ClientTimeout(total=DEFAULT_REQUEST_TIMEOUT)
    response = await request(client, "GET", path, query=query, timeout=timeout)
    try:
        data = await read_body(response, MAX_LIST_BYTES)
        status = response.status
    finally:
        response.release()
    if status == 404:
        raise Missing(path)
    if status == 410:
        raise Gone(status_message(data, status))
    if not 200 <= status < 300:
        raise ApiError(status, status_message(data, status))
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ApiError(status, f"{path}: not JSON: {exc}") from None


async def read_lines(response: aiohttp.ClientResponse, limit: int) -> AsyncIterator[bytes]:
    """The non-blank lines of a streamed body; each watch event is one line of JSON."""
    buffer = bytearray()
    async for chunk in response.content.iter_any():
        start = len(buffer)
        buffer += chunk
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            start = 0
            if line.strip():
                yield line
        if len(buffer) > limit:
            raise ApiError(0, f"watch event larger than {limit} bytes")
    if bytes(buffer).strip():
        yield bytes(buffer)


__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "MAX_EVENT_BYTES",
    "MAX_LIST_BYTES",
    "MAX_REVIEW_BYTES",
    "ApiError",
    "Gone",
    "Missing",
    "get_json",
    "load_api_client",
    "read_body",
    "read_lines",
    "request",
    "status_message",
]
