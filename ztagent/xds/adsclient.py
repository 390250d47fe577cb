"""`XdsClient`: the `DeltaClient` state machine over a gRPC delta ADS stream.

It connects with `ControlPlaneConnection` (TLS, bearer token, `clusterid`), reconnects with
exponential backoff (10 ms doubling to 15 s, reset once a response arrives) and keeps serving
the last config while disconnected. `on_update` gets the workload snapshot, `on_l7` all L7
objects, each after a response that changed them (and once at the first response).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from ztagent.errors import LocalError
from ztagent.model.snapshot import ConfigSnapshot
from ztagent.xds.client import L7_TYPE, TYPES, WORKLOAD_TYPES, DeltaClient
from ztagent.xds.connection import ControlPlaneConnection
from ztagent.xds.gen.envoy.config.core.v3 import base_pb2
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as ads_grpc

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.01
MAX_BACKOFF = 15.0


class XdsClient:
    """Keeps a delta ADS stream to the control plane and reports each applied config."""

    def __init__(
        self,
        connection: ControlPlaneConnection,
        node: base_pb2.Node,
        on_update: Callable[[ConfigSnapshot], None],
        *,
        types: Iterable[str] = TYPES,
        on_l7: Callable[[list[dict[str, Any]]], None] | None = None,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.connection = connection
        self.core = DeltaClient(node, types)
        self.on_update = on_update
        self.on_l7 = on_l7
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._rng = rng
        self.connected = False
        self.last_error: str | None = None
        self.synced = asyncio.Event()
        """Set once every subscribed type had its first response."""
        self._workloads_reported = False

    async def run(self) -> None:
        backoff = self.initial_backoff
        while True:
            got_response = False
            try:
                async for _ in self._stream():
                    got_response = True
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            except LocalError as exc:
                self.last_error = str(exc)
            except Exception as exc:  # never let one bad stream stop the client
                log.exception("xDS stream failed")
                self.last_error = repr(exc)
            else:
                self.last_error = "the server closed the stream"
            self.connected = False
            if got_response:
                backoff = self.initial_backoff
            delay = backoff * (0.5 + self._rng() / 2)
            log.warning(
                "xDS %s: %s; keeping the last config, reconnecting in %.2fs",
                self.connection.target,
                self.last_error,
                delay,
            )
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, self.max_backoff)

    async def _stream(self) -> AsyncIterator[ads.DeltaDiscoveryResponse]:
        async with self.connection.channel() as channel:
            stub = ads_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(metadata=self.connection.metadata())
            for request in self.core.connect_requests():
                await call.write(request)
            while True:
                message = await call.read()
                if message is grpc.aio.EOF or not isinstance(message, ads.DeltaDiscoveryResponse):
                    return
                response = message
                if not self.connected:
                    self.connected = True
                    log.info("xDS connected to %s", self.connection.target)
                first = not self.core.answered(response.type_url)
                reply, changed = self.core.receive(response)
                if reply.HasField("error_detail"):
                    log.error("xDS NACK of %s: %s", response.type_url, reply.error_detail.message)
                self._report(response.type_url, changed, first)
                if self.core.synced:
                    self.synced.set()
                await call.write(reply)
                yield response

    def _report(self, type_url: str, changed: bool, first: bool) -> None:
        """Hand the applied config to the callbacks: the workload snapshot after a change to
        a workload type (and at the first sync), the L7 objects after a change to them (and
        at their first response)."""
        if type_url == L7_TYPE:
            if (changed or first) and self.on_l7 is not None:
                self.on_l7(self.core.l7_objects())
            return
        if type_url not in WORKLOAD_TYPES:
            return
        workload_synced = all(self.core.answered(t) for t in self.core.types if t in WORKLOAD_TYPES)
        if changed or (workload_synced and not self._workloads_reported):
            self._workloads_reported = workload_synced or self._workloads_reported
            self.on_update(self.core.snapshot())
