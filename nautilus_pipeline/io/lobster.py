"""LOBSTER (lobsterdata.com) message + orderbook files: executions as trades, the book as book rows.

A LOBSTER sample is two CSV files without a header, one row per event in both:

- ``<TICKER>_<YYYY-MM-DD>_<start>_<end>_message_<N>.csv``: ``time`` (seconds after midnight,
  decimals to the ns), ``type``, ``order_id``, ``size``, ``price`` (dollars × 10,000),
  ``direction`` (−1 a sell limit order, +1 a buy limit order);
- ``..._orderbook_<N>.csv``: the book *after* the event, ``ask price, ask size, bid price,
  bid size`` for levels 1..N (an empty level is price −9999999999 / 9999999999 with size 0).

Event types as documented: 1 new limit order, 2 partial cancellation, 3 deletion, 4 execution
of a visible limit order, 5 execution of a hidden limit order, 6 cross trade (auction), 7
trading halt indicator. Types 4 and 5 become trades; the aggressor is the *other* side of the
executed order (a sell limit order executed, direction −1, was hit by a buyer: side +1); type 6
is a trade without a known aggressor (side 0); type 7 changes nothing (ignored). The book rows
are the changes between consecutive orderbook rows (``kernels.book.snapshot_deltas``, a clear
first), so after an event's rows the book is exactly its orderbook row; an event that leaves
the top N as it was adds no book row (counted as ignored unless it is a trade).

Times are seconds after midnight of the trading date, in the exchange's time (New York for
LOBSTER's NASDAQ data): the date comes from ``date="YYYY-MM-DD"`` or the file name, and
``utc_offset_hours`` turns local time into UTC (default: New York's offset on the trading date,
−4 under EDT, −5 under EST).
The orderbook file is found beside the message file (``message`` → ``orderbook`` in the name);
without it only the trades are read, and the reader says so in ``book_missing``.

Damage. Both files are read as text and converted per column (``convert.py``), so a bad value,
in either file, refuses its event (unparsable, with the message file's line), as does a time
outside ``[0, 86400)`` s (it would wrap once in ns). The files must have as many rows as each
other: an orderbook file with rows left over means the message file was cut short (or the
two are of different samples), a DataError, never a replay of the first events only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date as Date
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import structlog

from ..errors import ConfigError, DataError
from ..events import KIND_BOOK, KIND_TRADE
from . import convert
from .chunk import Reason, TickChunk
from .files import check_file, decoding_errors, open_stream, read_head

log = structlog.get_logger("nautilus_pipeline.io.lobster")

_NAME = re.compile(r"^(?P<ticker>[^_]+)_(?P<date>\d{4}-\d{2}-\d{2})_\d+_\d+_message_(?P<depth>\d+)\.csv", re.I)
EMPTY_PRICE = 9_999_999_999
PRICE_SCALE = 10_000


def looks_like_lobster(path: str | Path, first: list[str]) -> bool:
    """A message file: the LOBSTER file name, or 6 fields of the documented shape."""
    if _NAME.match(Path(path).name):
        return True
    try:
        return (len(first) == 6 and 0 <= float(first[0]) < 86_400 and first[1].strip() in {"1", "2", "3", "4", "5", "6", "7"}
                and first[5].strip() in ("1", "-1"))
    except ValueError:
        return False


class LobsterReader:
    """Streams a LOBSTER message file and, beside it, its orderbook file."""

    def __init__(self, path: str | Path, *, symbol: str | None = None, date: str | None = None,
                 utc_offset_hours: float | None = None, orderbook: str | None = None):
        self.path = str(check_file(path))
        m = _NAME.match(Path(path).name)
        self.symbol = symbol or (m.group("ticker") if m else Path(path).name.split("_")[0])
        day = date or (m.group("date") if m else None)
        if day is None:
            raise ConfigError(f"{self.path}: LOBSTER times are seconds after midnight; give the trading date "
                              "(options = {{ date = \"YYYY-MM-DD\" }}) or keep LOBSTER's file name")
        try:
            midnight = Date.fromisoformat(day)
        except ValueError:
            raise ConfigError(f"{self.path}: date {day!r} is not YYYY-MM-DD") from None
        epoch_days = (midnight - Date(1970, 1, 1)).days
        if utc_offset_hours is None:  # New York's offset on that day: EDT (-4) or EST (-5)
            noon = datetime.combine(midnight, dtime(12), tzinfo=ZoneInfo("America/New_York"))
            utc_offset_hours = noon.utcoffset().total_seconds() / 3600
        self.utc_offset_hours = utc_offset_hours
        self.midnight_ns = epoch_days * 86_400 * 10**9 - round(utc_offset_hours * 3600) * 10**9
        ob = Path(orderbook) if orderbook else Path(self.path).with_name(
            re.sub("message", "orderbook", Path(self.path).name, count=1, flags=re.I))
        self.orderbook = str(ob) if ob.is_file() and ob != Path(self.path) else None
        self.book_missing = self.orderbook is None
        if self.book_missing:
            log.warning("lobster_orderbook_missing", file=self.path, looked_for=str(ob),
                        consequence="only the trades are read (no book rows)")
        self.ignored = 0

    def _csv(self, path: str, names: list[str] | None) -> Iterator[pa.RecordBatch]:
        """Batches of text columns: a bad value is one refused event, never a file that stops
        reading at the block where pyarrow's inferred type no longer fits."""
        if names is None:
            names = [f"f{i}" for i in range(len(read_head(path, 1 << 16).split(b"\n", 1)[0].split(b",")))]
        read = pacsv.ReadOptions(column_names=names, block_size=1 << 22, use_threads=False)
        conv = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
        with decoding_errors(path), open_stream(path) as s:
            yield from pacsv.open_csv(s, read_options=read, convert_options=conv)

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        from ..kernels.book import snapshot_deltas

        self.ignored = 0
        msgs = self._csv(self.path, ["time", "type", "order_id", "size", "price", "direction"])
        books = self._csv(self.orderbook, None) if self.orderbook else None
        prev = None
        line = 1
        pending_book: pa.Table | None = None
        for batch in msgs:
            n = batch.num_rows
            t = pa.Table.from_batches([batch])
            sec, ms, sb = convert.to_float(t.column("time").combine_chunks())
            kind, km, kb = convert.to_int(t.column("type").combine_chunks(), 0)
            size, zm, zb = convert.to_float(t.column("size").combine_chunks())
            price, pm, pb = convert.to_float(t.column("price").combine_chunks())
            direction, dm, db = convert.to_int(t.column("direction").combine_chunks(), 0)
            ts = self.midnight_ns + np.round(np.where((sec >= 0) & (sec < 86_400), sec, 0.0) * 1e9).astype(np.int64)
            lines = np.arange(line, line + n, dtype=np.int64)
            line += n
            reason = np.zeros(n, np.uint8)
            with np.errstate(invalid="ignore"):
                off_day = ~((sec >= 0) & (sec < 86_400))  # seconds after midnight: else a wrapped time
            for mask, why in ((ms | km | zm | pm | dm, Reason.MISSING_FIELD), (sb | kb | zb | pb | db, Reason.UNPARSABLE),
                              (off_day & ~ms, Reason.UNPARSABLE), ((kind < 1) | (kind > 7), Reason.UNPARSABLE),
                              (~np.isin(direction, (-1, 1)) & (kind != 7), Reason.UNKNOWN_SIDE)):
                reason[mask & (reason == 0)] = why
            book = None
            if books is not None:
                if pending_book is None or pending_book.num_rows < n:
                    got = [pending_book] if pending_book is not None else []
                    have = pending_book.num_rows if pending_book is not None else 0
                    for b in books:
                        got.append(pa.Table.from_batches([b]))
                        have += b.num_rows
                        if have >= n:
                            break
                    pending_book = pa.concat_tables(got) if got else None
                if pending_book is None or pending_book.num_rows < n:
                    raise DataError(f"{self.orderbook}: fewer rows than {self.path} ({line - 1} messages); "
                                    "the two files of a LOBSTER sample have one row per event each")
                ob, pending_book = pending_book.slice(0, n), pending_book.slice(n)
                depth = ob.num_columns // 4
                book = np.full((n, 4, depth), np.nan)
                for i in range(depth):
                    cols = []
                    for j in range(4):
                        v, vm, vb = convert.to_float(ob.column(4 * i + j).combine_chunks())
                        reason[vm & (reason == 0)] = Reason.MISSING_FIELD
                        reason[(vb | np.isnan(v) & ~vm) & (reason == 0)] = Reason.UNPARSABLE
                        cols.append(v)
                    ap, az, bp, bz = cols
                    for dst, p_, z_ in ((0, bp, bz), (2, ap, az)):
                        empty = (np.abs(p_) >= EMPTY_PRICE) | (z_ <= 0)
                        book[:, dst, i] = np.where(empty, np.nan, p_ / PRICE_SCALE)
                        book[:, dst + 1, i] = np.where(empty, np.nan, z_)
            trade = np.isin(kind, (4, 5, 6)) & (reason == 0)
            parts = []
            # trades: the aggressor is the other side of the executed limit order
            tr = np.flatnonzero(trade)
            parts.append((tr, np.full(len(tr), KIND_TRADE, np.uint8),
                          np.where(kind[tr] == 6, 0, -direction[tr]).astype(np.int8),
                          price[tr] / PRICE_SCALE, size[tr], np.zeros(len(tr), np.uint8)))
            has_rows = trade.copy()
            if book is not None:
                depth = book.shape[2]
                good = np.flatnonzero(reason == 0)
                side, bpx, bsz, owner, prev = snapshot_deltas(prev, book[good], depth)
                src = good[owner]
                parts.append((src, np.full(len(src), KIND_BOOK, np.uint8), side, bpx, bsz, np.zeros(len(src), np.uint8)))
                has_rows[src] = True
            bad = np.flatnonzero(reason != 0)
            parts.append((bad, np.full(len(bad), KIND_TRADE, np.uint8), np.zeros(len(bad), np.int8),
                          np.full(len(bad), np.nan), np.full(len(bad), np.nan), reason[bad]))
            self.ignored += int((~has_rows & (reason == 0)).sum())
            row = np.concatenate([p[0] for p in parts])
            # one event's rows in order: its trade, then its book changes (a stable sort by event)
            order = np.argsort(row, kind="stable")
            row = row[order]
            cols = {"ts_ns": ts[row], "kind": np.concatenate([p[1] for p in parts])[order],
                    "side": np.concatenate([p[2] for p in parts]).astype(np.int8)[order],
                    "price": np.concatenate([p[3] for p in parts])[order],
                    "size": np.concatenate([p[4] for p in parts])[order],
                    "symbol_id": np.zeros(len(row), np.uint32)}
            verdict = np.concatenate([p[5] for p in parts])[order]
            for lo in range(0, max(len(row), 1), chunk_rows):
                sl = slice(lo, lo + chunk_rows)
                sub_rows = row[sl]
                yield TickChunk(self.path, {k: v[sl] for k, v in cols.items()}, lines[sub_rows], [self.symbol],
                                bad=verdict[sl] if verdict[sl].any() else None,
                                raw=lambda i, r=sub_rows, tb=t: tb.slice(int(r[i]), 1).to_pylist()[0])
        if books is not None and ((pending_book is not None and pending_book.num_rows) or any(b.num_rows for b in books)):
            raise DataError(f"{self.orderbook}: more rows than {self.path} ({line - 1} messages); the two files of a "
                            "LOBSTER sample have one row per event each: the message file is cut short, or the "
                            "files are of two samples")
