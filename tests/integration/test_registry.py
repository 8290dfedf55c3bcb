"""The registry view stays right across a reconnect (events missed while cut off)."""

from __future__ import annotations

import pytest

from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.nats_server import EmbeddedNatsServer
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
