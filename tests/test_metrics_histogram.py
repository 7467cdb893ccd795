"""Latency histograms: ``record_many`` (the stage runner's bulk path) puts every duration in
the bucket ``record`` would, and a stage's pending durations are in its stats when read."""

from __future__ import annotations

import numpy as np

from nautilus_pipeline.metrics import LatencyHistogram
from nautilus_pipeline.stage import StageMetrics


def test_record_many_fills_the_buckets_record_fills():
    rng = np.random.default_rng(5)
    edges = [0, 1, 31, 32, 33, 63, 64, 65, (1 << 40) - 1, 1 << 40, (1 << 53) + 1, (1 << 62) + 12345]
    values = [*edges, *rng.integers(0, 1 << 20, 2000).tolist(), *(1 << rng.integers(0, 62, 200)).tolist()]
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one.record(v)
    many.record_many(values[:100])
    many.record_many(values[100:])
    many.record_many([])
    assert many.counts == one.counts
    assert (many.total_ns, many.max_ns, many.count) == (one.total_ns, one.max_ns, one.count)


def test_a_stage_s_pending_durations_are_counted_when_read_and_bounded():
    m = StageMetrics()
    for i in range(StageMetrics.PENDING_MAX + 10):
        m.add(2, 1000 + i)
    assert len(m.pending) == 10  # folded once the list was full
    s = m.summary()
    assert s["batches"] == StageMetrics.PENDING_MAX + 10 == m.batches
    assert s["rows"] == 2 * s["batches"] and not m.pending
    assert m.busy_ns == sum(1000 + i for i in range(StageMetrics.PENDING_MAX + 10))
