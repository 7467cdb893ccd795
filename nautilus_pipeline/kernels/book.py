"""Price-level (L2) order book per symbol and the book features quant models use most.

Why a kernel of its own: every book source (Databento MBO/MBP-10 once aggregated to levels,
Tardis ``incremental_book_L2``, Binance depth updates, LOBSTER) reduces to the same stream of
*level deltas*, and the features must be computed on the book as of each delta, sequentially.
Like ``kernels/vpin.py`` the state goes in and out explicitly, so any batch split gives the
same output bit for bit, and a plain loop in the tests is the reference.

Input, one row per delta (units as in ``events.py``):

- ``side``: ``+1`` bid, ``-1`` ask (the *book* side, not an aggressor);
- ``price``: the level's price (float64); ``size``: the level's new total size (base units);
  ``0`` removes the level;
- ``action``: ``ACTION_SET`` (0) sets the level; ``ACTION_CLEAR`` (1) empties the symbol's book
  first (a snapshot starts, or an MBO ``R`` clear) and then sets the level when ``price`` is
  finite.

Book: each side keeps at most ``capacity`` levels, sorted best first (bids descending, asks
ascending). A level inserted into a full side pushes out the worst one, so features up to
depth ``capacity`` stay exact only while the true book is that shallow or the deltas stay near
the top; ``capacity`` defaults to 64, above the depth-10 features.

Output per row, the book *after* the delta (``BOOK_FEATURE_NAMES``):

- ``spread = a1 − b1``, ``mid = (a1 + b1) / 2``,
  ``microprice = (b1·qa1 + a1·qb1) / (qb1 + qa1)`` (price units);
- ``imbalance_k = (Σ qb − Σ qa) / (Σ qb + Σ qa)`` over the best ``k`` levels of each side
  (fewer where a side has fewer), ``k`` in 1, 5, 10, sums taken best level first;
- ``ofi``: the order-flow imbalance of this delta (Cont, Kukanov and Stoikov, 2014) at the top
  of book: ``1{b1 ≥ b1'}·qb1 − 1{b1 ≤ b1'}·qb1' − 1{a1 ≤ a1'}·qa1 + 1{a1 ≥ a1'}·qa1'`` with
  primes the top before the delta; 0 while either side is or was empty.

All are NaN while a side they need is empty (a one-sided book has no spread, mid or
microprice; the imbalances are defined as long as one side has size).

Levels (optional, ``levels_out`` of shape (n, 4, L)): the best ``L`` levels after each row,
``[bid price, bid size, ask price, ask size]``, best first; NaN price and size where a side
has fewer than ``L`` levels. A row with ``side = 0`` and ``action = ACTION_SET`` changes
nothing: the book stage passes a symbol's trade rows so, to get the book as of each trade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ConfigError

__all__ = [
    "ACTION_CLEAR",
    "ACTION_SET",
    "BOOK_FEATURE_NAMES",
    "BookState",
    "book_depth_scan",
    "book_update",
    "new_book_state",
    "snapshot_deltas",
]

ACTION_SET = 0
ACTION_CLEAR = 1
DEPTHS = (1, 5, 10)
BOOK_FEATURE_NAMES: tuple[str, ...] = (
    "spread", "mid", "microprice", "imbalance_1", "imbalance_5", "imbalance_10", "ofi",
)


@dataclass(frozen=True, slots=True)
class BookState:
    """One symbol's book: ``px``/``sz`` of shape (2, capacity), row 0 bids, row 1 asks;
    ``n`` levels used per side. Immutable from the caller's side: updates return a new one."""

    px: np.ndarray
    sz: np.ndarray
    n: np.ndarray

    @property
    def capacity(self) -> int:
        return int(self.px.shape[1])


def new_book_state(capacity: int = 64) -> BookState:
    """An empty book keeping up to ``capacity`` levels per side."""
    if capacity < max(DEPTHS):
        raise ConfigError(f"book capacity must be >= {max(DEPTHS)} levels, got {capacity}")
    return BookState(np.zeros((2, capacity)), np.zeros((2, capacity)), np.zeros(2, dtype=np.int64))


@njit(cache=True)
def _set_level(px, sz, n, s, price, size):
    cap = px.shape[1]
    m = n[s]
    i = 0
    while i < m and (px[s, i] > price if s == 0 else px[s, i] < price):
        i += 1
    if i < m and px[s, i] == price:
        if size > 0.0:
            sz[s, i] = size
        else:
            for j in range(i, m - 1):
                px[s, j] = px[s, j + 1]
                sz[s, j] = sz[s, j + 1]
            n[s] = m - 1
        return
    if size <= 0.0 or i >= cap:
        return
    last = m if m < cap else cap - 1
    for j in range(last, i, -1):
        px[s, j] = px[s, j - 1]
        sz[s, j] = sz[s, j - 1]
    px[s, i] = price
    sz[s, i] = size
    if m < cap:
        n[s] = m + 1


@njit(cache=True, nogil=True)
def _update(px, sz, n, side, price, size, action, out, lv):
    nan = np.nan
    depth = lv.shape[2]
    for r in range(side.shape[0]):
        has_b0, has_a0 = n[0] > 0, n[1] > 0
        b0 = px[0, 0] if has_b0 else nan
        qb0 = sz[0, 0] if has_b0 else nan
        a0 = px[1, 0] if has_a0 else nan
        qa0 = sz[1, 0] if has_a0 else nan
        if action[r] == 1:
            n[0] = 0
            n[1] = 0
        if np.isfinite(price[r]) and (side[r] == 1 or side[r] == -1):
            _set_level(px, sz, n, 0 if side[r] == 1 else 1, price[r], size[r])
        has_b, has_a = n[0] > 0, n[1] > 0
        if has_b and has_a:
            b, a, qb, qa = px[0, 0], px[1, 0], sz[0, 0], sz[1, 0]
            out[r, 0] = a - b
            out[r, 1] = (a + b) / 2.0
            out[r, 2] = (b * qa + a * qb) / (qb + qa)
        else:
            out[r, 0] = nan
            out[r, 1] = nan
            out[r, 2] = nan
        for d in range(3):
            k = 1 if d == 0 else (5 if d == 1 else 10)
            sb = 0.0
            for j in range(min(k, n[0])):
                sb += sz[0, j]
            sa = 0.0
            for j in range(min(k, n[1])):
                sa += sz[1, j]
            tot = sb + sa
            out[r, 3 + d] = (sb - sa) / tot if tot > 0.0 else nan
        if has_b and has_a and has_b0 and has_a0:
            b, a, qb, qa = px[0, 0], px[1, 0], sz[0, 0], sz[1, 0]
            e = 0.0
            if b >= b0:
                e += qb
            if b <= b0:
                e -= qb0
            if a <= a0:
                e -= qa
            if a >= a0:
                e += qa0
            out[r, 6] = e
        else:
            out[r, 6] = 0.0
        for s in range(2):
            for j in range(depth):
                if j < n[s]:
                    lv[r, 2 * s, j] = px[s, j]
                    lv[r, 2 * s + 1, j] = sz[s, j]
                else:
                    lv[r, 2 * s, j] = nan
                    lv[r, 2 * s + 1, j] = nan


def book_update(
    state: BookState, side: np.ndarray, price: np.ndarray, size: np.ndarray, action: np.ndarray,
    levels_out: np.ndarray | None = None,
) -> tuple[BookState, np.ndarray]:
    """Apply the deltas of one symbol in order; returns the new state and features (n, 7).

    ``levels_out`` (n, 4, L), when given, receives the best L levels after each row."""
    px, sz, n = state.px.copy(), state.sz.copy(), state.n.copy()
    rows = np.asarray(side).shape[0]
    out = np.empty((rows, len(BOOK_FEATURE_NAMES)))
    lv = np.empty((rows, 4, 0)) if levels_out is None else levels_out
    if lv.shape[:2] != (rows, 4):
        raise ValueError(f"levels_out must be shaped ({rows}, 4, L), got {lv.shape}")
    _update(px, sz, n, np.asarray(side, dtype=np.int8), np.asarray(price, dtype=np.float64),
            np.asarray(size, dtype=np.float64), np.asarray(action, dtype=np.uint8), out, lv)
    return BookState(px, sz, n), out


@njit(cache=True, nogil=True)
def _depth_scan(px, sz, n, side, price, size, action, deepest):
    for r in range(side.shape[0]):
        if action[r] == 1:
            n[0] = 0
            n[1] = 0
        if np.isfinite(price[r]) and (side[r] == 1 or side[r] == -1):
            s = 0 if side[r] == 1 else 1
            _set_level(px, sz, n, s, price[r], size[r])
            if n[s] > deepest[s]:
                deepest[s] = n[s]


def book_depth_scan(
    state: BookState, side: np.ndarray, price: np.ndarray, size: np.ndarray, action: np.ndarray,
    deepest: np.ndarray,
) -> BookState:
    """Apply deltas as :func:`book_update` does, without features; ``deepest`` (int64[2]) is
    raised to the most levels each side held (what ``inspect`` reports as a file's depth)."""
    px, sz, n = state.px.copy(), state.sz.copy(), state.n.copy()
    _depth_scan(px, sz, n, np.asarray(side, dtype=np.int8), np.asarray(price, dtype=np.float64),
                np.asarray(size, dtype=np.float64), np.asarray(action, dtype=np.uint8), deepest)
    return BookState(px, sz, n)


@njit(cache=True, nogil=True)
def _snapshot_deltas(prev, have_prev, book, side, price, size, owner):
    """Level changes from ``prev`` (4, d) to each of ``book``'s (m, 4, d) snapshots in turn."""
    m, d = book.shape[0], book.shape[2]
    k = 0
    for r in range(m):
        if not have_prev:
            side[k] = 0
            price[k] = np.nan
            size[k] = 0.0
            owner[k] = r
            k += 1
        for s in range(2):
            sd = 1 if s == 0 else -1
            pp, ps, cp, cs = 2 * s, 2 * s + 1, 2 * s, 2 * s + 1
            if have_prev:
                for i in range(d):  # levels gone from the snapshot
                    p = prev[pp, i]
                    if np.isnan(p):
                        continue
                    found = False
                    for j in range(d):
                        if book[r, cp, j] == p:
                            found = True
                            break
                    if not found:
                        side[k] = sd
                        price[k] = p
                        size[k] = 0.0
                        owner[k] = r
                        k += 1
            for j in range(d):  # levels new or changed
                p = book[r, cp, j]
                if np.isnan(p):
                    continue
                q = book[r, cs, j]
                same = False
                if have_prev:
                    for i in range(d):
                        if prev[pp, i] == p:
                            same = prev[ps, i] == q
                            break
                if not same:
                    side[k] = sd
                    price[k] = p
                    size[k] = q
                    owner[k] = r
                    k += 1
        for a in range(4):
            for j in range(d):
                prev[a, j] = book[r, a, j]
        have_prev = True
    return k


def snapshot_deltas(prev: np.ndarray | None, book: np.ndarray, depth: int):
    """Book rows that turn a top-``depth`` snapshot into the next (``book``: (m, 4, depth) of bid
    price, bid size, ask price, ask size, NaN where a side is shorter), starting from ``prev``
    (the last snapshot, (4, depth), or None: a clear first). Returns ``side``, ``price``,
    ``size``, ``owner`` (the snapshot each row belongs to) and the new ``prev``. After each
    snapshot's rows the book holds exactly that snapshot."""
    m = book.shape[0]
    cap = m * (4 * depth + 1)
    side = np.empty(cap, np.int8)
    price = np.empty(cap)
    size = np.empty(cap)
    owner = np.empty(cap, np.int64)
    state = np.full((4, depth), np.nan) if prev is None else prev.copy()
    k = _snapshot_deltas(state, prev is not None, np.ascontiguousarray(book, dtype=np.float64), side, price, size, owner)
    return side[:k], price[:k], size[:k], owner[:k], state
