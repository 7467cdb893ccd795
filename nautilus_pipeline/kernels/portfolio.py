"""Portfolio and factors across symbols: bars, returns, rolling covariance, PCA, weights, VaR.

The definition is issue 17's, stated here so that the code can be checked against it:

- **Bars.** Time bars of ``bar_ns`` aligned to multiples of ``bar_ns`` since the epoch
  (bar id ``ts_ns // bar_ns``). A symbol's close in a bar is the price of its last trade in
  ``[start, start + bar_ns)``; a symbol without a trade in the bar carries its previous
  close. A bar exists when a trade of any portfolio symbol falls in it (an interval without
  any trade is no bar). A bar closes when a trade of a later bar arrives, or at the end of
  the stream (:func:`portfolio_flush`); a trade whose bar id is lower than the open bar's
  (out of order) joins the open bar, as in VPIN. Bars closed before every symbol has traded
  once are not emitted. A bar's timestamp is its end, ``start + bar_ns``.
- **Returns.** ``r[t, j] = ln(close[t, j] / close[t − 1, j])`` from the second emitted bar on.
- **Rolling window** of the last ``window`` returns (``window ≥ 2``, nothing is output before
  ``window`` returns exist): mean vector, covariance ``Σ`` with ddof = 1 (two-pass: the
  window's mean first), correlation ``Σ_ij / sqrt(Σ_ii Σ_jj)`` (NaN where a variance is 0).
- **Factors.** Eigen-decomposition of ``Σ``: eigenvalues descending; each eigenvector (a
  column) signed so that its component of largest absolute value is positive (ties: the
  lowest index); explained-variance ratios ``λ_k / Σλ`` (NaN when ``Σλ = 0``).
- **Weights.** ``w = Σ_r⁻¹ 1 / (1ᵀ Σ_r⁻¹ 1)`` with ``Σ_r = Σ + ridge · (tr Σ / n) · I``.
  ``Σ_r`` is *singular* when it is rank-deficient at working precision, with numpy's
  ``matrix_rank`` tolerance: ``λ_min(Σ_r) ≤ n · eps · λ_max(Σ_r)``; then the weights are NaN
  and the bar is counted in ``singular`` (never an exception). Identical prices (a zero
  variance) make ``Σ`` singular this way.
- **Portfolio risk.** Variance ``wᵀ Σ w`` for the min-variance weights, for equal weights
  ``1/n`` and for the target weights (equal unless given); parametric VaR
  ``z_α · sqrt(horizon_bars · wᵀ Σ w)`` (normal, zero mean, log-return units) per level α.

Units: ``ts_ns`` int64 ns; prices float64 > 0 (any quote currency: only ratios enter);
returns, covariances and VaR in log-return units per bar.

Design, and the alternatives weighed:

- The bar scan is sequential (which bar a trade closes depends on what came before, across
  batches); it is one numba loop over the trades, as VPIN's, with the open bar and the
  carried closes in the state.
- Covariance from scratch per bar (two-pass, centred on the window's mean) rather than
  rolling sums of ``r_i r_j``: rolling sums are O(n²) per bar instead of O(window·n²), but
  they carry rounding from every bar ever seen and cancel badly when the mean is large
  against the spread; from scratch, each bar's numbers depend only on its window, so the
  output is the same however the stream is split, and the eigen-decomposition (O(n³)) costs
  more than the from-scratch covariance anyway (table below).
- The min-variance solve reuses the eigen-decomposition: ``Σ_r = V (Λ + δ) Vᵀ`` with the same
  ``V``, so ``Σ_r⁻¹ 1 = V (Λ + δ)⁻¹ Vᵀ 1`` costs O(n²) instead of a second O(n³) factorisation
  (at n = 500, an LU solve per bar would add a fifth to the eigh), and the singularity test
  reads the eigenvalues it needs from there. The loop reference solves by Gaussian
  elimination instead, so the test compares two different algorithms.
- The heavy part (windows → covariance → ``eigh``) runs on numpy, on torch (any device, in
  float64) or on MLX (CPU stream, float64: MLX's GPU has no float64 and its ``eigh`` runs on
  the CPU only), in chunks of bars so that the ``[bars, window, n]`` centred windows stay
  under ~32 MB. The rest (signs, weights, variances, VaR) is O(n²) per bar in numpy.

Measured output bars/s, window 500, on the 2-core Xeon dev VM (shared with other jobs, so
±30%), one BLAS/torch thread as the pipeline runs with (``scripts/bench_kernels.py
--portfolio-only``; raw output in ``docs/measurements/dev_bench_portfolio.txt``):

=======  =======  =========  =======
symbols  numpy    torch cpu  mlx cpu
=======  =======  =========  =======
10       18,694   26,611     14,068
100      648      467        190
500      23.4     24.2       3.9
=======  =======  =========  =======

At 500 symbols a bar is ~40 ms, nearly all of it ``syevd`` on the 500×500 covariance; at 10
symbols the per-call overhead dominates. Torch CPU and numpy run the same LAPACK routine and
are within noise of each other; MLX's CPU linalg is 2-6× slower, so the stage does not route
to it by default. CUDA was not measured for this table (the lent GPU could not be had in
this session); the stage's torch threshold (100 symbols) is therefore an expectation, not a
measured crossover.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numba import njit

from ..errors import ConfigError, DataError

__all__ = [
    "PORTFOLIO_OUTPUT_FIELDS",
    "PortfolioParams",
    "PortfolioState",
    "new_portfolio_state",
    "portfolio_flush",
    "portfolio_update",
]

PORTFOLIO_OUTPUT_FIELDS: tuple[str, ...] = (
    "ts_ns",
    "row",
    "mean",
    "cov",
    "corr",
    "eigenvalues",
    "eigenvectors",
    "explained_variance",
    "weights_min_var",
    "singular",
    "variance_min_var",
    "variance_equal",
    "variance_target",
    "var_min_var",
    "var_equal",
    "var_target",
)
"""Keys of the dict :func:`portfolio_update` returns, one entry per bar with a full window.

Shapes for m bars and n symbols: ``ts_ns``/``row`` ``[m]`` (row: the index, in the batch, of
the trade that closed the bar; −1: closed by :func:`portfolio_flush`), ``mean`` ``[m, n]``,
``cov``/``corr``/``eigenvectors`` ``[m, n, n]`` (eigenvectors as columns), ``eigenvalues``/
``explained_variance``/``weights_min_var`` ``[m, n]``, ``singular`` ``[m]`` bool,
``variance_*`` ``[m]``, ``var_*`` ``[m, len(levels)]``.
"""

BACKENDS = ("numpy", "torch", "mlx")
_EPS = float(np.finfo(np.float64).eps)
_CHUNK_ELEMENTS = 1 << 22  # centred windows per chunk: 4M float64 = 32 MB

# integer state of the bar scan
_I_OPEN, _I_OPEN_ID, _I_TRADED = range(3)


@dataclass(frozen=True, slots=True)
class PortfolioParams:
    """Parameters: ``n_symbols`` (≥ 2), ``bar_ns``, ``window`` returns, ``ridge`` (fraction of
    the mean variance added to the diagonal), VaR ``levels`` over ``horizon_bars`` bars, and
    optional ``target_weights`` (one per symbol, in the portfolio's symbol order)."""

    n_symbols: int
    bar_ns: int = 60_000_000_000
    window: int = 500
    ridge: float = 0.0
    levels: tuple[float, ...] = (0.95, 0.99)
    horizon_bars: int = 1
    target_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_symbols < 2:
            raise ConfigError(
                f"portfolio: needs at least two symbols, got {self.n_symbols}; a portfolio of "
                "one instrument has no covariance to analyse (use the risk stage's VaR instead)"
            )
        if self.bar_ns <= 0:
            raise ConfigError(f"portfolio: bar_ns must be a positive bar length in ns, got {self.bar_ns}")
        if self.window < 2:
            raise ConfigError(f"portfolio: window must be >= 2 returns, got {self.window}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0.0):
            raise ConfigError(f"portfolio: ridge must be a finite number >= 0, got {self.ridge}")
        if not self.levels or not all(0.0 < lv < 1.0 for lv in self.levels):
            raise ConfigError(f"portfolio: VaR levels must be in (0, 1), got {list(self.levels)}")
        if self.horizon_bars < 1:
            raise ConfigError(f"portfolio: horizon_bars must be >= 1, got {self.horizon_bars}")
        tw = self.target_weights
        if tw is not None and (
            len(tw) != self.n_symbols or not all(math.isfinite(x) for x in tw)
        ):
            raise ConfigError(
                f"portfolio: target_weights needs {self.n_symbols} finite numbers (one per "
                f"symbol, in sorted symbol order), got {list(tw)}"
            )

    @property
    def z(self) -> np.ndarray:
        """Standard normal quantiles of the VaR levels."""
        return np.array([statistics.NormalDist().inv_cdf(lv) for lv in self.levels])


@dataclass(frozen=True, slots=True)
class PortfolioState:
    """The portfolio's state between batches. Immutable; updates return a new one.

    ``scan``: open flag, open bar id, how many symbols have traded; ``closes``: each symbol's
    latest close (NaN: not traded yet); ``prev_close``: the closes of the last emitted bar
    (None before the first); ``tail``: the last ``window − 1`` returns (oldest first);
    ``returns``/``bars``/``singular``: counters of returns, output bars and singular bars.
    """

    params: PortfolioParams
    scan: np.ndarray
    closes: np.ndarray
    prev_close: np.ndarray | None = None
    tail: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    returns: int = 0
    bars: int = 0
    singular: int = 0


def new_portfolio_state(
    n_symbols: int,
    *,
    bar_ns: int = 60_000_000_000,
    window: int = 500,
    ridge: float = 0.0,
    levels: Sequence[float] = (0.95, 0.99),
    horizon_bars: int = 1,
    target_weights: Sequence[float] | None = None,
) -> PortfolioState:
    """The state of a portfolio of ``n_symbols`` that has seen no trade yet."""
    params = PortfolioParams(
        int(n_symbols),
        int(bar_ns),
        int(window),
        float(ridge),
        tuple(float(x) for x in levels),
        int(horizon_bars),
        None if target_weights is None else tuple(float(x) for x in target_weights),
    )
    n = params.n_symbols
    return PortfolioState(
        params=params,
        scan=np.zeros(3, dtype=np.int64),
        closes=np.full(n, np.nan),
        tail=np.zeros((0, n)),
    )


@njit(cache=True)
def _bar_scan(sym, ts, price, bar_ns, scan, closes, flush):
    """Scan trades into closed bars; returns (closes per emitted bar, row that closed it).

    Only bars at whose close every symbol has traded are written. ``scan`` and ``closes``
    are updated in place (the caller passes copies).
    """
    n = ts.shape[0]
    k = closes.shape[0]
    is_open, open_id, traded = scan[_I_OPEN], scan[_I_OPEN_ID], scan[_I_TRADED]
    cap = n + 1 if flush else n
    out = np.empty((cap, k))
    out_id = np.empty(cap, dtype=np.int64)
    out_row = np.empty(cap, dtype=np.int64)
    m = 0
    for i in range(n + 1 if flush else n):
        if i < n:
            bar_id = ts[i] // bar_ns
            if is_open == 1 and bar_id <= open_id:
                j = sym[i]
                if math.isnan(closes[j]):
                    traded += 1
                closes[j] = price[i]
                continue
        if is_open == 1 and traded == k:
            out[m, :] = closes
            out_id[m] = open_id
            out_row[m] = i if i < n else -1
            m += 1
        is_open = 0
        if i < n:
            is_open = 1
            open_id = ts[i] // bar_ns
            j = sym[i]
            if math.isnan(closes[j]):
                traded += 1
            closes[j] = price[i]
    scan[_I_OPEN], scan[_I_OPEN_ID], scan[_I_TRADED] = is_open, open_id, traded
    return out[:m], out_id[:m], out_row[:m]


def _empty_output(params: PortfolioParams) -> dict[str, np.ndarray]:
    n, nl = params.n_symbols, len(params.levels)
    out = {k: np.zeros((0, n)) for k in ("mean", "eigenvalues", "explained_variance")}
    out.update({k: np.zeros((0, n, n)) for k in ("cov", "corr", "eigenvectors")})
    out["weights_min_var"] = np.zeros((0, n))
    out["ts_ns"] = np.zeros(0, dtype=np.int64)
    out["row"] = np.zeros(0, dtype=np.int64)
    out["singular"] = np.zeros(0, dtype=bool)
    for k in ("variance_min_var", "variance_equal", "variance_target"):
        out[k] = np.zeros(0)
    for k in ("var_min_var", "var_equal", "var_target"):
        out[k] = np.zeros((0, nl))
    return out


# ------------------------------------------------------------------ heavy part, per backend


def _moments_numpy(win: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, covariance, eigenvalues (ascending) and eigenvectors of windows ``[b, w, n]``."""
    w = win.shape[1]
    s = win[:, 0, :].copy()
    for c in range(1, w):
        s += win[:, c, :]
    mean = s / w
    x = win - mean[:, None, :]
    c = np.matmul(x.transpose(0, 2, 1), x)
    cov = 0.5 * (c + c.transpose(0, 2, 1)) / (w - 1)
    lam, vec = np.linalg.eigh(cov)
    return mean, cov, lam, vec


def _moments_torch(win: np.ndarray, device: str):
    import torch

    t = torch.from_numpy(np.array(win)).to(device)
    w = t.shape[1]
    mean = t.sum(dim=1) / w
    x = t - mean[:, None, :]
    c = torch.bmm(x.transpose(1, 2), x)
    cov = 0.5 * (c + c.transpose(1, 2)) / (w - 1)
    lam, vec = torch.linalg.eigh(cov)
    return tuple(a.cpu().numpy() for a in (mean, cov, lam, vec))


def _moments_mlx(win: np.ndarray):
    import mlx.core as mx

    cpu = mx.cpu
    # every op on the CPU, the operators (/, +, *) too: MLX's default device is its GPU
    # wherever it has one, and the GPU has no float64 (failed so on the H200)
    with mx.stream(cpu):
        t = mx.array(np.ascontiguousarray(win), dtype=mx.float64)
        w = t.shape[1]
        mean = mx.sum(t, axis=1, stream=cpu) / w
        x = mx.subtract(t, mean[:, None, :], stream=cpu)
        c = mx.matmul(mx.swapaxes(x, 1, 2, stream=cpu), x, stream=cpu)
        cov = mx.divide(0.5 * (c + mx.swapaxes(c, 1, 2, stream=cpu)), w - 1, stream=cpu)
        lam, vec = mx.linalg.eigh(cov, stream=cpu)
        mx.eval(mean, cov, lam, vec)
    return tuple(np.array(a) for a in (mean, cov, lam, vec))


def _moments(win: np.ndarray, backend: str, device: str | None):
    if backend == "numpy":
        return _moments_numpy(win)
    if backend == "torch":
        return _moments_torch(win, device or "cpu")
    if backend == "mlx":
        return _moments_mlx(win)
    raise ConfigError(f"portfolio: backend must be one of {BACKENDS}, got {backend!r}")


def _quad(cov: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``wᵀ Σ w`` per bar for ``cov`` ``[b, n, n]`` and ``w`` ``[b, n]``."""
    t = np.matmul(cov, w[:, :, None])[:, :, 0]
    return np.sum(w * t, axis=1)


def _analyse(
    params: PortfolioParams, win: np.ndarray, backend: str, device: str | None
) -> dict[str, np.ndarray]:
    """Everything the definition asks of each window ``[b, window, n]``."""
    n = params.n_symbols
    b = win.shape[0]
    mean, cov, lam_up, vec_up = _moments(win, backend, device)
    lam = np.ascontiguousarray(lam_up[:, ::-1])
    vec = np.ascontiguousarray(vec_up[:, :, ::-1])
    big = np.argmax(np.abs(vec), axis=1)  # [b, n]: row of each column's largest |v|
    lead = np.take_along_axis(vec, big[:, None, :], axis=1)[:, 0, :]
    vec *= np.where(lead < 0.0, -1.0, 1.0)[:, None, :]
    diag = np.diagonal(cov, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(diag)
        corr = cov / (sd[:, :, None] * sd[:, None, :])
        explained = lam / np.sum(lam, axis=1, keepdims=True)
    trace = np.sum(diag, axis=1)
    lam_r = lam + (params.ridge * trace / n)[:, None]
    singular = ~(lam_r[:, -1] > n * _EPS * lam_r[:, 0])
    ok = ~singular
    weights = np.full((b, n), np.nan)
    if ok.any():
        v = vec[ok]
        u = np.sum(v, axis=1) / lam_r[ok]  # (Vᵀ 1) / (λ + δ)
        raw = np.matmul(v, u[:, :, None])[:, :, 0]
        weights[ok] = raw / np.sum(raw, axis=1, keepdims=True)
    equal = np.full((b, n), 1.0 / n)
    target = (
        equal
        if params.target_weights is None
        else np.broadcast_to(np.asarray(params.target_weights), (b, n))
    )
    var_mv = _quad(cov, np.where(ok[:, None], weights, 0.0))
    var_mv[singular] = np.nan
    var_eq = _quad(cov, equal)
    var_tg = var_eq if params.target_weights is None else _quad(cov, np.ascontiguousarray(target))
    z, h = params.z, params.horizon_bars
    with np.errstate(invalid="ignore"):
        vars_ = {k: z[None, :] * np.sqrt(h * v)[:, None] for k, v in
                 (("var_min_var", var_mv), ("var_equal", var_eq), ("var_target", var_tg))}
    return {
        "mean": mean,
        "cov": cov,
        "corr": corr,
        "eigenvalues": lam,
        "eigenvectors": vec,
        "explained_variance": explained,
        "weights_min_var": weights,
        "singular": singular,
        "variance_min_var": var_mv,
        "variance_equal": var_eq,
        "variance_target": var_tg,
        **vars_,
    }


def _run(
    state: PortfolioState,
    sym: np.ndarray,
    ts: np.ndarray,
    price: np.ndarray,
    flush: bool,
    backend: str,
    device: str | None,
) -> tuple[PortfolioState, dict[str, np.ndarray]]:
    p = state.params
    scan, closes = state.scan.copy(), state.closes.copy()
    bar_close, bar_id, bar_row = _bar_scan(sym, ts, price, p.bar_ns, scan, closes, flush)
    state = replace(state, scan=scan, closes=closes)
    if bar_close.shape[0] == 0:
        return state, _empty_output(p)
    prev = state.prev_close
    if prev is None:
        ratio = bar_close[1:] / bar_close[:-1]
        bar_id, bar_row = bar_id[1:], bar_row[1:]
    else:
        ratio = bar_close / np.concatenate((prev[None, :], bar_close[:-1]))
    r = np.log(ratio)
    ext = np.concatenate((state.tail, r)) if state.tail.shape[0] else r
    w = p.window
    state = replace(
        state,
        prev_close=bar_close[-1].copy(),
        tail=ext[max(ext.shape[0] - (w - 1), 0) :].copy(),
        returns=state.returns + r.shape[0],
    )
    n_out = ext.shape[0] - w + 1
    if n_out <= 0:
        return state, _empty_output(p)
    windows = np.lib.stride_tricks.sliding_window_view(ext, w, axis=0).transpose(0, 2, 1)
    step = max(1, _CHUNK_ELEMENTS // (w * p.n_symbols))
    parts = [_analyse(p, windows[lo : lo + step], backend, device) for lo in range(0, n_out, step)]
    out = {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}
    out["ts_ns"] = (bar_id[-n_out:] + 1) * p.bar_ns
    out["row"] = bar_row[-n_out:]
    state = replace(
        state, bars=state.bars + n_out, singular=state.singular + int(out["singular"].sum())
    )
    return state, {k: out[k] for k in PORTFOLIO_OUTPUT_FIELDS}


def portfolio_update(
    state: PortfolioState,
    symbol_index: np.ndarray,
    ts_ns: np.ndarray,
    price: np.ndarray,
    *,
    backend: str = "numpy",
    device: str | None = None,
) -> tuple[PortfolioState, dict[str, np.ndarray]]:
    """Feed the portfolio's trades (stream order); returns the new state and the bars output.

    ``symbol_index`` is each trade's position in the portfolio's symbol order (0..n−1),
    ``ts_ns`` int64 ns, ``price`` float64 > 0. The output dict has the keys
    ``PORTFOLIO_OUTPUT_FIELDS``, one entry per bar closed by this batch that has a full
    window of returns (possibly none). ``backend`` ``"numpy"``, ``"torch"`` (``device``
    ``"cpu"``, ``"cuda"``…) or ``"mlx"`` runs the covariance and ``eigh``; the results agree
    to rounding. ``state`` is not modified; call :func:`portfolio_flush` at the end.
    """
    sym = np.ascontiguousarray(symbol_index, dtype=np.int64)
    ts = np.ascontiguousarray(ts_ns, dtype=np.int64)
    p = np.ascontiguousarray(price, dtype=np.float64)
    if not (sym.shape == ts.shape == p.shape and ts.ndim == 1):
        raise DataError(
            "portfolio_update: symbol_index, ts_ns, price must be 1-D of one length, got "
            f"{sym.shape}, {ts.shape}, {p.shape}"
        )
    if ts.shape[0] == 0:
        return state, _empty_output(state.params)
    k = state.params.n_symbols
    if sym.min() < 0 or sym.max() >= k:
        raise DataError(f"portfolio_update: symbol_index must be in 0..{k - 1}")
    if not (p.min() > 0.0 and math.isfinite(float(p.sum()))):
        raise DataError(
            "portfolio_update: prices must be finite and > 0 (log returns); drop or fix such "
            "trades before the portfolio stage"
        )
    return _run(state, sym, ts, p, False, backend, device)


def portfolio_flush(
    state: PortfolioState, *, backend: str = "numpy", device: str | None = None
) -> tuple[PortfolioState, dict[str, np.ndarray]]:
    """End of stream: close the open bar (if any) and return its output."""
    e = np.zeros(0, dtype=np.int64)
    return _run(state, e, e, np.zeros(0), True, backend, device)


def concat_outputs(parts: Sequence[dict[str, Any]], params: PortfolioParams) -> dict[str, np.ndarray]:
    """Join the outputs of consecutive calls (batches, then the flush) into one."""
    parts = [q for q in parts if q["ts_ns"].shape[0]]
    if not parts:
        return _empty_output(params)
    return {k: np.concatenate([q[k] for q in parts]) for k in PORTFOLIO_OUTPUT_FIELDS}
