"""The data plane's own metrics: store bytes and expired leases (no bytes move here, so the
transport is a stand-in that refuses to move any; pulled and served bytes are checked through a
real agent in tests/integration/test_metrics.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from prometheus_client import REGISTRY

from tdist.config import DataPlaneConfig
from tdist.data_plane.plane import DataPlane


class NoTransport:
    address = "test://nowhere"

    async def release(self, plane: DataPlane) -> None:
        pass

    async def fetch(self, address: str, tensor_id: str, out: Any, timeout: float) -> None:
        raise AssertionError("no bytes move in this test")

    async def command(self, address: str, cmd: int, tensor_id: str, timeout: float) -> str:
        raise AssertionError("no bytes move in this test")


async def no_transport(plane: DataPlane) -> NoTransport:
    return NoTransport()


def value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def wait_until(check, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout * 50)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def test_store_bytes_and_expired_leases() -> None:
    plane = await DataPlane("owner", DataPlaneConfig(lease=0.3), transport=no_transport).start()  # type: ignore[arg-type]
    try:
        expired = value("tdist_data_plane_leases_expired_total")
        ref = plane.put(np.zeros(1000, dtype=np.uint8))
        second = plane.serve_reference(ref.tensor_id)  # two references to one buffer
        assert second != ref.tensor_id
        await wait_until(lambda: value("tdist_data_plane_store_bytes") == 1000)
        # Nobody releases them: both leases run out, the buffer is freed.
        await wait_until(lambda: value("tdist_data_plane_leases_expired_total") == expired + 2)
        await wait_until(lambda: value("tdist_data_plane_store_bytes") == 0)
        assert len(plane.store) == 0
    finally:
        await plane.close()
