"""A real Prometheus (Debian's package, tests/support/prometheus.py) scrapes a real agent with two
workers every second; after 200 requests its HTTP API answers the p99 request latency with a number.

Prometheus starts before the requests: ``rate()`` needs samples from before and after them (started
after, it sees flat counters, and the quantile of no increase is NaN)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from tests.integration.test_metrics import send_requests, start_agent
from tests.support.agent import cleanup
from tests.support.prometheus import PrometheusServer, ensure_prometheus

pytestmark = pytest.mark.timeout(600)

P99 = "histogram_quantile(0.99, sum by (le) (rate(tdist_request_duration_seconds_bucket[1m])))"


async def value_when(server: PrometheusServer, expr: str, check, timeout: float = 60) -> float:  # type: ignore[no-untyped-def]
    """The scalar value of ``expr`` once it has one element passing ``check``."""
    result: list = []  # type: ignore[type-arg]
    for _ in range(int(timeout * 4)):
        result = await asyncio.to_thread(server.query, expr)
        if len(result) == 1 and check(float(result[0]["value"][1])):
            return float(result[0]["value"][1])
        await asyncio.sleep(0.25)
    raise AssertionError(f"{expr}: {result}; prometheus said: {server.output()[-2000:]}")


async def test_prometheus_scrapes_the_agent_and_answers_the_p99_latency(tmp_path: Path, namespace: str,
                                                                      nats_server) -> None:  # type: ignore[no-untyped-def]
    binary = await asyncio.to_thread(ensure_prometheus)
    agent = start_agent(tmp_path, namespace, nats_server.url)
    server: PrometheusServer | None = None
    try:
        await agent.wait_ready()
        server = PrometheusServer(binary, tmp_path / "prometheus", [f"127.0.0.1:{agent.port}"], interval=1.0)
        await asyncio.to_thread(server.wait_ready)
        # A first scrape, before any request: the target is up and the histograms' series exist.
        await value_when(server, 'up{job="tdist"}', lambda v: v == 1)
        await value_when(server, "count(tdist_request_duration_seconds_bucket)", lambda v: v > 0)

        sent = await send_requests(namespace, nats_server.url)
        await value_when(server, "sum(tdist_request_duration_seconds_count)", lambda v: v >= sent)
        p99 = await value_when(server, P99, lambda v: not math.isnan(v))
        assert 0 < p99 <= 60, p99  # within the buckets' range (the last finite bound is 60 s)
        # And the agent's own families made it too.
        assert await value_when(server, "tdist_agent_ready", lambda v: v == 1) == 1
    finally:
        if server is not None:
            server.stop()
        cleanup(tmp_path / "state", agent)
