"""tdist.request_plane.protocol: the frame layout and its encode/decode functions."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tdist import errors
from tdist.errors import InvalidRequest
from tdist.request_plane.protocol import (
    ErrorInfo,
    RequestMessage,
    ResponseMessage,
    BATCH_OVERHEAD,
    MAX_BATCH,
    decode_request,
    decode_response,
    encode_batch,
    encode_request,
    encode_response,
    fit_batches,
    is_batch,
    peek_reply,
    split_batch,
)

REPLY = "_INBOX.abc.7"


def frame(header: bytes, body: bytes = b"", *, kind: bytes = b"Q", reply: bytes = REPLY.encode()) -> bytes:
    """A frame assembled from its parts, for feeding malformed content to the decoders."""
    return b"TD\x01" + kind + struct.pack("<H", len(reply)) + reply + struct.pack("<I", len(header)) + header + body


def header(**fields: object) -> bytes:
    base: dict[str, object] = {"id": "r1", "trace": "t1", "op": "echo", "ver": 1, "deadline": 10.0, "params": {}}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def mixed_tensors() -> dict[str, np.ndarray]:
    return {
        "ids": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64),
        "scores": np.array([0.25, -1.5], dtype=np.float32),
        "mask": np.array([True, False, True]),
        "text": np.array([b"hello", b"", "wörld".encode()], dtype=object),
        "half": np.array([[1.5]], dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.uint16),
    }


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tolist() == array.tolist(), name


# --- round trips ------------------------------------------------------------


def test_request_round_trip_keeps_every_field() -> None:
    params = {"temperature": 0.7, "stop": ["\n", "END"], "nested": {"a": [1, {"b": None}], "flag": True}}
    msg = RequestMessage(
        id="req-1",
        trace_id="trace-9",
        operator="tokenize",
        version=3,
        deadline=1_700_000_000.125,
        reply_to=REPLY,
        parameters=params,
        inputs=mixed_tensors(),
        parent_id="req-0",
    )

    back = decode_request(encode_request(msg))

    assert (back.id, back.trace_id, back.operator, back.version) == ("req-1", "trace-9", "tokenize", 3)
    assert back.deadline == 1_700_000_000.125
    assert back.reply_to == REPLY
    assert back.parameters == params
    assert back.parent_id == "req-0"
    assert_same_tensors(back.inputs, mixed_tensors())


def test_request_without_parent_or_tensors() -> None:
    msg = RequestMessage(id="r", trace_id="t", operator="op", version=1, deadline=5.0, reply_to="in")
    back = decode_request(encode_request(msg))
    assert back.parent_id is None
    assert back.inputs == {}
    assert back.parameters == {}


def test_request_accepts_plain_python_values_as_inputs() -> None:
    msg = RequestMessage(
        id="r", trace_id="t", operator="op", version=1, deadline=5.0, reply_to="in",
        inputs={"s": "hi", "b": b"raw", "n": [1, 2]},  # type: ignore[dict-item]
    )
    back = decode_request(encode_request(msg)).inputs
    assert back["s"].tolist() == [b"hi"]
    assert back["b"].tolist() == [b"raw"]
    assert back["n"].tolist() == [1, 2]


def test_response_round_trip_keeps_every_field() -> None:
    params = {"usage": {"tokens": [3, 4]}, "done": False}
    msg = ResponseMessage(
        request_id="req-1",
        kind="partial",
        worker_id="echo-abc",
        attempt=2,
        outputs=mixed_tensors(),
        parameters=params,
    )

    back = decode_response(encode_response(msg))

    assert back.request_id == "req-1"
    assert back.kind == "partial"
    assert back.final is False
    assert back.worker_id == "echo-abc"
    assert back.attempt == 2
    assert back.parameters == params
    assert back.error is None
    assert_same_tensors(back.outputs, mixed_tensors())


@pytest.mark.parametrize(("kind", "final"), [("partial", False), ("final", True), ("error", True)])
def test_response_kinds(kind: str, final: bool) -> None:
    back = decode_response(encode_response(ResponseMessage(request_id="r", kind=kind)))  # type: ignore[arg-type]
    assert back.kind == kind
    assert back.final is final


# --- exact layout -------------------------------------------------------------


def test_request_frame_layout_byte_for_byte() -> None:
    msg = RequestMessage(
        id="r1",
        trace_id="t1",
        operator="echo",
        version=2,
        deadline=1.5,
        reply_to="in.1",
        parameters={"k": 1},
        inputs={"x": np.array([7, 9], dtype=np.uint8)},
    )
    json_header = (
        b'{"id":"r1","trace":"t1","op":"echo","ver":2,"deadline":1.5,'
        b'"params":{"k":1},"tensors":[["x","UINT8",[2],2]]}'
    )
    expected = (
        b"TD"  # magic
        + b"\x01"  # version
        + b"Q"  # kind: request
        + b"\x04\x00"  # reply length, u16 little-endian
        + b"in.1"  # reply inbox
        + len(json_header).to_bytes(4, "little")  # header length, u32 little-endian
        + json_header  # compact JSON
        + b"\x07\x09"  # tensor bytes
    )
    assert encode_request(msg) == expected


def test_response_frame_has_kind_r_and_empty_reply() -> None:
    data = encode_response(ResponseMessage(request_id="r1", kind="final", worker_id="w", attempt=1))
    json_header = b'{"id":"r1","kind":"final","worker":"w","attempt":1,"tensors":[]}'
    assert data == b"TD\x01R\x00\x00" + len(json_header).to_bytes(4, "little") + json_header


# --- peek_reply ---------------------------------------------------------------


def test_peek_reply_on_good_frames() -> None:
    assert peek_reply(frame(b"{}")) == REPLY
    assert peek_reply(encode_response(ResponseMessage(request_id="r", kind="final"))) == ""


def test_peek_reply_only_needs_the_prefix() -> None:
    # The reply is readable even when the rest of the frame is missing.
    assert peek_reply(b"TD\x01Q\x02\x00ab") == "ab"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"TD\x01Q\x02",  # prefix cut short
        b"TD\x01Q\x05\x00ab",  # reply longer than the frame
        b"XX\x01Q\x00\x00",  # bad magic
        b"TD\x02Q\x00\x00",  # unknown version
        b"TD\x01Q\x02\x00\xff\xfe",  # reply is not UTF-8
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_peek_reply_on_bad_input_is_none(data: bytes) -> None:
    assert peek_reply(data) is None


# --- malformed requests ---------------------------------------------------------


def decode_error(data: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode_request(data)
    return info.value


@pytest.mark.parametrize("data", [b"", b"TD", b"nonsense", b"TD\x09Q\x00\x00{}"])
def test_unreadable_prefix_has_no_reply_to(data: bytes) -> None:
    err = decode_error(data)
    assert "reply_to" not in err.details
    assert "not a tdist message" in err.message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(b"{not json"), "not valid JSON"),
        (frame(b"\xff\xfe"), "not valid JSON"),
        (frame(b"[1, 2]"), "not a JSON object"),
        (frame(b'"text"'), "not a JSON object"),
        (frame(header(id=None)), "missing or invalid"),
        (frame(header(id="")), "missing or invalid"),
        (frame(header(ver="two")), "missing or invalid"),
        (frame(header(params=[1, 2])), "missing or invalid"),
        (frame(header(tensors=[["x", "INT8", [4], 4]]), b"\x01\x02"), "runs past the end"),
        (frame(header(tensors=[["x", "INT8", [1], -1]])), "runs past the end"),
        (frame(header(tensors=[["x", "INT8", [2], 2]]), b"\x01\x02\x03"), "1 unexpected trailing bytes"),
        (frame(header(), b"\x00\x00"), "2 unexpected trailing bytes"),
        (frame(header(tensors={"x": 1})), "'tensors' is not a list"),
        (frame(header(tensors=[["x", "INT8"]])), "bad tensor descriptor"),
        (frame(header(tensors=[5])), "bad tensor descriptor"),
        (frame(header(tensors=[["x", "INT8", 3, 3]]), b"abc"), "bad tensor descriptor"),
        (frame(header(tensors=[["x", "INT8", [3], "three"]]), b"abc"), "bad tensor descriptor"),
        (frame(header(tensors=[["x", "INT32", [2], 4]]), b"abcd"), "tensor 'x': tensor of INT32[2] needs 8 bytes"),
        (frame(header(tensors=[["x", "COMPLEX", [1], 1]]), b"a"), "tensor 'x': unknown Triton dtype"),
        (frame(header(tensors=[["x", "BYTES", [1], 3]]), b"\x05\x00\x00"), "tensor 'x': BYTES tensor is truncated"),
        (b"TD\x01Q" + struct.pack("<H", len(REPLY)) + REPLY.encode() + b"\x10\x00", "truncated before its header"),
        (b"TD\x01Q" + struct.pack("<H", len(REPLY)) + REPLY.encode() + b"\x10\x00\x00\x00{}", "truncated inside"),
    ],
)
def test_malformed_request_carries_reply_to(data: bytes, reason: str) -> None:
    err = decode_error(data)
    assert reason in err.message
    assert err.details["reply_to"] == REPLY


def test_tensor_error_keeps_the_tensor_details() -> None:
    err = decode_error(frame(header(tensors=[["x", "INT32", [2], 4]]), b"abcd"))
    assert err.details == {"reply_to": REPLY, "dtype": "INT32", "shape": [2]}


def test_response_decoded_as_request_is_rejected() -> None:
    data = encode_response(ResponseMessage(request_id="r1", kind="final"))
    err = decode_error(data)
    assert "expected message kind 'Q', got 'R'" in err.message
    assert err.details["reply_to"] == ""


def test_request_decoded_as_response_is_rejected() -> None:
    data = encode_request(RequestMessage(id="r", trace_id="t", operator="op", version=1, deadline=1.0, reply_to=REPLY))
    with pytest.raises(InvalidRequest, match="expected message kind 'R', got 'Q'") as info:
        decode_response(data)
    assert info.value.details["reply_to"] == REPLY


def test_request_without_reply_inbox_is_rejected() -> None:
    err = decode_error(frame(header(id="r9"), reply=b""))
    assert "no reply inbox" in err.message
    assert err.details == {"request_id": "r9"}


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "bogus"},
        {"kind": None},
        {"kind": "error", "error": {"message": "no code"}},
        {"kind": "final", "id": 5},
        {"kind": "final", "attempt": "first"},
    ],
)
def test_malformed_response_is_rejected(fields: dict[str, object]) -> None:
    h = {"id": "r1", "kind": "final", **fields}
    data = frame(json.dumps({k: v for k, v in h.items() if v is not None}).encode(), kind=b"R", reply=b"")
    with pytest.raises(InvalidRequest, match="response header field is missing or invalid"):
        decode_response(data)


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("DEADLINE_EXCEEDED", errors.DeadlineExceeded),
        ("CANCELLED", errors.Cancelled),
        ("PAYLOAD_TOO_LARGE", errors.PayloadTooLarge),
        ("OPERATOR_NOT_FOUND", errors.OperatorNotFound),
        ("OPERATOR_ERROR", errors.OperatorError),
        ("INVALID_REQUEST", errors.InvalidRequest),
        ("MAX_DELIVERIES", errors.MaxDeliveriesExceeded),
        ("REQUEST_PLANE_FULL", errors.RequestPlaneFull),
        ("UNAVAILABLE", errors.RequestPlaneUnavailable),
        ("DRAINING", errors.WorkerDraining),
    ],
)
def test_error_response_round_trip_gives_typed_exception(code: str, cls: type[errors.TdistError]) -> None:
    info = ErrorInfo(code, "it went wrong", {"timeout": 2.5, "operator": "echo", "tries": [1, 2]})
    msg = ResponseMessage(request_id="r1", kind="error", worker_id="w1", attempt=3, error=info)

    back = decode_response(encode_response(msg))

    assert back.kind == "error" and back.final
    assert back.error == info
    exc = back.error.to_exception()
    assert type(exc) is cls
    assert exc.code == code
    assert exc.message == "it went wrong"
    assert exc.details == {"timeout": 2.5, "operator": "echo", "tries": [1, 2]}
    assert str(exc) == "it went wrong (operator='echo', timeout=2.5, tries=[1, 2])"


def test_unknown_error_code_gives_base_error() -> None:
    exc = ErrorInfo("SOMETHING_NEW", "hm", {}).to_exception()
    assert type(exc) is errors.TdistError
    assert exc.message == "hm"
    assert exc.details == {}


def test_from_exception_on_plain_exception() -> None:
    info = ErrorInfo.from_exception(ValueError("bad value 3"))
    assert info == ErrorInfo("OPERATOR_ERROR", "ValueError: bad value 3", {"type": "ValueError"})
    exc = info.to_exception()
    assert isinstance(exc, errors.OperatorError)
    assert exc.details["type"] == "ValueError"


def test_from_exception_on_tdist_error_keeps_code_and_makes_details_json() -> None:
    original = errors.DeadlineExceeded("too slow", timeout=1.0, shape=(2, 3), ok=True)
    info = ErrorInfo.from_exception(original)
    assert info.code == "DEADLINE_EXCEEDED"
    assert info.message == "too slow"
    assert info.details == {"timeout": 1.0, "shape": "(2, 3)", "ok": True}
    # The converted details survive the JSON header.
    back = decode_response(encode_response(ResponseMessage(request_id="r", kind="error", error=info)))
    assert back.error == info


# --- batches ------------------------------------------------------------------


def _requests(n: int) -> list[bytes]:
    return [encode_request(RequestMessage(f"r{i}", f"t{i}", "echo", 1, 10.0, f"{REPLY}.{i}",
                                          inputs={"x": np.arange(i)})) for i in range(n)]


def test_batch_round_trip_keeps_members_in_order() -> None:
    frames = _requests(5)
    data = encode_batch(frames)
    assert is_batch(data) and not is_batch(frames[0])
    assert split_batch(data) == frames
    assert [decode_request(f).id for f in split_batch(data)] == [f"r{i}" for i in range(5)]


def test_batch_frame_layout_byte_for_byte() -> None:
    assert encode_batch([b"ab", b"c"]) == (b"TD\x01B\x00\x00" + struct.pack("<I", 2) + struct.pack("<I", 2) + b"ab"
                                           + struct.pack("<I", 1) + b"c")


def test_a_bad_member_is_left_to_its_own_decode() -> None:
    frames = [_requests(1)[0], b"not a request"]
    members = split_batch(encode_batch(frames))
    assert decode_request(members[0]).id == "r0"
    with pytest.raises(InvalidRequest):
        decode_request(members[1])


def _batch(count: int, *members: bytes, tail: bytes = b"") -> bytes:
    return (b"TD\x01B\x00\x00" + struct.pack("<I", count)
            + b"".join(struct.pack("<I", len(m)) + m for m in members) + tail)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"TD\x01B\x00\x00\x01", "truncated before its count"),
        (_batch(0), "0 members"),
        (_batch(MAX_BATCH + 1), f"{MAX_BATCH + 1} members"),
        (_batch(2, b"abc"), "truncated before member 1"),
        (_batch(1, b"abc")[:-1], "member 0 runs past the end"),
        (_batch(1, b"abc", tail=b"x"), "1 unexpected trailing bytes"),
        (b"TD\x01B\x02\x00ab" + struct.pack("<I", 1), "reply inbox"),
        (b"TD\x02B\x00\x00" + struct.pack("<I", 1), "bad magic, version"),
    ],
)
def test_malformed_batch_names_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        split_batch(data)


def test_responses_batch_too() -> None:
    frames = [encode_response(ResponseMessage(f"r{i}", "final", "w1", 1, {"x": np.arange(i)})) for i in range(3)]
    assert [decode_response(f).request_id for f in split_batch(encode_batch(frames))] == ["r0", "r1", "r2"]


def test_fit_batches_keeps_order_and_every_run_fits_its_frame() -> None:
    frames = [bytes(n) for n in (300, 10, 500, 200, 200, 1000, 1, 1)]
    limit = 1000
    runs = fit_batches(frames, len, limit)
    assert [f for run in runs for f in run] == frames  # nothing lost, nothing reordered
    for run in runs:
        assert len(run) == 1 or len(encode_batch(run)) <= limit
    assert [len(run) for run in runs] == [3, 2, 1, 2]
    for run, after in zip(runs, runs[1:]):  # each run as full as the limit allows
        assert BATCH_OVERHEAD + sum(len(f) + 4 for f in run + after[:1]) > limit


def test_fit_batches_caps_the_members_of_a_run() -> None:
    assert [len(r) for r in fit_batches(list(range(10)), lambda _: 1, 1 << 20, most=4)] == [4, 4, 2]
    assert [len(r) for r in fit_batches(list(range(MAX_BATCH + 1)), lambda _: 1, 1 << 30)] == [MAX_BATCH, 1]
    assert fit_batches([], len, 100) == []


def test_a_batch_is_not_a_request() -> None:
    with pytest.raises(InvalidRequest):
        decode_request(encode_batch(_requests(2)))
