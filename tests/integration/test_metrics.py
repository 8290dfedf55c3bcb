"""What an operator finds after 200 requests through a real agent with two workers: its /metrics
parses with prometheus_client, every family has HELP, the request-duration histogram counts them
all, requests are counted by outcome, the data plane's bytes are there; every ``*.log`` in the
log dir is JSON lines, and at least 200 lines carry a request id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.errors import TdistError
from tests.support.agent import AgentProcess, agent_toml, cleanup

pytestmark = pytest.mark.timeout(300)

REQUESTS = 200
BIG = np.arange(64 << 10, dtype=np.int32)  # 256 KiB: above the 64 KiB inline threshold, so by reference
BY_REFERENCE = 5
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def start_agent(tmp: Path, namespace: str, nats_url: str) -> AgentProcess:
    """An agent with two workers of the ``Counting`` operator ``op`` (logs in ``tmp/logs``)."""
    config = tmp / "agent.toml"
    config.write_text(agent_toml(tmp, namespace=namespace, count=2, nats=f'servers = ["{nats_url}"]'))
    return AgentProcess(config)


async def send_requests(namespace: str, nats_url: str) -> int:
    """REQUESTS small requests (16 at a time), BY_REFERENCE large ones, one that fails in the
    operator; the number of requests sent."""
    rp = RequestPlaneConfig(namespace=namespace, ack_wait=3.0, storage="memory", max_bytes=16 << 20)
    async with Client(NatsConfig(servers=(nats_url,)), request_plane=rp) as client:
        op = client.operator("op")
        slots = asyncio.Semaphore(16)

        async def one(i: int) -> list[int]:
            async with slots:
                return (await op.infer({"i": np.array([i])}, timeout=60)).outputs["i"].tolist()

        assert await asyncio.gather(*(one(i) for i in range(REQUESTS))) == [[i] for i in range(REQUESTS)]
        for _ in range(BY_REFERENCE):
            assert np.array_equal((await op.infer({"x": BIG}, timeout=60)).outputs["x"], BIG)
        with pytest.raises(TdistError):  # Counting reads its delay as a float: an operator error
            await op.infer({"i": np.array([0])}, parameters={"delay": "not a number"}, timeout=60)
    return REQUESTS + BY_REFERENCE + 1


def parse(text: str) -> tuple[list, Samples]:  # type: ignore[type-arg]
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return families, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def scrape_until(agent: AgentProcess, check: Callable[[Samples], bool], timeout: float = 30) -> Samples:
    """The workers count a request just after its response leaves: scrape until ``check`` holds."""
    samples: Samples = {}
    for _ in range(int(timeout * 10)):
        _, samples = parse(agent.get("/metrics")[1])
        if check(samples):
            return samples
        await asyncio.sleep(0.1)
    return samples


async def test_metrics_and_logs_after_200_requests(tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(tmp_path, namespace, nats_server.url)
    try:
        await agent.wait_ready()
        sent = await send_requests(namespace, nats_server.url)
        samples = await scrape_until(agent, lambda s: total(s, "tdist_request_duration_seconds_count") >= sent
                                     and ("tdist_queue_depth", (("operator", "op"), ("version", "1"))) in s)

        status, text = agent.get("/metrics")
        assert status == 200
        families, _ = parse(text)
        undocumented = [f.name for f in families if not f.documentation.strip()]
        assert undocumented == []
        kinds = {f.name: f.type for f in families}
        assert kinds["tdist_request_duration_seconds"] == "histogram"
        assert kinds["tdist_request_queue_seconds"] == "histogram"

        op = {"operator": "op"}
        assert total(samples, "tdist_request_duration_seconds_count", **op) >= sent
        assert total(samples, "tdist_request_duration_seconds_bucket", le="+Inf", **op) >= sent
        assert total(samples, "tdist_request_queue_seconds_count", **op) >= sent
        assert total(samples, "tdist_requests_total", outcome="ok", version="1", **op) == sent - 1
        failed = {ls for (n, ls), v in samples.items() if n == "tdist_requests_total" and ("outcome", "ok") not in ls}
        assert len(failed) == 1 and total(samples, "tdist_requests_total", **op) == sent
        assert total(samples, "tdist_requests_in_flight", **op) == 0
        assert samples[("tdist_queue_depth", (("operator", "op"), ("version", "1")))] == 0
        # The workers pulled the large inputs from the client. (On one host the client reads the
        # workers' outputs from their shared memory: nothing is "served" over the wire then.)
        assert total(samples, "tdist_data_plane_bytes_total", direction="pulled") >= BY_REFERENCE * BIG.nbytes
        assert total(samples, "tdist_data_plane_pulls_total") >= BY_REFERENCE
        assert samples[("tdist_agent_workers", (("state", "RUNNING"),))] == 2
        assert samples[("tdist_agent_ready", ())] == 1
        assert total(samples, "tdist_build_info") == 1

        logs = sorted((tmp_path / "logs").glob("*.log"))
        assert [p.name for p in logs] == ["w-0.log", "w-1.log"]
        with_request_id = 0
        for path in logs:
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise AssertionError(f"{path.name}:{number} is not JSON: {line!r}") from None
                assert isinstance(record, dict), (path.name, number)
                with_request_id += bool(record.get("request_id"))
        assert with_request_id >= REQUESTS
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    finally:
        cleanup(tmp_path / "state", agent)
