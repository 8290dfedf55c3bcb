"""TensorStore bookkeeping: references, release, leases, the byte bound."""

from __future__ import annotations

import numpy as np
import pytest

from tdist.data_plane.store import TensorStore
from tdist.errors import StoreFull, TensorNotFound


def test_put_get_release_frees_bytes() -> None:
    store = TensorStore(1000, default_lease=10)
    a = np.arange(10, dtype=np.int64)
    ref = store.put(a, a.nbytes, now=0)
    assert store.get(ref) is a and store.bytes_used == 80 and len(store) == 1
    store.release(ref)
    assert store.bytes_used == 0 and len(store) == 0 and store.buffers == 0
    with pytest.raises(TensorNotFound):
        store.get(ref)
    with pytest.raises(TensorNotFound):
        store.release(ref)


def test_references_share_one_buffer_until_the_last_release() -> None:
    store = TensorStore(1000, default_lease=10)
    first = store.put(b"x" * 100, 100, now=0)
    second = store.reference(first, now=0)
    assert first != second and store.buffers == 1 and store.bytes_used == 100
    store.release(first)
    assert store.get(second) == b"x" * 100 and store.bytes_used == 100
    store.release(second)
    assert store.bytes_used == 0 and store.buffers == 0


def test_leases_expire_references() -> None:
    store = TensorStore(1000, default_lease=5)
    keep = store.put(b"a", 1, now=0, lease=100)
    gone = store.put(b"b", 1, now=0)
    assert store.expire(now=4.9) == []
    assert store.expire(now=5.0) == [gone]
    assert keep in store and gone not in store
    store.renew(keep, now=99, lease=50)
    assert store.expire(now=120) == [] and store.expire(now=149) == [keep]


def test_store_is_bounded_in_bytes() -> None:
    store = TensorStore(100, default_lease=10)
    store.put(b"", 60, now=0)
    with pytest.raises(StoreFull) as info:
        store.put(b"", 41, now=0)
    assert info.value.details == {"used": 60, "capacity": 100, "asked": 41}
    store.put(b"", 40, now=0)  # exactly full is fine
    assert store.bytes_used == 100


def test_on_free_sees_each_buffer_once_when_its_last_reference_goes() -> None:
    freed: list[object] = []
    store = TensorStore(1000, default_lease=10, on_free=freed.append)
    first = store.put("a", 100, now=0)
    second = store.reference(first, now=0)
    _other = store.put("b", 100, now=0, lease=1)
    store.release(first)
    assert freed == []
    store.release(second)
    assert freed == ["a"]
    store.expire(now=5)
    assert freed == ["a", "b"] and store.bytes_used == 0


def test_check_room_and_clear() -> None:
    freed: list[object] = []
    store = TensorStore(100, default_lease=10, on_free=freed.append)
    store.check_room(100)
    ref = store.put("a", 60, now=0)
    store.reference(ref, now=0)
    with pytest.raises(StoreFull):
        store.check_room(41)
    store.put("b", 40, now=0)
    assert store.clear() == 3
    assert sorted(freed) == ["a", "b"] and len(store) == 0 and store.bytes_used == 0 and store.buffers == 0
