"""The request-plane contract (docs/architecture.md), point by point, against a real nats-server."""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
import pytest

from tdist import names
from tdist.client import Client
from tdist.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    OperatorError,
    OperatorNotFound,
    PayloadTooLarge,
)
from tdist.request_plane import protocol
from tests.conftest import operator

pytestmark = pytest.mark.timeout(120)


async def test_each_request_answered_exactly_once_across_three_workers(client: Client, workers) -> None:
    started = [await workers(f"w{i}", operator("count", "Counting", max_inflight=8)) for i in range(3)]
    op = client.operator("count")
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> tuple[int, str, int]:
        async with sem:
            stream = await op.call({"i": np.array([i])}, timeout=60)
            finals = [r async for r in stream]
            assert len(finals) == 1 and finals[0].final
            return int(finals[0].outputs["i"][0]), finals[0].worker_id, len(finals)

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert sorted(r[0] for r in results) == list(range(1000))
    served_by = collections.Counter(r[1] for r in results)
    assert set(served_by) == {w.id for w in started}, served_by
    executed = collections.Counter()
    for w in started:
        executed.update(w.runners[("count", 1)].instance.executed)
    assert len(executed) == 1000 and set(executed.values()) == {1}  # no request ran twice


async def test_request_sent_before_any_worker_is_served_once_one_starts(client: Client, workers) -> None:
    # A brand-new operator: the caller says it will wait for a worker to appear.
    stream = await client.operator("late").call({"x": np.arange(3)}, timeout=60, wait_for_operator=True)
    await asyncio.sleep(0.2)  # let it sit in the queue: nothing to assert here, only to wait
    await workers("late", operator("late", "Counting"))
    final = await stream.final()
    assert final.outputs["x"].tolist() == [0, 1, 2]


async def test_known_operator_without_live_workers_queues_requests(client: Client, workers) -> None:
    first = await workers("a", operator("queued", "Counting"))
    await first.stop()
    stream = await client.operator("queued").call({"x": np.array([7])}, timeout=60)
    second = await workers("b", operator("queued", "Counting"))
    final = await stream.final()
    assert final.worker_id == second.id and final.outputs["x"].tolist() == [7]


async def test_max_inflight_is_never_exceeded(client: Client, workers) -> None:
    w = await workers("w", operator("count", "Counting", max_inflight=3, delay=0.02))
    op = client.operator("count")
    await asyncio.gather(*(op.infer({"i": np.array([i])}, timeout=60) for i in range(60)))
    counting = w.runners[("count", 1)].instance
    assert counting.peak == 3
    assert len(counting.executed) == 60


async def test_streaming_partial_responses_then_final(client: Client, workers) -> None:
    await workers("s", operator("stream", "Streaming"))
    responses = [r async for r in client.operator("stream").stream({}, parameters={"count": 5}, timeout=30)]
    assert [r.final for r in responses] == [False] * 5 + [True]
    assert [int(r.outputs["index"][0]) for r in responses[:5]] == [0, 1, 2, 3, 4]
    assert responses[-1].outputs["count"].tolist() == [5]


async def test_deadline_exceeded_and_expired_request_not_started(client: Client, workers) -> None:
    w = await workers("d", operator("slow", "Counting"))
    await w.stop()  # the operator is known, but nobody serves it now
    stream = await client.operator("slow").call({"x": np.array([1])}, timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        await stream.final()
    late = await workers("d2", operator("slow", "Counting"))
    # A fresh request behind the expired one is served; the expired one was dropped unstarted.
    fresh = await client.operator("slow").infer({"x": np.array([2])}, timeout=30)
    assert fresh.outputs["x"].tolist() == [2]
    assert late.runners[("slow", 1)].instance.executed == [fresh.request_id]


async def test_deadline_while_running_stops_the_operator(client: Client, workers) -> None:
    await workers("r", operator("ann", "Announcing", delay=30.0))
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await client.operator("ann").infer({}, timeout=0.5)
    assert time.monotonic() - t0 < 25  # the caller did not wait for the 30 s operator


async def test_cancel_reaches_the_running_operator(client: Client, workers) -> None:
    w = await workers("c", operator("ann", "Announcing", delay=30.0))
    stream = await client.operator("ann").call({}, timeout=60)
    it = stream.__aiter__()
    first = await it.__anext__()
    assert not first.final  # the operator has started
    await stream.cancel()
    with pytest.raises(Cancelled):
        await it.__anext__()
    instance = w.runners[("ann", 1)].instance
    for _ in range(200):
        if instance.cancelled:
            break
        await asyncio.sleep(0.01)
    assert instance.cancelled == [stream.request_id]


async def test_cancel_propagates_to_child_requests(client: Client, workers) -> None:
    await workers("p", operator("parent", "Parent"))
    child_worker = await workers("k", operator("announcing", "Announcing", delay=30.0))
    task = asyncio.create_task(client.operator("parent").infer({}, timeout=60))
    child = child_worker.runners[("announcing", 1)]
    for _ in range(500):
        if child.running:
            break
        await asyncio.sleep(0.01)
    assert child.running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if child.instance.cancelled:
            break
        await asyncio.sleep(0.01)
    assert len(child.instance.cancelled) == 1


async def test_directed_requests_reach_only_their_worker(client: Client, workers) -> None:
    ws = [await workers(f"w{i}", operator("count", "Counting", max_inflight=4)) for i in range(3)]
    target = ws[1]
    op = client.operator("count").to_worker(target.id)
    results = await asyncio.gather(*(op.infer({"i": np.array([i])}, timeout=30) for i in range(40)))
    assert {r.worker_id for r in results} == {target.id}
    assert len(target.runners[("count", 1)].instance.executed) == 40
    for other in (ws[0], ws[2]):
        assert other.runners[("count", 1)].instance.executed == []


async def test_directed_request_for_an_operator_the_worker_lacks(client: Client, workers) -> None:
    w = await workers("w", operator("count", "Counting"))
    with pytest.raises(OperatorNotFound) as info:
        await client.operator("other").to_worker(w.id).infer({}, timeout=30)
    assert w.id in str(info.value)
    assert (await client.operator("count").infer({"x": np.array([1])}, timeout=30)).worker_id == w.id


async def test_unknown_operator_fails_at_once(client: Client, workers) -> None:
    await workers("w", operator("count", "Counting"))
    with pytest.raises(OperatorNotFound, match="nosuchop"):
        await client.operator("nosuchop").call({}, timeout=30)


async def test_operator_error_becomes_error_response_and_worker_keeps_serving(client: Client, workers) -> None:
    await workers("w", operator("boom", "Raising"), operator("count", "Counting"))
    with pytest.raises(OperatorError, match="ValueError: bad value 7") as info:
        await client.operator("boom").infer({}, parameters={"value": 7}, timeout=30)
    assert info.value.details["type"] == "ValueError"
    for _ in range(3):  # the slot was freed each time: max_inflight is 1
        with pytest.raises(OperatorError):
            await client.operator("boom").infer({}, timeout=30)
    assert (await client.operator("count").infer({"x": np.array([5])}, timeout=30)).outputs["x"].tolist() == [5]


async def test_wrong_input_gives_invalid_request(client: Client, workers) -> None:
    await workers("w", operator("needs", "NeedsInput"))
    with pytest.raises(InvalidRequest, match="needs input 'x'"):
        await client.operator("needs").infer({"z": np.array([1])}, timeout=30)
    ok = await client.operator("needs").infer({"x": np.array([2])}, timeout=30)
    assert ok.outputs["y"].tolist() == [4]


async def test_malformed_messages_get_error_responses_and_worker_keeps_serving(client: Client, workers, rp) -> None:
    w = await workers("w", operator("count", "Counting"))
    nc = client.caller.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(f"{inbox}.>")
    subject = names.request_subject(rp.namespace, "count", 1)
    # A readable prefix with a broken header: the worker can answer it.
    reply = f"{inbox}.r.abc123"
    prefix = b"TD\x01Q" + len(reply).to_bytes(2, "little") + reply.encode()
    await nc.publish(subject, prefix + (7).to_bytes(4, "little") + b"{broken")
    msg = await sub.next_msg(timeout=30)
    resp = protocol.decode_response(msg.data)
    assert resp.kind == "error" and resp.error is not None and resp.error.code == "INVALID_REQUEST"
    assert resp.request_id == "abc123" and resp.worker_id == w.id
    # Pure garbage: nobody to answer, but the worker must go on serving.
    await nc.publish(subject, b"\x00garbage")
    assert (await client.operator("count").infer({"x": np.array([3])}, timeout=30)).outputs["x"].tolist() == [3]
    await sub.unsubscribe()


async def test_oversize_message_fails_at_once(client: Client, workers) -> None:
    # Large tensors go by reference (data plane); what cannot (parameters) fails before sending.
    await workers("w", operator("count", "Counting"))
    huge = "x" * (client.caller.max_payload + 1)
    with pytest.raises(PayloadTooLarge) as info:
        await client.operator("count").call({"x": np.arange(3)}, parameters={"blob": huge}, timeout=30)
    assert info.value.details["size"] > info.value.details["max_payload"]


async def test_oversize_inline_tensor_without_data_plane_fails_at_once(client: Client, workers) -> None:
    from tdist.request_plane.caller import Caller

    await workers("w", operator("count", "Counting"))
    bare = await Caller(client.caller.nc, client.request_plane).start()  # no data plane: inline only
    try:
        big = np.zeros(bare.max_payload // 8 + 1, dtype=np.int64)
        with pytest.raises(PayloadTooLarge, match="no data plane"):
            await bare.submit("count", 1, {"x": big}, timeout=30)
    finally:
        await bare.close()


async def test_namespaces_are_isolated(nats_config, workers, rp) -> None:
    from tdist.config import RequestPlaneConfig

    await workers("w", operator("count", "Counting"))
    other = RequestPlaneConfig(namespace=rp.namespace + "x", storage="memory", max_bytes=1 << 20)
    async with Client(nats_config, request_plane=other) as c:
        with pytest.raises(OperatorNotFound):
            await c.operator("count").call({}, timeout=5)
