"""Process-wide log formatting (text or JSON) and the per-connection access log.

Owns how every log line of the agent looks, in the shape Istio's node proxy writes them:
text is `time<TAB>level<TAB>scope<TAB>message<TAB>key=value ...`, JSON (`LOG_FORMAT=json`)
is one object per line with `level`, `time`, `scope`, `message` and the record's fields at
the top level. The access log is one "connection complete" record per finished connection
on the `ztagent.access` logger (scope `access`), with ztunnel's field names.

Records carry structured fields in `extra={"fields": {...}}`; any module may use that.
Nothing here opens sockets or files other than the stream it is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Literal

from ztagent.errors import LocalError

ACCESS_LOGGER = "ztagent.access"
FieldValue = str | int | float | bool | None
Fields = Mapping[str, FieldValue]

_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
_SAFE = re.compile(r"[A-Za-z0-9_.:/@%+\-\[\]]+")
_RESERVED = frozenset({"level", "time", "scope", "message"})


# ----------------------------------------------------------------------------- access log


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """What the access log says about one finished connection.

    `direction` is "outbound" when this agent is the client's (reporter source) and
    "inbound" when it is the server's. Byte counts are from the local workload's view:
    `bytes_sent` is what it sent, `bytes_recv` what it received (ztunnel logs them that
    way too). Identities are given only when mTLS proved them. Empty values are left out.
    """

    src_addr: str
    dst_addr: str
    direction: Literal["outbound", "inbound"]
    src_workload: str | None = None
    src_namespace: str | None = None
    src_identity: str | None = None
    dst_hbone_addr: str | None = None
    dst_service: str | None = None
    dst_workload: str | None = None
    dst_namespace: str | None = None
    dst_identity: str | None = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    duration: float = 0.0
    error: str | None = None

    def with_hbone_address(self, address: str) -> ConnectionRecord:
        return dataclasses.replace(self, dst_hbone_addr=address)

    def failed(self, error: str) -> ConnectionRecord:
        """This record for a connection that ended with `error`."""
        return dataclasses.replace(self, error=error)

    def finished(
        self, sent: int, received: int, duration: float, error: str | None
    ) -> ConnectionRecord:
        """This record for a finished connection; `sent`/`received` are from the client's
        side of the agent. The log counts from the local workload's side: outbound it sent
        what the client wrote; inbound the local workload (the server) sent what its app
        wrote back."""
        if self.direction == "inbound":
            sent, received = received, sent
        return dataclasses.replace(
            self, bytes_sent=sent, bytes_recv=received, duration=duration, error=error
        )

    def fields(self) -> dict[str, FieldValue]:
        """The log fields, in ztunnel's order and spelling; `duration` as e.g. "12ms"."""
        out: dict[str, FieldValue] = {
            "src.addr": self.src_addr,
            "src.workload": self.src_workload,
            "src.namespace": self.src_namespace,
            "src.identity": self.src_identity,
            "dst.addr": self.dst_addr,
            "dst.hbone_addr": self.dst_hbone_addr,
            "dst.service": self.dst_service,
            "dst.workload": self.dst_workload,
            "dst.namespace": self.dst_namespace,
            "dst.identity": self.dst_identity,
            "direction": self.direction,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
            "duration": f"{int(self.duration * 1000)}ms",
            "error": self.error,
        }
        return {k: v for k, v in out.items() if v is not None and v != ""}


class AccessLog:
    """Writes one record per finished connection: info when clean, error when it failed."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def record(self, rec: ConnectionRecord) -> None:
        level = logging.ERROR if rec.error else logging.INFO
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "connection complete", extra={"fields": rec.fields()})


# ----------------------------------------------------------------------------- formatters


def _scope(record: logging.LogRecord) -> str:
    name = record.name
    if name.startswith("ztagent."):
        return name[len("ztagent.") :]
    return "ztagent" if name == "root" else name


def _timestamp(record: logging.LogRecord) -> str:
    t = datetime.fromtimestamp(record.created, tz=UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    f = getattr(record, "fields", None)
    return f if isinstance(f, Mapping) else {}


def format_value(value: Any) -> str:
    """logfmt: numbers and simple tokens bare, anything else JSON-quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    return text if _SAFE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """`time<TAB>level<TAB>scope<TAB>message<TAB>k=v k=v`, as Istio's node proxy prints."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_timestamp(record)}\t{_LEVEL_NAMES.get(record.levelno, 'info')}\t"
        line = head + f"{_scope(record)}\t{record.getMessage()}"
        fields = _record_fields(record)
        if fields:
            line += "\t" + " ".join(f"{k}={format_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: level, time, scope, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "level": _LEVEL_NAMES.get(record.levelno, "info"),
            "time": _timestamp(record),
            "scope": _scope(record),
            "message": record.getMessage(),
        }
        for k, v in _record_fields(record).items():
            obj[f"fields.{k}" if k in _RESERVED else k] = v
        if record.exc_info:
            obj["error.stack"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


# ----------------------------------------------------------------------------- setup


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we install, so configuring twice replaces rather than duplicates."""


LEVELS: dict[str, int] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise LocalError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})") from None


def configure_logging(
    level: str | int = "info", fmt: str | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record of the process to `stream` (stderr) in `fmt` ("text" or "json";
    by default `LOG_FORMAT` from the environment, else text). The level is set on the root
    logger; handlers pass everything so the admin `/logging` endpoint can change levels."""
    fmt = (fmt if fmt is not None else os.environ.get("LOG_FORMAT", "text")).strip().lower()
    if fmt not in ("text", "json"):
        raise LocalError(f"LOG_FORMAT must be text or json, not {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
            h.close()
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    return handler
