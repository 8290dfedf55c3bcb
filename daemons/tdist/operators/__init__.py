"""Operators: units of work addressed by name and version.

A Python operator subclasses ``Operator`` and implements ``execute``::

    class Doubler(Operator):
        async def execute(self, request: Request) -> dict[str, np.ndarray]:
            x = request.input("x")
            await request.send({"progress": np.array([50])})   # optional partial responses
            return {"y": x * 2}                                  # the final response

``execute`` may call other operators with ``request.operator(name, version)``;
those child requests share the trace id, the deadline and the cancellation.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tdist.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from tdist.client import RemoteOperator

SendPartial = Callable[[Mapping[str, Any], Mapping[str, Any] | None], Awaitable[None]]
MakeRemote = Callable[[str, int, "Request"], "RemoteOperator"]


class Request:
    """One request as the operator sees it."""

    def __init__(
        self,
        *,
        id: str,
        trace_id: str,
        operator: str,
        version: int,
        deadline: float,
        attempt: int,
        parameters: Mapping[str, Any],
        inputs: Mapping[str, np.ndarray],
        send_partial: SendPartial,
        make_remote: MakeRemote,
        hold: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.id = id
        self.trace_id = trace_id
        self.operator_name = operator
        self.version = version
        self.deadline = deadline
        self.attempt = attempt
        self.parameters = parameters
        self.inputs = inputs
        self._cancelled: asyncio.Event | None = None
        self._send_partial = send_partial
        self._make_remote = make_remote
        self.hold = hold
        """Keeps tensor references (unpulled child outputs) until this request ends."""

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when the caller cancels; the operator's task is also cancelled."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    def input(self, name: str) -> np.ndarray:
        """The named input, or an ``InvalidRequest`` naming what was expected and given."""
        try:
            return self.inputs[name]
        except KeyError:
            raise InvalidRequest(
                f"operator {self.operator_name} needs input {name!r}; the request has {sorted(self.inputs)}",
                operator=self.operator_name,
                input=name,
            ) from None

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.time()

    async def send(self, outputs: Mapping[str, Any], parameters: Mapping[str, Any] | None = None) -> None:
        """Send a partial (non-final) response."""
        await self._send_partial(outputs, parameters)

    def operator(self, name: str, version: int = 1) -> RemoteOperator:
        """Call another operator as part of this request."""
        return self._make_remote(name, version, self)


class Operator:
    """Base class of Python operators; one instance serves all of a worker's requests."""

    pull_inputs: ClassVar[bool] = True
    """Pull inputs that came by reference before ``execute``. An operator that only forwards
    tensors sets this False and gets ``TensorRef`` descriptors: their bytes never reach it."""

    def __init__(self, name: str, version: int, parameters: Mapping[str, Any]) -> None:
        self.name = name
        self.version = version
        self.parameters = dict(parameters)

    async def setup(self) -> None:
        """Load what the operator needs before the worker starts pulling."""

    async def execute(self, request: Request) -> Mapping[str, Any] | None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what ``setup`` took; called once when the worker stops."""


def load_operator_class(implementation: str) -> type[Operator]:
    """Resolve ``module:Class`` or ``path/to/file.py:Class``."""
    target, _, class_name = implementation.rpartition(":")
    if not target or not class_name:
        raise ConfigError(f"implementation {implementation!r} must be 'module:Class' or 'file.py:Class'",
                          key="implementation")
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target).resolve()
            if not path.is_file():
                raise ConfigError(f"operator file {str(path)!r} does not exist", key="implementation")
            module_name = f"tdist_operator_{abs(hash(str(path)))}"
            module = sys.modules.get(module_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(module_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot import {target!r}: {type(exc).__name__}: {exc}", key="implementation") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Operator)):
        raise ConfigError(f"{class_name!r} in {target!r} is not a tdist Operator class", key="implementation")
    return cls
