"""Recorder stage: keeps a sampled trace of prices, model output, VPIN and P&L for reports.

The command line appends it after the signal stage when it writes outputs, so that
``nautilus-pipeline report`` can draw price, signals, VPIN and P&L without keeping every
tick: it keeps one trade row in ``every`` per symbol (every one by default), one quote row
in ``every`` when ``bid``/``ask`` are recorded (for the report's bid/ask band), and every
trade row where the simulated position changed and each symbol's last trade row (the
fills and the final mark, so that the report's fill count, fees, turnover and net P&L are
exact however sparse the sampling), and writes
``<dir>/trace.parquet`` at the end. Sampling is by each symbol's trade (or quote) count,
so the trace does not depend on the batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..compute import ComputeStream
from ..events import KIND_QUOTE, KIND_TRADE
from ..io import arrow_numpy
from ..memory import Lease
from ..stage import LIGHT_OFFLOAD_MIN_ROWS, Stage, StageContext

TRACE_COLUMNS = ("ts_ns", "symbol_id", "kind", "price", "bid", "ask", "prediction", "vpin", "toxic",
                 "position", "pnl", "drawdown", "kill", "signal_side")


class RecorderStage(Stage):
    """Copies every ``every``-th trade row of each symbol (the columns that exist) to a trace."""

    offload = LIGHT_OFFLOAD_MIN_ROWS  # a replay batch costs about a hop: inline (stage.py)

    def __init__(self, path: str | Path, *, every: int = 1, available: tuple[str, ...] = TRACE_COLUMNS,
                 name: str = "recorder"):
        self.name = name
        self.path = Path(path)
        self.every = max(int(every), 1)
        self.columns = tuple(c for c in TRACE_COLUMNS if c in available)
        self.reads = tuple(dict.fromkeys((*self.columns, "kind", "symbol_id")))
        self._parts: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        self._seen: dict[tuple[int, int], int] = {}
        self._position: dict[int, float] = {}
        self._tail: dict[int, dict[str, np.ndarray] | None] = {}  # last trade row, if not kept

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        # a batch of LIGHT_OFFLOAD_MIN_ROWS rows or more on the stream's worker: the sampling
        # and copies of a 262,144-row batch took ~19 ms of the event loop's thread (H200 host,
        # scripts/profile_pipeline.py), time the loop's dispatch of every other stage waited
        # behind; a 4,096-row replay batch costs about a hop and stays inline (stage.py)
        await stream.run(self._record, lease)

    def _record(self, lease: Lease) -> None:
        kind, sym = lease["kind"], lease["symbol_id"]
        kinds = (KIND_TRADE, KIND_QUOTE) if "bid" in self.columns else (KIND_TRADE,)
        keep = np.zeros(lease.length, dtype=bool)
        for k in kinds:
            of_kind = kind == k
            if self.every == 1:
                keep |= of_kind
                continue
            for key in _symbols(sym, of_kind):
                rows = np.flatnonzero(of_kind & (sym == key))
                seen = self._seen.get((int(key), k), 0)
                keep[rows[(seen + np.arange(rows.size)) % self.every == 0]] = True
                self._seen[(int(key), k)] = seen + rows.size
        if self.every > 1:
            trades = kind == KIND_TRADE
            if "position" in self.columns:
                keep |= self._fills(lease, trades, sym)
            for key in _symbols(sym, trades):
                last = np.flatnonzero(trades & (sym == key))[-1]
                self._tail[int(key)] = None if keep[last] else {
                    c: lease[c][last:last + 1].copy() for c in self.columns}
        for c in self.columns:
            self._parts[c].append(lease[c][keep].copy())

    def _fills(self, lease: Lease, trades: np.ndarray, sym: np.ndarray) -> np.ndarray:
        """Trade rows where a symbol's position differs from its previous trade row's."""
        fills = np.zeros(lease.length, dtype=bool)
        position = lease["position"]
        for key in _symbols(sym, trades):
            rows = np.flatnonzero(trades & (sym == key))
            pos = position[rows]
            prev = np.concatenate(([self._position.get(int(key), 0.0)], pos[:-1]))
            fills[rows[pos != prev]] = True
            self._position[int(key)] = float(pos[-1])
        return fills

    async def finish(self, ctx: StageContext) -> None:
        for tail in self._tail.values():
            for c, value in (tail or {}).items():
                self._parts[c].append(value)
        table = self.take_rows(ctx.symbols.names if ctx.symbols is not None else [])
        if table is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, self.path)

    def take_rows(self, names: list[str]) -> pa.Table | None:
        """The rows kept since the last call (None: none) as ``trace.parquet``'s table
        (``names``: the symbol table's), and forget them; the sampling state stays. A live run
        moves them to disk at each snapshot, so that a restarted run's trace is the
        uninterrupted one."""
        if not self._parts or not self._parts[self.columns[0]]:
            return None
        table = {c: np.concatenate(self._parts[c]) for c in self.columns}
        self._parts = {c: [] for c in self.columns}
        sym = table.pop("symbol_id")
        # (pa.table would import pandas: io/arrow_numpy.py.) The symbol column is the table's
        # names taken by id in Arrow: a Python string per row cost ~0.2 s a million rows, a
        # third of a 1M-trade batch job's recorder time (scripts/profile_batch_job.py --profile)
        if names:
            symbol = arrow_numpy.strings(list(names)).take(arrow_numpy.from_numpy(sym))
        else:
            symbol = arrow_numpy.column(sym.astype(str))
        out = arrow_numpy.table(table)
        return out.append_column("symbol", symbol)

    def snapshot_params(self) -> dict[str, object]:
        return {"every": self.every, "columns": self.columns}

    def snapshot_state(self) -> dict[str, object]:
        """The sampling counters, each symbol's last position and unkept last trade row; the
        rows kept so far are this segment's output (written by ``finish``), not state."""
        return {"seen": dict(self._seen), "position": dict(self._position),
                "tail": {k: (None if v is None else dict(v)) for k, v in self._tail.items()}}

    def restore_state(self, state: dict[str, object]) -> None:
        self._seen = {tuple(k): v for k, v in state["seen"].items()}
        self._position = dict(state["position"])
        self._tail = dict(state["tail"])

    def end_segment(self) -> None:
        """The last trade row is marked at the stream's end, which is not here."""
        self._tail = {}


def _symbols(sym: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The distinct symbol ids of the ``rows`` (a mask), ascending; one symbol (most replay
    batches) without ``np.unique``'s sort (~10 ms of 262,144 rows)."""
    s = sym[rows]
    if s.size and s[0] == s[-1] and (s == s[0]).all():
        return s[:1]
    return np.unique(s)

