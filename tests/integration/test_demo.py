"""`ztagent.demo` (what scripts/demo.sh runs) passes every one of its checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_passes_every_check() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ztagent.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    checks = [line for line in proc.stdout.splitlines() if line.startswith(("[PASS]", "[FAIL]"))]
    assert proc.returncode == 0, output
    assert len(checks) >= 9, output
    assert all(line.startswith("[PASS]") for line in checks), output
    assert f"{len(checks)}/{len(checks)} checks passed" in proc.stdout, output
