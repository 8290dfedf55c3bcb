"""A batch split by a worker that then dies: the max-deliveries advisory of the batch fails only
the request the dead worker held; the requests it handed back are served elsewhere. Real
worker processes, a real SIGKILL, a real nats-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import RequestPlaneConfig
from tdist.errors import MaxDeliveriesExceeded
from tests.conftest import WorkerProcesses, operator_flag

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rp(namespace: str) -> RequestPlaneConfig:
    """One delivery per message: a batch whose worker dies is out of tries at once."""
    return RequestPlaneConfig(namespace=namespace, ack_wait=2.0, max_deliver=1, storage="memory", max_age=600,
                              max_bytes=16 << 20)


async def test_a_dead_workers_batch_fails_only_what_it_held(client: Client, worker_processes: WorkerProcesses) -> None:
    # Something else in flight: all three requests below go out together, as one batch.
    elsewhere = await client.operator("nobody").call({}, timeout=60, wait_for_operator=True)
    victim = worker_processes.start("victim", operator_flag("ann", "Announcing", max_inflight=1, delay=60.0))
    await client.wait_for_workers("ann", timeout=30)
    op = client.operator("ann")
    streams = [await op.call({"i": np.array([i])}, timeout=60) for i in range(3)]
    it = streams[0].__aiter__()
    started = await it.__anext__()  # the victim took the first (its only slot) and handed the rest back
    assert not started.final
    pendings = [client.caller._pending[s.request_id] for s in streams]
    batch_seq = pendings[0].stream_seq
    for _ in range(200):  # the victim's split notice: the other two now live at a sequence of their own
        if all(p.stream_seq not in (None, batch_seq) for p in pendings[1:]):
            break
        await asyncio.sleep(0.05)
    assert client.caller.batches == 1
    assert pendings[1].stream_seq == pendings[2].stream_seq != batch_seq

    worker_processes.kill(victim)
    victim.proc.wait(10)
    rescuer = worker_processes.start("rescuer", operator_flag("ann", "Announcing", max_inflight=4, delay=0.01))

    with pytest.raises(MaxDeliveriesExceeded):
        async for _ in it:
            pass
    for i, stream in enumerate(streams[1:], start=1):
        final = await stream.final()
        assert final.outputs["i"].tolist() == [i] and final.worker_id == rescuer.worker_id and final.attempt == 1
    await elsewhere.aclose()
