"""Recorder stage: keeps a sampled trace of prices, model output, VPIN and P&L for reports.

The command line appends it after the signal stage when it writes outputs, so that
``nautilus-pipeline report`` can draw price, signals, VPIN and P&L without keeping every
tick: it keeps one trade row in ``every`` per symbol (every one by default), one quote row
in ``every`` when ``bid``/``ask`` are recorded (for the report's bid/ask band), and every
trade row where the simulated position changed and each symbol's last trade row (the
fills and the final mark, so that the report's fill count, fees, turnover and net P&L are
exact however sparse the sampling), and writes them to ``<dir>/trace.parquet``. Sampling
is by each symbol's trade (or quote) count, so the trace does not depend on the batch size.

The file is written while the run goes, not at its end: every ``ROW_GROUP_ROWS`` rows kept
become one row group, encoded and written by a writer thread of the stage's own (pyarrow
releases the GIL there), to ``trace.parquet.partial``, renamed at ``finish``. Written in one
piece at the end it was the run's tail: 40-165 ms on one core after the last batch of a
2M-trade replay (~200K trace rows), a tenth of that run's wall time at 1 core busy
(``scripts/bench_pipeline.py``); and a run with ``--trace-every 1`` kept every row in memory.
Row groups are cut by row count, so the file's rows and row groups do not depend on the
batch size either. A live run that spools its trace at each snapshot
(``bridge.trace_spool``) keeps the rows in memory between snapshots instead
(``stream_to_file = False``). A write error (a full disk, a folder in the way) does not
stop the run: it is raised at ``finish``, where the run reports the outputs it could not
write, and nothing of the file is left. A run that recorded batches but kept no row (a
book-only input) writes a trace of no rows; a stage that saw no batch writes none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..compute import ComputeStream
from ..events import KIND_QUOTE, KIND_TRADE
from ..io import arrow_numpy
from ..io.parquet_out import dictionary_columns
from ..memory import Lease
from ..stage import LIGHT_OFFLOAD_MIN_ROWS, Stage, StageContext

TRACE_COLUMNS = ("ts_ns", "symbol_id", "kind", "price", "bid", "ask", "prediction", "vpin", "toxic",
                 "position", "pnl", "drawdown", "kill", "signal_side")
_WRITES_IN_FLIGHT = 4  # row groups handed to the writer thread and not yet written, at most


class RecorderStage(Stage):
    """Copies every ``every``-th trade row of each symbol (the columns that exist) to a trace."""

    offload = LIGHT_OFFLOAD_MIN_ROWS  # a replay batch costs about a hop: inline (stage.py)
    ROW_GROUP_ROWS = 65_536
    """Rows of one row group of ``trace.parquet``, written as soon as they are kept."""

    def __init__(self, path: str | Path, *, every: int = 1, available: tuple[str, ...] = TRACE_COLUMNS,
                 name: str = "recorder"):
        self.name = name
        self.path = Path(path)
        self.stream_to_file = True
        """Write row groups while the run goes (off: keep every row until ``finish`` or
        ``take_rows``, as the live run's trace spool needs)."""
        self.every = max(int(every), 1)
        self.columns = tuple(c for c in TRACE_COLUMNS if c in available)
        self.reads = tuple(dict.fromkeys((*self.columns, "kind", "symbol_id")))
        self._parts: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        self._seen: dict[tuple[int, int], int] = {}
        self._position: dict[int, float] = {}
        self._tail: dict[int, dict[str, np.ndarray] | None] = {}  # last trade row, if not kept
        self._kept = 0  # rows in _parts
        self._dtypes: dict[str, np.dtype] | None = None  # the columns', from the first batch recorded
        self._file: _TraceFile | None = None  # the row groups written so far, from the first

    @property
    def partial_path(self) -> Path:
        """Where the row groups go until ``finish`` renames the file to ``path``."""
        return self.path.with_name(self.path.name + ".partial")

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        # a batch of LIGHT_OFFLOAD_MIN_ROWS rows or more on the stream's worker: the sampling
        # and copies of a 262,144-row batch took ~19 ms of the event loop's thread (H200 host,
        # scripts/profile_pipeline.py), time the loop's dispatch of every other stage waited
        # behind; a 4,096-row replay batch costs about a hop and stays inline (stage.py)
        await stream.run(self._record, lease)
        if self.stream_to_file and self._kept >= self.ROW_GROUP_ROWS:
            await self._write_groups(ctx, final=False)

    def _record(self, lease: Lease) -> None:
        kind, sym = lease["kind"], lease["symbol_id"]
        kinds = (KIND_TRADE, KIND_QUOTE) if "bid" in self.columns else (KIND_TRADE,)
        if self._dtypes is None:
            self._dtypes = {c: lease[c].dtype for c in self.columns}
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
        self._kept += int(np.count_nonzero(keep))

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
                if c == self.columns[0]:
                    self._kept += 1
        if self._dtypes is None:
            if not self._kept:
                return  # no batch recorded and no restored last trade row: no trace file
            # a resumed segment with no batch of its own: the restored last trade rows are its trace
            self._dtypes = {c: tail[c].dtype for tail in self._tail.values() if tail for c in self.columns}
        # a run whose batches kept no row (book-only input) writes a trace of no rows, as
        # the file written whole at the end did (a report and a batch job's paths expect it)
        await self._write_groups(ctx, final=True)
        file, self._file = self._file, None
        assert file is not None
        try:
            await asyncio.wrap_future(file.close())
            file.join()  # its thread has ended by now or is about to: no thread outlives the stage
            os.replace(file.path, self.path)
        except BaseException:
            file.abandon()  # joins the thread, removes the partial file
            raise

    def close(self) -> None:
        """A run closed without ``finish`` (cancelled, or a stage failed at its end): the
        writer thread is joined and the partial file removed, no trace is left."""
        if self._file is not None:
            self._file.abandon()
            self._file = None

    async def _write_groups(self, ctx: StageContext, *, final: bool) -> None:
        """Hand the kept rows to the writer thread as row groups of ``ROW_GROUP_ROWS`` rows
        (all of them when ``final``, the last group shorter, or one of no rows if none was
        written); the rest stays kept. A write error (here or on the thread) is raised by
        ``finish``, where every output's write error is raised, not by a batch."""
        if self._file is None:
            if self.ROW_GROUP_ROWS < 1:
                raise ValueError(f"recorder: ROW_GROUP_ROWS must be at least 1, not {self.ROW_GROUP_ROWS}")
            self._file = _TraceFile(self.partial_path)
        names = list(ctx.symbols.names) if ctx.symbols is not None else []
        n = self._kept
        if not n:
            if final and not self._file.queued:
                assert self._dtypes is not None
                empty = {c: np.empty(0, dtype) for c, dtype in self._dtypes.items()}
                await self._file.write(lambda: self._table(empty, names))
            return
        columns = {c: np.concatenate(self._parts[c]) for c in self.columns}
        cut = n if final else n - n % self.ROW_GROUP_ROWS
        self._parts = {c: ([v[cut:].copy()] if cut < n else []) for c, v in columns.items()}
        self._kept = n - cut
        for start in range(0, cut, self.ROW_GROUP_ROWS):
            rows = {c: v[start:start + self.ROW_GROUP_ROWS] for c, v in columns.items()}
            await self._file.write(lambda rows=rows: self._table(rows, names))

    def take_rows(self, names: list[str]) -> pa.Table | None:
        """The rows kept since the last call (None: none) as ``trace.parquet``'s table
        (``names``: the symbol table's), and forget them; the sampling state stays. A live run
        moves them to disk at each snapshot, so that a restarted run's trace is the
        uninterrupted one (it sets ``stream_to_file = False`` first)."""
        if self._file is not None:
            raise RuntimeError("recorder: rows were written to the trace file already; "
                               "set stream_to_file = False before the first batch to take them")
        if not self._parts or not self._parts[self.columns[0]]:
            return None
        table = {c: np.concatenate(self._parts[c]) for c in self.columns}
        self._parts = {c: [] for c in self.columns}
        self._kept = 0
        return self._table(table, names)

    def _table(self, columns: dict[str, np.ndarray], names: list[str]) -> pa.Table:
        """``trace.parquet``'s table of these rows (the symbol ids as the symbol table's names)."""
        table = dict(columns)
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
        rows kept so far are this segment's output (in its trace file), not state."""
        return {"seen": dict(self._seen), "position": dict(self._position),
                "tail": {k: (None if v is None else dict(v)) for k, v in self._tail.items()}}

    def restore_state(self, state: dict[str, object]) -> None:
        self._seen = {tuple(k): v for k, v in state["seen"].items()}
        self._position = dict(state["position"])
        self._tail = dict(state["tail"])

    def end_segment(self) -> None:
        """The last trade row is marked at the stream's end, which is not here."""
        self._tail = {}


class _TraceFile:
    """``trace.parquet`` being written: row groups encoded and written in order by one
    thread, which this object owns (joined by :meth:`close` or :meth:`abandon`).

    The first write error is kept and raised by :meth:`close`'s future, at the run's end,
    where the run reports what it could not write (``Summary.write_error``); the run itself
    goes on, and later groups are dropped, not written."""

    def __init__(self, path: Path):
        self.path = path
        self.queued = 0
        """Row groups handed to :meth:`write` so far."""
        self._writer: pq.ParquetWriter | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trace-writer")
        self._in_flight: list[concurrent.futures.Future] = []
        self._error: BaseException | None = None

    async def write(self, make_table) -> None:
        """Queue one row group (``make_table()`` builds it on the writer thread). When
        ``_WRITES_IN_FLIGHT`` are queued (a slow disk) it waits for the oldest, without
        blocking the event loop."""
        self._in_flight = [f for f in self._in_flight if not f.done()]
        if len(self._in_flight) >= _WRITES_IN_FLIGHT:
            await asyncio.wrap_future(self._in_flight[0])
        self._in_flight.append(self._pool.submit(self._write, make_table))
        self.queued += 1

    def _write(self, make_table) -> None:
        if self._error is not None:
            return
        try:
            table = make_table()
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # a dictionary on kind, toxic, kill, signal_side and symbol only: io/parquet_out.py
                self._writer = pq.ParquetWriter(self.path, table.schema,
                                                use_dictionary=dictionary_columns(table.schema))
            self._writer.write_table(table, row_group_size=max(len(table), 1))
        except BaseException as exc:
            self._error = exc

    def _finish(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except BaseException as exc:
                self._error = self._error or exc
            self._writer = None
        if self._error is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise self._error

    def close(self) -> concurrent.futures.Future:
        """After the last write: the footer written and the thread ended (a future, done when
        the queued groups are written; it raises the first write error)."""
        done = self._pool.submit(self._finish)
        self._pool.shutdown(wait=False)
        return done

    def join(self) -> None:
        self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop without a file: queued groups not yet started are dropped, the thread joined,
        the partial file removed."""
        self._error = self._error or RuntimeError("trace abandoned")
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _symbols(sym: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The distinct symbol ids of the ``rows`` (a mask), ascending; one symbol (most replay
    batches) without ``np.unique``'s sort (~10 ms of 262,144 rows)."""
    s = sym[rows]
    if s.size and s[0] == s[-1] and (s == s[0]).all():
        return s[:1]
    return np.unique(s)

