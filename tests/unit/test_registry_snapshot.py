"""The registry's snapshot reader (pure logic over a watcher's ``updates``): nats-py's end-of-snapshot
marker may come before an entry already on its way; the snapshot reads up to the bucket's last
revision anyway, and gives up on it only after a short wait."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from tdist.registry import read_snapshot


@dataclass
class Entry:
    key: str
    revision: int


def scripted(*items: Any):  # type: ignore[no-untyped-def]
    """A watcher's ``updates``: the items in order, then nats' timeout (nothing more came)."""
    queue = list(items)
    waits: list[float] = []

    async def updates(timeout: float) -> Any:
        waits.append(timeout)
        if not queue:
            raise NatsTimeoutError
        return queue.pop(0)

    updates.waits = waits  # type: ignore[attr-defined]
    return updates


async def test_entries_then_the_marker() -> None:
    a, b = Entry("a", 1), Entry("b", 2)
    assert await read_snapshot(scripted(a, b, None), last=2) == [a, b]


async def test_an_entry_that_comes_after_the_marker_is_in_the_snapshot() -> None:
    late = Entry("w1", 7)
    assert await read_snapshot(scripted(None, late), last=7) == [late]


async def test_an_empty_bucket_ends_at_the_marker() -> None:
    updates = scripted(None)
    assert await read_snapshot(updates, last=0) == []
    assert len(updates.waits) == 1


async def test_a_last_revision_that_never_comes_is_waited_for_briefly() -> None:
    early = Entry("a", 3)
    updates = scripted(early, None)
    assert await read_snapshot(updates, last=9) == [early]
    assert updates.waits[-1] < updates.waits[0]  # the short wait after the marker, not the first one


async def test_no_marker_at_all_is_an_error() -> None:
    with pytest.raises(NatsTimeoutError):
        await read_snapshot(scripted(Entry("a", 1)), last=1)
