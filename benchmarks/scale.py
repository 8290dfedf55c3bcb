#!/usr/bin/env python3
"""How cost grows: with workers and operators on the request plane, with registered workers in discovery.

Request plane (one embedded nats-server, one namespace per case, echo operator
``tdist.operators.builtin:Echo``, 100 B payloads, file storage as deployed): p50 with
one request in flight and throughput with 64 in flight, for 1, 2 and 4 worker
processes hosting one operator, and for 1, 4 and 16 operators hosted by one worker
(requests spread round robin over the operators). The workers of every case run
together and rounds go over the cases in turn (medians reported). Also the idle
memory (RSS) of one real worker process, with 1 and with 16 operators.

Discovery (a fresh nats-server per size, the namespace deployed first): 10, 100 and
1,000 registered workers as lightweight registrants: one helper process writes one
realistic entry per registrant (``put_with_ttl``, as ``Registry.put`` does: a per-message
TTL) and heartbeats each at the normal rate (every TTL/3, phases spread evenly). For each size:

* ``client.workers()`` time (p50; it reads a full snapshot of the bucket);
* time for a change to reach a watcher (``registry.watch()``; p50 and p90 of probe
  entries written while the registrants heartbeat);
* nats-server CPU (``/proc/PID/stat`` utime + stime over a fixed window) with no
  watcher, and with one watcher open; the watching process's own CPU;
* nats-server RSS, and the KV stream's bytes.

The slopes per registered worker come from a least-squares line over the sizes, and
are extrapolated to 10,000 workers in the summary. Per-put costs fall as the rate
grows (the server and the watcher batch), so the line from 10..1,000 overestimates
CPU and memory at 10,000; ``--sizes 1000,3000,10000`` measures there directly (one
registrant process then makes about 6,000 puts/s: its lateness is reported).

    python benchmarks/scale.py [--json] [--rounds 3] [--window 8] [--sizes 10,100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _common as common

PAYLOAD = 100
WORKER_COUNTS = (1, 2, 4)
OPERATOR_COUNTS = (1, 4, 16)
REGISTRANT_COUNTS = (10, 100, 1000)
EXTRAPOLATE_TO = 10_000
TTL = 5.0
"""The default ``[worker] registry_ttl``; workers heartbeat every TTL / 3."""
INFLIGHT = 64
NAMESPACE = "scale"
LOOKUP_TIMEOUT = 60.0
UCX_ADDRESS_CHARS = 292
"""Length of a base64 UCX worker address on this machine (a started data plane's ``address``)."""


# -- request plane ----------------------------------------------------------------------------------

def worker_toml(path: Path, url: str, namespace: str, operators: int) -> Path:
    ops = "".join(f'[[worker.operators]]\nname = "echo{i}"\nimplementation = "tdist.operators.builtin:Echo"\n'
                  f"max_inflight = {INFLIGHT}\n" for i in range(operators))
    path.write_text(f'[nats]\nservers = ["{url}"]\n[request_plane]\nnamespace = "{namespace}"\nstorage = "file"\n'
                    f'[logging]\nlevel = "warning"\n[worker]\nname = "echo"\n{ops}')
    return path


CASES = tuple((w, 1) for w in WORKER_COUNTS) + tuple((1, o) for o in OPERATOR_COUNTS if o != 1)
"""(workers, operators) per request-plane case; each case is its own namespace."""


async def measure_request_plane(url: str, pids: dict[tuple[int, int], int], args: Any
                                ) -> dict[tuple[int, int], dict[str, float]]:
    """Every case's workers are up (idle ones cost about 0.5 % of a core each); rounds go
    over the cases in turn, so that drift on a shared machine hits every case alike."""
    from contextlib import AsyncExitStack

    from tdist.client import Client
    from tdist.config import NatsConfig

    tensor = np.frombuffer(os.urandom(PAYLOAD), dtype=np.uint8)
    out: dict[tuple[int, int], dict[str, float]] = {case: {} for case in CASES}
    calls: dict[tuple[int, int], Any] = {}
    async with AsyncExitStack() as stack:
        for w, o in CASES:
            client = await stack.enter_async_context(Client(NatsConfig(servers=(url,)), namespace=f"w{w}o{o}"))
            for i in range(o):
                await client.wait_for_workers(f"echo{i}", count=w, timeout=60)
            out[(w, o)]["entry_bytes"] = max(len(x.to_json()) for x in (await client.workers()).values())
            calls[(w, o)] = caller([client.operator(f"echo{i}") for i in range(o)], tensor)
        await asyncio.sleep(args.settle)
        for case, pid in pids.items():
            out[case]["idle_rss_kib"] = common.rss_kib(pid)
        p50s: dict[tuple[int, int], list[float]] = {case: [] for case in CASES}
        rps: dict[tuple[int, int], list[float]] = {case: [] for case in CASES}
        for r in range(args.rounds):
            for case in CASES:
                p50s[case].append(await common.serial(calls[case], args.serial, min(100, args.serial)))
                rps[case].append(await common.parallel(calls[case], args.parallel, INFLIGHT))
            print(f"  round {r + 1}: " + ", ".join(f"{w}w/{o}op {p50s[(w, o)][-1] * 1e6:.0f} us "
                                                  f"{rps[(w, o)][-1]:.0f} req/s" for w, o in CASES),
                  file=sys.stderr, flush=True)
        for case in CASES:
            out[case]["p50_us"] = common.median(p50s[case]) * 1e6
            out[case]["rps_64"] = common.median(rps[case])
        for case, pid in pids.items():
            out[case]["rss_after_kib"] = common.rss_kib(pid)
    return out


def caller(ops: list[Any], tensor: np.ndarray) -> Any:
    """One echo request, to the operators in turn."""
    turn = 0

    async def call(_: int = 0) -> None:
        nonlocal turn
        op = ops[turn % len(ops)]
        turn += 1
        resp = await op.infer({"x": tensor}, timeout=30)
        assert resp.outputs["x"].nbytes == PAYLOAD

    return call


def request_plane(args: Any) -> dict[tuple[int, int], dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="tdist-bench-") as tmp, common.nats_server() as server, \
            common.Children() as procs:
        started: list[tuple[tuple[int, int], subprocess.Popen[str], str]] = []
        for w, o in CASES:
            ns = f"w{w}o{o}"
            cfg = worker_toml(Path(tmp) / f"{ns}.toml", server.url, ns, o)
            for i in range(w):
                log_file = f"{tmp}/{ns}-{i}.log"
                started.append(((w, o), procs.add(common.start_worker(["--config", str(cfg)], log_file)), log_file))
        for _, proc, log_file in started:
            common.wait_worker_ready(proc, log_file)
        pids = {(1, 1): started[0][1].pid, (1, max(OPERATOR_COUNTS)): started[-1][1].pid}
        return asyncio.run(measure_request_plane(server.url, pids, args))


# -- discovery: the registrants (a child process) ------------------------------------------------------

def registrant(i: int, now: float) -> Any:
    """A registry entry like a serving worker's: two operators, a data-plane address, a GPU."""
    from tdist.registry import OperatorInfo, WorkerInfo

    node = f"node-{i // 8:05d}"
    address = base64.b64encode(os.urandom(UCX_ADDRESS_CHARS * 3 // 4)).decode()
    return WorkerInfo(id=f"{node}-worker-{i % 8}", name="worker", node=node, pid=100_000 + i, state="serving",
                      operators=(OperatorInfo("encoder", 1, 4), OperatorInfo("decoder", 1, 4)), started_at=now,
                      heartbeat_at=now, ttl=TTL, data_plane=address, gpus=(str(i % 8),), served=12345,
                      nats_in_bytes=6789012)


async def run_registrants(url: str, namespace: str, count: int) -> None:
    """Register ``count`` entries, print ``ready``, heartbeat each every TTL/3 until stdin closes,
    then print one JSON line: puts made and failed, seconds, the latest a heartbeat ran behind.

    Each heartbeat writes the entry's JSON made once at the start (``put_with_ttl``, as
    ``Registry.put`` does): the server and watchers see a full write per beat, and this one
    process stays light enough to keep 1,000s of registrants on time."""
    import nats

    from tdist.registry import put_with_ttl
    from tdist import names

    nc = await nats.connect(url, pending_size=64 << 20)
    js = nc.jetstream()
    bucket = names.workers_bucket(namespace)
    now = time.time()
    entries = [(info.id, info.to_json()) for info in (registrant(i, now) for i in range(count))]

    async def beat(i: int) -> None:
        key, value = entries[i]
        await put_with_ttl(js, bucket, key, value, TTL)

    for start in range(0, count, 256):
        await asyncio.gather(*(beat(i) for i in range(start, min(count, start + 256))))
    period = TTL / 3
    eof = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    t0 = time.monotonic()
    due = [t0 + period * i / count for i in range(count)]  # phases spread over one period
    nxt, puts, failed, late = 0, 0, 0, 0.0
    print("ready", flush=True)
    while not eof.done():
        now_m = time.monotonic()
        batch = []
        while due[nxt] <= now_m:
            late = max(late, now_m - due[nxt])
            batch.append(nxt)
            # as a worker does: the next beat one period after this one (a late beat is not made up)
            due[nxt] = due[nxt] + period if due[nxt] + period > now_m else now_m + period
            nxt = (nxt + 1) % count
        if batch:
            done = await asyncio.gather(*(beat(i) for i in batch), return_exceptions=True)
            failures = sum(isinstance(d, BaseException) for d in done)
            puts += len(batch) - failures
            failed += failures  # a worker logs heartbeat_failed and goes on; so do we
        await asyncio.sleep(max(0.005, min(0.05, due[nxt] - time.monotonic())))
    print(json.dumps({"puts": puts, "failed": failed, "seconds": time.monotonic() - t0, "max_late_s": late}),
          flush=True)
    await nc.drain()


# -- discovery: the measuring side ---------------------------------------------------------------------

async def measure_discovery(url: str, server_pid: int, count: int, args: Any) -> dict[str, float]:
    from tdist.client import Client
    from tdist.config import NatsConfig
    from tdist import names

    out: dict[str, float] = {}
    async with Client(NatsConfig(servers=(url,)), namespace=NAMESPACE) as client:
        # client.workers(): a full snapshot of the bucket each time
        times, seen = [], []
        cpu0 = common.cpu_seconds(os.getpid())
        for _ in range(args.lookups):
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT):
                    seen.append(len(await client.workers()))
            except TimeoutError:
                raise RuntimeError(f"client.workers() with {count} registered did not finish in "
                                   f"{LOOKUP_TIMEOUT:.0f} s (the snapshot never caught up with the heartbeats)"
                                   ) from None
            times.append(time.perf_counter() - t0)
        # fewer than registered: entries expired because heartbeats ran more than TTL late (reported)
        out["workers_seen_min"] = min(seen)
        out["workers_ms"] = common.median(times) * 1e3
        out["workers_cpu_ms"] = (common.cpu_seconds(os.getpid()) - cpu0) / args.lookups * 1e3
        registry = await client.registry()
        async with registry.watch() as watch:
            # one watcher open: its own CPU and the server's, over a fixed window
            me, c_me, c_srv = os.getpid(), common.cpu_seconds(os.getpid()), common.cpu_seconds(server_pid)
            t0 = time.monotonic()
            await asyncio.sleep(args.watch_window)
            wall = time.monotonic() - t0
            out["watcher_cpu_pct"] = (common.cpu_seconds(me) - c_me) / wall * 100
            out["server_cpu_pct_one_watcher"] = (common.cpu_seconds(server_pid) - c_srv) / wall * 100
            # a change reaching the watcher: probe entries written while the registrants heartbeat
            probe = dataclasses.replace(registrant(count + 1, time.time()), id="probe")
            lat = []
            for k in range(args.probes):
                state = f"probe-{k}"

                async def arrived(state: str = state) -> float:
                    await watch.wait_for(lambda ws: "probe" in ws and ws["probe"].state == state, 10)
                    return time.perf_counter()

                waiter = asyncio.create_task(arrived())
                await asyncio.sleep(0)  # the waiter is waiting before the write
                t0p = time.perf_counter()
                await registry.put(dataclasses.replace(probe, state=state, heartbeat_at=time.time()))
                lat.append(await waiter - t0p)
                await asyncio.sleep(0.02)
            await registry.delete("probe")
        out["watch_ms"] = common.median(lat) * 1e3
        out["watch_p90_ms"] = common.percentile(lat, 90) * 1e3
        js = client.runtime._nc.jetstream()  # type: ignore[union-attr]
        state = (await js.stream_info(f"KV_{names.workers_bucket(NAMESPACE)}")).state
        out["kv_bytes"] = float(state.bytes)
        out["kv_messages"] = float(state.messages)
    return out


def discovery_case(count: int, args: Any) -> dict[str, float]:
    from tdist.config import RequestPlaneConfig

    out: dict[str, float] = {}
    with common.nats_server() as server, common.Children() as procs:
        assert server.pid is not None
        asyncio.run(common.deploy_namespace(server.url, RequestPlaneConfig(namespace=NAMESPACE)))
        out["server_rss_empty_kib"] = common.rss_kib(server.pid)
        reg = procs.add(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--role", "registrants", "--url", server.url,
             "--count", str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True), 30)
        common.wait_line(reg, "ready", f"{count} registrants")
        time.sleep(TTL / 3 + 0.5)  # one full heartbeat period: steady state
        c_srv, c_reg, t0 = common.cpu_seconds(server.pid), common.cpu_seconds(reg.pid), time.monotonic()
        time.sleep(args.window)
        wall = time.monotonic() - t0
        out["server_cpu_pct"] = (common.cpu_seconds(server.pid) - c_srv) / wall * 100
        out["registrants_cpu_pct"] = (common.cpu_seconds(reg.pid) - c_reg) / wall * 100
        out["server_rss_kib"] = common.rss_kib(server.pid)
        out.update(asyncio.run(measure_discovery(server.url, server.pid, count, args)))
        assert reg.stdin is not None and reg.stdout is not None
        reg.stdin.close()
        stats = json.loads(reg.stdout.readline())
        out["puts_per_s"] = stats["puts"] / stats["seconds"]
        out["heartbeat_max_late_ms"] = stats["max_late_s"] * 1e3
        out["heartbeats_failed"] = stats["failed"]
        procs.stop(reg)
    print(f"  {count:>5} registered: workers() {out['workers_ms']:.1f} ms, watch {out['watch_ms']:.2f} ms, "
          f"server CPU {out['server_cpu_pct']:.1f} % (one watcher: {out['server_cpu_pct_one_watcher']:.1f} %), "
          f"server RSS {out['server_rss_kib'] / 1024:.1f} MiB, {out['puts_per_s']:.0f} puts/s, heartbeats late by up "
          f"to {out['heartbeat_max_late_ms']:.0f} ms, {out['heartbeats_failed']:.0f} failed, workers() saw "
          f"{out['workers_seen_min']:.0f} at least",
          file=sys.stderr, flush=True)
    return out


# -- summary --------------------------------------------------------------------------------------------

def summarize(rp_cases: dict[tuple[int, int], dict[str, float]], disc: dict[int, dict[str, float]],
              args: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"benchmark": "scale", "payload_bytes": PAYLOAD, "inflight": INFLIGHT, "rounds": args.rounds,
                         **common.conditions(), "nats_server": common.versions().get("nats-server"),
                         "registry_ttl_s": TTL}
    for (w, o), r in rp_cases.items():
        s[f"rp_w{w}_o{o}_p50_us"] = round(r["p50_us"], 1)
        s[f"rp_w{w}_o{o}_rps_64"] = round(r["rps_64"], 1)
    one = rp_cases[(1, 1)]
    s["worker_idle_rss_mib"] = round(one["idle_rss_kib"] / 1024, 1)
    s["worker_rss_after_load_mib"] = round(one["rss_after_kib"] / 1024, 1)
    s[f"worker_idle_rss_mib_{max(OPERATOR_COUNTS)}_operators"] = round(
        rp_cases[(1, max(OPERATOR_COUNTS))]["idle_rss_kib"] / 1024, 1)
    s["worker_entry_bytes"] = int(one["entry_bytes"])
    s["registrant_entry_bytes"] = len(registrant(0, time.time()).to_json())
    for n, d in disc.items():
        s[f"disc_{n}_workers_ms"] = round(d["workers_ms"], 2)
        s[f"disc_{n}_workers_cpu_ms"] = round(d["workers_cpu_ms"], 1)
        s[f"disc_{n}_watch_ms"] = round(d["watch_ms"], 2)
        s[f"disc_{n}_watch_p90_ms"] = round(d["watch_p90_ms"], 2)
        s[f"disc_{n}_server_cpu_pct"] = round(d["server_cpu_pct"], 2)
        s[f"disc_{n}_server_cpu_pct_one_watcher"] = round(d["server_cpu_pct_one_watcher"], 2)
        s[f"disc_{n}_watcher_cpu_pct"] = round(d["watcher_cpu_pct"], 2)
        s[f"disc_{n}_server_rss_mib"] = round(d["server_rss_kib"] / 1024, 1)
        s[f"disc_{n}_server_rss_empty_mib"] = round(d["server_rss_empty_kib"] / 1024, 1)
        s[f"disc_{n}_kv_bytes"] = int(d["kv_bytes"])
        s[f"disc_{n}_puts_per_s"] = round(d["puts_per_s"], 1)
        s[f"disc_{n}_registrants_cpu_pct"] = round(d["registrants_cpu_pct"], 2)
        s[f"disc_{n}_heartbeat_max_late_ms"] = round(d["heartbeat_max_late_ms"], 1)
        s[f"disc_{n}_heartbeats_failed"] = int(d["heartbeats_failed"])
        s[f"disc_{n}_workers_seen_min"] = int(d["workers_seen_min"])
    s["registered_sizes"] = list(disc)
    xs = [float(n) for n in disc]

    def slope(key: str, scale: float = 1.0) -> tuple[float, float]:
        return common.fit_line(xs, [disc[n][key] * scale for n in disc])

    fits = {
        "server_cpu_pct": slope("server_cpu_pct"),
        "server_cpu_pct_one_watcher": slope("server_cpu_pct_one_watcher"),
        "watcher_cpu_pct": slope("watcher_cpu_pct"),
        "server_rss_kib": slope("server_rss_kib"),
        "workers_ms": slope("workers_ms"),
        "workers_cpu_ms": slope("workers_cpu_ms"),
        "watch_ms": slope("watch_ms"),
        "kv_bytes": slope("kv_bytes"),
    }
    for key, (k, _) in fits.items():
        s[f"slope_{key}_per_worker"] = float(f"{k:.6g}")
    n = EXTRAPOLATE_TO
    s["at_10000_server_cpu_pct"] = round(fits["server_cpu_pct"][1] + fits["server_cpu_pct"][0] * n, 1)
    s["at_10000_server_cpu_pct_one_watcher"] = round(
        fits["server_cpu_pct_one_watcher"][1] + fits["server_cpu_pct_one_watcher"][0] * n, 1)
    s["at_10000_watcher_cpu_pct"] = round(fits["watcher_cpu_pct"][1] + fits["watcher_cpu_pct"][0] * n, 1)
    s["at_10000_server_rss_mib"] = round((fits["server_rss_kib"][1] + fits["server_rss_kib"][0] * n) / 1024, 1)
    s["at_10000_workers_ms"] = round(fits["workers_ms"][1] + fits["workers_ms"][0] * n, 1)
    s["at_10000_workers_cpu_ms"] = round(fits["workers_cpu_ms"][1] + fits["workers_cpu_ms"][0] * n, 1)
    s["at_10000_heartbeat_puts_per_s"] = round(n * 3 / TTL)
    s["at_10000_snapshot_mib"] = round(n * s["registrant_entry_bytes"] / (1 << 20), 1)
    return s


def print_table(s: dict[str, Any]) -> None:
    print(f"\nrequest plane (echo, {PAYLOAD} B; p50 one in flight, req/s {INFLIGHT} in flight)")
    print(f"{'workers':>8}{'operators':>11}{'p50 us':>10}{'req/s':>10}{'vs 1x1':>9}")
    base = s["rp_w1_o1_rps_64"]
    for w, o in CASES:
        rps = s[f"rp_w{w}_o{o}_rps_64"]
        print(f"{w:>8}{o:>11}{s[f'rp_w{w}_o{o}_p50_us']:>10.0f}{rps:>10.0f}{rps / base:>9.2f}")
    print(f"worker process idle RSS: {s['worker_idle_rss_mib']:.1f} MiB with 1 operator, "
          f"{s[f'worker_idle_rss_mib_{max(OPERATOR_COUNTS)}_operators']:.1f} MiB with {max(OPERATOR_COUNTS)}; "
          f"{s['worker_rss_after_load_mib']:.1f} MiB after the load")
    print(f"\ndiscovery (registrants heartbeat every {TTL / 3:.2f} s, entry {s['registrant_entry_bytes']} B; "
          f"a real echo worker's entry: {s['worker_entry_bytes']} B)")
    print(f"{'registered':>12}{'workers()':>11}{'its CPU':>10}{'watch p50':>11}{'srv CPU':>9}{'+watcher':>10}"
          f"{'watcher':>9}{'srv RSS':>11}{'KV bytes':>11}{'puts/s':>8}")
    for n in s["registered_sizes"]:
        print(f"{n:>12}{s[f'disc_{n}_workers_ms']:>8.1f} ms{s[f'disc_{n}_workers_cpu_ms']:>7.1f} ms"
              f"{s[f'disc_{n}_watch_ms']:>8.2f} ms{s[f'disc_{n}_server_cpu_pct']:>7.1f} %"
              f"{s[f'disc_{n}_server_cpu_pct_one_watcher']:>8.1f} %{s[f'disc_{n}_watcher_cpu_pct']:>7.1f} %"
              f"{s[f'disc_{n}_server_rss_mib']:>7.1f} MiB{s[f'disc_{n}_kv_bytes']:>11}{s[f'disc_{n}_puts_per_s']:>8.0f}")
    print(f"{'slope/worker':>12}{s['slope_workers_ms_per_worker'] * 1e3:>8.1f} us"
          f"{s['slope_workers_cpu_ms_per_worker'] * 1e3:>7.1f} us{s['slope_watch_ms_per_worker'] * 1e3:>8.2f} us"
          f"{s['slope_server_cpu_pct_per_worker']:>9.4f}{s['slope_server_cpu_pct_one_watcher_per_worker']:>10.4f}"
          f"{s['slope_watcher_cpu_pct_per_worker']:>9.4f}{s['slope_server_rss_kib_per_worker']:>7.1f} KiB"
          f"{s['slope_kv_bytes_per_worker']:>11.0f}")
    print(f"{'10,000 (fit)':>12}{s['at_10000_workers_ms']:>8.0f} ms{s['at_10000_workers_cpu_ms']:>7.0f} ms"
          f"{'-':>11}{s['at_10000_server_cpu_pct']:>7.1f} %"
          f"{s['at_10000_server_cpu_pct_one_watcher']:>8.1f} %{s['at_10000_watcher_cpu_pct']:>7.1f} %"
          f"{s['at_10000_server_rss_mib']:>7.0f} MiB{'':>11}{s['at_10000_heartbeat_puts_per_s']:>8}")
    print("  workers(): wall time (p50) and this process's CPU per call; watch: a change reaching an open watch;")
    print("  srv CPU: nats-server, heartbeats only; +watcher: with one watch open; watcher: the watching process;")
    print("  10,000 (fit): least-squares line over the sizes measured, extrapolated (pass --sizes ...,10000 to measure)")


def main() -> int:
    parser = common.parser(__doc__, rounds=3, rounds_help="request-plane rounds over the cases (medians reported)")
    parser.add_argument("--serial", type=int, default=300, help="one-at-a-time requests per case")
    parser.add_argument("--parallel", type=int, default=3000, help="requests per 64-in-flight run")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before reading a worker's RSS")
    parser.add_argument("--window", type=float, default=8.0, help="seconds of server CPU measured per size")
    parser.add_argument("--watch-window", type=float, default=4.0, help="seconds measured with one watcher open")
    parser.add_argument("--lookups", type=int, default=10, help="client.workers() calls per size")
    parser.add_argument("--probes", type=int, default=30, help="changes timed to a watcher per size")
    parser.add_argument("--sizes", default=",".join(map(str, REGISTRANT_COUNTS)),
                        help="registered-worker counts, comma-separated")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "registrants":
        asyncio.run(run_registrants(args.url, NAMESPACE, args.count))
        return 0

    from tdist import logs

    logs.configure("warning")
    sizes = [int(x) for x in args.sizes.split(",")]
    common.print_conditions(f"scale: request plane with {WORKER_COUNTS} workers and {OPERATOR_COUNTS} operators, "
                            f"discovery with {tuple(sizes)} registered workers")
    t_start = time.monotonic()
    rp_cases = request_plane(args)
    disc = {n: discovery_case(n, args) for n in sizes}
    summary = summarize(rp_cases, disc, args)
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    print_table(summary)
    common.emit_json(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
