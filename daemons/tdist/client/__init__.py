"""The caller API: connect to a namespace and call operators by name and version.

    async with Client(NatsConfig(servers=("nats://127.0.0.1:4222",)), namespace="demo") as client:
        echo = client.operator("echo", version=1)
        result = await echo.infer({"input": np.arange(4)}, timeout=5)
        async for response in echo.stream({"input": x}):   # partial responses, then the final one
            ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from tdist.config import DataPlaneConfig, NatsConfig, RequestPlaneConfig
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.plane import LazyDataPlane
from tdist.errors import DataPlaneError, DeadlineExceeded, RegistryError
from tdist.registry import Registry, WorkerInfo
from tdist.request_plane.caller import Caller, ResponseStream, new_id
from tdist.request_plane.protocol import ResponseMessage
from tdist.runtime import Runtime

__all__ = ["Client", "RemoteOperator", "Response", "ResponseStream"]


@dataclass(frozen=True, slots=True)
class Response:
    """A response as operators' callers see it."""

    request_id: str
    outputs: Mapping[str, np.ndarray]
    parameters: Mapping[str, Any]
    worker_id: str
    final: bool
    attempt: int

    @classmethod
    def from_message(cls, msg: ResponseMessage) -> Response:
        return cls(msg.request_id, msg.outputs, msg.parameters, msg.worker_id, msg.final, msg.attempt)


@dataclass(frozen=True, slots=True)
class CallLink:
    """What a child request inherits from the request its operator is serving."""

    trace_id: str
    parent_id: str
    deadline: float
    hold: Callable[[list[TensorRef]], None] | None = None
    """Takes the tensor references of responses kept unpulled; released when the parent ends."""


class RemoteOperator:
    """A handle on an operator: each call goes to exactly one worker (or ``target_worker``)."""

    def __init__(
        self,
        caller: Caller,
        name: str,
        version: int = 1,
        *,
        target_worker: str | None = None,
        link: CallLink | None = None,
    ) -> None:
        self._caller = caller
        self.name = name
        self.version = version
        self.target_worker = target_worker
        self._link = link

    def to_worker(self, worker_id: str) -> RemoteOperator:
        """The same operator, but every request goes to one named worker (sticky sessions)."""
        return RemoteOperator(self._caller, self.name, self.version, target_worker=worker_id, link=self._link)

    async def call(
        self,
        inputs: Mapping[str, Any],
        *,
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        wait_for_operator: bool = False,
    ) -> ResponseStream:
        """Send one request; returns its response stream (see ``ResponseStream``)."""
        trace_id = parent_id = None
        if self._link is not None:
            trace_id, parent_id = self._link.trace_id, self._link.parent_id
            deadline = self._link.deadline if deadline is None else min(deadline, self._link.deadline)
        return await self._caller.submit(
            self.name,
            self.version,
            inputs,
            parameters=parameters,
            deadline=deadline,
            timeout=timeout,
            target_worker=self.target_worker,
            trace_id=trace_id,
            parent_id=parent_id,
            wait_for_operator=wait_for_operator,
        )

    async def _outputs(self, msg: ResponseMessage, pull_outputs: bool) -> Response:
        refs = [v for v in msg.outputs.values() if isinstance(v, TensorRef)]
        if refs and pull_outputs:
            plane = await self._caller.data_plane.get() if self._caller.data_plane else None
            if plane is None:
                raise DataPlaneError("response tensors came by reference, but this caller has no data plane")
            msg.outputs = await plane.materialize(msg.outputs)
        elif refs and self._link is not None and self._link.hold is not None:
            self._link.hold(refs)
        return Response.from_message(msg)

    async def stream(self, inputs: Mapping[str, Any], *, pull_outputs: bool = True, **kwargs: Any
                     ) -> AsyncIterator[Response]:
        """Partial responses, then the final one. With ``pull_outputs=False`` large outputs stay
        ``TensorRef`` descriptors (to forward them; release what you keep)."""
        async with await self.call(inputs, **kwargs) as responses:  # leaving early cancels the request
            async for msg in responses:
                yield await self._outputs(msg, pull_outputs)

    async def infer(self, inputs: Mapping[str, Any], *, pull_outputs: bool = True, **kwargs: Any) -> Response:
        """Send one request and return its final response (outputs pulled unless ``pull_outputs=False``)."""
        async with await self.call(inputs, **kwargs) as responses:
            return await self._outputs(await responses.final(), pull_outputs)


class Client:
    """A connection to one namespace of a tdist cluster (one ``Runtime``: connection, caller,
    data plane and registry, recovered together after a reconnect)."""

    def __init__(
        self,
        nats: NatsConfig | None = None,
        *,
        namespace: str | None = None,
        request_plane: RequestPlaneConfig | None = None,
        data_plane: DataPlaneConfig | None = None,
        name: str = "tdist-client",
    ) -> None:
        rp = request_plane or RequestPlaneConfig()
        if namespace is not None and namespace != rp.namespace:
            rp = RequestPlaneConfig(**{**rp.__dict__, "namespace": namespace})
        self.nats_config = nats or NatsConfig()
        self.request_plane = rp
        self.data_plane_config = data_plane or DataPlaneConfig()
        self.component_id = f"client-{new_id()}"
        self.runtime = Runtime(self.nats_config, rp, self.data_plane_config, component_id=self.component_id,
                               name=name)

    @property
    def data_plane(self) -> LazyDataPlane:
        return self.runtime.data_plane

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        await self.runtime.start()

    async def close(self, wait_for_release: float = 10.0) -> None:
        """Close; first wait up to ``wait_for_release`` s for consumers to release our tensors."""
        await self.runtime.close(wait_for_release)

    @property
    def caller(self) -> Caller:
        return self.runtime.caller

    def operator(self, name: str, version: int = 1, *, target_worker: str | None = None) -> RemoteOperator:
        return RemoteOperator(self.caller, name, version, target_worker=target_worker)

    async def registry(self) -> Registry:
        return await self.runtime.registry()

    async def workers(self) -> dict[str, WorkerInfo]:
        """The live workers of this namespace, by id."""
        try:
            return await (await self.registry()).list_workers()
        except RegistryError as exc:
            if exc.details.get("missing"):  # nothing deployed in this namespace yet
                return {}
            raise

    async def wait_for_workers(self, operator: str, count: int = 1, timeout: float = 30.0) -> list[WorkerInfo]:
        """Wait until ``count`` live workers host ``operator``."""
        deadline = time.monotonic() + timeout
        while True:  # the namespace may not be deployed yet: wait for its registry too
            try:
                registry = await self.registry()
                break
            except RegistryError:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"no registry for namespace {self.request_plane.namespace} "
                                           f"within {timeout} s", operator=operator, count=count) from None
                await asyncio.sleep(0.2)

        def serving(workers: dict[str, WorkerInfo]) -> list[WorkerInfo]:
            return [w for w in workers.values() if w.hosts(operator) and w.state == "serving"]

        async with registry.watch() as watch:
            try:
                await watch.wait_for(lambda ws: len(serving(ws)) >= count, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{len(serving(watch.workers))} of {count} workers for {operator} came up in {timeout} s",
                    operator=operator,
                    count=count,
                ) from None
            return serving(watch.workers)
