"""Every malformed request is an ``InvalidRequest``, whatever the bytes: the decoder never raises
anything else, never allocates from an unchecked size, and validates by-reference descriptors."""

from __future__ import annotations

import base64
import json
import random
import struct
from typing import Any

import numpy as np
import pytest

from tdist.data_plane.descriptor import TensorRef
from tdist.errors import InvalidRequest
from tdist.request_plane.protocol import (
    RequestMessage,
    ResponseMessage,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

REPLY = "_INBOX.abc.r.req7"
ADDRESS = base64.b64encode(bytes(range(200))).decode()
TENSOR_ID = "0123456789abcdef" * 2
SEGMENT = "tdist-4242-" + "0123456789abcdef" * 2
HOST = "fedcba9876543210" * 2
IPC = base64.b64encode(bytes(range(64))).decode()


def frame(header: dict[str, Any] | bytes, body: bytes = b"", *, reply: bytes = REPLY.encode()) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"TD\x01Q" + struct.pack("<H", len(reply)) + reply + struct.pack("<I", len(head)) + head + body


def request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "req7", "trace": "t1", "op": "echo", "ver": 1, "deadline": 4e9, "params": {}}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def by_ref(dtype: str = "FP32", shape: Any = (2, 3), nbytes: Any = 24, owner: Any = "echo-1a2b", ref: Any = TENSOR_ID,
           peers: Any = None, **extra: Any) -> bytes:
    meta: dict[str, Any] = {"ref": ref, "owner": owner, **extra}
    tensors = [["x", dtype, list(shape) if isinstance(shape, tuple) else shape, nbytes, meta]]
    return frame(request(tensors=tensors, peers={"echo-1a2b": ADDRESS} if peers is None else peers))


def invalid(data: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode_request(data)
    return info.value


def test_a_valid_reference_round_trips() -> None:
    ref = TensorRef("echo-1a2b", ADDRESS, TENSOR_ID, "FP32", (2, 3), 24)
    msg = RequestMessage(id="req7", trace_id="t", operator="echo", version=1, deadline=4e9, reply_to=REPLY,
                         inputs={"x": ref})
    assert decode_request(encode_request(msg)).inputs == {"x": ref}
    assert decode_request(by_ref()).inputs["x"] == ref
    bytes_ref = decode_request(by_ref("BYTES", (2,), 8)).inputs["x"]
    assert bytes_ref.dtype == "BYTES" and bytes_ref.nbytes == 8
    gpu = decode_request(by_ref(mem="GPU", dev=1)).inputs["x"]
    assert (gpu.memory_type, gpu.device_id) == ("GPU", 1)


def test_a_same_host_reference_round_trips() -> None:
    """The shared-memory segment and CUDA IPC handle travel with the owner's host identity."""
    cpu = TensorRef("echo-1a2b", ADDRESS, TENSOR_ID, "FP32", (2, 3), 24, segment=SEGMENT, host=HOST)
    gpu = TensorRef("echo-1a2b", ADDRESS, TENSOR_ID, "FP32", (2, 3), 24, "GPU", 1, host=HOST, ipc=IPC)
    msg = RequestMessage(id="req7", trace_id="t", operator="echo", version=1, deadline=4e9, reply_to=REPLY,
                         inputs={"x": cpu, "y": gpu})
    assert decode_request(encode_request(msg)).inputs == {"x": cpu, "y": gpu}
    assert decode_request(by_ref(shm=SEGMENT, host=HOST)).inputs["x"] == cpu
    assert cpu.with_id("f" * 32) == TensorRef("echo-1a2b", ADDRESS, "f" * 32, "FP32", (2, 3), 24, segment=SEGMENT,
                                              host=HOST)


# --- the cases of issue 8: numpy must never see them ------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "body", "reason"),
    [
        (["x", "FP32", [0, 2**62], 0], b"", "more than"),
        (["x", "BYTES", [0, 2**62], 0], b"", "more than"),
        (["x", "FP64", [2**31, 2**31, 2**31], 0], b"", "more than"),
        (["x", "INT8", [1] * 65, 1], b"\x00", "65 dimensions"),
        (["x", "INT8", [0] * 65, 0], b"", "65 dimensions"),
        (["x", "INT8", [True, 2], 2], b"\x00\x00", "non-negative integers"),
        (["x", "INT8", [2.0], 2], b"\x00\x00", "non-negative integers"),
        (["x", "INT8", ["2"], 2], b"\x00\x00", "non-negative integers"),
        (["x", "INT8", [None], 0], b"", "non-negative integers"),
        (["x", "INT8", [-1], 0], b"", "non-negative integers"),
        (["x", "INT8", [2, -3], 0], b"", "non-negative integers"),
        (["x", "INT8", [[2]], 2], b"\x00\x00", "non-negative integers"),
        (["x", "INT32", [3], 8], b"\x00" * 8, "needs 12 bytes"),
        (["x", "BYTES", [1 << 40], 4], b"\x00" * 4, "truncated"),
        (["x", "BYTES", [3], 4], b"\x00" * 4, "truncated"),
        (["x", "INT8", "abc", 3], b"abc", "shape is not a list"),
        (["x", "INT8", {"a": 1}, 1], b"a", "shape is not a list"),
        (["x", "INT8", [1], True], b"a", "nbytes is not an integer"),
        (["x", "INT8", [1], 1.0], b"a", "nbytes is not an integer"),
        ([5, "INT8", [1], 1], b"a", "must be strings"),
        (["x", 7, [1], 1], b"a", "must be strings"),
        (["x", "INT8", [1], 1, {}, 9], b"a", "bad tensor descriptor"),
    ],
)
def test_bad_inline_tensors_are_invalid_requests(tensor: list[Any], body: bytes, reason: str) -> None:
    err = invalid(frame(request(tensors=[tensor]), body))
    assert reason in err.message
    assert err.details["reply_to"] == REPLY


def test_a_tensor_named_twice_is_refused() -> None:
    t = ["x", "INT8", [1], 1]
    assert "appears twice" in invalid(frame(request(tensors=[t, t]), b"ab")).message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (by_ref(dtype="COMPLEX"), "unknown Triton dtype"),
        (by_ref(dtype=None), "must be strings"),
        (by_ref(nbytes=-1), "not a non-negative integer"),
        (by_ref(nbytes=True), "not a non-negative integer"),
        (by_ref(nbytes="24"), "not a non-negative integer"),
        (by_ref(nbytes=25), "has 24 bytes, the descriptor says 25"),
        (by_ref(shape=(2, -3), nbytes=0), "non-negative integers"),
        (by_ref(shape=(0, 2**62), nbytes=0), "more than"),
        (by_ref(shape=[1] * 65, nbytes=4), "65 dimensions"),
        (by_ref(dtype="BYTES", shape=(3,), nbytes=11), "needs at least 12 bytes"),
        (by_ref(owner=""), "not a component id"),
        (by_ref(owner=5), "not a component id"),
        (by_ref(owner="a b"), "not a component id"),
        (by_ref(owner="x" * 129), "not a component id"),
        (by_ref(ref="abc"), "not 32 lowercase hex"),
        (by_ref(ref=TENSOR_ID.upper()), "not 32 lowercase hex"),
        (by_ref(ref=None), "not 32 lowercase hex"),
        (by_ref(mem="TPU"), "unknown memory type"),
        (by_ref(mem=["CPU"]), "unknown memory type"),
        (by_ref(mem="GPU", dev=-1), "device id"),
        (by_ref(mem="GPU", dev=True), "device id"),
        (by_ref(mem="GPU", dev=1 << 40), "device id"),
        (by_ref(shm="../etc/passwd", host=HOST), "not a tdist segment name"),
        (by_ref(shm="tdist-1-" + "0" * 31 + "/", host=HOST), "not a tdist segment name"),
        (by_ref(shm=SEGMENT.replace("tdist", "tdisT"), host=HOST), "not a tdist segment name"),
        (by_ref(shm="tdist-0-" + "0" * 32, host=HOST), "not a tdist segment name"),
        (by_ref(shm=SEGMENT + "\n", host=HOST), "not a tdist segment name"),
        (by_ref(shm=5, host=HOST), "not a tdist segment name"),
        (by_ref(shm=SEGMENT), "comes with a segment"),
        (by_ref(host=HOST), "comes with a segment"),
        (by_ref(shm=SEGMENT, host="x" * 32), "host identity"),
        (by_ref(shm=SEGMENT, host=HOST.upper()), "host identity"),
        (by_ref(shm=SEGMENT, host=7), "host identity"),
        (by_ref(shm=SEGMENT, host=HOST, mem="GPU"), "holds CPU bytes"),
        (by_ref(shape=(0,), nbytes=0, shm=SEGMENT, host=HOST), "holds CPU bytes"),
        (by_ref(ipc=IPC, host=HOST), "for GPU bytes"),
        (by_ref(ipc=IPC[:-4], host=HOST, mem="GPU"), "CUDA IPC handle"),
        (by_ref(ipc="A" * 88, host=HOST, mem="GPU"), "CUDA IPC handle"),
        (by_ref(ipc=[IPC], host=HOST, mem="GPU"), "CUDA IPC handle"),
        (by_ref(peers={}), "no valid data-plane address"),
        (by_ref(peers={"echo-1a2b": 5}), "no valid data-plane address"),
        (by_ref(peers={"echo-1a2b": "not base64!"}), "no valid data-plane address"),
        (by_ref(peers={"echo-1a2b": "QUJD" * 3000}), "no valid data-plane address"),
        (by_ref(peers=[1]), "'peers' is not an object"),
        (frame(request(tensors=[["x", "FP32", [1], 4, "ref"]], peers={})), "not an object"),
    ],
)
def test_bad_reference_descriptors_are_invalid_requests(data: bytes, reason: str) -> None:
    err = invalid(data)
    assert reason in err.message, err.message
    assert err.details["reply_to"] == REPLY


@pytest.mark.parametrize(
    "deadline",
    ["nan", "inf", "-inf", "NaN", "1e400", "5", True, False, None, [], {}, float("nan"), float("inf"), float("-inf")],
)
def test_deadline_must_be_a_finite_number(deadline: Any) -> None:
    fields = request()
    fields["deadline"] = deadline
    # json.dumps writes NaN/Infinity, which orjson refuses: those arrive as a JSON error, the rest as a bad field
    err = invalid(frame(json.dumps(fields).encode()))
    assert "deadline" in err.message or "not valid JSON" in err.message
    assert err.details["reply_to"] == REPLY


def test_deadline_of_a_huge_number_is_refused() -> None:
    err = invalid(frame(b'{"id":"r","trace":"t","op":"o","ver":1,"deadline":1e400}'))
    assert err.details["reply_to"] == REPLY


@pytest.mark.parametrize(
    ("field", "value"),
    [("ver", True), ("ver", "1"), ("ver", 1.5), ("ver", -1), ("params", [["a", 1]]), ("params", "x"),
     ("parent", 5), ("id", 5), ("trace", ""), ("op", None)],
)
def test_header_fields_are_strictly_typed(field: str, value: Any) -> None:
    fields = request()
    fields[field] = value
    err = invalid(frame(json.dumps(fields).encode()))
    assert "missing or invalid" in err.message
    assert err.details["reply_to"] == REPLY


# --- fuzz: decode either returns or raises InvalidRequest -------------------------------------


def _valid_frames() -> list[bytes]:
    ref = TensorRef("client-9f", ADDRESS, TENSOR_ID, "INT64", (4, 2), 64)
    inputs: dict[str, Any] = {
        "a": np.arange(6, dtype=np.int32).reshape(2, 3),
        "b": np.array([b"x", b"yz"], dtype=object),
        "c": np.zeros((0, 3), dtype=np.float16),
        "r": ref,
    }
    msg = RequestMessage(id="req7", trace_id="t", operator="echo", version=2, deadline=4e9, reply_to=REPLY,
                         parameters={"k": [1, 2]}, inputs=inputs, parent_id="p")
    return [encode_request(msg), by_ref(), frame(request())]


_INTERESTING: list[Any] = [0, -1, 1, 2**31, 2**62, 2**63, 2**64, -(2**63), True, False, None, 1.5, float("1e300"),
                           "", "nan", "inf", "BYTES", "FP32", "GPU", [], {}, [0, 2**62], [1] * 70, "x" * 300]


def _mutate_json(value: Any, rng: random.Random) -> Any:
    """Replace one random node of a JSON tree with an interesting value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        if rng.random() < 0.1:
            del out[key]
        else:
            out[key] = _mutate_json(value[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out_l = list(value)
        i = rng.randrange(len(out_l))
        out_l[i] = _mutate_json(out_l[i], rng)
        if rng.random() < 0.1:
            out_l.append(rng.choice(_INTERESTING))
        return out_l
    return rng.choice(_INTERESTING)


def _split(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    reply_len = struct.unpack_from("<H", data, 4)[0]
    start = 6 + reply_len
    (header_len,) = struct.unpack_from("<I", data, start)
    header = json.loads(data[start + 4 : start + 4 + header_len])
    return data[4 + 2 : start], header, data[start + 4 + header_len :]


def _check(data: bytes) -> None:
    """decode_request returns or raises InvalidRequest, and the refusal comes from a named check,
    not from the decoder's last-resort net (which would hide a missing check)."""
    try:
        decode_request(data)
    except InvalidRequest as exc:
        assert not exc.message.startswith("undecodable"), (exc.message, data[:300])


def test_fuzz_structured_headers() -> None:
    rng = random.Random(8)
    for base in _valid_frames():
        reply, header, body = _split(base)
        for _ in range(3000):
            mutated = _mutate_json(header, rng)
            for _ in range(rng.randrange(3)):
                mutated = _mutate_json(mutated, rng)
            cut = body[: rng.randrange(len(body) + 1)] if rng.random() < 0.2 else body
            data = frame(json.dumps(mutated, allow_nan=True).encode(), cut, reply=reply)
            _check(data)


def test_fuzz_bytes() -> None:
    rng = random.Random(9)
    frames = _valid_frames()
    for _ in range(20000):
        data = bytearray(rng.choice(frames))
        for _ in range(rng.randrange(1, 6)):
            op = rng.random()
            i = rng.randrange(len(data) + 1)
            if op < 0.5 and data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
            elif op < 0.7:
                del data[i : i + rng.randrange(1, 16)]
            else:
                data[i:i] = rng.randbytes(rng.randrange(1, 16))
        _check(bytes(data))
    for _ in range(2000):
        _check(rng.randbytes(rng.randrange(64)))
        _check(b"TD\x01Q" + rng.randbytes(rng.randrange(64)))


_DTYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64",
           "BYTES"]
_DIMS: list[Any] = [0, 0, 1, 1, 2, 3, 7, 2**31, 2**62, 2**63 - 1, -1, True, False, 2.0, "2", None, [1]]


def _random_tensor(rng: random.Random, name: str) -> tuple[list[Any], bytes]:
    """A descriptor built from plausible and hostile parts, with a body that mostly agrees with it,
    so that the checks after the size checks are reached too."""
    dtype = rng.choice(_DTYPES) if rng.random() < 0.9 else rng.choice(_INTERESTING)
    ndim = rng.choice([0, 1, 2, 3, 4, 64, 65, 70])
    shape = [rng.choice(_DIMS) if rng.random() < 0.3 else rng.choice([0, 1, 2, 3]) for _ in range(ndim)]
    count = 1
    for d in shape:
        count *= d if type(d) is int and d >= 0 else 1
    itemsize = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "INT32": 4, "UINT32": 4,
                "FP32": 4, "BYTES": 4}.get(dtype, 8) if isinstance(dtype, str) else 1
    nbytes: Any = count * itemsize if count * itemsize < 4096 else rng.choice([0, 8, 4096])
    if rng.random() < 0.1:
        nbytes = rng.choice(_INTERESTING)
    body = bytes(nbytes) if type(nbytes) is int and 0 <= nbytes <= 4096 else b""
    meta: list[Any] = [name, dtype, shape if rng.random() < 0.95 else rng.choice(_INTERESTING), nbytes]
    if rng.random() < 0.3:
        ref: dict[str, Any] = {"ref": TENSOR_ID if rng.random() < 0.8 else rng.choice(_INTERESTING),
                               "owner": "echo-1a2b" if rng.random() < 0.8 else rng.choice(_INTERESTING)}
        if rng.random() < 0.3:
            ref["mem"] = rng.choice(["CPU", "GPU", "TPU", 1, None])
        if rng.random() < 0.3:
            ref["dev"] = rng.choice(_DIMS)
        if rng.random() < 0.2:
            ref["shm"] = SEGMENT if rng.random() < 0.7 else rng.choice(_INTERESTING)
        if rng.random() < 0.2:
            ref["host"] = HOST if rng.random() < 0.7 else rng.choice(_INTERESTING)
        if rng.random() < 0.1:
            ref["ipc"] = IPC if rng.random() < 0.7 else rng.choice(_INTERESTING)
        meta.append(ref if rng.random() < 0.95 else rng.choice(_INTERESTING))
        body = b""
    return meta, body


def test_fuzz_tensor_descriptors() -> None:
    rng = random.Random(11)
    for _ in range(5000):
        metas, body = [], b""
        for i in range(rng.randrange(1, 4)):
            meta, data = _random_tensor(rng, f"t{i}")
            metas.append(meta)
            body += data
        fields = request(tensors=metas, peers={"echo-1a2b": ADDRESS} if rng.random() < 0.9 else rng.choice(_INTERESTING))
        if rng.random() < 0.2:
            fields["deadline"] = rng.choice(_INTERESTING)
        _check(frame(json.dumps(fields).encode(), body))


def test_responses_are_as_strict() -> None:
    rng = random.Random(10)
    good = encode_response(ResponseMessage("r", "final", "w", 1, {"a": np.arange(3)}))
    for _ in range(5000):
        data = bytearray(good)
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256)
        try:
            decode_response(bytes(data))
        except InvalidRequest as exc:
            assert not exc.message.startswith("undecodable"), (exc.message, bytes(data))


def test_an_unforeseen_decoder_failure_is_still_an_invalid_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdist import tensors

    def broken(*_args: Any) -> Any:
        raise RuntimeError("a case nobody checked")

    monkeypatch.setattr(tensors, "from_bytes", broken)
    err = invalid(frame(request(tensors=[["x", "INT8", [1], 1]]), b"\x00"))
    assert err.message.startswith("undecodable request: RuntimeError: a case nobody checked")
    assert err.details == {"reply_to": REPLY}


@pytest.mark.parametrize(
    "reply",
    [
        "_INBOX.x 0\r\nPUB evil.subject 5\r\nhello\r\nPUB y",  # protocol injection through the reply subject
        "_INBOX.abc.>",
        "_INBOX.*.r.1",
        "a..b",
        ".a",
        "a.",
        "a b",
        "a\tb",
        "a\x00b",
        "x" * 513,
    ],
)
def test_a_reply_inbox_that_is_not_a_plain_subject_is_never_answered(reply: str) -> None:
    err = invalid(frame(request(), reply=reply.encode()))
    assert "reply_to" not in err.details
    assert "not a plain NATS subject" in err.message


def test_plain_inboxes_are_accepted() -> None:
    for reply in ("_INBOX.Zt5cYx2Q7L8pQ1.r.a1b2c3", "inbox", "a.b-c_d.e:f"):
        assert decode_request(frame(request(), reply=reply.encode())).reply_to == reply
