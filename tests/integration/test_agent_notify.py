"""A real agent under a real notify socket (as systemd's ``Type=notify`` gives it): READY=1 only once
/ready answers 200, WATCHDOG=1 at half of ``$WATCHDOG_USEC``, RELOADING=1 with MONOTONIC_USEC then
READY=1 around a reload, STOPPING=1 at SIGTERM; every datagram from the agent's own PID."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess, agent_toml, cleanup

pytestmark = pytest.mark.timeout(300)


class NotifySocket:
    """An abstract AF_UNIX datagram socket with SO_PASSCRED: each message with its sender's PID."""

    def __init__(self) -> None:
        self.address = f"@tdist-notify-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.received: list[tuple[int, str]] = []
        self.cursor = 0

    def drain(self) -> list[tuple[int, str]]:
        new = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            pid = next(struct.unpack("3i", d[:12])[0] for level, kind, d in anc
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            new.append((pid, data.decode()))
        self.received += new
        return new

    async def wait_for(self, check: Callable[[str], bool], timeout: float = 60) -> str:
        """The first message not looked at by an earlier ``wait_for`` that passes ``check``."""
        for _ in range(int(timeout * 20)):
            self.drain()
            while self.cursor < len(self.received):
                message = self.received[self.cursor][1]
                self.cursor += 1
                if check(message):
                    return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"no such message in {self.received}")

    def close(self) -> None:
        self.sock.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if line)


async def test_ready_watchdog_reload_and_stop_notifications(tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, namespace=namespace, count=2, nats=f'servers = ["{nats_server.url}"]'))
    notify = NotifySocket()
    env = {**os.environ, "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    agent = AgentProcess(config, env=env)
    try:
        # READY=1 only once /ready answers 200: until then /ready is 503 and no READY=1 came.
        saw_not_ready = False
        for _ in range(1200):
            ready_sent = any(fields(m).get("READY") == "1" for _, m in notify.drain())
            code = agent.get("/ready")[0]
            if ready_sent:
                assert code == 200
                break
            saw_not_ready = saw_not_ready or code == 503
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no READY=1: {notify.received}")
        assert saw_not_ready  # the workers took a while: READY=1 waited for them

        # The watchdog: pings keep coming while the agent runs.
        notify.cursor = len(notify.received)
        pings = sum(m == "WATCHDOG=1" for _, m in notify.received)
        for _ in range(3):
            await notify.wait_for(lambda m: m == "WATCHDOG=1", timeout=10)
        assert sum(m == "WATCHDOG=1" for _, m in notify.received) >= pings + 3

        # A reload: RELOADING=1 with the monotonic clock of the moment, then READY=1.
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        agent.proc.send_signal(signal.SIGHUP)
        reloading = await notify.wait_for(lambda m: fields(m).get("RELOADING") == "1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(fields(reloading)["MONOTONIC_USEC"]) <= after
        await notify.wait_for(lambda m: fields(m).get("READY") == "1")
        for _ in range(100):
            if agent.metric("tdist_agent_reloads_total") == 1:
                break
            await asyncio.sleep(0.1)
        assert agent.metric("tdist_agent_reloads_total") == 1

        agent.proc.send_signal(signal.SIGTERM)
        await notify.wait_for(lambda m: fields(m).get("STOPPING") == "1")
        assert await agent.wait_exit() == 0
        notify.drain()
        assert {pid for pid, _ in notify.received} == {agent.pid}  # NotifyAccess=main would drop others
    finally:
        cleanup(state, agent)
        notify.close()
