"""Operators used by the tests. Loaded by path, so worker processes can use them too."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np

from tdist.operators import Operator, Request


class Counting(Operator):
    """Echoes after ``delay`` seconds and records the highest concurrency it saw."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.active = 0
        self.peak = 0
        self.executed: list[str] = []

    async def execute(self, request: Request) -> Mapping[str, Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.executed.append(request.id)
        try:
            await asyncio.sleep(float(request.parameters.get("delay", self.parameters.get("delay", 0.0))))
            return request.inputs
        finally:
            self.active -= 1


class Announcing(Operator):
    """Sends a partial 'started' response, works ``delay`` seconds, then echoes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cancelled: list[str] = []

    async def execute(self, request: Request) -> Mapping[str, Any]:
        await request.send({"started": np.array([1], dtype=np.int8)})
        try:
            await asyncio.sleep(float(request.parameters.get("delay", self.parameters.get("delay", 1.0))))
        except asyncio.CancelledError:
            self.cancelled.append(request.id)
            raise
        return request.inputs


class Streaming(Operator):
    """Sends ``count`` partial responses numbered 0..count-1, then a final one."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        count = int(request.parameters.get("count", 3))
        for i in range(count):
            await request.send({"index": np.array([i], dtype=np.int64)})
        return {"count": np.array([count], dtype=np.int64)}


class Raising(Operator):
    async def execute(self, request: Request) -> Mapping[str, Any]:
        raise ValueError(f"bad value {request.parameters.get('value', 42)}")


class NeedsInput(Operator):
    async def execute(self, request: Request) -> Mapping[str, Any]:
        x = request.input("x")
        return {"y": x * 2}


class Parent(Operator):
    """Calls operator ``child`` (parameter) with its inputs and returns the child's outputs."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        child = request.operator(str(request.parameters.get("child", "announcing")))
        result = await child.infer(request.inputs, parameters=request.parameters.get("child_parameters", {}))
        return result.outputs


class Forwarder(Operator):
    """Passes its input to operator ``child`` by reference and answers with the child's output,
    again by reference: the tensor's bytes never reach this process."""

    pull_inputs = False

    async def execute(self, request: Request) -> Mapping[str, Any]:
        child = request.operator(str(request.parameters.get("child", "echo")))
        result = await child.infer(dict(request.inputs), pull_outputs=False)
        return dict(result.outputs)


class Holder(Operator):
    """Keeps its input reference unpulled and works for ``delay`` seconds (a consumer to kill)."""

    pull_inputs = False

    async def execute(self, request: Request) -> Mapping[str, Any]:
        await request.send({"started": np.array([1], dtype=np.int8)})
        await asyncio.sleep(float(request.parameters.get("delay", 3600)))
        return {}


class OutputEcho(Operator):
    """Answers ``{"output": input}``: a correct stand-in for the hello world's encoder_decoder."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        return {"output": request.input("input")}


class WrongEcho(Operator):
    """Answers ``{"output": input + [0]}``: wrong for every input (tdist-client must notice)."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        return {"output": np.append(request.input("input"), np.int64(0))}


class PyEncoder(Operator):
    """The Triton hello-world encoder in Python: ``output = tile(~x, k)``, ``input_copies = [k]``."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        k = int(request.parameters.get("input_copies", 1))
        return {"output": np.tile(np.invert(request.input("input")), k),
                "input_copies": np.array([k], dtype=np.int64)}


class PyDecoder(Operator):
    """The Triton hello-world decoder in Python: ``output = ~y[: len(y) // k]``, k from the
    ``input_copies`` input, else the request parameter."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        y = request.input("input")
        copies = request.inputs.get("input_copies")
        k = int(copies.reshape(-1)[0]) if copies is not None else int(request.parameters.get("input_copies", 1))
        return {"output": np.invert(y[: len(y) // k])}


class Stubborn(Operator):
    """Ignores cancellation: keeps working ``delay`` seconds whatever happens (a hung operator)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.finished = 0

    async def execute(self, request: Request) -> Mapping[str, Any]:
        end = asyncio.get_running_loop().time() + float(request.parameters.get("delay", 30.0))
        while (left := end - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        self.finished += 1
        return request.inputs
