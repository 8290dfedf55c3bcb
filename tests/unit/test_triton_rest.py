"""tdist.triton.rest without a Triton server: the request/response codec (pure), and the HTTP/1.1
framing against a real asyncio server on 127.0.0.1 that answers as we script it (split reads,
short bodies, closed connections, extra bytes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from tdist.triton.rest import (
    InputTensor,
    RequestedOutput,
    RestClient,
    RestError,
    decode_infer,
    deserialize_bytes,
    encode_infer,
    serialize_bytes,
    triton_dtype,
)

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
          np.float16, np.float32, np.float64]


def _response(outputs: list[tuple[str, np.ndarray]], *, extra: dict[str, object] | None = None) -> tuple[bytes, int]:
    """A Triton inference response body (JSON header + binary outputs) and its header length."""
    metas, blobs = [], []
    for name, array in outputs:
        dt = triton_dtype(array.dtype)
        data = serialize_bytes(array) if dt == "BYTES" else array.tobytes()
        metas.append({"name": name, "datatype": dt, "shape": list(array.shape),
                      "parameters": {"binary_data_size": len(data)}})
        blobs.append(data)
    header = json.dumps({"model_name": "m", "model_version": "1", "id": "r1", "outputs": metas, **(extra or {})}).encode()
    return header + b"".join(blobs), len(header)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_fixed_size_dtype_round_trips(dtype: type) -> None:
    array = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    header, parts = encode_infer([InputTensor("x", array, triton_dtype(array.dtype) or "")], None)
    doc = json.loads(header)
    assert doc["inputs"] == [{"name": "x", "shape": [3, 4], "datatype": triton_dtype(array.dtype),
                              "parameters": {"binary_data_size": array.nbytes}}]
    assert doc["parameters"] == {"binary_data_output": True}
    assert b"".join(bytes(p) for p in parts) == array.tobytes()
    body, hl = _response([("y", array)])
    out = decode_infer(bytearray(body), hl).outputs[0]
    assert out.array is not None and out.array.dtype == array.dtype
    np.testing.assert_array_equal(out.array, array)


def test_bytes_tensors_round_trip() -> None:
    array = np.array([[b"a", b""], ["\u00e9t\u00e9", b"\x00\xff"]], dtype=np.object_)
    raw = serialize_bytes(array)
    assert raw[:5] == b"\x01\x00\x00\x00a"
    np.testing.assert_array_equal(deserialize_bytes(raw, 4).reshape(2, 2),
                                  np.array([[b"a", b""], ["\u00e9t\u00e9".encode(), b"\x00\xff"]], dtype=np.object_))
    body, hl = _response([("s", array)])
    out = decode_infer(body, hl).outputs[0]
    assert out.datatype == "BYTES" and out.array is not None and out.array.shape == (2, 2)
    assert out.array[1, 0] == "\u00e9t\u00e9".encode()
    with pytest.raises(RestError, match="truncated"):
        deserialize_bytes(raw[:-3] + b"\xff\xff\xff", 5)


def test_request_header_names_shared_memory_outputs_parameters_and_id() -> None:
    x = np.arange(3, dtype=np.int64)
    header, parts = encode_infer(
        [InputTensor('in "quoted"', x, "INT64"), InputTensor("z", x, "INT64", shm=("r1", 24, 128))],
        [RequestedOutput("a"), RequestedOutput("b", shm=("r1", 64, 192))],
        {"input_copies": 2, "delay": "0.5", "flag": True}, request_id='id-"1"')
    doc = json.loads(header)
    assert doc["id"] == 'id-"1"'
    assert doc["inputs"][0]["name"] == 'in "quoted"'
    assert doc["inputs"][1]["parameters"] == {"shared_memory_region": "r1", "shared_memory_byte_size": 24,
                                              "shared_memory_offset": 128}
    assert doc["outputs"] == [{"name": "a", "parameters": {"binary_data": True}},
                              {"name": "b", "parameters": {"shared_memory_region": "r1", "shared_memory_byte_size": 64,
                                                           "shared_memory_offset": 192}}]
    assert doc["parameters"] == {"input_copies": 2, "delay": "0.5", "flag": True}
    assert len(parts) == 1  # the shared-memory input sends no bytes


@pytest.mark.parametrize("name", ["timeout", "priority", "sequence_id", "binary_data_output", "triton_x"])
def test_reserved_parameters_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode_infer([InputTensor("x", np.ones(1, dtype=np.int64), "INT64")], None, {name: 1})


def test_a_shared_memory_output_has_no_array_and_outputs_are_views() -> None:
    y = np.arange(4, dtype=np.float32)
    body, hl = _response([("y", y)])
    doc = json.loads(body[:hl])
    doc["outputs"].append({"name": "in_shm", "datatype": "INT64", "shape": [2],
                           "parameters": {"shared_memory_region": "r1"}})
    header = json.dumps(doc).encode()
    buf = bytearray(header + body[hl:])
    resp = decode_infer(buf, len(header))
    assert resp.id == "r1" and resp.model_version == "1"
    first, second = resp.outputs
    assert first.array is not None and not first.array.flags.owndata  # a view of the body
    np.testing.assert_array_equal(first.array, y)
    assert second.array is None and second.shape == [2]


def test_inconsistent_responses_are_errors() -> None:
    body, hl = _response([("y", np.arange(4, dtype=np.int64))])
    with pytest.raises(RestError, match="runs past"):
        decode_infer(body[:-1], hl)
    with pytest.raises(RestError, match="past the body"):
        decode_infer(body, len(body) + 1)
    with pytest.raises(RestError, match="not JSON"):
        decode_infer(b"{nope" + body, hl)
    wrong = body.replace(b'"shape": [4]', b'"shape": [5]')
    with pytest.raises(RestError, match="bytes for shape"):
        decode_infer(wrong, hl)


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 framing against a scripted server


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class _Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Awaitable[_Server]]]:
    servers: list[_Server] = []

    async def make(handler: Handler) -> _Server:
        s = _Server(handler)
        s.server = await asyncio.start_server(s._serve, "127.0.0.1", 0)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            assert s.server is not None
            s.server.close()
            await s.server.wait_closed()


def _http(status: str, body: bytes, headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_split_reads_keep_alive_and_large_bodies(scripted) -> None:  # type: ignore[no-untyped-def]
    big = np.arange(1 << 18, dtype=np.int64)  # 2 MiB: read straight into the body buffer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await _read_request(reader)
            assert b"Inference-Header-Content-Length" in head
            payload, hl = _response([("y", np.frombuffer(body[-8:], dtype=np.int64)), ("big", big)])
            raw = _http("200 OK", payload, f"Inference-Header-Content-Length: {hl}\r\n")
            pieces = [raw[i:i + 7] for i in range(0, 203, 7)]  # headers over many reads
            pieces += [raw[i:i + 100_000] for i in range(203, len(raw), 100_000)]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()

    server = await scripted(handler)
    client = RestClient(server.url)
    try:
        for i in range(3):
            x = np.array([i], dtype=np.int64)
            resp = await client.infer("m", [InputTensor("x", x, "INT64")])
            assert resp.outputs[0].array is not None and resp.outputs[0].array.tolist() == [i]
            np.testing.assert_array_equal(resp.outputs[1].array, big)  # type: ignore[arg-type]
        assert server.connections == 1  # one keep-alive connection for serial calls
    finally:
        await client.close()


async def test_errors_closed_connections_and_cancellation(scripted) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await _read_request(reader)
            path = head.split(b" ")[1]
            if path.startswith(b"/v2/models/bad/"):
                writer.write(_http("400 Bad Request", b'{"error":"inference input \'x\' data-type is wrong"}'))
            elif path.startswith(b"/v2/models/close/"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
                await writer.drain()
                return  # closes mid-body
            elif path.startswith(b"/v2/models/extra/"):
                writer.write(_http("200 OK", b"{}") + b"junk")
            elif path.startswith(b"/v2/models/slow/"):
                await asyncio.sleep(30)
            else:
                writer.write(_http("200 OK", b'{"outputs":[]}', "Inference-Header-Content-Length: 14\r\n"))
            await writer.drain()

    server = await scripted(handler)
    client = RestClient(server.url)
    x = [InputTensor("x", np.ones(1, dtype=np.int64), "INT64")]
    try:
        with pytest.raises(RestError) as bad:
            await client.infer("bad", x)
        assert bad.value.status() == "400" and "data-type" in bad.value.message()
        await client.infer("ok", x)  # an error response leaves the connection usable
        assert server.connections == 1
        with pytest.raises(ConnectionError, match="lost"):
            await client.infer("close", x)
        with pytest.raises(ConnectionError, match="more than its Content-Length"):
            await client.infer("extra", x)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.infer("slow", x)
        before = server.connections
        await client.infer("ok", x)  # never on the connection of a cancelled call
        assert server.connections == before + 1
        with pytest.raises(ValueError, match="line break"):
            await client.request("GET", "/", headers={"k": "v\r\nInjected: 1"})
    finally:
        await client.close()
    with pytest.raises(ConnectionError, match="closed"):
        await client.infer("ok", x)


async def test_concurrent_calls_each_get_their_own_answer(scripted) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await _read_request(reader)
            value = np.frombuffer(body[-8:], dtype=np.int64)
            await asyncio.sleep(0.001 * int(value[0] % 5))
            payload, hl = _response([("y", -value)])
            writer.write(_http("200 OK", payload, f"Inference-Header-Content-Length: {hl}\r\n"))
            await writer.drain()

    server = await scripted(handler)
    client = RestClient(server.url)

    async def one(i: int) -> int:
        resp = await client.infer("m", [InputTensor("x", np.array([i], dtype=np.int64), "INT64")])
        assert resp.outputs[0].array is not None
        return int(resp.outputs[0].array[0])

    try:
        for _ in range(3):
            assert await asyncio.gather(*(one(i) for i in range(16))) == [-i for i in range(16)]
        assert server.connections <= 16  # connections are reused across rounds
    finally:
        await client.close()


async def test_unreachable_server_raises_oserror() -> None:
    from tdist.process import free_port

    client = RestClient(f"127.0.0.1:{free_port()}")
    with pytest.raises(OSError):
        await client.infer("m", [InputTensor("x", np.ones(1, dtype=np.int64), "INT64")])
    await client.close()
