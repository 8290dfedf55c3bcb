"""systemd's notify protocol, received on a real datagram socket bound as ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tdist.agent import notify as sd


class Receiver:
    """A bound AF_UNIX datagram socket, as systemd's notify socket is."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = str(tmp_path / "notify.sock")
    r = Receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield r
    finally:
        r.close()


def test_notify_sends_one_datagram_per_state(receiver: Receiver) -> None:
    assert sd.notify("READY=1\nSTATUS=serving")
    assert sd.notify("STOPPING=1")
    assert receiver.drain() == ["READY=1\nSTATUS=serving", "STOPPING=1"]


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@tdist-test-{uuid.uuid4().hex}"
    r = Receiver(name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sd.notify("READY=1")
        assert r.drain() == ["READY=1"]
    finally:
        r.close()


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sd.notify("READY=1")  # the socket is gone: no exception


def test_reloading_carries_the_monotonic_clock(receiver: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = receiver.drain()
    fields = dict(line.split("=", 1) for line in message.split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sd.watchdog_interval() is None  # no WatchdogSec=
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process (our parent's)
    assert sd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd.watchdog_interval() is None


def test_watchdog_pings_only_while_the_main_loop_beats(receiver: Receiver) -> None:
    now = [100.0]
    dog = sd.Watchdog(15.0, stale=17.0, clock=lambda: now[0])
    assert not dog.ping()  # the main loop never went round
    dog.beat()
    now[0] += 16.0  # a slow round (a tick at its timeout, then one tick)
    assert dog.ping()
    now[0] += 1.5  # 17.5 s without a round: the main loop is stuck
    assert not dog.ping()
    dog.beat()
    assert dog.ping()
    assert receiver.drain() == ["WATCHDOG=1", "WATCHDOG=1"]
    assert dog.sent == 2


async def test_watchdog_task_stops_when_the_main_loop_stops_beating(receiver: Receiver) -> None:
    dog = sd.Watchdog(0.02, stale=0.2)
    beating = True

    async def main_loop() -> None:
        while beating:
            dog.beat()
            await asyncio.sleep(0.01)

    loop_task = asyncio.create_task(main_loop())
    dog_task = asyncio.create_task(dog.run())
    try:
        while len(receiver.drain()) < 3 and dog.sent < 5:
            await asyncio.sleep(0.02)
        assert dog.sent >= 3
        beating = False
        await loop_task
        await asyncio.sleep(0.5)  # well past ``stale``
        receiver.drain()
        sent = dog.sent
        await asyncio.sleep(0.3)  # 15 intervals: the task runs, but vouches for nothing
        assert receiver.drain() == [] and dog.sent == sent
        assert not dog_task.done()
        dog.beat()  # the main loop goes round again: pings again
        while dog.sent == sent:
            await asyncio.sleep(0.02)
        assert "WATCHDOG=1" in receiver.drain()
    finally:
        dog_task.cancel()
        loop_task.cancel()
        await asyncio.gather(dog_task, loop_task, return_exceptions=True)


async def test_disabled_watchdog_task_ends_at_once(receiver: Receiver) -> None:
    dog = sd.Watchdog(None, stale=17.0)
    dog.beat()
    await asyncio.wait_for(dog.run(), 5)
    assert receiver.drain() == []
