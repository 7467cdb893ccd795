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


ACTIVATION_CODES = {"relu": 0, "tanh": 1, "silu": 2}
BLOCK_ROWS = 8  # rows a block carries through every layer (its activations stay in L1)


@njit(cache=True, nogil=True, inline="always")
def _dense(x, w, b, out, nr, act):
    """``out[:nr] = act(x[:nr] @ w + b)``, each output summed over ``k`` in index order."""
    k_in = w.shape[0]
    width = w.shape[1]
    for i in range(nr):
        o = out[i]
        for j in range(width):
            o[j] = np.float32(0.0)
    for k in range(k_in):
        wk = w[k]
        for i in range(nr):
            xv = x[i, k]
            o = out[i]
            for j in range(width):
                o[j] += xv * wk[j]
    for i in range(nr):
        o = out[i]
        for j in range(width):
            v = o[j] + b[j]
            if act == 0:
                v = v if v >= np.float32(0.0) or v != v else np.float32(0.0)
            elif act == 1:
                v = np.tanh(v)
            elif act == 2:
                v = v * ((np.tanh(v * np.float32(0.5)) + np.float32(1.0)) * np.float32(0.5))
            o[j] = v


@njit(cache=True, nogil=True)
def _forward_rows(feats, n, mean, inv_std, mats, biases, act, scratch, out):
    """Probabilities of rows ``[0, n)`` of float64 ``feats`` into ``out``, ``BLOCK_ROWS`` rows
    at a time through all layers; every row takes the same operations in the same order
    whatever ``n`` and its place in a block."""
    k0 = feats.shape[1]
    last = len(mats) - 1
    x = scratch[0]
    for r0 in range(0, n, BLOCK_ROWS):
        nr = min(BLOCK_ROWS, n - r0)
        for i in range(nr):
            for k in range(k0):
                x[i, k] = (np.float32(feats[r0 + i, k]) - mean[k]) * inv_std[k]
        for layer in range(last + 1):
            _dense(scratch[layer], mats[layer], biases[layer], scratch[layer + 1], nr,
                   act if layer < last else -1)
        z = scratch[last + 1]
        for i in range(nr):
            t = np.tanh(z[i, 0] * np.float32(0.5))
            out[r0 + i] = (t + np.float32(1.0)) * np.float32(0.5)


class RowForward:
    """The forward pass of :func:`mlp_forward` with the same math, in one numba call whose
    float32 operations for a row do not depend on the batch it came in: each product is
    summed over the inputs in index order (no BLAS, no fused multiply-add, no reordering),
    rows ``BLOCK_ROWS`` at a time. So a replay with batch size 1 and with batch size 4096
    gives the same predictions to the bit, on any CPU (tested).

    Why not BLAS: OpenBLAS picks its kernel by the matrix shape (on AVX-512 machines a
    small-matrix path, tail kernels for row counts that are not a multiple of its tile) and
    a row's sum then depends on the batch size *and* on the row's place in it; padding the
    rows to 16, the earlier rule, held on one CPU and not on the next. Cost, measured side
    by side on the 2-core dev VM, loaded (``scripts/bench_inference.py --default-model``):
    one row 4.4 µs p50 (the BLAS runner 15.4 µs); 1.0M rows/s at 256 and 4,096 rows, where
    the BLAS runner gave 2.3M and 0.44M (its threads fighting the load).
    ``MLPWorkspace`` gives the weights; the block buffers are allocated once.
    """

    def __init__(self, ws: MLPWorkspace) -> None:
        self.mean, self.inv_std = ws.mean, ws.inv_std
        self.mats = tuple(ws.mats)
        self.biases = tuple(ws.biases)
        self.act = ACTIVATION_CODES[ws.activation]
        widths = [ws.n_inputs, *(m.shape[1] for m in ws.mats)]
        self.scratch = tuple(np.zeros((BLOCK_ROWS, w), dtype=F32) for w in widths)

    def __call__(self, feats: np.ndarray, n: int, out: np.ndarray) -> None:
        """Probabilities of rows ``[0, n)`` of float64 ``feats`` [≥ n, k] into ``out[:n]``."""
        _forward_rows(feats, n, self.mean, self.inv_std, self.mats, self.biases, self.act,
                      self.scratch, out)
