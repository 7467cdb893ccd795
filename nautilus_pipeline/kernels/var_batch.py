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

Fused on CUDA. Launching each report's paths still cost six torch calls per report, and
every torch call lets go of the GIL: with the other stages' threads busy, getting it back
took most of the risk stage's time (1 ms per report, ``scripts/profile_pipeline.py`` on
the H200). Where Triton is present, the bootstrap reports of a batch run as one kernel
(:func:`_bootstrap_kernel`): each thread draws one path's ``horizon`` indices from
Philox4x32-10 (``tl.randint4x``) keyed by the report's own key, gathers and sums them
in float64, so no index or step array exists. A report's key is a function of its
generator's seed and the count of reports it made (:func:`report_key`), so a report does
not depend on the batch it fell in either, but it draws other numbers than the unfused
path (as any two backends do; tests: equal to a NumPy Philox loop reference bit for bit,
and to NumPy's Monte Carlo within its error). Reports with an empty window (normal paths
from σ) take the unfused path.

numpy runs :func:`~.risk.var_report` per report (its fused sampler has no launch to save).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
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
    mc_var,
    parametric_var,
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
    count_copy: Callable[[str, int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``var_report`` of every request, in order, each ``{"parametric", "historical", "mc"}``.

    The generators say the backend (all of one kind: those of :func:`~.risk.new_generator`).
    ``count_copy(direction, nbytes)`` (a pool's :meth:`~nautilus_pipeline.memory.BufferPool.count_copy`)
    hears of every host↔device copy when the generators are on a GPU.
    """
    if not requests:
        return []
    lv = _check_levels(levels)
    n = len(requests)
    exposure = np.array([q.exposure for q in requests], dtype=np.float64)
    sigma = np.array([q.sigma for q in requests], dtype=np.float64)
    parametric = parametric_var(sigma, exposure, horizon, lv)
    historical, windows = _historical(requests, exposure, lv, math.sqrt(horizon))
    if isinstance(requests[0].generator, McSampler):  # numpy: its fused sampler, one at a time
        mc = [mc_var(w if w.size else q.sigma, q.exposure, horizon, n_paths, lv,
                     generator=q.generator) for q, w in zip(requests, windows, strict=True)]
        return [{"parametric": parametric[i], "historical": historical[i], "mc": mc[i]}
                for i in range(n)]
    out = [{"parametric": parametric[i], "historical": historical[i]} for i in range(n)]
    sources = [w if w.size else check_mc_source(q.sigma) for q, w in zip(requests, windows, strict=True)]
    per_group = max(1, group_bytes // (8 * n_paths))
    for lo in range(0, len(requests), per_group):
        hi = min(lo + per_group, len(requests))
        picks = _mc_group(requests[lo:hi], sources[lo:hi], horizon, lv, n_paths, chunk_elements)
        xp = requests[0].generator
        if count_copy is not None and _on_gpu(xp):
            # in: the windows (the device's dtype) and, fused, 5 numbers a report; out: the picks
            item = np.dtype(str(xp.dtype).rsplit(".", 1)[-1]).itemsize
            boot = [s.shape[0] for s in sources[lo:hi] if s.ndim > 0]
            meta = 5 * 8 * len(boot) if boot and _fused_kernel(xp) is not None else 0
            count_copy("h2d", sum(boot) * item + meta)
            count_copy("d2h", picks.size * item)
        for i in range(lo, hi):
            out[i]["mc"] = picks[i - lo]
    return out


def _historical(requests: Sequence[VarRequest], exposure: np.ndarray, lv: np.ndarray,
                root_h: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Historical VaR of every request (``historical_var`` × √h) and its NaN-free window.

    The full windows without NaN (every report after a symbol's first ``var_window`` trades)
    are partitioned as one ``(reports, window)`` array: the same order statistics as one
    window at a time, in one call; the others one at a time."""
    n = len(requests)
    hist = np.empty((n, lv.shape[0]))
    windows = [np.asarray(q.returns, dtype=np.float64) for q in requests]
    lengths = np.array([w.shape[0] for w in windows])
    clean: list[np.ndarray | None] = [None] * n
    full = np.flatnonzero((lengths == lengths.max()) & (lengths > 0))
    if full.size > 1:
        stack = np.stack([windows[i] for i in full])
        ok = ~np.isnan(stack).any(axis=1)
        good = full[ok]
        if good.size:
            losses = -exposure[good, None] * stack[ok]
            k = _quantile_index(lv, stack.shape[1])
            hist[good] = np.partition(losses, k, axis=1)[:, k] * root_h
            for i in good.tolist():
                clean[i] = windows[i]
    for i in range(n):
        if clean[i] is None:
            w = windows[i]
            clean[i] = w = w[~np.isnan(w)]
            hist[i] = historical_var(w, exposure[i], lv) * root_h
    return hist, clean


def _on_gpu(xp: Any) -> bool:
    device = getattr(xp, "device", None)
    if device is not None:  # torch
        return device.type != "cpu"
    return getattr(xp, "dtype", None) is not None and xp.stream == xp.mx.gpu  # MLX


def report_key(seed: int, count: int) -> int:
    """The Philox key of a generator's ``count``-th report (splitmix64 of both; 63 bits)."""
    m = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(count) + 1) * 0xD1B54A32D192ED03) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _mc_group(requests: Sequence[VarRequest], sources: list[np.ndarray], horizon: int,
              lv: np.ndarray, n_paths: int, chunk_elements: int) -> np.ndarray:
    """The Monte Carlo quantiles of a few reports, shape ``(reports, levels)``, float64."""
    xp = requests[0].generator
    k = _quantile_index(lv, n_paths)
    # every bootstrap window in one host→device copy; each report reads its slice there
    boot = [s for s in sources if s.ndim > 0]
    fused = _fused_kernel(xp) if boot and n_paths * horizon < (1 << 62) else None
    with xp.scope():
        joined = xp.asarray(np.concatenate(boot)) if boot else None
        if fused is not None:
            return _fused_group(xp, fused, requests, sources, joined, horizon, n_paths,
                                chunk_elements, k)
        rows, offset = [], 0
        for q, s in zip(requests, sources, strict=True):
            if s.ndim > 0:
                r_dev, sigma = joined[offset : offset + s.shape[0]], 0.0
                offset += s.shape[0]
            else:
                r_dev, sigma = None, float(s)
            _count(q.generator)
            parts = device_losses(q.generator, r_dev, sigma, q.exposure, horizon, n_paths,
                                  chunk_elements)
            rows.append(parts)
        return _sorted_picks(xp, rows, k)


def _count(gen: Any) -> int:
    """The generator's report count before this report (and one more after it)."""
    n = getattr(gen, "reports", 0)
    gen.reports = n + 1
    return n


def _fused_group(xp, kernel, requests, sources, joined, horizon, n_paths, chunk_elements, k):
    torch = xp.torch
    meta, scale = [], []
    losses = torch.empty((len(requests), n_paths), dtype=torch.float64, device=xp.device)
    offset = 0
    for row, (q, s) in enumerate(zip(requests, sources, strict=True)):
        key = report_key(q.generator.seed, _count(q.generator))
        if s.ndim > 0:
            meta.append((row, offset, s.shape[0], key))
            scale.append(q.exposure)
            offset += s.shape[0]
        else:  # σ paths: the unfused draws of this report's generator
            parts = device_losses(q.generator, None, float(s), q.exposure, horizon, n_paths,
                                  chunk_elements)
            losses[row] = torch.cat(parts) if len(parts) > 1 else parts[0]
    bootstrap_losses(kernel, joined, np.asarray(meta, dtype=np.int64),
                     np.asarray(scale, dtype=np.float64), horizon, n_paths, losses)
    s = torch.sort(losses, dim=1).values
    return s[:, torch.as_tensor(k, device=xp.device)].to("cpu", dtype=torch.float64).numpy()


def bootstrap_losses(kernel, returns, meta: np.ndarray, exposure: np.ndarray, horizon: int,
                     n_paths: int, out) -> None:
    """Launch the fused kernel: row ``meta[i, 0]`` of ``out`` gets the ``n_paths`` losses of
    exposure ``exposure[i]`` bootstrapped over ``horizon`` steps from
    ``returns[meta[i, 1] : meta[i, 1] + meta[i, 2]]`` with Philox key ``meta[i, 3]``."""
    torch = __import__("torch")
    dev = out.device
    m = torch.as_tensor(meta, device=dev)
    e = torch.as_tensor(exposure, device=dev)
    block = 256
    grid = (-(-n_paths // block), meta.shape[0])
    kernel[grid](returns, m, e, out, n_paths, horizon, -(-horizon // 4), BLOCK=block)


def _fused_kernel(xp: Any) -> Any:
    """The Triton kernel for ``xp`` (a torch CUDA generator; CPU under TRITON_INTERPRET=1),
    or None: MLX, torch CPU, no Triton."""
    torch = getattr(xp, "torch", None)
    if torch is None:
        return None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if xp.device.type != "cuda" and not interpret:
        return None
    return _build_kernel(interpret)


@functools.cache
def _build_kernel(interpret: bool) -> Any:
    try:
        from . import var_triton
    except ImportError:  # no Triton
        return None
    return var_triton.bootstrap_kernel


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
