"""Sends random messages to a data-plane server's tags from its own process (a hostile peer).

    python tests/support/data_plane_fuzzer.py --address <base64 worker address> --seed 1 --count 600

Message kinds, mixed at random: raw bytes of any length (0 to 20 KiB and some 1 MiB; many
starting with 0xFF, the old stop byte) on REQUEST_TAG; well-formed requests with garbage,
truncated, mutated or valid reply addresses and random tensor ids, commands and tags; and
messages on random tags and on tags next to REQUEST_TAG. Prints one JSON line:
``{"sent": n, "failed": n}`` (a send fails when the server is gone or refuses the endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "daemons"))

from tdist.data_plane.ucx import REQUEST_TAG, _import_ucxx, encode_request  # noqa: E402
from tdist.data_plane.ucx_progress import EventDriver  # noqa: E402


def raw(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 2, 8, 35, 36, 37, 64, 300, 8191, 8192, 8193, 8227, 8228, 8229, 12000, 20000, 1 << 20])
    data = bytearray(rng.randbytes(size))
    if data and rng.random() < 0.4:
        data[0] = 0xFF
    return bytes(data)


def request(rng: random.Random, own: bytes) -> bytes:
    choice = rng.random()
    if choice < 0.25:
        address = rng.randbytes(rng.randrange(0, 400))
    elif choice < 0.45:
        address = own[: rng.randrange(len(own))]
    elif choice < 0.75:
        mutated = bytearray(own)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        address = bytes(mutated)
    else:
        address = own  # a valid address: the server answers "not found" on a random tag
    command = rng.choice([1, 2, 3, 1, 2, 3, 0, 4, 255])
    tag = rng.getrandbits(64)
    data = encode_request(command, rng.randbytes(16).hex(), rng.getrandbits(64), tag, address)
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data))]
    return data


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--error-handling", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ucxx = _import_ucxx(bool(args.error_handling))
    driver = EventDriver(ucxx)
    own = ucxx.get_worker_address().tobytes()
    target = base64.b64decode(args.address)
    sent = failed = 0
    ep = None
    for _ in range(args.count):
        if ep is None:
            ep = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(target), endpoint_error_handling=bool(args.error_handling))
        kind = rng.random()
        if kind < 0.4:
            data, tag = raw(rng), REQUEST_TAG
        elif kind < 0.8:
            data, tag = request(rng, own), REQUEST_TAG
        else:
            data = raw(rng)
            tag = rng.choice([REQUEST_TAG - 1, REQUEST_TAG + 1, 0, (1 << 64) - 1, rng.getrandbits(64)])
        buf = np.frombuffer(data, dtype=np.uint8) if data else np.empty(0, dtype=np.uint8)
        try:
            await asyncio.wait_for(driver.send(ep, buf, tag), 10)
            sent += 1
        except Exception as exc:
            print(f"send of {len(data)} bytes on tag {tag:#x} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed += 1
            ep.abort()
            ep = None
    # Give the server's answers to the valid-address requests time to arrive, then leave.
    await asyncio.sleep(0.5)
    if ep is not None:
        ep.abort()
    await driver.close()
    print(json.dumps({"sent": sent, "failed": failed}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
