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


@dataclass(frozen=True, slots=True)
class BookStageParams:
    """The book stage's parameters."""

    levels: int = param(5, "best levels per side written as columns book_bid_price, ... (0: none)")
    capacity: int = param(DEFAULT_CAPACITY, "most levels kept per side; beyond it the worst are forgotten, "
                          "counted, and features needing them are NaN (kernels/book.py)")

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 0:
            raise ConfigError(f"book: levels must be an integer >= 0, got {self.levels!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < max(DEPTHS):
            raise ConfigError(f"book: capacity must be an integer >= {max(DEPTHS)}, got {self.capacity!r}")
        if self.levels > self.capacity:
            raise ConfigError(f"book: levels ({self.levels}) cannot exceed capacity ({self.capacity})")


class BookStage(Stage):
    """Keeps a book per symbol from ``KIND_BOOK`` rows; writes book features and levels per row."""

    reads = ("symbol_id", "kind", "price", "size", "side")

    Params = BookStageParams

    @classmethod
    def from_params(cls, p: BookStageParams, ctx: Any, *, name: str, streams: Sequence[str]) -> BookStage:
        return cls(levels=p.levels, capacity=p.capacity, name=name, streams=streams)

    def __init__(self, *, levels: int = 5, capacity: int = DEFAULT_CAPACITY, name: str = "book",
                 streams: Sequence[str] = ("cpu",)):
        BookStageParams(levels, capacity)  # the same checks for direct construction
        self.levels = levels
        self.capacity = capacity
        self.name = name
        self.streams = tuple(streams)
        writes = [ColumnSpec(BOOK_FEATURES_COLUMN, F64, (len(BOOK_FEATURE_NAMES),), np.nan)]
        if levels:
            writes += [ColumnSpec(c, F64, (levels,), np.nan) for c in LEVEL_COLUMNS]
        self.writes = tuple(writes)
        self.books: dict[int, BookState] = {}
        self.book_rows = 0
        self.clears = 0

    async def start(self, ctx: StageContext) -> None:
        self.books, self.book_rows, self.clears = {}, 0, 0

    def _compute(self, lease: Lease) -> tuple[dict[int, BookState], np.ndarray, np.ndarray, int, int]:
        sym, kind = lease["symbol_id"], lease["kind"]
        price, size, side = lease["price"], lease["size"], lease["side"]
        n = sym.shape[0]
        feats = np.empty((n, len(BOOK_FEATURE_NAMES)))
        lv = np.empty((n, 4, max(self.levels, 1)))
        books = dict(self.books)
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
            books[key], feats[rows] = book_update(state, s, p, q, action, levels_out=out_lv)
            lv[rows] = out_lv
            book_rows += int(is_book.sum())
            clears += int(clear.sum())
        return books, feats, lv, book_rows, clears

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        books, feats, lv, book_rows, clears = await stream.run(self._compute, lease)
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
        self.book_rows += book_rows
        self.clears += clears

    def snapshot_params(self) -> dict[str, int]:
        return {"levels": self.levels, "capacity": self.capacity}

    def snapshot_state(self) -> dict[str, Any]:
        """Each symbol's book (``BookState``: price/size arrays and depths) and the counters."""
        return {"books": dict(self.books), "book_rows": self.book_rows, "clears": self.clears}

    def restore_state(self, state: dict[str, Any]) -> None:
        books = {int(k): b for k, b in state["books"].items()}
        for b in books.values():
            if b.capacity != self.capacity:
                raise ConfigError(f"book: a book of capacity {b.capacity} cannot be restored into a stage "
                                  f"of capacity {self.capacity}")
        self.books = books
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
