"""Fuzz targets for configuration: the local config file, YAML document streams, the control
plane's translation of Kubernetes objects, and the waypoint's readers of Istio resources.

The readers promise that a bad object becomes an error value and the rest are read: the
targets check that nothing raises but the whole-file `ConfigError` of the local config.
Objects are a valid seed with random edits, or built from nothing (see `draw.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from ztagent import fields
from ztagent.control import sources
from ztagent.control.translate import Translation, translate_resources
from ztagent.istio import destination, envelope, jwt
from ztagent.istio import routing as routes
from ztagent.istio.authorization import l7
from ztagent.istio.authorization import waypoint as authorization_waypoint
from ztagent.model import localconfig
from ztagent.model.snapshot import ConfigSnapshot

from .draw import Draw, literals

DATA = Path(__file__).resolve().parent.parent / "data"
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _documents(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _seed_files() -> list[Path]:
    return sorted((DATA / "control").glob("*/input/*.y*ml"))


def _dump(documents: list[Any]) -> bytes:
    """Documents as one YAML stream (what a directory file or `kubectl get -o yaml` holds)."""
    try:
        text = yaml.dump_all(documents, Dumper=_DUMPER, allow_unicode=True)
        return text.encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, UnicodeError, RecursionError):
        return b""


def _resources(documents: list[Any]) -> list[envelope.Resource]:
    out = []
    for index, document in enumerate(documents):
        found = envelope.envelope(document, "fuzz.yaml", index)
        if isinstance(found, envelope.Resource):
            out.append(found)
    return out


def _objects(draw: Draw, seeds: list[Any], words: tuple[str, ...]) -> list[Any]:
    """One to three objects: mostly a seed with edits below its envelope (`apiVersion` and
    `kind` kept, so the reader gets past them), sometimes edits anywhere or a random body."""
    out = []
    for _ in range(1 + draw.below(3)):
        how = draw.below(16)
        if how == 0 or not seeds:
            out.append(draw.value(words))
            continue
        seed = draw.choice(seeds)
        if how == 1:
            out.append(draw.mutate(seed, words, edits=4))
            continue
        document = dict(seed)
        key = draw.choice([k for k in document if k not in ("apiVersion", "kind")] or ["spec"])
        if how == 2:
            document[key] = draw.value(words)
        else:
            document[key] = draw.mutate(document.get(key), words, edits=4)
        out.append(document)
    return out


# --- the local config file (ztunnel's LOCAL_XDS_PATH format) ---------------------------------

_LOCAL_SEEDS = [yaml.safe_load((DATA / "ztunnel-localhost.yaml").read_text())]
_LOCAL_WORDS = literals(localconfig, fields)


def fuzz_localconfig(data: bytes) -> None:
    """`parse_local_config`: a snapshot (with per-object errors), or `ConfigError`."""
    draw = Draw(data)
    if draw.flag():
        text = draw.rest()
    else:
        text = _dump([draw.mutate(_LOCAL_SEEDS[0], _LOCAL_WORDS, edits=4)])
    try:
        snapshot = localconfig.parse_local_config(text)
    except localconfig.ConfigError:
        return
    assert isinstance(snapshot, ConfigSnapshot)


# --- YAML streams and the control plane's translation ---------------------------------------

_KUBE_SEEDS = [r.body for path in _seed_files() for r in sources.read_file(path).resources]
_KUBE_WORDS = literals(sys.modules[translate_resources.__module__], fields, envelope)


def fuzz_translate(data: bytes) -> None:
    """`parse_documents` then `translate_resources`: neither raises for any input."""
    draw = Draw(data)
    raw = draw.below(4) == 0
    text = draw.rest() if raw else _dump(_objects(draw, _KUBE_SEEDS, _KUBE_WORDS))
    batch = sources.parse_documents(text, "fuzz.yaml")
    assert isinstance(batch, sources.SourceBatch)
    result = translate_resources(batch.resources)
    assert isinstance(result, Translation)


# --- the waypoint's readers -----------------------------------------------------------------

_TARGET_REFS = (
    "  targetRefs:\n"
    "  - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}\n"
    "  - {kind: Service, group: '', name: reviews}\n"
)
_ROUTE_SEEDS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop, creationTimestamp: 2024-01-01T00:00:00Z}
spec:
  hosts: [reviews, "*.shop.svc.cluster.local"]
  http:
  - name: v2
    match:
    - uri: {prefix: /api}
      headers: {end-user: {exact: jason}, x-re: {regex: "a.*b"}}
      queryParams: {q: {prefix: x}}
      method: {exact: GET}
      ignoreUriCase: true
      withoutHeaders: {x-no: {}}
      port: 9080
      sourceNamespace: shop
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      weight: 80
      headers: {request: {set: {x-a: b}, add: {x-c: d}, remove: [x-e]}}
    - destination: {host: ratings}
      weight: 20
    rewrite: {uri: /v2, authority: reviews-v2}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,gateway-error,503"}
    fault:
      delay: {percentage: {value: 10}, fixedDelay: 5s}
      abort: {percentage: {value: 1.5}, httpStatus: 503}
    mirror: {host: mirror}
    mirrorPercentage: {value: 50}
    corsPolicy: {allowOrigins: [{exact: "https://x"}], allowMethods: [GET]}
  - match: [{uri: {regex: "/r/(.*)"}}]
    redirect: {uri: /new, authority: other, redirectCode: 308, scheme: https, port: 8443}
  - directResponse: {status: 418, body: {string: teapot}}
  - route: [{destination: {host: reviews}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  hostnames: [reviews.shop]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-a, value: b}, {type: RegularExpression, name: x-r, value: "^a+$"}]
      queryParams: [{name: q, value: x}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-s, value: v}], add: [{name: x-a, value: v}],
                              remove: [x-r]}
    - type: URLRewrite
      urlRewrite: {hostname: h, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    timeouts: {request: 10s, backendRequest: 2s}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new, statusCode: 301, port: 443,
                        path: {type: ReplaceFullPath, replaceFullPath: /new}}
"""
_DESTINATION_SEEDS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  exportTo: ["."]
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
      localityLbSetting: {enabled: true}
      warmupDurationSecs: 10s
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms, tcpKeepalive: {time: 7200s}}
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 10, maxRequestsPerConnection: 5,
             maxRetries: 3, idleTimeout: 1h, h2UpgradePolicy: UPGRADE}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m,
                       maxEjectionPercent: 100, consecutiveGatewayErrors: 3,
                       splitExternalLocalOriginErrors: true, minHealthPercent: 0}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: ROUND_ROBIN}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: u, ttl: 10s, path: /}, minimumRingSize: 8}}
  subsets: [{name: v1, labels: {version: v1},
             trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}}]
"""
_AUTHZ_SEEDS = (
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: shop}
spec:
"""
    + _TARGET_REFS
    + """
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/web, "*"]
        notPrincipals: [cluster.local/ns/x/sa/y]
        requestPrincipals: ["https://issuer.example.com/*"]
        namespaces: [shop]
        ipBlocks: [10.0.0.0/8]
        remoteIpBlocks: ["::1/128"]
        notNamespaces: [evil]
    to:
    - operation:
        methods: [GET, HEAD]
        paths: ["/api/*", "/{*}/x/{**}", "*/suffix"]
        notPaths: [/admin]
        hosts: [reviews.shop, "*.example.com"]
        ports: ["9080"]
    when:
    - {key: "request.headers[x-token]", values: [abc]}
    - {key: source.ip, notValues: [10.0.0.9]}
    - {key: "request.auth.claims[groups]", values: [admin]}
    - {key: request.auth.audiences, values: [shop]}
    - {key: destination.port, values: ["9080"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: istio-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}
  action: DENY
  rules: [{to: [{operation: {notMethods: [GET]}}]}]
"""
)
_JWT_SEEDS = (
    """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
"""
    + _TARGET_REFS
    + """
  jwtRules:
  - issuer: https://issuer.example.com
    audiences: [shop]
    jwks: '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "ec", "alg": "ES256",
      "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
      "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
    fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
    fromParams: [token]
    fromCookies: [session]
    outputPayloadToHeader: x-payload
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    forwardOriginalToken: true
  - issuer: other
    jwksUri: file:///etc/jwks.json
"""
)


def _reader_target(
    seeds_text: str, module_words: tuple[str, ...]
) -> tuple[list[Any], tuple[str, ...]]:
    return _documents(seeds_text), module_words


_ROUTES = _reader_target(_ROUTE_SEEDS, literals(routes, fields))
_DESTINATIONS = _reader_target(_DESTINATION_SEEDS, literals(destination, fields))
_AUTHZ = _reader_target(_AUTHZ_SEEDS, literals(l7, fields))
_JWT = _reader_target(_JWT_SEEDS, literals(jwt, l7, fields))


def fuzz_routes(data: bytes) -> None:
    """VirtualService and HTTPRoute objects: `parse_routes` never raises."""
    draw = Draw(data)
    found = routes.parse_routes(_resources(_objects(draw, *_ROUTES)))
    assert isinstance(found, routes.RouteConfig)


def fuzz_destination(data: bytes) -> None:
    """DestinationRule objects: `parse_destination_rules` never raises."""
    draw = Draw(data)
    found = destination.parse_destination_rules(_resources(_objects(draw, *_DESTINATIONS)))
    assert isinstance(found, destination.DestinationRules)


def fuzz_authorization(data: bytes) -> None:
    """AuthorizationPolicy objects for waypoints: `read_authorization_policies` never raises."""
    draw = Draw(data)
    found = authorization_waypoint.read_authorization_policies(_resources(_objects(draw, *_AUTHZ)))
    assert isinstance(found, authorization_waypoint.AuthorizationConfig)


def fuzz_request_authentication(data: bytes) -> None:
    """RequestAuthentication objects: `read_request_authentications` never raises, and the
    policies it keeps build an `Authenticator`."""
    draw = Draw(data)
    found = jwt.read_request_authentications(_resources(_objects(draw, *_JWT)))
    assert isinstance(found, jwt.JwtConfig)
    jwt.Authenticator(found.policies)


def config_seeds() -> dict[str, list[bytes]]:
    files = [path.read_bytes() for path in _seed_files()]
    return {
        "localconfig": [b"\x01" + (DATA / "ztunnel-localhost.yaml").read_bytes(), b"\x00"],
        "translate": [b"\x00" + text for text in files] + [b"\x01\x00"],
        "routes": [b"\x01\x00", b"\x01\x01"],
        "destination": [b"\x01\x00"],
        "authorization": [b"\x01\x00", b"\x01\x01"],
        "request_authentication": [b"\x01\x00"],
    }
