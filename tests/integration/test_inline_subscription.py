"""subscribe_inline against a real nats-server: every message reaches the plain handler in order,
a failing handler neither stops delivery nor breaks the connection, unsubscribe ends delivery,
and delivery goes on after the server restarts; read_drained tells the last message of a read."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tdist.process import free_port
from tdist.request_plane.connection import _InlineDelivery, read_drained, subscribe_inline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


async def test_messages_reach_the_handler_in_order_and_a_failing_handler_is_contained(
        nats_server: EmbeddedNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        seen: list[bytes] = []

        def handler(msg: Msg) -> None:
            if msg.data == b"boom":
                raise RuntimeError("handler failed")
            seen.append(msg.data)

        sub = await subscribe_inline(nc, "inline.test", handler)
        assert isinstance(sub._pending_queue, _InlineDelivery)  # the inline path, not the fallback
        for i in range(500):
            await nc.publish("inline.test", b"boom" if i == 100 else str(i).encode())
        await nc.flush()
        await wait_until(lambda: len(seen) == 499, "all but the failing message")
        assert seen == [str(i).encode() for i in range(500) if i != 100]
        assert sub.pending_bytes == 0 and sub.pending_msgs == 0

        # The connection is still usable both ways after the failure.
        reply = await nc.request("$JS.API.INFO", b"", timeout=5)
        assert reply.data

        await sub.unsubscribe()
        # A message after the unsubscribe, then one on another subject: the server delivers in
        # order, so once the second has arrived the first would have too.
        sentinel: list[bytes] = []
        await subscribe_inline(nc, "inline.sentinel", lambda msg: sentinel.append(msg.data))
        await nc.publish("inline.test", b"after")
        await nc.publish("inline.sentinel", b"done")
        await wait_until(lambda: sentinel == [b"done"], "the sentinel")
        assert seen[-1] == b"499"
    finally:
        await nc.close()


async def test_delivery_goes_on_after_the_server_restarts(tmp_path: Path) -> None:
    options = NatsServerOptions(port=free_port(), store_dir=str(tmp_path / "js"))
    servers = [EmbeddedNatsServer(options).start()]
    try:
        nc = await nats.connect(servers[0].url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        seen: list[bytes] = []
        await subscribe_inline(nc, "inline.restart", lambda msg: seen.append(msg.data))
        await nc.publish("inline.restart", b"before")
        await nc.flush()
        await wait_until(lambda: seen == [b"before"], "the first message")
        pid = servers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not nc.is_connected, "the disconnect")
        servers[0].stop()
        servers.append(EmbeddedNatsServer(options).start())
        await wait_until(lambda: nc.is_connected, "the reconnect", 30)
        await nc.publish("inline.restart", b"after")
        await nc.flush()
        await wait_until(lambda: seen == [b"before", b"after"], "the message after the restart")
        await nc.close()
    finally:
        for server in servers:
            server.stop()


async def test_read_drained_tells_the_last_message_of_a_read(nats_server: EmbeddedNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    port = int(nats_server.url.rsplit(":", 1)[1])
    try:
        drained: list[bool] = []
        await subscribe_inline(nc, "inline.reads", lambda msg: drained.append(read_drained(nc)))
        await nc.flush()
        # Published from a blocking socket while this loop does not run: the server has all 50
        # for our connection before its reader reads again, so they come in few reads.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.recv(65536)  # INFO
            raw.sendall(b'CONNECT {"verbose":false}\r\n' + b"PUB inline.reads 1\r\nx\r\n" * 50 + b"PING\r\n")
            answer = b""
            while b"PONG" not in answer:
                chunk = raw.recv(65536)
                assert chunk, "the server closed the publishing connection"
                answer += chunk
        await wait_until(lambda: len(drained) == 50, "all 50 messages")
        assert drained[-1] is True  # nothing after the last one
        assert False in drained  # others had more of their read behind them
    finally:
        await nc.close()
