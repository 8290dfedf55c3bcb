"""The supervisord configuration for one node: pure functions, no I/O.

``plan_programs`` turns an AgentConfig and the node's GPUs into one ``Program`` per worker
instance; ``render`` writes them as a supervisord.conf string. Values are written so that
supervisord reads back exactly what was meant: ``%`` is doubled (supervisord expands
``%(name)s``), environment values are quoted (commas allowed), and values that its format
cannot carry (newlines, `` ;``/`` #`` which start inline comments, an environment value with
both quote kinds) raise ValueError rather than being silently cut.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tdist.agent.config import AgentConfig, AgentWorkerConfig
from tdist.agent.gpus import GpuInfo, assign_gpus, cpus_for

STOP_MARGIN = 15
"""Seconds on top of a worker's bounded stop (below) for what is not bounded step by step:
stopping the pullers and the last registry write at the start of the drain, and the
interpreter's exit."""

# The bounded steps of a worker's stop (tdist/worker/worker.py, ``drain`` then
# ``_close_resources``), in seconds, as the worker's code bounds them today:
#   drain: drain_timeout (in-flight requests finish, then are cancelled and NAKed)
#   maintenance tasks 3 + each puller 3 x (operators + 1 directed) + deregister 3 + tasks 3
#   + each operator's close 60 x operators + caller close 3
#   + data plane close (min(drain_timeout, 10) for consumers to release, + 15)
#   + NATS close 3 x 3
# = drain_timeout + min(drain_timeout, 10) + 39 + 63 x operators.
# One operator with the default drain_timeout of 30 s: 30 + 10 + 39 + 63 = 142 s, and
# stopwaitsecs = 142 + STOP_MARGIN = 157 s. Keep these in step with worker.py.
_CLOSE_FIXED = 3 + 3 + 3 + 3 + 15 + 3 * 3 + 3  # maintenance, directed puller, deregister, tasks, data plane, nats, caller
_CLOSE_PER_OPERATOR = 3 + 60  # its puller, its close
_RELEASE_WAIT_MAX = 10.0
START_RETRIES = 10
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Program:
    """One supervisord program: one instance of one worker."""

    name: str
    """The program (and group) name: ``<worker>-<instance>``."""
    worker: str
    instance: int
    worker_id: str
    command: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    gpus: tuple[int, ...]
    cpus: str | None
    stdout_logfile: str
    stopwaitsecs: int
    directory: str | None = None
    autorestart: bool = True
    startsecs: int = 1
    startretries: int = START_RETRIES


CommandFactory = Callable[[AgentConfig, AgentWorkerConfig, int, str, str], Sequence[str]]
"""(config, worker, instance, worker_id, log_file) -> argv."""


def worker_id(node: str, worker: str, instance: int) -> str:
    """``<node>-<worker>-<i>``: the node name reduced to id characters, shortened to fit 64."""
    suffix = f"-{worker}-{instance}"
    token = _TOKEN.sub("-", node.split(".")[0]).strip("-") or "node"
    return f"{token[: max(1, 64 - len(suffix))]}{suffix}"


def worker_stop_budget(worker: AgentWorkerConfig) -> int:
    """Seconds a worker may take to stop on SIGTERM when every bounded step takes its whole
    bound (see the sum above), plus STOP_MARGIN: supervisord's ``stopwaitsecs``."""
    drain = worker.worker.drain_timeout
    close = min(drain, _RELEASE_WAIT_MAX) + _CLOSE_FIXED + _CLOSE_PER_OPERATOR * len(worker.worker.operators)
    return math.ceil(drain + close) + STOP_MARGIN


def config_digest(config: AgentConfig, worker: AgentWorkerConfig) -> str:
    """A digest of everything a worker process reads from the file. It goes into the program's
    environment (``TDIST_CONFIG_DIGEST``) so that supervisord's reload sees an edited worker as
    changed (and restarts it) although its command line, which names only the file, is the same.

    It hashes a secret-free form: ``[nats]`` with the password and token replaced by a marker
    (``NatsConfig.redacted``), so the digest, which sits in supervisord.conf and in the worker's
    environment, reveals nothing of them. Nothing is lost: ``[nats]`` changes only with an
    agent restart, which restarts every worker anyway."""
    text = repr((worker.worker, config.nats.redacted(), config.request_plane, config.data_plane, config.logging))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def worker_command(python: str, nats_file: str | None = None) -> CommandFactory:
    """The real worker: ``python -m tdist.worker.main --config FILE --worker NAME ...``.

    ``nats_file``: a 0600 file with the ``[nats]`` settings the worker must use (the servers
    with their real ports, the credentials), written by the agent; no URL or secret is ever
    on the command line."""

    def build(config: AgentConfig, worker: AgentWorkerConfig, instance: int, wid: str, log_file: str) -> list[str]:
        argv = [python, "-m", "tdist.worker.main", "--config", config.file, "--worker", worker.name]
        if nats_file is not None:
            argv += ["--nats-file", nats_file]
        return argv + ["--worker-id", wid, "--log-file", log_file]

    return build


def plan_programs(
    config: AgentConfig,
    gpus: Sequence[GpuInfo],
    *,
    python: str = sys.executable,
    command: CommandFactory | None = None,
    taskset: str | None = "taskset",
    directory: str | None = None,
    extra_env: Sequence[tuple[str, str]] = (),
    prefix: Sequence[str] = (),
) -> tuple[Program, ...]:
    """One Program per instance, GPUs given out in order (ConfigError when there are too few).

    ``taskset``: the executable to pin an instance to its GPUs' NUMA CPUs (None: no pinning).
    ``prefix``: put before every command (the agent's parent-death wrapper).
    """
    config.check_gpus([g.index for g in gpus])
    by_index = {g.index: g for g in gpus}
    instances = [(w, i) for w in config.workers for i in range(w.count)]
    blocks = assign_gpus([g.index for g in gpus], [w.gpus_per_instance for w, _ in instances])
    build = command or worker_command(python)
    log_dir = os.path.abspath(config.directories.log_dir)
    programs = []
    for (w, i), block in zip(instances, blocks, strict=True):
        name = f"{w.name}-{i}"
        wid = worker_id(config.node.name, w.name, i)
        argv = list(build(config, w, i, wid, os.path.join(log_dir, f"{name}.log")))
        cpus = cpus_for([by_index[g] for g in block])
        if cpus and taskset:
            argv = [taskset, "-c", cpus, *argv]
        argv = [*prefix, *argv]
        env = (
            ("CUDA_VISIBLE_DEVICES", ",".join(map(str, block))),
            ("PYTHONUNBUFFERED", "1"),
            ("TDIST_CONFIG_DIGEST", config_digest(config, w)),
            *extra_env,
        )
        programs.append(
            Program(
                name=name,
                worker=w.name,
                instance=i,
                worker_id=wid,
                command=tuple(argv),
                environment=tuple(env),
                gpus=block,
                cpus=cpus,
                stdout_logfile=os.path.join(log_dir, f"{name}.out"),
                stopwaitsecs=worker_stop_budget(w),
                directory=directory,
            )
        )
    return tuple(programs)


def conf_value(value: str, expansions: int = 1) -> str:
    """A value as supervisord's INI parser and ``%`` expansion will read it back unchanged.

    ``expansions``: how many times supervisord expands the key (``stdout_logfile``: twice).
    """
    if "\n" in value or "\r" in value:
        raise ValueError(f"supervisord values cannot hold line breaks: {value!r}")
    if re.search(r"\s[;#]", value):
        raise ValueError(f"' ;' or ' #' would start an inline comment in supervisord's format: {value!r}")
    if value != value.strip():
        raise ValueError(f"supervisord strips leading and trailing blanks: {value!r}")
    return value.replace("%", "%" * 2**expansions)


def conf_environment(pairs: Sequence[tuple[str, str]]) -> str:
    """``KEY="value",KEY2='val"ue'`` as supervisor's ``dict_of_key_value_pairs`` parses it."""
    items = []
    for key, value in pairs:
        if not _ENV_KEY.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} is not [A-Za-z_][A-Za-z0-9_]*")
        if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
            raise ValueError(f"supervisord strips quotes at the ends of environment values: {key}={value!r}")
        if '"' not in value:
            quoted = f'"{value}"'
        elif "'" not in value:
            quoted = f"'{value}'"
        else:
            raise ValueError(f"supervisord cannot carry both quote kinds in one environment value: {key}={value!r}")
        items.append(f"{key}={quoted}")
    return conf_value(",".join(items)) if items else ""


def render(state_dir: str, log_dir: str, programs: Sequence[Program], *, loglevel: str = "info") -> str:
    """The whole supervisord.conf: a private unix socket in ``state_dir``, one section per program."""
    state = os.path.abspath(state_dir)
    logs = os.path.abspath(log_dir)
    sock = os.path.join(state, "supervisor.sock")
    lines = [
        "; Written by tdist-agent; edits are overwritten.",
        "[unix_http_server]",
        f"file={conf_value(sock)}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={conf_value(os.path.join(state, 'supervisord.log'))}",
        f"pidfile={conf_value(os.path.join(state, 'supervisord.pid'))}",
        f"childlogdir={conf_value(logs)}",
        f"loglevel={conf_value(loglevel)}",
        "nodaemon=true",
        "silent=true",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{conf_value(sock)}",
    ]
    seen: set[str] = set()
    for p in programs:
        if p.name in seen:
            raise ValueError(f"program {p.name!r} appears twice")
        seen.add(p.name)
        lines += ["", f"[program:{p.name}]", f"command={conf_value(shlex.join(p.command))}"]
        if p.directory:
            lines.append(f"directory={conf_value(p.directory)}")
        if p.environment:
            lines.append(f"environment={conf_environment(p.environment)}")
        lines += [
            "autostart=true",
            f"autorestart={'true' if p.autorestart else 'false'}",
            f"startsecs={p.startsecs}",
            f"startretries={p.startretries}",
            "stopsignal=TERM",
            f"stopwaitsecs={p.stopwaitsecs}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={conf_value(p.stdout_logfile, expansions=2)}",
        ]
    return "\n".join(lines) + "\n"
