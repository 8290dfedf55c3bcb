#!/usr/bin/env python3
"""Hello world: the tdist encoder_decoder pipeline against the same pipeline hand-written.

(a) tdist: an embedded nats-server and the three workers of etc/tdist/agent.toml
    (encoder and decoder: Triton operators; encoder_decoder: the orchestrator), one
    worker per stage, each its own ``tdist-worker`` process.
(b) raw: the same pipeline with no tdist at all: three raw nats-py responder
    processes ("encoder" and "decoder" call the same Triton models over tritonclient
    gRPC aio, "encoder_decoder" calls encoder then decoder with nc.request, int64
    bytes inline), against one Triton server with both models loaded.

Both answer 1,000-int64 requests (input_copies 1) from this process with 64 in
flight; every output is checked equal to its input. Rounds alternate tdist and raw
and the medians are reported. Targets (README, Performance): tdist/raw >= 0.75, and >= 100x
the original's published 9.1 requests/s.

    python benchmarks/hello_world.py [--json] [--rounds 3] [--requests 2000]
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable

import nats
import numpy as np

import _common as common
from tdist import logs
from tdist.client import Client
from tdist.config import NatsConfig
from tdist.triton import TritonServer

CONFIG = common.ROOT / "etc" / "tdist" / "agent.toml"
MODEL_REPOSITORY = common.ROOT / "model_repository"
NAMESPACE = "hello"  # from etc/tdist/agent.toml
WORKERS = ("encoder", "decoder", "encoder_decoder")
ELEMENTS = 1000
INFLIGHT = 64
ORIGINAL_RPS = 9.1

# argv: nats url, stage ("encoder" | "decoder" | "encoder_decoder"), triton grpc address
RAW_RESPONDER = """
import asyncio, sys
import nats, numpy as np
import tritonclient.grpc.aio as tc

async def main():
    url, stage, triton_url = sys.argv[1], sys.argv[2], sys.argv[3]
    nc = await nats.connect(url, pending_size=64 << 20)
    triton = tc.InferenceServerClient(triton_url, channel_args=[("grpc.enable_http_proxy", 0)])
    tasks = set()

    async def encoder(msg):
        x = np.frombuffer(msg.data, dtype=np.int64)
        inp = tc.InferInput("input", list(x.shape), "INT64")
        inp.set_data_from_numpy(x)
        r = await triton.infer("encoder", [inp], parameters={"input_copies": 1})
        k = r.as_numpy("input_copies").astype(np.int64).reshape(1)
        await msg.respond(k.tobytes() + r.as_numpy("output").tobytes())

    async def decoder(msg):
        k = np.frombuffer(msg.data[:8], dtype=np.int64).reshape(1)
        y = np.frombuffer(msg.data[8:], dtype=np.int64)
        a = tc.InferInput("input", list(y.shape), "INT64")
        a.set_data_from_numpy(y)
        b = tc.InferInput("input_copies", [1], "INT64")
        b.set_data_from_numpy(k)
        r = await triton.infer("decoder", [a, b])
        await msg.respond(r.as_numpy("output").tobytes())

    async def encoder_decoder(msg):
        enc = await nc.request("raw.encoder", msg.data, timeout=60)
        dec = await nc.request("raw.decoder", enc.data, timeout=60)
        await msg.respond(dec.data)

    handler = {"encoder": encoder, "decoder": decoder, "encoder_decoder": encoder_decoder}[stage]

    async def cb(msg):  # nats-py runs a subscription's callbacks one by one: serve concurrently
        t = asyncio.get_running_loop().create_task(handler(msg))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    await nc.subscribe("raw." + stage, queue=stage, cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.drain()
    await triton.close()
asyncio.run(main())
"""


def start_workers(url: str, log_dir: str) -> list[subprocess.Popen[str]]:
    """The three tdist workers of agent.toml, started together (not yet waited for)."""
    return [common.start_worker(["--config", str(CONFIG), "--worker", name, "--nats-url", url,
                                 "--log-level", "info"], f"{log_dir}/{name}.log")
            for name in WORKERS]


def start_raw(url: str, triton_address: str) -> list[subprocess.Popen[str]]:
    return [common.start_helper(RAW_RESPONDER, url, stage, triton_address) for stage in WORKERS]


def inputs_for(call: Callable[[np.ndarray], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
    """``call`` fed distinct inputs (64 of them, by request index), for ``common.parallel``."""
    rng = np.random.default_rng(0)
    inputs = [rng.integers(-(1 << 62), 1 << 62, ELEMENTS, dtype=np.int64) for _ in range(64)]
    return lambda i: call(inputs[i % len(inputs)])


async def measure(url: str, rounds: int, n: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"tdist_rps": [], "raw_rps": []}
    nc = await nats.connect(url, pending_size=64 << 20)
    async with Client(NatsConfig(servers=(url,)), namespace=NAMESPACE) as client:
        for name in WORKERS:
            await client.wait_for_workers(name, timeout=60)
        op = client.operator("encoder_decoder")

        async def via_tdist(x: np.ndarray) -> None:
            r = await op.infer({"input": x}, parameters={"input_copies": 1}, timeout=60)
            assert np.array_equal(r.outputs["output"], x)

        async def raw(x: np.ndarray) -> None:
            msg = await nc.request("raw.encoder_decoder", x.tobytes(), timeout=60)
            assert np.array_equal(np.frombuffer(msg.data, dtype=np.int64), x)

        for r in range(rounds):
            results["tdist_rps"].append(await common.parallel(inputs_for(via_tdist), n, INFLIGHT))
            results["raw_rps"].append(await common.parallel(inputs_for(raw), n, INFLIGHT))
            print(f"round {r + 1}: tdist {results['tdist_rps'][-1]:.1f} req/s, raw {results['raw_rps'][-1]:.1f} req/s",
                  file=sys.stderr)
    await nc.drain()
    return results


import contextlib
@contextlib.contextmanager
def _keep():
    import os; os.makedirs("/tmp/hwlogs", exist_ok=True); yield "/tmp/hwlogs"

def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    args = parser.parse_args()
    logs.configure("warning")
    common.print_conditions(f"hello world (encoder -> decoder, {ELEMENTS} int64, input_copies 1, 1 worker per "
                            f"stage): {args.requests} requests per run after {INFLIGHT} warm-up, concurrency "
                            f"{INFLIGHT} from one client process, {args.rounds} rounds")
    with _keep() as tmp, common.nats_server() as server, \
            common.Children() as procs:
        workers = [procs.add(w) for w in start_workers(server.url, tmp)]
        triton = TritonServer(model_repository=str(MODEL_REPOSITORY))
        try:
            triton.start()
            triton.load_model("encoder")
            triton.load_model("decoder")
            raws = [procs.add(r) for r in start_raw(server.url, triton.grpc_address)]
            for proc in raws:
                common.wait_line(proc, "ready", "raw responder")
            for proc, name in zip(workers, WORKERS):
                common.wait_worker_ready(proc, f"{tmp}/{name}.log", f"tdist worker {name}")
            res = asyncio.run(measure(server.url, args.rounds, args.requests))
        finally:
            procs.stop_all()
            triton.stop()
    med = {k: common.median(v) for k, v in res.items()}
    summary = {
        "benchmark": "hello_world",
        "elements": ELEMENTS,
        "inflight": INFLIGHT,
        "requests": args.requests,
        "rounds": args.rounds,
        **common.conditions(),
        "throughput_rps": round(med["tdist_rps"], 1),
        "raw_rps": round(med["raw_rps"], 1),
        "ratio_vs_raw": round(med["tdist_rps"] / med["raw_rps"], 3),
        "vs_original": round(med["tdist_rps"] / ORIGINAL_RPS, 1),
    }
    print(f"{'':22}{'raw nats-py':>14}{'tdist':>12}{'ratio':>10}{'target':>10}")
    print(f"{'req/s, 64 in flight':22}{summary['raw_rps']:>14.1f}{summary['throughput_rps']:>12.1f}"
          f"{summary['ratio_vs_raw']:>10.2f}{'>= 0.75':>10}")
    print(f"{'vs original 9.1 req/s':22}{'':>14}{summary['vs_original']:>11.1f}x{'':>10}{'>= 100':>10}")
    common.emit_json(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
