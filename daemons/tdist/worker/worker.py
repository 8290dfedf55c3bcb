"""A worker: hosts operators and serves their requests from the work queue.

For each operator the worker pulls only while it has free slots
(``max_inflight``), acknowledges a request only after its final response is
sent, and tells the server a long request is still in progress so that it is
not redelivered while its worker lives. A worker that dies leaves its
unacknowledged requests to be redelivered to another worker.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tdist.client import CallLink, RemoteOperator
from tdist.config import PING_OPERATOR, DataPlaneConfig, NatsConfig, OperatorConfig, RequestPlaneConfig, WorkerConfig
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.plane import LazyDataPlane, needs_reference
from tdist.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    OperatorNotFound,
    PayloadTooLarge,
    TdistError,
)
from tdist.logs import get_logger
from tdist.operators import Operator, Request, load_operator_class
from tdist.operators.builtin import Ping
from tdist.registry import OperatorInfo, Registry, WorkerInfo
from tdist.request_plane import protocol, streams, subjects
from tdist.request_plane.caller import Caller
from tdist.request_plane.connection import CLOSE_STEP_TIMEOUT, close_connection, connect
from tdist.request_plane.puller import Puller
from tdist.worker.states import WorkerState, check_transition

log = get_logger("tdist.worker")

_CANCELLED_MEMORY = 10_000
OPERATOR_CLOSE_TIMEOUT = 60.0
OUTPUT_RELEASE_WAIT = 10.0
DEADLINE_SWEEP = 0.05


@dataclass(eq=False)
class _Held:
    """A delivered, unacknowledged request message: waiting for a slot or running."""

    msg: Msg
    runner: OperatorRunner
    request_id: str | None = None
    task: asyncio.Task[None] | None = None
    request: Request | None = None
    cancel_reason: str | None = None
    """Why its task was cancelled: 'caller', 'deadline' or 'shutdown'."""
    deadline: float | None = None
    """Set while the operator runs; the deadline sweep cancels it once passed."""
    refs: list[TensorRef] = field(default_factory=list)
    """Tensor references this request holds (its inputs, kept child outputs)."""
    last_progress: float = field(default_factory=time.monotonic)


async def _bounded(step: str, aw: Any, timeout: float = CLOSE_STEP_TIMEOUT) -> None:
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("close_step_timed_out", step=step, seconds=timeout)
    except Exception as exc:
        log.warning("close_step_failed", step=step, error=f"{type(exc).__name__}: {exc}")


class OperatorRunner:
    """One hosted operator: its instance, its slots and its pull on the shared queue."""

    def __init__(self, worker: Worker, config: OperatorConfig, instance: Operator) -> None:
        self.worker = worker
        self.config = config
        self.instance = instance
        self.slots = asyncio.Semaphore(config.max_inflight)
        self.held = 0
        """Messages delivered and not yet finished (waiting for a slot or running)."""
        self.running = 0
        self.served = 0
        self.puller: Puller | None = None
        # Top up in batches once a quarter of the slots is free, but never leave none asked for.
        self._min_batch = max(1, config.max_inflight // 4)

    @property
    def key(self) -> tuple[str, int]:
        return (self.config.name, self.config.version)

    def top_up(self) -> None:
        puller = self.puller
        if puller is None or self.worker.state is not WorkerState.SERVING:
            return
        outstanding = puller.outstanding
        want = self.config.max_inflight - self.held - outstanding
        if want >= self._min_batch or (want > 0 and outstanding == 0):
            self.worker.spawn(puller.request(want))

    def info(self) -> OperatorInfo:
        return OperatorInfo(self.config.name, self.config.version, self.config.max_inflight, self.running)


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
    ) -> None:
        self.config = config
        self.nats_config = nats
        self.rp = request_plane
        self.id = worker_id or f"{config.name}-{uuid.uuid4().hex[:10]}"
        subjects.check_name("worker id", self.id)
        self.state = WorkerState.STARTING
        self.started_at = time.time()
        self.data_plane = LazyDataPlane(self.id, data_plane or DataPlaneConfig())
        self.runners: dict[tuple[str, int], OperatorRunner] = {}
        self.nc: NatsClient | None = None
        self.caller: Caller | None = None
        self.registry: Registry | None = None
        self._directed: Puller | None = None
        self._held: set[_Held] = set()
        self._by_request: dict[str, _Held] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._maintenance: list[asyncio.Task[None]] = []
        self._cancel_sub: Any = None
        self._stream = subjects.stream_name(request_plane.namespace)
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
        try:
            for op_cfg in self.config.operators:
                cls = load_operator_class(op_cfg.implementation)
                instance = cls(op_cfg.name, op_cfg.version, op_cfg.parameters)
                await instance.setup()
                self.runners[(op_cfg.name, op_cfg.version)] = OperatorRunner(self, op_cfg, instance)
            await self.data_plane.get()  # publish a data-plane address from the start
            self.nc = await connect(self.nats_config, name=f"tdist-worker {self.id}", on_reconnect=self._on_reconnect)
            self.caller = await Caller(self.nc, self.rp, component_id=self.id, data_plane=self.data_plane).start()
            self.registry = await Registry.open(self.nc.jetstream(), self.rp.namespace)
            self._cancel_sub = await self.nc.subscribe(subjects.cancel_wildcard(self.rp.namespace), cb=self._on_cancel)
            await self._declare_consumers()
            await self._start_pullers()
            self._set_state(WorkerState.SERVING)
            await self._register()
            for runner in self.runners.values():
                runner.top_up()
            self._top_up_directed()
            loop = asyncio.get_running_loop()
            self._maintenance = [loop.create_task(self._maintain()), loop.create_task(self._sweep_deadlines())]
            log.info("worker_serving", worker=self.id, operators=[f"{n}:{v}" for n, v in self.runners])
        except BaseException:
            self.state = WorkerState.STOPPED
            await self._close_resources()
            raise

    async def _declare_consumers(self) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        await streams.ensure_stream(js, self.rp, self.nc.max_payload, update=True)
        for runner in self.runners.values():
            cfg = streams.shared_consumer_config(self.rp, runner.config.name, runner.config.version)
            await streams.ensure_consumer(js, self._stream, cfg)
        await streams.ensure_consumer(js, self._stream, streams.directed_consumer_config(self.rp, self.id))

    async def _start_pullers(self) -> None:
        assert self.nc is not None
        for runner in self.runners.values():
            consumer = subjects.shared_consumer(runner.config.name, runner.config.version)
            runner.puller = Puller(
                self.nc, self._stream, consumer, lambda m, r=runner: self._accept(m, r), runner.top_up
            )
            await runner.puller.start()
        self._directed = Puller(
            self.nc, self._stream, subjects.directed_consumer(self.id), self._accept_directed, self._top_up_directed
        )
        await self._directed.start()

    def _top_up_directed(self) -> None:
        if self._directed is not None and self.state is WorkerState.SERVING and self._directed.outstanding == 0:
            self.spawn(self._directed.request(1))

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
                held.cancel_reason = "shutdown"
                if held.task is not None:
                    held.task.cancel()
            await asyncio.gather(*[h.task for h in self._held if h.task], return_exceptions=True)

    async def stop(self) -> None:
        """Drain (if serving), deregister and close everything."""
        if self.state is WorkerState.STOPPED:
            return
        await self.drain()
        self._set_state(WorkerState.STOPPED)
        await self._close_resources()

    async def _close_resources(self) -> None:
        """Release everything, each step bounded: a stuck step is logged, never a stuck worker."""
        for task in self._maintenance:
            task.cancel()
        await _bounded("maintenance", asyncio.gather(*self._maintenance, return_exceptions=True))
        self._maintenance = []
        for puller in self._pullers():
            await _bounded("puller_stop", puller.stop())
        if self.registry is not None:
            await _bounded("deregister", self.registry.delete(self.id))
        for task in list(self._tasks):
            task.cancel()
        await _bounded("tasks", asyncio.gather(*self._tasks, return_exceptions=True))
        for runner in self.runners.values():
            await _bounded(f"operator_close {runner.config.name}", runner.instance.close(), OPERATOR_CLOSE_TIMEOUT)
        if self.caller is not None:
            await _bounded("caller_close", self.caller.close())
        # Callers may still be pulling outputs of the last requests: give them a moment.
        wait = min(self.config.drain_timeout, OUTPUT_RELEASE_WAIT)
        await _bounded("data_plane_close", self.data_plane.close(wait_for_release=wait), wait + 15)
        if self.nc is not None:
            await _bounded("nats_close", close_connection(self.nc), 3 * CLOSE_STEP_TIMEOUT)
        log.info("worker_stopped", worker=self.id)

    def _pullers(self) -> list[Puller]:
        found = [r.puller for r in self.runners.values() if r.puller is not None]
        return found + ([self._directed] if self._directed is not None else [])

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- registry and upkeep -------------------------------------------------

    def info(self) -> WorkerInfo:
        plane = self.data_plane.plane
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
            nats_in_bytes=int(self.nc.stats["in_bytes"]) if self.nc is not None else 0,
        )

    async def _register(self) -> None:
        if self.registry is None or self.state is WorkerState.STOPPED:
            return
        try:
            await self.registry.put(self.info())
        except Exception as exc:
            log.warning("heartbeat_failed", worker=self.id, error=str(exc))

    async def _maintain(self) -> None:
        """Heartbeats, in-progress signals for held requests, lost pull requests."""
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
            for held in list(self._held):
                if now - held.last_progress >= progress_every:
                    held.last_progress = now
                    await self._ack(held.msg, b"+WPI")
            for puller in self._pullers():
                puller.forget_stale()
            for runner in self.runners.values():
                if runner.puller is not None and runner.puller.consumer_missing:
                    runner.puller.consumer_missing = False
                    await self._recover()
                runner.top_up()
            self._top_up_directed()

    async def _sweep_deadlines(self) -> None:
        """Cancel operators whose request deadline passed.

        One sweep every DEADLINE_SWEEP seconds costs less than a timer per request;
        the caller enforces its deadline exactly, this only stops wasted work.
        """
        while True:
            await asyncio.sleep(DEADLINE_SWEEP)
            now = time.time()
            for held in list(self._held):
                if held.deadline is not None and now >= held.deadline and held.cancel_reason is None:
                    held.cancel_reason = "deadline"
                    if held.task is not None:
                        held.task.cancel()

    async def _on_reconnect(self) -> None:
        self.spawn(self._recover())

    async def _recover(self) -> None:
        """After a reconnect the server holds none of our pull requests; it may have lost consumers too."""
        try:
            await self._declare_consumers()
        except Exception as exc:
            log.warning("redeclare_failed", worker=self.id, error=str(exc))
        for puller in self._pullers():
            puller.reset()
        for runner in self.runners.values():
            runner.top_up()
        self._top_up_directed()
        await self._register()

    # -- serving -------------------------------------------------------------

    def _accept(self, msg: Msg, runner: OperatorRunner) -> None:
        held = _Held(msg, runner)
        runner.held += 1
        self._held.add(held)
        self._idle.clear()
        # Tracked through _held (not spawn): one task per request is the hot path.
        held.task = asyncio.get_running_loop().create_task(self._serve(held))

    def _accept_directed(self, msg: Msg) -> None:
        self._top_up_directed()
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
            return
        self._accept(msg, runner)

    async def _reject_unknown(self, msg: Msg, operator: str) -> None:
        try:
            req = protocol.decode_request(msg.data)
            await self._send(
                req.reply_to,
                self._error(req.id, OperatorNotFound(
                    f"worker {self.id} does not host operator {req.operator} v{req.version}",
                    operator=req.operator, version=req.version, worker=self.id,
                    hosted=[f"{n}:{v}" for n, v in self.runners],
                ), self._attempt(msg)),
            )
        except InvalidRequest as exc:
            await self._answer_malformed(exc, msg)
        await self._ack(msg, b"+TERM")

    def _finish(self, held: _Held) -> None:
        held.runner.held -= 1
        self._held.discard(held)
        if held.request_id is not None:
            self._by_request.pop(held.request_id, None)
        if not self._held:
            self._idle.set()
        held.runner.top_up()

    @staticmethod
    def _attempt(msg: Msg) -> int:
        """The delivery count, read straight from the ack subject (v1: 9 tokens, v2: 12)."""
        tokens = (msg.reply or "").split(".")
        try:
            return int(tokens[4] if len(tokens) == 9 else tokens[6])
        except (IndexError, ValueError):
            return 1

    async def _serve(self, held: _Held) -> None:
        msg, runner = held.msg, held.runner
        req: protocol.RequestMessage | None = None
        attempt = self._attempt(msg)
        try:
            try:
                req = protocol.decode_request(msg.data)
            except InvalidRequest as exc:
                await self._answer_malformed(exc, msg)
                await self._ack(msg, b"+TERM")
                return
            held.request_id = req.id
            self._by_request[req.id] = held
            structlog.contextvars.bind_contextvars(request_id=req.id, trace_id=req.trace_id, operator=req.operator)
            refusal = self._refusal(held, req, attempt)
            if refusal is not None:
                await self._finish_with(held, req, refusal)
                return
            async with runner.slots:
                refusal = self._refusal(held, req, attempt)
                if refusal is not None:
                    await self._finish_with(held, req, refusal)
                    return
                runner.running += 1
                try:
                    final = await self._execute(held, runner, req, attempt)
                finally:
                    runner.running -= 1
                    runner.served += 1
            await self._finish_with(held, req, final)
        except asyncio.CancelledError:
            if held.cancel_reason in ("caller", "deadline") and req is not None:
                task = asyncio.current_task()
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
            if held.cancel_reason == "shutdown":
                await self._ack(msg, b"-NAK")  # hand it to another worker now
            raise
        except Exception as exc:  # a bug of ours: never leave the request hanging
            log.exception("serve_failed", error=str(exc))
            await self._ack(msg, b"-NAK")
        finally:
            self._finish(held)

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
        async def send_partial(outputs: Mapping[str, Any], parameters: Mapping[str, Any] | None) -> None:
            partial = protocol.ResponseMessage(
                req.id, "partial", self.id, attempt, await self._outgoing(outputs), dict(parameters or {})
            )
            await self._send(req.reply_to, partial, check=True)

        plane = await self.data_plane.get()
        inputs = req.inputs
        held.refs = [v for v in inputs.values() if isinstance(v, TensorRef)]  # released once acknowledged
        if held.refs and runner.instance.pull_inputs:
            inputs = await plane.materialize(inputs, release=False)
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
        held.deadline = req.deadline  # from now on the deadline sweep may cancel it
        try:
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
        if not any(needs_reference(v, threshold) for v in outputs.values()):
            return dict(outputs)
        return await (await self.data_plane.get()).outgoing(outputs)

    def _remote_for(self, name: str, version: int, request: Request) -> RemoteOperator:
        assert self.caller is not None
        return RemoteOperator(
            self.caller, name, version, link=CallLink(request.trace_id, request.id, request.deadline, request.hold)
        )

    def _error(self, request_id: str, exc: TdistError, attempt: int) -> protocol.ResponseMessage:
        return protocol.ResponseMessage(request_id, "error", self.id, attempt, error=protocol.ErrorInfo.from_exception(exc))

    async def _finish_with(self, held: _Held, req: protocol.RequestMessage, final: protocol.ResponseMessage) -> None:
        """Send the final response, then acknowledge: never the other way round. Only then
        release the request's tensor references (a redelivery would still need them)."""
        await self._send(req.reply_to, final)
        await self._ack(held.msg, b"+ACK")
        if held.refs:
            plane = self.data_plane.plane
            if plane is not None:
                await plane.release_quietly(held.refs)
            held.refs = []

    async def _answer_malformed(self, exc: InvalidRequest, msg: Msg) -> None:
        reply = exc.details.get("reply_to")
        log.warning("malformed_request", error=exc.message, subject=msg.subject, can_answer=bool(reply))
        if isinstance(reply, str) and reply:
            request_id = reply.rsplit(".", 1)[-1]
            await self._send(reply, self._error(request_id, exc, self._attempt(msg)))

    async def _send(self, reply_to: str, resp: protocol.ResponseMessage, *, check: bool = False) -> None:
        """Publish a response; one too large for the server becomes an error (or raises, for partials)."""
        assert self.nc is not None
        data = protocol.encode_response(resp)
        if len(data) > self.nc.max_payload:
            too_large = PayloadTooLarge(
                f"response is {len(data)} bytes, the server's max_payload is {self.nc.max_payload}",
                size=len(data), max_payload=self.nc.max_payload,
            )
            if check:
                raise too_large
            data = protocol.encode_response(self._error(resp.request_id, too_large, resp.attempt))
        try:
            await self.nc.publish(reply_to, data)
        except Exception as exc:
            log.warning("response_publish_failed", error=str(exc))

    async def _ack(self, msg: Msg, kind: bytes) -> None:
        if not msg.reply or self.nc is None:
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
        held.cancel_reason = "caller"
        if held.request is not None:
            held.request.cancelled.set()
        if held.task is not None:
            held.task.cancel()
