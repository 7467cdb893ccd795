"""Risk: a simulated position from the pipeline's own signals, limits with a kill switch, VaR.

**Simulated account** (:func:`risk_update`, one symbol, trades in stream order). Per row i:

1. *Fill.* An order pending from an earlier row fills at this trade's price ``p_i``:
   ``q = target − position``; ``cash −= q·p_i + fee_rate·|q|·p_i + fee_per_order``;
   ``position = target``. A signal never fills on the trade it was computed from.
2. *Mark to market.* ``equity = cash + position·p_i``; ``pnl = equity − initial_cash``;
   ``peak = max(peak, equity)``; ``drawdown = peak − equity`` (quote currency, ≥ 0).
3. *Limits after the fill.* ``|position| > max_position``, ``|position|·p_i > max_notional``,
   ``drawdown > max_drawdown``: each sets its bit in ``breach`` and turns the kill switch on.
4. *Signal.* ``target[i]`` (NaN: no signal on this row) becomes the pending order if it
   differs from the position. Checked before it is accepted: ``|target| > max_position``,
   ``|target|·p_i > max_notional`` and the order rate (more than ``max_orders`` accepted
   orders within ``order_window_ns`` counting this one) are breaches; the order is dropped
   and the kill switch turns on.
5. *Kill switch.* While on, signals are ignored and an order to flat (target 0) is
   pending until the position is 0; it stays on until :func:`reset_kill_switch`.
   Orders to flat from the kill switch do not count against the order rate.

Units: prices and cash in quote currency, positions in base units, ``ts_ns`` int64 ns,
fees: ``fee_rate`` a fraction of notional (1 bp = 1e-4) plus ``fee_per_order`` in quote
currency. The scan is sequential by nature (the kill switch depends on the path), so it is
a numba loop; state in and out as everywhere else.

**Value at Risk** of a signed exposure ``e = position·price`` (quote currency), as a
positive loss, with the linear (delta) P&L ``e·R`` of a horizon log return ``R``:

- :func:`parametric_var`: ``VaR_α = Φ⁻¹(α)·σ·√h·|e|`` with σ the per-step volatility
  (e.g. the features' ``vol_ewma``) and h steps; zero mean.
- :func:`historical_var`: the empirical quantile of the losses ``−e·r`` of a window of
  returns, ``L_(k)`` with ``k = ceil(α·n)`` in the sorted losses (inverted CDF).
- :func:`mc_var`: N paths of h steps, normal (σ given) or bootstrapped (returns given);
  the same quantile of the N path losses. Runs on numpy, torch (cpu/cuda/mps) or MLX with
  the same code, through a small backend shim; seeded, so deterministic per backend. On a
  device the paths are sorted there and only the quantiles come back (copying the 1M sorted
  losses to the host was most of the 1.4 ms torch CUDA took before). MLX's ops run inside
  ``mx.stream(device)``: MLX's default device is its GPU wherever it has one, and the GPU
  has no float64. Measured on the lent H200 (``scripts/bench_gpu.py``,
  ``docs/measurements/gpu_bench_gpu_h200.txt``), 1M paths × 10 normal steps, median:

  =============  =======  ====================================
  backend        dtype    ms
  =============  =======  ====================================
  numpy (host)   float64  176 (the unfused sampler of before)
  torch CUDA     float64  0.51
  MLX GPU        float32  1.41
  =============  =======  ====================================
"""

from __future__ import annotations

import contextlib
import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numba import njit

from ..errors import BackendUnavailableError, ConfigError, DataError
from .montecarlo import McSampler

_NORMAL = statistics.NormalDist()  # its inv_cdf (Wichura's AS241): no scipy import at start-up

__all__ = [
    "BREACH_DRAWDOWN",
    "BREACH_NAMES",
    "BREACH_NOTIONAL",
    "BREACH_ORDER_RATE",
    "BREACH_POSITION",
    "RISK_OUTPUT_FIELDS",
    "Breach",
    "RiskParams",
    "RiskState",
    "breach_names",
    "historical_var",
    "mc_var",
    "new_generator",
    "new_risk_state",
    "parametric_var",
    "reset_kill_switch",
    "return_window",
    "risk_update",
    "var_report",
]

class Breach(enum.IntFlag):
    """The bits of the ``breach`` mask; a member's lower-case name is the limit's name."""

    MAX_POSITION = 1
    MAX_NOTIONAL = 2
    MAX_DRAWDOWN = 4
    MAX_ORDER_RATE = 8


# plain ints for the numba scan
BREACH_POSITION = int(Breach.MAX_POSITION)
BREACH_NOTIONAL = int(Breach.MAX_NOTIONAL)
BREACH_DRAWDOWN = int(Breach.MAX_DRAWDOWN)
BREACH_ORDER_RATE = int(Breach.MAX_ORDER_RATE)
BREACH_NAMES: dict[int, str] = {int(b): b.name.lower() for b in Breach}

RISK_OUTPUT_FIELDS: tuple[str, ...] = (
    "position",
    "cash",
    "equity",
    "pnl",
    "drawdown",
    "fill_qty",
    "fill_price",
    "kill",
    "breach",
)
"""Keys of the dict :func:`risk_update` returns, one entry per trade row."""


def breach_names(mask: int) -> tuple[str, ...]:
    """The limit names set in a ``breach`` bit mask, e.g. ``("max_drawdown",)``."""
    return tuple(b.name.lower() for b in Breach if mask & b)


@dataclass(frozen=True, slots=True)
class RiskParams:
    """Limits and fees. ``inf`` (or ``max_orders = 0``) disables a limit."""

    max_position: float = math.inf
    max_notional: float = math.inf
    max_drawdown: float = math.inf
    max_orders: int = 0
    order_window_ns: int = 1_000_000_000
    fee_rate: float = 0.0
    fee_per_order: float = 0.0
    initial_cash: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_position", "max_notional", "max_drawdown", "fee_rate", "fee_per_order"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"risk: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_orders < 0 or self.order_window_ns <= 0:
            raise ConfigError(
                f"risk: max_orders must be >= 0 and order_window_ns > 0, got "
                f"{self.max_orders}, {self.order_window_ns}"
            )


# float state: position, cash, pending target (NaN none), peak equity, last equity
_F_POS, _F_CASH, _F_PENDING, _F_PEAK, _F_EQUITY = range(5)
# int state: kill switch, orders in the rate ring, ring write position
_I_KILL, _I_COUNT, _I_RING_POS = range(3)


@dataclass(frozen=True, slots=True)
class RiskState:
    """One symbol's account between batches. Immutable; updates return a new one."""

    params: RiskParams
    f: np.ndarray
    i: np.ndarray
    order_ts: np.ndarray

    @property
    def position(self) -> float:
        return float(self.f[_F_POS])

    @property
    def cash(self) -> float:
        return float(self.f[_F_CASH])

    @property
    def kill(self) -> bool:
        return bool(self.i[_I_KILL])


def new_risk_state(params: RiskParams | None = None) -> RiskState:
    """A flat account with ``initial_cash`` and the kill switch off."""
    p = params or RiskParams()
    f = np.array([0.0, p.initial_cash, np.nan, p.initial_cash, p.initial_cash])
    return RiskState(
        p, f, np.zeros(3, dtype=np.int64), np.zeros(max(p.max_orders, 1), dtype=np.int64)
    )


def reset_kill_switch(state: RiskState, *, reset_peak: bool = True) -> RiskState:
    """Turn the kill switch off; by default the drawdown restarts from the current equity."""
    f = state.f.copy()
    i = state.i.copy()
    i[_I_KILL] = 0
    if reset_peak:
        f[_F_PEAK] = f[_F_EQUITY]
    if not math.isnan(f[_F_PENDING]) and f[_F_PENDING] == 0.0:
        f[_F_PENDING] = np.nan
    return replace(state, f=f, i=i)


@njit(cache=True, nogil=True)
def _risk_scan(ts, price, target, fs, ist, ring, lim, max_orders, window_ns, o):
    pos, cash, pending, peak, equity = fs[0], fs[1], fs[2], fs[3], fs[4]
    kill, count, rpos = ist[0], ist[1], ist[2]
    max_pos, max_not, max_dd, fee_rate, fee_fix, cash0 = (
        lim[0],
        lim[1],
        lim[2],
        lim[3],
        lim[4],
        lim[5],
    )
    for k in range(ts.shape[0]):
        p = price[k]
        fill_q = 0.0
        fill_p = np.nan
        if not np.isnan(pending):
            q = pending - pos
            if q != 0.0:
                cash -= q * p + fee_rate * abs(q) * p + fee_fix
                pos = pending
                fill_q = q
                fill_p = p
            pending = np.nan
        equity = cash + pos * p
        if equity > peak:
            peak = equity
        dd = peak - equity
        breach = 0
        if abs(pos) > max_pos:
            breach |= 1
        if abs(pos) * p > max_not:
            breach |= 2
        if dd > max_dd:
            breach |= 4
        tgt = target[k]
        if kill == 0 and breach == 0 and not np.isnan(tgt) and tgt != pos:
            if abs(tgt) > max_pos:
                breach |= 1
            if abs(tgt) * p > max_not:
                breach |= 2
            if breach == 0 and max_orders > 0:
                if count == max_orders and ts[k] - ring[rpos] < window_ns:
                    breach |= 8
                else:
                    ring[rpos] = ts[k]
                    rpos = rpos + 1 if rpos + 1 < max_orders else 0
                    if count < max_orders:
                        count += 1
            if breach == 0:
                pending = tgt
        if breach != 0:
            kill = 1
        if kill == 1:
            pending = 0.0 if pos != 0.0 else np.nan
        o[0, k] = pos
        o[1, k] = cash
        o[2, k] = equity
        o[3, k] = equity - cash0
        o[4, k] = dd
        o[5, k] = fill_q
        o[6, k] = fill_p
        o[7, k] = kill
        o[8, k] = breach
    fs[0], fs[1], fs[2], fs[3], fs[4] = pos, cash, pending, peak, equity
    ist[0], ist[1], ist[2] = kill, count, rpos


def risk_update(
    state: RiskState, ts_ns: np.ndarray, price: np.ndarray, target: np.ndarray
) -> tuple[RiskState, dict[str, np.ndarray]]:
    """Advance the simulated account over one symbol's trades (stream order).

    ``target`` float64 per trade row: the target position (base units) a signal set on that
    row, NaN where there was none. Returns the new state and per-row arrays
    ``RISK_OUTPUT_FIELDS`` (``kill`` bool, ``breach`` an int bit mask, see
    :func:`breach_names`; the rest float64). ``state`` is not modified.
    """
    ts = np.ascontiguousarray(ts_ns, dtype=np.int64)
    p = np.ascontiguousarray(price, dtype=np.float64)
    tg = np.ascontiguousarray(target, dtype=np.float64)
    if not (ts.shape == p.shape == tg.shape and ts.ndim == 1):
        raise DataError(
            f"risk_update: ts_ns, price, target must be 1-D of one length, got "
            f"{ts.shape}, {p.shape}, {tg.shape}"
        )
    if ts.shape[0] and not math.isfinite(float(p.sum())):
        raise DataError("risk_update: prices must be finite; fills and marks need a real price")
    prm = state.params
    fs, ist, ring = state.f.copy(), state.i.copy(), state.order_ts.copy()
    lim = np.array(
        [
            prm.max_position,
            prm.max_notional,
            prm.max_drawdown,
            prm.fee_rate,
            prm.fee_per_order,
            prm.initial_cash,
        ]
    )
    o = np.empty((9, ts.shape[0]))
    _risk_scan(ts, p, tg, fs, ist, ring, lim, prm.max_orders, prm.order_window_ns, o)
    out = {name: o[j] for j, name in enumerate(RISK_OUTPUT_FIELDS[:7])}
    out["kill"] = o[7].astype(bool)
    out["breach"] = o[8].astype(np.int64)
    return replace(state, f=fs, i=ist, order_ts=ring), out


# ------------------------------------------------------------------------------- VaR


def _check_levels(levels: Sequence[float]) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if lv.size == 0 or not np.all((lv > 0.0) & (lv < 1.0)):
        raise ConfigError(f"VaR: levels must be probabilities in (0, 1), got {list(lv)}")
    return lv


def parametric_var(
    sigma: float | np.ndarray,
    exposure: float | np.ndarray,
    horizon: int = 1,
    levels: Sequence[float] = (0.95, 0.99),
) -> np.ndarray:
    """Delta-normal VaR ``Φ⁻¹(α)·σ·√h·|e|`` (quote currency), shape ``(*broadcast, len(levels))``.

    ``sigma``: per-step volatility of log returns (dimensionless); ``exposure``: signed
    position × price; ``horizon`` in steps of ``sigma``.
    """
    z = np.array([_NORMAL.inv_cdf(x) for x in _check_levels(levels)])
    scale = (
        np.asarray(sigma, dtype=np.float64)
        * math.sqrt(horizon)
        * np.abs(np.asarray(exposure, dtype=np.float64))
    )
    return scale[..., None] * z


def _quantile_index(levels: np.ndarray, n: int) -> np.ndarray:
    """0-based index of the inverted-CDF quantile, ``ceil(α·n) − 1``, in a sorted array of n."""
    return np.clip(np.ceil(levels * n).astype(np.int64) - 1, 0, n - 1)


def historical_var(
    returns: np.ndarray, exposure: float, levels: Sequence[float] = (0.95, 0.99)
) -> np.ndarray:
    """Historical VaR of ``exposure`` over a window of returns, one value per level.

    The losses ``−exposure·r`` are sorted and the ``ceil(α·n)``-th smallest is the VaR
    (inverted empirical CDF, no interpolation), in quote currency. NaN returns are dropped.
    """
    lv = _check_levels(levels)
    r = np.asarray(returns, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return np.full(lv.shape, np.nan)
    losses = -float(exposure) * r
    k = _quantile_index(lv, r.size)
    return np.partition(losses, k)[k]


class _Torch:
    def __init__(self, seed: int, device: str | None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                "mc_var: backend 'torch' needs torch (pip install torch)"
            ) from exc
        self.torch = torch
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "mc_var: device 'cuda' asked for, but torch sees no CUDA GPU"
            )
        # MPS has no float64
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.seed = seed  # and a report counter: var_batch's fused kernel derives per-report keys
        self.reports = 0

    def normal(self, shape: tuple[int, int]) -> Any:
        return self.torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def bootstrap(self, r: Any, shape: tuple[int, int]) -> Any:
        idx = self.torch.randint(0, r.shape[0], shape, generator=self.gen, device=self.device)
        return r[idx]

    def asarray(self, x: np.ndarray) -> Any:
        return self.torch.as_tensor(x, dtype=self.dtype, device=self.device)

    def order_stats(self, parts: list[Any], k: np.ndarray) -> np.ndarray:
        # sort and pick on the device: only len(k) numbers come back, not n_paths
        s = self.torch.sort(self.torch.cat(parts)).values
        picked = s[self.torch.as_tensor(k, device=self.device)]
        return picked.to("cpu", dtype=self.torch.float64).numpy()

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


class _Mlx:
    """MLX on the device named explicitly: ``mx.cpu`` in float64, ``mx.gpu`` in float32.

    Every op runs inside :meth:`scope` (``mx.stream(device)``), so the operators in
    :func:`mc_var` (``sum``, ``*``) go to that device too. Without it they went to the
    *default* device, which is the GPU wherever MLX has one: the CPU path then asked the GPU
    for float64 and failed ("float64 is not supported on the GPU", seen on the H200).
    """

    def __init__(self, seed: int, device: str | None) -> None:
        try:
            import mlx.core as mx
        except ImportError as exc:
            raise BackendUnavailableError(
                "mc_var: backend 'mlx' needs mlx (pip install mlx)"
            ) from exc
        if device not in (None, "cpu", "gpu"):
            raise ConfigError(f"mc_var: MLX device must be 'cpu' or 'gpu', got {device!r}")
        self.mx = mx
        self.stream = mx.gpu if device == "gpu" else mx.cpu
        # Metal and MLX's CUDA build have no float64: the GPU computes in float32
        self.dtype = mx.float32 if device == "gpu" else mx.float64
        self.key = mx.random.key(seed)

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        return self.mx.stream(self.stream)

    def _next_key(self) -> Any:
        self.key, sub = self.mx.random.split(self.key, stream=self.mx.cpu)
        return sub

    def normal(self, shape: tuple[int, int]) -> Any:
        return self.mx.random.normal(
            shape, dtype=self.dtype, key=self._next_key(), stream=self.stream
        )

    def bootstrap(self, r: Any, shape: tuple[int, int]) -> Any:
        idx = self.mx.random.randint(0, r.shape[0], shape, key=self._next_key(), stream=self.stream)
        return self.mx.take(r, idx, stream=self.stream)

    def asarray(self, x: np.ndarray) -> Any:
        return self.mx.array(x, dtype=self.dtype)

    def order_stats(self, parts: list[Any], k: np.ndarray) -> np.ndarray:
        mx = self.mx
        s = mx.sort(mx.concatenate(parts, stream=self.stream), stream=self.stream)
        picked = mx.take(s, mx.array(k.astype(np.int32)), stream=self.stream)
        return np.array(picked).astype(np.float64)


_BACKENDS = {"numpy": McSampler, "torch": _Torch, "mlx": _Mlx}


def mc_var(
    returns_or_sigma: float | np.ndarray,
    position: float,
    horizon: int = 1,
    n_paths: int = 100_000,
    levels: Sequence[float] = (0.95, 0.99),
    seed: int = 0,
    backend: str = "numpy",
    device: str | None = None,
    *,
    chunk_elements: int = 1 << 24,
    generator: Any = None,
) -> np.ndarray:
    """Monte Carlo VaR (quote currency), one value per level, as a float64 numpy array.

    ``returns_or_sigma``: a scalar σ (per-step volatility of log returns) simulates normal
    steps ``σ·Z``; an array of returns bootstraps steps from it (uniform, with replacement).
    ``position``: signed exposure, position × price, in quote currency. Each path sums
    ``horizon`` steps into R; the loss is ``−position·R`` and the VaR the inverted-CDF
    quantile of the ``n_paths`` losses (as :func:`historical_var`).

    ``backend``: ``"numpy"``, ``"torch"`` (``device`` ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"``) or ``"mlx"`` (``device`` ``"cpu"`` or ``"gpu"``). Paths are drawn in chunks of
    at most ``chunk_elements`` numbers to bound memory. Deterministic for one seed and
    backend; different backends draw different numbers, so they agree only to Monte Carlo
    error. MPS and the MLX GPU compute in float32.

    ``generator``: a generator made by :func:`new_generator` for this backend; its state
    advances with every call, so successive reports draw fresh paths from one seed (the
    risk stage keeps one per symbol). Without it, one is made from ``seed`` for this call.
    On numpy the paths are drawn, gathered and summed in one fused loop
    (:mod:`~nautilus_pipeline.kernels.montecarlo`), with no temporary beyond the losses.
    """
    lv = _check_levels(levels)
    if horizon < 1 or n_paths < 1:
        raise ConfigError(f"mc_var: horizon and n_paths must be >= 1, got {horizon}, {n_paths}")
    if backend not in _BACKENDS:
        raise ConfigError(f"mc_var: backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    xp = generator if generator is not None else new_generator(backend, seed, device)
    rs = check_mc_source(returns_or_sigma)
    bootstrap = rs.ndim > 0
    k = _quantile_index(lv, n_paths)
    if isinstance(xp, McSampler):
        if bootstrap:
            losses = xp.bootstrap(rs, horizon, n_paths, position)
        else:
            losses = xp.normal(float(rs), horizon, n_paths, position)
        losses.partition(k)
        return losses[k]
    with xp.scope():  # MLX: every op on the device asked for, not the default one
        r_dev = xp.asarray(rs) if bootstrap else None
        parts = device_losses(xp, r_dev, float(rs) if not bootstrap else 0.0, position,
                              horizon, n_paths, chunk_elements)
        return xp.order_stats(parts, k)


def check_mc_source(returns_or_sigma: float | np.ndarray) -> np.ndarray:
    """The non-NaN returns to bootstrap from (1-d), or the checked σ (0-d), as :func:`mc_var` takes them."""
    rs = np.asarray(returns_or_sigma, dtype=np.float64)
    if rs.ndim > 0:
        rs = rs[~np.isnan(rs)]
        if rs.size == 0:
            raise DataError("mc_var: no non-NaN returns to bootstrap from")
    elif not (math.isfinite(float(rs)) and float(rs) >= 0.0):
        raise DataError(f"mc_var: sigma must be finite and >= 0, got {float(rs)}")
    return rs


def device_losses(xp: Any, r_dev: Any, sigma: float, position: float, horizon: int,
                  n_paths: int, chunk_elements: int = 1 << 24) -> list[Any]:
    """The ``n_paths`` path losses on a device backend (``_Torch``/``_Mlx``), in chunks:
    bootstrapped from ``r_dev`` (a device array) when given, else normal with ``sigma``.
    Launches only (nothing synchronises): :mod:`.var_batch` runs many reports this way and
    brings their quantiles back in one copy."""
    rows = max(1, chunk_elements // horizon)
    parts = []
    done = 0
    while done < n_paths:
        c = min(rows, n_paths - done)
        steps = xp.bootstrap(r_dev, (c, horizon)) if r_dev is not None else xp.normal((c, horizon))
        total = steps.sum(axis=1)
        if r_dev is None:
            total = total * sigma
        parts.append(-float(position) * total)
        done += c
    return parts


def new_generator(backend: str = "numpy", seed: int = 0, device: str | None = None,
                  stream: int = 0) -> Any:
    """A generator for :func:`mc_var` on ``backend`` whose state advances with each call.

    ``stream`` (e.g. a symbol id) selects an independent sequence for the same ``seed``.
    """
    if backend not in _BACKENDS:
        raise ConfigError(f"mc_var: backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    if backend == "numpy":
        return McSampler(seed, stream)
    mixed = int(seed) if not stream else (int(seed) * 1_000_003 + int(stream)) % (1 << 63)
    return _BACKENDS[backend](mixed, device)


def return_window(window: np.ndarray, new_returns: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` returns after appending ``new_returns``: the historical VaR window."""
    joined = np.concatenate(
        (np.asarray(window, dtype=np.float64), np.asarray(new_returns, dtype=np.float64))
    )
    return joined[max(joined.shape[0] - length, 0) :].copy()


def var_report(
    exposure: float,
    sigma: float,
    returns: np.ndarray,
    horizon: int = 1,
    levels: Sequence[float] = (0.95, 0.99),
    *,
    n_paths: int = 100_000,
    seed: int = 0,
    backend: str = "numpy",
    device: str | None = None,
    generator: Any = None,
) -> dict[str, np.ndarray]:
    """The three VaR estimates of one exposure, one value per level each (quote currency).

    ``parametric`` from ``sigma`` (per-step EWMA volatility), ``historical`` from the
    one-step ``returns`` window (for ``horizon`` 1; longer horizons scale it by √h, the
    square-root-of-time rule), ``mc`` bootstrapping ``returns`` over ``horizon`` steps
    (normal with ``sigma`` when the window is empty).
    """
    r = np.asarray(returns, dtype=np.float64)
    r = r[~np.isnan(r)]
    hist = historical_var(r, exposure, levels) * math.sqrt(horizon)
    source = r if r.size else sigma
    mc = mc_var(source, exposure, horizon, n_paths, levels, seed, backend, device,
                generator=generator)
    return {
        "parametric": parametric_var(sigma, exposure, horizon, levels),
        "historical": hist,
        "mc": mc,
    }
