"""The agent's HTTP endpoints, on aiohttp: ``/live``, ``/ready`` and ``/metrics``.

- ``GET``/``HEAD /live``: 200 ``live`` while the agent's event loop answers;
- ``GET``/``HEAD /ready``: the agent's state as JSON, 200 when ready, 503 otherwise;
- ``GET``/``HEAD /metrics``: the node's metrics in Prometheus' text format
  (``prometheus_client.CONTENT_TYPE_LATEST``);
- any other method on these paths: 405 with ``Allow: GET,HEAD``; any other path: 404.

Connections are kept alive (HTTP/1.1, aiohttp's 75 s idle timeout), so a scraper reuses
one. The socket is bound by ``start`` with the same call ``asyncio.start_server`` makes
(``loop.create_server``, ``SO_REUSEADDR``): a port in use fails there, with the OSError's
errno. No access log: a scrape every second would drown the agent's own lines.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

SHUTDOWN_TIMEOUT = 2.0
"""Seconds ``close`` waits for requests being answered (each answer is built in memory at once)."""

ReadyProbe = Callable[[], dict[str, Any]]
"""-> /ready's JSON body; its ``ready`` key decides 200 or 503."""
MetricsProbe = Callable[[], Awaitable[bytes]]


class HttpServer:
    def __init__(self, ready: ReadyProbe, metrics: MetricsProbe) -> None:
        self._ready = ready
        self._metrics = metrics
        app = web.Application()
        app.router.add_get("/live", self._live)
        app.router.add_get("/ready", self._ready_handler)
        app.router.add_get("/metrics", self._metrics_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0: a free port) and serve; the port bound. OSError if it cannot bind."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        """Stop listening, finish the answers under way (at most SHUTDOWN_TIMEOUT s), close connections."""
        await self._runner.cleanup()

    async def _live(self, _: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def _ready_handler(self, _: web.Request) -> web.Response:
        body = self._ready()
        return web.Response(text=json.dumps(body) + "\n", status=200 if body.get("ready") else 503,
                            content_type="application/json")

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        return web.Response(body=await self._metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})
