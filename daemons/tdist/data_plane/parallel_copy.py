"""Large copies split across threads: a same-host pull of a big tensor at memory speed.

One thread does not reach this machine's memory bandwidth once a copy no longer fits in the
last-level cache. Measured here (2 vCPUs, AMD EPYC, 32 MiB L3; ``np.copyto`` from a kept
/dev/shm mapping into a reused buffer, 3 alternated runs each):

=========  ===================  ====================
size       one thread (GB/s)    two threads (GB/s)
=========  ===================  ====================
1 MiB      42 to 45             13 to 21
4 MiB      42                   40 to 41
8 MiB      28 to 30             25
12 MiB     17 to 22             29 to 35
16 MiB     16 to 20             34 to 35
64 MiB     10 to 13             15 to 16
=========  ===================  ====================

So copies from :data:`PARALLEL_FROM` bytes on are cut into one page-aligned chunk per thread:
the calling thread copies the first, the others run on a small pool (numpy releases the GIL
while it copies), and the call returns once every chunk is done (or raises the first chunk's
error, after the others finished: the destination is never written after the call returned).
Smaller copies stay in the calling thread, where a hand-off would cost more than it saves.
Arrow's Plasma object store (once Ray's) does the same for large objects (``memcopy_threads``).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

PARALLEL_FROM = 16 << 20
"""Copies of this many bytes or more are split across threads (half the L3 here: below it a
second thread was no faster, table above)."""
_ALIGN = 4096


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a pinned worker counts only its own)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ParallelCopy:
    """Copies one contiguous byte array into another with up to ``threads`` threads (the
    caller's included; never more than the CPUs this process may use). ``close()`` stops the
    pool; copies after it run in the calling thread alone."""

    def __init__(self, threads: int, parallel_from: int = PARALLEL_FROM) -> None:
        self.threads = max(1, min(threads, usable_cpus()))
        self.parallel_from = max(parallel_from, 2 * _ALIGN)
        """At least two pages, so that a split copy always has a second chunk."""
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        """The process the pool belongs to: a forked child has none of its threads (a submit there
        would wait for ever), so it copies alone."""
        if self.threads > 1:  # its threads start on the first large copy
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads - 1, thread_name_prefix="tdist-copy")

    def __call__(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[:] = src`` for two 1-D uint8 arrays of one length."""
        nbytes = src.nbytes
        pool = self._pool
        if pool is None or nbytes < self.parallel_from or os.getpid() != self._pid:
            np.copyto(dst, src)
            return
        step = -(-nbytes // self.threads // _ALIGN) * _ALIGN
        others = [pool.submit(np.copyto, dst[start : start + step], src[start : start + step])
                  for start in range(step, nbytes, step)]
        try:
            np.copyto(dst[:step], src[:step])
        finally:
            concurrent.futures.wait(others)
        for chunk in others:
            chunk.result()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # nothing runs in it between calls: returns at once
