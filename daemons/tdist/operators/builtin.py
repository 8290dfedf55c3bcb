"""Small operators shipped with tdist: for demos, benchmarks and health checks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tdist.operators import Operator, Request


class Echo(Operator):
    """Returns its inputs as outputs, unchanged; parameter ``delay`` sleeps first."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        delay = float(request.parameters.get("delay", self.parameters.get("delay", 0.0)))
        if delay > 0:
            await asyncio.sleep(delay)
        return request.inputs


class Ping(Operator):
    """The agent's canary (``_ping`` v1, hosted by every worker on its directed subject only):
    answers its inputs at once. It runs on the worker's request path (pull, decode, respond,
    acknowledge), so an answer shows that path works, which a live PID does not."""

    async def execute(self, request: Request) -> Mapping[str, Any]:
        return request.inputs
