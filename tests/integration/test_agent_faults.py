"""The agent under faults: start-up failures are early and one line, NATS unreachable at start keeps it
alive without workers, a reload whose stop outlasts any RPC timeout keeps the node up, and the canary
finds a worker that is alive but not serving and has it restarted without losing a request."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import nats
import nats.aio.msg
import numpy as np
import pytest

from tdist import names
from tdist.agent.daemon import RPC_TIMEOUT
from tdist.client import Client
from tdist.request_plane.deploy import deploy
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.errors import NatsServerError
from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tdist.request_plane import protocol
from tests.support.agent import (
    AgentProcess,
    agent_toml,
    cleanup,
    free_port,
    one_line,
    processes_of,
    signal_quietly,
    write_agent_toml,
)

pytestmark = pytest.mark.timeout(300)


def rp_for(namespace: str) -> RequestPlaneConfig:
    return RequestPlaneConfig(namespace=namespace, ack_wait=3.0, storage="memory", max_bytes=16 << 20)


# -- start-up -------------------------------------------------------------------------------------


@pytest.mark.parametrize("taken", ["http", "nats"])
async def test_a_port_in_use_fails_at_once_in_one_line_with_nothing_started(
        tmp_path: Path, namespace: str, taken: str) -> None:
    state = tmp_path / "state"
    nats_port, http_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", http_port if taken == "http" else nats_port))
        holder.listen()
        config = write_agent_toml(tmp_path, namespace=namespace, http_port=http_port,
                                  nats=f'servers = ["nats://127.0.0.1:{nats_port}"]\nembedded = true')
        agent = AgentProcess(config, wait_line=False)
        try:
            assert await agent.wait_exit(60) == 1
            line = one_line(agent.stderr())
            if taken == "http":
                assert line == f"tdist-agent: http: cannot listen on 127.0.0.1:{http_port}: Address already in use"
            else:
                assert line.startswith(f"tdist-agent: nats.servers: 127.0.0.1:{nats_port} is in use")
            assert processes_of(state) == {"nats-server": [], "supervisord": [], "worker": [], "other": []}
            assert not (tmp_path / "logs" / "nats-server.out").exists()  # the server never started
            assert not (state / "supervisord.conf").exists()
        finally:
            cleanup(state, agent)


def test_nats_server_failure_is_one_line(tmp_path: Path) -> None:
    """If the port is taken after the agent's check, the server's own failure is its one fatal line."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = EmbeddedNatsServer(NatsServerOptions(port=port, log_file=str(tmp_path / "nats.log")))
        with pytest.raises(NatsServerError) as err:
            server.start()
    message = err.value.message
    assert "\n" not in message and "address already in use" in message and len(message) < 300
    assert message.startswith("nats-server exited with 1: Error listening on port")


async def test_nats_unreachable_at_start_keeps_the_agent_alive_without_workers(
        tmp_path: Path, namespace: str) -> None:
    state = tmp_path / "state"
    port = free_port()
    config = write_agent_toml(tmp_path, namespace=namespace, count=1,
                              nats=f'servers = ["nats://127.0.0.1:{port}"]\nconnect_timeout = 1.0')
    agent = AgentProcess(config)
    server = EmbeddedNatsServer(NatsServerOptions(port=port))
    try:
        for _ in range(40):  # a while: /live answers, /ready says why not, no worker comes and goes
            assert agent.get("/live")[0] == 200
            code, _ = agent.get("/ready")
            info = agent.ready_info()
            assert code == 503 and not info["nats_connected"]
            procs = processes_of(state)
            assert procs["supervisord"] == [] and procs["worker"] == []
            await asyncio.sleep(0.1)
        assert "cannot connect to NATS" in (agent.ready_info()["nats_error"] or "")
        await asyncio.to_thread(server.start)
        await agent.wait_ready(timeout=120)
        assert len(processes_of(state)["worker"]) == 1
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    finally:
        cleanup(state, agent)
        server.stop()


# -- reload ---------------------------------------------------------------------------------------


async def test_reload_whose_stop_outlasts_the_rpc_timeout_keeps_the_node_up(
        tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    """The changed worker drains a request for longer than any supervisord RPC may take: the agent
    stops its group without an RPC that waits, and /live, /metrics and the request all get through."""
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    slow = RPC_TIMEOUT + 5

    def text(drain: float) -> str:
        return agent_toml(tmp_path, namespace=namespace, count=1, operator="Announcing", delay=slow,
                          drain_timeout=drain, nats=f'servers = ["{nats_server.url}"]')

    config.write_text(text(40.0))
    agent = AgentProcess(config)
    try:
        await agent.wait_ready()
        [old_worker] = processes_of(state)["worker"]
        async with Client(NatsConfig(servers=(nats_server.url,)), request_plane=rp_for(namespace)) as client:
            stream = await client.operator("op").call({"i": np.array([7])}, timeout=120)
            first = await stream.__anext__()
            assert not first.final  # it runs: the worker must drain it before it can stop
            config.write_text(text(41.0))  # the worker changed: its group restarts
            agent.proc.send_signal(signal.SIGHUP)
            started = time.monotonic()
            while agent.metric("tdist_agent_reloads_total") < 1:
                assert agent.proc.poll() is None, agent.stderr()[-3000:]
                assert agent.get("/live")[0] == 200
                assert agent.metric("tdist_agent_reload_apply_failures_total") == 0
                assert time.monotonic() - started < 120, "reload never finished"
                await asyncio.sleep(0.5)
            final = [r async for r in stream][-1]
            assert final.outputs["i"].tolist() == [7] and final.attempt == 1
        await agent.wait_ready()
        [new_worker] = processes_of(state)["worker"]
        assert new_worker != old_worker
        assert agent.metric("tdist_agent_reload_failures_total") == 0
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    finally:
        cleanup(state, agent)


# -- canary ----------------------------------------------------------------------------------------


async def test_a_stopped_worker_fails_the_canary_and_is_restarted_without_losing_a_request(
        tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    config = write_agent_toml(tmp_path, namespace=namespace, count=2, operator="Counting", delay=0.2,
                              canary="period = 1.0\ntimeout = 1.0\nfailures = 2",
                              nats=f'servers = ["{nats_server.url}"]')
    agent = AgentProcess(config)
    stopped = 0
    try:
        await agent.wait_ready()
        # The agent watches the registry: no consumer is created on the workers bucket while it runs
        # (listing keys made one per node per second).
        nc = await nats.connect(nats_server.url)
        creates: list[str] = []
        bucket_stream = f"KV_{names.workers_bucket(namespace)}"

        async def on_api(msg: nats.aio.msg.Msg) -> None:
            if bucket_stream in msg.subject:
                creates.append(msg.subject)

        sub = await nc.subscribe("$JS.API.CONSUMER.>", cb=on_api)
        await asyncio.sleep(4)
        await sub.unsubscribe()
        await nc.close()
        assert creates == []
        assert agent.metric("tdist_agent_canary_requests_total") >= 2  # the canary runs meanwhile
        assert agent.metric("tdist_agent_canary_failures_total") == 0

        procs = processes_of(state)
        assert len(procs["worker"]) == 2
        async with Client(NatsConfig(servers=(nats_server.url,)), request_plane=rp_for(namespace)) as client:
            op = client.operator("op")

            async def one(i: int) -> list[int]:
                return (await op.infer({"i": np.array([i])}, timeout=120)).outputs["i"].tolist()

            first_batch = [asyncio.ensure_future(one(i)) for i in range(16)]
            await asyncio.sleep(0.3)
            stopped = procs["worker"][0]
            os.kill(stopped, signal.SIGSTOP)  # alive (supervisord: RUNNING) but serving nothing
            second_batch = [asyncio.ensure_future(one(100 + i)) for i in range(16)]
            saw_not_ready = False
            for _ in range(600):
                code = agent.get("/ready")[0]
                saw_not_ready = saw_not_ready or code == 503
                workers = processes_of(state)["worker"]
                if saw_not_ready and code == 200 and stopped not in workers:
                    break
                await asyncio.sleep(0.1)
            assert saw_not_ready
            assert stopped not in processes_of(state)["worker"] and len(processes_of(state)["worker"]) == 2
            assert agent.metric("tdist_agent_canary_restarts_total") >= 1
            assert "worker_unhealthy" in agent.stderr()
            results = await asyncio.gather(*first_batch, *second_batch)  # every request: its final result
            assert results == [[i] for i in range(16)] + [[100 + i] for i in range(16)]
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    finally:
        if stopped:
            signal_quietly(stopped, signal.SIGCONT)
        cleanup(state, agent)


async def test_a_canary_on_an_operator_that_hangs_marks_the_entry_unhealthy(
        tmp_path: Path, namespace: str, nats_server) -> None:  # type: ignore[no-untyped-def]
    """A configured canary payload (the worker's own operator, a request that never ends in time):
    the worker keeps its heartbeat, yet the agent marks its registry entry unhealthy and restarts it."""
    state = tmp_path / "state"
    config = write_agent_toml(
        tmp_path, namespace=namespace, count=1, operator="Counting", canary="period = 1.0\ntimeout = 0.5\nfailures = 2",
        nats=f'servers = ["{nats_server.url}"]',
        extra_worker='[workers.canary]\noperator = "op"\ninputs = { x = [1, 2] }\nparameters = { delay = 30 }\n')
    agent = AgentProcess(config)
    try:
        await deploy(NatsConfig(servers=(nats_server.url,)), rp_for(namespace))  # the agent does it too
        async with Client(NatsConfig(servers=(nats_server.url,)), request_plane=rp_for(namespace)) as client:
            registry = await client.registry()
            async with registry.watch() as watch:
                seen: list[tuple[str, int]] = []
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    w = watch.workers.get("testnode-w-0")
                    if w is not None and (not seen or seen[-1] != (w.state, w.pid)):
                        seen.append((w.state, w.pid))
                    if any(s == "unhealthy" for s, _ in seen) and w is not None and w.state == "serving" \
                            and w.pid != next(p for s, p in seen if s == "unhealthy"):
                        break
                    await watch.changed(timeout=0.5)
                unhealthy = [p for s, p in seen if s == "unhealthy"]
                assert unhealthy, seen
                assert any(s == "serving" and p != unhealthy[0] for s, p in seen[seen.index(("unhealthy", unhealthy[0])):]), seen
        assert agent.metric("tdist_agent_canary_restarts_total") >= 1
    finally:
        cleanup(state, agent)


def test_the_canary_costs_what_the_docs_say() -> None:
    """The built-in ping's messages, as the agent sends them: a request of about 200 B, a final
    response of about 110 B (CanaryConfig's docstring states the cost from these)."""
    request = protocol.RequestMessage(id="r" * 17, trace_id="r" * 17, operator="_ping", version=1,
                                      deadline=time.time() + 2, reply_to="_INBOX." + "x" * 22 + ".r." + "r" * 17,
                                      parameters={}, inputs={})
    response = protocol.ResponseMessage("r" * 17, "final", "testnode-w-0", 1, {})
    size_req, size_resp = len(protocol.encode_request(request)), len(protocol.encode_response(response))
    print(f"canary: request {size_req} B, response {size_resp} B")
    assert 150 <= size_req <= 260 and 80 <= size_resp <= 160
