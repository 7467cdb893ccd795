"""Book stage: an L2 order book per symbol, kept from the slab's book rows, and its features.

Orchestration around :func:`nautilus_pipeline.kernels.book.book_update`. Readers of book
files (Databento MBO, ...) yield level deltas as ``KIND_BOOK`` rows (``events.py``: ``side``
the book side, ``price`` the level, ``size`` its new total; ``side = 0`` clears the book).
For every row of a batch, book rows and trades alike, this stage writes the symbol's book
*as of that row* (after the row when it is a book row):

- ``book_features`` (float64[n, 7]): ``kernels.book.BOOK_FEATURE_NAMES`` (spread, mid,
  microprice, imbalance at depths 1/5/10, order-flow imbalance of the row; 0 on other rows);
- with ``levels = L > 0``: ``book_bid_price``, ``book_bid_size``, ``book_ask_price``,
  ``book_ask_size`` (float64[n, L]), best first, NaN beyond the book's depth;
- the top of book into ``bid``/``ask``/``bid_size``/``ask_size`` of the *book* rows, so that
  the ``features`` stage after it reads them as quotes (its spread, microprice and imbalance
  features); a one-sided book leaves the empty side NaN, as a one-sided quote does.

Exchange events (``publish``). One exchange event (an aggressive order sweeping three levels,
a snapshot) arrives as several book rows; between them the book is one no trader saw
(half-swept, often crossed). A source that knows the events (Databento MBO: ``F_LAST``) marks
its book rows in ``trade_id``: ``1`` ends an event, ``0`` is inside one, ``-1`` (every other
source) is complete on its own. With ``publish = "event"`` (the default) every row carries the
book of the last *completed* event of its symbol: rows inside an event (and a trade inside
one) repeat it, and ``ofi`` is taken between two consecutive published books (0 elsewhere).
``publish = "row"`` writes the book after every delta, transitions included. Sources without
event marks give the same numbers either way.

Why the clear is ``side = 0`` rather than a column of its own: every tick column a book row
needs already exists, so readers, ``Pipeline.ingest``, the replay and the checks carry book
rows without a new slab column. Quote rows (``KIND_QUOTE``) do not touch the book.

State: one :class:`~nautilus_pipeline.kernels.book.BookState` per symbol, replaced only after
a batch succeeded, so any batch split gives the same numbers bit for bit (the tests compare
against a plain dict-of-levels loop). ``snapshot()``/``restore()`` (``stage.py``) carry the books
to the next file of a chain: nothing is open at a segment's end, so ``end_segment`` has nothing
to drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import KIND_BOOK, ColumnSpec
from ..kernels.book import (
    ACTION_CLEAR,
    ACTION_SET,
    BOOK_FEATURE_NAMES,
    COUNT_NAMES,
    DEFAULT_CAPACITY,
    DEPTHS,
    BookState,
    book_update,
    new_book_state,
)
from ..kernels.rows import symbol_groups
from ..memory import Lease
from ..params import param
from ..stage import Stage, StageContext

F64 = np.dtype(np.float64)
BOOK_FEATURES_COLUMN = "book_features"
LEVEL_COLUMNS = ("book_bid_price", "book_bid_size", "book_ask_price", "book_ask_size")
PUBLISH = ("event", "row")
OFI = len(BOOK_FEATURE_NAMES) - 1


@dataclass(frozen=True, slots=True)
class BookStageParams:
    """The book stage's parameters."""

    levels: int = param(5, "best levels per side written as columns book_bid_price, ... (0: none)")
    publish: str = param("event", "event: features of the last completed exchange event (MBO F_LAST); "
                         "row: after every delta")
    capacity: int = param(DEFAULT_CAPACITY, "most levels kept per side; beyond it the worst are forgotten, "
                          "counted, and features needing them are NaN (kernels/book.py)")

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 0:
            raise ConfigError(f"book: levels must be an integer >= 0, got {self.levels!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < max(DEPTHS):
            raise ConfigError(f"book: capacity must be an integer >= {max(DEPTHS)}, got {self.capacity!r}")
        if self.publish not in PUBLISH:
            raise ConfigError(f"book: publish must be one of {', '.join(PUBLISH)}, got {self.publish!r}")
        if self.levels > self.capacity:
            raise ConfigError(f"book: levels ({self.levels}) cannot exceed capacity ({self.capacity})")


class BookStage(Stage):
    """Keeps a book per symbol from ``KIND_BOOK`` rows; writes book features and levels per row."""

    reads = ("symbol_id", "kind", "price", "size", "side", "trade_id")

    Params = BookStageParams

    @classmethod
    def from_params(cls, p: BookStageParams, ctx: Any, *, name: str, streams: Sequence[str]) -> BookStage:
        return cls(levels=p.levels, capacity=p.capacity, publish=p.publish, name=name, streams=streams)

    def __init__(self, *, levels: int = 5, capacity: int = DEFAULT_CAPACITY, publish: str = "event",
                 name: str = "book", streams: Sequence[str] = ("cpu",)):
        BookStageParams(levels, publish, capacity)  # the same checks for direct construction
        self.levels = levels
        self.capacity = capacity
        self.publish = publish
        self.name = name
        self.streams = tuple(streams)
        writes = [ColumnSpec(BOOK_FEATURES_COLUMN, F64, (len(BOOK_FEATURE_NAMES),), np.nan)]
        if levels:
            writes += [ColumnSpec(c, F64, (levels,), np.nan) for c in LEVEL_COLUMNS]
        self.writes = tuple(writes)
        self.books: dict[int, BookState] = {}
        self.held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # symbol -> last published (features, levels)
        self.book_rows = 0
        self.clears = 0

    async def start(self, ctx: StageContext) -> None:
        self.books, self.held, self.book_rows, self.clears = {}, {}, 0, 0

    @staticmethod
    def _published(feats: np.ndarray, lv: np.ndarray, point: np.ndarray,
                   held: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """Every row gets the book of the last publish ``point`` at or before it (``held``, the
        symbol's last one from earlier batches, before the first); ``ofi`` between consecutive
        published tops at the points, 0 elsewhere. ``lv`` holds at least the top level."""
        n = point.shape[0]
        idx = np.maximum.accumulate(np.where(point, np.arange(n), -1))
        if held is None:
            h_f = np.full(feats.shape[1], np.nan)
            h_f[OFI] = 0.0
            h_lv = np.full(lv.shape[1:], np.nan)
        else:
            h_f, h_lv = held
        all_f = np.concatenate([h_f[None], feats])
        all_lv = np.concatenate([h_lv[None], lv])
        out_f = all_f[idx + 1]
        out_lv = all_lv[idx + 1]
        pts = np.flatnonzero(point)
        prev = np.r_[-1, pts[:-1]] + 1  # the published book before each point (0: the held one)
        top = all_lv[:, :, 0]  # bid price, bid size, ask price, ask size
        b, qb, a, qa = (top[pts + 1, i] for i in range(4))
        b0, qb0, a0, qa0 = (top[prev, i] for i in range(4))
        with np.errstate(invalid="ignore"):
            e = np.where(b >= b0, qb, 0.0) - np.where(b <= b0, qb0, 0.0) - np.where(a <= a0, qa, 0.0) \
                + np.where(a >= a0, qa0, 0.0)
        both = ~(np.isnan(b) | np.isnan(a) | np.isnan(b0) | np.isnan(a0))
        out_f[:, OFI] = 0.0
        out_f[pts, OFI] = np.where(both, e, np.where(np.isnan(feats[pts, OFI]), np.nan, 0.0))
        return out_f, out_lv

    def _compute(self, lease: Lease) -> tuple[dict[int, BookState], dict, np.ndarray, np.ndarray, int, int]:
        sym, kind = lease["symbol_id"], lease["kind"]
        price, size, side, event = lease["price"], lease["size"], lease["side"], lease["trade_id"]
        n = sym.shape[0]
        feats = np.empty((n, len(BOOK_FEATURE_NAMES)))
        lv = np.empty((n, 4, max(self.levels, 1)))
        books = dict(self.books)
        held = dict(self.held)
        book_rows = clears = 0
        for key, rows in symbol_groups(sym):
            is_book = kind[rows] == KIND_BOOK
            if key not in books and not is_book.any():
                feats[rows] = np.nan
                feats[rows, len(BOOK_FEATURE_NAMES) - 1] = 0.0
                lv[rows] = np.nan
                continue
            s = np.where(is_book, side[rows], 0).astype(np.int8)
            clear = is_book & (s == 0)
            action = np.where(clear, ACTION_CLEAR, ACTION_SET).astype(np.uint8)
            p = np.where(is_book, price[rows], np.nan)
            q = np.where(is_book, size[rows], np.nan)
            state = books.get(key)
            if state is None:
                state = new_book_state(self.capacity)
            out_lv = np.empty((rows.shape[0], 4, lv.shape[2]))
            books[key], f = book_update(state, s, p, q, action, levels_out=out_lv)
            if self.publish == "event":
                point = is_book & (event[rows] != 0)
                f, out_lv = self._published(f, out_lv, point, held.get(key))
                if point.any():
                    last = int(np.flatnonzero(point)[-1])
                    held[key] = (f[last].copy(), out_lv[last].copy())
            feats[rows] = f
            lv[rows] = out_lv
            book_rows += int(is_book.sum())
            clears += int(clear.sum())
        return books, held, feats, lv, book_rows, clears

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        books, held, feats, lv, book_rows, clears = await stream.run(self._compute, lease)
        lease[BOOK_FEATURES_COLUMN][...] = feats
        if self.levels:
            for i, col in enumerate(LEVEL_COLUMNS):
                lease[col][...] = lv[:, i, : self.levels]
        is_book = lease["kind"] == KIND_BOOK
        if is_book.any():
            for i, col in enumerate(("bid", "bid_size", "ask", "ask_size")):
                lease[col][is_book] = lv[is_book, i, 0]
            lease.mark_written(("bid", "bid_size", "ask", "ask_size"))
        self.books = books
        self.held = held
        self.book_rows += book_rows
        self.clears += clears

    def snapshot_params(self) -> dict[str, object]:
        return {"levels": self.levels, "capacity": self.capacity, "publish": self.publish}

    def snapshot_state(self) -> dict[str, Any]:
        """Each symbol's book (``BookState``: price/size arrays and depths) and the counters."""
        return {"books": dict(self.books), "held": {k: list(v) for k, v in self.held.items()},
                "book_rows": self.book_rows, "clears": self.clears}

    def restore_state(self, state: dict[str, Any]) -> None:
        books = {int(k): b for k, b in state["books"].items()}
        for b in books.values():
            if b.capacity != self.capacity:
                raise ConfigError(f"book: a book of capacity {b.capacity} cannot be restored into a stage "
                                  f"of capacity {self.capacity}")
        self.books = books
        self.held = {int(k): (np.asarray(v[0]), np.asarray(v[1])) for k, v in state["held"].items()}
        self.book_rows = int(state["book_rows"])
        self.clears = int(state["clears"])

    def stats(self) -> dict[str, object]:
        """Counters; ``levels_evicted``/``updates_beyond_capacity``/``rows_inexact`` (summed over
        the books, ``kernels.book.COUNT_NAMES``) say whether ``capacity`` cut a deep book, and a
        note in the run summary says so when it did."""
        counts = dict.fromkeys(COUNT_NAMES, 0)
        for b in self.books.values():
            for name, v in zip(COUNT_NAMES, b.counts.tolist(), strict=True):
                counts[name] += v
        out: dict[str, object] = {"symbols": len(self.books), "book_rows": self.book_rows, "clears": self.clears,
                                  "levels_evicted": counts["evicted"],
                                  "updates_beyond_capacity": counts["beyond"], "rows_inexact": counts["inexact"]}
        if counts["evicted"]:
            out["notes"] = [f"capacity {self.capacity} levels per side: {counts['evicted']:,} levels pushed out, "
                            f"{counts['beyond']:,} updates beyond the kept levels ignored, {counts['inexact']:,} rows "
                            "with a feature NaN because it needed a forgotten level (raise capacity)"]
        return out
