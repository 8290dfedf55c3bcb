"""The per-node agent: turns agent.toml into running workers and keeps them running.

Start-up, in this order, so that whatever can fail does so before anything is started
(one line on stderr, exit 1):

1. ``prepare``: the state dir is made (or tightened to) 0700; ``agent.lock`` is taken (a second
   agent on the same state dir refuses to start); whatever an earlier agent of this state dir
   left running (supervisord, workers, Triton servers, nats-server) is stopped, found by the
   PIDs it recorded (checked against /proc start times) and by the state dir's marker in
   their environment (``tdist.agent.processes``); the workers' metrics directory is emptied;
   the HTTP port is bound (``tdist.agent.http_server``: ``/live``, ``/ready``, ``/metrics``)
   and the embedded server's client and monitoring ports are checked.
2. ``start``: the embedded nats-server (if ``[nats] embedded``), then a NATS connection. While
   NATS is unreachable the agent keeps retrying (backoff up to 15 s) with ``/live`` answering
   and ``/ready`` 503, and starts no worker. Then supervisord, with the workers.

Every child (supervisord, nats-server, and through supervisord every worker) is started with
a parent-death signal, so nothing outlives the agent, even a SIGKILLed one.

Then every second (``_tick``): supervisord's process states; a worker whose process changed has
its registry entry deleted at once (not after its TTL) and its live metrics dropped; a worker
that crash-loops (BACKOFF, FATAL, or replaced again and again: ``tdist.agent.crashloop``) is
logged with the last lines of its output, which ``/ready`` shows too; the node's heartbeat.
Every ``QUEUE_DEPTH_PERIOD`` the operators' pending counts are read for ``/metrics``
(``tdist.agent.exposition``: the workers' own metrics, merged from the files they write in
multiprocess mode, and the agent's). Worker entries come from a registry watch (no listing).
The canary (``_canary_loop``) sends each serving worker
a directed request every ``[canary] period`` (the built-in ``_ping`` unless the worker names
one of its operators); ``failures`` failures in a row mark the worker unhealthy (``/ready`` 503,
its registry entry's state ``unhealthy``) and the agent SIGKILLs it through supervisord, which
starts it again.

**supervisord dying** is seen on the next tick (``/ready`` is 503 at once: it checks the
process, not the last tick). The agent restarts it: the workers, which die with supervisord
(parent-death signal), are made sure to be gone (the same leftover sweep as at start-up),
their registry entries are deleted, and supervisord starts again with one set of workers.
If supervisord dies ``SUPERVISORD_MAX_DEATHS`` times within ``SUPERVISORD_DEATH_WINDOW``
seconds, the agent stops everything and exits 1, and systemd (``Restart=on-failure``) starts
it afresh.

systemd (``tdist.agent.notify``): READY=1 the first time the node is ready (``/ready`` 200),
RELOADING=1 and READY=1 around each reload, STOPPING=1, and WATCHDOG=1 pings only while this
loop goes round.

SIGHUP (``reload``, in a task: ticks, the canary and HTTP go on meanwhile): the file is read
again; an invalid one is logged and counted and the running set stays; a valid one is applied
with ``aupdate`` (changed groups stopped without any RPC that waits; see supervisor_rpc).
An apply that fails is logged and counted; the agent keeps running. SIGTERM: supervisord
stops the workers (each drains within its budget), the node deregisters, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
from nats.aio.client import Client as NatsClient

from tdist import names
from tdist import __version__
from tdist.agent import crashloop, exposition
from tdist.agent.config import AgentConfig, AgentWorkerConfig, load_agent_config
from tdist.agent.crashloop import CrashWatch, Failing
from tdist.agent.gpus import GpuInfo, describe_gpus, detect_gpus
from tdist.agent.http_server import HttpServer
from tdist.agent.shm_sweep import ShmSweeper
from tdist.agent.notify import Watchdog, notify, watchdog_interval
from tdist.agent.processes import (
    AgentStartError,
    PidFile,
    StateLock,
    alive,
    die_with_parent,
    marker_env,
    stop_leftovers,
)
from tdist.agent.supervisor_conf import Program, plan_programs, render, worker_command
from tdist.agent.supervisor_rpc import Supervisord
from tdist.client import Client
from tdist.config import NatsConfig
from tdist.errors import ConfigError, TdistError
from tdist.logs import get_logger
from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tdist.registry import RegistryWatch, WorkerInfo, open_bucket, put_with_ttl
from tdist.request_plane.deploy import ensure_namespace


log = get_logger("tdist.agent")

TICK = 1.0
TICK_TIMEOUT = 15.0
"""A tick that takes longer (supervisord or NATS stuck) is abandoned and logged."""
WATCHDOG_STALE = TICK_TIMEOUT + 2 * TICK
"""systemd's watchdog is pinged only if the main loop went round within this many seconds
(a healthy loop goes round at least every TICK_TIMEOUT + TICK)."""
QUEUE_DEPTH_PERIOD = 5.0
"""Seconds between two reads of the operators' consumers' pending counts (``tdist_queue_depth``)."""
NODE_TTL = 10.0
RPC_TIMEOUT = 10.0
"""No RPC of the agent waits on a worker (stops poll), so each answers in well under this."""
SUPERVISORD_MAX_DEATHS = 3
SUPERVISORD_DEATH_WINDOW = 300.0
CONNECT_BACKOFF_MAX = 15.0
NATS_CLIENT_FILE = "nats-client.toml"
NATS_RUN_DIR = "nats.run"


class AgentFatal(TdistError):
    """The agent cannot go on (supervisord keeps dying): it stops everything and exits 1."""

    code = "AGENT_FATAL"


@dataclass
class AgentStatus:
    """What /ready and /metrics report; refreshed every tick."""

    states: dict[str, str] = field(default_factory=dict)
    """supervisord program name -> state name."""
    pids: dict[str, int] = field(default_factory=dict)
    """supervisord program name -> the PID of its current process (0: none)."""
    entries: dict[str, WorkerInfo] = field(default_factory=dict)
    """This node's workers' registry entries (their request counters, in-flight, bytes moved)."""
    registered_pid: dict[str, int] = field(default_factory=dict)
    """program -> the PID whose registry entry was seen (the canary pings only those)."""
    canary_failures: dict[str, int] = field(default_factory=dict)
    unhealthy: dict[str, int] = field(default_factory=dict)
    """program -> the PID the canary found unhealthy (cleared when the process changes)."""
    restarts: dict[str, int] = field(default_factory=dict)
    """program -> times its process was replaced."""
    failing: dict[str, Failing] = field(default_factory=dict)
    """program -> why it crash-loops (see tdist.agent.crashloop)."""
    queue_depth: dict[tuple[str, int], int] = field(default_factory=dict)
    """(operator, version) -> its shared consumer's num_pending, refreshed every QUEUE_DEPTH_PERIOD."""
    reloads: int = 0
    reload_failures: int = 0
    """Reloads refused (invalid file) or whose apply failed."""
    reload_apply_failures: int = 0
    supervisord_restarts: int = 0
    canary_sent: int = 0
    canary_failed: int = 0
    canary_restarts: int = 0
    nats_error: str | None = None
    stream_mismatch: list[str] = field(default_factory=list)
    """Storage or replicas of the namespace's stream that differ from the configuration (kept)."""


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
        self.client: Client | None = None
        self.watch: RegistryWatch | None = None
        self.http: HttpServer | None = None
        self.http_port = 0
        self.metrics_dir: str | None = None
        """The workers' PROMETHEUS_MULTIPROC_DIR (made by ``prepare``)."""
        self.node_metrics = exposition.NodeMetrics(self, None)
        self.nats: NatsConfig = self.config.nats
        """The [nats] settings workers and the agent use: servers[0] with the embedded server's real port."""
        self.started_at = time.time()
        self._nodes_kv: Any = None
        state = self.config.directories.state_dir
        self._lock = StateLock(state)
        self._pids = PidFile(state)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._canary_task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._depth_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._deaths: deque[float] = deque()
        self._crashes = CrashWatch()
        self._shm = ShmSweeper()  # dead processes' shared-memory segments
        self.watchdog = Watchdog(watchdog_interval(), WATCHDOG_STALE)
        self.ready_notified = False
        """READY=1 was sent to systemd (once /ready would answer 200)."""

    def _load(self) -> AgentConfig:
        """The file, with the command line's overrides (kept on every reload)."""
        cfg = load_agent_config(self.config_path)
        if self._nats_url is not None:
            cfg = dataclasses.replace(cfg, nats=dataclasses.replace(cfg.nats, servers=(self._nats_url,)))
        if self._http_port is not None:
            cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, port=self._http_port))
        return cfg

    @property
    def state_dir(self) -> str:
        return os.path.abspath(self.config.directories.state_dir)

    @property
    def nats_file(self) -> str:
        return os.path.join(self.state_dir, NATS_CLIENT_FILE)

    # -- lifecycle ------------------------------------------------------------

    async def prepare(self) -> None:
        """Everything that can fail fast, before anything is started (AgentStartError, ConfigError)."""
        cfg = self.config
        _private_dir(self.state_dir)
        os.makedirs(cfg.directories.log_dir, exist_ok=True)
        self._lock.acquire()
        await asyncio.to_thread(stop_leftovers, self.state_dir, self._pids)
        self._pids.remove()
        self._shm.sweep()  # after the leftovers are gone
        for leftover in (cfg.directories.socket_path, self.nats_file):
            _unlink(leftover)
        shutil.rmtree(os.path.join(self.state_dir, NATS_RUN_DIR), ignore_errors=True)
        # After the leftovers are gone, so no old worker writes there any more.
        self.metrics_dir = exposition.fresh_dir(self.state_dir)
        self.node_metrics = exposition.NodeMetrics(self, self.metrics_dir)
        self.gpus = self._gpus(cfg)
        self.programs = self._plan(cfg, self.gpus)
        if cfg.nats.embedded:
            host, port = _host_port(cfg.nats.servers[0])
            _check_port(host, port, "nats.servers", "the embedded nats-server")
            if cfg.nats.monitor_port:
                _check_port("127.0.0.1", cfg.nats.monitor_port, "nats.monitor_port", "its monitoring")
        self.http = HttpServer(self.ready_body, self.metrics)
        try:
            self.http_port = await self.http.start(cfg.http.host, cfg.http.port)
        except OSError as exc:
            self.http = None
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise AgentStartError(f"http: cannot listen on {cfg.http.host}:{cfg.http.port}: {reason}") from None

    async def start(self, stop: asyncio.Event) -> bool:
        """The embedded nats-server, the NATS connection (retried until it works or ``stop``),
        then supervisord and the workers. False if ``stop`` came first."""
        cfg = self.config
        if cfg.nats.embedded:
            await self._start_nats_server()
        self._write_nats_file()
        if not await self._connect(stop):
            return False
        await self._start_supervisord()
        loop = asyncio.get_running_loop()
        if cfg.canary.period > 0:
            self._canary_task = loop.create_task(self._canary_loop())
        self._depth_task = loop.create_task(self._queue_depth_loop())
        log.info("agent_started", node=cfg.node.name, workers=[p.name for p in self.programs],
                 http=f"{cfg.http.host}:{self.http_port}", nats=self.nats.servers[0], gpus=[g.index for g in self.gpus])
        return True

    async def _start_nats_server(self) -> None:
        cfg = self.config
        host, port = _host_port(cfg.nats.servers[0])
        n = cfg.nats
        self.nats_server = EmbeddedNatsServer(NatsServerOptions(
            host=host, port=port, monitor_port=n.monitor_port,
            store_dir=os.path.join(self.state_dir, "nats"),
            log_file=os.path.join(cfg.directories.log_dir, "nats-server.out"),
            user=n.user, password=n.password, token=n.token,
            tls_cert_file=n.tls_cert_file, tls_key_file=n.tls_key_file,
            work_dir=os.path.join(self.state_dir, NATS_RUN_DIR),
            command_prefix=die_with_parent(), env=tuple(marker_env(self.state_dir).items()),
        ))
        self.nats_server.spawn()  # from this (the main) thread: the parent-death signal follows the thread
        self._pids.set("nats-server", self.nats_server.pid)
        await asyncio.to_thread(self.nats_server.wait_ready)
        scheme = "tls" if n.tls_cert_file else "nats"
        self.nats = dataclasses.replace(n, servers=(f"{scheme}://{_url_host(host)}:{self.nats_server.port}",
                                                    *n.servers[1:]))
        log.info("nats_started", url=self.nats.servers[0], pid=self.nats_server.pid,
                 monitoring=self.nats_server.monitor_url or "off")

    def _write_nats_file(self) -> None:
        """``[nats]`` for the workers (servers with real ports, credentials): 0600, never in argv."""
        n = self.nats
        lines = ["[nats]", f"servers = {json.dumps(list(n.servers))}", f"connect_timeout = {n.connect_timeout}"]
        lines += [f"ping_interval = {n.ping_interval}", f"max_outstanding_pings = {n.max_outstanding_pings}"]
        for key in ("user", "password", "token", "creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            value = getattr(n, key)
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        _write_private(self.nats_file, "\n".join(lines) + "\n")

    async def _connect(self, stop: asyncio.Event) -> bool:
        """Connect the agent (node heartbeat) and its Client (canary, registry watch); while NATS
        is unreachable, retry with backoff and start nothing."""
        delay = 1.0
        name = f"tdist-agent {self.config.node.name}"
        while not stop.is_set():
            attempt = asyncio.ensure_future(self._connect_once(name))
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({attempt, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not attempt.done():
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                await self._disconnect()
                return False
            exc = attempt.exception()
            if exc is None:
                self.status.nats_error = None
                return True
            await self._disconnect()
            self.status.nats_error = str(exc)
            log.warning("nats_unreachable", error=str(exc), retry_in=delay)
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass
            delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        return False

    async def _connect_once(self, name: str) -> None:
        """One connection (the Client's runtime) for the node heartbeat, the canary and the watch.
        The agent deploys its namespace first: the stream and buckets, with the configured
        storage, replicas and limits (a caller never creates them)."""
        self.client = Client(self.nats, request_plane=self.config.request_plane, name=name)
        await self.client.connect()
        self.nc = self.client.runtime.nc
        kept = await ensure_namespace(self.nc, self.config.request_plane)
        if kept:
            self.status.stream_mismatch = kept
        js, ns = self.nc.jetstream(), self.config.request_plane.namespace
        self._nodes_kv = await open_bucket(js, names.nodes_bucket(ns), replicas=self.config.request_plane.replicas)
        self.watch = (await self.client.registry()).watch()
        await self.watch.__aenter__()

    async def _disconnect(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            await _quietly(watch.close())
        self.nc = None  # the client's connection: closed with it
        client, self.client = self.client, None
        if client is not None:
            await _quietly(client.close(wait_for_release=0))

    async def _start_supervisord(self) -> None:
        cfg = self.config
        conf = self._write_conf(cfg, self.programs)
        self.supervisord = Supervisord(conf, cfg.directories.socket_path, rpc_timeout=RPC_TIMEOUT,
                                       command_prefix=die_with_parent(), env=marker_env(self.state_dir))
        await self.supervisord.astart()
        self._pids.set("supervisord", self.supervisord.pid)

    async def run(self, stop: asyncio.Event, reload: asyncio.Event) -> None:
        """Watch until ``stop``; apply the file again whenever ``reload`` is set (one reload at a time).

        Each round vouches for the agent to systemd's watchdog (``Watchdog.beat``); the first
        round that finds the node ready says READY=1."""
        self.watchdog.beat()
        self._watchdog_task = asyncio.get_running_loop().create_task(self.watchdog.run())
        while not stop.is_set():
            self.watchdog.beat()
            if reload.is_set() and (self._reload_task is None or self._reload_task.done()):
                reload.clear()
                self._reload_task = asyncio.get_running_loop().create_task(self.reload())
            try:
                async with asyncio.timeout(TICK_TIMEOUT):
                    await self._tick()
            except AgentFatal:
                raise
            except Exception as exc:  # a passing failure (NATS reconnecting): log, keep watching
                log.warning("agent_tick_failed", error=f"{type(exc).__name__}: {exc}")
            self._notify_ready()
            try:
                async with asyncio.timeout(TICK):
                    await _first(stop, reload)
            except TimeoutError:
                pass

    def _notify_ready(self) -> None:
        """READY=1 the first time /ready would answer 200 (``systemctl start`` returns then)."""
        if not self.ready_notified and self.ready():
            self.ready_notified = True
            notify(f"READY=1\nSTATUS=serving: {len(self.programs)} workers")
            log.info("agent_ready", workers=len(self.programs))

    async def stop(self) -> None:
        """Drain the workers (supervisord sends SIGTERM and waits), deregister, stop, clean up.

        An agent that did not get the state dir's lock started nothing and owns nothing there:
        it only closes its HTTP socket (the state dir's processes are another agent's)."""
        if not self._lock.held:
            if self.http is not None:
                await _quietly(self.http.close())
            return
        tasks = [t for t in (self._canary_task, self._reload_task, self._depth_task, self._watchdog_task) if t]
        for task in tasks:
            task.cancel()
        await _quietly(asyncio.gather(*tasks, return_exceptions=True))
        budget = max((p.stopwaitsecs for p in self.programs), default=30) + 30
        if self.supervisord is not None:
            await self.supervisord.astop(timeout=budget)
        if self.nc is not None and self.nc.is_connected:
            try:
                async with asyncio.timeout(5):
                    await self._nodes_kv.delete(self.config.node.name)
                    for program in self.programs:
                        await self._workers_kv_delete(program.worker_id)
            except Exception as exc:
                log.warning("agent_deregister_failed", error=str(exc))
        await self._disconnect()
        if self.http is not None:
            await _quietly(self.http.close())
        if self.nats_server is not None:
            await asyncio.to_thread(self.nats_server.stop)
        # Anything of ours still running (a worker that escaped supervisord's stop): gone now.
        await asyncio.to_thread(stop_leftovers, self.state_dir, self._pids)
        self._pids.remove()
        _unlink(self.nats_file)
        self._lock.release()
        log.info("agent_stopped", node=self.config.node.name)

    async def reload(self) -> None:
        """Re-read the file; apply it only if it is valid (the running set stays otherwise).
        Never raises: failures are logged and counted."""
        try:
            await self._reload()
        finally:
            if self.ready_notified:  # ends systemd's RELOADING=1 (sent by the SIGHUP handler)
                notify("READY=1")

    async def _reload(self) -> None:
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
        except Exception as exc:
            self.status.reload_failures += 1
            log.error("reload_rejected", error=f"{type(exc).__name__}: {exc}")
            return
        try:
            self._write_conf(cfg, programs)
            # From here the file is the desired state, even if applying it fails half-way.
            self.config, self.programs, self.gpus = cfg, programs, gpus
            assert self.supervisord is not None
            stop_timeout = max((p.stopwaitsecs for p in programs), default=30) + 30
            diff = await self.supervisord.client.aupdate(stop_timeout=stop_timeout)
        except Exception as exc:
            self.status.reload_failures += 1
            self.status.reload_apply_failures += 1
            log.error("reload_apply_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.status.reloads += 1
        for name in (*diff.added, *diff.changed, *diff.removed):
            self._crashes.forget(name)  # a new configuration starts a fresh history (a fixed worker recovers)
        log.info("reloaded", added=diff.added, changed=diff.changed, removed=diff.removed)

    # -- pieces -----------------------------------------------------------------

    def _gpus(self, cfg: AgentConfig) -> tuple[GpuInfo, ...]:
        detected = detect_gpus()
        if cfg.node.gpus == "auto":
            return detected
        return describe_gpus(list(cfg.node.gpus), detected)

    def _plan(self, cfg: AgentConfig, gpus: tuple[GpuInfo, ...]) -> tuple[Program, ...]:
        # Workers write their metrics where the agent merges them (set before they import prometheus_client).
        env = ((exposition.ENV, self.metrics_dir),) if self.metrics_dir else ()
        return plan_programs(cfg, gpus, taskset="taskset" if shutil.which("taskset") else None,
                             directory=os.getcwd(), command=worker_command(sys.executable, self.nats_file),
                             prefix=die_with_parent(), extra_env=env)

    @staticmethod
    def _write_conf(cfg: AgentConfig, programs: tuple[Program, ...]) -> str:
        path = os.path.join(os.path.abspath(cfg.directories.state_dir), "supervisord.conf")
        _write_private(path, render(cfg.directories.state_dir, cfg.directories.log_dir, programs))
        return path

    async def _tick(self) -> None:
        self._shm.tick()
        sd = self.supervisord
        if sd is None or self.nc is None:
            return
        if not sd.alive:
            await self._supervisord_died()
            return
        infos = await sd.client.acall("supervisor.getAllProcessInfo")
        states = {i["name"]: i["statename"] for i in infos}
        pids = {i["name"]: int(i.get("pid") or 0) for i in infos}
        seen = self.watch.workers if self.watch is not None else {}
        entries = {p.worker_id: seen[p.worker_id] for p in self.programs if p.worker_id in seen}
        clock = time.monotonic()
        for program in self.programs:
            before = self.status.pids.get(program.name, 0)
            now = pids.get(program.name, 0)
            if now != before:
                self.status.canary_failures.pop(program.name, None)
                self.status.registered_pid.pop(program.name, None)
                if before:
                    self.status.restarts[program.name] = self.status.restarts.get(program.name, 0) + 1
                    self._crashes.exited(program.name, clock)
                    self._process_gone(before)
                    log.warning("worker_process_gone", program=program.name, worker=program.worker_id,
                                old_pid=before, new_pid=now or None, state=states.get(program.name))
            if self.status.unhealthy.get(program.name, now) != now:
                self.status.unhealthy.pop(program.name)
            entry = entries.get(program.worker_id)
            if entry is not None and entry.pid != now:
                # The entry of a process that is gone: remove it now, not after its TTL. The new
                # process (same worker id) registers itself when it serves; the delete is of that
                # very write, so an entry the new process made since (not yet in our watch) stays.
                revision = self.watch.revisions.get(program.worker_id) if self.watch is not None else None
                await self._workers_kv_delete(program.worker_id, revision=revision)
                entries.pop(program.worker_id)
            elif entry is not None and now:
                self.status.registered_pid[program.name] = now
        self.status.states, self.status.pids, self.status.entries = states, pids, entries
        for program in self.programs:
            self._pids.set(f"worker:{program.name}", pids.get(program.name))
        self._pids.keep_only(["nats-server", "supervisord", *(f"worker:{p.name}" for p in self.programs)])
        if self.metrics_dir:  # live gauges of workers that started and died between two ticks
            exposition.sweep(self.metrics_dir, keep=pids.values())
        await self._check_failing({i["name"]: i for i in infos}, clock)
        await self._heartbeat(states)

    def _process_gone(self, pid: int) -> None:
        if self.metrics_dir:
            exposition.process_gone(self.metrics_dir, pid)

    async def _check_failing(self, infos: dict[str, dict[str, Any]], clock: float) -> None:
        """Report crash-looping workers (tdist.agent.crashloop): a warning with the last lines of
        their output when one starts failing and when it gives up (FATAL); /ready shows them.
        A failing worker counts as recovered once it is up (running, registered, canary)."""
        failing = self.status.failing
        for gone in set(failing) - {p.name for p in self.programs}:
            failing.pop(gone)
        for program in self.programs:
            info = infos.get(program.name, {})
            state = info.get("statename")
            known = failing.get(program.name)
            if not self._crashes.failing(program.name, state, clock):
                if known is None:
                    continue
                if self.worker_up(program):
                    failing.pop(program.name)
                    log.info("worker_recovered", program=program.name, worker=program.worker_id)
                    continue
            lines = await asyncio.to_thread(crashloop.tail, program.stdout_logfile)
            exits = self._crashes.recent_exits(program.name, clock)
            now = Failing(program.name, program.worker_id, state or "UNKNOWN", exits, program.stdout_logfile,
                          lines, str(info.get("spawnerr") or ""))
            failing[program.name] = now
            if known is None or (now.state == "FATAL" and known.state != "FATAL"):
                log.warning("worker_crash_looping", program=program.name, worker=program.worker_id, state=now.state,
                            exits=exits, spawn_error=now.spawn_error or None, log=now.log, tail=lines)

    async def _heartbeat(self, states: dict[str, str]) -> None:
        assert self.nc is not None
        node = {
            "name": self.config.node.name, "host": socket.gethostname(), "agent_version": __version__,
            "pid": os.getpid(), "started_at": self.started_at, "http": f"{self.config.http.host}:{self.http_port}",
            "gpus": [asdict(g) for g in self.gpus], "ready": self.ready(),
            "workers": {p.worker_id: states.get(p.name, "UNKNOWN") for p in self.programs},
            "unhealthy": sorted(self.status.unhealthy),
        }
        ns = self.config.request_plane.namespace
        await put_with_ttl(self.nc.jetstream(), names.nodes_bucket(ns), self.config.node.name,
                           json.dumps(node).encode(), NODE_TTL)

    async def _workers_kv_delete(self, worker_id: str, *, revision: int | None = None) -> None:
        assert self.client is not None
        await (await self.client.registry()).delete(worker_id, revision=revision)

    async def _supervisord_died(self) -> None:
        """supervisord is gone: make sure its workers are gone too, then start it again (or give up)."""
        sd = self.supervisord
        assert sd is not None and sd.proc is not None
        code = sd.proc.returncode
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > SUPERVISORD_DEATH_WINDOW:
            self._deaths.popleft()
        for pid in self.status.pids.values():
            self._process_gone(pid)
        self.status.states, self.status.entries = {}, {}
        self.status.registered_pid.clear()
        self.status.canary_failures.clear()
        if len(self._deaths) >= SUPERVISORD_MAX_DEATHS:
            log.error("supervisord_died", code=code, restarting=False, deaths=len(self._deaths))
            raise AgentFatal(f"supervisord died {len(self._deaths)} times within {SUPERVISORD_DEATH_WINDOW:.0f} s "
                             f"(last exit {code}): stopping so that the service manager starts the agent afresh")
        log.error("supervisord_died", code=code, restarting=True)
        keep = [self.nats_server.pid] if self.nats_server is not None and self.nats_server.pid else []
        stopped = await asyncio.to_thread(stop_leftovers, self.state_dir, self._pids, exclude=keep)
        for program in self.programs:
            try:
                await self._workers_kv_delete(program.worker_id)
            except Exception as exc:
                log.warning("worker_deregister_failed", worker=program.worker_id, error=str(exc))
        _unlink(self.config.directories.socket_path)
        self.status.pids = {}
        await self._start_supervisord()
        self.status.supervisord_restarts += 1
        log.warning("supervisord_restarted", pid=self.supervisord.pid if self.supervisord else None,
                    orphans_stopped=stopped)

    # -- canary -------------------------------------------------------------------

    async def _canary_loop(self) -> None:
        """Every period, one directed request to each serving worker, all at once."""
        period = self.config.canary.period
        while True:
            await asyncio.sleep(period)
            targets = [p for p in self.programs if self._canary_target(p)]
            if not targets:
                continue
            results = await asyncio.gather(*(self._canary_one(p) for p in targets), return_exceptions=True)
            for program, result in zip(targets, results, strict=True):
                await self._canary_result(program, result)

    def _canary_target(self, program: Program) -> bool:
        pid = self.status.pids.get(program.name, 0)
        return (bool(pid) and self.status.states.get(program.name) == "RUNNING"
                and self.status.registered_pid.get(program.name) == pid and program.name not in self.status.unhealthy)

    async def _canary_one(self, program: Program) -> None:
        assert self.client is not None
        call = self._worker_config(program).canary
        timeout = self.config.canary.timeout
        inputs = {k: np.asarray(v) for k, v in call.inputs.items()}
        self.status.canary_sent += 1
        async with asyncio.timeout(timeout + 1.0):
            await self.client.operator(call.operator, call.version, target_worker=program.worker_id).infer(
                inputs, parameters=dict(call.parameters), timeout=timeout)

    async def _canary_result(self, program: Program, result: BaseException | None) -> None:
        pid = self.status.pids.get(program.name, 0)
        if result is None:
            self.status.canary_failures.pop(program.name, None)
            return
        self.status.canary_failed += 1
        failures = self.status.canary_failures.get(program.name, 0) + 1
        self.status.canary_failures[program.name] = failures
        error = f"{type(result).__name__}: {result}"
        log.warning("canary_failed", program=program.name, worker=program.worker_id, pid=pid, failures=failures,
                    error=error)
        if failures < self.config.canary.failures:
            return
        self.status.unhealthy[program.name] = pid
        self.status.canary_failures.pop(program.name, None)
        self.status.canary_restarts += 1
        log.error("worker_unhealthy", program=program.name, worker=program.worker_id, pid=pid, failures=failures,
                  action="restart")
        await _quietly(self._mark_unhealthy(program))
        sd = self.supervisord
        if sd is not None and sd.alive:
            # SIGKILL: the worker does not answer, so it would not drain either (a stopped process does
            # not even see SIGTERM). Its unacknowledged requests go to other workers; supervisord
            # starts it again (autorestart).
            try:
                await sd.client.acall("supervisor.signalProcess", program.name, "KILL")
            except Exception as exc:
                log.warning("worker_restart_failed", program=program.name, error=str(exc))

    async def _mark_unhealthy(self, program: Program) -> None:
        entry = self.status.entries.get(program.worker_id)
        if entry is None or self.nc is None:
            return
        marked = dataclasses.replace(entry, state="unhealthy")
        ns = self.config.request_plane.namespace
        await put_with_ttl(self.nc.jetstream(), names.workers_bucket(ns), program.worker_id, marked.to_json(),
                           entry.ttl)

    def _worker_config(self, program: Program) -> AgentWorkerConfig:
        return next(w for w in self.config.workers if w.name == program.worker)

    # -- state ------------------------------------------------------------------

    def services_up(self) -> bool:
        """supervisord runs (checked now, not at the last tick) and NATS is connected."""
        return (self.supervisord is not None and self.supervisord.alive
                and self.nc is not None and self.nc.is_connected)

    def ready(self) -> bool:
        """supervisord and NATS up, and every desired worker RUNNING, registered by that very
        process, and answering the canary."""
        return self.services_up() and bool(self.programs) and all(self.worker_up(p) for p in self.programs)

    def worker_up(self, program: Program) -> bool:
        """RUNNING, registered by that very process, not found unhealthy by the canary, and (checked
        now, not at the last tick) still alive: a killed worker turns /ready to 503 at once."""
        entry = self.status.entries.get(program.worker_id)
        pid = self.status.pids.get(program.name)
        return (self.status.states.get(program.name) == "RUNNING" and entry is not None and bool(pid)
                and entry.pid == pid and program.name not in self.status.unhealthy and alive(pid))

    def uptime(self) -> float:
        return time.time() - self.started_at

    async def metrics(self) -> bytes:
        """``/metrics``: the workers' families, the agent's own, build info (tdist.agent.exposition)."""
        return await self.node_metrics.render()

    def ready_body(self) -> dict[str, Any]:
        """``/ready``'s JSON. ``failing``: per crash-looping worker, its state and last output lines."""
        return {
            "ready": self.ready(), "workers": self.status.states, "nats": self.nats.servers[0],
            "nats_connected": bool(self.nc is not None and self.nc.is_connected), "nats_error": self.status.nats_error,
            "stream_mismatch": self.status.stream_mismatch,
            "supervisord": bool(self.supervisord is not None and self.supervisord.alive),
            "unhealthy": sorted(self.status.unhealthy),
            "failing": {name: f.to_json() for name, f in sorted(self.status.failing.items())},
        }

    # -- queue depth --------------------------------------------------------------

    async def _queue_depth_loop(self) -> None:
        """Every QUEUE_DEPTH_PERIOD, each configured operator's pending count (off the scrape path)."""
        while True:
            await self._refresh_queue_depth()
            await asyncio.sleep(QUEUE_DEPTH_PERIOD)

    async def _refresh_queue_depth(self) -> None:
        nc = self.nc
        if nc is None or not nc.is_connected:
            self.status.queue_depth = {}
            return
        js = nc.jetstream()
        stream = names.stream_name(self.config.request_plane.namespace)
        operators = sorted({(o.name, o.version) for w in self.config.workers for o in w.worker.operators})
        depth: dict[tuple[str, int], int] = {}
        for name, version in operators:
            try:
                async with asyncio.timeout(2.0):
                    info = await js.consumer_info(stream, names.shared_consumer(name, version))
            except Exception:  # no consumer yet (no worker pulled), or NATS is reconnecting: no sample
                continue
            depth[(name, version)] = int(info.num_pending or 0)
        self.status.queue_depth = depth


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _quietly(aw: Any, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            await aw
    except Exception as exc:
        log.warning("agent_step_failed", error=f"{type(exc).__name__}: {exc}")


def _host_port(url: str) -> tuple[str, int]:
    where = urlparse(url)
    return where.hostname or "127.0.0.1", (where.port if where.port is not None else 4222)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_port(host: str, port: int, key: str, what: str) -> None:
    """Fail at once, in one line, if ``host:port`` cannot be listened on (0: any port, nothing to check)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server's listener does
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror or exc}"
            raise AgentStartError(f"{key}: {host}:{port} {reason} ({what} listens there)") from None


def _private_dir(path: str) -> None:
    """Make ``path`` (0700), or tighten it to 0700 whoever made it (systemd's StateDirectory= is 0755)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: str, text: str) -> None:
    """Write ``path`` atomically, mode 0600 from its creation on."""
    tmp = f"{path}.tmp"
    _unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
