"""The data-plane server survives any message, and one slow pull does not fail the others
(real processes, real UCX)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import DataPlaneConfig
from tdist.data_plane.descriptor import TensorRef
from tdist.data_plane.plane import DataPlane
from tdist.errors import PeerUnreachable
from tests.conftest import WorkerProcesses, operator_flag
from tests.support.children import stop_by_stdin

pytestmark = pytest.mark.timeout(300)

SUPPORT = Path(__file__).resolve().parent.parent / "support"


async def _run(*cmd: str, timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"{cmd[1]} exited with {proc.returncode}"
    return out.decode()


async def test_worker_survives_hundreds_of_random_messages_and_still_serves(
    client: Client, worker_processes: WorkerProcesses
) -> None:
    wp = worker_processes.start("echo", operator_flag("echo", "Counting", max_inflight=4))
    echo = client.operator("echo")
    x = np.random.default_rng(3).integers(0, 1 << 40, size=1 << 16, dtype=np.int64)  # 512 KiB: by reference
    first = await echo.infer({"x": x}, timeout=60, pull_outputs=False)
    ref = first.outputs["x"]
    assert isinstance(ref, TensorRef) and ref.owner == wp.worker_id
    await (await client.data_plane.get()).release(ref)

    for seed in (1, 2):  # two hostile processes in turn
        summary = json.loads((await _run(sys.executable, str(SUPPORT / "data_plane_fuzzer.py"), "--address",
                                         ref.address, "--seed", str(seed), "--count", "400", timeout=240)).strip())
        assert summary["sent"] + summary["failed"] == 400 and summary["sent"] > 0
        assert wp.proc.poll() is None, "the worker died"

    # Still serving both ways: the worker pulls the input from us and serves its output to us.
    for _ in range(3):
        result = await echo.infer({"x": x}, timeout=60)
        assert np.array_equal(result.outputs["x"], x)
    assert wp.proc.poll() is None
    log = (worker_processes.log_dir / f"{wp.worker_id}.log").read_text()
    reasons = {json.loads(line).get("reason") for line in log.splitlines() if "data_plane_message_dropped" in line}
    assert {"request_size", "malformed_request", "unknown_tag"} <= reasons, reasons


async def test_a_timed_out_pull_does_not_fail_a_healthy_pull_beside_it() -> None:
    owner = subprocess.Popen([sys.executable, str(SUPPORT / "gated_owner.py"), "--tensors", "2"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    loop = asyncio.get_running_loop()
    plane = None
    try:
        assert owner.stdin is not None and owner.stdout is not None
        info = json.loads(await loop.run_in_executor(None, owner.stdout.readline))
        slow_id, healthy_id = info["tensor_ids"]
        nbytes = 1 << 20
        want = (np.arange(nbytes) % 251).astype(np.uint8)

        def ref(tensor_id: str) -> TensorRef:
            return TensorRef(info["owner"], info["address"], tensor_id, "UINT8", (nbytes,), nbytes)

        def say(line: str) -> None:
            owner.stdin.write(line + "\n")
            owner.stdin.flush()

        plane = await DataPlane("consumer", DataPlaneConfig(pull_timeout=60)).start()
        transport = plane.transport
        healthy = asyncio.get_running_loop().create_task(plane.pull(ref(healthy_id)))
        assert (await loop.run_in_executor(None, owner.stdout.readline)).split() == ["held", healthy_id]
        # The healthy pull is in flight on the endpoint to the owner; the slow one times out beside it.
        with pytest.raises(PeerUnreachable, match="did not answer"):
            await transport.fetch(info["address"], slow_id, np.empty(nbytes, dtype=np.uint8), 0.5)
        assert (await loop.run_in_executor(None, owner.stdout.readline)).split() == ["held", slow_id]
        assert not healthy.done()
        say(f"release {healthy_id}")
        assert np.array_equal(await healthy, want)

        # The slow tensor's late answer arrives after its pull gave up: discarded, not left in UCX.
        say(f"release {slow_id}")
        for _ in range(400):
            if transport.drops.total["unknown_tag"] >= 2:  # its header and its bytes
                break
            await asyncio.sleep(0.05)
        assert transport.drops.total["unknown_tag"] >= 2
        # And a new pull of it works, over the same endpoint: the timed-out pull left nothing behind.
        assert np.array_equal(await plane.pull(ref(slow_id)), want)
        assert transport.endpoints.opened == 1 and len(transport.endpoints) == 1
    finally:
        if plane is not None:
            await plane.close()
        stop_by_stdin(owner)
