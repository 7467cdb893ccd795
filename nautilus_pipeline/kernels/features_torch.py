"""The trade features on a torch device: every recurrence as a blocked parallel scan.

Why this works. Every stateful trade feature of :mod:`nautilus_pipeline.kernels.features`
is a first-order linear recurrence ``y_t = a·y_{t−1} + c·x_t`` with a constant ``a`` per
series: the EWMAs of ``r``, ``r²``, ``side·size``, ``size`` per half-life, of the
inter-arrival time, of ``price·size`` and ``size`` for the VWAP, and, once the RSI is seeded,
Wilder's averages of gains and losses (``a = 1 − 1/n``, ``c = 1/n``). Everything else is
elementwise (log returns, ratios, square roots). A sequential loop is the CPU kernel's way;
a GPU wants the scan form. With blocks of ``B`` rows:

1. within each block, ``Y = L·U`` with ``L[i, j] = a^(i−j)`` for ``j ≤ i`` (one batched
   matrix product per series, float64, so no TF32);
2. the block ends form the same recurrence with ``a^B``, solved by the same function
   (recursively: depth ``log_B n``);
3. each row adds ``a^(i+1)`` times the state before its block.

``U`` holds ``c·x``; the first block's "state before" is the carried state, so batches chain
exactly as the CPU kernel's do. The summation order differs from the loop's, so results
agree with :func:`~nautilus_pipeline.kernels.features.features_update` to ~1e-15 relative,
not to the bit (:data:`FEATURES_ATOL` is the tested bound); exact batch-size independence
holds on the CPU kernel only, as for the VPIN torch variant.

The first trades of a symbol (no previous price; the RSI's seed, a plain mean of the
first ``n`` changes) go through the CPU kernel: a handful of rows once per symbol.

Measured on the lent H200 against the CPU kernel on its host (``scripts/bench_gpu.py``,
``docs/measurements/gpu_bench_gpu_h200.txt``): see the features stage's ``gpu_min_batch``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, DataError
from .features import (
    FeatureState,
    _decay,
    feature_names,
    features_update,
)

__all__ = ["FEATURES_ATOL", "ewma_scan", "features_update_device", "features_update_torch"]

#: Tested bound (absolute and relative) between this kernel and the CPU kernel, float64.
FEATURES_ATOL = 1e-9

_BLOCK = 128


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is part of the GPU extras
        raise BackendUnavailableError("features on a torch device need torch") from exc
    return torch


def ewma_scan(u: Any, a: Any, y0: Any, block: int = _BLOCK) -> Any:
    """``y_t = a·y_{t−1} + u_t`` per column, ``y_{−1} = y0``; ``u`` (n, m), ``a``/``y0`` (m,)."""
    torch = _torch()
    n, m = u.shape
    b = min(block, n)
    idx = torch.arange(b, device=u.device)
    e = idx[:, None] - idx[None, :]
    lower = torch.where(
        e >= 0, a[:, None, None] ** e.clamp(min=0).to(u.dtype), torch.zeros((), dtype=u.dtype,
                                                                          device=u.device)
    )  # (m, b, b)
    rise = a[None, :] ** (idx[:, None] + 1).to(u.dtype)  # (b, m): a^(i+1)
    if n <= b:
        return torch.einsum("mij,jm->im", lower, u) + rise * y0[None, :]
    nb = -(-n // b)
    if nb * b != n:
        u = torch.cat((u, u.new_zeros((nb * b - n, m))))
    local = torch.einsum("mij,kjm->kim", lower, u.view(nb, b, m))  # (nb, b, m), from 0
    ends = ewma_scan(local[:, -1, :].contiguous(), a ** b, y0, block)  # state after each block
    before = torch.cat((y0[None, :], ends[:-1]))  # state before each block
    y = local + rise[None, :, :] * before[:, None, :]
    return y.reshape(nb * b, m)[:n]


def features_update_device(
    state: FeatureState,
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    side: np.ndarray,
    *,
    device: str = "cuda",
) -> tuple[FeatureState, Any]:
    """:func:`~nautilus_pipeline.kernels.features.features_update` on ``device``; the output
    stays there (a float64 tensor (n, width)) for the next stage on the same device.

    The inputs are numpy arrays or tensors (already on ``device``: the stage passes the
    lease's cached device columns); the host copies are then the four input columns (25
    bytes a trade), and the new state comes back in one small copy.
    """
    torch = _torch()
    cfg = state.config
    n = int(price.shape[0])
    if n == 0 or state.n_trades == 0 or state.rsi_changes < cfg.rsi_period:
        host = [c.cpu().numpy() if isinstance(c, torch.Tensor) else c
                for c in (ts_ns, price, size, side)]
        new, out = features_update(state, *host)
        return new, torch.as_tensor(out, device=device)
    dev = torch.device(device)
    f64 = torch.float64

    def put(x: Any, dtype: Any) -> Any:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        return t.to(dev, non_blocking=t.is_pinned()).to(dtype)

    ts, p, v, s = put(ts_ns, torch.int64), put(price, f64), put(size, f64), put(side, f64)
    p_prev = torch.cat((torch.tensor([state.last_price], dtype=f64, device=dev), p[:-1]))
    ts_prev = torch.cat((torch.tensor([state.last_ts_ns], dtype=torch.int64, device=dev), ts[:-1]))
    r = torch.log(p / p_prev)
    dt = (ts - ts_prev).clamp(min=0).to(f64) / 1e9
    d = p - p_prev
    gain, loss = d.clamp(min=0.0), (-d).clamp(min=0.0)

    hls = cfg.half_lives
    k = len(hls)
    cols, decays, coefs = [], [], []
    for h in hls:
        a = _decay(h)
        cols += [r, r * r, s * v, v]
        decays += [a] * 4
        coefs += [1.0 - a] * 4
    a_dt, a_vw, n_rsi = _decay(cfg.intensity_half_life), _decay(cfg.vwap_half_life), cfg.rsi_period
    cols += [dt, p * v, v, gain, loss]
    decays += [a_dt, a_vw, a_vw, 1.0 - 1.0 / n_rsi, 1.0 - 1.0 / n_rsi]
    coefs += [1.0 - a_dt, 1.0 - a_vw, 1.0 - a_vw, 1.0 / n_rsi, 1.0 / n_rsi]
    a_t = torch.tensor(decays, dtype=f64, device=dev)
    c_t = torch.tensor(coefs, dtype=f64, device=dev)
    y0 = torch.as_tensor(
        np.concatenate((state.ewma, [state.rsi_avg_gain, state.rsi_avg_loss])), device=dev
    )
    y = ewma_scan(torch.stack(cols, dim=1) * c_t[None, :], a_t, y0)

    width = len(feature_names(cfg))
    out = torch.empty((n, width), dtype=f64, device=dev)
    out[:, 0] = r
    for i in range(k):
        out[:, 1 + i] = y[:, 4 * i]
        out[:, 1 + k + i] = torch.sqrt(y[:, 4 * i + 1])
        out[:, 1 + 2 * k + i] = y[:, 4 * i + 2] / y[:, 4 * i + 3]
    base = 4 * k
    out[:, 1 + 3 * k] = y[:, base]
    g, lo = y[:, base + 3], y[:, base + 4]
    total = g + lo
    out[:, 2 + 3 * k] = torch.where(total > 0.0, 100.0 * g / total, torch.full_like(total, 50.0))
    out[:, 3 + 3 * k] = torch.log(p / (y[:, base + 1] / y[:, base + 2]))

    # one copy back: the checks, the new state and the last row
    checks = torch.stack((p.min(), v.min(), p.sum() + v.sum(), p[-1]))
    tail = torch.cat((checks, y[-1], out[-1])).cpu().numpy()
    if not (tail[0] > 0.0 and tail[1] >= 0.0 and math.isfinite(tail[2])):
        raise DataError(
            "features_update: prices must be finite and > 0 (log returns) and sizes finite "
            "and >= 0; drop or fix such trades before the features stage"
        )
    m = y.shape[1]
    new = replace(
        state,
        n_trades=state.n_trades + n,
        last_price=float(tail[3]),
        last_ts_ns=int(ts[-1]),
        ewma=tail[4 : 4 + m - 2].copy(),
        rsi_changes=state.rsi_changes + n,
        rsi_avg_gain=float(tail[4 + m - 2]),
        rsi_avg_loss=float(tail[4 + m - 1]),
        last_trade=tail[4 + m :].copy(),
    )
    return new, out


def features_update_torch(
    state: FeatureState,
    ts_ns: np.ndarray,
    price: np.ndarray,
    size: np.ndarray,
    side: np.ndarray,
    *,
    device: str = "cuda",
) -> tuple[FeatureState, np.ndarray]:
    """:func:`features_update_device` with the output copied back: float64 (n, width)."""
    new, out = features_update_device(state, ts_ns, price, size, side, device=device)
    return new, out.cpu().numpy()
