"""Real tdist-worker processes: killed with SIGKILL, drained with SIGTERM, seen in the registry."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from tdist.client import Client
from tdist.errors import MaxDeliveriesExceeded
from tdist.registry import WorkerInfo
from tests.conftest import WorkerProcesses, operator_flag

pytestmark = pytest.mark.timeout(180)


async def _started(stream, count: int = 1) -> None:  # type: ignore[no-untyped-def]
    it = stream.__aiter__()
    first = await it.__anext__()
    assert not first.final
    return it


async def test_sigkill_loses_no_request_and_no_caller_sees_two_finals(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    victim = worker_processes.start("victim", operator_flag("ann", "Announcing", max_inflight=4, delay=0.3))
    op = client.operator("ann")
    streams = [await op.call({"i": np.array([i])}, timeout=60) for i in range(10)]
    # Four requests are running in the victim (each sent its 'started' partial response).
    iterators = []
    for s in streams[:4]:
        iterators.append(await _started(s))
    worker_processes.kill(victim, signal.SIGKILL)
    victim.proc.wait(10)
    rescuer = worker_processes.start("rescuer", operator_flag("ann", "Announcing", max_inflight=4, delay=0.01))

    async def finals_of(s, it=None):  # type: ignore[no-untyped-def]
        responses = [r async for r in (it if it is not None else s)]
        return [r for r in responses if r.final]

    all_finals = await asyncio.gather(
        *(finals_of(s, iterators[i] if i < 4 else None) for i, s in enumerate(streams))
    )
    for i, finals in enumerate(all_finals):
        assert len(finals) == 1, f"request {i} got {len(finals)} final responses"
        assert finals[0].outputs["i"].tolist() == [i]
    # The four that were running in the victim were redelivered to the rescuer.
    for finals in all_finals[:4]:
        assert finals[0].worker_id == rescuer.worker_id and finals[0].attempt == 2


async def test_request_whose_every_worker_dies_fails_with_max_deliveries(
    client: Client, worker_processes: WorkerProcesses, rp
) -> None:
    stream = await client.operator("ann").call({}, timeout=120, wait_for_operator=True)
    it = None
    for attempt in range(rp.max_deliver):
        wp = worker_processes.start(f"doomed{attempt}", operator_flag("ann", "Announcing", delay=60.0))
        if it is None:
            it = stream.__aiter__()
        first = await it.__anext__()
        assert first.attempt == attempt + 1
        worker_processes.kill(wp)
        wp.proc.wait(10)
    # A healthy worker asks for work: the server finds the request out of tries, tells the caller
    # (max-deliveries advisory) and never hands it to this worker.
    worker_processes.start("healthy", operator_flag("ann", "Announcing", delay=0.01))
    with pytest.raises(MaxDeliveriesExceeded, match="delivered 3 times"):
        await it.__anext__()


async def test_sigterm_drains_in_flight_requests_before_exit(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    wp = worker_processes.start("drainer", operator_flag("ann", "Announcing", max_inflight=3, delay=1.0))
    op = client.operator("ann")
    streams = [await op.call({"i": np.array([i])}, timeout=60) for i in range(3)]
    iterators = [await _started(s) for s in streams]
    worker_processes.kill(wp, signal.SIGTERM)
    finals = []
    for it in iterators:
        rest = [r async for r in it]
        finals.append(rest[-1])
    # Every in-flight request finished in the draining worker, on its first attempt.
    assert [f.outputs["i"].tolist() for f in finals] == [[0], [1], [2]]
    assert all(f.worker_id == wp.worker_id and f.attempt == 1 for f in finals)
    assert await asyncio.to_thread(wp.proc.wait, 30) == 0
    assert wp.worker_id not in await client.workers()  # deregistered on the way out


async def test_registry_shows_a_started_worker_and_forgets_a_killed_one(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    registry = await client.registry()
    async with registry.watch() as watch:
        wp = worker_processes.start("seen", operator_flag("count", "Counting", max_inflight=2), registry_ttl=2.0)
        workers = await watch.wait_for(lambda ws: wp.worker_id in ws, timeout=10)
        info: WorkerInfo = workers[wp.worker_id]
        assert info.state == "serving" and info.pid == wp.pid and info.hosts("count", 1)
        assert info.operators[0].max_inflight == 2
        worker_processes.kill(wp, signal.SIGKILL)
        killed_at = time.monotonic()
        await watch.wait_for(lambda ws: wp.worker_id not in ws, timeout=2.0 + 5.0)
        gone_after = time.monotonic() - killed_at
    print(f"killed worker left the registry {gone_after:.2f} s after SIGKILL (ttl 2 s)")
    assert wp.worker_id not in await client.workers()


async def test_worker_logs_are_json_lines_with_request_context(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    import json

    from tdist.errors import OperatorError

    wp = worker_processes.start("logger", operator_flag("boom", "Raising"))
    stream = await client.operator("boom").call({}, timeout=30)
    with pytest.raises(OperatorError):
        await stream.final()
    worker_processes.kill(wp, signal.SIGTERM)
    assert await asyncio.to_thread(wp.proc.wait, 30) == 0
    lines = (worker_processes.log_dir / f"{wp.worker_id}.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    raised = [e for e in events if e["event"] == "operator_raised"]
    assert len(raised) == 1
    assert raised[0]["request_id"] == stream.request_id
    assert raised[0]["trace_id"] == stream.request_id  # a top-level request starts its own trace
    assert raised[0]["operator"] == "boom" and raised[0]["worker"] == wp.worker_id
    assert raised[0]["level"] == "warning" and "timestamp" in raised[0]
