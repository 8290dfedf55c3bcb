"""A data-plane owner or consumer in its own process, for the shared-memory tests.

    python tests/support/shm_peer.py owner --nbytes 1048576 [--count 1] [--no-shared-memory] [--gpu]

prints one JSON line ``{"pid", "refs": [descriptor fields...]}``, each tensor's bytes being
``np.arange(nbytes) % 251`` as uint8, then serves until a line ``quit`` (or the end of stdin).

    python tests/support/shm_peer.py consumer --refs JSON [--no-shared-memory]

pulls each reference once, checks its bytes and prints ``{"ok": bool, "paths": {path: n}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "daemons"))

from tdist import logs  # noqa: E402
from tdist.config import DataPlaneConfig  # noqa: E402
from tdist.data_plane.descriptor import TensorRef  # noqa: E402
from tdist.data_plane.plane import DataPlane  # noqa: E402


def pattern(nbytes: int) -> np.ndarray:
    return (np.arange(nbytes) % 251).astype(np.uint8)


def fields(ref: TensorRef) -> list[Any]:
    return [ref.owner, ref.address, ref.tensor_id, ref.dtype, list(ref.shape), ref.nbytes, ref.memory_type,
            ref.device_id, ref.segment, ref.host, ref.ipc]


def from_fields(f: list[Any]) -> TensorRef:
    return TensorRef(*f[:4], tuple(f[4]), *f[5:])


async def owner(args: argparse.Namespace) -> None:
    config = DataPlaneConfig(shared_memory=args.shared_memory, store_bytes=max(2 << 30, 2 * args.count * args.nbytes))
    plane = await DataPlane(f"shm-owner-{os.getpid()}", config).start()
    data = pattern(args.nbytes)
    if args.gpu:
        import cupy  # type: ignore[import-not-found]

        data = cupy.asarray(data)
    refs = [plane.put(data) for _ in range(args.count)]
    print(json.dumps({"pid": os.getpid(), "refs": [fields(r) for r in refs]}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "quit":
            break
    await plane.close()


async def consumer(args: argparse.Namespace) -> None:
    plane = await DataPlane(f"shm-consumer-{os.getpid()}", DataPlaneConfig(shared_memory=args.shared_memory)).start()
    ok = True
    try:
        for f in json.loads(args.refs):
            ref = from_fields(f)
            ok &= bool(np.array_equal(await plane.pull(ref), pattern(ref.nbytes)))
    finally:
        print(json.dumps({"ok": ok, "paths": dict(plane.pulls)}), flush=True)
        await plane.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["owner", "consumer"])
    parser.add_argument("--nbytes", type=int, default=1 << 20)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--refs")
    parser.add_argument("--no-shared-memory", dest="shared_memory", action="store_false")
    parser.add_argument("--gpu", action="store_true", help="owner: the tensors in GPU memory (cupy)")
    args = parser.parse_args()
    logs.configure("info", stream=sys.stderr)  # stdout carries this script's JSON lines only
    asyncio.run(owner(args) if args.role == "owner" else consumer(args))


if __name__ == "__main__":
    main()
