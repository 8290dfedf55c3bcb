"""tdist.tensors: Triton dtype names and the wire bytes of tensors."""

from __future__ import annotations

import numpy as np
import pytest

from tdist import tensors
from tdist.errors import InvalidRequest

NUMERIC = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# (0, 3) and () go beyond the basic three: an empty multi-dim tensor and a scalar.
SHAPES = [(1, 4), (2, 4), (0,), (0, 3), ()]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct, non-trivial values of ``dtype`` (BOOL alternates)."""
    count = int(np.prod(shape))
    if dtype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = [bytes([65 + i]) * i for i in range(count)]  # b"", b"B", b"CC", ...
        return out.reshape(shape)
    if dtype == "BOOL":
        return (np.arange(count) % 2 == 1).reshape(shape)
    values = np.arange(count) + 3
    if dtype.startswith("FP"):
        values = values + 0.5
    return values.astype(NUMERIC[dtype]).reshape(shape)


def test_every_triton_dtype_is_covered() -> None:
    assert set(tensors.TRITON_TO_NUMPY) == {*NUMERIC, "BYTES"}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [*NUMERIC, "BYTES"])
def test_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    assert tensors.triton_dtype(array) == dtype

    data = tensors.to_bytes(array, dtype)
    back = tensors.from_bytes(bytes(data), dtype, shape)

    assert back.dtype == tensors.TRITON_TO_NUMPY[dtype]
    assert back.shape == shape
    assert back.tolist() == array.tolist()


@pytest.mark.parametrize("dtype", list(NUMERIC))
def test_numeric_byte_count_is_itemsize_times_elements(dtype: str) -> None:
    array = sample(dtype, (2, 4))
    assert len(tensors.to_bytes(array, dtype)) == 8 * np.dtype(NUMERIC[dtype]).itemsize


def test_numeric_bytes_are_little_endian_c_order() -> None:
    array = np.array([[1, 2], [3, 0x0102]], dtype=np.int16)
    assert bytes(tensors.to_bytes(array, "INT16")) == b"\x01\x00\x02\x00\x03\x00\x02\x01"
    # Fortran-ordered input is still written in C order.
    assert bytes(tensors.to_bytes(np.asfortranarray(array), "INT16")) == b"\x01\x00\x02\x00\x03\x00\x02\x01"


def test_bytes_layout_is_length_prefixed() -> None:
    array = np.array([b"ab", b""], dtype=object)
    assert tensors.to_bytes(array, "BYTES") == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_bytes_layout_of_a_long_element_uses_four_byte_length() -> None:
    array = np.array([b"x" * 300], dtype=object)
    data = tensors.to_bytes(array, "BYTES")
    assert data[:4] == b"\x2c\x01\x00\x00"
    assert data[4:] == b"x" * 300


def test_str_elements_are_utf8() -> None:
    array = np.array(["é", "ab"], dtype=object)
    data = tensors.to_bytes(array, "BYTES")
    assert data == b"\x02\x00\x00\x00\xc3\xa9\x02\x00\x00\x00ab"
    assert tensors.from_bytes(data, "BYTES", (2,)).tolist() == ["é".encode(), b"ab"]


def test_numpy_string_arrays_are_bytes_tensors() -> None:
    assert tensors.triton_dtype(np.array(["ab", "c"])) == "BYTES"
    assert tensors.triton_dtype(np.array([b"ab", b"c"])) == "BYTES"
    assert tensors.to_bytes(np.array(["ab", "c"]), "BYTES") == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_bytes_tensor_keeps_its_shape() -> None:
    data = tensors.to_bytes(np.array([[b"a", b"bb"], [b"", b"c"]], dtype=object), "BYTES")
    back = tensors.from_bytes(data, "BYTES", (2, 2))
    assert back.shape == (2, 2)
    assert back.tolist() == [[b"a", b"bb"], [b"", b"c"]]


@pytest.mark.parametrize(
    ("dtype", "shape", "size"),
    [
        ("INT32", (2,), 7),
        ("INT32", (2,), 9),
        ("FP64", (1, 4), 31),
        ("BOOL", (3,), 0),
        ("UINT8", (0,), 1),
    ],
)
def test_wrong_byte_count_is_rejected(dtype: str, shape: tuple[int, ...], size: int) -> None:
    with pytest.raises(InvalidRequest, match="needs"):
        tensors.from_bytes(b"\x00" * size, dtype, shape)


@pytest.mark.parametrize(
    "data",
    [
        b"\x02\x00\x00",  # length prefix cut short
        b"\x02\x00\x00\x00a",  # element shorter than its length
        b"\x01\x00\x00\x00a",  # second element missing
    ],
)
def test_truncated_bytes_tensor_is_rejected(data: bytes) -> None:
    with pytest.raises(InvalidRequest, match="truncated"):
        tensors.from_bytes(data, "BYTES", (2,))


def test_bytes_tensor_with_trailing_bytes_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="2 trailing bytes"):
        tensors.from_bytes(b"\x01\x00\x00\x00a" + b"zz", "BYTES", (1,))


def test_empty_bytes_tensor_with_data_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="trailing"):
        tensors.from_bytes(b"\x00\x00\x00\x00", "BYTES", (0,))


def test_unknown_dtype_name_is_rejected() -> None:
    with pytest.raises(InvalidRequest) as info:
        tensors.from_bytes(b"\x00" * 4, "FLOAT32", (1,))
    assert info.value.details["dtype"] == "FLOAT32"


@pytest.mark.parametrize("shape", [(-1,), (2, -3)])
def test_negative_shape_is_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidRequest, match="bad shape"):
        tensors.from_bytes(b"", "INT8", shape)


@pytest.mark.parametrize("np_dtype", [np.complex64, np.complex128, "datetime64[s]", "V4"])
def test_unsupported_numpy_dtype_is_rejected(np_dtype: object) -> None:
    with pytest.raises(InvalidRequest, match="no Triton equivalent"):
        tensors.triton_dtype(np.zeros(2, dtype=np_dtype))


@pytest.mark.parametrize(
    ("np_dtype", "dtype", "expected"),
    [
        (">i4", "INT32", b"\x04\x03\x02\x01"),
        (">u2", "UINT16", b"\x02\x01"),
        (">f8", "FP64", np.array([1.5], dtype="<f8").tobytes()),
    ],
)
def test_big_endian_input_is_written_little_endian(np_dtype: str, dtype: str, expected: bytes) -> None:
    value = 1.5 if dtype == "FP64" else (0x01020304 if dtype == "INT32" else 0x0102)
    array = np.array([value], dtype=np_dtype)
    assert tensors.triton_dtype(array) == dtype
    assert bytes(tensors.to_bytes(array, dtype)) == expected
    assert tensors.from_bytes(expected, dtype, (1,)).tolist() == [value]


def test_from_bytes_accepts_memoryview_slices() -> None:
    buf = memoryview(b"junk" + np.array([7, 8], dtype="<i2").tobytes())
    assert tensors.from_bytes(buf[4:], "INT16", (2,)).tolist() == [7, 8]


def test_as_array() -> None:
    single = tensors.as_array(b"abc")
    assert single.dtype == object and single.tolist() == [b"abc"]
    assert tensors.as_array("x").tolist() == ["x"]
    assert tensors.as_array(["a", "bc"]).dtype == object
    assert tensors.as_array([1, 2]).tolist() == [1, 2]
    array = np.zeros(3, dtype=np.float32)
    assert tensors.as_array(array) is array


def test_bytes_elements_are_taken_as_tritonclient_takes_them() -> None:
    """One codec for the request plane and the Triton REST client: bytes as they are, anything
    else as the UTF-8 of its str (an int 5 is b"5", not five zero bytes)."""
    from tdist.triton import rest

    array = np.array([5, "é", b"\x00b", bytearray(b"c"), 1.5], dtype=object)
    data = tensors.to_bytes(array, "BYTES")
    assert tensors.from_bytes(data, "BYTES", (5,)).tolist() == [b"5", "é".encode(), b"\x00b", b"c", b"1.5"]
    assert rest.serialize_bytes(array) == data
    assert rest.deserialize_bytes(data, 5).tolist() == tensors.from_bytes(data, "BYTES", (5,)).tolist()
