"""VPIN with bulk volume classification (Easley, López de Prado and O'Hara, 2012).

The definition is issue 4's, stated here so that the code can be checked against it:

- **Bars.** Time bars of ``bar_ns`` ns aligned to multiples of ``bar_ns`` since the epoch
  (bar id ``ts_ns // bar_ns``); ``bar_ns = 0``: every trade is its own bar. A bar's volume
  is the sum of its trade sizes (in stream order), its price the last trade's price, its
  timestamp the last trade's timestamp. A bar closes when a trade of a later bar arrives,
  or at the end of the stream (:func:`vpin_flush`); with ``bar_ns = 0`` a bar closes with
  its trade, since nothing can join it. A trade whose bar id is *lower* than the open
  bar's (out of order) joins the open bar.
- **Classification.** ``dP_k = price_k − price_{k−1}``; ``sigma_k`` is the sample standard
  deviation (ddof = 1) of the last ``sigma_window`` dP values up to and including bar k;
  buy fraction ``f_k = Φ(dP_k / sigma_k) = erfc(−z/√2)/2``. ``f = 0.5`` for the first bar
  and wherever ``sigma_k`` is undefined (fewer than 2 dP values) or zero (all dP values
  in the window equal).
- **Buckets.** ``C_k`` is the cumulative volume after bar k (float64, summed bar by bar in
  stream order). Bucket j holds cumulative volume ``[j·V, (j+1)·V)``; its buy volume is
  ``Σ_k f_k · overlap(bar k, bucket j)`` with
  ``overlap = min(C_k, (j+1)·V) − max(C_{k−1}, j·V)``, so a bar that overflows a bucket
  spills into the next ones with the same ``f``. Bucket j completes in the first bar with
  ``C_k ≥ (j+1)·V`` and carries that bar's timestamp. Sell volume is ``V − buy``.
- **VPIN.** ``OI_j = |2·buy_j − V|``; ``VPIN_j = Σ OI over the last n buckets / (n·V)``,
  NaN before n buckets exist. ``cdf_j`` is the empirical CDF of the VPIN values so far,
  at ``VPIN_j``: the fraction of defined VPIN values up to and including bucket j that
  are ``≤ VPIN_j``. ``toxic_j = cdf_j > threshold`` (default 0.9).

Units: ``ts_ns`` int64 ns, prices float64 in quote currency, sizes and ``V`` float64 base
units. VPIN, cdf are dimensionless in [0, 1].

Precision: cumulative volumes are float64 running sums, so relative to exact arithmetic
bucket boundaries carry an absolute error of ``eps · C`` per addition, ~√N·eps·C after N
trades (about 1e-10 of V after a few thousand buckets). The kernel makes the loop
reference's float operations in the same order everywhere except sigma (rolling sums here,
an exact ``statistics.stdev`` there), so the two agree to ~1e-15 relative; every running
sum lives in the state, so the output is bit for bit the same however the stream is split.

Design, and the alternatives weighed:

- Bars, dP and the rolling sigma are a sequential scan (the bar a trade closes depends on
  the state the previous batch left); it runs in one numba loop (``cache=True``). The rolling
  sums of dP and dP² are compensated (TwoSum) add/remove sums, O(1) per bar and accurate to
  a few ulp of the window sums however long the stream. They are sums of ``dP − shift``:
  when the window's mean is large against its spread (``S2 − S1²/n`` would cancel, e.g.
  dP values all one tick apart from float noise), the window is re-centred on its mean
  (O(sigma_window), rare), so sigma stays within ~1e-14 of the exact value. A constant
  window is recognised exactly (run length of equal dP), so it gives ``f = 0.5`` as the
  definition says rather than rounding noise. A two-pass standard deviation per bar was the
  obvious alternative: O(sigma_window) per bar, 200 more operations per trade with
  ``bar_ns = 0``, which the 20M trades/s budget (50 ns a trade) cannot afford.
- The bucket scan: cumulative volume by ``cumsum`` (the carried total prepended, so the
  additions are the loop's) and the bars completing each bucket by ``searchsorted``; the
  buy volume per bucket is then a segmented sum over bars in a small numba loop, since
  exactness needs the loop's order of additions. A fully numpy version (pieces summed
  by ``bincount``, which also adds in array order) was exact too but ran at ~40M bars/s
  against ~120M for this one, and took the whole kernel under the 20M trades/s target
  (measured with ``bar_ns = 0`` on this 2-core Xeon VM); the difference of cumulative buy
  volume interpolated at the bucket edges (``scripts/bench_kernels.py``'s numpy column) is
  vectorised but loses ``eps · C / V`` relative precision per bucket.
- The VPIN window sum is a sequential sum across the n window columns (vectorised over
  buckets); the empirical CDF counts with a Fenwick tree over the batch's new values plus
  a binary search in the sorted history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from numba import njit

from ..errors import ConfigError, DataError
from ..events import KIND_TRADE
from .addresses import array1d, column
from .rows import symbol_groups

__all__ = [
    "VPIN_OUTPUT_FIELDS",
    "VpinParams",
    "VpinState",
    "new_vpin_state",
    "propose_bucket_volume",
    "vpin_flush",
    "vpin_rows_small",
    "vpin_update",
    "vpin_update_rows",
    "vpin_update_torch",
]

VPIN_OUTPUT_FIELDS: tuple[str, ...] = (
    "bucket",
    "ts_ns",
    "buy_volume",
    "sell_volume",
    "vpin",
    "cdf",
    "toxic",
    "row",
)
"""Keys of the dict :func:`vpin_update` returns, one entry per completed bucket.

``row`` is the index, in the batch given to :func:`vpin_update`, of the trade whose arrival
closed the bar that completed the bucket: from that row on, the bucket's VPIN and flag are
known (with ``bar_ns = 0`` it is the bucket's own last trade). ``-1``: closed by
:func:`vpin_flush`.
"""

_SQRT2 = math.sqrt(2.0)

# integer state of the bar scan
_I_OPEN, _I_OPEN_ID, _I_OPEN_TS, _I_HAVE_PREV, _I_POS, _I_COUNT, _I_RUN = range(7)
# float state of the bar scan
(_F_OPEN_VOL, _F_OPEN_PRICE, _F_PREV_PRICE, _F_S1, _F_C1, _F_S2, _F_C2, _F_LAST_DP, _F_SHIFT) = (
    range(9)
)


@dataclass(frozen=True, slots=True)
class VpinParams:
    """VPIN parameters: ``bucket_volume`` V (base units), ``window`` n buckets, ``bar_ns``,
    ``sigma_window`` bars, and the CDF ``threshold`` of the toxicity flag."""

    bucket_volume: float
    window: int = 50
    bar_ns: int = 60_000_000_000
    sigma_window: int = 100
    threshold: float = 0.9

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bucket_volume) and self.bucket_volume > 0):
            raise ConfigError(
                f"VPIN: bucket_volume must be a positive volume, got {self.bucket_volume}"
            )
        if self.window < 1:
            raise ConfigError(f"VPIN: window must be >= 1 bucket, got {self.window}")
        if self.bar_ns < 0:
            raise ConfigError(
                f"VPIN: bar_ns must be >= 0 (0 = one bar per trade), got {self.bar_ns}"
            )
        if self.sigma_window < 2:
            raise ConfigError(f"VPIN: sigma_window must be >= 2 bars, got {self.sigma_window}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"VPIN: threshold is a CDF level in [0, 1], got {self.threshold}")


@dataclass(frozen=True, slots=True)
class VpinState:
    """One symbol's VPIN state between batches. Immutable; updates return a new one.

    ``bar_i``/``bar_f``/``ring``: the open bar, the previous bar's price and the rolling
    dP window; ``cum_volume``: C after the last closed bar; ``bucket``: index of the open
    bucket and ``buy_partial`` its buy volume so far; ``oi_tail``: the last ``window − 1``
    OI values; ``vpin_sorted``: every defined VPIN so far, sorted (for the CDF).
    """

    params: VpinParams
    bar_i: np.ndarray
    bar_f: np.ndarray
    ring: np.ndarray
    cum_volume: float = 0.0
    bucket: int = 0
    buy_partial: float = 0.0
    oi_tail: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vpin_sorted: np.ndarray = field(default_factory=lambda: np.zeros(0))


def new_vpin_state(
    bucket_volume: float,
    *,
    window: int = 50,
    bar_ns: int = 60_000_000_000,
    sigma_window: int = 100,
    threshold: float = 0.9,
) -> VpinState:
    """The state of a symbol that has seen no trade yet."""
    params = VpinParams(
        float(bucket_volume), int(window), int(bar_ns), int(sigma_window), float(threshold)
    )
    return VpinState(
        params=params,
        bar_i=np.zeros(7, dtype=np.int64),
        bar_f=np.zeros(9),
        ring=np.zeros(params.sigma_window),
    )


def propose_bucket_volume(size: np.ndarray, n_buckets: int = 50) -> float:
    """V = total volume / ``n_buckets`` of a calibration sample (e.g. one day of trades).

    ``size`` is the trade sizes (base units) of the calibration file; the default gives
    about 50 buckets per calibration period, as in Easley et al.
    """
    total = float(np.sum(np.asarray(size, dtype=np.float64)))
    if not (math.isfinite(total) and total > 0) or n_buckets < 1:
        raise DataError(
            f"propose_bucket_volume: need a positive finite total volume and n_buckets >= 1, "
            f"got total={total}, n_buckets={n_buckets}"
        )
    return total / n_buckets


@njit(cache=True, nogil=True, inline="always")
def _compensated_add(s: float, c: float, x: float) -> tuple[float, float]:
    """Compensated ``s + x``: Knuth's branch-free TwoSum error goes into ``c``."""
    t = s + x
    bp = t - s
    c += (s - (t - bp)) + (x - bp)
    return t, c


@njit(cache=True, nogil=True)
def _recentre(ring, count, shift):
    """Sums of the window shifted by its mean, from scratch: O(window), rare."""
    s1 = 0.0
    for i in range(count):
        s1 += ring[i] - shift
    shift = shift + s1 / count
    s1, c1, s2, c2 = 0.0, 0.0, 0.0, 0.0
    for i in range(count):
        d = ring[i] - shift
        s1, c1 = _compensated_add(s1, c1, d)
        s2, c2 = _compensated_add(s2, c2, d * d)
    return s1, c1, s2, c2, shift


@njit(cache=True, nogil=True, inline="always")
def _close_bar(price, prev, s1, c1, s2, c2, last_dp, shift, pos, count, run, ring):
    """Close a bar (not the first) at ``price``: roll the dP window, return f and the state.

    The sums are of ``dP − shift``; when the window's mean is large against its spread
    (``S2 − S1²/n`` would cancel), the window is re-centred on its mean.
    """
    w = ring.shape[0]
    dp = price - prev
    if count == w:
        d = ring[pos] - shift
        s1, c1 = _compensated_add(s1, c1, -d)
        s2, c2 = _compensated_add(s2, c2, -(d * d))
    else:
        count += 1
    ring[pos] = dp
    d = dp - shift
    s1, c1 = _compensated_add(s1, c1, d)
    s2, c2 = _compensated_add(s2, c2, d * d)
    pos = pos + 1 if pos + 1 < w else 0
    run = run + 1 if count > 1 and dp == last_dp else 1
    f = 0.5
    if count >= 2 and run < count and dp != 0.0:
        t1 = s1 + c1
        mean = t1 / count
        var = ((s2 + c2) - t1 * mean) / (count - 1)
        if not (var > 0.0 and mean * mean <= 100.0 * var):
            s1, c1, s2, c2, shift = _recentre(ring, count, shift)
            t1 = s1 + c1
            var = ((s2 + c2) - t1 * (t1 / count)) / (count - 1)
        if var > 0.0:
            f = 0.5 * math.erfc(-(dp / math.sqrt(var)) / _SQRT2)
    return f, s1, c1, s2, c2, dp, shift, pos, count, run


@njit(cache=True, nogil=True)
def _bar_scan(ts, price, size, bar_ns, bi, bf, ring, flush, o_ts, o_vol, o_f, o_row):
    """Scan trades into closed bars; returns how many were written to the o_* arrays.

    With ``bar_ns == 0`` only ``o_f`` is written (bar k is trade k). The state lives in
    locals during the loop and goes back to ``bi``/``bf`` at the end.
    """
    is_open, open_id, open_ts, have_prev = (
        bi[_I_OPEN],
        bi[_I_OPEN_ID],
        bi[_I_OPEN_TS],
        bi[_I_HAVE_PREV],
    )
    pos, count, run = bi[_I_POS], bi[_I_COUNT], bi[_I_RUN]
    open_vol, open_price, prev = bf[_F_OPEN_VOL], bf[_F_OPEN_PRICE], bf[_F_PREV_PRICE]
    s1, c1, s2, c2, last_dp = bf[_F_S1], bf[_F_C1], bf[_F_S2], bf[_F_C2], bf[_F_LAST_DP]
    shift = bf[_F_SHIFT]
    m = 0
    n = ts.shape[0]
    if bar_ns == 0:
        for i in range(n):
            if have_prev == 0:
                have_prev = 1
                f = 0.5
            else:
                f, s1, c1, s2, c2, last_dp, shift, pos, count, run = _close_bar(
                    price[i], prev, s1, c1, s2, c2, last_dp, shift, pos, count, run, ring
                )
            prev = price[i]
            o_f[i] = f
        m = n
    else:
        for i in range(n + 1 if flush else n):
            closing = False
            if i == n:
                closing = is_open == 1
            else:
                bar_id = ts[i] // bar_ns
                if is_open == 1 and bar_id <= open_id:
                    open_vol += size[i]
                    open_price = price[i]
                    open_ts = ts[i]
                    continue
                closing = is_open == 1
            if closing:
                if have_prev == 0:
                    have_prev = 1
                    f = 0.5
                else:
                    f, s1, c1, s2, c2, last_dp, shift, pos, count, run = _close_bar(
                        open_price, prev, s1, c1, s2, c2, last_dp, shift, pos, count, run, ring
                    )
                prev = open_price
                o_ts[m] = open_ts
                o_row[m] = i if i < n else -1
                o_vol[m] = open_vol
                o_f[m] = f
                m += 1
                is_open = 0
            if i < n:
                is_open = 1
                open_id = ts[i] // bar_ns
                open_ts = ts[i]
                open_vol = size[i]
                open_price = price[i]
    bi[_I_OPEN], bi[_I_OPEN_ID], bi[_I_OPEN_TS], bi[_I_HAVE_PREV] = (
        is_open,
        open_id,
        open_ts,
        have_prev,
    )
    bi[_I_POS], bi[_I_COUNT], bi[_I_RUN] = pos, count, run
    bf[_F_OPEN_VOL], bf[_F_OPEN_PRICE], bf[_F_PREV_PRICE] = open_vol, open_price, prev
    bf[_F_S1], bf[_F_C1], bf[_F_S2], bf[_F_C2], bf[_F_LAST_DP] = s1, c1, s2, c2, last_dp
    bf[_F_SHIFT] = shift
    return m


LIVE_COLUMNS = (("symbol_id", np.uint32), ("kind", np.uint8), ("ts_ns", np.int64),
                ("price", np.float64), ("size", np.float64), ("vpin", np.float64),
                ("vpin_cdf", np.float64), ("toxic", np.uint8))
"""The slab columns :func:`vpin_rows_small` reads and writes, in its table's order."""


@njit(cache=True, nogil=True)
def vpin_rows_small(n, key, slab, bar_ns, state):
    """The live path: rows ``[0, n)`` of a slab (``slab``: the address table of its
    ``LIVE_COLUMNS``, :mod:`.addresses`), all of symbol ``key``, whose trades all join
    the open bar (no bar closes, so no bucket can complete): add them to the bar in place
    (the bar scan's own additions, in order) and give every row the carried values.
    ``state`` is the :class:`~.addresses.ArrayTable` of the symbol's ``bar_i`` (int64),
    ``bar_f`` (float64) and carried ``[vpin, cdf, toxic]`` (float64).

    Returns False, having changed nothing, for a batch it does not cover (another symbol,
    no open bar, a trade opening a new bar, ``bar_ns = 0``, a bad size or price): the
    batch path runs it (and raises for bad values).
    """
    bi, bf = array1d(state, 0, np.int64), array1d(state, 1, np.float64)
    carry = array1d(state, 2, np.float64)
    if bar_ns == 0 or bi[_I_OPEN] != 1:
        return False
    sym, kind, ts = column(slab, 0, np.uint32), column(slab, 1, np.uint8), column(slab, 2, np.int64)
    price, size = column(slab, 3, np.float64), column(slab, 4, np.float64)
    o_vpin, o_cdf, o_toxic = column(slab, 5, np.float64), column(slab, 6, np.float64), column(slab, 7, np.uint8)
    open_id = bi[_I_OPEN_ID]
    for i in range(n):
        if sym[i] != key:
            return False
        if kind[i] == KIND_TRADE:
            if not (size[i] >= 0.0 and math.isfinite(size[i]) and math.isfinite(price[i])):
                return False
            if ts[i] // bar_ns > open_id:
                return False
    open_vol, open_price, open_ts = bf[_F_OPEN_VOL], bf[_F_OPEN_PRICE], bi[_I_OPEN_TS]
    for i in range(n):
        if kind[i] == KIND_TRADE:
            open_vol += size[i]
            open_price = price[i]
            open_ts = ts[i]
        o_vpin[i] = carry[0]
        o_cdf[i] = carry[1]
        o_toxic[i] = np.uint8(carry[2])
    bf[_F_OPEN_VOL], bf[_F_OPEN_PRICE], bi[_I_OPEN_TS] = open_vol, open_price, open_ts
    return True


@njit(cache=True, nogil=True)
def _ecdf_counts(hist_sorted, new):
    """For each new value: how many of history + new values up to it are <= it."""
    m = new.shape[0]
    order = np.argsort(new, kind="mergesort")
    sorted_new = new[order]
    rank = np.empty(m, dtype=np.int64)
    for r in range(m):
        rank[order[r]] = r
    tree = np.zeros(m + 1, dtype=np.int64)
    out = np.empty(m, dtype=np.int64)
    for t in range(m):
        i = rank[t] + 1
        while i <= m:
            tree[i] += 1
            i += i & (-i)
        i = np.searchsorted(sorted_new, new[t], side="right")
        c = 0
        while i > 0:
            c += tree[i]
            i -= i & (-i)
        out[t] = c + np.searchsorted(hist_sorted, new[t], side="right")
    return out


@njit(cache=True, nogil=True)
def _bucket_sums(cum, f, done_bar, j0, V, partial):
    """Buy volume of the buckets completing in bars ``done_bar``, plus the open bucket's.

    Adds each bar's pieces in bar order, as the definition's loop does, so the sums are
    the loop's to the last bit: bucket ``j0 + t`` gets ``f·((j+1)·V − max(C_{k−1}, j·V))``
    in its completing bar ``k = done_bar[t]``; every bar adds ``f·(C_k − max(C_{k−1}, J·V))``
    to the bucket J still open after it.
    """
    nq = done_bar.shape[0]
    buy = np.empty(nq)
    acc = partial
    t = 0
    for k in range(f.shape[0]):
        lo = cum[k]
        hi = cum[k + 1]
        while t < nq and done_bar[t] == k:
            j = j0 + t
            acc += f[k] * ((j + 1) * V - max(lo, j * V))
            buy[t] = acc
            acc = 0.0
            t += 1
        jl = (j0 + t) * V
        if hi > jl:
            acc += f[k] * (hi - max(lo, jl))
    return buy, acc


def _empty_output() -> dict[str, np.ndarray]:
    return {
        "bucket": np.zeros(0, dtype=np.int64),
        "ts_ns": np.zeros(0, dtype=np.int64),
        "buy_volume": np.zeros(0),
        "sell_volume": np.zeros(0),
        "vpin": np.zeros(0),
        "cdf": np.zeros(0),
        "toxic": np.zeros(0, dtype=bool),
        "row": np.zeros(0, dtype=np.int64),
    }


def _buckets(
    state: VpinState, bar_ts: np.ndarray, vol: np.ndarray, f: np.ndarray, bar_row: np.ndarray | None
) -> tuple[VpinState, dict[str, np.ndarray]]:
    """Fill volume buckets from closed bars and compute VPIN per completed bucket."""
    p = state.params
    V = p.bucket_volume
    j0 = state.bucket
    cum = np.cumsum(np.concatenate(([state.cum_volume], vol)))
    hi = cum[1:]
    c_end = float(cum[-1])
    total = max(int(c_end // V), j0)  # buckets complete after these bars, adjusted exactly below
    while (total + 1) * V <= c_end:
        total += 1
    while total > j0 and total * V > c_end:
        total -= 1
    q = np.arange(j0, total, dtype=np.int64)
    upper = (q + 1).astype(np.float64) * V
    done_bar = np.searchsorted(hi, upper, side="left")
    buy, new_partial = _bucket_sums(cum, f, done_bar, j0, V, state.buy_partial)
    row = done_bar.astype(np.int64) if bar_row is None else bar_row[done_bar]
    return _vpin_outputs(state, q, bar_ts[done_bar], buy, row, c_end, new_partial)


def _vpin_outputs(
    state: VpinState,
    q: np.ndarray,
    bucket_ts: np.ndarray,
    buy: np.ndarray,
    row: np.ndarray,
    c_end: float,
    new_partial: float,
) -> tuple[VpinState, dict[str, np.ndarray]]:
    """VPIN, CDF and flag of the buckets ``q`` just completed, and the bucket part of the state."""
    p = state.params
    V = p.bucket_volume
    n_done = buy.shape[0]
    out = _empty_output()
    oi_tail = state.oi_tail
    vpin_sorted = state.vpin_sorted
    if n_done:
        n = p.window
        oi = np.abs(2.0 * buy - V)
        ext = np.concatenate((oi_tail, oi))
        vpin = np.full(n_done, np.nan)
        if ext.shape[0] >= n:
            win = np.lib.stride_tricks.sliding_window_view(ext, n)
            s = win[:, 0].copy()
            for c in range(1, n):
                s += win[:, c]
            vpin[n_done - win.shape[0] :] = s / (n * V)
        oi_tail = ext[max(ext.shape[0] - (n - 1), 0) :]
        cdf = np.full(n_done, np.nan)
        defined = ~np.isnan(vpin)
        if defined.any():
            new_v = vpin[defined]
            counts = _ecdf_counts(vpin_sorted, new_v)
            seen = vpin_sorted.shape[0] + np.arange(1, new_v.shape[0] + 1)
            cdf[defined] = counts / seen
            sv = np.sort(new_v)
            vpin_sorted = np.insert(vpin_sorted, np.searchsorted(vpin_sorted, sv, side="right"), sv)
        out = {
            "bucket": q,
            "ts_ns": bucket_ts,
            "buy_volume": buy,
            "sell_volume": V - buy,
            "vpin": vpin,
            "cdf": cdf,
            "toxic": cdf > p.threshold,
            "row": row,
        }
    new = replace(
        state,
        cum_volume=c_end,
        bucket=int(q[-1]) + 1 if n_done else state.bucket,
        buy_partial=new_partial,
        oi_tail=oi_tail.copy(),
        vpin_sorted=vpin_sorted,
    )
    return new, out


def _run(
    state: VpinState, ts: np.ndarray, price: np.ndarray, size: np.ndarray, flush: bool
) -> tuple[VpinState, dict[str, np.ndarray]]:
    bi, bf, ring = state.bar_i.copy(), state.bar_f.copy(), state.ring.copy()
    n = ts.shape[0]
    bar_ns = state.params.bar_ns
    if bar_ns == 0:
        o_ts, o_vol, o_f, o_row = ts, size, np.empty(n), None
    else:
        o_ts, o_vol, o_f = np.empty(n + 1, dtype=np.int64), np.empty(n + 1), np.empty(n + 1)
        o_row = np.empty(n + 1, dtype=np.int64)
    dummy_row = np.empty(0, dtype=np.int64)
    m = _bar_scan(
        ts,
        price,
        size,
        bar_ns,
        bi,
        bf,
        ring,
        flush,
        o_ts,
        o_vol,
        o_f,
        dummy_row if o_row is None else o_row,
    )
    # positional, not dataclasses.replace: this runs per batch, one row per batch live
    state = VpinState(state.params, bi, bf, ring, state.cum_volume, state.bucket,
                      state.buy_partial, state.oi_tail, state.vpin_sorted)
    if m == 0:
        return state, _empty_output()
    return _buckets(state, o_ts[:m], o_vol[:m], o_f[:m], None if o_row is None else o_row[:m])


def vpin_update(
    state: VpinState, ts_ns: np.ndarray, price: np.ndarray, size: np.ndarray
) -> tuple[VpinState, dict[str, np.ndarray]]:
    """Feed one symbol's trades (stream order); returns the new state and the buckets completed.

    ``ts_ns`` int64 ns, ``price`` float64, ``size`` float64 ≥ 0 (base units). The output
    dict has the keys ``VPIN_OUTPUT_FIELDS``, one entry per bucket completed by the bars
    this batch closed (possibly none). ``state`` is not modified. Call :func:`vpin_flush`
    at the end of the stream to close the last bar.
    """
    ts = np.ascontiguousarray(ts_ns, dtype=np.int64)
    p = np.ascontiguousarray(price, dtype=np.float64)
    v = np.ascontiguousarray(size, dtype=np.float64)
    if not (ts.shape == p.shape == v.shape and ts.ndim == 1):
        raise DataError(
            f"vpin_update: ts_ns, price, size must be 1-D of one length, got {ts.shape}, {p.shape}, {v.shape}"
        )
    if ts.shape[0] == 0:
        return state, _empty_output()
    # NaN or ±inf anywhere makes a sum non-finite or the min not >= 0: three reductions, no temporaries
    if not (v.min() >= 0.0 and math.isfinite(float(v.sum()) + float(p.sum()))):
        raise DataError(
            "vpin_update: sizes must be finite and >= 0 and prices finite; drop or fix such trades before VPIN"
        )
    return _run(state, ts, p, v, flush=False)


def vpin_flush(state: VpinState) -> tuple[VpinState, dict[str, np.ndarray]]:
    """End of stream: close the open bar (if any) and return the buckets it completes."""
    empty_i = np.zeros(0, dtype=np.int64)
    empty_f = np.zeros(0)
    return _run(state, empty_i, empty_f, empty_f, flush=True)


def vpin_update_rows(
    states: Mapping[int, VpinState],
    symbol_id: np.ndarray,
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    kind: np.ndarray | None = None,
) -> tuple[dict[int, VpinState], dict[int, dict[str, np.ndarray]]]:
    """VPIN for a batch holding several symbols; quote rows (``kind`` 1) are skipped.

    Every symbol in the batch needs a state in ``states`` (its bucket volume is its own:
    create it with :func:`new_vpin_state`). Returns the new states and, per symbol with
    completed buckets, its output dict; ``row`` there indexes the *batch* given here.
    ``states`` is not modified.
    """
    sym = np.asarray(symbol_id)
    new_states = dict(states)
    outputs: dict[int, dict[str, np.ndarray]] = {}
    keep = None if kind is None else np.asarray(kind) == KIND_TRADE
    for key, rows in symbol_groups(sym):
        if keep is not None:
            rows = rows[keep[rows]]
            if rows.size == 0:
                continue
        if key not in new_states:
            raise ConfigError(
                f"VPIN: no state for symbol_id {key}; create one with new_vpin_state(bucket_volume) "
                f"(e.g. propose_bucket_volume of a calibration day) before feeding its trades"
            )
        new_states[key], out = vpin_update(new_states[key], ts_ns[rows], price[rows], size[rows])
        if out["bucket"].size:
            out["row"] = rows[out["row"]]
            outputs[key] = out
    return new_states, outputs


def _window_chronological(state: VpinState) -> np.ndarray:
    """The dP values in the sigma window, oldest first."""
    count, pos = int(state.bar_i[_I_COUNT]), int(state.bar_i[_I_POS])
    ring = state.ring
    return (
        np.concatenate((ring[pos:count], ring[:pos]))
        if count == ring.shape[0]
        else ring[:count].copy()
    )


def vpin_update_torch(
    state: VpinState,
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    *,
    device: str = "cuda",
    chunk: int = 1 << 18,
) -> tuple[VpinState, dict[str, np.ndarray]]:
    """The VPIN kernel on a torch device (CUDA, or CPU for checking), ``bar_ns = 0`` only.

    Same definition, same state and same outputs as :func:`vpin_update`, so a stream may
    switch between the two from one batch to the next. Per trade the window's sigma is a
    two-pass standard deviation over the (trades × ``sigma_window``) matrix of windows, in
    chunks of ``chunk`` trades; the cumulative volume is a parallel ``cumsum`` and each
    bucket's pieces are summed as one row of a padded matrix (a difference of running sums
    when that matrix would pass 2^25 entries). The CPU kernel's cumulative volume is a
    sequential float64 sum across all batches, this one restarts the running sum at each
    batch (``C0 + cumsum``): the two differ by the rounding of C itself, up to ~√N·eps·C
    after N trades (1e-10 of V after 3,000 buckets of the real BTCUSDT file), where the
    CPU kernel is bit-exact against the loop reference. A bucket edge that falls within
    that rounding of a trade's cumulative volume may complete one trade apart. Worth it only for
    large batches: see ``scripts/bench_kernels.py --vpin-device``. With time bars there are
    few bars per batch and the CPU kernel is the one to use.
    """
    import torch

    prm = state.params
    if prm.bar_ns != 0:
        raise ConfigError(
            "vpin_update_torch: the GPU variant handles bar_ns = 0 (one bar per trade); with "
            f"bar_ns = {prm.bar_ns} use vpin_update, time bars leave little to parallelise"
        )
    ts = np.ascontiguousarray(ts_ns, dtype=np.int64)
    p_np = np.ascontiguousarray(price, dtype=np.float64)
    v_np = np.ascontiguousarray(size, dtype=np.float64)
    n = ts.shape[0]
    if n == 0:
        return state, _empty_output()
    if not (p_np.shape == v_np.shape == ts.shape):
        raise DataError("vpin_update_torch: ts_ns, price, size must be 1-D of one length")
    dev = torch.device(device)
    f64 = torch.float64
    pr = torch.as_tensor(p_np, device=dev)
    sz = torch.as_tensor(v_np, device=dev)
    if not (bool(sz.min() >= 0.0) and bool(torch.isfinite(sz.sum() + pr.sum()))):
        raise DataError("vpin_update_torch: sizes must be finite and >= 0 and prices finite")
    w = prm.sigma_window
    have_prev = bool(state.bar_i[_I_HAVE_PREV])
    count0 = int(state.bar_i[_I_COUNT])
    hist = _window_chronological(state)[-(w - 1) :] if w > 1 else np.zeros(0)

    # dP of every trade but a symbol's very first
    if have_prev:
        prev = torch.cat(
            (torch.tensor([state.bar_f[_F_PREV_PRICE]], dtype=f64, device=dev), pr[:-1])
        )
        dp = pr - prev
    else:
        dp = pr[1:] - pr[:-1]
    m = dp.shape[0]
    f = torch.full((n,), 0.5, dtype=f64, device=dev)
    if m:
        pad = torch.full((w - 1 - hist.shape[0],), float("nan"), dtype=f64, device=dev)
        vals = torch.cat((pad, torch.as_tensor(hist, device=dev), dp))
        fd = torch.empty(m, dtype=f64, device=dev)
        for lo in range(0, m, chunk):
            hi = min(m, lo + chunk)
            win = vals[lo : hi + w - 1].unfold(0, w, 1)  # (hi − lo, w), NaN = no value yet
            valid = ~torch.isnan(win)
            cnt = valid.sum(dim=1).to(f64)
            x = torch.where(valid, win, 0.0)
            mean = x.sum(dim=1) / cnt
            dev2 = torch.where(valid, win - mean[:, None], 0.0)
            var = (dev2 * dev2).sum(dim=1) / (cnt - 1.0)
            big = torch.where(valid, win, -torch.inf).amax(dim=1)
            small = torch.where(valid, win, torch.inf).amin(dim=1)
            d = dp[lo:hi]
            ok = (cnt >= 2) & (big != small) & (d != 0.0) & (var > 0.0)
            z = d / torch.sqrt(torch.where(ok, var, 1.0))
            fd[lo:hi] = torch.where(ok, 0.5 * torch.special.erfc(-z / _SQRT2), 0.5)
        f[n - m :] = fd

    V = prm.bucket_volume
    j0 = state.bucket
    cum = state.cum_volume + torch.cumsum(sz, dim=0)
    lo_c = torch.cat((torch.tensor([state.cum_volume], dtype=f64, device=dev), cum[:-1]))
    c_end = float(cum[-1])
    total = max(int(c_end // V), j0)
    while (total + 1) * V <= c_end:
        total += 1
    while total > j0 and total * V > c_end:
        total -= 1
    q = torch.arange(j0, total, dtype=torch.int64, device=dev)
    upper = (q + 1).to(f64) * V
    done_bar = torch.searchsorted(cum, upper, side="left")
    # bucket still open after each trade, and each trade's tail piece into it
    j_after = torch.searchsorted(done_bar, torch.arange(n, device=dev), side="right")
    lower = (j_after + j0).to(f64) * V
    tail = f * (cum - torch.maximum(lo_c, lower))
    done_w = f[done_bar] * (upper - torch.maximum(lo_c[done_bar], q.to(f64) * V))
    # bucket b (relative) gets the tails of trades done_bar[b−1] ≤ k < done_bar[b], a
    # contiguous run: each run is summed on its own (gathered into a padded matrix), not as
    # a difference of the batch's running sum, whose rounding grows with the batch
    starts = torch.cat((torch.zeros(1, dtype=torch.int64, device=dev), done_bar))
    ends = torch.cat((done_bar, torch.tensor([n], dtype=torch.int64, device=dev)))
    longest = int((ends - starts).max())
    if starts.shape[0] * longest <= 1 << 25:
        idx = starts[:, None] + torch.arange(longest, device=dev)[None, :]
        inside = idx < ends[:, None]
        buy_all = torch.where(
            inside, tail[torch.minimum(idx, torch.tensor(n - 1, device=dev))], 0.0
        ).sum(dim=1)
    else:
        ctail = torch.cat((torch.zeros(1, dtype=f64, device=dev), torch.cumsum(tail, dim=0)))
        buy_all = ctail[ends] - ctail[starts]
    buy_all[0] += state.buy_partial
    buy_all[:-1] += done_w
    buy = buy_all[:-1].cpu().numpy()
    new_partial = float(buy_all[-1])

    # the dP window and running sums the CPU kernel continues from
    all_dp = np.concatenate((hist, dp[-w:].cpu().numpy()))[-w:] if m else hist
    count = min(count0 + m, w)
    window = all_dp[-count:] if count else all_dp[:0]
    bi, bf = state.bar_i.copy(), state.bar_f.copy()
    ring = np.zeros(w)
    ring[:count] = window
    bi[_I_HAVE_PREV] = 1
    bi[_I_COUNT] = count
    bi[_I_POS] = count % w
    if count:
        eq = window == window[-1]
        run = count if eq.all() else count - 1 - int(np.flatnonzero(~eq)[-1])
        bi[_I_RUN] = run
        bf[_F_LAST_DP] = window[-1]
        s1, c1, s2, c2, shift = _recentre(ring, count, 0.0)
        bf[_F_S1], bf[_F_C1], bf[_F_S2], bf[_F_C2], bf[_F_SHIFT] = s1, c1, s2, c2, shift
    bf[_F_PREV_PRICE] = p_np[-1]
    state = replace(state, bar_i=bi, bar_f=bf, ring=ring)
    db = done_bar.cpu().numpy()
    return _vpin_outputs(
        state, q.cpu().numpy(), ts[db], buy, db.astype(np.int64), c_end, new_partial
    )
