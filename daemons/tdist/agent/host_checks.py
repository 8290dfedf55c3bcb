"""``tdist-agent check-config``'s host checks: what a start of this file would hit on this host.

A file can parse and still never run here: a Triton model repository or model that is not
there, an implementation that does not import or is no Operator class, GPU indices the host
lacks (or too few GPUs for ``gpus = "auto"``), a port another process holds. The agent would
start and its workers would crash-loop; these checks say so before, each problem as a
``ConfigError`` naming the file and key, all of them (not just the first).

* **Implementations** are imported the way a worker imports them (``load_operator_class``),
  in a child process per distinct implementation, with a timeout: a module that hangs, exits
  or crashes the interpreter at import costs check-config that child, not itself. Relative
  paths (``path/file.py:Class``, ``model_repository``) resolve against the current directory,
  as in the agent's workers (the agent starts them in its own; under systemd
  ``WorkingDirectory=``).
* **Triton operators** (a ``TritonOperator`` class or subclass) are constructed in that child:
  their constructor checks the repository directory and ``<repository>/<model>/config.pbtxt``
  and touches nothing else, so the check is the very one a worker's start runs.
* **GPUs**: an explicit ``gpus = [...]`` index nvidia-smi does not list; ``"auto"`` with fewer
  detected GPUs than the workers ask for.
* **Ports**: the HTTP port, and the embedded nats-server's client and monitoring ports
  (``daemon._check_port``, the start's own check). Skipped while an agent holds this state
  dir's lock: the ports are that agent's (``systemctl reload`` runs check-config beside it).

Workers with ``count = 0`` are not started, so not checked.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tdist.agent.config import AgentConfig, check_gpu_budget
from tdist.agent.gpus import GpuInfo, detect_gpus
from tdist.agent.processes import LOCK_FILE, AgentStartError
from tdist.config import read_toml
from tdist.errors import ConfigError

IMPORT_TIMEOUT = 30.0
"""Seconds an implementation's import (in its child process) may take; a fresh interpreter
importing tdist.operators takes about 0.3 s here, a module importing torch several seconds."""
_STDERR_TAIL = 400


@dataclass
class HostReport:
    """What the host checks found, and what they looked at (for the success line)."""

    problems: list[ConfigError] = field(default_factory=list)
    implementations: int = 0
    models: int = 0
    ports: int = 0
    ports_skipped: str | None = None
    """Why the ports were not checked (an agent runs on this state dir)."""
    gpus: tuple[int, ...] = ()

    def summary(self) -> str:
        ports = f"ports not checked ({self.ports_skipped})" if self.ports_skipped else f"{self.ports} ports free"
        gpus = f"GPUs {list(self.gpus)}" if self.gpus else "no GPU"
        return (f"{self.implementations} implementations import, {self.models} Triton models found, "
                f"{ports}, {gpus} on this host")


def check_host(cfg: AgentConfig, *, import_timeout: float = IMPORT_TIMEOUT,
               detected: Sequence[GpuInfo] | None = None) -> HostReport:
    """Every host check; ``detected``: the host's GPUs (default: ask nvidia-smi)."""
    report = HostReport()
    gpus = detect_gpus() if detected is None else tuple(detected)
    report.gpus = tuple(g.index for g in gpus)
    report.problems += check_gpus(cfg, gpus)
    report.problems += check_ports(cfg, report)
    report.problems += check_operators(cfg, report, import_timeout)
    return report


# -- GPUs -----------------------------------------------------------------------------------


def check_gpus(cfg: AgentConfig, detected: Sequence[GpuInfo]) -> list[ConfigError]:
    indices = [g.index for g in detected]
    if cfg.node.gpus == "auto":
        try:
            check_gpu_budget(cfg.file, cfg.workers, indices, detected=True)
        except ConfigError as exc:
            return [exc]
        return []
    missing = [g for g in cfg.node.gpus if g not in indices]
    if not missing:
        return []
    host = f"nvidia-smi lists {indices}" if indices else "nvidia-smi finds no GPU here"
    return [ConfigError(f"GPU {', '.join(map(str, missing))} not on this host ({host})", file=cfg.file,
                        key=_gpus_key(cfg.file))]


def _gpus_key(file: str) -> str:
    """Where the file wrote ``gpus``: at the top level or under ``[node]``."""
    try:
        return "gpus" if "gpus" in read_toml(file) else "node.gpus"
    except ConfigError:
        return "node.gpus"


# -- ports ----------------------------------------------------------------------------------


def agent_on_state_dir(state_dir: str) -> str | None:
    """The PID (as the lock file says) of an agent holding ``state_dir``'s lock, or None.

    Tested with a shared, non-blocking flock, dropped at once: it fails only while an agent
    holds its exclusive lock."""
    path = os.path.join(os.path.abspath(state_dir), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 32).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_ports(cfg: AgentConfig, report: HostReport) -> list[ConfigError]:
    from tdist.agent.daemon import _check_port, _host_port  # the start's own checks

    holder = agent_on_state_dir(cfg.directories.state_dir)
    if holder is not None:
        report.ports_skipped = f"the agent with pid {holder} runs on {os.path.abspath(cfg.directories.state_dir)}"
        return []
    wanted = [(cfg.http.host, cfg.http.port, "http.port", "the agent's HTTP")]
    if cfg.nats.embedded:
        host, port = _host_port(cfg.nats.servers[0])
        wanted.append((host, port, "nats.servers", "the embedded nats-server"))
        if cfg.nats.monitor_port:
            wanted.append(("127.0.0.1", cfg.nats.monitor_port, "nats.monitor_port", "its monitoring"))
    problems = []
    for host, port, key, what in wanted:
        if not port:
            continue  # 0: any free port at start
        report.ports += 1
        try:
            _check_port(host, port, key, what)
        except AgentStartError as exc:
            # _check_port words its message "KEY: HOST:PORT REASON"; its key is the one we passed.
            problems.append(ConfigError(exc.message.removeprefix(f"{key}: "), file=cfg.file, key=key))
    return problems


# -- implementations and models ---------------------------------------------------------------


@dataclass
class _Probe:
    implementation: str
    operators: list[tuple[str, dict[str, Any]]]
    """(key of the operator in the file, its name, version and parameters)."""
    proc: subprocess.Popen[bytes] | None = None
    stdout: Any = None
    stderr: Any = None


def check_operators(cfg: AgentConfig, report: HostReport, timeout: float) -> list[ConfigError]:
    """Import each distinct implementation in its own child process (all at once), and construct
    the Triton operators there; problems name ``workers[i].operators[j].<key>``."""
    probes: dict[str, _Probe] = {}
    for i, w in enumerate(cfg.workers):
        if w.count == 0:
            continue
        for j, op in enumerate(w.worker.operators):
            probe = probes.setdefault(op.implementation, _Probe(op.implementation, []))
            probe.operators.append((f"workers[{i}].operators[{j}]", {
                "name": op.name, "version": op.version, "parameters": op.parameters}))
    report.implementations = len(probes)
    problems: list[ConfigError] = []
    try:
        for probe in probes.values():
            _spawn(probe)
        deadline = time.monotonic() + timeout
        for probe in probes.values():
            problems += _collect(cfg.file, probe, deadline, timeout, report)
    finally:
        for probe in probes.values():
            if probe.proc is not None and probe.proc.poll() is None:
                probe.proc.kill()
                probe.proc.wait()
            for f in (probe.stdout, probe.stderr):
                if f is not None:
                    f.close()
    return problems


def _spawn(probe: _Probe) -> None:
    request = json.dumps({"implementation": probe.implementation,
                          "operators": [op for _, op in probe.operators]}, default=str).encode()
    with tempfile.TemporaryFile() as stdin:
        stdin.write(request)
        stdin.seek(0)
        # Files, not pipes: nothing to pump, a chatty import never blocks, and a process the module
        # left behind holding a descriptor cannot make us wait for an end of file.
        probe.stdout, probe.stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        probe.proc = subprocess.Popen(
            [sys.executable, "-c", "from tdist.agent.host_checks import probe_main; probe_main()"],
            stdin=stdin, stdout=probe.stdout, stderr=probe.stderr)


def _collect(file: str, probe: _Probe, deadline: float, timeout: float, report: HostReport) -> list[ConfigError]:
    proc = probe.proc
    assert proc is not None
    first_key = f"{probe.operators[0][0]}.implementation"
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # all started together: one deadline
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return [ConfigError(f"importing {probe.implementation!r} did not finish within {timeout:g} s "
                            f"(--import-timeout)", file=file, key=first_key)]
    probe.stdout.seek(0)
    out = probe.stdout.read()
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        probe.stderr.seek(0)
        lines = probe.stderr.read().decode(errors="replace").strip().splitlines()
        tail = " / ".join(line.strip() for line in lines[-3:])[-_STDERR_TAIL:]
        return [ConfigError(f"importing {probe.implementation!r} ended its process ({how})"
                            + (f": {tail}" if tail else ""), file=file, key=first_key)]
    if result["error"] is not None:
        return [ConfigError(result["error"], file=file, key=f"{key}.implementation")
                for key, _ in probe.operators]
    problems = []
    for (key, op), error in zip(probe.operators, result["operators"]):
        if result["triton"]:
            report.models += error is None
        if error is not None:
            sub = error["key"] or "parameters"
            if sub == "parameters.model" and "model" not in op["parameters"]:
                sub = "name"  # the model's name defaults to the operator's
            problems.append(ConfigError(error["reason"], file=file, key=f"{key}.{sub}"))
    return problems


def probe_main() -> None:
    """The child: import one implementation as a worker would, construct its Triton operators,
    write one JSON line to the real stdout (the module's own prints go to stderr), and leave
    without running the module's exit handlers or waiting for its threads."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    request = json.load(sys.stdin)
    result: dict[str, Any] = {"error": None, "triton": False, "operators": []}
    try:
        from tdist.operators import load_operator_class

        cls = load_operator_class(request["implementation"])
    except ConfigError as exc:
        result["error"] = exc.reason
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a module is the module's fault
        result["error"] = f"cannot import {request['implementation']!r}: {type(exc).__name__}: {exc}"
    else:
        from tdist.operators.triton import TritonOperator

        result["triton"] = issubclass(cls, TritonOperator)
        for op in request["operators"]:
            error = None
            if result["triton"]:
                try:
                    cls(op["name"], op["version"], op["parameters"])
                except ConfigError as exc:
                    error = {"reason": exc.reason, "key": exc.key}
                except Exception as exc:  # noqa: BLE001
                    error = {"reason": f"{type(exc).__name__}: {exc}", "key": None}
            result["operators"].append(error)
    out.write(json.dumps(result) + "\n")
    out.flush()
    os._exit(0)
