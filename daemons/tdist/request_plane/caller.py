"""The caller side of the request plane.

A request is published into the namespace's work-queue stream with the caller's
inbox as the reply subject of the publish, so the stream's acknowledgement
(PubAck, or the refusal when limits are reached) arrives asynchronously on the
same inbox subscription as the responses: one round trip less than awaiting the
PubAck. Responses come back over core NATS to ``<inbox>.r.<request id>``, or several
requests' finals in one message on ``<inbox>.b.<count>`` (``tdist.names``).

Requests submitted to one operator in one pass of the event loop share one stream message
(a *batch*, ``[request_plane] max_batch``), published when the pass ends; a request submitted
while the caller has nothing else in flight goes out at once on its own (one at a time pays
no wait). A stream message costs the server a store, a PubAck,
a delivery and an ack whatever it carries (measured: 22 of the 34 us of server CPU per
request at 64 in flight), so a batch pays them once. A worker takes from a batch as many
requests as it has free slots and hands the rest back to the queue as a new message before
it acknowledges (load-aware pulls hold), and tells the caller the new message's sequence on
``<inbox>.s.<old sequence>``; the batch is acknowledged once all it took is answered. A
cancelled member is not deleted from the stream (its batch mates are there too): the workers'
cancel subscription stops it.

The caller also listens to the server's max-deliveries advisories: when every
delivery of a request ended without a final response (its workers died), the
matching caller gets ``MaxDeliveriesExceeded`` instead of waiting for its deadline.

Nothing is lost across a NATS restart or the loss of a NATS node:

* every request is published with ``Nats-Msg-Id`` = its id; one without a PubAck
  after ``PUBACK_TIMEOUT`` (or after a reconnect) is published again with the same
  id, and JetStream's duplicate window stores it once;
* after a reconnect, a request that has its PubAck but no final response is looked
  up in the stream: still there, it will be delivered and answered (we listen
  again); gone without a final (its final response was published while we were
  disconnected), it is re-sent under a new message id with the same request id, and
  the worker that ran it replays its final response instead of running it again;
* a stream abandoned by its reader (never closed) is dropped one grace period past
  its deadline, so caller state never grows without bound.

The caller never creates the namespace's stream: whoever deploys does (the agent,
or a worker from its configuration).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from tdist import names
from tdist.config import RequestPlaneConfig
from tdist.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    MaxDeliveriesExceeded,
    OperatorNotFound,
    PayloadTooLarge,
    RequestPlaneFull,
    RequestPlaneUnavailable,
    TdistError,
)
from nats.js.errors import NotFoundError

from tdist.data_plane.descriptor import TensorRef
from tdist.logs import get_logger
from tdist.data_plane.plane import LazyDataPlane, any_needs_reference
from tdist.request_plane import protocol, streams
from tdist.request_plane.connection import subscribe_inline, write_now

log = get_logger("tdist.caller")

# A positive answer to "does this operator have a consumer?" is trusted this long.
_KNOWN_OPERATOR_TTL = 30.0
# A request without a PubAck after this many seconds is published again (same message id).
PUBACK_TIMEOUT = 2.0
# Caller upkeep (PubAck retries, lost-final checks, abandoned streams) runs this often.
UPKEEP_EVERY = 0.5
# A response stream nobody reads is dropped this long after its deadline.
ABANDONED_GRACE = 5.0
# A request seen gone from the stream gets this long for its final response before a re-send.
FINAL_GRACE = 1.0
# Tensor references for a request live at least this long past its deadline.
LEASE_MARGIN = 30.0
# Batches to an operator whose worker split one are capped at its slots this long.
BATCH_CAP_TTL = 60.0


def _frame_size(pending: _Pending) -> int:
    return len(pending.data)


class _IdSource:
    """Unique ids without a uuid4 per request: a random 64-bit prefix per process and a counter."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


new_id = _IdSource()


@dataclass(slots=True)
class _Pending:
    request_id: str
    operator: str
    deadline: float = 0.0
    subject: str = ""
    data: bytes = b""
    """The encoded request, kept for re-sends until its final response."""
    refs: list[TensorRef] = field(default_factory=list)
    """References this caller made for the request's inputs (released if no worker answers)."""
    items: collections.deque[protocol.ResponseMessage | TdistError] = field(default_factory=collections.deque)
    waiter: asyncio.Future[None] | None = None
    stream_seq: int | None = None
    published_at: float = 0.0
    """Monotonic time of the last publish still waiting for its PubAck (0: acknowledged)."""
    resends: int = 0
    gone_since: float = 0.0
    """Monotonic time the request was first seen gone from the stream without a final."""
    done: bool = False
    """Final response seen or cancel sent: nothing more to cancel."""
    final_seen: bool = False
    answered: bool = False
    """A worker answered (final or error): the worker released the inputs."""
    batch: _Batch | None = None
    """The batch it was published in (None: published on its own)."""

    def push(self, item: protocol.ResponseMessage | TdistError) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(slots=True, eq=False)
class _Batch:
    """Requests of one loop pass to one subject, published as one stream message."""

    id: str
    """Its message id (``Nats-Msg-Id``) and the last token of its PubAck subject."""
    subject: str
    members: list[_Pending]
    """The requests still tracked (a member leaves when forgotten or re-sent on its own)."""
    data: bytes = b""
    published_at: float = 0.0
    stream_seq: int | None = None


class _Deadlines:
    """Wakes the waiters of requests whose deadline passed, with one loop timer for them all.

    A per-wait ``call_later`` and its cancel cost 1.7 us measured alone (more in a busy loop,
    whose timer heap keeps cancelled timers until they come due); a push here 0.2 us. A request's deadline
    goes into a heap once; the timer is armed for the earliest one and re-armed when it fires
    or an earlier deadline comes (rare: deadlines mostly grow). Finished requests stay in the
    heap until their deadline (lazy deletion) unless the heap grows past twice the requests
    still tracked, when it is rebuilt from those."""

    def __init__(self, live: dict[str, _Pending]) -> None:
        self._live = live
        self._heap: list[tuple[float, int, _Pending]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, pending: _Pending) -> None:
        heapq.heappush(self._heap, (pending.deadline, next(self._order), pending))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(p.deadline, next(self._order), p) for p in self._live.values()]
            heapq.heapify(self._heap)
        if pending.deadline < self._timer_at:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if self._heap:
            self._timer_at = self._heap[0][0]
            self._timer = asyncio.get_running_loop().call_later(max(0.0, self._timer_at - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2].waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at, self._heap = None, math.inf, []


class ResponseStream:
    """The responses to one request: iterate for partial ones, or ``await final()``.

    Iteration yields every partial response and then the final one; an error
    response raises its typed error. It never waits past the request's deadline.
    A stream left before its final response (an exception, a cancelled task, a
    deadline) cancels its request.
    """

    def __init__(self, caller: Caller, pending: _Pending, deadline: float) -> None:
        self._caller = caller
        self._pending = pending
        self.deadline = deadline
        self.request_id = pending.request_id
        self._finished = False

    def __aiter__(self) -> ResponseStream:
        return self

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> protocol.ResponseMessage:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._next()
        except BaseException:
            await self._close(cancel=True)
            raise
        if isinstance(item, TdistError):
            await self._close(cancel=False)
            raise item
        if item.kind == "error":
            await self._close(cancel=False)
            assert item.error is not None
            raise item.error.to_exception()
        if item.final:
            await self._close(cancel=False)
        return item

    async def _close(self, *, cancel: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if cancel:
            await self._caller.cancel(self.request_id)
        self._caller._forget(self.request_id)

    async def _next(self) -> protocol.ResponseMessage | TdistError:
        """The next item, waiting for it until the deadline (the caller's ``_Deadlines`` wakes
        this stream's waiter then: one timer for all requests, not one per wait)."""
        pending = self._pending
        while not pending.items:
            if time.time() >= self.deadline:
                raise DeadlineExceeded(
                    "no final response before the deadline", request_id=self.request_id, operator=pending.operator
                )
            waiter = pending.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                pending.waiter = None
        return pending.items.popleft()

    async def final(self) -> protocol.ResponseMessage:
        """Wait for the final response, dropping partial ones."""
        while True:
            resp = await self.__anext__()
            if resp.final:
                return resp

    async def aclose(self) -> None:
        """Stop listening; cancels the request if its final response has not come."""
        await self._close(cancel=True)

    async def cancel(self) -> None:
        await self._caller.cancel(self.request_id)
        self._pending.push(Cancelled("request cancelled by the caller", request_id=self.request_id))


class Caller:
    """Publishes requests and routes their responses; one per process connection."""

    def __init__(self, nc: NatsClient, rp: RequestPlaneConfig, *, component_id: str | None = None,
                 data_plane: LazyDataPlane | None = None, connected: asyncio.Event | None = None) -> None:
        self.nc = nc
        self.connected = connected
        self.data_plane = data_plane
        self.js: JetStreamContext = nc.jetstream()
        self.rp = rp
        self.component_id = component_id or new_id()
        self._inbox = nc.new_inbox()
        self._pending: dict[str, _Pending] = {}
        self._by_seq: dict[int, str] = {}
        self._known_operators: dict[tuple[str, int], float] = {}
        self._subs: list[Subscription] = []
        self._stream = names.stream_name(rp.namespace)
        self._unacked: dict[str, _Pending] = {}
        """Requests published on their own and not yet stored (no PubAck)."""
        self._batches: dict[str, _Batch] = {}
        self._unacked_batches: dict[str, _Batch] = {}
        self._gathering: dict[str, list[_Pending]] = {}
        """Requests of this loop pass waiting to go out together, by subject."""
        self._flush_scheduled = False
        self._batch_caps: dict[str, tuple[int, float]] = {}
        """Subject -> (most requests per batch, until when): the slots of a worker that split one."""
        self._suspect: dict[str, _Pending] = {}
        """Requests that were in flight across a reconnect: their final may have been lost."""
        self._upkeep: asyncio.Task[None] | None = None
        self._deadlines = _Deadlines(self._pending)
        self._background: set[asyncio.Task[None]] = set()
        self.republished = 0
        """Publishes repeated for want of a PubAck (stored once: same message id)."""
        self.resent = 0
        """Requests re-sent under a new message id after their final was lost in a reconnect."""
        self.batches = 0
        """Batches published (each one stream message for several requests)."""

    async def start(self) -> Caller:
        self._subs.append(await subscribe_inline(self.nc, f"{self._inbox}.>", self._on_inbox))
        self._subs.append(await self.nc.subscribe(names.max_deliveries_advisory(self.rp.namespace), cb=self._on_advisory))
        self._upkeep = asyncio.get_running_loop().create_task(self._run_upkeep())
        return self

    @property
    def pending_count(self) -> int:
        """Requests this caller still tracks (for leak checks)."""
        return len(self._pending)

    async def close(self) -> None:
        tasks = [t for t in (self._upkeep, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._upkeep = None
        self._deadlines.close()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()
        for pending in self._pending.values():
            pending.push(RequestPlaneUnavailable("caller closed", request_id=pending.request_id))
        self._unacked.clear()
        self._suspect.clear()
        self._gathering.clear()
        self._batches.clear()
        self._unacked_batches.clear()

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def operator_exists(self, operator: str, version: int) -> bool:
        key = (operator, version)
        seen = self._known_operators.get(key)
        if seen is not None and time.monotonic() - seen < _KNOWN_OPERATOR_TTL:
            return True
        exists = await streams.consumer_exists(self.js, self._stream, names.shared_consumer(operator, version))
        if exists:
            self._known_operators[key] = time.monotonic()
        return exists

    async def submit(
        self,
        operator: str,
        version: int,
        inputs: Mapping[str, Any],
        *,
        parameters: Mapping[str, Any] | None = None,
        deadline: float | None = None,
        timeout: float | None = None,
        target_worker: str | None = None,
        trace_id: str | None = None,
        parent_id: str | None = None,
        wait_for_operator: bool = False,
    ) -> ResponseStream:
        """Publish one request. Fails at once on a bad name, an oversize message or
        (unless ``wait_for_operator``) an operator nobody has ever served."""
        names.check_name("operator", operator)
        if target_worker is not None:
            names.check_name("worker id", target_worker)
        now = time.time()
        if deadline is None:
            deadline = now + (timeout if timeout is not None else self.rp.default_timeout)
        elif timeout is not None:
            deadline = min(deadline, now + timeout)
        if deadline <= now:
            raise DeadlineExceeded("request deadline already passed", operator=operator)
        if target_worker is None and not wait_for_operator and not await self.operator_exists(operator, version):
            raise OperatorNotFound(
                f"no worker has ever served operator {operator} v{version} in namespace {self.rp.namespace}",
                operator=operator,
                version=version,
                namespace=self.rp.namespace,
            )
        refs: list[TensorRef] = []
        plane_config = self.data_plane.config if self.data_plane is not None else None
        if plane_config is not None and any_needs_reference(inputs.values(), plane_config.inline_threshold):
            plane = await self.data_plane.get()
            inputs = await plane.outgoing(inputs, lease=max(plane.config.lease, deadline - now + LEASE_MARGIN))
            refs = [v for v in inputs.values() if isinstance(v, TensorRef)]
        request_id = new_id()
        msg = protocol.RequestMessage(
            id=request_id,
            trace_id=trace_id or request_id,
            operator=operator,
            version=version,
            deadline=deadline,
            reply_to=names.reply_subject(self._inbox, request_id),
            parameters=dict(parameters or {}),
            inputs=dict(inputs),
            parent_id=parent_id,
        )
        data = protocol.encode_request(msg)
        if len(data) > self.max_payload:
            self._release_later(refs)
            raise PayloadTooLarge(
                f"request is {len(data)} bytes, the server's max_payload is {self.max_payload}"
                + ("" if self.data_plane else " (this caller has no data plane to send tensors by reference)"),
                size=len(data),
                max_payload=self.max_payload,
                operator=operator,
            )
        subject = (
            names.directed_subject(self.rp.namespace, operator, version, target_worker)
            if target_worker
            else names.request_subject(self.rp.namespace, operator, version)
        )
        pending = _Pending(request_id, operator, deadline, subject, data, refs)
        if target_worker is None and self.rp.max_batch > 1:
            gathered = self._gathering.get(subject)
            if gathered is not None or self._pending:  # others in flight: out with this pass's others
                if gathered is None:
                    gathered = self._gathering[subject] = []
                    if not self._flush_scheduled:
                        self._flush_scheduled = True
                        asyncio.get_running_loop().call_soon(self._flush_gathered)
                gathered.append(pending)
                self._pending[request_id] = pending
                self._deadlines.add(pending)
                return ResponseStream(self, pending, deadline)
        self._pending[request_id] = pending
        self._deadlines.add(pending)
        try:
            await self._publish(pending, request_id)
            write_now(self.nc)
        except Exception as exc:
            self._forget(request_id)
            raise RequestPlaneUnavailable(f"cannot publish request: {exc}", operator=operator) from exc
        return ResponseStream(self, pending, deadline)

    def _flush_gathered(self) -> None:
        """At the end of a loop pass: publish what was gathered, in batches within the limits."""
        self._flush_scheduled = False
        gathering, self._gathering = self._gathering, {}
        for subject, gathered in gathering.items():
            live = [p for p in gathered if not p.done and p.request_id in self._pending]  # not left meanwhile
            for chunk in protocol.fit_batches(live, _frame_size, self.max_payload, self._batch_cap(subject)):
                self._spawn(self._publish_gathered(subject, chunk))

    def _batch_cap(self, subject: str) -> int:
        """Batches to an operator are no larger than the slots of its workers, once a split told
        them (a batch beyond them is split and handed back: a stream message more)."""
        cap = self._batch_caps.get(subject)
        if cap is None:
            return self.rp.max_batch
        if time.monotonic() > cap[1]:
            del self._batch_caps[subject]
            return self.rp.max_batch
        return cap[0]

    async def _publish_gathered(self, subject: str, chunk: list[_Pending]) -> None:
        try:
            if len(chunk) == 1:
                await self._publish(chunk[0], chunk[0].request_id)
                return
            batch = _Batch(new_id(), subject, chunk, protocol.encode_batch([p.data for p in chunk]))
            for pending in chunk:
                pending.batch = batch
            self._batches[batch.id] = batch
            self.batches += 1
            await self._publish_batch(batch)
        except Exception as exc:
            for pending in chunk:
                pending.push(RequestPlaneUnavailable(f"cannot publish request: {exc}",
                                                     request_id=pending.request_id, operator=pending.operator))

    async def _publish_batch(self, batch: _Batch) -> None:
        """Publish (or publish again) one batch; its PubAck comes to ``<inbox>.a.<batch id>``."""
        batch.published_at = time.monotonic()
        self._unacked_batches[batch.id] = batch
        await self.nc.publish(batch.subject, batch.data, reply=names.pub_ack_subject(self._inbox, batch.id),
                              headers={"Nats-Msg-Id": batch.id})

    def _leave_batch(self, pending: _Pending) -> None:
        """Take a request out of its batch; the batch is forgotten with its last member."""
        batch, pending.batch = pending.batch, None
        if batch is None:
            return
        if pending in batch.members:
            batch.members.remove(pending)
        if not batch.members:
            self._drop_batch(batch)

    def _drop_batch(self, batch: _Batch) -> None:
        """Forget a batch none of whose requests is tracked any more."""
        self._batches.pop(batch.id, None)
        self._unacked_batches.pop(batch.id, None)
        if batch.stream_seq is not None:
            self._by_seq.pop(batch.stream_seq, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish(self, pending: _Pending, msg_id: str) -> None:
        """Publish (or publish again) one request; its PubAck comes to ``<inbox>.a.<id>``."""
        pending.published_at = time.monotonic()
        self._unacked[pending.request_id] = pending
        await self.nc.publish(pending.subject, pending.data,
                              reply=names.pub_ack_subject(self._inbox, pending.request_id),
                              headers={"Nats-Msg-Id": msg_id})

    # -- upkeep and recovery ---------------------------------------------------

    async def recover(self) -> None:
        """After a reconnect: publish again what has no PubAck; check the others' finals."""
        for pending in list(self._pending.values()):
            if pending.final_seen or pending.done:
                continue
            if pending.request_id in self._unacked:
                self.republished += 1
                await self._publish(pending, pending.request_id if not pending.resends
                                    else f"{pending.request_id}.{pending.resends}")
            else:
                pending.gone_since = 0.0
                self._suspect[pending.request_id] = pending
        for batch in list(self._unacked_batches.values()):
            self.republished += 1
            await self._publish_batch(batch)

    async def _run_upkeep(self) -> None:
        while True:
            await asyncio.sleep(UPKEEP_EVERY)
            try:
                await self._upkeep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep going: the next pass retries
                log.warning("caller_upkeep_failed", error=f"{type(exc).__name__}: {exc}")

    async def _upkeep_once(self) -> None:
        now, wall = time.monotonic(), time.time()
        for pending in list(self._pending.values()):
            if wall > pending.deadline + ABANDONED_GRACE:  # nobody read it to the end: drop it
                if not pending.done:
                    await self.cancel(pending.request_id)
                self._forget(pending.request_id)
        if self.connected is not None and not self.connected.is_set():
            return
        for pending in list(self._unacked.values()):
            if now - pending.published_at >= PUBACK_TIMEOUT and not pending.done:
                self.republished += 1
                log.info("request_republished", request_id=pending.request_id)
                await self._publish(pending, pending.request_id if not pending.resends
                                    else f"{pending.request_id}.{pending.resends}")
        for batch in list(self._unacked_batches.values()):
            if now - batch.published_at >= PUBACK_TIMEOUT:
                self.republished += 1
                log.info("batch_republished", batch=batch.id, requests=len(batch.members))
                await self._publish_batch(batch)
        for pending in list(self._suspect.values()):
            await self._check_suspect(pending, now)

    async def _check_suspect(self, pending: _Pending, now: float) -> None:
        """Re-send a request whose final response was lost: gone from the stream, no final."""
        if pending.final_seen or pending.done or pending.request_id not in self._pending:
            self._suspect.pop(pending.request_id, None)
            return
        if pending.request_id in self._unacked or pending.stream_seq is None:
            return  # published (again), waiting for its PubAck
        if not pending.gone_since:
            try:
                await self.js.get_msg(self._stream, pending.stream_seq)
                return  # still queued or running: it will be answered
            except NotFoundError:
                pending.gone_since = now
                return
        if now - pending.gone_since < FINAL_GRACE:
            return
        self._suspect.pop(pending.request_id, None)
        pending.resends += 1
        self.resent += 1
        if pending.batch is not None:  # its batch mates keep the batch's sequence
            self._leave_batch(pending)
        elif pending.stream_seq is not None:
            self._by_seq.pop(pending.stream_seq, None)
        pending.stream_seq = None
        log.info("request_resent", request_id=pending.request_id, resends=pending.resends)
        await self._publish(pending, f"{pending.request_id}.{pending.resends}")

    def _release_later(self, refs: list[TensorRef]) -> None:
        if not refs or self.data_plane is None or self.data_plane.plane is None:
            return
        self._spawn(self.data_plane.plane.release_quietly(refs))

    async def cancel(self, request_id: str) -> None:
        """Tell workers to stop the request and drop it from the queue if it waits there."""
        pending = self._pending.get(request_id)
        if pending is None or pending.done:
            return
        pending.done = True
        try:
            await self.nc.publish(names.cancel_subject(self.rp.namespace, request_id), b"")
        except Exception:
            return
        if pending.stream_seq is not None and pending.batch is None:  # a batch's message holds others too
            self._spawn(self._delete_queued(pending.stream_seq))

    async def _delete_queued(self, seq: int) -> None:
        try:
            await self.js.delete_msg(self._stream, seq)
        except Exception:  # already taken and acknowledged: nothing to delete
            pass

    def _forget(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        self._unacked.pop(request_id, None)
        self._suspect.pop(request_id, None)
        if pending.batch is not None:
            self._leave_batch(pending)
        elif pending.stream_seq is not None:
            self._by_seq.pop(pending.stream_seq, None)
        if not pending.answered:  # no worker ran it (expired, cancelled, refused): free its inputs now
            self._release_later(pending.refs)
        pending.data = b""

    def _on_inbox(self, msg: Msg) -> None:
        parts = msg.subject.rsplit(".", 2)
        if len(parts) != 3:
            return
        _, kind, request_id = parts
        pending = self._pending.get(request_id)
        if kind == "a":
            if pending is not None:
                if self._unacked.pop(request_id, None) is not None or pending.stream_seq is None:
                    self._on_pub_ack(msg, request_id, [pending], pending, self._unacked)
                # else: the PubAck of a publish repeated meanwhile: the first one counted
            else:
                batch = self._batches.get(request_id)
                if batch is not None and (self._unacked_batches.pop(request_id, None) is not None
                                          or batch.stream_seq is None):
                    self._on_pub_ack(msg, request_id, batch.members, batch, self._unacked_batches)
            return
        if kind == "s":
            self._on_split(request_id, msg)
            return
        if kind == "b":
            self._on_finals(msg.data)
            return
        if pending is None:
            return
        try:
            resp = protocol.decode_response(msg.data)
        except InvalidRequest as exc:
            log.warning("bad_response", request_id=request_id, error=str(exc))
            return
        if resp.request_id == request_id:
            self._on_response(pending, resp)

    def _on_finals(self, data: bytes) -> None:
        """Several requests' final responses in one message (a worker's finals of one pass)."""
        try:
            frames = protocol.split_batch(data)
        except InvalidRequest as exc:
            log.warning("bad_response", error=str(exc))
            return
        for frame in frames:
            try:
                resp = protocol.decode_response(frame)
            except InvalidRequest as exc:
                log.warning("bad_response", error=str(exc))
                continue
            pending = self._pending.get(resp.request_id)
            if pending is not None:
                self._on_response(pending, resp)

    def _on_response(self, pending: _Pending, resp: protocol.ResponseMessage) -> None:
        request_id = resp.request_id
        if pending.final_seen:
            log.warning("late_response_dropped", request_id=request_id, worker=resp.worker_id, kind=resp.kind)
            return
        if resp.final:
            pending.final_seen = pending.done = pending.answered = True
            self._unacked.pop(request_id, None)
            self._suspect.pop(request_id, None)
        pending.push(resp)

    def _on_split(self, old_seq: str, msg: Msg) -> None:
        """A worker handed part of our batch (stream message ``old_seq``) back to the queue as a
        new message: those requests now live at its sequence (for the max-deliveries advisory), and
        batches to that operator are kept within the worker's slots for a while."""
        try:
            notice = json.loads(msg.data)
            seq, ids = int(notice["seq"]), set(notice["ids"])
            slots = int(notice.get("slots", 0))
            batch = self._batches.get(self._by_seq.get(int(old_seq), ""))
        except (ValueError, KeyError, TypeError):
            return
        if batch is None:
            return
        if slots >= 1:
            self._batch_caps[batch.subject] = (min(slots, self.rp.max_batch), time.monotonic() + BATCH_CAP_TTL)
        moved = [p for p in batch.members if p.request_id in ids]
        if not moved:
            return
        rest = _Batch(f"{batch.id}.{seq}", batch.subject, moved, stream_seq=seq)
        for pending in moved:
            batch.members.remove(pending)
            pending.batch, pending.stream_seq = rest, seq
        self._batches[rest.id] = rest
        self._by_seq[seq] = rest.id
        if not batch.members:
            self._drop_batch(batch)

    def _on_pub_ack(self, msg: Msg, key: str, members: list[_Pending], owner: _Pending | _Batch,
                    unacked: dict[str, Any]) -> None:
        """The stream's answer to one publish (of a request, or of a batch: ``owner``), already
        taken out of ``unacked``: note the stream sequence, or fail or retry its requests."""
        data = msg.data
        seq: int | None = None
        if data.startswith(b'{"stream":') and b'"error"' not in data:  # the common case, without json
            pos = data.rfind(b'"seq":')
            end = data.find(b",", pos)
            try:
                seq = int(data[pos + 6 : end if end > 0 else data.rfind(b"}")])
            except ValueError:
                seq = None
        if seq is None:
            headers = msg.headers or {}
            if headers.get("Status") == "503":
                # No responder: the stream is missing, or JetStream is electing a leader (a restart,
                # a lost node). Publish again later unless the stream is known to be missing.
                unacked[key] = owner
                self._spawn(self._fail_if_no_stream(key, members, unacked))
                return
            try:
                ack = json.loads(msg.data)
            except ValueError:
                return
            err = ack.get("error")
            if err:
                desc = str(err.get("description", err))
                full = "maximum" in desc or "limit" in desc or "full" in desc
                cls = RequestPlaneFull if full else RequestPlaneUnavailable
                for pending in members:
                    pending.push(cls(f"the request stream refused the request: {desc}", request_id=pending.request_id))
                return
            seq = ack.get("seq")
            if not isinstance(seq, int):
                return
        owner.stream_seq = seq
        for pending in members:
            pending.stream_seq = seq
        self._by_seq[seq] = key

    async def _fail_if_no_stream(self, key: str, members: list[_Pending], unacked: dict[str, Any]) -> None:
        try:
            await self.js.stream_info(self._stream)
            return
        except NotFoundError:
            pass
        except Exception:  # JetStream not answering yet: keep retrying within the deadline
            return
        unacked.pop(key, None)
        for pending in members:
            pending.push(RequestPlaneUnavailable(
                f"no stream takes this request: namespace {self.rp.namespace} is not deployed "
                f"(stream {self._stream} missing)", request_id=pending.request_id, namespace=self.rp.namespace))

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            adv = json.loads(msg.data)
            seq = int(adv["stream_seq"])
        except (ValueError, KeyError, TypeError):
            return
        key = self._by_seq.get(seq)
        if key is None:
            return
        pending = self._pending.get(key)
        batch = self._batches.get(key) if pending is None else None
        members = [pending] if pending is not None else list(batch.members) if batch is not None else []
        if not members:
            return
        for pending in members:
            pending.push(
                MaxDeliveriesExceeded(
                    f"request was delivered {adv.get('deliveries')} times and no worker finished it",
                    request_id=pending.request_id,
                    operator=pending.operator,
                    deliveries=adv.get("deliveries"),
                )
            )
        await self._delete_queued(seq)
