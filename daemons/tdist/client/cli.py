"""``tdist-client``: a benchmark client for any operator, and a view of the live workers.

    tdist-client [run] --requests 1000 --concurrency 16 --clients 4    # encoder_decoder by default
    tdist-client run --operator encoder --input-copies 3 --json
    tdist-client ls [--json]                                            # live workers of the namespace
    tdist-client --version

``run`` is the default command: ``tdist-client --requests 10`` runs the benchmark.
Every request carries an INT64 ``input`` of random values (length drawn from a normal law) and
the request parameters ``input_copies`` and ``delay``. An operator with an answer check (the hello
world's ``encoder_decoder``, ``encoder`` and ``decoder``: tdist.hello_world.checks) gets the
inputs its check makes, and a wrong answer counts as an error. Other operators are sent
``input``, their answers unchecked (counted when they echo it). Prints the conditions, the counts,
the wall time, ``Throughput: X requests/s`` and latency percentiles (``--json``: one JSON object,
last line).

Credentials: ``--user`` with ``--password-file FILE`` (or ``--token-file``, ``--creds``), or the
environment: ``TDIST_NATS_URL``, ``TDIST_NATS_USER``, ``TDIST_NATS_PASSWORD``, ``TDIST_NATS_TOKEN``,
``TDIST_NATS_CREDS``; flags win. ``--password``/``--token`` work too but show in the process list.

Exit codes: 0 every request answered correctly (``ls``: listed); 1 errors, wrong answers or
requests left unanswered (``ls``: NATS unreachable); 2 a usage or configuration error (a bad
flag or value, named); 130 interrupted. A closed standard output (``| head``) ends quietly; the
code stays the run's own if the pipe closes during the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue as queue_mod
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from tdist import logs
from tdist.cli_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    NATS_EPILOG,
    NatsOverrides,
    add_nats_arguments,
    add_version,
    epilog,
    nats_overrides,
    quiet_pipe,
    subcommand_default,
    write_output,
)
from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.errors import ConfigError, TdistError
from tdist.hello_world.checks import CHECKS as HELLO_WORLD_CHECKS
from tdist.progress import Progress
from tdist.registry import WorkerInfo
from tdist.names import check_name

PROG = "tdist-client"
MAX_ERROR_LINES = 10
STOPPING = "stopping: waiting for the requests in flight (Ctrl-C again to abort)"
PROGRESS_FLUSH = 0.1  # seconds between progress messages from a client process
INT64 = np.iinfo(np.int64)

# Options of the benchmark (the default command) with their defaults; None in argparse, so that
# `ls` can tell they were given.
RUN_DEFAULTS: dict[str, Any] = {
    "operator": "encoder_decoder", "requests": 100, "concurrency": 1, "clients": 1, "input_size_mean": 1000.0,
    "input_size_stdev": 0.0, "input_copies": 1, "delay": 0.0, "timeout": 30.0, "seed": None, "no_progress": False,
}


# --------------------------------------------------------------------------------------------
# Arguments -> settings


@dataclass(frozen=True)
class Settings:
    nats: NatsConfig
    namespace: str
    operator: str = "encoder_decoder"
    requests: int = 100
    concurrency: int = 1
    clients: int = 1
    input_size_mean: float = 1000.0
    input_size_stdev: float = 0.0
    input_copies: int = 1
    delay: float = 0.0
    timeout: float = 30.0
    seed: int = 0
    as_json: bool = False
    progress: bool = True

    def shares(self) -> list[int]:
        """Requests per client process (the first ones take the remainder); no empty shares."""
        clients = min(self.clients, self.requests)
        base, extra = divmod(self.requests, clients)
        return [base + (1 if i < extra else 0) for i in range(clients)]

    def conditions(self) -> dict[str, Any]:
        return {
            "operator": self.operator, "namespace": self.namespace, "concurrency": self.concurrency,
            "clients": len(self.shares()), "input_size_mean": self.input_size_mean,
            "input_size_stdev": self.input_size_stdev, "input_copies": self.input_copies, "delay": self.delay,
            "timeout_s": self.timeout, "seed": self.seed,
        }


def _connection_arguments(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    none = subcommand_default(suppress)
    conn = p.add_argument_group("connection")
    add_nats_arguments(conn, suppress=suppress)
    conn.add_argument("--password", **none, help="NATS password: visible to every local user in the process "
                                                 "list; prefer --password-file or $TDIST_NATS_PASSWORD")
    conn.add_argument("--token", **none, help="NATS token: visible in the process list; prefer --token-file or "
                                              "$TDIST_NATS_TOKEN")
    conn.add_argument("--tls-ca", metavar="FILE", **none)
    conn.add_argument("--tls-cert", metavar="FILE", **none)
    conn.add_argument("--tls-key", metavar="FILE", **none)
    conn.add_argument("--namespace", **none, help=f"tdist namespace (default {RequestPlaneConfig().namespace})")
    p.add_argument("--json", action="store_true", **subcommand_default(suppress, False),
                   help="end with one JSON line (ls: print JSON only)")


def _run_arguments(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    none = subcommand_default(suppress)
    run = p.add_argument_group("benchmark (the run command, the default)")
    d = RUN_DEFAULTS
    run.add_argument("--operator", **none, help=f"operator to call (default {d['operator']}; encoder and decoder "
                                                "are checked too, other operators are not)")
    run.add_argument("--requests", type=int, **none, help=f"requests in all (default {d['requests']})")
    run.add_argument("--concurrency", type=int, **none,
                     help=f"requests in flight per client process (default {d['concurrency']})")
    run.add_argument("--clients", type=int, **none, help=f"client processes (default {d['clients']})")
    run.add_argument("--input-size-mean", type=float, **none,
                     help=f"mean input length (default {d['input_size_mean']:g})")
    run.add_argument("--input-size-stdev", type=float, **none,
                     help=f"standard deviation of the input length (default {d['input_size_stdev']:g})")
    run.add_argument("--input-copies", type=int, **none,
                     help=f"request parameter input_copies (default {d['input_copies']})")
    run.add_argument("--delay", type=float, **none,
                     help=f"request parameter delay, seconds per output element (default {d['delay']:g})")
    run.add_argument("--timeout", type=float, **none, help=f"seconds per request (default {d['timeout']:g})")
    run.add_argument("--seed", type=int, **none, help="seed of the inputs (default: random, printed)")
    run.add_argument("--no-progress", action="store_true", **none,
                     help="no progress bar")


RUNTIME = "requests failed, answers were wrong or left unanswered; ls: NATS unreachable"


def build_parser() -> argparse.ArgumentParser:
    """Subcommands ``run`` (the default) and ``ls``. The main parser also takes every flag, so that
    ``tdist-client --requests 5`` and ``tdist-client --namespace x ls`` keep working; the
    subcommands' copies default to SUPPRESS and so keep what the main parser read."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage=f"{PROG} [run] [connection flags] [benchmark flags] [--json]\n"
                                      f"       {PROG} ls [connection flags] [--json]\n"
                                      f"       {PROG} --version",
                                epilog=epilog(RUNTIME + "; 130: interrupted", NATS_EPILOG))
    add_version(p)
    _connection_arguments(p, suppress=False)
    _run_arguments(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="{run,ls}")
    run_p = sub.add_parser("run", prog=f"{PROG} run", help="the benchmark (the default command)",
                           description="Call an operator "
                           "many times, check the answers, print throughput and latency.",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=epilog("requests failed, answers were wrong or left unanswered; 130: "
                                         "interrupted", NATS_EPILOG))
    _connection_arguments(run_p, suppress=True)
    _run_arguments(run_p, suppress=True)
    ls_p = sub.add_parser("ls", prog=f"{PROG} ls", help="list the live workers of the namespace",
                          description="List the live workers of the namespace (--json: one JSON object).",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=epilog("NATS unreachable", NATS_EPILOG))
    _connection_arguments(ls_p, suppress=True)
    return p


def nats_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> NatsConfig:
    """The connection settings: flags first, then the environment (``TDIST_NATS_URL`` (comma-separated),
    ``TDIST_NATS_USER``, ``TDIST_NATS_PASSWORD``, ``TDIST_NATS_TOKEN``, ``TDIST_NATS_CREDS``), then defaults.
    ``--password-file``/``--token-file`` keep secrets out of the process list. Errors name the flag
    or variable, not a TOML key."""
    tls = (("tls_ca_file", "--tls-ca", args.tls_ca), ("tls_cert_file", "--tls-cert", args.tls_cert),
           ("tls_key_file", "--tls-key", args.tls_key))
    for _, flag, path in tls:
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"file {path!r} not found", key=flag)
    given = nats_overrides(args, environ)
    values = {**given.values, **{name: path for name, _, path in tls if path is not None}}
    sources = {**given.sources, **{name: flag for name, flag, path in tls if path is not None}}
    return NatsOverrides(values, sources).apply(NatsConfig())


def settings_from(args: argparse.Namespace) -> Settings:
    """Validated settings; ``ConfigError`` names the flag at fault."""
    if args.command == "ls":
        given = [k for k in RUN_DEFAULTS if getattr(args, k) is not None]
        if given:
            raise ConfigError("does not apply to 'ls'", key="--" + given[0].replace("_", "-"))
    v = {k: (RUN_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)) for k in RUN_DEFAULTS}
    check_name("operator", v["operator"], key="--operator")
    namespace = RequestPlaneConfig().namespace if args.namespace is None else args.namespace
    check_name("namespace", namespace, key="--namespace")
    for key, low in (("requests", 1), ("concurrency", 1), ("clients", 1), ("input_copies", 1)):
        if v[key] < low:
            raise ConfigError(f"must be at least {low}, got {v[key]}", key="--" + key.replace("_", "-"))
    for key in ("input_size_mean", "input_size_stdev", "delay", "timeout"):
        if not np.isfinite(v[key]) or v[key] < 0 or (key == "timeout" and v[key] == 0):
            what = "positive" if key == "timeout" else "at least 0"
            raise ConfigError(f"must be {what}, got {v[key]}", key="--" + key.replace("_", "-"))
    return Settings(
        nats=nats_config(args), namespace=namespace, operator=v["operator"], requests=v["requests"],
        concurrency=v["concurrency"], clients=v["clients"], input_size_mean=v["input_size_mean"],
        input_size_stdev=v["input_size_stdev"], input_copies=v["input_copies"], delay=v["delay"],
        timeout=v["timeout"], seed=v["seed"] if v["seed"] is not None else secrets.randbits(32),
        as_json=args.json, progress=not v["no_progress"],
    )


# --------------------------------------------------------------------------------------------
# Requests and their checks


class AnswerCheck(Protocol):
    """What the benchmark sends an operator for an input ``x`` and how it judges the answer.

    ``copies`` is ``--input-copies`` (also sent as the request parameter ``input_copies``). An
    instance must pickle: ``--clients N`` sends it to each client process. ``main(checks=...)``
    takes a table of them by operator name; the default is the hello world's
    (``tdist.hello_world.checks.CHECKS``)."""

    def inputs(self, x: np.ndarray, copies: int) -> dict[str, np.ndarray]:
        """The request's input tensors."""
        ...

    def problem(self, x: np.ndarray, copies: int, outputs: Mapping[str, Any]) -> str | None:
        """Why the answer is wrong (one line), or None."""
        ...

    def size_factor(self, copies: int) -> int:
        """The largest tensor sent or answered, in multiples of ``x``'s bytes."""
        ...


def make_input(rng: np.random.Generator, s: Settings) -> np.ndarray:
    n = max(0, int(round(float(rng.normal(s.input_size_mean, s.input_size_stdev)))))
    return rng.integers(INT64.min, INT64.max, size=n, dtype=np.int64, endpoint=True)


def echoed(x: np.ndarray, outputs: Mapping[str, Any]) -> bool:
    """For unchecked operators: did the answer carry the input back (as ``output`` or ``input``)?"""
    for name in ("output", "input"):
        got = np.asarray(outputs[name]) if name in outputs else None
        if got is not None and got.dtype == x.dtype and got.shape == x.shape and np.array_equal(got, x):
            return True
    return False


# --------------------------------------------------------------------------------------------
# One client (a process, or the CLI itself with --clients 1)


@dataclass
class ClientResult:
    index: int
    sent: int = 0
    answered: int = 0
    errors: int = 0
    mismatches: int = 0
    echoed: int = 0
    wall_s: float = 0.0
    latencies: Any = field(default_factory=list)  # seconds of answered requests (an array once finished)
    served_by: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    fatal: str | None = None


class Reporter(Protocol):
    async def ready(self) -> None: ...            # connected: wait for the start signal
    def done(self, n: int) -> None: ...           # n more requests ended (either way)
    def error(self, line: str) -> None: ...       # one error line
    def stopping(self) -> bool: ...               # stop starting new requests?
    def finish(self, result: ClientResult) -> None: ...


async def run_client(s: Settings, index: int, share: int, reporter: Reporter,
                     check: AnswerCheck | None = None) -> ClientResult:
    """Run ``share`` requests, ``s.concurrency`` at a time; ``check`` None: answers unchecked."""
    rng = np.random.default_rng([s.seed, index])
    result = ClientResult(index)
    params = {"input_copies": s.input_copies, "delay": s.delay}
    shown = 0
    async with Client(s.nats, namespace=s.namespace, name=f"{PROG}-{index}") as client:
        op = client.operator(s.operator)

        def fail(i: int, kind: str, message: str) -> None:
            nonlocal shown
            result.errors += 1
            result.error_kinds[kind] += 1
            if shown < MAX_ERROR_LINES:
                shown += 1
                reporter.error(f"request {index}.{i}: {kind}: {message}"[:300])

        async def one(i: int, x: np.ndarray) -> None:
            inputs = check.inputs(x, s.input_copies) if check is not None else {"input": x}
            started = time.perf_counter()
            try:
                resp = await op.infer(inputs, parameters=params, timeout=s.timeout)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                fail(i, type(exc).__name__, str(exc))
                return
            result.latencies.append(time.perf_counter() - started)
            result.answered += 1
            result.served_by[resp.worker_id] += 1
            if check is None:
                result.echoed += echoed(x, resp.outputs)
            elif (problem := check.problem(x, s.input_copies, resp.outputs)) is not None:
                result.mismatches += 1
                fail(i, "WrongAnswer", f"{problem} (worker {resp.worker_id})")

        async def lane() -> None:
            while result.sent < share and not reporter.stopping():
                i = result.sent
                result.sent += 1
                x = make_input(rng, s)  # made in request order: the inputs depend on the seed only
                try:
                    await one(i, x)
                finally:
                    reporter.done(1)

        if may_go_by_reference(s, check, client.data_plane_config.inline_threshold):
            await client.data_plane.get()  # start UCX now, not inside the first timed requests
        await reporter.ready()
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(min(s.concurrency, share))))
        result.wall_s = time.perf_counter() - started
        result.latencies = np.asarray(result.latencies, dtype=np.float64)
        reporter.finish(result)  # before closing: the close may wait for tensor releases
    return result


def may_go_by_reference(s: Settings, check: AnswerCheck | None, inline_threshold: int) -> bool:
    """Can a request's input or answer be large enough to travel by reference (via UCX)?"""
    factor = check.size_factor(s.input_copies) if check is not None else 1
    return (s.input_size_mean + 4 * s.input_size_stdev) * 8 * factor >= inline_threshold


class LocalReporter:
    """--clients 1: this process runs the requests and shows the progress itself."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.stop = False

    async def ready(self) -> None:
        pass

    def done(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def error(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def stopping(self) -> bool:
        return self.stop

    def finish(self, result: ClientResult) -> None:
        pass


class QueueReporter:
    """In a client process: messages to the parent over a queue, progress batched."""

    def __init__(self, index: int, events: Any, go: Any, stop: Any) -> None:
        self.index, self.events, self.go, self.stop = index, events, go, stop
        self.pending = 0
        self.flushed = time.monotonic()

    async def ready(self) -> None:
        self.events.put(("ready", self.index, None))
        while not await asyncio.to_thread(self.go.wait, 1.0):
            pass  # the parent terminates us if it gives up

    def done(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.flushed >= PROGRESS_FLUSH:
            self._flush(now)

    def _flush(self, now: float) -> None:
        if self.pending:
            self.events.put(("progress", self.index, self.pending))
            self.pending = 0
        self.flushed = now

    def error(self, line: str) -> None:
        self.events.put(("error", self.index, line))

    def stopping(self) -> bool:
        return self.stop.is_set()

    def finish(self, result: ClientResult) -> None:
        self._flush(time.monotonic())
        self.events.put(("result", self.index, result))


def client_process(s: Settings, check: AnswerCheck | None, index: int, share: int, events: Any, go: Any,
                   stop: Any) -> None:
    """Entry point of a spawned client process. The parent handles Ctrl-C (it sets ``stop``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure("error", component="client")  # the CLI reports failures itself
    try:
        asyncio.run(run_client(s, index, share, QueueReporter(index, events, go, stop), check))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        events.put(("fatal", index, f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------------------
# The parent: preflight, processes, aggregation, summary


class Fatal(Exception):
    """Stops the run with a message (exit code 1)."""


async def preflight(s: Settings) -> int:
    """The number of live workers hosting the operator; Fatal if there is none."""
    async with Client(s.nats, namespace=s.namespace, name=f"{PROG}-preflight") as client:
        hosts = [w for w in (await client.workers()).values() if w.hosts(s.operator)]
    if not hosts:
        raise Fatal(f"no live worker serves operator {s.operator!r} in namespace {s.namespace!r} "
                    f"(`{PROG} ls --namespace {s.namespace}` lists the workers)")
    return len(hosts)


def run_in_process(s: Settings, check: AnswerCheck | None) -> tuple[list[ClientResult], float]:
    progress = Progress(s.requests, label=s.operator) if s.progress else None
    reporter = LocalReporter(progress)

    async def main() -> ClientResult:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def interrupt() -> None:
            if reporter.stop:
                task.cancel()  # the second Ctrl-C aborts
            else:
                reporter.stop = True
                tqdm.write(STOPPING, file=sys.stderr)

        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            return await run_client(s, 0, s.requests, reporter, check)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    except TdistError as exc:
        raise Fatal(str(exc)) from None
    finally:
        if progress is not None:
            progress.close()
    return [result], result.wall_s


def run_processes(s: Settings, check: AnswerCheck | None) -> tuple[list[ClientResult], float]:
    """Spawn one process per share, start them together once all are connected, aggregate."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    shares = s.shares()
    procs = [ctx.Process(target=client_process, args=(s, check, i, n, events, go, stop), name=f"{PROG}-{i}", daemon=True)
             for i, n in enumerate(shares)]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: children start immune to Ctrl-C
    try:
        for proc in procs:
            proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    results: dict[int, ClientResult] = {}
    ready: set[int] = set()
    progress: Progress | None = None
    started = ended = time.perf_counter()
    shown = 0

    def handle(kind: str, index: int, payload: Any) -> None:
        nonlocal shown, ended
        if kind == "ready":
            ready.add(index)
        elif kind == "progress" and progress is not None:
            progress.advance(payload)
        elif kind == "error" and shown < MAX_ERROR_LINES:
            shown += 1
            tqdm.write(payload, file=sys.stderr)
        elif kind in ("result", "fatal") and index not in results:
            results[index] = payload if kind == "result" else ClientResult(index, fatal=payload)
            ended = time.perf_counter()

    def pump(until: Any, limit: float | None = None) -> None:
        """Handle messages until ``until()`` holds; a process that died without a result gets a
        fatal one (its messages are in the queue before it exits: drained first)."""
        give_up = None if limit is None else time.monotonic() + limit
        while not until():
            try:
                handle(*events.get(timeout=0.2))
                continue
            except queue_mod.Empty:
                pass
            for i, proc in enumerate(procs):
                if proc.exitcode is not None and i not in results:
                    _drain(events, handle)
                    if i not in results:
                        handle("fatal", i, f"client process {i} exited with code {proc.exitcode}")
            if give_up is not None and time.monotonic() > give_up:
                raise Fatal(f"client processes did not connect within {limit:g} s")

    finished = False
    try:
        pump(lambda: len(ready | set(results)) == len(procs),
             limit=60 + 2 * s.nats.connect_timeout * len(s.nats.servers))
        failed = [r.fatal for r in results.values() if r.fatal]
        if failed:
            raise Fatal(f"a client process failed: {failed[0]}")
        progress = Progress(s.requests, label=s.operator) if s.progress else None
        started = time.perf_counter()
        go.set()
        try:
            pump(lambda: len(results) == len(procs))
        except KeyboardInterrupt:
            tqdm.write(STOPPING, file=sys.stderr)
            stop.set()
            pump(lambda: len(results) == len(procs))
        finished = True
    finally:
        stop.set()
        go.set()
        if progress is not None:
            progress.close()
        for proc in procs:
            # A client closes after reporting (it may wait for tensor releases); on abort, don't wait.
            proc.join(timeout=15 if finished else 0.5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        events.close()
        events.join_thread()
    return [results[i] for i in sorted(results)], ended - started


def _drain(events: Any, handle: Any) -> None:
    """Handle every message already queued."""
    while True:
        try:
            handle(*events.get_nowait())
        except queue_mod.Empty:
            return


def _ms(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 3) if values.size else None


def summarize(s: Settings, results: list[ClientResult], wall_s: float, checked: bool) -> dict[str, Any]:
    latencies = np.concatenate([np.asarray(r.latencies, dtype=np.float64) for r in results] or [np.zeros(0)])
    answered = sum(r.answered for r in results)
    fatal = [r.fatal for r in results if r.fatal]
    summary: dict[str, Any] = {
        "requests": s.requests,
        "sent": sum(r.sent for r in results),
        "answered": answered,
        "errors": sum(r.errors for r in results) + len(fatal),
        "mismatches": sum(r.mismatches for r in results),
        "error_kinds": dict(sum((r.error_kinds for r in results), Counter())),
        "checked": checked,
        "wall_s": round(wall_s, 6),
        "throughput_rps": round(answered / wall_s, 3) if wall_s > 0 else 0.0,
        "p50_ms": _ms(latencies, 50),
        "p90_ms": _ms(latencies, 90),
        "p99_ms": _ms(latencies, 99),
        "mean_ms": round(float(latencies.mean()) * 1e3, 3) if latencies.size else None,
        "max_ms": round(float(latencies.max()) * 1e3, 3) if latencies.size else None,
        "served_by": dict(sum((r.served_by for r in results), Counter())),
        **s.conditions(),
    }
    if not summary["checked"]:
        summary["echoed"] = sum(r.echoed for r in results)
    if fatal:
        summary["fatal"] = fatal
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    def ms(key: str) -> str:
        return "-" if summary[key] is None else f"{summary[key]:.3f} ms"

    size = f"{summary['input_size_mean']:g}"
    if summary["input_size_stdev"]:
        size += f" (stdev {summary['input_size_stdev']:g})"
    print(f"operator {summary['operator']} in namespace {summary['namespace']}: {summary['clients']} client "
          f"process(es) x concurrency {summary['concurrency']}, input size {size} INT64, input_copies "
          f"{summary['input_copies']}, delay {summary['delay']:g} s, timeout {summary['timeout_s']:g} s, "
          f"seed {summary['seed']}, {os.cpu_count()} cores")
    print(f"requests: {summary['requests']}  answered: {summary['answered']}  errors: {summary['errors']}  "
          f"mismatches: {summary['mismatches']}"
          + (f"  (stopped early: {summary['sent']} sent)" if summary["sent"] < summary["requests"] else ""))
    if summary["error_kinds"]:
        print("errors by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(summary["error_kinds"].items())))
    if not summary["checked"]:
        print(f"answers not checked (no check for operator {summary['operator']}); "
              f"{summary['echoed']} of {summary['answered']} echoed the input")
    served = summary["served_by"]
    if served:
        print(f"served by {len(served)} worker(s): " + ", ".join(f"{w} {n}" for w, n in sorted(served.items())))
    print(f"wall time: {summary['wall_s']:.3f} s")
    print(f"Throughput: {summary['throughput_rps']:.1f} requests/s")
    print(f"latency: p50 {ms('p50_ms')}  p90 {ms('p90_ms')}  p99 {ms('p99_ms')}  "
          f"(mean {ms('mean_ms')}, max {ms('max_ms')})")


def run(s: Settings, checks: Mapping[str, AnswerCheck]) -> int:
    check = checks.get(s.operator)
    try:
        workers = asyncio.run(preflight(s))
        if not s.as_json:
            write_output(lambda: print(f"{workers} live worker(s) serve {s.operator}"))
        results, wall = run_in_process(s, check) if len(s.shares()) == 1 else run_processes(s, check)
    except TdistError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Fatal as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    summary = summarize(s, results, wall, checked=check is not None)

    def write() -> None:
        print_summary(summary)
        if s.as_json:
            print(json.dumps(summary, separators=(",", ":")))

    write_output(write)  # a reader gone (| head) does not change the run's exit code
    return EXIT_OK if summary["errors"] == 0 and summary["answered"] == s.requests else EXIT_FAILURE


# --------------------------------------------------------------------------------------------
# ls


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def worker_row(w: WorkerInfo) -> dict[str, str]:
    return {
        "ID": w.id,
        "NODE": w.node,
        "PID": str(w.pid),
        "STATE": w.state,
        "OPERATORS": ", ".join(f"{op.name}:{op.version} {op.inflight}/{op.max_inflight}" for op in w.operators),
        "SERVED": str(w.served),
        "LOAD": f"{w.load:.2f}",
        "PULLED": _bytes(w.bytes_pulled),
        "SERVED_BYTES": _bytes(w.bytes_served),
    }


def format_table(rows: list[dict[str, str]]) -> str:
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    lines = ["  ".join(h.ljust(widths[h]) for h in headers)]
    lines += ["  ".join(r[h].ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


async def list_workers(s: Settings) -> list[WorkerInfo]:
    async with Client(s.nats, namespace=s.namespace, name=f"{PROG}-ls") as client:
        workers = await client.workers()
    return [workers[k] for k in sorted(workers)]


def ls(s: Settings) -> int:
    try:
        workers = asyncio.run(list_workers(s))
    except TdistError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if s.as_json:
        print(json.dumps({"namespace": s.namespace,
                          "workers": [{**asdict(w), "load": w.load} for w in workers]}, separators=(",", ":")))
    elif not workers:
        print(f"no live workers in namespace {s.namespace!r}")
    else:
        print(format_table([worker_row(w) for w in workers]))
        print(f"{len(workers)} worker(s) in namespace {s.namespace!r}; PULLED/SERVED_BYTES: data-plane bytes")
    return EXIT_OK


# --------------------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None, checks: Mapping[str, AnswerCheck]) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args.command = "run"
    try:
        s = settings_from(args)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure("error", component="client")  # the CLI reports failures itself
    try:
        return ls(s) if args.command == "ls" else run(s, checks)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None, checks: Mapping[str, AnswerCheck] = HELLO_WORLD_CHECKS) -> int:
    """The ``tdist-client`` entry point. ``checks``: the answer check of each operator (operators
    not in it are called unchecked); by default the hello world's."""
    return quiet_pipe(lambda: _main(argv, checks))


if __name__ == "__main__":
    sys.exit(main())
