"""/ready: every desired worker RUNNING under supervisord, present in the registry *and* alive."""

from __future__ import annotations

import asyncio
import os
import subprocess
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
    live = os.getpid()  # a process that runs: this one (the pid is checked when /ready is asked)
    exited = subprocess.Popen(["true"])
    exited.wait()
    agent.status.pids = {p.name: live for p in agent.programs}
    agent.status.entries = {p.worker_id: entry(p.worker_id, live) for p in agent.programs[:-1]}
    assert not agent.ready()  # one still missing from the registry
    last = agent.programs[-1]
    agent.status.entries[last.worker_id] = entry(last.worker_id, exited.pid)
    assert not agent.ready()  # its entry is an older process's (it was restarted)
    agent.status.entries[last.worker_id] = entry(last.worker_id, live)
    assert agent.ready()
    assert "tdist_agent_ready 1.0" in asyncio.run(agent.metrics()).decode()
    agent.status.unhealthy[last.name] = live
    assert not agent.ready()  # it fails the canary
    del agent.status.unhealthy[last.name]
    agent.status.pids[last.name] = exited.pid
    agent.status.entries[last.worker_id] = entry(last.worker_id, exited.pid)
    assert not agent.ready()  # registered by that very process, which has died since the last tick
    agent.status.pids[last.name] = live
    agent.status.entries[last.worker_id] = entry(last.worker_id, live)
    agent.services_up = lambda: False  # type: ignore[method-assign]
    assert not agent.ready()  # supervisord died, or NATS is gone
    agent.services_up = lambda: True  # type: ignore[method-assign]
    agent.status.states[agent.programs[0].name] = "BACKOFF"
    assert not agent.ready()
