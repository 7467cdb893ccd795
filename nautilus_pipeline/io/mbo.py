"""Databento MBO (market by order) to price-level deltas, the input of ``kernels/book.py``.

Why levels: every book feature we compute (spread, microprice, depth imbalance, OFI) needs the
size per price level, not per order; reducing MBO to level deltas in the reader lets one book
kernel serve MBO, L2 CSVs and exchange depth feeds alike.

The reader keeps, per instrument, each resting order (``order_id`` -> side, price, size) and
the total size per level, and emits one delta per level it changes, in record order:

- ``A`` add: the order's level grows by its size;
- ``C`` cancel: the order shrinks by the record's size (a partial cancel) or leaves;
- ``M`` modify: the order moves to its new price/size (two deltas when the price changes);
- ``R`` clear: the instrument's book is emptied (one ``ACTION_CLEAR`` delta, price NaN);
- ``T`` trade, ``F`` fill, ``N`` none: no book change (Databento sends the resting order's
  reduction as its own ``C``/``M``), so no delta.

Flags: ``F_SNAPSHOT`` records rebuild the book from a clear; the first snapshot record after
non-snapshot records clears the book first, so a snapshot replaces the book, never adds to it.
``F_LAST`` marks the last record of an exchange event: ``last`` is true on the final delta of
such a record (features computed between two ``last`` deltas are of a book in transition).
The streaming reader carries the same mark in the book rows' ``trade_id`` (1 / 0, see
``io/databento.py``), and the book stage publishes features at those event ends.
``F_BAD_TS_RECV``: the receive time is unusable, so ``ts_recv_ns`` is ``-1`` (unknown) there.

A cancel or modify of an order the reader never saw (the file starts mid-session without a
snapshot) cannot be applied: it is counted in ``unknown_orders`` and produces no delta, never a
negative level.
"""

from __future__ import annotations

from pathlib import Path

import databento_dbn as dbn
import numpy as np

from ..errors import DataError
from ..kernels.book import ACTION_CLEAR, ACTION_SET

F_LAST = 1 << 7
F_SNAPSHOT = 1 << 5
F_BAD_TS_RECV = 1 << 3

DELTA_COLUMNS = ("record", "ts_ns", "ts_recv_ns", "instrument_id", "side", "price", "size",
                 "action", "last")


class MboBooks:
    """Per-instrument order and level state, fed one MBO record at a time."""

    def __init__(self) -> None:
        self.orders: dict[int, dict[int, tuple[int, int, int]]] = {}  # iid -> oid -> (side, px, sz)
        self.levels: dict[int, dict[tuple[int, int], int]] = {}  # iid -> (side, px) -> size
        self.unknown_orders = 0
        self.in_snapshot = False

    def _level(self, iid: int, side: int, px: int, change: int, out: list) -> None:
        levels = self.levels.setdefault(iid, {})
        size = levels.get((side, px), 0) + change
        if size > 0:
            levels[(side, px)] = size
        else:
            levels.pop((side, px), None)
            size = 0
        out.append((side, px, size, ACTION_SET))

    def apply(self, rec: dbn.MBOMsg) -> list[tuple[int, int, int, int]]:
        """Level deltas ``(side ±1, raw price, new level size, action)`` of one record."""
        iid, flags, action = rec.instrument_id, int(rec.flags), str(rec.action)
        out: list[tuple[int, int, int, int]] = []
        snap = bool(flags & F_SNAPSHOT)
        if snap and not self.in_snapshot:
            self.orders.pop(iid, None)
            self.levels.pop(iid, None)
            out.append((0, dbn.UNDEF_PRICE, 0, ACTION_CLEAR))
        self.in_snapshot = snap
        orders = self.orders.setdefault(iid, {})
        side = {"B": 1, "A": -1}.get(str(rec.side), 0)
        if action == "R":
            orders.clear()
            self.levels.pop(iid, None)
            if not (out and out[-1][3] == ACTION_CLEAR):
                out.append((0, dbn.UNDEF_PRICE, 0, ACTION_CLEAR))
        elif action == "A" and side:
            prev = orders.get(rec.order_id)
            if prev is not None:  # a re-add of a live id replaces it
                self._level(iid, prev[0], prev[1], -prev[2], out)
            orders[rec.order_id] = (side, rec.price, rec.size)
            self._level(iid, side, rec.price, rec.size, out)
        elif action in ("C", "M"):
            prev = orders.get(rec.order_id)
            if prev is None:
                self.unknown_orders += 1
                return out
            o_side, o_px, o_sz = prev
            if action == "C":
                left = o_sz - rec.size
                if left > 0:
                    orders[rec.order_id] = (o_side, o_px, left)
                else:
                    del orders[rec.order_id]
                self._level(iid, o_side, o_px, -min(rec.size, o_sz), out)
            else:
                new_side = side or o_side
                orders[rec.order_id] = (new_side, rec.price, rec.size)
                if (new_side, rec.price) == (o_side, o_px):
                    self._level(iid, o_side, o_px, rec.size - o_sz, out)
                else:
                    self._level(iid, o_side, o_px, -o_sz, out)
                    self._level(iid, new_side, rec.price, rec.size, out)
        return out


def mbo_level_deltas(path: str | Path) -> dict[str, np.ndarray]:
    """All level deltas of an MBO file as columns (``DELTA_COLUMNS``; prices float64 as in
    :func:`~nautilus_pipeline.io.databento.scale_prices`, sizes float64, ``side`` int8 ±1 and
    0 on clears, ``action`` uint8, ``last`` bool)."""
    from .databento import DatabentoReader, scale_prices

    reader = DatabentoReader(path)
    books = MboBooks()
    rows: list[tuple] = []
    mbo = 0
    for recno, rec in enumerate(reader._records(), start=1):
        if not isinstance(rec, dbn.MBOMsg):
            continue
        mbo += 1
        flags = int(rec.flags)
        recv = -1 if flags & F_BAD_TS_RECV else rec.ts_recv
        deltas = books.apply(rec)
        for j, (side, px, size, action) in enumerate(deltas):
            last = bool(flags & F_LAST) and j == len(deltas) - 1
            rows.append((recno, rec.ts_event, recv, rec.instrument_id, side, px, size, action, last))
    if mbo == 0:
        raise DataError(f"{reader.path}: no MBO records (schema {reader.schema}); this reads schema mbo")
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(DELTA_COLUMNS)
    dtypes = (np.int64, np.int64, np.int64, np.uint32, np.int8, np.int64, np.float64, np.uint8, bool)
    out = {k: np.array(c, dtype=t) for k, c, t in zip(DELTA_COLUMNS, cols, dtypes, strict=True)}
    out["price"] = scale_prices(out["price"])
    out["unknown_orders"] = np.array(books.unknown_orders)
    return out
