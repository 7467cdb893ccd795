"""Latency histograms: ``record_many`` (the stage runner's bulk path) puts every duration in
the bucket ``record`` would, and a stage's pending durations are in its stats when read."""

from __future__ import annotations

import numpy as np

from nautilus_pipeline.metrics import LatencyHistogram, _bucket_upper
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


def test_percentiles_in_one_pass_equal_each_percentile_walked_alone():
    """``summary`` takes its p50/p95/p99 from ``percentiles`` (one cumulative pass): the
    same numbers as ``percentile``'s walk for every q, empty and one-value histograms too;
    ``buckets`` (non-empty ones picked with ``itertools.compress``) as a plain walk."""
    rng = np.random.default_rng(3)
    qs = (0, 1, 50, 95, 99, 99.9, 100)
    cases = [[], [7], [0], [5_000_000_000], rng.integers(0, 10_000, 1).tolist(),
             rng.lognormal(11, 2, 5_000).astype(np.int64).tolist(), rng.integers(0, 40, 300).tolist()]
    for values in cases:
        h = LatencyHistogram()
        h.record_many(values)
        assert h.percentiles(qs) == [h.percentile(q) for q in qs], values[:5]
        s = h.summary()
        assert (s["p50_us"], s["p95_us"], s["p99_us"]) == tuple(h.percentile(q) / 1e3 for q in (50, 95, 99))
        assert s["count"] == len(values) and s["mean_us"] == h.mean_ns / 1e3
        walked = [(_bucket_upper(i - 1) + 1 if i else 0, _bucket_upper(i), c) for i, c in enumerate(h.counts) if c]
        assert h.buckets() == walked
