"""The metric families of tdist processes, on prometheus_client.

One scrape target per node: the agent's ``/metrics``. Workers run with
``PROMETHEUS_MULTIPROC_DIR`` set by the agent (before anything imports
prometheus_client), so each worker writes its values to memory-mapped files in
that directory and the agent merges them with ``MultiProcessCollector`` on every
scrape: counters and histograms add up across processes (and survive a worker's
restart), gauges of live processes are summed. A process without the variable
(a client, a test) keeps its values in its own registry.

Cost measured on this machine: an ``inc()`` on a multiprocess counter is about
1 µs (an mmap write); a request touches five values.
"""

from __future__ import annotations

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
DATA_PLANE_PULLS = Counter("tdist_data_plane_pulls", "Tensors pulled from their owners.")
STORE_BYTES = Gauge(
    "tdist_data_plane_store_bytes", "Bytes of tensors held for consumers (sampled every second).",
    multiprocess_mode="livesum")
LEASES_EXPIRED = Counter(
    "tdist_data_plane_leases_expired", "Tensor references freed by their lease (a consumer never released).")
TRITON_RESTARTS = Counter(
    "tdist_triton_server_restarts", "Triton servers restarted after they died.")
