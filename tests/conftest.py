"""Fixtures: a real nats-server per session, a fresh namespace per test, real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.nats_server import EmbeddedNatsServer
from tdist.worker.spawn import spawn_worker

TESTS = Path(__file__).resolve().parent
OPERATORS = TESTS / "support" / "operators.py"


def op_impl(class_name: str) -> str:
    """``path:Class`` for a test operator, loadable in any process."""
    return f"{OPERATORS}:{class_name}"


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def nats_config(nats_server: EmbeddedNatsServer) -> NatsConfig:
    return NatsConfig(servers=(nats_server.url,))


@pytest.fixture
def rp(namespace: str) -> RequestPlaneConfig:
    """Short ack wait so that redelivery after a kill happens quickly."""
    return RequestPlaneConfig(namespace=namespace, ack_wait=2.0, max_deliver=3, storage="memory", max_age=600, max_bytes=16 << 20)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    worker_id: str

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerProcesses:
    """Starts ``tdist-worker`` processes and stops them by PID, whatever happens."""

    def __init__(self, nats_url: str, rp: RequestPlaneConfig, log_dir: Path) -> None:
        self.nats_url = nats_url
        self.rp = rp
        self.log_dir = log_dir
        self.procs: list[WorkerProcess] = []

    def start(self, name: str, *operators: str, registry_ttl: float = 2.0, drain_timeout: float = 30.0,
              extra: list[str] | None = None) -> WorkerProcess:
        worker_id = f"{name}-{uuid.uuid4().hex[:8]}"
        cmd = [
            "--nats-url", self.nats_url,
            "--namespace", self.rp.namespace,
            "--ack-wait", str(self.rp.ack_wait),
            "--max-deliver", str(self.rp.max_deliver),
            "--name", name,
            "--worker-id", worker_id,
            "--registry-ttl", str(registry_ttl),
            "--drain-timeout", str(drain_timeout),
        ]
        for op in operators:
            cmd += ["--operator", op]
        cmd += extra or []
        spawned = spawn_worker(cmd, self.log_dir / f"{worker_id}.log")
        assert spawned.worker_id == worker_id
        wp = WorkerProcess(spawned.proc, worker_id)
        self.procs.append(wp)
        return wp

    def kill(self, wp: WorkerProcess, sig: int = signal.SIGKILL) -> None:
        os.kill(wp.pid, sig)

    def stop_all(self) -> None:
        for wp in self.procs:
            if wp.proc.poll() is None:
                wp.proc.kill()
            wp.proc.wait(30)
            if wp.proc.stdout:
                wp.proc.stdout.close()


@pytest.fixture
def worker_processes(nats_server: EmbeddedNatsServer, rp: RequestPlaneConfig, tmp_path: Path
                     ) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(nats_server.url, rp, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
async def deployed(nats_config: NatsConfig, rp: RequestPlaneConfig) -> RequestPlaneConfig:
    """The test's namespace deployed (stream and buckets), as the agent does: callers never create them."""
    from tdist.request_plane.deploy import deploy

    await deploy(nats_config, rp)
    return rp


@pytest.fixture
async def client(nats_config: NatsConfig, deployed: RequestPlaneConfig):  # type: ignore[no-untyped-def]
    from tdist.client import Client

    async with Client(nats_config, request_plane=deployed) as c:
        yield c


@pytest.fixture
async def workers(nats_config: NatsConfig, rp: RequestPlaneConfig):  # type: ignore[no-untyped-def]
    """``await workers(name, OperatorConfig, ...)`` starts an in-process worker, stopped at teardown."""
    from tdist.config import OperatorConfig, WorkerConfig
    from tdist.worker.worker import Worker

    started: list[Worker] = []

    async def start(name: str, *operators: OperatorConfig, registry_ttl: float = 2.0, drain_timeout: float = 10.0,
                    data_plane: object = None) -> Worker:
        cfg = WorkerConfig(name=name, operators=operators, registry_ttl=registry_ttl, drain_timeout=drain_timeout)
        worker = Worker(cfg, nats=nats_config, request_plane=rp, data_plane=data_plane)  # type: ignore[arg-type]
        started.append(worker)
        await worker.start()
        return worker

    try:
        yield start
    finally:
        for worker in started:
            await worker.stop()


def operator(name: str, class_name: str, *, max_inflight: int = 1, version: int = 1, **parameters: object):  # type: ignore[no-untyped-def]
    from tdist.config import OperatorConfig

    return OperatorConfig(name=name, implementation=op_impl(class_name), version=version, max_inflight=max_inflight,
                          parameters=dict(parameters))


def operator_flag(name: str, class_name: str, *, max_inflight: int = 1, **parameters: object) -> str:
    spec = f"name={name},implementation={op_impl(class_name)},max_inflight={max_inflight}"
    return spec + "".join(f",param.{k}={json.dumps(v)}" for k, v in parameters.items())
