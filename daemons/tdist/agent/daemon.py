"""The per-node agent: turns agent.toml into running workers and keeps them running.

Startup: validate the file, make the directories, start the embedded nats-server if
the file asks for one, replace a supervisord left behind by an agent that was killed
(so there is never a second set of workers), render supervisord.conf, start
supervisord as our child, register the node, serve HTTP (/live, /ready, /metrics).

Then every second: read the workers' states from supervisord; a worker that left
RUNNING has its registry entry deleted at once (not after its TTL); heartbeat the node.
SIGHUP: re-read the file; an invalid one is logged and the running set stays; a valid
one is re-rendered and applied (only changed programs restart). SIGTERM: supervisord
stops the workers (each drains within its budget), the node deregisters, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient

from tdist import __version__
from tdist.agent.config import AgentConfig, load_agent_config
from tdist.agent.gpus import GpuInfo, describe_gpus, detect_gpus
from tdist.agent.supervisor_conf import Program, plan_programs, render
from tdist.agent.supervisor_rpc import SupervisorClient, Supervisord
from tdist.errors import ConfigError, TdistError
from tdist.logs import get_logger
from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tdist.registry import WorkerInfo, open_bucket, put_with_ttl
from tdist.request_plane import subjects
from tdist.request_plane.connection import close_connection, connect

log = get_logger("tdist.agent")

TICK = 1.0
NODE_TTL = 10.0


@dataclass
class AgentStatus:
    """What /ready and /metrics report; refreshed every tick."""

    states: dict[str, str] = field(default_factory=dict)
    """supervisord program name -> state name."""
    pids: dict[str, int] = field(default_factory=dict)
    """supervisord program name -> the PID of its current process (0: none)."""
    registered: set[str] = field(default_factory=set)
    """Worker ids currently in the registry."""
    entries: dict[str, WorkerInfo] = field(default_factory=dict)
    """This node's workers' registry entries (their request counters, in-flight, bytes moved)."""
    restarts: int = 0
    reloads: int = 0
    reload_failures: int = 0


class Agent:
    def __init__(self, config_path: str, *, nats_url: str | None = None, http_port: int | None = None) -> None:
        self.config_path = config_path
        self._nats_url = nats_url
        self._http_port = http_port
        self.config: AgentConfig = self._load()
        self.status = AgentStatus()
        self.programs: tuple[Program, ...] = ()
        self.gpus: tuple[GpuInfo, ...] = ()
        self.nats_server: EmbeddedNatsServer | None = None
        self.supervisord: Supervisord | None = None
        self.nc: NatsClient | None = None
        self.http: asyncio.AbstractServer | None = None
        self.http_port = 0
        self.started_at = time.time()
        self._kv: tuple[Any, Any] | None = None

    def _load(self) -> AgentConfig:
        """The file, with the command line's overrides (kept on every reload)."""
        cfg = load_agent_config(self.config_path)
        if self._nats_url is not None:
            cfg = dataclasses.replace(cfg, nats=dataclasses.replace(cfg.nats, servers=(self._nats_url,)))
        if self._http_port is not None:
            cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, port=self._http_port))
        return cfg

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        os.makedirs(cfg.directories.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(cfg.directories.log_dir, exist_ok=True)
        self.gpus = self._gpus(cfg)
        if cfg.nats.embedded:
            host, port = _host_port(cfg.nats.servers[0])
            self.nats_server = EmbeddedNatsServer(NatsServerOptions(
                host=host, port=port, store_dir=os.path.join(cfg.directories.state_dir, "nats"),
                log_file=os.path.join(cfg.directories.log_dir, "nats-server.log")))
            await asyncio.to_thread(self.nats_server.start)
            log.info("nats_started", url=self.nats_server.url, pid=self.nats_server.pid)
        await asyncio.to_thread(_replace_stale_supervisord, cfg.directories.socket_path)
        self.programs = self._plan(cfg, self.gpus)
        conf = self._write_conf(cfg, self.programs)
        self.supervisord = Supervisord(conf, cfg.directories.socket_path)
        await self.supervisord.astart()
        self.nc = await connect(cfg.nats, name=f"tdist-agent {cfg.node.name}")
        self.http = await asyncio.start_server(self._serve_http, cfg.http.host, cfg.http.port)
        self.http_port = self.http.sockets[0].getsockname()[1]
        log.info("agent_started", node=cfg.node.name, workers=[p.name for p in self.programs],
                 http=f"{cfg.http.host}:{self.http_port}", gpus=[g.index for g in self.gpus])

    async def run(self, stop: asyncio.Event, reload: asyncio.Event) -> None:
        """Watch until ``stop``; apply the file again whenever ``reload`` is set."""
        while not stop.is_set():
            if reload.is_set():
                reload.clear()
                await self.reload()
            try:
                await self._tick()
            except Exception as exc:  # a passing failure (NATS reconnecting): log, keep watching
                log.warning("agent_tick_failed", error=f"{type(exc).__name__}: {exc}")
            try:
                async with asyncio.timeout(TICK):
                    await _first(stop, reload)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Drain the workers (supervisord sends SIGTERM and waits), deregister, stop."""
        budget = max((p.stopwaitsecs for p in self.programs), default=30) + 30
        if self.supervisord is not None:
            await self.supervisord.astop(timeout=budget)
        if self.nc is not None:
            try:
                nodes_kv, workers_kv = await self._buckets()
                await nodes_kv.delete(self.config.node.name)
                for program in self.programs:
                    await workers_kv.delete(program.worker_id)
            except Exception as exc:
                log.warning("agent_deregister_failed", error=str(exc))
            await close_connection(self.nc)
        if self.http is not None:
            self.http.close()
            await self.http.wait_closed()
        if self.nats_server is not None:
            await asyncio.to_thread(self.nats_server.stop)
        log.info("agent_stopped", node=self.config.node.name)

    async def reload(self) -> None:
        """Re-read the file; apply it only if it is valid (the running set stays otherwise)."""
        try:
            cfg = self._load()
            if (cfg.nats, cfg.directories, cfg.http, cfg.node.name) != (
                self.config.nats, self.config.directories, self.config.http, self.config.node.name
            ):
                raise ConfigError("[nats], [directories], [http] and the node name change only with a restart",
                                  file=self.config_path)
            gpus = self._gpus(cfg)
            programs = self._plan(cfg, gpus)
        except TdistError as exc:
            self.status.reload_failures += 1
            log.error("reload_rejected", error=str(exc))
            return
        self._write_conf(cfg, programs)
        assert self.supervisord is not None
        diff = await self.supervisord.client.aupdate()
        self.config, self.programs, self.gpus = cfg, programs, gpus
        self.status.reloads += 1
        log.info("reloaded", added=diff.added, changed=diff.changed, removed=diff.removed)

    # -- pieces -----------------------------------------------------------------

    def _gpus(self, cfg: AgentConfig) -> tuple[GpuInfo, ...]:
        detected = detect_gpus()
        if cfg.node.gpus == "auto":
            return detected
        return describe_gpus(list(cfg.node.gpus), detected)

    def _plan(self, cfg: AgentConfig, gpus: tuple[GpuInfo, ...]) -> tuple[Program, ...]:
        return plan_programs(cfg, gpus, taskset="taskset" if shutil.which("taskset") else None,
                             directory=os.getcwd())

    @staticmethod
    def _write_conf(cfg: AgentConfig, programs: tuple[Program, ...]) -> str:
        path = os.path.join(cfg.directories.state_dir, "supervisord.conf")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(render(cfg.directories.state_dir, cfg.directories.log_dir, programs))
        os.replace(tmp, path)
        return path

    async def _tick(self) -> None:
        assert self.supervisord is not None and self.nc is not None
        infos = await self.supervisord.client.acall("supervisor.getAllProcessInfo")
        states = {i["name"]: i["statename"] for i in infos}
        pids = {i["name"]: int(i.get("pid") or 0) for i in infos}
        ns = self.config.request_plane.namespace
        js = self.nc.jetstream()
        _, workers_kv = await self._buckets()
        self.status.registered = set(await _keys(workers_kv))
        entries = await self._entries(workers_kv)
        for program in self.programs:
            before = self.status.pids.get(program.name, 0)
            now = pids.get(program.name, 0)
            if before and now != before:
                self.status.restarts += 1
                log.warning("worker_process_gone", program=program.name, worker=program.worker_id,
                            old_pid=before, new_pid=now or None, state=states.get(program.name))
            stale = entries.get(program.worker_id)
            if stale is not None and stale.pid != now:
                # The entry of a process that is gone: remove it now, not after its TTL. The new
                # process (same worker id) registers itself when it serves.
                await workers_kv.delete(program.worker_id)
                entries.pop(program.worker_id)
                self.status.registered.discard(program.worker_id)
        self.status.states, self.status.pids, self.status.entries = states, pids, entries
        node = {
            "name": self.config.node.name, "host": socket.gethostname(), "agent_version": __version__,
            "pid": os.getpid(), "started_at": self.started_at, "http": f"{self.config.http.host}:{self.http_port}",
            "gpus": [asdict(g) for g in self.gpus], "ready": self.ready(),
            "workers": {p.worker_id: states.get(p.name, "UNKNOWN") for p in self.programs},
        }
        await put_with_ttl(js, subjects.nodes_bucket(ns), self.config.node.name, json.dumps(node).encode(), NODE_TTL)

    async def _buckets(self) -> tuple[Any, Any]:
        """The nodes and workers buckets, opened once (the namespace cannot change without a restart)."""
        if self._kv is None:
            assert self.nc is not None
            js, ns = self.nc.jetstream(), self.config.request_plane.namespace
            self._kv = (await open_bucket(js, subjects.nodes_bucket(ns)), await open_bucket(js, subjects.workers_bucket(ns)))
        return self._kv

    async def _entries(self, kv: Any) -> dict[str, WorkerInfo]:
        out = {}
        for program in self.programs:
            if program.worker_id not in self.status.registered:
                continue
            try:
                entry = await kv.get(program.worker_id)
                if entry.value:
                    out[program.worker_id] = WorkerInfo.from_json(entry.value)
            except Exception:  # deleted meanwhile
                continue
        return out

    def ready(self) -> bool:
        """Every desired worker RUNNING under supervisord and registered by that very process."""
        return bool(self.programs) and all(self._up(p) for p in self.programs)

    def _up(self, program: Program) -> bool:
        entry = self.status.entries.get(program.worker_id)
        return (self.status.states.get(program.name) == "RUNNING" and entry is not None
                and entry.pid == self.status.pids.get(program.name))

    def metrics(self) -> str:
        lines = [
            "# HELP tdist_agent_workers Worker processes by supervisord state.",
            "# TYPE tdist_agent_workers gauge",
        ]
        counts: dict[str, int] = {}
        for state in self.status.states.values():
            counts[state] = counts.get(state, 0) + 1
        lines += [f'tdist_agent_workers{{state="{s}"}} {n}' for s, n in sorted(counts.items())]
        lines += ["# HELP tdist_agent_worker_up 1 if the worker is RUNNING and registered.",
                  "# TYPE tdist_agent_worker_up gauge"]
        for p in self.programs:
            up = int(self._up(p))
            lines.append(f'tdist_agent_worker_up{{worker="{p.worker_id}",program="{p.name}"}} {up}')
        per_worker = [
            ("tdist_worker_requests_total", "counter", "Requests the worker finished.", lambda w: w.served),
            ("tdist_worker_inflight_requests", "gauge", "Requests running now.",
             lambda w: sum(op.inflight for op in w.operators)),
            ("tdist_worker_data_plane_pulled_bytes_total", "counter", "Tensor bytes pulled from peers.",
             lambda w: w.bytes_pulled),
            ("tdist_worker_data_plane_served_bytes_total", "counter", "Tensor bytes served to peers.",
             lambda w: w.bytes_served),
            ("tdist_worker_tensors_held", "gauge", "Tensor references held for consumers.", lambda w: w.tensors_held),
        ]
        for name, kind, doc, value in per_worker:  # from the workers' registry entries (heartbeat-fresh)
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{worker="{wid}"}} {value(w)}' for wid, w in sorted(self.status.entries.items())]
        lines += [
            "# TYPE tdist_agent_worker_restarts_total counter", f"tdist_agent_worker_restarts_total {self.status.restarts}",
            "# TYPE tdist_agent_reloads_total counter", f"tdist_agent_reloads_total {self.status.reloads}",
            "# TYPE tdist_agent_reload_failures_total counter",
            f"tdist_agent_reload_failures_total {self.status.reload_failures}",
            "# TYPE tdist_agent_ready gauge", f"tdist_agent_ready {int(self.ready())}",
            "# TYPE tdist_agent_uptime_seconds gauge", f"tdist_agent_uptime_seconds {time.time() - self.started_at:.1f}",
        ]
        return "\n".join(lines) + "\n"

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/live":
                code, body, ctype = 200, "live\n", "text/plain"
            elif path == "/ready":
                ready = self.ready()
                code, ctype = (200 if ready else 503), "application/json"
                body = json.dumps({"ready": ready, "workers": self.status.states}) + "\n"
            elif path == "/metrics":
                code, body, ctype = 200, self.metrics(), "text/plain; version=0.0.4"
            else:
                code, body, ctype = 404, "not found: try /live, /ready or /metrics\n", "text/plain"
            data = body.encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _keys(kv: Any) -> list[str]:
    try:
        return list(await kv.keys())
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        return []


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    where = urlparse(url)
    return where.hostname or "127.0.0.1", where.port or 4222


def _replace_stale_supervisord(socket_path: str) -> None:
    """A supervisord from an agent that was killed still runs its workers: shut it down first."""
    if not os.path.exists(socket_path):
        return
    client = SupervisorClient(socket_path, timeout=10)
    try:
        client.get_state()
    except Exception:
        os.unlink(socket_path)  # nobody answers: a leftover file
        return
    log.warning("replacing_stale_supervisord", socket=socket_path)
    pids = [i["pid"] for i in client.all_process_info() if i.get("pid")]
    try:
        client.shutdown()
    except Exception:
        pass
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (os.path.exists(socket_path) or any(_alive(p) for p in pids)):
        time.sleep(0.1)
    if os.path.exists(socket_path):
        os.unlink(socket_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
