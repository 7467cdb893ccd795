"""Recorder stage: keeps a sampled trace of prices, model output, VPIN and P&L for reports.

The command line appends it after the signal stage when it writes outputs, so that
``nautilus-pipeline report`` can draw price, signals, VPIN and P&L without keeping every
tick: it keeps one trade row in ``every`` per symbol (every one by default) and writes
``<dir>/trace.parquet`` at the end. Sampling is by each symbol's trade count, so the trace
does not depend on the batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..compute import ComputeStream
from ..events import KIND_TRADE
from ..memory import Lease
from ..stage import Stage, StageContext

TRACE_COLUMNS = ("ts_ns", "symbol_id", "price", "prediction", "vpin", "toxic", "position", "pnl",
                 "drawdown", "kill", "signal_side")


class RecorderStage(Stage):
    """Copies every ``every``-th trade row of each symbol (the columns that exist) to a trace."""

    def __init__(self, path: str | Path, *, every: int = 1, available: tuple[str, ...] = TRACE_COLUMNS,
                 name: str = "recorder"):
        self.name = name
        self.path = Path(path)
        self.every = max(int(every), 1)
        self.columns = tuple(c for c in TRACE_COLUMNS if c in available)
        self.reads = (*self.columns, "kind")
        self._parts: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        self._seen: dict[int, int] = {}

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        trades = lease["kind"] == KIND_TRADE
        if self.every > 1:
            sym = lease["symbol_id"]
            keep = np.zeros(lease.length, dtype=bool)
            for key in np.unique(sym[trades]):
                rows = np.flatnonzero(trades & (sym == key))
                seen = self._seen.get(int(key), 0)
                keep[rows[(seen + np.arange(rows.size)) % self.every == 0]] = True
                self._seen[int(key)] = seen + rows.size
            trades = keep
        for c in self.columns:
            self._parts[c].append(lease[c][trades].copy())

    async def finish(self, ctx: StageContext) -> None:
        if not self._parts or not self._parts[self.columns[0]]:
            return
        table = {c: np.concatenate(self._parts[c]) for c in self.columns}
        names = ctx.symbols.names if ctx.symbols is not None else []
        sym = table.pop("symbol_id")
        table["symbol"] = np.asarray(names, dtype=object)[sym] if names else sym.astype(str)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), self.path)
