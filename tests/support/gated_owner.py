"""A data-plane owner in its own process whose answers to some tensors wait for the test's word.

    python tests/support/gated_owner.py --tensors 2 --nbytes 1048576

Prints one JSON line: ``{"owner", "address", "tensor_ids"}``, each tensor's bytes being
``np.arange(nbytes) % 251`` as uint8. Every answer for a tensor id waits until a line
``release <id>`` arrives on stdin; when an answer starts waiting it prints ``held <id>``.
A line ``quit`` (or the end of stdin) prints the transport's counts of discarded messages
(``{"dropped": {reason: n}, "endpoints_opened": n}``), closes the plane and exits. Only the timing of the
answers is held back: they travel over the real UCX transport.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "daemons"))

from tdist import logs  # noqa: E402
from tdist.config import DataPlaneConfig  # noqa: E402
from tdist.data_plane import ucx  # noqa: E402
from tdist.data_plane.plane import DataPlane  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=2)
    parser.add_argument("--nbytes", type=int, default=1 << 20)
    args = parser.parse_args()
    logs.configure("info", stream=sys.stderr)  # stdout carries this script's protocol lines only
    gates: dict[str, asyncio.Event] = {}
    reply = ucx.UcxTransport._reply

    async def gated_reply(self: ucx.UcxTransport, request: ucx.Request, *rest: Any) -> None:
        gate = gates.setdefault(request.tensor_id, asyncio.Event())
        if not gate.is_set():
            print(f"held {request.tensor_id}", flush=True)
            await gate.wait()
        await reply(self, request, *rest)

    ucx.UcxTransport._reply = gated_reply  # type: ignore[method-assign]
    plane = await DataPlane("gated-owner", DataPlaneConfig()).start()
    data = (np.arange(args.nbytes) % 251).astype(np.uint8)
    refs = [plane.put(data) for _ in range(args.tensors)]
    print(json.dumps({"owner": plane.component_id, "address": plane.address,
                      "tensor_ids": [r.tensor_id for r in refs]}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        if line[0] == "release":
            gates.setdefault(line[1], asyncio.Event()).set()
    transport = plane.transport
    assert isinstance(transport, ucx.UcxTransport)
    print(json.dumps({"dropped": dict(transport.drops.total), "endpoints_opened": transport.endpoints.opened}),
          flush=True)
    await plane.close()


if __name__ == "__main__":
    asyncio.run(main())
