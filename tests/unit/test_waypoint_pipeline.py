"""The waypoint's per-request pipeline in memory: objects read from YAML by the real readers,
requests driven through `Pipeline`, and the commands it answers asserted field by field.

Every random draw of the pipeline (weighted destination, fault and mirror percentages, retry
backoff) comes from `Draws`, which hands out scripted values and fails on a draw the test did
not expect; the balancer's own picks use the seeded generator underneath. Time is an argument.
"""

from __future__ import annotations

import ipaddress
import json
import random
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.control.sources import parse_documents
from ztagent.http.messages import RequestHead
from ztagent.identity.spiffe import Identity
from ztagent.istio.resilience import DEFAULT_RETRY_POLICY
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.model.store import ProxyState
from ztagent.model.workload import NetworkAddress, Service, TunnelProtocol, Workload
from ztagent.telemetry.tracing import start_span
from ztagent.waypoint.cluster import UpstreamKey
from ztagent.waypoint.commands import (
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
    Delay,
    Downstream,
    Forward,
    ForwardToWorkload,
    Refuse,
    Respond,
    Step,
    grpc_status,
    with_request_id,
)
from ztagent.waypoint.config import build_config
from ztagent.waypoint.pipeline import Pipeline
from ztagent.waypoint.retry import (
    DELIVER,
    DELIVER_RETRY_LIMIT,
    Attempt,
    AttemptError,
    Deliver,
    RetryAfter,
    RetryState,
)

NS = "shop"
HOST = f"reviews.{NS}.svc.cluster.local"
VIP = "10.96.0.10"
PORT = 9080
TARGET_PORT = 8080
CLIENT = Identity("cluster.local", NS, "sleep")
CLIENT_IP = "10.0.0.5"
NODE_IP = "192.168.0.2"
"""The sending node agent's own address (the tunnel's peer address)."""
PODS = {"reviews-v1": ("10.0.1.1", "v1"), "reviews-v2": ("10.0.1.2", "v2")}
ISSUER = "https://issuer.example"
WALL = 1_700_000_000.0
REQUEST_ID = "req-1"

SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: {NS}}}
spec:
  ports:
  - {{name: http, port: {PORT}, targetPort: {TARGET_PORT}}}
"""
SUBSETS = f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {NS}}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""

KEY = ec.generate_private_key(ec.SECP256R1())
_JWK = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key()))
_JWK.update({"kid": "k1", "alg": "ES256", "use": "sig"})
JWKS = json.dumps({"keys": [_JWK]})


class Draws(random.Random):
    """`random()` returns the scripted values in order and fails when none is left (the
    pipeline drew more often than the test said); `getrandbits` (the balancers' `randrange`)
    stays the seeded generator's."""

    def __init__(self, *values: float) -> None:
        super().__init__(7)
        self.values = list(values)

    def random(self) -> float:
        if not self.values:
            raise AssertionError("the pipeline made a random draw the test did not expect")
        return self.values.pop(0)

    def getrandbits(self, k: int) -> int:
        return super().getrandbits(k)


def _pod(name: str, ip: str, version: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{NS}/{name}",
        name=name,
        namespace=NS,
        addresses=(ipaddress.ip_address(ip),),
        tunnel_protocol=TunnelProtocol.HBONE,
        service_account=f"reviews-{version}",
        canonical_name="reviews",
        canonical_revision=version,
        node="node-b",
        services={f"{NS}/{HOST}": {PORT: TARGET_PORT}},
    )


def _state() -> ProxyState:
    state = ProxyState("node-b")
    workloads = tuple(_pod(name, ip, version) for name, (ip, version) in PODS.items())
    sleep = Workload(
        uid=f"Kubernetes//Pod/{NS}/sleep",
        name="sleep",
        namespace=NS,
        addresses=(ipaddress.ip_address(CLIENT_IP),),
        tunnel_protocol=TunnelProtocol.HBONE,
        service_account=CLIENT.service_account,
        node="node-a",
    )
    service = Service(
        name="reviews",
        namespace=NS,
        hostname=HOST,
        addresses=(NetworkAddress("", ipaddress.ip_address(VIP)),),
        ports={PORT: TARGET_PORT},
    )
    state.replace(ConfigSnapshot(workloads=(*workloads, sleep), services=(service,)))
    return state


def pipeline(*documents: str, draws: tuple[float, ...] = ()) -> tuple[Pipeline, Draws]:
    """A pipeline over the Service and `documents` (YAML), read as the waypoint reads them."""
    batch = parse_documents("\n---\n".join((SERVICE, *documents)), "test.yaml")
    assert not batch.errors, batch.errors
    config = build_config([r.body for r in batch.resources], waypoint_namespace=NS)
    assert not config.errors, [str(e) for e in config.errors]
    rng = Draws(*draws)
    built = Pipeline(gateway=(NS, "waypoint"), state=_state(), rng=rng)
    built.set_config(config)
    return built, rng


def downstream(p: Pipeline, target: tuple[str, int] = (VIP, PORT)) -> Downstream:
    down = p.tunnel(target, f"{target[0]}:{target[1]}", CLIENT, NODE_IP, CLIENT_IP)
    assert isinstance(down, Downstream)
    return down


def send(
    p: Pipeline,
    path: str = "/",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    method: str = "GET",
    replayable: bool = True,
    wall: float = WALL,
    target: tuple[str, int] = (VIP, PORT),
    peer: Identity = CLIENT,
) -> Step:
    down = downstream(p, target)
    if peer != CLIENT:
        down = Downstream(peer, NODE_IP, down.target, down.service, down.workload, None)
    all_headers = [*headers, ("x-request-id", REQUEST_ID)]
    head = RequestHead(method, "reviews:9080", path, list(all_headers))
    span = start_span(all_headers, name="reviews:9080/*", rng=random.Random(1), now_ns=0)
    return p.request(head, all_headers, down, span, replayable=replayable, now=10.0, wall=wall)


def forward(p: Pipeline, path: str = "/", *args: Any, **kwargs: Any) -> Forward:
    step = send(p, path, *args, **kwargs)
    assert isinstance(step, Forward), step
    return step


def header(headers: list[tuple[str, str]] | tuple[tuple[str, str], ...], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def vs(*http: str) -> str:
    """A VirtualService for reviews with these `http` routes (YAML flow mappings)."""
    routes = "".join(f"\n  - {route}" for route in http)
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: {NS}}}
spec:
  hosts: [reviews]
  http:{routes}
"""


def token(**claims: Any) -> str:
    body = {"iss": ISSUER, "sub": "alice", "aud": "reviews", "exp": int(WALL) + 600}
    body.update(claims)
    return pyjwt.encode(body, KEY, algorithm="ES256", headers={"kid": "k1"})


JWT_RULES = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: reviews-jwt, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  jwtRules:
  - issuer: {ISSUER}
    audiences: [reviews]
    jwks: '{JWKS}'
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
"""
NEED_TOKEN = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-jwt, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  action: ALLOW
  rules: [{{from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]}}]
"""


def retry_state(p: Pipeline, step: Forward, *, replayable: bool = True) -> RetryState:
    state = p.retry_state(step, replayable=replayable, loop_time=0.0)
    assert isinstance(state, RetryState), state
    return state


def attempt(retries: RetryState, loop_time: float = 0.0) -> Attempt:
    found = retries.next_attempt(10.0, loop_time)
    assert isinstance(found, Attempt), found
    return found


# ------------------------------------------------------------------ tunnels


def test_tunnel_to_a_service_vip_trusts_the_forwarded_client_of_the_same_identity() -> None:
    p, _ = pipeline()
    down = downstream(p)
    assert down.service is not None and down.service.hostname == HOST
    assert down.workload is None
    assert down.client_ip == CLIENT_IP
    assert down.source is not None and down.source.name == "sleep"
    assert down.target == (VIP, PORT)


def test_tunnel_ignores_a_forwarded_address_of_another_identity() -> None:
    p, _ = pipeline()
    # 10.0.1.1 is reviews-v1, whose identity is not the peer's: the peer's own address stands.
    down = p.tunnel((VIP, PORT), f"{VIP}:{PORT}", CLIENT, NODE_IP, PODS["reviews-v1"][0])
    assert isinstance(down, Downstream)
    assert down.client_ip == NODE_IP
    assert down.source is None


def test_tunnel_refuses_what_is_neither_a_service_nor_a_workload() -> None:
    p, _ = pipeline()
    assert p.tunnel(("web", 80), "web:80", CLIENT, NODE_IP, None) == Refuse(
        400, "'web' is not an IP address"
    )
    assert p.tunnel(("10.9.9.9", 80), "10.9.9.9:80", CLIENT, NODE_IP, None) == Refuse(
        404, "no service or workload at 10.9.9.9:80"
    )


def test_pod_addressed_request_goes_to_the_workload_without_routes() -> None:
    p, _ = pipeline(vs("{directResponse: {status: 503}}"))
    step = send(p, "/x", target=(PODS["reviews-v2"][0], TARGET_PORT))
    assert isinstance(step, ForwardToWorkload)
    assert step.workload.name == "reviews-v2"
    assert step.key == UpstreamKey(
        "10.0.1.2", TARGET_PORT, False, f"spiffe://cluster.local/ns/{NS}/sa/reviews-v2", CLIENT_IP
    )
    assert step.head.path == "/x"
    assert header(step.head.headers, "x-forwarded-for") == [CLIENT_IP]
    failed = step.failed("refused")
    assert (failed.status, failed.body, failed.flags) == (
        503,
        b"upstream connect error: refused",
        "UF",
    )


# ------------------------------------------------------------------ routes


def test_without_routes_the_request_goes_to_the_service_with_istio_defaults() -> None:
    p, _ = pipeline()
    step = forward(p, "/a?b=c", (("x-forwarded-for", "1.2.3.4"),))
    assert step.cluster is not None and step.cluster.service.hostname == HOST
    assert step.cluster.subset_labels == {}
    assert step.retry == DEFAULT_RETRY_POLICY
    assert step.timeout is None
    assert step.mirrors == ()
    assert step.flags == "-"
    assert step.head.path == "/a?b=c"
    assert header(step.head.headers, "x-forwarded-for") == [f"1.2.3.4, {CLIENT_IP}"]
    assert header(step.head.headers, "x-request-id") == [REQUEST_ID]
    (traceparent,) = header(step.head.headers, "traceparent")
    assert traceparent.startswith("00-") and traceparent.endswith("-01")


def test_direct_response() -> None:
    p, _ = pipeline(vs('{directResponse: {status: 503, body: {string: "closed"}}}'))
    assert send(p) == Respond(
        503, (("content-type", "text/plain"), ("content-length", "6")), b"closed", "-"
    )


def test_a_route_miss_is_404_no_route() -> None:
    p, _ = pipeline(vs("{match: [{uri: {prefix: /api}}], route: [{destination: {host: reviews}}]}"))
    step = send(p, "/other")
    assert isinstance(step, Respond)
    assert (step.status, step.flags) == (404, "NR")
    assert header(step.headers, "content-length") == [str(len(step.body))]
    assert isinstance(forward(p, "/api/x"), Forward)


def test_redirect_builds_the_location() -> None:
    p, _ = pipeline(
        vs(
            "{match: [{uri: {prefix: /old}}], "
            "redirect: {uri: /new, authority: shop.example, redirectCode: 302}}"
        )
    )
    assert send(p, "/old") == Respond(
        302, (("location", "http://shop.example/new"), ("content-length", "0")), b"", "-"
    )


def test_httproute_redirect_filter() -> None:
    p, _ = pipeline(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: {PORT}}}]
  rules:
  - filters:
    - type: RequestRedirect
      requestRedirect: {{scheme: https, statusCode: 301}}
""")
    step = send(p, "/p?q=1")
    assert isinstance(step, Respond)
    assert step.status == 301
    # Gateway API: a scheme change without a port takes the scheme's well-known port (omitted)
    assert header(step.headers, "location") == ["https://reviews/p?q=1"]


def test_httproute_header_modifiers_and_rewrite() -> None:
    p, _ = pipeline(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: {PORT}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /gw}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: x-via, value: gw}}]
        add: [{{name: x-extra, value: "1"}}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{add: [{{name: x-out, value: "1"}}], remove: [server]}}
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}
    backendRefs: [{{name: reviews, port: {PORT}}}]
""")
    step = forward(p, "/gw/page", (("x-via", "client"), ("x-drop", "1"), ("x-extra", "0")))
    assert step.head.path == "/new/page"
    upstream = step.head.headers
    assert header(upstream, "x-via") == ["gw"]
    assert header(upstream, "x-extra") == ["0", "1"]
    assert header(upstream, "x-drop") == []
    response = step.response_headers([("server", "backend"), ("content-length", "2")])
    assert response == [("content-length", "2"), ("x-out", "1")]


def test_virtualservice_header_set_add_remove_on_request_and_response() -> None:
    p, _ = pipeline(
        SUBSETS,
        vs(
            "{headers: {request: {set: {x-env: prod}, add: {x-tag: a}, remove: [cookie]},"
            " response: {set: {cache-control: no-store}, add: {x-served: wp},"
            " remove: [x-internal]}},"
            " route: [{destination: {host: reviews, subset: v1},"
            " headers: {request: {set: {x-subset: v1}}, response: {add: {x-dest: v1}}}}]}"
        ),
    )
    step = forward(p, "/", (("x-env", "dev"), ("cookie", "s=1"), ("x-tag", "z")))
    upstream = step.head.headers
    assert header(upstream, "x-env") == ["prod"]
    assert header(upstream, "x-tag") == ["z", "a"]
    assert header(upstream, "cookie") == []
    assert header(upstream, "x-subset") == ["v1"]
    response = step.response_headers(
        [("cache-control", "max-age=60"), ("x-internal", "1"), ("x-served", "app")]
    )
    assert header(response, "cache-control") == ["no-store"]
    assert header(response, "x-internal") == []
    assert header(response, "x-served") == ["app", "wp"]
    assert header(response, "x-dest") == ["v1"]


def test_weighted_route_choice_follows_the_draw() -> None:
    p, rng = pipeline(
        SUBSETS,
        vs(
            "{route: [{destination: {host: reviews, subset: v1}, weight: 90},"
            " {destination: {host: reviews, subset: v2}, weight: 10}]}"
        ),
        draws=(0.85, 0.95),
    )
    first = forward(p)
    assert first.destination.subset == "v1"
    assert first.cluster is not None and first.cluster.subset_labels == {"version": "v1"}
    second = forward(p)
    assert second.destination.subset == "v2"
    assert second.cluster is not None and second.cluster.subset_labels == {"version": "v2"}
    assert rng.values == []


def test_header_match_selects_the_route() -> None:
    p, _ = pipeline(
        SUBSETS,
        vs(
            "{match: [{headers: {end-user: {exact: jason}}}],"
            " route: [{destination: {host: reviews, subset: v2}}]}",
            "{route: [{destination: {host: reviews, subset: v1}}]}",
        ),
    )
    assert forward(p, "/", (("end-user", "jason"),)).destination.subset == "v2"
    assert forward(p, "/", (("end-user", "bob"),)).destination.subset == "v1"


def test_route_timeout_and_retries_come_from_the_route() -> None:
    p, _ = pipeline(
        vs(
            "{timeout: 2s, retries: {attempts: 3, perTryTimeout: 0.5s, retryOn: 5xx},"
            " route: [{destination: {host: reviews}}]}"
        )
    )
    step = forward(p)
    assert step.timeout == 2.0
    assert step.retry is not None
    assert (step.retry.attempts, step.retry.per_try_timeout) == (3, 0.5)
    assert step.retry.retry_on == frozenset({"5xx"})


def test_attempts_zero_disables_retries() -> None:
    p, _ = pipeline(vs("{retries: {attempts: 0}, route: [{destination: {host: reviews}}]}"))
    step = forward(p)
    assert step.retry is None
    retries = retry_state(p, step)
    assert retries.answered(attempt(retries), 503, [], 10.0) == DELIVER


def test_unknown_subset_answers_no_healthy_upstream() -> None:
    p, _ = pipeline(SUBSETS, vs("{route: [{destination: {host: reviews, subset: v9}}]}"))
    step = forward(p)
    assert step.cluster is None
    answer = p.retry_state(step, replayable=True, loop_time=0.0)
    assert answer is NO_HEALTHY_UPSTREAM
    assert (answer.status, answer.body, answer.flags) == (503, b"no healthy upstream", "UH")


# ------------------------------------------------------------------ authorization, tokens


def test_deny_policy_answers_rbac_access_denied() -> None:
    p, _ = pipeline(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin/*"]}}}}]}}]
""")
    assert send(p, "/admin/users") == Respond(
        403,
        (("content-type", "text/plain"), ("content-length", "19")),
        b"RBAC: access denied",
        "RBAC",
    )
    assert isinstance(send(p, "/public"), Forward)


def test_allow_policy_on_method_and_principal() -> None:
    p, _ = pipeline(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-get, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{NS}/sa/sleep]}}}}]
    to: [{{operation: {{methods: [GET]}}}}]
""")
    assert isinstance(send(p, method="GET"), Forward)
    post = send(p, method="POST")
    assert isinstance(post, Respond) and (post.status, post.flags) == (403, "RBAC")
    other = send(p, peer=Identity("cluster.local", NS, "intruder"))
    assert isinstance(other, Respond) and other.body == b"RBAC: access denied"


def test_a_bad_token_is_401_with_the_challenge() -> None:
    p, _ = pipeline(JWT_RULES)
    forged = token()[:-4] + "AAAA"
    step = send(p, "/secure", (("authorization", f"Bearer {forged}"),))
    assert step == Respond(
        401,
        (
            (
                "www-authenticate",
                'Bearer realm="http://reviews:9080/secure", error="invalid_token"',
            ),
            ("content-type", "text/plain"),
            ("content-length", "22"),
        ),
        b"Jwt verification fails",
        "UAEX",
    )


def test_an_expired_token_is_401_by_the_wall_clock_given() -> None:
    p, _ = pipeline(JWT_RULES)
    good = token(exp=int(WALL) + 60)
    auth = (("authorization", f"Bearer {good}"),)
    assert isinstance(send(p, "/", auth, wall=WALL), Forward)
    expired = send(p, "/", auth, wall=WALL + 3600)
    assert isinstance(expired, Respond)
    assert (expired.status, expired.body, expired.flags) == (401, b"Jwt is expired", "UAEX")


def test_a_token_for_another_audience_is_403() -> None:
    p, _ = pipeline(JWT_RULES)
    step = send(p, "/", (("authorization", f"Bearer {token(aud='ratings')}"),))
    assert isinstance(step, Respond)
    assert (step.status, step.body, step.flags) == (
        403,
        b"Audiences in Jwt are not allowed",
        "UAEX",
    )


def test_a_valid_token_is_a_request_principal_and_is_not_forwarded() -> None:
    p, _ = pipeline(JWT_RULES, NEED_TOKEN)
    anonymous = send(p, "/")
    assert isinstance(anonymous, Respond) and (anonymous.status, anonymous.flags) == (403, "RBAC")
    step = forward(p, "/", (("authorization", f"Bearer {token()}"), ("x-jwt-sub", "forged")))
    assert header(step.head.headers, "authorization") == []
    assert header(step.head.headers, "x-jwt-sub") == ["alice"]
    other = send(p, "/", (("authorization", f"Bearer {token(sub='mallory')}"),))
    assert isinstance(other, Respond) and other.status == 403


# ------------------------------------------------------------------ faults


def test_fault_abort_at_100_percent() -> None:
    p, rng = pipeline(
        vs(
            "{fault: {abort: {httpStatus: 418, percentage: {value: 100}}},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.99,),
    )
    assert send(p) == Respond(
        418,
        (("content-type", "text/plain"), ("content-length", "18")),
        b"fault filter abort",
        "FI",
    )
    assert rng.values == []


def test_fault_abort_percentage_draws_once_per_request() -> None:
    p, rng = pipeline(
        vs(
            "{fault: {abort: {httpStatus: 503, percentage: {value: 30}}},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.35, 0.25),
    )
    assert isinstance(send(p), Forward)
    aborted = send(p)
    assert isinstance(aborted, Respond) and (aborted.status, aborted.flags) == (503, "FI")
    assert rng.values == []


def test_fault_grpc_abort_is_trailers_only() -> None:
    p, _ = pipeline(
        vs(
            "{fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.5,),
    )
    assert send(p) == Respond(
        200,
        (
            ("content-type", "application/grpc"),
            ("grpc-status", "14"),
            ("grpc-message", "fault filter abort"),
        ),
        b"",
        "FI",
    )


def test_fault_delay_then_forward_flagged_di() -> None:
    p, _ = pipeline(
        vs(
            "{fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.5,),
    )
    delay = send(p, "/slow")
    assert isinstance(delay, Delay)
    assert delay.seconds == 0.3
    resumed = p.resume(delay, 10.3)
    assert isinstance(resumed, Forward)
    assert resumed.flags == "DI"
    assert resumed.head.path == "/slow"
    assert resumed.reply_flags("-") == "DI"
    assert resumed.reply_flags("UF") == "UF"


def test_fault_delay_then_abort() -> None:
    p, rng = pipeline(
        vs(
            "{fault: {delay: {fixedDelay: 1s, percentage: {value: 50}},"
            " abort: {httpStatus: 500, percentage: {value: 50}}},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.4, 0.1, 0.6, 0.7),
    )
    delay = send(p)
    assert isinstance(delay, Delay) and delay.seconds == 1.0
    after = p.resume(delay, 11.0)
    assert isinstance(after, Respond) and (after.status, after.flags) == (500, "FI")
    # neither drawn: no delay, no abort, forwarded unflagged
    plain = forward(p)
    assert plain.flags == "-"
    assert rng.values == []


# ------------------------------------------------------------------ mirrors


MIRROR = (
    "{route: [{destination: {host: reviews, subset: v1}}],"
    " mirror: {host: reviews, subset: v2}, mirrorPercentage: {value: %s}}"
)


def test_mirror_copies_to_the_subset_with_a_shadow_host() -> None:
    p, _ = pipeline(SUBSETS, vs(MIRROR % 100), draws=(0.99,))
    step = forward(p, "/m", (("x-a", "1"),))
    (mirror,) = step.mirrors
    assert (mirror.host, mirror.subset, mirror.port) == (HOST, "v2", PORT)
    assert mirror.head.authority == "reviews-shadow:9080"
    assert mirror.head.path == "/m"
    assert mirror.head.headers == step.head.headers
    target = p.mirror_target(mirror, 10.0)
    assert target is not None
    assert target.key == UpstreamKey(
        "10.0.1.2", TARGET_PORT, False, f"spiffe://cluster.local/ns/{NS}/sa/reviews-v2"
    )
    assert target.cluster.pool.active_requests == 1


def test_mirror_percentage_and_unreplayable_bodies() -> None:
    p, rng = pipeline(SUBSETS, vs(MIRROR % 25), draws=(0.3, 0.2))
    assert forward(p).mirrors == ()
    assert len(forward(p).mirrors) == 1
    # a body too large to keep is never mirrored, and no draw is made for it
    assert forward(p, replayable=False).mirrors == ()
    assert rng.values == []


# ------------------------------------------------------------------ attempts and retries


def test_per_try_timeout_within_the_route_timeout() -> None:
    p, _ = pipeline(
        vs(
            "{timeout: 2s, retries: {attempts: 1, perTryTimeout: 0.5s, retryOn: 5xx},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.5,),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries, loop_time=0.0)
    assert first.timeout == 0.5
    assert first.key.port == TARGET_PORT and first.key.source_ip == CLIENT_IP
    assert isinstance(retries.answered(first, 503, [], 10.0), RetryAfter)
    retries.finished(first)  # the dropped response was read
    second = attempt(retries, loop_time=1.8)
    assert second.timeout == pytest.approx(0.2)
    # the one retry is spent: the timeout is the answer
    assert retries.failed(second, AttemptError.TIMEOUT, "", 10.0) is UPSTREAM_TIMEOUT
    assert retries.cluster.pool.active_requests == 0


def test_route_deadline_passed_is_504() -> None:
    p, _ = pipeline(
        vs(
            "{timeout: 1s, retries: {attempts: 2, retryOn: 5xx},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.5,),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    assert first.timeout == 1.0
    assert isinstance(retries.answered(first, 503, [], 10.0), RetryAfter)
    retries.finished(first)
    assert retries.next_attempt(10.0, 1.2) is UPSTREAM_TIMEOUT
    assert (UPSTREAM_TIMEOUT.status, UPSTREAM_TIMEOUT.flags) == (504, "UT")
    assert retries.cluster.pool.active_requests == 0


def test_retry_on_5xx_with_exponential_backoff_then_the_retry_limit() -> None:
    p, rng = pipeline(
        vs("{retries: {attempts: 2, retryOn: 5xx}, route: [{destination: {host: reviews}}]}"),
        draws=(0.5, 0.5),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    # Envoy's backoff: a draw in [0, (2^n - 1) x 25 ms)
    assert retries.answered(first, 503, [], 10.0) == RetryAfter(0.0125)
    retries.finished(first)
    second = attempt(retries)
    assert retries.attempt == 2
    again = retries.answered(second, 500, [], 10.0)
    assert isinstance(again, RetryAfter) and again.seconds == pytest.approx(0.0375)
    retries.finished(second)
    third = attempt(retries)
    assert retries.answered(third, 503, [], 10.0) == DELIVER_RETRY_LIMIT
    assert Deliver("URX") == DELIVER_RETRY_LIMIT
    assert rng.values == []


def test_a_retry_prefers_an_endpoint_not_tried() -> None:
    p, _ = pipeline(
        vs("{retries: {attempts: 3, retryOn: 5xx}, route: [{destination: {host: reviews}}]}"),
        draws=(0.5, 0.5, 0.5),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    retries.answered(first, 503, [], 10.0)
    retries.finished(first)
    second = attempt(retries)
    assert {first.endpoint.workload.name, second.endpoint.workload.name} == set(PODS)
    assert retries.tried == {first.endpoint.key, second.endpoint.key}


def test_gateway_error_retries_502_but_delivers_500() -> None:
    p, _ = pipeline(
        vs(
            "{retries: {attempts: 2, retryOn: gateway-error},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.0,),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    assert retries.answered(first, 502, [], 10.0) == RetryAfter(0.0)
    retries.finished(first)
    second = attempt(retries)
    assert retries.answered(second, 500, [], 10.0) == DELIVER


def test_connect_failure_is_retried_but_a_reset_is_not() -> None:
    p, _ = pipeline(
        vs(
            "{retries: {attempts: 1, retryOn: connect-failure},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.2,),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    retried = retries.failed(first, AttemptError.CONNECT, "refused", 10.0)
    assert isinstance(retried, RetryAfter) and retried.seconds == pytest.approx(0.005)
    second = attempt(retries)
    assert retries.failed(second, AttemptError.RESET, "", 10.0) is UPSTREAM_RESET
    assert (UPSTREAM_RESET.status, UPSTREAM_RESET.flags) == (503, "UC")

    again = retry_state(p, forward(p))
    only = attempt(again)
    again.attempt = 2  # no retries left: the connect failure is the answer
    answer = again.failed(only, AttemptError.CONNECT, "refused", 10.0)
    assert isinstance(answer, Respond)
    assert (answer.status, answer.flags) == (503, "UF")
    assert answer.body.endswith(b"reset reason: connection failure, refused")


def test_retry_on_reset_and_an_unreplayable_body_is_sent_once() -> None:
    p, _ = pipeline(
        vs("{retries: {attempts: 2, retryOn: reset}, route: [{destination: {host: reviews}}]}"),
        draws=(0.5,),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    assert retries.failed(first, AttemptError.RESET, "", 10.0) == RetryAfter(0.0125)
    once = retry_state(p, forward(p, replayable=False), replayable=False)
    only = attempt(once)
    assert once.failed(only, AttemptError.RESET, "", 10.0) is UPSTREAM_RESET


def test_grpc_status_in_the_response_head_is_retried() -> None:
    p, _ = pipeline(
        vs(
            "{retries: {attempts: 1, retryOn: unavailable},"
            " route: [{destination: {host: reviews}}]}"
        ),
        draws=(0.5,),
    )
    retries = retry_state(p, forward(p))
    first = attempt(retries)
    trailers_only = [("content-type", "application/grpc"), ("grpc-status", "14")]
    assert retries.answered(first, 200, trailers_only, 10.0) == RetryAfter(0.0125)
    retries.finished(first)
    second = attempt(retries)
    assert retries.answered(second, 200, [("grpc-status", "0")], 10.0) == DELIVER


def test_pool_limit_overflows_the_next_attempt() -> None:
    p, _ = pipeline(f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {NS}}}
spec:
  host: reviews
  trafficPolicy: {{connectionPool: {{http: {{http2MaxRequests: 1}}}}}}
""")
    held = retry_state(p, forward(p))
    first = attempt(held)
    refused = retry_state(p, forward(p)).next_attempt(10.0, 0.0)
    assert isinstance(refused, Respond)
    assert (refused.status, refused.flags) == (503, "UO")
    assert header(refused.headers, "x-envoy-overloaded") == ["true"]
    held.finished(first)
    assert isinstance(retry_state(p, forward(p)).next_attempt(10.0, 0.0), Attempt)


# ------------------------------------------------------------------ balancing


def test_subset_limits_the_endpoints() -> None:
    p, _ = pipeline(SUBSETS, vs("{route: [{destination: {host: reviews, subset: v2}}]}"))
    for _ in range(4):
        retries = retry_state(p, forward(p))
        chosen = attempt(retries)
        assert chosen.endpoint.workload.name == "reviews-v2"
        assert chosen.key.ip == "10.0.1.2"
        retries.finished(chosen)


def test_round_robin_alternates_endpoints() -> None:
    p, _ = pipeline(f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {NS}}}
spec:
  host: reviews
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
""")
    names = []
    for _ in range(4):
        retries = retry_state(p, forward(p))
        chosen = attempt(retries)
        names.append(chosen.endpoint.workload.name)
        retries.finished(chosen)
    assert names[0] != names[1]
    assert names[:2] == names[2:]


def test_consistent_hash_keeps_a_user_on_one_endpoint() -> None:
    p, _ = pipeline(f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {NS}}}
spec:
  host: reviews
  trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}}}
""")

    def pod_for(user: str) -> str:
        retries = retry_state(p, forward(p, "/", (("x-user", user),)))
        chosen = attempt(retries)
        retries.finished(chosen)
        return chosen.endpoint.workload.name

    for user in ("alice", "bob", "carol"):
        assert len({pod_for(user) for _ in range(6)}) == 1
    assert len({pod_for(f"user-{i}") for i in range(16)}) == 2


def test_tcp_destination_is_an_endpoint_at_its_target_port() -> None:
    p, _ = pipeline()
    key = p.tcp_destination(downstream(p), 10.0)
    assert key is not None
    assert key.ip in {ip for ip, _ in PODS.values()}
    assert (key.port, key.http2, key.source_ip) == (TARGET_PORT, False, CLIENT_IP)


# ------------------------------------------------------------------ response headers


def test_response_request_id_and_grpc_status() -> None:
    assert with_request_id([("a", "1")], "r") == [("a", "1"), ("x-request-id", "r")]
    own = [("x-request-id", "upstream")]
    assert with_request_id(own, "r") == [("x-request-id", "upstream")]
    assert grpc_status([("grpc-status", "x")], [("grpc-status", "7")]) == 7
    assert grpc_status([("grpc-status", "4")], [("grpc-status", "7")]) == 4
    assert grpc_status([("content-type", "application/grpc")]) is None
