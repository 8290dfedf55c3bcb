"""The UCX transport (through ucxx): point-to-point pulls between processes.

Addressing uses UCX *worker addresses*, not listeners: a listener binds 0.0.0.0
and needs endpoint error handling, which rules out UCX's shared memory (measured with
ucxx 0.52 / UCX 1.21: the listener path with error handling off fails with "asymmetric
endpoint configuration"). A process's address is published in descriptors.

The protocol is tag matching on the worker:

* a consumer sends the owner a request on the well-known ``REQUEST_TAG``: command,
  tensor id, its own id, a fresh random reply tag and its own worker address;
* the owner answers over an endpoint to the consumer's address: a 32-byte header
  (status, size, new id) on the reply tag, then for GET the tensor on the tag + 1, or an
  empty message if there is none;
* nobody posts receives: every process takes messages off UCX's unexpected queue by
  probing (``EventDriver`` pollers, tag and length known before any byte is received).
  A request is received and served; an answer somebody awaits is received straight into
  the buffer its waiter gave (the tensor into the pull's buffer), if its length is the one
  expected; anything else is discarded. So no peer's message can end a server (only the
  owning process stops it), and a pull that gives up before its answer leaves nothing
  posted behind: a late answer is discarded. The one exception: once the header is in, a
  GET posts the tensor's receive on the endpoint (the owner is sending it right then), as
  UCX moves a tensor fastest into a receive posted before it arrives.

Nothing from the wire reaches UCX unchecked. A request must have the exact layout
(``parse_request``); the consumer's address must pass ``ucx_address.AddressChecker``
(structure and transport lengths against this process's own address) before an endpoint
is made from it, and so must an owner's address from a descriptor. Messages of the wrong
size, malformed, for unknown tags, or beyond the handler bound are discarded and logged
(rate-limited). Reply tags are 63 random bits, so no stranger can aim at a pull.

Endpoints live in one bounded cache per process (``EndpointCache``, keyed by address):
least recently used ones beyond ``endpoint_cache_size`` and ones idle longer than
``endpoint_idle_timeout`` are closed, and so are ones UCX reports dead (retired: new users get
a new endpoint, the old one closes when its last user leaves). A pull that times out touches
nothing shared, so one slow pull never fails the healthy ones beside it. Every wait is
bounded: a dead peer gives ``PeerUnreachable`` after the timeout, or sooner when UCX notices.

UCX pairs the endpoints two processes make to each other (by creation order), and a large
answer sent over an endpoint whose partner the other process closed is cancelled on arrival
(measured: the consumer sees ``UCXXCanceledError``, the owner's send hangs). Closing is not
announced to the partner, so a consumer that sees a failure other than a timeout asks once
more with the FRESH flag, and the owner answers that over a new endpoint.

UCX has one context per process, so the transport is shared by every data plane
of the process (tests run several workers in one process): a request is served
by the plane that holds the tensor id. The last plane to leave shuts UCX down
(``ucxx.reset``), so the next one may start on another event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tdist.config import DataPlaneConfig
from tdist.data_plane import ucx_address
from tdist.data_plane.ucx_progress import EventDriver
from tdist.errors import DataPlaneError, PeerUnreachable, TensorNotFound
from tdist.logs import get_logger

if TYPE_CHECKING:
    from tdist.data_plane.plane import DataPlane

log = get_logger("tdist.ucx")

REQUEST_TAG = 0x7D15_7000_0000_0001
_REQUEST = struct.Struct("<B16sQQH")  # command, tensor id, consumer id, reply tag, address length
REQUEST_MAX = _REQUEST.size + ucx_address.MAX_ADDRESS_BYTES
_DISCARD_BYTES = 64
"""Messages to discard are received into this many bytes (UCX truncates and frees the rest)."""
_LIVENESS_CHECK = 0.25
"""Seconds between looks at the endpoint's state while a pull waits for its answer."""
MAX_HANDLERS = 512
"""Requests served at once; more are discarded (the consumer's pull times out) rather than queued."""
_OK, _NOT_FOUND, _FAILED = 0, 1, 2
_GET, _REFERENCE, _RELEASE = 1, 2, 3  # plane.GET, REFERENCE, RELEASE (plane imports this module lazily)
FRESH = 0x80
"""Command flag: answer over a new endpoint (the consumer saw its answer cancelled, see ``_call``)."""


def _configure_ucx_env(error_handling: bool) -> None:
    """Defaults that suit host memory; ucxx itself would point fragments at CUDA memory."""
    import os

    if error_handling:
        # With error handling UCX moves same-host data over TCP; 1 MiB segments instead of the
        # default fragmented copy-in/copy-out lift 64 MiB pulls from ~1.1 to ~4 GB/s here.
        os.environ.setdefault("UCX_TCP_TX_SEG_SIZE", "1m")
        os.environ.setdefault("UCX_TCP_RX_SEG_SIZE", "1m")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # UCX 1.21's new protocol selection moves large same-host messages at about half of what
    # the classic one does here (5.6 against 10.3 GB/s for 64 MiB; benchmarks/data_plane.py).
    os.environ.setdefault("UCX_PROTO_ENABLE", "n")
    os.environ["UCXPY_PROGRESS_MODE"] = "blocking"  # driven by EventDriver (ucx_progress.py)
    os.environ["UCXPY_ENABLE_PYTHON_FUTURE"] = "0"
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")


def _import_ucxx(error_handling: bool) -> Any:
    _configure_ucx_env(error_handling)
    try:
        import ucxx  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataPlaneError(f"the UCX data plane needs the ucxx package (ucxx-cu12): {exc}") from exc
    return ucxx


# -- the request message (pure) ---------------------------------------------------


class BadRequest(ValueError):
    """A message on REQUEST_TAG that is not a request this server answers."""


@dataclass(frozen=True, slots=True)
class Request:
    command: int
    tensor_id: str
    consumer_id: int
    reply_tag: int
    address: bytes
    fresh: bool = False


def new_reply_tag() -> int:
    """63 random bits, even (the tensor follows on the tag + 1), never near REQUEST_TAG."""
    while True:
        tag = secrets.randbits(64) & ~1
        if tag not in (REQUEST_TAG - 1, REQUEST_TAG & ~1) and tag != (1 << 64) - 2:
            return tag


def encode_request(command: int, tensor_id: str, consumer_id: int, reply_tag: int, address: bytes) -> bytes:
    return _REQUEST.pack(command, bytes.fromhex(tensor_id), consumer_id, reply_tag, len(address)) + address


def parse_request(data: bytes) -> Request:
    """The request in ``data`` (the whole message, exactly), or ``BadRequest``."""
    if not _REQUEST.size < len(data) <= REQUEST_MAX:
        raise BadRequest(f"length {len(data)} is not {_REQUEST.size + 1}..{REQUEST_MAX}")
    flagged, raw_id, consumer_id, reply_tag, addr_len = _REQUEST.unpack_from(data)
    command = flagged & ~FRESH
    if command not in (_GET, _REFERENCE, _RELEASE):
        raise BadRequest(f"unknown command {flagged}")
    if _REQUEST.size + addr_len != len(data):
        raise BadRequest(f"address length {addr_len} disagrees with the message length {len(data)}")
    if reply_tag & 1 or reply_tag in (REQUEST_TAG - 1, REQUEST_TAG & ~1) or reply_tag == (1 << 64) - 2:
        raise BadRequest(f"reply tag {reply_tag:#x} is not one a consumer makes")
    return Request(command, raw_id.hex(), consumer_id, reply_tag, bytes(data[_REQUEST.size :]), bool(flagged & FRESH))


# -- endpoints (pure bookkeeping over two callables) -------------------------------


@dataclass(eq=False)
class Endpoint:
    key: bytes
    future: asyncio.Future[Any]
    users: int = 0
    last_used: float = 0.0
    retired: bool = False

    @property
    def ep(self) -> Any:
        return self.future.result()


class EndpointCache:
    """Endpoints by peer address: bounded (least recently used beyond ``max_size`` closed once
    unused), idle ones closed by ``sweep``; a failed user retires its endpoint (new users get a
    fresh one) and the retired one is closed when its last user leaves.

    ``create(key)`` makes an endpoint (and may raise, e.g. on a bad address); ``abort(ep)``
    closes one. Neither may block."""

    def __init__(self, create: Callable[[bytes], Awaitable[Any]], abort: Callable[[Any], None], max_size: int,
                 idle_timeout: float, clock: Callable[[], float] = time.monotonic,
                 alive: Callable[[Any], bool] = lambda ep: True) -> None:
        self._create = create
        self._abort = abort
        self._alive = alive
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._live: collections.OrderedDict[bytes, Endpoint] = collections.OrderedDict()
        self._retired_busy: set[Endpoint] = set()
        self.opened = 0
        self.closed = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    async def acquire(self, key: bytes, timeout: float) -> Endpoint:
        """The endpoint for ``key``, counted as in use until ``release``."""
        entry = self._live.get(key)
        if entry is not None and entry.future.done() and (
                entry.future.cancelled() or entry.future.exception() is not None or not self._alive(entry.future.result())):
            self._retire(entry)  # failed, or closed by the peer (or UCX): make a fresh one
            if entry.users == 0:
                self._close(entry)
            entry = None
        if entry is None:
            entry = Endpoint(key, asyncio.ensure_future(self._create(key)), users=1, last_used=self._clock())
            self._live[key] = entry
            self.opened += 1
            self._evict()
        else:
            self._live.move_to_end(key)
            entry.users += 1
        if entry.future.done() and not entry.future.cancelled() and entry.future.exception() is None:
            return entry  # the common case: no waiting, no task
        try:
            await asyncio.wait_for(asyncio.shield(entry.future), timeout)
        except BaseException:
            self.release(entry, failed=True)
            raise
        return entry

    def release(self, entry: Endpoint, *, failed: bool = False) -> None:
        entry.users -= 1
        entry.last_used = self._clock()
        if failed:
            self._retire(entry)
        if entry.retired and entry.users == 0:
            self._retired_busy.discard(entry)
            self._close(entry)

    def retire(self, key: bytes) -> None:
        """New users of ``key`` get a new endpoint; the current one closes once unused."""
        entry = self._live.get(key)
        if entry is not None:
            self._retire(entry)
            if entry.users == 0:
                self._close(entry)

    def _retire(self, entry: Endpoint) -> None:
        if entry.retired:
            return
        entry.retired = True
        if self._live.get(entry.key) is entry:
            del self._live[entry.key]
        if entry.users:
            self._retired_busy.add(entry)

    def _close(self, entry: Endpoint) -> None:
        self.closed += 1

        def abort(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                try:
                    self._abort(fut.result())
                except Exception as exc:
                    log.info("ucx_endpoint_abort_failed", error=str(exc))

        if entry.future.done():
            abort(entry.future)
        else:  # still being created: close it once it exists
            entry.future.add_done_callback(abort)

    def _evict(self) -> None:
        """Close least recently used unused endpoints beyond ``max_size`` (busy ones stay)."""
        excess = len(self._live) - self.max_size
        for entry in list(self._live.values()):
            if excess <= 0:
                break
            if entry.users == 0:
                self._retire(entry)
                self._close(entry)
                excess -= 1

    def sweep(self) -> int:
        """Close endpoints unused for ``idle_timeout``; returns how many."""
        now = self._clock()
        idle = [e for e in self._live.values() if e.users == 0 and now - e.last_used >= self.idle_timeout]
        for entry in idle:
            self._retire(entry)
            self._close(entry)
        return len(idle)

    def close_all(self) -> None:
        for entry in [*self._live.values(), *self._retired_busy]:
            entry.retired = True
            self._close(entry)
            if not entry.future.done():
                entry.future.cancel()
        self._live.clear()
        self._retired_busy.clear()


class DropLog:
    """Counts discarded messages by reason and logs each reason at most once per ``interval``."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self.total: collections.Counter[str] = collections.Counter()
        self._since: collections.Counter[str] = collections.Counter()
        self._last: dict[str, float] = {}

    def note(self, reason: str, **context: Any) -> None:
        self.total[reason] += 1
        self._since[reason] += 1
        now = self._clock()
        if now - self._last.get(reason, -self.interval) >= self.interval:
            log.warning("data_plane_message_dropped", reason=reason, count=self._since[reason], **context)
            self._last[reason] = now
            self._since[reason] = 0


# -- the transport -------------------------------------------------------------------

_shared: UcxTransport | None = None


class UcxTransport:
    @classmethod
    async def acquire(cls, plane: DataPlane) -> UcxTransport:
        """The process's transport, started if needed, now also serving ``plane``."""
        global _shared
        if _shared is None:
            transport = cls(plane.config)
            await transport._start()
            _shared = transport
        _shared._planes.append(plane)
        return _shared

    async def release(self, plane: DataPlane) -> None:
        """``plane`` stops serving; the last one out shuts UCX down."""
        global _shared
        if plane in self._planes:
            self._planes.remove(plane)
        if not self._planes and _shared is self:
            _shared = None
            await self._close()

    def __init__(self, config: DataPlaneConfig | None = None) -> None:
        self.config = config or DataPlaneConfig()
        self.error_handling = self.config.endpoint_error_handling
        self.address = ""
        self._ucxx: Any = None
        self._planes: list[DataPlane] = []
        self._my_address = b""
        self._my_id = secrets.randbits(64)
        self._checker: ucx_address.AddressChecker | None = None
        self.endpoints = EndpointCache(self._create_endpoint, self._abort_endpoint, self.config.endpoint_cache_size,
                                       self.config.endpoint_idle_timeout, alive=self._endpoint_alive)
        self.drops = DropLog()
        self._handlers: set[asyncio.Task[None]] = set()
        self._awaiting: dict[int, tuple[Any, asyncio.Future[None]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._driver: EventDriver | None = None
        self._closing = False

    async def _start(self) -> None:
        self._ucxx = _import_ucxx(self.error_handling)
        self._my_address = self._ucxx.get_worker_address().tobytes()
        try:
            self._checker = ucx_address.AddressChecker(self._my_address)
        except ucx_address.BadAddress as exc:  # a UCX build or setting (e.g. unified mode) this code does not know
            raise DataPlaneError(f"this process's own UCX address does not parse: {exc}") from exc
        self.address = base64.b64encode(self._my_address).decode()
        self._driver = EventDriver(self._ucxx)
        self._driver.add_poller(self._poll)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_endpoints())

    async def _close(self) -> None:
        self._closing = True
        if self._driver is not None:
            self._driver.remove_poller(self._poll)
        tasks = [t for t in (self._sweeper, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        self._handlers.clear()
        del tasks
        self.endpoints.close_all()
        if self._driver is not None:
            await self._driver.close()
            self._driver = None
        try:
            self._ucxx.reset()
        except Exception as exc:  # something still holds an endpoint: UCX stays up for this process
            log.warning("ucx_reset_failed", error=str(exc)[:2000])

    async def _sweep_endpoints(self) -> None:
        period = min(10.0, self.endpoints.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            closed = self.endpoints.sweep()
            if closed:
                log.info("ucx_idle_endpoints_closed", count=closed, open=len(self.endpoints))

    async def _create_endpoint(self, key: bytes) -> Any:
        """An endpoint to the worker at address ``key``: only once the address passed the checker."""
        assert self._checker is not None
        self._checker.check(key)
        ep = await self._ucxx.create_endpoint_from_worker_address(
            self._ucxx.get_ucx_address_from_buffer(key), endpoint_error_handling=self.error_handling
        )
        # A peer that is gone may fail the connection inside the creation and UCX still return the
        # endpoint; a send on it then crashed the process (SIGSEGV in ucp_tag_send_nbx, seen about
        # once in 15 first contacts with a dead peer, ucxx 0.52 / UCX 1.21). Progress once so UCX
        # reports the failure (the endpoint is then not alive), and never use such an endpoint.
        if self._driver is not None:
            self._driver.worker.progress()
        if not self._endpoint_alive(ep):
            self._abort_endpoint(ep)
            raise ConnectionError("the connection to the peer failed as the endpoint was made")
        return ep

    @staticmethod
    def _abort_endpoint(ep: Any) -> None:
        ep.abort()

    @staticmethod
    def _endpoint_alive(ep: Any) -> bool:
        return ep._ep is not None and bool(ep._ep.alive)

    @property
    def timeout(self) -> float:
        return max(p.config.pull_timeout for p in self._planes) if self._planes else self.config.pull_timeout

    # -- owner side -----------------------------------------------------------

    def _poll(self) -> None:
        """After progress: take every unexpected message off UCX's queue (one probe when it is
        empty, the usual case): requests are received and served, anything else is discarded
        (answers this process waits for are matched on arrival and never queue). Every receive
        here is posted on a message UCX already holds, with its length known."""
        driver = self._driver
        if driver is None or self._closing:
            return
        while True:
            probe = driver.probe(None)
            if not probe.matched:
                return
            tag = int(probe.sender_tag.value)
            if tag != REQUEST_TAG:
                awaited = self._awaiting.pop(tag, None)
                if awaited is None:
                    self._discard(probe, "unknown_tag")  # nobody waits (any more) for this one
                else:
                    self._deliver(probe, *awaited)
                continue
            length = int(probe.length)
            if not _REQUEST.size < length <= REQUEST_MAX:
                self._discard(probe, "request_size")
            elif len(self._handlers) >= MAX_HANDLERS:
                self._discard(probe, "server_busy")
            else:
                buf = np.empty(length, dtype=np.uint8)
                received = driver.recv_probed(probe, buf)
                task = asyncio.get_running_loop().create_task(self._handle(received, buf))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)

    def _deliver(self, probe: Any, buf: Any, done: asyncio.Future[None]) -> None:
        """Receive an awaited answer into the buffer its waiter gave (never more than that; less is
        fine: an owner without the tensor sends an empty message where its bytes would be)."""
        assert self._driver is not None
        if int(probe.length) > buf.nbytes:
            self._discard(probe, "answer_size", expected=int(buf.nbytes))
            if not done.done():
                done.set_exception(DataPlaneError(f"an answer of {int(probe.length)} bytes, {buf.nbytes} expected"))
            return
        received = self._driver.recv_probed(probe, buf)

        def finish(fut: asyncio.Future[None]) -> None:
            if done.done():
                _consume(fut)
            elif fut.cancelled():
                done.cancel()
            elif fut.exception() is not None:
                done.set_exception(fut.exception())  # type: ignore[arg-type]
            else:
                done.set_result(None)

        received.add_done_callback(finish)

    def _expect(self, tag: int, buf: Any) -> asyncio.Future[None]:
        """A future for the answer on ``tag``, received into ``buf`` once it arrives (see ``_poll``).
        Nothing is posted to UCX before then, so a pull that gives up leaves nothing behind."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_consume)
        self._awaiting[tag] = (buf, done)
        return done

    def _discard(self, probe: Any, reason: str, **context: Any) -> None:
        """Receive a probed message into a few bytes (UCX truncates and frees it) and count it."""
        assert self._driver is not None
        done = self._driver.recv_probed(probe, np.empty(_DISCARD_BYTES, dtype=np.uint8))
        done.add_done_callback(_consume)
        try:
            context.setdefault("length", int(probe.length))
            context.setdefault("tag", f"{int(probe.sender_tag.value):#x}")
        except Exception:  # only context for the log line
            pass
        self.drops.note(reason, **context)

    async def _handle(self, received: asyncio.Future[None], buf: np.ndarray) -> None:
        try:
            await asyncio.wait_for(received, 30.0)
            request = parse_request(buf.tobytes())
        except BadRequest as exc:
            self.drops.note("malformed_request", error=str(exc))
            return
        except Exception as exc:
            self.drops.note("unreadable_request", error=f"{type(exc).__name__}: {exc}")
            return
        status, payload, new_id = self._execute(request)
        await self._reply(request, status, payload, new_id)

    def _execute(self, request: Request) -> tuple[int, Any, bytes]:
        """Run a request's command here: (status, tensor data for GET, new id for REFERENCE)."""
        plane = self._owner_of(request.tensor_id)
        try:
            if plane is None:
                raise TensorNotFound("no such tensor", tensor_id=request.tensor_id)
            if request.command == _GET:
                return _OK, plane.serve_get(request.tensor_id), b""
            if request.command == _REFERENCE:
                return _OK, None, bytes.fromhex(plane.serve_reference(request.tensor_id))
            plane.serve_release(request.tensor_id)
            return _OK, None, b""
        except TensorNotFound:
            return _NOT_FOUND, None, b""
        except Exception as exc:
            log.warning("data_plane_command_failed", command=request.command, error=f"{type(exc).__name__}: {exc}")
            return _FAILED, None, b""

    async def _reply(self, request: Request, status: int, payload: Any, new_id: bytes) -> None:
        header = np.zeros(4, dtype=np.uint64)
        header[0] = status
        if payload is not None:
            header[1] = payload.nbytes
        if new_id:
            header[2], header[3] = struct.unpack("<QQ", new_id)
        timeout = self.timeout
        if request.fresh:
            self.endpoints.retire(request.address)
        try:
            entry = await self.endpoints.acquire(request.address, timeout)
        except ucx_address.BadAddress as exc:
            self.drops.note("bad_consumer_address", error=str(exc))
            return
        except Exception as exc:
            log.info("data_plane_reply_failed", consumer=request.consumer_id, error=f"{type(exc).__name__}: {exc}")
            return
        failed = True
        try:
            async with asyncio.timeout(timeout):
                await self._send(entry.ep, header, request.reply_tag)
                if request.command == _GET:  # the consumer posted a receive for the tensor: always answer it
                    data = payload.reshape(-1) if payload is not None else np.empty(0, dtype=np.uint8)
                    await self._send(entry.ep, data, request.reply_tag + 1)
            failed = False
        except Exception as exc:  # the consumer went away or is stuck: retire this endpoint, keep serving
            log.info("data_plane_reply_failed", consumer=request.consumer_id, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.endpoints.release(entry, failed=failed)

    def _owner_of(self, tensor_id: str) -> DataPlane | None:
        for plane in self._planes:
            if tensor_id in plane.store:
                return plane
        return None

    # -- consumer side --------------------------------------------------------

    async def _call(self, address: str, cmd: int, tensor_id: str, timeout: float, out: Any = None) -> np.ndarray:
        """One command to the owner at ``address``, all of it within ``timeout``.

        A failure that is not a timeout is tried once more with the FRESH flag: UCX pairs the
        two processes' endpoints, and an owner whose reply endpoint is paired with one this
        process closed (a retired or idle endpoint) gets its large answers cancelled here;
        FRESH makes it answer over a new endpoint."""
        try:
            raw_id = bytes.fromhex(tensor_id)
            if len(raw_id) != 16:
                raise ValueError
        except ValueError:
            raise TensorNotFound(f"malformed tensor id {tensor_id!r}", tensor_id=tensor_id) from None
        try:
            key = base64.b64decode(address, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise DataPlaneError(f"the owner's data-plane address of tensor {tensor_id} is not base64",
                                 tensor_id=tensor_id) from None
        try:
            async with asyncio.timeout(timeout):
                for attempt in (1, 2):
                    entry = await self.endpoints.acquire(key, timeout)
                    try:
                        header = await self._exchange(entry.ep, cmd, tensor_id, out, fresh=attempt > 1)
                        break
                    except DataPlaneError:
                        raise
                    except Exception as exc:
                        if attempt > 1:
                            raise
                        log.info("data_plane_pull_retried", tensor_id=tensor_id, error=f"{type(exc).__name__}: {exc}")
                    finally:  # only an endpoint UCX declares dead is replaced: a slow answer is no reason
                        self.endpoints.release(entry, failed=not self._endpoint_alive(entry.ep))
        except DataPlaneError:
            raise
        except ucx_address.BadAddress as exc:
            raise DataPlaneError(f"the owner's data-plane address of tensor {tensor_id} is malformed: {exc}",
                                 tensor_id=tensor_id) from None
        except TimeoutError:
            raise PeerUnreachable(f"the owner of tensor {tensor_id} did not answer within {timeout} s",
                                  tensor_id=tensor_id) from None
        except Exception as exc:
            raise PeerUnreachable(f"pull of tensor {tensor_id} failed: {type(exc).__name__}: {exc}",
                                  tensor_id=tensor_id) from exc
        if header[0] == _NOT_FOUND:
            raise TensorNotFound(f"the owner has no tensor {tensor_id} (released, expired or never stored)",
                                 tensor_id=tensor_id)
        if header[0] != _OK:
            raise DataPlaneError(f"the owner refused command {cmd} for tensor {tensor_id}", tensor_id=tensor_id)
        return header

    async def _exchange(self, ep: Any, cmd: int, tensor_id: str, out: Any, *, fresh: bool) -> np.ndarray:
        tag = new_reply_tag()
        request = np.frombuffer(encode_request(cmd | (FRESH if fresh else 0), tensor_id, self._my_id, tag,
                                               self._my_address), dtype=np.uint8)
        header = np.zeros(4, dtype=np.uint64)
        got_header = self._expect(tag, header)
        got_data = self._expect(tag + 1, out) if cmd == _GET else None
        try:
            await self._send(ep, request, REQUEST_TAG)
            await self._answer(got_header, ep)
            if got_data is not None:
                if header[0] == _OK and int(header[1]) != out.nbytes:
                    raise DataPlaneError(f"tensor {tensor_id} has {int(header[1])} bytes, expected {out.nbytes}",
                                         tensor_id=tensor_id)
                if self._awaiting.pop(tag + 1, None) is not None:
                    # The tensor has not queued yet: post its receive now, while the owner is
                    # sending. A receive posted before the data arrives is what UCX moves fastest
                    # (measured: 64 MiB over shared memory ~3x the CPU when taken from the queue).
                    got_data = self._driver_or_fail().recv_on(ep, out, tag + 1)
                    got_data.add_done_callback(_consume)
                await self._answer(got_data, ep)
        finally:  # an answer that comes later is discarded
            self._awaiting.pop(tag, None)
            self._awaiting.pop(tag + 1, None)
        return header

    async def _answer(self, fut: asyncio.Future[None], ep: Any) -> None:
        """Wait for an answer; give up early when UCX declares the endpoint dead."""
        while True:
            done, _ = await asyncio.wait({fut}, timeout=_LIVENESS_CHECK)
            if done:
                return fut.result()
            if not self._endpoint_alive(ep):
                raise ConnectionError("the endpoint to the owner failed")

    def _driver_or_fail(self) -> EventDriver:
        if self._driver is None:
            raise DataPlaneError("the UCX transport is closed")
        return self._driver

    def _send(self, ep: Any, buf: Any, tag: int) -> asyncio.Future[None]:
        return self._driver_or_fail().send(ep, buf, tag)

    async def fetch(self, address: str, tensor_id: str, out: Any, timeout: float) -> None:
        await self._call(address, _GET, tensor_id, timeout, out)

    async def command(self, address: str, cmd: int, tensor_id: str, timeout: float) -> str:
        header = await self._call(address, cmd, tensor_id, timeout)
        if header[2] or header[3]:
            return struct.pack("<QQ", int(header[2]), int(header[3])).hex()
        return ""


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (a discarded or abandoned receive may end in an error)."""
    if not fut.cancelled():
        fut.exception()
