"""Watches the local config file and swaps `ProxyState` snapshots when it changes.

Polling (every 250 ms by default) rather than inotify: it works the same on every filesystem,
with editors that replace the file, and with Kubernetes ConfigMap symlink swaps. A poll stats
the file and reads it only when size, mtime or inode moved (and every few polls anyway, for
filesystems with coarse timestamps); a content hash decides whether anything really changed.

A file that cannot be used at all (unreadable, not YAML) is logged once per distinct content
and the last good config keeps serving. Rejected objects are logged one line each; the valid
rest is applied, and a rejected object that existed before keeps its last good version
(`keep_rejected`). The callback gets the `StateChange` of every applied snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.model.localconfig import ConfigError, parse_local_config
from ztagent.model.snapshot import ConfigSnapshot, keep_rejected
from ztagent.model.store import ProxyState, StateChange

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
REHASH_EVERY = 8
"""Re-read the file every this many polls even if its stat did not change."""

OnChange = Callable[[StateChange], Awaitable[None] | None]
Sleep = Callable[[float], Awaitable[None]]


class ConfigWatcher:
    """Keeps `state` in step with the file at `path`.

    `poll()` does one check synchronously and is what tests drive; `run()` loops it with
    `sleep` (injectable) and is what the agent starts as a task.
    """

    def __init__(
        self,
        path: str | Path,
        state: ProxyState,
        on_change: OnChange | None = None,
        *,
        interval: float = POLL_INTERVAL,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        sleep: Sleep = asyncio.sleep,
        logger: logging.Logger = log,
    ) -> None:
        self.path = Path(path)
        self.state = state
        self.on_change = on_change
        self.interval = interval
        self.trust_domain = trust_domain
        self._sleep = sleep
        self._log = logger
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None
        self._polls = 0
        self.last_error: str | None = None
        """The message of the last failed load, None once a load succeeds."""
        self.last_errors: tuple[str, ...] = ()
        """Rejected objects of the last applied snapshot."""

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> StateChange | None:
        """Check the file once; apply it if it changed. Returns the change applied, if any."""
        self._polls += 1
        stat = self._stat_key()
        if (
            stat is not None
            and stat == self._stat
            and self._digest is not None
            and self._polls % REHASH_EVERY
        ):
            return None
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._fail(f"{self.path}: cannot read: {exc.strerror or exc}", None)
            self._stat = None
            return None
        self._stat = stat
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            snapshot = parse_local_config(
                data, source=str(self.path), trust_domain=self.trust_domain
            )
        except ConfigError as exc:
            self._fail(str(exc), digest)
            return None
        return self._apply(snapshot)

    def _fail(self, message: str, digest: bytes | None) -> None:
        if message != self.last_error:
            what = "keeping the last good config" if self.state.loaded else "no config loaded yet"
            self._log.error("local config rejected, %s: %s", what, message)
        self.last_error = message
        if digest is None:
            self._digest = None

    def _apply(self, snapshot: ConfigSnapshot) -> StateChange:
        if self.state.loaded:
            snapshot = keep_rejected(snapshot, self.state.snapshot)
        self.last_error = None
        self.last_errors = tuple(str(e) for e in snapshot.errors)
        if snapshot.errors:
            self._log.error(
                "%s: %d object(s) rejected, the rest applied:\n  %s",
                self.path,
                len(snapshot.errors),
                "\n  ".join(self.last_errors),
            )
        change = self.state.replace(snapshot)
        self._log.info(
            "%s: config version %d: %d workloads, %d services, %d policies",
            self.path,
            change.version,
            len(snapshot.workloads),
            len(snapshot.services),
            len(snapshot.policies),
        )
        return change

    async def _notify(self, change: StateChange) -> None:
        if self.on_change is None:
            return
        try:
            result = self.on_change(change)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._log.exception("config change callback failed (version %d)", change.version)

    async def check(self) -> StateChange | None:
        """`poll` once and run the callback for an applied change."""
        change = self.poll()
        if change is not None:
            await self._notify(change)
        return change

    async def run(self) -> None:
        """Poll until cancelled; the first poll happens at once."""
        while True:
            await self.check()
            await self._sleep(self.interval)

    def start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.run(), name=f"watch {self.path}")

    @staticmethod
    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
