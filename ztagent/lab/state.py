"""The lab's state on disk: every namespace and process it made, so `down` works after a crash.

Each object is recorded *before* it is created (a namespace) or right after it started (a
process, with its kernel start time so a recycled pid is never signalled). The file is
replaced atomically on every change.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ztagent.lab.topology import LabError

STATE_VERSION = 1


@dataclass
class Process:
    name: str
    pid: int
    start_time: int
    """Field 22 of /proc/<pid>/stat (clock ticks since boot) when the process was recorded."""
    netns: str
    command: list[str]
    log: str


@dataclass
class State:
    prefix: str
    pod_cidr: str
    underlay_cidr: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    phase: str = "building"
    capture: bool = False
    waypoint: bool = False
    """Whether `up` started the waypoint (this ztagent has the `waypoint` command)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["version"] = STATE_VERSION
        return out

    @classmethod
    def from_json(cls, data: Any, path: Path) -> State:
        try:
            return cls(
                prefix=str(data["prefix"]),
                pod_cidr=str(data["pod_cidr"]),
                underlay_cidr=str(data["underlay_cidr"]),
                namespaces=[str(n) for n in data.get("namespaces", [])],
                processes=[Process(**p) for p in data.get("processes", [])],
                phase=str(data.get("phase", "")),
                capture=bool(data.get("capture", False)),
                waypoint=bool(data.get("waypoint", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LabError(f"{path}: not a lab state file ({exc})") from None


def load(path: Path) -> State | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LabError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LabError(f"{path}: not JSON ({exc})") from None
    return State.from_json(data, path)


def save(path: Path, state: State) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(state.to_json(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_running(pid: int, started: int | None) -> bool:
    now = start_time(pid)
    if now is None:
        return False
    if started is not None and now != started:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2 :].split()[0] != "Z"


def stop(pids: list[tuple[int, int | None]], grace: float = 8.0) -> list[int]:
    """SIGTERM each (pid, start_time) still running, wait up to `grace` seconds, then SIGKILL
    what is left. Returns the pids that were signalled."""
    alive = [(pid, st) for pid, st in pids if is_running(pid, st)]
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not any(is_running(pid, st) for pid, st in alive):
            break
        time.sleep(0.1)
    for pid, st in alive:
        if is_running(pid, st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(is_running(pid, st) for pid, st in alive):
        _reap()
        time.sleep(0.05)
    return [pid for pid, _ in alive]


def _reap() -> None:
    """Collect exited children of this process (when `up` and `down` run in one process)."""
    for _ in range(64):
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
