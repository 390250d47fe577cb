"""The thin asyncio layer under HBONE: a TLS transport and the shared receive buffer.

`TlsTransport` runs OpenSSL over memory BIOs (`ssl.SSLObject`) and does the socket calls
itself from the event loop's readiness callbacks: one `recv` takes in as many TLS records as
the kernel holds and one `send` puts out every record a batch of frames produced. (OpenSSL on
a socket, without read-ahead, would make two `read` calls per record and one `write` per
record: the syscalls cost far more than the extra copy through the BIO.)

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
from collections.abc import Sequence
from typing import cast

log = logging.getLogger(__name__)

RECEIVE_BUFFER_SIZE = 256 * 1024
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 * 1024
JOIN_LIMIT = 256 * 1024
READS_PER_CALLBACK = 16
# While a peer floods cheap frames (its receiver says a batch is spent), each loop turn reads
# at most this much of its ciphertext: about a thousand small frames, a few milliseconds.
THROTTLED_READ = 16 * 1024
# After a close, our last frames (a GOAWAY) must reach the peer: half-close and discard what
# it still sends for up to this long, instead of a reset that may destroy them unread
# (Envoy's `delayed_close_timeout`, 1 s).
DELAYED_CLOSE_TIMEOUT = 1.0
LINGER_READS = 16


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

    def tls_yield(self) -> bool:
        """Whether to let the event loop run others before reading more (a batch is spent)."""
        return False


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


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until `sock` has bytes (or EOF) to read."""
    await _ready(loop, sock.fileno(), write=False)


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
        poller = select.poll()  # select.select() cannot take descriptors past 1023
        poller.register(sock, select.POLLOUT)
        if not poller.poll(0):
            await asyncio.wait_for(_ready(loop, sock.fileno(), write=True), timeout)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def make_socket(address: tuple[str, int], mark: int | None, source_ip: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source_ip is not None:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.bind((source_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class TlsStream:
    """A non-blocking socket with an `ssl.SSLObject` on memory BIOs, before and during the
    handshake. `TlsTransport` takes it over once the handshake is done."""

    __slots__ = ("incoming", "obj", "outgoing", "sock")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)

    async def handshake(self, loop: asyncio.AbstractEventLoop) -> None:
        """Finish the TLS handshake (callers bound it with a timeout)."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_pending(loop)
                await self._receive(loop)
        await self._send_pending(loop)

    async def _send_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        data = memoryview(self.outgoing.read())
        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                await _ready(loop, self.sock.fileno(), write=True)
                continue
            data = data[sent:]

    async def _receive(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                await _ready(loop, self.sock.fileno(), write=False)
                continue
            if not data:
                raise ConnectionResetError("connection closed during the TLS handshake")
            self.incoming.write(data)
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


async def open_tls(
    loop: asyncio.AbstractEventLoop,
    context: ssl.SSLContext,
    address: tuple[str, int],
    *,
    source_ip: str | None = None,
    mark: int | None = None,
    timeout: float = 10.0,
) -> TlsStream:
    """Connect and handshake as a TLS client (no SNI)."""
    raw = make_socket(address, mark, source_ip)
    try:
        await connect_socket(loop, raw, address, timeout)
        stream = TlsStream(raw, context, server_side=False)
        await asyncio.wait_for(stream.handshake(loop), timeout)
    except BaseException:
        raw.close()
        raise
    return stream


def _linger(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Discard what the peer still sends on a half-closed socket until it closes, or for
    DELAYED_CLOSE_TIMEOUT; then close."""
    fd = sock.fileno()

    def finish() -> None:
        timer.cancel()
        loop.remove_reader(fd)
        sock.close()

    def discard() -> None:
        scratch = _cipher_buffer()
        for _ in range(LINGER_READS):
            try:
                if not sock.recv_into(scratch):
                    finish()
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                finish()
                return

    timer = loop.call_later(DELAYED_CLOSE_TIMEOUT, finish)
    loop.add_reader(fd, discard)


_cipher_local = threading.local()


def _cipher_buffer() -> memoryview:
    """Per-thread scratch space for ciphertext on its way into a BIO."""
    view: memoryview | None = getattr(_cipher_local, "view", None)
    if view is None:
        view = _cipher_local.view = memoryview(bytearray(RECEIVE_BUFFER_SIZE))
    return view


class TlsTransport:
    """Moves bytes between an established `TlsStream` and a `TlsReceiver`."""

    __slots__ = (
        "_closed",
        "_incoming",
        "_loop",
        "_obj",
        "_outgoing",
        "_over_high_water",
        "_pending",
        "_read_paused",
        "_read_size",
        "_receiver",
        "_sock",
        "_writer_on",
        "fd",
        "queued_total",
        "sent_total",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, stream: TlsStream, receiver: TlsReceiver
    ) -> None:
        self._loop = loop
        self._sock = stream.sock
        self._obj = stream.obj
        self._incoming = stream.incoming
        self._outgoing = stream.outgoing
        self._receiver = receiver
        self.fd = stream.sock.fileno()
        self._pending = bytearray()
        self._writer_on = False
        self._read_paused = False
        self._closed = False
        self._over_high_water = False
        self._read_size = RECEIVE_BUFFER_SIZE
        # Ciphertext bytes queued for the socket and taken by it, since the start: what is
        # still queued is the difference (the outbound control-frame budget uses it).
        self.queued_total = 0
        self.sent_total = 0
        loop.add_reader(self.fd, self._on_readable)
        if self._incoming.pending:
            loop.call_soon(self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        if self._closed or self._read_paused:
            return
        cipher = _cipher_buffer()[: self._read_size]
        for _ in range(READS_PER_CALLBACK):
            try:
                n = self._sock.recv_into(cipher)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._abort(exc)
                return
            if n == 0:
                self._incoming.write_eof()
                self._decrypt(eof=True)
                return
            self._incoming.write(cipher[:n])
            self._decrypt(eof=False)
            if self._closed:
                return
            if self._receiver.tls_yield():
                # A flood of cheap frames: small reads from now on, and let the others run
                # (the socket stays readable: the loop calls back after them).
                self._read_size = THROTTLED_READ
                return
            self._read_size = RECEIVE_BUFFER_SIZE
            if n < len(cipher) or self._read_paused:
                return
        self._loop.call_soon(self._on_readable)

    def _decrypt(self, eof: bool) -> None:
        obj = self._obj
        shared = receive_buffer()
        view = shared.view
        filled = 0
        while not self._closed and not self._read_paused:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                n = cast(int, obj.read(RECEIVE_BUFFER_SIZE - filled, view[filled:]))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLError, OSError) as exc:
                if filled:
                    self._receiver.tls_data(view[:filled])
                self._abort(None if isinstance(exc, ssl.SSLEOFError) and eof else exc)
                return
            if n == 0:  # close_notify
                eof = True
                break
            filled += n
            if filled == RECEIVE_BUFFER_SIZE:
                self._receiver.tls_data(view)
                view = shared.view
                filled = 0
        if filled:
            self._receiver.tls_data(view[:filled])
        if self._outgoing.pending:  # the read produced records to send (a key update)
            self._flush()
        if eof and not self._closed:
            self._abort(None)

    def pause_reading(self) -> None:
        if not self._read_paused and not self._closed:
            self._read_paused = True
            self._loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if self._read_paused and not self._closed:
            self._read_paused = False
            self._loop.add_reader(self.fd, self._on_readable)
            if self._incoming.pending or self._obj.pending():
                self._loop.call_soon(self._decrypt, False)

    # ------------------------------------------------------------------------ writing

    def write_chunks(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Encrypt frames and send the records in one go; small frames are joined first so
        they share a TLS record."""
        if self._closed or not chunks:
            return
        obj = self._obj
        try:
            if len(chunks) == 1:
                obj.write(chunks[0])
            elif sum(len(c) for c in chunks) <= JOIN_LIMIT:
                obj.write(b"".join(chunks))
            else:
                for chunk in chunks:
                    obj.write(chunk)
        except (ssl.SSLError, OSError) as exc:
            self._abort(exc)
            return
        self._flush()

    def write(self, data: bytes | memoryview) -> None:
        self.write_chunks((data,))

    def _flush(self) -> None:
        out = self._outgoing.read()
        if not out:
            return
        self.queued_total += len(out)
        if self._pending:
            self._pending += out
            self._check_high_water()
            return
        try:
            sent = self._sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._abort(exc)
            return
        self.sent_total += sent
        if sent < len(out):
            self._pending += memoryview(out)[sent:]
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
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort(exc)
            return
        del self._pending[:sent]
        self.sent_total += sent
        if not self._pending:
            self._writer_on = False
            self._loop.remove_writer(self.fd)
        if self._over_high_water and len(self._pending) <= WRITE_LOW_WATER:
            self._over_high_water = False
            self._receiver.tls_writable()

    # ------------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close after trying to send what is queued (bounded: no waiting for a slow peer)."""
        if self._closed:
            return
        with contextlib.suppress(ssl.SSLError, OSError):
            self._obj.unwrap()
        sent_all = False
        with contextlib.suppress(ssl.SSLError, OSError):
            self._pending += self._outgoing.read()
            if self._pending:
                sent = self._sock.send(self._pending)
                del self._pending[:sent]
            sent_all = not self._pending
        if not sent_all:
            self._abort(None)  # the peer does not read: nothing to wait for
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._abort(None)
            return
        self._abort(None, keep_socket=True)
        _linger(self._loop, self._sock)

    def _abort(self, exc: BaseException | None, keep_socket: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.fd)
        if self._writer_on:
            self._loop.remove_writer(self.fd)
        self._pending = bytearray()
        if not keep_socket:
            with contextlib.suppress(OSError):
                self._sock.close()
        receiver = self._receiver
        self._loop.call_soon(receiver.tls_closed, exc)
