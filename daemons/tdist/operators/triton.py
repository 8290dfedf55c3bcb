"""The Triton operator: a model of a standard Triton model repository, served by a real
Triton server running as a process beside the worker (the in-process ``tritonserver``
API needs CPython 3.12 and NVIDIA's container; see tdist.triton.server).

Operator parameters (TOML ``[workers.operators.parameters]``):

* ``model_repository`` (required): the repository directory;
* ``model``: the model's name in it (default: the operator's name);
* ``config``: per-deployment overrides of the model's config.pbtxt, e.g.
  ``{instance_group = [{count = 2, kind = "KIND_CPU"}], parameters = {delay = "0"}}``;
* ``protocol``: "http" (default: tdist's lean REST client, ``tdist.triton.rest``, the cheapest
  path to the server beside the worker) or "grpc" (tritonclient's gRPC aio client; costs about
  0.2 ms and 180 us of worker CPU more per request, but a cancelled or timed-out request also
  stops the model in Triton, where over HTTP Triton 2.51 runs it to its end: choose it for models
  that run long enough for that to matter);
* ``shared_memory`` ("auto", "on", "off").

Triton operators of one worker and one repository share one server. If the server
dies, the operator notices at once, starts it again (``TritonServer.arestart()`` reloads
each model loaded through it, once, with its overrides) and serves on; a request caught
in the crash gets an error response. The operator's client sends the server's control key
(``TritonServer.control_headers``, new at every start) with its shared-memory calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdist import metrics
from tdist.errors import ConfigError, TdistError, TritonModelNotReady
from tdist.logs import get_logger
from tdist.operators import Operator, Request

log = get_logger("tdist.triton_operator")


@dataclass
class _SharedServer:
    server: Any
    model_users: dict[str, int] = field(default_factory=dict)
    """Operators using each model: a model nobody uses is unloaded, so a restart does not bring it back."""
    users: int = 0
    watchdog: asyncio.Task[None] | None = None
    restarting: asyncio.Lock = field(default_factory=asyncio.Lock)
    restarts: int = 0


_servers: dict[str, _SharedServer] = {}

RESTART_RETRIES = 5
"""Times a request is tried again while its server restarts or its model loads (within its deadline)."""
RETRY_PAUSE = 0.5


async def _acquire(repository: str) -> _SharedServer:
    from tdist.triton import TritonServer

    shared = _servers.get(repository)
    if shared is None:
        server = TritonServer(model_repository=repository)
        await server.astart()
        shared = _servers[repository] = _SharedServer(server)
        shared.watchdog = asyncio.get_running_loop().create_task(_watch(repository, shared))
    shared.users += 1
    return shared


async def _release(repository: str, shared: _SharedServer) -> None:
    shared.users -= 1
    if shared.users > 0:
        return
    _servers.pop(repository, None)
    if shared.watchdog is not None:
        shared.watchdog.cancel()
        try:
            await asyncio.wait_for(asyncio.gather(shared.watchdog, return_exceptions=True), 30)
        except TimeoutError:
            log.warning("triton_watchdog_stuck", repository=repository)
    await shared.server.astop()


async def _watch(repository: str, shared: _SharedServer) -> None:
    """Restart a Triton server that died under us, and reload its models."""
    while True:
        code = await shared.server.wait_exit()
        log.error("triton_exited", repository=repository, returncode=code, pid=shared.server.pid,
                  log_tail=shared.server.log_tail(800))
        await _restart(shared)


async def _restart(shared: _SharedServer) -> None:
    """Start the dead server again; ``arestart()`` itself reloads its models (once each)."""
    async with shared.restarting:
        if shared.server.is_alive():
            return
        await shared.server.arestart()
        shared.restarts += 1
        metrics.TRITON_RESTARTS.inc()
        log.info("triton_restarted", pid=shared.server.pid, models=sorted(shared.server.loaded_models),
                 restarts=shared.restarts)


class TritonOperator(Operator):
    def __init__(self, name: str, version: int, parameters: Mapping[str, Any]) -> None:
        super().__init__(name, version, parameters)
        repo = parameters.get("model_repository")
        if not isinstance(repo, str) or not repo:
            raise ConfigError(f"Triton operator {name} needs parameters.model_repository", key="parameters")
        self.repository = str(Path(repo).resolve())
        if not Path(self.repository).is_dir():
            raise ConfigError(f"model repository {self.repository} does not exist", key="parameters.model_repository")
        self.model = str(parameters.get("model", name))
        if not (Path(self.repository) / self.model / "config.pbtxt").is_file():
            raise ConfigError(f"no model {self.model!r} (config.pbtxt) in {self.repository}", key="parameters.model")
        overrides = parameters.get("config")
        self.overrides: Mapping[str, Any] | None = dict(overrides) if isinstance(overrides, Mapping) else None
        self.protocol = str(parameters.get("protocol", "http"))
        if self.protocol not in ("http", "grpc"):
            raise ConfigError(f"Triton operator {name}: protocol must be 'http' or 'grpc', not {self.protocol!r}",
                              key="parameters.protocol")
        self.shared_memory = str(parameters.get("shared_memory", "auto"))
        self._shared: _SharedServer | None = None
        self._client: Any = None

    @property
    def server(self) -> Any:
        assert self._shared is not None, "setup() first"
        return self._shared.server

    async def setup(self) -> None:
        from tdist.triton import TritonClient

        self._shared = await _acquire(self.repository)
        try:
            server = self._shared.server
            await server.aload_model(self.model, self.overrides)
            address = server.grpc_address if self.protocol == "grpc" else server.http_address
            self._client = TritonClient(address, protocol=self.protocol,  # type: ignore[arg-type]
                                        shared_memory=self.shared_memory,  # type: ignore[arg-type]
                                        control_headers=lambda: server.control_headers)
            self._shared.model_users[self.model] = self._shared.model_users.get(self.model, 0) + 1
        except BaseException:
            await _release(self.repository, self._shared)
            self._shared = None
            raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._shared is not None:
            shared, self._shared = self._shared, None
            left = shared.model_users.get(self.model, 1) - 1
            if left > 0:
                shared.model_users[self.model] = left
            else:
                shared.model_users.pop(self.model, None)
                if shared.users > 1 and shared.server.is_alive():  # the server stays: unload what nobody uses
                    try:
                        await shared.server.aunload_model(self.model, timeout=30.0)
                    except TdistError as exc:
                        log.warning("triton_unload_failed", model=self.model, error=str(exc))
            await _release(self.repository, shared)

    async def execute(self, request: Request) -> Mapping[str, Any]:
        assert self._shared is not None and self._client is not None
        if not self._shared.server.is_alive():
            await _restart(self._shared)
        params = {k: v for k, v in request.parameters.items() if isinstance(v, (bool, int, float, str))}
        for attempt in range(1, RESTART_RETRIES + 2):
            try:
                result = await self._client.infer(self.model, request.inputs, parameters=params,
                                                  timeout=max(0.001, request.remaining()), request_id=request.id)
                return result.outputs
            except TdistError as exc:
                dead = not self._shared.server.is_alive()
                if dead:
                    log.warning("triton_died_during_request", model=self.model)
                # A server that died (and is being restarted) or a model still loading: wait for it
                # within the request's deadline instead of failing the request (measured under load
                # in the three-host test: a restart turned 40 of 40 requests into errors).
                if (not dead and not isinstance(exc, TritonModelNotReady)) or attempt > RESTART_RETRIES \
                        or request.remaining() < RETRY_PAUSE:
                    raise
                log.info("triton_retry", model=self.model, attempt=attempt, error=str(exc))
                await asyncio.sleep(RETRY_PAUSE)
                if not self._shared.server.is_alive():
                    await _restart(self._shared)
        raise AssertionError("unreachable")
