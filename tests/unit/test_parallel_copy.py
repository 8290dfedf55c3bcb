"""Large copies split across threads (data_plane/parallel_copy.py): same bytes as one
``np.copyto``, errors raised only after every chunk ended, a pool that stops."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from tdist.data_plane import parallel_copy
from tdist.data_plane.parallel_copy import ParallelCopy

SPLIT_FROM = 64 << 10
"""A low threshold, so that the tests copy little."""


@pytest.fixture
def copy() -> Iterator[ParallelCopy]:
    if parallel_copy.usable_cpus() < 2:
        pytest.skip("one usable CPU: ParallelCopy copies in the calling thread alone")
    c = ParallelCopy(2, parallel_from=SPLIT_FROM)
    try:
        yield c
    finally:
        c.close()


def copy_threads() -> set[threading.Thread]:
    """The copy pools' threads now alive (as objects: every pool numbers its threads from 0)."""
    return {t for t in threading.enumerate() if t.name.startswith("tdist-copy")}


def pattern(nbytes: int) -> np.ndarray:
    return (np.arange(nbytes) % 251).astype(np.uint8)


@pytest.mark.parametrize("nbytes", [0, 1, 4095, SPLIT_FROM - 1, SPLIT_FROM, SPLIT_FROM + 1, 3 * SPLIT_FROM + 17])
def test_every_size_copies_every_byte(copy: ParallelCopy, nbytes: int) -> None:
    src, dst = pattern(nbytes), np.zeros(nbytes, dtype=np.uint8)
    copy(dst, src)
    assert np.array_equal(dst, src)


def test_small_copies_stay_in_the_caller_and_large_ones_use_the_pool(copy: ParallelCopy) -> None:
    before = copy_threads()
    copy(np.zeros(SPLIT_FROM - 1, dtype=np.uint8), pattern(SPLIT_FROM - 1))
    assert copy_threads() == before  # the pool's threads start on its first submit
    copy(np.zeros(4 * SPLIT_FROM, dtype=np.uint8), pattern(4 * SPLIT_FROM))
    assert copy_threads() - before


def test_an_error_is_raised_after_every_chunk_ended(copy: ParallelCopy) -> None:
    dst = np.zeros(4 * SPLIT_FROM, dtype=np.uint8)
    dst.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        copy(dst, pattern(4 * SPLIT_FROM))
    src, out = pattern(4 * SPLIT_FROM), np.zeros(4 * SPLIT_FROM, dtype=np.uint8)
    copy(out, src)  # the pool still works
    assert np.array_equal(out, src)


def test_after_close_copies_run_in_the_caller() -> None:
    c = ParallelCopy(2, parallel_from=SPLIT_FROM)
    c.close()
    c.close()
    src, dst = pattern(4 * SPLIT_FROM), np.zeros(4 * SPLIT_FROM, dtype=np.uint8)
    c(dst, src)
    assert np.array_equal(dst, src)


def test_never_more_threads_than_usable_cpus() -> None:
    c = ParallelCopy(64)
    try:
        assert 1 <= c.threads <= parallel_copy.usable_cpus()
    finally:
        c.close()
    single = ParallelCopy(1, parallel_from=0)
    src, dst = pattern(3 * 4096), np.zeros(3 * 4096, dtype=np.uint8)
    single(dst, src)
    assert np.array_equal(dst, src)
    single.close()


def test_a_forked_child_copies_alone(copy: ParallelCopy) -> None:
    """The pool's threads do not exist in a forked child: there a large copy must not wait for them."""
    copy(np.zeros(4 * SPLIT_FROM, dtype=np.uint8), pattern(4 * SPLIT_FROM))  # the parent's pool has started
    done = 0
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the copy returns with the right bytes
        try:
            src, dst = pattern(4 * SPLIT_FROM), np.zeros(4 * SPLIT_FROM, dtype=np.uint8)
            copy(dst, src)
            os._exit(0 if np.array_equal(dst, src) else 1)
        finally:
            os._exit(2)
    try:
        for _ in range(200):  # up to 20 s: a copy that waits for a missing thread never returns
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.1)
        else:
            raise AssertionError("the forked child's copy hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
