"""In-process tunnel ends: a real HBONE server hands CONNECTs to asyncio streams through a pipe,
and a real HBONE client tunnels an in-process stream; real TLS and HTTP/2 on loopback."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from ztagent.hbone.client import HboneClient, Tunnel
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.server import HboneServer, InboundRequest, Serve
from ztagent.hbone.tls import TlsConfig
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.spiffe import Identity
from ztagent.waypoint.pipe import leg_streams

pytestmark = pytest.mark.integration

SERVER = Identity.parse("spiffe://cluster.local/ns/demo/sa/waypoint")
CLIENT = Identity.parse("spiffe://cluster.local/ns/demo/sa/client")


async def _serve_sha(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, answer the byte count and sha256, close."""
    digest = hashlib.sha256()
    total = 0
    while chunk := await reader.read(65536):
        digest.update(chunk)
        total += len(chunk)
        await asyncio.sleep(0)  # a slow consumer: backpressure must hold the sender
    writer.write(f"{total} {digest.hexdigest()}\n".encode())
    await writer.drain()
    writer.close()


async def _tunnel_streams(
    client: HboneClient, address: tuple[str, int]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    leg = TcpLeg()
    reader, writer = leg_streams(leg, asyncio.get_running_loop())
    await client.open(
        leg, Tunnel(via=address, target=("10.0.0.1", 80), expected_identities=frozenset({SERVER}))
    )
    return reader, writer


def test_streams_through_pipes_on_both_tunnel_ends(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca", "cluster.local")
    server_tls = TlsConfig(ca.issue(SERVER))
    client_tls = TlsConfig(ca.issue(CLIENT))
    seen: list[InboundRequest] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handlers: set[asyncio.Task[None]] = set()

        def decide(request: InboundRequest) -> Serve:
            seen.append(request)

            def serve(leg: TcpLeg) -> None:
                reader, writer = leg_streams(leg, loop)
                task = loop.create_task(_serve_sha(reader, writer))
                handlers.add(task)
                task.add_done_callback(handlers.discard)

            return Serve(serve)

        server = HboneServer(server_tls, decide)
        address = await server.listen("127.0.0.1", 0)
        client = HboneClient(client_tls)
        try:
            payload = bytes(range(256)) * 4096 * 8  # 8 MiB
            results = []
            for _ in range(3):  # several tunnels over the pooled connection
                reader, writer = await _tunnel_streams(client, address)
                for i in range(0, len(payload), 100_000):
                    writer.write(payload[i : i + 100_000])
                    await writer.drain()
                writer.write_eof()
                line = await asyncio.wait_for(reader.readline(), 20)
                results.append(line.decode().split())
                writer.close()
            expected = [str(len(payload)), hashlib.sha256(payload).hexdigest()]
            assert results == [expected] * 3
            assert len(client.pool.connections()) == 1
            assert {r.peer_identity for r in seen} == {CLIENT}
            assert {r.authority for r in seen} == {"10.0.0.1:80"}
        finally:
            client.close()
            server.close()
            for task in handlers:
                task.cancel()

    asyncio.run(asyncio.wait_for(main(), 60))
