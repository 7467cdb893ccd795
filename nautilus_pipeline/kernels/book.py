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

Book: each side keeps up to ``capacity`` levels (default 4,096; the arrays start at 64 and
double as a side deepens, so a shallow book costs little). Layout: per side one array of
*keys* sorted **worst first**, the best level last (key = price for bids, -price for asks, so
both sides ascend toward the top). Most deltas touch the top of the book, so searching from
the best level and shifting only the levels above the change costs the distance from the
top, not the book's depth (a 900-level CME book moved the whole book on every top insert in
the best-first layout this replaced).

Beyond capacity, exactly. A side is *truncated* once a level had to be pushed out (its worst
is forgotten: ``evicted``). From then on the kept levels are, always, the best ``n`` levels
of the true side: a delta worse than the worst kept level is in the forgotten region and is
ignored (``beyond``: an insert there could have unknown levels above it), everything else is
applied. So the features stay exact while a truncated side keeps at least the depth they
need; a feature that would need a forgotten level (``imbalance_10`` on a truncated side
with 9 levels left, the spread when a truncated side has emptied) is NaN, never a number
from a wrong book, and the row is counted in ``inexact``. A clear (snapshot) starts the
book over, truncation included. The counters live in ``BookState.counts``
(``COUNT_NAMES``), cumulative per book; the book stage reports their sums.

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
has fewer than ``L`` levels (or a truncated side keeps fewer: NaN, unknown). A row with ``side = 0`` and ``action = ACTION_SET`` changes
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
    "COUNT_NAMES",
    "DEFAULT_CAPACITY",
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


DEFAULT_CAPACITY = 4096
_INITIAL_LEVELS = 64
COUNT_NAMES = ("evicted", "beyond", "inexact")
"""``BookState.counts``: levels pushed out of a full side; deltas ignored because they fell in
a truncated side's forgotten region; rows whose features needed a forgotten level (NaN)."""


@dataclass(frozen=True, slots=True)
class BookState:
    """One symbol's book. ``key``/``sz`` of shape (2, allocated), row 0 bids, row 1 asks, worst
    first (``key`` = price for bids, -price for asks); ``n`` levels used per side; ``trunc`` 1
    where a side had levels pushed out; ``counts`` (``COUNT_NAMES``); ``capacity`` the most
    levels a side may keep. Immutable from the caller's side: updates return a new one."""

    key: np.ndarray
    sz: np.ndarray
    n: np.ndarray
    trunc: np.ndarray
    counts: np.ndarray
    capacity: int

    def levels(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Prices and sizes of one side (``+1`` bids, ``-1`` asks), best first."""
        s = 0 if side == 1 else 1
        m = int(self.n[s])
        px = self.key[s, :m][::-1]
        return (px if s == 0 else -px), self.sz[s, :m][::-1].copy()


def new_book_state(capacity: int = DEFAULT_CAPACITY) -> BookState:
    """An empty book keeping up to ``capacity`` levels per side."""
    if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer) or capacity < max(DEPTHS):
        raise ConfigError(f"book capacity must be an integer >= {max(DEPTHS)} levels, got {capacity!r}")
    alloc = min(int(capacity), _INITIAL_LEVELS)
    return BookState(np.zeros((2, alloc)), np.zeros((2, alloc)), np.zeros(2, np.int64), np.zeros(2, np.int64),
                     np.zeros(len(COUNT_NAMES), np.int64), int(capacity))


def _grown(key: np.ndarray, sz: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    alloc = min(2 * key.shape[1], capacity)
    k2, s2 = np.zeros((2, alloc)), np.zeros((2, alloc))
    k2[:, : key.shape[1]] = key
    s2[:, : sz.shape[1]] = sz
    return k2, s2


@njit(cache=True, inline="always")
def _set_level(key, sz, n, trunc, counts, s, k, size, capacity):
    """Set side ``s``'s level of key ``k`` to ``size``; returns False when the arrays must grow
    first (nothing changed then)."""
    m = n[s]
    i = m - 1
    while i >= 0 and key[s, i] > k:  # from the best level down
        i -= 1
    if i >= 0 and key[s, i] == k:
        if size > 0.0:
            sz[s, i] = size
        else:
            for j in range(i, m - 1):
                key[s, j] = key[s, j + 1]
                sz[s, j] = sz[s, j + 1]
            n[s] = m - 1
        return True
    if trunc[s] != 0 and i < 0:  # worse than every kept level of a truncated side: forgotten region
        counts[1] += 1
        return True
    if size <= 0.0:
        return True
    if m < key.shape[1]:  # room: shift the better levels up by one
        for j in range(m, i + 1, -1):
            key[s, j] = key[s, j - 1]
            sz[s, j] = sz[s, j - 1]
        key[s, i + 1] = k
        sz[s, i + 1] = size
        n[s] = m + 1
        return True
    if m < capacity:
        return False
    counts[0] += 1  # full: the worst level (index 0) is pushed out
    trunc[s] = 1
    if i < 0:  # the new level itself is the worst: it is the one pushed out
        return True
    for j in range(0, i):
        key[s, j] = key[s, j + 1]
        sz[s, j] = sz[s, j + 1]
    key[s, i] = k
    sz[s, i] = size
    return True


@njit(cache=True, nogil=True)
def _update(key, sz, n, trunc, counts, capacity, side, price, size, action, out, lv, start):
    """Rows from ``start``; returns the first row not done (``len`` when all are: else grow)."""
    nan = np.nan
    depth = lv.shape[2]
    for r in range(start, side.shape[0]):
        nb0, na0 = n[0], n[1]
        b0 = key[0, nb0 - 1] if nb0 > 0 else nan
        qb0 = sz[0, nb0 - 1] if nb0 > 0 else nan
        a0 = -key[1, na0 - 1] if na0 > 0 else nan
        qa0 = sz[1, na0 - 1] if na0 > 0 else nan
        # a side with no kept level is truly empty unless truncated (then its top is unknown)
        empty0 = (nb0 == 0 and trunc[0] == 0) or (na0 == 0 and trunc[1] == 0)
        if action[r] == 1:
            n[0] = 0
            n[1] = 0
            trunc[0] = 0
            trunc[1] = 0
        sd = side[r]
        if (sd == 1 or sd == -1) and np.isfinite(price[r]):
            s = 0 if sd == 1 else 1
            k = price[r] if s == 0 else -price[r]
            if not _set_level(key, sz, n, trunc, counts, s, k, size[r], capacity):
                return r  # grow, then redo this row (never after a clear: the sides are empty then)
        nb, na = n[0], n[1]
        unknown = False
        if nb > 0 and na > 0:
            b, a, qb, qa = key[0, nb - 1], -key[1, na - 1], sz[0, nb - 1], sz[1, na - 1]
            out[r, 0] = a - b
            out[r, 1] = (a + b) / 2.0
            out[r, 2] = (b * qa + a * qb) / (qb + qa)
            if nb0 > 0 and na0 > 0:
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
            elif empty0:
                out[r, 6] = 0.0
            else:
                out[r, 6] = nan
                unknown = True
        else:
            out[r, 0] = nan
            out[r, 1] = nan
            out[r, 2] = nan
            if (nb == 0 and trunc[0] == 0) or (na == 0 and trunc[1] == 0):
                out[r, 6] = 0.0
            else:
                out[r, 6] = nan
                unknown = True
        sb = 0.0
        sa = 0.0
        for j in range(10):
            if j < nb:
                sb += sz[0, nb - 1 - j]
            if j < na:
                sa += sz[1, na - 1 - j]
            if j == 0 or j == 4 or j == 9:
                d = 0 if j == 0 else (1 if j == 4 else 2)
                tot = sb + sa
                if (trunc[0] != 0 and nb <= j) or (trunc[1] != 0 and na <= j):
                    out[r, 3 + d] = nan
                    unknown = True
                else:
                    out[r, 3 + d] = (sb - sa) / tot if tot > 0.0 else nan
        if unknown:
            counts[2] += 1
        for s in range(2):
            m = n[s]
            sign = 1.0 if s == 0 else -1.0
            for j in range(depth):
                if j < m:
                    lv[r, 2 * s, j] = sign * key[s, m - 1 - j]
                    lv[r, 2 * s + 1, j] = sz[s, m - 1 - j]
                else:
                    lv[r, 2 * s, j] = nan
                    lv[r, 2 * s + 1, j] = nan
    return side.shape[0]


def book_update(
    state: BookState, side: np.ndarray, price: np.ndarray, size: np.ndarray, action: np.ndarray,
    levels_out: np.ndarray | None = None,
) -> tuple[BookState, np.ndarray]:
    """Apply the deltas of one symbol in order; returns the new state and features (n, 7).

    ``levels_out`` (n, 4, L), when given, receives the best L levels after each row."""
    key, sz = state.key.copy(), state.sz.copy()
    n, trunc, counts = state.n.copy(), state.trunc.copy(), state.counts.copy()
    rows = np.asarray(side).shape[0]
    out = np.empty((rows, len(BOOK_FEATURE_NAMES)))
    lv = np.empty((rows, 4, 0)) if levels_out is None else levels_out
    if lv.shape[:2] != (rows, 4):
        raise ValueError(f"levels_out must be shaped ({rows}, 4, L), got {lv.shape}")
    cols = (np.asarray(side, dtype=np.int8), np.asarray(price, dtype=np.float64),
            np.asarray(size, dtype=np.float64), np.asarray(action, dtype=np.uint8))
    done = 0
    while True:
        done = _update(key, sz, n, trunc, counts, state.capacity, *cols, out, lv, done)
        if done >= rows:
            break
        key, sz = _grown(key, sz, state.capacity)
    return BookState(key, sz, n, trunc, counts, state.capacity), out


def book_depth_scan(
    state: BookState, side: np.ndarray, price: np.ndarray, size: np.ndarray, action: np.ndarray,
    deepest: np.ndarray,
) -> BookState:
    """Apply deltas as :func:`book_update` does, without features; ``deepest`` (int64[2]) is
    raised to the most levels each side held (what ``inspect`` reports as a file's depth)."""
    key, sz = state.key.copy(), state.sz.copy()
    n, trunc, counts = state.n.copy(), state.trunc.copy(), state.counts.copy()
    cols = (np.asarray(side, dtype=np.int8), np.asarray(price, dtype=np.float64),
            np.asarray(size, dtype=np.float64), np.asarray(action, dtype=np.uint8))
    done = 0
    while True:
        done = _depth_scan(key, sz, n, trunc, counts, state.capacity, *cols, deepest, done)
        if done >= cols[0].shape[0]:
            break
        key, sz = _grown(key, sz, state.capacity)
    return BookState(key, sz, n, trunc, counts, state.capacity)


@njit(cache=True, nogil=True)
def _depth_scan(key, sz, n, trunc, counts, capacity, side, price, size, action, deepest, start):
    for r in range(start, side.shape[0]):
        if action[r] == 1:
            n[0] = 0
            n[1] = 0
            trunc[0] = 0
            trunc[1] = 0
        sd = side[r]
        if (sd == 1 or sd == -1) and np.isfinite(price[r]):
            s = 0 if sd == 1 else 1
            if not _set_level(key, sz, n, trunc, counts, s, price[r] if s == 0 else -price[r], size[r], capacity):
                return r  # a clear before it is redone harmlessly: the book was emptied already
            if n[s] > deepest[s]:
                deepest[s] = n[s]
    return side.shape[0]


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
