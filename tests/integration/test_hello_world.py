"""The hello world through tdist: Triton encoder and decoder, the encoder_decoder operator."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import OperatorConfig
from tdist.errors import InvalidRequest
from tdist.triton.install import find_triton

REPO = str(Path(__file__).resolve().parents[2] / "model_repository")
pytestmark = [pytest.mark.timeout(300)]

try:
    find_triton()
    HAVE_TRITON = True
except Exception as exc:  # noqa: BLE001 - any reason means: no server here
    HAVE_TRITON, WHY = False, str(exc)
if not HAVE_TRITON:
    pytestmark.append(pytest.mark.skip(reason=f"no Triton server binary: {WHY}"))


def triton_op(name: str) -> OperatorConfig:
    return OperatorConfig(name=name, implementation="tdist.operators.triton:TritonOperator", max_inflight=4,
                          parameters={"model_repository": REPO})


@pytest.fixture
async def pipeline(workers):  # type: ignore[no-untyped-def]
    enc = await workers("encoder", triton_op("encoder"))
    dec = await workers("decoder", triton_op("decoder"))
    mid = await workers("encoder_decoder", OperatorConfig(
        name="encoder_decoder", implementation="tdist.hello_world.operators:EncodeDecode", max_inflight=16))
    return enc, dec, mid


def ints(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-(2**62), 2**62, size=n, dtype=np.int64)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n", [0, 1, 10_000])
async def test_round_trip(client: Client, pipeline, n: int, k: int) -> None:
    x = ints(n, seed=n + k)
    out = await client.operator("encoder_decoder").infer({"input": x}, parameters={"input_copies": k}, timeout=60)
    assert out.outputs["output"].dtype == np.int64 and np.array_equal(out.outputs["output"], x)


async def test_encoder_and_decoder_alone(client: Client, pipeline) -> None:
    x = ints(7)
    enc = await client.operator("encoder").infer({"input": x}, parameters={"input_copies": 3}, timeout=60)
    assert np.array_equal(enc.outputs["output"], np.tile(~x, 3))
    assert enc.outputs["input_copies"].tolist() == [3]
    dec = await client.operator("decoder").infer(
        {"input": np.tile(~x, 3), "input_copies": np.array([3], dtype=np.int64)}, timeout=60)
    assert np.array_equal(dec.outputs["output"], x)


async def test_delay_is_honoured_by_the_models_own_account(client: Client, pipeline) -> None:
    x, k, delay = ints(50), 2, 0.002
    enc = await client.operator("encoder").infer({"input": x}, parameters={"input_copies": k, "delay": delay},
                                                 timeout=60)
    expected = delay * len(x) * k
    assert enc.outputs["slept_seconds"][0] == pytest.approx(expected, rel=0.5)


async def test_encoder_bytes_reach_the_decoder_without_passing_through_encoder_decoder(client: Client, pipeline
                                                                                       ) -> None:
    enc, dec, mid = pipeline
    x = ints(100_000)  # 800 kB: far above the inline threshold
    out = await client.operator("encoder_decoder").infer({"input": x}, timeout=60)
    assert np.array_equal(out.outputs["output"], x)
    middle = mid.info()
    assert middle.bytes_pulled == 0 and middle.bytes_served == 0
    assert dec.info().bytes_pulled >= x.nbytes  # the decoder pulled the encoder's output itself
    # (on one host through the encoder's shared memory: the encoder serves nothing over the wire)


async def test_wrong_dtype_or_shape_is_an_error_response(client: Client, pipeline) -> None:
    with pytest.raises(InvalidRequest):
        await client.operator("encoder").infer({"input": np.ones(4, dtype=np.float32)}, timeout=60)
    with pytest.raises(InvalidRequest):
        await client.operator("encoder").infer({"input": np.ones((2, 2), dtype=np.int64)}, timeout=60)
    ok = await client.operator("encoder").infer({"input": ints(3)}, timeout=60)
    assert ok.outputs["output"].shape == (3,)


async def test_triton_killed_under_a_worker_is_noticed_and_service_resumes(client: Client, pipeline) -> None:
    enc, _, _ = pipeline
    op = enc.runners[("encoder", 1)].instance
    old_pid = op.server.pid
    os.kill(old_pid, signal.SIGKILL)
    for _ in range(600):  # the watchdog restarts it and reloads the model
        if op._shared.restarts >= 1 and op.server.is_alive() and op.server.model_ready("encoder"):
            break
        await asyncio.sleep(0.1)
    assert op.server.pid != old_pid and op._shared.restarts >= 1
    x = ints(10)
    out = await client.operator("encoder_decoder").infer({"input": x}, timeout=60)
    assert np.array_equal(out.outputs["output"], x)
