"""Configuration: parsed once from TOML into frozen dataclasses, validated at load.

Every error is a ``ConfigError`` naming the file, the dotted key and the reason.
A worker file holds ``[nats]``, ``[request_plane]``, ``[logging]`` and either one
``[worker]`` table or an agent-style ``[[workers]]`` array (pick one by name).
"""

from __future__ import annotations

import os
import socket
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from urllib.parse import unquote

from tdist.errors import ConfigError
from tdist.logs import get_logger
from tdist.names import check_name
from tdist.request_plane.protocol import MAX_BATCH


RESERVED_PREFIX = "_"
"""Operator names beginning with this are tdist's own: a worker configuration cannot host them."""
PING_OPERATOR = "_ping"
"""The built-in canary operator every worker answers on its directed subject (version 1)."""


@dataclass(frozen=True)
class NatsConfig:
    """How to reach NATS, and with what credentials.

    Secrets (``password``, ``token``) are kept out of ``repr`` (so out of logs and digests).
    Credentials written into a server URL (``nats://user:pass@host``, ``nats://token@host``)
    are moved into ``user``/``password`` or ``token`` here, so URLs never carry a secret
    anywhere else (argv, logs, error details).
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    password_file: str | None = None
    """Where ``password`` was read from (TOML ``password_file``), kept for messages only."""
    token_file: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout: float = 5.0
    ping_interval: float = 5.0
    """Seconds between keep-alive pings: a half-open connection is noticed after
    ``ping_interval * max_outstanding_pings`` seconds (nats-py's default is 2 minutes each)."""
    max_outstanding_pings: int = 3
    embedded: bool = False
    """This node runs its own nats-server (single-machine deployments), listening on the
    host and port of ``servers[0]`` (port 0: a free one); the agent (or the hello-world
    launcher) starts it with these credentials and TLS files, and refuses anyone else."""
    monitor_port: int | None = None
    """Embedded server only: its monitoring port (on 127.0.0.1; 0: a free one). Default: off."""

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("at least one server URL is needed", key="nats.servers")
        servers, creds = _split_credentials(self.servers)
        object.__setattr__(self, "servers", servers)
        if creds is not None:
            user, password, token = creds
            if (user is not None and self.user is not None) or (token is not None and self.token is not None):
                raise ConfigError("credentials are given both in a server URL and as keys", key="nats.servers")
            if user is not None:
                object.__setattr__(self, "user", user)
                object.__setattr__(self, "password", password)
            if token is not None:
                object.__setattr__(self, "token", token)
        if (self.user is None) != (self.password is None):
            raise ConfigError("user and password go together", key="nats.user")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file go together", key="nats.tls_cert_file")
        if not self.ping_interval > 0:
            raise ConfigError("must be positive", key="nats.ping_interval")
        if self.max_outstanding_pings < 1:
            raise ConfigError("must be at least 1", key="nats.max_outstanding_pings")
        if self.monitor_port is not None:
            if not self.embedded:
                raise ConfigError("applies only to the embedded server (embedded = true)", key="nats.monitor_port")
            if not 0 <= self.monitor_port <= 65535:
                raise ConfigError("must be between 0 and 65535", key="nats.monitor_port")
        if self.embedded:
            if self.creds_file is not None:
                raise ConfigError("a creds file needs a NATS server in operator (JWT) mode; the embedded server "
                                  "takes user and password, or a token", key="nats.creds_file")
            if self.user is not None and self.token is not None:
                raise ConfigError("the embedded server takes user and password or a token, not both",
                                  key="nats.token")

    def redacted(self) -> NatsConfig:
        """The same settings without the secrets (for digests and messages)."""
        return replace(self, password="<set>" if self.password else None, token="<set>" if self.token else None)


def _split_credentials(servers: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str | None, str | None, str | None] | None]:
    """URLs without userinfo, and the (user, password, token) that one or more of them carried."""
    clean: list[str] = []
    found: set[tuple[str | None, str | None, str | None]] = set()
    for url in servers:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"server URL {url!r} needs a scheme (nats://, tls://)", key="nats.servers")
        scheme, rest = url.split("://", 1)
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            userinfo, netloc = netloc.rsplit("@", 1)
            name, colon, secret = userinfo.partition(":")
            name, secret = unquote(name), unquote(secret)
            found.add((name, secret, None) if colon else (None, None, name))
        clean.append(f"{scheme}://{netloc}{slash}{path}")
    if len(found) > 1:
        raise ConfigError("server URLs carry different credentials", key="nats.servers")
    return tuple(clean), (found.pop() if found else None)


def read_secret_file(path: str, *, file: str | None, key: str) -> str:
    """A password or token from its own file: read once, at load.

    A file others can read is refused; a group-readable one (``root:tdist 0640``, the usual
    way to hand a root-owned secret to the service user) is accepted with a warning.
    """
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as fh:
            value = fh.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {path!r}: {exc.strerror or exc}", file=file, key=key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path!r} is not UTF-8 text", file=file, key=key) from None
    if st.st_mode & 0o007:
        raise ConfigError(f"{path!r} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                          f"chmod o-rwx it", file=file, key=key)
    if st.st_mode & 0o070:
        get_logger("tdist.config").warning("secret_file_group_readable", path=path, key=key,
                                           mode=f"{stat.S_IMODE(st.st_mode):04o}")
    if not value:
        raise ConfigError(f"{path!r} is empty", file=file, key=key)
    return value


@dataclass(frozen=True)
class RequestPlaneConfig:
    namespace: str = "default"
    ack_wait: float = 30.0
    """Seconds a delivered request may go without an ack or progress before redelivery."""
    max_deliver: int = 3
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    max_age: float = 3600.0
    max_msgs: int = 1_000_000
    max_bytes: int = 256 << 20
    default_timeout: float = 60.0
    max_batch: int = 64
    """Requests a caller submits to one operator in one pass of its event loop go out as one stream
    message (a batch) of at most this many (1: one message per request). A request submitted while
    its caller has nothing else in flight goes out at once: one at a time pays no wait."""

    def __post_init__(self) -> None:
        check_name("request_plane.namespace", self.namespace)
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ConfigError(f"must be 1 to {MAX_BATCH}", key="request_plane.max_batch")
        if self.ack_wait < 0.5:
            raise ConfigError("must be at least 0.5 seconds", key="request_plane.ack_wait")
        if self.max_deliver < 1:
            raise ConfigError("must be at least 1", key="request_plane.max_deliver")
        if self.storage not in ("file", "memory"):
            raise ConfigError("must be 'file' or 'memory'", key="request_plane.storage")
        for key in ("replicas", "max_msgs", "max_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError("must be at least 1", key=f"request_plane.{key}")
        for key in ("max_age", "default_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", key=f"request_plane.{key}")


@dataclass(frozen=True)
class DataPlaneConfig:
    inline_threshold: int = 64 << 10
    """Tensors smaller than this many bytes travel inside the message, the others by reference
    (0: every tensor by reference)."""
    store_bytes: int = 2 << 30
    """The most bytes of tensors this process keeps for consumers to pull."""
    lease: float = 300.0
    """Seconds a reference lives if its consumer never releases it (a consumer that died)."""
    pull_timeout: float = 30.0
    """Seconds a pull, reference or release may take before the owner counts as unreachable."""
    endpoint_error_handling: bool = True
    """UCX peer-failure handling. On (the default): a peer that dies is detected within
    milliseconds and every process keeps serving; UCX then uses TCP even on one host (same-host
    CPU tensors go through ``shared_memory`` instead). Off: UCX's own shared memory on one host,
    but a peer killed in the middle of a transfer can abort or stall the other process
    (measured; see README). One setting for every process of a deployment."""
    shared_memory: bool = True
    """Same-host tensors through shared memory (data_plane/shm.py): CPU tensors stored by
    reference are written to a segment in /dev/shm that consumers on the same host read
    directly (GPU tensors: CUDA IPC handles); other consumers pull over UCX. Off: UCX only."""
    shm_cache_bytes: int = 256 << 20
    """Bytes of other processes' segments a consumer keeps mapped to read again without
    mapping anew (a segment is mapped from its second read on; 0: never)."""
    copy_threads: int = 2
    """Threads a pull copies a tensor of 16 MiB or more into its buffer with (the caller's
    included; at most the CPUs the process may use; 1: the caller alone). Measured here (2 vCPUs):
    a 64 MiB copy at 15 to 16 GB/s with two threads against 10 to 13 with one
    (data_plane/parallel_copy.py)."""
    endpoint_cache_size: int = 256
    """The most UCX endpoints a process keeps open to peers (least recently used ones beyond it
    are closed once no transfer uses them)."""
    endpoint_idle_timeout: float = 300.0
    """Seconds an endpoint may go unused before it is closed (reopened on the next pull)."""

    def __post_init__(self) -> None:
        if self.endpoint_cache_size < 1:
            raise ConfigError("must be at least 1", key="data_plane.endpoint_cache_size")
        if self.endpoint_idle_timeout <= 0:
            raise ConfigError("must be positive", key="data_plane.endpoint_idle_timeout")
        if self.inline_threshold < 0:
            raise ConfigError("must not be negative", key="data_plane.inline_threshold")
        if self.store_bytes < 1:
            raise ConfigError("must be at least 1", key="data_plane.store_bytes")
        if self.shm_cache_bytes < 0:
            raise ConfigError("must not be negative", key="data_plane.shm_cache_bytes")
        if not 1 <= self.copy_threads <= 64:
            raise ConfigError("must be from 1 to 64", key="data_plane.copy_threads")
        for key in ("lease", "pull_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", key=f"data_plane.{key}")


@dataclass(frozen=True)
class OperatorConfig:
    name: str
    implementation: str
    """``module:Class`` or ``path/to/file.py:Class``."""
    version: int = 1
    max_inflight: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("operator name", self.name, key="name")
        if not isinstance(self.implementation, str) or ":" not in self.implementation:
            raise ConfigError(
                f"implementation {self.implementation!r} must be 'module:Class' or 'path/file.py:Class'",
                key="implementation",
            )
        if self.version < 1:
            raise ConfigError("version must be at least 1", key="version")
        if self.max_inflight < 1:
            raise ConfigError("max_inflight must be at least 1", key="max_inflight")


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    operators: tuple[OperatorConfig, ...]
    node: str = field(default_factory=socket.gethostname)
    registry_ttl: float = 5.0
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        check_name("worker name", self.name, key="name")
        if not self.operators:
            raise ConfigError("a worker needs at least one operator", key="operators")
        seen: set[tuple[str, int]] = set()
        for op in self.operators:
            if op.name.startswith(RESERVED_PREFIX):
                raise ConfigError(f"operator names beginning with {RESERVED_PREFIX!r} are reserved for tdist "
                                  f"(the agent's canary calls {PING_OPERATOR!r}): {op.name!r}", key="operators")
            if (op.name, op.version) in seen:
                raise ConfigError(f"operator {op.name} v{op.version} is listed twice", key="operators")
            seen.add((op.name, op.version))
        if self.registry_ttl < 1.0:
            raise ConfigError("must be at least 1 second", key="registry_ttl")
        if self.drain_timeout < 0:
            raise ConfigError("must not be negative", key="drain_timeout")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    file: str | None = None
    """Write JSON lines here instead of standard error."""
    rotate_bytes: int = 64 << 20
    """The file is rotated at this size (0: never)."""
    backups: int = 5
    """Rotated files kept."""
    request_log: bool = True
    """One summary line per request at info (id, trace, operator, worker, attempt, times, outcome, bytes)."""

    def __post_init__(self) -> None:
        if self.level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(f"unknown level {self.level!r}", key="logging.level")
        for key in ("rotate_bytes", "backups"):
            if getattr(self, key) < 0:
                raise ConfigError("must not be negative", key=f"logging.{key}")


@dataclass(frozen=True)
class WorkerFile:
    """Everything ``tdist-worker`` reads from one TOML file."""

    nats: NatsConfig
    request_plane: RequestPlaneConfig
    logging: LoggingConfig
    worker: WorkerConfig
    data_plane: DataPlaneConfig = field(default_factory=DataPlaneConfig)


class _Table:
    """Reads typed keys from one TOML table and rejects the ones nobody read."""

    def __init__(self, data: Any, file: str, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError("must be a table", file=file, key=path)
        self.data = dict(data)
        self.file = file
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ConfigError(f"must be {_type_names(types)}, not a boolean", file=self.file, key=self.key(name))
        if not isinstance(value, types):
            raise ConfigError(
                f"must be {_type_names(types)}, not {type(value).__name__}", file=self.file, key=self.key(name)
            )
        return value

    def table(self, name: str) -> _Table:
        return _Table(self.data.pop(name, {}), self.file, self.key(name))

    def done(self) -> None:
        if self.data:
            unknown = sorted(self.data)
            raise ConfigError(
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
                file=self.file,
                key=self.key(unknown[0]),
            )


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a table"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in seq)


def _build(cls: type, table: _Table, **values: Any) -> Any:
    """Construct a config dataclass, re-raising its validation error with the file."""
    table.done()
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ConfigError as exc:
        key = exc.key or ""
        inside = not table.path or key == table.path or key.startswith(f"{table.path}.")
        full = key if inside else f"{table.path}.{key.split('.')[-1]}"
        raise ConfigError(exc.reason, file=table.file, key=full) from None


def parse_nats(t: _Table) -> NatsConfig:
    servers = t.get("servers", (list, str))
    if isinstance(servers, str):
        servers = [servers]
    if servers is not None and not all(isinstance(s, str) for s in servers):
        raise ConfigError("must be a list of URLs", file=t.file, key=t.key("servers"))
    password, token = t.get("password", str), t.get("token", str)
    password_file, token_file = t.get("password_file", str), t.get("token_file", str)
    for given, from_file, name in ((password, password_file, "password"), (token, token_file, "token")):
        if given is not None and from_file is not None:
            raise ConfigError(f"give {name} or {name}_file, not both", file=t.file, key=t.key(f"{name}_file"))
    if password_file is not None:
        password = read_secret_file(password_file, file=t.file, key=t.key("password_file"))
    if token_file is not None:
        token = read_secret_file(token_file, file=t.file, key=t.key("token_file"))
    return _build(
        NatsConfig,
        t,
        servers=tuple(servers) if servers is not None else None,
        user=t.get("user", str),
        password=password,
        token=token,
        password_file=password_file,
        token_file=token_file,
        creds_file=t.get("creds_file", str),
        tls_ca_file=t.get("tls_ca_file", str),
        tls_cert_file=t.get("tls_cert_file", str),
        tls_key_file=t.get("tls_key_file", str),
        connect_timeout=_num(t.get("connect_timeout", (int, float))),
        ping_interval=_num(t.get("ping_interval", (int, float))),
        max_outstanding_pings=t.get("max_outstanding_pings", int),
        embedded=t.get("embedded", bool),
        monitor_port=t.get("monitor_port", int),
    )


def parse_request_plane(t: _Table) -> RequestPlaneConfig:
    return _build(
        RequestPlaneConfig,
        t,
        namespace=t.get("namespace", str),
        ack_wait=_num(t.get("ack_wait", (int, float))),
        max_deliver=t.get("max_deliver", int),
        storage=t.get("storage", str),
        replicas=t.get("replicas", int),
        max_age=_num(t.get("max_age", (int, float))),
        max_msgs=t.get("max_msgs", int),
        max_bytes=t.get("max_bytes", int),
        default_timeout=_num(t.get("default_timeout", (int, float))),
        max_batch=t.get("max_batch", int),
    )


def parse_data_plane(t: _Table) -> DataPlaneConfig:
    return _build(
        DataPlaneConfig,
        t,
        inline_threshold=t.get("inline_threshold", int),
        store_bytes=t.get("store_bytes", int),
        lease=_num(t.get("lease", (int, float))),
        pull_timeout=_num(t.get("pull_timeout", (int, float))),
        endpoint_error_handling=t.get("endpoint_error_handling", bool),
        endpoint_cache_size=t.get("endpoint_cache_size", int),
        endpoint_idle_timeout=_num(t.get("endpoint_idle_timeout", (int, float))),
        shared_memory=t.get("shared_memory", bool),
        shm_cache_bytes=t.get("shm_cache_bytes", int),
        copy_threads=t.get("copy_threads", int),
    )


def parse_logging(t: _Table) -> LoggingConfig:
    return _build(LoggingConfig, t, level=t.get("level", str), file=t.get("file", str),
                  rotate_bytes=t.get("rotate_bytes", int), backups=t.get("backups", int),
                  request_log=t.get("request_log", bool))


def parse_operator(t: _Table) -> OperatorConfig:
    return _build(
        OperatorConfig,
        t,
        name=t.get("name", str, ""),
        implementation=t.get("implementation", str, ""),
        version=t.get("version", int),
        max_inflight=t.get("max_inflight", int),
        parameters=t.get("parameters", dict),
    )


def parse_worker(t: _Table, node: str | None = None) -> WorkerConfig:
    ops_raw = t.get("operators", list, [])
    operators = tuple(parse_operator(_Table(op, t.file, f"{t.key('operators')}[{i}]")) for i, op in enumerate(ops_raw))
    return _build(
        WorkerConfig,
        t,
        name=t.get("name", str, ""),
        operators=operators,
        node=t.get("node", str, node),
        registry_ttl=_num(t.get("registry_ttl", (int, float))),
        drain_timeout=_num(t.get("drain_timeout", (int, float))),
    )


def _num(value: int | float | None) -> float | None:
    return None if value is None else float(value)


def read_toml(path: str | Path) -> dict[str, Any]:
    file = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None


def load_worker_file(path: str | Path, worker_name: str | None = None) -> WorkerFile:
    """Load a worker's settings; with ``[[workers]]`` pick the one named ``worker_name``."""
    file = str(path)
    root = _Table(read_toml(path), file, "")
    nats = parse_nats(root.table("nats"))
    rp = parse_request_plane(root.table("request_plane"))
    logging = parse_logging(root.table("logging"))
    data_plane = parse_data_plane(root.table("data_plane"))
    node_t = root.table("node")
    node_name = node_t.get("name", str)
    node_t.data.clear()  # the agent owns the rest of [node]
    if "worker" in root.data:
        worker = parse_worker(root.table("worker"), node_name)
    elif "workers" in root.data:
        entries = root.get("workers", list)
        names = [e.get("name") if isinstance(e, dict) else None for e in entries]
        if worker_name is None:
            if len(entries) != 1:
                raise ConfigError(f"name one of the workers {names} with --worker", file=file, key="workers")
            index = 0
        elif worker_name in names:
            index = names.index(worker_name)
        else:
            raise ConfigError(f"no worker named {worker_name!r}; the file has {names}", file=file, key="workers")
        if not isinstance(entries[index], dict):
            raise ConfigError("must be a table", file=file, key=f"workers[{index}]")
        entry = dict(entries[index])
        for agent_key in ("count", "gpus_per_instance", "canary"):  # tdist.agent.config.AGENT_WORKER_KEYS
            entry.pop(agent_key, None)
        worker = parse_worker(_Table(entry, file, f"workers[{index}]"), node_name)
    else:
        raise ConfigError("needs a [worker] table or a [[workers]] array", file=file, key="worker")
    for agent_table in ("agent", "supervisor", "http", "gpus", "directories", "canary"):
        root.data.pop(agent_table, None)
    root.done()
    return WorkerFile(nats=nats, request_plane=rp, logging=logging, worker=worker, data_plane=data_plane)


def load_connection_file(path: str | Path) -> tuple[NatsConfig, RequestPlaneConfig]:
    """Only ``[nats]`` and ``[request_plane]`` of an agent or worker file (other tables ignored)."""
    file = str(path)
    root = _Table(read_toml(path), file, "")
    return parse_nats(root.table("nats")), parse_request_plane(root.table("request_plane"))
