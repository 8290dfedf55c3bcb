"""Nothing the agent starts outlives it, a starting agent clears what an earlier one left, and a
supervisord that dies is replaced with one set of workers (or the agent exits 1 with nothing left)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tdist.agent.processes import MARKER, alive, cmdline, start_time
from tdist.nats_server import find_nats_server
from tests.support.agent import (
    AgentProcess,
    cleanup,
    free_port,
    one_line,
    processes_of,
    signal_quietly,
    wait_gone,
    write_agent_toml,
)

pytestmark = pytest.mark.timeout(300)


def all_pids(procs: dict[str, list[int]]) -> set[int]:
    return {p for pids in procs.values() for p in pids}


async def test_sigkilled_agent_leaves_nothing_and_starts_again(tmp_path: Path, namespace: str) -> None:
    state = tmp_path / "state"
    port = free_port()
    config = write_agent_toml(tmp_path, namespace=namespace, count=2,
                              nats=f'servers = ["nats://127.0.0.1:{port}"]\nembedded = true')
    first = AgentProcess(config)
    second: AgentProcess | None = None
    planted: list[subprocess.Popen[bytes]] = []
    try:
        await first.wait_ready()
        run1 = processes_of(state)
        assert [len(run1[k]) for k in ("nats-server", "supervisord", "worker")] == [1, 1, 2]
        # Its config (with any credentials) lives in the state dir, not in a temporary dir left on a kill.
        assert cmdline(run1["nats-server"][0])[-1] == str(state / "nats.run" / "nats.conf")

        # A second agent on the same state dir refuses at once, in one line, and touches nothing.
        intruder = AgentProcess(config, wait_line=False)
        assert await intruder.wait_exit(60) == 1
        assert one_line(intruder.stderr()).startswith(f"tdist-agent: another tdist-agent (pid {first.pid})")
        assert processes_of(state) == run1

        # SIGKILL: supervisord, the workers and nats-server die with the agent (parent-death signal).
        first.proc.send_signal(signal.SIGKILL)
        first.kill()
        await wait_gone(state, timeout=30)

        # What an agent killed in the window before the parent-death signal was armed (or an older
        # version) would leave: a nats-server holding the port and a process of the workers' tree,
        # both carrying the state dir's marker, recorded or not in agent.pids.
        env = {**os.environ, MARKER: str(state)}
        planted.append(subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        planted.append(subprocess.Popen(["sleep", "600"], env=env, start_new_session=True))
        # A recorded PID whose process is not the recorded one (PID reuse): must be left alone.
        bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
        planted.append(bystander)
        for _ in range(100):
            if start_time(bystander.pid) is not None and _port_taken(port):
                break
            await asyncio.sleep(0.05)
        pids_file = state / "agent.pids"
        recorded = json.loads(pids_file.read_text())
        recorded["children"].append({"role": "worker:w-9", "pid": bystander.pid,
                                     "start_time": (start_time(bystander.pid) or 0) + 1})
        recorded["children"].append({"role": "worker:w-8", "pid": planted[1].pid,
                                     "start_time": start_time(planted[1].pid)})
        pids_file.write_text(json.dumps(recorded))

        second = AgentProcess(config)
        await second.wait_ready()
        run2 = processes_of(state)
        assert [len(run2[k]) for k in ("nats-server", "supervisord", "worker")] == [1, 1, 2], run2
        assert run2["other"] == []
        assert not any(alive(p) for p in all_pids(run1))  # nothing of the first run
        assert not alive(planted[0].pid) and not alive(planted[1].pid)
        assert alive(bystander.pid)  # recorded PID, other process: not signalled
        assert "leftovers_stopped" in second.stderr()

        second.proc.terminate()
        assert await second.wait_exit() == 0
        await wait_gone(state, timeout=10)
        assert not (state / "agent.pids").exists() and not (state / "nats.run").exists()
    finally:
        for p in planted:
            signal_quietly(p.pid)
            p.wait(10)
        cleanup(state, first, *([second] if second else []))


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_supervisord_killed_is_replaced_with_one_set_of_workers(
        tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    config = write_agent_toml(tmp_path, namespace=namespace, count=2, nats=f'servers = ["{nats_server.url}"]')
    agent = AgentProcess(config)
    try:
        await agent.wait_ready()
        for death in range(1, 4):
            before = processes_of(state)
            [supervisord] = before["supervisord"]
            os.kill(supervisord, signal.SIGKILL)
            # /ready leaves 200 at once: it checks supervisord's process, not the last tick.
            codes = []
            for _ in range(300):
                codes.append(agent.get("/ready")[0])
                if codes[-1] == 503 or agent.proc.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            assert codes[-1] == 503 or agent.proc.poll() is not None, codes
            if death == 3:
                break
            info = await agent.wait_ready()
            after = processes_of(state)
            assert info["supervisord"] and len(after["supervisord"]) == 1 and after["supervisord"] != [supervisord]
            assert len(after["worker"]) == 2 and not set(after["worker"]) & set(before["worker"])
            assert not any(alive(p) for p in before["worker"])
            assert agent.metric("tdist_agent_supervisord_restarts_total") == death
        # The third death within the window: the agent gives up, stops everything and exits 1
        # (systemd's Restart=on-failure starts it afresh).
        assert await agent.wait_exit() == 1
        await wait_gone(state, timeout=10)
        assert "supervisord died 3 times" in agent.stderr()
    finally:
        cleanup(state, agent)


async def test_sighup_from_the_first_instruction_does_not_kill_the_agent(
        tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP is blocked on the module's first line (systemd, with Type=notify, waits for READY=1 anyway)."""
    state = tmp_path / "state"
    config = write_agent_toml(tmp_path, namespace=namespace, count=1, nats=f'servers = ["{nats_server.url}"]')
    agent = AgentProcess(config, wait_line=False)
    try:
        # Wait for the interpreter to reach the module's first line, which blocks SIGHUP (before the
        # imports, long before the handler): from then on, SIGHUP after SIGHUP.
        for _ in range(20000):
            if _hup_blocked(agent.pid) or agent.proc.poll() is not None:
                break
            time.sleep(0.0005)
        assert _hup_blocked(agent.pid), "SIGHUP is not blocked at start-up"
        assert _port_from(agent) == 0  # still starting
        sent = 0
        deadline = time.monotonic() + 60
        port = 0
        while time.monotonic() < deadline and agent.proc.poll() is None:
            os.kill(agent.pid, signal.SIGHUP)
            sent += 1
            if not port:
                port = _port_from(agent)
            elif agent.get("/ready")[0] == 200:
                break
            await asyncio.sleep(0.02)
        assert agent.proc.poll() is None, f"agent died after {sent} SIGHUPs: {agent.stderr()[-2000:]}"
        await agent.wait_ready()
        assert agent.metric("tdist_agent_reload_failures_total") == 0
        children = all_pids(processes_of(state))
        assert children and not any(_hup_blocked(p) for p in children)  # no child inherited the mask
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    finally:
        cleanup(state, agent)


def _hup_blocked(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk"))
    return bool(blocked & (1 << (signal.SIGHUP - 1)))


def _port_from(agent: AgentProcess) -> int:
    """The HTTP port, once the agent has printed it (non-blocking)."""
    import select

    assert agent.proc.stdout is not None
    if select.select([agent.proc.stdout], [], [], 0)[0]:
        line = agent.proc.stdout.readline()
        if "http on port" in line:
            agent.port = int(line.rsplit(" ", 1)[1])
    return agent.port
