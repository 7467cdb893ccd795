"""Tardis.dev order-book CSVs as book rows: ``incremental_book_L2`` and ``book_snapshot_N``.

``incremental_book_L2`` (``exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,
amount``): one level update a line; ``side`` bid/ask, ``amount`` the level's new total (0 removes
it). Lines with ``is_snapshot = true`` after lines without (or at the start) begin a new snapshot
of that symbol's book: a clear row (``side`` 0, NaN price, ``events.py``) is put before the first
of them, so the book is replaced, never added to (Tardis writes a snapshot on every reconnect).

``book_snapshot_N`` (``..., asks[0].price, asks[0].amount, bids[0].price, bids[0].amount, ...``):
the top N levels a line. Each line is turned into the level changes from the previous line of
the same symbol (``kernels.book.snapshot_deltas``: levels gone get size 0, new or changed levels
their size), after a clear on the symbol's first line, so that the book after a line's rows is
exactly the line's top N and order-flow imbalance sees real changes, not a rebuild. Empty fields
(a side with fewer than N levels) are no level.

Both stream with pyarrow's CSV reader in blocks (all fields as text, then converted per column
with ``convert.py``, so a bad value refuses its row, not the block). Timestamps: the unit is
taken from the magnitude of the first value (µs as Tardis writes them; ns in some exports), as
for the trade files. Record numbers are line numbers; a snapshot line's rows share its line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import DataError
from ..events import KIND_BOOK
from ..kernels.book import snapshot_deltas
from . import convert
from .chunk import BadRow, Reason, TickChunk
from .files import check_file, check_text, decoding_errors, open_stream, read_head
from .tardis import _first_row, unit_of

INCREMENTAL_HEADER = ("exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount")
_BLOCK = 1 << 22


def header_names(path: str | Path) -> list[str]:
    """The header line's field names."""
    head = read_head(path, 1 << 16).split(b"\n", 1)[0].strip(b"\r")
    return [f.strip().strip('"') for f in head.decode("utf-8", "replace").split(",")]


def snapshot_depth(names: list[str]) -> int | None:
    """N for a ``book_snapshot_N`` header, else None."""
    low = [n.strip().lower() for n in names]
    if low[:4] != ["exchange", "symbol", "timestamp", "local_timestamp"] or (len(low) - 4) % 4 or len(low) == 4:
        return None
    n = (len(low) - 4) // 4
    want = [f"{s}[{i}].{f}" for i in range(n) for s in ("asks", "bids") for f in ("price", "amount")]
    return n if low[4:] == want else None


def _is(col: pa.ChunkedArray, word: str) -> np.ndarray:
    """Rows whose text is ``word`` (any case), as a numpy bool array, without Python strings."""
    low = pc.utf8_lower(col.combine_chunks())
    return pc.fill_null(pc.equal(low, word), False).to_numpy(zero_copy_only=False)


class _TardisBookCsv:
    """What both layouts share: the streaming CSV read, units, symbols, bad rows."""

    def __init__(self, path: str | Path, *, symbol: str | None = None):
        self.path = str(check_file(path))
        check_text(self.path)
        self.symbol = symbol
        self.ignored = 0
        row = _first_row(self.path)
        if not row:
            raise DataError(f"{self.path}: the file has a header but no rows; nothing to replay")
        self.ts_unit = unit_of(row[2]) if len(row) > 2 else "us"
        self.recv_unit = unit_of(row[3]) if len(row) > 3 else "us"

    def _tables(self) -> Iterator[tuple[pa.Table, int, list[BadRow]]]:
        """(block of rows as text, line number of its first row, rows of a wrong field count)."""
        bad: list[BadRow] = []

        def invalid(row: pacsv.InvalidRow) -> str:
            line = (row.number or 0) + 1  # pyarrow counts data rows from the header (1)
            bad.append(BadRow(self.path, line, Reason.WRONG_FIELD_COUNT, None, row.text[:200], row.text, self.symbol))
            return "skip"

        read = pacsv.ReadOptions(block_size=_BLOCK, use_threads=False)
        parse = pacsv.ParseOptions(invalid_row_handler=invalid)
        names = header_names(self.path)
        conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
        line = 2
        with decoding_errors(self.path), open_stream(self.path) as s:
            reader = pacsv.open_csv(s, read_options=read, parse_options=parse, convert_options=conv)
            for batch in reader:
                skipped, bad = bad, []
                n = batch.num_rows
                lines = self._lines(line, n, skipped)
                yield pa.Table.from_batches([batch]), lines, skipped
                line = int(lines[-1]) + 1 if n else line + len(skipped)

    @staticmethod
    def _lines(first: int, n: int, skipped: list[BadRow]) -> np.ndarray:
        """Line numbers of a block's ``n`` good rows, around the skipped ones."""
        lines = np.arange(first, first + n + len(skipped), dtype=np.int64)
        if skipped:
            gone = np.isin(lines, [b.record for b in skipped])
            lines = lines[~gone][:n]
        return lines[:n]

    def _symbols(self, col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
        if self.symbol:
            return np.zeros(len(col), dtype=np.uint32), [self.symbol]
        codes, names, _ = convert.symbol_codes(col.combine_chunks())
        return codes.astype(np.uint32), names

    def _times(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ts, m1, b1 = convert.to_ns(table.column("timestamp").combine_chunks(), self.ts_unit)
        recv, m2, b2 = convert.to_ns(table.column("local_timestamp").combine_chunks(), self.recv_unit)
        recv = np.where(m2 | b2, -1, recv)
        return ts, recv, m1 | b1

    def _chunk(self, cols: dict[str, np.ndarray], records: np.ndarray, names: list[str], reason: np.ndarray,
               dropped: list[BadRow], raw_rows: pa.Table, row_of: np.ndarray) -> TickChunk:
        chunk = TickChunk(self.path, cols, records, names, bad=reason if reason.any() else None,
                          raw=lambda i: raw_rows.slice(int(row_of[i]), 1).to_pylist()[0])
        chunk.dropped = dropped
        return chunk


class TardisIncrementalBookReader(_TardisBookCsv):
    """Streams a Tardis ``incremental_book_L2`` CSV as book rows."""

    def __init__(self, path: str | Path, *, symbol: str | None = None):
        super().__init__(path, symbol=symbol)
        self._in_snapshot: dict[str, bool] = {}

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        self._in_snapshot = {}
        for table, lines, skipped in self._tables():
            for lo in range(0, max(table.num_rows, 1), chunk_rows):
                part = table.slice(lo, chunk_rows)
                yield self._convert(part, lines[lo:lo + chunk_rows], skipped if lo == 0 else [])

    def _convert(self, t: pa.Table, lines: np.ndarray, skipped: list[BadRow]) -> TickChunk:
        n = t.num_rows
        codes, names = self._symbols(t.column("symbol"))
        ts, recv, bad_ts = self._times(t)
        price, pm, pb = convert.to_float(t.column("price").combine_chunks())
        size, sm, sb = convert.to_float(t.column("amount").combine_chunks())
        side = (_is(t.column("side"), "bid").astype(np.int8) - _is(t.column("side"), "ask").astype(np.int8))
        snap = _is(t.column("is_snapshot"), "true")
        not_bool = ~snap & ~_is(t.column("is_snapshot"), "false")
        reason = np.zeros(n, dtype=np.uint8)
        for mask, why in ((bad_ts, Reason.UNPARSABLE), (pm | sm, Reason.MISSING_FIELD), (pb | sb, Reason.UNPARSABLE),
                          (side == 0, Reason.UNKNOWN_SIDE), (not_bool, Reason.UNPARSABLE)):
            reason[mask & (reason == 0)] = why
        # a clear before the first snapshot line of each snapshot, per symbol
        starts = np.zeros(n, dtype=bool)
        for k, name in enumerate(names):
            rows = np.flatnonzero(codes == k)
            if not rows.size:
                continue
            s = snap[rows]
            prev = np.concatenate(([self._in_snapshot.get(name, False)], s[:-1]))
            starts[rows[s & ~prev]] = True
            self._in_snapshot[name] = bool(s[-1])
        pos = np.arange(n) + np.cumsum(starts)  # where each line's row goes, after its clear
        total = n + int(starts.sum())
        clear_at = pos[starts] - 1
        cols = {"ts_ns": np.empty(total, np.int64), "ts_recv_ns": np.empty(total, np.int64),
                "symbol_id": np.empty(total, np.uint32), "price": np.empty(total), "size": np.empty(total),
                "side": np.zeros(total, np.int8), "kind": np.full(total, KIND_BOOK, np.uint8)}
        records = np.empty(total, np.int64)
        row_of = np.empty(total, np.int64)
        bad = np.zeros(total, np.uint8)
        for name, values in (("ts_ns", ts), ("ts_recv_ns", recv), ("symbol_id", codes), ("price", price),
                             ("size", size), ("side", side)):
            cols[name][pos] = values
            if name != "side":
                cols[name][clear_at] = values[starts] if name != "price" else np.nan
        cols["size"][clear_at] = 0.0
        cols["side"][clear_at] = 0
        records[pos], records[clear_at] = lines, lines[starts]
        row_of[pos], row_of[clear_at] = np.arange(n), np.flatnonzero(starts)
        bad[pos] = reason
        return self._chunk(cols, records, names, bad, skipped, t, row_of)


class TardisBookSnapshotReader(_TardisBookCsv):
    """Streams a Tardis ``book_snapshot_N`` CSV as book rows (changes between snapshots)."""

    def __init__(self, path: str | Path, *, symbol: str | None = None):
        super().__init__(path, symbol=symbol)
        names = header_names(self.path)
        depth = snapshot_depth(names)
        if depth is None:
            raise DataError(f"{self.path}: not a Tardis book_snapshot_N header ({names[:8]}...)")
        self.depth = depth
        self._prev: dict[str, np.ndarray] = {}

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        self._prev = {}
        per_line = max(1, chunk_rows // (4 * self.depth + 1))
        for table, lines, skipped in self._tables():
            for lo in range(0, max(table.num_rows, 1), per_line):
                yield self._convert(table.slice(lo, per_line), lines[lo:lo + per_line], skipped if lo == 0 else [])

    def _convert(self, t: pa.Table, lines: np.ndarray, skipped: list[BadRow]) -> TickChunk:
        n, d = t.num_rows, self.depth
        codes, names = self._symbols(t.column("symbol"))
        ts, recv, bad_ts = self._times(t)
        book = np.full((n, 4, d), np.nan)  # bid px, bid size, ask px, ask size (kernels/book.py order)
        reason = np.where(bad_ts, Reason.UNPARSABLE, 0).astype(np.uint8)
        for i in range(d):
            for j, col in enumerate((f"bids[{i}].price", f"bids[{i}].amount", f"asks[{i}].price", f"asks[{i}].amount")):
                v, _, b = convert.to_float(t.column(col).combine_chunks())
                book[:, j, i] = v
                reason[b & (reason == 0)] = Reason.UNPARSABLE
        one_sided = np.isnan(book[:, 0, :]) != np.isnan(book[:, 1, :])
        one_sided |= np.isnan(book[:, 2, :]) != np.isnan(book[:, 3, :])
        reason[one_sided.any(axis=1) & (reason == 0)] = Reason.MISSING_FIELD
        out_cols: list[dict[str, np.ndarray]] = []
        rec_parts, row_parts, bad_parts = [], [], []
        for k, name in enumerate(names):
            rows = np.flatnonzero(codes == k)
            if not rows.size:
                continue
            good = rows[reason[rows] == 0]
            prev = self._prev.get(name)
            side, price, size, owner, new_prev = snapshot_deltas(prev, book[good], d)
            if len(good):
                self._prev[name] = new_prev
            src = good[owner]
            out_cols.append({"ts_ns": ts[src], "ts_recv_ns": recv[src], "symbol_id": np.full(len(src), k, np.uint32),
                             "price": price, "size": size, "side": side})
            rec_parts.append(lines[src])
            row_parts.append(src)
            bad_parts.append(np.zeros(len(src), np.uint8))
            refused = rows[reason[rows] != 0]  # a bad line is one refused row
            out_cols.append({"ts_ns": ts[refused], "ts_recv_ns": recv[refused],
                             "symbol_id": np.full(len(refused), k, np.uint32), "price": np.full(len(refused), np.nan),
                             "size": np.full(len(refused), np.nan), "side": np.zeros(len(refused), np.int8)})
            rec_parts.append(lines[refused])
            row_parts.append(refused)
            bad_parts.append(reason[refused])
        records = np.concatenate(rec_parts) if rec_parts else np.empty(0, np.int64)
        order = np.argsort(records, kind="stable")
        cols = {key: np.concatenate([c[key] for c in out_cols])[order] if out_cols else np.empty(0)
                for key in ("ts_ns", "ts_recv_ns", "symbol_id", "price", "size", "side")}
        cols["kind"] = np.full(len(records), KIND_BOOK, np.uint8)
        row_of = np.concatenate(row_parts)[order] if row_parts else np.empty(0, np.int64)
        bad = np.concatenate(bad_parts)[order] if bad_parts else np.empty(0, np.uint8)
        return self._chunk(cols, records[order], names, bad, skipped, t, row_of)


def tardis_incremental_book(path: str | Path, *, symbol: str | None = None) -> TardisIncrementalBookReader:
    """A reader of a Tardis.dev ``incremental_book_L2`` CSV (optionally compressed)."""
    return TardisIncrementalBookReader(path, symbol=symbol)


def tardis_book_snapshot(path: str | Path, *, symbol: str | None = None) -> TardisBookSnapshotReader:
    """A reader of a Tardis.dev ``book_snapshot_5``/``_25`` (any N) CSV."""
    return TardisBookSnapshotReader(path, symbol=symbol)
