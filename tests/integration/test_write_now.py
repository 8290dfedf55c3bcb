"""write_now against a real nats-server: a publish reaches the socket before the event loop runs
again (the flusher task never gets the chance), and while the connection is down it stays
buffered and goes out after the reconnect, in order."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import nats
import pytest

from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tdist.process import free_port
from tdist.request_plane.connection import write_now
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class RawSubscriber:
    """A blocking-socket NATS subscriber: reads without the event loop of the code under test."""

    def __init__(self, port: int, subject: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        try:
            self._read_until(b"\r\n")  # INFO
            self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB %s 1\r\nPING\r\n'
                              % subject.encode())
            self._read_until(b"PONG\r\n")
        except BaseException:
            self.sock.close()
            raise

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the server closed the raw subscriber's connection")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def next_payload(self) -> bytes:
        """The next message's payload (blocks, up to the socket's timeout)."""
        while True:
            line = self._read_until(b"\r\n")
            if line.startswith(b"MSG "):
                size = int(line.split()[-1])
                while len(self.buffer) < size + 2:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise AssertionError("the server closed the raw subscriber's connection")
                    self.buffer += chunk
                payload, self.buffer = self.buffer[:size], self.buffer[size + 2:]
                return payload
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")

    def close(self) -> None:
        self.sock.close()


async def test_a_publish_is_on_the_socket_before_the_loop_runs_again(nats_server: EmbeddedNatsServer) -> None:
    port = int(nats_server.url.rsplit(":", 1)[1])
    raw = RawSubscriber(port, "write.now")
    try:
        nc = await nats.connect(nats_server.url)
    except BaseException:
        raw.close()
        raise
    try:
        for i in range(3):
            await nc.publish("write.now", b"now %d" % i)
            write_now(nc)
            assert nc._pending_data_size == 0 and not nc._pending
            # Read synchronously: this loop does not run, so only write_now can have sent it.
            assert raw.next_payload() == b"now %d" % i
        # Published without write_now: the flusher writes it once the loop runs.
        await nc.publish("write.now", b"later")
        await nc.flush()
        assert raw.next_payload() == b"later"
    finally:
        await nc.close()
        raw.close()


async def test_while_disconnected_it_leaves_the_publish_buffered_for_the_reconnect(tmp_path: Path) -> None:
    options = NatsServerOptions(port=free_port(), store_dir=str(tmp_path / "js"))
    servers = [EmbeddedNatsServer(options).start()]
    try:
        nc = await nats.connect(servers[0].url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        seen: list[bytes] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.data)

        await nc.subscribe("write.later", cb=on_msg)
        await nc.flush()
        pid = servers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not nc.is_connected, "the disconnect")
        servers[0].stop()
        for i in range(3):
            await nc.publish("write.later", b"%d" % i)
            write_now(nc)
        assert nc._pending_data_size > 0  # kept for the reconnect, not written to a dead socket
        servers.append(EmbeddedNatsServer(options).start())
        await wait_until(lambda: seen == [b"0", b"1", b"2"], "the buffered messages after the reconnect", 30)
        await nc.close()
    finally:
        for server in servers:
            server.stop()
