"""Fuzz targets for what peers send on the wire: HBONE (HTTP/2 frames, HPACK header blocks,
the CONNECT header list, `forwarded`), SOCKS5, xDS resources, trace context and JWTs.

Each `fuzz_<name>(data: bytes) -> None` returns when the parser either produced a value or
refused the input with its documented error; any other exception escapes and is the finding.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import typing
from pathlib import Path
from typing import Any

import h11
import hpack
import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError
from jwt.algorithms import ECAlgorithm

from ztagent.errors import LocalError
from ztagent.fields import Invalid
from ztagent.hbone import events as ev
from ztagent.hbone.frames import PREFACE, Settings, parse_authority
from ztagent.hbone.headers import MalformedRequest, decode_simple_headers, request_target
from ztagent.hbone.server import InboundRequest
from ztagent.hbone.session import HboneSession, Role
from ztagent.http import detect, h1
from ztagent.http.messages import Response
from ztagent.http.server import HttpServer
from ztagent.identity.spiffe import Identity
from ztagent.istio.envelope import Resource
from ztagent.istio.jwt import (
    Authenticator,
    AuthnResult,
    JwksError,
    JwtStatus,
    load_jwks,
    parse_request_authentication,
)
from ztagent.model.localconfig import parse_local_config
from ztagent.model.policy import Authorization
from ztagent.model.workload import Service, Workload
from ztagent.socks5.handshake import ConnectRequested, Failed, NeedMore, Socks5Handshake
from ztagent.telemetry import tracing
from ztagent.xds import convert
from ztagent.xds.gen.istio.security import authorization_pb2 as security_pb
from ztagent.xds.gen.istio.workload import workload_pb2 as workload_pb
from ztagent.xds.gen.ztagent.waypoint.v1 import l7_pb2 as l7_pb

from .draw import Draw

DATA = Path(__file__).resolve().parent.parent / "data"
EVENT_TYPES = (
    ev.ConnectRequest,
    ev.ResponseReceived,
    ev.DataReceived,
    ev.StreamEnded,
    ev.StreamReset,
    ev.SendUnblocked,
    ev.SettingsReceived,
    ev.PingAcknowledged,
    ev.GoAwayReceived,
    ev.ConnectionTerminated,
)
PEER = Identity("cluster.local", "shop", "default")
# Small limits so that the fuzzer reaches them with short inputs.
SMALL = Settings(
    stream_window=1024,
    connection_window=4096,
    max_frame_size=16_384,
    max_concurrent_streams=4,
    max_header_list_size=512,
    max_header_block=2048,
)


def _chunks(draw: Draw, prefix: bytes = b"") -> list[bytes]:
    """`prefix` and the rest of the input, cut as the next byte says: whole, or in pieces
    of 1..127 bytes."""
    size = draw.byte()
    wire = prefix + draw.rest()
    if size & 0x80 or not wire:
        return [wire]
    size = (size & 0x7F) + 1
    return [wire[i : i + size] for i in range(0, len(wire), size)]


def _check_events(session: HboneSession, events: list[ev.Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, EVENT_TYPES), event
        if isinstance(event, ev.ConnectionTerminated):
            assert i == len(events) - 1, "events after ConnectionTerminated"
            assert session.closed


# --- HBONE -------------------------------------------------------------------------------------


def _serve(session: HboneSession, event: ev.Event, verdict: int) -> None:
    """What `hbone/server.py` and `connection.py` do with each event."""
    if isinstance(event, ev.ConnectRequest):
        if event.method != "CONNECT":
            session.respond(event.stream_id, 400)
            return
        try:
            target = parse_authority(event.authority)
        except ValueError:
            session.respond(event.stream_id, 400)
            return
        request = InboundRequest(
            event.stream_id, event.authority, target, event.headers, PEER, target, target
        )
        forwarded = request.forwarded_client_ip()
        if forwarded is not None:
            ipaddress.ip_address(forwarded)
        session.respond(event.stream_id, 200 if verdict & 1 else 403)
        if verdict & 2:
            session.send_data(event.stream_id, b"x" * 3000, end_stream=bool(verdict & 4))
    elif isinstance(event, ev.DataReceived):
        session.acknowledge(event.stream_id, len(event.data), stream_level=bool(verdict & 8))
    elif isinstance(event, ev.StreamEnded):
        session.end_stream(event.stream_id)


def fuzz_hbone_server(data: bytes) -> None:
    """The server side of an HBONE connection fed a client's bytes after the preface."""
    draw = Draw(data)
    verdict = draw.byte()
    settings = SMALL if verdict & 0x10 else Settings()
    session = HboneSession(Role.SERVER, settings)
    session.initiate()
    chunks = _chunks(draw, PREFACE)
    for now, chunk in enumerate(chunks):
        events = session.receive_data(chunk, float(now))
        _check_events(session, events)
        for event in events:
            _serve(session, event, verdict)
        session.data_to_send()
        _check_events(session, session.handle_timer(float(now) * 3))
    if verdict & 0x20:
        session.drain()
    session.close()


def fuzz_hbone_client(data: bytes) -> None:
    """The client side fed a server's bytes after it opened two CONNECT streams."""
    draw = Draw(data)
    verdict = draw.byte()
    session = HboneSession(Role.CLIENT, SMALL if verdict & 0x10 else Settings())
    session.initiate()
    first = session.open_stream("10.0.0.1:80", [("forwarded", 'for="10.0.0.2:1234"')])
    session.open_stream("[::1]:80")
    session.send_data(first, b"hello")
    session.data_to_send()
    for now, chunk in enumerate(_chunks(draw)):
        events = session.receive_data(chunk, float(now))
        _check_events(session, events)
        for event in events:
            if isinstance(event, ev.DataReceived):
                session.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, ev.ResponseReceived):
                assert 200 <= event.status <= 999, event.status
                if event.status == 200 and verdict & 2:
                    session.send_data(event.stream_id, b"y" * 2000, end_stream=True)
        session.data_to_send()
    session.close()


def fuzz_hbone_headers(data: bytes) -> None:
    """HPACK header blocks: the stateless decoder agrees with the full one where both decode,
    and the CONNECT header list check refuses only with `MalformedRequest`."""
    simple = decode_simple_headers(data)
    try:
        full: list[tuple[str, str]] | None = [
            (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
            for k, v in hpack.Decoder().decode(data, raw=True)
        ]
    except (hpack.HPACKError, ValueError):
        full = None
    if simple is not None and full is not None:
        assert simple == full, (simple, full)
    for headers in (simple, full):
        if headers is None:
            continue
        try:
            method, authority = request_target(headers)
        except MalformedRequest:
            continue
        assert method
        try:
            ip, port = parse_authority(authority)
        except ValueError:
            continue
        ipaddress.ip_address(ip)
        assert 0 < port < 65536


def fuzz_forwarded(data: bytes) -> None:
    """`forwarded: for=...` on a CONNECT: the client IP or None, and `:authority` parsing."""
    text = data.decode("utf-8", "replace")
    request = InboundRequest(
        1, text, ("10.0.0.1", 80), [("forwarded", text)], PEER, ("", 0), ("", 0)
    )
    found = request.forwarded_client_ip()
    if found is not None:
        ipaddress.ip_address(found)
    try:
        ip, port = parse_authority(text)
    except ValueError:
        return
    ipaddress.ip_address(ip)
    assert 0 < port < 65536


# --- the waypoint's first bytes and HTTP/1 heads ---------------------------------------------


def fuzz_waypoint_http1(data: bytes) -> None:
    """Protocol sniffing on a tunnel's first bytes (a decided prefix stays decided), then an
    HTTP/1 request head as the waypoint reads it from h11."""
    verdict = detect.detect_protocol(data)
    assert verdict in ("http1", "http2", "tcp", "more")
    for cut in range(1, min(len(data), 256)):
        early = detect.detect_protocol(data[:cut])
        if early != "more":
            assert early == verdict, (cut, early, verdict)
            break
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        conn.receive_data(data)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return
    if isinstance(event, h11.Request):
        head, length = h1._h11_request_head(event, "HTTP/1.1")
        assert length is None or length >= 0
        assert all(not name.startswith(":") for name, _ in head.headers)


# --- SOCKS5 ------------------------------------------------------------------------------------


def fuzz_socks5(data: bytes) -> None:
    """A client's handshake bytes, in pieces: one terminal event, never another exception."""
    draw = Draw(data)
    handshake = Socks5Handshake()
    close = bool(data[:1]) and data[0] & 0x40
    chunks = _chunks(draw)
    if close:
        chunks.append(b"")  # the client closes
    for chunk in chunks:
        event = handshake.receive_data(chunk)
        handshake.data_to_send()
        if isinstance(event, NeedMore):
            assert not handshake.done
            continue
        assert isinstance(event, ConnectRequested | Failed), event
        assert handshake.done
        if isinstance(event, ConnectRequested):
            assert 0 <= event.port <= 0xFFFF
            assert event.host
            handshake.reply(0, ("10.0.0.1", 1234))
        try:
            handshake.receive_data(b"more")
        except LocalError:
            pass
        else:
            raise AssertionError("a finished handshake took more data")
        return


# --- xDS ---------------------------------------------------------------------------------------


def _address_proto(address: Workload | Service) -> workload_pb.Address:
    if isinstance(address, Workload):
        return convert.address_of_workload(address)
    return convert.address_of_service(address)


def fuzz_xds_address(data: bytes) -> None:
    """An `istio.workload.Address` from the wire: decoded, or `DecodeError`/`Invalid`. What a
    decoded one encodes to decodes again, to a value that then survives the round trip (the
    first trip may fill defaults: an unknown workload type is read as none and written as
    DEPLOYMENT)."""
    try:
        message = workload_pb.Address.FromString(data)
        address = convert.address_from_proto(message)
    except (DecodeError, Invalid):
        return
    assert isinstance(address, Workload | Service)
    again = convert.address_from_proto(_address_proto(address))
    assert convert.address_from_proto(_address_proto(again)) == again


def fuzz_xds_authorization(data: bytes) -> None:
    """An `istio.security.Authorization` from the wire, as `fuzz_xds_address`."""
    try:
        policy = convert.authorization_from_proto(security_pb.Authorization.FromString(data))
    except (DecodeError, Invalid):
        return
    assert isinstance(policy, Authorization)
    again = convert.authorization_from_proto(convert.authorization_to_proto(policy))
    assert convert.authorization_from_proto(convert.authorization_to_proto(again)) == again


def fuzz_xds_l7(data: bytes) -> None:
    """A waypoint's `L7Resource`: the checked JSON object, or `DecodeError`/`Invalid`."""
    try:
        document = convert.l7_from_proto(l7_pb.L7Resource.FromString(data))
    except (DecodeError, Invalid):
        return
    assert isinstance(document, dict)


# --- trace context ---------------------------------------------------------------------------

_TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-b3-flags",
    "TraceParent",
    "baggage",
)
_TRACE_WORDS = (
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-05e3ac9a4f6e3b90",
    "00f067aa0ba902b7",
    "4bf92f3577b34da6a3ce929d0e0e4736",
    "0" * 32,
    "1",
    "0",
    "d",
    "true",
    "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
)


def fuzz_traceparent(data: bytes) -> None:
    """W3C `traceparent`/`tracestate` and B3 headers: a context with well-formed ids, or None."""
    draw = Draw(data)
    headers = [(draw.choice(_TRACE_HEADERS), draw.text(_TRACE_WORDS)) for _ in range(draw.below(5))]
    context = tracing.extract(headers)
    if context is not None:
        assert len(context.trace_id) == 32 and int(context.trace_id, 16) != 0
        assert len(context.span_id) == 16 and int(context.span_id, 16) != 0
        assert context.trace_id == context.trace_id.lower()
        assert len(context.tracestate) <= 512
    tracing._parse_traceparent(draw.text(_TRACE_WORDS))


# --- JWT ---------------------------------------------------------------------------------------

ISSUER = "https://issuer.example.com"
NOW = 1_700_000_000
_KEY = ec.derive_private_key(0x5EED, ec.SECP256R1())
_JWK = {**ECAlgorithm.to_jwk(_KEY.public_key(), as_dict=True), "kid": "ec", "alg": "ES256"}
_RULE = {
    "issuer": ISSUER,
    "jwks": json.dumps({"keys": [_JWK]}),
    "audiences": ["shop", "https://shop.example.com/"],
    "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}, {"name": "x-jwt"}],
    "fromParams": ["access_token", "token"],
    "outputPayloadToHeader": "x-jwt-payload",
    "outputClaimToHeaders": [
        {"header": "x-sub", "claim": "sub"},
        {"header": "x-nested", "claim": "a.b"},
        {"header": "x-num", "claim": "n"},
    ],
}
_POLICY, _ = parse_request_authentication(
    Resource(
        "fuzz.yaml",
        0,
        "security.istio.io/v1",
        "RequestAuthentication",
        "ra",
        "shop",
        {
            "spec": {
                "targetRefs": [
                    {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
                ],
                "jwtRules": [_RULE],
            }
        },
    )
)
assert _POLICY is not None
AUTHENTICATOR = Authenticator([_POLICY])
_CLAIM_WORDS = (
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "azp",
    "jti",
    "a",
    "b",
    "n",
    "alg",
    "kid",
    "typ",
    "ES256",
    "RS256",
    "none",
    "HS256",
    "EdDSA",
    "ec",
    ISSUER,
    "shop",
    "http://shop",
    "https://shop.example.com",
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(draw: Draw, seed: dict[str, Any]) -> Any:
    return draw.mutate(seed, _CLAIM_WORDS) if draw.flag() else draw.value(_CLAIM_WORDS)


def _json(value: Any) -> bytes:
    return json.dumps(value, default=str).encode("utf-8", "surrogatepass")


def fuzz_jwt(data: bytes) -> None:
    """Tokens in a request: hostile text, hostile JSON with a random signature (never
    accepted), and hostile claims signed with the right key (accepted only if valid)."""
    draw = Draw(data)
    mode = draw.below(3)
    header: Any = {"alg": "ES256", "kid": "ec", "typ": "JWT"}
    payload: Any = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": NOW + 60, "a": {"b": 1}}
    if mode == 0:
        token = draw.text(_CLAIM_WORDS) + "." + draw.text() + "." + draw.rest().decode("latin-1")
    else:
        header, payload = _claims(draw, header), _claims(draw, payload)
        signing_input = f"{_b64(_json(header))}.{_b64(_json(payload))}"
        if mode == 1:
            signature = draw.raw(72)
        else:
            signature = pyjwt.get_algorithm_by_name("ES256").sign(signing_input.encode(), _KEY)
        token = f"{signing_input}.{_b64(signature)}"
    where = draw.below(3)
    headers: list[tuple[str, str]] = [("host", "shop")]
    path = "/x"
    if where == 0:
        headers.append(("Authorization", "Bearer " + token))
    elif where == 1:
        headers.append(("x-jwt", token))
    else:
        path = "/x?" + draw.choice(("access_token", "token")) + "=" + token + "&b=1"
    result = AUTHENTICATOR.authenticate(headers, path, now=NOW)
    assert isinstance(result, AuthnResult)
    if result.allowed:
        assert mode != 1, "a token with a random signature was accepted"
        assert result.auth is not None and result.auth.issuer == ISSUER
    else:
        assert isinstance(result.failure, JwtStatus)
        assert result.status == result.failure.http_status


def fuzz_jwks(data: bytes) -> None:
    """A JSON Web Key Set (inline `jwks` or a `jwksUri` file): keys, or `JwksError`."""
    draw = Draw(data)
    if draw.flag():
        text: bytes = draw.rest()
    else:
        keys = [dict(_JWK)] if draw.flag() else []
        text = _json(draw.mutate({"keys": keys}, (*_JWK.keys(), *map(str, _JWK.values()))))
    try:
        found = load_jwks(text)
    except JwksError:
        return
    assert found


# --- seeds -------------------------------------------------------------------------------------


def _hbone_exchange() -> tuple[bytes, bytes]:
    """What a client and a server send each other: two tunnels, data, ping, reset, goaway."""
    client = HboneSession(Role.CLIENT)
    server = HboneSession(Role.SERVER)
    client.initiate()
    server.initiate()
    sent: list[bytes] = []
    answered: list[bytes] = []

    def pump() -> None:
        for _ in range(4):
            out = b"".join(bytes(c) for c in client.data_to_send())
            sent.append(out)
            for event in server.receive_data(out):
                if isinstance(event, ev.ConnectRequest):
                    server.respond(event.stream_id, 200)
                    server.send_data(event.stream_id, b"pong")
            back = b"".join(bytes(c) for c in server.data_to_send())
            answered.append(back)
            client.receive_data(back)

    one = client.open_stream("10.0.0.1:80", [("forwarded", 'for="10.0.0.2:1234"')])
    client.open_stream("[fd00::1]:8080", [("baggage", "k8s.cluster.name=Kubernetes")])
    client.send_data(one, b"ping", end_stream=True)
    client.ping(b"12345678")
    pump()
    client.reset_stream(3)
    client.drain()
    pump()
    return b"".join(sent)[len(PREFACE) :], b"".join(answered)


def _xds_seeds() -> tuple[list[bytes], list[bytes], list[bytes]]:
    snapshot = parse_local_config((DATA / "ztunnel-localhost.yaml").read_bytes())
    addresses = [convert.address_of_workload(w).SerializeToString() for w in snapshot.workloads]
    addresses += [convert.address_of_service(s).SerializeToString() for s in snapshot.services]
    policies = [convert.authorization_to_proto(p).SerializeToString() for p in snapshot.policies]
    l7 = [
        convert.l7_to_proto(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": "r", "namespace": "shop"},
                "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {}}]}]},
            }
        ).SerializeToString()
    ]
    return addresses, policies, l7


def wire_seeds() -> dict[str, list[bytes]]:
    client_bytes, server_bytes = _hbone_exchange()
    addresses, policies, l7 = _xds_seeds()
    block = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("forwarded", 'for="[::1]:9"')]
    )
    token = pyjwt.encode(
        {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": NOW + 60},
        _KEY,
        algorithm="ES256",
        headers={"kid": "ec"},
    )
    return {
        "hbone_server": [b"\x80\x01" + client_bytes, b"\x0f\x0b" + client_bytes],
        "hbone_client": [b"\x80\x02" + server_bytes, b"\x05\x02" + server_bytes],
        "hbone_headers": [block, bytes.fromhex("8782") + b"\x01\x0b10.0.0.1:80"],
        "forwarded": [b'for="10.0.0.2:1234";host=reviews', b"for=[::1]", b"For=10.0.0.1"],
        "waypoint_http1": [
            b"GET /api?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nConnection: x-a\r\nx-a: 1\r\n"
            b"Content-Length: 5\r\nTE: trailers, gzip\r\n\r\nhello",
            b"POST http://reviews/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            PREFACE,
        ],
        "admin_http": [
            b"GET /stats/prometheus?usedonly&x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /quitquitquit HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n",
        ],
        "socks5": [
            b"\x80\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50early",
            b"\x01\x05\x02\x00\x02\x05\x01\x00\x03\x07example\x01\xbb",
            b"\xc0\x05\x01\x00\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50",
        ],
        "xds_address": addresses,
        "xds_authorization": policies,
        "xds_l7": l7,
        "traceparent": [b"\x00" * 4, b"\x02\x00\x00\x00\x01\x01\x00\x03"],
        "jwt": [b"\x00" + token.encode(), b"\x02\x00\x00\x00\x00\x00"],
        "jwks": [b"\x01" + json.dumps({"keys": [_JWK]}).encode(), b"\x00\x01\x00"],
    }


# --- the admin, stats and readiness HTTP server ------------------------------------------------

_LOOP = asyncio.new_event_loop()
_ADMIN = HttpServer(
    {"/": lambda request: Response.text("ok\n")},
    name="fuzz",
    max_head_bytes=4096,
    max_body_bytes=4096,
    head_timeout=1.0,
    idle_timeout=1.0,
    request_timeout=1.0,
)


class _Writer:
    """The connection's sending side: the server's answers are kept, never sent."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


class _Failures(logging.Handler):
    """Counts the server's "connection failed" records: an exception it did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_FAILURES = _Failures()
logging.getLogger("ztagent.http").addHandler(_FAILURES)


async def _serve_bytes(data: bytes) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()
    await _ADMIN._serve(reader, typing.cast(asyncio.StreamWriter, writer))
    return bytes(writer.sent)


def fuzz_admin_http(data: bytes) -> None:
    """Requests to the admin/stats servers (15000, 15020): every one answered with a status
    line or the connection closed, and no exception escapes the connection."""
    _FAILURES.records.clear()
    sent = _LOOP.run_until_complete(_serve_bytes(data))
    assert not _FAILURES.records, _FAILURES.records[0].getMessage()
    assert not sent or sent.startswith(b"HTTP/1."), sent[:40]
