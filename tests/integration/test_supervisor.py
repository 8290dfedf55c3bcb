"""A real supervisord under tdist.agent: programs rendered from an agent file, driven over XML-RPC.

The worker command is replaced by a small program that records its environment and sleeps,
so no NATS is needed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tdist.process import alive
from tdist.agent.config import AgentConfig, AgentWorkerConfig, load_agent_config
from tdist.agent.gpus import GpuInfo
from tdist.agent.supervisor_conf import plan_programs, render
from tdist.agent.supervisor_rpc import SupervisorClient, SupervisorError, Supervisord
from tests.support.agent import agent_toml

SLEEPER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    out = sys.argv[1]
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "worker_id": sys.argv[2]}, fh)
    os.replace(tmp, out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)
    """
)

ECHO = "tdist.operators.builtin:Echo"


class Node:
    """One agent file + supervisord in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.logs = root / "logs"
        self.out = root / "out"
        for d in (self.state, self.logs, self.out):
            d.mkdir()
        self.sleeper = root / "sleeper.py"
        self.sleeper.write_text(SLEEPER)
        self.conf = self.state / "supervisord.conf"
        self.supervisord: Supervisord | None = None

    def command(self, config: AgentConfig, w: AgentWorkerConfig, i: int, wid: str, log_file: str) -> list[str]:
        return [sys.executable, str(self.sleeper), str(self.out / f"{w.name}-{i}.json"), wid]

    def write(self, count: int, drain: float = 1) -> AgentConfig:
        path = self.root / "agent.toml"
        # The workers here are sleepers, never started from this file: its NATS and namespace are unused.
        path.write_text(agent_toml(self.root, nats='servers = ["nats://127.0.0.1:4222"]', namespace="test",
                                   count=count, gpus=count, drain_timeout=drain, implementation=ECHO))
        config = load_agent_config(path)
        programs = plan_programs(config, [GpuInfo(g) for g in range(count)], command=self.command)
        self.conf.write_text(render(config.directories.state_dir, config.directories.log_dir, programs))
        return config

    def start(self, count: int) -> Supervisord:
        config = self.write(count)
        self.supervisord = Supervisord(str(self.conf), config.directories.socket_path)
        self.supervisord.start()
        return self.supervisord

    @property
    def client(self) -> SupervisorClient:
        assert self.supervisord is not None
        return self.supervisord.client

    def record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.out / f"{name}.json").read_text())
        except FileNotFoundError:
            return None

    def running(self) -> dict[str, int]:
        """Program name -> PID, for the RUNNING programs."""
        return {p["name"]: p["pid"] for p in self.client.all_process_info() if p["statename"] == "RUNNING"}


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    pids: list[int] = []
    try:
        yield n
    finally:
        if n.supervisord is not None:
            pids = n.supervisord.program_pids()
            n.supervisord.stop(timeout=15)
            n.supervisord.kill(pids)  # idempotent backstop


def both_running(node: Node, names: set[str]) -> dict[str, int] | None:
    running = node.running()
    if set(running) != names:
        return None
    if not all((r := node.record(n)) and r["pid"] == running[n] for n in names):
        return None
    return running


def test_programs_start_with_their_gpus(node: Node) -> None:
    sd = node.start(count=2)
    assert sd.client.get_state() == "RUNNING"
    running = wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="two programs")
    assert node.record("w-0") == {"pid": running["w-0"], "cuda": "0", "worker_id": "testnode-w-0"}
    assert node.record("w-1") == {"pid": running["w-1"], "cuda": "1", "worker_id": "testnode-w-1"}
    sock = node.state / "supervisor.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    info = sd.client.process_info("w-0")
    assert info["stdout_logfile"] == str(node.logs / "w-0.out")


def test_a_killed_program_is_restarted(node: Node) -> None:
    node.start(count=2)
    before = wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="two programs")
    os.kill(before["w-0"], signal.SIGKILL)
    after = wait_for(
        lambda: (r := both_running(node, {"w-0", "w-1"})) and r["w-0"] != before["w-0"] and r,
        what="w-0 restarted",
    )
    assert after["w-1"] == before["w-1"]
    assert not alive(before["w-0"])
    assert node.record("w-0")["cuda"] == "0"  # type: ignore[index]


async def test_reload_adds_only_the_new_instance(node: Node) -> None:
    node.start(count=2)
    before = wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="two programs")
    node.write(count=3)
    diff = await node.client.aupdate()
    assert (diff.added, diff.changed, diff.removed) == (("w-2",), (), ())
    after = wait_for(lambda: both_running(node, {"w-0", "w-1", "w-2"}), what="three programs")
    assert after["w-0"] == before["w-0"] and after["w-1"] == before["w-1"]
    assert node.record("w-2")["cuda"] == "2"  # type: ignore[index]

    # and back to two: only w-2 stops
    node.write(count=2)
    diff = await node.client.aupdate()
    assert (diff.added, diff.changed, diff.removed) == ((), (), ("w-2",))
    assert set(node.running()) == {"w-0", "w-1"}
    assert not alive(after["w-2"])
    assert node.running() == before

    # an edited worker setting (same command line) restarts the instances: supervisord sees the digest
    node.write(count=2, drain=2)
    diff = await node.client.aupdate()
    assert (diff.added, sorted(diff.changed), diff.removed) == ((), ["w-0", "w-1"], ())
    edited = wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="two restarted programs")
    assert edited["w-0"] != before["w-0"] and edited["w-1"] != before["w-1"]


def test_stop_and_start_one_program(node: Node) -> None:
    node.start(count=2)
    before = wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="two programs")
    assert node.client.stop_process("w-1") is True
    assert not alive(before["w-1"])
    assert node.client.process_info("w-1")["statename"] == "STOPPED"
    with pytest.raises(SupervisorError) as info:
        node.client.stop_process("w-1")
    assert info.value.details["fault"] == 70  # NOT_RUNNING
    assert node.client.start_process("w-1") is True
    wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="w-1 back")


def test_shutdown_stops_everything(node: Node) -> None:
    sd = node.start(count=2)
    running = wait_for(lambda: both_running(node, {"w-0", "w-1"}), what="two programs")
    supervisord_pid = sd.pid
    assert supervisord_pid is not None
    assert sd.stop(timeout=15) == 0
    assert not alive(supervisord_pid)
    for pid in running.values():
        assert not alive(pid)
    with pytest.raises(SupervisorError, match="unreachable"):
        SupervisorClient(str(node.state / "supervisor.sock"), timeout=2).get_state()


def test_a_broken_configuration_fails_start_with_its_output(node: Node) -> None:
    node.conf.write_text("[unix_http_server]\nfile=%s\n[supervisord]\nnodaemon=true\n[program:x]\n"
                         % (node.state / "supervisor.sock"))
    sd = Supervisord(str(node.conf), str(node.state / "supervisor.sock"))
    with pytest.raises(SupervisorError, match="exited"):
        sd.start(timeout=10)


def test_a_real_worker_runs_under_supervisord(node: Node, nats_server: Any, namespace: str) -> None:
    path = node.root / "agent.toml"
    path.write_text(agent_toml(node.root, nats=f'servers = ["{nats_server.url}"]', namespace=namespace, count=1,
                               drain_timeout=2, implementation=ECHO))
    config = load_agent_config(path)
    programs = plan_programs(config, [], directory=os.getcwd())
    assert programs[0].stopwaitsecs == 2 + 2 + 39 + 63 + 15  # drain 2 s: see supervisor_conf.worker_stop_budget
    node.conf.write_text(render(config.directories.state_dir, config.directories.log_dir, programs))
    node.supervisord = Supervisord(str(node.conf), config.directories.socket_path)
    node.supervisord.start()
    out = node.logs / "w-0.out"

    def ready() -> bool:
        return out.exists() and '"worker_ready"' in out.read_text()

    wait_for(ready, timeout=30, what="worker_ready in w-0.out")
    line = next(ln for ln in out.read_text().splitlines() if "worker_ready" in ln)
    assert json.loads(line) == {"event": "worker_ready", "worker_id": "testnode-w-0"}
    wait_for(lambda: node.client.process_info("w-0")["statename"] == "RUNNING", what="RUNNING (startsecs)")
    pid = node.client.process_info("w-0")["pid"]
    assert node.supervisord.stop(timeout=30) == 0
    assert not alive(pid)
    assert (node.logs / "w-0.log").exists()
    assert "stopped: w-0 (exit status 0)" in (node.state / "supervisord.log").read_text()  # drained, not killed
