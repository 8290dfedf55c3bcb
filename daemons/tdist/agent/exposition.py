"""The node's one scrape target: what the agent's ``/metrics`` serves.

What it serves (``NodeMetrics``):

- the workers' families (``tdist.metrics``), merged by ``MultiProcessCollector`` from the
  directory every worker writes to (``<state_dir>/metrics``, ``PROMETHEUS_MULTIPROC_DIR``
  in each worker's environment). Counters and histograms of dead processes stay (they
  survive a worker's restart); the live gauges of a process are dropped when the agent
  sees it gone (``process_gone``, and ``sweep`` for the ones it missed). The directory is
  emptied at each start of the agent, so every counter starts again from zero then;
- the agent's own state (``AgentCollector``): worker processes by supervisord state, each
  worker up or not and its restarts, crash-looping workers, reloads and their failures,
  supervisord restarts, canary counts, readiness, NATS connected, uptime, and the queue
  depth per operator (refreshed by the agent every few seconds, never on the scrape);
- ``tdist_build_info``.

Every worker process that ever wrote a value leaves its counter and histogram files (one set
per PID, sparse: about 5 KiB on disk each): a scrape reads them all, so its cost grows with the
worker restarts since the agent started. Measured on this machine (2 cores shared): 4 ms for 2
workers that served 200 requests each, 43 ms after 100 worker processes. That part is read in a
thread, off the event loop, so a slow scrape never delays the agent's ticks or its watchdog.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Info, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tdist.agent.daemon import Agent

METRICS_DIR = "metrics"
ENV = "PROMETHEUS_MULTIPROC_DIR"
SUPERVISOR_STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")
_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def fresh_dir(state_dir: str) -> str:
    """``<state_dir>/metrics``, emptied (an earlier agent's workers' files are gone), mode 0700."""
    path = os.path.join(os.path.abspath(state_dir), METRICS_DIR)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    return path


def process_gone(path: str, pid: int) -> None:
    """Drop ``pid``'s live gauges (its in-flight requests, its store bytes) from the merge."""
    if pid:
        mark_process_dead(pid, path)


def sweep(path: str, keep: Iterable[int] = ()) -> list[int]:
    """``process_gone`` for every PID with live-gauge files that is not running (and not in
    ``keep``): a worker that started and died between two ticks. The PIDs dropped."""
    keep = set(keep)
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    pids = {int(m.group(1)) for n in names if (m := _LIVE_FILE.fullmatch(n))}
    gone = sorted(p for p in pids - keep if not _running(p))
    for pid in gone:
        mark_process_dead(pid, path)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AgentCollector(Collector):
    """The agent's own families, read from its state when scraped (nothing here does I/O)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        a, s = self.agent, self.agent.status
        counts = dict.fromkeys(SUPERVISOR_STATES, 0)
        for state in s.states.values():
            counts[state] = counts.get(state, 0) + 1
        workers = GaugeMetricFamily("tdist_agent_workers", "Worker processes by supervisord state.",
                                    labels=["state"])
        for state, n in counts.items():
            workers.add_metric([state], n)
        yield workers

        up = GaugeMetricFamily("tdist_agent_worker_up", "1 if the worker is RUNNING, registered by that very process "
                               "and answers the canary.", labels=["worker", "program"])
        restarts = CounterMetricFamily("tdist_agent_worker_restarts", "Times a worker's process was replaced "
                                       "(it died or was killed, and supervisord started it again).",
                                       labels=["worker", "program"])
        looping = GaugeMetricFamily("tdist_agent_worker_crash_looping", "1 while the worker is in BACKOFF or FATAL "
                                    "or was restarted repeatedly (see /ready for its last output lines).",
                                    labels=["worker", "program"])
        for p in a.programs:
            up.add_metric([p.worker_id, p.name], int(a.worker_up(p)))
            restarts.add_metric([p.worker_id, p.name], s.restarts.get(p.name, 0))
            looping.add_metric([p.worker_id, p.name], int(p.name in s.failing))
        yield up
        yield restarts
        yield looping

        counters = [
            ("tdist_agent_reloads", "Reloads (SIGHUP) applied.", s.reloads),
            ("tdist_agent_reload_failures", "Reloads refused (invalid file) or whose apply failed.",
             s.reload_failures),
            ("tdist_agent_reload_apply_failures", "Reloads of a valid file whose apply to supervisord failed.",
             s.reload_apply_failures),
            ("tdist_agent_supervisord_restarts", "Times supervisord died and the agent started it again.",
             s.supervisord_restarts),
            ("tdist_agent_canary_requests", "Canary requests sent to workers.", s.canary_sent),
            ("tdist_agent_canary_failures", "Canary requests that failed or timed out.", s.canary_failed),
            ("tdist_agent_canary_restarts", "Workers killed (and restarted) after failing the canary.",
             s.canary_restarts),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)

        yield GaugeMetricFamily("tdist_agent_ready", "1 if /ready answers 200.", value=int(a.ready()))
        yield GaugeMetricFamily("tdist_agent_nats_connected", "1 if the agent's NATS connection is up.",
                                value=int(a.nc is not None and a.nc.is_connected))
        yield GaugeMetricFamily("tdist_agent_uptime_seconds", "Seconds since the agent started.",
                                value=round(a.uptime(), 3))

        depth = GaugeMetricFamily(
            "tdist_queue_depth", "Requests waiting in the stream for an operator: its shared consumer's "
            "num_pending (namespace-wide, so every node reports the same; refreshed every few seconds).",
            labels=["operator", "version"])
        for (operator, version), pending in sorted(s.queue_depth.items()):
            depth.add_metric([operator, str(version)], pending)
        yield depth


class NodeMetrics:
    """The text ``/metrics`` serves: the workers' families (read from ``path`` in a thread: the
    files of every worker process since the agent started, see the module's docstring) followed
    by the agent's own and build info (read from the agent's state on the event loop, where it
    changes). ``path`` None: before the agent made the directory, the workers' part is empty."""

    def __init__(self, agent: Agent, path: str | None) -> None:
        self.path = path
        self.workers = CollectorRegistry(auto_describe=False)
        if path is not None:
            MultiProcessCollector(self.workers, path)
        self.own = CollectorRegistry(auto_describe=False)
        self.own.register(AgentCollector(agent))
        Info("tdist_build", "The tdist version the agent runs and its Python.", registry=self.own).info(
            {"version": _version(), "python": ".".join(map(str, sys.version_info[:3]))})

    async def render(self) -> bytes:
        own = generate_latest(self.own)
        workers = await asyncio.to_thread(generate_latest, self.workers) if self.path is not None else b""
        return workers + own


def _version() -> str:
    try:
        return metadata.version("tdist")
    except metadata.PackageNotFoundError:
        return "unknown"
