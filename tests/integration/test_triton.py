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
from tdist.triton import CONTROL_HEADER, TritonServer, find_triton
from tdist.process import alive as _alive
from tdist.triton.model_config import merge_config, normalize_overrides, read_model_config
from tdist.triton.processes import _PARENT_CHECK, _stub_pids, cleanup_stale, setpriv_with_pdeathsig
from tdist.triton.stub_site import default_stub_site, ensure_stub_site, stub_site_ok

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


async def test_http_timeout_frees_the_caller_and_the_client_serves_on(triton: TritonServer) -> None:
    """Over HTTP a timed-out call is DeadlineExceeded at once; its connection is dropped (Triton 2.51
    runs that model execution to its end) and the next call works on a fresh one."""
    x = np.arange(10, dtype=np.int64)
    async with _client(triton, "http") as client:
        await client.infer("encoder", {"input": x})
        with pytest.raises(DeadlineExceeded):
            await client.infer("encoder", {"input": x}, parameters={"delay": 0.05}, timeout=0.1)
        after = await client.infer("encoder", {"input": x}, timeout=60)
    np.testing.assert_array_equal(after.outputs["output"], ~x)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_concurrent_calls_each_get_their_own_outputs(triton: TritonServer, protocol: str) -> None:
    async with _client(triton, protocol) as client:
        async def one(i: int) -> None:
            x = _x(100 + i, seed=i)
            r = await client.infer("encoder", {"input": x}, parameters={"input_copies": 1 + i % 3})
            np.testing.assert_array_equal(r.outputs["output"], np.tile(~x, 1 + i % 3))

        await asyncio.gather(*(one(i) for i in range(32)))
        await asyncio.gather(*(one(i) for i in range(32)))


async def test_server_unreachable_is_a_triton_error() -> None:
    from tdist.process import free_port

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
    # Triton 2.51's refusals of a restricted API without the key (gRPC, HTTP): not "unavailable"
    for status, message in (
        ("StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-protocol-k'"),
        ("403", "This API is restricted, expecting header 'k'"),
    ):
        mapped = map_triton_error(InferenceServerException(message, status=status), "x")
        assert type(mapped) is TritonError and mapped.details["reason"] == "restricted", mapped
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


@pytest.mark.parametrize("guard", ["setpriv", "watchdog"])
def test_triton_dies_with_its_parent(guard: str) -> None:
    """The parent is SIGKILLed: tritonserver dies too (no orphan keeps the ports), with either
    guard (setpriv's PR_SET_PDEATHSIG, or the pipe watchdog used where setpriv is missing)."""
    if guard == "setpriv" and setpriv_with_pdeathsig() is None:
        pytest.skip("util-linux setpriv with --pdeathsig is not installed")
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from tdist.triton import TritonServer
        server = TritonServer(model_repository={str(REPO)!r}, parent_death={guard!r})
        server.start()
        server.load_model("encoder")
        assert server.parent_death == {guard!r}
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
        # what the next start on this host does: the orphaned stubs, shared memory and scratch dir go
        assert cleanup_stale() >= 1
        while _stub_pids(prefix) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _stub_pids(prefix), "a python-backend stub outlived its server"
        assert not [e for e in os.listdir("/dev/shm") if e.startswith(prefix)]
        assert not os.path.exists(workdir)
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


# ---------------------------------------------------------------------------------------------
# starting without fork handlers, the control key, the operator's restart, the exports


def test_start_forks_no_handlers_beside_live_grpc_threads() -> None:
    """Triton starts by vfork + exec (no preexec_fn): no fork handler runs (Python's
    ``os.register_at_fork`` hooks, which ``preexec_fn`` triggers, stand for gRPC's), even while
    other threads are inside gRPC calls; grpcio's "skipping fork() handlers" warning never shows."""
    script = textwrap.dedent(
        f"""
        import json, os, threading
        import numpy as np
        forks = []
        os.register_at_fork(before=lambda: forks.append("before"), after_in_parent=lambda: forks.append("after"))
        import tritonclient.grpc as grpcclient
        from tdist.triton import TritonServer
        busy = TritonServer(model_repository={str(REPO)!r})
        busy.start()
        busy.load_model("encoder")
        stop = threading.Event()
        calls = []
        def hammer():
            client = grpcclient.InferenceServerClient(busy.grpc_address)
            x = np.arange(4, dtype=np.int64)
            inp = grpcclient.InferInput("input", [4], "INT64")
            inp.set_data_from_numpy(x)
            while not stop.is_set():
                client.infer("encoder", [inp])
                calls.append(1)
            client.close()
        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for mode in ("setpriv", "watchdog", "auto"):
                if mode == "setpriv" and not os.path.exists("/usr/bin/setpriv"):
                    continue
                server = TritonServer(model_repository={str(REPO)!r}, parent_death=mode)
                try:
                    server.start()
                    server.load_model("encoder")
                    assert server.model_ready("encoder")
                finally:
                    server.stop()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            busy.stop()
        print(json.dumps({{"forks": forks, "calls": len(calls)}}), flush=True)
        """
    )
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="1")  # gRPC's fork handlers on, as in a worker
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as hung:  # seen with preexec_fn: the fork beside gRPC threads hangs
        pytest.fail(f"starting Triton beside live gRPC threads hung: {(hung.stderr or b'')[-2000:]!r}")
    finally:
        cleanup_stale()  # the stubs of servers whose (killed) parent could not stop them
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["calls"] > 0  # the gRPC threads were busy while the servers started
    assert result["forks"] == [], "a fork ran the fork handlers"
    assert "fork()" not in done.stderr, done.stderr[-3000:]


def test_parent_check_runs_the_server_only_under_its_parent() -> None:
    """The shell step after ``setpriv --pdeathsig``: a parent that died before the prctl would never
    signal the server, so the command runs only if the expected parent is still the parent."""
    ours = subprocess.run(["/bin/sh", "-c", _PARENT_CHECK, "tdist-triton", str(os.getpid()), "/bin/echo", "ran"],
                          capture_output=True, text=True, timeout=30)
    assert (ours.returncode, ours.stdout) == (0, "ran\n")
    orphan = subprocess.run(["/bin/sh", "-c", _PARENT_CHECK, "tdist-triton", "1", "/bin/echo", "ran"],
                            capture_output=True, text=True, timeout=30)
    assert orphan.returncode == 111 and orphan.stdout == "" and "died before" in orphan.stderr


def test_an_orphaned_server_is_swept_at_the_next_start() -> None:
    """A server whose owner died while no guard held it (here: its watchdog is SIGKILLed first, as
    when the owner dies in the instant between the server's spawn and its watchdog's) is killed,
    with its stubs, by the next start's sweep (``cleanup_stale``)."""
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from tdist.triton import TritonServer
        server = TritonServer(model_repository={str(REPO)!r}, parent_death="watchdog")
        server.start()
        server.load_model("encoder")
        os.kill(server._watchdog.pid, signal.SIGKILL)
        server._watchdog.wait()
        print(json.dumps({{"pid": server.pid, "prefix": server._prefix, "workdir": str(server._workdir)}}), flush=True)
        os._exit(0)  # no cleanup: the server is an orphan now
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    pid, prefix = info["pid"], info["prefix"]
    try:
        assert _alive(pid) and _stub_pids(prefix)  # nothing killed it
        assert cleanup_stale() >= 2  # the server and its stub
        deadline = time.monotonic() + 60  # a bound for the test, not an assertion on speed
        while (_alive(pid) or _stub_pids(prefix)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid) and not _stub_pids(prefix)
        cleanup_stale()  # the shared memory and scratch dir, now that nothing uses them
        assert not [e for e in os.listdir("/dev/shm") if e.startswith(prefix)]
        assert not os.path.exists(info["workdir"])
    finally:
        for stray in ([pid] if _alive(pid) else []) + _stub_pids(prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)


@pytest.fixture
def fresh_triton() -> Iterator[TritonServer]:
    """A server of its own (this test loads and unloads models)."""
    server = TritonServer(model_repository=str(REPO))
    try:
        server.start()
        server.load_model("encoder")
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_control_api_needs_the_key(fresh_triton: TritonServer, protocol: str) -> None:
    """Model-repository and shared-memory calls without the key are refused and change nothing;
    with it they work; inference needs no key. The key is not in the server's argv nor its log."""
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio
    from tritonclient.utils import InferenceServerException

    from tdist.triton.client import _Region

    server = fresh_triton
    key = server.control_headers[CONTROL_HEADER]
    assert len(key) >= 32
    headers = server.grpc_control_headers if protocol == "grpc" else server.control_headers
    raw: object
    if protocol == "grpc":
        raw = grpc_aio.InferenceServerClient(server.grpc_address)
    else:
        raw = http_aio.InferenceServerClient(server.http_address)
    region = _Region(f"tdist_tshm_{os.getpid()}_keytest_{protocol}", 4096)
    try:
        refusals = []
        for call in (
            lambda h: raw.load_model("decoder", headers=h),  # type: ignore[attr-defined]
            lambda h: raw.unload_model("encoder", headers=h),  # type: ignore[attr-defined]
            lambda h: raw.get_model_repository_index(headers=h),  # type: ignore[attr-defined]
            lambda h: raw.register_system_shared_memory(region.name, region.key, region.size, headers=h),  # type: ignore[attr-defined]
        ):
            for wrong in (None, {k: "x" + v for k, v in headers.items()}):
                with pytest.raises(InferenceServerException) as refused:
                    await call(wrong)
                refusals.append(str(refused.value))
        assert all("restricted" in r for r in refusals), refusals
        assert server.model_ready("encoder") and not server.model_ready("decoder")  # nothing changed
        status = await raw.get_system_shared_memory_status(headers=headers)  # type: ignore[attr-defined]
        assert region.name not in json.dumps(status if isinstance(status, (dict, list)) else str(status))

        # inference: no key
        x = np.arange(6, dtype=np.int64)
        mod = grpc_aio if protocol == "grpc" else http_aio
        inp = mod.InferInput("input", [6], "INT64")
        inp.set_data_from_numpy(x)
        plain = await raw.infer("encoder", [inp])  # type: ignore[attr-defined]
        np.testing.assert_array_equal(plain.as_numpy("output"), ~x)

        # with the key: load, unload, register work
        await raw.load_model("decoder", headers=headers)  # type: ignore[attr-defined]
        assert server.model_ready("decoder")
        await raw.unload_model("decoder", headers=headers)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60  # unloading finishes in the background; bound only
        while server.model_ready("decoder") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not server.model_ready("decoder")
        await raw.register_system_shared_memory(region.name, region.key, region.size, headers=headers)  # type: ignore[attr-defined]
        await raw.unregister_system_shared_memory(region.name, headers=headers)  # type: ignore[attr-defined]
    finally:
        region.destroy()
        await raw.close()  # type: ignore[attr-defined]

    # tdist's client: shared memory works with the key, falls back to the wire (and says why) without
    big = np.arange(1 << 15, dtype=np.int64)  # 256 KiB: above the shared-memory threshold
    url = server.grpc_address if protocol == "grpc" else server.http_address
    async with TritonClient(url, protocol=protocol, shared_memory="on",  # type: ignore[arg-type]
                            control_headers=lambda: server.control_headers) as keyed:
        out = await keyed.infer("encoder", {"input": big})
        assert keyed.shm_enabled and keyed._regions and not keyed.shm_disabled_reason
    np.testing.assert_array_equal(out.outputs["output"], ~big)
    async with TritonClient(url, protocol=protocol, shared_memory="on") as keyless:  # type: ignore[arg-type]
        out = await keyless.infer("encoder", {"input": big})
        assert not keyless.shm_enabled and "restricted" in keyless.shm_disabled_reason
    np.testing.assert_array_equal(out.outputs["output"], ~big)

    # the key is in no argv a local user can read, nor in the log
    assert server.key_hidden
    assert server.pid is not None
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert key.encode() not in f.read()
    assert server.log_path is not None and key not in server.log_path.read_text(errors="replace")
    stubs = _stub_pids(server._prefix)
    assert stubs
    for pid in stubs:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert key.encode() not in f.read()


async def test_a_new_key_at_every_start(tmp_path: Path) -> None:
    server = TritonServer(model_repository=str(REPO), log_file=str(tmp_path / "triton.log"))
    try:
        await server.astart()
        first = server.control_headers[CONTROL_HEADER]
        await server.aload_model("encoder")
        await server.arestart()
        second = server.control_headers[CONTROL_HEADER]
        assert first != second and server.key_hidden
        assert server.model_ready("encoder")  # restart's reload used the new key
        assert first not in (tmp_path / "triton.log").read_text() and second not in (tmp_path / "triton.log").read_text()
    finally:
        server.stop()


async def test_operator_restart_loads_each_model_once() -> None:
    """After the server is SIGKILLed the operator's watchdog restarts it and each model is
    loaded once (arestart() reloads it; the operator used to load it a second time)."""
    from tdist.operators import Request
    from tdist.operators.triton import TritonOperator, _servers

    op = TritonOperator("encoder", 1, {"model_repository": str(REPO),
                                       "config": {"parameters": {"input_copies": 2}}, "shared_memory": "on"})
    await op.setup()
    try:
        server = op.server
        loads: list[str] = []
        real_load = server.load_model

        def counting_load(name: str, overrides: object = None, timeout: float = 300.0) -> None:
            loads.append(name)
            real_load(name, overrides, timeout)

        server.load_model = counting_load  # type: ignore[method-assign] - a spy on the real call
        old_pid = server.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        shared = _servers[op.repository]
        deadline = time.monotonic() + 120  # a bound for the test, not an assertion on speed
        while (shared.restarts < 1 or not server.model_ready("encoder")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.pid != old_pid and server.model_ready("encoder")
        assert loads == ["encoder"]
        assert server.log_path is not None
        assert server.log_path.read_text().count("successfully loaded 'encoder'") == 1

        x = np.arange(1 << 14, dtype=np.int64)  # shared memory with the new start's key
        request = Request(id="r1", trace_id="t1", operator="encoder", version=1, deadline=time.time() + 60,
                          attempt=1, parameters={}, inputs={"input": x},
                          send_partial=_no_partial, make_remote=_no_remote)
        outputs = await op.execute(request)
        np.testing.assert_array_equal(outputs["output"], np.tile(~x, 2))
        assert op._client._regions and not op._client.shm_disabled_reason
    finally:
        await op.close()
    assert op.repository not in _servers


def test_operator_protocol_defaults_to_http_and_is_checked() -> None:
    from tdist.errors import ConfigError
    from tdist.operators.triton import TritonOperator

    assert TritonOperator("encoder", 1, {"model_repository": str(REPO)}).protocol == "http"
    assert TritonOperator("encoder", 1, {"model_repository": str(REPO), "protocol": "grpc"}).protocol == "grpc"
    with pytest.raises(ConfigError, match="protocol must be") as bad:
        TritonOperator("encoder", 1, {"model_repository": str(REPO), "protocol": "tcp"})
    assert bad.value.details["key"] == "parameters.protocol"


async def _no_partial(*args: object, **kwargs: object) -> None:
    raise AssertionError("the Triton operator sends no partial results")


def _no_remote(*args: object, **kwargs: object) -> None:
    raise AssertionError("the Triton operator calls no other operator")


def test_a_bad_parent_death_mode_is_refused() -> None:
    with pytest.raises(TritonError, match="parent_death must be one of"):
        TritonServer(model_repository=str(REPO), parent_death="prctl")


def test_exports_exist() -> None:
    import tdist.triton as package

    for name in package.__all__:
        assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError):
        package.InferResult  # noqa: B018 - the name it used to export without having it
