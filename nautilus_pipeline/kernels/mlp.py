"""The MLP forward pass as plain float32 matrix products (the numpy / ``cpu`` backend).

Why numpy at all, beside torch and MLX: for a 50→128→64→32→1 MLP at batch 1 the work is
~17K multiply-adds, far less than any framework's per-call overhead. Measured on a Xeon
(``scripts/bench_inference.py``): numpy is the fastest CPU path at batch 1 and close to
torch at large batches, where BLAS does the work for both.

To keep batch-1 calls cheap every intermediate lives in a :class:`MLPWorkspace` allocated
once (and grown, never shrunk, when a larger batch arrives); each op writes with ``out=``.
Blocking large batches into 256-row pieces was measured and gained nothing (2.0-2.3M rows/s
either way at batch 4096 with one BLAS thread). What did matter: OpenBLAS's own threads. On
the 2-core machine here, with a neighbouring process busy, numpy at batch 4096 swung between
0.1M and 2.7M rows/s with two BLAS threads and held ~2.1M with ``OPENBLAS_NUM_THREADS=1``;
the compute stream that owns this kernel should pin BLAS threads (threadpoolctl) on a shared box.
A workspace is not thread-safe: one per compute stream, as the stage runner uses them.

The math, with ``W_i`` stored ``(out, in)`` like ``torch.nn.Linear``::

    h0 = (x - mean) / std
    h_{i+1} = act(h_i @ W_i.T + b_i)        (hidden layers)
    p = sigmoid(h_L @ W_L.T + b_L)          (one column: probability of an up move)

The sigmoid is computed as ``0.5 * (1 + tanh(z / 2))``: identical in exact arithmetic,
and it never overflows ``exp`` for large ``|z|``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from .addresses import ArrayTable, array1d, array2d, column, column2d, entry_point

F32 = np.float32


class MLPWorkspace:
    """Pre-transposed float32 weights and scratch buffers for :func:`mlp_forward`."""

    __slots__ = ("activation", "biases", "capacity", "inv_std", "mats", "mean", "scratch")

    def __init__(
        self,
        mean: np.ndarray,
        std: np.ndarray,
        weights: Sequence[np.ndarray],
        biases: Sequence[np.ndarray],
        activation: str = "relu",
        capacity: int = 1,
    ) -> None:
        self.mean = np.ascontiguousarray(mean, dtype=F32)
        self.inv_std = (np.float64(1.0) / np.asarray(std, dtype=np.float64)).astype(F32)
        self.mats = [np.ascontiguousarray(np.asarray(w, dtype=F32).T) for w in weights]
        self.biases = [np.ascontiguousarray(b, dtype=F32) for b in biases]
        if activation not in ("relu", "tanh", "silu"):
            raise ValueError(f"activation {activation!r} is not relu, tanh or silu")
        self.activation = activation
        self.capacity = 0
        self.scratch: list[np.ndarray] = []
        self.reserve(capacity)

    @property
    def n_inputs(self) -> int:
        """Columns the first layer expects."""
        return self.mats[0].shape[0]

    def reserve(self, n: int) -> None:
        """Make the buffers hold at least ``n`` rows (allocates only when growing)."""
        if n <= self.capacity:
            return
        widths = [self.n_inputs, *(m.shape[1] for m in self.mats)]
        extra = [max(widths[1:-1], default=1)] if self.activation == "silu" else []
        self.scratch = [np.empty((n, w), dtype=F32) for w in [*widths, *extra]]
        self.capacity = n


def _activate(h: np.ndarray, kind: str, tmp: np.ndarray | None) -> None:
    """Hidden activation in place."""
    if kind == "relu":
        np.maximum(h, 0.0, out=h)
    elif kind == "tanh":
        np.tanh(h, out=h)
    else:  # silu: h * sigmoid(h)
        assert tmp is not None
        t = tmp[:, : h.shape[1]]
        np.multiply(h, 0.5, out=t)
        np.tanh(t, out=t)
        np.add(t, 1.0, out=t)
        np.multiply(t, 0.5, out=t)
        np.multiply(h, t, out=h)


def mlp_forward(ws: MLPWorkspace, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Probability of an up move per row of ``x`` (float32 ``[n, k]`` raw features).

    Returns ``out`` (float32 ``[n]``) if given, else a new array; never a view of the
    workspace, so results stay valid across calls.
    """
    n = x.shape[0]
    if x.ndim != 2 or x.shape[1] != ws.n_inputs:
        raise ValueError(f"expected features of shape [n, {ws.n_inputs}], got {x.shape}")
    if out is None:
        out = np.empty(n, dtype=F32)
    if n == 0:
        return out
    ws.reserve(n)
    h = ws.scratch[0][:n]
    np.subtract(x, ws.mean, out=h, casting="same_kind")
    np.multiply(h, ws.inv_std, out=h)
    last = len(ws.mats) - 1
    tmp = ws.scratch[-1][:n] if ws.activation == "silu" else None
    for i, (m, b) in enumerate(zip(ws.mats, ws.biases, strict=True)):
        nxt = ws.scratch[i + 1][:n]
        np.matmul(h, m, out=nxt)
        np.add(nxt, b, out=nxt)
        if i < last:
            _activate(nxt, ws.activation, tmp)
        h = nxt
    z = h[:, 0]
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    np.add(out, 1.0, out=out)
    np.multiply(out, 0.5, out=out)
    return out


def mlp_reference(
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    activation: str = "relu",
) -> np.ndarray:
    """Plain float64 forward pass, no buffers: the reference the backends are tested against."""
    h = (np.asarray(x, np.float64) - mean) / np.asarray(std, np.float64)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = h @ np.asarray(w, np.float64).T + b
        if i < len(weights) - 1:
            if activation == "relu":
                h = np.maximum(h, 0.0)
            elif activation == "tanh":
                h = np.tanh(h)
            else:
                h = h / (1.0 + np.exp(-h))
    return 1.0 / (1.0 + np.exp(-h[:, 0]))


TILE = 4
"""Rows per tile of :class:`RowOrderForward` (they share each weight row's loads)."""
ACTIVATIONS = {"relu": 1, "tanh": 2, "silu": 3}
"""The hidden activation's code in :class:`RowOrderForward`'s layout (its last entry)."""


@njit(cache=True, nogil=True, inline="always")
def _act(v, act):
    """A hidden unit's activation: relu with ``np.maximum``'s rule for NaN, tanh, or silu
    as ``v·½(1 + tanh(v/2))`` (the sigmoid :func:`mlp_forward` uses)."""
    if act == 1:
        return v if v >= np.float32(0.0) or v != v else np.float32(0.0)
    if act == 2:
        return np.tanh(v)
    if act == 3:
        return v * ((np.tanh(v * np.float32(0.5)) + np.float32(1.0)) * np.float32(0.5))
    return v


@njit(cache=True, nogil=True)
def _dense_tile(src, width, w, b, dst, act):
    """``dst[r, j] = act(b[j] + Σ_k src[r, k]·w[k, j])`` for the ``TILE`` rows of a tile, the
    sum in ONE order for every row: ``0 + p_0 + p_1 + … + p_{width−1}`` (separate float32
    multiplies and adds, no reassociation), then the bias, then the activation (:func:`_act`). The loop over ``j`` is what the compiler vectorises (outputs side by side);
    four ``k`` per pass cut the loads and stores of ``dst`` to a quarter, the order staying
    the same (1.6 vs 2.2 ms at 4,096 rows for two per pass, dev VM)."""
    m = w.shape[1]
    d0, d1, d2, d3 = dst[0], dst[1], dst[2], dst[3]
    s0, s1, s2, s3 = src[0], src[1], src[2], src[3]
    for j in range(m):
        d0[j] = d1[j] = d2[j] = d3[j] = np.float32(0.0)
    k = 0
    while k + 4 <= width:
        x0, x1, x2, x3 = s0[k], s0[k + 1], s0[k + 2], s0[k + 3]
        y0, y1, y2, y3 = s1[k], s1[k + 1], s1[k + 2], s1[k + 3]
        u0, u1, u2, u3 = s2[k], s2[k + 1], s2[k + 2], s2[k + 3]
        v0, v1, v2, v3 = s3[k], s3[k + 1], s3[k + 2], s3[k + 3]
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        for j in range(m):
            a, c, e, g = w0[j], w1[j], w2[j], w3[j]
            d0[j] = (((d0[j] + x0 * a) + x1 * c) + x2 * e) + x3 * g
            d1[j] = (((d1[j] + y0 * a) + y1 * c) + y2 * e) + y3 * g
            d2[j] = (((d2[j] + u0 * a) + u1 * c) + u2 * e) + u3 * g
            d3[j] = (((d3[j] + v0 * a) + v1 * c) + v2 * e) + v3 * g
        k += 4
    while k < width:
        x0, y0, u0, v0 = s0[k], s1[k], s2[k], s3[k]
        w0 = w[k]
        for j in range(m):
            a = w0[j]
            d0[j] = d0[j] + x0 * a
            d1[j] = d1[j] + y0 * a
            d2[j] = d2[j] + u0 * a
            d3[j] = d3[j] + v0 * a
        k += 1
    for r in range(TILE):
        d = dst[r]
        for j in range(m):
            d[j] = _act(d[j] + b[j], act)


@njit(cache=True, nogil=True)
def _dense_row(s0, width, w, b, d0, act):
    """One row of :func:`_dense_tile`, its sums in the same order (so the same bits): the
    rows of a batch that do not fill a tile, a live tick's row above all (a tile of four
    computed for one row cost three rows of work for nothing: 1.6 of the kernel's 1.8 µs)."""
    m = w.shape[1]
    for j in range(m):
        d0[j] = np.float32(0.0)
    k = 0
    while k + 4 <= width:
        x0, x1, x2, x3 = s0[k], s0[k + 1], s0[k + 2], s0[k + 3]
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        for j in range(m):
            d0[j] = (((d0[j] + x0 * w0[j]) + x1 * w1[j]) + x2 * w2[j]) + x3 * w3[j]
        k += 4
    while k < width:
        x0 = s0[k]
        w0 = w[k]
        for j in range(m):
            d0[j] = d0[j] + x0 * w0[j]
        k += 1
    for j in range(m):
        d0[j] = _act(d0[j] + b[j], act)


@njit(cache=True, nogil=True)
def _mlp_rows(feats, n, params, layout, ha, hb, out):
    """Probabilities of rows ``[0, n)`` of float64 ``feats`` into ``out``: each row cast to
    float32 and normalised, the hidden layers (their activation), the output unit and the sigmoid
    ``0.5·(1 + tanh(z/2))``, ``TILE`` rows at a time and the rows after the last whole tile
    one by one (:func:`_dense_row`, the same sums). Every row takes the same operations
    whatever ``n`` is and wherever it falls, so its bits do not depend on the batch.

    ``params`` holds mean, 1/std, then each layer's ``(in, out)`` weights and its bias, flat;
    ``layout`` the widths ``[in, h1, …, 1]`` then the activation's code (one argument each: a live row's call costs
    the dispatch of ~7 arguments, not of 14 arrays)."""
    k0 = layout[0]
    mean, inv_std = params[:k0], params[k0 : 2 * k0]
    act = layout[layout.shape[0] - 1]
    last = layout.shape[0] - 3
    i0 = 0
    while i0 < n:
        rows = TILE if n - i0 >= TILE else 1  # whole tiles, then the rest row by row
        for r in range(rows):
            for k in range(k0):
                ha[r, k] = (np.float32(feats[i0 + r, k]) - mean[k]) * inv_std[k]
        src, dst = ha, hb
        at = 2 * k0
        for layer in range(last):
            width, m = layout[layer], layout[layer + 1]
            w = params[at : at + width * m].reshape((width, m))
            b = params[at + width * m : at + width * m + m]
            if rows == TILE:
                _dense_tile(src, width, w, b, dst, act)
            else:
                _dense_row(src[0], width, w, b, dst[0], act)
            at += width * m + m
            src, dst = dst, src
        width, m = layout[last], layout[last + 1]
        b0 = params[at + width * m]
        for r in range(rows):
            z = np.float32(0.0)
            for k in range(width):
                z = z + src[r, k] * params[at + k * m]
            z = (z + b0) * np.float32(0.5)
            out[i0 + r] = (np.tanh(z) + np.float32(1.0)) * np.float32(0.5)
        i0 += rows


class RowOrderForward:
    """The MLP forward pass (relu, tanh or silu hidden layers) in one numba call, bit for bit the same for a row
    whatever the batch it comes in.

    Why not BLAS. BLAS picks its kernels by the shape of the product: OpenBLAS sums a row
    of a 1-row product (sgemv) and of a tail block in another float32 order than rows of a
    large block, so the same row gave other bits at batch 1 than at 4096. Padding rows to
    16 hid that on the SkylakeX kernels of the first dev VM; on the Haswell kernels (AMD
    EPYC) padded blocks of 16 still differed from batch 4,096 (tests/test_engine_inline.py
    failed). Here the order of every sum is written down (:func:`_dense_tile`), so batch 1
    and 4,096 agree by construction, and a live row costs one call with no padding.
    ``scripts/bench_inference.py --fixed-order`` (2-core dev VM, loaded, one BLAS thread,
    medians): 1 row 2.4-3.4 µs vs 22-31 µs for the padded BLAS products, 16 rows 7.7-10.7 vs
    22-32 µs; from 256 rows 1.2-1.8× BLAS's time (BLAS's kernels use fused multiply-adds;
    ``fastmath="contract"`` here gained nothing measurable; ``bench_pipeline.py --offload``
    and ``docs/measurements/dev_bench_inference_fixed_order.txt``). Against the
    float64 reference it agrees to float32 rounding as BLAS does (~2e-7 in probability).

    Scratch: two ``TILE`` × widest-layer float32 buffers, allocated once; not thread-safe
    (one instance per thread, as the inference stage keeps them).
    """

    def __init__(self, ws: MLPWorkspace) -> None:
        widths = [ws.n_inputs, *(m.shape[1] for m in ws.mats)]
        parts = [ws.mean, ws.inv_std]
        for m, b in zip(ws.mats, ws.biases, strict=True):
            parts += [np.ascontiguousarray(m, dtype=F32).ravel(), np.asarray(b, dtype=F32)]
        self.params = np.concatenate(parts).astype(F32)
        self.layout = np.asarray([*widths, ACTIVATIONS[ws.activation]], dtype=np.int64)
        self._ha = np.zeros((TILE, max(widths)), dtype=F32)
        self._hb = np.zeros((TILE, max(widths)), dtype=F32)
        #: The slab columns :meth:`live` reads and writes.
        self.live_columns = (("features", np.float64, ws.n_inputs), ("prediction", np.float32))
        self._table = ArrayTable(((self.params, F32), (self.layout, np.int64), (self._ha, F32),
                                  (self._hb, F32))).table
        self._live_call = None

    def __call__(self, feats: np.ndarray, n: int, out: np.ndarray) -> None:
        """Probabilities of rows ``[0, n)`` of float64 ``feats`` [≥ n, k] into ``out[:n]``."""
        _mlp_rows(feats, n, self.params, self.layout, self._ha, self._hb, out)

    def live(self, n: int, slab: np.ndarray) -> None:
        """:meth:`__call__` on rows ``[0, n)`` of the slab whose address table of
        ``live_columns`` is ``slab`` (:mod:`.addresses`): a live tick's call, straight
        into the kernel's entry point."""
        call = self._live_call
        if call is None:
            call = self._live_call = entry_point(_mlp_rows_live, n, slab, self._table)
        call(n, slab, self._table)


@njit(cache=True, nogil=True)
def _mlp_rows_live(n, slab, state):
    """:func:`_mlp_rows` with its arrays as two tables: the slab's columns and the
    forward pass's own (parameters, layout, the two scratch tiles)."""
    params, layout = array1d(state, 0, np.float32), array1d(state, 1, np.int64)
    ha, hb = array2d(state, 2, np.float32), array2d(state, 3, np.float32)
    _mlp_rows(column2d(slab, 0, layout[0], np.float64), n, params, layout, ha, hb,
              column(slab, 1, np.float32))
