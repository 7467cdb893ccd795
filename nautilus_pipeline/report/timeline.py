"""Per-stage batch latency as percentiles over the run, for the report's latency panel.

The run's summary keeps one latency histogram per stage for the whole run: enough for a
table, useless for seeing *when* a stage slowed down (the first batch compiling numba, a
GC pause, the pool running dry). :class:`LatencyTimeline` snapshots the stages' histograms
(from ``pipe.stats()``) at most every ``interval_s`` of wall time and keeps, per window,
the percentiles of the batches that finished in it: the difference of two cumulative
histograms is the window's histogram, so nothing per batch is stored. Percentiles are
bucket upper edges, within 6.25 % of the true value (see ``metrics.py``). The same
snapshot records the buffer pool's slabs in use, high-water mark and acquire waits.

Cost: one ``pipe.stats()`` per window, measured at 2.1 ms for six stages with full
histograms on the 2-core dev box. The window is therefore self-tuning: at least
``min_interval_s`` (20 ms) and at least ``1 / budget`` (50) times the last snapshot's cost,
so the snapshots take at most about 2 % of a run while a sub-second run still gets several
windows; between windows the check is one ``perf_counter`` call per batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

QUANTILES = (0.5, 0.9, 0.99)
TIMELINE_FILE = "latency.parquet"


def _percentile(buckets: list[tuple[int, int, int]], q: float) -> int:
    """The q-quantile (0..1) in ns of ``(lower, upper, count)`` buckets: its bucket's upper edge."""
    total = sum(c for _, _, c in buckets)
    rank = max(1, round(q * total))
    seen = 0
    for _, upper, c in buckets:
        seen += c
        if seen >= rank:
            return upper
    return buckets[-1][1]


class LatencyTimeline:
    """Windows of ``(elapsed_s, market ts, stage, batches, p50/p90/p99/max ns, pool state)``."""

    def __init__(self, min_interval_s: float = 0.02, budget: float = 0.02):
        self.min_interval_s = min_interval_s
        self.budget = budget
        self.rows: list[dict[str, Any]] = []
        self._prev: dict[str, dict[int, int]] = {}
        self._t0 = time.perf_counter()
        self._next = self._t0 + min_interval_s

    def maybe_sample(self, pipe: Any, market_ts_ns: int | None) -> None:
        """Snapshot when the window has elapsed; call once per batch."""
        now = time.perf_counter()
        if now >= self._next:
            self.sample(pipe, market_ts_ns, now)

    def sample(self, pipe: Any, market_ts_ns: int | None, now: float | None = None) -> None:
        """Close the current window (also call it once at the end of the run)."""
        now = time.perf_counter() if now is None else now
        stats = pipe.stats()
        cost = time.perf_counter() - now
        self._next = now + max(self.min_interval_s, cost / self.budget)
        pool = stats["pool"]
        for st in stats["stages"]:
            prev = self._prev.get(st["stage"], {})
            window = [(lo, hi, c - prev.get(hi, 0)) for lo, hi, c in st["batch_latency_buckets"]
                      if c > prev.get(hi, 0)]
            self._prev[st["stage"]] = {hi: c for _, hi, c in st["batch_latency_buckets"]}
            if not window:
                continue
            row = {
                "elapsed_s": now - self._t0,
                "market_ts_ns": market_ts_ns if market_ts_ns is not None else -1,
                "stage": st["stage"],
                "batches": sum(c for _, _, c in window),
                **{f"p{round(q * 100)}_ns": _percentile(window, q) for q in QUANTILES},
                "max_ns": window[-1][1],
                "pool_in_use": pool["in_use"],
                "pool_high_water": pool["high_water"],
                "pool_acquire_waits": pool["acquire_waits"],
                "pool_acquire_wait_s": pool["acquire_wait_s"],
            }
            self.rows.append(row)

    def write(self, path: str | Path) -> Path | None:
        """Write the windows as Parquet; nothing (None) when no batch finished."""
        if not self.rows:
            return None
        import pyarrow.parquet as pq

        from ..io.arrow_numpy import table_from_rows  # (not from_pylist: no pandas import)

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table_from_rows(self.rows), path)
        return path
