"""tdist.agent: the agent's TOML file, GPU discovery and assignment, supervisord.conf rendering."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest

from tdist.agent.config import AgentConfig, load_agent_config
from tdist.agent.gpus import GpuInfo, assign_gpus, cpus_for, parse_nvidia_smi, sysfs_bus_id
from tdist.agent.supervisor_conf import (
    Program,
    conf_environment,
    config_digest,
    plan_programs,
    render,
    worker_id,
)
from tdist.config import load_worker_file
from tdist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "etc" / "tdist" / "agent.toml"

SMALL = """
[node]
name = "gpu-7"
gpus = [0, 1, 2, 3]

[nats]
servers = ["nats://10.0.0.1:4222"]

[directories]
state_dir = "/run/tdist"
log_dir = "/logs"

[http]
port = 9191

[[workers]]
name = "embed"
count = 2
gpus_per_instance = 2
drain_timeout = 20.5

[[workers.operators]]
name = "embed"
implementation = "mypkg.ops:Embed"

[[workers]]
name = "tok"
count = 1

[[workers.operators]]
name = "tok"
implementation = "mypkg.ops:Tok"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> AgentConfig:
    return load_agent_config(write(tmp_path, text))


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert info.value.file == str(path)
    assert str(path) in info.value.message
    return info.value


# --- the configuration ---------------------------------------------------------------------


def test_hello_world_file_loads() -> None:
    config = load_agent_config(HELLO)
    assert config.file == str(HELLO)
    assert config.nats.embedded is True
    assert config.request_plane.namespace == "hello"
    assert config.data_plane.store_bytes == 1073741824
    assert [(w.name, w.count, w.gpus_per_instance) for w in config.workers] == [
        ("encoder", 1, 0), ("decoder", 1, 0), ("encoder_decoder", 1, 0)
    ]
    assert config.workers[0].worker.operators[0].parameters["model_repository"] == "model_repository"
    assert config.node.gpus == ()  # "none": CPU workers
    assert config.directories.state_dir == ".tdist/state"
    assert config.directories.log_dir == "logs"
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9090)
    assert config.node.name  # the host name
    assert config.workers[0].worker.node == config.node.name


def test_full_file_loads(tmp_path: Path) -> None:
    config = load_text(tmp_path, SMALL)
    assert config.node.name == "gpu-7"
    assert config.node.gpus == (0, 1, 2, 3)
    assert config.directories.socket_path == "/run/tdist/supervisor.sock"
    assert config.http.port == 9191
    embed, tok = config.workers
    assert (embed.count, embed.gpus_per_instance, embed.worker.drain_timeout) == (2, 2, 20.5)
    assert (tok.count, tok.gpus_per_instance) == (1, 0)
    assert embed.worker.node == "gpu-7"
    assert config.gpus_needed() == 4


def test_the_agent_file_is_also_a_worker_file(tmp_path: Path) -> None:
    wf = load_worker_file(write(tmp_path, SMALL), "embed")
    assert wf.worker.name == "embed" and wf.worker.node == "gpu-7"


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [('"auto"', "auto"), ('"none"', ()), ("[]", ()), ("[3, 1]", (3, 1))],
)
def test_gpu_settings(tmp_path: Path, gpus: str, expected: object) -> None:
    text = SMALL.replace("gpus = [0, 1, 2, 3]", f"gpus = {gpus}").replace("gpus_per_instance = 2", "")
    assert load_text(tmp_path, text).node.gpus == expected


def test_top_level_gpus(tmp_path: Path) -> None:
    text = "gpus = [0, 1, 2, 3]\n" + SMALL.replace("gpus = [0, 1, 2, 3]", "")
    assert load_text(tmp_path, text).node.gpus == (0, 1, 2, 3)
    both = "gpus = [0, 1, 2, 3]\n" + SMALL
    assert error_of(tmp_path, both).key == "node.gpus"


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        ('port = 9191', 'port = 9191\nbind = "x"', "http.bind", "unknown key"),
        ('name = "gpu-7"', 'name = "gpu-7"\ncolour = "red"', "node.colour", "unknown key"),
        ('log_dir = "/logs"', 'log_dir = "/logs"\ncache = "/c"', "directories.cache", "unknown key"),
        ("drain_timeout = 20.5", "drain_timeout = 20.5\nreplicas = 2", "workers[0].replicas", "unknown key"),
        ('servers = ["nats://10.0.0.1:4222"]', 'servers = ["nats://10.0.0.1:4222"]\nembeded = true',
         "nats.embeded", "unknown key"),
        ("count = 2", "count = -1", "workers[0].count", "must not be negative"),
        ("count = 2", 'count = "two"', "workers[0].count", "must be an integer"),
        ("count = 2", "count = 2.5", "workers[0].count", "must be an integer"),
        ("gpus_per_instance = 2", "gpus_per_instance = -2", "workers[0].gpus_per_instance", "negative"),
        ("port = 9191", "port = 70000", "http.port", "between 0 and 65535"),
        ("gpus = [0, 1, 2, 3]", "gpus = [0, 0, 1, 2]", "node.gpus", "listed twice"),
        ("gpus = [0, 1, 2, 3]", "gpus = [0, -1]", "node.gpus", "negative"),
        ("gpus = [0, 1, 2, 3]", 'gpus = "all"', "node.gpus", '"auto" or "none"'),
        ("gpus = [0, 1, 2, 3]", 'gpus = ["0"]', "node.gpus", "integer"),
        ('state_dir = "/run/tdist"', f'state_dir = "/{"x" * 120}"', "directories.state_dir", "unix socket"),
        ('name = "embed"\ncount', 'name = "em bed"\ncount', "workers[0].name", "must be 1-64 characters"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, old: str, new: str, key: str, reason: str) -> None:
    assert old in SMALL
    err = error_of(tmp_path, SMALL.replace(old, new, 1))
    assert err.key == key, err.message
    assert reason in err.message
    assert f"{tmp_path / 'agent.toml'}:{key}: " in err.message


def test_too_few_gpus_names_the_worker(tmp_path: Path) -> None:
    err = error_of(tmp_path, SMALL.replace("gpus = [0, 1, 2, 3]", "gpus = [0, 1, 2]"))
    assert err.key == "workers[0].gpus_per_instance"
    assert "need 4 GPUs" in err.message and "node.gpus lists 3" in err.message
    text = SMALL.replace('name = "tok"\ncount = 1', 'name = "tok"\ncount = 1\ngpus_per_instance = 1')
    assert error_of(tmp_path, text).key == "workers[1].gpus_per_instance"
    assert error_of(tmp_path, SMALL.replace("gpus = [0, 1, 2, 3]", 'gpus = "none"')).key == (
        "workers[0].gpus_per_instance"
    )


def test_auto_gpus_are_checked_when_planning(tmp_path: Path) -> None:
    config = load_text(tmp_path, SMALL.replace("gpus = [0, 1, 2, 3]", 'gpus = "auto"'))
    with pytest.raises(ConfigError) as info:
        plan_programs(config, [GpuInfo(0)])
    assert info.value.key == "workers[0].gpus_per_instance" and "the host has 1" in info.value.message


def test_duplicate_worker_names(tmp_path: Path) -> None:
    err = error_of(tmp_path, SMALL.replace('name = "tok"\ncount', 'name = "embed"\ncount'))
    assert err.key == "workers[1].name"
    assert "also used by workers[0]" in err.message


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_agent_config(tmp_path / "nope.toml")
    assert info.value.file == str(tmp_path / "nope.toml")
    assert "not valid TOML" in error_of(tmp_path, "[node\n").message


# --- GPUs ------------------------------------------------------------------------------------


def test_assign_gpus_contiguous_blocks() -> None:
    assert assign_gpus([0, 1, 2, 3], [2, 1, 0, 1]) == [(0, 1), (2,), (), (3,)]
    assert assign_gpus([4, 6], [1, 1]) == [(4,), (6,)]
    assert assign_gpus([], [0, 0]) == [(), ()]
    with pytest.raises(ValueError, match="3 GPUs needed, 2 available"):
        assign_gpus([0, 1], [2, 1])


def test_nvidia_smi_output_with_numa_from_sysfs(tmp_path: Path) -> None:
    dev = tmp_path / "bus" / "pci" / "devices"
    (dev / "0000:3b:00.0").mkdir(parents=True)
    (dev / "0000:3b:00.0" / "numa_node").write_text("1\n")
    (dev / "0000:af:00.0").mkdir(parents=True)
    (dev / "0000:af:00.0" / "numa_node").write_text("-1\n")
    node1 = tmp_path / "devices" / "system" / "node" / "node1"
    node1.mkdir(parents=True)
    (node1 / "cpulist").write_text("16-31,48-63\n")
    out = "1, 00000000:AF:00.0\n0, 00000000:3B:00.0\n2, 00000000:D8:00.0\n"
    gpus = parse_nvidia_smi(out, sys_root=tmp_path)
    assert gpus == (
        GpuInfo(0, "0000:3b:00.0", 1, "16-31,48-63"),
        GpuInfo(1, "0000:af:00.0", None, None),
        GpuInfo(2, "0000:d8:00.0", None, None),
    )
    assert sysfs_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert cpus_for(gpus[:1]) == "16-31,48-63"
    assert cpus_for(gpus[:2]) is None
    assert cpus_for(()) is None
    assert cpus_for([GpuInfo(0, cpus="0-3"), GpuInfo(1, cpus="0-3"), GpuInfo(2, cpus="4-7")]) == "0-3,4-7"


# --- supervisord.conf ------------------------------------------------------------------------

EXPECTED_CONF = """\
; Written by tdist-agent; edits are overwritten.
[unix_http_server]
file=/run/tdist/supervisor.sock
chmod=0700

[supervisord]
logfile=/run/tdist/supervisord.log
pidfile=/run/tdist/supervisord.pid
childlogdir=/logs
loglevel=info
nodaemon=true
silent=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix:///run/tdist/supervisor.sock

[program:embed-0]
command=taskset -c 0-7 /py/bin/python -m tdist.worker.main --config {file} --worker embed --worker-id gpu-7-embed-0 --log-file /logs/embed-0.log
directory=/srv
environment=CUDA_VISIBLE_DEVICES="0,1",PYTHONUNBUFFERED="1",TDIST_CONFIG_DIGEST="{embed}"
autostart=true
autorestart=true
startsecs=1
startretries=10
stopsignal=TERM
stopwaitsecs=148
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=/logs/embed-0.out

[program:embed-1]
command=/py/bin/python -m tdist.worker.main --config {file} --worker embed --worker-id gpu-7-embed-1 --log-file /logs/embed-1.log
directory=/srv
environment=CUDA_VISIBLE_DEVICES="2,3",PYTHONUNBUFFERED="1",TDIST_CONFIG_DIGEST="{embed}"
autostart=true
autorestart=true
startsecs=1
startretries=10
stopsignal=TERM
stopwaitsecs=148
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=/logs/embed-1.out

[program:tok-0]
command=/py/bin/python -m tdist.worker.main --config {file} --worker tok --worker-id gpu-7-tok-0 --log-file /logs/tok-0.log
directory=/srv
environment=CUDA_VISIBLE_DEVICES="",PYTHONUNBUFFERED="1",TDIST_CONFIG_DIGEST="{tok}"
autostart=true
autorestart=true
startsecs=1
startretries=10
stopsignal=TERM
stopwaitsecs=157
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=/logs/tok-0.out
"""


def test_render_byte_for_byte(tmp_path: Path) -> None:
    config = load_text(tmp_path, SMALL)
    gpus = [GpuInfo(0, cpus="0-7"), GpuInfo(1, cpus="0-7"), GpuInfo(2), GpuInfo(3, cpus="8-15")]
    programs = plan_programs(config, gpus, python="/py/bin/python", directory="/srv")
    assert [(p.name, p.gpus, p.cpus) for p in programs] == [
        ("embed-0", (0, 1), "0-7"), ("embed-1", (2, 3), None), ("tok-0", (), None)
    ]
    text = render(config.directories.state_dir, config.directories.log_dir, programs)
    digests = {w.name: config_digest(config, w) for w in config.workers}
    assert text == EXPECTED_CONF.format(file=tmp_path / "agent.toml", **digests)


def test_config_digest_changes_with_what_the_worker_reads(tmp_path: Path) -> None:
    def digests(text: str) -> dict[str, str]:
        config = load_text(tmp_path, text)
        return {w.name: config_digest(config, w) for w in config.workers}

    base = digests(SMALL)
    assert len(base["embed"]) == 16 and base["embed"] != base["tok"]
    assert digests(SMALL) == base
    edited = digests(SMALL.replace('implementation = "mypkg.ops:Tok"', 'implementation = "mypkg.ops:Tok2"'))
    assert edited["embed"] == base["embed"] and edited["tok"] != base["tok"]
    assert digests(SMALL.replace("count = 2", "count = 1")) == base  # count changes programs, not workers
    shared = digests(SMALL.replace("nats://10.0.0.1:4222", "nats://10.0.0.2:4222"))
    assert shared["embed"] != base["embed"] and shared["tok"] != base["tok"]


def test_config_digest_hides_the_secrets(tmp_path: Path) -> None:
    def digest(text: str) -> str:
        config = load_text(tmp_path, text)
        return config_digest(config, config.workers[0])

    with_password = SMALL.replace("[nats]\n", '[nats]\nuser = "u"\npassword = "s3cret-one"\n')
    other_password = with_password.replace("s3cret-one", "s3cret-two")
    # Hashed in a secret-free form: the digest cannot be used to test guesses of the password.
    assert digest(with_password) == digest(other_password) != digest(SMALL)
    config = load_text(tmp_path, with_password)
    assert "s3cret" not in repr(config) and "s3cret" not in repr(config.nats.redacted())


def test_stop_budget_covers_the_worst_bounded_close(tmp_path: Path) -> None:
    """drain + min(drain, 10) + 39 + 63 per operator (worker.py's bounded steps) + STOP_MARGIN."""
    from tdist.agent.supervisor_conf import STOP_MARGIN, worker_stop_budget

    config = load_text(tmp_path, SMALL)
    embed, tok = config.workers
    assert worker_stop_budget(embed) == math.ceil(20.5 + 10 + 39 + 63) + STOP_MARGIN
    assert worker_stop_budget(tok) == 30 + 10 + 39 + 63 + STOP_MARGIN
    two_ops = load_text(tmp_path, SMALL.replace('implementation = "mypkg.ops:Tok"\n',
                                                'implementation = "mypkg.ops:Tok"\n\n[[workers.operators]]\n'
                                                'name = "tok2"\nimplementation = "mypkg.ops:Tok"\n'))
    assert worker_stop_budget(two_ops.workers[1]) == worker_stop_budget(tok) + 63


def test_no_taskset_when_disabled(tmp_path: Path) -> None:
    config = load_text(tmp_path, SMALL)
    programs = plan_programs(config, [GpuInfo(i, cpus="0-7") for i in range(4)], python="py", taskset=None)
    assert all(p.command[0] == "py" for p in programs)


def test_worker_ids_fit_the_name_rules() -> None:
    assert worker_id("gpu-7.example.com", "embed", 3) == "gpu-7-embed-3"
    assert worker_id("a b!c", "w", 0) == "a-b-c-w-0"
    long = worker_id("n" * 80, "w" * 50, 12)
    assert len(long) == 64 and long.endswith("-" + "w" * 50 + "-12")


def _program(**kw: object) -> Program:
    base: dict[str, object] = dict(
        name="w-0", worker="w", instance=0, worker_id="n-w-0", command=("/bin/true",), environment=(),
        gpus=(), cpus=None, stdout_logfile="/l/w-0.out", stopwaitsecs=10,
    )
    base.update(kw)
    return Program(**base)  # type: ignore[arg-type]


def test_supervisord_reads_back_what_was_meant(tmp_path: Path) -> None:
    """Awkward values survive supervisord's INI parser, % expansion and environment lexer."""
    from supervisor.options import ServerOptions

    argv = ("/bin/echo", "a b", "50%", "x;y", "it's", 'q"q', "a#x", "a,b", "%(here)s")
    env = (("A", "1,2"), ("B", 'x"y'), ("C", "it's"), ("D", "%(ENV_HOME)s"), ("E", ""), ("F", "a;b c"))
    state = tmp_path / "st%d"
    state.mkdir()
    prog = _program(command=argv, environment=env, stdout_logfile=str(tmp_path / "o%(x)s.out"),
                    directory=str(tmp_path / "d%s"))
    conf = state / "s.conf"
    conf.write_text(render(str(state), str(tmp_path), [prog]))
    opts = ServerOptions()
    opts.configfile = str(conf)
    opts.process_config(do_usage=False)
    pc = opts.process_group_configs[0].process_configs[0]
    assert tuple(shlex.split(pc.command)) == argv
    assert pc.environment == dict(env)
    assert pc.stdout_logfile == str(tmp_path / "o%(x)s.out")
    assert pc.directory == str(tmp_path / "d%s")
    assert (pc.stopwaitsecs, pc.stopasgroup, pc.killasgroup, pc.startretries) == (10, True, True, 10)
    assert opts.logfile == str(state / "supervisord.log")
    assert opts.configroot.supervisord.server_configs[0]["file"] == str(state / "supervisor.sock")
    assert opts.configroot.supervisord.server_configs[0]["chmod"] == 0o700


@pytest.mark.parametrize(
    "program",
    [
        _program(command=("/bin/echo", "a ;b")),
        _program(command=("/bin/echo", "a\nb")),
        _program(environment=(("X", "a #b"),)),
        _program(environment=(("X", "both ' and \""),)),
        _program(environment=(("X", '"edge'),)),
        _program(environment=(("1X", "v"),)),
    ],
)
def test_values_supervisord_cannot_carry_are_refused(program: Program) -> None:
    with pytest.raises(ValueError):
        render("/s", "/l", [program])


def test_environment_quoting() -> None:
    assert conf_environment([("A", "x"), ("B", "")]) == 'A="x",B=""'
    assert conf_environment([("A", 'say "hi"!')]) == "A='say \"hi\"!'"
    assert conf_environment([]) == ""


def test_explicit_gpus_take_numa_details_from_detection() -> None:
    from tdist.agent.gpus import describe_gpus

    detected = (GpuInfo(0, "0000:3b:00.0", 0, "0-7"), GpuInfo(1, "0000:af:00.0", 1, "8-15"))
    assert describe_gpus([1, 5], detected) == (GpuInfo(1, "0000:af:00.0", 1, "8-15"), GpuInfo(5))
