"""The caller's deadline heap: waiters are woken at their deadlines (an earlier deadline added
later re-arms the one timer), never before, and finished requests do not pile up in the heap."""

from __future__ import annotations

import asyncio
import time

from tdist.request_plane.caller import _Deadlines, _Pending


async def test_waiters_wake_at_their_deadlines_in_order() -> None:
    live: dict[str, _Pending] = {}
    deadlines = _Deadlines(live)
    loop = asyncio.get_running_loop()
    woken: dict[str, float] = {}
    start = time.time()
    try:
        for name, after in (("late", 0.4), ("early", 0.1), ("middle", 0.25)):
            pending = live[name] = _Pending(name, "op", deadline=start + after)
            pending.waiter = loop.create_future()
            pending.waiter.add_done_callback(lambda _, n=name: woken.setdefault(n, time.time()))
            deadlines.add(pending)
        await asyncio.wait_for(asyncio.gather(*(p.waiter for p in live.values() if p.waiter)), 5)
        assert sorted(woken, key=woken.__getitem__) == ["early", "middle", "late"]
        for name, pending in live.items():
            assert woken[name] >= pending.deadline, name  # never before its deadline
    finally:
        deadlines.close()


async def test_finished_requests_do_not_pile_up() -> None:
    live: dict[str, _Pending] = {}
    deadlines = _Deadlines(live)
    try:
        far = time.time() + 3600
        for i in range(5000):
            live[str(i)] = pending = _Pending(str(i), "op", deadline=far + i)
            deadlines.add(pending)
            if i >= 10:
                del live[str(i - 10)]  # finished: only the last 10 are still tracked
        assert len(deadlines._heap) <= 2 * len(live) + 65
    finally:
        deadlines.close()
