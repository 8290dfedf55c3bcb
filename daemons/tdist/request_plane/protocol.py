"""The request-plane wire format: pure encode/decode, no I/O.

Every message is one frame::

    b"TD" | version:u8 | kind:u8 | reply_len:u16 | reply | header_len:u32 | header | tensor bytes

A *batch* carries several request frames of one caller to one operator in one stream message
(one store, PubAck, delivery and ack for them all), or several final responses of one worker to
one caller in one core NATS message::

    b"TD" | version:u8 | kind=b"B" | 0:u16 | count:u32 | (frame_len:u32 | member frame) * count

All integers are little-endian. ``reply`` is the caller's inbox subject (empty
in responses); it comes before the JSON header so that a worker can still send
an error response when the header is malformed. ``header`` is compact UTF-8 JSON (orjson: the header is on the hot path); its
``tensors`` list gives ``[name, dtype, shape, nbytes]`` for each inline tensor,
whose bytes follow in that order, and ``[name, dtype, shape, nbytes, {"ref", "owner"}]``
for a tensor passed by reference (no bytes in the frame; the owner's data-plane
address is in the header's ``peers`` map, once per owner).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import orjson

from tdist import tensors
from tdist.data_plane.descriptor import TensorRef
from tdist.errors import InvalidRequest, TdistError, error_from_code

MAGIC = b"TD"
VERSION = 1
KIND_REQUEST = ord("Q")
KIND_RESPONSE = ord("R")
KIND_BATCH = ord("B")
MAX_BATCH = 1024
"""Most request frames a worker accepts in one batch."""
_COUNT = struct.Struct("<I")
BATCH_OVERHEAD = 8 + 4
"""Bytes of a batch frame besides its members' frames (each member adds 4 more)."""
_PREFIX = struct.Struct("<2sBBH")
_HEADER_LEN = struct.Struct("<I")

T = TypeVar("T")
ResponseKind = Literal["partial", "final", "error"]
RESPONSE_KINDS: tuple[str, ...] = ("partial", "final", "error")


@dataclass(slots=True)
class RequestMessage:
    id: str
    trace_id: str
    operator: str
    version: int
    deadline: float
    """Absolute deadline, seconds since the Unix epoch."""
    reply_to: str
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    """numpy arrays (inline) or ``TensorRef`` (by reference)."""
    parent_id: str | None = None


@dataclass(slots=True)
class ErrorInfo:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        if isinstance(exc, TdistError):
            return cls(exc.code, exc.message, _jsonable(exc.details))
        return cls("OPERATOR_ERROR", f"{type(exc).__name__}: {exc}", {"type": type(exc).__name__})

    def to_exception(self) -> TdistError:
        return error_from_code(self.code, self.message, self.details)


@dataclass(slots=True)
class ResponseMessage:
    request_id: str
    kind: ResponseKind
    worker_id: str = ""
    attempt: int = 1
    outputs: dict[str, Any] = field(default_factory=dict)
    """numpy arrays (inline) or ``TensorRef`` (by reference)."""
    parameters: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None

    @property
    def final(self) -> bool:
        return self.kind != "partial"


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)) for k, v in details.items()}


def _frame(kind: int, reply: str, header: dict[str, Any], arrays: Mapping[str, Any]) -> bytes:
    metas: list[list[Any]] = []
    bodies: list[bytes | memoryview] = []
    peers: dict[str, str] = {}
    for name, value in arrays.items():
        if isinstance(value, TensorRef):  # by reference: the descriptor only, no bytes
            metas.append([name, value.dtype, list(value.shape), value.nbytes, value.wire()])
            peers[value.owner] = value.address
            continue
        arr = tensors.as_array(value)
        dtype = tensors.triton_dtype(arr)
        data = tensors.to_bytes(arr, dtype)
        metas.append([name, dtype, list(arr.shape), len(data)])
        bodies.append(data)
    header["tensors"] = metas
    if peers:
        header["peers"] = peers
    reply_b = reply.encode()
    try:
        header_b = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise InvalidRequest(f"parameters must be JSON values: {exc}") from None
    return b"".join(
        [_PREFIX.pack(MAGIC, VERSION, kind, len(reply_b)), reply_b, _HEADER_LEN.pack(len(header_b)), header_b, *bodies]
    )


def _unframe(data: bytes, want_kind: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    reply, offset = _read_reply(data)
    if reply is None:
        raise InvalidRequest("not a tdist message (bad magic, version, truncated prefix or a reply inbox "
                             "that is not a plain NATS subject)")
    kind = data[3]
    if kind != want_kind:
        raise InvalidRequest(f"expected message kind {chr(want_kind)!r}, got {chr(kind)!r}", reply_to=reply)
    if offset + _HEADER_LEN.size > len(data):
        raise InvalidRequest("message is truncated before its header", reply_to=reply)
    (header_len,) = _HEADER_LEN.unpack_from(data, offset)
    offset += _HEADER_LEN.size
    if offset + header_len > len(data):
        raise InvalidRequest("message is truncated inside its header", reply_to=reply)
    view = memoryview(data)
    try:
        header = orjson.loads(view[offset : offset + header_len])
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"message header is not valid JSON: {exc}", reply_to=reply) from None
    if not isinstance(header, dict):
        raise InvalidRequest("message header is not a JSON object", reply_to=reply)
    offset += header_len
    arrays: dict[str, Any] = {}
    metas = header.get("tensors", [])
    if not isinstance(metas, list):
        raise InvalidRequest("'tensors' is not a list", reply_to=reply)
    peers = header.get("peers") or {}
    if not isinstance(peers, dict):
        raise InvalidRequest("'peers' is not an object", reply_to=reply)
    for meta in metas:
        if not isinstance(meta, list) or len(meta) not in (4, 5):
            raise InvalidRequest(f"bad tensor descriptor {meta!r:.200}: not [name, dtype, shape, nbytes(, ref)]",
                                 reply_to=reply)
        name, dtype, shape, nbytes = meta[:4]
        if not isinstance(name, str) or not name or not isinstance(dtype, str):
            raise InvalidRequest(f"bad tensor descriptor {meta!r:.200}: name and dtype must be strings", reply_to=reply)
        if name in arrays:
            raise InvalidRequest(f"tensor {name!r:.80} appears twice", reply_to=reply)
        if not isinstance(shape, list):
            raise InvalidRequest(f"bad tensor descriptor {meta!r:.200}: the shape is not a list", reply_to=reply)
        if len(meta) == 5:
            try:
                arrays[name] = TensorRef.from_wire(meta[4], dtype, shape, nbytes, peers)
            except InvalidRequest as exc:
                raise InvalidRequest(f"tensor {name!r:.80}: bad reference descriptor: {exc.message}",
                                     reply_to=reply) from None
            continue
        if type(nbytes) is not int:
            raise InvalidRequest(f"bad tensor descriptor {meta!r:.200}: nbytes is not an integer", reply_to=reply)
        if nbytes < 0 or offset + nbytes > len(data):
            raise InvalidRequest(f"tensor {name!r:.80} runs past the end of the message", reply_to=reply)
        try:
            arrays[name] = tensors.from_bytes(view[offset : offset + nbytes], dtype, tuple(shape))
        except InvalidRequest as exc:
            raise InvalidRequest(f"tensor {name!r:.80}: {exc.message}", reply_to=reply, **exc.details) from None
        offset += nbytes
    if offset != len(data):
        raise InvalidRequest(f"{len(data) - offset} unexpected trailing bytes", reply_to=reply)
    return reply, header, arrays


MAX_REPLY_SUBJECT = 512
_REPLY_SUBJECT = re.compile(r"[^\s\x00-\x1f\x7f.*>]+(?:\.[^\s\x00-\x1f\x7f.*>]+)*")
"""A subject a worker may publish to: dot-separated non-empty tokens without whitespace, control
characters or wildcards. nats-py writes the subject into the protocol line as it is, so a reply
with "\r\n" in it would inject protocol commands into the worker's connection."""


def peek_reply(data: bytes) -> str | None:
    """The reply inbox of a frame, or None if even the fixed prefix is unreadable or the inbox is
    not a subject a worker may publish to ("" for responses, which have none)."""
    return _read_reply(data)[0]


def _read_reply(data: bytes) -> tuple[str | None, int]:
    """``peek_reply`` and the offset just past the inbox."""
    if len(data) < _PREFIX.size:
        return None, 0
    magic, version, _kind, reply_len = _PREFIX.unpack_from(data, 0)
    end = _PREFIX.size + reply_len
    if magic != MAGIC or version != VERSION or end > len(data):
        return None, 0
    if not reply_len:
        return "", end
    try:
        reply = str(data[_PREFIX.size : end], "utf-8")
    except UnicodeDecodeError:
        return None, 0
    if reply_len > MAX_REPLY_SUBJECT or not _REPLY_SUBJECT.fullmatch(reply):
        return None, 0
    return reply, end


def encode_request(msg: RequestMessage) -> bytes:
    header: dict[str, Any] = {
        "id": msg.id,
        "trace": msg.trace_id,
        "op": msg.operator,
        "ver": msg.version,
        "deadline": msg.deadline,
        "params": msg.parameters,
    }
    if msg.parent_id:
        header["parent"] = msg.parent_id
    return _frame(KIND_REQUEST, msg.reply_to, header, msg.inputs)


def decode_request(data: bytes) -> RequestMessage:
    """The request in ``data``, or ``InvalidRequest`` (with ``reply_to`` when the prefix could be
    read): every failure, whatever the bytes, is an ``InvalidRequest``, so a worker can always
    answer and drop a malformed message instead of handing it back."""
    try:
        return _decode_request(data)
    except InvalidRequest:
        raise
    except Exception as exc:  # a case the checks above missed: still the sender's fault, still one answer
        reply = peek_reply(data)
        details = {"reply_to": reply} if reply is not None else {}
        raise InvalidRequest(f"undecodable request: {type(exc).__name__}: {exc!s:.200}", **details) from None


def _decode_request(data: bytes) -> RequestMessage:
    reply, h, arrays = _unframe(data, KIND_REQUEST)
    try:
        msg = RequestMessage(
            id=_str(h, "id"),
            trace_id=_str(h, "trace"),
            operator=_str(h, "op"),
            version=_int(h, "ver"),
            deadline=_finite(h, "deadline"),
            reply_to=reply,
            parameters=_object(h, "params"),
            inputs=arrays,
            parent_id=_optional_str(h, "parent"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"request header field is missing or invalid: {exc}", reply_to=reply) from None
    if not reply:
        raise InvalidRequest("request has no reply inbox", request_id=msg.id)
    return msg


def encode_batch(frames: list[bytes]) -> bytes:
    """Several encoded requests (``encode_request``), or responses, in one frame, in order."""
    parts: list[bytes] = [_PREFIX.pack(MAGIC, VERSION, KIND_BATCH, 0), _COUNT.pack(len(frames))]
    for frame in frames:
        parts.append(_COUNT.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def fit_batches(items: list[T], size: Callable[[T], int], max_payload: int, most: int = MAX_BATCH) -> list[list[T]]:
    """``items`` in order, cut into runs whose frames (``size(item)`` bytes each) fit one batch
    frame of at most ``max_payload`` bytes and ``most`` members (an item too large alone for a
    batch makes a run of its own)."""
    runs: list[list[T]] = []
    room = max_payload - BATCH_OVERHEAD
    used = 0
    for item in items:
        cost = size(item) + 4
        if runs and len(runs[-1]) < most and used + cost <= room:
            runs[-1].append(item)
            used += cost
        else:
            runs.append([item])
            used = cost
    return runs


def is_batch(data: bytes) -> bool:
    """Whether ``data`` is a batch frame (its members still to be checked by ``split_batch``)."""
    return len(data) >= 4 and data[3] == KIND_BATCH and data[:2] == MAGIC


def split_batch(data: bytes) -> list[bytes]:
    """The member frames of a batch, or ``InvalidRequest`` naming what is wrong with it. The
    members themselves are not decoded here: a bad member is that request's own error."""
    if len(data) < _PREFIX.size + _COUNT.size:
        raise InvalidRequest("batch is truncated before its count")
    magic, version, kind, reply_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION or kind != KIND_BATCH or reply_len:
        raise InvalidRequest("not a tdist batch (bad magic, version, kind or a reply inbox)")
    (count,) = _COUNT.unpack_from(data, _PREFIX.size)
    if not 1 <= count <= MAX_BATCH:
        raise InvalidRequest(f"batch has {count} members, allowed 1 to {MAX_BATCH}")
    frames: list[bytes] = []
    offset = _PREFIX.size + _COUNT.size
    view = memoryview(data)
    for index in range(count):
        if offset + _COUNT.size > len(data):
            raise InvalidRequest(f"batch is truncated before member {index}")
        (size,) = _COUNT.unpack_from(data, offset)
        offset += _COUNT.size
        if offset + size > len(data):
            raise InvalidRequest(f"batch member {index} runs past the end of the message")
        frames.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(data):
        raise InvalidRequest(f"{len(data) - offset} unexpected trailing bytes after the batch's members")
    return frames


def encode_response(msg: ResponseMessage) -> bytes:
    header: dict[str, Any] = {"id": msg.request_id, "kind": msg.kind, "worker": msg.worker_id, "attempt": msg.attempt}
    if msg.parameters:
        header["params"] = msg.parameters
    if msg.error is not None:
        header["error"] = {"code": msg.error.code, "message": msg.error.message, "details": msg.error.details}
    return _frame(KIND_RESPONSE, "", header, msg.outputs)


def decode_response(data: bytes) -> ResponseMessage:
    """The response in ``data``, or ``InvalidRequest`` whatever the bytes (as ``decode_request``)."""
    try:
        return _decode_response(data)
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"undecodable response: {type(exc).__name__}: {exc!s:.200}") from None


def _decode_response(data: bytes) -> ResponseMessage:
    _reply, h, arrays = _unframe(data, KIND_RESPONSE)
    try:
        kind = h["kind"]
        if kind not in RESPONSE_KINDS:
            raise ValueError(f"unknown response kind {kind!r}")
        err = h.get("error")
        return ResponseMessage(
            request_id=_str(h, "id"),
            kind=kind,
            worker_id=str(h.get("worker", "")),
            attempt=_int({"attempt": h.get("attempt", 1)}, "attempt"),
            outputs=arrays,
            parameters=dict(h.get("params") or {}),
            error=ErrorInfo(str(err["code"]), str(err["message"]), dict(err.get("details") or {})) if err else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"response header field is missing or invalid: {exc}") from None


def _str(h: dict[str, Any], key: str) -> str:
    value = h[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} must be a non-empty string")
    return value


def _optional_str(h: dict[str, Any], key: str) -> str | None:
    value = h.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string")
    return value or None


def _int(h: dict[str, Any], key: str) -> int:
    value = h[key]
    if type(value) is not int or value < 0:  # type(): True is an int too
        raise ValueError(f"{key!r} must be a non-negative integer, not {value!r:.40}")
    return value


def _finite(h: dict[str, Any], key: str) -> float:
    """A finite JSON number: no strings ("nan", "inf"), no bools; NaN would pass every deadline check."""
    value = h[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key!r} must be a finite number, not {value!r:.40}")
    return float(value)


def _object(h: dict[str, Any], key: str) -> dict[str, Any]:
    value = h.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} must be an object")
    return value
