"""The node's /metrics: real processes write tdist.metrics in multiprocess mode, the agent's
registry merges them with its own families; a dead process's live gauges are dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tdist.agent import exposition
from tdist.agent.daemon import Agent

ETC = Path(__file__).resolve().parents[2] / "etc" / "tdist" / "agent.toml"

# A worker's use of tdist.metrics: one request ok, one failed, two in flight; then it waits.
CHILD = """
import sys
from tdist import metrics
metrics.REQUESTS.labels("op", "1", "ok").inc()
metrics.REQUESTS.labels("op", "1", "operator_error").inc()
metrics.RUN_SECONDS.labels("op").observe(0.003)
metrics.IN_FLIGHT.labels("op").inc(2)
metrics.DATA_PLANE_BYTES.labels("pulled").inc(1000)
print("ready", flush=True)
sys.stdin.read()
"""


def spawn(directory: str) -> subprocess.Popen[str]:
    env = {**os.environ, exposition.ENV: directory}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


async def samples(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = list(text_string_to_metric_families((await agent.metrics()).decode()))
    assert all(f.documentation and f.documentation != "Multiprocess metric" for f in families), \
        [f.name for f in families if not f.documentation]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    for stream in (proc.stdin, proc.stdout):
        if stream:
            stream.close()


def test_fresh_dir_is_private_and_empty(tmp_path: Path) -> None:
    old = tmp_path / "metrics"
    old.mkdir()
    (old / "counter_123.db").write_bytes(b"old")
    path = exposition.fresh_dir(str(tmp_path))
    assert path == str(old) and os.listdir(path) == []
    assert os.stat(path).st_mode & 0o777 == 0o700


async def test_workers_metrics_are_merged_and_a_dead_workers_live_gauges_dropped(tmp_path: Path) -> None:
    agent = Agent(str(ETC))
    path = exposition.fresh_dir(str(tmp_path))
    agent.node_metrics = exposition.NodeMetrics(agent, path)
    first = spawn(path)
    second = spawn(path)
    try:
        got = await samples(agent)
        ok = ("tdist_requests_total", (("operator", "op"), ("outcome", "ok"), ("version", "1")))
        failed = ("tdist_requests_total", (("operator", "op"), ("outcome", "operator_error"), ("version", "1")))
        in_flight = ("tdist_requests_in_flight", (("operator", "op"),))
        assert got[ok] == 2 and got[failed] == 2
        assert got[("tdist_request_duration_seconds_count", (("operator", "op"),))] == 2
        assert got[in_flight] == 4
        assert got[("tdist_data_plane_bytes_total", (("direction", "pulled"),))] == 2000
        python = ".".join(map(str, sys.version_info[:3]))
        assert got[("tdist_build_info", (("python", python), ("version", metadata.version("tdist"))))] == 1
        assert ("tdist_agent_ready", ()) in got

        stop(first)
        assert exposition.sweep(path, keep=[second.pid]) == [first.pid]
        got = await samples(agent)
        assert got[in_flight] == 2  # only the live process's requests are in flight
        assert got[ok] == 2  # counters of the dead process stay (they survive a restart)

        exposition.process_gone(path, second.pid)  # the tick saw it go
        assert exposition.sweep(path) == []
        assert (await samples(agent)).get(in_flight, 0) == 0
    finally:
        stop(first)
        stop(second)
