"""Batch API for notebooks: the streaming kernels applied to whole arrays.

These run the very kernels the pipeline's stages run (one state, one batch, then the end
of the stream), so a notebook sees exactly the numbers the pipeline publishes for the same
ticks; the tests check that splitting the stream into batches changes nothing.
"""

from __future__ import annotations

import numpy as np

from .kernels.features import (
    DEFAULT_FEATURE_CONFIG,
    FeatureConfig,
    feature_names,
    features_update,
    new_feature_state,
)
from .kernels.portfolio import (
    concat_outputs,
    new_portfolio_state,
    portfolio_flush,
    portfolio_update,
)
from .kernels.vpin import new_vpin_state, vpin_flush, vpin_update

__all__ = ["features_frame", "portfolio_frame", "vpin_frame"]


def vpin_frame(
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    *,
    bucket_volume: float,
    window: int = 50,
    bar_ns: int = 60_000_000_000,
    sigma_window: int = 100,
    threshold: float = 0.9,
) -> dict[str, np.ndarray]:
    """VPIN of one symbol's whole trade stream, one entry per completed volume bucket.

    ``ts_ns`` int64 ns since the epoch (non-decreasing), ``price`` float64, ``size`` float64
    base units; ``bucket_volume`` in base units (see
    :func:`~nautilus_pipeline.kernels.vpin.propose_bucket_volume`). Returns numpy arrays
    ``bucket``, ``ts_ns``, ``buy_volume``, ``sell_volume``, ``vpin`` (NaN until ``window``
    buckets exist), plus ``cdf`` and ``toxic`` (empirical CDF of VPIN so far, and
    ``cdf > threshold``). The definition is in :mod:`nautilus_pipeline.kernels.vpin`.
    """
    state = new_vpin_state(
        bucket_volume, window=window, bar_ns=bar_ns, sigma_window=sigma_window, threshold=threshold
    )
    state, body = vpin_update(state, ts_ns, price, size)
    _, tail = vpin_flush(state)
    return {k: np.concatenate((body[k], tail[k])) for k in body}


def features_frame(
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    side: np.ndarray,
    *,
    config: FeatureConfig = DEFAULT_FEATURE_CONFIG,
) -> dict[str, np.ndarray]:
    """The default trade features of one symbol's trades, by name, one row per trade.

    Units and formulas: :mod:`nautilus_pipeline.kernels.features`. ``side`` is the
    aggressor (+1 buy, −1 sell, 0 unknown).
    """
    _, out = features_update(new_feature_state(config), ts_ns, price, size, side)
    return {name: out[:, i].copy() for i, name in enumerate(feature_names(config))}


def portfolio_frame(
    ts_ns: np.ndarray,
    symbol: np.ndarray,
    price: np.ndarray,
    *,
    bar_ns: int,
    window: int,
    ridge: float = 0.0,
    levels: tuple[float, ...] = (0.95, 0.99),
    horizon_bars: int = 1,
) -> dict[str, object]:
    """Cross-symbol covariance, factors, min-variance weights and VaR of a trade stream.

    ``ts_ns`` int64 ns (stream order), ``symbol`` each trade's instrument name, ``price``
    float64 > 0. The portfolio is every symbol named, in sorted order (at least two, else
    :class:`~nautilus_pipeline.errors.ConfigError`). Returns, per output bar (every bar
    closed once all symbols have traded and ``window`` returns exist):
    ``ts_ns`` (bar end), ``symbols`` (the order of every matrix), ``cov`` ``[n_bars, n, n]``,
    ``eigenvalues`` ``[n_bars, n]`` (descending), ``eigenvectors`` ``[n_bars, n, n]``
    (columns), ``weights_min_var`` ``[n_bars, n]`` (NaN where ``Σ_r`` is singular),
    ``var_min_var`` and ``var_equal`` (dict level → array of VaR in log-return units over
    ``horizon_bars``); also ``mean``, ``corr``, ``explained_variance``, ``singular``,
    ``variance_min_var`` and ``variance_equal``. The definition is in
    :mod:`nautilus_pipeline.kernels.portfolio`; these are the streaming stage's numbers.
    """
    names = np.asarray(symbol).astype(str)
    symbols, index = np.unique(names, return_inverse=True)
    state = new_portfolio_state(
        len(symbols),
        bar_ns=bar_ns,
        window=window,
        ridge=ridge,
        levels=levels,
        horizon_bars=horizon_bars,
    )
    state, body = portfolio_update(state, index, ts_ns, price)
    _, tail = portfolio_flush(state)
    out = concat_outputs([body, tail], state.params)
    frame: dict[str, object] = {"ts_ns": out["ts_ns"], "symbols": [str(s) for s in symbols]}
    for key in ("cov", "eigenvalues", "eigenvectors", "weights_min_var", "mean", "corr",
                "explained_variance", "singular", "variance_min_var", "variance_equal"):
        frame[key] = out[key]
    for key in ("var_min_var", "var_equal"):
        frame[key] = {lv: out[key][:, i].copy() for i, lv in enumerate(state.params.levels)}
    return frame
