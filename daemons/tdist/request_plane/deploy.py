"""Deploying a namespace: its work-queue stream and registry buckets, from configuration.

The agent does this at start; a worker does it for its own namespace; clusters run
without an agent use the command:

    python -m tdist.request_plane.deploy --config /etc/tdist/agent.toml [--json]

Callers never create any of these (their defaults would fix storage and replicas for
everyone after them). Agents and workers keep the storage and replicas of what exists
and report a difference; this command, run on purpose by whoever deploys (the Ansible
role runs it once per rollout), also brings the replicas of what exists to the
configured number (R1 -> R3 when a cluster grows). Storage cannot change in place: a
difference is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from nats.js.errors import NotFoundError

from nats.aio.client import Client as NatsClient

from tdist import logs, names
from tdist.config import NatsConfig, RequestPlaneConfig, load_connection_file
from tdist.errors import TdistError
from tdist.registry import open_bucket
from tdist.request_plane import streams
from tdist.request_plane.connection import close_connection, connect


async def ensure_namespace(nc: NatsClient, rp: RequestPlaneConfig) -> list[str]:
    """Create the namespace's stream and buckets where missing; returns the differences kept."""
    js = nc.jetstream()
    kept = await streams.ensure_stream(js, rp, nc.max_payload)
    for bucket in (names.workers_bucket(rp.namespace), names.nodes_bucket(rp.namespace)):
        await open_bucket(js, bucket, replicas=rp.replicas, create=True)
    return kept


async def _set_replicas(nc: NatsClient, stream: str, replicas: int) -> str | None:
    """Bring an existing stream's replicas to ``replicas``; what was done, or None."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return None
    have = info.config.num_replicas or 1
    if have == replicas:
        return None
    info.config.num_replicas = replicas
    await js.update_stream(info.config)
    return f"{stream}: replicas {have} -> {replicas}"


async def deploy(nats: NatsConfig, rp: RequestPlaneConfig, *, set_replicas: bool = False) -> list[str]:
    """Deploy the namespace; with ``set_replicas`` bring existing replicas to the configuration.
    Returns what was done or kept (one line each)."""
    nc = await connect(nats, name="tdist-deploy")
    try:
        done: list[str] = []
        js = nc.jetstream()
        for stream in (names.stream_name(rp.namespace), f"KV_{names.workers_bucket(rp.namespace)}",
                       f"KV_{names.nodes_bucket(rp.namespace)}"):
            try:
                await js.stream_info(stream)
            except NotFoundError:
                done.append(f"{stream}: created with {rp.replicas} replica(s)")
            if set_replicas and (line := await _set_replicas(nc, stream, rp.replicas)):
                done.append(line)
        kept = await ensure_namespace(nc, rp)
        return done + [f"kept: {line}" for line in kept if not (set_replicas and "replicas" in line)]
    finally:
        await close_connection(nc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdist.request_plane.deploy",
                                     description="Create a namespace's stream and registry buckets from a TOML file.")
    parser.add_argument("--config", required=True, help="an agent or worker TOML file ([nats], [request_plane])")
    parser.add_argument("--keep-replicas", action="store_true",
                        help="leave the replicas of an existing stream or bucket as they are (only report them)")
    parser.add_argument("--json", action="store_true", help='one JSON line: {"changed": bool, "actions": [...]}')
    args = parser.parse_args(argv)
    logs.configure("warning")  # JSON lines on stderr; stdout is the result
    try:
        nats, rp = load_connection_file(args.config)
        actions = asyncio.run(deploy(nats, rp, set_replicas=not args.keep_replicas))
    except TdistError as exc:
        print(f"tdist deploy: {exc}", file=sys.stderr)
        return 2 if exc.code == "CONFIG" else 1
    changed = [a for a in actions if not a.startswith("kept: ")]
    if args.json:
        print(json.dumps({"changed": bool(changed), "actions": actions}))
    else:
        for line in actions:
            print(line)
        print(f"namespace {rp.namespace} deployed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
