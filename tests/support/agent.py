"""A real ``tdist-agent`` process for tests, and what it leaves on the machine (found through /proc)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tdist.process import free_port  # noqa: F401 - the tests import it from here
from tdist.agent.processes import cmdline, kill_and_wait, marked_pids
from tests.conftest import OPERATORS


def worker_toml(name: str, implementation: str, *, count: int = 1, operator: str = "op", delay: float = 0.0,
                drain_timeout: float = 10.0, extra: str = "") -> str:
    """A ``[[workers]]`` table with one operator: ``implementation`` is its "module:Class",
    ``delay`` its parameter, ``extra`` more keys of the worker table."""
    return f"""
[[workers]]
name = "{name}"
count = {count}
registry_ttl = 2.0
drain_timeout = {drain_timeout}
{extra}
[[workers.operators]]
name = "{operator}"
implementation = "{implementation}"
max_inflight = 4
[workers.operators.parameters]
delay = {delay}
"""


def agent_toml(tmp: Path, *, nats: str, namespace: str, count: int = 2, operator: str = "Counting",
               implementation: str | None = None, delay: float = 0.0, drain_timeout: float = 10.0,
               canary: str = "period = 0", http_port: int = 0, extra_worker: str = "", state: Path | None = None,
               gpus: int | None = None, ack_wait: float = 3.0) -> str:
    """An agent file with one worker kind ``w`` of operator ``op``: ``nats`` is the body of the
    [nats] table; ``canary`` of [canary]; ``operator`` a class of tests/support/operators.py
    (``implementation``, a "module:Class", instead); ``gpus``: GPUs 0..gpus-1, one per instance
    (None: a CPU node)."""
    if gpus is not None:
        extra_worker = f"gpus_per_instance = 1\n{extra_worker}"
    worker = worker_toml("w", implementation or f"{OPERATORS}:{operator}", count=count, delay=delay,
                         drain_timeout=drain_timeout, extra=extra_worker)
    return f"""
gpus = {'"none"' if gpus is None else list(range(gpus))}
[node]
name = "testnode"
[nats]
{nats}
[request_plane]
namespace = "{namespace}"
ack_wait = {ack_wait}
storage = "memory"
max_bytes = 16777216
[directories]
state_dir = "{state or tmp / 'state'}"
log_dir = "{tmp / 'logs'}"
[http]
port = {http_port}
[logging]
level = "info"
[canary]
{canary}
{worker}"""


def write_agent_toml(tmp: Path, **toml: Any) -> Path:
    """``tmp/agent.toml`` written with ``agent_toml(tmp, **toml)``; its path."""
    config = tmp / "agent.toml"
    config.write_text(agent_toml(tmp, **toml))
    return config


def one_line(stderr: str) -> str:
    """The one human line of a failed start (the JSON log lines aside); no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(lines) == 1, lines
    return lines[0]


class AgentProcess:
    """``python -m tdist.agent.main``; stderr goes to a file (``stderr()``)."""

    def __init__(self, config: Path, *, wait_line: bool = True, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.err_path = config.parent / f"agent-{os.getpid()}-{id(self)}.err"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tdist.agent.main", "--config", str(config)],
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.port = 0
        if wait_line:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert "http on port" in line, f"agent did not start: {line!r} {self.stderr()}"
            self.port = int(line.rsplit(" ", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready_info(self) -> dict[str, Any]:
        return json.loads(self.get("/ready")[1])

    def metric(self, name: str) -> float:
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    async def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        for _ in range(int(timeout * 10)):
            assert self.proc.poll() is None, f"agent exited with {self.proc.returncode}: {self.stderr()[-3000:]}"
            if self.get("/ready")[0] == 200:
                return self.ready_info()
            await asyncio.sleep(0.1)
        raise AssertionError(f"agent never ready: {self.get('/ready')}")

    async def wait_exit(self, timeout: float = 120) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        if self.proc.stdout:
            self.proc.stdout.close()


def processes_of(state: Path) -> dict[str, list[int]]:
    """The live processes carrying ``state``'s marker, by role."""
    out: dict[str, list[int]] = {"nats-server": [], "supervisord": [], "worker": [], "other": []}
    for pid in marked_pids(str(state)):
        argv = cmdline(pid)
        text = " ".join(argv)
        role = ("nats-server" if argv and argv[0].endswith("nats-server") else
                "supervisord" if "supervisor.supervisord" in text else
                "worker" if "tdist.worker.main" in text else "other")
        out[role].append(pid)
    return out


async def wait_gone(state: Path, timeout: float = 30) -> None:
    for _ in range(int(timeout * 10)):
        if not marked_pids(str(state)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still running: {processes_of(state)}")


def cleanup(state: Path, *agents: AgentProcess) -> None:
    """Stop by PID whatever a test's agents left (the agents themselves first)."""
    for agent in agents:
        agent.kill()
    kill_and_wait(marked_pids(str(state)))


def listening(pid: int) -> list[tuple[str, int]]:
    """The TCP addresses process ``pid`` listens on (from /proc/PID/fd and /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = parts[1].split(":")
            if v6:
                host = "::" if set(addr) == {"0"} else addr
            else:
                host = socket.inet_ntoa(bytes.fromhex(addr)[::-1])
            found.append((host, int(port, 16)))
    return sorted(found)


def signal_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
