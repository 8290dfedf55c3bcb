"""``tdist-worker``: run one worker from a TOML file or from flags.

    tdist-worker --config worker.toml [--worker NAME]
    tdist-worker --nats-url nats://127.0.0.1:4222 --namespace demo --name echo \\
        --operator name=echo,implementation=tdist.operators.builtin:Echo,max_inflight=8

SIGTERM or SIGINT drains: stop pulling, finish in-flight work, deregister, exit 0.

NATS settings: flags, then the environment (``TDIST_NATS_URL``, ``TDIST_NATS_USER``,
``TDIST_NATS_PASSWORD``, ``TDIST_NATS_TOKEN``, ``TDIST_NATS_CREDS``), then the file's
``[nats]``. ``--nats-file`` (the agent's 0600 file) is a flag: with it the environment is not
read, so a worker the agent starts dials exactly what the agent wrote.
Exit codes: 0 drained and stopped, 1 a runtime failure, 2 a bad flag, value or file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from tdist import logs
from tdist.cli_common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    NATS_EPILOG,
    add_nats_arguments,
    add_version,
    epilog,
    nats_overrides,
    quiet_pipe,
)
from tdist.config import (
    LoggingConfig,
    NatsConfig,
    OperatorConfig,
    RequestPlaneConfig,
    WorkerConfig,
    WorkerFile,
    _Table,
    load_worker_file,
    parse_nats,
    read_toml,
)
from tdist.errors import ConfigError, TdistError
from tdist.worker.worker import Worker

log = logs.get_logger("tdist.worker.main")
T = TypeVar("T")


def parse_operator_flag(text: str) -> OperatorConfig:
    """``name=echo,implementation=mod:Cls,version=1,max_inflight=4,param.delay=0.1``."""
    fields: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--operator part {part!r} is not key=value", key="--operator")
        key = key.strip()
        if key.startswith("param."):
            try:
                params[key[6:]] = json.loads(value)
            except ValueError:
                params[key[6:]] = value
        elif key in ("version", "max_inflight"):
            try:
                fields[key] = int(value)
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {value!r}", key=f"--operator {key}") from None
        elif key in ("name", "implementation"):
            fields[key] = value
        else:
            raise ConfigError(f"unknown --operator key {key!r}", key="--operator")
    for required in ("name", "implementation"):
        if required not in fields:
            raise ConfigError(f"--operator needs {required}=...", key="--operator")
    return OperatorConfig(parameters=params, **fields)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdist-worker", description="Run a tdist worker hosting operators.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog("the worker could not start or serve (NATS unreachable, an operator's setup failed)",
                      NATS_EPILOG + "\n--nats-file counts as a flag: with it, the environment is not read."))
    add_version(p)
    p.add_argument("--config", help="TOML file with [nats], [request_plane], [logging] and [worker] or [[workers]]")
    p.add_argument("--worker", help="with [[workers]]: which worker of the file to run")
    nats = p.add_argument_group("NATS")
    add_nats_arguments(nats)
    nats.add_argument("--nats-file", help="a TOML file whose [nats] table replaces the config's (the agent writes "
                                          "one, mode 0600: the servers and credentials stay out of argv)")
    p.add_argument("--namespace", help="namespace; overrides the file")
    p.add_argument("--name", help="worker name (flags mode)")
    p.add_argument("--operator", action="append", default=[], help="operator spec (flags mode, repeatable)")
    p.add_argument("--worker-id", help="fixed worker id (default: NAME-<random>)")
    p.add_argument("--ack-wait", type=float, help="seconds before an unacknowledged request is redelivered")
    p.add_argument("--max-deliver", type=int, help="delivery attempts per request")
    p.add_argument("--registry-ttl", type=float, help="seconds a dead worker stays in the registry")
    p.add_argument("--drain-timeout", type=float, help="seconds to finish in-flight work on SIGTERM")
    p.add_argument("--inline-threshold", type=int, help="bytes above which tensors go by reference")
    p.add_argument("--tensor-lease", type=float, help="seconds an unreleased tensor reference lives")
    p.add_argument("--pull-timeout", type=float, help="seconds before a tensor's owner counts as unreachable")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.add_argument("--log-file", help="append JSON log lines here instead of stderr")
    return p


def _override(config: T, **flags: tuple[str, Any]) -> T:
    """``config`` with the flags that were given (value not None) replacing its fields, one at a
    time so that an invalid value is reported under the flag the user typed, not its TOML key."""
    for name, (flag, value) in flags.items():
        if value is None:
            continue
        try:
            config = dataclasses.replace(config, **{name: value})  # type: ignore[type-var]
        except ConfigError as exc:
            raise ConfigError(exc.reason, key=flag) from None
    return config


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> WorkerFile:
    """The worker's settings: flags, then (without ``--nats-file``) ``environ`` (default
    ``os.environ``) for NATS, then the file, then defaults."""
    if args.config:
        wf = load_worker_file(args.config, args.worker)
    else:
        if not args.name or not args.operator:
            raise ConfigError("without --config, give --name and at least one --operator", key="--name")
        worker = WorkerConfig(name=args.name, operators=tuple(parse_operator_flag(o) for o in args.operator))
        wf = WorkerFile(nats=NatsConfig(), request_plane=RequestPlaneConfig(), logging=LoggingConfig(), worker=worker)
    nats = wf.nats
    if args.nats_file:
        nats = parse_nats(_Table(read_toml(args.nats_file), args.nats_file, "").table("nats"))
    return WorkerFile(
        nats=nats_overrides(args, environ, use_environment=not args.nats_file).apply(nats),
        request_plane=_override(wf.request_plane, namespace=("--namespace", args.namespace),
                                ack_wait=("--ack-wait", args.ack_wait),
                                max_deliver=("--max-deliver", args.max_deliver)),
        logging=_override(wf.logging, level=("--log-level", args.log_level), file=("--log-file", args.log_file)),
        worker=_override(wf.worker, registry_ttl=("--registry-ttl", args.registry_ttl),
                         drain_timeout=("--drain-timeout", args.drain_timeout)),
        data_plane=_override(wf.data_plane, inline_threshold=("--inline-threshold", args.inline_threshold),
                             lease=("--tensor-lease", args.tensor_lease),
                             pull_timeout=("--pull-timeout", args.pull_timeout)),
    )


async def run(wf: WorkerFile, worker_id: str | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(wf.worker, nats=wf.nats, request_plane=wf.request_plane, data_plane=wf.data_plane,
                    worker_id=worker_id, request_log=wf.logging.request_log)
    structlog.contextvars.bind_contextvars(worker=worker.id)  # every task of this process inherits it
    async with worker:
        print(json.dumps({"event": "worker_ready", "worker_id": worker.id}), flush=True)
        await stop.wait()
        log.info("worker_signal_stop", worker=worker.id)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        wf = resolve(args)
    except ConfigError as exc:
        print(f"tdist-worker: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    if wf.logging.file:  # Triton's plain-text log beside ours, not in a temp dir gone with the server
        os.environ.setdefault("TDIST_TRITON_LOG_FILE", str(Path(wf.logging.file).with_suffix(".triton.out")))
    logs.configure(wf.logging.level, file=wf.logging.file, rotate_bytes=wf.logging.rotate_bytes,
                   backups=wf.logging.backups, component="worker", node=wf.worker.node)
    try:
        return asyncio.run(run(wf, args.worker_id))
    except ConfigError as exc:  # an implementation that does not import, a Triton model that is not there
        log.error("worker_failed", error=str(exc), code=exc.code)
        print(f"tdist-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TdistError as exc:
        log.error("worker_failed", error=str(exc), code=exc.code)
        print(f"tdist-worker: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_pipe(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
