"""The lab as Kubernetes and Istio objects: pure functions of the `Plan`, no I/O.

`lab_resources` is what `lab up` writes into the control plane's directory (namespaces, pods,
the `echo`, `web` and `waypoint` Services and the waypoint's Gateway). The rest are the L7
objects the demo's waypoint scenarios add and remove: the `web` DestinationRule (subsets by
version, outlier detection on request), its VirtualService, the AuthorizationPolicies and the
RequestAuthentication, and the ES256 key pair whose public half is the inline JWKS.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.lab.topology import (
    APP_PORT,
    ENROLLED_NAMESPACE,
    GRPC_PORT,
    LABEL_DATAPLANE_MODE,
    LABEL_WAYPOINT_FOR,
    LEGACY_NAMESPACE,
    WAYPOINT_NAME,
    LabService,
    Plan,
    Pod,
)
from ztagent.names import HBONE_PORT

Document = dict[str, Any]

WEB = "web"
JWT_ISSUER = "https://lab.ztagent.local"
JWT_AUDIENCE = "web"
JWT_SUBJECT = "lab-user"
JWT_ALGORITHM = "ES256"
DENY_PATHS = ("/admin/*",)
SECURE_PATHS = ("/secure/*",)
CANARY_HEADER = "x-canary"
OUTLIER = {
    "consecutive5xxErrors": 3,
    "interval": "1s",
    "baseEjectionTime": "5s",
    "maxEjectionPercent": 100,
}

# The scenario objects' names; each is its own file in the config directory.
DESTINATION_RULE = "web"
DESTINATION_RULE_OUTLIER = "web-outlier"
VIRTUAL_SERVICE = "web"
DENY_POLICY = "web-deny-admin"
ALLOW_POLICY = "web-require-jwt"
REQUEST_AUTHENTICATION = "web-jwt"


# --------------------------------------------------------------------------- lab up


def pod_document(pod: Pod) -> Document:
    ports: list[dict[str, Any]] = []
    if pod.waypoint:
        ports.append({"name": "mesh", "containerPort": HBONE_PORT})
    else:
        ports.append({"name": "http", "containerPort": APP_PORT})
        if pod.grpc:
            ports.append({"name": "grpc", "containerPort": GRPC_PORT})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.key, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": pod.app, "ports": ports}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def service_document(service: LabService) -> Document:
    ports: list[dict[str, Any]] = []
    for port in service.ports:
        entry: dict[str, Any] = {"name": port.name, "port": port.port, "targetPort": port.target}
        if port.app_protocol:
            entry["appProtocol"] = port.app_protocol
        ports.append(entry)
    metadata: dict[str, Any] = {"name": service.name, "namespace": service.namespace}
    if service.labels:
        metadata["labels"] = dict(service.labels)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"selector": dict(service.selector), "clusterIP": service.vip, "ports": ports},
    }


def gateway_document() -> Document:
    """The waypoint, as istioctl's `waypoint generate --for service` writes it."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": WAYPOINT_NAME,
            "namespace": ENROLLED_NAMESPACE,
            "labels": {LABEL_WAYPOINT_FOR: "service"},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    }


def lab_resources(plan: Plan) -> dict[str, list[Document]]:
    """The lab as Kubernetes objects, file by file: the namespaces (`demo` labelled
    `istio.io/dataplane-mode=ambient`, `legacy` not), one Pod per lab pod (IP, node, service
    account, labels, Ready), the Services and the waypoint Gateway. `ztagent control`
    translates them."""
    namespaces: list[Document] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ENROLLED_NAMESPACE,
                "labels": {LABEL_DATAPLANE_MODE: "ambient"},
            },
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEGACY_NAMESPACE}},
    ]
    return {
        "namespaces.yaml": namespaces,
        "pods.yaml": [pod_document(pod) for pod in plan.pods],
        "services.yaml": [service_document(s) for s in plan.services],
        "waypoint.yaml": [gateway_document()],
    }


# --------------------------------------------------------------------------- L7 scenarios


def _service_ref(name: str = WEB) -> list[dict[str, str]]:
    return [{"kind": "Service", "group": "", "name": name}]


def destination_rule(plan: Plan, outlier: bool) -> Document:
    """Subsets v1 and v2 of `web`; with `outlier`, consecutive-5xx outlier detection.

    Outlier detection is off for the retry scenario: with half the answers failing, three
    503s in a row from one endpoint are common, and ejecting every v1 endpoint would leave
    the retries nowhere to go. The rule with it has its own name, so a config dump shows
    which one the waypoint has."""
    spec: dict[str, Any] = {
        "host": plan.service(WEB).hostname,
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    }
    if outlier:
        spec["trafficPolicy"] = {"outlierDetection": dict(OUTLIER)}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": DESTINATION_RULE_OUTLIER if outlier else DESTINATION_RULE,
            "namespace": ENROLLED_NAMESPACE,
        },
        "spec": spec,
    }


def virtual_service(plan: Plan) -> Document:
    """Routes of `web`, first match wins: the canary header, /flaky (retried), /stable (never
    retried), gRPC by path to v2, and a 90/10 split of everything else."""
    host = plan.service(WEB).hostname

    def to(subset: str, weight: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": {"host": host, "subset": subset}}
        if weight is not None:
            out["weight"] = weight
        return out

    routes: list[dict[str, Any]] = [
        {
            "name": "canary-header",
            "match": [{"headers": {CANARY_HEADER: {"exact": "v2"}}}],
            "route": [to("v2")],
        },
        {
            "name": "flaky",
            "match": [{"uri": {"prefix": "/flaky"}}],
            "route": [to("v1")],
            "retries": {"attempts": 10, "retryOn": "5xx", "perTryTimeout": "2s"},
        },
        {
            "name": "stable",
            "match": [{"uri": {"prefix": "/stable"}}],
            "route": [to("v1")],
            "retries": {"attempts": 0},
        },
        {
            "name": "grpc",
            "match": [{"uri": {"prefix": "/ztlab.Echo/"}}],
            "route": [to("v2")],
        },
        {"name": "split", "route": [to("v1", 90), to("v2", 10)]},
    ]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": VIRTUAL_SERVICE, "namespace": ENROLLED_NAMESPACE},
        "spec": {"hosts": [host], "http": routes},
    }


def deny_policy() -> Document:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": DENY_POLICY, "namespace": ENROLLED_NAMESPACE},
        "spec": {
            "targetRefs": _service_ref(),
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": list(DENY_PATHS)}}]}],
        },
    }


def allow_policy() -> Document:
    """/secure/* needs a request principal (a valid JWT); every other path is open."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": ALLOW_POLICY, "namespace": ENROLLED_NAMESPACE},
        "spec": {
            "targetRefs": _service_ref(),
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"requestPrincipals": ["*"]}}],
                    "to": [{"operation": {"paths": list(SECURE_PATHS)}}],
                },
                {"to": [{"operation": {"notPaths": list(SECURE_PATHS)}}]},
            ],
        },
    }


def request_authentication(jwks: str) -> Document:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": REQUEST_AUTHENTICATION, "namespace": ENROLLED_NAMESPACE},
        "spec": {
            "targetRefs": _service_ref(),
            "jwtRules": [{"issuer": JWT_ISSUER, "audiences": [JWT_AUDIENCE], "jwks": jwks}],
        },
    }


def scenario_resources(plan: Plan, jwks: str, outlier: bool) -> dict[str, list[Document]]:
    """Every L7 object of the waypoint scenarios, file by file (names start with `l7-`)."""
    return {
        "l7-destinationrule.yaml": [destination_rule(plan, outlier)],
        "l7-virtualservice.yaml": [virtual_service(plan)],
        "l7-authz.yaml": [deny_policy(), allow_policy()],
        "l7-requestauthn.yaml": [request_authentication(jwks)],
    }


# --------------------------------------------------------------------------- JWT


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class JwtSigner:
    """An ES256 key: the JWKS a RequestAuthentication trusts, and tokens signed with it."""

    key: ec.EllipticCurvePrivateKey
    kid: str

    @classmethod
    def generate(cls, kid: str = "lab") -> JwtSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()), kid)

    @classmethod
    def from_pem(cls, pem: bytes, kid: str = "lab") -> JwtSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("not a P-256 private key")
        return cls(key, kid)

    def pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "alg": JWT_ALGORITHM,
            "use": "sig",
            "kid": self.kid,
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
        return json.dumps({"keys": [jwk]}, separators=(",", ":"))

    def mint(
        self,
        now: float | None = None,
        lifetime: float = 3600.0,
        subject: str = JWT_SUBJECT,
        issuer: str = JWT_ISSUER,
        audience: str = JWT_AUDIENCE,
    ) -> str:
        """A token for `subject`; a negative `lifetime` makes one that has expired."""
        issued = int(time.time() if now is None else now)
        expires = issued + int(lifetime)
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "iat": min(issued, expires - 60),
            "exp": expires,
        }
        return jwt.encode(claims, self.key, algorithm=JWT_ALGORITHM, headers={"kid": self.kid})
