"""The waypoint checks of `ztagent lab demo`: L7 routing and policy through the `web` Service.

Every call goes from a-sleep to the `web` VIP: node-a's agent captures it and carries it over
HBONE to the waypoint on node-b, which applies the L7 objects of `resources.scenario_resources`
(written into the control plane's directory by `configdir.scenario_files`) and opens a new
tunnel to the chosen `web` pod. The checks, one PASS/FAIL line each:

1. canary split: 1,000 requests over keep-alive, v2 gets 10% +- 3 points;
2. the `x-canary: v2` header routes 20/20 requests to v2;
3. retries: /flaky with the app failing half its answers (503, from upstream) still succeeds
   >= 99% of the time (retries: 10 on 5xx);
4. L7 DENY: /admin/x is 403 `RBAC: access denied`, /ok is 200;
5. JWT: /secure/x is 403 without a token, 401 with a bad signature or an expired token, 200
   with a valid one;
6. outlier detection: an unhealthy b-web1 is ejected after 3 consecutive 503s (30 requests in
   a row then all go to a-web1) and gets requests again once healed, after baseEjectionTime;
7. the waypoint's metrics count requests (istio_requests_total{reporter="waypoint"}).

Outlier detection is added to the DestinationRule only for check 6 (see
`resources.destination_rule`). The scenario files are removed at the end, whatever happened.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from ztagent.lab import netns
from ztagent.lab.apps import FAIL_PERCENT_HEADER
from ztagent.lab.configdir import jwt_signer, scenario_files
from ztagent.lab.probes import http_get
from ztagent.lab.report import Result
from ztagent.lab.resources import (
    CANARY_HEADER,
    DESTINATION_RULE,
    DESTINATION_RULE_OUTLIER,
    OUTLIER,
    WEB,
    JwtSigner,
)
from ztagent.lab.topology import APP_PORT, LabError, Plan, Pod
from ztagent.lab.traffic import Answer, Session

T = TypeVar("T")
CONFIG_TIMEOUT = 20.0
CANARY_REQUESTS = 1000
CANARY_SHARE = 0.10
CANARY_TOLERANCE = 0.03
HEADER_REQUESTS = 20
RETRY_REQUESTS = 200
RETRY_FAIL_PERCENT = 50
RETRY_SUCCESS = 0.99
EJECTED_RUN = 30
OUTLIER_TIMEOUT = 30.0
RETURN_MARGIN = 4.0
RBAC_DENIED = "RBAC: access denied"
SIGNING_KEY = "signing-key.pem"
ROGUE_KEY = "rogue-key.pem"


@dataclass
class Lab:
    plan: Plan
    sleep: Pod
    vip: str
    port: int
    versions: dict[str, str]
    signer: JwtSigner
    rogue: JwtSigner
    notes: list[str] = field(default_factory=list)

    def run(self, work: Callable[[Session], T], timeout: float = 120.0) -> T:
        """`work` with a session from a-sleep to the web VIP, in a-sleep's namespace."""

        def inside() -> T:
            session = Session(self.vip, self.port)
            try:
                return work(session)
            finally:
                session.close()

        return netns.run_in(self.sleep.netns, inside, timeout)

    def version(self, answer: Answer) -> str:
        return self.versions.get(answer.pod, "?")


def _safe(lab: Lab, work: Callable[[Session], T]) -> T | str:
    try:
        return lab.run(work)
    except (OSError, http.client.HTTPException, LabError) as exc:
        return f"{type(exc).__name__}: {exc}"


def wait_config(lab: Lab) -> str:
    """Wait until the waypoint applies the L7 objects (each one seen at work); "" or what is
    still missing after CONFIG_TIMEOUT."""
    bad = lab.rogue.mint()

    def probe(s: Session) -> list[str]:
        missing = []
        if lab.version(s.get("/probe", {CANARY_HEADER: "v2"})) != "v2":
            missing.append("VirtualService (x-canary: v2 not routed to v2)")
        if s.get("/admin/probe").status != 403:
            missing.append("DENY policy (/admin/probe not 403)")
        if s.get("/secure/probe").status != 403:
            missing.append("ALLOW policy (/secure/probe without a token not 403)")
        if s.get("/secure/probe", {"authorization": f"Bearer {bad}"}).status != 401:
            missing.append("RequestAuthentication (a bad token not 401)")
        return missing

    deadline = time.monotonic() + CONFIG_TIMEOUT
    last: list[str] | str = []
    while True:
        last = _safe(lab, probe)
        if last == []:
            return ""
        if time.monotonic() >= deadline:
            what = last if isinstance(last, str) else "; ".join(last)
            return f"not in effect after {CONFIG_TIMEOUT:g}s: {what}"
        time.sleep(0.5)


# --------------------------------------------------------------------------- checks


def check_canary(lab: Lab) -> Result:
    name = f"waypoint canary split: {CANARY_REQUESTS} requests, v2 gets 10% +- 3 points"

    def work(s: Session) -> tuple[Counter[str], Counter[int], int]:
        versions: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        for i in range(CANARY_REQUESTS):
            answer = s.get(f"/?n={i}")
            statuses[answer.status] += 1
            if answer.status == 200:
                versions[lab.version(answer)] += 1
        return versions, statuses, s.connections

    outcome = _safe(lab, work)
    if isinstance(outcome, str):
        return Result(name, False, outcome)
    versions, statuses, connections = outcome
    share = versions["v2"] / CANARY_REQUESTS
    detail = (
        f"v2 share {share:.1%} (v1 {versions['v1']}, v2 {versions['v2']}; "
        f"statuses {dict(statuses)}; {connections} connection(s))"
    )
    ok = statuses[200] == CANARY_REQUESTS and abs(share - CANARY_SHARE) <= CANARY_TOLERANCE
    return Result(name, ok, detail)


def check_header(lab: Lab) -> Result:
    name = f"waypoint header route: {CANARY_HEADER}: v2 -> {HEADER_REQUESTS}/{HEADER_REQUESTS} v2"

    def work(s: Session) -> list[Answer]:
        return [s.get("/canary", {CANARY_HEADER: "v2"}) for _ in range(HEADER_REQUESTS)]

    outcome = _safe(lab, work)
    if isinstance(outcome, str):
        return Result(name, False, outcome)
    v2 = sum(1 for a in outcome if a.status == 200 and lab.version(a) == "v2")
    pods = Counter(a.pod or f"HTTP {a.status}" for a in outcome)
    return Result(name, v2 == HEADER_REQUESTS, f"{v2}/{HEADER_REQUESTS} from v2 ({dict(pods)})")


def check_retries(lab: Lab) -> Result:
    name = (
        f"waypoint retries: /flaky with {RETRY_FAIL_PERCENT}% upstream 503s, "
        f">= {RETRY_SUCCESS:.0%} succeed"
    )
    headers = {FAIL_PERCENT_HEADER: str(RETRY_FAIL_PERCENT)}

    def work(s: Session) -> Counter[int]:
        return Counter(s.get(f"/flaky/{i}", headers).status for i in range(RETRY_REQUESTS))

    outcome = _safe(lab, work)
    if isinstance(outcome, str):
        return Result(name, False, outcome)
    rate = outcome[200] / RETRY_REQUESTS
    return Result(name, rate >= RETRY_SUCCESS, f"{rate:.1%} 200 ({dict(outcome)})")


def check_deny(lab: Lab) -> Result:
    name = "waypoint L7 DENY: /admin/x -> 403 RBAC: access denied, /ok -> 200"

    def work(s: Session) -> tuple[Answer, Answer]:
        return s.get("/admin/x"), s.get("/ok")

    outcome = _safe(lab, work)
    if isinstance(outcome, str):
        return Result(name, False, outcome)
    admin, fine = outcome
    detail = f"/admin/x -> {admin.status} {admin.text[:60]!r}; /ok -> {fine.status}"
    ok = admin.status == 403 and admin.text == RBAC_DENIED and fine.status == 200
    return Result(name, ok, detail)


def check_jwt(lab: Lab) -> Result:
    name = "waypoint JWT: /secure/x no token 403, bad signature 401, expired 401, valid 200"
    tokens = {
        "no token": None,
        "bad signature": lab.rogue.mint(),
        "expired": lab.signer.mint(lifetime=-600),
        "valid": lab.signer.mint(),
    }
    expected = {"no token": 403, "bad signature": 401, "expired": 401, "valid": 200}

    def work(s: Session) -> dict[str, Answer]:
        out = {}
        for what, token in tokens.items():
            headers = {"authorization": f"Bearer {token}"} if token else {}
            out[what] = s.get("/secure/x", headers)
        return out

    outcome = _safe(lab, work)
    if isinstance(outcome, str):
        return Result(name, False, outcome)
    detail = ", ".join(
        f"{what} {a.status}" + ("" if a.status == 200 else f" {a.text[:40]!r}")
        for what, a in outcome.items()
    )
    ok = all(outcome[what].status == code for what, code in expected.items())
    return Result(name, ok, detail)


def _find(data: object, key: str) -> object:
    """The first value of `key` anywhere in a JSON document, or None."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        values: list[object] = list(data.values())
    elif isinstance(data, list):
        values = list(data)
    else:
        return None
    for value in values:
        found = _find(value, key)
        if found is not None:
            return found
    return None


def waypoint_rules(plan: Plan) -> list[str] | None:
    """The DestinationRules the waypoint's /config_dump lists, or None when it lists none."""
    pod = plan.waypoint
    status, body = http_get(pod.netns, pod.admin, "/config_dump", 3.0)
    if status != 200:
        raise LabError(f"waypoint /config_dump: HTTP {status}")
    rules = _find(json.loads(body), "destinationRules")
    return [str(r) for r in rules] if isinstance(rules, list) else None


def wait_rule(plan: Plan, name: str, settle: float = 3.0) -> str:
    """Wait until the waypoint has the DestinationRule `name` (and no other); "" or why not.
    When its config dump does not list rules, wait `settle` seconds instead."""
    rules: list[str] | None = []
    deadline = time.monotonic() + CONFIG_TIMEOUT
    while True:
        try:
            rules = waypoint_rules(plan)
        except (OSError, ValueError, http.client.HTTPException, LabError) as exc:
            rules = [f"({exc})"]
        if rules is None:
            time.sleep(settle)
            return ""
        if [r.rsplit("/", 1)[-1] for r in rules] == [name]:
            return ""
        if time.monotonic() >= deadline:
            return (
                f"the waypoint has DestinationRules {rules}, not {name}, after {CONFIG_TIMEOUT:g}s"
            )
        time.sleep(0.2)


def set_unhealthy(pod: Pod, unhealthy: bool) -> None:
    """Toggle the app's unhealthy mode, from inside its own pod."""
    status, body = http_get(pod.netns, (pod.ip, APP_PORT), f"/lab/health?fail={int(unhealthy)}")
    if status != 200:
        raise LabError(f"{pod.key} /lab/health: HTTP {status} {body[:100]!r}")


@dataclass
class OutlierRun:
    ok: bool = False
    detail: str = ""
    requests: int = 0
    failures: int = 0
    ejected_at: float = 0.0
    back_after: float | None = None


def _outlier(lab: Lab, bad: Pod, good: Pod) -> OutlierRun:
    """Inside a-sleep: /stable until `bad` is ejected, heal it, wait for it to come back."""
    run = OutlierRun()
    base = float(str(OUTLIER["baseEjectionTime"]).rstrip("s"))
    interval = float(str(OUTLIER["interval"]).rstrip("s"))
    threshold = int(str(OUTLIER["consecutive5xxErrors"]))
    started = time.monotonic()
    deadline = started + OUTLIER_TIMEOUT
    s = Session(lab.vip, lab.port)
    try:
        while True:
            if time.monotonic() >= deadline:
                run.detail = (
                    f"{bad.key} not ejected in {OUTLIER_TIMEOUT:g}s: {run.requests} requests, "
                    f"{run.failures} 503s from it"
                )
                return run
            streak = 0
            while streak < threshold and time.monotonic() < deadline:
                answer = s.get(f"/stable/{run.requests}")
                run.requests += 1
                if answer.pod == bad.key and answer.status == 503:
                    streak += 1
                    run.failures += 1
                elif answer.pod != good.key or answer.status != 200:
                    run.detail = f"unexpected answer: HTTP {answer.status} from {answer.pod!r}"
                    return run
            if streak < threshold:
                continue
            run.ejected_at = time.monotonic()
            after = [s.get(f"/stable/ejected/{i}") for i in range(EJECTED_RUN)]
            run.requests += EJECTED_RUN
            if all(a.pod == good.key and a.status == 200 for a in after):
                break
            run.failures += sum(1 for a in after if a.pod == bad.key)
        # Ejected: heal it and see it come back after baseEjectionTime (at the next sweep).
        healed = time.monotonic()
        set_unhealthy(bad, False)
        limit = run.ejected_at + base + interval + RETURN_MARGIN
        while time.monotonic() < limit:
            answer = s.get("/stable/back")
            run.requests += 1
            if answer.pod == bad.key:
                run.back_after = time.monotonic() - run.ejected_at
                break
            time.sleep(0.1)
        ejected = f"ejected after {run.requests} requests ({run.failures} 503s from {bad.key})"
        if run.back_after is None:
            run.detail = (
                f"{ejected}; {EJECTED_RUN}/{EJECTED_RUN} then from {good.key}; healed at "
                f"+{healed - run.ejected_at:.1f}s but no request reached it by "
                f"+{limit - run.ejected_at:.1f}s"
            )
            return run
        early = run.back_after < base - 0.5
        run.ok = not early
        run.detail = (
            f"{ejected} in {run.ejected_at - started:.1f}s; next {EJECTED_RUN}/{EJECTED_RUN} "
            f"from {good.key}; healed at +{healed - run.ejected_at:.1f}s; back at "
            f"+{run.back_after:.1f}s after ejection (baseEjectionTime {base:g}s, "
            f"interval {interval:g}s)" + (" - too early" if early else "")
        )
        return run
    finally:
        s.close()


def check_outlier(lab: Lab, bad: Pod, good: Pod, enable: Callable[[bool], None]) -> Result:
    name = (
        f"waypoint outlier detection: unhealthy {bad.key} ejected after "
        f"{OUTLIER['consecutive5xxErrors']} 503s, back after baseEjectionTime"
    )
    enable(True)
    try:
        problem = wait_rule(lab.plan, DESTINATION_RULE_OUTLIER)
        if problem:
            return Result(name, False, problem)
        set_unhealthy(bad, True)
        run = netns.run_in(
            lab.sleep.netns, lambda: _outlier(lab, bad, good), OUTLIER_TIMEOUT + 60.0
        )
    except (OSError, http.client.HTTPException, LabError) as exc:
        return Result(name, False, f"{type(exc).__name__}: {exc}")
    finally:
        try:
            set_unhealthy(bad, False)
        except (OSError, http.client.HTTPException, LabError) as exc:
            lab.notes.append(f"could not heal {bad.key}: {exc}")
        enable(False)
        wait_rule(lab.plan, DESTINATION_RULE)
    return Result(name, run.ok, run.detail)


def check_metrics(plan: Plan) -> Result:
    metric = "istio_requests_total"
    name = f"waypoint metrics: {metric}{{reporter=waypoint}} > 0"
    pod = plan.waypoint
    try:
        status, body = http_get(pod.netns, pod.metrics, "/metrics", 3.0)
    except (OSError, http.client.HTTPException, LabError) as exc:
        return Result(name, False, f"cannot read {pod.metrics[0]}:{pod.metrics[1]}: {exc}")
    if status != 200:
        return Result(name, False, f"/metrics answered HTTP {status}")
    total = 0.0
    codes: Counter[str] = Counter()
    for family in text_string_to_metric_families(body.decode(errors="replace")):
        for sample in family.samples:
            if sample.name == metric and sample.labels.get("reporter") == "waypoint":
                total += float(sample.value)
                codes[sample.labels.get("response_code", "?")] += int(sample.value)
    if total > 0:
        return Result(name, True, f"{total:g} requests (by response_code: {dict(codes)})")
    return Result(name, False, "no request counted")


# --------------------------------------------------------------------------- run

CHECK_NAMES = (
    "waypoint canary split",
    "waypoint header route",
    "waypoint retries",
    "waypoint L7 DENY",
    "waypoint JWT",
    "waypoint outlier detection",
    "waypoint metrics",
)


def make_lab(plan: Plan) -> Lab:
    web = plan.service(WEB)
    versions = {p.key: p.version for p in plan.app_pods if p.app == WEB}
    return Lab(
        plan=plan,
        sleep=plan.pod("a-sleep"),
        vip=web.vip,
        port=web.port("http"),
        versions=versions,
        signer=jwt_signer(plan.jwt_dir, SIGNING_KEY, "lab"),
        rogue=jwt_signer(plan.jwt_dir, ROGUE_KEY, "lab"),
    )


def run_checks(plan: Plan, waypoint: bool, report: Callable[[Result], None]) -> None:
    """The waypoint checks, each reported as it finishes."""
    if not waypoint:
        for name in CHECK_NAMES:
            report(Result(name, False, "the lab has no waypoint (no `ztagent waypoint` command)"))
        return
    lab = make_lab(plan)
    with scenario_files(plan, lab.signer.jwks()) as rewrite:
        problem = wait_config(lab)
        if problem:
            for name in CHECK_NAMES[:-1]:
                report(Result(name, False, f"L7 config {problem}"))
            report(check_metrics(plan))
            return
        report(check_canary(lab))
        report(check_header(lab))
        report(check_retries(lab))
        report(check_deny(lab))
        report(check_jwt(lab))
        report(check_outlier(lab, plan.pod("b-web1"), plan.pod("a-web1"), rewrite))
    report(check_metrics(plan))
    for note in lab.notes:
        print(f"note: {note}", flush=True)
