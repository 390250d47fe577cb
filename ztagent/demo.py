"""The ztagent demo: an HBONE tunnel end to end on 127.0.0.1, in one process.

Everything is real: a CA issues SPIFFE certificates; an HTTP client talks to a local forwarder
(as `ztagent hbone connect --listen`) that carries each connection as an HTTP/2 CONNECT stream
over mutual TLS 1.3 to an HBONE server (as `ztagent hbone serve`, plus a policy hook), which
connects to the app. Between the two HBONE ends sits a tap, a TCP relay that records the wire.
Each check prints one PASS/FAIL line; the exit code is 0 only when all of them pass:

  1. a CA issues client and server SPIFFE identities
  2. an HTTP app server answers on 127.0.0.1
  3. the HBONE server listens, with the tap in front of it
  4. HTTP GET through the tunnel: the identities each side verified, the CONNECT headers
  5. the tap saw TLS records only: no request, response or identity in plaintext
  6. policy: a CONNECT to the forbidden port is refused with 401
  7. a client expecting another server identity rejects the server; no tunnel is opened
  8. a client certificate from an unknown CA cannot connect
  9. 50 concurrent GETs all succeed over one pooled HBONE connection (one TCP connection)

With --keep DIR, the CA (istiod `cacerts` layout) and the two certificates stay in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from ztagent.errors import ZtagentError
from ztagent.hbone.client import HboneClient, Tunnel, TunnelFailed, TunnelRefused
from ztagent.hbone.connection import HboneConnection, TcpLeg
from ztagent.hbone.server import Allow, Deny, HboneServer, InboundRequest
from ztagent.hbone.tls import PeerRejected, TlsConfig
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity

CLIENT_ID = Identity.parse("spiffe://cluster.local/ns/demo/sa/client")
SERVER_ID = Identity.parse("spiffe://cluster.local/ns/demo/sa/server")
OTHER_ID = Identity.parse("spiffe://cluster.local/ns/demo/sa/other")
REQUEST = b"GET / HTTP/1.1\r\nHost: app.demo\r\nConnection: close\r\n\r\n"
OK = "HTTP/1.1 200 OK"
GREETING = "hello from the app"
CONCURRENT = 50
STEP_TIMEOUT = 30.0
RECORD_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}

Address = tuple[str, int]
Result = tuple[bool, str, list[str]]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def show(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


class Loopback:
    """Every server, stream and task the demo starts; `close` ends them all."""

    def __init__(self) -> None:
        self.closers: list[Callable[[], object]] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, handler: Handler) -> Address:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.add(writer)
            try:
                await handler(reader, writer)
            except (OSError, EOFError, TimeoutError, asyncio.LimitOverrunError):
                pass
            finally:
                self.writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        self.closers.append(server.close)
        return address_of(server)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        for writer in list(self.writers):
            writer.close()
        for task in list(self.tasks):
            task.cancel()


def address_of(server: asyncio.AbstractServer) -> Address:
    host, port = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    return str(host), int(port)


async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The app: answers one HTTP/1.1 request, naming the peer address it saw."""
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
    body = f"{GREETING}; it saw a connection from {show(writer.get_extra_info('peername'))}"
    writer.write(f"{OK}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
    await writer.drain()


async def http_get(address: Address) -> tuple[str, str]:
    """GET / at `address`: the status line and the body."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(REQUEST)
        response = await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode() or "no response", body.decode()


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: bytearray) -> None:
    """Relay and record until EOF (or until the streams are closed), then pass the EOF on."""
    try:
        while chunk := await reader.read(65536):
            log += chunk
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


def tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records `data` is made of; [0] where it is not TLS."""
    types: list[int] = []
    offset = 0
    while offset + 5 <= len(data):
        if data[offset] not in RECORD_TYPES or data[offset + 1] != 3:
            return [*types, 0]
        types.append(data[offset])
        offset += 5 + int.from_bytes(data[offset + 3 : offset + 5], "big")
    return types


class ForwardedLeg(TcpLeg):
    """A connection accepted by the forwarder: it opens its own tunnel once accepted."""

    __slots__ = ("demo",)

    def __init__(self, demo: Demo) -> None:
        super().__init__()
        self.demo = demo

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.demo.net.spawn(self.demo.forward(self))


async def try_tunnel(client: HboneClient, tunnel: Tunnel) -> HboneConnection:
    """Open one tunnel whose app side is a socket pair, and close it again at once."""
    ours, theirs = socket.socketpair()
    leg = TcpLeg()
    try:
        try:
            await asyncio.get_running_loop().create_connection(lambda: leg, sock=ours)
        except BaseException:
            ours.close()  # otherwise the transport owns it
            raise
        return await client.open(leg, tunnel)
    finally:
        leg.abort()
        theirs.close()


class Demo:
    ca: CertificateAuthority
    client_cert: WorkloadCertificate
    server_cert: WorkloadCertificate
    app: Address
    forbidden: Address
    hbone: Address
    tap: Address
    client: HboneClient
    tunnel: Tunnel
    forwarder: Address

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.net = Loopback()
        self.seen: list[InboundRequest] = []  # every CONNECT the HBONE server decided
        self.denied: list[InboundRequest] = []
        self.wire: list[tuple[bytearray, bytearray]] = []  # per tap connection: sent, received
        self.last_tunnel: HboneConnection | None = None
        self.forward_errors: list[str] = []

    def decide(self, request: InboundRequest) -> Allow | Deny:
        self.seen.append(request)
        if request.target == self.forbidden or request.peer_identity != CLIENT_ID:
            self.denied.append(request)
            return Deny(401, "RBAC: access denied")
        return Allow(request.target)

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The tap: copies bytes both ways between client and HBONE server, keeping them."""
        self.wire.append((sent := bytearray(), received := bytearray()))
        up_reader, up_writer = await asyncio.open_connection(*self.hbone)
        self.net.writers.add(up_writer)
        try:
            await asyncio.gather(copy(reader, up_writer, sent), copy(up_reader, writer, received))
        finally:
            up_writer.close()

    async def forward(self, leg: TcpLeg) -> None:
        """What `ztagent hbone connect --listen` does for each accepted connection."""
        peer = leg.transport.get_extra_info("peername") if leg.transport else None
        tunnel = dataclasses.replace(self.tunnel, source=(peer[0], peer[1]) if peer else None)
        try:
            self.last_tunnel = await self.client.open(leg, tunnel)
        except BaseException as exc:
            leg.abort()
            if not isinstance(exc, ZtagentError):
                raise
            self.forward_errors.append(str(exc))

    async def run(self) -> int:
        steps = [self.step_ca, self.step_app, self.step_hbone, self.step_get, self.step_wire]
        steps += [self.step_policy, self.step_identity, self.step_trust, self.step_pool]
        failed: list[int] = []
        try:
            for number, step in enumerate(steps, 1):
                name = (step.__doc__ or step.__name__).strip()
                result: Result = (False, f"{name}: not run (set-up failed)", [])
                if not failed or failed[0] > 3:
                    try:
                        result = await asyncio.wait_for(step(), STEP_TIMEOUT)
                    except Exception as exc:
                        result = (
                            False,
                            f"{name}: {type(exc).__name__}: {str(exc) or 'timed out'}",
                            [],
                        )
                ok, line, details = result
                if errors := self.forward_errors:
                    details.append(f"forwarder: {len(errors)} tunnel(s) failed: {errors[0]}")
                    errors.clear()
                print(f"[{'PASS' if ok else 'FAIL'}] {number}. {line}")
                print("".join(f"       {detail}\n" for detail in details), end="")
                if not ok:
                    failed.append(number)
        finally:
            self.net.close()
        failures = f"; failed: {', '.join(map(str, failed))}" if failed else ""
        print(f"{len(steps) - len(failed)}/{len(steps)} checks passed{failures}")
        return len(failed)

    async def step_ca(self) -> Result:
        """CA and identities"""
        self.ca = CertificateAuthority.create(self.workdir / "ca", DEFAULT_TRUST_DOMAIN)
        self.client_cert, self.server_cert = self.ca.issue(CLIENT_ID), self.ca.issue(SERVER_ID)
        details = []
        for name, cert in (("client", self.client_cert), ("server", self.server_cert)):
            cert.write(self.workdir / f"{name}-cert.pem", self.workdir / f"{name}-key.pem")
            details.append(f"{cert.identity}  expires {cert.not_after:%Y-%m-%d %H:%M} UTC")
        (self.workdir / "root-cert.pem").write_bytes(self.ca.roots_pem)
        ok = (self.client_cert.identity, self.server_cert.identity) == (CLIENT_ID, SERVER_ID)
        return ok, f"CA for trust domain {self.ca.trust_domain} issued 2 identities", details

    async def step_app(self) -> Result:
        """app server"""
        self.app, self.forbidden = await self.net.serve(app), await self.net.serve(app)
        status, body = await http_get(self.app)
        line = f"app on {show(self.app)} (and a forbidden one on {show(self.forbidden)})"
        return status == OK, line, [f"direct GET: {status} | {body}"]

    async def step_hbone(self) -> Result:
        """HBONE server and tap"""
        server = HboneServer(TlsConfig(self.server_cert), decide=self.decide)
        self.net.closers.append(server.close)
        self.hbone = await server.listen("127.0.0.1", 0)
        self.tap = await self.net.serve(self.relay)
        policy = f"policy: allow {CLIENT_ID}; CONNECT to port {self.forbidden[1]} -> 401"
        tap = f"tap on {show(self.tap)} relays to {show(self.hbone)}, recording both ways"
        return True, f"HBONE server on {show(self.hbone)} as {SERVER_ID}", [policy, tap]

    async def step_get(self) -> Result:
        """HTTP GET through the tunnel"""
        self.client = HboneClient(TlsConfig(self.client_cert))
        self.net.closers.append(self.client.close)
        self.tunnel = Tunnel(self.tap, self.app, frozenset({SERVER_ID}))
        server = await asyncio.get_running_loop().create_server(
            lambda: ForwardedLeg(self), "127.0.0.1", 0
        )
        self.net.closers.append(server.close)
        self.forwarder = address_of(server)
        status, body = await http_get(self.forwarder)
        verified = self.last_tunnel.info.peer_identity if self.last_tunnel else None
        request = self.seen[-1]
        forwarded, traceparent = request.header("forwarded"), request.header("traceparent")
        ok = status == OK and body.startswith(GREETING) and bool(forwarded and traceparent)
        ok = ok and verified == SERVER_ID and request.peer_identity == CLIENT_ID
        line = f"GET / via forwarder {show(self.forwarder)} -> tap -> HBONE -> app: {status}"
        return ok, line, [
            f"body: {body}",
            f"client verified the server as {verified}",
            f"server verified the client as {request.peer_identity}",
            f"CONNECT {request.authority}  forwarded: {forwarded}",
            f"traceparent: {traceparent}",
        ]  # fmt: skip

    async def step_wire(self) -> Result:
        """what the tap saw"""
        secrets = [REQUEST.split(b"\r\n")[0], OK.encode(), GREETING.encode(), b"spiffe://"]
        ok, details = True, list[str]()
        for name, data in zip(("to server", "to client"), self.wire[0], strict=True):
            types = tls_records(bytes(data))
            after = types[types.index(23) :] if 23 in types else [0]
            ok = ok and types[0] == 22 and set(after) == {23}
            ok = ok and not any(secret in data for secret in secrets)
            counts = ", ".join(f"{n} {RECORD_TYPES.get(t, '?')}" for t, n in Counter(types).items())
            details.append(f"{name}: {len(data)} bytes, first {data[:5].hex(' ')}: {counts}")
        details.append("no " + ", ".join(repr(s.decode()) for s in secrets) + " in either")
        return ok, "the wire carried TLS records only, no plaintext", details

    async def step_policy(self) -> Result:
        """policy"""
        tunnel = dataclasses.replace(self.tunnel, target=self.forbidden)
        try:
            await try_tunnel(self.client, tunnel)
        except TunnelRefused as exc:
            ok = exc.code == 401 and bool(self.denied) and self.denied[-1].target == self.forbidden
            hook = ["the decide hook answered Deny(401, 'RBAC: access denied')"] if ok else []
            return ok, f"CONNECT {tunnel.authority}: TunnelRefused, code {exc.code}", hook
        return False, f"CONNECT {tunnel.authority} was allowed", []

    async def step_identity(self) -> Result:
        """server identity check"""
        seen = len(self.seen)
        try:
            await try_tunnel(self.client, Tunnel(self.hbone, self.app, frozenset({OTHER_ID})))
        except PeerRejected as exc:
            ok = len(self.seen) == seen and len(self.client.pool.connections()) == 1
            detail = "no CONNECT was sent; the pool still holds just 1 connection"
            return ok, f"client expecting {OTHER_ID}: PeerRejected", [str(exc), detail]
        return False, "a tunnel opened to an unexpected server identity", []

    async def step_trust(self) -> Result:
        """trust roots"""
        other = CertificateAuthority.create(self.workdir / "other-ca", DEFAULT_TRUST_DOMAIN)
        # The same SPIFFE id, trusting our server, but signed by a CA our server does not know.
        cert = dataclasses.replace(other.issue(CLIENT_ID), roots_pem=self.ca.roots_pem)
        client = HboneClient(TlsConfig(cert))
        self.net.closers.append(client.close)
        seen = len(self.seen)
        try:
            await try_tunnel(client, Tunnel(self.hbone, self.app, frozenset({SERVER_ID})))
        except (TunnelFailed, PeerRejected) as exc:
            line = f"{CLIENT_ID} signed by another CA: {type(exc).__name__}"
            why = "the server's TLS handshake refused the certificate; no CONNECT was decided"
            return len(self.seen) == seen, line, [str(exc), why]
        return False, "a client certificate from an unknown CA was accepted", []

    async def step_pool(self) -> Result:
        """pooling"""
        seen, start = len(self.seen), time.monotonic()
        gets = (http_get(self.forwarder) for _ in range(CONCURRENT))
        results = await asyncio.gather(*gets, return_exceptions=True)
        elapsed = time.monotonic() - start
        good = sum(1 for r in results if isinstance(r, tuple) and r[0] == OK)
        pooled, taps = len(self.client.pool.connections()), len(self.wire)
        peers = {r.peer_address for r in self.seen[seen:]}
        ok = good == CONCURRENT and pooled == 1 and taps == 1 and len(peers) == 1
        return ok, f"{good}/{CONCURRENT} concurrent GETs 200 OK in {elapsed:.2f} s", [
            f"client pool: {pooled} HBONE connection; tap: {taps} TCP connection in all",
            f"HBONE server: {len(self.seen) - seen} CONNECTs, from {len(peers)} peer address",
        ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keep", metavar="DIR", help="keep the CA and certificates in DIR")
    args = parser.parse_args(argv)
    if args.keep:
        workdir = Path(args.keep)
        if workdir.exists() and any(workdir.iterdir()):
            parser.error(f"--keep {workdir}: the directory must be empty or absent")
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="ztagent-demo-"))
    print("ztagent demo: an HBONE tunnel end to end on 127.0.0.1 (uvloop, real sockets and TLS)")
    try:
        failed: int = uvloop.run(Demo(workdir).run())
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.keep:
        print(f"CA and certificates kept in {workdir}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
