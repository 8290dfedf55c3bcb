"""The registry view stays right across a reconnect (events missed while cut off)."""

from __future__ import annotations

import dataclasses

import pytest

from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.nats_server import EmbeddedNatsServer
from tdist.registry import WorkerInfo
from tests.conftest import operator
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)


async def test_watch_resyncs_after_reconnect(nats_server: EmbeddedNatsServer, deployed: RequestPlaneConfig, workers) -> None:
    rp = deployed
    host, port = nats_server.url.split("://")[1].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    try:
        async with Client(NatsConfig(servers=(proxy.url,)), request_plane=rp) as client:
            registry = await client.registry()
            async with registry.watch() as watch:
                stays = await workers("stays", operator("count", "Counting"))
                leaves = await workers("leaves", operator("count", "Counting"))
                await watch.wait_for(lambda ws: {stays.id, leaves.id} <= set(ws), timeout=10)
                proxy.cut()  # the client is cut off: it cannot see what happens next
                await leaves.stop()  # deletes its entry while the client is away
                proxy.restore()
                await watch.wait_for(lambda ws: leaves.id not in ws and stays.id in ws, timeout=30)
            assert set(await client.workers()) >= {stays.id}
            assert leaves.id not in await client.workers()
    finally:
        await proxy.close()


async def test_a_revision_delete_spares_an_entry_written_since(nats_config: NatsConfig, deployed: RequestPlaneConfig
                                                               ) -> None:
    """The agent removes a dead worker's entry by its revision: if the restarted process (same
    worker id) registered meanwhile, its entry stays; the dead one's own entry goes."""
    async with Client(nats_config, request_plane=deployed) as client:
        registry = await client.registry()
        async with registry.watch() as watch:
            old = WorkerInfo(id="w-rev", name="w", node="n", pid=111, state="serving", operators=(), started_at=0.0)
            await registry.put(old)
            await watch.wait_for(lambda ws: "w-rev" in ws, timeout=10)
            stale = watch.revisions["w-rev"]
            await registry.put(dataclasses.replace(old, pid=222))  # the restarted process registers
            await watch.wait_for(lambda ws: ws.get("w-rev") is not None and ws["w-rev"].pid == 222, timeout=10)
            assert await registry.delete("w-rev", revision=stale) is False
            assert (await client.workers())["w-rev"].pid == 222
            assert await registry.delete("w-rev", revision=watch.revisions["w-rev"]) is True
            await watch.wait_for(lambda ws: "w-rev" not in ws, timeout=10)
            assert "w-rev" not in await client.workers()
