"""The lab's waypoint end to end, as root: one lab for the module, then each L7 scenario of
`ztagent lab demo`, real HTTP/1.1, HTTP/2 and gRPC clients, and a 256 MiB upload through the
waypoint while its memory is watched.

Every call starts in a-sleep's namespace and goes to the `web` VIP: node-a's agent captures it
and carries it over HBONE to the waypoint on node-b. The lab uses test_lab's prefix, ranges
and lock, and is taken down at the end of the module, also on failure.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_lab import (
    IS_ROOT,
    _capture_flag,
    exclusive,
    lab,
    ours,
    settings,
)
from ztagent.lab import apps, configdir, netns, probes, processes, report, state, waypoint_demo
from ztagent.lab.topology import Plan, make_plan

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not IS_ROOT, reason="the lab needs root (network namespaces, veths)"),
]

UPLOAD_BYTES = 256 * 1024 * 1024
UPLOAD_BLOCK = 1024 * 1024
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
RSS_EVERY = 0.1
VENV_PYTHON = sys.executable


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plan]:
    if not _capture_flag():
        pytest.skip("`ztagent node` has no --capture: the waypoint checks need captured traffic")
    if not processes.waypoint_supported():
        pytest.skip("this ztagent has no `waypoint` command")
    directory = tmp_path_factory.mktemp("waypoint") / "lab"
    with exclusive():
        try:
            done = lab(directory, "up")
            assert done.returncode == 0, done.stdout + done.stderr + logs(directory)
            st = state.load(directory / "state.json")
            assert st is not None and st.capture and st.waypoint, done.stdout
            yield make_plan(settings(directory))
        finally:
            down = lab(directory, "down")
            for name in ours(netns.list_netns()):
                netns.delete_netns(name)
            assert down.returncode == 0, down.stderr


def logs(directory: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((directory / "logs").glob("*.log"))
        if p.name.startswith(("node-", "waypoint"))
    )


@pytest.fixture(scope="module")
def l7(plan: Plan) -> Iterator[tuple[waypoint_demo.Lab, Any]]:
    """The demo's L7 objects, in effect; removed at the end of the module."""
    lab_ = waypoint_demo.make_lab(plan)
    with configdir.scenario_files(plan, lab_.signer.jwks()) as rewrite:
        problem = waypoint_demo.wait_config(lab_)
        assert problem == "", problem + "\n" + logs(plan.directory)
        yield lab_, rewrite
    assert not list(plan.resources_dir.glob("l7-*.yaml"))


def passes(result: report.Result, plan: Plan) -> None:
    print(f"{result.name}: {result.detail}")
    assert result.ok, result.detail + "\n" + logs(plan.directory)


# --------------------------------------------------------------------------- demo scenarios


def test_canary_split(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    passes(waypoint_demo.check_canary(l7[0]), plan)


def test_header_route(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    passes(waypoint_demo.check_header(l7[0]), plan)


def test_retries_on_upstream_503(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    passes(waypoint_demo.check_retries(l7[0]), plan)


def test_l7_deny(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    passes(waypoint_demo.check_deny(l7[0]), plan)


def test_jwt(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    passes(waypoint_demo.check_jwt(l7[0]), plan)


def test_outlier_detection(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    lab_, rewrite = l7
    passes(waypoint_demo.check_outlier(lab_, plan.pod("b-web1"), plan.pod("a-web1"), rewrite), plan)


def test_waypoint_metrics(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    passes(waypoint_demo.check_metrics(plan), plan)


# --------------------------------------------------------------------------- real clients


def in_sleep(
    plan: Plan, args: list[str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["ip", "netns", "exec", plan.pod("a-sleep").netns, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def web_pods(plan: Plan) -> set[str]:
    return {p.key for p in plan.app_pods if p.app == "web"}


@pytest.mark.parametrize("flag", ["--http2-prior-knowledge", "--http1.1"])
def test_curl(plan: Plan, l7: tuple[waypoint_demo.Lab, Any], flag: str) -> None:
    url = f"http://{plan.service('web').vip}/curl"
    done = in_sleep(plan, ["curl", "-sS", "--max-time", "10", flag, "-w", "\n%{http_code}", url])
    assert done.returncode == 0, done.stderr + logs(plan.directory)
    body, _, code = done.stdout.rpartition("\n")
    assert code == "200", done.stdout
    assert json.loads(body)["pod"] in web_pods(plan)


HTTPX_SCRIPT = """
import json, sys, httpx
http2 = sys.argv[2] == "2"
with httpx.Client(http1=not http2, http2=http2, trust_env=False, timeout=10) as client:
    r = client.get(sys.argv[1])
    print(json.dumps({"status": r.status_code, "version": r.http_version,
                      "pod": r.headers.get("x-lab-pod"), "body": r.json()}))
"""


@pytest.mark.parametrize("version", ["1", "2"])
def test_httpx(plan: Plan, l7: tuple[waypoint_demo.Lab, Any], version: str) -> None:
    url = f"http://{plan.service('web').vip}/httpx"
    done = in_sleep(plan, [VENV_PYTHON, "-c", HTTPX_SCRIPT, url, version])
    assert done.returncode == 0, done.stderr + logs(plan.directory)
    answer = json.loads(done.stdout)
    assert answer["status"] == 200, answer
    assert answer["version"] == ("HTTP/2" if version == "2" else "HTTP/1.1"), answer
    assert answer["pod"] in web_pods(plan) and answer["body"]["pod"] == answer["pod"]


def test_grpc_routed_by_path_to_v2(plan: Plan, l7: tuple[waypoint_demo.Lab, Any]) -> None:
    web = plan.service("web")
    address = f"{web.vip}:{web.port('grpc')}"
    for _ in range(5):
        done = in_sleep(
            plan, [VENV_PYTHON, "-m", "ztagent.lab.apps", "--grpc", address, "--post-bytes", "99"]
        )
        assert done.returncode == 0, done.stderr + logs(plan.directory)
        answer = json.loads(done.stdout)
        assert answer == {"pod": "b-web2", "version": "v2", "received": 99}


# --------------------------------------------------------------------------- big upload


def waypoint_pid(plan: Plan) -> int:
    st = state.load(plan.state_path)
    assert st is not None
    record = next(p for p in st.processes if p.name == f"waypoint-{plan.waypoint.key}")
    assert state.is_running(record.pid, record.start_time)
    cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    assert b"waypoint" in cmdline, cmdline  # `ip netns exec` execs: the pid is the waypoint's
    return record.pid


def waypoint_requests(plan: Plan) -> float:
    """istio_requests_total{reporter="waypoint"}, summed."""
    pod = plan.waypoint
    status, body = probes.http_get(pod.netns, pod.metrics, "/metrics", 3.0)
    assert status == 200
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "istio_requests_total" and sample.labels.get("reporter") == "waypoint"
    )


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.timeout(900)
def test_256_mib_upload_streams_through_the_waypoint(
    plan: Plan, l7: tuple[waypoint_demo.Lab, Any]
) -> None:
    pid = waypoint_pid(plan)
    web = plan.service("web")
    block = apps.payload(UPLOAD_BLOCK)
    blocks = UPLOAD_BYTES // UPLOAD_BLOCK
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)
    expected = digest.hexdigest()

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss(pid))
            stop.wait(RSS_EVERY)

    def body() -> Iterator[bytes]:
        for _ in range(blocks):
            yield block

    def upload() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(web.vip, web.port("http"), timeout=120)
        try:
            conn.request(
                "POST", "/upload", body=body(), headers={"Content-Length": str(UPLOAD_BYTES)}
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    counted = waypoint_requests(plan)
    baseline = rss(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    sampler.start()
    try:
        status, answer = netns.run_in(plan.pod("a-sleep").netns, upload, 800.0)
    finally:
        stop.set()
        sampler.join(5.0)
    elapsed = time.monotonic() - started
    growth = max(samples, default=baseline) - baseline
    print(
        f"256 MiB upload in {elapsed:.1f}s ({UPLOAD_BYTES / elapsed / 1e6:.0f} MB/s); waypoint "
        f"RSS {baseline / 2**20:.1f} MiB before, max {max(samples) / 2**20:.1f} MiB, growth "
        f"{growth / 2**20:.1f} MiB over {len(samples)} samples"
    )
    assert status == 200, answer[:300]
    reply = json.loads(answer)
    assert reply["received"] == UPLOAD_BYTES and reply["sha256"] == expected, reply
    assert reply["pod"] in web_pods(plan)
    assert waypoint_requests(plan) > counted, "the upload did not go through the waypoint"
    assert growth < RSS_GROWTH_LIMIT, f"the waypoint grew {growth / 2**20:.1f} MiB"
