"""Triton dtype names <-> numpy, and the byte layout of tensors (pure, no I/O).

BYTES tensors use Triton's layout: every element is a 4-byte little-endian
length followed by its bytes, elements in C order.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from tdist.errors import InvalidRequest

TRITON_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NUMPY_TO_TRITON = {dt: name for name, dt in TRITON_TO_NUMPY.items() if name != "BYTES"}
_WIRE = {name: dt.newbyteorder("<") for name, dt in TRITON_TO_NUMPY.items() if name != "BYTES"}
"""Wire dtypes (little-endian), computed once: these lookups sit on every request's path."""
_LEN = struct.Struct("<I")

MAX_DIMS = 64
"""numpy's limit (NPY_MAXDIMS); a shape with more dimensions is refused before numpy sees it."""
MAX_SPAN = 1 << 56
"""The most elements a shape may describe once its zero dimensions count as one. numpy refuses
(ValueError) any shape whose non-zero dimensions times the item size pass 2**63, even an empty
one such as ``[0, 2**62]``; this bound keeps every dtype (8-byte items at most) well inside."""


def triton_dtype(array: np.ndarray) -> str:
    """The Triton dtype name of a numpy array (object/bytes/str arrays are BYTES)."""
    name = _NUMPY_TO_TRITON.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if array.dtype.byteorder == ">":
        name = _NUMPY_TO_TRITON.get(array.dtype.newbyteorder("="))
    if name is None:
        raise InvalidRequest(f"dtype {array.dtype} has no Triton equivalent", dtype=str(array.dtype))
    return name


def to_bytes(array: np.ndarray, dtype: str) -> bytes | memoryview:
    """The wire bytes of ``array`` (little-endian, C order)."""
    if dtype == "BYTES":
        return serialize_bytes_tensor(array)
    arr = np.ascontiguousarray(array, dtype=_WIRE[dtype])
    return memoryview(arr.reshape(-1)).cast("B")  # 1-D first: cast() refuses zeros in a multi-dim shape


def check_shape(shape: Any) -> int:
    """The element count of a shape received from a peer; ``InvalidRequest`` unless it is a list or
    tuple of at most ``MAX_DIMS`` plain non-negative ints (no bools) spanning at most ``MAX_SPAN``."""
    if not isinstance(shape, (list, tuple)):
        raise InvalidRequest(f"bad shape {shape!r}: not a list of dimensions", shape=repr(shape)[:200])
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"bad shape: {len(shape)} dimensions, at most {MAX_DIMS} allowed",
                             shape=list(shape[:MAX_DIMS]) + ["..."])
    count = span = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:  # bool is an int
            raise InvalidRequest(f"bad shape {list(shape)}: dimensions must be non-negative integers",
                                 shape=[d if type(d) is int else repr(d)[:40] for d in shape])
        dim = int(dim)
        count *= dim
        span *= max(dim, 1)
        if span > MAX_SPAN:
            raise InvalidRequest(f"bad shape {list(shape)}: more than {MAX_SPAN} elements", shape=list(shape))
    return count


def from_bytes(buf: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array over ``buf``; validates the dtype, the shape and that the sizes agree.
    Every refusal is an ``InvalidRequest``; nothing is allocated before the sizes are checked."""
    if dtype == "BYTES":
        np_dtype = TRITON_TO_NUMPY[dtype]
    else:
        np_dtype = _WIRE.get(dtype)  # type: ignore[assignment]
        if (np_dtype is not None and type(shape) in (list, tuple) and len(shape) == 1 and type(shape[0]) is int
                and 0 <= shape[0] and len(buf) == shape[0] * np_dtype.itemsize):
            # The common case on every message (a 1-D tensor whose bytes match): the checks below in short.
            return np.frombuffer(buf, dtype=np_dtype, count=shape[0])
        if np_dtype is None:
            raise InvalidRequest(f"unknown Triton dtype {dtype!r:.40}", dtype=str(dtype)[:40])
    count = check_shape(shape)
    shape = tuple(int(d) for d in shape)
    if dtype == "BYTES":
        return deserialize_bytes_tensor(buf, shape, count)
    expected = count * np_dtype.itemsize
    if len(buf) != expected:
        raise InvalidRequest(
            f"tensor of {dtype}{list(shape)} needs {expected} bytes, got {len(buf)}",
            dtype=dtype,
            shape=list(shape),
        )
    array = np.frombuffer(buf, dtype=np_dtype, count=count)
    return array if len(shape) == 1 else array.reshape(shape)  # frombuffer is 1-D already


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """Triton's BYTES layout, elements in C order. An element is taken as tritonclient takes
    it: bytes as they are, anything else as the UTF-8 of its ``str`` (5 becomes b"5")."""
    parts: list[bytes] = []
    for item in np.asarray(array).reshape(-1).tolist():
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            data = (item if isinstance(item, str) else str(item)).encode("utf-8")
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(buf: bytes | memoryview, shape: tuple[int, ...], count: int) -> np.ndarray:
    view = memoryview(buf)
    if count * _LEN.size > len(view):  # every element has a 4-byte length: checked before any work
        raise InvalidRequest(f"BYTES tensor is truncated: {count} elements need at least {count * _LEN.size} bytes, "
                             f"got {len(view)}", shape=list(shape))
    items: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(view):
            raise InvalidRequest("BYTES tensor is truncated", shape=list(shape))
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > len(view):
            raise InvalidRequest("BYTES tensor element is truncated", shape=list(shape))
        items.append(bytes(view[pos : pos + length]))
        pos += length
    if pos != len(view):
        raise InvalidRequest(f"BYTES tensor has {len(view) - pos} trailing bytes", shape=list(shape))
    out = np.empty(count, dtype=object)
    out[:] = items
    return out.reshape(shape)


def as_array(value: Any) -> np.ndarray:
    """Accept numpy arrays, scalars, lists, bytes and str as tensor values."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, str)):
        out = np.empty(1, dtype=object)
        out[0] = value
        return out
    arr = np.asarray(value)
    if arr.dtype.kind in ("S", "U"):
        return arr.astype(object)
    return arr
