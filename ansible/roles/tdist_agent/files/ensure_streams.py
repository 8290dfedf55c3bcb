"""Create a namespace's work-queue stream and registry buckets with the configured replicas.

Run by the tdist_agent role (ansible.builtin.script, the venv's python) before the agents start:
``python ensure_streams.py /etc/tdist/agent.toml``. It connects with the agent's own credentials
(read from the file, never from argv), creates what is missing with
``[request_plane] replicas``, and brings the replicas of what exists to that number; every other
setting of an existing stream is left to the agents and workers that own it. Prints one JSON line:
``{"changed": bool, "actions": [...]}``.

Why here: agents and workers create the stream with ``replicas`` but open the registry buckets
with one replica, and keep an existing bucket as it is; created first with R3, the registry
survives the loss of a NATS node.
"""

from __future__ import annotations

import asyncio
import json
import sys

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import NotFoundError

from tdist.agent.config import load_agent_config
from tdist.registry import LIMIT_MARKER_TTL
from tdist.request_plane import streams, subjects
from tdist.request_plane.connection import close_connection, connect


async def _set_replicas(js: JetStreamContext, name: str, replicas: int, actions: list[str]) -> bool:
    """True if the stream exists (its replicas now ``replicas``); False if it does not."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return False
    if info.config.num_replicas != replicas:
        cfg = info.config
        cfg.num_replicas = replicas
        await js.update_stream(cfg)
        actions.append(f"{name}: replicas {info.config.num_replicas} -> {replicas}")
    return True


async def main(path: str) -> dict[str, object]:
    cfg = load_agent_config(path)
    rp = cfg.request_plane
    actions: list[str] = []
    nc = await connect(cfg.nats, name="tdist-ansible-streams")
    try:
        js = nc.jetstream()
        stream = subjects.stream_name(rp.namespace)
        if not await _set_replicas(js, stream, rp.replicas, actions):
            await streams.ensure_stream(js, rp, nc.max_payload, update=False)
            actions.append(f"{stream}: created with {rp.replicas} replicas")
        for bucket in (subjects.workers_bucket(rp.namespace), subjects.nodes_bucket(rp.namespace)):
            if not await _set_replicas(js, f"KV_{bucket}", rp.replicas, actions):
                await js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=1, limit_marker_ttl=LIMIT_MARKER_TTL, replicas=rp.replicas)
                )
                actions.append(f"KV_{bucket}: created with {rp.replicas} replicas")
    finally:
        await close_connection(nc)
    return {"changed": bool(actions), "actions": actions}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
