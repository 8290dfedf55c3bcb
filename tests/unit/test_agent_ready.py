"""/ready: every desired worker RUNNING under supervisord *and* present in the registry."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tdist.agent.daemon import Agent

ETC = Path(__file__).resolve().parents[2] / "etc" / "tdist" / "agent.toml"


def entry(wid: str, pid: int):  # type: ignore[no-untyped-def]
    from tdist.registry import WorkerInfo

    return WorkerInfo(id=wid, name="w", node="n", pid=pid, state="serving", operators=(), started_at=0.0)


def test_ready_only_after_registration() -> None:
    agent = Agent(str(ETC))
    agent.programs = agent._plan(agent.config, ())
    assert not agent.ready()  # nothing running yet
    agent.services_up = lambda: True  # type: ignore[method-assign]  # supervisord and NATS up
    agent.status.states = {p.name: "RUNNING" for p in agent.programs}
    assert not agent.ready()  # running, but not registered
    agent.status.pids = {p.name: 100 + i for i, p in enumerate(agent.programs)}
    agent.status.entries = {p.worker_id: entry(p.worker_id, 100 + i) for i, p in enumerate(agent.programs[:-1])}
    assert not agent.ready()  # one still missing from the registry
    last = agent.programs[-1]
    agent.status.entries[last.worker_id] = entry(last.worker_id, 999)
    assert not agent.ready()  # its entry is an older process's (it was restarted)
    agent.status.entries[last.worker_id] = entry(last.worker_id, 100 + len(agent.programs) - 1)
    assert agent.ready()
    assert "tdist_agent_ready 1.0" in asyncio.run(agent.metrics()).decode()
    agent.status.unhealthy[last.name] = 100 + len(agent.programs) - 1
    assert not agent.ready()  # it fails the canary
    del agent.status.unhealthy[last.name]
    agent.services_up = lambda: False  # type: ignore[method-assign]
    assert not agent.ready()  # supervisord died, or NATS is gone
    agent.services_up = lambda: True  # type: ignore[method-assign]
    agent.status.states[agent.programs[0].name] = "BACKOFF"
    assert not agent.ready()
