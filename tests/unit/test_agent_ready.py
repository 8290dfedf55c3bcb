"""/ready: every desired worker RUNNING under supervisord *and* present in the registry."""

from __future__ import annotations

from pathlib import Path

from tdist.agent.daemon import Agent

ETC = Path(__file__).resolve().parents[2] / "etc" / "tdist" / "agent.toml"


def test_ready_only_after_registration() -> None:
    agent = Agent(str(ETC))
    agent.programs = agent._plan(agent.config, ())
    assert not agent.ready()  # nothing running yet
    agent.status.states = {p.name: "RUNNING" for p in agent.programs}
    assert not agent.ready()  # running, but not registered
    agent.status.registered = {p.worker_id for p in agent.programs[:-1]}
    assert not agent.ready()  # one still missing from the registry
    agent.status.registered = {p.worker_id for p in agent.programs}
    assert agent.ready()
    assert "tdist_agent_ready 1" in agent.metrics()
    agent.status.states[agent.programs[0].name] = "BACKOFF"
    assert not agent.ready()
