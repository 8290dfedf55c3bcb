"""Same-host GPU tensors through CUDA IPC handles (cupy), on the descriptor path of shared memory.

The owner copies a GPU tensor it stores by reference into an allocation of its own made with
``cudaMalloc`` (not cupy's pool: an IPC handle names a whole allocation, so the bytes start at
its base) and puts the handle in the descriptor; a consumer on the same host (``shm.host_identity``)
with the same device visible opens the handle, copies the bytes into its own memory and closes
the handle at once, so no consumer keeps the owner's memory mapped. Any failure (another GPU, no
access, an owner that died: CUDA then refuses the handle) sends the pull to UCX.

Tested only up to the point a GPU is needed: this machine has none.
"""

from __future__ import annotations

import base64
from typing import Any


def export(array: Any) -> tuple[Any, str]:
    """(a copy of ``array``'s bytes in an IPC-exportable allocation, its handle in base64)."""
    import cupy  # type: ignore[import-not-found]

    nbytes = int(array.nbytes)
    memory = cupy.cuda.Memory(nbytes)  # cudaMalloc: offset 0 in its allocation
    data = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
    data[...] = cupy.ascontiguousarray(array).reshape(-1).view(cupy.uint8)
    handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr))
    return data, base64.b64encode(handle).decode()


def read(handle: str, nbytes: int, out: Any = None) -> Any:
    """The bytes behind ``handle`` copied into ``out`` (or a new cupy uint8 array) on this process's
    current device (the owner's device numbering may differ from ours); raises on any failure
    (the caller falls back to UCX)."""
    import cupy  # type: ignore[import-not-found]

    ptr = cupy.cuda.runtime.ipcOpenMemHandle(base64.b64decode(handle, validate=True))
    try:
        src = cupy.ndarray((nbytes,), dtype=cupy.uint8,
                           memptr=cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, nbytes, None), 0))
        if out is None:
            out = cupy.empty(nbytes, dtype=cupy.uint8)
        out.reshape(-1).view(cupy.uint8)[...] = src
        cupy.cuda.runtime.deviceSynchronize()  # the copy is done before the handle closes
    finally:
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)
    return out
