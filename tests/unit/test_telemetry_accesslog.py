"""Access log and process log formatting: text and JSON line shapes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ztagent.errors import LocalError
from ztagent.telemetry.accesslog import (
    ACCESS_LOGGER,
    AccessLog,
    ConnectionRecord,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    format_value,
    parse_level,
)

FIELDS_IN_ORDER = [
    "src.addr",
    "src.workload",
    "src.namespace",
    "src.identity",
    "dst.addr",
    "dst.hbone_addr",
    "dst.service",
    "dst.workload",
    "dst.namespace",
    "dst.identity",
    "direction",
    "bytes_sent",
    "bytes_recv",
    "duration",
    "error",
]


def _full(error: str | None = None) -> ConnectionRecord:
    return ConnectionRecord(
        src_addr="127.0.1.1:40000",
        dst_addr="127.0.2.1:15008",
        direction="outbound",
        src_workload="sleep-1",
        src_namespace="default",
        src_identity="spiffe://cluster.local/ns/default/sa/sleep",
        dst_hbone_addr="127.0.2.1:8080",
        dst_service="echo.prod.svc.cluster.local",
        dst_workload="echo-1",
        dst_namespace="prod",
        dst_identity="spiffe://cluster.local/ns/prod/sa/echo",
        bytes_sent=67,
        bytes_recv=490,
        duration=0.0125,
        error=error,
    )


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(ACCESS_LOGGER)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        handler.close()


def test_fields_order_and_omission() -> None:
    assert list(_full("boom").fields()) == FIELDS_IN_ORDER
    minimal = ConnectionRecord("1.1.1.1:1", "2.2.2.2:2", "inbound").fields()
    assert minimal == {
        "src.addr": "1.1.1.1:1",
        "dst.addr": "2.2.2.2:2",
        "direction": "inbound",
        "bytes_sent": 0,
        "bytes_recv": 0,
        "duration": "0ms",
    }
    assert _full().fields()["duration"] == "12ms"


def test_text_line_shape(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = capture
    handler.setFormatter(TextFormatter())
    AccessLog(logger).record(_full())
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    time, level, scope, message, kv = line.rstrip("\n").split("\t")
    assert time.endswith("Z") and "T" in time
    assert (level, scope, message) == ("info", "access", "connection complete")
    pairs = dict(p.split("=", 1) for p in kv.split(" "))
    assert list(pairs) == FIELDS_IN_ORDER[:-1]
    assert pairs["src.addr"] == "127.0.1.1:40000"
    assert pairs["src.identity"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert pairs["bytes_sent"] == "67" and pairs["bytes_recv"] == "490"
    assert pairs["direction"] == "outbound" and pairs["duration"] == "12ms"


def test_text_error_is_quoted_and_logged_at_error(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(TextFormatter())
    AccessLog(logger).record(_full('upstream "refused" it'))
    _, level, _, _, kv = stream.getvalue().rstrip("\n").split("\t")
    assert level == "error"
    assert kv.endswith(' error="upstream \\"refused\\" it"')


def test_json_line_shape(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = capture
    handler.setFormatter(JsonFormatter())
    AccessLog(logger).record(_full("connection refused"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert list(obj)[:4] == ["level", "time", "scope", "message"]
    assert obj["level"] == "error" and obj["scope"] == "access"
    assert obj["message"] == "connection complete"
    assert list(obj)[4:] == FIELDS_IN_ORDER
    assert obj["bytes_sent"] == 67 and obj["bytes_recv"] == 490
    assert obj["dst.hbone_addr"] == "127.0.2.1:8080"
    assert obj["error"] == "connection refused"


def test_access_log_respects_level(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(TextFormatter())
    logger.setLevel(logging.WARNING)
    AccessLog(logger).record(_full())
    assert stream.getvalue() == ""
    AccessLog(logger).record(_full("denied"))
    assert "\terror\t" in stream.getvalue()


def test_format_value() -> None:
    assert format_value(3) == "3"
    assert format_value(True) == "true"
    assert format_value("a.b-c:1") == "a.b-c:1"
    assert format_value("") == '""'
    assert format_value("two words") == '"two words"'
    assert format_value("k=v") == '"k=v"'


def test_configure_logging_json_for_every_record(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    old_level = root.level
    stream = io.StringIO()
    monkeypatch.setenv("LOG_FORMAT", "json")
    handler = configure_logging("debug", stream=stream)
    try:
        again = configure_logging("debug", stream=stream)
        assert handler not in root.handlers and again in root.handlers
        handler = again
        logging.getLogger("ztagent.proxy.outbound").debug(
            "picked %s", "echo", extra={"fields": {"message": "x", "n": 1}}
        )
        logging.getLogger("somelib").warning("plain")
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("ztagent").exception("failed")
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x["scope"] for x in lines] == ["proxy.outbound", "somelib", "ztagent"]
        assert [x["level"] for x in lines] == ["debug", "warn", "error"]
        assert lines[0]["message"] == "picked echo"
        assert lines[0]["n"] == 1 and lines[0]["fields.message"] == "x"
        assert "ValueError: bad" in lines[2]["error.stack"]
        assert all(x["time"].endswith("Z") for x in lines)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_configure_logging_text_default(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    old_level = root.level
    stream = io.StringIO()
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    handler = configure_logging("info", stream=stream)
    try:
        logging.getLogger("ztagent.x").debug("hidden")
        logging.getLogger("ztagent.x").info("shown")
        assert stream.getvalue().count("\n") == 1
        assert stream.getvalue().split("\t")[1:] == ["info", "x", "shown\n"]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(LocalError):
        configure_logging("info", fmt="xml", stream=io.StringIO())
    with pytest.raises(LocalError):
        parse_level("loud")
    assert parse_level("WARN") == logging.WARNING
    assert parse_level("off") > logging.CRITICAL
