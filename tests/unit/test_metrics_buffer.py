"""Buffered per-request metrics: after a flush they read exactly as if each value had been
recorded directly (prometheus_client's own observe/inc), and nothing shows before the flush."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from tdist import metrics
from tdist.metrics import OperatorMetrics, _BufferedHistogram

VALUES = [0.0, 0.0004, 0.0005, 0.0006, 0.001, 0.003, 0.7, 59.0, 60.0, 61.0, 1e9]


def _samples(registry: CollectorRegistry, label: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value
            for family in registry.collect() for s in family.samples
            if s.labels.get("operator") == label and not s.name.endswith("_created")}


def test_a_flushed_buffer_reads_as_direct_observations() -> None:
    registry = CollectorRegistry()
    hist = Histogram("t_seconds", "test", ["operator"], buckets=metrics.LATENCY_BUCKETS, registry=registry)
    buffered = _BufferedHistogram(hist.labels("buffered"))
    for value in VALUES:
        hist.labels("direct").observe(value)
        buffered.observe(value)
    assert _samples(registry, "buffered")[("t_seconds_count", "")] == 0  # nothing before the flush
    buffered.flush()
    buffered.flush()  # a second flush adds nothing
    direct = _samples(registry, "direct")
    assert direct[("t_seconds_count", "")] == len(VALUES)
    assert _samples(registry, "buffered") == direct


def test_operator_metrics_flush_counts_outcomes_and_in_flight() -> None:
    op = OperatorMetrics("buffer-test-op", 3)
    ok = metrics.REQUESTS.labels("buffer-test-op", "3", "ok")
    failed = metrics.REQUESTS.labels("buffer-test-op", "3", "operator_error")
    in_flight = metrics.IN_FLIGHT.labels("buffer-test-op")
    before_ok, before_failed = ok._value.get(), failed._value.get()
    for _ in range(5):
        op.count("ok")
    op.count("operator_error")
    op.run.observe(0.002)
    assert ok._value.get() == before_ok
    op.flush(in_flight=4)
    assert ok._value.get() == before_ok + 5 and failed._value.get() == before_failed + 1
    assert in_flight._value.get() == 4
    op.flush(in_flight=0)
    assert ok._value.get() == before_ok + 5 and in_flight._value.get() == 0
