"""The benchmark's target for request/response tests: a uvloop TCP echo server.

Every byte received is sent back; a connection closes when the client closes it.

    python -m benchmarks.echo_server --listen 127.0.0.1:PORT [--max-seconds 3600]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from benchmarks.common import parse_hostport, raise_nofile_limit, run_server_forever


class Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    raise_nofile_limit(65536)
    host, port = parse_hostport(args.listen)
    run_server_forever(serve(host, port), args.max_seconds)


if __name__ == "__main__":
    main()
