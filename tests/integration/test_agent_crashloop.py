"""A crash-looping worker (its implementation raises at import) is reported by the agent: a warning
in its log and, in /ready's JSON, the last lines the worker wrote; the other workers keep serving;
once the file is fixed and reloaded, the worker recovers and the report goes."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess, agent_toml, cleanup, worker_toml

pytestmark = pytest.mark.timeout(300)

BROKEN = Path(__file__).resolve().parents[1] / "support" / "broken_operator.py"
MESSAGE = "RuntimeError: tdist test: this operator module is broken at import"


def config_text(tmp: Path, namespace: str, nats_url: str, implementation: str) -> str:
    good = agent_toml(tmp, namespace=namespace, count=1, nats=f'servers = ["{nats_url}"]')
    return good + worker_toml("bad", implementation, operator="bad_op")


def events(text: str, name: str) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            out.append(record)
    return out


async def test_crash_looping_worker_is_reported_with_its_last_lines(tmp_path: Path, namespace: str,
                                                                    nats_server) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(config_text(tmp_path, namespace, nats_server.url, f"{BROKEN}:Broken"))
    agent = AgentProcess(config)
    try:
        info: dict = {}  # type: ignore[type-arg]
        for _ in range(600):
            code, body = agent.get("/ready")
            info = json.loads(body)
            if "bad-0" in info["failing"] and info["workers"].get("w-0") == "RUNNING":
                break
            await asyncio.sleep(0.1)
        assert code == 503
        failing = info["failing"]["bad-0"]
        assert failing["worker"] == "testnode-bad-0" and failing["log"].endswith("bad-0.out")
        assert failing["state"] in ("BACKOFF", "FATAL") or failing["exits"] >= 3, failing
        assert any(MESSAGE in line for line in failing["tail"]), failing
        assert 0 < len(failing["tail"]) <= 20
        assert list(info["failing"]) == ["bad-0"]  # the healthy worker is not reported

        [first, *_] = events(agent.stderr(), "worker_crash_looping")
        assert first["program"] == "bad-0" and first["level"] == "warning"
        assert any(MESSAGE in line for line in first["tail"])
        assert agent.metric('tdist_agent_worker_crash_looping{program="bad-0",worker="testnode-bad-0"}') == 1
        assert agent.metric('tdist_agent_worker_up{program="w-0",worker="testnode-w-0"}') == 1

        # Fixed and reloaded: the worker serves, the report goes, /ready is 200.
        config.write_text(config_text(tmp_path, namespace, nats_server.url, "tdist.operators.builtin:Echo"))
        agent.proc.send_signal(signal.SIGHUP)
        info = await agent.wait_ready(timeout=120)
        assert info["failing"] == {}
        assert events(agent.stderr(), "worker_recovered")[0]["program"] == "bad-0"
        assert agent.metric('tdist_agent_worker_crash_looping{program="bad-0",worker="testnode-bad-0"}') == 0
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    finally:
        cleanup(state, agent)
