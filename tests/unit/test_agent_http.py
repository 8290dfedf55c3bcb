"""The agent's HTTP endpoints on a real aiohttp server (127.0.0.1): methods, status codes,
content types, keep-alive, and a port in use."""

from __future__ import annotations

import asyncio
import errno
import http.client
import json
import socket
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from tdist.agent.http_server import HttpServer


class Probe:
    def __init__(self) -> None:
        self.ready = False
        self.scrapes = 0

    def body(self) -> dict[str, Any]:
        return {"ready": self.ready, "workers": {"w-0": "RUNNING"}}

    async def metrics(self) -> bytes:
        self.scrapes += 1
        return b"# HELP x An example.\n# TYPE x gauge\nx 1.0\n"


def exchange(port: int, requests: list[tuple[str, str]]) -> list[tuple[int, dict[str, str], bytes]]:
    """Every request on one connection (keep-alive): (status, headers, body) each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for method, path in requests:
            conn.request(method, path)
            r = conn.getresponse()
            out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
            assert not r.will_close, (method, path)  # the connection stays open for the next one
    finally:
        conn.close()
    return out


@pytest.fixture
async def served():  # type: ignore[no-untyped-def]
    probe = Probe()
    server = HttpServer(probe.body, probe.metrics)
    port = await server.start("127.0.0.1", 0)
    try:
        yield probe, port
    finally:
        await server.close()


async def test_endpoints_methods_and_keep_alive(served) -> None:  # type: ignore[no-untyped-def]
    probe, port = served
    answers = await asyncio.to_thread(exchange, port, [
        ("GET", "/live"), ("GET", "/ready"), ("GET", "/metrics"), ("HEAD", "/metrics"), ("HEAD", "/ready"),
        ("POST", "/metrics"), ("DELETE", "/ready"), ("GET", "/nope"), ("GET", "/live?x=1"),
    ])
    live, ready, metrics, head_metrics, head_ready, post, delete, missing, live_query = answers
    assert live[0] == 200 and live[2] == b"live\n"
    assert ready[0] == 503 and ready[1]["content-type"].startswith("application/json")
    assert json.loads(ready[2]) == {"ready": False, "workers": {"w-0": "RUNNING"}}
    assert metrics[0] == 200 and metrics[1]["content-type"] == CONTENT_TYPE_LATEST
    assert metrics[2].startswith(b"# HELP x")
    assert head_metrics[0] == 200 and head_metrics[2] == b"" and head_metrics[1]["content-type"] == CONTENT_TYPE_LATEST
    assert head_ready[0] == 503 and head_ready[2] == b""
    for answer in (post, delete):
        assert answer[0] == 405 and set(answer[1]["allow"].split(",")) == {"GET", "HEAD"}
    assert missing[0] == 404
    assert live_query[0] == 200
    probe.ready = True
    [(status, _, body)] = await asyncio.to_thread(exchange, port, [("GET", "/ready")])
    assert status == 200 and json.loads(body)["ready"] is True
    assert probe.scrapes == 2


async def test_a_port_in_use_is_an_oserror_with_its_errno() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = HttpServer(Probe().body, Probe().metrics)
        with pytest.raises(OSError) as caught:
            await server.start("127.0.0.1", port)
        assert caught.value.errno == errno.EADDRINUSE
