"""`ztagent hbone serve|connect`: the HBONE tunnel by hand, like `nc` through mTLS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from ztagent.errors import LocalError, ZtagentError
from ztagent.hbone.client import HboneClient, Tunnel, expected
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.frames import parse_authority
from ztagent.hbone.pool import MAX_STREAMS_PER_CONNECTION
from ztagent.hbone.server import HboneServer
from ztagent.hbone.tls import TlsConfig

log = logging.getLogger(__name__)


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_authority(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert", required=True, help="PEM certificate chain, leaf first")
    parser.add_argument("--key", required=True, help="PEM private key of the leaf")
    parser.add_argument("--ca", required=True, help="PEM trust roots the peer must chain to")
    parser.add_argument(
        "--tls12", action="store_true", help="also allow TLS 1.2 (default: TLS 1.3 only)"
    )


def register(sub: Any) -> None:
    hbone = sub.add_parser(
        "hbone",
        help="HBONE tunnels by hand (HTTP/2 CONNECT over mutual TLS)",
        description="Serve or open HBONE tunnels: HTTP/2 CONNECT streams over mutual TLS 1.3 "
        "with SPIFFE identities, as Istio ambient's node proxies speak on port 15008.",
    )
    verbs = hbone.add_subparsers(dest="verb", metavar="VERB", required=True)

    serve = verbs.add_parser(
        "serve",
        help="accept HBONE and connect each CONNECT to its :authority",
        description="Accept mTLS HBONE connections; every CONNECT is connected to its "
        ":authority (ip:port) and relayed. Clients must present a certificate chaining to "
        "--ca with a SPIFFE identity in the server's trust domain.",
    )
    serve.add_argument("--listen", required=True, type=_address, metavar="IP:PORT")
    _add_tls_flags(serve)
    serve.set_defaults(handler=run_serve)

    connect = verbs.add_parser(
        "connect",
        help="open a tunnel: stdin/stdout, or forward a local port",
        description="Tunnel to --target through the HBONE server at --via. Without --listen, "
        "stdin and stdout are the tunnel (like nc); with --listen, every accepted TCP "
        "connection becomes a new CONNECT stream over one pooled HBONE connection.",
    )
    connect.add_argument(
        "--via",
        required=True,
        type=_address,
        metavar="IP:PORT",
        help="the HBONE server (usually port 15008)",
    )
    connect.add_argument(
        "--target",
        required=True,
        type=_address,
        metavar="IP:PORT",
        help="where the tunnel leads (the CONNECT :authority)",
    )
    connect.add_argument(
        "--expect-identity",
        action="append",
        default=[],
        metavar="SPIFFE_ID",
        help="accept only a server with this identity (repeatable)",
    )
    connect.add_argument(
        "--listen",
        type=_address,
        metavar="IP:PORT",
        help="forward connections accepted here instead of stdin/stdout",
    )
    connect.add_argument(
        "--max-streams",
        type=int,
        default=MAX_STREAMS_PER_CONNECTION,
        metavar="N",
        help="tunnels per pooled HBONE connection before another is opened "
        f"(default {MAX_STREAMS_PER_CONNECTION}, capped by the server's limit)",
    )
    _add_tls_flags(connect)
    connect.set_defaults(handler=run_connect)


def _tls(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig.from_files(args.cert, args.key, args.ca, allow_tls12=args.tls12)


def _run(coro: Any) -> int:
    import uvloop

    try:
        result: int = uvloop.run(coro)
    except ZtagentError as exc:
        print(f"ztagent: error: {exc}", file=sys.stderr)
        return 1
    return result


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_serve(args: argparse.Namespace) -> int:
    tls = _tls(args)

    async def main() -> int:
        server = HboneServer(tls)
        host, port = await server.listen(*args.listen)
        print(f"HBONE server on {host}:{port} as {tls.identity}", file=sys.stderr, flush=True)
        await _wait_for_signal()
        await server.drain(timeout=5.0)
        return 0

    return _run(main())


def run_connect(args: argparse.Namespace) -> int:
    tls = _tls(args)
    tunnel = Tunnel(
        via=args.via, target=args.target, expected_identities=expected(args.expect_identity)
    )
    if args.listen is None:
        return _run(_connect_stdio(HboneClient(tls), tunnel))
    return _run(_forward(HboneClient(tls, max_streams=args.max_streams), tunnel, args.listen))


async def _forward(client: HboneClient, tunnel: Tunnel, listen: tuple[str, int]) -> int:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def open_tunnel(leg: TcpLeg) -> None:
        peer = leg.transport.get_extra_info("peername") if leg.transport else None
        try:
            await client.open(
                leg,
                Tunnel(
                    via=tunnel.via,
                    target=tunnel.target,
                    expected_identities=tunnel.expected_identities,
                    source=tuple(peer[:2]) if peer else None,
                ),
            )
        except ZtagentError as exc:
            log.warning("tunnel for %s failed: %s", peer, exc)
            leg.abort()

    class ForwardedLeg(TcpLeg):
        __slots__ = ()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            task = loop.create_task(open_tunnel(self))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    try:
        server = await loop.create_server(ForwardedLeg, *listen, backlog=1024, reuse_address=True)
    except OSError as exc:
        raise LocalError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}") from None
    bound = server.sockets[0].getsockname()
    print(
        f"forwarding {bound[0]}:{bound[1]} -> {tunnel.authority} via "
        f"{tunnel.via[0]}:{tunnel.via[1]} as {client.tls.identity}",
        file=sys.stderr,
        flush=True,
    )
    await _wait_for_signal()
    server.close()
    client.close()
    return 0


async def _connect_stdio(client: HboneClient, tunnel: Tunnel) -> int:
    """stdin/stdout become the app side of one tunnel, through a socket pair."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    leg = TcpLeg()
    await loop.create_connection(lambda: leg, sock=ours)
    try:
        conn = await client.open(leg, tunnel)
    except BaseException:
        theirs.close()
        client.close()
        raise
    print(
        f"tunnel to {tunnel.authority} via {tunnel.via[0]}:{tunnel.via[1]} open; server is "
        f"{conn.info.peer_identity}",
        file=sys.stderr,
        flush=True,
    )
    done = asyncio.Event()
    theirs.setblocking(True)

    def pump_in() -> None:
        with contextlib.suppress(OSError):
            stdin = sys.stdin.fileno()
            while chunk := os.read(stdin, 65536):
                theirs.sendall(chunk)
        with contextlib.suppress(OSError):
            theirs.shutdown(socket.SHUT_WR)

    def pump_out() -> None:
        out = sys.stdout.buffer
        with contextlib.suppress(OSError):
            while chunk := theirs.recv(262144):
                out.write(chunk)
                out.flush()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=pump_in, daemon=True).start()
    threading.Thread(target=pump_out, daemon=True).start()
    await done.wait()
    theirs.close()
    client.close()
    return 0
