"""Per-trade features: the default feature vector the model consumes, stateful per symbol.

Every feature is a pure function of the trades of one symbol so far; the state carried
between batches (:class:`FeatureState`) makes the output independent of how the stream is
split into batches, bit for bit, because each recurrence runs in the same floating-point
order whether it sees one tick or 4096 at a time.

Default feature set (``FEATURE_NAMES``), one row per trade, float64, in this order. ``h``
is a half-life counted in trades; an EWMA with half-life ``h`` is
``y_t = a·y_{t−1} + (1 − a)·x_t`` with ``a = 0.5 ** (1 / h)`` and ``y_{−1} = 0``:

- ``log_return``: ``r_t = log(p_t / p_{t−1})`` (dimensionless). The first trade of a
  symbol has ``r = 0`` (no previous price; 0 rather than NaN so that the EWMAs are defined
  from the first trade on).
- ``ret_ewma_{h}``: EWMA of ``r`` (dimensionless, per trade).
- ``vol_ewma_{h}``: ``sqrt(EWMA of r²)``, volatility per trade (dimensionless).
- ``imbalance_{h}``: ``EWMA(side·size) / EWMA(size)``, trade-flow imbalance in [−1, 1];
  ``side`` is the aggressor (+1/−1, 0 unknown counts in the volume only). NaN while the
  EWMA of size is 0 (only zero-size trades so far).
- ``dt_ewma_{h}``: EWMA of the inter-arrival time in seconds (trade intensity is its
  reciprocal). The first trade has inter-arrival 0; out-of-order timestamps give 0, not a
  negative time.
- ``rsi_{n}``: Wilder's RSI on trade prices, in [0, 100]. Changes ``d_t = p_t − p_{t−1}``
  from the second trade on, gain ``max(d, 0)``, loss ``max(−d, 0)``; the averages are
  seeded with the simple mean of the first ``n`` changes, then
  ``avg_t = (1/n)·x_t + (1 − 1/n)·avg_{t−1}``. ``RSI = 100·G / (G + L)``; 50 when
  ``G + L = 0`` (no price movement); NaN until ``n`` changes exist.
- ``vwap_dist_{h}``: ``log(p_t / VWAP_t)`` with ``VWAP = EWMA(p·size) / EWMA(size)``
  (dimensionless; NaN while the EWMA of size is 0).

Quote features (``QUOTE_FEATURE_NAMES``, from top of book, :func:`quote_features`):
``spread = ask − bid`` (price units), ``micro_minus_mid = microprice − mid`` with
``microprice = (bid·ask_size + ask·bid_size) / (bid_size + ask_size)`` (price units), and
``book_imbalance = (bid_size − ask_size) / (bid_size + ask_size)`` in [−1, 1].

Mixed batches (:func:`features_update_rows`): rows of several symbols and of both kinds.
Each row gets the full vector ``ALL_FEATURE_NAMES`` *as of* that row: a trade row gets its
trade features and its symbol's latest quote features; a quote row gets its own quote
features and the symbol's latest trade features (NaN before the first of either). No value
looks ahead.

Design: one numba loop over the rows of a batch (``_feature_rows``), with every symbol's
state as one row of a state table (:class:`FeatureTable`) and the GIL released, so that
the stage can run beside the others. Each recurrence is the loop of its definition,
``y = (1 − a)·x + a·y_prev``, so the result does not depend on the batch split, to the bit.
The first version ran the EWMAs through ``scipy.signal.lfilter`` per symbol and per
half-life: 1.11 ms per 4096 rows and 132 µs for a single row (issue 9's profile), most of
it fixed cost per call, which a live pipeline pays on every tick. Measured now by
``scripts/bench_kernels.py`` (``features`` rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..errors import ConfigError, DataError
from ..events import KIND_TRADE
from .addresses import ArrayTable, array1d, array2d, column, column2d, entry_point

__all__ = [
    "ALL_FEATURE_NAMES",
    "DEFAULT_FEATURE_CONFIG",
    "FEATURE_NAMES",
    "QUOTE_FEATURE_NAMES",
    "FeatureConfig",
    "FeatureState",
    "FeatureTable",
    "all_feature_names",
    "feature_names",
    "features_update",
    "features_update_rows",
    "new_feature_state",
    "quote_features",
]

F64 = np.float64


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """Parameters that fix the feature vector's width, order and meaning (counts in trades)."""

    half_lives: tuple[int, ...] = (10, 100, 1000)
    intensity_half_life: int = 100
    vwap_half_life: int = 100
    rsi_period: int = 14

    def __post_init__(self) -> None:
        hls = (*self.half_lives, self.intensity_half_life, self.vwap_half_life)
        if not self.half_lives or any(h <= 0 for h in hls):
            raise ConfigError(
                f"FeatureConfig: half-lives must be positive trade counts, got {self}"
            )
        if self.rsi_period < 1:
            raise ConfigError(f"FeatureConfig: rsi_period must be >= 1, got {self.rsi_period}")


DEFAULT_FEATURE_CONFIG = FeatureConfig()


def feature_names(config: FeatureConfig = DEFAULT_FEATURE_CONFIG) -> tuple[str, ...]:
    """Names of the trade-feature columns, in output order, for ``config``."""
    hl = config.half_lives
    return (
        "log_return",
        *(f"ret_ewma_{h}" for h in hl),
        *(f"vol_ewma_{h}" for h in hl),
        *(f"imbalance_{h}" for h in hl),
        f"dt_ewma_{config.intensity_half_life}",
        f"rsi_{config.rsi_period}",
        f"vwap_dist_{config.vwap_half_life}",
    )


QUOTE_FEATURE_NAMES: tuple[str, ...] = ("spread", "micro_minus_mid", "book_imbalance")


def all_feature_names(config: FeatureConfig = DEFAULT_FEATURE_CONFIG) -> tuple[str, ...]:
    """Trade features then quote features: the columns of :func:`features_update_rows`."""
    return feature_names(config) + QUOTE_FEATURE_NAMES


FEATURE_NAMES: tuple[str, ...] = feature_names(DEFAULT_FEATURE_CONFIG)
ALL_FEATURE_NAMES: tuple[str, ...] = all_feature_names(DEFAULT_FEATURE_CONFIG)


def _decay(half_life: int) -> float:
    return 0.5 ** (1.0 / half_life)


@dataclass(frozen=True, slots=True)
class FeatureState:
    """Everything one symbol's features need from the past. Immutable; updates return a new one.

    ``ewma`` holds the last output of every EWMA: per half-life ``[r, r², side·size, size]``,
    then ``[dt, p·size, size]`` for intensity and VWAP. ``last_trade``/``last_quote`` are the
    latest output rows, used to fill mixed batches as of each row.
    """

    config: FeatureConfig
    n_trades: int = 0
    last_price: float = float("nan")
    last_ts_ns: int = 0
    ewma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rsi_changes: int = 0
    rsi_sum_gain: float = 0.0
    rsi_sum_loss: float = 0.0
    rsi_avg_gain: float = 0.0
    rsi_avg_loss: float = 0.0
    last_trade: np.ndarray = field(default_factory=lambda: np.zeros(0))
    last_quote: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))


def new_feature_state(config: FeatureConfig = DEFAULT_FEATURE_CONFIG) -> FeatureState:
    """The state of a symbol that has seen no trade yet."""
    return FeatureState(
        config=config,
        ewma=np.zeros(4 * len(config.half_lives) + 3),
        last_trade=np.full(len(feature_names(config)), np.nan),
    )


class _Layout:
    """Where each value lives in a row of the state tables, for one configuration."""

    def __init__(self, config: FeatureConfig):
        h = len(config.half_lives)
        self.kt = len(feature_names(config))
        self.n_ewma = 4 * h + 3
        # float row: last_price, rsi sums (gain, loss), rsi averages (gain, loss), ewma, last
        # trade features, last quote features
        self.ewma = 5
        self.last_trade = self.ewma + self.n_ewma
        self.last_quote = self.last_trade + self.kt
        self.width = self.last_quote + 3
        self.decays = np.array([_decay(x) for x in config.half_lives])
        self.decay_dt = _decay(config.intensity_half_life)
        self.decay_vwap = _decay(config.vwap_half_life)


# int row: n_trades, last_ts_ns, rsi_changes
_I_TRADES, _I_TS, _I_RSI = 0, 1, 2


@njit(cache=True, nogil=True, error_model="numpy")
def _feature_rows(
    slot, kind, ts, price, size, side, bid, ask, bid_size, ask_size, has_quotes,
    fs, ist, decays, decay_dt, decay_vwap, rsi_n, out,
):
    """Features of every row, in row order, updating the state rows ``fs``/``ist`` in place.

    ``slot[i]`` is the state row of row i's symbol. Returns −1, or the index of the first
    trade row with a price that is not finite and > 0 or a size that is not finite and ≥ 0
    (then nothing is computed: the caller raises).
    """
    n = slot.shape[0]
    for i in range(n):
        if kind[i] == 0:
            p = price[i]
            v = size[i]
            if not (p > 0.0 and v >= 0.0 and p < np.inf and v < np.inf):
                return i
    h = decays.shape[0]
    kt = 3 * h + 4
    ew = 5
    lt = ew + 4 * h + 3
    lq = lt + kt
    inv_n = 1.0 / rsi_n
    rsi_decay = 1.0 - 1.0 / rsi_n
    for i in range(n):
        k = slot[i]
        if kind[i] != 0:
            if has_quotes:
                b = bid[i]
                a = ask[i]
                bs = bid_size[i]
                az = ask_size[i]
                depth = bs + az
                fs[k, lq] = a - b
                fs[k, lq + 1] = (b * az + a * bs) / depth - (b + a) / 2.0
                fs[k, lq + 2] = (bs - az) / depth
            for j in range(kt):
                out[i, j] = fs[k, lt + j]
            for j in range(3):
                out[i, kt + j] = fs[k, lq + j]
            continue
        p = price[i]
        v = size[i]
        sv = side[i] * v
        t = ts[i]
        first = ist[k, _I_TRADES] == 0
        if first:
            r = 0.0
            dt = 0.0
            d = 0.0
        else:
            p_prev = fs[k, 0]
            r = np.log(p / p_prev)
            dt = max(t - ist[k, _I_TS], 0) / 1e9
            d = p - p_prev
        out[i, 0] = r
        for j in range(h):
            a = decays[j]
            c = 1.0 - a
            base = ew + 4 * j
            y_r = c * r + a * fs[k, base]
            y_r2 = c * (r * r) + a * fs[k, base + 1]
            y_sv = c * sv + a * fs[k, base + 2]
            y_v = c * v + a * fs[k, base + 3]
            fs[k, base] = y_r
            fs[k, base + 1] = y_r2
            fs[k, base + 2] = y_sv
            fs[k, base + 3] = y_v
            out[i, 1 + j] = y_r
            out[i, 1 + h + j] = np.sqrt(y_r2)
            out[i, 1 + 2 * h + j] = y_sv / y_v
        base = ew + 4 * h
        y_dt = (1.0 - decay_dt) * dt + decay_dt * fs[k, base]
        y_pv = (1.0 - decay_vwap) * (p * v) + decay_vwap * fs[k, base + 1]
        y_vv = (1.0 - decay_vwap) * v + decay_vwap * fs[k, base + 2]
        fs[k, base] = y_dt
        fs[k, base + 1] = y_pv
        fs[k, base + 2] = y_vv
        out[i, 1 + 3 * h] = y_dt
        # RSI (Wilder): seeded by the mean of the first n changes, then recursive
        rsi = np.nan
        if not first:
            gain = max(d, 0.0)
            loss = max(-d, 0.0)
            count = ist[k, _I_RSI] + 1
            ist[k, _I_RSI] = count
            if count <= rsi_n:
                fs[k, 1] = fs[k, 1] + gain
                fs[k, 2] = fs[k, 2] + loss
                if count == rsi_n:
                    fs[k, 3] = fs[k, 1] / rsi_n
                    fs[k, 4] = fs[k, 2] / rsi_n
                    rsi = _rsi_value(fs[k, 3], fs[k, 4])
            else:
                fs[k, 3] = inv_n * gain + rsi_decay * fs[k, 3]
                fs[k, 4] = inv_n * loss + rsi_decay * fs[k, 4]
                rsi = _rsi_value(fs[k, 3], fs[k, 4])
        out[i, 2 + 3 * h] = rsi
        out[i, 3 + 3 * h] = np.log(p / (y_pv / y_vv))
        fs[k, 0] = p
        ist[k, _I_TRADES] += 1
        ist[k, _I_TS] = t
        for j in range(kt):
            fs[k, lt + j] = out[i, j]
        for j in range(3):
            out[i, kt + j] = fs[k, lq + j]
    return -1


@njit(cache=True, nogil=True, inline="always")
def _rsi_value(avg_gain, avg_loss):
    total = avg_gain + avg_loss
    if total > 0.0:
        return 100.0 * avg_gain / total
    return 50.0


_NO_QUOTES = np.full(1, np.nan)


LIVE_COLUMNS = (("symbol_id", np.uint32), ("kind", np.uint8), ("ts_ns", np.int64),
                ("price", np.float64), ("size", np.float64), ("side", np.int8),
                ("bid", np.float64), ("ask", np.float64), ("bid_size", np.float64),
                ("ask_size", np.float64))
"""The slab columns :func:`_feature_rows_small` reads, in its table's order (then the
destination column, float64 [rows, len(index)]; see :mod:`.addresses`)."""


@njit(cache=True, nogil=True)
def _feature_rows_small(n, slab, state, rsi_n):
    """The live path of :meth:`FeatureTable.update_small`: rows ``[0, n)`` of the slab whose
    address table is ``slab`` (``LIVE_COLUMNS``, then the destination), the state rows
    advanced in place by the batch path's own :func:`_feature_rows` (which checks every
    row before it changes anything), the chosen columns (``index``) into the destination.
    ``state`` is the :class:`~.addresses.ArrayTable` of ``fs``, ``ist``, ``seen``,
    ``consts`` (the EWMA decays, then the inter-arrival's and the VWAP's), ``out`` (scratch
    of full width) and ``index``. Returns −2 (nothing done) for a symbol beyond the table,
    else ``_feature_rows``'s answer."""
    fs, ist = array2d(state, 0, np.float64), array2d(state, 1, np.int64)
    seen, consts = array1d(state, 2, np.bool_), array1d(state, 3, np.float64)
    out, index = array2d(state, 4, np.float64), array1d(state, 5, np.int64)
    sym = column(slab, 0, np.uint32)
    rows = fs.shape[0]
    for i in range(n):
        if sym[i] >= rows:
            return -2
    h = consts.shape[0] - 2
    bad = _feature_rows(sym[:n], column(slab, 1, np.uint8)[:n], column(slab, 2, np.int64)[:n],
                        column(slab, 3, np.float64)[:n], column(slab, 4, np.float64)[:n],
                        column(slab, 5, np.int8)[:n], column(slab, 6, np.float64)[:n],
                        column(slab, 7, np.float64)[:n], column(slab, 8, np.float64)[:n],
                        column(slab, 9, np.float64)[:n], True, fs, ist, consts[:h], consts[h],
                        consts[h + 1], rsi_n, out[:n])
    if bad >= 0:
        return bad
    dest = column2d(slab, 10, index.shape[0], np.float64)
    for i in range(n):
        seen[sym[i]] = True
        for c in range(index.shape[0]):
            dest[i, c] = out[i, index[c]]
    return -1


class FeatureTable:
    """The feature state of every symbol as rows of two arrays, for the numba kernel.

    The streaming stage keeps one table for the run (no per-batch allocation: the kernel
    updates a scratch copy, which becomes the state only when the batch succeeded, so a
    batch rerun on the fallback stream starts from the same state). Rows are indexed by
    ``symbol_id`` and grow (doubling) when a larger id appears.
    """

    def __init__(self, config: FeatureConfig = DEFAULT_FEATURE_CONFIG, symbols: int = 8):
        self.config = config
        self.layout = _Layout(config)
        self.fs = self._new_f(symbols)
        self.ist = np.zeros((symbols, 3), dtype=np.int64)
        self.seen = np.zeros(symbols, dtype=bool)
        self._fs_scratch = self.fs.copy()
        self._ist_scratch = self.ist.copy()
        lay = self.layout
        self._live_consts = np.array([*lay.decays, lay.decay_dt, lay.decay_vwap])
        self._live: tuple | None = None  # update_small's state table, its out, its entry

    @property
    def fs(self) -> np.ndarray:
        """The float64 state rows [symbols, width] (last price, RSI sums, EWMAs, last trade
        and quote). Rebinding it (or ``ist``, ``seen``) drops the live path's state table."""
        return self._fs

    @fs.setter
    def fs(self, a: np.ndarray) -> None:
        self._fs, self._live = a, None

    @property
    def ist(self) -> np.ndarray:
        """The int64 state rows [symbols, 3]: trades, last time (ns), RSI changes."""
        return self._ist

    @ist.setter
    def ist(self, a: np.ndarray) -> None:
        self._ist, self._live = a, None

    @property
    def seen(self) -> np.ndarray:
        """Which symbol rows hold a state."""
        return self._seen

    @seen.setter
    def seen(self, a: np.ndarray) -> None:
        self._seen, self._live = a, None

    def _new_f(self, rows: int) -> np.ndarray:
        lay = self.layout
        fs = np.zeros((rows, lay.width))
        fs[:, 0] = np.nan
        fs[:, lay.last_trade :] = np.nan
        return fs

    def _ensure(self, top: int) -> None:
        rows = self.fs.shape[0]
        if top < rows:
            return
        while rows <= top:
            rows *= 2
        fs = self._new_f(rows)
        fs[: self.fs.shape[0]] = self.fs
        ist = np.zeros((rows, 3), dtype=np.int64)
        ist[: self.ist.shape[0]] = self.ist
        seen = np.zeros(rows, dtype=bool)
        seen[: self.seen.shape[0]] = self.seen
        self.fs, self.ist, self.seen = fs, ist, seen
        self._fs_scratch, self._ist_scratch = fs.copy(), ist.copy()

    @property
    def symbols(self) -> int:
        """Number of symbols seen so far."""
        return int(self.seen.sum())

    def update(
        self,
        symbol_id: np.ndarray,
        kind: np.ndarray,
        ts_ns: np.ndarray,
        price: np.ndarray,
        size: np.ndarray,
        side: np.ndarray,
        bid: np.ndarray | None,
        ask: np.ndarray | None,
        bid_size: np.ndarray | None,
        ask_size: np.ndarray | None,
        out: np.ndarray,
    ) -> None:
        """Write the features of every row into ``out`` [n, kt + 3] and advance the state."""
        n = symbol_id.shape[0]
        if n == 0:
            return
        # one row (live): a scalar read, not a reduction (~3 µs each on the dev VM)
        top = int(symbol_id[0]) if n == 1 else int(symbol_id.max())
        self._ensure(top)
        fs, ist = self._fs_scratch, self._ist_scratch
        np.copyto(fs, self.fs)
        np.copyto(ist, self.ist)
        has_quotes = bid is not None
        if not has_quotes:
            bid = ask = bid_size = ask_size = _NO_QUOTES
        lay = self.layout
        bad = _feature_rows(
            symbol_id, kind, ts_ns, price, size, side, bid, ask, bid_size, ask_size,
            has_quotes, fs, ist, lay.decays, lay.decay_dt, lay.decay_vwap,
            self.config.rsi_period, out,
        )
        if bad >= 0:
            raise DataError(
                f"features: trade row {bad} has price {float(price[bad])!r} and size "
                f"{float(size[bad])!r}; prices must be finite and > 0 (log returns) and sizes "
                "finite and >= 0; drop or fix such trades before the features stage"
            )
        self.fs, self._fs_scratch = fs, self.fs
        self.ist, self._ist_scratch = ist, self.ist
        if n == 1:
            self.seen[top] = True
        else:
            self.seen[symbol_id] = True

    def update_small(self, n: int, slab: np.ndarray, out: np.ndarray, index: np.ndarray) -> bool:
        """:meth:`update` for rows ``[0, n)`` of a slab, in one kernel call: ``slab`` is the
        address table of its ``LIVE_COLUMNS`` and destination column (which gets the
        ``index`` columns of the features), ``out`` full-width scratch. False (nothing
        changed) where :meth:`update` must run."""
        # in place: the kernel checks every row before it changes a value, and nothing
        # after it can fail, so the batch path's commit-by-swap has nothing to guard here
        live = self._live
        if live is None or live[1] is not out:
            live = self._live_table(slab, out, index)
        return live[2](n, slab, live[0], live[3]) == -1

    def _live_table(self, slab: np.ndarray, out: np.ndarray, index: np.ndarray) -> tuple:
        """The state as one table for :func:`_feature_rows_small` (rebuilt when a state
        array is rebound: after a batch-path update or a growth), with its entry point."""
        state = ArrayTable(((self._fs, np.float64), (self._ist, np.int64), (self._seen, np.bool_),
                            (self._live_consts, np.float64), (out, np.float64), (index, np.int64)))
        rsi_n = int(self.config.rsi_period)
        self._live = (state.table, out, entry_point(_feature_rows_small, 1, slab, state.table, rsi_n),
                      rsi_n, state)
        return self._live

    # --- conversion to and from the immutable per-symbol states ------------------------
    def load(self, key: int, state: FeatureState) -> None:
        """Put ``state`` in the row of symbol ``key``."""
        if state.config != self.config:
            raise ConfigError(
                f"features: state of symbol {key} has {state.config}, batch asks {self.config}"
            )
        self._ensure(key)
        lay = self.layout
        row = self.fs[key]
        row[0] = state.last_price
        row[1:5] = (state.rsi_sum_gain, state.rsi_sum_loss, state.rsi_avg_gain, state.rsi_avg_loss)
        row[lay.ewma : lay.last_trade] = state.ewma
        row[lay.last_trade : lay.last_quote] = state.last_trade
        row[lay.last_quote :] = state.last_quote
        self.ist[key] = (state.n_trades, state.last_ts_ns, state.rsi_changes)
        self.seen[key] = True

    def state(self, key: int) -> FeatureState:
        """The immutable state of symbol ``key`` (a copy)."""
        lay = self.layout
        row = self.fs[key]
        n_trades, last_ts, changes = (int(x) for x in self.ist[key])
        return FeatureState(
            config=self.config,
            n_trades=n_trades,
            last_price=float(row[0]),
            last_ts_ns=last_ts,
            ewma=row[lay.ewma : lay.last_trade].copy(),
            rsi_changes=changes,
            rsi_sum_gain=float(row[1]),
            rsi_sum_loss=float(row[2]),
            rsi_avg_gain=float(row[3]),
            rsi_avg_loss=float(row[4]),
            last_trade=row[lay.last_trade : lay.last_quote].copy(),
            last_quote=row[lay.last_quote :].copy(),
        )


def features_update(
    state: FeatureState,
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    side: np.ndarray,
) -> tuple[FeatureState, np.ndarray]:
    """Trade features for a batch of one symbol's trades, in stream order.

    Args: ``ts_ns`` int64 ns since the epoch, ``price`` float64 quote currency, ``size``
    float64 base units, ``side`` int8 aggressor (+1/−1/0). Returns the new state and
    ``out`` float64 of shape (n, len(feature_names(state.config))). ``state`` is not modified.
    """
    cfg = state.config
    ts = np.ascontiguousarray(ts_ns, dtype=np.int64)
    p = np.ascontiguousarray(price, dtype=F64)
    v = np.ascontiguousarray(size, dtype=F64)
    s = np.ascontiguousarray(side, dtype=np.int8)
    n = p.shape[0]
    kt = len(feature_names(cfg))
    if n == 0:
        return state, np.empty((0, kt))
    if not (ts.shape == p.shape == v.shape == s.shape and p.ndim == 1):
        raise DataError(
            f"features_update: ts_ns, price, size, side must be 1-D of one length, got "
            f"{ts.shape}, {p.shape}, {v.shape}, {s.shape}"
        )
    table = FeatureTable(cfg, symbols=1)
    table.load(0, state)
    out = np.empty((n, kt + 3))
    table.update(np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=np.uint8), ts, p, v, s,
                 None, None, None, None, out)
    return table.state(0), out[:, :kt].copy()


def quote_features(
    bid: np.ndarray, ask: np.ndarray, bid_size: np.ndarray, ask_size: np.ndarray
) -> np.ndarray:
    """Stateless top-of-book features, shape (n, 3), columns ``QUOTE_FEATURE_NAMES``.

    Prices in quote currency, sizes in base units. A crossed or empty book gives what the
    formulas give (negative spread, NaN where both sizes are 0); nothing is clipped.
    """
    b = np.asarray(bid, dtype=F64)
    a = np.asarray(ask, dtype=F64)
    bs = np.asarray(bid_size, dtype=F64)
    az = np.asarray(ask_size, dtype=F64)
    out = np.empty((b.shape[0], 3))
    depth = bs + az
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 0] = a - b
        out[:, 1] = (b * az + a * bs) / depth - (b + a) / 2.0
        out[:, 2] = (bs - az) / depth
    return out


def features_update_rows(
    states: Mapping[int, FeatureState],
    symbol_id: np.ndarray,
    kind: np.ndarray,
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    side: np.ndarray,
    bid: np.ndarray | None = None,
    ask: np.ndarray | None = None,
    bid_size: np.ndarray | None = None,
    ask_size: np.ndarray | None = None,
    *,
    config: FeatureConfig = DEFAULT_FEATURE_CONFIG,
) -> tuple[dict[int, FeatureState], np.ndarray]:
    """Features for a mixed batch (several symbols, trades and quotes), rows in input order.

    Each symbol sees its rows in stream order. ``kind`` is ``KIND_TRADE`` (0) or
    ``KIND_QUOTE`` (1); the quote columns may be None when the batch has no quotes. Returns
    a new ``{symbol_id: state}`` (symbols first seen here start from
    ``new_feature_state(config)``; ``states`` is not modified) and ``out`` of shape
    (n, len(all_feature_names(config))), each row complete as of that row. The streaming
    stage uses :class:`FeatureTable` directly, which keeps the states between batches.
    """
    sym = np.ascontiguousarray(symbol_id, dtype=np.int64)
    n = sym.shape[0]
    kt = len(feature_names(config))
    out = np.empty((n, kt + 3))
    new_states = dict(states)
    if n == 0:
        return new_states, out
    keys = np.unique(sym)
    table = FeatureTable(config, symbols=int(keys[-1]) + 1)
    for key in keys.tolist():
        if key in states:
            table.load(key, states[key])
    quotes = bid is not None and not (np.asarray(kind) == KIND_TRADE).all()
    col = np.ascontiguousarray
    table.update(
        sym, col(kind, dtype=np.uint8), col(ts_ns, dtype=np.int64), col(price, dtype=F64),
        col(size, dtype=F64), col(side, dtype=np.int8),
        col(bid, dtype=F64) if quotes else None, col(ask, dtype=F64) if quotes else None,
        col(bid_size, dtype=F64) if quotes else None, col(ask_size, dtype=F64) if quotes else None,
        out,
    )
    for key in keys.tolist():
        new_states[key] = table.state(key)
    return new_states, out
