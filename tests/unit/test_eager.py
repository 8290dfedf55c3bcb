"""``tdist.eager.start_inline``: the first step runs before it returns, with no current task and
in its own context; what waits continues in a task, which can be cancelled like any task.
``start_now``: the same, but with the coroutine's own task created first and current during the
step, so timeouts bind to it; its outcome is the task's, however the step ended."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tdist.eager import start_inline, start_now

TAG: contextvars.ContextVar[str] = contextvars.ContextVar("TAG", default="outer")


async def test_a_coroutine_that_does_not_wait_finishes_before_start_inline_returns() -> None:
    seen: list[object] = []

    async def quick() -> None:
        seen.append(asyncio.current_task())
        TAG.set("inner")

    caller = asyncio.current_task()
    assert start_inline(quick()) is None
    assert seen == [None]  # no task is current in the inline step ...
    assert asyncio.current_task() is caller  # ... and the caller's is current again after it
    assert TAG.get() == "outer"  # the step ran in a copy of the context


async def test_the_rest_after_a_wait_runs_in_a_task_in_the_same_context() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[tuple[str, object, str]] = []

    async def waits() -> None:
        TAG.set("inner")
        steps.append(("first", asyncio.current_task(), TAG.get()))
        value = await gate
        steps.append((f"rest {value}", asyncio.current_task(), TAG.get()))

    task = start_inline(waits())
    assert task is not None
    assert steps == [("first", None, "inner")]
    await asyncio.sleep(0)
    assert len(steps) == 1  # still waiting for the gate
    gate.set_result(7)
    await task
    assert steps[1] == ("rest 7", task, "inner")
    assert TAG.get() == "outer"


async def test_a_bare_yield_continues_in_the_task() -> None:
    steps: list[str] = []

    async def yields() -> None:
        steps.append("first")
        await asyncio.sleep(0)
        steps.append("rest")

    task = start_inline(yields())
    assert task is not None and steps == ["first"]
    await task
    assert steps == ["first", "rest"]


@pytest.mark.parametrize("start", [start_inline, start_now])
async def test_cancelling_before_the_tasks_first_step_interrupts_the_wait_and_cancels_its_future(
        start: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None] | None]) -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def waits() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            outcome.append("cancelled at the wait")
            raise

    task = start(waits())
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled at the wait"]
    assert gate.cancelled()


async def test_cancelling_later_works_as_for_any_task() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        await gate

    task = start_inline(waits())
    assert task is not None
    await asyncio.sleep(0)  # the task's first step ran: it waits on the gate itself now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.cancelled()


async def test_an_error_in_the_first_step_is_raised_from_start_inline() -> None:
    async def fails() -> None:
        raise ValueError("bad")

    caller = asyncio.current_task()
    with pytest.raises(ValueError, match="bad"):
        start_inline(fails())
    assert asyncio.current_task() is caller


async def test_timeouts_cannot_bind_to_the_task_that_started_the_step() -> None:
    """``asyncio.timeout`` before the first wait raises instead of binding to the caller's task
    (which it would cancel when it expires)."""
    async def times_out() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    caller = asyncio.current_task()
    with pytest.raises(RuntimeError):
        start_inline(times_out())
    assert caller is not None and caller.cancelling() == 0  # no timeout was armed against it


# -- start_now: the first step at once, with its own task current -------------------------------


async def test_start_now_runs_the_first_step_at_once_with_its_task_current() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[tuple[str, object, str]] = []

    async def waits() -> None:
        TAG.set("inner")
        steps.append(("first", asyncio.current_task(), TAG.get()))
        async with asyncio.timeout(10):  # binds to its own task, not to the one that started it
            value = await gate
        steps.append((f"rest {value}", asyncio.current_task(), TAG.get()))

    caller = asyncio.current_task()
    task = start_now(waits())
    assert steps == [("first", task, "inner")]
    assert asyncio.current_task() is caller and TAG.get() == "outer"
    gate.set_result(3)
    await task
    assert steps[1] == ("rest 3", task, "inner")


async def test_start_now_of_a_coroutine_that_does_not_wait_gives_a_task_with_its_outcome() -> None:
    async def quick() -> None:
        TAG.set("inner")

    async def fails() -> None:
        raise ValueError("no")

    done = start_now(quick())
    await done
    assert done.done() and done.exception() is None
    failed = start_now(fails())
    with pytest.raises(ValueError, match="no"):
        await failed
    assert TAG.get() == "outer"


async def test_start_now_of_a_finished_step_ignores_a_cancel_before_its_first_pass() -> None:
    async def quick() -> int:
        return 5

    task = start_now(quick())  # type: ignore[arg-type]
    task.cancel()
    assert await task == 5  # it had already returned: that is its outcome
