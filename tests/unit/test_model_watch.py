"""The config file watcher: applies changes, keeps the last good config on failure."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from pathlib import Path

import pytest

from ztagent.model.store import ProxyState, StateChange
from ztagent.model.watch import REHASH_EVERY, ConfigWatcher

ip = ipaddress.ip_address

V1 = """
workloads:
- {uid: a, namespace: ns, workloadIps: ["10.0.0.1"], node: n}
policies:
- {name: p, namespace: ns, scope: Namespace, action: Allow, rules: [[]]}
"""
V2 = """
workloads:
- {uid: a, namespace: ns, workloadIps: ["10.0.0.1"], node: n}
- {uid: b, namespace: ns, workloadIps: ["10.0.0.2"], node: n}
policies:
- {name: p, namespace: ns, scope: Namespace, action: Deny, rules: [[]]}
"""


def write(path: Path, text: str) -> None:
    """Replace the file the way editors and ConfigMap updates do: write aside, rename over."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_poll_applies_changes_once(tmp_path: Path):
    path = tmp_path / "config.yaml"
    write(path, V1)
    state = ProxyState("n")
    watcher = ConfigWatcher(path, state)
    change = watcher.poll()
    assert change is not None and change.version == 1
    assert [w.uid for w in state.workloads] == ["a"]
    assert watcher.poll() is None  # nothing changed
    write(path, V2)
    change = watcher.poll()
    assert change is not None
    assert change.workloads.added == {"b"}
    assert change.policies.updated == {"ns/p"}
    assert state.version == 2


def test_same_size_rewrite_with_unchanged_stat_is_seen_by_rehash(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(V1)
    state = ProxyState("n")
    watcher = ConfigWatcher(path, state)
    assert watcher.poll() is not None
    before = os.stat(path)
    path.write_text(V1.replace("10.0.0.1", "10.0.0.9"))  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    changes = [watcher.poll() for _ in range(REHASH_EVERY)]
    assert [c for c in changes if c is not None]
    assert state.workload_by_address("", ip("10.0.0.9")) is not None


def test_bad_file_keeps_last_good_config_and_logs_once(tmp_path: Path, caplog):
    path = tmp_path / "config.yaml"
    write(path, V1)
    state = ProxyState("n")
    watcher = ConfigWatcher(path, state)
    watcher.poll()
    caplog.set_level(logging.ERROR, logger="ztagent.model.watch")
    write(path, "workloads: [\n")
    assert watcher.poll() is None
    assert watcher.poll() is None
    assert state.version == 1 and [w.uid for w in state.workloads] == ["a"]
    assert watcher.last_error is not None and str(path) in watcher.last_error
    failures = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(failures) == 1
    assert "keeping the last good config" in failures[0].getMessage()
    assert str(path) in failures[0].getMessage()

    path.unlink()
    assert watcher.poll() is None
    assert "cannot read" in (watcher.last_error or "")
    write(path, V2)
    assert watcher.poll() is not None
    assert watcher.last_error is None and state.version == 2


def test_rejected_object_is_named_and_keeps_its_last_version(tmp_path: Path, caplog):
    path = tmp_path / "config.yaml"
    write(path, V2)
    state = ProxyState("n")
    watcher = ConfigWatcher(path, state)
    watcher.poll()
    caplog.set_level(logging.ERROR, logger="ztagent.model.watch")
    write(path, V2.replace('"10.0.0.2"', '"10.0.0.300"').replace("action: Deny", "action: Allow"))
    change = watcher.poll()
    assert change is not None
    assert change.workloads.updated == set() and change.workloads.removed == set()
    assert change.policies.updated == {"ns/p"}
    assert state.workload_by_address("", ip("10.0.0.2")) is not None
    assert watcher.last_errors == (
        'workloads[1] (uid "b"): workloadIps[0]: "10.0.0.300" is not an IP address',
    )
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in record.getMessage()
    assert 'workloads[1] (uid "b"): workloadIps[0]' in record.getMessage()


def test_run_with_injected_sleep_and_async_callback(tmp_path: Path):
    asyncio.run(_run_with_injected_sleep_and_async_callback(tmp_path))


async def _run_with_injected_sleep_and_async_callback(tmp_path: Path):
    path = tmp_path / "config.yaml"
    write(path, V1)
    state = ProxyState("n")
    seen: list[StateChange] = []
    sleeps: list[float] = []
    ticks = asyncio.Event()

    async def on_change(change: StateChange) -> None:
        seen.append(change)

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            write(path, V2)
        if len(sleeps) >= 3:
            ticks.set()
            await asyncio.Event().wait()

    watcher = ConfigWatcher(path, state, on_change, interval=0.25, sleep=fake_sleep)
    task = watcher.start()
    await asyncio.wait_for(ticks.wait(), 5)
    await ConfigWatcher.stop(task)
    assert [c.version for c in seen] == [1, 2]
    assert sleeps == [0.25, 0.25, 0.25]


def test_callback_errors_do_not_stop_the_watcher(tmp_path: Path, caplog):
    asyncio.run(_callback_errors_do_not_stop_the_watcher(tmp_path, caplog))


async def _callback_errors_do_not_stop_the_watcher(tmp_path: Path, caplog):
    path = tmp_path / "config.yaml"
    write(path, V1)

    def broken(change: StateChange) -> None:
        raise RuntimeError("boom")

    watcher = ConfigWatcher(path, ProxyState("n"), broken)
    caplog.set_level(logging.ERROR, logger="ztagent.model.watch")
    assert await watcher.check() is not None
    assert any("callback failed" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_real_file_change_applies_within_a_second(tmp_path: Path):
    asyncio.run(_real_file_change_applies_within_a_second(tmp_path))


async def _real_file_change_applies_within_a_second(tmp_path: Path):
    path = tmp_path / "config.yaml"
    write(path, V1)
    state = ProxyState("n")
    changed = asyncio.Queue[StateChange]()
    watcher = ConfigWatcher(path, state, changed.put_nowait)
    task = watcher.start()
    try:
        first = await asyncio.wait_for(changed.get(), 1.0)
        assert first.version == 1

        start = time.monotonic()
        write(path, V2)
        second = await asyncio.wait_for(changed.get(), 1.0)
        assert time.monotonic() - start < 1.0
        assert second.workloads.added == {"b"}

        write(path, "policies: {not: [a list\n")
        await asyncio.sleep(0.75)
        assert changed.empty()
        assert state.version == 2 and {w.uid for w in state.workloads} == {"a", "b"}
        assert watcher.last_error is not None

        write(path, V1)
        third = await asyncio.wait_for(changed.get(), 1.0)
        assert third.workloads.removed == {"b"}
    finally:
        await ConfigWatcher.stop(task)
