"""The metric families of tdist processes, on prometheus_client.

One scrape target per node: the agent's ``/metrics``. Workers run with
``PROMETHEUS_MULTIPROC_DIR`` set by the agent (before anything imports
prometheus_client), so each worker writes its values to memory-mapped files in
that directory and the agent merges them with ``MultiProcessCollector`` on every
scrape: counters and histograms add up across processes (and survive a worker's
restart), gauges of live processes are summed. A process without the variable
(a client, a test) keeps its values in its own registry.

Cost measured on this machine: an ``inc()`` on a multiprocess counter is about
1 µs (an mmap write under a lock), and a request touched seven values (about 6 µs of
the worker's 64 µs of CPU per request at 64 in flight). So a worker's per-request
values go through ``OperatorMetrics``: counted in plain Python in the worker and
added to the shared values in one go by ``flush()`` (every quarter second while
busy, and whenever the worker falls idle), at about 0.4 µs per request.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# Request latencies from 0.5 ms to 60 s: the request plane's round trip is about 0.7 ms here.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter(
    "tdist_requests", "Requests finished by workers, by operator, version and outcome "
    "(ok, or the error code in lower case).", ["operator", "version", "outcome"])
QUEUE_SECONDS = Histogram(
    "tdist_request_queue_seconds", "Time from a request's publish to the start of its execution "
    "(stream wait, delivery and slot wait).", ["operator"], buckets=LATENCY_BUCKETS)
RUN_SECONDS = Histogram(
    "tdist_request_duration_seconds", "Time a worker spent on a request: input pulls, the operator, "
    "the final response.", ["operator"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge(
    "tdist_requests_in_flight", "Requests running in workers now.", ["operator"], multiprocess_mode="livesum")
REDELIVERIES = Counter(
    "tdist_request_redeliveries", "Requests delivered again (attempt > 1): a worker died or missed its ack.",
    ["operator"])
REPLAYED = Counter(
    "tdist_request_replays", "Repeated requests answered from a kept final response (a caller lost it "
    "in a reconnect), without running them again.", ["operator"])
ABANDONED = Counter(
    "tdist_requests_abandoned", "Requests whose operator did not stop after its deadline.", ["operator"])
DATA_PLANE_BYTES = Counter(
    "tdist_data_plane_bytes", "Tensor bytes moved by the data plane, pulled by or served by this node's "
    "processes.", ["direction"])
DATA_PLANE_PULLS = Counter(
    "tdist_data_plane_pulls", "Tensors pulled from their owners, by path: shm (read from the owner's "
    "shared-memory segment on this host), ipc (CUDA IPC), ucx (UCX: another host, or the segment not readable).",
    ["path"])
STORE_BYTES = Gauge(
    "tdist_data_plane_store_bytes", "Bytes of tensors held for consumers (sampled every second).",
    multiprocess_mode="livesum")
LEASES_EXPIRED = Counter(
    "tdist_data_plane_leases_expired", "Tensor references freed by their lease (a consumer never released).")
TRITON_RESTARTS = Counter(
    "tdist_triton_server_restarts", "Triton servers restarted after they died.")


class _BufferedHistogram:
    """Observations of one histogram child, bucketed here and added to it by ``flush()``.

    Uses the child's ``_upper_bounds``, ``_buckets`` and ``_sum`` (prometheus_client 0.x's
    Histogram; ``observe()`` adds to the same values one observation at a time)."""

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._dirty = False

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        counts, self._counts = self._counts, [0] * len(self._bounds)
        for bucket, count in zip(self._child._buckets, counts):
            if count:
                bucket.inc(count)
        self._child._sum.inc(self._sum)
        self._sum = 0.0


class OperatorMetrics:
    """The per-request values of one hosted operator, buffered in the worker (see the module doc)."""

    def __init__(self, operator: str, version: int) -> None:
        self._operator, self._version = operator, str(version)
        self.queue = _BufferedHistogram(QUEUE_SECONDS.labels(operator))
        self.run = _BufferedHistogram(RUN_SECONDS.labels(operator))
        self._in_flight = IN_FLIGHT.labels(operator)
        self._outcomes: dict[str, int] = {}
        self._shown_in_flight = 0

    def count(self, outcome: str) -> None:
        """One finished request with this outcome ("ok", or an error code in lower case)."""
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def flush(self, in_flight: int) -> None:
        """Add what was counted since the last flush; show ``in_flight`` as the in-flight gauge."""
        if self._outcomes:
            outcomes, self._outcomes = self._outcomes, {}
            for outcome, count in outcomes.items():
                REQUESTS.labels(self._operator, self._version, outcome).inc(count)
        self.queue.flush()
        self.run.flush()
        if in_flight != self._shown_in_flight:
            self._shown_in_flight = in_flight
            self._in_flight.set(in_flight)
