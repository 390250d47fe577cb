"""Load generators for the request/response figures, run on uvloop in the benchmark process.

Every function is bounded both in count and in time, and talks only to the port it is given
on 127.0.0.1 (the entry of a relay pair, or the echo server itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from benchmarks.common import LOOPBACK

REQUEST = b"q" * 64
OP_TIMEOUT = 5.0
MAX_ERRORS = 200


class RoundTrip(asyncio.Protocol):
    """A client connection that sends a request and waits for the same number of bytes back."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.expected = 0
        self.received = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def request(self, payload: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            waiter.set_exception(ConnectionError("connection closed"))
            return waiter
        self.waiter = waiter
        self.expected = len(payload)
        self.received = 0
        self.transport.write(payload)
        return waiter

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        waiter = self.waiter
        if waiter is not None and self.received >= self.expected:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("connection closed by peer"))


async def _connect(port: int) -> tuple[asyncio.Transport, RoundTrip]:
    loop = asyncio.get_running_loop()
    transport, protocol = await asyncio.wait_for(
        loop.create_connection(RoundTrip, LOOPBACK, port), OP_TIMEOUT
    )
    return transport, protocol


async def one_exchange(port: int) -> None:
    """Connect, send one request, read the response, close."""
    transport, protocol = await _connect(port)
    try:
        await asyncio.wait_for(protocol.request(REQUEST), OP_TIMEOUT)
    finally:
        transport.close()


@dataclass
class RateResult:
    completed: int
    errors: int
    seconds: float
    first_error: str = ""

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


async def connection_rate(
    port: int, duration: float, concurrency: int, max_count: int
) -> RateResult:
    """New connections per second, ``concurrency`` exchanges in flight."""
    started = 0
    completed = 0
    errors = 0
    first_error = ""
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker() -> None:
        nonlocal started, completed, errors, first_error
        while started < max_count and errors < MAX_ERRORS and time.perf_counter() < deadline:
            started += 1
            try:
                await one_exchange(port)
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors += 1
                first_error = first_error or repr(exc)
                await asyncio.sleep(0.01)
            else:
                completed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return RateResult(completed, errors, time.perf_counter() - t0, first_error)


@dataclass
class LatencyResult:
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


async def latency_fresh(port: int, max_count: int, duration: float) -> LatencyResult:
    """Time of connect + request + response over a new connection each time, one at a time."""
    result = LatencyResult()
    deadline = time.perf_counter() + duration
    while (
        len(result.samples) < max_count
        and result.errors < MAX_ERRORS
        and time.perf_counter() < deadline
    ):
        t0 = time.perf_counter()
        try:
            await one_exchange(port)
        except (OSError, TimeoutError, ConnectionError) as exc:
            result.errors += 1
            result.first_error = result.first_error or repr(exc)
            continue
        result.samples.append(time.perf_counter() - t0)
    return result


async def latency_persistent(port: int, max_count: int, duration: float) -> LatencyResult:
    """Time of request + response on one connection kept open."""
    result = LatencyResult()
    try:
        transport, protocol = await _connect(port)
        # One exchange first, so a lazily opened tunnel is not counted.
        await asyncio.wait_for(protocol.request(REQUEST), OP_TIMEOUT)
    except (OSError, TimeoutError, ConnectionError) as exc:
        result.errors += 1
        result.first_error = repr(exc)
        return result
    try:
        deadline = time.perf_counter() + duration
        while len(result.samples) < max_count and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(protocol.request(REQUEST), OP_TIMEOUT)
            except (OSError, TimeoutError, ConnectionError) as exc:
                result.errors += 1
                result.first_error = repr(exc)
                break
            result.samples.append(time.perf_counter() - t0)
    finally:
        transport.close()
    return result


@dataclass
class IdleResult:
    opened: int
    errors: int
    first_error: str
    measured: Any


async def hold_idle_connections(
    port: int,
    count: int,
    concurrency: int,
    settle: float,
    measure: Callable[[], Any],
    time_limit: float = 60.0,
) -> IdleResult:
    """Open ``count`` connections (each proven end to end by one exchange), call ``measure``
    while they are all open and idle, then close them."""
    transports: list[asyncio.Transport] = []
    errors = 0
    first_error = ""
    next_index = 0
    deadline = time.perf_counter() + time_limit

    async def opener() -> None:
        nonlocal next_index, errors, first_error
        while next_index < count and errors < MAX_ERRORS and time.perf_counter() < deadline:
            next_index += 1
            try:
                transport, protocol = await _connect(port)
            except (OSError, TimeoutError) as exc:
                errors += 1
                first_error = first_error or repr(exc)
                continue
            transports.append(transport)
            try:
                await asyncio.wait_for(protocol.request(REQUEST), OP_TIMEOUT)
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors += 1
                first_error = first_error or repr(exc)

    try:
        await asyncio.gather(*(opener() for _ in range(concurrency)))
        await asyncio.sleep(settle)
        opened = sum(1 for t in transports if not t.is_closing())
        measured = measure()
    finally:
        for transport in transports:
            transport.close()
        await asyncio.sleep(0.2)
    return IdleResult(opened, errors, first_error, measured)
