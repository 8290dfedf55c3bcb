#!/usr/bin/env python3
"""Request plane: an echo operator through tdist against raw nats-py request/reply.

Both run in the same invocation against the same embedded nats-server, with the
responder in its own process and the caller in this one, 100-byte payloads:
one request at a time (p50 latency) and 64 in flight (throughput). Rounds
alternate raw and tdist so drift on a shared machine hits both alike; the
medians over rounds are reported. Targets (README, Performance): throughput ratio >= 0.5,
p50 ratio <= 1.8.

Also measured, not a target: the **JetStream floor**, the least any request plane on a
JetStream work queue costs from Python: a hand-written nats-py echo with tdist's message
flow and nothing else (publish with a message id into a work-queue stream of the same
storage, PubAck to the caller's inbox, one durable pull consumer asked in batches, the
response to the caller's inbox, then the ack). ``floor_*`` ratios are against raw too; tdist's
distance to the floor is what its own code costs. The **batched floor** is the same with
tdist's batches: the requests a caller submits in one pass of its event loop go out as one
stream message, answered one by one and acknowledged once (``floor_batch_*``): what the
message flow tdist uses allows at 64 in flight.

    python benchmarks/request_plane.py [--json] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


FLOOR_STREAM = "BENCHFLOOR"
FLOOR_SUBJECT = "benchfloor.echo"
FLOOR_RESPONDER = """
import asyncio, json, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], pending_size=64 << 20)
    inbox, next_subject = nc.new_inbox(), "$JS.API.CONSUMER.MSG.NEXT.%s.echo" % sys.argv[2]
    batched = sys.argv[3] == "batched"
    free = 0
    async def ask(n):
        body = json.dumps({"batch": n, "expires": 30_000_000_000}).encode()
        await nc.publish(next_subject, body, reply=inbox)
    def records(data):  # a batch: records of u32 length, then reply inbox | payload
        offset = 0
        while offset < len(data):
            size = int.from_bytes(data[offset:offset + 4], "little")
            yield data[offset + 4:offset + 4 + size]
            offset += 4 + size
    async def on_msg(msg):
        nonlocal free
        if not msg.reply:  # a pull status (408, 409, 100): no request
            return
        for record in records(msg.data) if batched else (msg.data,):
            reply_to, _, body = record.partition(b"|")
            await nc.publish(reply_to.decode(), body)
        await nc.publish(msg.reply, b"+ACK")
        free += 1
        if free >= 16:
            n, free = free, 0
            await ask(n)
    await nc.subscribe(inbox, cb=on_msg)
    await ask(64)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.drain()
asyncio.run(main())
"""
"""The floors' responder: ``argv`` nats url, stream, "batched" (records) or "single"."""
FLOOR_BATCH_STREAM = "BENCHFLOORB"
FLOOR_BATCH_SUBJECT = "benchfloorb.echo"


async def deploy_floor(url: str, storage: str) -> None:
    """The floors' work-queue streams and their one durable pull consumer each (tdist's shapes)."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for stream, subject in ((FLOOR_STREAM, FLOOR_SUBJECT), (FLOOR_BATCH_STREAM, FLOOR_BATCH_SUBJECT)):
            await js.add_stream(StreamConfig(
                name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE if storage == "file" else StorageType.MEMORY))
            await js.add_consumer(stream, ConsumerConfig(durable_name="echo", ack_policy=AckPolicy.EXPLICIT,
                                                         max_ack_pending=100_000, ack_wait=30))
    finally:
        await nc.close()


class FloorCaller:
    """The caller side of the floor: publish with a message id, PubAck and response on one inbox."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.count = 0

    async def start(self) -> None:
        async def on_inbox(msg: Any) -> None:
            _, kind, request_id = msg.subject.rsplit(".", 2)
            if kind == "r":
                fut = self.waiting.pop(request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.data)
        await self.nc.subscribe(f"{self.inbox}.>", cb=on_inbox)

    def _expect(self) -> tuple[str, asyncio.Future[bytes]]:
        """A new request id and the future its response resolves."""
        self.count += 1
        request_id = str(self.count)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = fut
        return request_id, fut

    async def call(self, payload: bytes) -> bytes:
        request_id, fut = self._expect()
        await self.nc.publish(FLOOR_SUBJECT, f"{self.inbox}.r.{request_id}|".encode() + payload,
                              reply=f"{self.inbox}.a.{request_id}", headers={"Nats-Msg-Id": request_id})
        return await asyncio.wait_for(fut, 10)


class FloorBatchCaller(FloorCaller):
    """The batched floor's caller: the requests of one loop pass go out as one stream message
    (length-prefixed records), with one message id and one PubAck, as tdist's batches do."""

    def __init__(self, nc: Any) -> None:
        super().__init__(nc)
        self._records: list[bytes] = []
        self._publishing: set[asyncio.Task[None]] = set()

    async def call(self, payload: bytes) -> bytes:
        request_id, fut = self._expect()
        record = f"{self.inbox}.r.{request_id}|".encode() + payload
        self._records.append(len(record).to_bytes(4, "little") + record)
        if len(self._records) == 1:  # the first of this pass: publish them all when the pass ends
            asyncio.get_running_loop().call_soon(self._flush, request_id)
        return await asyncio.wait_for(fut, 10)

    def _flush(self, batch_id: str) -> None:
        data, self._records = b"".join(self._records), []
        task = asyncio.get_running_loop().create_task(self.nc.publish(
            FLOOR_BATCH_SUBJECT, data, reply=f"{self.inbox}.a.b{batch_id}", headers={"Nats-Msg-Id": f"b{batch_id}"}))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)


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
    results: dict[str, list[float]] = {k: [] for k in (
        "raw_p50", "tdist_p50", "floor_p50", "floor_batch_p50", "raw_rps", "tdist_rps", "floor_rps",
        "floor_batch_rps")}
    nc = await nats.connect(url, pending_size=64 << 20)
    floor = FloorCaller(nc)
    await floor.start()
    floor_batch = FloorBatchCaller(nc)
    await floor_batch.start()
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

        async def via_floor() -> None:
            assert len(await floor.call(payload)) == PAYLOAD

        async def via_floor_batch() -> None:
            assert len(await floor_batch.call(payload)) == PAYLOAD

        warmup = min(200, n_serial)
        for r in range(rounds):
            results["raw_p50"].append(await common.serial(raw, n_serial, warmup))
            results["tdist_p50"].append(await common.serial(via_tdist, n_serial, warmup))
            results["floor_p50"].append(await common.serial(via_floor, n_serial, warmup))
            results["floor_batch_p50"].append(await common.serial(via_floor_batch, n_serial, warmup))
            results["raw_rps"].append(await common.parallel(lambda _: raw(), n_parallel, 64))
            results["tdist_rps"].append(await common.parallel(lambda _: via_tdist(), n_parallel, 64))
            results["floor_rps"].append(await common.parallel(lambda _: via_floor(), n_parallel, 64))
            results["floor_batch_rps"].append(await common.parallel(lambda _: via_floor_batch(), n_parallel, 64))
            print(f"round {r + 1}: p50 raw {results['raw_p50'][-1] * 1e6:.0f} us, tdist "
                  f"{results['tdist_p50'][-1] * 1e6:.0f} us, floor {results['floor_p50'][-1] * 1e6:.0f} us; "
                  f"req/s raw {results['raw_rps'][-1]:.0f}, tdist {results['tdist_rps'][-1]:.0f}, "
                  f"floor {results['floor_rps'][-1]:.0f}, batched floor {results['floor_batch_rps'][-1]:.0f}",
                  file=sys.stderr)
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
        asyncio.run(deploy_floor(server.url, args.storage))
        for stream, shape in ((FLOOR_STREAM, "single"), (FLOOR_BATCH_STREAM, "batched")):
            floor_responder = common.start_helper(FLOOR_RESPONDER, server.url, stream, shape)
            procs.add(floor_responder, 30)
            common.wait_line(floor_responder, "ready", f"floor responder ({stream})")
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
        "floor_p50_us": round(med["floor_p50"] * 1e6, 1),
        "floor_rps_64": round(med["floor_rps"], 1),
        "floor_p50_ratio_1": round(med["floor_p50"] / med["raw_p50"], 3),
        "floor_throughput_ratio_64": round(med["floor_rps"] / med["raw_rps"], 3),
        "floor_batch_p50_us": round(med["floor_batch_p50"] * 1e6, 1),
        "floor_batch_rps_64": round(med["floor_batch_rps"], 1),
        "floor_batch_p50_ratio_1": round(med["floor_batch_p50"] / med["raw_p50"], 3),
        "floor_batch_throughput_ratio_64": round(med["floor_batch_rps"] / med["raw_rps"], 3),
    }
    print(f"{'':22}{'raw nats-py':>14}{'tdist':>14}{'ratio':>10}{'target':>10}{'floor':>14}{'ratio':>8}")
    print(f"{'p50, 1 in flight':22}{summary['raw_p50_us']:>11.0f} us{summary['tdist_p50_us']:>11.0f} us"
          f"{summary['p50_ratio_1']:>10.2f}{'<= 1.8':>10}{summary['floor_p50_us']:>11.0f} us"
          f"{summary['floor_p50_ratio_1']:>8.2f}")
    print(f"{'req/s, 64 in flight':22}{summary['raw_rps_64']:>14.0f}{summary['tdist_rps_64']:>14.0f}"
          f"{summary['throughput_ratio_64']:>10.2f}{'>= 0.5':>10}{summary['floor_rps_64']:>14.0f}"
          f"{summary['floor_throughput_ratio_64']:>8.2f}")
    print(f"{'batched floor':22}{'':14}{'':14}{'':10}{'':10}{summary['floor_batch_p50_us']:>11.0f} us"
          f"{summary['floor_batch_p50_ratio_1']:>8.2f}")
    print(f"{'':22}{'':14}{'':14}{'':10}{'':10}{summary['floor_batch_rps_64']:>14.0f}"
          f"{summary['floor_batch_throughput_ratio_64']:>8.2f}")
    print("  floor: the same JetStream message flow hand-written on nats-py, without and with tdist's batches"
          " (see the docstring), not a target")
    common.emit_json(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
