"""Zero loss across NATS restarts: a real nats-server SIGKILLed or SIGTERMed under load.

The server restarts on the same port and store. Every request in flight must get
exactly one correct final result; the test prints how many were published again
(no PubAck), re-sent (final lost), replayed by a worker and run twice.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.process import free_port
from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tdist.request_plane.deploy import deploy
from tests.conftest import operator

pytestmark = pytest.mark.timeout(240)


class RestartableNats:
    """One nats-server at a fixed port and store, restarted by a real signal."""

    def __init__(self, store: Path) -> None:
        self.options = NatsServerOptions(port=free_port(), store_dir=str(store))
        self.server = EmbeddedNatsServer(self.options).start()
        self.url = self.server.url

    def restart(self, sig: int, down_for: float = 1.0) -> None:
        pid = self.server.pid
        assert pid is not None
        os.kill(pid, sig)
        assert self.server._proc is not None
        self.server._proc.wait(30)
        self.server.stop()
        time.sleep(down_for)
        self.server = EmbeddedNatsServer(self.options).start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def restartable_nats(tmp_path: Path) -> Iterator[RestartableNats]:
    nats = RestartableNats(tmp_path / "jetstream")
    try:
        yield nats
    finally:
        nats.stop()


@pytest.mark.parametrize("sig,inflight", [
    (signal.SIGKILL, 16), (signal.SIGTERM, 16), (signal.SIGKILL, 64), (signal.SIGTERM, 64),
], ids=["SIGKILL-16", "SIGTERM-16", "SIGKILL-64", "SIGTERM-64"])
async def test_every_request_in_flight_gets_exactly_one_final_across_a_restart(
    restartable_nats: RestartableNats, namespace: str, workers, sig: int, inflight: int
) -> None:
    from tdist.config import WorkerConfig
    from tdist.worker.worker import Worker

    nats = NatsConfig(servers=(restartable_nats.url,), ping_interval=1.0, max_outstanding_pings=2)
    rp = RequestPlaneConfig(namespace=namespace, ack_wait=5.0, max_deliver=5, storage="file", max_age=600)
    await deploy(nats, rp)
    started = []
    try:
        for name in ("a", "b"):
            cfg = WorkerConfig(name=name, operators=(operator("slow", "Counting", max_inflight=inflight // 2,
                                                              delay=0.2),),
                               registry_ttl=5.0, drain_timeout=10.0)
            worker = Worker(cfg, nats=nats, request_plane=rp)
            started.append(worker)
            await worker.start()
        async with Client(nats, request_plane=rp) as client:
            op = client.operator("slow")
            per_loop = 4
            results: dict[int, list[int]] = {}

            async def loop(index: int) -> None:
                for k in range(per_loop):
                    i = index * per_loop + k
                    final = await op.infer({"i": np.array([i])}, timeout=90)
                    results.setdefault(i, []).append(int(final.outputs["i"][0]))

            loops = asyncio.gather(*(loop(j) for j in range(inflight)))
            await asyncio.sleep(0.5)  # requests running and queued
            await asyncio.to_thread(restartable_nats.restart, sig)
            await loops

            expected = inflight * per_loop
            assert sorted(results) == list(range(expected))
            assert all(v == [i] for i, v in results.items())
            assert client.caller.pending_count == 0

            runs = collections.Counter(rid for w in started for rid in w.runners[("slow", 1)].instance.executed)
            rerun = sum(c - 1 for c in runs.values())
            print(f"\n{signal.Signals(sig).name} at {inflight} in flight: {expected} requests, "
                  f"republished={client.caller.republished} resent={client.caller.resent} "
                  f"replayed={sum(w.replayed for w in started)} rerun={rerun} "
                  f"duplicates_dropped={sum(w.duplicates for w in started)} "
                  f"reconnects={client.runtime.reconnects}")
            assert client.runtime.reconnects >= 1
            # Nothing left in the work queue once the copies re-sent for lost finals are answered
            # (replayed) or dropped: they may still be queued when the last caller is answered.
            js = client.runtime.nc.jetstream()
            deadline = time.monotonic() + 60
            while (left := (await js.stream_info(f"TDIST_{namespace}")).state.messages) and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            assert left == 0
    finally:
        for worker in started:
            await worker.stop()
