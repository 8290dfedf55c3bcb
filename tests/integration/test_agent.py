"""tdist-agent as a real process: supervisord, GPUs, registry, HTTP, SIGHUP, SIGTERM, restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tdist.agent.processes import marked_pids
from tdist.client import Client
from tdist.process import alive
from tests.support.agent import AgentProcess, agent_toml, cleanup

pytestmark = pytest.mark.timeout(300)


def config_text(tmp: Path, nats_url: str, namespace: str, count: int) -> str:
    """``count`` instances of ``op`` (Announcing, 1 s), one GPU each, the canary at its defaults."""
    return agent_toml(tmp, nats=f'servers = ["{nats_url}"]', namespace=namespace, count=count, gpus=count,
                      operator="Announcing", delay=1.0, drain_timeout=30.0, canary="", ack_wait=5.0)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def supervised_pids(state: Path) -> list[int]:
    from tdist.agent.supervisor_rpc import SupervisorClient

    try:
        return [i["pid"] for i in SupervisorClient(str(state / "supervisor.sock")).all_process_info() if i["pid"]]
    except Exception:
        return []


async def workers_of(client: Client) -> dict:  # type: ignore[type-arg]
    return {w.id: w for w in (await client.workers()).values() if w.node == "testnode" and w.state == "serving"}


async def test_agent_end_to_end(tmp_path: Path, nats_server, namespace: str, client: Client) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(config_text(tmp_path, nats_server.url, namespace, 2))
    agent = AgentProcess(config)
    try:
        assert agent.get("/live")[0] == 200
        await agent.wait_ready()
        ws = await workers_of(client)
        assert sorted(w.gpus for w in ws.values()) == [("0",), ("1",)]  # CUDA_VISIBLE_DEVICES per instance
        samples = metric_samples(agent.get("/metrics")[1])
        assert samples[("tdist_agent_workers", (("state", "RUNNING"),))] == 2
        assert all(samples[("tdist_agent_worker_up", (("program", f"w-{i}"), ("worker", f"testnode-w-{i}")))]
                   == 1 for i in range(2))

        # A worker killed with SIGKILL: its entry goes at once, supervisord restarts it, it registers again.
        victim = next(iter(ws.values()))
        os.kill(victim.pid, signal.SIGKILL)
        # /ready turns 503 as soon as the worker is dead (checked when asked, not at the agent's next tick).
        while alive(victim.pid):
            await asyncio.sleep(0.01)
        assert agent.get("/ready")[0] == 503
        for _ in range(100):
            now = await workers_of(client)
            if victim.id not in now or now[victim.id].pid != victim.pid:
                break
            await asyncio.sleep(0.05)
        await agent.wait_ready()
        assert (await workers_of(client))[victim.id].pid != victim.pid

        # SIGHUP with one more instance starts only the new one.
        before = {w.id: w.pid for w in (await workers_of(client)).values()}
        config.write_text(config_text(tmp_path, nats_server.url, namespace, 3))
        agent.proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            if len(await workers_of(client)) == 3 and agent.get("/ready")[0] == 200:
                break
            await asyncio.sleep(0.1)
        after = {w.id: w.pid for w in (await workers_of(client)).values()}
        assert len(after) == 3 and all(after[i] == pid for i, pid in before.items())

        # An invalid file on SIGHUP leaves the running set as it was.
        config.write_text("[[workers]]\nname = 'x'\ncount = -1\n")
        agent.proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            if metric_samples(agent.get("/metrics")[1])[("tdist_agent_reload_failures_total", ())] == 1:
                break
            await asyncio.sleep(0.1)
        assert metric_samples(agent.get("/metrics")[1])[("tdist_agent_reload_failures_total", ())] == 1
        assert {w.id: w.pid for w in (await workers_of(client)).values()} == after
        config.write_text(config_text(tmp_path, nats_server.url, namespace, 3))

        # An agent killed with SIGKILL and started again leaves one set of workers, not two.
        leftovers = supervised_pids(tmp_path / "state")
        agent.kill()
        agent = AgentProcess(config)
        await agent.wait_ready()
        assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
                   for pid in leftovers)
        assert len(supervised_pids(tmp_path / "state")) == 3
        assert len(await workers_of(client)) == 3

        # SIGTERM with requests in flight completes every one of them before the agent exits.
        op = client.operator("op")
        streams = [await op.call({"i": np.array([i])}, timeout=60) for i in range(6)]
        for s in streams:
            first = await s.__anext__()
            assert not first.final
        agent.proc.send_signal(signal.SIGTERM)
        finals = [[r async for r in s][-1] for s in streams]
        assert [f.outputs["i"].tolist() for f in finals] == [[i] for i in range(6)]
        assert all(f.attempt == 1 for f in finals)
        assert await asyncio.to_thread(agent.proc.wait, 120) == 0
        assert await workers_of(client) == {}
        # Nothing left: no process of this state dir, no PID file, no private NATS settings.
        assert marked_pids(str(tmp_path / "state")) == []
        assert not (tmp_path / "state" / "agent.pids").exists()
        assert not (tmp_path / "state" / "nats-client.toml").exists()
    finally:
        cleanup(tmp_path / "state", agent)


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[nats]\nservers = ['nats://127.0.0.1:4222']\nbogus = 1\n[[workers]]\nname = 'w'\n")
    run = subprocess.run([sys.executable, "-m", "tdist.agent.main", "check-config", str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 2  # a configuration error
    assert "nats.bogus" in run.stderr and str(bad) in run.stderr
    # The shipped file's ports (9090, 4222) may be taken on a shared test host: its host checks run
    # with free ports in test_check_config_host.py.
    good = subprocess.run([sys.executable, "-m", "tdist.agent.main", "check-config", "--no-host-checks",
                           "etc/tdist/agent.toml"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert good.returncode == 0, good.stderr
