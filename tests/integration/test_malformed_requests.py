"""Malformed requests published raw into the stream of a real worker process: each gets exactly
one INVALID_REQUEST error response, is delivered once and removed (never handed back), and the
worker keeps serving."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import nats
import numpy as np
import pytest

from tdist.client import Client
from tdist.config import RequestPlaneConfig
from tdist.nats_server import EmbeddedNatsServer
from tdist.request_plane import protocol
from tdist import names
from tests.conftest import WorkerProcesses, operator_flag

pytestmark = pytest.mark.timeout(120)

ADDRESS = base64.b64encode(bytes(range(120))).decode()
TENSOR_ID = "0123456789abcdef" * 2


def header(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "x", "trace": "t1", "op": "count", "ver": 1, "deadline": 4e9, "params": {}}
    base.update(fields)
    return base


def inline(dtype: str, shape: Any, nbytes: int, body: bytes = b"") -> tuple[dict[str, Any], bytes]:
    return header(tensors=[["x", dtype, shape, nbytes]]), body


def by_ref(dtype: str = "FP32", shape: Any = (2, 3), nbytes: int = 24, **meta: Any) -> tuple[dict[str, Any], bytes]:
    ref = {"ref": TENSOR_ID, "owner": "client-9f", **meta}
    return header(tensors=[["x", dtype, list(shape), nbytes, ref]], peers={"client-9f": ADDRESS}), b""


CASES: dict[str, tuple[dict[str, Any], bytes]] = {
    "fp32_zero_by_2_62": inline("FP32", [0, 2**62], 0),
    "bytes_zero_by_2_62": inline("BYTES", [0, 2**62], 0),
    "65_dims": inline("INT8", [1] * 65, 1, b"\x00"),
    "bool_dim": inline("INT8", [True, 2], 2, b"\x00\x00"),
    "float_dim": inline("INT8", [2.0], 2, b"\x00\x00"),
    "negative_dim": inline("INT8", [2, -3], 0),
    "size_mismatch": inline("INT32", [3], 8, b"\x00" * 8),
    "bytes_count_too_large": inline("BYTES", [1 << 40], 4, b"\x00" * 4),
    "deadline_nan": (header(deadline="nan"), b""),
    "deadline_inf": (header(deadline="inf"), b""),
    "deadline_minus_inf": (header(deadline="-inf"), b""),
    "deadline_bool": (header(deadline=True), b""),
    "ref_unknown_dtype": by_ref(dtype="COMPLEX"),
    "ref_negative_size": by_ref(nbytes=-8),
    "ref_shape_disagrees": by_ref(nbytes=25),
    "ref_bad_owner": by_ref(owner="a b"),
    "ref_bad_tensor_id": by_ref(ref="../etc"),
    "ref_bad_memory_type": by_ref(mem="TPU"),
}


def frame(reply: str, fields: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(fields).encode()
    return b"TD\x01Q" + struct.pack("<H", len(reply)) + reply.encode() + struct.pack("<I", len(head)) + head + body


async def test_each_malformed_request_gets_one_error_and_leaves_the_stream(
    nats_server: EmbeddedNatsServer, rp: RequestPlaneConfig, worker_processes: WorkerProcesses, client: Client
) -> None:
    wp = worker_processes.start("w", operator_flag("count", "Counting"))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        inbox = nc.new_inbox()
        responses: dict[str, list[protocol.ResponseMessage]] = {}
        got_all = asyncio.Event()

        async def on_response(msg: Any) -> None:
            resp = protocol.decode_response(msg.data)
            responses.setdefault(msg.subject.rsplit(".", 1)[-1], []).append(resp)
            if set(responses) >= set(CASES):
                got_all.set()

        sub = await nc.subscribe(f"{inbox}.>", cb=on_response)
        injected: list[Any] = []

        async def on_injected(msg: Any) -> None:
            injected.append(msg)

        evil = await nc.subscribe("evil.>", cb=on_injected)
        subject = names.request_subject(rp.namespace, "count", 1)
        for name, (fields, body) in CASES.items():
            await nc.publish(subject, frame(f"{inbox}.r.{name}", fields, body))
        # Nobody to answer, but each must still be removed, and none may reach NATS as a command:
        unanswerable = [
            b"\x00garbage without a prefix",
            frame(f"{inbox}.r.x 0\r\nPUB evil.injected 5\r\nhello\r\nPUB {inbox}.r.y", *CASES["deadline_nan"]),
            frame(f"{inbox}.r.>", *CASES["deadline_nan"]),
            frame("evil.a b", *CASES["deadline_nan"]),
        ]
        for data in unanswerable:
            await nc.publish(subject, data)
        await asyncio.wait_for(got_all.wait(), 60)

        # Gone from the stream, each delivered once: nothing was handed back for another try.
        stream = names.stream_name(rp.namespace)
        consumer = names.shared_consumer("count", 1)
        for _ in range(600):
            info = await js.consumer_info(stream, consumer)
            if info.num_pending + info.num_ack_pending == 0 and (await js.stream_info(stream)).state.messages == 0:
                break
            await asyncio.sleep(0.05)
        info = await js.consumer_info(stream, consumer)
        assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
        assert info.delivered.consumer_seq == len(CASES) + len(unanswerable)
        assert (await js.stream_info(stream)).state.messages == 0
        await nc.flush()

        assert set(responses) == set(CASES) and injected == []
        await evil.unsubscribe()
        for name in CASES:
            [resp] = responses[name]  # exactly one
            assert resp.kind == "error" and resp.error is not None, name
            assert resp.error.code == "INVALID_REQUEST", (name, resp.error)
            assert resp.worker_id == wp.worker_id and resp.request_id == name
        await sub.unsubscribe()

        # The worker keeps serving.
        x = np.arange(5, dtype=np.int64)
        result = await client.operator("count").infer({"x": x}, timeout=30)
        assert np.array_equal(result.outputs["x"], x) and result.worker_id == wp.worker_id
        assert wp.proc.poll() is None
    finally:
        await nc.close()
