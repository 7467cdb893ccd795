"""Binance: public trades/aggTrades CSV files, and raw websocket captures (JSON lines).

CSV (data.binance.vision). Columns are taken by *position*, because headers differ between
releases and many files have none (a header is detected when the first field is not a
number and skipped):

- trades: ``id, price, qty, quote_qty|base_qty, time, is_buyer_maker[, is_best_match]``
- aggTrades: ``agg_trade_id, price, qty, first_trade_id, last_trade_id, time,
  is_buyer_maker[, is_best_match]`` (``agg_trade_id`` becomes ``trade_id``)

``time`` is ms before 2025-01-01 and µs after for spot, so the unit is decided per value by
magnitude (``ts_unit="auto"``). Blocks of trades (not aggTrades) of at least
``PLAIN_MIN_BYTES`` whose lines are all plain are parsed by ``binance_fast.py`` (same rows,
bit for bit; any other block by pyarrow). ``is_buyer_maker = true`` means the *seller* was the aggressor
(side -1). The symbol is taken from the file name (``BTCUSDT-trades-2024-08-08.csv`` or
``binance-um-btcusdt-trades-20240808.csv`` give ``BTCUSDT``) unless given.

Feed captures (hftbacktest's recorder): one message a line, ``<local receive ts, ns> <JSON>``
with ``{"stream": "<sym>@trade|@aggTrade|@bookTicker|@depth...", "data": {...}}``. Trades use
the exchange trade time ``T`` (ms) as ``ts_ns``; bookTicker quotes use ``T`` where the stream
has it (futures) and the receive time otherwise (spot sends none). Because of that mix, and
because the capture is written in receive order, these sources replay on ``ts_recv_ns`` by
default. Depth updates and the REST snapshot line(s) without ``stream`` are not ticks: they
are counted as ``ignored``, unless ``book=True``. Each line is decoded with orjson (one small
dict per message is unavoidable for JSON).

Order books (``book=True``). The depth updates and REST snapshots of the capture become book
rows (``KIND_BOOK``, ``events.py``) by Binance's documented procedure for a local book:
updates before the first snapshot are buffered; at a snapshot (``lastUpdateId`` L) the book is
cleared and set to it, then the buffered and following updates apply from the first whose
range covers L (USD-M/COIN-M: ``U <= L <= u``; spot: ``U <= L + 1 <= u``), older ones dropped
(counted as ignored). After that every update must follow the previous one (USD-M/COIN-M:
``pu`` equals the previous ``u``; spot: ``U`` is the previous ``u + 1``). When one does not, the
gap is counted (``book_gaps``), a clear row empties the book (it is unknown, never silently
wrong) and updates are buffered again until the next snapshot line resynchronises it. Updates
applied after a snapshot take its receive time when theirs is earlier (they are applied then).
The snapshot lines carry no symbol: they belong to ``symbol``, or to the capture's one depth
symbol.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from ..errors import DataError
from ..events import KIND_BOOK, KIND_QUOTE, KIND_TRADE, SIDE_BUY, SIDE_SELL
from .chunk import BadRow, Reason, TickChunk
from .csv import CsvOptions, CsvReader, _Block, sniff_names
from .files import check_file, check_text, iter_lines, read_head
from .table import FieldMap

TRADE_NAMES = ("id", "price", "qty", "quote_qty", "time", "is_buyer_maker", "is_best_match")
AGG_NAMES = ("agg_trade_id", "price", "qty", "first_trade_id", "last_trade_id", "time", "is_buyer_maker", "is_best_match")


def symbol_from_name(path: str | Path) -> str | None:
    """``BTCUSDT`` from ``BTCUSDT-trades-2024-08-08.csv`` or ``binance-um-btcusdt-trades-…``."""
    stem = Path(path).name.split(".")[0]
    m = re.search(r"([A-Za-z0-9]+)-(?:trades|aggTrades|aggtrades)", stem)
    return m.group(1).upper() if m else None


def _layout(path: str | Path, agg: bool) -> tuple[bool, tuple[str, ...]]:
    first = sniff_names(path)
    header = not first[0].lstrip("-").isdigit()
    if header:
        lines = [ln for ln in read_head(path).split(b"\n", 64) if ln.strip()]
        if len(lines) < 2:
            raise DataError(f"{path}: the file has a header but no rows; nothing to replay")
        first = lines[1].decode("utf-8", "replace").strip().split(",")
    names = AGG_NAMES if agg else TRADE_NAMES
    expected = (7, 8) if agg else (6, 7)
    if len(first) not in expected:
        kind = "aggTrades" if agg else "trades"
        raise DataError(
            f"{path}: a Binance {kind} row has {expected[0]} or {expected[1]} fields, this one has "
            f"{len(first)} ({','.join(first)}): wrong columns, or not a Binance {kind} file"
        )
    return header, names[: len(first)]


def binance_trades(path: str | Path, *, symbol: str | None = None, agg: bool = False) -> CsvReader:
    """A reader of a Binance public ``trades`` (or, with ``agg``, ``aggTrades``) CSV file."""
    check_file(path)
    header, names = _layout(path, agg)
    fmap = FieldMap(ts="time", ts_unit="auto", price="price", size="qty", side="is_buyer_maker",
                    side_encoding="is_buyer_maker", trade_id=names[0], kind="trade")
    sym = symbol or symbol_from_name(path) or Path(path).name.split(".")[0]
    reader = CsvReader if agg else _TradesReader
    return reader(path, fmap, CsvOptions(header=header, column_names=names), symbol=sym)


PLAIN_MIN_BYTES = 1 << 21
"""Blocks at least this large go through the numba parser (``binance_fast.py``); smaller
files stay on pyarrow, so that they do not pay for loading the parser (~10 ms)."""

_PLAIN_TYPES = {"time": pa.int64(), "price": pa.float64(), "qty": pa.float64(), "is_buyer_maker": pa.bool_(),
                "id": pa.int64()}


class _TradesReader(CsvReader):
    """The trades CSV reader, parsing plain blocks with ``binance_fast`` (same rows, faster)."""

    def _plain_chunks(self, blk: _Block, chunk_rows: int) -> list[TickChunk] | None:
        if len(blk.data) < PLAIN_MIN_BYTES or self._types(robust=False) != _PLAIN_TYPES:
            return None
        from .binance_fast import parse_block

        cols = parse_block(blk.data, blk.lines, len(self._names))
        if cols is None:
            return None
        records = np.arange(blk.first, blk.first + blk.lines, dtype=np.int64)
        field_map = {"ts_ns": "time", "price": "price", "size": "qty", "side": "is_buyer_maker",
                     "trade_id": self.fmap.trade_id or "id"}
        out = []
        for start in range(0, blk.lines, chunk_rows):
            part = slice(start, start + chunk_rows)
            recs = records[part]
            n = len(recs)
            columns = {k: v[part] for k, v in cols.items()}
            columns["kind"] = np.full(n, KIND_TRADE, dtype=np.uint8)
            columns["symbol_id"] = np.zeros(n, dtype=np.uint32)
            chunk = TickChunk(self.path, columns, recs, [self.symbol or ""], field_map=field_map,
                              raw=lambda i, r=recs: self._plain_record(int(r[i])))
            chunk.raw_line = lambda i, r=recs: self._lines.get(int(r[i]))
            out.append(chunk)
        self._upto = int(records[-1])
        return out

    def _plain_record(self, line: int) -> dict[str, object]:
        """A plain line's record as the pyarrow path gives it (its parsed, mapped columns),
        from the whole line (an unused field may make it longer than the raw text kept)."""
        values = dict(zip(self._names, self._lines.get(line, keep=None).split(","), strict=True))
        return {"time": int(values["time"]), "price": float(values["price"]), "qty": float(values["qty"]),
                "is_buyer_maker": values["is_buyer_maker"] in ("true", "True"), "id": int(values["id"])}


def binance_agg_trades(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of a Binance public ``aggTrades`` CSV file."""
    return binance_trades(path, symbol=symbol, agg=True)


class BinanceFeedReader:
    """Reads a Binance websocket capture (``<ts_ns> <json>`` lines, .gz/.zst transparent)."""

    def __init__(self, path: str | Path, *, symbol: str | None = None, book: bool = False):
        self.path = str(check_file(path))
        check_text(self.path)
        self.symbol = symbol
        self.book = book
        self.ignored = 0
        self.book_gaps = 0
        self._depth: dict[str, _DepthSync] = {}
        self._pending_snapshot: list[tuple[int, int, dict, bytes]] = []

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Trades and quotes (and, with ``book``, book rows) in capture order; other lines ignored."""
        self.ignored = self.book_gaps = 0
        self._depth, self._pending_snapshot = {}, []
        acc = _FeedBatch()
        rows = 0
        for lineno, line in iter_lines(self.path):
            if not line.strip():
                continue
            self._parse(lineno, line, acc)
            if len(acc) >= chunk_rows:
                rows += len(acc)
                yield acc.chunk(self.path, self.symbol)
                acc = _FeedBatch()
        self.ignored += sum(len(d.buffer) for d in self._depth.values()) + len(self._pending_snapshot)
        if len(acc) or acc.dropped:
            rows += len(acc)
            yield acc.chunk(self.path, self.symbol)
        if rows == 0 and not acc.dropped:
            raise DataError(f"{self.path}: no trade or bookTicker messages found ({self.ignored} other lines); is this a Binance feed capture?")

    def _parse(self, lineno: int, line: bytes, acc: _FeedBatch) -> None:
        head, _, body = line.partition(b" ")
        d = None
        try:
            recv = int(head) if head.isdigit() and len(head) <= 19 else _int64(head.decode("ascii", "replace"), "<receive ts>")
            if recv > _INT64:
                raise _Bad(Reason.UNPARSABLE, "<receive ts>", head.decode("ascii", "replace"))
            try:
                msg = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise _Bad(Reason.UNPARSABLE, None, f"not JSON ({e})") from None
            if not isinstance(msg, dict):
                raise _Bad(Reason.UNPARSABLE, None, f"a JSON {type(msg).__name__}, expected an object")
            stream = msg.get("stream")
            if stream is None:
                if self.book and "lastUpdateId" in msg:
                    self._snapshot(lineno, recv, msg, line, acc)
                else:
                    self.ignored += 1  # the REST depth snapshot lines
                return
            if not isinstance(stream, str):
                raise _Bad(Reason.UNPARSABLE, "stream", stream)
            kind = stream.rpartition("@")[2] if "@depth" not in stream else "depth"
            if kind not in ("trade", "aggTrade", "bookTicker") and not (self.book and kind == "depth"):
                self.ignored += 1
                return
            d = msg.get("data")
            if not isinstance(d, dict):
                raise _Bad(Reason.MISSING_FIELD if d is None else Reason.UNPARSABLE, "data", d)
            if kind == "depth":
                self._update(lineno, recv, d, line, acc)
            elif kind == "bookTicker":
                acc.add_quote(lineno, recv, d, line)
            else:
                acc.add_trade(lineno, recv, d, "t" if kind == "trade" else "a", line)
        except _Bad as e:
            text = line.decode("utf-8", "replace")
            sym = d["s"] if isinstance(d, dict) and isinstance(d.get("s"), str) else None
            value = e.value if e.value is None or isinstance(e.value, str | int | float | bool) else repr(e.value)[:200]
            acc.dropped.append(BadRow(self.path, lineno, e.reason, e.field, value if e.field else text[:200],
                                      text, self.symbol or sym))


    # --- order book (book=True) -------------------------------------------------------
    def _sync(self, sym: str) -> _DepthSync:
        st = self._depth.get(sym)
        if st is None:
            st = self._depth[sym] = _DepthSync()
            if self._pending_snapshot and (self.symbol is None or self.symbol == sym):
                pending, self._pending_snapshot = self._pending_snapshot, []
                st.snapshot = pending[-1]
                self.ignored += len(pending) - 1
        return st

    def _snapshot(self, lineno: int, recv: int, msg: dict, line: bytes, acc: _FeedBatch) -> None:
        for key in ("bids", "asks"):
            if not isinstance(msg.get(key), list):
                raise _Bad(Reason.MISSING_FIELD if msg.get(key) is None else Reason.UNPARSABLE, key, msg.get(key))
        _int64(_get(msg, "lastUpdateId"), "lastUpdateId")
        syms = [self.symbol] if self.symbol else list(self._depth)
        if len(syms) > 1:
            raise _Bad(Reason.UNKNOWN_SYMBOL, None, f"a depth snapshot in a capture of {len(syms)} depth symbols")
        if not syms:
            self._pending_snapshot.append((lineno, recv, msg, line))
            return
        st = self._depth.setdefault(syms[0], _DepthSync())
        self._apply_snapshot(syms[0], st, (lineno, recv, msg, line), acc)

    def _apply_snapshot(self, sym: str, st: _DepthSync, snap: tuple[int, int, dict, bytes], acc: _FeedBatch) -> None:
        lineno, recv, msg, line = snap
        t = msg.get("T") or msg.get("E")
        ts = _int64(t, "T", 1_000_000) if t is not None else recv
        levels = [(side, *_level(lv, key)) for key, side in (("bids", 1), ("asks", -1)) for lv in msg[key]]
        acc.add_level(lineno, recv, ts, sym, 0, float("nan"), 0.0, line)  # every level parsed: now emit
        for side, p, q in levels:
            if q > 0:
                acc.add_level(lineno, recv, ts, sym, side, p, q, line)
        st.last_id, st.synced, st.live, st.snapshot_recv = int(msg["lastUpdateId"]), False, True, recv
        pending, st.buffer = st.buffer, []
        for ev in pending:
            self._depth_event(sym, st, ev, acc)

    def _update(self, lineno: int, recv: int, d: dict, line: bytes, acc: _FeedBatch) -> None:
        sym = _symbol(d)
        first, last = _int64(_get(d, "U"), "U"), _int64(_get(d, "u"), "u")
        prev = _int64(d["pu"], "pu") if d.get("pu") is not None else None
        t = d.get("T") or d.get("E")
        ts = _int64(t, "T", 1_000_000) if t is not None else recv
        for key in ("b", "a"):
            if not isinstance(d.get(key), list):
                raise _Bad(Reason.MISSING_FIELD if d.get(key) is None else Reason.UNPARSABLE, key, d.get(key))
        levels = [(1, *_level(lv, "b")) for lv in d["b"]] + [(-1, *_level(lv, "a")) for lv in d["a"]]
        st = self._sync(sym)
        ev = (lineno, recv, ts, first, last, prev, levels, line)
        if st.snapshot is not None:
            snap, st.snapshot = st.snapshot, None
            self._apply_snapshot(sym, st, snap, acc)
        self._depth_event(sym, st, ev, acc)

    def _depth_event(self, sym: str, st: _DepthSync, ev: tuple, acc: _FeedBatch) -> None:
        lineno, recv, ts, first, last, prev, levels, line = ev
        if not st.live:
            st.buffer.append(ev)
            if len(st.buffer) > DEPTH_BUFFER:
                st.buffer.pop(0)
                self.ignored += 1
            return
        futures = prev is not None
        if not st.synced:
            target = st.last_id if futures else st.last_id + 1
            if last < target:
                self.ignored += 1  # older than the snapshot
                return
            ok = first <= target
        else:
            ok = prev == st.last_u if futures else first == st.last_u + 1
        if not ok:
            self.book_gaps += 1
            acc.add_level(lineno, max(recv, st.snapshot_recv), ts, sym, 0, float("nan"), 0.0, line)
            st.live = st.synced = False
            st.buffer = []
            return
        st.synced, st.last_u = True, last
        at = max(recv, st.snapshot_recv)
        for side, p, q in levels:
            acc.add_level(lineno, at, ts, sym, side, p, q, line)


DEPTH_BUFFER = 10_000
"""Depth updates kept while a symbol waits for a snapshot (older ones are dropped, as ignored)."""


class _DepthSync:
    """One symbol's place in Binance's update-id sequence."""

    def __init__(self) -> None:
        self.live = False  # a snapshot has been applied (and no gap since)
        self.synced = False  # the first update after it has been applied
        self.last_id = 0  # the snapshot's lastUpdateId
        self.last_u = 0  # the last applied update's u
        self.snapshot_recv = 0
        self.buffer: list[tuple] = []
        self.snapshot: tuple | None = None  # a snapshot seen before the symbol was known


def _level(lv: object, key: str) -> tuple[float, float]:
    if not isinstance(lv, list | tuple) or len(lv) < 2:
        raise _Bad(Reason.UNPARSABLE, key, lv)
    p, q = _number(lv[0], key), _number(lv[1], key)
    if not (p > 0 and q >= 0 and p < float("inf") and q < float("inf")):
        raise _Bad(Reason.PRICE_NOT_POSITIVE if not p > 0 else Reason.SIZE_NOT_POSITIVE, key, lv)
    return p, q


class _Bad(Exception):
    def __init__(self, reason: Reason, field: str | None, value: object):
        self.reason, self.field, self.value = reason, field, value


_INT64 = (1 << 63) - 1
_T_MAX = _INT64 // 1_000_000  # ms that fit int64 once in ns


def _get(d: dict, key: str) -> object:
    v = d.get(key)
    if v is None:
        raise _Bad(Reason.MISSING_FIELD, key, None)
    return v


def _int64(v: object, key: str, scale: int = 1) -> int:
    """An integer field (an int, or digits as text) that fits int64 after ``* scale``."""
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise _Bad(Reason.UNPARSABLE, key, v)
    try:
        x = int(v)
    except ValueError:
        raise _Bad(Reason.UNPARSABLE, key, v) from None
    if isinstance(v, str) and not v.strip().lstrip("-").isdigit():
        raise _Bad(Reason.UNPARSABLE, key, v)
    if not -_INT64 <= x * scale <= _INT64:
        raise _Bad(Reason.UNPARSABLE, key, v)  # beyond int64: refused, never wrapped
    return x * scale


def _number(v: object, key: str) -> float:
    """A price or size: Binance sends decimal text; numbers are accepted, booleans are not."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise _Bad(Reason.UNPARSABLE, key, v)
    try:
        return float(v)
    except (ValueError, OverflowError):
        raise _Bad(Reason.UNPARSABLE, key, v) from None


def _symbol(d: dict) -> str:
    s = _get(d, "s")
    if not isinstance(s, str) or not s:
        raise _Bad(Reason.UNPARSABLE, "s", s)
    return s


class _FeedBatch:
    """Column lists for one chunk of feed messages (parsed values, not dicts)."""

    def __init__(self) -> None:
        self.records: list[int] = []
        self.recv: list[int] = []
        self.ts: list[int] = []
        self.kind: list[int] = []
        self.sym: list[str] = []
        self.vals: list[tuple[float, float, int, int, float, float, float, float]] = []
        self.dropped: list[BadRow] = []
        self.lines: list[bytes] = []

    def __len__(self) -> int:
        return len(self.records)

    def add_trade(self, lineno: int, recv: int, d: dict, id_key: str, line: bytes) -> None:
        nan = float("nan")
        p, q, maker, tid, t, sym = d.get("p"), d.get("q"), d.get("m"), d.get(id_key), d.get("T"), d.get("s")
        if (type(p) is str and type(q) is str and type(maker) is bool and type(tid) is int and type(t) is int
                and type(sym) is str and sym and -_INT64 <= tid <= _INT64 and -_T_MAX <= t <= _T_MAX):
            try:  # the shape every Binance message has: no further checks needed
                row = (float(p), float(q), SIDE_SELL if maker else SIDE_BUY, tid, nan, nan, nan, nan)
            except ValueError:
                pass
            else:
                self._push(lineno, recv, t * 1_000_000, KIND_TRADE, sym, row, line)
                return
        if not isinstance(maker, bool):
            raise _Bad(Reason.UNKNOWN_SIDE, "m", maker)
        row = (_number(_get(d, "p"), "p"), _number(_get(d, "q"), "q"), SIDE_SELL if maker else SIDE_BUY,
               _int64(_get(d, id_key), id_key), nan, nan, nan, nan)
        ts = _int64(_get(d, "T"), "T", 1_000_000)
        self._push(lineno, recv, ts, KIND_TRADE, _symbol(d), row, line)

    def add_quote(self, lineno: int, recv: int, d: dict, line: bytes) -> None:
        nan = float("nan")
        b, a, bs, az, t, sym = d.get("b"), d.get("a"), d.get("B"), d.get("A"), d.get("T"), d.get("s")
        if (type(b) is str and type(a) is str and type(bs) is str and type(az) is str and type(sym) is str and sym
                and (t is None or (type(t) is int and -_T_MAX <= t <= _T_MAX))):
            try:  # the shape every Binance message has: no further checks needed
                row = (nan, nan, 0, -1, float(b), float(a), float(bs), float(az))
            except ValueError:
                pass
            else:
                self._push(lineno, recv, recv if t is None else t * 1_000_000, KIND_QUOTE, sym, row, line)
                return
        row = (nan, nan, 0, -1, *(_number(_get(d, k), k) for k in ("b", "a", "B", "A")))
        ts = _int64(d["T"], "T", 1_000_000) if d.get("T") is not None else recv
        self._push(lineno, recv, ts, KIND_QUOTE, _symbol(d), row, line)

    def add_level(self, lineno: int, recv: int, ts: int, sym: str, side: int, price: float, size: float,
                  line: bytes) -> None:
        nan = float("nan")
        self._push(lineno, recv, ts, KIND_BOOK, sym, (price, size, side, -1, nan, nan, nan, nan), line)

    def _push(self, lineno: int, recv: int, ts: int, kind: int, sym: str, row: tuple, line: bytes) -> None:
        self.records.append(lineno)
        self.recv.append(recv)
        self.ts.append(ts)
        self.kind.append(kind)
        self.sym.append(sym)
        self.vals.append(row)
        self.lines.append(line)

    def chunk(self, source: str, symbol: str | None) -> TickChunk:
        n = len(self.records)
        v = np.array(self.vals, dtype=np.float64).reshape(n, 8)
        names = sorted(set(self.sym)) if symbol is None else [symbol]
        index = {s: i for i, s in enumerate(names)}
        codes = np.array([index.get(s, 0) for s in self.sym], dtype=np.uint32)
        cols = {
            "ts_ns": np.array(self.ts, dtype=np.int64), "ts_recv_ns": np.array(self.recv, dtype=np.int64),
            "kind": np.array(self.kind, dtype=np.uint8), "symbol_id": codes,
            "price": v[:, 0], "size": v[:, 1], "side": v[:, 2].astype(np.int8), "trade_id": v[:, 3].astype(np.int64),
            "bid": v[:, 4], "ask": v[:, 5], "bid_size": v[:, 6], "ask_size": v[:, 7],
        }
        field_map = {"price": "p", "size": "q", "trade_id": "t", "bid": "b", "ask": "a", "bid_size": "B",
                     "ask_size": "A", "ts_ns": "T", "ts_recv_ns": "<receive ts>"}
        lines = self.lines
        return TickChunk(source, cols, np.array(self.records, dtype=np.int64), names or [""],
                         field_map=field_map, dropped=self.dropped,
                         raw=lambda i: orjson.loads(lines[i].partition(b" ")[2]).get("data"),
                         raw_line=lambda i: lines[i].decode("utf-8", "replace"))
