"""`ztagent lab demo`: the checks, one PASS/FAIL line each; exit 0 only when all pass.

1. same-node call through the mesh (a-sleep -> a-echo): the app sees node-a's agent;
2. cross-node call through the mesh (a-sleep -> b-echo): the app sees node-b's agent;
3. node-b's access log names both identities for that call;
4. a 1 MiB transfer across nodes is TLS on the underlay (port 15008 records) and the
   plaintext payload never appears there (captured with AF_PACKET in the underlay namespace);
5. a call between non-enrolled pods (b-legacy -> a-legacy) stays direct: the app sees the
   caller's own address;
6. an L4 DENY policy for a-sleep's principal on b-echo refuses the call; removing it lets
   calls through again;
7. node-b's metrics count inbound connections (istio_tcp_connections_opened_total,
   reporter="destination");

then the waypoint's L7 checks (`waypoint_demo`): canary split, header route, retries, L7 DENY,
JWT, outlier detection and the waypoint's request metrics.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ztagent.lab import apps, netns, state, waypoint_demo
from ztagent.lab.configdir import write_resources
from ztagent.lab.probes import http_get
from ztagent.lab.report import Result, say
from ztagent.lab.topology import LabError, Plan, Pod
from ztagent.lab.traffic import CallError, call
from ztagent.lab.underlay import (
    CAPTURE_MAX_SECONDS,
    Capture,
    capture_underlay,
    reassemble,
    tls_walk,
)
from ztagent.names import HBONE_PORT

TRANSFER_BYTES = 1024 * 1024
POLICY_NAME = "lab-deny-sleep"
CONFIG_TIMEOUT = 10.0
LOG_TIMEOUT = 5.0
MARKER = b"ztlab plaintext payload"


def _peer_ip(answer: dict[str, Any]) -> str:
    return str(answer.get("peer", "")).rsplit(":", 1)[0]


def _uncaptured_hint(capture: bool) -> str:
    return "" if capture else " (the agents run without --capture: nothing steers pod traffic)"


def check_mesh_call(plan: Plan, source: Pod, dest: Pod, label: str, capture: bool) -> Result:
    node = plan.node(dest.node)
    name = f"{label} call {source.key} -> {dest.key} through the mesh"
    try:
        answer = call(plan, source, dest.address, f"/{label}")
    except CallError as exc:
        return Result(name, False, f"call failed: {exc}")
    peer = _peer_ip(answer)
    if answer.get("pod") != dest.key:
        return Result(name, False, f"answered by {answer.get('pod')!r}, not {dest.key}")
    if peer == node.ip:
        return Result(
            name, True, f"{dest.key} saw the connection come from {node.name}'s agent ({peer})"
        )
    if peer == source.ip:
        return Result(
            name,
            False,
            f"{dest.key} saw the caller's own address {peer}: the call was not captured"
            + _uncaptured_hint(capture),
        )
    return Result(name, False, f"{dest.key} saw {peer}, expected {node.name}'s agent {node.ip}")


def _log_size(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.seek(0, 2)
    except OSError:
        return 0


def _log_since(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def check_access_log(
    plan: Plan, log_path: str, offset: int, source: Pod, dest: Pod, capture: bool
) -> Result:
    name = f"{dest.node}'s access log names both identities"
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        for line in _log_since(log_path, offset).splitlines():
            if "connection complete" in line and source.identity in line and dest.identity in line:
                return Result(name, True, line.strip()[:240])
        if time.monotonic() >= deadline:
            return Result(
                name,
                False,
                f"no 'connection complete' line with {source.identity} and {dest.identity} "
                f"in {log_path} within {LOG_TIMEOUT:g}s" + _uncaptured_hint(capture),
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------- underlay capture


def check_underlay_tls(plan: Plan, source: Pod, dest: Pod, capture: bool) -> Result:
    name = "underlay carries TLS on 15008, never the plaintext, during a 1 MiB transfer"
    out = Capture()
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def capture_thread() -> None:
        try:
            capture_underlay(plan, stop, ready, out)
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=capture_thread, daemon=True)
    thread.start()
    ready.wait(10.0)
    transfer = ""
    try:
        answer = call(plan, source, dest.address, "/transfer", TRANSFER_BYTES)
        expected = apps.payload(TRANSFER_BYTES)
        if (
            answer.get("received") != TRANSFER_BYTES
            or answer.get("sha256") != hashlib.sha256(expected).hexdigest()
        ):
            transfer = f"the app received {answer.get('received')} bytes, not the payload"
    except CallError as exc:
        transfer = f"transfer failed: {exc}"
    time.sleep(0.3)
    stop.set()
    thread.join(CAPTURE_MAX_SECONDS + 15.0)
    if errors:
        return Result(name, False, f"capture failed: {errors[0]}")
    if transfer:
        return Result(name, False, transfer)
    hbone_bytes = 0
    other_bytes = 0
    leaks: list[str] = []
    bad_tls: list[str] = []
    records = 0
    for (src, sport, dst, dport), segments in out.flows.items():
        payload_bytes = sum(len(s.data) for s in segments)
        where = f"{src}:{sport} -> {dst}:{dport}"
        if any(MARKER in s.data for s in segments):
            leaks.append(where)
        stream, from_start = reassemble(segments)
        if MARKER in stream and where not in leaks:
            leaks.append(where)
        if HBONE_PORT in (sport, dport):
            hbone_bytes += payload_bytes
            if stream:
                ok, count, _first = tls_walk(stream, from_start)
                records += count
                if not ok:
                    bad_tls.append(where)
        else:
            other_bytes += payload_bytes
    summary = (
        f"{out.frames} frames; {hbone_bytes} bytes on {HBONE_PORT} in {records} TLS records; "
        f"{other_bytes} bytes on other ports"
    )
    if leaks:
        return Result(
            name,
            False,
            f"the plaintext payload crossed the underlay ({', '.join(leaks[:3])}); {summary}"
            + _uncaptured_hint(capture),
        )
    if hbone_bytes < TRANSFER_BYTES:
        return Result(name, False, f"less than 1 MiB went over {HBONE_PORT}; {summary}")
    if bad_tls:
        return Result(name, False, f"not TLS records: {', '.join(bad_tls[:3])}; {summary}")
    return Result(name, True, summary)


# --------------------------------------------------------------------------- direct call


def check_direct(plan: Plan, source: Pod, dest: Pod) -> Result:
    name = f"non-enrolled {source.key} -> {dest.key} stays direct"
    try:
        answer = call(plan, source, dest.address, "/direct")
    except CallError as exc:
        return Result(name, False, f"call failed: {exc}")
    peer = _peer_ip(answer)
    if peer == source.ip:
        return Result(name, True, f"{dest.key} saw the caller's own address {peer}")
    return Result(name, False, f"{dest.key} saw {peer}, expected the caller's {source.ip}")


# --------------------------------------------------------------------------- policy


def _policy_keys(plan: Plan, node_name: str) -> set[str]:
    node = plan.node(node_name)
    status, body = http_get(node.netns, node.admin, "/config_dump", 3.0)
    if status != 200:
        raise LabError(f"{node_name} /config_dump: HTTP {status}")
    dump = json.loads(body)
    return {str(p.get("key")) for p in dump.get("policies") or []}


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except (OSError, ValueError, http.client.HTTPException, LabError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def policy_document(source: Pod, dest: Pod) -> dict[str, Any]:
    """An Istio AuthorizationPolicy: DENY `source`'s identity on the pods of `dest`'s app."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": POLICY_NAME, "namespace": dest.namespace},
        "spec": {
            "selector": {"matchLabels": {"app": dest.app}},
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"principals": [source.identity.removeprefix("spiffe://")]}}]}
            ],
        },
    }


def check_policy(plan: Plan, source: Pod, dest: Pod, capture: bool) -> Result:
    """Write an AuthorizationPolicy file into the control plane's directory, see the agent
    enforce it, delete the file, see the call pass again."""
    name = f"L4 DENY policy refuses {source.key} -> {dest.key}"
    key = f"{dest.namespace}/{POLICY_NAME}"
    path = plan.resources_dir / f"{POLICY_NAME}.yaml"
    write_resources(path, [policy_document(source, dest)])
    try:
        if not _wait(lambda: key in _policy_keys(plan, dest.node), CONFIG_TIMEOUT):
            return Result(name, False, f"{dest.node} did not load {key} in {CONFIG_TIMEOUT:g}s")
        try:
            answer = call(plan, source, dest.address, "/denied")
            return Result(
                name,
                False,
                f"the call went through (the app saw {answer.get('peer')})"
                + _uncaptured_hint(capture),
            )
        except CallError as exc:
            refused = f"refused ({exc})"
    finally:
        path.unlink(missing_ok=True)
    if not _wait(lambda: key not in _policy_keys(plan, dest.node), CONFIG_TIMEOUT):
        return Result(name, False, f"{refused}, but {dest.node} kept {key} after its removal")
    try:
        call(plan, source, dest.address, "/allowed-again")
    except CallError as exc:
        return Result(name, False, f"{refused}, but still refused after removal: {exc}")
    return Result(name, True, f"{refused}; allowed again once the policy was removed")


# --------------------------------------------------------------------------- metrics


def check_metrics(plan: Plan, node_name: str, capture: bool) -> Result:
    metric = "istio_tcp_connections_opened_total"
    name = f"{node_name} metrics: {metric}{{reporter=destination}} > 0"
    node = plan.node(node_name)
    try:
        status, body = http_get(node.netns, node.metrics, "/metrics", 3.0)
    except (OSError, http.client.HTTPException, LabError) as exc:
        return Result(name, False, f"cannot read {node.metrics[0]}:{node.metrics[1]}: {exc}")
    if status != 200:
        return Result(name, False, f"/metrics answered HTTP {status}")
    total = 0.0
    for family in text_string_to_metric_families(body.decode(errors="replace")):
        for sample in family.samples:
            if sample.name == metric and sample.labels.get("reporter") == "destination":
                total += float(sample.value)
    if total > 0:
        return Result(name, True, f"{total:g} connections")
    return Result(name, False, "no inbound connection counted" + _uncaptured_hint(capture))


# --------------------------------------------------------------------------- run


def run(plan: Plan) -> int:
    netns.require_root()
    st = state.load(plan.state_path)
    if st is None or st.phase != "up":
        raise LabError(f"no lab is up in {plan.directory}: run `ztagent lab up` first")
    capture = st.capture
    if not capture:
        say("the agents run without --capture: the mesh checks are expected to FAIL")
    sleep, a_echo, b_echo = plan.pod("a-sleep"), plan.pod("a-echo"), plan.pod("b-echo")
    b_legacy, a_legacy = plan.pod("b-legacy"), plan.pod("a-legacy")
    log_b = str(plan.log_path(b_echo.node))
    results: list[Result] = []

    def report(result: Result) -> None:
        results.append(result)
        print(result.line, flush=True)

    report(check_mesh_call(plan, sleep, a_echo, "same-node", capture))
    offset = _log_size(log_b)
    report(check_mesh_call(plan, sleep, b_echo, "cross-node", capture))
    report(check_access_log(plan, log_b, offset, sleep, b_echo, capture))
    report(check_underlay_tls(plan, sleep, b_echo, capture))
    report(check_direct(plan, b_legacy, a_legacy))
    report(check_policy(plan, sleep, b_echo, capture))
    report(check_metrics(plan, b_echo.node, capture))
    waypoint_demo.run_checks(plan, st.waypoint, report)
    passed = sum(r.ok for r in results)
    print(f"{passed}/{len(results)} checks passed", flush=True)
    return 0 if passed == len(results) else 1
