"""``tdist-agent check-config``'s host checks, through the console script on this (GPU-less) host:
each problem a start would hit is one line naming the file and key, all of them, exit 2;
``--no-host-checks`` passes the same file."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tdist.agent.gpus import detect_gpus

pytestmark = pytest.mark.timeout(180)

AGENT = str(Path(sys.executable).parent / "tdist-agent")
REPO = Path(__file__).resolve().parents[2]
TRITON = "tdist.operators.triton:TritonOperator"
ECHO = "tdist.operators.builtin:Echo"


def check(config: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, "check-config", *extra, str(config)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def problems(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines (without the prefix and the count line)."""
    return [line.removeprefix("tdist-agent: ") for line in done.stderr.splitlines()
            if line.startswith("tdist-agent: ") and "problem(s) on this host" not in line]


def agent_toml(tmp: Path, workers: str, *, gpus: str = '"none"', http_port: int = 0, nats: str = "") -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
gpus = {gpus}
[nats]
servers = ["nats://127.0.0.1:0"]
{nats}
[directories]
state_dir = "{tmp / 'state'}"
log_dir = "{tmp / 'logs'}"
[http]
port = {http_port}
{workers}
""")
    return path


def worker(name: str, implementation: str, *, count: int = 1, gpus_per_instance: int = 0, params: str = "") -> str:
    return f"""
[[workers]]
name = "{name}"
count = {count}
gpus_per_instance = {gpus_per_instance}
[[workers.operators]]
name = "{name}"
implementation = "{implementation}"
[workers.operators.parameters]
{params}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A model repository with the hello world's encoder only."""
    root = tmp_path / "models"
    shutil.copytree(REPO / "model_repository" / "encoder", root / "encoder")
    return root


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_the_shipped_config_passes_with_free_ports(tmp_path: Path) -> None:
    text = (REPO / "etc/tdist/agent.toml").read_text()
    text = text.replace("nats://127.0.0.1:4222", "nats://127.0.0.1:0").replace("port = 9090", "port = 0")
    text = text.replace('state_dir = ".tdist/state"', f'state_dir = "{tmp_path / "state"}"')
    config = tmp_path / "agent.toml"
    config.write_text(text)
    done = check(config, cwd=REPO)  # model_repository is relative to the working directory
    assert done.returncode == 0, done.stderr
    assert "2 implementations import, 2 Triton models found" in done.stdout


def test_a_missing_model_repository(tmp_path: Path) -> None:
    config = agent_toml(tmp_path, worker("enc", TRITON, params=f'model_repository = "{tmp_path / "none"}"'))
    done = check(config)
    assert done.returncode == 2
    assert problems(done) == [f"{config}:workers[0].operators[0].parameters.model_repository: model repository "
                              f"{tmp_path / 'none'} does not exist"]
    assert check(config, "--no-host-checks").returncode == 0


def test_a_model_missing_from_its_repository(tmp_path: Path, repo: Path) -> None:
    config = agent_toml(tmp_path, worker("decoder", TRITON, params=f'model_repository = "{repo}"')
                        + worker("enc", TRITON, params=f'model_repository = "{repo}"\nmodel = "nope"')
                        + worker("encoder", TRITON, params=f'model_repository = "{repo}"'))
    done = check(config)
    assert done.returncode == 2
    # The model's name defaults to the operator's: then the key at fault is the operator's name.
    assert problems(done) == [
        f"{config}:workers[0].operators[0].name: no model 'decoder' (config.pbtxt) in {repo}",
        f"{config}:workers[1].operators[0].parameters.model: no model 'nope' (config.pbtxt) in {repo}",
    ]
    assert check(config, "--no-host-checks").returncode == 0


def test_an_implementation_module_that_does_not_exist(tmp_path: Path) -> None:
    config = agent_toml(tmp_path, worker("a", "tdist_no_such_module:Op") + worker("b", f"{tmp_path}/nope.py:Op"))
    done = check(config)
    assert done.returncode == 2
    found = problems(done)
    assert found[0].startswith(f"{config}:workers[0].operators[0].implementation: cannot import "
                               f"'tdist_no_such_module': ModuleNotFoundError"), found
    assert found[1] == (f"{config}:workers[1].operators[0].implementation: operator file "
                        f"'{tmp_path}/nope.py' does not exist")
    assert check(config, "--no-host-checks").returncode == 0


def test_a_class_that_is_not_an_operator(tmp_path: Path) -> None:
    module = tmp_path / "ops.py"
    module.write_text("class NotAnOperator:\n    pass\n")
    config = agent_toml(tmp_path, worker("a", f"{module}:NotAnOperator") + worker("b", f"{module}:Missing")
                        + worker("c", ECHO))
    done = check(config)
    assert done.returncode == 2
    assert problems(done) == [
        f"{config}:workers[0].operators[0].implementation: 'NotAnOperator' in '{module}' is not a tdist Operator class",
        f"{config}:workers[1].operators[0].implementation: 'Missing' in '{module}' is not a tdist Operator class",
    ]
    assert check(config, "--no-host-checks").returncode == 0


def test_an_import_that_hangs_or_kills_its_process_costs_only_its_child(tmp_path: Path) -> None:
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(3600)\n")
    (tmp_path / "dies.py").write_text("import os, sys\nprint('about to die', file=sys.stderr)\nos._exit(3)\n")
    (tmp_path / "prints.py").write_text(
        "print('noise on stdout')\nfrom tdist.operators import Operator\nclass Op(Operator):\n    pass\n")
    config = agent_toml(tmp_path, worker("a", f"{tmp_path}/hangs.py:Op") + worker("b", f"{tmp_path}/dies.py:Op")
                        + worker("c", f"{tmp_path}/prints.py:Op"))
    done = check(config, "--import-timeout", "3")
    assert done.returncode == 2
    assert problems(done) == [
        f"{config}:workers[0].operators[0].implementation: importing '{tmp_path}/hangs.py:Op' did not finish "
        f"within 3 s (--import-timeout)",
        f"{config}:workers[1].operators[0].implementation: importing '{tmp_path}/dies.py:Op' ended its process "
        f"(exit code 3): about to die",
    ]


@pytest.mark.skipif(any(g.index == 0 for g in detect_gpus()), reason="this host has GPU 0")
def test_gpu_indices_this_host_lacks(tmp_path: Path) -> None:
    explicit = agent_toml(tmp_path, worker("g", ECHO, gpus_per_instance=1), gpus="[0]")
    done = check(explicit)
    assert done.returncode == 2
    assert problems(done) == [f"{explicit}:gpus: GPU 0 not on this host (nvidia-smi finds no GPU here)"]
    assert check(explicit, "--no-host-checks").returncode == 0
    auto = agent_toml(tmp_path, worker("g", ECHO, count=2, gpus_per_instance=1), gpus='"auto"')
    done = check(auto)
    assert done.returncode == 2
    assert problems(done) == [f"{auto}:workers[0].gpus_per_instance: the workers up to 'g' need 2 GPUs "
                              f"(2 x 1 for this one) but the host has 0"]
    assert check(auto, "--no-host-checks").returncode == 0


@pytest.mark.parametrize("taken", ["http", "nats", "monitor"])
def test_a_port_in_use(tmp_path: Path, held_port: int, taken: str) -> None:
    if taken == "http":
        config, key = agent_toml(tmp_path, worker("a", ECHO), http_port=held_port), "http.port"
    elif taken == "nats":
        config = agent_toml(tmp_path, worker("a", ECHO), nats="embedded = true")
        config.write_text(config.read_text().replace("nats://127.0.0.1:0", f"nats://127.0.0.1:{held_port}"))
        key = "nats.servers"
    else:
        config, key = agent_toml(tmp_path, worker("a", ECHO), nats=f"embedded = true\nmonitor_port = {held_port}"), \
            "nats.monitor_port"
    done = check(config)
    assert done.returncode == 2
    [line] = problems(done)
    assert line.startswith(f"{config}:{key}: 127.0.0.1:{held_port} is in use"), line
    assert check(config, "--no-host-checks").returncode == 0


def test_ports_held_by_the_agent_of_the_state_dir_are_not_a_problem(tmp_path: Path, held_port: int) -> None:
    """``systemctl reload`` runs check-config beside the running agent: its ports are its own."""
    config = agent_toml(tmp_path, worker("a", ECHO), http_port=held_port)
    (tmp_path / "state").mkdir()
    fd = os.open(tmp_path / "state" / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as StateLock does
        os.write(fd, f"{os.getpid()}\n".encode())
        done = check(config)
        assert done.returncode == 0, done.stderr
        assert f"ports not checked (the agent with pid {os.getpid()} runs on {tmp_path / 'state'})" in done.stdout
    finally:
        os.close(fd)
    assert check(config).returncode == 2  # the lock released: the port is someone else's


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path, repo: Path, held_port: int) -> None:
    (tmp_path / "ops.py").write_text("class Plain:\n    pass\n")
    config = agent_toml(tmp_path, http_port=held_port, gpus="[0, 99]", workers=(
        worker("enc", TRITON, params=f'model_repository = "{tmp_path / "none"}"')
        + worker("dec", TRITON, params=f'model_repository = "{repo}"')
        + worker("gone", "tdist_no_such_module:Op")
        + worker("plain", f"{tmp_path}/ops.py:Plain")
        + worker("idle", "tdist_not_started:Op", count=0)))  # count = 0: never started, not checked
    done = check(config)
    assert done.returncode == 2
    keys = [line.split(": ", 1)[0].removeprefix(f"{config}:") for line in problems(done)]
    assert keys == ["gpus", "http.port", "workers[0].operators[0].parameters.model_repository",
                    "workers[1].operators[0].name", "workers[2].operators[0].implementation",
                    "workers[3].operators[0].implementation"], done.stderr
    assert done.stderr.splitlines()[-1] == f"tdist-agent: {config}: 6 problem(s) on this host " \
                                           f"(--no-host-checks checks the file alone)"
    off = check(config, "--no-host-checks")
    assert off.returncode == 0 and "host checks off" in off.stdout
