"""Many VaR reports in one device round trip: the risk stage's reports of one batch.

Why. The risk stage reports VaR every ``var_every`` trades of a symbol, so a large batch
holds dozens of reports (65,536 trades and ``var_every = 2000``: 32). Run one at a time on
a GPU, each report copied its return window in from pageable memory (which waits for the
stream to go idle), then sorted its losses and copied its quantiles out (a second wait):
two synchronisations per report, the host and the device taking turns. On the lent H200
that made the risk stage the slowest of ``pipelines/gpu.toml`` (23 ms a 65,536-trade batch,
``docs/measurements/gpu_pipeline_10m_registry_h200.txt``). Here the windows of all the
batch's reports go in with one copy, every report's paths are launched back to back, the
losses are sorted as one ``(reports, paths)`` array and the quantiles come back in one copy.

Same numbers. Each report draws from its own generator with the same calls, shapes and
order as :func:`~.risk.mc_var`, and a row-wise sort of the stacked losses orders each row
as the one-dimensional sort did, so every report equals ``var_report`` with the same
generator, bit for bit (tested); batch size still does not change a report.

numpy runs :func:`~.risk.var_report` per report (its fused sampler has no launch to save).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .risk import (
    McSampler,
    _check_levels,
    _quantile_index,
    check_mc_source,
    device_losses,
    historical_var,
    parametric_var,
    var_report,
)

GROUP_BYTES = 1 << 28
"""At most this many bytes of stacked losses (float64) per sort on the device (256 MiB)."""


@dataclass(frozen=True, slots=True)
class VarRequest:
    """One report's inputs: signed exposure (quote currency), per-step σ, the return
    window (NaN allowed, dropped), and the generator its paths come from."""

    exposure: float
    sigma: float
    returns: np.ndarray
    generator: Any


def var_reports(
    requests: Sequence[VarRequest],
    horizon: int = 1,
    levels: Sequence[float] = (0.95, 0.99),
    *,
    n_paths: int = 100_000,
    chunk_elements: int = 1 << 24,
    group_bytes: int = GROUP_BYTES,
) -> list[dict[str, np.ndarray]]:
    """``var_report`` of every request, in order, each ``{"parametric", "historical", "mc"}``.

    The generators say the backend (all of one kind: those of :func:`~.risk.new_generator`).
    """
    if not requests:
        return []
    if any(isinstance(q.generator, McSampler) for q in requests):
        return [var_report(q.exposure, q.sigma, q.returns, horizon, levels, n_paths=n_paths,
                           generator=q.generator) for q in requests]
    lv = _check_levels(levels)
    windows = [np.asarray(q.returns, dtype=np.float64) for q in requests]
    windows = [w[~np.isnan(w)] for w in windows]
    out = []
    for q, w in zip(requests, windows, strict=True):
        out.append({
            "parametric": parametric_var(q.sigma, q.exposure, horizon, lv),
            "historical": historical_var(w, q.exposure, lv) * math.sqrt(horizon),
        })
    sources = [w if w.size else check_mc_source(q.sigma) for q, w in zip(requests, windows, strict=True)]
    per_group = max(1, group_bytes // (8 * n_paths))
    for lo in range(0, len(requests), per_group):
        hi = min(lo + per_group, len(requests))
        picks = _mc_group(requests[lo:hi], sources[lo:hi], horizon, lv, n_paths, chunk_elements)
        for i in range(lo, hi):
            out[i]["mc"] = picks[i - lo]
    return out


def _mc_group(requests: Sequence[VarRequest], sources: list[np.ndarray], horizon: int,
              lv: np.ndarray, n_paths: int, chunk_elements: int) -> np.ndarray:
    """The Monte Carlo quantiles of a few reports, shape ``(reports, levels)``, float64."""
    xp = requests[0].generator
    k = _quantile_index(lv, n_paths)
    # every bootstrap window in one host→device copy; each report reads its slice there
    boot = [s for s in sources if s.ndim > 0]
    with xp.scope():
        joined = xp.asarray(np.concatenate(boot)) if boot else None
        rows, offset = [], 0
        for q, s in zip(requests, sources, strict=True):
            if s.ndim > 0:
                r_dev, sigma = joined[offset : offset + s.shape[0]], 0.0
                offset += s.shape[0]
            else:
                r_dev, sigma = None, float(s)
            parts = device_losses(q.generator, r_dev, sigma, q.exposure, horizon, n_paths,
                                  chunk_elements)
            rows.append(parts)
        return _sorted_picks(xp, rows, k)


def _sorted_picks(xp: Any, rows: list[list[Any]], k: np.ndarray) -> np.ndarray:
    """Each row's order statistics ``k`` (rows: the losses of one report, in chunks), sorted
    as one stacked array on the device; one copy back."""
    if hasattr(xp, "torch"):
        torch = xp.torch
        stacked = torch.stack([torch.cat(parts) if len(parts) > 1 else parts[0] for parts in rows])
        s = torch.sort(stacked, dim=1).values
        picked = s[:, torch.as_tensor(k, device=xp.device)]
        return picked.to("cpu", dtype=torch.float64).numpy()
    mx = xp.mx
    stacked = mx.stack([mx.concatenate(parts, stream=xp.stream) if len(parts) > 1 else parts[0]
                        for parts in rows], stream=xp.stream)
    s = mx.sort(stacked, axis=1, stream=xp.stream)
    picked = mx.take(s, mx.array(k.astype(np.int32)), axis=1, stream=xp.stream)
    return np.array(picked).astype(np.float64)
