"""tdist.config: loading worker TOML files, and the validation of each dataclass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tdist.config import (
    LoggingConfig,
    NatsConfig,
    OperatorConfig,
    RequestPlaneConfig,
    WorkerConfig,
    load_worker_file,
)
from tdist.errors import ConfigError

GOOD = """
[nats]
servers = ["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]
user = "svc"
password = "secret"
connect_timeout = 2

[request_plane]
namespace = "prod-eu"
ack_wait = 12.5
max_deliver = 5
storage = "memory"
max_age = 600

[logging]
level = "debug"
file = "/var/log/tdist/worker.jsonl"

[worker]
name = "tokenizers"
node = "gpu-07"
registry_ttl = 3
drain_timeout = 15.5

[[worker.operators]]
name = "tokenize"
implementation = "mypkg.ops:Tokenize"
version = 2
max_inflight = 8

[worker.operators.parameters]
vocab = "/models/vocab.json"
lower = true
sizes = [1, 2, 3]
limits = { soft = 0.5, hard = 1 }

[[worker.operators]]
name = "detok"
implementation = "ops/detok.py:Detok"
"""

OP = '\n[[{table}.operators]]\nname = "echo"\nimplementation = "m:Echo"\n'

AGENT = """
[nats]
servers = "nats://hub:4222"

[node]
name = "node-3"
gpus = 8

[agent]
listen = "0.0.0.0:9000"

[[workers]]
name = "alpha"
count = 2
gpus_per_instance = 1
[[workers.operators]]
name = "a"
implementation = "m:A"

[[workers]]
name = "beta"
[[workers.operators]]
name = "b"
implementation = "m:B"
max_inflight = 4
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "worker.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def minimal(extra_before: str = "", worker_extra: str = "", op_extra: str = "") -> str:
    """A valid file with one worker and one operator; ``*_extra`` lines go into the named table."""
    return f'{extra_before}\n[worker]\nname = "w"\n{worker_extra}\n{OP.format(table="worker")}{op_extra}\n'


def config_error(path: Path, worker_name: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_worker_file(path, worker_name)
    return info.value


# --- good files -----------------------------------------------------------------


def test_good_file(write: Callable[[str], Path]) -> None:
    wf = load_worker_file(write(GOOD))

    assert wf.nats == NatsConfig(
        servers=("nats://10.0.0.1:4222", "tls://10.0.0.2:4222"), user="svc", password="secret", connect_timeout=2.0
    )
    assert isinstance(wf.nats.connect_timeout, float)

    rp = wf.request_plane
    assert (rp.namespace, rp.ack_wait, rp.max_deliver, rp.storage, rp.max_age) == ("prod-eu", 12.5, 5, "memory", 600.0)
    assert rp.max_msgs == RequestPlaneConfig().max_msgs  # untouched keys keep their defaults

    assert wf.logging == LoggingConfig(level="debug", file="/var/log/tdist/worker.jsonl")

    w = wf.worker
    assert (w.name, w.node, w.registry_ttl, w.drain_timeout) == ("tokenizers", "gpu-07", 3.0, 15.5)
    assert w.operators == (
        OperatorConfig(
            name="tokenize",
            implementation="mypkg.ops:Tokenize",
            version=2,
            max_inflight=8,
            parameters={"vocab": "/models/vocab.json", "lower": True, "sizes": [1, 2, 3], "limits": {"soft": 0.5, "hard": 1}},
        ),
        OperatorConfig(name="detok", implementation="ops/detok.py:Detok"),
    )


def test_minimal_file_uses_defaults(write: Callable[[str], Path]) -> None:
    wf = load_worker_file(write(minimal()))
    assert wf.nats == NatsConfig()
    assert wf.request_plane == RequestPlaneConfig()
    assert wf.logging == LoggingConfig()
    assert wf.worker.operators == (OperatorConfig(name="echo", implementation="m:Echo"),)


def test_single_server_string_is_a_list(write: Callable[[str], Path]) -> None:
    wf = load_worker_file(write(minimal('[nats]\nservers = "nats://one:4222"')))
    assert wf.nats.servers == ("nats://one:4222",)


def test_node_name_comes_from_node_table(write: Callable[[str], Path]) -> None:
    wf = load_worker_file(write(minimal('[node]\nname = "n1"\nother = "owned by the agent"')))
    assert wf.worker.node == "n1"


# --- agent-style [[workers]] ------------------------------------------------------


@pytest.mark.parametrize(("name", "index"), [("alpha", 0), ("beta", 1)])
def test_agent_file_picks_worker_by_name(write: Callable[[str], Path], name: str, index: int) -> None:
    wf = load_worker_file(write(AGENT), name)
    assert wf.worker.name == name
    assert wf.worker.node == "node-3"
    assert wf.nats.servers == ("nats://hub:4222",)
    expected = [
        (OperatorConfig(name="a", implementation="m:A"),),
        (OperatorConfig(name="b", implementation="m:B", max_inflight=4),),
    ]
    assert wf.worker.operators == expected[index]


def test_agent_file_with_one_worker_needs_no_name(write: Callable[[str], Path]) -> None:
    text = '[[workers]]\nname = "solo"\ncount = 3\n' + OP.format(table="workers")
    assert load_worker_file(write(text)).worker.name == "solo"


def test_agent_file_with_several_workers_needs_a_name(write: Callable[[str], Path]) -> None:
    path = write(AGENT)
    err = config_error(path)
    assert err.key == "workers"
    assert str(path) in str(err)
    assert "--worker" in err.message
    assert "'alpha'" in err.message and "'beta'" in err.message


def test_agent_file_with_unknown_worker_name(write: Callable[[str], Path]) -> None:
    path = write(AGENT)
    err = config_error(path, "gamma")
    assert err.key == "workers"
    assert str(err).startswith(f"{path}:workers: no worker named 'gamma'")


def test_agent_worker_errors_name_the_entry(write: Callable[[str], Path]) -> None:
    path = write(AGENT.replace("max_inflight = 4", "max_inflight = 0"))
    err = config_error(path, "beta")
    assert err.key == "workers[1].operators[0].max_inflight"
    assert f"{path}:workers[1].operators[0].max_inflight" in str(err)


def test_agent_worker_entry_that_is_not_a_table(write: Callable[[str], Path]) -> None:
    err = config_error(write("workers = [1]\n"))
    assert err.key == "workers[0]"
    assert "must be a table" in err.message


# --- errors name the file and the dotted key ---------------------------------------


ERROR_CASES = [
    (minimal("bogus = 1"), "bogus", "unknown key 'bogus'"),
    (minimal('[request_plane]\nnamespace = "x"\nmax_inflight = 3'), "request_plane.max_inflight", "unknown key"),
    (minimal("[nats]\nserver = 'nats://x:1'"), "nats.server", "unknown key"),
    (minimal(worker_extra="colour = 'red'"), "worker.colour", "unknown key"),
    (minimal(op_extra="threads = 2"), "worker.operators[0].threads", "unknown key"),
    (minimal('[request_plane]\nack_wait = "30"'), "request_plane.ack_wait", "must be an integer or a number, not str"),
    (minimal('[nats]\nconnect_timeout = "5s"'), "nats.connect_timeout", "not str"),
    (minimal("[request_plane]\nmax_deliver = true"), "request_plane.max_deliver", "not a boolean"),
    (minimal(op_extra="max_inflight = true"), "worker.operators[0].max_inflight", "not a boolean"),
    (minimal(op_extra="version = 1.5"), "worker.operators[0].version", "must be an integer, not float"),
    (minimal("[nats]\nservers = [1, 2]"), "nats.servers", "list of URLs"),
    (minimal("nats = 5"), "nats", "must be a table"),
    (minimal('[request_plane]\nnamespace = "a.b"'), "request_plane.namespace", "'a.b' must be 1-64 characters"),
    (minimal('[request_plane]\nstorage = "disk"'), "request_plane.storage", "'file' or 'memory'"),
    (minimal("[request_plane]\nack_wait = 0.1"), "request_plane.ack_wait", "at least 0.5"),
    (minimal('[logging]\nlevel = "loud"'), "logging.level", "unknown level 'loud'"),
    (minimal('[nats]\nservers = ["localhost:4222"]'), "nats.servers", "needs a scheme"),
    (minimal('[nats]\nuser = "u"'), "nats.user", "user and password go together"),
    (minimal(op_extra="max_inflight = 0"), "worker.operators[0].max_inflight", "max_inflight must be at least 1"),
    (minimal(op_extra="version = 0"), "worker.operators[0].version", "version must be at least 1"),
    (minimal(worker_extra="registry_ttl = 0.5"), "worker.registry_ttl", "at least 1 second"),
    (minimal(worker_extra="drain_timeout = -1"), "worker.drain_timeout", "must not be negative"),
    (minimal("[data_plane]\ncopy_threads = 0"), "data_plane.copy_threads", "must be from 1 to 64"),
    ('[worker]\nname = "w"\noperators = 3\n', "worker.operators", "must be a list"),
    ('[worker]\nname = "w"\n', "worker.operators", "at least one operator"),
    ("[nats]\n", "worker", "needs a [worker] table or a [[workers]] array"),
]


@pytest.mark.parametrize(("text", "key", "reason"), ERROR_CASES, ids=[f"{k}:{r}" for _, k, r in ERROR_CASES])
def test_config_errors(write: Callable[[str], Path], text: str, key: str, reason: str) -> None:
    path = write(text)
    err = config_error(path)
    assert err.key == key
    assert err.file == str(path)
    assert str(err).startswith(f"{path}:{key}: ")
    assert reason in err.message


def test_operator_without_class_separator(write: Callable[[str], Path]) -> None:
    path = write('[worker]\nname = "w"\n[[worker.operators]]\nname = "echo"\nimplementation = "mypkg.ops.Echo"\n')
    err = config_error(path)
    assert err.key == "worker.operators[0].implementation"
    assert str(err).startswith(f"{path}:worker.operators[0].implementation: implementation 'mypkg.ops.Echo' must be")


def test_duplicate_operator_name_and_version(write: Callable[[str], Path]) -> None:
    path = write(minimal() + OP.format(table="worker"))
    err = config_error(path)
    assert err.key == "worker.operators"
    assert f"{path}:worker.operators: operator echo v1 is listed twice" in str(err)


def test_same_operator_name_with_another_version_is_fine(write: Callable[[str], Path]) -> None:
    wf = load_worker_file(write(minimal() + OP.format(table="worker") + "version = 2\n"))
    assert [(op.name, op.version) for op in wf.worker.operators] == [("echo", 1), ("echo", 2)]


def test_invalid_operator_name_names_its_key(write: Callable[[str], Path]) -> None:
    path = write(minimal().replace('name = "echo"', 'name = "my.op"'))
    err = config_error(path)
    assert err.key == "worker.operators[0].name"
    assert "operator name 'my.op'" in err.message


def test_invalid_worker_name_names_its_key(write: Callable[[str], Path]) -> None:
    path = write(minimal().replace('name = "w"', 'name = "w x"'))
    err = config_error(path)
    assert err.key == "worker.name"
    assert str(err).startswith(f"{path}:worker.name: worker name 'w x' must be")


def test_invalid_toml(write: Callable[[str], Path]) -> None:
    path = write("[worker\nname = ")
    err = config_error(path)
    assert err.file == str(path)
    assert str(err).startswith(f"{path}: not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = config_error(path)
    assert str(err).startswith(f"{path}: file not found")


# --- the dataclasses on their own ----------------------------------------------------


def test_nats_user_without_password() -> None:
    with pytest.raises(ConfigError) as info:
        NatsConfig(user="u")
    assert info.value.key == "nats.user"


def test_nats_password_without_user() -> None:
    with pytest.raises(ConfigError, match="user and password go together"):
        NatsConfig(password="p")


@pytest.mark.parametrize("url", ["127.0.0.1:4222", "localhost", ""])
def test_nats_server_url_needs_scheme(url: str) -> None:
    with pytest.raises(ConfigError, match="needs a scheme") as info:
        NatsConfig(servers=(url,))
    assert info.value.key == "nats.servers"


def test_nats_needs_a_server_and_tls_pairs() -> None:
    with pytest.raises(ConfigError, match="at least one server"):
        NatsConfig(servers=())
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file"):
        NatsConfig(tls_cert_file="c.pem")
    assert NatsConfig(servers=("tls://h:4222",), tls_cert_file="c.pem", tls_key_file="k.pem").tls_key_file == "k.pem"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"namespace": "a.b"}, "request_plane.namespace"),
        ({"namespace": ""}, "request_plane.namespace"),
        ({"max_deliver": 0}, "request_plane.max_deliver"),
        ({"replicas": 0}, "request_plane.replicas"),
        ({"max_bytes": 0}, "request_plane.max_bytes"),
        ({"max_age": 0}, "request_plane.max_age"),
        ({"default_timeout": -1}, "request_plane.default_timeout"),
        ({"max_batch": 0}, "request_plane.max_batch"),
        ({"max_batch": 100_000}, "request_plane.max_batch"),
    ],
)
def test_request_plane_validation(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RequestPlaneConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def test_worker_config_validation() -> None:
    op = OperatorConfig(name="echo", implementation="m:C")
    with pytest.raises(ConfigError, match="at least one operator"):
        WorkerConfig(name="w", operators=())
    with pytest.raises(ConfigError, match="listed twice"):
        WorkerConfig(name="w", operators=(op, op))
    with pytest.raises(ConfigError) as info:
        OperatorConfig(name="echo", implementation="m:C", max_inflight=0)
    assert info.value.key == "max_inflight"
