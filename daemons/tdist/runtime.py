"""One process's planes: its NATS connection, caller, data plane and registry.

A worker and a client each own one ``Runtime``. It starts the parts in order,
closes them in the reverse order (each step bounded), and owns the one recovery
path after a reconnect:

1. nats-py re-subscribes every subscription, flushes what was published while
   disconnected, then calls us (``_on_reconnect``); we only start a task there.
2. The recovery task waits a short settle time (peers reconnect too), then runs
   the recovery steps in order: re-open the registry buckets, let the caller
   re-send what it still waits for, then the owner's hooks (a worker re-declares
   its consumers and pulls again through fresh inboxes). A step that fails
   (JetStream still electing a leader after a restart) makes the whole pass run
   again, with backoff, until it succeeds, the connection drops again or the
   runtime closes.

``connected`` is set while the connection is up: pullers ask for messages only
then, and a worker holds its final responses until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient

from tdist.config import DataPlaneConfig, NatsConfig, RequestPlaneConfig
from tdist.data_plane.plane import LazyDataPlane
from tdist.logs import get_logger
from tdist.registry import Registry
from tdist.request_plane.caller import Caller
from tdist.request_plane.connection import CLOSE_STEP_TIMEOUT, close_connection, connect

log = get_logger("tdist.runtime")

# After a reconnect, give the other processes this long to reconnect too before re-sending.
RECONNECT_SETTLE = 0.5
RECOVERY_BACKOFF_MAX = 5.0

RecoveryHook = Callable[[], Awaitable[None]]


async def bounded(step: str, aw: Awaitable[object], timeout: float = CLOSE_STEP_TIMEOUT) -> None:
    """Run one shutdown step; a stuck or failing step is logged, never a stuck process."""
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("close_step_timed_out", step=step, seconds=timeout)
    except Exception as exc:
        log.warning("close_step_failed", step=step, error=f"{type(exc).__name__}: {exc}")


class Runtime:
    """``async with Runtime(...) as rt``: ``rt.nc``, ``rt.caller``, ``rt.data_plane``, ``await rt.registry()``."""

    def __init__(
        self,
        nats: NatsConfig,
        request_plane: RequestPlaneConfig,
        data_plane: DataPlaneConfig,
        *,
        component_id: str,
        name: str,
        deployer: bool = False,
    ) -> None:
        """``deployer``: this process may create the namespace's stream and buckets (a worker,
        the agent); a plain caller never does."""
        self.nats_config = nats
        self.rp = request_plane
        self.component_id = component_id
        self.name = name
        self.deployer = deployer
        self.data_plane = LazyDataPlane(component_id, data_plane)
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._nc: NatsClient | None = None
        self._caller: Caller | None = None
        self._registry: Registry | None = None
        self._registry_lock = asyncio.Lock()
        self._hooks: list[RecoveryHook] = []
        self._recovery: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False

    # -- the parts -------------------------------------------------------------

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError(f"{self.name} is not connected")
        return self._nc

    @property
    def caller(self) -> Caller:
        if self._caller is None:
            raise RuntimeError(f"{self.name} is not connected: use 'async with' or 'await start()'")
        return self._caller

    async def registry(self) -> Registry:
        """The namespace's workers registry (opened once, re-opened after a reconnect)."""
        async with self._registry_lock:
            if self._registry is None:
                self._registry = await Registry.open(self.nc.jetstream(), self.rp, create=self.deployer)
            return self._registry

    def on_recover(self, hook: RecoveryHook) -> None:
        """Run ``hook`` on every recovery pass, after the caller's; it raises to ask for another pass."""
        self._hooks.append(hook)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> Runtime:
        try:
            self._nc = await connect(self.nats_config, name=self.name, on_reconnect=self._on_reconnect,
                                     on_disconnect=self._on_disconnect)
            self.connected.set()
            self._caller = await Caller(self._nc, self.rp, component_id=self.component_id,
                                        data_plane=self.data_plane, connected=self.connected).start()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self, wait_for_release: float = 0.0) -> None:
        """Caller, registry watches, data plane (after up to ``wait_for_release`` s for consumers
        to release our tensors), then the connection: each step bounded."""
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
            await bounded("recovery", asyncio.gather(self._recovery, return_exceptions=True))
            self._recovery = None
        if self._caller is not None:
            await bounded("caller_close", self._caller.close())
        if self._registry is not None:
            await bounded("registry_close", self._registry.close())
        await bounded("data_plane_close", self.data_plane.close(wait_for_release), wait_for_release + 15)
        if self._nc is not None:
            await bounded("nats_close", close_connection(self._nc), 3 * CLOSE_STEP_TIMEOUT)
        self._nc = self._caller = self._registry = None
        self.connected.clear()

    # -- recovery --------------------------------------------------------------

    async def _on_disconnect(self) -> None:
        self.connected.clear()

    async def _on_reconnect(self) -> None:
        self.reconnects += 1
        self.connected.set()
        self.request_recovery()

    def request_recovery(self) -> None:
        """Run a recovery pass now (a consumer went missing), or once more if one is running."""
        if self._closed or self._nc is None:
            return
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())
        else:
            self._again = True

    async def _recover(self) -> None:
        delay = 0.25
        attempt = 0
        while not self._closed:
            await asyncio.sleep(RECONNECT_SETTLE if attempt == 0 else delay)
            await self.connected.wait()
            self._again = False
            attempt += 1
            try:
                if self._registry is not None:
                    await self._registry.reopen()
                if self._caller is not None:
                    await self._caller.recover()
                for hook in self._hooks:
                    await hook()
            except Exception as exc:
                log.warning("recovery_failed", component=self.component_id, attempt=attempt,
                            error=f"{type(exc).__name__}: {exc}")
                delay = min(delay * 2, RECOVERY_BACKOFF_MAX)
                continue
            if self._again:  # reconnected again meanwhile: run the pass once more
                continue
            log.info("recovered", component=self.component_id, attempts=attempt)
            return
