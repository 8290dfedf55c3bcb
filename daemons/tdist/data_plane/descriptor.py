"""Tensor descriptors: what a message carries instead of a large tensor's bytes (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tdist import tensors
from tdist.errors import InvalidRequest

MEMORY_TYPES = ("CPU", "GPU")
MAX_DEVICE_ID = 1023
MAX_ADDRESS_CHARS = 8192
"""A data-plane address is a base64 UCX worker address (a few hundred bytes here); far longer is garbage."""
_OWNER = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Component ids: worker ids are 1-64 of [A-Za-z0-9_-], client ids ``client-<hex>``."""
_TENSOR_ID = re.compile(r"[0-9a-f]{32}")
"""Tensor ids are 16 random bytes in lowercase hex (``store.new_tensor_id``)."""
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
SEGMENT_NAME = re.compile(r"tdist-([1-9][0-9]{0,9})-[0-9a-f]{32}")
"""A shared-memory segment (``shm.Segment``): ``tdist-<owner pid>-<16 random bytes in hex>``, a plain
file name in /dev/shm (no path separator can match)."""
HOST_ID = re.compile(r"[0-9a-f]{32}")
"""``shm.host_identity``: 16 bytes of a digest in lowercase hex."""
IPC_HANDLE_BYTES = 64
"""``cudaIpcMemHandle_t``."""
_IPC_HANDLE = re.compile(r"[A-Za-z0-9+/]{86}==")


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor held by another process (its *owner*), pulled on demand over the data plane.

    Each ``TensorRef`` is one reference at the owner: its holder must ``release`` it
    (or let its lease run out). Forwarding it creates a new reference at the owner.
    """

    owner: str
    """Component id of the process holding the bytes."""
    address: str
    """The owner's data-plane address (opaque to everyone but the transport)."""
    tensor_id: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    memory_type: str = "CPU"
    device_id: int = 0
    segment: str = ""
    """The owner's shared-memory segment holding the bytes (CPU), readable on the owner's host."""
    host: str = ""
    """The owner's host identity (``shm.host_identity``): a consumer with the same one may read
    ``segment`` or open ``ipc``; any other pulls over UCX."""
    ipc: str = ""
    """A CUDA IPC memory handle of the bytes (GPU), base64, usable on the owner's host."""

    @property
    def size(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    def wire(self) -> dict[str, Any]:
        """The descriptor fields that travel in a message header (the address travels once per owner)."""
        out: dict[str, Any] = {"ref": self.tensor_id, "owner": self.owner}
        if self.memory_type != "CPU" or self.device_id:
            out.update(mem=self.memory_type, dev=self.device_id)
        if self.host and (self.segment or self.ipc):
            out["host"] = self.host
            if self.segment:
                out["shm"] = self.segment
            if self.ipc:
                out["ipc"] = self.ipc
        return out

    @classmethod
    def from_wire(cls, meta: Any, dtype: Any, shape: Any, nbytes: Any, peers: Any) -> TensorRef:
        """A descriptor from a message header, checked field by field: ``InvalidRequest`` names the
        first field that is wrong. The dtype must be known, the shape sane, the byte size agree
        with them (fixed-size dtypes) and the ids and address look like what this code makes."""
        if not isinstance(meta, dict):
            raise InvalidRequest(f"reference descriptor is not an object: {meta!r:.80}")
        if not isinstance(dtype, str) or dtype not in tensors.TRITON_TO_NUMPY:
            raise InvalidRequest(f"unknown Triton dtype {dtype!r:.40}")
        count = tensors.check_shape(shape)
        if type(nbytes) is not int or nbytes < 0:
            raise InvalidRequest(f"byte size {nbytes!r:.40} is not a non-negative integer")
        if dtype == "BYTES":
            if nbytes < 4 * count:  # each element has a 4-byte length
                raise InvalidRequest(f"BYTES{list(shape)} needs at least {4 * count} bytes, the descriptor says {nbytes}")
        elif nbytes != count * tensors.TRITON_TO_NUMPY[dtype].itemsize:
            raise InvalidRequest(f"{dtype}{list(shape)} has {count * tensors.TRITON_TO_NUMPY[dtype].itemsize} bytes, "
                                 f"the descriptor says {nbytes}")
        owner, tensor_id = meta.get("owner"), meta.get("ref")
        if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
            raise InvalidRequest(f"owner {owner!r:.80} is not a component id")
        if not isinstance(tensor_id, str) or not _TENSOR_ID.fullmatch(tensor_id):
            raise InvalidRequest(f"tensor id {tensor_id!r:.80} is not 32 lowercase hex digits")
        memory_type = meta.get("mem", "CPU")
        if memory_type not in MEMORY_TYPES:
            raise InvalidRequest(f"unknown memory type {memory_type!r:.40}")
        device_id = meta.get("dev", 0)
        if type(device_id) is not int or not 0 <= device_id <= MAX_DEVICE_ID:
            raise InvalidRequest(f"device id {device_id!r:.40} is not an integer in 0..{MAX_DEVICE_ID}")
        segment, host, ipc = meta.get("shm", ""), meta.get("host", ""), meta.get("ipc", "")
        if not isinstance(segment, str) or (segment and not SEGMENT_NAME.fullmatch(segment)):
            raise InvalidRequest(f"shared-memory segment {segment!r:.80} is not a tdist segment name")
        if not isinstance(ipc, str) or (ipc and not _IPC_HANDLE.fullmatch(ipc)):
            raise InvalidRequest(f"CUDA IPC handle {ipc!r:.80} is not {IPC_HANDLE_BYTES} bytes in base64")
        if not isinstance(host, str) or (host and not HOST_ID.fullmatch(host)):
            raise InvalidRequest(f"host identity {host!r:.80} is not 32 lowercase hex digits")
        if bool(host) != bool(segment or ipc):
            raise InvalidRequest("a host identity comes with a segment or an IPC handle, and they with it")
        if segment and (memory_type != "CPU" or nbytes == 0):
            raise InvalidRequest("a shared-memory segment holds CPU bytes, at least one")
        if ipc and (memory_type != "GPU" or nbytes == 0):
            raise InvalidRequest("a CUDA IPC handle is for GPU bytes, at least one")
        address = peers.get(owner) if isinstance(peers, dict) else None
        if (not isinstance(address, str) or len(address) > MAX_ADDRESS_CHARS or len(address) % 4
                or not _BASE64.fullmatch(address)):
            raise InvalidRequest(f"no valid data-plane address for owner {owner!r} in the message's peers")
        return cls(owner, address, tensor_id, dtype, tuple(int(d) for d in shape), nbytes, memory_type, device_id,
                   segment, host, ipc)

    def with_id(self, tensor_id: str) -> TensorRef:
        """The same tensor under another reference id (forwarding)."""
        return TensorRef(self.owner, self.address, tensor_id, self.dtype, self.shape, self.nbytes, self.memory_type,
                         self.device_id, self.segment, self.host, self.ipc)
