"""A worker's recent final responses, to answer a repeated request id without running it again.

A caller re-sends a request (same id, new message id) when its final response was
published while it was disconnected from NATS. The worker that ran it finds the
encoded final here and sends it again. Bounded in count, bytes and age; pure
bookkeeping (the clock is the caller's).

``put`` is on every request's path: the age limit is enforced on every
``TRIM_EVERY``-th put (``get`` checks the age itself), the count and byte limits
as soon as they are passed (about 0.4 µs per put at the 10,000-entry cap here).
"""

from __future__ import annotations

from collections import OrderedDict

MAX_ENTRIES = 10_000
MAX_BYTES = 64 << 20
TTL = 300.0
TRIM_EVERY = 64


class FinalResponses:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES, ttl: float = TTL) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0
        self._puts = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, request_id: str, encoded: bytes, now: float) -> None:
        """Keep one request's encoded final response (one too large for the budget is not kept)."""
        if len(encoded) > self.max_bytes:
            return
        old = self._entries.pop(request_id, None)
        if old is not None:
            self.bytes -= len(old[0])
        self._entries[request_id] = (encoded, now)
        self.bytes += len(encoded)
        self._puts += 1
        entries = self._entries
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:  # the oldest go first
            self.bytes -= len(entries.popitem(last=False)[1][0])
        if self._puts % TRIM_EVERY == 0:
            self._trim(now)

    def get(self, request_id: str, now: float) -> bytes | None:
        entry = self._entries.get(request_id)
        if entry is None or now - entry[1] > self.ttl:
            return None
        return entry[0]

    def _trim(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (encoded, at) = next(iter(entries.items()))
            if len(entries) <= self.max_entries and self.bytes <= self.max_bytes and now - at <= self.ttl:
                return
            del entries[key]
            self.bytes -= len(encoded)
