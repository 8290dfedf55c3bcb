"""Request-plane faults with real processes: a caller cut off while its final is sent, hung
operators, abandoned streams, inputs of requests no worker ran."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import DataPlaneConfig, NatsConfig, RequestPlaneConfig
from tdist.errors import DeadlineExceeded
from tdist.nats_server import EmbeddedNatsServer
from tests.conftest import operator
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)


async def test_a_final_lost_while_the_caller_was_away_is_replayed_not_rerun(
    nats_server: EmbeddedNatsServer, deployed: RequestPlaneConfig, workers
) -> None:
    rp = deployed
    worker = await workers("w", operator("slow", "Counting", max_inflight=4, delay=1.0))
    host, port = nats_server.url.split("://")[1].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    try:
        async with Client(NatsConfig(servers=(proxy.url,)), request_plane=rp) as client:
            stream = await client.operator("slow").call({"i": np.array([5])}, timeout=60)
            await asyncio.sleep(0.3)  # running in the worker
            proxy.cut()  # the caller is gone while the worker sends the final (and acks it)
            await asyncio.sleep(2.0)
            proxy.restore()
            final = await stream.final()
            assert final.outputs["i"].tolist() == [5]
            assert client.caller.resent == 1
            assert worker.replayed == 1
            assert worker.runners[("slow", 1)].instance.executed.count(final.request_id) == 1
    finally:
        await proxy.close()


async def test_requests_published_while_the_server_is_unreachable_are_stored_once(
    nats_server: EmbeddedNatsServer, deployed: RequestPlaneConfig, workers
) -> None:
    rp = deployed
    worker = await workers("w", operator("count", "Counting", max_inflight=8))
    host, port = nats_server.url.split("://")[1].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    try:
        async with Client(NatsConfig(servers=(proxy.url,)), request_plane=rp) as client:
            await client.operator("count").infer({"i": np.array([0])}, timeout=10)
            proxy.cut()
            await asyncio.sleep(0.2)
            streams = [await client.operator("count").call({"i": np.array([i])}, timeout=60) for i in range(1, 9)]
            await asyncio.sleep(1.0)
            proxy.restore()
            finals = [await s.final() for s in streams]
            assert [f.outputs["i"].tolist() for f in finals] == [[i] for i in range(1, 9)]
            executed = worker.runners[("count", 1)].instance.executed
            assert all(executed.count(f.request_id) == 1 for f in finals)
    finally:
        await proxy.close()


async def test_a_hung_operator_is_answered_terminated_and_its_slot_freed(client: Client, workers, rp) -> None:
    worker = await workers("w", operator("stubborn", "Stubborn", max_inflight=1),
                           operator("count", "Counting", max_inflight=1))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await client.operator("stubborn").infer({"i": np.array([1])}, timeout=0.5,
                                                parameters={"delay": 30.0})
    # The worker answers the caller that keeps listening past its deadline too: abandoned, terminated.
    deadline = time.monotonic() + 20
    while worker.abandoned == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert worker.abandoned == 1
    # Its slot is free: the next request runs although the stubborn operator is still busy.
    final = await client.operator("stubborn").infer({"i": np.array([2])}, timeout=30, parameters={"delay": 0.0})
    assert final.outputs["i"].tolist() == [2]
    info = await client.runtime.nc.jetstream().consumer_info(f"TDIST_{rp.namespace}", "stubborn_v1")
    assert info.num_ack_pending == 0 and info.num_pending == 0  # terminated, not redelivered
    assert time.monotonic() - started < 60


async def test_leaving_a_stream_early_cancels_the_request_and_frees_caller_state(client: Client, workers) -> None:
    worker = await workers("w", operator("ann", "Announcing", max_inflight=2, delay=30.0))
    op = client.operator("ann")
    async for response in op.stream({"i": np.array([1])}, timeout=60):
        assert not response.final
        break  # the caller walks away after the first partial response
    await asyncio.sleep(0)  # the generator's finalizer runs
    deadline = time.monotonic() + 10
    instance = worker.runners[("ann", 1)].instance
    while not instance.cancelled and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(instance.cancelled) == 1
    assert client.caller.pending_count == 0


async def test_an_abandoned_response_stream_is_swept_after_its_deadline(client: Client, workers) -> None:
    await workers("w", operator("ann", "Announcing", max_inflight=2, delay=0.2))
    stream = await client.operator("ann").call({"i": np.array([1])}, timeout=0.5)
    del stream  # never read, never closed
    assert client.caller.pending_count == 1
    deadline = time.monotonic() + 15
    while client.caller.pending_count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert client.caller.pending_count == 0


async def test_inputs_of_a_request_no_worker_ran_are_released(nats_config: NatsConfig, deployed: RequestPlaneConfig,
                                                             workers) -> None:
    # A worker existed once (the operator is known), none runs now: the request expires in the queue.
    first = await workers("w", operator("count", "Counting"))
    await first.stop()
    async with Client(nats_config, request_plane=deployed, data_plane=DataPlaneConfig(inline_threshold=1024)) as client:
        big = np.arange(100_000, dtype=np.int64)
        with pytest.raises(DeadlineExceeded):
            await client.operator("count").infer({"x": big}, timeout=0.5)
        plane = await client.data_plane.get()
        deadline = time.monotonic() + 10
        while len(plane.store) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(plane.store) == 0


async def test_a_bad_input_reference_gets_one_error_response_and_is_removed(
    nats_config: NatsConfig, deployed: RequestPlaneConfig, workers
) -> None:
    from tdist.data_plane.descriptor import TensorRef
    from tdist.errors import TensorNotFound

    worker = await workers("w", operator("count", "Counting"))
    async with Client(nats_config, request_plane=deployed) as client:
        plane = await client.data_plane.get()
        bogus = TensorRef(client.component_id, plane.address, "00" * 16, "INT64", (4,), 32, "CPU", 0)
        with pytest.raises(TensorNotFound):
            await client.operator("count").infer({"x": bogus}, timeout=20)
        info = await client.runtime.nc.jetstream().consumer_info(f"TDIST_{deployed.namespace}", "count_v1")
        assert info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0
        final = await client.operator("count").infer({"i": np.array([3])}, timeout=20)
        assert final.worker_id == worker.id
