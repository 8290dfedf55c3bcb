"""A worker: hosts operators and serves their requests from the work queue.

For each operator the worker pulls only while it has free slots
(``max_inflight``), acknowledges a request only after its final response is
sent, and tells the server a running request is still in progress so that it is
not redelivered while its worker lives. A worker that dies leaves its
unacknowledged requests to be redelivered to another worker.

Faults it holds against:

* **NATS restarts**: the ``Runtime`` re-declares the consumers and pulls again
  through fresh inboxes after a reconnect (no pulls while disconnected). A final
  response is held while the connection is down and sent once it is back (then
  acknowledged), and kept for a while: a caller that lost it re-sends the request
  and gets the same final again (``replayed``), without the operator running twice.
* **Malformed requests**: exactly one error response, then the message is
  terminated; a bad input reference gets the data plane's error the same way.
* **Hung operators**: at its deadline a request is cancelled; an operator that
  does not stop within ``HUNG_GRACE`` is abandoned: its caller gets
  ``DeadlineExceeded``, the message is terminated (not redelivered) and its slot
  freed. A final response being sent is never interrupted.
* **Duplicates**: a repeated request id (a re-send) that is still running here is
  dropped; the running one answers.

A delivered *batch* (several requests in one stream message, see the caller) is taken up to
the operator's free slots (at least one request); the rest goes back to the queue as a new
message first (its message id is made from the batch's stream sequence and the split point, so
a redelivered batch split again the same way is stored once). The batch is acknowledged when
every request taken from it is settled and the rest is stored; if any of them had to be handed
back (a shutdown), or the rest could not be stored, the whole batch is handed back instead.

Finals that are ready in one pass of the event loop while other requests are held go out
together after that pass (``_send_finals``): the finals to one caller inbox as one message (a
batch of response frames on ``<inbox>.b.<count>``), then the acknowledgements. One message per
caller instead of one per request spares the server's routing and the caller's parsing of each.
A final of a worker with nothing else held goes out at once (one at a time pays no wait).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import structlog
from nats.aio.msg import Msg

from tdist import names
from tdist.client import CallLink, RemoteOperator
from tdist.config import PING_OPERATOR, DataPlaneConfig, NatsConfig, OperatorConfig, RequestPlaneConfig, WorkerConfig
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.plane import any_needs_reference
from tdist.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    OperatorNotFound,
    PayloadTooLarge,
    TdistError,
)
from tdist import metrics
from tdist.eager import start_inline, start_now
from tdist import logs
from tdist.logs import get_logger
from tdist.operators import Operator, Request, load_operator_class
from tdist.operators.builtin import Ping
from tdist.registry import OperatorInfo, Registry, WorkerInfo
from tdist.request_plane import protocol, streams
from tdist.request_plane.connection import read_drained, write_now
from tdist.request_plane.puller import Puller
from tdist.runtime import Runtime, bounded
from tdist.worker.replay import FinalResponses
from tdist.worker.states import WorkerState, check_transition

log = get_logger("tdist.worker")

_CANCELLED_MEMORY = 10_000
OPERATOR_CLOSE_TIMEOUT = 60.0
OUTPUT_RELEASE_WAIT = 10.0
DEADLINE_SWEEP = 0.05
HUNG_GRACE = 5.0
"""Seconds an operator has to stop after its deadline cancelled it, before it is abandoned."""
FINAL_SETTLE = 1.0
"""After a reconnect, wait this long before sending held finals: callers reconnect too."""
SERVE_PER_PASS = 16
"""Requests whose tasks start in one pass of the event loop; more wait for the next passes. A
delivery of many requests (a batch) then goes out as finals in groups, each written while the
next is served, so that caller and worker work at the same time instead of in turns (with no
limit, 64 requests in flight move as one wave: client, server and worker take turns, 1.1 of the
2 cores busy). Echo, 64 in flight, 2 cores, 4 alternated rounds: 15,000 to 18,600 req/s with 16,
12,500 to 18,900 with 12, 10,400 to 13,200 with 24, 9,000 to 12,800 with no limit."""
DIRECTED_HELD_MAX = 16
"""Directed requests held (waiting for a slot or running) before the worker stops pulling more."""
HELD_CAP = 2
"""Messages an operator may hold (waiting for a slot or running), in units of its max_inflight."""
NAK_DELAY_NS = 1_000_000_000
"""A message delivered beyond an operator's slots is handed back with this redelivery delay."""
METRICS_EVERY = 5
"""Per-request metrics are added to the shared values every this many deadline sweeps, and at the
first sweep after the worker fell idle (so an idle worker's values are at most one sweep old)."""


@dataclass(eq=False, slots=True)
class _Delivery:
    """A delivered batch message: acknowledged once all it was split into is settled."""

    msg: Msg
    open: int
    """Requests taken from it (and the hand-back of the rest) not yet settled."""
    nak: bool = False
    """Something of it asked to be handed back: the whole message is, at the end."""
    acked_elsewhere: bool = False
    """Some of its requests are copies of requests running here from an earlier delivery of
    the same message, which will acknowledge it."""


@dataclass(eq=False, slots=True)
class _Held:
    """A delivered, unacknowledged request: waiting for a slot or running."""

    msg: Msg
    runner: OperatorRunner
    directed: bool = False
    data: bytes = b""
    """The request's frame (the message's data, or its part of a batch)."""
    delivery: _Delivery | None = None
    """The batch it came in (None: a message of its own)."""
    settled: bool = False
    request_id: str | None = None
    task: asyncio.Task[None] | None = None
    request: Request | None = None
    cancel_reason: str | None = None
    """Why its task was cancelled: 'caller', 'deadline' or 'shutdown'."""
    deadline: float | None = None
    """The request's deadline once decoded; the deadline sweep cancels it once passed."""
    refs: list[TensorRef] = field(default_factory=list)
    """Tensor references this request holds (its inputs, kept child outputs)."""
    last_progress: float = field(default_factory=time.monotonic)
    has_slot: bool = False
    finishing: bool = False
    """Its final response is being sent: neither a deadline nor a cancel may interrupt it."""
    finished: bool = False
    abandoned: bool = False
    """Its operator ignored the deadline: answered and terminated without it."""
    attempt: int = 1
    """Its message's delivery count (from the ack subject, like the next two)."""
    seq: int = 0
    """Its message's stream sequence (0: unknown)."""
    published_ns: int = 0
    """When the request was stored in the stream, for its queue time."""
    started: float = 0.0
    """Monotonic time it got its slot."""
    queue_seconds: float | None = None
    """From its publish to getting its slot."""
    final: bytes = b""
    """Its encoded final response while it waits in the worker's outbox (``_send_finals``)."""
    reply_to: str = ""


def _final_size(held: _Held) -> int:
    return len(held.final)


def ack_tokens(msg: Msg) -> tuple[int, int, int]:
    """(delivery count, stream sequence, publish time in ns) from the ack subject (v1: 9 tokens, v2: 12)."""
    tokens = (msg.reply or "").split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[4]), int(tokens[5]), int(tokens[7])
        return int(tokens[6]), int(tokens[7]), int(tokens[9])
    except (IndexError, ValueError):
        return 1, 0, 0


class OperatorRunner:
    """One hosted operator: its instance, its slots and its pull on the shared queue."""

    def __init__(self, worker: Worker, config: OperatorConfig, instance: Operator) -> None:
        self.worker = worker
        self.config = config
        self.instance = instance
        self.slots = asyncio.Semaphore(config.max_inflight)
        self.held = 0
        """Requests delivered through the shared consumer and not yet finished."""
        self.running = 0
        self.served = 0
        self.puller: Puller | None = None
        self.metrics = metrics.OperatorMetrics(config.name, config.version)
        # Top up in batches once a quarter of the slots is free, but never leave none asked for.
        self._min_batch = max(1, config.max_inflight // 4)
        self.per_message = 1.0
        """Requests per delivered message, smoothed: batches carry several, and the server is
        asked for messages, so free slots are divided by this (else every credit beyond the
        slots brings a batch to hand back)."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.config.name, self.config.version)

    def top_up(self) -> None:
        puller = self.puller
        if puller is None or self.worker.state is not WorkerState.SERVING:
            return
        outstanding = puller.outstanding
        free = self.config.max_inflight - self.held
        if free <= 0:
            return
        per_message = self.per_message
        want = max(min(2, free), int(free / per_message)) - outstanding
        if want >= self._min_batch / per_message or (want > 0 and outstanding == 0):
            asking = puller.ask(want)
            if asking is not None:
                self.worker.spawn(asking, inline=True)

    def delivered(self, requests: int) -> None:
        """A message with this many requests came through the shared consumer."""
        self.per_message += 0.2 * (requests - self.per_message)

    def info(self) -> OperatorInfo:
        return OperatorInfo(self.config.name, self.config.version, self.config.max_inflight, self.running)

    def count(self, outcome: str) -> None:
        self.metrics.count(outcome)

    def flush_metrics(self) -> None:
        self.metrics.flush(self.running)


class Worker:
    """``async with Worker(...) as w: ...`` serves until the block ends (then drains); signals are the caller's."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        nats: NatsConfig,
        request_plane: RequestPlaneConfig,
        data_plane: DataPlaneConfig | None = None,
        worker_id: str | None = None,
        request_log: bool = True,
    ) -> None:
        self.config = config
        self.rp = request_plane
        self.request_log = request_log
        """One summary line per request at info (``[logging] request_log``)."""
        self.id = worker_id or f"{config.name}-{uuid.uuid4().hex[:10]}"
        names.check_name("worker id", self.id)
        self.state = WorkerState.STARTING
        self.started_at = time.time()
        self.runtime = Runtime(nats, request_plane, data_plane or DataPlaneConfig(), component_id=self.id,
                               name=f"tdist-worker {self.id}", deployer=True)
        self.data_plane = self.runtime.data_plane
        self.runners: dict[tuple[str, int], OperatorRunner] = {}
        self.registry: Registry | None = None
        self._directed: Puller | None = None
        self._directed_held = 0
        self._held: set[_Held] = set()
        self._by_request: dict[str, _Held] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._finals = FinalResponses(ttl=max(300.0, 2 * request_plane.ack_wait))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._outbox: list[_Held] = []
        """Held requests whose finals wait for the end of this pass (``_send_finals``)."""
        self._started_in_pass = 0
        self._to_start: collections.deque[_Held] = collections.deque()
        """Held requests whose tasks start in a later pass (``SERVE_PER_PASS``)."""
        self._plain_context = contextvars.copy_context()
        """The context ``_send_finals`` runs in: the process's, none of its requests'."""
        self._idle_unflushed = False
        """Fell idle since the last metrics flush: the next deadline sweep flushes."""
        self._maintenance: list[asyncio.Task[None]] = []
        self._stream = names.stream_name(request_plane.namespace)
        self.replayed = 0
        """Repeated requests answered from the kept final response, without running them."""
        self.duplicates = 0
        """Repeated requests dropped because the same request was running here."""
        self.abandoned = 0
        """Requests whose operator ignored their deadline."""
        self.handed_back = 0
        """Messages delivered beyond an operator's slots, handed back to the queue."""
        self.batches_split = 0
        """Batches with more requests than free slots: the rest went back to the queue."""
        # The agent's canary: answered on the directed subject only, through the same path as any request.
        self._ping = OperatorRunner(self, OperatorConfig(PING_OPERATOR, "tdist.operators.builtin:Ping", max_inflight=2),
                                    Ping(PING_OPERATOR, 1, {}))

    # -- lifecycle -----------------------------------------------------------

    def _set_state(self, new: WorkerState) -> None:
        check_transition(self.state, new)
        log.info("worker_state", worker=self.id, old=self.state.value, new=new.value)
        self.state = new

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load operators, connect, declare consumers, register, then start pulling."""
        self._plain_context = contextvars.copy_context()  # with what main() bound (worker=...)
        try:
            for op_cfg in self.config.operators:
                cls = load_operator_class(op_cfg.implementation)
                instance = cls(op_cfg.name, op_cfg.version, op_cfg.parameters)
                await instance.setup()
                self.runners[(op_cfg.name, op_cfg.version)] = OperatorRunner(self, op_cfg, instance)
            await self.data_plane.get()  # publish a data-plane address from the start
            await self.runtime.start()
            self.registry = await self.runtime.registry()
            await self.nc.subscribe(names.cancel_wildcard(self.rp.namespace), cb=self._on_cancel)
            await self._declare_consumers()
            await self._start_pullers()
            self.runtime.on_recover(self._recover)
            self._set_state(WorkerState.SERVING)
            await self._register()
            self._top_up_all()
            loop = asyncio.get_running_loop()
            self._maintenance = [loop.create_task(self._maintain()), loop.create_task(self._sweep_deadlines())]
            log.info("worker_serving", worker=self.id, operators=[f"{n}:{v}" for n, v in self.runners])
        except BaseException:
            self.state = WorkerState.STOPPED
            await self._close_resources()
            raise

    @property
    def nc(self) -> Any:
        return self.runtime.nc

    @property
    def caller(self) -> Any:
        return self.runtime.caller

    async def _declare_consumers(self) -> None:
        js = self.nc.jetstream()
        await streams.ensure_stream(js, self.rp, self.nc.max_payload)
        for runner in self.runners.values():
            cfg = streams.shared_consumer_config(self.rp, runner.config.name, runner.config.version)
            await streams.ensure_consumer(js, self._stream, cfg)
        await streams.ensure_consumer(js, self._stream, streams.directed_consumer_config(self.rp, self.id))

    async def _start_pullers(self) -> None:
        for runner in self.runners.values():
            consumer = names.shared_consumer(runner.config.name, runner.config.version)
            runner.puller = Puller(
                self.nc, self._stream, consumer, lambda m, r=runner: self._accept(m, r), runner.top_up
            )
            await runner.puller.start()
        self._directed = Puller(
            self.nc, self._stream, names.directed_consumer(self.id), self._accept_directed, self._top_up_directed
        )
        await self._directed.start()

    def _top_up_directed(self) -> None:
        directed = self._directed
        if (directed is not None and self.state is WorkerState.SERVING and directed.outstanding == 0
                and self._directed_held < DIRECTED_HELD_MAX):
            asking = directed.ask(1)
            if asking is not None:
                self.spawn(asking, inline=True)

    def _top_up_all(self) -> None:
        for runner in self.runners.values():
            runner.top_up()
        self._top_up_directed()

    async def drain(self) -> None:
        """Stop pulling, let held requests finish within ``drain_timeout``, then stop."""
        if self.state is not WorkerState.SERVING:
            return
        self._set_state(WorkerState.DRAINING)
        for puller in self._pullers():
            await puller.stop()
        await self._register()
        try:
            async with asyncio.timeout(self.config.drain_timeout):
                await self._idle.wait()
            log.info("worker_drained", worker=self.id)
        except TimeoutError:
            log.warning("drain_timeout", worker=self.id, held=len(self._held))
            for held in list(self._held):
                if held.finishing:
                    continue
                held.cancel_reason = "shutdown"
                if held.task is not None:
                    held.task.cancel()
            await bounded("drain_cancel", asyncio.gather(*[h.task for h in self._held if h.task],
                                                         return_exceptions=True), HUNG_GRACE)

    async def stop(self) -> None:
        """Drain (if serving), deregister and close everything."""
        if self.state is WorkerState.STOPPED:
            return
        await self.drain()
        self._set_state(WorkerState.STOPPED)
        await self._close_resources()

    async def _close_resources(self) -> None:
        """Release everything, each step bounded: a stuck step is logged, never a stuck worker.

        The worst case adds up to CLOSE_BUDGET seconds after the drain."""
        for task in self._maintenance:
            task.cancel()
        await bounded("maintenance", asyncio.gather(*self._maintenance, return_exceptions=True))
        self._maintenance = []
        for puller in self._pullers():
            await bounded("puller_stop", puller.stop())
        if self.registry is not None:
            await bounded("deregister", self.registry.delete(self.id))
        for task in list(self._tasks):
            task.cancel()
        await bounded("tasks", asyncio.gather(*self._tasks, return_exceptions=True))
        self._flush_metrics()
        for runner in self.runners.values():
            await bounded(f"operator_close {runner.config.name}", runner.instance.close(), OPERATOR_CLOSE_TIMEOUT)
        # Callers may still be pulling outputs of the last requests: give them a moment.
        await self.runtime.close(wait_for_release=min(self.config.drain_timeout, OUTPUT_RELEASE_WAIT))
        log.info("worker_stopped", worker=self.id)

    def _pullers(self) -> list[Puller]:
        found = [r.puller for r in self.runners.values() if r.puller is not None]
        return found + ([self._directed] if self._directed is not None else [])

    def spawn(self, coro: Any, *, inline: bool = False) -> asyncio.Task[Any] | None:
        """Run ``coro`` in a tracked task (cancelled at close). ``inline``: up to its first wait
        now (``tdist.eager``; None if it finished there): a pull request asked for after a slot
        freed then goes out in the same socket write as the final that freed it."""
        task = start_inline(coro) if inline else asyncio.get_running_loop().create_task(coro)
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return task

    # -- registry and upkeep -------------------------------------------------

    def info(self) -> WorkerInfo:
        plane = self.data_plane.plane
        nc = self.runtime._nc
        return WorkerInfo(
            id=self.id,
            name=self.config.name,
            node=self.config.node,
            pid=os.getpid(),
            state=self.state.value,
            operators=tuple(r.info() for r in self.runners.values()),
            started_at=self.started_at,
            heartbeat_at=time.time(),
            ttl=self.config.registry_ttl,
            gpus=tuple(filter(None, os.environ.get("CUDA_VISIBLE_DEVICES", "").split(","))),
            served=sum(r.served for r in self.runners.values()),
            data_plane=plane.address if plane else None,
            tensors_held=len(plane.store) if plane else 0,
            bytes_pulled=plane.bytes_pulled if plane else 0,
            bytes_served=plane.bytes_served if plane else 0,
            nats_in_bytes=int(nc.stats["in_bytes"]) if nc is not None else 0,
        )

    async def _register(self) -> None:
        if self.registry is None or self.state is WorkerState.STOPPED:
            return
        try:
            await self.registry.put(self.info())
        except Exception as exc:
            log.warning("heartbeat_failed", worker=self.id, error=str(exc))

    async def _maintain(self) -> None:
        """Heartbeats, in-progress signals for running requests, lost pull requests."""
        heartbeat_every = self.config.registry_ttl / 3
        progress_every = self.rp.ack_wait / 3
        tick = min(0.5, heartbeat_every, progress_every)
        next_heartbeat = time.monotonic() + heartbeat_every
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + heartbeat_every
                await self._register()
            if not self.runtime.connected.is_set():
                continue
            wall = time.time()
            signalled: set[int] = set()
            for held in list(self._held):
                # Only requests still within their deadline are kept alive: a hung one is
                # abandoned by the deadline sweep, never kept forever.
                if (now - held.last_progress >= progress_every and not held.finished
                        and (held.deadline is None or wall < held.deadline + HUNG_GRACE)):
                    held.last_progress = now
                    if id(held.msg) not in signalled:  # a batch's requests share one message
                        signalled.add(id(held.msg))
                        await self._ack(held.msg, b"+WPI")
            missing = False
            for puller in self._pullers():
                puller.forget_stale()
                missing = missing or puller.consumer_missing
            if missing:
                self.runtime.request_recovery()
            self._top_up_all()

    async def _sweep_deadlines(self) -> None:
        """Cancel operators whose request deadline passed; abandon those that do not stop.

        One sweep every DEADLINE_SWEEP seconds costs less than a timer per request;
        the caller enforces its deadline exactly, this only stops wasted work.
        """
        sweeps = 0
        while True:
            await asyncio.sleep(DEADLINE_SWEEP)
            sweeps += 1
            if self._idle_unflushed or sweeps % METRICS_EVERY == 0:
                self._idle_unflushed = False
                self._flush_metrics()
            now = time.time()
            for held in list(self._held):
                deadline = held.deadline
                if deadline is None or held.finishing or not now >= deadline:
                    continue
                if held.cancel_reason is None:
                    held.cancel_reason = "deadline"
                    if held.request is not None:
                        held.request.cancelled.set()
                    if held.task is not None:
                        held.task.cancel()
                elif now >= deadline + HUNG_GRACE and not held.abandoned:
                    held.abandoned = True
                    self.spawn(self._abandon(held))

    def _flush_metrics(self) -> None:
        for runner in (*self.runners.values(), self._ping):
            runner.flush_metrics()

    async def _abandon(self, held: _Held) -> None:
        """The operator ignored its cancellation: answer, terminate the message, free the slot."""
        self.abandoned += 1
        metrics.ABANDONED.labels(held.runner.config.name).inc()
        held.runner.count("deadline_exceeded")
        log.warning("operator_hung", request_id=held.request_id, operator=held.runner.config.name,
                    seconds_past_deadline=round(time.time() - (held.deadline or 0), 1))
        reply = None
        try:
            reply = protocol.decode_request(held.data).reply_to
        except InvalidRequest:
            pass
        held.finishing = True
        if reply and held.request_id:
            error = DeadlineExceeded("the operator did not stop after its deadline; abandoned",
                                     operator=held.runner.config.name, worker=self.id)
            await self._send(reply, self._error(held.request_id, error, held.attempt))
        await self._settle(held, b"+TERM")
        await self._release_refs(held)
        self._release_slot(held)
        self._finish(held)

    async def _recover(self) -> None:
        """After a reconnect the server holds none of our pull requests; it may have lost consumers
        too. Raises (and the runtime retries) until JetStream answers."""
        await self._declare_consumers()
        for puller in self._pullers():
            if self.state is WorkerState.SERVING:
                await puller.restart()
        self._top_up_all()
        await self._register()

    # -- serving -------------------------------------------------------------

    def _accept(self, msg: Msg, runner: OperatorRunner, *, directed: bool = False) -> None:
        if not directed and runner.held >= HELD_CAP * runner.config.max_inflight:
            # Far more than our slots (the pull accounting lost track): hand it to another worker.
            # Each hand-back costs the request one delivery attempt, so this is a last resort.
            self.handed_back += 1
            log.warning("message_handed_back", operator=runner.config.name, held=runner.held,
                        outstanding=runner.puller.outstanding if runner.puller else None)
            self.spawn(self._ack(msg, b'-NAK {"delay": %d}' % NAK_DELAY_NS))
            return
        data = msg.data
        if protocol.is_batch(data):
            self._accept_batch(msg, runner, directed)
            return
        if not directed and runner.per_message != 1.0:
            runner.delivered(1)
        self._hold(msg, runner, directed, data, None, ack_tokens(msg))

    def _hold(self, msg: Msg, runner: OperatorRunner, directed: bool, data: bytes, delivery: _Delivery | None,
              tokens: tuple[int, int, int]) -> None:
        """Hold one request and start serving it; ``tokens``: its message's ``ack_tokens``."""
        held = _Held(msg, runner, directed, data, delivery)
        held.attempt, held.seq, held.published_ns = tokens
        if directed:
            self._directed_held += 1
        else:
            runner.held += 1
        self._held.add(held)
        self._idle.clear()
        self._start_serving(held)

    def _start_serving(self, held: _Held) -> None:
        """Start a held request's task now, or in a later pass once ``SERVE_PER_PASS`` started in
        this one (in order)."""
        if self._started_in_pass >= SERVE_PER_PASS:
            self._to_start.append(held)
            return
        loop = asyncio.get_running_loop()
        if not self._started_in_pass:
            loop.call_soon(self._next_pass)  # runs before the steps of the tasks started below
        self._started_in_pass += 1
        # Tracked through _held (not spawn): one task per request is the hot path.
        if len(self._held) == 1 and held.delivery is None and read_drained(self.nc):
            # All we hold, and nothing else in this read: serve it now rather than a pass later
            # (several in one read are started together, their finals shared).
            held.task = start_now(self._serve(held))
        else:
            held.task = loop.create_task(self._serve(held))

    def _next_pass(self) -> None:
        self._started_in_pass = 0
        while self._to_start and self._started_in_pass < SERVE_PER_PASS:
            self._start_serving(self._to_start.popleft())

    def _accept_batch(self, msg: Msg, runner: OperatorRunner, directed: bool) -> None:
        """Take as many of a batch's requests as there are free slots (at least one); the rest
        goes back to the queue as a new message, stored before the batch is acknowledged."""
        try:
            frames = protocol.split_batch(msg.data)
        except InvalidRequest as exc:
            runner.count("invalid_request")
            log.warning("malformed_request", error=exc.message, subject=msg.subject, can_answer=False)
            self.spawn(self._ack(msg, b"+TERM"))
            return
        if not directed:
            runner.delivered(len(frames))
        take = len(frames) if directed else max(1, min(len(frames), runner.config.max_inflight - runner.held))
        rest = frames[take:]
        delivery = _Delivery(msg, take + (1 if rest else 0))
        tokens = ack_tokens(msg)  # parsed once for all the batch's requests
        if rest:
            self.spawn(self._hand_back_rest(delivery, rest, take, runner.config.max_inflight, tokens[1]))
        for frame in frames[:take]:
            self._hold(msg, runner, directed, frame, delivery, tokens)

    async def _hand_back_rest(self, delivery: _Delivery, rest: list[bytes], taken: int, slots: int, seq: int) -> None:
        msg = delivery.msg
        msg_id = f"split-{seq}-{taken}" if seq else f"split-{uuid.uuid4().hex}"
        kind: bytes = b"+ACK"
        try:
            ack = await self.caller.js.publish(
                msg.subject, rest[0] if len(rest) == 1 else protocol.encode_batch(rest),
                timeout=min(5.0, self.rp.ack_wait / 2), headers={"Nats-Msg-Id": msg_id})
            self.batches_split += 1
            log.info("batch_split", taken=taken, handed_back=len(rest), stream_seq=seq, new_seq=ack.seq)
            if seq:
                await self._tell_split(rest, seq, ack.seq, slots)
        except Exception as exc:  # the whole batch goes back instead (what ran here is replayed)
            log.warning("batch_hand_back_failed", taken=taken, handed_back=len(rest), error=f"{type(exc).__name__}: {exc}")
            kind = b"-NAK"
        await self._settle_delivery(delivery, kind)

    async def _tell_split(self, rest: list[bytes], old_seq: int, new_seq: int, slots: int) -> None:
        """Tell the callers of the handed-back requests their new stream sequence (so that a
        max-deliveries advisory of either message fails only the requests it held), and this
        operator's slots (the most worth putting in one batch)."""
        by_inbox: dict[str, list[str]] = {}
        for frame in rest:
            reply = protocol.peek_reply(frame) or ""
            inbox = names.caller_inbox(reply)
            if inbox is not None:
                by_inbox.setdefault(inbox, []).append(reply.rsplit(".", 1)[1])
        for inbox, ids in by_inbox.items():
            await self._publish(names.split_notice_subject(inbox, old_seq),
                                orjson.dumps({"seq": new_seq, "ids": ids, "slots": slots}))

    async def _settle(self, held: _Held, kind: bytes | None) -> None:
        """Acknowledge a held request (``kind`` None: a copy of it running here acknowledges):
        its own message, or its part of a batch, which is acknowledged when all of it is settled."""
        delivery = held.delivery
        if delivery is None:
            if kind is not None:
                await self._ack(held.msg, kind)
            return
        if held.settled:
            return
        held.settled = True
        await self._settle_delivery(delivery, kind)

    async def _settle_delivery(self, delivery: _Delivery, kind: bytes | None) -> None:
        if kind is None:
            delivery.acked_elsewhere = True
        elif kind.startswith(b"-NAK"):
            delivery.nak = True
        delivery.open -= 1
        if delivery.open:
            return
        if delivery.nak:
            await self._ack(delivery.msg, b"-NAK")
        elif not delivery.acked_elsewhere:
            await self._ack(delivery.msg, b"+ACK")

    def _accept_directed(self, msg: Msg) -> None:
        tokens = msg.subject.split(".")
        runner = None
        if len(tokens) == 6:
            try:
                key = (tokens[3], int(tokens[4]))
                runner = self.runners.get(key) or (self._ping if key == self._ping.key else None)
            except ValueError:
                runner = None
        if runner is None:
            self.spawn(self._reject_unknown(msg, tokens[3] if len(tokens) > 3 else "?"))
            self._top_up_directed()
            return
        self._accept(msg, runner, directed=True)
        self._top_up_directed()

    async def _reject_unknown(self, msg: Msg, operator: str) -> None:
        try:
            req = protocol.decode_request(msg.data)
            await self._send(
                req.reply_to,
                self._error(req.id, OperatorNotFound(
                    f"worker {self.id} does not host operator {req.operator} v{req.version}",
                    operator=req.operator, version=req.version, worker=self.id,
                    hosted=[f"{n}:{v}" for n, v in self.runners],
                ), ack_tokens(msg)[0]),
            )
            await self._ack(msg, b"+TERM")
            await self._release_input_refs(req)
        except InvalidRequest as exc:
            await self._answer_malformed(exc, msg)
            await self._ack(msg, b"+TERM")

    def _release_slot(self, held: _Held) -> None:
        if held.has_slot:
            held.has_slot = False
            held.runner.running -= 1
            held.runner.slots.release()

    def _finish(self, held: _Held) -> None:
        """Forget a held message (once): its slot in the pull credit, its request id."""
        if held.finished:
            return
        held.finished = True
        if held.directed:
            self._directed_held -= 1
        else:
            held.runner.held -= 1
        self._held.discard(held)
        if held.request_id is not None and self._by_request.get(held.request_id) is held:
            del self._by_request[held.request_id]
        if not self._held:
            self._idle.set()
            # Flushed by the next sweep, not now: one request at a time makes the worker idle after
            # every request, and a flush each time was 7 % of its samples (py-spy, 1 in flight).
            self._idle_unflushed = True
        held.runner.top_up()
        if held.directed:
            self._top_up_directed()

    async def _serve(self, held: _Held) -> None:
        msg, runner = held.msg, held.runner
        req: protocol.RequestMessage | None = None
        attempt, seq = held.attempt, held.seq
        try:
            try:
                req = protocol.decode_request(held.data)
            except InvalidRequest as exc:
                runner.count("invalid_request")
                await self._answer_malformed(exc, msg)
                await self._settle(held, b"+TERM")
                return
            held.request_id = req.id
            held.deadline = req.deadline
            structlog.contextvars.bind_contextvars(request_id=req.id, trace_id=req.trace_id, operator=req.operator)
            if await self._answered_before(held, req, seq):
                return
            held.refs = [v for v in req.inputs.values() if isinstance(v, TensorRef)]  # released once acknowledged
            self._by_request[req.id] = held
            refusal = self._refusal(held, req, attempt)
            if refusal is None:
                waited = runner.slots.locked()
                await runner.slots.acquire()
                held.has_slot = True
                held.started = time.monotonic()
                runner.running += 1
                if held.published_ns:
                    held.queue_seconds = max(0.0, time.time() - held.published_ns / 1e9)
                    runner.metrics.queue.observe(held.queue_seconds)
                if attempt > 1:
                    metrics.REDELIVERIES.labels(runner.config.name).inc()
                if waited:  # cancelled or expired while it waited for the slot
                    refusal = self._refusal(held, req, attempt)
            if refusal is not None:
                await self._finish_with(held, req, refusal)
                return
            try:
                final = await self._execute(held, runner, req, attempt)
            finally:
                runner.served += 1
            await self._finish_with(held, req, final)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if held.abandoned:  # already answered and terminated by _abandon
                if task is not None:
                    task.uncancel()
                return
            if held.cancel_reason in ("caller", "deadline") and req is not None and not held.finishing:
                if task is not None:
                    task.uncancel()
                if held.cancel_reason == "caller":
                    log.info("request_cancelled")
                    error: TdistError = Cancelled("cancelled by the caller")
                else:
                    log.info("request_deadline_exceeded")
                    error = DeadlineExceeded("deadline passed while the operator ran")
                await self._finish_with(held, req, self._error(req.id, error, attempt))
                return
            if held.cancel_reason == "shutdown" and not held.finishing:
                await self._settle(held, b"-NAK")  # hand it to another worker now
            raise
        except Exception as exc:  # a bug of ours: never leave the request hanging
            log.exception("serve_failed", error=str(exc))
            if not held.finishing:
                await self._settle(held, b"-NAK")
        finally:
            if not held.abandoned and not held.final:  # (a final in the outbox: _send_finals frees it)
                self._release_slot(held)
                self._finish(held)

    async def _answered_before(self, held: _Held, req: protocol.RequestMessage, seq: int) -> bool:
        """A repeated request id: replay its final response, or leave it to the copy running here."""
        cached = self._finals.get(req.id, time.monotonic())
        if cached is not None:
            self.replayed += 1
            metrics.REPLAYED.labels(held.runner.config.name).inc()
            log.info("final_replayed")
            held.finishing = True
            await self._publish(req.reply_to, cached)
            await self._settle(held, b"+ACK")
            return True
        running = self._by_request.get(req.id)
        if running is None or running is held:
            return False
        self.duplicates += 1
        held.finishing = True
        if not (seq and running.seq == seq):  # another copy: the running one answers
            await self._settle(held, b"+TERM")
        else:  # the same message delivered again while it runs here: the running one acknowledges it
            await self._settle(held, None)
        return True

    def _refusal(self, held: _Held, req: protocol.RequestMessage, attempt: int) -> protocol.ResponseMessage | None:
        """The error that keeps a request from starting, if any (cancelled, or past its deadline)."""
        if held.cancel_reason is not None or req.id in self._cancelled:
            return self._error(req.id, Cancelled("cancelled before it started"), attempt)
        if time.time() >= req.deadline:
            log.info("request_expired_unstarted")
            return self._error(req.id, DeadlineExceeded("deadline passed before a worker started it"), attempt)
        return None

    async def _execute(self, held: _Held, runner: OperatorRunner, req: protocol.RequestMessage, attempt: int
                       ) -> protocol.ResponseMessage:
        """Pull the inputs, run the operator: every failure becomes an error response."""
        async def send_partial(outputs: Mapping[str, Any], parameters: Mapping[str, Any] | None) -> None:
            partial = protocol.ResponseMessage(
                req.id, "partial", self.id, attempt, await self._outgoing(outputs), dict(parameters or {})
            )
            await self._send(req.reply_to, partial, check=True)

        try:
            inputs = req.inputs
            if held.refs and runner.instance.pull_inputs:
                inputs = await (await self.data_plane.get()).materialize(inputs, release=False)
            request = Request(
                id=req.id,
                trace_id=req.trace_id,
                operator=req.operator,
                version=req.version,
                deadline=req.deadline,
                attempt=attempt,
                parameters=req.parameters,
                inputs=inputs,
                send_partial=send_partial,
                make_remote=self._remote_for,
                hold=held.refs.extend,
            )
            held.request = request
            outputs = await runner.instance.execute(request)
            return protocol.ResponseMessage(req.id, "final", self.id, attempt, await self._outgoing(outputs or {}))
        except TdistError as exc:
            log.info("request_error", code=exc.code, error=str(exc))
            return self._error(req.id, exc, attempt)
        except Exception as exc:
            return self._operator_failed(req, exc, attempt)

    def _operator_failed(self, req: protocol.RequestMessage, exc: BaseException, attempt: int) -> protocol.ResponseMessage:
        log.warning("operator_raised", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return protocol.ResponseMessage(
            req.id, "error", self.id, attempt,
            error=protocol.ErrorInfo("OPERATOR_ERROR", f"operator {req.operator} raised {type(exc).__name__}: {exc}",
                                     {"type": type(exc).__name__, "operator": req.operator}),
        )

    async def _outgoing(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """Large outputs stay here (by reference), received ones are forwarded, small ones go inline."""
        threshold = self.data_plane.config.inline_threshold
        if not any_needs_reference(outputs.values(), threshold):
            return dict(outputs)
        return await (await self.data_plane.get()).outgoing(outputs)

    def _remote_for(self, name: str, version: int, request: Request) -> RemoteOperator:
        return RemoteOperator(
            self.caller, name, version, link=CallLink(request.trace_id, request.id, request.deadline, request.hold)
        )

    def _error(self, request_id: str, exc: TdistError, attempt: int) -> protocol.ResponseMessage:
        return protocol.ResponseMessage(request_id, "error", self.id, attempt, error=protocol.ErrorInfo.from_exception(exc))

    async def _finish_with(self, held: _Held, req: protocol.RequestMessage, final: protocol.ResponseMessage) -> None:
        """Send the final response, then acknowledge: never the other way round. Only then
        release the request's tensor references (a redelivery would still need them).

        While NATS is down the final waits for the connection (bounded), so that it is not
        flushed at reconnect before its caller listens again; it is also kept for replays."""
        held.finishing = True
        data = self._encode(final)
        if not self.runtime.connected.is_set():
            await self._wait_for_connection(req.deadline)
        self._finals.put(req.id, data, time.monotonic())
        self._account(held, final, len(data))
        if len(self._held) > 1 and not held.refs:  # others may finish in this pass: out together after it
            held.final, held.reply_to = data, req.reply_to
            self._outbox.append(held)
            if len(self._outbox) == 1:
                asyncio.get_running_loop().call_soon(self._flush_outbox, context=self._plain_context)
            return
        # Alone, or with tensor references to release (the data plane's release starts in this
        # pass, as the final's publish, and needs this task: its round trip has a timeout).
        await self._publish(req.reply_to, data)
        write_now(self.nc)
        await self._settle(held, b"+ACK")
        if held.refs:
            await self._release_refs(held)

    def _flush_outbox(self) -> None:
        """Inline (``tdist.eager``): the finals go out in this pass's socket write."""
        waiting, self._outbox = self._outbox, []
        self.spawn(self._send_finals(waiting), inline=True)

    async def _send_finals(self, waiting: list[_Held]) -> None:
        """Publish the finals of one pass, those to one caller inbox in as few messages as
        ``max_payload`` allows; then acknowledge each request and free its slot, as for a final
        sent alone (none of them holds tensor references: ``_finish_with``). A reply subject that
        is not a tdist caller's gets its final on its own."""
        try:
            by_inbox: dict[str, list[_Held]] = {}
            for held in waiting:
                inbox = names.caller_inbox(held.reply_to)
                if inbox is None:
                    await self._publish(held.reply_to, held.final)
                else:
                    by_inbox.setdefault(inbox, []).append(held)
            limit = self.nc.max_payload
            for inbox, group in by_inbox.items():
                for chunk in protocol.fit_batches(group, _final_size, limit):
                    if len(chunk) == 1:
                        await self._publish(chunk[0].reply_to, chunk[0].final)
                    else:
                        await self._publish(names.finals_subject(inbox, len(chunk)),
                                            protocol.encode_batch([h.final for h in chunk]))
        finally:
            for held in waiting:
                try:
                    await self._settle(held, b"+ACK")
                except Exception as exc:  # never leave the others' slots taken
                    log.warning("settle_failed", request_id=held.request_id, error=f"{type(exc).__name__}: {exc}")
                finally:
                    held.final = b""
                    self._release_slot(held)
                    self._finish(held)

    def _account(self, held: _Held, final: protocol.ResponseMessage, bytes_out: int) -> None:
        """Metrics and the one summary line of a finished request."""
        runner = held.runner
        outcome = "ok" if final.error is None else final.error.code.lower()
        runner.count(outcome)
        run = time.monotonic() - held.started if held.started else 0.0
        if held.started:
            runner.metrics.run.observe(run)
        if self.request_log and runner is not self._ping and logs.enabled(logging.INFO):
            queue = held.queue_seconds
            log.info("request", worker=self.id, attempt=held.attempt, outcome=outcome,
                     queue_ms=None if queue is None else round(queue * 1e3, 3), run_ms=round(run * 1e3, 3),
                     bytes_in=len(held.data), bytes_out=bytes_out, refs=len(held.refs))

    async def _wait_for_connection(self, deadline: float) -> None:
        budget = max(0.0, deadline - time.time()) + self.rp.ack_wait
        try:
            async with asyncio.timeout(budget):
                await self.runtime.connected.wait()
            await asyncio.sleep(FINAL_SETTLE)
        except TimeoutError:
            pass

    async def _release_refs(self, held: _Held) -> None:
        refs, held.refs = held.refs, []
        plane = self.data_plane.plane
        if refs and plane is not None:
            await plane.release_quietly(refs)

    async def _release_input_refs(self, req: protocol.RequestMessage) -> None:
        refs = [v for v in req.inputs.values() if isinstance(v, TensorRef)]
        if refs:
            await (await self.data_plane.get()).release_quietly(refs)

    async def _answer_malformed(self, exc: InvalidRequest, msg: Msg) -> None:
        reply = exc.details.get("reply_to")
        log.warning("malformed_request", error=exc.message, subject=msg.subject, can_answer=bool(reply))
        if isinstance(reply, str) and reply:
            request_id = reply.rsplit(".", 1)[-1]
            await self._send(reply, self._error(request_id, exc, ack_tokens(msg)[0]))

    def _encode(self, resp: protocol.ResponseMessage, *, check: bool = False) -> bytes:
        """Encode a response; one too large for the server becomes an error (or raises, for partials)."""
        data = protocol.encode_response(resp)
        max_payload = self.nc.max_payload
        if len(data) > max_payload:
            too_large = PayloadTooLarge(
                f"response is {len(data)} bytes, the server's max_payload is {max_payload}",
                size=len(data), max_payload=max_payload,
            )
            if check:
                raise too_large
            data = protocol.encode_response(self._error(resp.request_id, too_large, resp.attempt))
        return data

    async def _send(self, reply_to: str, resp: protocol.ResponseMessage, *, check: bool = False) -> None:
        await self._publish(reply_to, self._encode(resp, check=check))

    async def _publish(self, reply_to: str, data: bytes) -> None:
        try:
            await self.nc.publish(reply_to, data)
        except Exception as exc:
            log.warning("response_publish_failed", error=str(exc))

    async def _ack(self, msg: Msg, kind: bytes) -> None:
        if not msg.reply:
            return
        try:
            await self.nc.publish(msg.reply, kind)
        except Exception as exc:
            log.warning("ack_failed", kind=kind.decode(), error=str(exc))

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        held = self._by_request.get(request_id)
        if held is None:
            self._cancelled[request_id] = time.monotonic()
            while len(self._cancelled) > _CANCELLED_MEMORY:
                self._cancelled.popitem(last=False)
            return
        if held.finishing or held.cancel_reason is not None:
            return
        held.cancel_reason = "caller"
        if held.request is not None:
            held.request.cancelled.set()
        if held.task is not None:
            held.task.cancel()
