"""The reference Python relay pair: plaintext in, mutual TLS 1.3 between the two relays.

    client --TCP--> entry relay --mTLS--> exit relay --TCP--> target

    python -m benchmarks.tls_relay entry --listen H:P --connect EXIT_H:EXIT_P CERT_OPTIONS
    python -m benchmarks.tls_relay exit --listen H:P --connect TARGET_H:TARGET_P CERT_OPTIONS

CERT_OPTIONS are ``--cert C --key K --ca CA``; both sides require and verify the peer's
certificate.

One TLS connection per relayed connection. The data path is what a fast asyncio relay can do:
uvloop, ``asyncio.BufferedProtocol`` reading into one 256 KiB buffer shared by every connection
of the process (replaced by a fresh one whenever a transport keeps a reference to unsent data),
and back-pressure by pausing reading on one leg while the other leg's write buffer is full.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from typing import cast

from benchmarks.common import parse_hostport, raise_nofile_limit, run_server_forever

log = logging.getLogger("tls_relay")

BUFFER_SIZE = 256 * 1024
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024


class SharedBuffer:
    """The process-wide receive buffer."""

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))

    def replace(self) -> None:
        self.view = memoryview(bytearray(self.size))


class Leg(asyncio.BufferedProtocol):
    """One side of a relayed connection; ``peer`` is the other side."""

    def __init__(self, shared: SharedBuffer) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.shared.view

    def buffer_updated(self, nbytes: int) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return
        out = peer.transport
        out.write(self.shared.view[:nbytes])
        if out.get_write_buffer_size():
            # The transport may hold a view of the shared buffer until it is sent.
            self.shared.replace()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return False
        assert self.transport is not None
        if peer.eof or not peer.transport.can_write_eof() or not self.transport.can_write_eof():
            peer.transport.close()
            return False
        peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


class Downstream(Leg):
    """The accepted leg: holds what arrives until the upstream leg is connected."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay.shared)
        self.relay = relay
        self.pending: list[bytes] = []
        self.pending_eof = False

    def buffer_updated(self, nbytes: int) -> None:
        if self.peer is None:
            self.pending.append(bytes(self.shared.view[:nbytes]))
            if self.transport is not None:
                self.transport.pause_reading()
            return
        super().buffer_updated(nbytes)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.pending_eof = True
            return True
        return super().eof_received()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        relay = self.relay
        task = asyncio.get_running_loop().create_task(relay.connect(self))
        relay.tasks.add(task)
        task.add_done_callback(relay.tasks.discard)


class Relay:
    """Accepts connections (plaintext or TLS) and relays each to a new upstream connection."""

    def __init__(
        self,
        upstream: tuple[str, int],
        upstream_ssl: ssl.SSLContext | None,
    ) -> None:
        self.upstream = upstream
        self.upstream_ssl = upstream_ssl
        self.shared = SharedBuffer()
        self.tasks: set[asyncio.Task[None]] = set()

    def accepted(self) -> Downstream:
        return Downstream(self)

    async def connect(self, down: Downstream) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.upstream
        try:
            if self.upstream_ssl is not None:
                _, up = await loop.create_connection(
                    lambda: Leg(self.shared),
                    host,
                    port,
                    ssl=self.upstream_ssl,
                    server_hostname=host,
                )
            else:
                _, up = await loop.create_connection(lambda: Leg(self.shared), host, port)
        except (OSError, ssl.SSLError) as exc:
            log.warning("upstream %s:%d: %s", host, port, exc)
            if down.transport is not None:
                down.transport.close()
            return
        assert down.transport is not None and up.transport is not None
        if down.lost or down.transport.is_closing():
            up.transport.close()
            return
        down.peer, up.peer = up, down
        if down.pending:
            up.transport.writelines(down.pending)
            down.pending.clear()
        if down.pending_eof:
            if not down.eof_received():
                down.transport.close()
        else:
            down.transport.resume_reading()


def tls_context(server: bool, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(
    role: str,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    cert: str,
    key: str,
    ca: str,
) -> None:
    loop = asyncio.get_running_loop()
    if role == "entry":
        relay = Relay(upstream, tls_context(False, cert, key, ca))
        server_ssl = None
    else:
        relay = Relay(upstream, None)
        server_ssl = tls_context(True, cert, key, ca)
    server = await loop.create_server(
        relay.accepted, listen[0], listen[1], ssl=server_ssl, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["entry", "exit"])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the next hop")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    raise_nofile_limit(65536)
    run_server_forever(
        serve(
            args.role,
            parse_hostport(args.listen),
            parse_hostport(args.connect),
            args.cert,
            args.key,
            args.ca,
        ),
        args.max_seconds,
    )


if __name__ == "__main__":
    main()
