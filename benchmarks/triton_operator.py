#!/usr/bin/env python3
"""Triton operator: the encoder through tdist against tritonclient gRPC straight to the same server.

One ``tdist-worker`` process hosts a Triton operator for the hello-world ``encoder``
model; its Triton server is a child of the worker. The benchmark finds that server's
gRPC port (from the child's command line in /proc) and calls the very same server
directly with tritonclient's gRPC aio client (``tritonclient.grpc.aio`` itself, one
InferInput per call: what a user would write, with no tdist code). A second worker
hosts the echo operator (``tdist.operators.builtin:Echo``), called with the same
payload: its p50 is the request plane's own round trip. Requests are one at a time,
1,000 int64 each; rounds alternate direct, tdist and echo, and the medians over
rounds are reported.

``overhead_vs_echo_rtt`` = (tdist p50 - direct p50) / echo p50: what the Triton
operator adds beyond calling Triton, in request-plane round trips. Target
(README, Performance): <= 1.2, i.e. the Triton operator costs little more than the round trip.

    python benchmarks/triton_operator.py [--json] [--rounds 3] [--requests 500]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

import _common as common
from tdist import logs
from tdist.client import Client
from tdist.config import NatsConfig

MODEL_REPOSITORY = common.ROOT / "model_repository"
ELEMENTS = 1000
NAMESPACE = "bench"


def start_worker(url: str, log_file: str) -> subprocess.Popen[str]:
    op = (f"name=encoder,implementation=tdist.operators.triton:TritonOperator,max_inflight=4,"
          f"param.model_repository={MODEL_REPOSITORY}")
    return common.spawn_worker(["--nats-url", url, "--namespace", NAMESPACE, "--name", "encoder", "--operator", op,
                                "--log-level", "warning"], log_file)[0]


def start_echo_worker(url: str, log_file: str) -> subprocess.Popen[str]:
    op = "name=echo,implementation=tdist.operators.builtin:Echo,max_inflight=4"
    return common.spawn_worker(["--nats-url", url, "--namespace", NAMESPACE, "--name", "echo", "--operator", op,
                                "--log-level", "warning"], log_file)[0]


def triton_grpc_address(worker_pid: int) -> str:
    """host:port of the gRPC endpoint of the tritonserver the worker started (its child)."""
    for child in common.children(worker_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv or not argv[0].endswith("tritonserver"):
            continue
        opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
        host = opts.get("grpc-address", "127.0.0.1")
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return f"{host}:{opts['grpc-port']}"
    raise RuntimeError(f"no tritonserver child of worker pid {worker_pid}")


async def measure(url: str, grpc_address: str, rounds: int, n: int, warmup: int) -> dict[str, list[float]]:
    import tritonclient.grpc.aio as tc

    x = np.arange(ELEMENTS, dtype=np.int64)
    expected = ~x
    results: dict[str, list[float]] = {"direct_p50": [], "tdist_p50": [], "echo_p50": []}
    triton = tc.InferenceServerClient(grpc_address, channel_args=[("grpc.enable_http_proxy", 0)])
    try:
        async with Client(NatsConfig(servers=(url,)), namespace=NAMESPACE) as client:
            await client.wait_for_workers("encoder", timeout=60)
            await client.wait_for_workers("echo", timeout=60)
            await run_rounds(client, triton, tc, x, expected, results, rounds, n, warmup)
    finally:
        await triton.close()
    return results


async def run_rounds(client: Client, triton: Any, tc: Any, x: np.ndarray, expected: np.ndarray,
                     results: dict[str, list[float]], rounds: int, n: int, warmup: int) -> None:
    op = client.operator("encoder")
    echo_op = client.operator("echo")

    async def direct() -> None:
        inp = tc.InferInput("input", [ELEMENTS], "INT64")
        inp.set_data_from_numpy(x)
        r = await triton.infer("encoder", [inp], client_timeout=30)
        assert np.array_equal(r.as_numpy("output"), expected)

    async def echo() -> None:
        r = await echo_op.infer({"input": x}, timeout=30)
        assert np.array_equal(r.outputs["input"], x)

    async def via_tdist() -> None:
        r = await op.infer({"input": x}, timeout=30)
        assert np.array_equal(r.outputs["output"], expected)

    for r in range(rounds):
        results["direct_p50"].append(await common.serial(direct, n, warmup))
        results["tdist_p50"].append(await common.serial(via_tdist, n, warmup))
        results["echo_p50"].append(await common.serial(echo, n, warmup))
        print(f"round {r + 1}: direct p50 {results['direct_p50'][-1] * 1e3:.3f} ms, "
              f"tdist p50 {results['tdist_p50'][-1] * 1e3:.3f} ms, "
              f"echo p50 {results['echo_p50'][-1] * 1e3:.3f} ms", file=sys.stderr)


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--requests", type=int, default=500, help="measured requests per run")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests before each run")
    args = parser.parse_args()
    logs.configure("warning")
    common.print_conditions(f"Triton operator (encoder, {ELEMENTS} int64, one at a time): {args.requests} requests "
                            f"per run after {args.warmup} warm-up, concurrency 1, {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="tdist-bench-") as tmp, common.nats_server() as server, \
            common.Children() as procs:
        worker = procs.add(start_worker(server.url, f"{tmp}/worker.log"))
        echo_worker = procs.add(start_echo_worker(server.url, f"{tmp}/echo.log"))
        address = triton_grpc_address(worker.pid)
        print(f"pids: Triton worker {worker.pid}, echo worker {echo_worker.pid}, this process {os.getpid()}",
              file=sys.stderr, flush=True)
        res = asyncio.run(measure(server.url, address, args.rounds, args.requests, args.warmup))
    med = {k: common.median(v) for k, v in res.items()}
    summary = {
        "benchmark": "triton_operator",
        "elements": ELEMENTS,
        "requests": args.requests,
        "rounds": args.rounds,
        **common.conditions(),
        "direct_p50_ms": round(med["direct_p50"] * 1e3, 3),
        "tdist_p50_ms": round(med["tdist_p50"] * 1e3, 3),
        "echo_p50_ms": round(med["echo_p50"] * 1e3, 3),
        "overhead_ratio": round(med["tdist_p50"] / med["direct_p50"], 3),
        "overhead_vs_echo_rtt": round((med["tdist_p50"] - med["direct_p50"]) / med["echo_p50"], 3),
    }
    print(f"{'p50, 1 in flight':22}{'tritonclient gRPC':>20}{'tdist Triton':>15}{'tdist echo':>13}")
    print(f"{'':22}{summary['direct_p50_ms']:>17.3f} ms{summary['tdist_p50_ms']:>12.3f} ms"
          f"{summary['echo_p50_ms']:>10.3f} ms")
    print(f"overhead_vs_echo_rtt (tdist Triton - direct) / echo = {summary['overhead_vs_echo_rtt']:.2f}"
          f" (target <= 1.2); tdist / direct = {summary['overhead_ratio']:.2f}")
    common.emit_json(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
