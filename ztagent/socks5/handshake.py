"""The server side of a SOCKS5 handshake (RFC 1928), without I/O.

Only what a node agent needs: no authentication (method 0x00) and CONNECT. Bytes go in
with `receive_data(data)` (b"" means the client closed), one event comes out per call;
bytes to write go out through `data_to_send()` (the method selection) and the terminal
events (`Failed.reply`, and `reply(code, bound)` once the caller tried the connection).

    state      input                              -> event / next state
    GREETING   VER=5 NMETHODS METHODS, 0x00 in it  -> queue 05 00; REQUEST
    GREETING   VER=5, no 0x00 among the methods    -> Failed(05 FF); DONE
    GREETING   VER!=5 or EOF                       -> Failed(no reply); DONE
    REQUEST    VER=5 CMD=1 RSV ATYP ADDR PORT      -> ConnectRequested(+ early data); DONE
    REQUEST    CMD=2 (BIND), 3 (UDP) or other      -> Failed(reply 07); DONE
    REQUEST    ATYP not 1, 3, 4                    -> Failed(reply 08); DONE
    REQUEST    VER!=5, bad domain name             -> Failed(reply 01); DONE
    REQUEST    EOF                                 -> Failed(no reply); DONE
    any        incomplete message                  -> NeedMore; same state

RSV is not checked (clients send 0; nothing depends on it). Every message is at most 262
bytes, so the buffer is bounded by what one `receive_data` call hands in.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass

from ztagent.errors import LocalError

VERSION = 0x05
NO_AUTH = 0x00
NO_ACCEPTABLE_METHODS = 0xFF
_PORT = struct.Struct("!H")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_.])?")


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


# ------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The message so far is incomplete; feed more bytes."""


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """The client asked to connect to `host:port`. `host` is an IP address in its usual
    text form for IPV4/IPV6 (an IPv4-mapped IPv6 address as the IPv4 address, IPV4), else
    the domain name as sent. `early_data` is what the client
    sent after the request without waiting for the reply: it belongs to the tunnel."""

    host: str
    port: int
    atyp: AddressType
    early_data: bytes = b""


@dataclass(frozen=True, slots=True)
class Failed:
    """The handshake failed: write `reply` (may be empty), then close."""

    reply: bytes
    reason: str


Event = NeedMore | ConnectRequested | Failed
NEED_MORE = NeedMore()


class _State(enum.Enum):
    GREETING = "greeting"
    REQUEST = "request"
    DONE = "done"


def encode_reply(code: int, bound: tuple[str, int] | None = None) -> bytes:
    """A reply message: VER REP RSV ATYP BND.ADDR BND.PORT; `bound` defaults to 0.0.0.0:0."""
    if not 0 <= code <= 0xFF:
        raise LocalError(f"SOCKS5 reply code out of range: {code}")
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise LocalError(f"SOCKS5 bound address must be an IP address: {host!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise LocalError(f"SOCKS5 bound port out of range: {port}")
    atyp = AddressType.IPV4 if addr.version == 4 else AddressType.IPV6
    return bytes((VERSION, code, 0x00, atyp)) + addr.packed + _PORT.pack(port)


class Socks5Handshake:
    """One client's handshake, from greeting to CONNECT request."""

    def __init__(self) -> None:
        self._state = _State.GREETING
        self._buffer = bytearray()
        self._outgoing = bytearray()

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def reply(self, code: int, bound: tuple[str, int] | None = None) -> bytes:
        """The answer to a `ConnectRequested`: `Reply.SUCCEEDED` with the local address of
        the upstream connection, or the failure code."""
        return encode_reply(code, bound)

    def receive_data(self, data: bytes) -> Event:
        if self._state is _State.DONE:
            raise LocalError("SOCKS5 handshake already finished")
        if not data:
            return self._fail(b"", f"client closed the connection during the {self._state.value}")
        self._buffer += data
        if self._state is _State.GREETING:
            event = self._greeting()
            if event is not None:
                return event
        return self._request()

    def _fail(self, reply: bytes, reason: str) -> Failed:
        self._state = _State.DONE
        self._buffer.clear()
        return Failed(reply, reason)

    def _greeting(self) -> Event | None:
        buf = self._buffer
        if len(buf) < 1:
            return NEED_MORE
        if buf[0] != VERSION:
            return self._fail(b"", f"not SOCKS5 (version byte {buf[0]:#04x})")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return NEED_MORE
        methods = bytes(buf[2 : 2 + buf[1]])
        del buf[: 2 + len(methods)]
        if NO_AUTH not in methods:
            reply = bytes((VERSION, NO_ACCEPTABLE_METHODS))
            return self._fail(reply, "client offered no method without authentication")
        self._outgoing += bytes((VERSION, NO_AUTH))
        self._state = _State.REQUEST
        return None

    def _request(self) -> Event:
        buf = self._buffer
        if len(buf) < 1:
            return NEED_MORE
        if buf[0] != VERSION:
            return self._fail(encode_reply(Reply.GENERAL_FAILURE), "request is not SOCKS5")
        if len(buf) < 2:
            return NEED_MORE
        if buf[1] != Command.CONNECT:
            name = Command(buf[1]).name if buf[1] in Command._value2member_map_ else "unknown"
            return self._fail(
                encode_reply(Reply.COMMAND_NOT_SUPPORTED),
                f"command {buf[1]:#04x} ({name}) not supported",
            )
        if len(buf) < 4:
            return NEED_MORE
        atyp = buf[3]
        if atyp == AddressType.IPV4:
            end = 4 + 4
        elif atyp == AddressType.IPV6:
            end = 4 + 16
        elif atyp == AddressType.DOMAIN:
            if len(buf) < 5:
                return NEED_MORE
            end = 5 + buf[4]
        else:
            return self._fail(
                encode_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
                f"address type {atyp:#04x} not supported",
            )
        if len(buf) < end + 2:
            return NEED_MORE
        (port,) = _PORT.unpack_from(buf, end)
        raw = bytes(buf[4:end])
        early = bytes(buf[end + 2 :])
        if atyp == AddressType.DOMAIN:
            name = raw[1:].decode("ascii", "replace")
            if len(name) == 0 or len(name) > 253 or not _HOSTNAME.fullmatch(name):
                return self._fail(encode_reply(Reply.GENERAL_FAILURE), "invalid domain name")
            host = name
        else:
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                # `::ffff:10.0.0.1` is 10.0.0.1: the workload lookups are by IPv4 address.
                addr = addr.ipv4_mapped
                atyp = AddressType.IPV4
            host = str(addr)
        self._state = _State.DONE
        self._buffer.clear()
        return ConnectRequested(host, port, AddressType(atyp), early)
