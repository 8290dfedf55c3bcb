"""The caller side of the request plane.

A request is published into the namespace's work-queue stream with the caller's
inbox as the reply subject of the publish, so the stream's acknowledgement
(PubAck, or the refusal when limits are reached) arrives asynchronously on the
same inbox subscription as the responses: one round trip less than awaiting the
PubAck. Responses come back over core NATS to ``<inbox>.r.<request id>``.

The caller also listens to the server's max-deliveries advisories: when every
delivery of a request ended without a final response (its workers died), the
matching caller gets ``MaxDeliveriesExceeded`` instead of waiting for its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

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
from tdist.logs import get_logger
from tdist.data_plane.plane import LazyDataPlane, needs_reference
from tdist.request_plane import protocol, streams, subjects

log = get_logger("tdist.caller")

# A positive answer to "does this operator have a consumer?" is trusted this long.
_KNOWN_OPERATOR_TTL = 30.0


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
    items: collections.deque[protocol.ResponseMessage | TdistError] = field(default_factory=collections.deque)
    waiter: asyncio.Future[None] | None = None
    stream_seq: int | None = None
    done: bool = False
    """Final response seen or cancel sent: nothing more to cancel."""
    final_seen: bool = False

    def push(self, item: protocol.ResponseMessage | TdistError) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        pending = self._pending
        if not pending.items:
            remaining = self.deadline - time.time()
            if remaining > 0:
                # One future and one timer per wait: cheaper than a queue under asyncio.timeout.
                loop = asyncio.get_running_loop()
                waiter = pending.waiter = loop.create_future()
                timer = loop.call_later(remaining, _wake, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    pending.waiter = None
        if pending.items:
            return pending.items.popleft()
        raise DeadlineExceeded(
            "no final response before the deadline", request_id=self.request_id, operator=pending.operator
        )

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
                 data_plane: LazyDataPlane | None = None) -> None:
        self.nc = nc
        self.data_plane = data_plane
        self.js: JetStreamContext = nc.jetstream()
        self.rp = rp
        self.component_id = component_id or new_id()
        self._inbox = nc.new_inbox()
        self._pending: dict[str, _Pending] = {}
        self._by_seq: dict[int, str] = {}
        self._known_operators: dict[tuple[str, int], float] = {}
        self._subs: list[Subscription] = []
        self._stream = subjects.stream_name(rp.namespace)

    async def start(self) -> Caller:
        await streams.ensure_stream(self.js, self.rp, self.nc.max_payload, update=False)
        self._subs.append(await self.nc.subscribe(f"{self._inbox}.>", cb=self._on_inbox))
        self._subs.append(await self.nc.subscribe(subjects.max_deliveries_advisory(self.rp.namespace), cb=self._on_advisory))
        return self

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()
        for pending in self._pending.values():
            pending.push(RequestPlaneUnavailable("caller closed", request_id=pending.request_id))

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def operator_exists(self, operator: str, version: int) -> bool:
        key = (operator, version)
        seen = self._known_operators.get(key)
        if seen is not None and time.monotonic() - seen < _KNOWN_OPERATOR_TTL:
            return True
        exists = await streams.consumer_exists(self.js, self._stream, subjects.shared_consumer(operator, version))
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
        subjects.check_name("operator", operator)
        if target_worker is not None:
            subjects.check_name("worker id", target_worker)
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
        if self.data_plane is not None and any(
            needs_reference(v, self.data_plane.config.inline_threshold) for v in inputs.values()
        ):
            inputs = await (await self.data_plane.get()).outgoing(inputs)
        request_id = new_id()
        msg = protocol.RequestMessage(
            id=request_id,
            trace_id=trace_id or request_id,
            operator=operator,
            version=version,
            deadline=deadline,
            reply_to=f"{self._inbox}.r.{request_id}",
            parameters=dict(parameters or {}),
            inputs=dict(inputs),
            parent_id=parent_id,
        )
        data = protocol.encode_request(msg)
        if len(data) > self.max_payload:
            raise PayloadTooLarge(
                f"request is {len(data)} bytes, the server's max_payload is {self.max_payload}"
                + ("" if self.data_plane else " (this caller has no data plane to send tensors by reference)"),
                size=len(data),
                max_payload=self.max_payload,
                operator=operator,
            )
        subject = (
            subjects.directed_subject(self.rp.namespace, operator, version, target_worker)
            if target_worker
            else subjects.request_subject(self.rp.namespace, operator, version)
        )
        pending = _Pending(request_id, operator)
        self._pending[request_id] = pending
        try:
            await self.nc.publish(subject, data, reply=f"{self._inbox}.a.{request_id}")
        except Exception as exc:
            self._forget(request_id)
            raise RequestPlaneUnavailable(f"cannot publish request: {exc}", operator=operator) from exc
        return ResponseStream(self, pending, deadline)

    async def cancel(self, request_id: str) -> None:
        """Tell workers to stop the request and drop it from the queue if it waits there."""
        pending = self._pending.get(request_id)
        if pending is None or pending.done:
            return
        pending.done = True
        try:
            await self.nc.publish(subjects.cancel_subject(self.rp.namespace, request_id), b"")
        except Exception:
            return
        if pending.stream_seq is not None:
            asyncio.get_running_loop().create_task(self._delete_queued(pending.stream_seq))

    async def _delete_queued(self, seq: int) -> None:
        try:
            await self.js.delete_msg(self._stream, seq)
        except Exception:  # already taken and acknowledged: nothing to delete
            pass

    def _forget(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None and pending.stream_seq is not None:
            self._by_seq.pop(pending.stream_seq, None)

    async def _on_inbox(self, msg: Msg) -> None:
        parts = msg.subject.rsplit(".", 2)
        if len(parts) != 3:
            return
        _, kind, request_id = parts
        pending = self._pending.get(request_id)
        if pending is None:
            return
        if kind == "a":
            self._on_pub_ack(pending, msg)
            return
        try:
            resp = protocol.decode_response(msg.data)
        except InvalidRequest as exc:
            log.warning("bad_response", request_id=request_id, error=str(exc))
            return
        if resp.request_id != request_id:
            return
        if pending.final_seen:
            log.warning("late_response_dropped", request_id=request_id, worker=resp.worker_id, kind=resp.kind)
            return
        if resp.final:
            pending.final_seen = pending.done = True
        pending.push(resp)

    def _on_pub_ack(self, pending: _Pending, msg: Msg) -> None:
        data = msg.data
        if data.startswith(b'{"stream":') and b'"error"' not in data:  # the common case, without json
            pos = data.rfind(b'"seq":')
            end = data.find(b",", pos)
            try:
                seq = int(data[pos + 6 : end if end > 0 else data.rfind(b"}")])
            except ValueError:
                seq = None
            if seq is not None:
                pending.stream_seq = seq
                self._by_seq[seq] = pending.request_id
                return
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            pending.push(
                RequestPlaneUnavailable("no stream takes this request", request_id=pending.request_id)
            )
            return
        try:
            ack = json.loads(msg.data)
        except ValueError:
            return
        err = ack.get("error")
        if err:
            desc = str(err.get("description", err))
            cls = RequestPlaneFull if "maximum" in desc or "limit" in desc or "full" in desc else RequestPlaneUnavailable
            pending.push(cls(f"the request stream refused the request: {desc}", request_id=pending.request_id))
            return
        seq = ack.get("seq")
        if isinstance(seq, int):
            pending.stream_seq = seq
            self._by_seq[seq] = pending.request_id

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            adv = json.loads(msg.data)
            seq = int(adv["stream_seq"])
        except (ValueError, KeyError, TypeError):
            return
        request_id = self._by_seq.get(seq)
        if request_id is None:
            return
        pending = self._pending.get(request_id)
        if pending is None:
            return
        pending.push(
            MaxDeliveriesExceeded(
                f"request was delivered {adv.get('deliveries')} times and no worker finished it",
                request_id=request_id,
                operator=pending.operator,
                deliveries=adv.get("deliveries"),
            )
        )
        await self._delete_queued(seq)
