"""The risk stage's small-batch kernel: the rule, the account and the final rule in one call.

Why a kernel of its own. A live batch of one trade went through the risk stage's batch
path in ~150 µs of Python (symbol groups, ``np.full``/``column_stack`` per batch, two
``signal_update`` calls and a ``risk_update`` each building dicts and states, the return
window concatenated twice), against well under a µs of arithmetic. Here a batch of one
symbol's trades runs as ONE numba call over the slab's own columns and the symbol's state
arrays (allocated once per symbol, updated in place): no Python per row, no state object
built per call.

Bit-identity with the batch path holds by construction: this kernel calls the batch path's
own kernels (:func:`..kernels.signal._signal_rows` twice, :func:`..kernels.risk._risk_scan`
once) on the same values in the same order; only the gathering and the bookkeeping around
them moved into numba.

The per-symbol state (:class:`SymbolBook`) is three arrays: ``f`` float64 (the account's
floats, the intended and the final rule's last probability/side/target, the carried row
values), ``i`` int64 (the account's ints, the return window's length, trades seen),
``ring`` int64 (the order-rate ring) and ``ret`` float64 (the last returns, chronological,
in a buffer of twice the VaR window so that an append moves data only once per window).

The kernel declines (returns −1, having changed nothing) a batch it does not cover: rows of
another symbol or of quotes, or a non-finite price (the batch path raises the error).
Otherwise it runs up to the row at which the next VaR report falls due and returns the
number of breach events (rows where the set of breached limits changes to a non-empty one)
and where it stopped; the stage takes the report's window there and calls it again for the
rest. Every scan here carries its state across such a split, which is why any batch size
gives the same numbers. A replay batch of one symbol's trades (4,096 rows, two reports)
takes this path too, on the stage's worker.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .addresses import ArrayTable, array1d, column, column2d
from .risk import RiskParams, RiskState, _risk_scan, new_risk_state
from .signal import SignalParams, SignalState, _signal_rows

# f: account floats, intent (prob, side, target), final signal (prob, side, target), carry
F_ACCOUNT, F_INTENT, F_FINAL, F_LAST, F_WIDTH = 0, 5, 8, 11, 17
# i: account ints (kill, count, ring pos), return-window length, trades seen
I_ACCOUNT, I_RET_LEN, I_TRADES, I_WIDTH = 0, 3, 4, 5
# consts_f: limits (6), long and short thresholds, signal max position
# consts_i: max_orders, order_window_ns, proportional, step aside, var_every, ret column, var_window,
# features width
CARRY0 = (0.0, math.nan, math.nan, math.nan, 0.0, 0.0)


class SymbolBook:
    """One symbol's risk-stage state as arrays (see the module docstring)."""

    __slots__ = ("f", "i", "ret", "ring", "table")

    def __init__(self, f: np.ndarray, i: np.ndarray, ring: np.ndarray, ret: np.ndarray):
        self.f, self.i, self.ring, self.ret = f, i, ring, ret
        #: The four arrays as one kernel argument (:class:`.addresses.ArrayTable`); they
        #: are only ever written into, never rebound.
        self.table = ArrayTable(((f, np.float64), (i, np.int64), (ring, np.int64),
                                 (ret, np.float64))).table

    @classmethod
    def new(cls, limits: RiskParams, window: int) -> SymbolBook:
        acct = new_risk_state(limits)
        f = np.empty(F_WIDTH)
        f[F_ACCOUNT:F_INTENT] = acct.f
        f[F_INTENT:F_FINAL] = (math.nan, 0.0, math.nan)
        f[F_FINAL:F_LAST] = (math.nan, 0.0, math.nan)
        f[F_LAST:] = CARRY0
        i = np.zeros(I_WIDTH, dtype=np.int64)
        i[I_ACCOUNT:I_RET_LEN] = acct.i
        return cls(f, i, acct.order_ts.copy(), np.empty(2 * window))

    def copy(self) -> SymbolBook:
        return SymbolBook(self.f.copy(), self.i.copy(), self.ring.copy(), self.ret.copy())

    # --- the batch path's views --------------------------------------------------------
    def account(self, limits: RiskParams) -> RiskState:
        return RiskState(limits, self.f[F_ACCOUNT:F_INTENT].copy(), self.i[I_ACCOUNT:I_RET_LEN].copy(),
                         self.ring.copy())

    def rule_state(self, rule: SignalParams, final: bool) -> SignalState:
        at = F_FINAL if final else F_INTENT
        return SignalState(rule, float(self.f[at]), int(self.f[at + 1]), float(self.f[at + 2]))

    def window(self) -> np.ndarray:
        """The last returns (at most the VaR window), oldest first: a view."""
        n = int(self.i[I_RET_LEN])
        return self.ret[max(n - self.ret.shape[0] // 2, 0) : n]

    @property
    def trades(self) -> int:
        return int(self.i[I_TRADES])

    @property
    def last(self) -> np.ndarray:
        return self.f[F_LAST:]

    def store(self, acct: RiskState, intent: SignalState, final: SignalState,
              window: np.ndarray, trades: int, last: np.ndarray) -> None:
        """Take the batch path's results (a new book's arrays are the batch's own copies)."""
        f, i = self.f, self.i
        f[F_ACCOUNT:F_INTENT] = acct.f
        f[F_INTENT:F_FINAL] = (intent.last_prob, intent.last_side, intent.last_target)
        f[F_FINAL:F_LAST] = (final.last_prob, final.last_side, final.last_target)
        f[F_LAST:] = last
        i[I_ACCOUNT:I_RET_LEN] = acct.i
        if acct.order_ts.shape != self.ring.shape:
            raise ValueError(f"risk book: an order ring of {acct.order_ts.shape[0]} slots, "
                             f"this book's has {self.ring.shape[0]} (other limits)")
        self.ring[...] = acct.order_ts
        w = min(window.shape[0], self.ret.shape[0] // 2)
        self.ret[:w] = window[window.shape[0] - w :]
        i[I_RET_LEN] = w
        i[I_TRADES] = trades


def live_columns(features: int) -> tuple:
    """The slab columns :func:`risk_rows_small` reads and writes, in its table's order
    (:mod:`.addresses`), for a features column of ``features`` columns."""
    f64, u8 = np.float64, np.uint8
    return (("symbol_id", np.uint32), ("kind", u8), ("ts_ns", np.int64), ("price", f64),
            ("prediction", np.float32), ("toxic", u8), ("features", f64, features),
            ("position", f64), ("equity", f64), ("pnl", f64), ("drawdown", f64), ("kill", u8),
            ("breach", np.int64), ("signal_side", np.int8), ("signal_strength", f64),
            ("signal_target", f64), ("signal_reasons", np.int64), ("signal_emit", u8))


@njit(cache=True, nogil=True)
def risk_rows_small(start, n, key, slab, consts, book):
    """Rows ``[start, stop)`` of a slab's rows ``[0, n)`` (``slab``: the address table of
    its :func:`live_columns`; ``consts``: the table of ``consts_f``, ``consts_i``;
    ``book``: the symbol's :attr:`SymbolBook.table`), all trades of symbol ``key``: the
    risk stage's outputs;
    ``stop`` is ``n`` or the row just after the next VaR report falls due (its window is
    then the book's, for the caller to take before the next call).

    Returns ``(breach events, stop, breach mask before row start)``, or ``(-1, start, mask)``
    (nothing changed) where the batch path must run instead (see the module docstring);
    rows are checked when ``start == 0``.
    """
    sym, kind, ts = column(slab, 0, np.uint32), column(slab, 1, np.uint8), column(slab, 2, np.int64)
    price, prob, toxic = column(slab, 3, np.float64), column(slab, 4, np.float32), column(slab, 5, np.uint8)
    o_pos, o_eq, o_pnl, o_dd = (column(slab, 7, np.float64), column(slab, 8, np.float64),
                                column(slab, 9, np.float64), column(slab, 10, np.float64))
    o_kill, o_breach = column(slab, 11, np.uint8), column(slab, 12, np.int64)
    o_side, o_strength, o_target = (column(slab, 13, np.int8), column(slab, 14, np.float64),
                                    column(slab, 15, np.float64))
    o_reasons, o_emit = column(slab, 16, np.int64), column(slab, 17, np.uint8)
    consts_f, consts_i = array1d(consts, 0, np.float64), array1d(consts, 1, np.int64)
    feats = column2d(slab, 6, consts_i[7], np.float64)
    f, ist = array1d(book, 0, np.float64), array1d(book, 1, np.int64)
    ring, ret = array1d(book, 2, np.int64), array1d(book, 3, np.float64)
    if start == 0:
        for r in range(n):
            if sym[r] != key or kind[r] != 0 or not math.isfinite(price[r]):
                return -1, start, np.int64(f[16])
    var_every = consts_i[4]
    trades = ist[4]
    stop = n
    if var_every > 0:
        stop = min(n, start + (trades // var_every + 1) * var_every - trades)
    m = stop - start
    long_t, short_t, max_pos = consts_f[6], consts_f[7], consts_f[8]
    proportional, step_aside = consts_i[2] != 0, consts_i[3] != 0
    pr = np.empty(m)
    tox = np.empty(m, dtype=np.bool_)
    kill = np.zeros(m, dtype=np.bool_)
    for r in range(m):
        pr[r] = prob[start + r]
        tox[r] = toxic[start + r] != 0
    side = np.empty(m, dtype=np.int8)
    strength = np.empty(m)
    target = np.empty(m)
    reasons = np.empty(m, dtype=np.int64)
    emit = np.empty(m, dtype=np.bool_)
    # 1. the rule's intended targets
    lp, ls, lt = _signal_rows(pr, tox, kill, f[5], np.int64(f[6]), f[7], long_t, short_t, max_pos,
                              proportional, step_aside, side, strength, target, reasons, emit)
    f[5], f[6], f[7] = lp, ls, lt
    # 2. the account and limits
    o = np.empty((9, m))
    tsv = np.ascontiguousarray(ts[start:stop])
    pv = np.ascontiguousarray(price[start:stop])
    _risk_scan(tsv, pv, target, f[0:5], ist[0:3], ring, consts_f[0:6], consts_i[0], consts_i[1], o)
    # 3. the final signals, with the kill switch as of each row
    for r in range(m):
        kill[r] = o[7, r] != 0.0
    lp, ls, lt = _signal_rows(pr, tox, kill, f[8], np.int64(f[9]), f[10], long_t, short_t, max_pos,
                              proportional, step_aside, side, strength, target, reasons, emit)
    f[8], f[9], f[10] = lp, ls, lt
    events = 0
    prev = f[16]
    before = np.int64(prev)
    for r in range(m):
        b = o[8, r]
        if b != 0.0 and b != prev:
            events += 1
        prev = b
        q = start + r
        o_pos[q] = o[0, r]
        o_eq[q] = o[2, r]
        o_pnl[q] = o[3, r]
        o_dd[q] = o[4, r]
        o_kill[q] = np.uint8(o[7, r])
        o_breach[q] = np.int64(o[8, r])
        o_side[q] = side[r]
        o_strength[q] = strength[r]
        o_target[q] = target[r]
        o_reasons[q] = reasons[r]
        o_emit[q] = np.uint8(emit[r])
    last = m - 1
    f[11], f[12], f[13], f[14] = o[0, last], o[2, last], o[3, last], o[4, last]
    f[15], f[16] = o[7, last], o[8, last]
    # the return window: append, keeping the last var_window (a buffer of twice that)
    col = consts_i[5]
    w = consts_i[6]
    length = ist[3]
    for r in range(start, stop):
        if length == ret.shape[0]:
            ret[:w] = ret[length - w : length]
            length = w
        ret[length] = feats[r, col]
        length += 1
    ist[3] = length
    ist[4] = trades + m
    return events, stop, before
