"""The thin asyncio layer under HBONE: a TLS transport and the shared receive buffer.

`TlsTransport` drives a non-blocking `ssl.SSLSocket` from the event loop's readiness
callbacks: OpenSSL decrypts straight into our receive buffer and encrypts straight onto the
socket, so no memory BIO copies sit in between (the cost that dominates the usual asyncio SSL
transports at multi-gigabit rates).

`ReceiveBuffer` is one 256 KiB buffer per thread that every read uses in turn. A consumer that
hands a slice of it to a transport which keeps a reference (unsent data) calls `retained()`,
and the next read gets a fresh buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

RECEIVE_BUFFER_SIZE = 256 * 1024
# Room left in front of a plaintext read so a DATA frame header can be written in place.
FRAME_GAP = 9
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 * 1024
JOIN_LIMIT = 256 * 1024
READS_PER_CALLBACK = 16


class ReceiveBuffer:
    __slots__ = ("buffer", "view")

    def __init__(self) -> None:
        self.buffer = bytearray(RECEIVE_BUFFER_SIZE)
        self.view = memoryview(self.buffer)

    def retained(self) -> None:
        """Someone still references the current buffer: the next read gets a new one."""
        self.buffer = bytearray(RECEIVE_BUFFER_SIZE)
        self.view = memoryview(self.buffer)


_local = threading.local()


def receive_buffer() -> ReceiveBuffer:
    buf: ReceiveBuffer | None = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = ReceiveBuffer()
    return buf


class TlsReceiver:
    """What a `TlsTransport` reports to."""

    def tls_data(self, data: memoryview) -> None:
        raise NotImplementedError

    def tls_closed(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    def tls_writable(self) -> None:
        """The write buffer fell below the low-water mark after being above the high one."""


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await future
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def connect_socket(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: tuple[str, int],
    timeout: float,
) -> None:
    """Non-blocking connect to a numeric address. (`loop.sock_connect` would resolve the
    address in a thread pool first: a thread hop per connection for nothing.) A connect that
    completes at once, as on loopback, costs no loop iteration and no timer."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        if not select.select((), (sock,), (), 0)[1]:
            await asyncio.wait_for(_ready(loop, sock.fileno(), write=True), timeout)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
    """Finish the TLS handshake of a non-blocking socket (callers bound it with a timeout)."""
    fd = sock.fileno()
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await _ready(loop, fd, write=False)
        except ssl.SSLWantWriteError:
            await _ready(loop, fd, write=True)


async def open_tls(
    loop: asyncio.AbstractEventLoop,
    context: ssl.SSLContext,
    address: tuple[str, int],
    *,
    source_ip: str | None = None,
    mark: int | None = None,
    timeout: float = 10.0,
) -> ssl.SSLSocket:
    """Connect and handshake as a TLS client (no SNI)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source_ip is not None:
            raw.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            raw.bind((source_ip, 0))
        await connect_socket(loop, raw, address, timeout)
        sock = context.wrap_socket(raw, server_side=False, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        await handshake(loop, sock)
    except BaseException:
        sock.close()
        raise
    return sock


class TlsTransport:
    """Moves bytes between an established non-blocking SSLSocket and a `TlsReceiver`."""

    __slots__ = (
        "_closed",
        "_loop",
        "_over_high_water",
        "_pending",
        "_read_paused",
        "_receiver",
        "_sock",
        "_writer_on",
        "fd",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, receiver: TlsReceiver
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._receiver = receiver
        self.fd = sock.fileno()
        self._pending = bytearray()
        self._writer_on = False
        self._read_paused = False
        self._closed = False
        self._over_high_water = False
        loop.add_reader(self.fd, self._on_readable)
        if sock.pending():
            loop.call_soon(self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def write_buffer_size(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        if self._closed or self._read_paused:
            return
        sock = self._sock
        shared = receive_buffer()
        for _ in range(READS_PER_CALLBACK):
            view = shared.view
            filled = 0
            eof = False
            # One SSL_read yields at most one record: gather several per delivery.
            while filled < RECEIVE_BUFFER_SIZE:
                try:
                    n = sock.recv_into(view[filled:])
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                except ssl.SSLWantWriteError:
                    self._start_writer()
                    break
                except (OSError, ssl.SSLError) as exc:
                    if filled:
                        self._receiver.tls_data(view[:filled])
                    self._abort(exc)
                    return
                if n == 0:
                    eof = True
                    break
                filled += n
            if filled:
                self._receiver.tls_data(view[:filled])
            if eof:
                self._abort(None)
                return
            if self._closed or self._read_paused or filled < RECEIVE_BUFFER_SIZE:
                if not self._closed and not self._read_paused and sock.pending():
                    self._loop.call_soon(self._on_readable)
                return
        if not self._closed and not self._read_paused:
            self._loop.call_soon(self._on_readable)

    def pause_reading(self) -> None:
        if not self._read_paused and not self._closed:
            self._read_paused = True
            self._loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if self._read_paused and not self._closed:
            self._read_paused = False
            self._loop.add_reader(self.fd, self._on_readable)
            self._loop.call_soon(self._on_readable)

    # ------------------------------------------------------------------------ writing

    def write_chunks(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Send frames; small ones are joined so they travel in one TLS record."""
        if self._closed or not chunks:
            return
        if len(chunks) == 1:
            self.write(chunks[0])
            return
        total = sum(len(c) for c in chunks)
        if total <= JOIN_LIMIT:
            self.write(b"".join(chunks))
            return
        group: list[bytes | memoryview] = []
        size = 0
        for chunk in chunks:
            if size + len(chunk) > JOIN_LIMIT and group:
                self.write(b"".join(group) if len(group) > 1 else group[0])
                group, size = [], 0
            group.append(chunk)
            size += len(chunk)
        if group:
            self.write(b"".join(group) if len(group) > 1 else group[0])

    def write(self, data: bytes | memoryview) -> None:
        if self._closed or not data:
            return
        if self._pending:
            self._pending += data
            self._check_high_water()
            return
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(view):
                sent += self._sock.send(view[sent:])
        except (ssl.SSLWantWriteError, BlockingIOError, ssl.SSLWantReadError):
            pass
        except (OSError, ssl.SSLError) as exc:
            self._abort(exc)
            return
        if sent < len(view):
            self._pending += view[sent:]
            self._start_writer()
            self._check_high_water()

    def _check_high_water(self) -> None:
        if not self._over_high_water and len(self._pending) > WRITE_HIGH_WATER:
            self._over_high_water = True

    @property
    def congested(self) -> bool:
        return self._over_high_water

    def _start_writer(self) -> None:
        if not self._writer_on and not self._closed:
            self._writer_on = True
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        if self._closed:
            return
        sent = 0
        try:
            while sent < len(self._pending):
                sent += self._sock.send(memoryview(self._pending)[sent:])
        except (ssl.SSLWantWriteError, BlockingIOError):
            pass
        except ssl.SSLWantReadError:
            pass
        except (OSError, ssl.SSLError) as exc:
            self._abort(exc)
            return
        if sent:
            del self._pending[:sent]
        if not self._pending:
            self._writer_on = False
            self._loop.remove_writer(self.fd)
            if not self._read_paused:
                # A read may have been waiting on this write (TLS key update).
                self._loop.call_soon(self._on_readable)
        if self._over_high_water and len(self._pending) <= WRITE_LOW_WATER:
            self._over_high_water = False
            self._receiver.tls_writable()

    # ------------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close after trying to send what is queued (bounded: no waiting for a slow peer)."""
        if self._closed:
            return
        if self._pending:
            with contextlib.suppress(OSError, ssl.SSLError):
                self._sock.send(bytes(self._pending))
        self._abort(None)

    def _abort(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.fd)
        if self._writer_on:
            self._loop.remove_writer(self.fd)
        self._pending = bytearray()
        with contextlib.suppress(OSError):
            self._sock.close()
        receiver = self._receiver
        self._loop.call_soon(receiver.tls_closed, exc)


ProtocolFactory = Callable[[], asyncio.BaseProtocol]
