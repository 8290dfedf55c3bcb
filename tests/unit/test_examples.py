"""The example configurations shipped in etc/ and docs/examples/ load without errors, and the
multi-GPU example gives each instance the GPUs docs/operations.md says it does."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from tdist.agent.config import load_agent_config, parse_agent_config
from tdist.agent.gpus import GpuInfo, describe_gpus
from tdist.agent.supervisor_conf import plan_programs
from tdist.config import load_worker_file
from tdist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ETC = ROOT / "etc" / "tdist"
MULTI_GPU = ROOT / "docs" / "examples" / "agent-multi-gpu.toml"


@pytest.mark.parametrize("name", ["worker.toml"])
def test_example_worker_config_loads(name: str) -> None:
    wf = load_worker_file(ETC / name)
    assert wf.worker.operators and wf.request_plane.namespace


def test_example_agent_config_loads() -> None:
    cfg = load_agent_config(ETC / "agent.toml")
    assert [w.name for w in cfg.workers] == ["encoder", "decoder", "encoder_decoder"]


def test_multi_gpu_example_assigns_one_gpu_per_instance_pinned_to_its_numa_node(tmp_path: Path) -> None:
    data = tomllib.loads(MULTI_GPU.read_text())
    assert data["nats"]["password_file"] == "/etc/tdist/nats-password"
    secret = tmp_path / "nats-password"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    data["nats"]["password_file"] = str(secret)  # the one file the example needs on the host
    cfg = parse_agent_config(data, str(MULTI_GPU))
    assert cfg.node.gpus == (0, 1, 2, 3) and cfg.gpus_needed() == 4 and cfg.nats.password == "s3cret"

    # Two NUMA nodes, two GPUs on each, as nvidia-smi and sysfs would report them.
    detected = [GpuInfo(i, numa_node=i // 2, cpus="0-15" if i < 2 else "16-31") for i in range(4)]
    programs = plan_programs(cfg, describe_gpus(cfg.node.gpus, detected), python="python3")
    env = {p.name: dict(p.environment)["CUDA_VISIBLE_DEVICES"] for p in programs}
    assert env == {"encoder-0": "0", "encoder-1": "1", "decoder-0": "2", "decoder-1": "3",
                   "encoder_decoder-0": "", "encoder_decoder-1": ""}
    pinned = {p.name: p.command[:3] for p in programs if p.cpus}
    assert pinned == {"encoder-0": ("taskset", "-c", "0-15"), "encoder-1": ("taskset", "-c", "0-15"),
                      "decoder-0": ("taskset", "-c", "16-31"), "decoder-1": ("taskset", "-c", "16-31")}
    assert {p.worker_id for p in programs} >= {"gpu-node-1-encoder-0", "gpu-node-1-decoder-1"}


def test_multi_gpu_example_needs_its_password_file() -> None:
    """As shipped, the example names a secret file this host lacks: the error names file and key."""
    if Path("/etc/tdist/nats-password").exists():
        pytest.skip("this host has /etc/tdist/nats-password")
    with pytest.raises(ConfigError) as info:
        load_agent_config(MULTI_GPU)
    assert "nats.password_file" in str(info.value)
