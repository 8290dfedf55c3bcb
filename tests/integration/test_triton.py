"""The hello-world Triton models on a real Triton server (the one bundled in nvidia-pytriton).

Skipped only when no ``tritonserver`` binary can be found. Every server started here is stopped
by PID in a ``finally``. Nothing asserts on wall time: the delay test reads the seconds the model
itself reports having slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tdist.errors import (
    DeadlineExceeded,
    InvalidRequest,
    OperatorError,
    TdistError,
    TritonError,
    TritonModelNotReady,
    error_from_code,
)
from tdist.triton import TritonServer, find_triton
from tdist.triton.server import (
    _pid_alive,
    _stub_pids,
    default_stub_site,
    ensure_stub_site,
    merge_config,
    normalize_overrides,
    read_model_config,
    stub_site_ok,
)

REPO = Path(__file__).resolve().parents[2] / "model_repository"

try:
    find_triton()
except TritonError as _exc:
    pytest.skip(f"no tritonserver binary: {_exc}", allow_module_level=True)

from tdist.triton.client import TritonClient, map_triton_error  # noqa: E402 - after the skip

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    """One server with the encoder and decoder loaded from their config.pbtxt files."""
    server = TritonServer(model_repository=str(REPO))
    try:
        server.start()
        server.load_model("encoder")
        server.load_model("decoder")
        yield server
    finally:
        server.stop()
    assert not server.is_alive()


def _client(server: TritonServer, protocol: str = "grpc", shared_memory: str = "off") -> TritonClient:
    url = server.grpc_address if protocol == "grpc" else server.http_address
    return TritonClient(url, protocol=protocol, shared_memory=shared_memory)  # type: ignore[arg-type]


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(-(2**62), 2**62, size=n, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# exact outputs


@pytest.mark.parametrize("n", [0, 1, 10000])
@pytest.mark.parametrize("k", [1, 3])
async def test_encoder_exact_outputs(triton: TritonServer, k: int, n: int) -> None:
    x = _x(n)
    async with _client(triton) as client:
        params = {"input_copies": k} if k != 1 else None  # k=1 is the config's default
        result = await client.infer("encoder", {"input": x}, parameters=params)
    out = result.outputs["output"]
    assert out.dtype == np.int64 and out.shape == (n * k,)
    np.testing.assert_array_equal(out, np.tile(~x, k))
    np.testing.assert_array_equal(result.outputs["input_copies"], np.array([k], dtype=np.int64))
    assert result.outputs["slept_seconds"].tolist() == [0.0]


@pytest.mark.parametrize("n", [0, 1, 10000])
@pytest.mark.parametrize("k", [1, 3])
async def test_decoder_exact_outputs(triton: TritonServer, k: int, n: int) -> None:
    y = _x(n * k, seed=7)
    async with _client(triton) as client:
        by_input = await client.infer("decoder", {"input": y, "input_copies": np.array([k], dtype=np.int64)})
        by_param = await client.infer("decoder", {"input": y}, parameters={"input_copies": k})
    for result in (by_input, by_param):
        out = result.outputs["output"]
        assert out.dtype == np.int64 and out.shape == (n,)
        np.testing.assert_array_equal(out, ~y[: len(y) // k])


@pytest.mark.parametrize(
    ("protocol", "shared_memory"), [("grpc", "off"), ("grpc", "on"), ("http", "off"), ("http", "on")]
)
async def test_decode_encode_round_trip(triton: TritonServer, protocol: str, shared_memory: str) -> None:
    async with _client(triton, protocol, shared_memory) as client:
        for k in (1, 2, 3, 5):
            for n in (0, 1, 7, 10000):
                x = _x(n, seed=k)
                enc = await client.infer("encoder", {"input": x}, parameters={"input_copies": k})
                dec = await client.infer(
                    "decoder", {"input": enc.outputs["output"], "input_copies": enc.outputs["input_copies"]}
                )
                np.testing.assert_array_equal(dec.outputs["output"], x, err_msg=f"k={k} n={n}")


async def test_request_parameter_overrides_the_config(triton: TritonServer) -> None:
    x = np.arange(4, dtype=np.int64)
    async with _client(triton) as client:
        default = await client.infer("encoder", {"input": x})
        overridden = await client.infer("encoder", {"input": x}, parameters={"input_copies": "4"})
        again = await client.infer("encoder", {"input": x})  # an override lasts one request
    assert default.outputs["input_copies"].tolist() == [1]
    assert overridden.outputs["input_copies"].tolist() == [4]
    np.testing.assert_array_equal(overridden.outputs["output"], np.tile(~x, 4))
    assert again.outputs["input_copies"].tolist() == [1]


async def test_delay_is_honoured_as_the_model_reports(triton: TritonServer) -> None:
    x = np.arange(10, dtype=np.int64)
    async with _client(triton) as client:
        enc = await client.infer("encoder", {"input": x}, parameters={"input_copies": 3, "delay": 0.002})
        dec = await client.infer("decoder", {"input": enc.outputs["output"]},
                                 parameters={"input_copies": 3, "delay": "0.002"})
    # The model sleeps delay * len(output) and reports what it slept (a lower bound, never early).
    assert enc.outputs["slept_seconds"][0] >= 0.002 * 30
    assert dec.outputs["slept_seconds"][0] >= 0.002 * 10
    np.testing.assert_array_equal(dec.outputs["output"], x)


# ---------------------------------------------------------------------------------------------
# typed errors


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_wrong_dtype_and_shape_are_invalid_requests(triton: TritonServer, protocol: str) -> None:
    async with _client(triton, protocol) as client:
        with pytest.raises(InvalidRequest) as wrong_dtype:
            await client.infer("encoder", {"input": np.ones(4, dtype=np.float32)})
        with pytest.raises(InvalidRequest) as wrong_shape:
            await client.infer("encoder", {"input": np.ones((2, 3), dtype=np.int64)})
        with pytest.raises(InvalidRequest):
            await client.infer("encoder", {"other": np.ones(4, dtype=np.int64)})
        # the model refuses bad parameters and inputs for that request only, and keeps serving
        with pytest.raises(InvalidRequest):
            await client.infer("encoder", {"input": np.ones(4, dtype=np.int64)}, parameters={"input_copies": 0})
        with pytest.raises(InvalidRequest):
            await client.infer("encoder", {"input": np.ones(4, dtype=np.int64)}, parameters={"delay": "-1"})
        with pytest.raises(InvalidRequest):
            await client.infer("decoder", {"input": np.ones(5, dtype=np.int64)}, parameters={"input_copies": 2})
        with pytest.raises(InvalidRequest):
            await client.infer("decoder", {"input": np.ones(6, dtype=np.int64), "input_copies": np.array([3])},
                               parameters={"input_copies": 2})
        ok = await client.infer("encoder", {"input": np.ones(4, dtype=np.int64)})
    assert "FP32" in str(wrong_dtype.value) and wrong_dtype.value.details["model"] == "encoder"
    assert "shape" in str(wrong_shape.value)
    assert ok.outputs["output"].tolist() == [-2] * 4


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_unknown_model_is_typed(triton: TritonServer, protocol: str) -> None:
    async with _client(triton, protocol) as client:
        with pytest.raises(TritonModelNotReady):
            await client.infer("no_such_model", {"input": np.ones(2, dtype=np.int64)})
        assert not await client.is_model_ready("no_such_model")
        assert await client.is_model_ready("encoder")


async def test_client_timeout_is_deadline_exceeded_and_the_model_stops(triton: TritonServer) -> None:
    x = np.arange(10, dtype=np.int64)
    async with _client(triton) as client:
        with pytest.raises(DeadlineExceeded):
            # 10 elements * 1 s would sleep 10 s; gRPC cancels it in the server, the model stops early
            await client.infer("encoder", {"input": x}, parameters={"delay": 1.0}, timeout=0.3)
        after = await client.infer("encoder", {"input": x}, timeout=60)
    np.testing.assert_array_equal(after.outputs["output"], ~x)


async def test_server_unreachable_is_a_triton_error() -> None:
    from tdist.triton.server import free_port

    async with TritonClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(TritonError) as err:
            await client.infer("encoder", {"input": np.ones(2, dtype=np.int64)}, timeout=30)
    assert err.value.details["reason"] == "unavailable"


def test_error_mapping_and_wire_codes() -> None:
    from tritonclient.utils import InferenceServerException

    cases = {
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'input'"): InvalidRequest,
        ("400", "inference input 'input' data-type is 'FP32'"): InvalidRequest,
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found"): TritonModelNotReady,
        ("404", "Request for unknown model: 'x' has no available versions"): TritonModelNotReady,
        ("StatusCode.INTERNAL", "Failed to process the request(s) for model 'x'"): OperatorError,
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"): DeadlineExceeded,
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses"): TritonError,
    }
    for (status, message), cls in cases.items():
        mapped = map_triton_error(InferenceServerException(message, status=status), "x")
        assert type(mapped) is cls, (status, message, mapped)
    # the new codes travel in error responses like the others
    err = error_from_code(TritonModelNotReady.code, "m", {"model": "x"})
    assert type(err) is TritonModelNotReady and isinstance(err, TritonError) and isinstance(err, TdistError)
    assert type(error_from_code("TRITON", "m")) is TritonError


# ---------------------------------------------------------------------------------------------
# configuration overrides, crash detection, restart


def test_config_overrides_merge_into_config_pbtxt() -> None:
    base = read_model_config(REPO, "encoder")
    assert base["name"] == "encoder" and base["backend"] == "python" and base.get("max_batch_size", 0) == 0
    overrides = normalize_overrides(
        {"instance_group": [{"count": 2, "kind": "KIND_CPU"}], "parameters": {"delay": 0.5, "input_copies": 3}}
    )
    merged = merge_config(base, overrides)
    assert merged["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert merged["parameters"] == {"delay": {"string_value": "0.5"}, "input_copies": {"string_value": "3"}}
    assert [o["name"] for o in merged["output"]] == ["output", "input_copies", "slept_seconds"]
    assert base["parameters"]["input_copies"] == {"string_value": "1"}  # the base is not mutated


def test_stub_site_is_idempotent() -> None:
    site = ensure_stub_site()
    assert site == default_stub_site() and stub_site_ok(site)
    assert (site / "numpy").is_dir()
    mtime = site.stat().st_mtime_ns
    assert ensure_stub_site() == site and site.stat().st_mtime_ns == mtime  # nothing rebuilt


async def test_overrides_sigkill_detection_and_restart(tmp_path: Path) -> None:
    server = TritonServer(model_repository=str(REPO), log_file=str(tmp_path / "triton.log"))
    try:
        await server.astart()
        assert server.is_alive() and not server.crashed
        async with _client(server) as client:
            # known to the repository but not loaded (explicit model control)
            with pytest.raises(TritonModelNotReady):
                await client.infer("decoder", {"input": np.ones(2, dtype=np.int64)})
            assert not server.model_ready("decoder")

            # a config override that the model refuses: the load fails with a typed error
            with pytest.raises(TritonError, match="loading model 'encoder' failed"):
                await server.aload_model("encoder", {"parameters": {"input_copies": "zero"}})

            # per-deployment overrides: two instances, input_copies 3 by default
            await server.aload_model(
                "encoder", {"instance_group": [{"count": 2, "kind": "KIND_CPU"}], "parameters": {"input_copies": 3}}
            )
            config = server.model_config("encoder")
            assert config["instance_group"][0]["count"] == 2
            assert config["parameters"]["input_copies"] == {"string_value": "3"}
            x = np.arange(5, dtype=np.int64)
            first = await client.infer("encoder", {"input": x})
            assert first.outputs["input_copies"].tolist() == [3]

            # SIGKILL: noticed without a request, then typed errors for callers
            old_pid, old_prefix = server.pid, server._prefix
            assert old_pid is not None and _stub_pids(old_prefix)
            os.kill(old_pid, signal.SIGKILL)
            code = await asyncio.wait_for(server.wait_exit(), 60)
            assert code == -signal.SIGKILL
            assert not server.is_alive() and server.crashed
            with pytest.raises(TritonError, match="exited"):
                server.check()
            with pytest.raises(TritonError) as unavailable:
                await client.infer("encoder", {"input": x}, timeout=30)
            assert not isinstance(unavailable.value, TritonModelNotReady)

        # restart: same ports if free, the loaded models come back with their overrides
        await server.arestart()
        assert server.is_alive() and server.pid != old_pid
        assert not _stub_pids(old_prefix)  # the killed server's stubs are gone
        assert not [e for e in os.listdir("/dev/shm") if e.startswith(old_prefix)]  # and its shared memory
        async with _client(server) as client:
            again = await client.infer("encoder", {"input": x})
        assert again.outputs["input_copies"].tolist() == [3]
        np.testing.assert_array_equal(again.outputs["output"], np.tile(~x, 3))
    finally:
        new_prefix = server._prefix
        server.stop()
    assert not server.is_alive()
    assert not _stub_pids(new_prefix)
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(new_prefix)]


def test_triton_dies_with_its_parent() -> None:
    """The parent is SIGKILLed: PR_SET_PDEATHSIG kills tritonserver too (no orphan keeps the ports)."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from tdist.triton import TritonServer
        server = TritonServer(model_repository={str(REPO)!r})
        server.start()
        server.load_model("encoder")
        print(json.dumps({{"pid": server.pid, "prefix": server._prefix, "workdir": str(server._workdir)}}), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = None
    prefix = ""
    workdir = ""
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the parent did not start Triton"
        info = json.loads(line)
        child_pid, prefix, workdir = info["pid"], info["prefix"], info["workdir"]
        assert _alive(child_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 60  # a bound for the test, not an assertion on speed
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "tritonserver outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        if parent.stdout:
            parent.stdout.close()
        if child_pid is not None and _alive(child_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
        if prefix:  # nobody was left to clean up after the killed server: do it here, by PID and name
            for pid in _stub_pids(prefix):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for entry in os.listdir("/dev/shm"):
                if entry.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"/dev/shm/{entry}")
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    return _pid_alive(pid)
