"""Open-file limits: raise the soft limit at start, and refuse loudly when it is reached anyway.

Every proxied connection costs the agent two descriptors, so the soft RLIMIT_NOFILE most shells
and service managers hand down (1,024) caps it near 500 connections. ztunnel and Envoy raise the
soft limit to the hard one at start (`raise_nofile_limit`, ztunnel's `increase_open_files_limit`).

At the limit, libuv (under uvloop's `create_server`) accepts each pending connection on a spare
descriptor and closes it again, silently, or closes the listener for good. `GuardedListener`
accepts itself instead: out of descriptors, it uses one reserved descriptor to accept the
connection and reset it (SO_LINGER 0, so the client sees a refusal at once rather than an empty
success), counts it, and logs at most one warning per `LOG_INTERVAL`. The accept loop is the
only I/O here; callers pass the protocol factory and a callback for the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

ACCEPT_BATCH = 128
"""Connections accepted per readiness callback before yielding to the loop (libuv accepts until
EAGAIN; a bound keeps one busy listener from starving the others)."""
LOG_INTERVAL = 10.0
"""At most one "out of file descriptors" warning per listener this often, with the count since."""
RETRY_DELAY = 0.1
"""How long a listener stops accepting when not even the reserved descriptor is free."""
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
_LINGER_RESET = struct.pack("ii", 1, 0)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after). Never raises."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the open-file limit: %s", exc)
        return (-1, -1)
    if hard == resource.RLIM_INFINITY or soft == hard:
        if soft != hard:
            log.info("open-file limit %d (hard limit unlimited; left as it is)", soft)
        return (soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return (soft, soft)
    log.info("raised the open-file limit from %d to %d", soft, hard)
    return (soft, hard)


class _Reserve:
    """One descriptor held back so that a connection can still be accepted and refused."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.take()

    def take(self) -> bool:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True


_reserve: _Reserve | None = None


def _the_reserve() -> _Reserve:
    global _reserve
    if _reserve is None:
        _reserve = _Reserve()
    return _reserve


class GuardedListener(asyncio.AbstractServer):
    """Serves `factory` on a listening socket, refusing (RST) and counting what it cannot take.

    `on_refused(n)` is told of every `n` connections refused for want of descriptors.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        *,
        name: str,
        on_refused: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._factory = factory
        self._sock = sock
        self._name = name
        self._on_refused = on_refused
        self._clock = clock
        self._serving = False
        self._closed = False
        self._refused = 0
        self.refused_total = 0
        self._logged_at: float | None = None
        self._reserve = _the_reserve()
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._start()

    async def serve_forever(self) -> None:
        self._start()
        while not self._closed:
            await asyncio.sleep(3600)

    def _start(self) -> None:
        if not self._serving and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._ready)
            self._serving = True

    def _pause(self) -> None:
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False

    def close(self) -> None:
        if self._closed:
            return
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        self._closed = True
        self._sock.close()

    async def wait_closed(self) -> None:
        return None

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._exhausted()
                else:
                    log.error("%s: accept failed: %s", self._name, exc)
                return
            self._loop.create_task(self._attach(conn))

    async def _attach(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock=conn)
        except OSError as exc:
            conn.close()
            if exc.errno in _EXHAUSTED:
                self._count(1)
            else:
                log.debug("%s: cannot take an accepted connection: %s", self._name, exc)

    def _exhausted(self) -> None:
        """Out of descriptors: refuse everything pending, using the reserved descriptor."""
        refused = 0
        if self._reserve.release():
            try:
                while True:
                    try:
                        conn, _ = self._sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    with contextlib.suppress(OSError):
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    conn.close()
                    refused += 1
            finally:
                self._reserve.take()
        else:
            # Not even the reserve: stop accepting for a moment rather than spin on readiness.
            self._pause()
            self._retry = self._loop.call_later(RETRY_DELAY, self._resume)
            refused = 0
        self._count(refused)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._reserve.take()
            self._start()

    def _count(self, refused: int) -> None:
        if refused:
            self._refused += refused
            self.refused_total += refused
            if self._on_refused is not None:
                self._on_refused(refused)
        now = self._clock()
        if self._refused and (self._logged_at is None or now - self._logged_at >= LOG_INTERVAL):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "%s: out of file descriptors (open-file limit %d): refused %d connection(s) "
                "with a reset%s",
                self._name,
                soft,
                self._refused,
                "" if self._logged_at is None else f" in the last {now - self._logged_at:.0f}s",
            )
            self._logged_at = now
            self._refused = 0


def refused_counter(registry: CollectorRegistry) -> Counter:
    """The count of connections refused at the limit, by listener, in `registry`."""
    return Counter(
        "ztagent_downstream_cx_fd_exhausted",
        "Connections accepted and reset because the process had no file descriptor left "
        "(as Envoy's listener downstream_global_cx_overflow counts connection-limit refusals)",
        ["listener"],
        registry=registry,
    )


def serve_guarded(
    factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
    *,
    name: str,
    counter: Counter | None = None,
) -> GuardedListener:
    """Start a `GuardedListener` on the running loop; `counter` counts refusals as `name`."""
    on_refused = None
    if counter is not None:
        child = counter.labels(name)
        on_refused = child.inc
    listener = GuardedListener(
        asyncio.get_running_loop(), factory, sock, name=name, on_refused=on_refused
    )
    listener._start()
    return listener
