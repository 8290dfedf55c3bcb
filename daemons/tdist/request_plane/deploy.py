"""Deploying a namespace: its work-queue stream and registry buckets, from configuration.

The agent does this at start; a worker does it for its own namespace; clusters run
without an agent use the command:

    python -m tdist.request_plane.deploy --config /etc/tdist/agent.toml

Callers never create any of these (their defaults would fix storage and replicas for
everyone after them). Storage and replicas of what exists are kept and any
difference from the configuration is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from nats.aio.client import Client as NatsClient

from tdist import names
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


async def deploy(nats: NatsConfig, rp: RequestPlaneConfig) -> list[str]:
    nc = await connect(nats, name="tdist-deploy")
    try:
        return await ensure_namespace(nc, rp)
    finally:
        await close_connection(nc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdist.request_plane.deploy",
                                     description="Create a namespace's stream and registry buckets from a TOML file.")
    parser.add_argument("--config", required=True, help="an agent or worker TOML file ([nats], [request_plane])")
    args = parser.parse_args(argv)
    try:
        nats, rp = load_connection_file(args.config)
        kept = asyncio.run(deploy(nats, rp))
    except TdistError as exc:
        print(f"tdist deploy: {exc}", file=sys.stderr)
        return 2 if exc.code == "CONFIG" else 1
    for line in kept:
        print(f"kept: {line}")
    print(f"namespace {rp.namespace} deployed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
