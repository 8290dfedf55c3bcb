"""Shared-memory segments (data_plane/shm.py) on real files: creation, reads, mappings, the sweep."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tdist.data_plane import shm
from tdist.data_plane.descriptor import HOST_ID, SEGMENT_NAME
from tdist.data_plane.parallel_copy import ParallelCopy
from tdist.errors import DataPlaneError, StoreFull


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[str]:
    """A directory on /dev/shm's tmpfs when it is there (as in use), else a temporary one."""
    base = Path(shm.SHM_DIR)
    if base.is_dir() and os.access(base, os.W_OK):
        d = base / f"tdist-test-{os.getpid()}-{tmp_path.name}"
        d.mkdir(mode=0o700)
        try:
            yield str(d)
        finally:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    else:
        yield str(tmp_path)


def data(nbytes: int) -> np.ndarray:
    return (np.arange(nbytes) % 251).astype(np.uint8)


def test_a_segment_is_a_private_file_named_for_its_owner(shm_dir: str) -> None:
    seg = shm.Segment.create(data(1000), shm_dir)
    path = Path(shm_dir, seg.name)
    match = SEGMENT_NAME.fullmatch(seg.name)
    assert match is not None and int(match.group(1)) == os.getpid()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1000
    assert path.read_bytes() == data(1000).tobytes()
    assert not seg.array.flags.writeable and np.array_equal(seg.array, data(1000))
    seg.unlink()
    assert not path.exists()
    assert np.array_equal(seg.array, data(1000))  # the owner's mapping outlives the name
    seg.unlink()  # twice is fine


def test_reads_copy_first_then_map_and_never_read_a_freed_segment(shm_dir: str) -> None:
    seg = shm.Segment.create(data(1 << 20), shm_dir)
    maps = shm.Mappings(1 << 30, shm_dir)
    out = np.zeros(1 << 20, dtype=np.uint8)
    assert maps.read(seg.name, 1 << 20, out) and np.array_equal(out, data(1 << 20))
    assert len(maps) == 0  # the first read copies (preadv), maps nothing
    out[:] = 0
    assert maps.read(seg.name, 1 << 20, out) and np.array_equal(out, data(1 << 20))
    assert len(maps) == 1 and maps.bytes_mapped == 1 << 20  # read again: mapped and kept
    out[:] = 0
    assert maps.read(seg.name, 1 << 20, out) and np.array_equal(out, data(1 << 20))
    seg.unlink()
    assert not maps.read(seg.name, 1 << 20, out)  # the kept mapping is not used once the name is gone
    assert len(maps) == 0 and maps.bytes_mapped == 0


def test_a_zero_copy_view_is_read_only_and_outlives_the_segment(shm_dir: str) -> None:
    seg = shm.Segment.create(data(4096), shm_dir)
    maps = shm.Mappings(1 << 30, shm_dir)
    view = maps.view(seg.name, 4096)
    assert view is not None and not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1
    seg.unlink()
    maps.forget(seg.name)
    assert np.array_equal(view, data(4096))
    assert maps.view(seg.name, 4096) is None


def test_what_cannot_be_read_is_refused_not_guessed(shm_dir: str) -> None:
    seg = shm.Segment.create(data(4096), shm_dir)
    maps = shm.Mappings(1 << 30, shm_dir)
    out = np.zeros(4096, dtype=np.uint8)
    assert not maps.read(seg.name, 4095, out[:4095])  # the descriptor's size disagrees with the file
    assert maps.view(seg.name, 8192) is None
    assert not maps.read("tdist-1-" + "0" * 32, 4096, out)  # no such segment
    with pytest.raises(DataPlaneError, match="not a segment name"):
        maps.read("../passwd", 4096, out)
    os.mkdir(os.path.join(shm_dir, "tdist-2-" + "0" * 32))
    assert not maps.read("tdist-2-" + "0" * 32, 4096, out)  # not a regular file
    os.rmdir(os.path.join(shm_dir, "tdist-2-" + "0" * 32))
    seg.unlink()


def test_a_large_segment_is_mapped_from_its_first_read(shm_dir: str) -> None:
    seg = shm.Segment.create(data(shm.MAP_FIRST_BYTES), shm_dir)
    copy = ParallelCopy(2)  # what the data plane reads with: large copies split across threads
    maps = shm.Mappings(1 << 30, shm_dir, copy=copy)
    try:
        for _ in range(2):  # the first read maps, the second reads the kept mapping
            out = np.zeros(shm.MAP_FIRST_BYTES, dtype=np.uint8)
            assert maps.read(seg.name, shm.MAP_FIRST_BYTES, out) and np.array_equal(out, data(shm.MAP_FIRST_BYTES))
            assert len(maps) == 1
    finally:
        copy.close()
        seg.unlink()


def test_a_large_segment_beyond_the_cache_is_read_but_not_kept(shm_dir: str) -> None:
    seg = shm.Segment.create(data(shm.MAP_FIRST_BYTES), shm_dir)
    copy = ParallelCopy(2)
    maps = shm.Mappings(shm.MAP_FIRST_BYTES - 1, shm_dir, copy=copy)  # too small to keep it
    try:
        for _ in range(2):
            out = np.zeros(shm.MAP_FIRST_BYTES, dtype=np.uint8)
            assert maps.read(seg.name, shm.MAP_FIRST_BYTES, out) and np.array_equal(out, data(shm.MAP_FIRST_BYTES))
            assert len(maps) == 0 and maps.bytes_mapped == 0
    finally:
        copy.close()
        seg.unlink()


def test_kept_mappings_are_bounded_in_bytes(shm_dir: str) -> None:
    segs = [shm.Segment.create(data(4096), shm_dir) for _ in range(4)]
    maps = shm.Mappings(3 * 4096, shm_dir)
    out = np.zeros(4096, dtype=np.uint8)
    for seg in segs:
        for _ in range(2):
            assert maps.read(seg.name, 4096, out)
    assert len(maps) == 3 and maps.bytes_mapped == 3 * 4096
    maps.clear()
    assert len(maps) == 0 and maps.bytes_mapped == 0
    for seg in segs:
        seg.unlink()


def test_the_sweep_removes_dead_processes_segments_only(shm_dir: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {who: f"tdist-{pid}-{os.urandom(16).hex()}"
                 for who, pid in (("dead", dead.pid), ("live", live.pid), ("me", os.getpid()))}
        other = "tdist_triton_1_abc"  # somebody else's naming: never touched
        for name in (*names.values(), other):
            Path(shm_dir, name).write_bytes(b"x")
        assert shm.sweep_dead(shm_dir) == [names["dead"]]
        assert sorted(os.listdir(shm_dir)) == sorted([names["live"], names["me"], other])
    finally:
        live.communicate(b"", timeout=30)
        for name in os.listdir(shm_dir):
            os.unlink(os.path.join(shm_dir, name))


def test_host_identity_is_stable_hex() -> None:
    ident = shm.host_identity()
    assert HOST_ID.fullmatch(ident) and shm.host_identity() == ident


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_tmpfs_is_store_full_and_leaves_nothing(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=1777", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(StoreFull, match="has no room for a tensor of 1048576 bytes"):
            shm.Segment.create(data(1 << 20), str(small))
        assert os.listdir(small) == []
        seg = shm.Segment.create(data(4096), str(small))  # what fits still works
        seg.unlink()
        del seg  # its mapping keeps the mount busy
        gc.collect()
    finally:
        if subprocess.run(["umount", str(small)]).returncode:
            subprocess.run(["umount", "--lazy", str(small)], check=True)
