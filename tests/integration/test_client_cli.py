"""``tdist-client`` as a subprocess against a real nats-server and in-process workers.

The operators stand in for the hello world (tests/support/operators.py); the Triton pipeline
itself is tested in test_hello_world.py.
"""

from __future__ import annotations

import asyncio
import json
import sys

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from tdist.client.cli import echoed
from tdist.hello_world.checks import CHECKS
from tdist.config import OperatorConfig
from tests.conftest import operator

pytestmark = [pytest.mark.timeout(120)]


async def cli(*args: str, timeout: float = 90.0, program: tuple[str, ...] = ("-m", "tdist.client.cli")
              ) -> tuple[int, str, str]:
    """Run ``python -m tdist.client.cli ARGS``; without blocking the loop the workers run on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *program, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def conn(nats_server, namespace: str) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--nats-url", nats_server.url, "--namespace", namespace]


def last_json(stdout: str) -> dict:  # type: ignore[type-arg]
    return json.loads(stdout.strip().splitlines()[-1])


async def test_correct_answers_exit_0_with_a_throughput_line(workers, conn: list[str]) -> None:
    await workers("ed", operator("encoder_decoder", "OutputEcho", max_inflight=8))
    code, out, err = await cli(*conn, "--requests", "30", "--concurrency", "4", "--input-size-stdev", "300",
                               "--no-progress")
    assert code == 0, (out, err)
    assert "Throughput: " in out and " requests/s" in out
    assert "requests: 30  answered: 30  errors: 0  mismatches: 0" in out
    assert "p50" in out and "p99" in out


async def test_wrong_answers_exit_1(workers, conn: list[str]) -> None:
    await workers("ed", operator("encoder_decoder", "WrongEcho", max_inflight=4))
    code, out, err = await cli(*conn, "--requests", "20", "--concurrency", "2", "--json", "--no-progress")
    assert code == 1, (out, err)
    summary = last_json(out)
    assert summary["answered"] == 20 and summary["errors"] == 20 and summary["mismatches"] == 20
    assert len([line for line in err.splitlines() if "WrongAnswer" in line]) == 10  # the first 10 only


async def test_two_client_processes_json(workers, conn: list[str]) -> None:
    await workers("ed", operator("encoder_decoder", "OutputEcho", max_inflight=16))
    code, out, err = await cli(*conn, "--clients", "2", "--concurrency", "4", "--requests", "40", "--json")
    assert code == 0, (out, err)
    summary = last_json(out)
    assert summary["requests"] == 40 and summary["answered"] == 40 and summary["errors"] == 0
    assert summary["clients"] == 2 and summary["concurrency"] == 4
    assert summary["throughput_rps"] > 0 and summary["wall_s"] > 0
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]


async def test_encoder_decoder_and_the_pipeline_are_checked(workers, conn: list[str]) -> None:
    await workers("enc", operator("encoder", "PyEncoder", max_inflight=4))
    await workers("dec", operator("decoder", "PyDecoder", max_inflight=4))
    await workers("mid", OperatorConfig(name="encoder_decoder", implementation="tdist.hello_world.operators:EncodeDecode",
                                        max_inflight=4))
    for op in ("encoder", "decoder", "encoder_decoder"):
        code, out, err = await cli(*conn, "--operator", op, "--requests", "10", "--input-copies", "3",
                                   "--input-size-mean", "50", "--input-size-stdev", "50", "--json", "--no-progress")
        assert code == 0, (op, out, err)
        assert last_json(out)["errors"] == 0


async def test_other_operators_are_not_checked(workers, conn: list[str]) -> None:
    await workers("w", operator("wrong", "WrongEcho"))
    code, out, err = await cli(*conn, "--operator", "wrong", "--requests", "5", "--json", "--no-progress")
    assert code == 0, (out, err)
    summary = last_json(out)
    assert summary["checked"] is False and summary["echoed"] == 0 and summary["errors"] == 0


@dataclass(frozen=True)
class AppendsZero:
    """A check plugged into ``main``: the answer is the input with a 0 appended (WrongEcho)."""

    def inputs(self, x: np.ndarray, copies: int) -> dict[str, np.ndarray]:
        return {"input": x}

    def problem(self, x: np.ndarray, copies: int, outputs: Mapping[str, Any]) -> str | None:
        got = outputs.get("output")
        return None if got is not None and np.array_equal(got, np.append(x, np.int64(0))) else "no zero appended"

    def size_factor(self, copies: int) -> int:
        return 1


PLUGGED = ("-c", "import sys; from tdist.client.cli import main; "
                 "from tests.integration.test_client_cli import AppendsZero; "
                 "sys.exit(main(sys.argv[1:], checks={'appends': AppendsZero()}))")


@pytest.mark.parametrize("clients", ["1", "2"])  # 2: the check is pickled into the client processes
async def test_a_check_plugged_into_main_judges_the_answers(workers, conn: list[str], clients: str) -> None:
    await workers("w", operator("appends", "WrongEcho", max_inflight=4))
    await workers("ed", operator("encoder_decoder", "WrongEcho", max_inflight=4))
    args = ("--requests", "8", "--clients", clients, "--concurrency", "2", "--json", "--no-progress")
    code, out, err = await cli(*conn, "--operator", "appends", *args, program=PLUGGED)
    assert code == 0, (out, err)
    summary = last_json(out)
    assert summary["checked"] is True and summary["answered"] == 8 and summary["mismatches"] == 0
    # The table replaces the default one: encoder_decoder is now unchecked, its wrong answers pass.
    code, out, err = await cli(*conn, *args, program=PLUGGED)
    assert code == 0, (out, err)
    assert last_json(out)["checked"] is False


async def test_ls_lists_the_running_worker(workers, conn: list[str]) -> None:
    worker = await workers("ed", operator("encoder_decoder", "OutputEcho", max_inflight=3))
    code, out, err = await cli("ls", *conn)
    assert code == 0, (out, err)
    assert worker.id in out and "encoder_decoder:1 0/3" in out
    code, out, err = await cli(*conn, "ls", "--json")
    assert code == 0, (out, err)
    listed = json.loads(out)["workers"]
    assert [w["id"] for w in listed] == [worker.id] and listed[0]["state"] == "serving"


async def test_no_worker_fails_fast(conn: list[str]) -> None:
    code, out, err = await cli(*conn, "--requests", "3", "--no-progress")
    assert code == 1 and "no live worker serves operator 'encoder_decoder'" in err


@pytest.mark.parametrize("args", [["--requests", "0"], ["--namespace", "no spaces"], ["--concurrency", "-1"],
                                  ["--timeout", "0"], ["ls", "--requests", "5"], ["--operator", "a.b"],
                                  ["--requests", "many"]])
async def test_configuration_errors_exit_2(args: list[str]) -> None:
    code, out, err = await cli("--nats-url", "nats://127.0.0.1:1", *args)
    assert code == 2, (out, err)
    assert err.strip()


def test_checks() -> None:
    x = np.arange(-3, 4, dtype=np.int64)
    ed, enc, dec = CHECKS["encoder_decoder"], CHECKS["encoder"], CHECKS["decoder"]
    assert ed.problem(x, 2, {"output": x.copy()}) is None
    assert ed.problem(x, 2, {"output": x + 1}) is not None
    assert ed.problem(x, 2, {"output": x.astype(np.int32)}) is not None
    assert ed.problem(x, 2, {}) is not None
    encoded = {"output": np.tile(~x, 2), "input_copies": np.array([2], dtype=np.int64)}
    assert enc.inputs(x, 2) == {"input": x}
    assert enc.problem(x, 2, encoded) is None
    assert enc.problem(x, 3, encoded) is not None
    sent = dec.inputs(x, 2)
    assert np.array_equal(sent["input"], np.tile(~x, 2)) and sent["input_copies"].tolist() == [2]
    assert dec.problem(x, 2, {"output": x}) is None
    assert dec.problem(x, 2, {"output": x[::-1]}) is not None
    assert "something" not in CHECKS  # other operators are called unchecked
    assert echoed(x, {"input": x}) and echoed(x, {"output": x}) and not echoed(x, {"output": x + 1})
