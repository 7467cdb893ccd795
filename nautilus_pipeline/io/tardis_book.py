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

import collections
import io
import itertools
import re
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
from .files import (
    UTF8_BOM,
    byte_blocks,
    check_file,
    check_text,
    compression_of,
    decoding_errors,
    open_stream,
    read_head,
)
from .tardis import _first_row, unit_of
from .tardis_l2_fast import HEADER, LineColumns, _last_line_end, _line_end, newlines

INCREMENTAL_HEADER = ("exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount")
_BLOCK = 1 << 22
FAST_BLOCK = 1 << 22
"""Bytes read at a time by the numba path (blocks are cut at the last line end)."""


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

    def _tables(self) -> Iterator[tuple[pa.Table, np.ndarray, list[BadRow]]]:
        """(block of rows as text, line numbers of its rows, rows of a wrong field count).

        pyarrow numbers rows without the blank lines it skips, and it parses a block ahead: the
        refused rows it reports may belong to the next batch. So rows are numbered as pyarrow
        counts them (the header is 1), each batch takes the refused rows within its own range,
        and the numbers are then shifted by the blank lines before them (:class:`_BlankLines`)
        to the file's line numbers, as the numba path gives them."""
        bad: collections.deque[BadRow] = collections.deque()

        def invalid(row: pacsv.InvalidRow) -> str:
            bad.append(BadRow(self.path, row.number or 0, Reason.WRONG_FIELD_COUNT, None, row.text[:200], row.text,
                              self.symbol))
            return "skip"

        read = pacsv.ReadOptions(block_size=_BLOCK, use_threads=False)
        parse = pacsv.ParseOptions(invalid_row_handler=invalid)
        names = header_names(self.path)
        conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
        at = 2  # pyarrow's number of the next row
        with decoding_errors(self.path), open_stream(self.path) as s:
            blanks = _BlankLines(s)
            reader = pacsv.open_csv(pa.PythonFile(blanks, mode="r"), read_options=read, parse_options=parse,
                                    convert_options=conv)
            for batch in reader:
                n = batch.num_rows
                end = at + n  # one past the batch's last row, as pyarrow counts
                skipped = []
                while bad and bad[0].record < end:
                    skipped.append(bad.popleft())
                    end += 1
                numbers = np.arange(at, end, dtype=np.int64)
                if skipped:
                    numbers = numbers[~np.isin(numbers, [b.record for b in skipped])]
                for b in skipped:
                    b.record = int(blanks.physical(np.array([b.record]))[0])
                yield pa.Table.from_batches([batch]), blanks.physical(numbers), skipped
                at = end
            rest = list(bad)
            for b in rest:
                b.record = int(blanks.physical(np.array([b.record]))[0])
        if rest:  # refused after the last batch (or a file of refused lines only): still reported
            yield pa.table({n: pa.array([], pa.string()) for n in names}), np.empty(0, np.int64), rest

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


class _BlankLines:
    """A byte stream passed through unchanged, noting where its blank lines are, so that
    pyarrow's row numbers (which skip them) can be turned into physical line numbers."""

    def __init__(self, raw: pa.NativeFile) -> None:
        self.raw = raw
        self.line = 1  # physical number of the line the next byte belongs to
        self.tail = b""
        self.before: list[int] = []  # per blank line: non-blank lines before it

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        text = self.tail + data
        skip = len(self.tail)
        base = self.line - self.tail.count(b"\n")  # the line number at text[0]
        for m in _BLANK.finditer(text):  # a newline that another follows at once (or after a CR)
            if m.end(1) > skip:  # (else the last read saw it whole)
                blank = base + text.count(b"\n", 0, m.start() + 1)
                self.before.append(blank - 1 - len(self.before))
        self.line += data.count(b"\n")
        self.tail = text[-2:]
        return data

    def physical(self, numbers: np.ndarray) -> np.ndarray:
        """Line numbers of rows pyarrow numbered ``numbers`` (blank lines not counted)."""
        if not self.before:
            return numbers
        return numbers + np.searchsorted(np.array(self.before), numbers, side="left")

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """The stream is closed by its owner (``open_stream``'s context)."""


_BLANK = re.compile(rb"\n(?=(\r?\n))")


class TardisIncrementalBookReader(_TardisBookCsv):
    """Streams a Tardis ``incremental_book_L2`` CSV as book rows.

    Files with exactly the documented header go through the numba byte parser of
    ``io/tardis_l2_fast.py`` (``fast=False``: pyarrow only, the reference in the tests); its
    odd lines, and files with another header, through pyarrow's CSV reader."""

    def __init__(self, path: str | Path, *, symbol: str | None = None, fast: bool = True):
        super().__init__(path, symbol=symbol)
        self.fast = fast
        self._in_snapshot: dict[str, bool] = {}

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        self._in_snapshot = {}
        if self.fast and read_head(self.path, 4096).split(b"\n", 1)[0].rstrip(b"\r") == HEADER:
            yield from self._fast_chunks(chunk_rows)
            return
        for table, lines, skipped in self._tables():
            for lo in range(0, max(table.num_rows, 1), chunk_rows):
                part = table.slice(lo, chunk_rows)
                f = self._fields(part)
                yield self._assemble(f, lines[lo:lo + chunk_rows], skipped if lo == 0 else [],
                                     lambda i, t=part: t.slice(int(i), 1).to_pylist()[0])

    def _fields(self, t: pa.Table) -> dict:
        """Each line's converted fields and verdict (``reason``), from a table of text."""
        codes, names = self._symbols(t.column("symbol"))
        ts, recv, bad_ts = self._times(t)
        price, pm, pb = convert.to_float(t.column("price").combine_chunks())
        size, sm, sb = convert.to_float(t.column("amount").combine_chunks())
        side = (_is(t.column("side"), "bid").astype(np.int8) - _is(t.column("side"), "ask").astype(np.int8))
        snap = _is(t.column("is_snapshot"), "true")
        not_bool = ~snap & ~_is(t.column("is_snapshot"), "false")
        reason = np.zeros(t.num_rows, dtype=np.uint8)
        for mask, why in ((bad_ts, Reason.UNPARSABLE), (pm | sm, Reason.MISSING_FIELD), (pb | sb, Reason.UNPARSABLE),
                          (side == 0, Reason.UNKNOWN_SIDE), (not_bool, Reason.UNPARSABLE)):
            reason[mask & (reason == 0)] = why
        return {"codes": codes, "names": names, "ts": ts, "recv": recv, "price": price, "size": size, "side": side,
                "snap": snap, "reason": reason}

    def _assemble(self, f: dict, lines: np.ndarray, skipped: list[BadRow], raw) -> TickChunk:
        """Book rows of converted lines: a clear before the first line of each snapshot, per
        symbol (the state carried across chunks); ``raw(i)`` gives line ``i``'s fields."""
        codes, names, snap = f["codes"], f["names"], f["snap"]
        n = len(codes)
        starts = np.zeros(n, dtype=bool)
        one = len(names) == 1 or (n > 0 and int(codes.min()) == int(codes.max()))
        for k, name in enumerate(names):
            rows = slice(None) if one else np.flatnonzero(codes == k)
            s = snap[rows]
            if not len(s) or (one and int(codes[0]) != k):
                continue
            prev = np.concatenate(([self._in_snapshot.get(name, False)], s[:-1]))
            starts[rows] |= s & ~prev
            self._in_snapshot[name] = bool(s[-1])
        if not starts.any():  # no snapshot begins here: the lines are the rows
            cols = {"ts_ns": f["ts"], "ts_recv_ns": f["recv"], "symbol_id": codes, "price": f["price"],
                    "size": f["size"], "side": f["side"], "kind": np.full(n, KIND_BOOK, np.uint8)}
            bad = f["reason"]
            chunk = TickChunk(self.path, cols, np.asarray(lines), names, bad=bad if bad.any() else None, raw=raw)
            chunk.dropped = skipped
            return chunk
        pos = np.arange(n) + np.cumsum(starts)  # where each line's row goes, after its clear
        total = n + int(starts.sum())
        clear_at = pos[starts] - 1
        cols = {"ts_ns": np.empty(total, np.int64), "ts_recv_ns": np.empty(total, np.int64),
                "symbol_id": np.empty(total, np.uint32), "price": np.empty(total), "size": np.empty(total),
                "side": np.zeros(total, np.int8), "kind": np.full(total, KIND_BOOK, np.uint8)}
        records = np.empty(total, np.int64)
        row_of = np.empty(total, np.int64)
        bad = np.zeros(total, np.uint8)
        for name, values in (("ts_ns", f["ts"]), ("ts_recv_ns", f["recv"]), ("symbol_id", codes),
                             ("price", f["price"]), ("size", f["size"]), ("side", f["side"])):
            cols[name][pos] = values
            if name != "side":
                cols[name][clear_at] = values[starts] if name != "price" else np.nan
        cols["size"][clear_at] = 0.0
        cols["side"][clear_at] = 0
        records[pos], records[clear_at] = lines, lines[starts]
        row_of[pos], row_of[clear_at] = np.arange(n), np.flatnonzero(starts)
        bad[pos] = f["reason"]
        chunk = TickChunk(self.path, cols, records, names, bad=bad if bad.any() else None,
                          raw=lambda i: raw(row_of[i]))
        chunk.dropped = skipped
        return chunk

    def _fast_chunks(self, chunk_rows: int) -> Iterator[TickChunk]:
        """The file through ``parse_lines``, in blocks cut at their last line end (the cut-off
        line is carried to the next block); an uncompressed file is memory-mapped, not copied."""
        if compression_of(self.path) is None:
            whole = np.frombuffer(pa.memory_map(self.path, "r").read_buffer(), np.uint8)
            start = len(UTF8_BOM) if bytes(whole[:3]) == UTF8_BOM else 0
            start = _line_end(whole, start, len(whole))
            line = 2
            while start < len(whole):
                end = min(start + FAST_BLOCK, len(whole))
                if end < len(whole):
                    cut = _last_line_end(whole, start, end)
                    end = cut if cut > start else _line_end(whole, end, len(whole))
                line = yield from self._fast_block(whole[start:end], line, chunk_rows)
                start = end
            return
        carry = b""
        line = 1
        for data in itertools.chain(byte_blocks(self.path, FAST_BLOCK), (None,)):
            if data is None:  # the file's end: a last line without its newline
                if not carry:
                    return
                data, end, carry = carry, len(carry), b""
            else:
                data = carry + data if carry else data
                if line == 1:
                    if data.startswith(UTF8_BOM):
                        data = data[len(UTF8_BOM):]
                    head = data.find(b"\n")
                    if head < 0:
                        carry = data
                        continue
                    data, line = data[head + 1:], 2
                end = data.rfind(b"\n") + 1
                carry = data[end:]
                if not end:
                    continue
            line = yield from self._fast_block(np.frombuffer(data, np.uint8, count=end), line, chunk_rows)

    def _fast_block(self, buf: np.ndarray, line: int, chunk_rows: int):
        c = LineColumns(newlines(buf) + 1)
        k, n_sym, next_line = c.parse(buf, line, convert._UNIT_NS[self.ts_unit], convert._UNIT_NS[self.recv_unit])
        data = memoryview(buf)
        names = [bytes(data[o:o + n]).decode() for o, n in zip(c.sym_off[:n_sym].tolist(), c.sym_len[:n_sym].tolist(),
                                                         strict=True)]
        col = c.columns(k)
        f = {"codes": col["sym"], "names": names, "ts": col["ts"], "recv": col["recv"], "price": col["price"],
             "size": col["size"], "side": col["side"], "snap": col["snap"], "reason": np.zeros(k, np.uint8)}
        lines, keep, dropped = col["lineno"], np.ones(k, bool), []
        odd_rows: dict[int, int] = {}
        table = None
        idx = np.flatnonzero(col["odd"])
        if idx.size:  # lines not in the plain form: pyarrow's verdict, line by line
            table, keep, dropped, odd_rows = self._odd_lines(data, col, idx, f, keep)
        if self.symbol:
            f["codes"], f["names"] = np.zeros(k, np.uint32), [self.symbol]
        rows = np.flatnonzero(keep) if len(dropped) else None  # None: every line is a row

        def raw(i: int, data=data, col=col) -> dict:
            at = int(i)
            if at in odd_rows:
                return table.slice(odd_rows[at], 1).to_pylist()[0]
            fields = bytes(data[col["lstart"][at]:col["lend"][at]]).decode("utf-8", "replace").split(",")
            return dict(zip(INCREMENTAL_HEADER, fields, strict=True))

        n = k if rows is None else len(rows)
        for lo in range(0, max(n, 1), chunk_rows):
            sel = slice(lo, lo + chunk_rows) if rows is None else rows[lo:lo + chunk_rows]
            at = np.arange(lo, min(lo + chunk_rows, n)) if rows is None else sel
            part = {key: (v if key == "names" else v[sel]) for key, v in f.items()}
            yield self._assemble(part, lines[sel], dropped if lo == 0 else [], lambda i, at=at: raw(at[i]))
        return next_line

    def _odd_lines(self, data: bytes, c, idx: np.ndarray, f: dict, keep: np.ndarray):
        """Convert the odd lines ``idx`` with pyarrow (the reference path) into ``f``."""
        bad: list[BadRow] = []
        text = b"\n".join([HEADER] + [bytes(data[c["lstart"][i]:c["lend"][i]]) for i in idx.tolist()]) + b"\n"

        def invalid(row: pacsv.InvalidRow) -> str:
            at = int(idx[(row.number or 2) - 2])  # line 2 of the small file is idx[0]
            keep[at] = False
            bad.append(BadRow(self.path, int(c["lineno"][at]), Reason.WRONG_FIELD_COUNT, None, row.text[:200], row.text,
                              self.symbol))
            return "skip"

        conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in INCREMENTAL_HEADER}, strings_can_be_null=True)
        with decoding_errors(self.path):
            table = pacsv.read_csv(io.BytesIO(text), read_options=pacsv.ReadOptions(use_threads=False),
                                   parse_options=pacsv.ParseOptions(invalid_row_handler=invalid), convert_options=conv)
        good = idx[keep[idx]]
        if table.num_rows != len(good):  # a quoted field ran over a line end: no row to line map
            raise DataError(f"{self.path}: a quoted field spans lines near line {int(c['lineno'][idx[0]])}; "
                            "this reader reads one line a row")
        g = self._fields(table)
        codes = {name: i for i, name in enumerate(f["names"])}
        for name in g["names"]:
            codes.setdefault(name, len(f["names"]))
            if codes[name] == len(f["names"]):
                f["names"].append(name)
        remap = np.array([codes[n] for n in g["names"]], np.uint32)
        f["codes"][good] = remap[g["codes"]] if len(good) else f["codes"][good]
        for key in ("ts", "recv", "price", "size", "side", "snap", "reason"):
            f[key][good] = g[key]
        return table, keep, bad, {int(at): j for j, at in enumerate(good.tolist())}


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
