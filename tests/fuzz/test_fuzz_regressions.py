"""Inputs the fuzz targets found that once broke a parser; each must now be refused cleanly."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ztagent.hbone.events import ConnectionTerminated, ResponseReceived, StreamReset
from ztagent.hbone.frames import ErrorCode, Flag, FrameType, pack_frame
from ztagent.hbone.session import HboneSession, Role
from ztagent.http.messages import Response
from ztagent.http.server import HttpServer
from ztagent.istio.envelope import Resource
from ztagent.istio.jwt import read_request_authentications
from ztagent.istio.routing import parse_routes

from .targets import TARGETS

# `:status` as a literal without indexing (static index 8) whose value is b"\xb2\xb2\xb2":
# "²²²" in latin-1, which str.isdigit() accepts and int() does not.
SUPERSCRIPT_STATUS = bytes([0x08, 3]) + b"\xb2\xb2\xb2"


def test_non_ascii_digit_status_resets_the_stream() -> None:
    client = HboneSession(Role.CLIENT)
    client.initiate()
    sid = client.open_stream("10.0.0.1:80")
    client.data_to_send()
    events = client.receive_data(
        pack_frame(FrameType.SETTINGS, 0, 0)
        + pack_frame(FrameType.HEADERS, Flag.END_HEADERS, sid, SUPERSCRIPT_STATUS)
    )
    assert StreamReset(sid, ErrorCode.PROTOCOL_ERROR, remote=False) in events
    assert not any(isinstance(e, ResponseReceived | ConnectionTerminated) for e in events)
    assert not client.closed


def test_non_ascii_digit_status_through_the_client_target() -> None:
    headers = pack_frame(FrameType.HEADERS, Flag.END_HEADERS, 1, SUPERSCRIPT_STATUS)
    TARGETS["hbone_client"](b"\x00\x80" + pack_frame(FrameType.SETTINGS, 0, 0) + headers)


def test_jwks_uri_with_an_unclosed_ipv6_bracket_is_an_error_of_its_policy() -> None:
    spec = {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "w"}],
        "jwtRules": [{"issuer": "i", "jwksUri": "http://[::1/keys"}],
    }
    resource = Resource(
        "ra.yaml", 0, "security.istio.io/v1", "RequestAuthentication", "ra", "ns", {"spec": spec}
    )
    config = read_request_authentications([resource])
    assert config.policies == ()
    [error] = config.errors
    assert error.path == "spec.jwtRules[0].jwksUri"
    assert "is not an http, https or file URI" in error.reason


def test_admin_request_target_with_an_unclosed_ipv6_bracket_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The old admin server passed the whole target to urlsplit, which raised ValueError and
    # ended the connection with a traceback; the HTTP stack now answers it like any request.
    async def exchange() -> bytes:
        server = HttpServer({"/": lambda request: Response.text("ok")}, name="test")
        host, port = await server.start()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET http://[x/ HTTP/1.1\r\nHost: a\r\n\r\n")
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            return answer
        finally:
            await server.close()

    with caplog.at_level(logging.ERROR, logger="ztagent.http"):
        answer = asyncio.run(exchange())
    assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 400 ")), answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_direct_response_body_with_a_lone_surrogate_is_an_error_of_its_route() -> None:
    # YAML's "\ud800" escape (and JSON's) gives a lone surrogate, which UTF-8 cannot encode.
    body = {"string": "\ud800"}
    spec = {"hosts": ["reviews"], "http": [{"directResponse": {"status": 200, "body": body}}]}
    resource = Resource(
        "vs.yaml", 0, "networking.istio.io/v1", "VirtualService", "vs", "ns", {"spec": spec}
    )
    config = parse_routes([resource])
    assert config.virtual_services == ()
    [error] = config.errors
    assert error.path == "spec.http[0].directResponse.body.string"
