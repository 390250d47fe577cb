"""Hitless upgrade: a new node agent takes over from the running one without dropping a
connection (istio/ztunnel#1191).

Both agents listen on the same ports with SO_REUSEPORT, so the kernel (and the capture
program's listener lookup) can hand new connections to either; established connections stay
with the socket, and so with the process, that holds them. The handover is one exchange on a
Unix socket (`--handover-socket`, in a directory both agents see: a hostPath in the DaemonSet):

1. The running agent serves the socket.
2. The new agent starts with the same socket path. Before anything else it asks whether an
   agent answers there (`predecessor`). If one does, it loads the capture program, waits for
   its first config, fills the capture maps, opens its listeners beside the old ones and
   attaches the program (replacing the old one, so no packet is ever without a program), then
   sends `TAKEOVER` (`request_takeover`).
3. The old agent (`HandoverServer`) stops accepting: it closes its listeners (connections
   still in their accept queues move to the new agent's, `net.ipv4.tcp_migrate_req`), releases
   its admin, metrics and readiness ports, answers `OK`, and serves the connections it holds
   until they end or `--drain-timeout` passes. It leaves the capture program, rules and routes
   in place: they belong to the new agent now.
4. The new agent binds the admin, metrics and readiness ports and serves the handover socket
   itself, ready for the next upgrade.

A crash (SIGKILL) of either agent still fails closed: the attached program keeps steering
captured flows to a listener, and with none it drops them.

The wire is one line each way, `TAKEOVER\\n` and `OK\\n` (or `BUSY <reason>\\n`); a peer gets
`HANDSHAKE_TIMEOUT` seconds and `MAX_LINE` bytes, and the socket is the agent user's alone
(mode 0600), since a takeover request stops the agent from accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

TAKEOVER = b"TAKEOVER\n"
OK = b"OK\n"
MAX_LINE = 256
"""Bytes a handover peer may send before its line ends."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds for one exchange, as ztunnel's and Envoy's connect timeouts (10 s)."""


class HandoverError(Exception):
    """The running agent did not hand over (it refused, or did not answer in time)."""


def predecessor(path: str | Path, timeout: float = 1.0) -> bool:
    """Whether an agent serves the handover socket at `path` (a connect succeeds)."""
    target = Path(path)
    try:
        if not stat.S_ISSOCK(target.stat().st_mode):
            return False
    except OSError:
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(target))
    except OSError:
        return False
    finally:
        sock.close()
    return True


async def request_takeover(path: str | Path, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Ask the agent at `path` to stop accepting and release its ports; returns once it has."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout=timeout
        )
    except (OSError, TimeoutError) as exc:
        raise HandoverError(f"cannot reach the running agent at {path}: {exc}") from None
    try:
        writer.write(TAKEOVER)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise HandoverError(f"the running agent at {path} did not answer: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if line != OK:
        answer = line[:MAX_LINE].decode("ascii", "replace").strip() or "no answer"
        raise HandoverError(f"the running agent at {path} refused the takeover: {answer}")


class HandoverServer:
    """Serves the handover socket; `on_takeover` stops accepting and releases the ports."""

    def __init__(self, path: str | Path, on_takeover: Callable[[], Awaitable[None]]) -> None:
        self.path = Path(path)
        self._on_takeover = on_takeover
        self._server: asyncio.AbstractServer | None = None
        self._taken = False

    async def start(self) -> None:
        """Listen at the path, replacing a socket file left there (by a predecessor or a crash)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)
        log.info("handover socket %s: a new agent started with it takes over", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=HANDSHAKE_TIMEOUT)
            if line != TAKEOVER:
                writer.write(b"BUSY unknown request\n")
                return
            if self._taken:
                writer.write(b"BUSY already handed over\n")
                return
            self._taken = True
            log.info("handover: a new agent takes over; draining")
            await self._on_takeover()
            writer.write(OK)
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @property
    def handed_over(self) -> bool:
        return self._taken

    async def close(self) -> None:
        """Stop serving; the socket file is removed unless a successor owns it now."""
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(OSError):
            await self._server.wait_closed()
        self._server = None
        if not self._taken:
            with contextlib.suppress(OSError):
                self.path.unlink()
