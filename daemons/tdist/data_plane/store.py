"""A process's tensor store: the tensors it owns, by reference id, bounded in bytes.

A tensor lives once (a *buffer*) and may have several references (ids handed to
consumers). Each reference is released explicitly by its consumer, or expires
when its lease runs out (the backstop for consumers that die). A buffer is freed
when its last reference goes (``on_free`` is told, e.g. to unlink its shared-memory segment).
Pure bookkeeping: no I/O, no clock of its own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from tdist.errors import StoreFull, TensorNotFound


def new_tensor_id() -> str:
    return secrets.token_hex(16)


@dataclass
class _Buffer:
    data: Any
    """What the plane stores: a C-contiguous numpy or cupy array, or a shared-memory segment."""
    nbytes: int
    refs: set[str] = field(default_factory=set)


@dataclass
class _Ref:
    buffer_id: str
    expires_at: float


class TensorStore:
    def __init__(self, capacity_bytes: int, default_lease: float,
                 on_free: Callable[[Any], None] | None = None) -> None:
        if capacity_bytes <= 0 or default_lease <= 0:
            raise ValueError("capacity_bytes and default_lease must be positive")
        self.capacity_bytes = capacity_bytes
        self.default_lease = default_lease
        self._on_free = on_free
        self._buffers: dict[str, _Buffer] = {}
        self._refs: dict[str, _Ref] = {}
        self.bytes_used = 0

    def __len__(self) -> int:
        """Live references."""
        return len(self._refs)

    def __contains__(self, ref_id: object) -> bool:
        return ref_id in self._refs

    @property
    def buffers(self) -> int:
        return len(self._buffers)

    def check_room(self, nbytes: int) -> None:
        """``StoreFull`` unless ``nbytes`` more fit (``put`` checks too; this is for before making the data)."""
        if self.bytes_used + nbytes > self.capacity_bytes:
            raise StoreFull(
                f"tensor store is full: {self.bytes_used} of {self.capacity_bytes} bytes used, {nbytes} more asked",
                used=self.bytes_used, capacity=self.capacity_bytes, asked=nbytes,
            )

    def put(self, data: Any, nbytes: int, now: float, lease: float | None = None) -> str:
        """Store a tensor; returns the id of its first reference."""
        self.check_room(nbytes)
        buffer_id = new_tensor_id()
        self._buffers[buffer_id] = _Buffer(data, nbytes)
        self.bytes_used += nbytes
        return self._add_ref(buffer_id, now, lease)

    def _add_ref(self, buffer_id: str, now: float, lease: float | None) -> str:
        ref_id = new_tensor_id()
        self._refs[ref_id] = _Ref(buffer_id, now + (lease or self.default_lease))
        self._buffers[buffer_id].refs.add(ref_id)
        return ref_id

    def _ref(self, ref_id: str) -> _Ref:
        ref = self._refs.get(ref_id)
        if ref is None:
            raise TensorNotFound(f"no tensor {ref_id} here (never stored, released or expired)", tensor_id=ref_id)
        return ref

    def get(self, ref_id: str) -> Any:
        return self._buffers[self._ref(ref_id).buffer_id].data

    def nbytes(self, ref_id: str) -> int:
        return self._buffers[self._ref(ref_id).buffer_id].nbytes

    def reference(self, ref_id: str, now: float, lease: float | None = None) -> str:
        """A new reference to the same tensor (forwarding: no bytes move)."""
        return self._add_ref(self._ref(ref_id).buffer_id, now, lease)

    def renew(self, ref_id: str, now: float, lease: float | None = None) -> None:
        ref = self._ref(ref_id)
        ref.expires_at = max(ref.expires_at, now + (lease or self.default_lease))

    def release(self, ref_id: str) -> None:
        ref = self._ref(ref_id)
        del self._refs[ref_id]
        buf = self._buffers[ref.buffer_id]
        buf.refs.discard(ref_id)
        if not buf.refs:
            del self._buffers[ref.buffer_id]
            self.bytes_used -= buf.nbytes
            if self._on_free is not None:
                self._on_free(buf.data)

    def expire(self, now: float) -> list[str]:
        """Release every reference whose lease ran out; returns their ids."""
        gone = [ref_id for ref_id, ref in self._refs.items() if ref.expires_at <= now]
        for ref_id in gone:
            self.release(ref_id)
        return gone

    def clear(self) -> int:
        """Release every reference (the store's owner stops serving); returns how many there were."""
        refs = list(self._refs)
        for ref_id in refs:
            self.release(ref_id)
        return len(refs)
