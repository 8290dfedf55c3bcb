"""The agent's TOML file (``/etc/tdist/agent.toml``), parsed once into frozen dataclasses.

The same file is a valid worker file (``tdist-worker --config FILE --worker NAME``): the shared
sections are read by ``tdist.config``'s parsers, and this module adds what only the agent reads::

    gpus = [0, 1]            # top-level, or under [node]; "auto" (default), [] or "none" = CPU only

    [node]
    name = "gpu-node-1"      # default: the host name

    [directories]
    state_dir = "/var/lib/tdist"    # supervisord.conf, its socket, pid and log
    log_dir = "/var/log/tdist"      # one log per worker instance

    [http]
    host = "127.0.0.1"
    port = 9090

    [canary]                 # a small directed request to each worker, through its request path
    period = 5.0             # seconds between two canaries to one worker (0: off)
    timeout = 2.0            # seconds one canary may take
    failures = 3             # failures in a row before the worker is unhealthy and restarted

    [[workers]]
    name = "encoder"
    count = 2                 # instances on this node (0: none)
    gpus_per_instance = 1     # each instance's CUDA_VISIBLE_DEVICES (0: a CPU worker)
    ...                       # the rest is a worker table: operators, drain_timeout, ...
    [workers.canary]          # optional: call one of its operators instead of the built-in _ping
    operator = "encoder"
    version = 1
    inputs = { input = [1, 2, 3] }
    parameters = { input_copies = 1 }

Every error is a ``ConfigError`` naming the file, the dotted key and the reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tdist.config import (
    PING_OPERATOR,
    DataPlaneConfig,
    LoggingConfig,
    NatsConfig,
    RequestPlaneConfig,
    WorkerConfig,
    _Table,
    parse_data_plane,
    parse_logging,
    parse_nats,
    parse_request_plane,
    parse_worker,
    read_toml,
)
from tdist.errors import ConfigError

DEFAULT_CONFIG = "/etc/tdist/agent.toml"
SOCKET_NAME = "supervisor.sock"
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL
AGENT_WORKER_KEYS = ("count", "gpus_per_instance", "canary")
"""Keys of a ``[[workers]]`` entry only the agent reads (a worker skips them)."""

GpuSetting = tuple[int, ...] | Literal["auto"]


@dataclass(frozen=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    gpus: GpuSetting = "auto"
    """Explicit GPU indices, ``"auto"`` (detect through nvidia-smi), or ``()`` for CPU workers only."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("must not be empty", key="node.name")
        if self.gpus != "auto":
            if not isinstance(self.gpus, tuple) or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in self.gpus
            ):
                raise ConfigError('must be a list of GPU indices, "auto" or "none"', key="node.gpus")
            if any(g < 0 for g in self.gpus):
                raise ConfigError("GPU indices must not be negative", key="node.gpus")
            if len(set(self.gpus)) != len(self.gpus):
                raise ConfigError("a GPU index is listed twice", key="node.gpus")


@dataclass(frozen=True)
class DirectoriesConfig:
    state_dir: str = "/var/lib/tdist"
    log_dir: str = "/var/log/tdist"

    def __post_init__(self) -> None:
        for key in ("state_dir", "log_dir"):
            if not getattr(self, key):
                raise ConfigError("must not be empty", key=f"directories.{key}")
        sock = os.path.join(os.path.abspath(self.state_dir), SOCKET_NAME)
        if len(sock.encode()) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"too long for a unix socket path ({sock!r} is over {_MAX_SOCKET_PATH} bytes)",
                key="directories.state_dir",
            )

    @property
    def socket_path(self) -> str:
        return os.path.join(os.path.abspath(self.state_dir), SOCKET_NAME)


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    """0: any free port (tests)."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("must not be empty", key="http.host")
        if not 0 <= self.port <= 65535:
            raise ConfigError("must be between 0 and 65535", key="http.port")


@dataclass(frozen=True)
class CanaryConfig:
    """The agent's canary: every ``period`` seconds each worker gets one directed request.

    Cost, measured with the built-in ``_ping`` (test_agent_faults.py prints the sizes): per
    worker, 1/period requests per second, each a JetStream publish of a 189 B request (stored
    until acknowledged), a 100 B core-NATS response, the publish acknowledgement, the pull and
    the consumer acknowledgement: about 0.5 kB of NATS traffic. At the default 5 s: 0.2
    requests/s and about 100 B/s per worker; 10,000 workers: 2,000 requests/s cluster-wide.
    """

    period: float = 5.0
    """Seconds between two canaries to one worker; 0 turns the canary off."""
    timeout: float = 2.0
    failures: int = 3
    """Failures in a row before the worker is marked unhealthy and restarted."""

    def __post_init__(self) -> None:
        if self.period < 0:
            raise ConfigError("must not be negative", key="canary.period")
        if self.timeout <= 0:
            raise ConfigError("must be positive", key="canary.timeout")
        if self.failures < 1:
            raise ConfigError("must be at least 1", key="canary.failures")


@dataclass(frozen=True)
class CanaryCall:
    """What the canary sends to a worker: by default the built-in ``_ping`` v1."""

    operator: str = PING_OPERATOR
    version: int = 1
    inputs: Mapping[str, Any] = field(default_factory=dict)
    """Input name -> a TOML value (a number or a list of numbers), sent as a numpy array."""
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentWorkerConfig:
    """One ``[[workers]]`` entry: ``count`` instances of one worker on this node."""

    worker: WorkerConfig
    count: int = 1
    gpus_per_instance: int = 0
    canary: CanaryCall = field(default_factory=CanaryCall)

    @property
    def name(self) -> str:
        return self.worker.name

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError("must not be negative", key="count")
        if self.gpus_per_instance < 0:
            raise ConfigError("must not be negative", key="gpus_per_instance")


@dataclass(frozen=True)
class AgentConfig:
    file: str
    """The absolute path the configuration was read from (workers are started with it)."""
    node: NodeConfig
    nats: NatsConfig
    request_plane: RequestPlaneConfig
    data_plane: DataPlaneConfig
    logging: LoggingConfig
    directories: DirectoriesConfig
    http: HttpConfig
    workers: tuple[AgentWorkerConfig, ...]
    canary: CanaryConfig = field(default_factory=CanaryConfig)

    def gpus_needed(self) -> int:
        return sum(w.count * w.gpus_per_instance for w in self.workers)

    def check_gpus(self, available: Sequence[int]) -> None:
        """Raise a ConfigError naming the first worker whose instances the GPUs cannot cover."""
        check_gpu_budget(self.file, self.workers, available, detected=self.node.gpus == "auto")


def check_gpu_budget(
    file: str, workers: Sequence[AgentWorkerConfig], available: Sequence[int], *, detected: bool = False
) -> None:
    used = 0
    for i, w in enumerate(workers):
        used += w.count * w.gpus_per_instance
        if used > len(available):
            where = "the host has" if detected else "node.gpus lists"
            raise ConfigError(
                f"the workers up to {w.name!r} need {used} GPUs ({w.count} x {w.gpus_per_instance} for this one) "
                f"but {where} {len(available)}",
                file=file,
                key=f"workers[{i}].gpus_per_instance",
            )


def _parse_gpus(value: Any, file: str, key: str) -> GpuSetting:
    if isinstance(value, str):
        if value == "auto":
            return "auto"
        if value == "none":
            return ()
        raise ConfigError(f'must be a list of GPU indices, "auto" or "none", not {value!r}', file=file, key=key)
    if isinstance(value, list):
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in value):
            raise ConfigError("must be a list of integer GPU indices", file=file, key=key)
        return tuple(value)
    raise ConfigError(
        f'must be a list of GPU indices, "auto" or "none", not {type(value).__name__}', file=file, key=key
    )


def _wrap(file: str, path: str, build: Any) -> Any:
    """Run a dataclass constructor, re-raising its ConfigError with the file and full key."""
    try:
        return build()
    except ConfigError as exc:
        key = exc.key or path
        if path and not key.startswith(path.split(".")[0]):
            key = f"{path}.{key}"
        raise ConfigError(exc.reason, file=file, key=key) from None


def parse_agent_worker(entry: Any, file: str, index: int, node: str) -> AgentWorkerConfig:
    path = f"workers[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError("must be a table", file=file, key=path)
    data = dict(entry)
    agent_part = _Table({k: data.pop(k) for k in AGENT_WORKER_KEYS if k in data}, file, path)
    count = agent_part.get("count", int, 1)
    gpus_per_instance = agent_part.get("gpus_per_instance", int, 0)
    canary_t = agent_part.table("canary")
    agent_part.done()
    worker = parse_worker(_Table(data, file, path), node)
    canary = parse_canary_call(canary_t, worker)
    return _wrap(file, path, lambda: AgentWorkerConfig(worker=worker, count=count, gpus_per_instance=gpus_per_instance,
                                                       canary=canary))


def parse_canary_call(t: _Table, worker: WorkerConfig) -> CanaryCall:
    """``[workers.canary]``: one of the worker's own operators, with inputs TOML can write."""
    if not t.data:
        return CanaryCall()
    operator = t.get("operator", str)
    if operator is None:
        raise ConfigError("names the operator to call", file=t.file, key=t.key("operator"))
    version = t.get("version", int, 1)
    if not worker.operators or not any(o.name == operator and o.version == version for o in worker.operators):
        raise ConfigError(f"{operator} v{version} is not one of this worker's operators", file=t.file,
                          key=t.key("operator"))
    inputs = t.get("inputs", dict, {})
    for name, value in inputs.items():
        if not _numeric(value):
            raise ConfigError("must be a number or a list of numbers", file=t.file, key=t.key(f"inputs.{name}"))
    parameters = t.get("parameters", dict, {})
    t.done()
    return CanaryCall(operator=operator, version=version, inputs=inputs, parameters=parameters)


def _numeric(value: Any) -> bool:
    if isinstance(value, list):
        return all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_canary(t: _Table) -> CanaryConfig:
    values = {k: v for k, types in (("period", (int, float)), ("timeout", (int, float)), ("failures", int))
              if (v := t.get(k, types)) is not None}
    t.done()
    return _wrap(t.file, "canary", lambda: CanaryConfig(**{k: (float(v) if k != "failures" else v)
                                                             for k, v in values.items()}))


def parse_agent_config(data: dict[str, Any], file: str) -> AgentConfig:
    root = _Table(data, file, "")
    nats = parse_nats(root.table("nats"))
    request_plane = parse_request_plane(root.table("request_plane"))
    data_plane = parse_data_plane(root.table("data_plane"))
    logging = parse_logging(root.table("logging"))

    node_t = root.table("node")
    node_name = node_t.get("name", str)
    gpus: GpuSetting = "auto"
    for t, name in ((root, "gpus"), (node_t, "gpus")):
        if name in t.data:
            if t is node_t and "gpus" in data:
                raise ConfigError("give gpus either at the top level or under [node], not both", file=file,
                                  key="node.gpus")
            gpus = _parse_gpus(t.data.pop(name), file, t.key(name))
    node_t.done()
    node = _wrap(file, "node", lambda: NodeConfig(**({"name": node_name} if node_name is not None else {}), gpus=gpus))

    dirs_t = root.table("directories")
    dirs_values = {k: v for k in ("state_dir", "log_dir") if (v := dirs_t.get(k, str)) is not None}
    dirs_t.done()
    directories = _wrap(file, "directories", lambda: DirectoriesConfig(**dirs_values))

    http_t = root.table("http")
    http_values = {k: v for k, types in (("host", str), ("port", int)) if (v := http_t.get(k, types)) is not None}
    http_t.done()
    http = _wrap(file, "http", lambda: HttpConfig(**http_values))

    canary = parse_canary(root.table("canary"))

    entries = root.get("workers", list, [])
    workers = tuple(parse_agent_worker(e, file, i, node.name) for i, e in enumerate(entries))
    seen: dict[str, int] = {}
    for i, w in enumerate(workers):
        if w.name in seen:
            raise ConfigError(f"worker name {w.name!r} is also used by workers[{seen[w.name]}]", file=file,
                              key=f"workers[{i}].name")
        seen[w.name] = i
    root.done()

    config = AgentConfig(
        file=file,
        node=node,
        nats=nats,
        request_plane=request_plane,
        data_plane=data_plane,
        logging=logging,
        directories=directories,
        http=http,
        workers=workers,
        canary=canary,
    )
    if node.gpus != "auto":
        config.check_gpus(node.gpus)
    return config


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and validate the agent's file; raises ConfigError naming the file, key and reason."""
    file = os.path.abspath(path)
    return parse_agent_config(read_toml(file), file)
