"""The agent reclaims the shared-memory segments of tdist processes that died on its host.

A process that exits normally unlinks its segments (data_plane/shm.py); one killed (SIGKILL,
OOM) leaves them in /dev/shm, which is memory. The agent sweeps at start and then every
``EVERY`` seconds of its tick: segments whose owner pid is not alive are unlinked. Readers
that still have one open or mapped keep their bytes; the kernel frees them after the last.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tdist.data_plane import shm
from tdist.logs import get_logger

log = get_logger("tdist.agent")

EVERY = 10.0
"""Seconds between sweeps (a sweep lists /dev/shm: well under a millisecond with hundreds of files)."""


class ShmSweeper:
    def __init__(self, directory: str = shm.SHM_DIR, every: float = EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.every = every
        self._clock = clock
        self._next = 0.0
        self.removed = 0

    def sweep(self) -> list[str]:
        """Sweep now; returns the names removed."""
        self._next = self._clock() + self.every
        removed = shm.sweep_dead(self.directory)
        if removed:
            self.removed += len(removed)
            log.info("shared_memory_segments_swept", count=len(removed), segments=removed[:10])
        return removed

    def tick(self) -> None:
        """Sweep if ``every`` seconds passed since the last sweep."""
        if self._clock() >= self._next:
            self.sweep()
