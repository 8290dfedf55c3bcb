"""Discovery in NATS KV: who is alive, where, serving what, how loaded.

Each worker writes its entry with a per-message TTL on every heartbeat, so a
killed worker's entry expires one TTL after its last heartbeat. The bucket has
limit markers (nats-server 2.11+), so watchers are told of expiries, not just of
deletes. A graceful exit deletes the entry at once.

A ``RegistryWatch`` keeps a live map of entries. After a reconnect it rebuilds
the map from a fresh snapshot, so nothing missed while disconnected lingers.
A watch deletes its server-side consumer when it ends (and the consumer expires
``WATCH_IDLE`` seconds after its subscriber is gone, should the delete not arrive).

The buckets are created by whoever deploys (a worker, the agent) with history 1,
the namespace's replicas and an age limit, so delete markers of gone workers
expire instead of piling up; a plain client only opens them.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tdist import names
from tdist.config import RequestPlaneConfig
from tdist.errors import RegistryError
from tdist.logs import get_logger

log = get_logger("tdist.registry")

LIMIT_MARKER_TTL = 30.0
# Entries (and the delete markers of graceful exits) older than this go; live entries are
# rewritten every heartbeat (TTL / 3), so only the markers of gone workers ever reach it.
BUCKET_MAX_AGE = 3600.0
# A watch's consumer is removed by the server this long after its subscriber went away.
WATCH_IDLE = 10.0
# Tries to open a bucket when JetStream does not answer in time (each waits its API timeout).
OPEN_ATTEMPTS = 3
# A snapshot waits this long, after nats-py's end marker, for entries up to the bucket's last revision.
SNAPSHOT_STRAGGLER_WAIT = 2.0


@dataclass(frozen=True)
class OperatorInfo:
    name: str
    version: int
    max_inflight: int
    inflight: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's registry entry: what a client or peer needs to know."""

    id: str
    name: str
    node: str
    pid: int
    state: str
    operators: tuple[OperatorInfo, ...]
    started_at: float
    heartbeat_at: float = 0.0
    ttl: float = 5.0
    data_plane: str | None = None
    gpus: tuple[str, ...] = ()
    served: int = 0
    tensors_held: int = 0
    bytes_pulled: int = 0
    bytes_served: int = 0
    nats_in_bytes: int = 0
    """Bytes this worker received over NATS (requests, responses of its child calls)."""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def load(self) -> float:
        """In-flight requests over capacity, across operators (0 idle, 1 full)."""
        capacity = sum(op.max_inflight for op in self.operators)
        return sum(op.inflight for op in self.operators) / capacity if capacity else 0.0

    def hosts(self, operator: str, version: int | None = None) -> bool:
        return any(op.name == operator and (version is None or op.version == version) for op in self.operators)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerInfo:
        raw: dict[str, Any] = json.loads(data)
        raw["operators"] = tuple(OperatorInfo(**op) for op in raw.get("operators", ()))
        raw["gpus"] = tuple(raw.get("gpus", ()))
        return cls(**raw)


def bucket_config(bucket: str, replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=bucket, history=1, ttl=BUCKET_MAX_AGE, replicas=replicas,
                          limit_marker_ttl=LIMIT_MARKER_TTL)


async def open_bucket(js: JetStreamContext, bucket: str, *, replicas: int = 1, create: bool = True) -> KeyValue:
    """A registry bucket: one value per key, per-entry TTLs, limit markers for watchers.

    With ``create`` (deployers only) a missing bucket is made; an existing one whose
    replicas differ from the configuration is used as it is, and the mismatch logged."""
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            kv = await js.key_value(bucket)
            break
        except NotFoundError:
            if not create:
                raise RegistryError(f"registry bucket {bucket} does not exist: is the namespace deployed?",
                                    bucket=bucket, missing=True) from None
            try:
                return await js.create_key_value(bucket_config(bucket, replicas))
            except BadRequestError:
                kv = await js.key_value(bucket)  # created meanwhile by another process
                break
        except NatsTimeoutError as exc:  # JetStream busy (a leader election, a loaded server): try again
            if attempt == OPEN_ATTEMPTS:
                raise RegistryError(f"cannot open registry bucket {bucket}: no answer in {attempt} tries",
                                    bucket=bucket) from exc
        except Exception as exc:
            raise RegistryError(f"cannot open registry bucket {bucket}: {exc}", bucket=bucket) from exc
    if create:
        try:
            have = (await js.stream_info(f"KV_{bucket}")).config.num_replicas or 1
            if have != replicas:
                log.warning("bucket_replicas_differ", bucket=bucket, have=have, configured=replicas)
        except Exception:
            pass
    return kv


async def put_with_ttl(js: JetStreamContext, bucket: str, key: str, value: bytes, ttl: float) -> None:
    """Write an entry that expires ``ttl`` seconds from now unless written again."""
    await js.publish(f"$KV.{bucket}.{key}", value, msg_ttl=max(1, round(ttl)))


class Registry:
    """The workers bucket of one namespace."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, rp: RequestPlaneConfig, *, create: bool) -> None:
        self.js = js
        self.kv = kv
        self.rp = rp
        self.namespace = rp.namespace
        self._create = create
        self._watches: weakref.WeakSet[RegistryWatch] = weakref.WeakSet()

    @classmethod
    async def open(cls, js: JetStreamContext, rp: RequestPlaneConfig, *, create: bool = False) -> Registry:
        bucket = names.workers_bucket(rp.namespace)
        return cls(js, await open_bucket(js, bucket, replicas=rp.replicas, create=create), rp, create=create)

    async def reopen(self) -> None:
        """After a reconnect: the bucket again (a restarted server may have lost it), then every
        open watch from a fresh snapshot."""
        self.kv = await open_bucket(self.js, names.workers_bucket(self.namespace), replicas=self.rp.replicas,
                                    create=self._create)
        await self.resync_watches()

    async def close(self) -> None:
        for watch in list(self._watches):
            await watch.close()

    async def put(self, info: WorkerInfo) -> None:
        """Write (or refresh) an entry; it expires ``info.ttl`` seconds after this call."""
        await put_with_ttl(self.js, names.workers_bucket(self.namespace), info.id, info.to_json(), info.ttl)

    async def delete(self, worker_id: str, *, revision: int | None = None) -> bool:
        """Remove an entry. With ``revision`` (a watch's ``revisions``), only if it is still that
        write: a process that registered since (a restarted worker, same id) keeps its entry.
        Returns False when the entry was written again meanwhile."""
        if revision is None:
            await self.kv.delete(worker_id)
            return True
        try:
            await self.kv.delete(worker_id, last=revision)
        except BadRequestError as exc:  # 10071: the subject's last sequence is another (nats-py does not map it here)
            if isinstance(exc, KeyWrongLastSequenceError) or getattr(exc, "err_code", None) in (10071, 10164):
                return False
            raise
        return True

    async def list_workers(self) -> dict[str, WorkerInfo]:
        async with self.watch() as watch:
            return dict(watch.workers)

    def watch(self) -> RegistryWatch:
        watch = RegistryWatch(self)
        self._watches.add(watch)
        return watch

    async def resync_watches(self) -> None:
        """Rebuild every open watch from a fresh snapshot (after a reconnect); raises if one fails."""
        for watch in list(self._watches):
            if watch.active:
                await watch.resync()


async def read_snapshot(updates: Callable[[float], Awaitable[Any]], last: int) -> list[Any]:
    """The entries of a KV watch's first snapshot: up to nats-py's end marker (None) *and* up to
    revision ``last``; after the marker a missing revision is waited for SNAPSHOT_STRAGGLER_WAIT
    seconds at most. ``updates(timeout)`` is the watcher's; it raises nats' TimeoutError."""
    entries: list[Any] = []
    seen, marked = 0, False
    while not (marked and seen >= last):
        try:
            entry = await updates(SNAPSHOT_STRAGGLER_WAIT if marked else 10.0)
        except NatsTimeoutError:
            if not marked:
                raise
            break  # the last revision is gone (aged out): what came is the snapshot
        if entry is None:
            marked = True
            continue
        entries.append(entry)
        seen = max(seen, int(entry.revision or 0))
    return entries


class RegistryWatch:
    """A live view of the registry: ``workers`` is current once entered.

    ``changed(timeout)`` waits for the next change. ``resync()`` rebuilds the
    view from a fresh snapshot (called by the owner after a reconnect).
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.workers: dict[str, WorkerInfo] = {}
        self.revisions: dict[str, int] = {}
        """The KV revision of each entry in ``workers`` (for ``Registry.delete(revision=...)``)."""
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.active = False

    async def __aenter__(self) -> RegistryWatch:
        await self.resync()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def resync(self) -> None:
        """Start a fresh watcher; replace the view once its snapshot is complete.

        nats-py's end-of-snapshot marker is not enough: it comes at once when a consumer info
        says nothing is pending, and that answer can overtake an entry already on its way (a
        snapshot of one live worker was then empty: `tdist-client` found no worker right after
        `tdist-client ls` listed it, in one CI run). So the snapshot also reads up to the
        bucket's last revision, taken before the watch (bounded: an entry removed by age
        meanwhile never comes)."""
        await self._stop_watcher()
        self.active = True
        state = (await self._registry.kv.status()).stream_info.state
        last = int(state.last_seq or 0) if state.messages else 0
        watcher = await self._registry.kv.watchall(inactive_threshold=WATCH_IDLE)
        snapshot: dict[str, WorkerInfo] = {}
        revisions: dict[str, int] = {}
        for entry in await read_snapshot(watcher.updates, last):
            self._apply(snapshot, revisions, entry)
        self._watcher = watcher
        self.workers, self.revisions = snapshot, revisions
        self._signal()
        self._task = asyncio.get_running_loop().create_task(self._follow(watcher))

    async def _follow(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                self._apply(self.workers, self.revisions, entry)
                self._signal()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("registry_watch_failed", error=str(exc))

    @staticmethod
    def _apply(view: dict[str, WorkerInfo], revisions: dict[str, int], entry: Any) -> None:
        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
            view.pop(entry.key, None)
            revisions.pop(entry.key, None)
            return
        try:
            view[entry.key] = WorkerInfo.from_json(entry.value)
            revisions[entry.key] = int(entry.revision or 0)
        except (ValueError, TypeError) as exc:
            log.warning("bad_registry_entry", key=entry.key, error=str(exc))

    def _signal(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self, timeout: float | None = None) -> bool:
        """Wait for the next change; False on timeout."""
        return await self._wait(self._changed, timeout)

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False

    async def wait_for(self, predicate: Callable[[dict[str, WorkerInfo]], bool], timeout: float) -> dict[str, WorkerInfo]:
        """Wait until ``predicate(workers)`` holds; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            event = self._changed  # taken before the check, so no change slips between
            if predicate(self.workers):
                return self.workers
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("registry condition not met in time")
            await self._wait(event, remaining)

    async def _stop_watcher(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            consumer = getattr(getattr(watcher, "_sub", None), "_consumer", None)
            try:
                await watcher.stop()
            except Exception:
                pass
            if consumer:  # the server would keep it WATCH_IDLE seconds more: delete it now
                try:
                    await self._registry.js.delete_consumer(self._registry.kv._stream, consumer)
                except Exception:
                    pass

    async def close(self) -> None:
        self.active = False
        await self._stop_watcher()
