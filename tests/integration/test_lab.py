"""`ztagent lab` end to end, as root: up, status, the pods' apps, down, a crash of `up`, demo.

Everything the lab makes here has the prefix `ztlt-` and addresses in 10.246.0.0/16; the state
directory is the test's own. Every test takes the lab down on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztagent.lab import apps, netns, state
from ztagent.lab.topology import Settings, make_plan

PREFIX = "ztlt-"
POD_CIDR = "10.246.0.0/17"
UNDERLAY_CIDR = "10.246.128.0/24"
COMMAND_TIMEOUT = 180.0
LOCK_PATH = Path(tempfile.gettempdir()) / "ztagent-lab-test.lock"

IS_ROOT = os.geteuid() == 0
if not IS_ROOT:
    print("test_lab: skipped, the lab needs root (network namespaces)", file=sys.stderr)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not IS_ROOT, reason="the lab needs root (network namespaces, veths)"),
]


def _lab_command() -> list[str]:
    from ztagent.cli import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if "lab" in getattr(action, "choices", {}):
            return [sys.executable, "-m", "ztagent", "lab"]
    return [sys.executable, "-m", "ztagent.lab.command"]


def lab(
    directory: Path, action: str, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    command = [
        *_lab_command(),
        action,
        "--prefix",
        PREFIX,
        "--pod-cidr",
        POD_CIDR,
        "--underlay-cidr",
        UNDERLAY_CIDR,
        "--dir",
        str(directory),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def ours(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(PREFIX)]


def leftovers(directory: Path, pids: list[tuple[int, int]]) -> list[str]:
    found = [f"netns {n}" for n in ours(netns.list_netns())]
    found += [f"link {n}" for n in ours(netns.links())]
    found += [f"process {pid}" for pid, started in pids if state.is_running(pid, started)]
    if (directory / "state.json").exists():
        found.append("state file")
    return found


def recorded_pids(directory: Path) -> list[tuple[int, int]]:
    st = state.load(directory / "state.json")
    return [(p.pid, p.start_time) for p in st.processes] if st else []


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One lab test at a time on this host: the prefix and ranges are fixed."""
    with LOCK_PATH.open("a") as f:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{LOCK_PATH} held for 600s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "lab"
    with exclusive():
        try:
            yield directory
        finally:
            done = lab(directory, "down")
            for name in ours(netns.list_netns()):
                netns.delete_netns(name)
            assert done.returncode == 0, done.stderr


def settings(directory: Path) -> Settings:
    return Settings(PREFIX, POD_CIDR, UNDERLAY_CIDR, directory)


def call_from(pod_netns: str, ip: str, port: int, path: str) -> dict[str, object]:
    status, body = netns.run_in(pod_netns, lambda: apps.request(ip, port, path, 0, 10.0))
    assert status == 200, body
    answer: dict[str, object] = json.loads(body)
    return answer


def test_up_status_apps_down(lab_dir: Path) -> None:
    plan = make_plan(settings(lab_dir))
    done = lab(lab_dir, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[5/5]" in done.stdout

    assert sorted(ours(netns.list_netns())) == sorted(plan.namespaces)
    status = lab(lab_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for node in plan.nodes:
        line = next(line for line in status.stdout.splitlines() if line.startswith(node.name))
        assert node.ip in line and line.rstrip().endswith("ready"), status.stdout
    for pod in plan.pods:
        line = next(line for line in status.stdout.splitlines() if line.startswith(pod.key + " "))
        enrolled = "yes" if pod.enrolled else "no"
        assert pod.ip in line and pod.node in line and f" {enrolled} " in line, status.stdout
    assert (lab_dir / "config" / "local-config.yaml").exists()
    assert (lab_dir / "logs" / "node-a.log").exists()

    # Every pod's app answers with its own name, and a call between non-enrolled pods on
    # different nodes is direct: the app sees the caller's address.
    legacy_b, legacy_a = plan.pod("b-legacy"), plan.pod("a-legacy")
    for pod in plan.pods:
        answer = call_from(legacy_b.netns, pod.ip, 8080, f"/hello-{pod.key}")
        assert answer["pod"] == pod.key and answer["path"] == f"/hello-{pod.key}"
    answer = call_from(legacy_b.netns, legacy_a.ip, 8080, "/direct")
    assert str(answer["peer"]).rsplit(":", 1)[0] == legacy_b.ip

    pids = recorded_pids(lab_dir)
    assert len(pids) == len(plan.pods) + len(plan.nodes)
    done = lab(lab_dir, "down")
    assert done.returncode == 0, done.stderr
    assert leftovers(lab_dir, pids) == []
    again = lab(lab_dir, "down")
    assert again.returncode == 0, again.stderr
    assert lab(lab_dir, "status").returncode != 0


def test_down_after_up_killed_midway(lab_dir: Path) -> None:
    command = [
        *_lab_command(),
        "up",
        "--prefix",
        PREFIX,
        "--pod-cidr",
        POD_CIDR,
        "--underlay-cidr",
        UNDERLAY_CIDR,
        "--dir",
        str(lab_dir),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if recorded_pids(lab_dir) or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "up finished before it could be killed"
        assert ours(netns.list_netns()), "up made no namespace before being killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    pids = recorded_pids(lab_dir)
    done = lab(lab_dir, "down")
    assert done.returncode == 0, done.stderr
    assert leftovers(lab_dir, pids) == []


def _capture_flag() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "ztagent", "node", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--capture" in done.stdout


def test_demo_passes(lab_dir: Path) -> None:
    if not _capture_flag():
        pytest.skip("`ztagent node` has no --capture yet: the mesh checks need it")
    done = lab(lab_dir, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    demo = lab(lab_dir, "demo")
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
        for p in sorted((lab_dir / "logs").glob("node-*.log"))
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr + logs
    assert "7/7 checks passed" in demo.stdout
