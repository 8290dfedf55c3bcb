"""A soak: 20,000 requests through a real worker process; memory flat, nothing left behind."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import DataPlaneConfig, NatsConfig, RequestPlaneConfig
from tests.conftest import WorkerProcesses, operator_flag

pytestmark = pytest.mark.timeout(600)

TOTAL = 20_000
CONCURRENCY = 32


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _consumers(client: Client, stream: str) -> int:
    return len(await client.runtime.nc.jetstream().consumers_info(stream))


async def test_twenty_thousand_requests_leave_memory_flat_and_nothing_behind(
    nats_config: NatsConfig, deployed: RequestPlaneConfig, worker_processes: WorkerProcesses
) -> None:
    rp = deployed
    # A TTL well above a heartbeat delayed by the load (the default 2 s can lapse on a busy machine).
    wp = worker_processes.start("soak", operator_flag("echo", "Counting", max_inflight=CONCURRENCY), registry_ttl=10.0,
                                extra=["--inline-threshold", "4096"])
    async with Client(nats_config, request_plane=rp, data_plane=DataPlaneConfig(inline_threshold=4096)) as client:
        op = client.operator("echo")
        small = np.arange(16, dtype=np.int64)
        large = np.arange(2048, dtype=np.int64)  # 16 KiB: by reference both ways

        async def run(count: int, offset: int) -> None:
            """CONCURRENCY loops share the count (no task per request: the driver itself stays flat)."""
            indices = iter(range(offset, offset + count))

            async def loop() -> None:
                for i in indices:
                    await one(i)

            async def one(i: int) -> None:
                if i % 100 == 0:  # a by-reference round trip
                    out = await op.infer({"x": large}, timeout=60)
                    assert int(out.outputs["x"][-1]) == 2047
                elif i % 250 == 1:  # a caller that walks away after the request is sent
                    stream = await op.call({"x": small}, timeout=60)
                    await stream.aclose()
                elif i % 500 == 2:  # the registry as a client lists it
                    assert wp.worker_id in await client.workers()
                else:
                    out = await op.infer({"x": small}, timeout=60)
                    assert out.outputs["x"].tolist() == small.tolist()

            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))

        await run(2_000, 0)  # warm up: imports, buffers, caches
        workers_stream = f"KV_tdist_{rp.namespace}_workers"
        start = {
            "worker_rss": rss_mib(wp.pid),
            "client_rss": rss_mib(),
            "registry_consumers": await _consumers(client, workers_stream),
            "request_consumers": await _consumers(client, f"TDIST_{rp.namespace}"),
        }
        await run(TOTAL, 2_000)
        await asyncio.sleep(1.0)  # releases and cancels settle
        end = {
            "worker_rss": rss_mib(wp.pid),
            "client_rss": rss_mib(),
            "registry_consumers": await _consumers(client, workers_stream),
            "request_consumers": await _consumers(client, f"TDIST_{rp.namespace}"),
        }
        info = await client.runtime.nc.jetstream().stream_info(f"TDIST_{rp.namespace}")
        plane = await client.data_plane.get()
        print(f"\nsoak of {TOTAL}: start {start} end {end}; stream messages {info.state.messages}; "
              f"client store {len(plane.store)}; client peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
        assert end["worker_rss"] - start["worker_rss"] < 25
        assert end["client_rss"] - start["client_rss"] < 25
        assert end["registry_consumers"] == start["registry_consumers"]
        assert end["request_consumers"] == start["request_consumers"]
        assert info.state.messages == 0
        assert len(plane.store) == 0
        assert client.caller.pending_count == 0
        workers = await client.workers()
        assert workers[wp.worker_id].tensors_held == 0 or await _eventually_empty(client, wp.worker_id)


async def _eventually_empty(client: Client, worker_id: str) -> bool:
    for _ in range(40):  # the next heartbeat shows the worker's store
        await asyncio.sleep(0.25)
        if (await client.workers())[worker_id].tensors_held == 0:
            return True
    return False
