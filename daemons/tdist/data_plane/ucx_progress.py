"""Event-driven UCX progress for asyncio (replaces ucxx's own blocking-mode driver).

ucxx offers, on this platform: 'blocking' mode, whose request awaitables spin the
event loop (``await asyncio.sleep(0)`` until done) so a process with any posted
receive burns a whole core; and 'thread' mode with Python futures, idle-cheap but
about half the shared-memory bandwidth and milliseconds of latency. This driver
keeps blocking mode's speed without the spin: progress the worker, complete our
futures, arm the worker, then sleep on its epoll descriptor until UCX has news.

It uses ucxx's Cython layer (``tag_send``/``tag_recv`` returning requests with
``completed``/``check_error``) and takes over the progress tasks ucxx made for
the loop. Requests keep their buffers alive until UCX is done with them, so a
timed-out receive can never write into freed memory.

Messages nobody posted a receive for (a server's requests, anything a stranger sends)
are not received blindly: after every progress the driver calls its pollers, which
probe UCX's unexpected queue (``tag_probe``: tag and length, no data yet) and either
receive a message into a buffer of its announced size or discard it (a receive into a
small buffer, which UCX ends with "truncated" and frees). So a server has no receive
posted that a peer's message could end, and closing needs no message at all.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from tdist.logs import get_logger

log = get_logger("tdist.ucx")

SPIN = float(os.environ.get("TDIST_UCX_SPIN_US", "0")) * 1e-6
"""Keep polling this long after the last completion before sleeping: a transfer in flight
(rendezvous, pipelined fragments) finishes far sooner when polled than when woken per event."""
POLL_EVERY = 0.0005
"""Seconds between probes for unexpected messages while transfers are in flight."""
SAFETY_TICK = 1.0
"""Progress at least this often even without an event (as ucxx's own driver does)."""


class EventDriver:
    def __init__(self, ucxx: Any) -> None:
        from ucxx._lib.arr import Array  # type: ignore[import-not-found]
        from ucxx._lib_async.application_context import ProgressTasks  # type: ignore[import-not-found]
        from ucxx.types import Tag, TagMask, TagMaskFull  # type: ignore[import-not-found]

        self._Array, self._Tag, self._TagMaskFull = Array, Tag, TagMaskFull
        self._any_tag, self._no_mask = Tag(0), TagMask(0)
        self.loop = asyncio.get_running_loop()
        ctx = ucxx.core._get_ctx()
        if ctx.progress_mode != "blocking":
            raise RuntimeError(f"EventDriver needs UCXPY_PROGRESS_MODE=blocking, not {ctx.progress_mode}")
        ctx.continuous_ucx_progress(event_loop=self.loop)
        ucx_own = ProgressTasks.get(self.loop)
        if ucx_own is not None:
            for task in ucx_own._tasks:
                if task is not None:
                    task.cancel()
        self.worker = ctx.worker
        self._fd = self.worker.epoll_file_descriptor
        self.loop.remove_reader(self._fd)
        self._wake = asyncio.Event()
        self.loop.add_reader(self._fd, self._wake.set)
        self._pending: list[tuple[Any, asyncio.Future[None], Any]] = []
        self._pollers: list[Callable[[], None]] = []
        self._last_poll = 0.0
        self._last_activity = 0.0
        self._tasks = [self.loop.create_task(self._drive()), self.loop.create_task(self._tick())]

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(SAFETY_TICK)
            self._wake.set()

    def _run_pollers(self) -> None:
        self._last_poll = time.perf_counter()
        for poll in tuple(self._pollers):
            try:
                poll()
            except Exception as exc:  # a poller's bug must not stop the progress of every transfer
                log.error("ucx_poller_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    async def _drive(self) -> None:
        while True:
            self.worker.progress()
            # While transfers move, the loop turns often: probe at most every POLL_EVERY then
            # (each probe is a call into UCX), and always before going to sleep.
            polled = not self._pending or time.perf_counter() - self._last_poll >= POLL_EVERY
            if polled:
                self._run_pollers()
            if self._pending:
                still = []
                for item in self._pending:
                    req, fut, _buf = item
                    if not req.completed:
                        still.append(item)
                        continue
                    if fut.done():  # its waiter gave up (timeout): nothing to tell
                        continue
                    try:
                        req.check_error()
                        fut.set_result(None)
                    except Exception as exc:
                        fut.set_exception(exc)
                if len(still) != len(self._pending):
                    self._last_activity = time.perf_counter()
                self._pending = still
            if self._pending and time.perf_counter() - self._last_activity < SPIN:
                await asyncio.sleep(0)  # hot: a transfer is moving, keep polling a moment
                continue
            if self.worker.arm():  # nothing left to progress: sleep until UCX has an event
                if not polled:  # a message may wait unprobed: look before sleeping
                    posted = len(self._pending)
                    self._run_pollers()
                    if len(self._pending) != posted:  # it took something: progress that first
                        await asyncio.sleep(0)
                        continue
                self._wake.clear()
                await self._wake.wait()
            else:
                await asyncio.sleep(0)

    def _submit(self, req: Any, buf: Any) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        self._pending.append((req, fut, buf))  # buf stays referenced until UCX completes
        self._last_activity = time.perf_counter()
        self._wake.set()
        return fut

    @staticmethod
    def _live(ep: Any) -> Any:
        """The endpoint's handle, if UCX has not reported it failed or it was not closed: nothing is
        posted on a dead endpoint (UCX may crash on one). Progress runs only in this thread, so the
        state cannot change between this check and the post."""
        handle = ep._ep
        if handle is None or not handle.alive:
            raise ConnectionError("the endpoint to the peer is closed or failed")
        return handle

    def send(self, ep: Any, buf: Any, tag: int) -> asyncio.Future[None]:
        handle = self._live(ep)
        arr = self._Array(buf)
        return self._submit(handle.tag_send(arr, self._Tag(tag)), arr)

    def recv_on(self, ep: Any, buf: Any, tag: int) -> asyncio.Future[None]:
        """A receive posted on ``ep`` (matched by tag from any sender; aborting ``ep`` cancels it)."""
        handle = self._live(ep)
        arr = self._Array(buf)
        return self._submit(handle.tag_recv(arr, self._Tag(tag), self._TagMaskFull), arr)

    def recv(self, buf: Any, tag: int) -> asyncio.Future[None]:
        """A receive matched on the worker: from any sender."""
        arr = self._Array(buf)
        return self._submit(self.worker.tag_recv(arr, self._Tag(tag)), arr)

    def add_poller(self, poll: Callable[[], None]) -> None:
        """Call ``poll`` after every progress (it must not block; it may probe and receive)."""
        self._pollers.append(poll)

    def remove_poller(self, poll: Callable[[], None]) -> None:
        if poll in self._pollers:
            self._pollers.remove(poll)

    def probe(self, tag: int | None) -> Any:
        """Take the oldest unexpected message with ``tag`` (any tag if None) off UCX's queue:
        a result with ``matched``, ``length`` and ``sender_tag``. A matched message must then be
        received with ``recv_probed`` (or it stays allocated inside UCX)."""
        if tag is None:
            return self.worker.tag_probe(self._any_tag, self._no_mask, remove=True)
        return self.worker.tag_probe(self._Tag(tag), remove=True)

    def recv_probed(self, probe: Any, buf: Any) -> asyncio.Future[None]:
        """Receive a probed message into ``buf``; a longer message ends in UCX's truncation error."""
        arr = self._Array(buf)
        return self._submit(self.worker.tag_recv_with_handle(arr, probe), arr)

    async def close(self) -> None:
        self._pollers = []
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.loop.remove_reader(self._fd)
        for _req, fut, _buf in self._pending:
            if not fut.done():
                fut.cancel()
        self._pending = []
