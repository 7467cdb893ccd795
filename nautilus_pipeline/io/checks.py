"""Bad input policy, row checks, quarantine and accounting: nothing is lost silently.

Every row a reader yields goes through :class:`Validator` once. The checks are vectorised
over a chunk (numpy masks; one Python loop per *symbol* present in the chunk, not per row)
and the first failing check names the row's :class:`~nautilus_pipeline.io.chunk.Reason`:

1. the reader's own verdict: unparsable field, missing field, unknown side code, wrong
   number of fields;
2. trades: price finite and > 0, size finite and > 0; quotes: bid/ask finite and > 0, sizes
   (where present) finite and >= 0, not crossed (bid > ask; a locked book bid == ask passes);
   book level deltas (``KIND_BOOK``): side +1/-1 with a finite price > 0 and a finite size
   >= 0 (0 removes the level), or side 0 (a clear) with a NaN price;
3. duplicate trade id within a symbol (where ids exist, i.e. ``trade_id >= 0``);
4. time order within a symbol, on the source's replay clock (``ts_ns`` or ``ts_recv_ns``);
   equal timestamps pass unless ``allow_equal_ts=False``. See "Time order" below.

Policies (per source): ``fail`` raises :class:`DataError` on the first bad row (file,
line/record, field, value, what to do); ``reject`` drops and counts; ``quarantine`` drops,
counts and appends ``{"source", "record", "reason", "field", "value", "symbol", "message",
"raw"}`` as one JSON line (orjson) to a side file. ``raw`` is the line's text as it is in the
file for CSV and JSON lines; for Parquet and DBN, the record as parsed (a dict).

Time order: the outlier is refused, not the file. Judged against the highest time seen, one
corrupt *future* timestamp (a flipped digit, a wrapped unit) would be delivered and every
later row refused as going backwards. So a row is judged against its neighbours: a row
earlier than the last accepted row of its symbol is ``ts_backwards``; a row whose next row
is earlier than it (the first with another time) is put to a vote of the next :data:`VOTE_ROWS` rows of its symbol (among
the next :data:`VOTE_REACH` rows of the file, not counting rows already behind the last
accepted time): when most of them, and at least two, are earlier, the row is the odd one
out and is refused as ``ts_ahead``, and the rows after it are kept (with one row of evidence,
at the end of a file, the later row is refused as before). A real jump forward (a weekend gap) is followed
by later rows and passes; a run of late rows after a good one is refused row by row as
before. Fewer than ``VOTE_ROWS // 2`` consecutive corrupt rows are refused this way. The
votes see the rows after the chunk (:func:`validated` reads ahead), so the verdicts do not
depend on the chunk size. The sequential scan runs (numba) only for a chunk that is not in
order; an ordered chunk costs one comparison per row as before.

Duplicate trade ids are remembered as ranges of consecutive ids (Binance and Nautilus ids are
contiguous, so one range per symbol): memory grows with the gaps between ids, not the rows.

Accounting: ``read = delivered + rejected + quarantined`` per source and per symbol;
``delivered`` is counted by whoever emits the rows (the replay), so the identity holds once a
replay has run to the end. Lines that are not ticks by design (depth updates, snapshots in a
feed capture) are counted apart as ``ignored`` and are not rows.
"""

from __future__ import annotations

import collections
import contextlib
import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numba
import numpy as np
import orjson

from ..errors import ConfigError, DataError, PipelineError
from ..events import KIND_BOOK, KIND_QUOTE, KIND_TRADE
from .chunk import BadRow, Reason, TickChunk

UNKNOWN_SYMBOL = "<unknown>"

VOTE_ROWS = 16
"""Rows of the same symbol after an out-of-order row that decide whether it is the outlier."""
VOTE_REACH = 4096
"""How far ahead (rows of the file) the votes are looked for; also the read-ahead of :func:`validated`."""

_BACKWARDS, _AHEAD = 1, 2


@numba.njit(cache=True, nogil=True)
def _time_order(t, pos, cand, last, have, strict, votes, reach):  # pragma: no cover - numba
    """Verdicts for the candidate rows of one symbol (see the module docstring).

    ``t``: times of the rows that vote (candidates and others with a readable time), then the
    read-ahead rows; ``pos``: their row positions in the file (for ``reach``); ``cand``: which
    are judged. Returns (verdict 0/backwards/ahead, the time each refused row is compared
    with, the last accepted time, whether there is one).
    """
    n = t.shape[0]
    out = np.zeros(n, np.uint8)
    ref = np.zeros(n, np.int64)
    for a in range(n):
        if not cand[a]:
            continue
        ti = t[a]
        if have and (ti < last or (strict and ti == last)):
            out[a] = _BACKWARDS
            ref[a] = last
            continue
        d = a + 1
        while d < n and t[d] == ti and d - a <= votes:
            d += 1  # the first of the next rows with another time decides whether to vote
        if d < n and d - a <= votes and pos[d] - pos[a] <= reach and t[d] < ti:
            before = 0
            count = 0
            for c in range(a + 1, n):
                if pos[c] - pos[a] > reach or count >= votes:
                    break
                x = t[c]
                if have and x < last:
                    continue
                count += 1
                if x < ti:
                    before += 1
            if 2 * before > count and before >= 2:
                out[a] = _AHEAD
                ref[a] = t[d]
                continue
        last = ti
        have = True
    return out, ref, last, have


class Policy(enum.StrEnum):
    """What to do with a bad row."""

    FAIL = "fail"
    REJECT = "reject"
    QUARANTINE = "quarantine"

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"policy {value!r} is not one of {[p.value for p in cls]}"
            ) from None


@dataclass
class Counts:
    """Row counts of one source or symbol; ``by_reason`` splits rejected + quarantined."""

    read: int = 0
    delivered: int = 0
    rejected: int = 0
    quarantined: int = 0
    by_reason: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def balanced(self) -> bool:
        return self.read == self.delivered + self.rejected + self.quarantined

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "delivered": self.delivered, "rejected": self.rejected,
                "quarantined": self.quarantined, "by_reason": dict(self.by_reason)}


@dataclass
class Accounting:
    """Counts per source, and per symbol within each source; ``ignored`` lines per source;
    ``book_gaps`` per source: sequence gaps a book reader found (and resynchronised after),
    ``unknown_orders``: MBO cancels/modifies of orders it never saw (no delta made)."""

    sources: dict[str, Counts] = field(default_factory=dict)
    symbols: dict[tuple[str, str], Counts] = field(default_factory=dict)
    ignored: collections.Counter[str] = field(default_factory=collections.Counter)
    book_gaps: collections.Counter[str] = field(default_factory=collections.Counter)
    unknown_orders: collections.Counter[str] = field(default_factory=collections.Counter)

    def _get(self, source: str, symbol: str) -> tuple[Counts, Counts]:
        src = self.sources.setdefault(source, Counts())
        sym = self.symbols.setdefault((source, symbol), Counts())
        return src, sym

    def add(self, source: str, symbol: str, what: str, n: int, reason: str | None = None) -> None:
        """Add ``n`` rows of ``symbol`` to counter ``what`` (read/delivered/rejected/quarantined)."""
        if n == 0:
            return
        for c in self._get(source, symbol):
            setattr(c, what, getattr(c, what) + n)
            if reason is not None:
                c.by_reason[reason] += n

    @property
    def total(self) -> Counts:
        t = Counts()
        for c in self.sources.values():
            t.read += c.read
            t.delivered += c.delivered
            t.rejected += c.rejected
            t.quarantined += c.quarantined
            t.by_reason.update(c.by_reason)
        return t

    def check(self) -> None:
        """Raise :class:`DataError` naming the source/symbol whose counts do not add up."""
        for key, c in [*self.sources.items(), *self.symbols.items()]:
            if not c.balanced:
                raise DataError(
                    f"accounting of {key}: read {c.read} != delivered {c.delivered} + rejected "
                    f"{c.rejected} + quarantined {c.quarantined}; was the replay stopped early?"
                )

    def as_dict(self) -> dict[str, Any]:
        return {
            "sources": {k: v.as_dict() for k, v in self.sources.items()},
            "symbols": {f"{s}:{y}": v.as_dict() for (s, y), v in self.symbols.items()},
            "ignored": dict(self.ignored),
            **({"book_gaps": dict(self.book_gaps)} if self.book_gaps else {}),
            **({"unknown_orders": dict(self.unknown_orders)} if self.unknown_orders else {}),
        }


class IdSet:
    """Trade ids seen, as sorted disjoint inclusive ranges ``[starts[i], ends[i]]``."""

    def __init__(self) -> None:
        self.starts = np.empty(0, dtype=np.int64)
        self.ends = np.empty(0, dtype=np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        if len(self.starts) == 0 or len(ids) == 0 or ids.max() < self.starts[0] or ids.min() > self.ends[-1]:
            return np.zeros(len(ids), dtype=bool)
        i = np.searchsorted(self.starts, ids, side="right") - 1
        return (i >= 0) & (ids <= self.ends[np.maximum(i, 0)])

    def add(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        u = ids if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()) else np.unique(ids)
        br = np.flatnonzero(np.diff(u) != 1)
        s = u[np.r_[0, br + 1]]
        e = u[np.r_[br, len(u) - 1]]
        if len(self.ends) == 0:
            self.starts, self.ends = s, e
            return
        if s[0] > self.ends[-1]:
            if s[0] == self.ends[-1] + 1:
                self.ends = self.ends.copy()
                self.ends[-1] = e[0]
                s, e = s[1:], e[1:]
            self.starts = np.concatenate([self.starts, s])
            self.ends = np.concatenate([self.ends, e])
            return
        starts = np.concatenate([self.starts, s])
        ends = np.concatenate([self.ends, e])
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        reach = np.maximum.accumulate(ends)
        new = np.r_[True, starts[1:] > reach[:-1] + 1]
        grp = np.cumsum(new) - 1
        self.starts = starts[new]
        self.ends = np.maximum.reduceat(ends, np.flatnonzero(new)) if len(grp) else ends

    def __len__(self) -> int:
        return int((self.ends - self.starts + 1).sum())


_FIELD_OF_REASON = {
    Reason.PRICE_NOT_FINITE: "price",
    Reason.PRICE_NOT_POSITIVE: "price",
    Reason.SIZE_NOT_POSITIVE: "size",
    Reason.DUPLICATE_TRADE_ID: "trade_id",
    Reason.CROSSED_QUOTE: "bid",
    Reason.UNKNOWN_SYMBOL: "symbol",
}


def _jsonable(v: object) -> object:
    """``v`` with what orjson cannot write (ints beyond 64 bits, lone surrogates) as text."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < (1 << 64):
        return str(v)
    if isinstance(v, str):
        return v.encode("utf-8", "replace").decode("utf-8")
    return v


class Quarantine:
    """Appends refused rows as JSON lines; opened on the first row, closed by :meth:`close`.

    A write that fails (a full disk) cuts the file back to its last whole line and raises a
    :class:`PipelineError` naming the file: the run stops, the file stays valid.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh: IO[bytes] | None = None
        self.count = 0

    def write(self, row: BadRow) -> None:
        try:
            self._write(row)
        except OSError as e:
            if self._fh is not None:
                with contextlib.suppress(OSError):
                    self._fh.truncate(self._good)
                    self._fh.close()
                self._fh = None
            raise PipelineError(f"{self.path}: cannot write the quarantine file ({e.strerror or e}); "
                                "free some space or point quarantine= elsewhere") from e

    def _write(self, row: BadRow) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab", buffering=0)
            self._good = self._fh.seek(0, 2)
        rec = {"source": row.source, "record": row.record, "reason": row.reason.name.lower(),
               "field": row.field, "value": row.value, "symbol": row.symbol,
               "message": row.message(), "raw": row.raw}
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        try:
            line = orjson.dumps(rec, default=str, option=option)
        except orjson.JSONEncodeError:  # integers beyond 64 bits, surrogates: kept as text
            line = orjson.dumps(_jsonable(rec), default=str, option=option)
        view = memoryview(line)
        while view:
            view = view[self._fh.write(view):]
        self._good += len(line)
        self.count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Validator:
    """Applies the checks and the policy of one source to its chunks, in file order.

    ``order_by`` names the replay clock the time check runs on (``ts_ns`` or ``ts_recv_ns``).
    ``zero_size_trades``: a trade of size 0 passes (``Pipeline.ingest``: the kernels define it).
    State (last timestamp, ids seen per symbol) persists across chunks.
    """

    def __init__(
        self,
        source: str,
        policy: Policy | str = Policy.FAIL,
        *,
        accounting: Accounting | None = None,
        quarantine: Quarantine | str | Path | None = None,
        allow_equal_ts: bool = True,
        order_by: str = "ts_ns",
        symbols_allowed: Iterable[str] | None = None,
        zero_size_trades: bool = False,
    ):
        self.source = source
        self.zero_size_trades = zero_size_trades
        self.symbols_allowed = frozenset(symbols_allowed) if symbols_allowed is not None else None
        self.policy = Policy.parse(policy)
        if order_by not in ("ts_ns", "ts_recv_ns"):
            raise ConfigError(f"order_by {order_by!r} must be 'ts_ns' or 'ts_recv_ns'")
        self.order_by = order_by
        self.allow_equal_ts = allow_equal_ts
        self.accounting = accounting if accounting is not None else Accounting()
        if self.policy is Policy.QUARANTINE and quarantine is None:
            raise ConfigError(
                f"source {source}: policy 'quarantine' needs a quarantine file path (quarantine=...)"
            )
        self.quarantine = quarantine if isinstance(quarantine, Quarantine) or quarantine is None else Quarantine(quarantine)
        self._last_ts: dict[str, int] = {}
        self._ids: dict[str, IdSet] = {}
        self._back_prev: dict[int, int] = {}

    # --- per chunk ---------------------------------------------------------------------
    def process(self, chunk: TickChunk, lookahead: Sequence[TickChunk] = ()) -> TickChunk:
        """Return the chunk's good rows; count, raise on or quarantine the others.

        ``lookahead``: the chunks that follow (unchecked), whose first :data:`VOTE_REACH`
        rows vote on out-of-order rows near the end of this one (:func:`validated` passes them).
        """
        n = len(chunk)
        self._back_prev: dict[int, int] = {}
        self._ahead = _Ahead(lookahead, self.order_by)
        reason = np.zeros(n, dtype=np.uint8) if chunk.bad is None else chunk.bad.astype(np.uint8, copy=True)
        if n:
            self._field_checks(chunk, reason)
            self._sequence_checks(chunk, reason)
        names = chunk.symbols
        codes = chunk.column("symbol_id") if n else np.empty(0, dtype=np.uint32)
        self._count(names, codes, "read", None)
        for d in chunk.dropped:
            self.accounting.add(self.source, d.symbol or UNKNOWN_SYMBOL, "read", 1)
        bad_idx = np.flatnonzero(reason)
        if len(bad_idx) or chunk.dropped:
            self._handle_bad(chunk, reason, bad_idx)
        if not len(bad_idx):
            return chunk
        keep = reason == 0
        cols = {k: v[keep] for k, v in chunk.columns.items()}
        return TickChunk(chunk.source, cols, chunk.records[keep], names)

    def _count(self, names: list[str], codes: np.ndarray, what: str, reason: str | None) -> None:
        if len(codes) == 0:
            return
        if len(names) == 1:
            self.accounting.add(self.source, names[0], what, len(codes), reason)
            return
        counts = np.bincount(codes, minlength=len(names))
        for k in np.flatnonzero(counts):
            self.accounting.add(self.source, names[k], what, int(counts[k]), reason)

    def _field_checks(self, chunk: TickChunk, reason: np.ndarray) -> None:
        if self.symbols_allowed is not None:
            unknown = [i for i, name in enumerate(chunk.symbols) if name not in self.symbols_allowed]
            if unknown:
                m = np.isin(chunk.column("symbol_id"), unknown) & (reason == 0)
                reason[m] = Reason.UNKNOWN_SYMBOL
        kind = chunk.column("kind")
        trade = kind == KIND_TRADE
        quote = kind == KIND_QUOTE

        def flag(mask: np.ndarray, why: Reason) -> None:
            m = mask & (reason == 0)
            reason[m] = why

        if trade.any():
            price = chunk.column("price")
            size = chunk.column("size")
            with np.errstate(invalid="ignore"):
                flag(trade & ~np.isfinite(price), Reason.PRICE_NOT_FINITE)
                flag(trade & (price <= 0), Reason.PRICE_NOT_POSITIVE)
                ok_size = (size >= 0) if self.zero_size_trades else (size > 0)
                flag(trade & ~(np.isfinite(size) & ok_size), Reason.SIZE_NOT_POSITIVE)
        if quote.any():
            bid, ask = chunk.column("bid"), chunk.column("ask")
            bsz, asz = chunk.column("bid_size"), chunk.column("ask_size")
            with np.errstate(invalid="ignore"):
                if chunk.one_sided_quotes:  # NaN side = nothing on it (e.g. a DBN option book)
                    flag(quote & (np.isinf(bid) | np.isinf(ask) | (np.isnan(bid) & np.isnan(ask))),
                         Reason.PRICE_NOT_FINITE)
                else:
                    flag(quote & ~(np.isfinite(bid) & np.isfinite(ask)), Reason.PRICE_NOT_FINITE)
                flag(quote & ((bid <= 0) | (ask <= 0)), Reason.PRICE_NOT_POSITIVE)
                for s in (bsz, asz):
                    flag(quote & ~np.isnan(s) & ~(np.isfinite(s) & (s >= 0)), Reason.SIZE_NOT_POSITIVE)
                flag(quote & (bid > ask), Reason.CROSSED_QUOTE)
        book = kind == KIND_BOOK
        if book.any():
            price, size, side = chunk.column("price"), chunk.column("size"), chunk.column("side")
            level = book & (side != 0)
            with np.errstate(invalid="ignore"):
                flag(book & ~np.isin(side, (-1, 0, 1)), Reason.UNKNOWN_SIDE)
                flag(book & (side == 0) & ~np.isnan(price), Reason.UNKNOWN_SIDE)
                flag(level & ~np.isfinite(price), Reason.PRICE_NOT_FINITE)
                flag(level & (price <= 0), Reason.PRICE_NOT_POSITIVE)
                flag(level & ~(np.isfinite(size) & (size >= 0)), Reason.SIZE_NOT_POSITIVE)

    def _sequence_checks(self, chunk: TickChunk, reason: np.ndarray) -> None:
        codes = chunk.column("symbol_id")
        present = np.unique(codes) if len(chunk.symbols) > 1 else np.zeros(1, dtype=np.uint32)
        clean = not reason.any()
        readable = None if chunk.bad is None else chunk.bad == 0  # rows whose time can vote
        for code in present:
            name = chunk.symbols[int(code)]
            if len(present) == 1 and clean:
                rows = None  # every row: slices instead of fancy indexing (the common case)
                voters = None
            else:
                mine = codes == code if len(present) > 1 else np.ones(len(codes), dtype=bool)
                rows = np.flatnonzero(mine & (reason == 0))
                voters = np.flatnonzero(mine if readable is None else mine & readable)
                if len(rows) == 0:
                    continue
            self._check_symbol(chunk, name, rows, voters, reason)

    def _check_symbol(self, chunk: TickChunk, name: str, rows: np.ndarray | None, voters: np.ndarray | None,
                      reason: np.ndarray) -> None:
        """Duplicate ids, then time order, for the candidate ``rows`` (None: all) of one symbol;
        ``voters`` (None: all) are the rows whose times vote on the order (see the docstring)."""

        def take(a: np.ndarray) -> np.ndarray:
            return a if rows is None else a[rows]

        def index(sel: np.ndarray) -> np.ndarray:
            return np.flatnonzero(sel) if rows is None else rows[sel]

        tid = take(chunk.column("trade_id"))
        has_id = (take(chunk.column("kind")) == KIND_TRADE) & (tid >= 0)
        every = bool(has_id.all())
        ids = tid if every else tid[has_id]
        increasing = len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())
        seen = self._ids.get(name)
        dup = None
        if len(ids) and not increasing:
            _, first = np.unique(ids, return_index=True)
            dup = np.ones(len(ids), dtype=bool)
            dup[first] = False
        if len(ids) and seen is not None and not (increasing and len(seen.ends) and ids[0] > seen.ends[-1]):
            dup = seen.contains(ids) if dup is None else dup | seen.contains(ids)
        keep = np.ones(len(tid), dtype=bool)
        if dup is not None and dup.any():
            full = np.zeros(len(tid), dtype=bool)
            full[np.flatnonzero(has_id)[dup]] = True
            reason[index(full)] = Reason.DUPLICATE_TRADE_ID
            keep &= ~full
        # time order within the symbol, carried across chunks (refused rows never move it)
        t_all = chunk.column(self.order_by)
        t = take(t_all)
        tv = t_all if voters is None else t_all[voters]
        last = self._last_ts.get(name)
        if not keep.any():
            return
        tk = t if keep.all() else t[keep]
        in_order = bool((tv[1:] >= tv[:-1]).all()) and (last is None or tk[0] >= last)
        if in_order:
            nxt = self._ahead.next_other(name, int(tv[-1]))
            in_order = nxt is None or tv[-1] < nxt
        if in_order and not self.allow_equal_ts:
            in_order = bool((tk[1:] > tk[:-1]).all()) and (last is None or tk[0] > last)
        if in_order:
            new_last = int(tk[-1])
        else:
            ahead_t, ahead_pos = self._ahead.of(name)
            vpos = np.arange(len(t_all), dtype=np.int64) if voters is None else voters.astype(np.int64)
            cand_rows = index(keep)
            cand = np.zeros(len(vpos) + len(ahead_t), dtype=bool)
            cand[: len(vpos)] = np.isin(vpos, cand_rows, assume_unique=True)
            verdict, ref, new_last, have = _time_order(
                np.concatenate([tv, ahead_t]).astype(np.int64), np.concatenate([vpos, len(t_all) + ahead_pos]),
                cand, np.int64(0 if last is None else last), last is not None, not self.allow_equal_ts,
                VOTE_ROWS, VOTE_REACH)
            verdict, ref = verdict[: len(vpos)], ref[: len(vpos)]
            refused = np.flatnonzero(verdict)
            if len(refused):
                bad_rows = vpos[refused]
                reason[bad_rows] = np.where(verdict[refused] == _AHEAD, Reason.TS_AHEAD, Reason.TS_BACKWARDS)
                self._back_prev.update(zip(bad_rows.tolist(), ref[refused].tolist(), strict=True))
                gone = np.zeros(len(t_all), dtype=bool)
                gone[bad_rows] = True
                keep &= ~take(gone)
            if not have:
                return
            new_last = int(new_last)
        self._last_ts[name] = new_last if last is None else max(last, new_last)
        ok = has_id & keep
        if ok.any():
            self._ids.setdefault(name, IdSet()).add(tid if ok.all() else tid[ok])

    # --- bad rows ----------------------------------------------------------------------
    def _bad_row(self, chunk: TickChunk, i: int, why: Reason) -> BadRow:
        """Describe row ``i``: ``field`` is the file's column name where the reader knows it."""
        ours = _FIELD_OF_REASON.get(why)
        if why in (Reason.TS_BACKWARDS, Reason.TS_AHEAD):
            ours = self.order_by
        raw = chunk.raw_record(i)
        value: object = None
        if i in chunk.bad_field:
            fld: str | None = chunk.bad_field[i]
            if isinstance(raw, dict):
                value = raw.get(fld)
        else:
            fld = chunk.field_map.get(ours, ours) if ours else None
            if ours in chunk.columns:
                value = chunk.columns[ours][i].item()
            if why is Reason.CROSSED_QUOTE:
                value = {"bid": value, "ask": chunk.columns["ask"][i].item()}
            elif why is Reason.TS_BACKWARDS:
                value = {"ts": value, "latest_before": self._back_prev.get(i)}
            elif why is Reason.TS_AHEAD:
                value = {"ts": value, "next": self._back_prev.get(i)}
        sym = None
        if chunk.symbols and "symbol_id" in chunk.columns:
            sym = chunk.symbols[int(chunk.columns["symbol_id"][i])]
        if chunk.raw_line is not None:
            raw = chunk.raw_line(i)
        return BadRow(chunk.source, int(chunk.records[i]), why, fld, value, raw, sym)

    def _handle_bad(self, chunk: TickChunk, reason: np.ndarray, bad_idx: np.ndarray) -> None:
        if self.policy is Policy.FAIL:
            first: BadRow | None = None
            if len(bad_idx):
                first = self._bad_row(chunk, int(bad_idx[0]), Reason(int(reason[bad_idx[0]])))
            for d in chunk.dropped:
                if first is None or d.record < first.record:
                    first = d
            assert first is not None
            raise DataError(first.message() + " (policy 'fail'; 'reject' or 'quarantine' drop and count such rows)",
                            file=str(first.source), line=int(first.record), reason=first.reason.name.lower())
        what = "quarantined" if self.policy is Policy.QUARANTINE else "rejected"
        for d in chunk.dropped:
            self.accounting.add(self.source, d.symbol or UNKNOWN_SYMBOL, what, 1, d.reason.name.lower())
            if self.quarantine is not None and self.policy is Policy.QUARANTINE:
                self.quarantine.write(d)
        if not len(bad_idx):
            return
        codes = chunk.column("symbol_id")[bad_idx]
        rs = reason[bad_idx]
        for r in np.unique(rs):
            sel = rs == r
            self._count(chunk.symbols, codes[sel], what, Reason(int(r)).name.lower())
        if self.policy is Policy.QUARANTINE and self.quarantine is not None:
            for i in bad_idx:
                self.quarantine.write(self._bad_row(chunk, int(i), Reason(int(reason[i]))))

    def close(self) -> None:
        if self.quarantine is not None:
            self.quarantine.close()


READER_ERRORS = (ValueError, TypeError, OverflowError, KeyError, IndexError, UnicodeError, AttributeError,
                 MemoryError)
"""What a third-party decoder may raise on a damaged file (pyarrow's errors are ValueErrors and
OSErrors); :func:`validated` turns them into a :class:`DataError` naming the source, so that
only this package's errors reach a user."""


def _next_chunk(it: Iterator[TickChunk], source: str) -> TickChunk | None:
    try:
        return next(it, None)
    except PipelineError:
        raise
    except READER_ERRORS as e:
        raise DataError(f"{source}: the file cannot be read ({type(e).__name__}: {e}); it is damaged, "
                        "or not in the format its reader expects") from e


class _Ahead:
    """The first :data:`VOTE_REACH` rows of the chunks after the current one, per symbol."""

    def __init__(self, chunks: Sequence[TickChunk], order_by: str):
        self.chunks = chunks
        self.order_by = order_by
        self._by_name: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def next_other(self, name: str, value: int) -> int | None:
        """The first time other than ``value`` among ``name``'s next :data:`VOTE_ROWS` rows
        after the current chunk (within the reach), if any: whether the chunk's last rows
        would be put to a vote depends on it."""
        at = 0
        seen = 0
        for c in self.chunks:
            if at >= VOTE_REACH or seen >= VOTE_ROWS:
                break
            n = min(len(c), VOTE_REACH - at)
            k = c.symbols.index(name) if name in c.symbols else -1
            if n and k >= 0:
                sel = np.ones(n, dtype=bool) if c.bad is None else c.bad[:n] == 0
                if len(c.symbols) > 1:
                    sel &= c.column("symbol_id")[:n] == k
                t = c.column(self.order_by)[:n][sel][: VOTE_ROWS - seen]
                other = np.flatnonzero(t != value)
                if len(other):
                    return int(t[other[0]])
                seen += len(t)
            at += n
        return None

    def of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Times and positions (0 = the first row after the current chunk) of ``name``'s rows."""
        if self._by_name is None:
            self._by_name = {}
            parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
            at = 0
            for c in self.chunks:
                if at >= VOTE_REACH:
                    break
                n = min(len(c), VOTE_REACH - at)
                if n:
                    t = c.column(self.order_by)[:n]
                    ok = np.ones(n, dtype=bool) if c.bad is None else c.bad[:n] == 0
                    codes = c.column("symbol_id")[:n]
                    for k, sym in enumerate(c.symbols):
                        sel = ok & (codes == k) if len(c.symbols) > 1 else ok
                        if sel.any():
                            parts.setdefault(sym, []).append((t[sel], at + np.flatnonzero(sel)))
                at += n
            for sym, ps in parts.items():
                self._by_name[sym] = (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
        return self._by_name.get(name, (_EMPTY, _EMPTY))


_EMPTY = np.empty(0, dtype=np.int64)


def validated(chunks: Iterator[TickChunk], validator: Validator) -> Iterator[TickChunk]:
    """The good rows of ``chunks``, chunk by chunk (empty chunks skipped).

    Reads ahead until :data:`VOTE_REACH` rows follow the chunk being checked (or the file
    ends), so that the rows after it can vote on its time order.
    """
    pending: collections.deque[TickChunk] = collections.deque()
    ahead = 0  # rows in pending after its first chunk
    it = iter(chunks)
    done = False
    try:
        while True:
            while not done and (not pending or ahead < VOTE_REACH):
                c = _next_chunk(it, validator.source)
                if c is None:
                    done = True
                    break
                if pending:
                    ahead += len(c)
                pending.append(c)
            if not pending:
                return
            c = pending.popleft()
            if pending:
                ahead -= len(pending[0])
            good = validator.process(c, pending)
            if len(good):
                yield good
    finally:
        validator.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
