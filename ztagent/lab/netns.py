"""Thin wrappers around `ip` (iproute2) and network-namespace entry, with clear errors.

`run_in(netns, fn)` runs a Python callable on a short-lived thread that has joined the
namespace (setns applies per thread), so sockets it creates live in that namespace: the lab
probes agents, calls pods and captures the underlay without spawning processes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from ztagent.lab.topology import LabError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
IP_TIMEOUT = 20.0


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, routes): run it as root")
    if shutil.which("ip") is None:
        raise LabError("the 'ip' command is missing: install iproute2 (apt-get install iproute2)")


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip [-n netns] args...`; returns stdout, raises `LabError` with stderr on failure."""
    command = ["ip", *(["-n", netns] if netns else []), *args]
    return _run(command, check)


def exec_in(netns: str, command: Sequence[str], check: bool = True) -> str:
    """Run `ip netns exec netns command...`."""
    return _run(["ip", "netns", "exec", netns, *command], check)


def _run(command: list[str], check: bool) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{command[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(command)}` did not finish in {IP_TIMEOUT:g}s") from None
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise LabError(f"`{' '.join(command)}` failed: {detail}")
    return done.stdout


def list_netns() -> list[str]:
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def add_netns(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def delete_netns(name: str) -> None:
    if netns_exists(name):
        ip("netns", "delete", name)


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    out = ip("netns", "pids", name, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def sysctl(netns: str, key: str, value: str) -> None:
    """Set `key` (dotted, as sysctl names it) inside `netns`."""
    exec_in(netns, ["sysctl", "-qw", f"{key}={value}"])


def links(netns: str | None = None) -> list[str]:
    out = ip("-o", "link", "show", netns=netns, check=False)
    names: list[str] = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in(netns: str, fn: Callable[[], T], timeout: float = 120.0) -> T:
    """Call `fn` on a thread inside network namespace `netns`; returns or raises what it did.
    Sockets made by `fn` stay in `netns` wherever they are used afterwards."""
    path = os.path.join(NETNS_DIR, netns)
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            errors.append(LabError(f"network namespace {netns!r}: {exc.strerror or exc}"))
            return
        try:
            _setns(fd)
        except OSError as exc:
            errors.append(LabError(f"cannot enter network namespace {netns!r}: {exc}"))
            return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"work in network namespace {netns!r} did not finish in {timeout:g}s")
    if errors:
        raise errors[0]
    return result[0]
