"""Triton's REST API (KServe v2 over HTTP/1.1, with Triton's binary tensor extension) on asyncio.

Why not tritonclient: inference from a tdist worker to its own Triton server is on every
request's path, and tritonclient's clients cost more than the request plane itself. Measured
here (2 cores, load 6, the encoder model, 1,000 int64, one call at a time, CPU per call):

==============================  =======  ===========  ===========
client                          p50      client CPU   server CPU
==============================  =======  ===========  ===========
tritonclient.grpc.aio           0.57 ms  296 us       230 us
tritonclient.http.aio           1.24 ms  377 us       750 us
this module                     0.35 ms  121 us       145 us
==============================  =======  ===========  ===========

The one thing it cannot do that gRPC does: Triton 2.51 does not cancel a request whose HTTP
connection closes (measured: the model runs to its end), so a cancelled or timed-out call
frees the caller at once but not the model instance.

:class:`RestClient` keeps a pool of keep-alive connections (one request in flight on each, as
HTTP/1.1 wants); a connection whose call was cancelled, failed or half-read is closed, never
reused. Responses are read into one buffer of their ``Content-Length`` (large bodies straight
from the socket, :class:`asyncio.BufferedProtocol`); outputs are numpy views of it, no copy.
Errors are :class:`RestError` with ``status()`` and ``message()`` as tritonclient's exceptions
have, so ``tdist.triton.client.map_triton_error`` types them the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson

from tdist import tensors
from tdist.errors import InvalidRequest

_MAX_HEAD = 64 << 10
_STAGE = 64 << 10
_RESERVED_PARAMS = frozenset(
    ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers", "binary_data_output"))
_RESERVED_PREFIX = "triton_"

_TO_TRITON: dict[np.dtype[Any], str] = {dt: name for name, dt in tensors.TRITON_TO_NUMPY.items()}
"""``tdist.tensors``' table inverted, BYTES (numpy object) included."""


class RestError(Exception):
    """A Triton error over REST: ``status()`` is the HTTP status ("400"), ``message()`` Triton's text."""

    def __init__(self, status: int | str, message: str) -> None:
        super().__init__(message)
        self._status = str(status)
        self._message = message

    def status(self) -> str:
        return self._status

    def message(self) -> str:
        return self._message


def triton_dtype(dtype: np.dtype[Any]) -> str | None:
    """Triton's datatype name of a numpy dtype (``S`` bytes count as BYTES); None if it has none."""
    name = _TO_TRITON.get(dtype)
    if name is None:
        if dtype.kind == "S":
            return "BYTES"
        from tritonclient.utils import np_to_triton_dtype  # BF16 (ml_dtypes.bfloat16)

        name = np_to_triton_dtype(dtype)
    return name


def numpy_dtype(datatype: str) -> np.dtype[Any] | None:
    """The numpy dtype of a Triton datatype name (BF16: ml_dtypes.bfloat16); None if unknown."""
    dtype = tensors.TRITON_TO_NUMPY.get(datatype)
    if dtype is None:
        from tritonclient.utils import triton_to_np_dtype

        found = triton_to_np_dtype(datatype)
        dtype = None if found is None else np.dtype(found)
    return dtype


# --------------------------------------------------------------------------------------------
# The codec (pure): an inference request's bytes, a response's outputs


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input: its bytes go in the body, unless ``shm`` = (region, byte size, offset) names them."""

    name: str
    array: np.ndarray
    datatype: str
    shm: tuple[str, int, int] | None = None


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One output asked for: in the body, or written to ``shm`` = (region, byte size, offset)."""

    name: str
    shm: tuple[str, int, int] | None = None


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None
    """None when the response has no data for it: the server wrote it into a shared-memory region."""


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any]
    outputs: list[OutputTensor]


serialize_bytes = tensors.serialize_bytes_tensor
"""Triton's BYTES layout (one codec for the request plane and Triton: ``tdist.tensors``)."""


def deserialize_bytes(buf: Any, count: int) -> np.ndarray:
    """The inverse of :func:`serialize_bytes`: ``count`` elements as an object array; a
    malformed output is the server's fault, so a ``RestError`` 500."""
    try:
        return tensors.deserialize_bytes_tensor(buf, (count,), count)
    except InvalidRequest as exc:
        raise RestError("500", f"BYTES output: {exc.message}") from None


def _payload(tensor: InputTensor) -> Any:
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.array)
    array = tensor.array if tensor.array.flags.c_contiguous else np.ascontiguousarray(tensor.array)
    return memoryview(array.reshape(-1).view(np.uint8))


def _json_str(text: str) -> str:
    """``json.dumps(text)``, remembered for the few tensor names a client sees (bounded)."""
    out = _JSON_STRINGS.get(text)
    if out is None:
        if len(_JSON_STRINGS) >= 1024:
            _JSON_STRINGS.clear()
        out = _JSON_STRINGS[text] = json.dumps(text)
    return out


_JSON_STRINGS: dict[str, str] = {}


def _shm_json(shm: tuple[str, int, int]) -> str:
    region, size, offset = shm
    return (f'{{"shared_memory_region":{_json_str(region)},"shared_memory_byte_size":{int(size)},'
            f'"shared_memory_offset":{int(offset)}}}')


def encode_infer(inputs: Sequence[InputTensor], outputs: Sequence[RequestedOutput] | None,
                 parameters: Mapping[str, Any] | None = None, request_id: str = "") -> tuple[bytes, list[Any]]:
    """(JSON header, body parts after it) of an inference request with binary tensors.

    ``outputs`` None asks for every output, in binary. Raises ``ValueError`` on a parameter name
    Triton reserves (``timeout``, ``priority``, ``triton_*``...). The header is written by hand
    (a third of ``json.dumps``' cost); names and values still go through JSON escaping."""
    params: dict[str, Any] = {}
    if parameters:
        for key, value in parameters.items():
            if key in _RESERVED_PARAMS or key.startswith(_RESERVED_PREFIX):
                raise ValueError(f'Parameter "{key}" is a reserved parameter and cannot be specified.')
            params[key] = value
    parts: list[Any] = []
    ins = []
    for t in inputs:
        shape = ",".join([str(int(d)) for d in t.array.shape])
        if t.shm is not None:
            tensor_params = _shm_json(t.shm)
        else:
            data = _payload(t)
            parts.append(data)
            tensor_params = f'{{"binary_data_size":{len(data) if isinstance(data, bytes) else data.nbytes}}}'
        ins.append(f'{{"name":{_json_str(t.name)},"shape":[{shape}],"datatype":"{t.datatype}",'
                   f'"parameters":{tensor_params}}}')
    head = f'{{"id":{orjson.dumps(request_id).decode()},"inputs":[' if request_id else '{"inputs":['
    text = [head, ",".join(ins), "]"]
    if outputs is None:
        params["binary_data_output"] = True
    else:
        outs = []
        for o in outputs:
            out_params = _shm_json(o.shm) if o.shm is not None else '{"binary_data":true}'
            outs.append(f'{{"name":{_json_str(o.name)},"parameters":{out_params}}}')
        text += [',"outputs":[', ",".join(outs), "]"]
    if params:
        text += [',"parameters":', orjson.dumps(params).decode()]
    text.append("}")
    return "".join(text).encode(), parts


def decode_infer(body: bytearray | bytes, header_length: int | None) -> InferResponse:
    """The outputs of an inference response; binary outputs are views of ``body`` (no copy)."""
    end = len(body) if header_length is None else header_length
    if end > len(body):
        raise RestError("500", f"inference header length {end} is past the body's {len(body)} bytes")
    try:
        meta = orjson.loads(memoryview(body)[:end])
    except ValueError as exc:
        raise RestError("500", f"the inference response header is not JSON: {exc}") from None
    offset = end
    outputs: list[OutputTensor] = []
    for o in meta.get("outputs", []):
        name, datatype = o["name"], o["datatype"]
        shape = [int(d) for d in o.get("shape", [])]
        params = o.get("parameters") or {}
        count = 1
        for d in shape:
            count *= d
        array: np.ndarray | None
        if "binary_data_size" in params:
            size = int(params["binary_data_size"])
            if offset + size > len(body):
                raise RestError("500", f"output '{name}' ({size} bytes) runs past the response body")
            if datatype == "BYTES":
                array = deserialize_bytes(memoryview(body)[offset:offset + size], count).reshape(shape)
            else:
                dtype = numpy_dtype(datatype)
                if dtype is None:
                    raise RestError("500", f"output '{name}' has datatype {datatype}, which numpy lacks")
                if count * dtype.itemsize != size:
                    raise RestError("500", f"output '{name}' has {size} bytes for shape {shape} of {datatype}")
                array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
                if len(shape) != 1:
                    array = array.reshape(shape)
            offset += size
        elif "data" in o:
            dtype = numpy_dtype(datatype)
            array = np.array(o["data"], dtype=dtype).reshape(shape)
        else:
            array = None  # written into the shared-memory region the request named (else: the caller says)
        outputs.append(OutputTensor(name, datatype, shape, array))
    return InferResponse(model_name=str(meta.get("model_name", "")), model_version=str(meta.get("model_version", "")),
                         id=str(meta.get("id", "")), parameters=dict(meta.get("parameters") or {}), outputs=outputs)


def _error_text(status: int, body: bytes | bytearray) -> str:
    try:
        doc = json.loads(bytes(body))
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except ValueError:
        pass
    text = bytes(body[:2000]).decode("utf-8", "replace").strip()
    return text or f"HTTP {status}"


# --------------------------------------------------------------------------------------------
# HTTP/1.1 keep-alive connections


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    """Names lower-cased."""
    body: bytearray


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.broken = False
        self._stage = bytearray(_STAGE)
        self._head = bytearray()
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: bytearray | None = None
        self._got = 0
        self._waiter: asyncio.Future[Response] | None = None

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._body is not None:
            return memoryview(self._body)[self._got:]
        return self._stage

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._got += nbytes
            if self._got == len(self._body):
                self._complete()
            return
        if self._waiter is None:
            self._fail(ConnectionError("the server sent bytes nobody asked for"))
            return
        if self._head:  # headers split over reads
            self._head += memoryview(self._stage)[:nbytes]
            buf, n = self._head, len(self._head)
        else:  # the common case: all headers in one read, straight from the staging buffer
            buf, n = self._stage, nbytes
        end = buf.find(b"\r\n\r\n", 0, n)
        if end < 0:
            if buf is self._stage:
                self._head = bytearray(memoryview(self._stage)[:nbytes])
            if len(self._head) > _MAX_HEAD:
                self._fail(ConnectionError(f"response headers longer than {_MAX_HEAD} bytes"))
            return
        try:
            length = self._parse_head(buf[:end])
        except ValueError as exc:
            self._fail(ConnectionError(f"malformed HTTP response: {exc}"))
            return
        start = end + 4
        got = n - start
        if got > length:
            self._fail(ConnectionError("the server sent more than its Content-Length"))
            return
        body = bytearray(length)
        if got:
            with memoryview(buf) as view:
                body[:got] = view[start:n]
        self._head = bytearray()
        self._got = got
        self._body = body
        if got == length:
            self._complete()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to the Triton server lost: {exc or 'closed by the server'}"))

    # -- the exchange

    def _parse_head(self, head: bytes | bytearray) -> int:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"status line {lines[0][:80]!r}")
        self._status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"header line {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self._headers = headers
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ValueError("chunked responses are not supported")
        if "content-length" not in headers:
            raise ValueError("no Content-Length")
        length = int(headers["content-length"])
        if length < 0:
            raise ValueError(f"Content-Length {length}")
        return length

    def _complete(self) -> None:
        assert self._body is not None
        response = Response(self._status, self._headers, self._body)
        self._body = None
        self._got = 0
        self._headers = {}
        waiter, self._waiter = self._waiter, None
        if "close" in response.headers.get("connection", "").lower():
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _fail(self, exc: Exception) -> None:
        self.broken = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def exchange(self, parts: Sequence[Any]) -> Response:
        assert self.transport is not None and self._waiter is None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.writelines(parts)
        return await waiter

    def usable(self) -> bool:
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()


class RestClient:
    """``await RestClient("127.0.0.1:8000").infer(...)``: Triton's REST API on a keep-alive pool.

    ``request()`` is any call; ``infer()``, the health, metadata and system-shared-memory calls
    are the ones tdist uses. ``headers`` of a call (the control key) go on that request only."""

    def __init__(self, url: str, *, max_idle: int = 64) -> None:
        host, sep, port = url.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"Triton REST address must be host:port, not {url!r}")
        self.host = host.strip("[]")
        self.port = int(port)
        self._host_header = f"Host: {url}\r\n".encode()
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._max_idle = max_idle
        self._closed = False
        self._infer_paths: dict[tuple[str, str], bytes] = {}

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    def _head(self, method: str, path: bytes, length: int, headers: Mapping[str, str] | None,
              extra: bytes = b"") -> bytes:
        lines = [method.encode(), b" ", path, b" HTTP/1.1\r\n", self._host_header, extra]
        if headers:
            for name, value in headers.items():
                if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
                    raise ValueError(f"header {name!r} has a line break or colon in it")
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n\r\n" % length)
        return b"".join(lines)

    async def request(self, method: str, path: str | bytes, body_parts: Sequence[Any] = (),
                      headers: Mapping[str, str] | None = None, *, extra_head: bytes = b"") -> Response:
        """One exchange; the response whatever its status (connection failures raise ``OSError``)."""
        if self._closed:
            raise ConnectionError("the Triton REST client is closed")
        raw_path = path if isinstance(path, bytes) else path.encode()
        length = sum(len(p) if isinstance(p, bytes) else memoryview(p).nbytes for p in body_parts)
        head = self._head(method, raw_path, length, headers, extra_head)
        conn = await self._connection()
        self._busy.add(conn)
        reuse = False
        try:
            response = await conn.exchange([head, *body_parts])
            reuse = True
            return response
        finally:
            self._busy.discard(conn)
            if reuse and conn.usable() and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                conn.close()  # cancelled, failed or half-read: never reused

    async def _json(self, method: str, path: str, doc: Any = None,
                    headers: Mapping[str, str] | None = None) -> Any:
        body = [] if doc is None else [json.dumps(doc).encode()]
        response = await self.request(method, path, body, headers)
        if response.status >= 400:
            raise RestError(response.status, _error_text(response.status, response.body))
        return json.loads(bytes(response.body)) if response.body else None

    # -- the calls tdist makes

    async def infer(self, model: str, inputs: Sequence[InputTensor], outputs: Sequence[RequestedOutput] | None = None,
                    *, parameters: Mapping[str, Any] | None = None, request_id: str = "",
                    model_version: str = "") -> InferResponse:
        path = self._infer_paths.get((model, model_version))
        if path is None:
            version = f"/versions/{quote(model_version, safe='')}" if model_version else ""
            path = self._infer_paths[(model, model_version)] = (
                f"/v2/models/{quote(model, safe='')}{version}/infer".encode())
        try:
            header, parts = encode_infer(inputs, outputs, parameters, request_id)
        except ValueError as exc:
            raise RestError("400", str(exc)) from None
        response = await self.request("POST", path, [header, *parts],
                                      extra_head=b"Inference-Header-Content-Length: %d\r\n" % len(header))
        if response.status >= 400:
            raise RestError(response.status, _error_text(response.status, response.body))
        hl = response.headers.get("inference-header-content-length")
        return decode_infer(response.body, int(hl) if hl is not None else None)

    async def is_server_ready(self) -> bool:
        return (await self.request("GET", "/v2/health/ready")).status == 200

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        v = f"/versions/{quote(version, safe='')}" if version else ""
        return (await self.request("GET", f"/v2/models/{quote(model, safe='')}{v}/ready")).status == 200

    async def get_model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        v = f"/versions/{quote(version, safe='')}" if version else ""
        return dict(await self._json("GET", f"/v2/models/{quote(model, safe='')}{v}"))

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int, offset: int = 0,
                                            headers: Mapping[str, str] | None = None) -> None:
        await self._json("POST", f"/v2/systemsharedmemory/region/{quote(name, safe='')}/register",
                         {"key": key, "offset": offset, "byte_size": byte_size}, headers)

    async def unregister_system_shared_memory(self, name: str = "", headers: Mapping[str, str] | None = None) -> None:
        path = f"/v2/systemsharedmemory/region/{quote(name, safe='')}/unregister" if name else \
            "/v2/systemsharedmemory/unregister"
        await self._json("POST", path, None, headers)

    async def close(self) -> None:
        """Close every connection (calls in flight fail with ``ConnectionError``). Idempotent."""
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()


__all__ = ["InferResponse", "InputTensor", "OutputTensor", "RequestedOutput", "RestClient", "RestError",
           "decode_infer", "encode_infer", "numpy_dtype", "triton_dtype"]
