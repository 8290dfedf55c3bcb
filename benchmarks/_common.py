"""What every benchmark here does the same way.

* arguments: ``--json`` (end with one JSON line) and ``--rounds``, via ``parser()``;
* conditions: ``conditions()`` for the JSON (cores, python) and ``print_conditions()``
  for the line a reader needs to judge the figures (cores, load, versions);
* an embedded nats-server (``nats_server()``), a deployed namespace (``deploy_namespace()``:
  callers never create streams or buckets), ``tdist-worker`` processes started and
  waited for on their ready line (``spawn_worker()``), every child stopped by PID
  (``Children``);
* timing loops (``serial()``, ``parallel()``) and statistics (``median()``, ``percentile()``);
* per-process CPU and memory from /proc (``cpu_seconds()``, ``rss_kib()``, ``children()``).

Benchmarks run as scripts (``python benchmarks/X.py``), so this module is imported as
``_common`` from the benchmarks directory.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from tdist.worker import spawn as worker_spawn

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- arguments and output -------------------------------------------------------------------------

def parser(doc: str | None, *, rounds: int = 3, rounds_help: str = "rounds (medians reported)"
           ) -> argparse.ArgumentParser:
    """An argument parser with ``--json`` and ``--rounds``; the docstring is its description."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    return p


def conditions() -> dict[str, Any]:
    """The conditions every JSON summary carries."""
    return {"cores": os.cpu_count(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    """Versions of what the figures depend on (nats-server from its binary)."""
    out: dict[str, str] = {}
    for dist in ("tdist", "nats-py", "ucxx-cu12", "nvidia-pytriton", "tritonclient"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from tdist.nats_server import find_nats_server

        text = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, timeout=10).stdout
        out["nats-server"] = text.strip().rsplit(" ", 1)[-1].lstrip("v")
    except Exception:
        pass
    return out


def print_conditions(what: str) -> None:
    """One line: what runs, on how many cores, under what load, with which versions."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    print(f"{what}: {os.cpu_count()} cores, load {load}, Python {platform.python_version()}, {vers}", flush=True)


def emit_json(summary: dict[str, Any], enabled: bool) -> None:
    """The ``--json`` last line (the one thing a script reading the output parses)."""
    if enabled:
        print(json.dumps(summary), flush=True)


# -- statistics -----------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ``ys`` over ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


# -- timing loops ---------------------------------------------------------------------------------

async def latencies(call: Callable[[], Awaitable[None]], n: int, warmup: int) -> list[float]:
    """Seconds each of ``n`` calls made one after another took, after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        await call()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - t0)
    return lat


async def serial(call: Callable[[], Awaitable[None]], n: int, warmup: int) -> float:
    """p50 latency in seconds of ``n`` calls made one after another."""
    return median(await latencies(call, n, warmup))


async def parallel(call: Callable[[int], Awaitable[None]], n: int, inflight: int) -> float:
    """Requests per second with ``inflight`` callers sharing ``n`` calls.

    ``call`` gets the index of its request (warm-up: 0..inflight-1, then n-1 down to 0),
    so that a benchmark can vary inputs; one warm-up call per caller first."""
    await asyncio.gather(*(call(i) for i in range(inflight)))
    left = n

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call(left)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(inflight)))
    return n / (time.perf_counter() - t0)


# -- processes ------------------------------------------------------------------------------------

def stop(proc: subprocess.Popen[Any], timeout: float = 60.0, *, terminate: bool = True) -> None:
    """Close its stdin (EOF ends the helpers that wait on it), SIGTERM it unless ``terminate``
    is False, wait up to ``timeout`` s, then SIGKILL. Only this process, by its PID."""
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    if terminate and proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


class Children:
    """The child processes of one benchmark, stopped (in reverse order) on exit whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[Any], float, bool]] = []

    def add(self, proc: subprocess.Popen[Any], timeout: float = 60.0, *, terminate: bool = True
            ) -> subprocess.Popen[Any]:
        self.procs.append((proc, timeout, terminate))
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """Stop one child now (the others stay)."""
        for i, (p, timeout, terminate) in enumerate(self.procs):
            if p is proc:
                del self.procs[i]
                stop(p, timeout, terminate=terminate)
                return

    def stop_all(self) -> None:
        while self.procs:
            proc, timeout, terminate = self.procs.pop()
            stop(proc, timeout, terminate=terminate)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()


def start_worker(args: Sequence[str], log_file: str, *, cwd: Path = ROOT) -> subprocess.Popen[str]:
    """``python -m tdist.worker.main ARGS --log-file LOG_FILE``, not yet waited for."""
    return worker_spawn.start_worker(args, log_file, cwd=cwd)


def wait_worker_ready(proc: subprocess.Popen[str], log_file: str, what: str = "tdist worker") -> str:
    """Block until the worker prints its ready line; its worker id (raises with its log's tail)."""
    return worker_spawn.wait_ready(proc, log_file)


def spawn_worker(args: Sequence[str], log_file: str, *, cwd: Path = ROOT) -> tuple[subprocess.Popen[str], str]:
    """Start a worker and wait for its ready line; (process, worker id)."""
    worker = worker_spawn.spawn_worker(args, log_file, cwd=cwd)
    return worker.proc, worker.worker_id


def start_helper(code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c CODE ARGS`` with pipes; the helper prints ``ready`` and runs until stdin closes."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def wait_line(proc: subprocess.Popen[str], expect: str, what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != expect:
        raise RuntimeError(f"{what} (pid {proc.pid}) failed to start: printed {line!r}, exit {proc.poll()}")


# -- NATS -----------------------------------------------------------------------------------------

@contextmanager
def nats_server(**options: Any) -> Iterator[Any]:
    """An embedded nats-server on 127.0.0.1 (free ports), stopped by its PID on exit."""
    from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions

    server = EmbeddedNatsServer(NatsServerOptions(**options))
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def deploy_namespace(url: str, rp: Any) -> None:
    """Create the namespace's stream and registry buckets, as a deployer does (callers never do)."""
    from tdist.config import NatsConfig
    from tdist.request_plane.deploy import deploy

    await deploy(NatsConfig(servers=(url,)), rp)


# -- /proc ----------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process has used (``/proc/PID/stat`` utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int:
    """Resident set size in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid``."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out
