"""``make demo``: an embedded NATS, two echo workers and a short load against them.

Starts everything on 127.0.0.1, prints what happens, drains the workers with
SIGTERM and stops the server. Exit code 0 only if every answer came back right.
The hello-world pipeline replaces this once its operators exist.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tdist import logs
from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.nats_server import EmbeddedNatsServer
from tdist.progress import Progress


def start_worker(nats_url: str, namespace: str, name: str, log_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdist.worker.main", "--nats-url", nats_url, "--namespace", namespace,
         "--name", name, "--operator", "name=echo,implementation=tdist.operators.builtin:Echo,max_inflight=32",
         "--log-file", str(log_dir / f"{name}.log")],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {name} failed to start; see {log_dir / f'{name}.log'}")
    return proc, json.loads(line)["worker_id"]


async def load(nats_url: str, namespace: str, requests: int, concurrency: int) -> int:
    async with Client(NatsConfig(servers=(nats_url,)), request_plane=RequestPlaneConfig(namespace=namespace)) as client:
        workers = await client.wait_for_workers("echo", count=2, timeout=30)
        print(f"registry: {len(workers)} workers serving echo: {', '.join(sorted(w.id for w in workers))}")
        op = client.operator("echo")
        sem = asyncio.Semaphore(concurrency)
        served_by: dict[str, int] = {}
        errors = 0
        progress = Progress(requests, label="echo")

        async def one(i: int) -> None:
            nonlocal errors
            payload = np.full(12, i, dtype=np.int64)  # about 100 bytes of tensor data
            async with sem:
                try:
                    resp = await op.infer({"x": payload}, timeout=30)
                    if not np.array_equal(resp.outputs["x"], payload):
                        errors += 1
                    served_by[resp.worker_id] = served_by.get(resp.worker_id, 0) + 1
                except Exception as exc:
                    errors += 1
                    print(f"request {i} failed: {exc}", file=sys.stderr)
                progress.advance()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
        progress.close()
        print(f"served by: {json.dumps(served_by)}")
        print(f"Throughput: {requests / elapsed:.1f} requests/s  Total Time: {elapsed:.3f} s  "
              f"Errors: {errors}  (concurrency {concurrency}, {os.cpu_count()} cores)")
        return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tdist-demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    logs.configure("warning")
    namespace = "demo"
    with tempfile.TemporaryDirectory(prefix="tdist-demo-") as tmp:
        log_dir = Path(tmp)
        server = EmbeddedNatsServer()
        workers: list[subprocess.Popen[str]] = []
        try:
            server.start()
            print(f"nats-server up at {server.url} (pid {server.pid}, JetStream on)")
            for name in ("echo-a", "echo-b"):
                proc, worker_id = start_worker(server.url, namespace, name, log_dir)
                workers.append(proc)
                print(f"worker {worker_id} up (pid {proc.pid})")
            errors = asyncio.run(load(server.url, namespace, args.requests, args.concurrency))
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(60) for proc in workers]
            print(f"workers drained and exited with {codes}")
            return 0 if errors == 0 and codes == [0] * len(codes) else 1
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout:
                    proc.stdout.close()
            server.stop()
            print("nats-server stopped")


if __name__ == "__main__":
    sys.exit(main())
