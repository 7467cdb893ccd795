"""Databento DBN (``.dbn``, ``.dbn.zst``): trades, and MBP-1/TBBO as quotes, via ``databento-dbn``.

The file is decompressed as a stream (pyarrow's zstd codec) and fed to ``DBNDecoder`` block by
block, so a large file is never held whole. The decoder returns one Python record per message
(its API); that is the price of using the reference decoder rather than our own struct
parser, acceptable for the sizes Databento's per-day files have (see the benchmark).

Mapping:

- ``TradeMsg`` (schema ``trades``): a trade; ``side`` A = sell aggressor (-1), B = buy (+1),
  N = none (0); ``trade_id`` -1 (DBN has no trade id; ``sequence`` is a feed counter).
- ``MBP1Msg`` (schema ``mbp-1``): a quote from ``bid_px_00``/``ask_px_00`` and sizes, the book
  *after* the event. With ``trades=True`` an action ``T`` record also yields a trade (before its
  quote, same record number); off by default because the ``trades`` schema file of the same
  session holds the same trades.
- Schema ``tbbo``: every record is a trade plus the quote just before it: both are yielded,
  the quote first
  (the schema is read from the metadata, which the decoder returns before the first record;
  it used to be compared before decoding, so TBBO files lost their trades).
- ``MBOMsg`` (schema ``mbo``): the order book is rebuilt per instrument (``io/mbo.py``) and
  each level it changes becomes a book row (``KIND_BOOK``: book side, level price, the
  level's new total size; a clear, or the start of a snapshot, a row with side 0 and a NaN
  price), all with the record's number. With ``trades=True`` an action ``T`` record also
  yields a trade (side = aggressor). Records that change no level (fills, trades without
  ``trades=True``, a cancel of an order never seen) are counted as ``ignored``; the unseen
  orders also in ``unknown_orders``. ``F_BAD_TS_RECV`` records get ``ts_recv_ns = -1``.
  ``F_LAST`` (the last record of an exchange event for the instrument) travels in the book
  rows' ``trade_id``, unused by book rows otherwise: ``1`` on the last book row of an
  ``F_LAST`` record, ``0`` on every other MBO book row (the book is in transition there: an
  aggressive order half-way through the levels it takes, a snapshot half loaded); ``-1`` on
  book rows of sources without event flags (every row complete). The book stage publishes
  features at event ends only by default (``stages/book.py``, ``publish``). In the CME files
  we have, every ``F_LAST`` record of an event that changed the book changes it itself, so
  no event end is missed; one that did not would be published with the next event's end.
- ``MBP10Msg`` (schema ``mbp-10``): the top 10 levels after each event become book rows, the
  changes from the instrument's previous record (``kernels.book.snapshot_deltas``, after a clear
  on its first record), so the book after a record's rows is exactly its 10 levels; with
  ``trades=True`` an action ``T`` record also yields a trade. Prices go through the changes as
  the raw integers (exact in float64 below 2**53, ~9e6 in price) and are scaled per chunk.
- ``BBOMsg``/``CBBOMsg``/``CMBP1Msg`` (``bbo-1s``/``-1m``, ``cbbo-*``, ``cmbp-1``): top of book
  as quotes, like MBP-1 (their last-trade fields are not trades).
- Other records (status, definitions, ...) are not ticks and are counted as ``ignored``.

Prices are fixed-point int64 in units of 1e-9, converted to the float64 *nearest* to
``raw / 10**9`` (:func:`scale_prices`): ``3720250000000`` is ``3720.25``, not the
``3720.2500000000005`` that ``raw * 1e-9`` gives (1e-9 is not a float). The undefined-price
sentinel (``UNDEF_PRICE``) becomes NaN and ``UNDEF_ORDER_SIZE`` a NaN size.

One-sided books: an MBP-1/TBBO record whose bid or ask is undefined (an option or equity book
with nothing on one side) keeps its defined side; the missing side's price *and size* are NaN.
Downstream a NaN side means "no order on that side", not zero: the checks accept a quote with
one side missing (not both; ``TickChunk.one_sided_quotes``, set by this reader only), and the quote features built from both sides (spread,
microprice, imbalance) are NaN for it.

Replay clock: ``ts_event`` is ``ts_ns``, ``ts_recv`` is ``ts_recv_ns``. An undefined time
(``UNDEF_TIMESTAMP``, u64::MAX; any u64 past int64) is no time: a record whose ``ts_event`` is
one is refused as unparsable (field ``ts_event``), an undefined ``ts_recv`` is unknown (-1). Venues whose event times
are known to go backwards while receive times rise (ICE's ``*.IMPACT`` datasets: the matching
engine's times of different instruments interleave) get ``default_order_by = "ts_recv_ns"``, which
:class:`~nautilus_pipeline.io.formats.Source` uses unless ``order_by`` is given; ordering them
by ``ts_event`` rejected 3 of 4 trades of an ICE Futures Europe file as ``ts_backwards``.

Symbols come from the metadata's symbol mappings (``instrument_id`` -> raw symbol); unmapped ids
appear as their number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import databento_dbn as dbn
import numpy as np

from ..errors import DataError
from ..events import KIND_BOOK, KIND_QUOTE, KIND_TRADE, SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN
from .chunk import Reason, TickChunk
from .files import check_file, decoding_errors, open_stream
from .mbo import F_BAD_TS_RECV, F_LAST, MboBooks

_TOP_OF_BOOK = (dbn.MBP1Msg, dbn.CMBP1Msg, dbn.BBOMsg, dbn.CBBOMsg)

PRICE_SCALE = 1_000_000_000
"""DBN prices are integers in units of 1 / PRICE_SCALE."""
RECV_ORDERED_DATASETS = ("IFEU.", "IFUS.", "IFLL.", "NDEX.")
"""Dataset prefixes whose ``ts_event`` is not monotonic in file order (replay by ``ts_recv``)."""
_INT64_MAX = np.iinfo(np.int64).max
_EXACT = 1 << 53  # every integer below this is a float64, so raw / 1e9 is one correct rounding
_SIDE = {"A": SIDE_SELL, "B": SIDE_BUY, "N": SIDE_UNKNOWN}


def scale_prices(raw: np.ndarray) -> np.ndarray:
    """float64 nearest to ``raw / 10**9`` for int64 fixed-point prices (UNDEF_PRICE -> NaN).

    ``float(raw)`` is exact below 2**53 and IEEE division is correctly rounded, so ``raw / 1e9``
    is the nearest float there (prices up to ~9e6). Larger magnitudes go through exact
    rational arithmetic (``int / int`` in Python rounds correctly), element by element.
    """
    raw = np.asarray(raw, dtype=np.int64)
    undef = raw == dbn.UNDEF_PRICE
    out = raw / float(PRICE_SCALE)
    big = np.flatnonzero(~undef & (np.abs(raw) >= _EXACT))
    for i in big:
        out[i] = int(raw[i]) / PRICE_SCALE
    out[undef] = np.nan
    return out


class DatabentoReader:
    """Streams a DBN file of trades, MBP-1/TBBO/BBO/CMBP-1 (quotes), MBP-10 or MBO (book rows)."""

    def __init__(self, path: str | Path, *, symbol: str | None = None, trades: bool = False, block: int = 1 << 20,
                 fast_mbo: bool = True):
        self.path = str(check_file(path))
        self.fast_mbo = fast_mbo  # pure MBO files through io/mbo_fast.py (False: the reference path)
        self._fast = None  # io/mbo_fast.MboState while the numba path reads
        self.symbol = symbol
        self.trades = trades
        self.block = block
        self.ignored = 0
        self.schema: str | None = None
        self._symbols: dict[int, str] = {}
        self.dataset: str | None = None
        self.books: MboBooks | None = None  # schema mbo: the orders and levels rebuilt so far
        self.book_gaps = 0

    @property
    def default_order_by(self) -> str:
        """``ts_recv_ns`` for datasets of :data:`RECV_ORDERED_DATASETS`, else ``ts_ns``."""
        if self.dataset is None:
            for _ in self._records():
                break
        return "ts_recv_ns" if (self.dataset or "").startswith(RECV_ORDERED_DATASETS) else "ts_ns"

    def _metadata(self, meta: dbn.Metadata) -> None:
        self.schema = str(getattr(meta.schema, "value", meta.schema)) if meta.schema is not None else None
        self.dataset = str(meta.dataset) if meta.dataset else None
        self._symbols = {}
        mappings = meta.mappings
        items = mappings.items() if isinstance(mappings, dict) else ((m.raw_symbol, m.intervals) for m in mappings)
        for raw, intervals in items:
            for iv in intervals:
                sym = iv.get("symbol") if isinstance(iv, dict) else getattr(iv, "symbol", None)
                if sym is not None and str(sym).isdigit():
                    self._symbols[int(sym)] = str(raw)

    def _records(self) -> Iterator[object]:
        dec = dbn.DBNDecoder()
        got_meta = False
        with decoding_errors(self.path), open_stream(self.path) as s:
            while True:
                buf = s.read(self.block)
                if not buf:
                    break
                try:
                    dec.write(buf)
                    recs = dec.decode()
                except BaseException as e:  # DBNError, ValueError; a Rust panic is a BaseException
                    if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                        raise
                    raise DataError(f"{self.path}: not a readable DBN stream ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                    "wrong format or corrupt file") from None
                for r in recs:
                    if isinstance(r, dbn.Metadata):
                        self._metadata(r)
                        got_meta = True
                        continue
                    yield r
        if not got_meta:
            raise DataError(f"{self.path}: no DBN metadata header; is this a DBN file (or truncated in its header)?")
        if len(dec.buffer()):
            raise DataError(f"{self.path}: the DBN file ends in the middle of a record ({len(dec.buffer())} bytes left); it is truncated: re-download it")

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Chunks of at most ``chunk_rows`` rows; record = 1-based record number after the metadata.

        Each record's raw integer fields go into a tuple; scaling, the undefined-price
        sentinel and side codes are then converted per chunk with numpy.
        """
        rows: list[tuple] = []
        total = 0
        undef = dbn.UNDEF_PRICE
        self.ignored = 0
        self.books = None
        self._fast = None
        if self.fast_mbo:
            from .mbo_fast import NotPureMbo, record_blocks

            try:
                meta, blocks = record_blocks(self.path)
            except NotPureMbo:
                pass
            else:
                yield from self._fast_chunks(meta, blocks, chunk_rows)
                return
        self._mbp10: dict[int, np.ndarray] = {}
        self._event_rows: list[int] = []  # positions in ``rows`` of MBO book rows (see _chunk)
        self._event_ends: list[int] = []
        for recno, rec in enumerate(self._records(), start=1):
            if isinstance(rec, dbn.MBOMsg):
                if self.books is None:
                    self.books = MboBooks()
                before = len(rows)
                self._mbo_rows(recno, rec, rows)
                if len(rows) == before:
                    self.ignored += 1
            elif isinstance(rec, dbn.MBP10Msg):
                self._mbp10_rows(recno, rec, rows)
            elif isinstance(rec, _TOP_OF_BOOK):
                quote = (recno, rec.ts_event, rec.ts_recv, rec.instrument_id, KIND_QUOTE, undef, -1, "N",
                         rec.bid_px_00, rec.ask_px_00, rec.bid_sz_00, rec.ask_sz_00)
                tbbo = self.schema == "tbbo"  # known here: the metadata precedes every record
                if tbbo:
                    rows.append(quote)  # TBBO: the book just before the trade
                if tbbo or (self.trades and isinstance(rec, dbn.MBP1Msg | dbn.CMBP1Msg)
                            and str(rec.action) in ("T", "Action.TRADE")):
                    rows.append((recno, rec.ts_event, rec.ts_recv, rec.instrument_id, KIND_TRADE, rec.price,
                                 rec.size, str(rec.side), undef, undef, -1, -1))
                if not tbbo:
                    rows.append(quote)  # MBP-1: the book after the event
            elif isinstance(rec, dbn.TradeMsg):
                rows.append((recno, rec.ts_event, rec.ts_recv, rec.instrument_id, KIND_TRADE, rec.price,
                             rec.size, str(rec.side), undef, undef, -1, -1))
            else:
                self.ignored += 1
                continue
            if len(rows) >= chunk_rows:
                total += len(rows)
                yield self._chunk(rows)
                rows = []
        if rows:
            total += len(rows)
            yield self._chunk(rows)
        if total == 0:
            raise DataError(f"{self.path}: no trade, MBP-1, TBBO, BBO, CMBP-1, MBP-10 or MBO records (schema {self.schema}, "
                            f"{self.ignored} other records); this reader reads those schemas only")

    @property
    def unknown_orders(self) -> int:
        """MBO cancels/modifies of orders never seen (no snapshot before them): no delta."""
        if self._fast is not None:
            return self._fast.unknown_orders
        return self.books.unknown_orders if self.books is not None else 0

    def _fast_chunks(self, meta: dbn.Metadata, blocks: Iterator, chunk_rows: int) -> Iterator[TickChunk]:
        """Pure MBO files: the numba path of ``io/mbo_fast.py`` (same rows as ``_mbo_rows``)."""
        from .mbo_fast import MboState, mbo_rows

        self._metadata(meta)
        self._fast = MboState()
        total = 0
        other = 0  # records of other types (not ticks)
        for block in blocks:
            out = mbo_rows(block.words, self._fast, self.trades)
            other += block.ignored
            self.ignored = other + self._fast.no_rows
            rec = out["rec"]
            ids = out["instrument_id"]
            if self.symbol:
                names, codes = [self.symbol], np.zeros(len(rec), np.uint32)
            elif len(ids) and ids.min() == ids.max():
                names, codes = [self._symbols.get(int(ids[0]), str(int(ids[0])))], np.zeros(len(rec), np.uint32)
            else:
                uniq, inverse = np.unique(ids, return_inverse=True)
                names = [self._symbols.get(int(i), str(int(i))) for i in uniq]
                codes = inverse.astype(np.uint32)
            ts, recv = out["ts_ns"], out["ts_recv_ns"]
            bad = ts < 0  # a u64 time past int64 (UNDEF_TIMESTAMP), read as a negative int64
            if bad.any():
                ts[bad] = 0
            recv[recv < 0] = -1
            cols = {"ts_ns": ts, "ts_recv_ns": recv, "symbol_id": codes, "kind": out["kind"],
                    "price": out["price"], "size": out["size"], "side": out["side"], "trade_id": out["event"]}
            records = block.record_numbers(rec)
            total += len(rec)
            for lo in range(0, len(rec), chunk_rows):
                sl = slice(lo, lo + chunk_rows)
                part = {k: v[sl] for k, v in cols.items()}
                verdict, fields = _bad_times(bad[sl])
                yield TickChunk(self.path, part, records[sl], names, one_sided_quotes=True, bad=verdict, bad_field=fields,
                                field_map={"price": "price", "ts_ns": "ts_event"},
                                raw=lambda i, b=block.recs, at=rec[sl]: dict(zip(b.dtype.names, b[at[i]].tolist(),
                                                                                 strict=True)))
        if total == 0:
            raise DataError(f"{self.path}: no trade, MBP-1, TBBO, BBO, CMBP-1, MBP-10 or MBO records (schema "
                            f"{self.schema}, {self.ignored} other records); this reader reads those schemas only")

    def _mbp10_rows(self, recno: int, rec: dbn.MBP10Msg, rows: list[tuple]) -> None:
        """The changes of one MBP-10 record's top 10 (and its trade, with ``trades``)."""
        from ..kernels.book import snapshot_deltas

        undef = dbn.UNDEF_PRICE
        lv = rec.levels
        raw = np.array([[x.bid_px for x in lv], [x.bid_sz for x in lv], [x.ask_px for x in lv], [x.ask_sz for x in lv]],
                       dtype=np.float64)
        for px, sz in ((0, 1), (2, 3)):
            empty = (raw[px] == float(undef)) | (raw[sz] <= 0)
            raw[px, empty] = np.nan
            raw[sz, empty] = np.nan
        head = (recno, rec.ts_event, rec.ts_recv, rec.instrument_id)
        if self.trades and str(rec.action) in ("T", "Action.TRADE"):
            rows.append((*head, KIND_TRADE, rec.price, rec.size, str(rec.side), undef, undef, -1, -1))
        side, price, size, _, self._mbp10[rec.instrument_id] = snapshot_deltas(
            self._mbp10.get(rec.instrument_id), raw[None], raw.shape[1])
        for sd, p, q in zip(side.tolist(), price.tolist(), size.tolist(), strict=True):
            code = "B" if sd == 1 else ("A" if sd == -1 else "N")
            rows.append((*head, KIND_BOOK, undef if p != p else int(p), int(q), code, undef, undef, -1, -1))

    def _mbo_rows(self, recno: int, rec: dbn.MBOMsg, rows: list[tuple]) -> None:
        """The book rows (and, with ``trades``, the trade) of one MBO record, in ``_chunk``'s layout."""
        undef = dbn.UNDEF_PRICE
        recv = -1 if int(rec.flags) & F_BAD_TS_RECV else rec.ts_recv
        head = (recno, rec.ts_event, recv, rec.instrument_id)
        if self.trades and str(rec.action) in ("T", "Action.TRADE"):
            rows.append((*head, KIND_TRADE, rec.price, rec.size, str(rec.side), undef, undef, -1, -1))
        deltas = self.books.apply(rec)
        for side, px, size, _action in deltas:
            code = "B" if side == 1 else ("A" if side == -1 else "N")
            self._event_rows.append(len(rows))
            rows.append((*head, KIND_BOOK, px, size, code, undef, undef, -1, -1))
        if deltas and int(rec.flags) & F_LAST:
            self._event_ends.append(len(rows) - 1)

    def _chunk(self, rows: list[tuple]) -> TickChunk:
        cols = list(zip(*rows, strict=True))
        ids = np.array(cols[3], dtype=np.int64)
        uniq = sorted(set(cols[3]))
        names = [self.symbol] if self.symbol else [self._symbols.get(i, str(i)) for i in uniq]
        codes = np.zeros(len(rows), dtype=np.uint32) if self.symbol else np.searchsorted(np.array(uniq), ids).astype(np.uint32)
        kind = np.array(cols[4], dtype=np.uint8)
        trade = kind == KIND_TRADE

        def px(values: tuple) -> np.ndarray:
            return scale_prices(np.array(values, dtype=np.int64))

        def qty(values: tuple, price: np.ndarray | None = None) -> np.ndarray:
            raw = np.array(values, dtype=np.int64)
            out = np.where((raw < 0) | (raw == dbn.UNDEF_ORDER_SIZE), np.nan, raw.astype(np.float64))
            if price is not None:
                out[np.isnan(price)] = np.nan  # an empty side has no size either
            return out

        sides = np.array([_SIDE.get(c[-1], SIDE_UNKNOWN) for c in cols[7]], dtype=np.int8)
        bid, ask = px(cols[8]), px(cols[9])
        ts, recv = _times(cols[1]), _times(cols[2])
        bad = ts < 0
        ts[bad] = 0
        data = {
            "ts_ns": ts, "ts_recv_ns": recv,
            "symbol_id": codes, "kind": kind, "price": px(cols[5]), "size": qty(cols[6]),
            "side": np.where(trade | (kind == KIND_BOOK), sides, 0).astype(np.int8), "bid": bid, "ask": ask,
            "bid_size": qty(cols[10], bid), "ask_size": qty(cols[11], ask),
        }
        records = np.array(cols[0], dtype=np.int64)
        if self._event_rows:  # MBO book rows: 0 inside an exchange event, 1 on its last delta (F_LAST)
            event = np.full(len(rows), -1, np.int64)
            event[self._event_rows] = 0
            event[self._event_ends] = 1
            data["trade_id"] = event
            self._event_rows, self._event_ends = [], []
        by_row = rows
        keys = ("record", "ts_event", "ts_recv", "instrument_id", "kind", "price", "size", "side",
                "bid_px_00", "ask_px_00", "bid_sz_00", "ask_sz_00")
        verdict, fields = _bad_times(bad)
        return TickChunk(self.path, data, records, names, bad=verdict, bad_field=fields,
                         field_map={"price": "price", "bid": "bid_px_00", "ask": "ask_px_00", "ts_ns": "ts_event"},
                         raw=lambda i: dict(zip(keys, by_row[i], strict=True)), one_sided_quotes=True)


def _times(values: tuple) -> np.ndarray:
    """DBN times (u64 ns) as int64, -1 where one does not fit (``UNDEF_TIMESTAMP`` is u64::MAX):
    ``np.array(..., int64)`` raised on it and the whole file was refused as unreadable."""
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return np.array([v if v <= _INT64_MAX else -1 for v in values], dtype=np.int64)


def _bad_times(bad: np.ndarray) -> tuple[np.ndarray | None, dict[int, str]]:
    """Verdicts for rows whose ``ts_event`` is undefined or past int64: unparsable, naming the field
    (the fast path's int64 view of such a time was -1, a time in 1969, delivered as is)."""
    if not bad.any():
        return None, {}
    return np.where(bad, np.uint8(Reason.UNPARSABLE), np.uint8(0)), dict.fromkeys(np.flatnonzero(bad).tolist(), "ts_event")
