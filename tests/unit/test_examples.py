"""The example configurations shipped in etc/ load without errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdist.config import load_worker_file

ETC = Path(__file__).resolve().parents[2] / "etc" / "tdist"


@pytest.mark.parametrize("name", ["worker.toml"])
def test_example_worker_config_loads(name: str) -> None:
    wf = load_worker_file(ETC / name)
    assert wf.worker.operators and wf.request_plane.namespace
