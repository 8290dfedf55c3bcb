"""The data plane of one process: the tensors it owns, and pulls of other processes' tensors.

Requests and responses carry ``TensorRef`` descriptors for tensors above the inline
threshold; the receiver pulls the bytes straight from the owner, into the memory
type it asks for. Forwarding a received tensor creates a new reference at its
owner, so bulk bytes never pass through an orchestrating operator.

Paths of a pull (``DataPlane.pulls`` counts them): ``shm``, a CPU tensor of an owner on this
host, read from the owner's shared-memory segment without a message (``shm.py``); ``ipc``, a GPU
tensor on this host through a CUDA IPC handle (``cuda_ipc.py``); ``ucx``, everything else and
whatever the first two cannot read; ``local``, a tensor this plane owns.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from tdist import metrics, tensors
from tdist.config import DataPlaneConfig
from tdist.data_plane import shm
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.parallel_copy import ParallelCopy
from tdist.data_plane.store import TensorStore
from tdist.errors import DataPlaneError, PeerUnreachable, TdistError
from tdist.logs import get_logger

log = get_logger("tdist.data_plane")

GET, REFERENCE, RELEASE = 1, 2, 3
_PULLED_BYTES = metrics.DATA_PLANE_BYTES.labels("pulled")
_PULLS = {path: metrics.DATA_PLANE_PULLS.labels(path) for path in ("shm", "ipc", "ucx")}
"""The pull's counters, looked up once (``labels`` takes a lock and a dict lookup per call; on a
pull right after a large copy every such step runs cache-cold)."""
SHM_SWEEP_EVERY = 60.0
"""Seconds between a plane's sweeps of dead processes' segments (and one at start)."""


class Transport(Protocol):
    """Moves bytes between processes; knows nothing of tensors beyond ids and buffers."""

    address: str

    async def release(self, plane: DataPlane) -> None:
        """``plane`` no longer serves its tensors through this transport."""

    async def fetch(self, address: str, tensor_id: str, out: Any, timeout: float) -> None:
        """Fill ``out`` (a contiguous buffer of exactly the tensor's size) with the tensor's bytes."""

    async def command(self, address: str, cmd: int, tensor_id: str, timeout: float) -> str:
        """REFERENCE returns the new id; RELEASE returns ''. Raises TensorNotFound, PeerUnreachable."""



TransportFactory = Callable[["DataPlane"], Awaitable[Transport]]


def gpu_available() -> bool:
    try:
        import cupy  # type: ignore[import-not-found]

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


def any_needs_reference(values: Iterable[Any], threshold: int) -> bool:
    """Whether any of ``values`` must travel by reference (see ``needs_reference``)."""
    for value in values:
        if needs_reference(value, threshold):
            return True
    return False


def needs_reference(value: Any, threshold: int) -> bool:
    """Whether ``value`` must travel by reference: a received one, a GPU array, or one of at
    least ``threshold`` bytes (so 0 sends every tensor by reference)."""
    if type(value) is np.ndarray and value.dtype.kind != "O":  # the common case first: on every request
        return value.nbytes >= threshold
    if isinstance(value, TensorRef) or type(value).__module__.startswith("cupy"):
        return True
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return sum(4 + len(x if isinstance(x, bytes) else str(x).encode()) for x in value.ravel()) >= threshold
        return value.nbytes >= threshold
    return False


class DataPlane:
    def __init__(self, component_id: str, config: DataPlaneConfig, transport: TransportFactory | None = None
                 ) -> None:
        self.component_id = component_id
        self.config = config
        self._transport_factory = transport
        self.transport: Transport | None = None
        self.store = TensorStore(config.store_bytes, config.lease, on_free=_free)
        self.bytes_pulled = 0
        """Bytes this plane pulled, by any path."""
        self.bytes_served = 0
        """Bytes this plane sent over UCX (reads of its segments by consumers on its host are not seen)."""
        self.pulls: collections.Counter[str] = collections.Counter()
        """Pulls by path: shm, ipc, ucx, local."""
        self.host = ""
        """This process's host identity when it shares memory with same-host consumers, else ''."""
        self.copy = ParallelCopy(config.copy_threads)
        """Copies into a caller's buffer (large ones split across threads)."""
        self.mappings = shm.Mappings(config.shm_cache_bytes, copy=self.copy)
        self._sweeper: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()

    @property
    def address(self) -> str:
        assert self.transport is not None, "DataPlane.start() first"
        return self.transport.address

    async def start(self) -> DataPlane:
        if self._transport_factory is None:
            from tdist.data_plane.ucx import UcxTransport

            self._transport_factory = UcxTransport.acquire
        self.transport = await self._transport_factory(self)
        if self.config.shared_memory and shm.available():
            self.host = shm.host_identity()
            await self._sweep_segments()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_leases())
        return self

    async def close(self, wait_for_release: float = 0.0) -> None:
        """Wait up to ``wait_for_release`` seconds for consumers to release, then stop serving."""
        if wait_for_release > 0 and len(self.store):
            try:
                async with asyncio.timeout(wait_for_release):
                    while len(self.store):
                        self._drained.clear()
                        await self._drained.wait()
            except TimeoutError:
                log.warning("data_plane_closed_with_references", references=len(self.store),
                            bytes=self.store.bytes_used)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self.store.clear()  # nobody can pull any more: free the buffers (and unlink their segments)
        self.mappings.clear()
        self.copy.close()
        if self.transport is not None:
            await self.transport.release(self)
            self.transport = None

    async def _sweep_leases(self) -> None:
        next_shm_sweep = time.monotonic() + SHM_SWEEP_EVERY
        while True:
            await asyncio.sleep(min(1.0, self.config.lease / 4))
            if self.host and time.monotonic() >= next_shm_sweep:
                await self._sweep_segments()
                next_shm_sweep = time.monotonic() + SHM_SWEEP_EVERY
            expired = self.store.expire(time.monotonic())
            metrics.STORE_BYTES.set(self.store.bytes_used)
            if expired:
                metrics.LEASES_EXPIRED.inc(len(expired))
                log.info("tensor_leases_expired", count=len(expired))
                self._notify_release()

    async def _sweep_segments(self) -> None:
        """Unlink the segments dead processes on this host left (the agent does it too; this covers
        hosts without one)."""
        swept = await asyncio.to_thread(shm.sweep_dead)
        if swept:
            log.info("shared_memory_segments_swept", count=len(swept))

    def _notify_release(self) -> None:
        if not len(self.store):
            self._drained.set()

    # -- owning ---------------------------------------------------------------

    def put(self, array: Any, lease: float | None = None) -> TensorRef:
        """Keep ``array`` here and describe it; its consumer pulls it (or it expires after ``lease`` s).

        With shared memory on, a CPU tensor is copied into a segment of this process (counted in
        ``store_bytes``; ``StoreFull`` also when /dev/shm is full) and a GPU one into an allocation
        with a CUDA IPC handle, so consumers on this host read it without a message."""
        memory_type = "GPU" if type(array).__module__.startswith("cupy") else "CPU"
        segment = ipc = ""
        if memory_type == "CPU":
            arr = np.asarray(array)
            dtype = tensors.triton_dtype(arr)
            data: Any = np.frombuffer(tensors.to_bytes(arr, dtype), dtype=np.uint8) if dtype == "BYTES" else \
                np.ascontiguousarray(arr)
            shape = tuple(arr.shape)
            nbytes = int(data.nbytes)
            self.store.check_room(nbytes)
            if self.host and nbytes:
                data = shm.Segment.create(data)
                segment = data.name
        else:
            data, dtype, shape = array, tensors.triton_dtype(array.get() if array.size == 0 else array[:0].get()), \
                tuple(array.shape)
            nbytes = int(data.nbytes)
            self.store.check_room(nbytes)
            if self.host and nbytes:
                try:
                    from tdist.data_plane import cuda_ipc

                    data, ipc = cuda_ipc.export(array)
                except Exception as exc:  # no IPC here (e.g. a driver without it): UCX serves it
                    log.info("cuda_ipc_export_failed", error=f"{type(exc).__name__}: {exc}")
        tensor_id = self.store.put(data, nbytes, time.monotonic(), lease)
        return TensorRef(self.component_id, self.address, tensor_id, dtype, shape, nbytes, memory_type,
                         int(getattr(getattr(array, "device", None), "id", 0) or 0), segment,
                         self.host if segment or ipc else "", ipc)

    def _data(self, tensor_id: str) -> Any:
        data = self.store.get(tensor_id)
        return data.array if isinstance(data, shm.Segment) else data

    def serve_get(self, tensor_id: str) -> Any:
        data = self._data(tensor_id)
        self.bytes_served += int(data.nbytes)
        metrics.DATA_PLANE_BYTES.labels("served").inc(int(data.nbytes))
        return data

    def serve_reference(self, tensor_id: str) -> str:
        return self.store.reference(tensor_id, time.monotonic())

    def serve_release(self, tensor_id: str) -> None:
        self.store.release(tensor_id)
        self._notify_release()

    # -- consuming ------------------------------------------------------------

    async def pull(self, ref: TensorRef, memory_type: str = "CPU", *, out: Any = None, zero_copy: bool = False
                   ) -> Any:
        """The tensor's value in ``memory_type`` ("CPU" gives numpy, "GPU" gives cupy).

        ``out``: a contiguous buffer of ``ref.nbytes`` bytes to receive into (reused memory). A late
        answer is discarded, but one already arriving when a pull times out finishes its write
        into ``out``: after ``PeerUnreachable`` give UCX a moment before reusing it.

        ``zero_copy`` (CPU, no ``out``): the caller accepts a read-only array that may be a view of
        the owner's shared-memory segment (no copy at all). It stays valid as long as the caller
        holds it, whatever happens to the reference or the owner; BYTES tensors are decoded anyway."""
        if memory_type == "GPU" and not gpu_available():
            raise DataPlaneError("GPU memory asked for, but this process has no usable GPU (cupy/CUDA)",
                                 tensor_id=ref.tensor_id)
        if out is not None and (out.nbytes != ref.nbytes or not out.flags.c_contiguous):
            raise DataPlaneError(f"receive buffer has {out.nbytes} bytes, the tensor {ref.nbytes}",
                                 tensor_id=ref.tensor_id)
        if ref.owner == self.component_id:
            raw = self._data(ref.tensor_id)
            if memory_type != "CPU":
                out = raw
            elif zero_copy and out is None:
                out = raw.view()
                out.flags.writeable = False
            elif out is None:
                out = np.array(raw, copy=True)
            else:
                self.copy(out.reshape(-1).view(np.uint8), raw.reshape(-1).view(np.uint8))
            self.pulls["local"] += 1
            return self._typed(out, ref)
        path = ""
        if ref.host and ref.host == self.host:
            if ref.segment and memory_type == "CPU":
                if zero_copy and out is None:
                    view = self.mappings.view(ref.segment, ref.nbytes)
                    if view is not None:
                        out, path = view, "shm"
                else:
                    if out is None:
                        out = self._empty(ref, memory_type)
                    if self.mappings.read(ref.segment, ref.nbytes, out):
                        path = "shm"
            elif ref.ipc and memory_type == "GPU":
                try:
                    from tdist.data_plane import cuda_ipc

                    out, path = cuda_ipc.read(ref.ipc, ref.nbytes, out), "ipc"
                except Exception as exc:  # another device, no access, the owner gone: UCX decides
                    log.info("cuda_ipc_read_failed", tensor_id=ref.tensor_id, error=f"{type(exc).__name__}: {exc}")
        if not path:
            self._check_owner(ref)
            if out is None:
                out = self._empty(ref, memory_type)
            assert self.transport is not None
            await self.transport.fetch(ref.address, ref.tensor_id, out, self.config.pull_timeout)
            path = "ucx"
        self.pulls[path] += 1
        self.bytes_pulled += ref.nbytes
        _PULLED_BYTES.inc(ref.nbytes)
        _PULLS[path].inc()
        return self._typed(out, ref)

    def _check_owner(self, ref: TensorRef) -> None:
        """``PeerUnreachable`` at once for an owner on this host whose process has exited (its pid
        is in its segment's name; same host identity means same pid namespace): UCX is not asked.
        Measured: UCX's first connection to a peer that is gone crashed the process about once in
        15 (SIGSEGV in ucp_tag_send_nbx on an endpoint UCX returned alive; ucxx 0.52, UCX 1.21),
        and same-host consumers make their first connection to an owner only now: to release, or
        when its segment is gone."""
        if ref.segment and ref.host and ref.host == self.host:
            pid = shm.owner_pid(ref.segment)
            if not shm.pid_alive(pid):
                raise PeerUnreachable(f"the owner of tensor {ref.tensor_id} on this host (pid {pid}) has exited",
                                      tensor_id=ref.tensor_id, owner=ref.owner)

    @staticmethod
    def _empty(ref: TensorRef, memory_type: str) -> Any:
        if memory_type == "GPU":
            import cupy  # type: ignore[import-not-found]

            return cupy.empty(ref.nbytes, dtype=cupy.uint8)
        return np.empty(ref.nbytes, dtype=np.uint8)

    @staticmethod
    def _typed(raw: Any, ref: TensorRef) -> Any:
        if ref.dtype == "BYTES":
            host = raw if isinstance(raw, np.ndarray) else raw.get()
            return tensors.from_bytes(host.tobytes(), "BYTES", ref.shape)
        flat = raw.reshape(-1).view(np.uint8) if hasattr(raw, "reshape") else raw
        return flat.view(tensors.TRITON_TO_NUMPY[ref.dtype].newbyteorder("<")).reshape(ref.shape)

    async def forward(self, ref: TensorRef) -> TensorRef:
        """A new reference for another consumer, created at the owner: no bytes move."""
        if ref.owner == self.component_id:
            new_id = self.serve_reference(ref.tensor_id)
        else:
            self._check_owner(ref)
            assert self.transport is not None
            new_id = await self.transport.command(ref.address, REFERENCE, ref.tensor_id, self.config.pull_timeout)
        return ref.with_id(new_id)

    async def release(self, ref: TensorRef) -> None:
        if ref.segment:
            self.mappings.forget(ref.segment)
        if ref.owner == self.component_id:
            self.serve_release(ref.tensor_id)
        else:
            self._check_owner(ref)
            assert self.transport is not None
            await self.transport.command(ref.address, RELEASE, ref.tensor_id, self.config.pull_timeout)

    async def release_quietly(self, refs: list[TensorRef]) -> None:
        """Release references we are done with; an owner that is gone already freed them."""
        for ref in refs:
            try:
                await self.release(ref)
            except TdistError as exc:
                log.info("release_failed", tensor_id=ref.tensor_id, owner=ref.owner, error=str(exc))

    # -- messages -------------------------------------------------------------

    async def outgoing(self, values: Mapping[str, Any], *, lease: float | None = None) -> dict[str, Any]:
        """Tensors for a message: small ones inline, large ones stored here (for ``lease`` s at most,
        unless released), received ones forwarded."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, TensorRef):
                out[name] = await self.forward(value)
            elif needs_reference(value, self.config.inline_threshold):
                out[name] = self.put(value, lease)
            else:
                out[name] = value
        return out

    async def materialize(self, values: Mapping[str, Any], memory_type: str = "CPU", *, release: bool = True,
                          zero_copy: bool = False) -> dict[str, Any]:
        """Pull every ``TensorRef`` in ``values`` (and release it, unless told not to); arrays pass through.
        ``zero_copy``: read-only views where the bytes are in shared memory (see ``pull``)."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, TensorRef):
                out[name] = await self.pull(value, memory_type, zero_copy=zero_copy)
                if release:
                    await self.release_quietly([value])
            else:
                out[name] = value
        return out


def _free(data: Any) -> None:
    """The store freed a buffer: its segment's name goes (readers keep what they mapped)."""
    if isinstance(data, shm.Segment):
        data.unlink()


class LazyDataPlane:
    """A process component's data plane, started on first use (UCX loads only when needed)."""

    def __init__(self, component_id: str, config: DataPlaneConfig) -> None:
        self.component_id = component_id
        self.config = config
        self.plane: DataPlane | None = None
        self._starting: asyncio.Task[DataPlane] | None = None

    async def get(self) -> DataPlane:
        if self.plane is not None:
            return self.plane
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(DataPlane(self.component_id, self.config).start())
        try:
            self.plane = await asyncio.shield(self._starting)
        except BaseException:
            self._starting = None
            raise
        return self.plane

    async def close(self, wait_for_release: float = 0.0) -> None:
        plane, self.plane = self.plane, None
        if plane is None and self._starting is not None:
            plane = await self._starting
        self._starting = None
        if plane is not None:
            await plane.close(wait_for_release)
