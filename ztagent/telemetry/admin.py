"""The agent's three HTTP faces: admin (15000), metrics (15020) and readiness (15021).

Each builder takes providers (plain callables) and returns an unstarted `HttpServer`, so
this module knows nothing of the workload model, the certificate manager or the proxy:
the agent wires them in. Endpoints follow ztunnel's: `/config_dump`, `/logging`,
`/quitquitquit` and an index on the admin port; `/metrics` and `/stats/prometheus` on the
metrics port; `/healthz/ready` on the readiness port.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from ztagent.errors import LocalError
from ztagent.http.messages import Request, Response
from ztagent.http.server import HttpServer, Route
from ztagent.telemetry.accesslog import LEVELS, parse_level
from ztagent.telemetry.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

AGENT_LOGGER = "ztagent"

LOGGING_HELP = f"""\
usage: GET  /logging                          (show the current levels)
usage: POST /logging?level=<level>            (set the level of every logger)
usage: POST /logging?level=<logger>=<level>,<level>   (set one logger, e.g. ztagent.access=debug)
usage: POST /logging?reset                    (back to the levels at start)

hint: level: {"|".join(LEVELS)}
"""

_ADMIN_INDEX = (
    ("/config_dump", "dump the current configuration: workloads, services, policies, certificates"),
    ("/logging", "query/change logging levels (changes need POST)"),
    ("/quitquitquit", "shut down the agent (POST)"),
)


def _level_name(level: int) -> str:
    if level > logging.CRITICAL:
        return "off"
    name = logging.getLevelName(level).lower()
    return "warn" if name == "warning" else name


class LogLevels:
    """Reads and changes logger levels; `/logging` speaks through this."""

    def __init__(self, agent_logger: str = AGENT_LOGGER) -> None:
        self.agent_logger = agent_logger
        self._initial = self._snapshot()

    def _snapshot(self) -> dict[str, int]:
        manager = logging.Logger.manager
        levels = {"": logging.getLogger().level}
        for name, logger in sorted(manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
                levels[name] = logger.level
        return levels

    def describe(self) -> str:
        """ztunnel's form: "<logger>=<level>,...,<default level>"."""
        snap = self._snapshot()
        default = snap.pop("")
        parts = [f"{name}={_level_name(lvl)}" for name, lvl in snap.items()]
        parts.append(_level_name(default))
        return ",".join(parts)

    def apply(self, spec: str) -> None:
        """Apply "<level>" or a comma list of "<logger>=<level>" and "<level>" clauses.
        Validates all clauses before changing anything."""
        changes: list[tuple[str | None, int]] = []
        for clause in (c.strip() for c in spec.split(",")):
            if not clause:
                continue
            name, sep, level = clause.rpartition("=") if "=" in clause else clause.rpartition(":")
            if sep and not name:
                raise LocalError(f"level clause {clause!r} names no logger")
            changes.append((name or None, parse_level(level)))
        if not changes:
            raise LocalError("no level given")
        for target, value in changes:
            if target is None:
                logging.getLogger().setLevel(value)
                logging.getLogger(self.agent_logger).setLevel(value)
            else:
                logging.getLogger(target).setLevel(value)

    def reset(self) -> None:
        manager = logging.Logger.manager
        for name, logger in list(manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(self._initial.get(name, logging.NOTSET))
        logging.getLogger().setLevel(self._initial[""])


# ---------------------------------------------------------------------------- admin


def admin_routes(
    config_dump: Callable[[], Any],
    shutdown: Callable[[], object],
    levels: LogLevels | None = None,
) -> dict[str, Route]:
    """`config_dump()` returns a JSON-able object (dataclasses and datetimes go through
    `str`). `shutdown()` should only start the shutdown: it is called before the answer
    is written; if it returns an awaitable, that runs as a task of its own."""
    levels = levels or LogLevels()
    pending: set[asyncio.Task[Any]] = set()

    def index(req: Request) -> Response:
        lines = ["admin commands are:"]
        lines += [f"  {path}: {what}" for path, what in _ADMIN_INDEX]
        return Response.text("\n".join(lines) + "\n")

    async def dump(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response.text("method not allowed\n", 405)
        data = config_dump()
        if inspect.isawaitable(data):
            data = await data
        return Response.json(data)

    def logging_(req: Request) -> Response:
        level = req.arg("level")
        reset = req.arg("reset") is not None
        if level is None and not reset:
            return Response.text(f"current log level is {levels.describe()}\n")
        if req.method != "POST":
            # Changing state takes a POST, as in ztunnel's and Envoy's admin: a stray GET
            # (a crawler, a prefetch, a misdirected scrape) must not silence the access log.
            return Response.method_not_allowed("POST")
        try:
            if reset:
                levels.reset()
            if level:
                levels.apply(level)
        except LocalError as e:
            return Response.text(f"invalid level {level!r}: {e}\n{LOGGING_HELP}", 400)
        log.info("log level set", extra={"fields": {"level": levels.describe()}})
        return Response.text(f"current log level is {levels.describe()}\n")

    def quit_(req: Request) -> Response:
        if req.method != "POST":
            return Response.method_not_allowed("POST")
        log.info("shutdown requested through the admin API", extra={"fields": {"peer": req.peer}})
        result = shutdown()
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            pending.add(task)
            task.add_done_callback(pending.discard)
        return Response.text("shutdown now\n")

    return {"/": index, "/config_dump": dump, "/logging": logging_, "/quitquitquit": quit_}


def build_admin_server(
    config_dump: Callable[[], Any],
    shutdown: Callable[[], object],
    levels: LogLevels | None = None,
) -> HttpServer:
    return HttpServer(admin_routes(config_dump, shutdown, levels), name="admin")


# ---------------------------------------------------------------------------- metrics


def metrics_routes(render: Callable[[], bytes]) -> dict[str, Route]:
    """`render` is usually `Metrics.render`."""

    def scrape(req: Request) -> Response:
        return Response(200, (("content-type", CONTENT_TYPE),), render())

    return {"/metrics": scrape, "/stats/prometheus": scrape}


def build_metrics_server(render: Callable[[], bytes]) -> HttpServer:
    return HttpServer(metrics_routes(render), name="metrics")


# ---------------------------------------------------------------------------- readiness


class Readiness:
    """Ready once every named task started as pending is done (ztunnel's model): the agent
    marks e.g. "config" and "certificates" pending at start and done when loaded."""

    def __init__(self, *pending: str) -> None:
        self._pending: set[str] = set(pending)

    def pending(self, name: str) -> None:
        self._pending.add(name)

    def done(self, name: str) -> None:
        self._pending.discard(name)

    def ready(self) -> bool:
        return not self._pending

    def reason(self) -> str:
        return f"not ready, pending: {', '.join(sorted(self._pending))}" if self._pending else ""


def readiness_routes(
    ready: Callable[[], bool], reason: Callable[[], str] | None = None
) -> dict[str, Route]:
    """200 "ready" when `ready()` is true, else 503 with `reason()`."""

    def healthz(req: Request) -> Response:
        if ready():
            return Response.text("ready\n")
        text = (reason() if reason is not None else "") or "not ready"
        return Response.text(text + "\n", 503)

    return {"/healthz/ready": healthz}


def build_readiness_server(
    ready: Callable[[], bool], reason: Callable[[], str] | None = None
) -> HttpServer:
    return HttpServer(readiness_routes(ready, reason), name="readiness")


__all__ = [
    "AGENT_LOGGER",
    "LogLevels",
    "Readiness",
    "admin_routes",
    "build_admin_server",
    "build_metrics_server",
    "build_readiness_server",
    "metrics_routes",
    "readiness_routes",
]
