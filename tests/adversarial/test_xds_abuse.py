"""A hostile xDS client against the control plane's real gRPC server (TLS, loopback), with a
workload's valid token: what one stream can make the server hold is capped, a request over a
cap or one that is not a DeltaDiscoveryRequest ends that stream with an error status (and the
server goes on serving the others), and a NACK's reason is not logged whole."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.test_control_grpc import Control, Stream, names, running
from ztagent.xds.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as ads
from ztagent.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as ads_grpc

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
WEB = "Kubernetes//Pod/shop/web"
CONFIG = {
    "base.yaml": """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.244.1.10}
""",
}


def run(tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        async with running(tmp_path, CONFIG) as c:
            await scenario(c)

    asyncio.run(asyncio.wait_for(main(), 60))


def workload_metadata(c: Control) -> list[Any]:
    """A workload's own token (not a node agent's): any pod can open this stream."""
    return c.metadata(c.token("shop", "web"))


async def ended_with(s: Stream, timeout: float = TIMEOUT) -> grpc.StatusCode:
    """The status the stream ends with (its responses before that are skipped)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(s.queue.get(), max(left, 0.01))
        except TimeoutError:
            pytest.fail("the stream was not ended")
        if isinstance(message, grpc.aio.AioRpcError):
            return message.code()
        if message is grpc.aio.EOF:
            return grpc.StatusCode.OK


async def still_serves(c: Control) -> None:
    good = Stream(c)
    await good.send(ADDRESS_TYPE)
    assert WEB in names(await good.recv())
    await good.close()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_oversubscription_ends_the_stream_and_others_are_served(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c, workload_metadata(c))
        await s.send(ADDRESS_TYPE, resource_names_subscribe=[WEB])
        assert names(await s.recv()) == {WEB}
        # Thousands of names, a thousand per request: within the message size, over the cap.
        for batch in range(6):
            subscribe = [f"shop/missing-{batch}-{i}.example" for i in range(1000)]
            try:
                await s.send(ADDRESS_TYPE, resource_names_subscribe=subscribe)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break
        assert await ended_with(s) == grpc.StatusCode.RESOURCE_EXHAUSTED
        await s.close()
        await still_serves(c)

    run(tmp_path, scenario)


def test_one_request_over_the_cap_ends_the_stream(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c, workload_metadata(c))
        await s.send(AUTHORIZATION_TYPE, resource_names_subscribe=[f"n/{i}" for i in range(20_000)])
        assert await ended_with(s) == grpc.StatusCode.RESOURCE_EXHAUSTED
        await s.close()
        await still_serves(c)

    run(tmp_path, scenario)


def test_overlong_name_ends_the_stream(tmp_path):
    async def scenario(c: Control) -> None:
        s = Stream(c, workload_metadata(c))
        await s.send(ADDRESS_TYPE, resource_names_subscribe=["shop/" + "a" * 100_000])
        code = await ended_with(s)
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        await s.close()
        await still_serves(c)

    run(tmp_path, scenario)


def test_memory_stays_bounded_under_many_subscribe_requests(tmp_path):
    """~13 MB of subscriptions (960,000 short names) over 12 streams of one channel (the
    server is in this process): kept, they grew its RSS by ~110 MiB; capped, by ~14 MiB (gRPC's
    buffers, the allocator's arenas)."""

    async def scenario(c: Control) -> None:
        gc.collect()
        before = rss_bytes()
        streams = [Stream(c, workload_metadata(c)) for _ in range(12)]
        for k, s in enumerate(streams):
            for batch in range(20):
                subscribe = [f"{k:02x}/{batch:02x}/{i:05d}" for i in range(4000)]
                try:
                    await s.send(ADDRESS_TYPE, resource_names_subscribe=subscribe)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    break
            # A first request of another type is always answered: once it is (or the stream
            # has ended), the server has handled everything before it.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await s.send(AUTHORIZATION_TYPE)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await s.recv()
                await s.recv()
        gc.collect()
        grown = rss_bytes() - before
        for s in streams:
            await s.close()
        assert grown < 40 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
        await still_serves(c)

    run(tmp_path, scenario)


def test_garbage_request_ends_the_stream_with_an_error(tmp_path):
    async def scenario(c: Control) -> None:
        channel = c.channel()
        call: grpc.aio.StreamStreamCall[bytes, ads.DeltaDiscoveryResponse] = channel.stream_stream(
            DELTA_METHOD,
            request_serializer=None,  # bytes as they are
            response_deserializer=ads.DeltaDiscoveryResponse.FromString,
        )(metadata=workload_metadata(c))
        await call.write(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")  # not a protobuf
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), TIMEOUT)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        call.cancel()
        await channel.close()
        await still_serves(c)

    run(tmp_path, scenario)


def test_huge_nack_reason_is_not_logged_whole(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ztagent.control.server")
    reason = "bad resource: " + "x" * (2 * 1024 * 1024)

    async def scenario(c: Control) -> None:
        s = Stream(c, workload_metadata(c))
        await s.send(ADDRESS_TYPE)
        first = await s.recv()
        await s.send(
            ADDRESS_TYPE,
            response_nonce=first.nonce,
            error_detail={"code": 3, "message": reason},
        )
        for _ in range(100):
            if any("NACK" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
        await s.close()

    run(tmp_path, scenario)
    nacks = [r.getMessage() for r in caplog.records if "NACK" in r.getMessage()]
    assert len(nacks) == 1
    assert "bad resource: xxx" in nacks[0]
    assert str(len(reason)) in nacks[0]  # the whole reason's length is told
    assert max(len(r.getMessage()) for r in caplog.records) < 4096


def many_pods(count: int) -> str:
    pod = """\
---
apiVersion: v1
kind: Pod
metadata: {{name: p{i}, namespace: shop, labels: {{app: p{i}}}}}
spec: {{nodeName: node-a, serviceAccountName: p{i}}}
status: {{podIP: 10.245.{a}.{b}}}
"""
    return "".join(pod.format(i=i, a=i // 250, b=i % 250 + 1) for i in range(count))


def pushes(c: Control) -> float:
    for line in c.server.plane.metrics.render().decode().splitlines():
        if line.startswith('pilot_xds_pushes_total{type="address"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_never_reads_does_not_grow_the_queue(tmp_path):
    """Wildcard subscribe/unsubscribe churn, each subscribe calling for all 600 workloads,
    from a client that never reads: the server stops reading it (~70 responses, gRPC's
    buffers and the queue, RSS +5 MiB) instead of queueing all 600 (RSS +69 MiB)."""

    async def scenario(c: Control) -> None:
        for _ in range(200):
            if len(c.server.plane.snapshot.workloads) > 600:  # and web
                break
            await asyncio.sleep(0.05)
        gc.collect()
        before = rss_bytes()
        channel = c.channel()
        call = ads_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(
            metadata=workload_metadata(c)
        )
        for _ in range(300):
            await call.write(ads.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE))
            await call.write(
                ads.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, resource_names_unsubscribe=["*"])
            )
            await call.write(
                ads.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, resource_names_subscribe=["*"])
            )
        # Wait until the server has stopped producing responses for it.
        sent, quiet = pushes(c), 0
        for _ in range(40):
            await asyncio.sleep(0.2)
            now = pushes(c)
            quiet = quiet + 1 if now == sent else 0
            sent = now
            if quiet >= 3:
                break
        gc.collect()
        grown = rss_bytes() - before
        call.cancel()
        await channel.close()
        assert sent < 100, f"{sent} responses produced for a client that reads none"
        assert grown < 24 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
        await still_serves(c)

    async def main() -> None:
        async with running(tmp_path, {**CONFIG, "pods.yaml": many_pods(600)}) as c:
            await scenario(c)

    asyncio.run(asyncio.wait_for(main(), 60))
