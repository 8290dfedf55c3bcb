"""systemd units: `systemd-analyze verify` accepts them, with no unknown keys (the nspawn boot test is
not written yet)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["tdist-agent.service", "nats-server.service"])
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    # The units name the install location; point them at this venv so the executables exist.
    text = (UNITS / unit).read_text().replace("/opt/tdist/venv", sys.prefix)
    copy = tmp_path / unit
    copy.write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    messages = [line for line in (run.stdout + run.stderr).splitlines() if unit in line]
    assert run.returncode == 0, run.stdout + run.stderr
    assert not [m for m in messages if "Unknown" in m or "ignoring" in m], messages


def test_agent_unit_restarts_after_death_by_sighup_and_waits_for_ready() -> None:
    """systemd counts death by SIGHUP as clean (no restart under on-failure): the unit forces it.
    Type=notify: no reload (SIGHUP) before the agent says READY=1, i.e. has its handlers."""
    lines = [ln.strip() for ln in (UNITS / "tdist-agent.service").read_text().splitlines()]
    settings: dict[str, list[str]] = {}
    for ln in lines:
        if "=" in ln and not ln.startswith("#"):
            key, value = ln.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert "SIGHUP" in settings["RestartForceExitStatus"][0].split()
    assert settings["Restart"] == ["on-failure"]
    assert settings["Type"] == ["notify"]
    # Above the longest default worker stop (supervisor_conf.worker_stop_budget) + the agent's margins.
    from tdist.agent.config import AgentWorkerConfig
    from tdist.agent.supervisor_conf import worker_stop_budget
    from tdist.config import OperatorConfig, WorkerConfig

    default = AgentWorkerConfig(WorkerConfig(name="w", operators=(OperatorConfig("o", "m:C"),)))
    assert int(settings["TimeoutStopSec"][0]) >= worker_stop_budget(default) + 60
