"""The hitless-upgrade exchange on a real Unix socket: who takes over, and what a bad peer gets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztagent.node import handover


def short_dir(tmp_path: Path) -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path("/tmp") / f"zt-ho-{os.getpid()}-{abs(hash(tmp_path)) % 10**6}"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    directory = short_dir(tmp_path)
    path = directory / "agent.handover"
    yield path
    path.unlink(missing_ok=True)
    directory.rmdir()


def test_no_predecessor_without_a_listening_socket(sock_path: Path) -> None:
    assert not handover.predecessor(sock_path)
    sock_path.write_text("not a socket")
    assert not handover.predecessor(sock_path)
    sock_path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # bound, never listening: what a killed agent leaves
    stale.close()
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    assert not handover.predecessor(sock_path)


def test_takeover_runs_the_handover_once_and_the_successor_takes_the_path(
    sock_path: Path,
) -> None:
    async def main() -> None:
        calls: list[str] = []

        async def on_takeover() -> None:
            calls.append("released")

        old = handover.HandoverServer(sock_path, on_takeover)
        await old.start()
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        assert await asyncio.to_thread(handover.predecessor, sock_path)
        await handover.request_takeover(sock_path)
        assert calls == ["released"]
        assert old.handed_over
        with pytest.raises(handover.HandoverError, match="already handed over"):
            await handover.request_takeover(sock_path)
        assert calls == ["released"]

        new = handover.HandoverServer(sock_path, on_takeover)
        await new.start()  # replaces the predecessor's socket file
        await old.close()  # handed over: leaves the successor's path alone
        assert sock_path.exists()
        assert await asyncio.to_thread(handover.predecessor, sock_path)
        await new.close()  # never handed over: removes its own path
        assert not sock_path.exists()

    asyncio.run(main())


def test_a_bad_request_is_refused_and_changes_nothing(sock_path: Path) -> None:
    async def main() -> None:
        calls: list[str] = []

        async def on_takeover() -> None:
            calls.append("released")

        server = handover.HandoverServer(sock_path, on_takeover)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        writer.write(b"GET / HTTP/1.1\n")
        assert (await reader.readline()).startswith(b"BUSY")
        writer.close()
        assert calls == [] and not server.handed_over
        await server.close()

    asyncio.run(main())


def test_a_silent_peer_is_dropped(sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handover, "HANDSHAKE_TIMEOUT", 0.2)

    async def main() -> None:
        async def on_takeover() -> None:
            raise AssertionError("a silent peer must not take over")

        server = handover.HandoverServer(sock_path, on_takeover)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        assert await asyncio.wait_for(reader.read(), timeout=5.0) == b""  # closed on us
        writer.close()
        await server.close()

    asyncio.run(main())


def test_request_without_an_agent_fails_clearly(sock_path: Path) -> None:
    with pytest.raises(handover.HandoverError, match="cannot reach the running agent"):
        asyncio.run(handover.request_takeover(sock_path, timeout=1.0))


def test_an_overlong_line_is_dropped_without_a_takeover(sock_path: Path) -> None:
    async def main() -> None:
        async def on_takeover() -> None:
            raise AssertionError("an overlong request must not take over")

        server = handover.HandoverServer(sock_path, on_takeover)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        writer.write(b"T" * (handover.MAX_LINE * 8))
        assert await asyncio.wait_for(reader.read(), timeout=5.0) in (
            b"",
            b"BUSY unknown request\n",
        )
        writer.close()
        assert not server.handed_over
        await server.close()

    asyncio.run(main())
