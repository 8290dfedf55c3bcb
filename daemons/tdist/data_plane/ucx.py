"""The UCX transport (through ucxx): point-to-point pulls between processes.

Addressing uses UCX *worker addresses*, not listeners: a listener binds 0.0.0.0
and needs endpoint error handling, which rules out shared memory (see
platform-facts, section 3). A process's address is published in descriptors.

The protocol is tag matching on the worker:

* a consumer sends a request to the owner on the well-known ``REQUEST_TAG``:
  command, tensor id, its own id, a fresh reply tag and its own worker address;
* the owner receives every request with one worker-level receive (any sender),
  opens (once, then reuses) an endpoint back to the consumer, and answers on the
  reply tag: a 32-byte header (status, size, new id), then for GET the bytes on
  the reply tag + 1, received straight into the consumer's buffer.

Every wait is bounded: a dead peer gives ``PeerUnreachable`` after the timeout,
and its endpoint is dropped so the next pull reconnects.

UCX has one context per process, so the transport is shared by every data plane
of the process (tests run several workers in one process): a request is served
by the plane that holds the tensor id. The last plane to leave shuts UCX down
(``ucxx.reset``), so the next one may start on another event loop.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import secrets
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from tdist.data_plane.ucx_progress import EventDriver
from tdist.errors import DataPlaneError, PeerUnreachable, TensorNotFound
from tdist.logs import get_logger

if TYPE_CHECKING:
    from tdist.data_plane.plane import DataPlane

log = get_logger("tdist.ucx")

REQUEST_TAG = 0x7D15_7000_0000_0001
_REQUEST = struct.Struct("<B16sQQH")  # command, tensor id, consumer id, reply tag, address length
_REQUEST_MAX = 8192
_OK, _NOT_FOUND, _FAILED = 0, 1, 2
_STOP = 255


def _configure_ucx_env(error_handling: bool) -> None:
    """Defaults that suit host memory; ucxx itself would point fragments at CUDA memory."""
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


_shared: UcxTransport | None = None


class UcxTransport:
    @classmethod
    async def acquire(cls, plane: DataPlane) -> UcxTransport:
        """The process's transport, started if needed, now also serving ``plane``."""
        global _shared
        if _shared is None:
            transport = cls(plane.config.endpoint_error_handling)
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

    def __init__(self, error_handling: bool = True) -> None:
        self.error_handling = error_handling
        self.address = ""
        self._ucxx: Any = None
        self._planes: list[DataPlane] = []
        self._my_address = b""
        self._my_id = int.from_bytes(secrets.token_bytes(8), "little")
        # Reply tags: a random 23-bit prefix (never REQUEST_TAG's) and a counter.
        self._tags = itertools.count((secrets.randbits(23) | 1 << 23) << 40, 2)
        self._peers: dict[str, asyncio.Future[Any]] = {}
        self._consumers: dict[int, asyncio.Future[Any]] = {}
        self._server: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._driver: EventDriver | None = None

    async def _start(self) -> None:
        self._ucxx = _import_ucxx(self.error_handling)
        self._my_address = self._ucxx.get_worker_address().tobytes()
        self.address = base64.b64encode(self._my_address).decode()
        self._driver = EventDriver(self._ucxx)
        self._server = asyncio.get_running_loop().create_task(self._serve())

    async def _stop_serving(self) -> None:
        """End the server's receive with a STOP request to ourselves: a cancelled UCX receive
        leaves a frame behind that keeps UCX's context from resetting."""
        if self._server is None or self._server.done():
            return
        try:
            ep = await self._endpoint(self._peers, self.address, self._my_address, 5.0)
            stop = _REQUEST.pack(_STOP, bytes(16), self._my_id, 0, 0)
            await asyncio.wait_for(self._send(ep, np.frombuffer(stop, dtype=np.uint8), REQUEST_TAG), 5.0)
            await asyncio.wait_for(asyncio.shield(self._server), 5.0)
        except Exception as exc:
            log.info("ucx_stop_fallback", error=str(exc))

    async def _close(self) -> None:
        await self._stop_serving()
        tasks = [t for t in (self._server, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Finished tasks keep their exception, whose traceback keeps the cancelled receive's
        # frame, which keeps UCX's context alive: let go of them before the reset.
        self._server = None
        self._handlers.clear()
        del tasks
        for futures in (self._peers, self._consumers):
            for fut in futures.values():
                if fut.done() and not fut.exception():
                    try:
                        fut.result().abort()
                    except Exception:
                        pass
            futures.clear()
        if self._driver is not None:
            await self._driver.close()
            self._driver = None
        try:
            self._ucxx.reset()
        except Exception as exc:  # something still holds an endpoint: UCX stays up for this process
            log.warning("ucx_reset_failed", error=str(exc)[:2000])

    # -- owner side -----------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            buf = np.empty(_REQUEST_MAX, dtype=np.uint8)
            await self._driver_or_fail().recv(buf, REQUEST_TAG)
            if buf[0] == _STOP:
                return
            task = asyncio.get_running_loop().create_task(self._handle(buf))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, buf: np.ndarray) -> None:
        from tdist.data_plane.plane import GET, REFERENCE, RELEASE

        try:
            cmd, raw_id, consumer_id, reply_tag, addr_len = _REQUEST.unpack_from(buf)
            address = bytes(buf[_REQUEST.size : _REQUEST.size + addr_len])
        except struct.error:
            log.warning("bad_data_plane_request")
            return
        tensor_id = raw_id.hex()
        header = np.zeros(4, dtype=np.uint64)
        payload = None
        plane = self._owner_of(tensor_id)
        try:
            if plane is None:
                raise TensorNotFound("no such tensor", tensor_id=tensor_id)
            if cmd == GET:
                payload = plane.serve_get(tensor_id)
                header[1] = payload.nbytes
            elif cmd == REFERENCE:
                new_id = bytes.fromhex(plane.serve_reference(tensor_id))
                header[2], header[3] = struct.unpack("<QQ", new_id)
            elif cmd == RELEASE:
                plane.serve_release(tensor_id)
            else:
                header[0] = _FAILED
        except TensorNotFound:
            header[0] = _NOT_FOUND
            payload = None
        timeout = max(p.config.pull_timeout for p in self._planes) if self._planes else 30.0
        try:
            ep = await self._endpoint(self._consumers, consumer_id, address, timeout)
            await asyncio.wait_for(self._send(ep, header, reply_tag), timeout)
            if payload is not None and header[0] == _OK:
                await asyncio.wait_for(self._send(ep, payload.reshape(-1), reply_tag + 1), timeout)
        except Exception as exc:  # the consumer went away: forget its endpoint, keep serving others
            log.info("data_plane_reply_failed", consumer=consumer_id, error=f"{type(exc).__name__}: {exc}")
            self._drop(self._consumers, consumer_id)

    def _owner_of(self, tensor_id: str) -> DataPlane | None:
        for plane in self._planes:
            if tensor_id in plane.store:
                return plane
        return None

    # -- consumer side --------------------------------------------------------

    async def _endpoint(self, cache: dict[Any, asyncio.Future[Any]], key: Any, address: bytes, timeout: float) -> Any:
        fut = cache.get(key)
        if fut is None:
            coro = self._ucxx.create_endpoint_from_worker_address(
                self._ucxx.get_ucx_address_from_buffer(address), endpoint_error_handling=self.error_handling
            )
            fut = cache[key] = asyncio.ensure_future(coro)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except Exception:
            self._drop(cache, key)
            raise

    def _drop(self, cache: dict[Any, asyncio.Future[Any]], key: Any) -> None:
        fut = cache.pop(key, None)
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            try:
                fut.result().abort()
            except Exception:
                pass

    async def _call(self, address: str, cmd: int, tensor_id: str, timeout: float, out: Any = None) -> np.ndarray:
        try:
            raw_id = bytes.fromhex(tensor_id)
            if len(raw_id) != 16:
                raise ValueError
        except ValueError:
            raise TensorNotFound(f"malformed tensor id {tensor_id!r}", tensor_id=tensor_id) from None
        tag = next(self._tags)
        request = _REQUEST.pack(cmd, raw_id, self._my_id, tag, len(self._my_address)) + self._my_address
        header = np.zeros(4, dtype=np.uint64)
        try:
            ep = await self._endpoint(self._peers, address, base64.b64decode(address), timeout)
            await asyncio.wait_for(self._send(ep, np.frombuffer(request, dtype=np.uint8), REQUEST_TAG), timeout)
            await self._recv(ep, header, tag, timeout)
            if header[0] == _OK and out is not None:
                if int(header[1]) != out.nbytes:
                    raise DataPlaneError(f"tensor {tensor_id} has {int(header[1])} bytes, expected {out.nbytes}",
                                         tensor_id=tensor_id)
                await self._recv(ep, out, tag + 1, timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self._drop(self._peers, address)
            raise PeerUnreachable(f"the owner of tensor {tensor_id} did not answer within {timeout} s",
                                  tensor_id=tensor_id) from None
        except DataPlaneError:
            raise
        except Exception as exc:
            self._drop(self._peers, address)
            raise PeerUnreachable(f"pull of tensor {tensor_id} failed: {type(exc).__name__}: {exc}",
                                  tensor_id=tensor_id) from exc
        if header[0] == _NOT_FOUND:
            raise TensorNotFound(f"the owner has no tensor {tensor_id} (released, expired or never stored)",
                                 tensor_id=tensor_id)
        if header[0] != _OK:
            raise DataPlaneError(f"the owner refused command {cmd} for tensor {tensor_id}", tensor_id=tensor_id)
        return header

    def _driver_or_fail(self) -> EventDriver:
        if self._driver is None:
            raise DataPlaneError("the UCX transport is closed")
        return self._driver

    def _send(self, ep: Any, buf: Any, tag: int) -> asyncio.Future[None]:
        return self._driver_or_fail().send(ep, buf, tag)

    async def _recv(self, ep: Any, buf: Any, tag: int, timeout: float) -> None:
        # Posted on the endpoint (it still matches on the tag alone), so dropping the endpoint
        # after a timeout cancels it; until UCX lets go, the driver keeps ``buf`` alive.
        await asyncio.wait_for(self._driver_or_fail().recv_on(ep, buf, tag), timeout)

    async def fetch(self, address: str, tensor_id: str, out: Any, timeout: float) -> None:
        from tdist.data_plane.plane import GET

        await self._call(address, GET, tensor_id, timeout, out)

    async def command(self, address: str, cmd: int, tensor_id: str, timeout: float) -> str:
        header = await self._call(address, cmd, tensor_id, timeout)
        if header[2] or header[3]:
            return struct.pack("<QQ", int(header[2]), int(header[3])).hex()
        return ""
