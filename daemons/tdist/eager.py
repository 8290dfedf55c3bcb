"""Running a coroutine up to its first wait inline, and only the rest in a task.

A coroutine handed to ``create_task`` starts in a later pass of the event loop. For a publish
started from plain code that is one pass too late: nats-py's flusher has by then written what
this pass published, so the publish costs a socket write of its own, and on loopback every
write also wakes the server. The worker asks for more messages when a request's slot frees;
asked from a task, the pull request went out in a write after the final that freed the slot:
0.057 to 0.062 socket writes per request at 64 in flight; started inline, 0.033 (echo, 100 B,
perf stat on the worker, 3 A/B pairs; a hand-written JetStream echo makes 0.021).

No task is current while the inline step runs (``asyncio.current_task()`` is None): the step
runs inside whatever called ``start_inline`` (often nats-py's reader task), and an
``asyncio.timeout`` or ``TaskGroup`` bound to that task would cancel it. Entered before the
first wait, they raise ``RuntimeError`` instead. Only for tdist's own short coroutines.

``start_now`` is the other way round, for a coroutine that may use them (a request's serving,
an operator inside it): its task is created first and is current during the first step, as
with Python 3.12's eager tasks.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any


class _Rest(Coroutine[Any, Any, Any]):
    """What a task drives after a coroutine's first step ran outside it (``start_inline``,
    ``start_now``): it waits on what that step waited on, or ends as that step ended."""

    __slots__ = ("_coro", "_waiting", "_started", "_ended")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting
        """What the inline step yielded: the future it waits on, or None (a bare yield)."""
        self._started = False
        self._ended: BaseException | None = None
        """How the inline step ended, if it did not suspend: its StopIteration or exception."""

    def send(self, value: Any) -> Any:
        if self._started:
            return self._coro.send(value)
        self._started = True  # the task's first step: it waits on what the inline step waited on
        if self._ended is not None:
            ended, self._ended = self._ended, None
            raise ended
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return self._coro.send(None)
        return waiting

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._ended is not None:  # it already returned or raised: that is its outcome
            return self.send(None)
        if not self._started:
            # Cancelled before the task's first step: as a task's cancel() does, cancel the
            # future the coroutine waits on, then interrupt the coroutine where it waits.
            self._started = True
            waiting, self._waiting = self._waiting, None
            if isinstance(waiting, asyncio.Future):
                waiting.cancel()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        raise TypeError("only its task drives the rest of an inline-started coroutine")


def _first_step(loop: asyncio.AbstractEventLoop, context: contextvars.Context,
                coro: Coroutine[Any, Any, Any], task: asyncio.Task[Any] | None) -> Any:
    """Run ``coro``'s first step now in ``context``, with ``task`` current (or none); whatever
    task was current is current again afterwards. Returns what the step yielded, raises how it
    ended otherwise (StopIteration when it returned)."""
    current = asyncio.current_task(loop)
    if current is not None:
        asyncio.tasks._leave_task(loop, current)  # type: ignore[attr-defined]
    if task is not None:
        asyncio.tasks._enter_task(loop, task)  # type: ignore[attr-defined]
    try:
        return context.run(coro.send, None)
    finally:
        if task is not None:
            asyncio.tasks._leave_task(loop, task)  # type: ignore[attr-defined]
        if current is not None:
            asyncio.tasks._enter_task(loop, current)  # type: ignore[attr-defined]


def start_inline(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` up to its first wait now, in a copy of the current context and with no
    current task; return None if it finished there, else the task that runs the rest (in the
    same context). An exception it raises in that step is raised here."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    try:
        waiting = _first_step(loop, context, coro, None)
    except StopIteration:
        return None
    return loop.create_task(_Rest(coro, waiting), context=context)  # type: ignore[arg-type]


def start_now(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Create a task for ``coro`` and run its first step now, with that task current (so an
    ``asyncio.timeout`` or a ``TaskGroup`` inside binds to it), in a copy of the current
    context: what Python 3.12's eager tasks do. The task's own first pass then only resumes it
    (or ends it, if the step finished). Saves the pass a new task waits for its first step.

    The worker starts a lone request this way (nothing else held, nothing else in the read): one
    request at a time, tdist's p50 minus the JetStream floor's in the same run fell from 88 to
    28 us on average over 5 alternated pairs (better in 4), and from 82 to 22 over 6 more; one
    pass fewer is about 6 us of Python, the rest is probably one preemption point (an
    ``epoll_wait``) fewer between reading the request and writing its final on a 2-vCPU VM."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    rest = _Rest(coro, None)
    task = loop.create_task(rest, context=context)  # type: ignore[arg-type]
    try:
        rest._waiting = _first_step(loop, context, coro, task)
    except BaseException as exc:  # StopIteration or what it raised: its task's first step ends so
        rest._ended = exc
    return task
