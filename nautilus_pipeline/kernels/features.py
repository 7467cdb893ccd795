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

Design: the EWMAs run through ``scipy.signal.lfilter`` with the last output carried as the
filter state (``zi = a·y_last``), which evaluates exactly ``(1−a)·x + a·y`` per sample, the
same operations as a loop; several series sharing a half-life go through one call. A numba
loop over all features was the alternative; lfilter keeps this module free of JIT compile
time and is fast enough (see ``scripts/bench_kernels.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.signal import lfilter

from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.events import KIND_TRADE
from nautilus_pipeline.kernels.rows import ffill_rows, symbol_groups

__all__ = [
    "ALL_FEATURE_NAMES",
    "DEFAULT_FEATURE_CONFIG",
    "FEATURE_NAMES",
    "QUOTE_FEATURE_NAMES",
    "FeatureConfig",
    "FeatureState",
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


def _ewma(x: np.ndarray, decay: float, y_last: np.ndarray) -> np.ndarray:
    """EWMA along the last axis of ``x`` (k, n), continuing from ``y_last`` (k,)."""
    zi = (decay * y_last)[:, None]
    y, _ = lfilter([1.0 - decay], [1.0, -decay], x, axis=-1, zi=zi)
    return y


def _rsi(
    state: FeatureState, d: np.ndarray, has_change: np.ndarray
) -> tuple[np.ndarray, tuple[int, float, float, float, float]]:
    """RSI per row and the RSI part of the new state; ``d`` is the price change per row."""
    n = state.config.rsi_period
    out = np.full(d.shape[0], np.nan)
    gain = np.where(has_change, np.maximum(d, 0.0), 0.0)
    loss = np.where(has_change, np.maximum(-d, 0.0), 0.0)
    count = state.rsi_changes + np.cumsum(has_change)
    avg_gain, avg_loss = state.rsi_avg_gain, state.rsi_avg_loss
    sum_gain, sum_loss = state.rsi_sum_gain, state.rsi_sum_loss
    seed = has_change & (count <= n)
    if seed.any():
        # the seed sums run in stream order, like the loop: s = s + g
        sg = np.cumsum(np.concatenate(([sum_gain], gain[seed])))[1:]
        sl = np.cumsum(np.concatenate(([sum_loss], loss[seed])))[1:]
        sum_gain, sum_loss = float(sg[-1]), float(sl[-1])
        at_n = np.flatnonzero(seed & (count == n))
        if at_n.size:
            avg_gain, avg_loss = sum_gain / n, sum_loss / n
            out[at_n[0]] = _rsi_value(np.array([avg_gain]), np.array([avg_loss]))[0]
    wilder = has_change & (count > n)
    if wilder.any():
        decay = 1.0 - 1.0 / n
        g = np.stack((gain[wilder], loss[wilder]))
        y = lfilter(
            [1.0 / n], [1.0, -decay], g, axis=-1, zi=[[decay * avg_gain], [decay * avg_loss]]
        )[0]
        out[wilder] = _rsi_value(y[0], y[1])
        avg_gain, avg_loss = float(y[0, -1]), float(y[1, -1])
    changes = int(count[-1]) if count.size else state.rsi_changes
    return out, (changes, sum_gain, sum_loss, avg_gain, avg_loss)


def _rsi_value(avg_gain: np.ndarray, avg_loss: np.ndarray) -> np.ndarray:
    total = avg_gain + avg_loss
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0.0, 100.0 * avg_gain / total, 50.0)


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
    ts = np.asarray(ts_ns, dtype=np.int64)
    p = np.asarray(price, dtype=F64)
    v = np.asarray(size, dtype=F64)
    s = np.asarray(side).astype(F64)
    n = p.shape[0]
    width = len(feature_names(cfg))
    if n == 0:
        return state, np.empty((0, width))
    if not (ts.shape == p.shape == v.shape == s.shape and p.ndim == 1):
        raise DataError(
            f"features_update: ts_ns, price, size, side must be 1-D of one length, got "
            f"{ts.shape}, {p.shape}, {v.shape}, {s.shape}"
        )
    # three reductions instead of elementwise masks: NaN fails every comparison
    if not (p.min() > 0.0 and v.min() >= 0.0 and math.isfinite(float(p.sum()) + float(v.sum()))):
        raise DataError(
            "features_update: prices must be finite and > 0 (log returns) and sizes finite "
            "and >= 0; drop or fix such trades before the features stage"
        )

    first = state.n_trades == 0
    p_prev = np.concatenate(([state.last_price], p[:-1]))
    ts_prev = np.concatenate(([state.last_ts_ns], ts[:-1]))
    has_change = np.ones(n, dtype=bool)
    if first:
        p_prev[0] = p[0]
        ts_prev[0] = ts[0]
        has_change[0] = False
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(p / p_prev)
    if first:
        r[0] = 0.0
    dt = np.maximum(ts - ts_prev, 0).astype(F64) / 1e9
    d = p - p_prev

    out = np.empty((n, width))
    out[:, 0] = r
    k = len(cfg.half_lives)
    ewma_last = np.empty_like(state.ewma)
    series = np.stack((r, r * r, s * v, v))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, h in enumerate(cfg.half_lives):
            y = _ewma(series, _decay(h), state.ewma[4 * i : 4 * i + 4])
            ewma_last[4 * i : 4 * i + 4] = y[:, -1]
            out[:, 1 + i] = y[0]
            out[:, 1 + k + i] = np.sqrt(y[1])
            out[:, 1 + 2 * k + i] = y[2] / y[3]
        base = 4 * k
        y_dt = _ewma(dt[None, :], _decay(cfg.intensity_half_life), state.ewma[base : base + 1])
        y_vw = _ewma(
            np.stack((p * v, v)), _decay(cfg.vwap_half_life), state.ewma[base + 1 : base + 3]
        )
        ewma_last[base] = y_dt[0, -1]
        ewma_last[base + 1 : base + 3] = y_vw[:, -1]
        out[:, 1 + 3 * k] = y_dt[0]
        rsi, rsi_state = _rsi(state, d, has_change)
        out[:, 2 + 3 * k] = rsi
        out[:, 3 + 3 * k] = np.log(p / (y_vw[0] / y_vw[1]))

    new = replace(
        state,
        n_trades=state.n_trades + n,
        last_price=float(p[-1]),
        last_ts_ns=int(ts[-1]),
        ewma=ewma_last,
        rsi_changes=rsi_state[0],
        rsi_sum_gain=rsi_state[1],
        rsi_sum_loss=rsi_state[2],
        rsi_avg_gain=rsi_state[3],
        rsi_avg_loss=rsi_state[4],
        last_trade=out[-1].copy(),
    )
    return new, out


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

    Rows are grouped by ``symbol_id`` with a stable sort, so each symbol sees its rows in
    stream order; results are written back to the rows they came from. ``kind`` is
    ``KIND_TRADE`` (0) or ``KIND_QUOTE`` (1); the quote columns may be None when the batch
    has no quotes. Returns a new ``{symbol_id: state}`` (symbols first seen here start
    from ``new_feature_state(config)``; ``states`` is not modified) and ``out`` of shape
    (n, len(all_feature_names(config))), each row complete as of that row.
    """
    sym = np.asarray(symbol_id)
    n = sym.shape[0]
    kt = len(feature_names(config))
    out = np.empty((n, kt + 3))
    new_states = dict(states)
    if n == 0:
        return new_states, out
    is_trade = np.asarray(kind) == KIND_TRADE
    has_quotes = bid is not None and not is_trade.all()
    for key, rows in symbol_groups(sym):
        st = new_states.get(key) or new_feature_state(config)
        if st.config != config:
            raise ConfigError(
                f"features: state of symbol {key} has {st.config}, batch asks {config}"
            )
        tr = is_trade[rows]
        trade_rows = rows[tr]
        carry_trade = st.last_trade
        st, tout = features_update(
            st, ts_ns[trade_rows], price[trade_rows], size[trade_rows], side[trade_rows]
        )
        full_t = np.empty((rows.shape[0], kt))
        full_t[tr] = tout
        out[rows, :kt] = ffill_rows(full_t, tr, carry_trade)
        if has_quotes and not tr.all():
            q_rows = rows[~tr]
            qout = quote_features(bid[q_rows], ask[q_rows], bid_size[q_rows], ask_size[q_rows])
            full_q = np.empty((rows.shape[0], 3))
            full_q[~tr] = qout
            out[rows, kt:] = ffill_rows(full_q, ~tr, st.last_quote)
            st = replace(st, last_quote=qout[-1].copy())
        else:
            out[rows, kt:] = st.last_quote
        new_states[key] = st
    return new_states, out
