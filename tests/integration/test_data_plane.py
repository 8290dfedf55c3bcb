"""The data plane (UCX through ucxx): tensors by reference, pulled point to point, released."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import DataPlaneConfig, NatsConfig, RequestPlaneConfig
from tdist.data_plane import shm
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.plane import gpu_available
from tdist.errors import DataPlaneError, PeerUnreachable, TensorNotFound
from tdist.registry import WorkerInfo
from tests.conftest import WorkerProcesses, operator, operator_flag

pytestmark = pytest.mark.timeout(180)

DTYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": object,
}
BY_REFERENCE = DataPlaneConfig(inline_threshold=0)
BY_REFERENCE_UCX = DataPlaneConfig(inline_threshold=0, shared_memory=False)
INLINE = DataPlaneConfig(inline_threshold=1 << 19)


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype == "BYTES":
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(*shape):
            out[idx] = secrets.token_bytes(int(rng.integers(0, 9)))
        return out
    return (rng.random(shape) * 100).astype(DTYPES[dtype])


async def _worker_info(client: Client, worker_id: str, predicate, timeout: float = 15.0) -> WorkerInfo:  # type: ignore[no-untyped-def]
    """The worker's registry entry once ``predicate`` holds for it (entries refresh on heartbeats)."""
    registry = await client.registry()
    async with registry.watch() as watch:
        workers = await watch.wait_for(lambda ws: worker_id in ws and predicate(ws[worker_id]), timeout)
        return workers[worker_id]


@pytest.mark.parametrize("mode", ["inline", "reference", "reference_zero_copy", "reference_ucx"])
async def test_every_dtype_round_trips(nats_config: NatsConfig, rp: RequestPlaneConfig, workers, mode: str) -> None:
    """By reference, on one host: through shared memory both ways (copies, or read-only views
    with zero_copy), empty tensors over UCX (no segment for no bytes); with shared memory off,
    everything over UCX."""
    config = {"inline": INLINE, "reference_ucx": BY_REFERENCE_UCX}.get(mode, BY_REFERENCE)
    by_reference = mode != "inline"
    await workers("echo", operator("echo", "Counting", max_inflight=8), data_plane=config)
    async with Client(nats_config, request_plane=rp, data_plane=config) as client:
        echo = client.operator("echo")
        plane = await client.data_plane.get()
        empty = filled = 0
        for dtype in DTYPES:
            for shape in ((1, 4), (2, 4), (0,)):
                x = sample(dtype, shape)
                stream = await echo.call({"x": x}, timeout=30)
                final = await stream.final()
                assert isinstance(final.outputs["x"], TensorRef) == by_reference, (dtype, shape)
                if by_reference:
                    got = (await plane.materialize(final.outputs, zero_copy=mode == "reference_zero_copy"))["x"]
                    if mode == "reference_zero_copy" and dtype != "BYTES" and x.size:
                        assert not got.flags.writeable, dtype
                    empty, filled = empty + (x.size == 0), filled + (x.size > 0)
                else:
                    got = final.outputs["x"]
                assert got.shape == shape and got.dtype == x.dtype, (dtype, shape)
                assert np.array_equal(got, x), (dtype, shape)
        assert len(plane.store) == 0
        if mode == "reference_ucx":
            assert plane.pulls == {"ucx": empty + filled}
        elif by_reference:
            assert plane.pulls == {"shm": filled, "ucx": empty}


async def test_64_mib_round_trip_between_processes(client: Client, worker_processes: WorkerProcesses) -> None:
    wp = worker_processes.start("echo", operator_flag("echo", "Counting"))
    x = np.arange(8 << 20, dtype=np.int64)  # 64 MiB: far above the inline threshold
    result = await client.operator("echo").infer({"x": x}, timeout=60)
    assert result.outputs["x"].dtype == np.int64 and np.array_equal(result.outputs["x"], x)
    info = await _worker_info(client, wp.worker_id, lambda w: w.served == 1 and w.tensors_held == 0)
    # Both ways through shared memory (one host): the worker read the input from the client's
    # segment, the client the output from the worker's; nothing crossed UCX.
    assert info.bytes_pulled == x.nbytes and info.bytes_served == 0
    plane = await client.data_plane.get()
    assert plane.pulls == {"shm": 1} and plane.bytes_served == 0
    assert len(plane.store) == 0


async def test_unknown_tensor_raises_on_pull_and_release(client: Client) -> None:
    plane = await client.data_plane.get()
    ghost = TensorRef(plane.component_id, plane.address, secrets.token_hex(16), "INT64", (4,), 32)
    with pytest.raises(TensorNotFound):
        await plane.pull(ghost)
    with pytest.raises(TensorNotFound):
        await plane.release(ghost)
    # The same through UCX: an id the other process's plane has never had.
    async with Client(client.nats_config, request_plane=client.request_plane) as other:
        other_plane = await other.data_plane.get()
        remote_ghost = TensorRef(other_plane.component_id, other_plane.address, secrets.token_hex(16), "INT64", (4,), 32)
        with pytest.raises(TensorNotFound):
            await plane.pull(remote_ghost)
        with pytest.raises(TensorNotFound):
            await plane.release(remote_ghost)


async def test_forwarding_moves_no_bulk_bytes_through_the_middle(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    middle = worker_processes.start("middle", operator_flag("forward", "Forwarder", child="echo"))
    end = worker_processes.start("end", operator_flag("echo", "Counting"))
    x = np.random.default_rng(1).integers(0, 1 << 40, size=1 << 19, dtype=np.int64)  # 4 MiB
    result = await client.operator("forward").infer({"x": x}, timeout=60)
    assert np.array_equal(result.outputs["x"], x)
    m = await _worker_info(client, middle.worker_id, lambda w: w.served == 1 and w.tensors_held == 0)
    e = await _worker_info(client, end.worker_id, lambda w: w.served == 1 and w.tensors_held == 0)
    # Measured: the middle pulled nothing, served nothing, and its NATS traffic is a few kB.
    assert m.bytes_pulled == 0 and m.bytes_served == 0
    assert m.nats_in_bytes < x.nbytes // 100
    # The end worker read the input straight from the client's segment, and the client its output
    # from the end worker's (shared memory: the owner serves nothing over UCX).
    assert e.bytes_pulled == x.nbytes and e.bytes_served == 0
    assert (await client.data_plane.get()).pulls == {"shm": 1}


async def test_stores_are_empty_after_a_thousand_1_mib_requests(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    wp = worker_processes.start("echo", operator_flag("echo", "Counting", max_inflight=8))
    echo = client.operator("echo")
    x = np.frombuffer(np.random.default_rng(2).bytes(1 << 20), dtype=np.uint8)
    sem = asyncio.Semaphore(16)

    async def one() -> None:
        async with sem:
            out = await echo.infer({"x": x}, timeout=120)
            assert np.array_equal(out.outputs["x"], x)

    await asyncio.gather(*(one() for _ in range(1000)))
    plane = await client.data_plane.get()
    assert len(plane.store) == 0
    info = await _worker_info(client, wp.worker_id, lambda w: w.served == 1000 and w.tensors_held == 0)
    assert info.bytes_pulled == 1000 * x.nbytes
    # Every tensor went through shared memory, and every segment is gone (each owner unlinked
    # its own when the last reference went): /dev/shm holds nothing of either process.
    assert plane.pulls == {"shm": 1000} and info.bytes_served == 0
    assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith((f"tdist-{os.getpid()}-", f"tdist-{wp.pid}-"))]
    assert len(plane.mappings) == 0


async def test_killed_consumer_leaves_nothing_after_the_lease(
    nats_config: NatsConfig, rp: RequestPlaneConfig, worker_processes: WorkerProcesses
) -> None:
    lease = 2.0
    async with Client(nats_config, request_plane=rp, data_plane=DataPlaneConfig(lease=lease)) as client:
        consumer = worker_processes.start("holder", operator_flag("hold", "Holder"))
        stream = await client.operator("hold").call({"x": np.zeros(1 << 18, dtype=np.int64)}, timeout=60)
        first = await stream.__anext__()
        assert not first.final  # the consumer holds the reference now
        plane = await client.data_plane.get()
        assert len(plane.store) == 1
        worker_processes.kill(consumer, signal.SIGKILL)
        consumer.proc.wait(10)
        await stream.aclose()
        t0 = time.monotonic()
        while len(plane.store) and time.monotonic() - t0 < lease + 10:
            await asyncio.sleep(0.1)
        assert len(plane.store) == 0 and plane.store.bytes_used == 0


async def test_pull_from_a_killed_owner_fails_within_its_timeout(
    nats_config: NatsConfig, rp: RequestPlaneConfig, worker_processes: WorkerProcesses
) -> None:
    """Over UCX (this client does not use shared memory, as one on another host would not)."""
    timeout = 2.0
    owner = worker_processes.start("owner", operator_flag("echo", "Counting"))
    config = DataPlaneConfig(pull_timeout=timeout, shared_memory=False)
    try:
        async with Client(nats_config, request_plane=rp, data_plane=config) as client:
            x = np.arange(1 << 18, dtype=np.int64)
            result = await client.operator("echo").infer({"x": x}, timeout=60, pull_outputs=False)
            ref = result.outputs["x"]
            assert isinstance(ref, TensorRef) and ref.owner == owner.worker_id
            worker_processes.kill(owner, signal.SIGKILL)
            owner.proc.wait(10)
            plane = await client.data_plane.get()
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable):
                await plane.pull(ref)
            assert time.monotonic() - t0 < timeout * 3  # bounded by the timeout, not hanging
            assert not plane.pulls  # counted are pulls that brought the bytes
            # The plane keeps serving: a fresh owner works.
            fresh = worker_processes.start("fresh", operator_flag("echo", "Counting"))
            again = await client.operator("echo").infer({"x": x}, timeout=60)
            assert np.array_equal(again.outputs["x"], x) and again.worker_id == fresh.worker_id
    finally:
        shm.sweep_dead()  # the killed owner's segment (an agent would sweep it)


async def test_a_killed_owners_segment_gives_the_bytes_until_swept_then_a_typed_error(
    nats_config: NatsConfig, rp: RequestPlaneConfig, worker_processes: WorkerProcesses
) -> None:
    """Same host: the segment outlives its owner's SIGKILL (nobody unlinked it), so a pull reads
    the bytes; once swept (the agent's job), the pull goes to UCX and fails within its timeout."""
    timeout = 2.0
    owner = worker_processes.start("owner", operator_flag("echo", "Counting"))
    async with Client(nats_config, request_plane=rp, data_plane=DataPlaneConfig(pull_timeout=timeout)) as client:
        x = np.arange(1 << 18, dtype=np.int64)
        result = await client.operator("echo").infer({"x": x}, timeout=60, pull_outputs=False)
        ref = result.outputs["x"]
        assert isinstance(ref, TensorRef) and ref.segment.startswith(f"tdist-{owner.pid}-")
        worker_processes.kill(owner, signal.SIGKILL)
        owner.proc.wait(10)
        plane = await client.data_plane.get()
        assert np.array_equal(await plane.pull(ref), x)
        assert ref.segment in shm.sweep_dead()
        t0 = time.monotonic()
        with pytest.raises(PeerUnreachable, match="has exited"):  # its pid is gone: UCX is not asked
            await plane.pull(ref)
        with pytest.raises(PeerUnreachable, match="has exited"):
            await plane.release(ref)
        assert time.monotonic() - t0 < timeout * 3
        assert plane.pulls == {"shm": 1}  # counted are pulls that brought the bytes


async def test_gpu_memory_without_a_gpu_is_a_clear_error(client: Client) -> None:
    if gpu_available():
        pytest.skip("this machine has a GPU: the GPU path is tested in test_gpu_pull")
    plane = await client.data_plane.get()
    ref = plane.put(np.arange(4))
    with pytest.raises(DataPlaneError, match="no usable GPU"):
        await plane.pull(ref, memory_type="GPU")
    await plane.release(ref)


async def test_gpu_pull(client: Client, workers) -> None:
    if not gpu_available():
        pytest.skip("no GPU: cupy cannot allocate device memory here (CUDA driver missing)")
    import cupy  # type: ignore[import-not-found]

    await workers("echo", operator("echo", "Counting"), data_plane=BY_REFERENCE)
    x = cupy.arange(1024, dtype=cupy.float32)
    result = await client.operator("echo").infer({"x": x}, timeout=60, pull_outputs=False)
    got = await (await client.data_plane.get()).pull(result.outputs["x"], memory_type="GPU")
    assert isinstance(got, cupy.ndarray) and bool((got == x).all())
