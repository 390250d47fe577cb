"""Linters for the non-Python deploy files: the Vagrantfile parses (ruby -c), the shell scripts
pass shellcheck, the Containerfile passes hadolint."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.conftest import DAEMONSET, VAGRANT, tool

CONTAINERFILE = DAEMONSET / "Containerfile"
SCRIPTS = sorted([*VAGRANT.rglob("*.sh"), *DAEMONSET.rglob("*.sh")])


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_vagrantfile_parses() -> None:
    out = _run(tool("ruby"), "-c", str(VAGRANT / "Vagrantfile"))
    assert out.returncode == 0, out.stderr
    assert "Syntax OK" in out.stdout


def test_shell_scripts_pass_shellcheck() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"make-ca-secret.sh", "common.sh", "server.sh", "agent.sh", "deploy.sh"} <= names
    assert {"checks.sh", "single.sh", "up.sh"} <= names
    out = _run(tool("shellcheck"), "--severity=style", *map(str, SCRIPTS))
    assert out.returncode == 0, out.stdout + out.stderr
    for script in SCRIPTS:
        assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_containerfile_passes_hadolint() -> None:
    out = _run(tool("hadolint"), "--no-color", str(CONTAINERFILE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_finds_problems(tmp_path: Path) -> None:
    """hadolint really lints here (an offline binary that finds an unpinned base image)."""
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    out = _run(tool("hadolint"), "--no-color", str(bad))
    assert out.returncode != 0
    assert "DL3006" in out.stdout  # untagged base image


def test_containerfile_keeps_its_contract() -> None:
    text = CONTAINERFILE.read_text()
    assert "FROM debian:bookworm-slim" in text
    assert "python3-bpfcc" in text
    assert "--system-site-packages" in text and "/usr/bin/python3 -m venv" in text
    assert "USER 10001" in text
    # Only the package's own files are copied: never the virtualenv or .git of the context.
    copies = [line for line in text.splitlines() if line.startswith("COPY")]
    assert copies and all(" . " not in line for line in copies)
