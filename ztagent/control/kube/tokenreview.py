"""`TokenReviewAuthenticator`: the cluster mode's `Authenticator`, backed by TokenReview.

It asks the API server to review the caller's bearer token (authentication.k8s.io/v1
TokenReview, audience `istio-ca`) and turns the reviewed service account, pod and node into a
`Caller`. When the API cannot answer, it raises `AuthenticationUnavailable`, so the CA can tell
the caller to retry rather than that its token is bad.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient

from ztagent.control.auth import (
    AUDIENCE,
    AuthenticationError,
    AuthenticationUnavailable,
    Caller,
    service_account_identity,
)
from ztagent.control.kube.api import (
    MAX_REVIEW_BYTES,
    ApiError,
    load_api_client,
    read_body,
    request,
    status_message,
)
from ztagent.errors import LocalError
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN

log = logging.getLogger(__name__)

EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def _extra(extra: object, key: str) -> str | None:
    """The first non-empty value of `status.user.extra[key]` (a list of strings)."""
    if not isinstance(extra, dict):
        return None
    values = extra.get(key)
    if isinstance(values, str):
        values = [values]
    if isinstance(values, list):
        for value in values:
            if isinstance(value, str) and value:
                return value
    return None


class TokenReviewAuthenticator:
    """Authenticates bearer tokens with the API server's TokenReview.

    A token is accepted when the review says `authenticated` for one of `audiences` and its
    user is a service account; the `Caller` has that account's identity in `trust_domain`,
    the pod (`namespace/name`) and node the token is bound to. A pod-bound token that names
    no node (API servers before 1.30) is completed with `pod_node`, a lookup of the pod's
    node by `namespace/name`.

    A rejected token raises `AuthenticationError`; an API that cannot answer (connection
    failure, timeout, 5xx, 429, or 401/403 to the control plane's own credentials) raises
    `AuthenticationUnavailable`.
    """

    def __init__(
        self,
        api_client: ApiClient | None = None,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        audiences: Sequence[str] = (AUDIENCE,),
        pod_node: Callable[[str], str | None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not audiences:
            raise LocalError("TokenReviewAuthenticator needs at least one audience")
        self._api_client: Any = api_client
        self._owned = api_client is None
        self._lock = asyncio.Lock()
        self.trust_domain = trust_domain
        self.audiences = tuple(audiences)
        self.pod_node = pod_node
        self._timeout = timeout

    async def close(self) -> None:
        """Close the client this authenticator created (not one passed in)."""
        if self._owned and self._api_client is not None:
            client, self._api_client = self._api_client, None
            await client.close()

    async def _client(self) -> Any:
        if self._api_client is None:
            async with self._lock:
                if self._api_client is None:
                    try:
                        self._api_client = await load_api_client()
                    except LocalError as exc:
                        raise AuthenticationUnavailable(f"cannot review tokens: {exc}") from None
        return self._api_client

    async def _review(self, token: str) -> dict[str, Any]:
        client = await self._client()
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(self.audiences)},
        }
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            response = await request(client, "POST", TOKEN_REVIEW_PATH, body=body, timeout=timeout)
            try:
                data = await read_body(response, MAX_REVIEW_BYTES)
                status = response.status
            finally:
                response.release()
        except ApiError as exc:
            raise AuthenticationUnavailable(f"TokenReview failed: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise AuthenticationUnavailable(
                f"TokenReview failed: the Kubernetes API is unreachable: {reason}"
            ) from None
        except Exception as exc:  # the client library's own failures (credentials, config)
            log.exception("TokenReview request failed")
            raise AuthenticationUnavailable(
                f"TokenReview failed: {type(exc).__name__}: {exc}"
            ) from None
        if not 200 <= status < 300:
            message = status_message(data, status)
            if status >= 500 or status in (401, 403, 429):
                raise AuthenticationUnavailable(f"TokenReview failed: HTTP {status}: {message}")
            raise AuthenticationError(f"TokenReview refused: HTTP {status}: {message}")
        try:
            review = json.loads(data)
        except ValueError:
            review = None
        if not isinstance(review, dict):
            raise AuthenticationUnavailable("TokenReview failed: the answer is not a JSON object")
        return review

    async def authenticate(self, token: str) -> Caller:
        if not token:
            raise AuthenticationError("token rejected: empty token")
        review = await self._review(token)
        status = review.get("status")
        if not isinstance(status, dict):
            raise AuthenticationUnavailable("TokenReview failed: the answer has no status")
        if status.get("authenticated") is not True:
            error = status.get("error")
            detail = f": {error}" if isinstance(error, str) and error else ""
            raise AuthenticationError(f"token rejected by the Kubernetes API{detail}")
        granted = status.get("audiences")
        granted_list = (
            [a for a in granted if isinstance(a, str)] if isinstance(granted, list) else []
        )
        if not set(granted_list) & set(self.audiences):
            raise AuthenticationError(
                f"token rejected: not valid for audience {', '.join(self.audiences)}"
                + (f" (valid for {', '.join(granted_list)})" if granted_list else "")
            )
        user = status.get("user")
        user = user if isinstance(user, dict) else {}
        username = user.get("username")
        if not isinstance(username, str) or not username:
            raise AuthenticationError("token rejected: the review names no user")
        identity = service_account_identity(username, self.trust_domain)
        extra = user.get("extra")
        node = _extra(extra, EXTRA_NODE_NAME)
        pod_name = _extra(extra, EXTRA_POD_NAME)
        pod = f"{identity.namespace}/{pod_name}" if pod_name else None
        if node is None and pod is not None and self.pod_node is not None:
            node = self.pod_node(pod)
        return Caller(identity, node=node, pod=pod)


__all__ = [
    "EXTRA_NODE_NAME",
    "EXTRA_POD_NAME",
    "TOKEN_REVIEW_PATH",
    "AuthenticationUnavailable",
    "TokenReviewAuthenticator",
]
