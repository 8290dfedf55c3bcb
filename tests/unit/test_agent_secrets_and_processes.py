"""[nats] secrets (files, URLs, repr), reserved operator names, [canary], and the agent's process bookkeeping."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tdist.agent.config import CanaryCall, load_agent_config
from tdist.agent.processes import (
    MARKER,
    AgentStartError,
    PidFile,
    StateLock,
    die_with_parent,
    kill_and_wait,
    marked_pids,
    start_time,
    stop_leftovers,
)
from tdist.config import NatsConfig, OperatorConfig, WorkerConfig
from tdist.errors import ConfigError
from tdist.worker.main import build_parser, resolve


def write(tmp: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp / name
    path.write_text(text)
    path.chmod(mode)
    return path


def agent_file(tmp: Path, nats: str, extra: str = "") -> Path:
    return write(tmp, "agent.toml", f"""
[nats]
{nats}
[directories]
state_dir = "{tmp / 'state'}"
log_dir = "{tmp / 'logs'}"
{extra}
[[workers]]
name = "w"
[[workers.operators]]
name = "echo"
implementation = "tdist.operators.builtin:Echo"
""")


# -- [nats] secrets -------------------------------------------------------------------------------


def test_password_and_token_files_are_read_once_at_load(tmp_path: Path) -> None:
    pw = write(tmp_path, "pw", "s3cret-pw\n")
    cfg = load_agent_config(agent_file(tmp_path, f'user = "u"\npassword_file = "{pw}"'))
    assert (cfg.nats.user, cfg.nats.password, cfg.nats.password_file) == ("u", "s3cret-pw", str(pw))
    pw.write_text("changed\n")
    assert cfg.nats.password == "s3cret-pw"
    tok = write(tmp_path, "tok", "t0ken")
    assert load_agent_config(agent_file(tmp_path, f'token_file = "{tok}"')).nats.token == "t0ken"


@pytest.mark.parametrize(("nats", "key", "reason"), [
    ('user = "u"\npassword_file = "{missing}"', "nats.password_file", "cannot read"),
    ('token_file = "{world}"', "nats.token_file", "readable by others"),
    ('token_file = "{empty}"', "nats.token_file", "is empty"),
    ('user = "u"\npassword = "p"\npassword_file = "{ok}"', "nats.password_file", "not both"),
    ('embedded = true\ncreds_file = "{ok}"', "nats.creds_file", "operator (JWT) mode"),
    ('embedded = true\nuser = "u"\npassword = "p"\ntoken = "t"', "nats.token", "not both"),
    ('monitor_port = 8222', "nats.monitor_port", "embedded"),
])
def test_secret_errors_name_the_key(tmp_path: Path, nats: str, key: str, reason: str) -> None:
    files = {"missing": tmp_path / "nope", "world": write(tmp_path, "world", "x", 0o644),
             "empty": write(tmp_path, "empty", "\n"), "ok": write(tmp_path, "ok", "x")}
    with pytest.raises(ConfigError) as err:
        load_agent_config(agent_file(tmp_path, nats.format(**files)))
    assert err.value.key == key and reason in err.value.message and str(tmp_path / "agent.toml") in err.value.message


def test_a_group_readable_secret_file_is_accepted(tmp_path: Path) -> None:
    """``root:tdist 0640`` is how a root-owned secret reaches the service user (a warning is logged)."""
    pw = write(tmp_path, "pw", "p", 0o640)
    assert load_agent_config(agent_file(tmp_path, f'user = "u"\npassword_file = "{pw}"')).nats.password == "p"


def test_credentials_in_a_url_leave_the_url() -> None:
    cfg = NatsConfig(servers=("nats://alice:p%40ss@10.0.0.1:4222", "nats://alice:p%40ss@10.0.0.2:4222"))
    assert cfg.servers == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert (cfg.user, cfg.password) == ("alice", "p@ss")
    assert NatsConfig(servers=("tls://tok3n@h:4222",)).token == "tok3n"
    with pytest.raises(ConfigError, match="different credentials"):
        NatsConfig(servers=("nats://a:1@h:4222", "nats://b:2@h:4222"))
    with pytest.raises(ConfigError, match="both in a server URL"):
        NatsConfig(servers=("nats://a:1@h:4222",), user="a", password="1")


def test_secrets_stay_out_of_repr() -> None:
    cfg = NatsConfig(user="u", password="pw-secret", token=None)
    assert "pw-secret" not in repr(cfg) and "pw-secret" not in repr(cfg.redacted())
    assert cfg.redacted().password == "<set>"


def test_worker_reads_nats_from_the_agents_private_file(tmp_path: Path) -> None:
    config = agent_file(tmp_path, 'servers = ["nats://127.0.0.1:4222"]')
    nats_file = write(tmp_path, "nats-client.toml", '[nats]\nservers = ["nats://127.0.0.1:34567"]\n'
                                                    'user = "u"\npassword = "p"\n')
    wf = resolve(build_parser().parse_args(["--config", str(config), "--worker", "w", "--nats-file", str(nats_file)]))
    assert wf.nats.servers == ("nats://127.0.0.1:34567",) and (wf.nats.user, wf.nats.password) == ("u", "p")


# -- reserved names and the canary ------------------------------------------------------------------


def test_operator_names_beginning_with_underscore_are_reserved() -> None:
    ping = OperatorConfig(name="_ping", implementation="tdist.operators.builtin:Ping")
    with pytest.raises(ConfigError, match="reserved"):
        WorkerConfig(name="w", operators=(ping,))


def test_canary_settings(tmp_path: Path) -> None:
    cfg = load_agent_config(agent_file(tmp_path, "", "[canary]\nperiod = 2\nfailures = 4\n"))
    assert (cfg.canary.period, cfg.canary.timeout, cfg.canary.failures) == (2.0, 2.0, 4)
    assert cfg.workers[0].canary == CanaryCall()  # the built-in _ping v1
    text = agent_file(tmp_path, "").read_text() + '[workers.canary]\noperator = "echo"\ninputs = { x = [1, 2] }\n'
    custom = load_agent_config(write(tmp_path, "agent.toml", text)).workers[0].canary
    assert (custom.operator, custom.version, dict(custom.inputs)) == ("echo", 1, {"x": [1, 2]})
    for bad, key in (('operator = "nope"', "workers[0].canary.operator"),
                     ('operator = "echo"\ninputs = { x = "a" }', "workers[0].canary.inputs.x")):
        path = write(tmp_path, "agent.toml", agent_file(tmp_path, "").read_text() + f"[workers.canary]\n{bad}\n")
        with pytest.raises(ConfigError) as err:
            load_agent_config(path)
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        load_agent_config(agent_file(tmp_path, "", "[canary]\nfailures = 0\n"))
    assert err.value.key == "canary.failures"


# -- processes ---------------------------------------------------------------------------------------


def test_pid_records_check_the_start_time(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        pids = PidFile(str(tmp_path))
        pids.set("worker:w-0", proc.pid)
        assert oct(os.stat(pids.path).st_mode & 0o777) == "0o600"
        [rec] = PidFile(str(tmp_path)).read()
        assert rec.pid == proc.pid and rec.start_time == start_time(proc.pid) and rec.running()
        assert not type(rec)(rec.role, rec.pid, rec.start_time + 1).running()  # a reused PID is not ours
    finally:
        proc.kill()
        proc.wait()
    assert not rec.running()


def test_leftovers_are_found_by_marker_and_record(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    marked = subprocess.Popen(["sleep", "60"], env={**os.environ, MARKER: state})
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, MARKER: state + "-other"})
    recorded = subprocess.Popen(["sleep", "60"])
    try:
        pids = PidFile(str(tmp_path))
        pids.set("worker:w-1", recorded.pid)
        for _ in range(200):  # until the marked child has exec'd sleep with its environment
            if marked.pid in marked_pids(state):
                break
        assert marked_pids(state) == [marked.pid]
        stopped = stop_leftovers(state, pids)
        assert len(stopped) == 2
        assert marked.wait(10) and recorded.wait(10)
        assert other.poll() is None  # another state dir's process
    finally:
        kill_and_wait([other.pid, marked.pid, recorded.pid])
        for p in (marked, other, recorded):
            p.wait()


def test_the_state_lock_is_exclusive(tmp_path: Path) -> None:
    first = StateLock(str(tmp_path))
    first.acquire()
    try:
        probe = subprocess.run(
            ["python3", "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", first.path], capture_output=True)
        assert probe.returncode != 0  # held: another process cannot take it
        with pytest.raises(AgentStartError, match=f"pid {os.getpid()}"):
            StateLock(str(tmp_path)).acquire()
    finally:
        first.release()
    second = StateLock(str(tmp_path))
    second.acquire()
    second.release()


def test_die_with_parent_kills_the_program_when_its_parent_is_killed() -> None:
    import shlex
    import signal
    import time

    from tdist.agent.processes import alive, cmdline

    prefix = shlex.join(die_with_parent())
    parent = subprocess.Popen(["sh", "-c", f"{prefix} sleep 600 & echo $!; exec sleep 600"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        for _ in range(500):
            if cmdline(child)[:1] == ["sleep"]:
                break
            time.sleep(0.01)
        assert cmdline(child) == ["sleep", "600"]  # the wrapper exec'd the program: same PID
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(500):
            if not alive(child):
                break
            time.sleep(0.01)
        assert not alive(child)
    finally:
        kill_and_wait([child])
        parent.stdout.close()
