#!/usr/bin/env python3
"""Request plane: an echo operator through tdist against raw nats-py request/reply.

Both run in the same invocation against the same embedded nats-server, with the
responder in its own process and the caller in this one, 100-byte payloads:
one request at a time (p50 latency) and 64 in flight (throughput). Rounds
alternate raw and tdist so drift on a shared machine hits both alike; the
medians over rounds are reported. Targets (README, Performance): throughput ratio >= 0.5,
p50 ratio <= 1.8.

    python benchmarks/request_plane.py [--json] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nats
import numpy as np

import _common as common
from tdist import logs
from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig

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
    proc = common.start_helper(RAW_RESPONDER, url, RAW_SUBJECT)
    common.wait_line(proc, "ready", "raw responder")
    return proc


def start_tdist_worker(url: str, namespace: str, log_file: str, storage: str) -> subprocess.Popen[str]:
    cfg = Path(log_file).with_suffix(".toml")
    cfg.write_text(
        f'[nats]\nservers = ["{url}"]\n[request_plane]\nnamespace = "{namespace}"\nstorage = "{storage}"\n'
        '[logging]\nlevel = "warning"\n'
        '[worker]\nname = "echo"\n[[worker.operators]]\nname = "echo"\n'
        'implementation = "tdist.operators.builtin:Echo"\nmax_inflight = 64\n'
    )
    return common.spawn_worker(["--config", str(cfg)], log_file)[0]


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

        warmup = min(200, n_serial)
        for r in range(rounds):
            results["raw_p50"].append(await common.serial(raw, n_serial, warmup))
            results["tdist_p50"].append(await common.serial(via_tdist, n_serial, warmup))
            results["raw_rps"].append(await common.parallel(lambda _: raw(), n_parallel, 64))
            results["tdist_rps"].append(await common.parallel(lambda _: via_tdist(), n_parallel, 64))
            print(f"round {r + 1}: raw p50 {results['raw_p50'][-1] * 1e6:.0f} us, tdist p50 "
                  f"{results['tdist_p50'][-1] * 1e6:.0f} us, raw {results['raw_rps'][-1]:.0f} req/s, "
                  f"tdist {results['tdist_rps'][-1]:.0f} req/s", file=sys.stderr)
    await nc.drain()
    return results


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--serial", type=int, default=2000, help="requests per one-at-a-time run")
    parser.add_argument("--parallel", type=int, default=20000, help="requests per 64-in-flight run")
    parser.add_argument("--storage", choices=("file", "memory"), default="file", help="tdist stream storage")
    args = parser.parse_args()
    logs.configure("warning")
    common.print_conditions(f"request plane, {PAYLOAD} B echo, tdist stream storage={args.storage}, "
                            f"median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="tdist-bench-") as tmp, common.nats_server() as server, \
            common.Children() as procs:
        procs.add(start_raw_responder(server.url), 30)
        procs.add(start_tdist_worker(server.url, "bench", f"{tmp}/worker.log", args.storage), 30)
        res = asyncio.run(measure(server.url, "bench", args.storage, args.rounds, args.serial, args.parallel))
    med = {k: common.median(v) for k, v in res.items()}
    summary = {
        "benchmark": "request_plane",
        "payload_bytes": PAYLOAD,
        "storage": args.storage,
        "rounds": args.rounds,
        **common.conditions(),
        "raw_p50_us": round(med["raw_p50"] * 1e6, 1),
        "tdist_p50_us": round(med["tdist_p50"] * 1e6, 1),
        "raw_rps_64": round(med["raw_rps"], 1),
        "tdist_rps_64": round(med["tdist_rps"], 1),
        "p50_ratio_1": round(med["tdist_p50"] / med["raw_p50"], 3),
        "throughput_ratio_64": round(med["tdist_rps"] / med["raw_rps"], 3),
    }
    print(f"{'':22}{'raw nats-py':>14}{'tdist':>14}{'ratio':>10}{'target':>10}")
    print(f"{'p50, 1 in flight':22}{summary['raw_p50_us']:>11.0f} us{summary['tdist_p50_us']:>11.0f} us"
          f"{summary['p50_ratio_1']:>10.2f}{'<= 1.8':>10}")
    print(f"{'req/s, 64 in flight':22}{summary['raw_rps_64']:>14.0f}{summary['tdist_rps_64']:>14.0f}"
          f"{summary['throughput_ratio_64']:>10.2f}{'>= 0.5':>10}")
    common.emit_json(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
