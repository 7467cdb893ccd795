"""What ``inspect`` reports about the order-book rows of a file: updates, snapshots, depth, gaps.

Book rows (``KIND_BOOK``, see ``events.py``) are level deltas; a file's depth is only known by
applying them, so :class:`BookInventory` keeps a deep book per symbol (``DEPTH_CAPACITY``
levels per side, numba, no features) as the blocks of a replay go by and records the most
levels each side ever held. Snapshots are counted as the clears that start them (side 0 rows);
gaps and unseen orders are the readers' own counts (``Accounting.book_gaps``/``unknown_orders``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..events import KIND_BOOK
from ..kernels.book import ACTION_CLEAR, ACTION_SET, BookState, book_depth_scan, new_book_state
from ..kernels.rows import symbol_groups
from .checks import Accounting

DEPTH_CAPACITY = 4096
"""Levels per side kept to measure a file's depth (a deeper side is reported as this many)."""


class BookInventory:
    """Book rows seen so far, per replay block (``add``), summarised by :meth:`summary`."""

    def __init__(self) -> None:
        self.updates = 0
        self.snapshots = 0
        self.books: dict[int, BookState] = {}
        self.deepest = np.zeros(2, dtype=np.int64)

    def add(self, block: dict[str, np.ndarray]) -> None:
        book = block["kind"] == KIND_BOOK
        if not book.any():
            return
        rows_all = np.flatnonzero(book)
        side_all = block["side"][rows_all]
        self.updates += int((side_all != 0).sum())
        self.snapshots += int((side_all == 0).sum())
        for key, idx in symbol_groups(block["symbol_id"][rows_all]):
            rows = rows_all[idx]
            side = block["side"][rows]
            action = np.where(side == 0, ACTION_CLEAR, ACTION_SET).astype(np.uint8)
            state = self.books.get(key) or new_book_state(DEPTH_CAPACITY)
            self.books[key] = book_depth_scan(state, side, block["price"][rows], block["size"][rows],
                                              action, self.deepest)

    def summary(self, accounting: Accounting) -> dict[str, Any]:
        """The inspect fields (empty when the file had no book rows)."""
        if not self.updates and not self.snapshots:
            return {}
        return {
            "book_updates": self.updates,
            "book_snapshots": self.snapshots,
            "book_levels_max": {"bid": int(self.deepest[0]), "ask": int(self.deepest[1])},
            "book_gaps": sum(accounting.book_gaps.values()),
            "book_unknown_orders": sum(accounting.unknown_orders.values()),
        }
