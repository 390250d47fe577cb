"""The waypoint proxy: HBONE in, the request pipeline's commands carried out, HBONE out.

Per tunnel (a CONNECT from a node agent, `:authority` = the service VIP:port or pod IP:port the
client dialed): the first bytes decide HTTP/1.1, HTTP/2 (prior knowledge, gRPC included) or
plain TCP, which is relayed to an endpoint without L7 processing, as Istio's waypoint does.

Per HTTP request: a request id and trace context, then `pipeline.Pipeline` decides (policy,
routing, faults, the destination, each upstream attempt and retry) and this module does what
it says: reads bodies, sleeps, opens upstream streams through pooled connections, sends mirrors,
writes the response, records metrics (reporter="waypoint") and a span. No decision is made here.

Request bodies stream. A body is replayed on retry only when its length is known and at most
`REPLAY_LIMIT` bytes (it is read whole first); a longer or unbounded body is sent once, as
Envoy does past its retry buffer. Mirrored requests copy replayable bodies only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ztagent.hbone.client import HboneClient, Tunnel, TunnelFailed, TunnelRefused
from ztagent.hbone.connection import TcpLeg
from ztagent.hbone.frames import format_authority
from ztagent.hbone.server import Deny, InboundRequest, Serve
from ztagent.http.body import Body, BodyError
from ztagent.http.detect import detect_protocol
from ztagent.http.messages import RequestHead, ResponseHead, UpstreamError
from ztagent.http.server import serve_http
from ztagent.identity.spiffe import Identity
from ztagent.model.store import ProxyState
from ztagent.model.workload import HBONE_MTLS_PORT, Service, Workload
from ztagent.telemetry.metrics import peer_labels
from ztagent.telemetry.requests import RequestLabels, RequestMetrics
from ztagent.telemetry.tracing import OtlpExporter, Span, ensure_request_id, start_span
from ztagent.waypoint.cluster import UpstreamKey
from ztagent.waypoint.commands import (
    GRPC_CONTENT_TYPE,
    INTERNAL_ERROR,
    NO_FLAGS,
    REPLAY_LIMIT,
    RESPONSE_BODY_RESET,
    Delay,
    Downstream,
    Forward,
    ForwardToWorkload,
    Mirror,
    Refuse,
    Respond,
    replayable,
    with_request_id,
)
from ztagent.waypoint.commands import grpc_status as response_grpc_status
from ztagent.waypoint.config import WaypointConfig
from ztagent.waypoint.pipe import leg_streams
from ztagent.waypoint.pipeline import Pipeline
from ztagent.waypoint.retry import Attempt, AttemptError, Deliver, RetryState
from ztagent.waypoint.upstream import (
    UpstreamConnectError,
    UpstreamOverflow,
    Upstreams,
)

log = logging.getLogger(__name__)

DETECT_TIMEOUT = 1.0
LABEL_CACHE_SIZE = 4096


@dataclass
class Reply:
    """A response produced by the waypoint or received from upstream, with what telemetry needs."""

    head: ResponseHead
    body: Body
    flags: str = NO_FLAGS
    endpoint: Workload | None = None
    service: Service | None = None
    done: Callable[[bool], None] | None = None


def _local(respond: Respond) -> Reply:
    return Reply(
        ResponseHead(respond.status, list(respond.headers)), Body.of(respond.body), respond.flags
    )


class Waypoint:
    """The L7 engine of one waypoint instance; `decide` is its HBONE server's hook."""

    def __init__(
        self,
        *,
        gateway: tuple[str, str],
        identity: Identity,
        state: ProxyState,
        client_for: Callable[[], Awaitable[HboneClient]],
        metrics: RequestMetrics,
        exporter: OtlpExporter | None = None,
        cluster_id: str = "Kubernetes",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.identity = identity
        self.state = state
        self.metrics = metrics
        self.exporter = exporter
        self.cluster_id = cluster_id
        self.rng = rng or random.Random()
        self.clock = clock
        self.pipeline = Pipeline(gateway=gateway, state=state, rng=self.rng)
        self._client_for = client_for
        self.upstreams = Upstreams(self._connect_upstream)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._label_cache: dict[tuple[Any, ...], RequestLabels] = {}
        self.requests = 0
        self.tunnels = 0

    # ------------------------------------------------------------------ config

    @property
    def config(self) -> WaypointConfig:
        return self.pipeline.config

    def set_config(self, config: WaypointConfig) -> None:
        self.pipeline.set_config(config)
        for error in config.errors:
            log.warning("L7 config: %s", error)

    # ------------------------------------------------------------------ tunnels

    def decide(self, request: InboundRequest) -> Serve | Deny:
        downstream = self.pipeline.tunnel(
            request.target,
            request.authority,
            request.peer_identity,
            request.peer_address[0],
            request.forwarded_client_ip(),
        )
        if isinstance(downstream, Refuse):
            return Deny(downstream.status, downstream.reason)
        return Serve(lambda leg: self._serve_leg(leg, downstream))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("waypoint task failed", exc_info=task.exception())

    def _serve_leg(self, leg: TcpLeg, downstream: Downstream) -> None:
        reader, writer = leg_streams(leg, asyncio.get_running_loop())
        self.tunnels += 1
        self._spawn(self._serve_tunnel(reader, writer, downstream))

    async def _serve_tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: Downstream
    ) -> None:
        data = b""
        kind = "more"
        try:
            while kind == "more":
                try:
                    chunk = await asyncio.wait_for(reader.read(8192), DETECT_TIMEOUT)
                except TimeoutError:
                    kind = "tcp"  # the client waits for the server: not HTTP
                    break
                if not chunk:
                    kind = "tcp" if data else "empty"
                    break
                data += chunk
                kind = detect_protocol(data)

            async def handler(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
                return await self.handle(head, body, down)

            if kind == "http1":
                await serve_http(reader, writer, handler, "http1", early=data)
            elif kind == "http2":
                await serve_http(reader, writer, handler, "http2", early=data)
            elif kind == "tcp":
                await self._relay_tcp(reader, writer, data, down)
        except (ConnectionError, BodyError) as exc:
            log.debug("tunnel from %s ended: %s", down.peer_identity, exc)
        finally:
            writer.close()

    # ------------------------------------------------------------------ requests

    async def handle(
        self, head: RequestHead, body: Body, down: Downstream
    ) -> tuple[ResponseHead, Body]:
        started = self.clock()
        self.requests += 1
        headers, request_id = ensure_request_id(list(head.headers))
        span = start_span(
            headers,
            name=f"{down.service.hostname if down.service else down.target[0]}:{down.target[1]}/*",
            kind="SERVER",
            rng=self.rng,
            now_ns=time.time_ns(),
        )
        grpc = any(k == "content-type" and v.startswith(GRPC_CONTENT_TYPE) for k, v in headers)
        try:
            reply = await self._process(head, headers, body, down, span)
        except Exception:
            log.exception("request %s %s failed", head.method, head.path)
            reply = _local(INTERNAL_ERROR)
        reply.head.headers = with_request_id(reply.head.headers, request_id)
        length = reply.body.length
        if not reply.body.ended and length is not None and length <= REPLAY_LIMIT:
            reply = await _read_small(reply)
        if reply.body.ended:
            # Complete already (a local reply, a trailers-only gRPC answer): pass it on as
            # is, so the client gets it in one piece (HEADERS with END_STREAM for gRPC).
            if reply.done is not None:
                reply.done(True)
            self._record_request(
                reply, reply.body.buffered, head, body, down, grpc, started, span, request_id
            )
            return reply.head, reply.body
        out = Body(reply.body.length)
        self._spawn(self._finish(reply, out, head, body, down, grpc, started, span, request_id))
        return reply.head, out

    async def _finish(
        self,
        reply: Reply,
        out: Body,
        head: RequestHead,
        request_body: Body,
        down: Downstream,
        grpc: bool,
        started: float,
        span: Span,
        request_id: str,
    ) -> None:
        """Stream the response body to the client, then record the request."""
        sent = 0
        ok = False
        try:
            while chunk := await reply.body.read():
                sent += len(chunk)
                await out.feed(chunk)
            out.end(list(reply.body.trailers or []) or None)
            ok = True
        except BodyError as exc:
            out.fail(exc)
        except asyncio.CancelledError:
            out.fail(BodyError("cancelled"))
            raise
        finally:
            if reply.done is not None:
                reply.done(ok)
        self._record_request(reply, sent, head, request_body, down, grpc, started, span, request_id)

    def _record_request(
        self,
        reply: Reply,
        sent: int,
        head: RequestHead,
        request_body: Body,
        down: Downstream,
        grpc: bool,
        started: float,
        span: Span,
        request_id: str,
    ) -> None:
        status = reply.head.status
        grpc_status = response_grpc_status(reply.head.headers, reply.body.trailers or ())
        labels = self._labels(down, reply, grpc, status, grpc_status)
        duration = self.clock() - started
        self.metrics.record(labels, duration, request_body.bytes_read, sent)
        span.end(
            time.time_ns(),
            status,
            {
                "http.method": head.method,
                "http.url": f"http://{head.authority}{head.path}",
                "http.status_code": str(status),
                "response_flags": reply.flags,
                "request_size": str(request_body.bytes_read),
                "response_size": str(sent),
                "guid:x-request-id": request_id,
                "upstream_cluster": reply.service.hostname if reply.service else "",
                "istio.namespace": self.gateway[0],
            },
        )
        if self.exporter is not None:
            self.exporter.submit(span)
        if not log.isEnabledFor(logging.DEBUG):
            return
        log.debug(
            "%s %s%s %s %d %s %.1fms -> %s",
            head.method,
            head.authority,
            head.path,
            head.protocol,
            status,
            reply.flags,
            duration * 1000,
            reply.endpoint.name if reply.endpoint else "-",
        )

    def _labels(
        self,
        down: Downstream,
        reply: Reply,
        grpc: bool,
        status: int,
        grpc_status: int | None,
    ) -> RequestLabels:
        service = reply.service or down.service
        key = (
            down.source.uid if down.source else str(down.peer_identity),
            reply.endpoint.uid if reply.endpoint else "",
            service.key if service else "",
            grpc,
            status,
            grpc_status,
            reply.flags,
        )
        cached = self._label_cache.get(key)
        if cached is not None:
            return cached
        if len(self._label_cache) >= LABEL_CACHE_SIZE:
            self._label_cache.clear()
        values: dict[str, str] = {"reporter": "waypoint"}
        values.update(peer_labels("source", down.source, down.peer_identity, self.cluster_id))
        endpoint = reply.endpoint
        identity = endpoint.identity if endpoint else None
        values.update(peer_labels("destination", endpoint, identity, self.cluster_id))
        if service is not None:
            values["destination_service"] = service.hostname
            values["destination_service_name"] = service.name
            values["destination_service_namespace"] = service.namespace
        values["request_protocol"] = "grpc" if grpc else "http"
        values["response_code"] = str(status)
        values["grpc_response_status"] = "" if grpc_status is None else str(grpc_status)
        values["response_flags"] = reply.flags
        values["connection_security_policy"] = "mutual_tls"
        labels = self._label_cache[key] = RequestLabels(**values)
        return labels

    async def _process(
        self,
        head: RequestHead,
        headers: list[tuple[str, str]],
        body: Body,
        down: Downstream,
        span: Span,
    ) -> Reply:
        pipeline = self.pipeline
        step = pipeline.request(
            head,
            headers,
            down,
            span,
            replayable=replayable(body.length),
            now=self.clock(),
            wall=time.time(),
        )
        if isinstance(step, Delay):
            await asyncio.sleep(step.seconds)
            step = pipeline.resume(step, self.clock())
        if isinstance(step, Respond):
            return _local(step)
        if isinstance(step, ForwardToWorkload):
            return await self._to_workload(step, body)
        replay = await _replayable(body)
        if replay is not None:
            for mirror in step.mirrors:
                self._spawn(self._mirror(mirror, replay))
        reply = await self._forward(step, body, replay)
        reply.flags = step.reply_flags(reply.flags)
        reply.head = ResponseHead(reply.head.status, step.response_headers(reply.head.headers))
        return reply

    async def _to_workload(self, step: ForwardToWorkload, body: Body) -> Reply:
        try:
            head, response, done = await self.upstreams.request(
                step.key, step.pool, step.head, body
            )
        except (UpstreamConnectError, UpstreamError) as exc:
            return _local(step.failed(str(exc)))
        return Reply(head, response, NO_FLAGS, step.workload, None, done)

    async def _forward(self, forward: Forward, body: Body, replay: bytes | None) -> Reply:
        """The attempts of `forward`, as its `RetryState` says, until one is the answer."""
        loop = asyncio.get_running_loop()
        retries = self.pipeline.retry_state(
            forward, replayable=replay is not None, loop_time=loop.time()
        )
        if isinstance(retries, Respond):
            return _local(retries)
        cluster = retries.cluster
        while True:
            attempt = retries.next_attempt(self.clock(), loop.time())
            if isinstance(attempt, Respond):
                return _local(attempt)
            attempt_body = Body.of(replay) if replay is not None else body
            try:
                async with asyncio.timeout(attempt.timeout):
                    response, response_body, done = await self.upstreams.request(
                        attempt.key, cluster.pool, forward.head, attempt_body
                    )
            except UpstreamOverflow as exc:
                return _local(retries.overflowed(attempt, exc.overflow))
            except UpstreamConnectError as exc:
                failed = retries.failed(attempt, AttemptError.CONNECT, str(exc), self.clock())
            except UpstreamError as exc:
                error = AttemptError.RESET if exc.reset else AttemptError.PROTOCOL
                failed = retries.failed(attempt, error, str(exc), self.clock())
            except TimeoutError:
                failed = retries.failed(attempt, AttemptError.TIMEOUT, "", self.clock())
            else:
                release = _releaser(retries, attempt, done)
                reply = Reply(
                    response,
                    response_body,
                    NO_FLAGS,
                    attempt.endpoint.workload,
                    cluster.service,
                    release,
                )
                answered = retries.answered(
                    attempt, response.status, response.headers, self.clock()
                )
                if isinstance(answered, Deliver):
                    reply.flags = answered.flags
                    return reply
                self._spawn(_discard(reply))
                await asyncio.sleep(answered.seconds)
                continue
            if isinstance(failed, Respond):
                return _local(failed)
            await asyncio.sleep(failed.seconds)

    async def _mirror(self, mirror: Mirror, body: bytes) -> None:
        """Send a copy; the response is read and dropped."""
        target = self.pipeline.mirror_target(mirror, self.clock())
        if target is None:
            return
        pool = target.cluster.pool
        try:
            _, response, done = await self.upstreams.request(
                target.key, pool, mirror.head, Body.of(body)
            )
            ok = True
            try:
                while await response.read():
                    pass
            except BodyError:
                ok = False
            done(ok)
        except (UpstreamError, UpstreamConnectError, UpstreamOverflow, OSError) as exc:
            log.debug("mirror to %s failed: %s", mirror.host, exc)
        finally:
            pool.release_request()

    # ------------------------------------------------------------------ upstream tunnels

    async def _connect_upstream(
        self, key: UpstreamKey
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        leg = TcpLeg()
        reader, writer = leg_streams(leg, asyncio.get_running_loop())
        tunnel = Tunnel(
            via=(key.ip, HBONE_MTLS_PORT),
            target=(key.ip, key.port),
            expected_identities=frozenset({Identity.parse(key.identity)}),
            source=(key.source_ip, 0) if key.source_ip else None,
        )
        client = await self._client_for()
        try:
            await client.open(leg, tunnel)
        except (TunnelFailed, TunnelRefused) as exc:
            writer.close()
            raise UpstreamConnectError(str(exc)) from None
        return reader, writer

    async def _relay_tcp(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        early: bytes,
        down: Downstream,
    ) -> None:
        """Not HTTP: relay the bytes to an endpoint of the service (or the workload)."""
        key = self.pipeline.tcp_destination(down, self.clock())
        if key is None:
            log.info("TCP from %s to %s: no endpoint", down.peer_identity, down.target)
            return
        try:
            up_reader, up_writer = await self._connect_upstream(key)
        except UpstreamConnectError as exc:
            log.info("TCP to %s failed: %s", format_authority(key.ip, key.port), exc)
            return
        if early:
            up_writer.write(early)
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        up_writer.close()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.upstreams.close()
        for task in list(self._tasks):
            task.cancel()


async def _replayable(body: Body) -> bytes | None:
    """The whole body when its length is known and small (so a retry can resend it)."""
    if not replayable(body.length):
        return None
    parts = []
    while chunk := await body.read():
        parts.append(chunk)
    return b"".join(parts)


async def _read_small(reply: Reply) -> Reply:
    """A small response of known length, read whole: its bytes are arriving anyway, and the
    client then gets head and body in one write, without a task to stream it."""
    parts: list[bytes] = []
    try:
        while chunk := await reply.body.read():
            parts.append(chunk)
    except BodyError:
        if reply.done is not None:
            reply.done(False)
        return _local(RESPONSE_BODY_RESET)
    body = Body.of(b"".join(parts))
    body.trailers = list(reply.body.trailers)
    reply.body = body
    return reply


async def _discard(reply: Reply) -> None:
    ok = True
    try:
        while await reply.body.read():
            pass
    except BodyError:
        ok = False
    if reply.done is not None:
        reply.done(ok)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


def _releaser(
    retries: RetryState, attempt: Attempt, done: Callable[[bool], None]
) -> Callable[[bool], None]:
    def release(ok: bool) -> None:
        retries.finished(attempt)
        done(ok)

    return release
