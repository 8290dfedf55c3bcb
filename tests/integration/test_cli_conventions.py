"""The three console scripts as an operator runs them (``.venv/bin/tdist-agent`` ...): ``--version``,
subcommands, NATS settings from the environment, exit codes, a closed pipe, errors naming the flag.

The NATS tests run against a real nats-server that requires a user and password, so a setting
that did not reach the process (a variable ignored, a flag not winning) fails the connection.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tests.conftest import operator
from tests.support.agent import cleanup, write_agent_toml

pytestmark = pytest.mark.timeout(180)

BIN = Path(sys.executable).parent
AGENT, WORKER, CLIENT = (str(BIN / name) for name in ("tdist-agent", "tdist-worker", "tdist-client"))
USER, PASSWORD = "cli-user", "cli-secret-pw"
ECHO = "name=echo,implementation=tdist.operators.builtin:Echo,max_inflight=4"


def env_with(**values: str) -> dict[str, str]:
    """This process's environment without any TDIST_NATS_* variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDIST_NATS_")}
    env.update(values)
    return env


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, env=env or env_with(), timeout=timeout)


def secret(tmp: Path, name: str, value: str) -> str:
    path = tmp / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def secured() -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(NatsServerOptions(user=USER, password=PASSWORD))
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- 1. subcommands and --version ------------------------------------------------------------


@pytest.mark.parametrize("script", [AGENT, WORKER, CLIENT])
def test_version_exits_0(script: str) -> None:
    done = run(script, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{Path(script).name} {importlib.metadata.version('tdist')}\n"


@pytest.mark.parametrize("argv", [
    [AGENT, "--help"], [AGENT, "run", "--help"], [AGENT, "check-config", "--help"],
    [WORKER, "--help"], [CLIENT, "--help"], [CLIENT, "run", "--help"], [CLIENT, "ls", "--help"],
])
def test_every_help_states_the_exit_codes(argv: list[str]) -> None:
    done = run(*argv)
    assert done.returncode == 0, done.stderr
    assert "exit codes:" in done.stdout
    for line in ("0  success", "1  runtime failure", "2  usage or configuration error"):
        assert line in done.stdout, done.stdout


def test_check_config_help_is_help_not_a_file_name() -> None:
    done = run(AGENT, "check-config", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: tdist-agent check-config")
    assert "--no-host-checks" in done.stdout and "not found" not in done.stdout + done.stderr


@pytest.mark.parametrize("argv", [[AGENT, "bogus"], [CLIENT, "bogus"], [AGENT, "check-config", "a", "b"],
                                  [WORKER, "--no-such-flag"], [CLIENT, "ls", "--requests", "3"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    done = run(*argv)
    assert done.returncode == 2 and "usage:" in done.stderr, (done.stdout, done.stderr)


# --- 2. NATS settings from the environment; flags win ----------------------------------------


def test_client_takes_url_and_credentials_from_the_environment(secured: EmbeddedNatsServer, tmp_path: Path,
                                                               namespace: str) -> None:
    env = env_with(TDIST_NATS_URL=secured.url, TDIST_NATS_USER=USER, TDIST_NATS_PASSWORD=PASSWORD)
    done = run(CLIENT, "ls", "--json", "--namespace", namespace, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"namespace": namespace, "workers": []}
    # Without the password the server refuses: a runtime failure, exit 1.
    anonymous = run(CLIENT, "ls", "--namespace", namespace, env=env_with(TDIST_NATS_URL=secured.url))
    assert anonymous.returncode == 1, anonymous.stderr
    # Flags win over the environment: a dead URL and a wrong password in it are overridden.
    wrong = env_with(TDIST_NATS_URL="nats://127.0.0.1:1", TDIST_NATS_USER=USER, TDIST_NATS_PASSWORD="wrong")
    assert run(CLIENT, "ls", "--namespace", namespace, env=wrong).returncode == 1
    done = run(CLIENT, "ls", "--namespace", namespace, "--nats-url", secured.url,
               "--password-file", secret(tmp_path, "pw", PASSWORD), env=wrong)
    assert done.returncode == 0, done.stderr


async def test_worker_and_client_run_on_environment_settings(secured: EmbeddedNatsServer, tmp_path: Path,
                                                             namespace: str) -> None:
    env = env_with(TDIST_NATS_URL=secured.url, TDIST_NATS_USER=USER, TDIST_NATS_PASSWORD=PASSWORD)
    worker = subprocess.Popen([WORKER, "--name", "w", "--operator", ECHO, "--namespace", namespace],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert worker.stdout is not None
        line = await asyncio.to_thread(worker.stdout.readline)
        assert line, worker.stderr.read()  # type: ignore[union-attr]
        assert json.loads(line)["event"] == "worker_ready"
        # The explicit `run` subcommand, connected through the environment only.
        done = await asyncio.to_thread(run, CLIENT, "run", "--operator", "echo", "--requests", "5",
                                       "--no-progress", "--namespace", namespace, env=env)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "requests: 5  answered: 5  errors: 0" in done.stdout
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for stream in (worker.stdout, worker.stderr):
            if stream is not None:
                stream.close()


def test_a_missing_creds_file_is_named_by_its_variable(tmp_path: Path) -> None:
    env = env_with(TDIST_NATS_CREDS=str(tmp_path / "nope.creds"))
    for argv in ([WORKER, "--name", "w", "--operator", ECHO], [CLIENT, "ls"]):
        done = run(*argv, env=env)
        assert done.returncode == 2, done.stderr
        assert "TDIST_NATS_CREDS" in done.stderr and "not found" in done.stderr


def agent_file(tmp: Path, namespace: str, servers: str, *, http_port: int = 0) -> Path:
    """``tmp/agent.toml``: one worker hosting the built-in Echo as operator ``op``."""
    return write_agent_toml(tmp, nats=f'servers = ["{servers}"]', namespace=namespace, count=1,
                            implementation="tdist.operators.builtin:Echo", drain_timeout=5.0, http_port=http_port)


async def test_agent_run_takes_nats_settings_from_the_environment_and_hands_them_to_its_workers(
        secured: EmbeddedNatsServer, tmp_path: Path, namespace: str) -> None:
    """``tdist-agent run``: its file names a dead server; the environment names the real one and
    its credentials. The agent connects, its worker serves (it dials what the agent wrote in
    nats-client.toml), and no child inherits the variables (the password stays in the agent)."""
    config = agent_file(tmp_path, namespace, "nats://127.0.0.1:1")
    env = env_with(TDIST_NATS_URL=secured.url, TDIST_NATS_USER=USER, TDIST_NATS_PASSWORD=PASSWORD)
    agent = subprocess.Popen([AGENT, "run", "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert agent.stdout is not None
        assert "http on port" in await asyncio.to_thread(agent.stdout.readline)
        listed: list[dict] = []  # type: ignore[type-arg]
        for _ in range(600):
            done = await asyncio.to_thread(run, CLIENT, "ls", "--json", "--namespace", namespace, env=env)
            listed = json.loads(done.stdout)["workers"] if done.returncode == 0 else []
            if [w["state"] for w in listed] == ["serving"]:
                break
            await asyncio.sleep(0.1)
        assert [w["state"] for w in listed] == ["serving"], listed
        environ = Path(f"/proc/{listed[0]['pid']}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(b"TDIST_NATS_")]
        done = await asyncio.to_thread(run, CLIENT, "--operator", "op", "--requests", "3", "--no-progress",
                                       "--namespace", namespace, env=env)
        assert done.returncode == 0, done.stderr
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 120) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
        cleanup(tmp_path / "state")


# --- 3. exit codes: 2 for configuration, 1 at run time ---------------------------------------


def test_agent_configuration_errors_exit_2_and_runtime_failures_1(tmp_path: Path, namespace: str) -> None:
    missing = run(AGENT, "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml" in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[request_plane]\nmax_deliver = 'x'\n[[workers]]\nname = 'w'\n")
    for argv in ([AGENT, "--config", str(bad)], [AGENT, "run", "--config", str(bad)],
                 [AGENT, "check-config", str(bad)], [WORKER, "--config", str(bad), "--worker", "w"]):
        done = run(*argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert f"{bad}:request_plane.max_deliver: must be an integer" in done.stderr
    # A port in use is the host's state at run time: exit 1.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        config = agent_file(tmp_path, namespace, "nats://127.0.0.1:1", http_port=holder.getsockname()[1])
        done = run(AGENT, "--config", str(config))
    assert done.returncode == 1 and "in use" in done.stderr, done.stderr
    cleanup(tmp_path / "state")


def test_worker_runtime_failure_exits_1_and_a_bad_implementation_2(tmp_path: Path) -> None:
    # NATS answers nowhere: the worker cannot start (exit 1).
    dead = run(WORKER, "--name", "w", "--operator", ECHO, "--nats-url", "nats://127.0.0.1:1", timeout=120)
    assert dead.returncode == 1, dead.stderr
    bad = run(WORKER, "--name", "w", "--operator", "name=x,implementation=no_such_module_tdist:X",
              "--nats-url", "nats://127.0.0.1:1")
    assert bad.returncode == 2 and "no_such_module_tdist" in bad.stderr, bad.stderr


# --- 4. a closed pipe ends quietly ------------------------------------------------------------


def closed_stdout(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run with a stdout pipe whose only reader is closed before the command writes: its first
    write fails with EPIPE, every time."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or env_with())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(90), err


def test_a_closed_pipe_ends_quietly(nats_server: EmbeddedNatsServer, namespace: str) -> None:
    env = env_with(TDIST_NATS_URL=nats_server.url)
    for argv in ([CLIENT, "ls", "--json", "--namespace", namespace], [CLIENT, "ls", "--namespace", namespace],
                 [AGENT, "--help"], [AGENT, "--version"], [WORKER, "--help"], [CLIENT, "ls", "--help"],
                 [AGENT, "check-config", "--no-host-checks", "etc/tdist/agent.toml"]):
        code, err = closed_stdout(*argv, env=env)
        assert code == 0 and err == "", (argv, code, err)


def test_ls_json_piped_into_head(nats_server: EmbeddedNatsServer, namespace: str) -> None:
    """The issue's own command line, under ``pipefail``: head's status and ours are both 0."""
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"{CLIENT} ls --json --namespace {namespace} | head -1"],
                          capture_output=True, text=True, env=env_with(TDIST_NATS_URL=nats_server.url), timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)["namespace"] == namespace


async def test_the_run_keeps_its_exit_code_when_the_reader_goes(  # type: ignore[no-untyped-def]
        workers, nats_server: EmbeddedNatsServer, namespace: str) -> None:
    await workers("ed", operator("encoder_decoder", "WrongEcho", max_inflight=4))
    env = env_with(TDIST_NATS_URL=nats_server.url)
    code, err = await asyncio.to_thread(closed_stdout, CLIENT, "--requests", "3", "--no-progress",
                                        "--namespace", namespace, env=env)
    assert code == 1 and "Traceback" not in err, err  # wrong answers: 1, quiet about the pipe


# --- 5. errors name the flag the user typed -----------------------------------------------------


def test_errors_name_the_flag_not_the_toml_key(tmp_path: Path, namespace: str) -> None:
    config = agent_file(tmp_path, namespace, "nats://127.0.0.1:1")
    cases = [
        ([AGENT, "--config", str(config), "--http-port", "70000"], "--http-port", "http.port"),
        ([AGENT, "run", "--config", str(config), "--nats-url", "localhost:4222"], "--nats-url", "nats.servers"),
        ([AGENT, "--config", str(config), "--user", "u"], "--user", "nats.user"),
        ([WORKER, "--name", "w", "--operator", ECHO, "--ack-wait", "0.1"], "--ack-wait", "request_plane.ack_wait"),
        ([WORKER, "--name", "w", "--operator", ECHO, "--nats-url", "x"], "--nats-url", "nats.servers"),
        ([WORKER, "--name", "w", "--operator", ECHO, "--log-level", "loud"], "--log-level", "logging.level"),
        ([CLIENT, "ls", "--nats-url", "x"], "--nats-url", "nats.servers"),
        ([CLIENT, "ls", "--tls-cert", str(config)], "--tls-cert", "nats.tls_cert_file"),
    ]
    for argv, flag, key in cases:
        done = run(*argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert f"configuration error: {flag}: " in done.stderr and key not in done.stderr, (argv, done.stderr)
    env_case = run(CLIENT, "ls", env=env_with(TDIST_NATS_URL="localhost:4222"))
    assert env_case.returncode == 2 and "TDIST_NATS_URL: server URL 'localhost:4222'" in env_case.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made
