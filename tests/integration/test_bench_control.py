"""`benchmarks/bench_control.py --quick` runs end to end and reports plausible figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_control import QUICK

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_control", "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    data = json.loads(out.read_text())
    figures = data["figures"]
    assert data["notes"] == [], output

    assert data["settings"]["sizes"] == {
        "pods": QUICK.pods,
        "services": QUICK.services,
        "policies": QUICK.policies,
        "namespaces": QUICK.namespaces,
        "nodes": QUICK.nodes,
    }
    assert figures["workloads"] == QUICK.pods
    assert figures["services"] == QUICK.services
    assert figures["policies"] == QUICK.policies
    assert figures["config_errors"] == 0
    assert figures["documents"] == QUICK.namespaces + QUICK.pods + QUICK.services + QUICK.policies
    assert data["generated"]["files"] == 1 + 3 * QUICK.namespaces
    for key in ("address_bytes", "authorization_bytes", "full_sync_bytes"):
        assert figures[key] > 0, key
    assert figures["full_sync_bytes"] > figures["address_bytes"]

    positive = [
        "read_ms",
        "translate_ms",
        "build_ms",
        "apply_cold_ms",
        "apply_policy_ms",
        "apply_pod_ms",
        "apply_same_ms",
        "stream_sync_ms",
        "ready_empty_s",
        "ready_full_s",
        "rss_empty_mib",
        "rss_full_mib",
        "rss_clients_mib",
        "peak_rss_mib",
        "sync_one_ms",
    ]
    for key in positive:
        assert figures[key] > 0, key
    assert 20 < figures["rss_empty_mib"] < 1024
    assert figures["peak_rss_mib"] >= figures["rss_full_mib"] * 0.9

    clients = data["settings"]["clients"]
    edits = data["settings"]["edits"]
    assert clients == [1, 3]
    for n in clients:
        assert figures[f"server_push_ms_c{n}"] > 0
        for kind in ("policy", "pod"):
            assert len(data["samples"][f"{kind}_update_c{n}_ms"]) == edits
            assert len(data["samples"][f"{kind}_update_each_c{n}_ms"]) == edits * n
            update = figures[f"{kind}_update_c{n}_p50_ms"]
            ack = figures[f"{kind}_ack_c{n}_p50_ms"]
            # The change waits for the debounce (100 ms) at least, and far less than the
            # benchmark's own timeout per edit.
            assert 100 <= update <= ack < 15_000
            assert figures[f"{kind}_update_c{n}_p95_ms"] >= update
