"""Same-host tensors through shared memory, with real processes: zero-copy views, an owner killed
in the middle of a pull, the agent's sweep of dead processes' segments, and processes in other
network namespaces (other "hosts") staying on UCX."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tdist.agent.shm_sweep import ShmSweeper
from tdist.client import Client
from tdist.config import DataPlaneConfig
from tdist.data_plane import shm
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.plane import DataPlane, gpu_available
from tdist.errors import DataPlaneError
from tests.conftest import WorkerProcesses, operator_flag
from tests.support.agent import AgentProcess, agent_toml, cleanup
from tests.support.children import stop_by_stdin

pytestmark = pytest.mark.timeout(300)

PEER = Path(__file__).resolve().parent.parent / "support" / "shm_peer.py"


def pattern(nbytes: int) -> np.ndarray:
    return (np.arange(nbytes) % 251).astype(np.uint8)


def from_fields(f: list[Any]) -> TensorRef:
    return TensorRef(*f[:4], tuple(f[4]), *f[5:])


def segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"tdist-{pid}-")]


@contextmanager
def owner_process(nbytes: int, count: int = 1, *, shared_memory: bool = True, netns: str | None = None,
                  gpu: bool = False) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A shm_peer owner: (its process, {"pid", "refs"}); stopped (or reaped) and swept after."""
    cmd = [sys.executable, str(PEER), "owner", "--nbytes", str(nbytes), "--count", str(count)]
    if not shared_memory:
        cmd.append("--no-shared-memory")
    if gpu:
        cmd.append("--gpu")
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the owner exited with {proc.wait(30)}"
        yield proc, json.loads(line)
    finally:
        stop_by_stdin(proc)
        shm.sweep_dead()  # what a killed owner left (the agent's job in a deployment)


async def test_a_zero_copy_view_is_read_only_and_outlives_release_and_owner(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    wp = worker_processes.start("echo", operator_flag("echo", "Counting"))
    x = np.random.default_rng(5).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
    result = await client.operator("echo").infer({"x": x}, timeout=60, pull_outputs=False)
    ref = result.outputs["x"]
    assert isinstance(ref, TensorRef) and ref.segment.startswith(f"tdist-{wp.pid}-")
    plane = await client.data_plane.get()
    view = await plane.pull(ref, zero_copy=True)
    assert view.dtype == np.float32 and view.shape == x.shape and np.array_equal(view, x)
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1.0
    assert plane.pulls == {"shm": 1}
    await plane.release(ref)  # the owner frees the buffer and unlinks its segment at once
    assert ref.segment not in os.listdir(shm.SHM_DIR)
    worker_processes.kill(wp, signal.SIGKILL)
    wp.proc.wait(10)
    assert np.array_equal(view, x)  # the mapping is the consumer's own now
    # Copies, and zero-copy views of every kind of tensor through materialize.
    again = worker_processes.start("echo2", operator_flag("echo", "Counting"))
    y = {"f": x, "i": np.arange(1 << 17, dtype=np.int64), "b": np.array([b"a" * 70_000, b""], dtype=object)}
    out = await client.operator("echo").infer(y, timeout=60, pull_outputs=False)
    got = await plane.materialize(out.outputs, zero_copy=True)
    assert all(np.array_equal(got[k], y[k]) for k in y)
    assert not got["f"].flags.writeable and not got["i"].flags.writeable
    assert plane.pulls == {"shm": 4}
    assert not segments_of(again.pid)  # materialize released them all: the worker unlinked each


@pytest.mark.parametrize("path", ["shm", "ucx"])
async def test_an_owner_killed_mid_pull_gives_the_bytes_or_a_typed_error(path: str) -> None:
    """A 256 MiB tensor pulled again and again while its owner is SIGKILLed at a random moment:
    each pull gives the right bytes or a typed error, never a crash or a hang. Through shared memory
    the segment outlives the owner (the reads go on) until the sweep; then, as over UCX, the pull
    fails with PeerUnreachable within its timeout."""
    nbytes = 256 << 20
    want = pattern(nbytes)
    shared = path == "shm"
    with owner_process(nbytes, shared_memory=shared) as (proc, info):
        ref = from_fields(info["refs"][0])
        assert bool(ref.segment) == shared
        plane = await DataPlane("consumer", DataPlaneConfig(pull_timeout=5.0, shared_memory=shared)).start()
        killed = threading.Event()
        pulling = threading.Event()

        def kill_soon() -> None:
            pulling.wait(60)
            threading.Event().wait(random.uniform(0.0, 0.3))
            killed.set()  # just before: a pull may see the owner die before this thread sees it
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)

        killer = threading.Thread(target=kill_soon, daemon=True)
        killer.start()
        outcomes: list[tuple[str, bool]] = []  # (bytes or the error's type, whether the owner was dead by then)
        buf = np.empty(nbytes, dtype=np.uint8)
        swept = False
        try:
            for i in range(40):
                pulling.set()
                try:
                    got = await plane.pull(ref, out=buf if i % 2 else None, zero_copy=i % 3 == 0)
                    ok = bool(np.array_equal(got, want))
                    del got
                    assert ok, f"pull {i} gave wrong bytes"
                    outcomes.append(("bytes", killed.is_set()))
                except DataPlaneError as exc:
                    outcomes.append((type(exc).__name__, killed.is_set()))
                    break  # the owner is gone and so is its segment (if it had one)
                if killed.is_set() and not swept and sum(dead for _, dead in outcomes) >= 2:
                    swept = bool(shm.sweep_dead())  # the agent's sweep: the segment's name goes
                await asyncio.sleep(0.001)
        finally:
            killer.join(60)
            await plane.close()
        assert killed.is_set()
        assert {what for what, _ in outcomes} <= {"bytes", "PeerUnreachable"}, outcomes
        assert outcomes[-1] == ("PeerUnreachable", True), outcomes
        if shared:
            # The segment outlived its owner: reads after the kill gave the bytes, until the
            # segment was swept (by this test, or by any other tdist process on the host).
            assert ref.segment not in os.listdir(shm.SHM_DIR)
            assert swept <= (sum(what == "bytes" and dead for what, dead in outcomes) >= 2), outcomes


async def test_a_gpu_tensor_on_the_same_host_goes_through_cuda_ipc() -> None:
    if not gpu_available():
        pytest.skip("no GPU: cupy cannot allocate device memory here (CUDA driver missing), so the CUDA IPC "
                    "path (data_plane/cuda_ipc.py) cannot run; its descriptor fields are checked in "
                    "tests/unit/test_malformed_requests.py")
    import cupy  # type: ignore[import-not-found]

    with owner_process(1 << 20, gpu=True) as (_, info):
        ref = from_fields(info["refs"][0])
        assert ref.memory_type == "GPU" and ref.ipc and ref.host == shm.host_identity() and not ref.segment
        plane = await DataPlane("consumer", DataPlaneConfig()).start()
        try:
            got = await plane.pull(ref, memory_type="GPU")
            assert isinstance(got, cupy.ndarray) and bool((got == cupy.asarray(pattern(1 << 20))).all())
            assert plane.pulls == {"ipc": 1}
        finally:
            await plane.close()


async def test_the_agent_sweep_removes_a_dead_pids_segments_and_keeps_a_live_ones() -> None:
    with owner_process(4096, count=2) as (live, live_info), owner_process(4096, count=3) as (dead, dead_info):
        assert len(segments_of(live_info["pid"])) == 2 and len(segments_of(dead_info["pid"])) == 3
        dead.kill()
        dead.wait(30)
        assert len(segments_of(dead_info["pid"])) == 3  # SIGKILL: nobody unlinked them
        sweeper = ShmSweeper(every=3600.0)
        removed = sweeper.sweep()
        assert set(removed) >= {from_fields(f).segment for f in dead_info["refs"]}
        assert not segments_of(dead_info["pid"]) and len(segments_of(live_info["pid"])) == 2
        sweeper.tick()  # not due: nothing happens
        # The live owner still serves through its segments.
        plane = await DataPlane("consumer", DataPlaneConfig()).start()
        try:
            for f in live_info["refs"]:
                assert np.array_equal(await plane.pull(from_fields(f)), pattern(4096))
            assert plane.pulls == {"shm": 2}
        finally:
            await plane.close()


async def test_a_starting_agent_sweeps_and_keeps_sweeping(tmp_path: Path, nats_server, namespace: str) -> None:  # type: ignore[no-untyped-def]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    before = Path(shm.SHM_DIR, f"tdist-{gone.pid}-{uuid.uuid4().hex}")
    before.write_bytes(b"left by a process killed before the agent started")
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, nats=f'servers = ["{nats_server.url}"]', namespace=namespace, count=1))
    agent = AgentProcess(config)
    try:
        await agent.wait_ready()
        assert not before.exists()
        later = Path(shm.SHM_DIR, f"tdist-{gone.pid}-{uuid.uuid4().hex}")
        later.write_bytes(b"left by a process killed while the agent runs")
        with owner_process(4096) as (_, live):
            for _ in range(300):  # the agent sweeps every 10 s
                if not later.exists():
                    break
                await asyncio.sleep(0.1)
            assert not later.exists()
            assert len(segments_of(live["pid"])) == 1
    finally:
        cleanup(tmp_path / "state", agent)
        before.unlink(missing_ok=True)


# -- other hosts: network namespaces ----------------------------------------------------------


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair (10.231.78.1 and .2): two "hosts" on one
    machine that share /dev/shm, as the data-plane benchmark's."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    names = (f"tdist-t-{tag}-a", f"tdist-t-{tag}-b")
    devs = (f"tdv{tag}a", f"tdv{tag}b")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for ns in names:
            ip("netns", "add", ns)
        ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
        for ns, dev, addr in zip(names, devs, ("10.231.78.1", "10.231.78.2")):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def consume(refs: list[Any], netns: str, *extra: str) -> dict[str, Any]:
    cmd = ["ip", "netns", "exec", netns, sys.executable, str(PEER), "consumer", "--refs", json.dumps(refs), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "all"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


async def test_another_network_namespace_is_another_host_and_pulls_over_ucx(two_hosts: tuple[str, str]) -> None:
    a, b = two_hosts
    with owner_process(1 << 20, count=2, netns=a) as (_, info):
        refs = info["refs"]
        assert all(from_fields(f).segment and from_fields(f).host for f in refs)
        assert Path(shm.SHM_DIR, from_fields(refs[0]).segment).exists()  # visible from here: same /dev/shm
        assert consume(refs, b) == {"ok": True, "paths": {"ucx": 2}}
        # The control: a consumer in the owner's own namespace reads the segments.
        assert consume(refs, a) == {"ok": True, "paths": {"shm": 2}}
