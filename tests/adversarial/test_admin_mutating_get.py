"""State-changing admin endpoints answer only POST, as ztunnel's and Envoy's admin do.

`GET /logging?level=off` used to change the levels: any GET (a crawler, a browser prefetch, a
misdirected scrape, a request smuggled through something that only allows GET) could silence
the access log. Now a GET or HEAD that would change state is answered 405 and changes nothing;
`GET /logging` without parameters still shows the levels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import pytest

from ztagent.telemetry.admin import LogLevels, build_admin_server

pytestmark = pytest.mark.integration


@pytest.fixture
def restore_levels() -> Iterator[None]:
    names = ["", "ztagent", "ztagent.access"]
    saved = {n: logging.getLogger(n or None).level for n in names}
    try:
        yield
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n or None).setLevel(lvl)


async def _request(addr: tuple[str, int], method: str, target: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_state_changes_need_post(restore_levels: None) -> None:
    shutdowns: list[int] = []

    async def main() -> None:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("ztagent.access").setLevel(logging.INFO)
        server = build_admin_server(dict, lambda: shutdowns.append(1), LogLevels())
        addr = await server.start("127.0.0.1", 0)
        try:
            for method in ("GET", "HEAD"):
                for target in (
                    "/logging?level=off",
                    "/logging?level=ztagent.access=off",
                    "/logging?reset",
                    "/quitquitquit",
                ):
                    status, _ = await _request(addr, method, target)
                    assert status == 405, (method, target)
            assert logging.getLogger().level == logging.INFO
            assert logging.getLogger("ztagent.access").level == logging.INFO
            assert shutdowns == []

            status, body = await _request(addr, "GET", "/logging")
            assert status == 200 and body.startswith(b"current log level is ")
            assert logging.getLogger("ztagent.access").level == logging.INFO

            status, body = await _request(addr, "POST", "/logging?level=ztagent.access=off")
            assert status == 200 and b"ztagent.access=off" in body
            assert not logging.getLogger("ztagent.access").isEnabledFor(logging.CRITICAL)
            assert (await _request(addr, "POST", "/quitquitquit"))[0] == 200
            assert shutdowns == [1]
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 20))
