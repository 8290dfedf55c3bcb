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
