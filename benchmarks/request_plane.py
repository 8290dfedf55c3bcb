#!/usr/bin/env python3
"""Request plane: an echo operator through tdist against raw nats-py request/reply.

Both run in the same invocation against the same embedded nats-server, with the
responder in its own process and the caller in this one, 100-byte payloads:
one request at a time (p50 latency) and 64 in flight (throughput). Rounds
alternate raw and tdist so drift on a shared machine hits both alike; the
medians over rounds are reported. Targets (DESIGN.md): throughput ratio >= 0.5,
p50 ratio <= 2.0.

    python benchmarks/request_plane.py [--json] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import numpy as np

from tdist import logs
from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.nats_server import EmbeddedNatsServer

PAYLOAD = 100
RAW_SUBJECT = "bench.raw.echo"

RAW_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], pending_size=64 << 20)
    async def echo(msg):
        await msg.respond(msg.data)
    await nc.subscribe(sys.argv[2], queue="echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.drain()
asyncio.run(main())
"""


def start_raw_responder(url: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", RAW_RESPONDER, url, RAW_SUBJECT],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def start_tdist_worker(url: str, namespace: str, log_file: str, storage: str) -> subprocess.Popen[str]:
    cfg = Path(log_file).with_suffix(".toml")
    cfg.write_text(
        f'[nats]\nservers = ["{url}"]\n[request_plane]\nnamespace = "{namespace}"\nstorage = "{storage}"\n'
        f'[logging]\nlevel = "warning"\nfile = "{log_file}"\n'
        '[worker]\nname = "echo"\n[[worker.operators]]\nname = "echo"\n'
        'implementation = "tdist.operators.builtin:Echo"\nmax_inflight = 64\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "tdist.worker.main", "--config", str(cfg)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline(), f"tdist worker failed; see {log_file}"
    return proc


async def serial(call: Callable[[], Awaitable[None]], n: int) -> float:
    """p50 latency in seconds of ``n`` calls made one after another."""
    for _ in range(min(200, n)):
        await call()  # warm-up
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - t0)
    return statistics.median(lat)


async def parallel(call: Callable[[], Awaitable[None]], n: int, inflight: int) -> float:
    """Requests per second with ``inflight`` callers sharing ``n`` calls."""
    await asyncio.gather(*(call() for _ in range(inflight)))  # warm-up
    left = n

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(inflight)))
    return n / (time.perf_counter() - t0)


async def measure(url: str, namespace: str, storage: str, rounds: int, n_serial: int, n_parallel: int
                  ) -> dict[str, list[float]]:
    payload = os.urandom(PAYLOAD)
    tensor = np.frombuffer(payload, dtype=np.uint8)
    results: dict[str, list[float]] = {"raw_p50": [], "tdist_p50": [], "raw_rps": [], "tdist_rps": []}
    nc = await nats.connect(url, pending_size=64 << 20)
    rp = RequestPlaneConfig(namespace=namespace, storage=storage)  # type: ignore[arg-type]
    async with Client(NatsConfig(servers=(url,)), request_plane=rp) as client:
        await client.wait_for_workers("echo", timeout=30)
        op = client.operator("echo")

        async def raw() -> None:
            msg = await nc.request(RAW_SUBJECT, payload, timeout=10)
            assert len(msg.data) == PAYLOAD

        async def via_tdist() -> None:
            resp = await op.infer({"x": tensor}, timeout=10)
            assert resp.outputs["x"].nbytes == PAYLOAD

        for r in range(rounds):
            results["raw_p50"].append(await serial(raw, n_serial))
            results["tdist_p50"].append(await serial(via_tdist, n_serial))
            results["raw_rps"].append(await parallel(raw, n_parallel, 64))
            results["tdist_rps"].append(await parallel(via_tdist, n_parallel, 64))
            print(f"round {r + 1}: raw p50 {results['raw_p50'][-1] * 1e6:.0f} us, tdist p50 "
                  f"{results['tdist_p50'][-1] * 1e6:.0f} us, raw {results['raw_rps'][-1]:.0f} req/s, "
                  f"tdist {results['tdist_rps'][-1]:.0f} req/s", file=sys.stderr)
    await nc.drain()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serial", type=int, default=2000, help="requests per one-at-a-time run")
    parser.add_argument("--parallel", type=int, default=20000, help="requests per 64-in-flight run")
    parser.add_argument("--storage", choices=("file", "memory"), default="file", help="tdist stream storage")
    args = parser.parse_args()
    logs.configure("warning")
    with tempfile.TemporaryDirectory(prefix="tdist-bench-") as tmp:
        server = EmbeddedNatsServer()
        procs: list[subprocess.Popen[str]] = []
        try:
            server.start()
            procs.append(start_raw_responder(server.url))
            procs.append(start_tdist_worker(server.url, "bench", f"{tmp}/worker.log", args.storage))
            res = asyncio.run(measure(server.url, "bench", args.storage, args.rounds, args.serial, args.parallel))
        finally:
            for proc in procs:
                if proc.stdin:
                    proc.stdin.close()
                proc.terminate()
                proc.wait(30)
                if proc.stdout:
                    proc.stdout.close()
            server.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    summary = {
        "benchmark": "request_plane",
        "payload_bytes": PAYLOAD,
        "storage": args.storage,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "raw_p50_us": round(med["raw_p50"] * 1e6, 1),
        "tdist_p50_us": round(med["tdist_p50"] * 1e6, 1),
        "raw_rps_64": round(med["raw_rps"], 1),
        "tdist_rps_64": round(med["tdist_rps"], 1),
        "p50_ratio_1": round(med["tdist_p50"] / med["raw_p50"], 3),
        "throughput_ratio_64": round(med["tdist_rps"] / med["raw_rps"], 3),
    }
    print(f"request plane, {PAYLOAD} B echo, {os.cpu_count()} cores, tdist stream storage={args.storage}, "
          f"median of {args.rounds} rounds")
    print(f"{'':22}{'raw nats-py':>14}{'tdist':>14}{'ratio':>10}{'target':>10}")
    print(f"{'p50, 1 in flight':22}{summary['raw_p50_us']:>11.0f} us{summary['tdist_p50_us']:>11.0f} us"
          f"{summary['p50_ratio_1']:>10.2f}{'<= 2.0':>10}")
    print(f"{'req/s, 64 in flight':22}{summary['raw_rps_64']:>14.0f}{summary['tdist_rps_64']:>14.0f}"
          f"{summary['throughput_ratio_64']:>10.2f}{'>= 0.5':>10}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
