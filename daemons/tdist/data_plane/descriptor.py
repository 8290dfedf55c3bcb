"""Tensor descriptors: what a message carries instead of a large tensor's bytes (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MEMORY_TYPES = ("CPU", "GPU")


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
        return out

    @classmethod
    def from_wire(cls, meta: dict[str, Any], dtype: str, shape: tuple[int, ...], nbytes: int,
                  peers: dict[str, str]) -> TensorRef:
        owner = str(meta["owner"])
        memory_type = str(meta.get("mem", "CPU"))
        if memory_type not in MEMORY_TYPES:
            raise ValueError(f"unknown memory type {memory_type!r}")
        return cls(owner, str(peers[owner]), str(meta["ref"]), dtype, shape, nbytes, memory_type,
                   int(meta.get("dev", 0)))
