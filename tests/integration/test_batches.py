"""Batches: requests of one loop pass share one stream message; a worker takes only what its slots
allow and hands the rest back; every request is still answered once. Against a real nats-server."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import nats
import numpy as np
import pytest

from tdist import names
from tdist.client import Client
from tdist.config import DataPlaneConfig, NatsConfig, RequestPlaneConfig
from tdist.errors import Cancelled
from tdist.nats_server import EmbeddedNatsServer
from tdist.request_plane import protocol
from tests.conftest import operator

pytestmark = pytest.mark.timeout(120)


async def stream_state(client: Client) -> Any:
    return (await client.caller.js.stream_info(names.stream_name(client.request_plane.namespace))).state


async def until_stream_empty(client: Client) -> Any:
    for _ in range(400):
        state = await stream_state(client)
        if state.messages == 0:
            return state
        await asyncio.sleep(0.05)
    return await stream_state(client)


async def test_requests_of_one_pass_share_stream_messages_and_each_is_answered_once(client: Client, workers) -> None:
    worker = await workers("w", operator("count", "Counting", max_inflight=64))
    op = client.operator("count")
    await op.infer({"i": np.array([-1])}, timeout=30)
    before = (await stream_state(client)).last_seq

    results = await asyncio.gather(*(op.infer({"i": np.array([i])}, timeout=60) for i in range(300)))

    assert [int(r.outputs["i"][0]) for r in results] == list(range(300))
    stored = (await stream_state(client)).last_seq - before
    assert client.caller.batches >= 1
    assert stored < 300  # fewer stream messages than requests: the server stored batches
    executed = collections.Counter(worker.runners[("count", 1)].instance.executed)
    assert len(executed) == 301 and set(executed.values()) == {1}
    assert (await until_stream_empty(client)).messages == 0
    assert client.caller.pending_count == 0


async def test_a_batch_beyond_the_free_slots_is_handed_back_and_served_elsewhere(client: Client, workers) -> None:
    started = [await workers(f"w{i}", operator("slow", "Counting", max_inflight=1, delay=0.3)) for i in range(2)]
    op = client.operator("slow")
    assert await client.caller.operator_exists("slow", 1)  # known: the six submits need not wait, one pass

    results = await asyncio.gather(*(op.infer({"i": np.array([i])}, timeout=60) for i in range(6)))

    assert [int(r.outputs["i"][0]) for r in results] == list(range(6))
    assert client.caller.batches >= 1
    assert sum(w.batches_split for w in started) >= 1
    # The split told the caller the workers' slots: its next batches to them are no larger.
    assert client.caller._batch_cap(names.request_subject(client.request_plane.namespace, "slow", 1)) == 1
    served_by = collections.Counter(r.worker_id for r in results)
    assert set(served_by) == {w.id for w in started}, served_by  # load-aware: both workers served
    executed = collections.Counter()
    for w in started:
        counting = w.runners[("slow", 1)].instance
        assert counting.peak == 1  # never more than max_inflight at once
        executed.update(counting.executed)
    assert len(executed) == 6 and set(executed.values()) == {1}
    assert (await until_stream_empty(client)).messages == 0


async def test_a_cancelled_member_does_not_run_and_its_batch_mates_do(client: Client, workers) -> None:
    worker = await workers("w", operator("slow", "Counting", max_inflight=1, delay=0.3))
    op = client.operator("slow")
    assert await client.caller.operator_exists("slow", 1)
    streams = [await op.call({"i": np.array([i])}, timeout=60) for i in range(3)]  # one pass: 1 alone, 2 batched
    for _ in range(100):  # the pass ends and the two go out as one batch (a cancel before that would leave one)
        if client.caller.batches:
            break
        await asyncio.sleep(0)
    assert client.caller.batches == 1
    await streams[2].cancel()
    with pytest.raises(Cancelled):
        await streams[2].final()
    finals = [await s.final() for s in streams[:2]]

    assert [f.outputs["i"].tolist() for f in finals] == [[0], [1]]
    assert client.caller.batches == 1
    counting = worker.runners[("slow", 1)].instance
    assert streams[2].request_id not in counting.executed
    assert (await until_stream_empty(client)).messages == 0


async def test_a_malformed_batch_is_dropped_and_a_bad_member_gets_its_own_error(
    nats_server: EmbeddedNatsServer, rp: RequestPlaneConfig, client: Client, workers
) -> None:
    await workers("w", operator("count", "Counting", max_inflight=4))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        inbox = nc.new_inbox()
        responses: dict[str, list[protocol.ResponseMessage]] = collections.defaultdict(list)
        both = asyncio.Event()

        async def on_response(msg: Any) -> None:
            responses[msg.subject.rsplit(".", 1)[-1]].append(protocol.decode_response(msg.data))
            if {"good", "bad"} <= set(responses):
                both.set()

        await nc.subscribe(f"{inbox}.>", cb=on_response)
        subject = names.request_subject(rp.namespace, "count", 1)
        good = protocol.encode_request(protocol.RequestMessage(
            "good", "good", "count", 1, 4e9, f"{inbox}.r.good", inputs={"i": np.array([7])}))
        head = json.dumps({"id": "bad", "trace": "bad", "op": "count", "ver": 1, "deadline": "soon"}).encode()
        bad = (b"TD\x01Q" + struct.pack("<H", len(f"{inbox}.r.bad")) + f"{inbox}.r.bad".encode()
               + struct.pack("<I", len(head)) + head)
        await js.publish(subject, protocol.encode_batch([good, bad]))
        await js.publish(subject, b"TD\x01B\x00\x00" + struct.pack("<I", 3) + b"\x01")  # truncated: nobody to answer
        await asyncio.wait_for(both.wait(), 30)

        [ok] = responses["good"]
        assert ok.kind == "final" and ok.outputs["i"].tolist() == [7]
        [err] = responses["bad"]
        assert err.kind == "error" and err.error is not None and err.error.code == "INVALID_REQUEST"
        assert (await until_stream_empty(client)).messages == 0
        final = await client.operator("count").infer({"i": np.array([1])}, timeout=30)  # still serving
        assert final.outputs["i"].tolist() == [1]
    finally:
        await nc.close()


class FinalsSpy:
    """The shared-finals messages (``<inbox>.b.<count>``) that reach a caller's inbox."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.sizes: list[int] = []

    async def on_finals(self, msg: Any) -> None:
        self.counts.append(len(protocol.split_batch(msg.data)))
        self.sizes.append(len(msg.data))

    async def until_some(self) -> None:
        for _ in range(200):
            if self.counts:
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def finals_spy(nats_server: EmbeddedNatsServer, client: Client) -> AsyncIterator[FinalsSpy]:
    nc = await nats.connect(nats_server.url)
    try:
        spy = FinalsSpy()
        await nc.subscribe(f"{client.caller._inbox}.b.*", cb=spy.on_finals)  # names.finals_subject
        await nc.flush()
        yield spy
    finally:
        await nc.close()


async def test_finals_of_one_pass_reach_their_caller_in_shared_messages(
    nats_server: EmbeddedNatsServer, client: Client, workers
) -> None:
    worker = await workers("w", operator("count", "Counting", max_inflight=64))
    op = client.operator("count")
    await op.infer({"i": np.array([-1])}, timeout=30)
    async with finals_spy(nats_server, client) as spy:
        results = await asyncio.gather(*(op.infer({"i": np.array([i])}, timeout=60) for i in range(300)))

        assert [int(r.outputs["i"][0]) for r in results] == list(range(300))
        await spy.until_some()
        assert max(spy.counts, default=0) > 1  # several finals in one message
        assert sum(spy.counts) <= 300
    executed = collections.Counter(worker.runners[("count", 1)].instance.executed)
    assert len(executed) == 301 and set(executed.values()) == {1}
    assert (await until_stream_empty(client)).messages == 0  # every request acknowledged
    assert client.caller.pending_count == 0


async def test_finals_too_large_for_one_message_together_go_in_several(
    nats_server: EmbeddedNatsServer, deployed: RequestPlaneConfig, workers
) -> None:
    size = 200 << 10  # inline on both sides: 16 finals of a pass are 3.2 MB, a message at most 1 MiB
    # (48 requests: 9.6 MB, within the test stream's 16 MiB)
    inline = DataPlaneConfig(inline_threshold=256 << 10)
    await workers("w", operator("count", "Counting", max_inflight=64), data_plane=inline)
    async with Client(NatsConfig(servers=(nats_server.url,)), request_plane=deployed, data_plane=inline) as client:
        op = client.operator("count")
        async with finals_spy(nats_server, client) as spy:
            results = await asyncio.gather(*(op.infer({"x": np.full(size, i, np.uint8)}, timeout=60)
                                             for i in range(48)))

            for i, result in enumerate(results):
                x = result.outputs["x"]
                assert x.nbytes == size and int(x.min()) == int(x.max()) == i
            await spy.until_some()
            assert max(spy.counts, default=0) > 1
            assert max(spy.sizes) <= client.caller.max_payload
        assert (await until_stream_empty(client)).messages == 0


async def test_junk_on_the_shared_finals_subject_is_ignored(
    nats_server: EmbeddedNatsServer, client: Client, workers
) -> None:
    await workers("w", operator("count", "Counting", max_inflight=4))
    op = client.operator("count")
    stray = protocol.encode_response(protocol.ResponseMessage("nobody", "final", "w", 1, {"i": np.array([9])}))
    nc = await nats.connect(nats_server.url)
    try:
        subject = names.finals_subject(client.caller._inbox, 2)  # type: ignore[attr-defined]
        for junk in (b"", b"TD\x01B", protocol.encode_batch([stray, b"not a response"]), b"\x00" * 100):
            client.caller._on_finals(junk)  # type: ignore[attr-defined]  # raises if it does not cope
            await nc.publish(subject, junk)  # and through the subscription
        await nc.flush()
        final = await op.infer({"i": np.array([5])}, timeout=30)
        assert final.outputs["i"].tolist() == [5]
        assert client.caller.pending_count == 0
    finally:
        await nc.close()


async def test_one_request_at_a_time_is_never_batched(client: Client, workers) -> None:
    await workers("w", operator("count", "Counting", max_inflight=4))
    op = client.operator("count")
    for i in range(20):
        await op.infer({"i": np.array([i])}, timeout=30)
    assert client.caller.batches == 0
