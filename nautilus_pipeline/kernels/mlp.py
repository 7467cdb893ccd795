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


@njit(cache=True, nogil=True)
def _small_input(feats, n, mean, inv_std, h):
    """Rows ``[0, n)`` of float64 ``feats`` cast to float32 and normalised into ``h``; the
    padding rows of ``h`` zero, normalised (what the padded BLAS path computes for them)."""
    k = h.shape[1]
    for i in range(h.shape[0]):
        for j in range(k):
            x = np.float32(feats[i, j]) if i < n else np.float32(0.0)
            h[i, j] = (x - mean[j]) * inv_std[j]


@njit(cache=True, nogil=True)
def _small_bias_relu(h, b):
    for i in range(h.shape[0]):
        for j in range(h.shape[1]):
            v = h[i, j] + b[j]
            h[i, j] = v if v >= np.float32(0.0) or v != v else np.float32(0.0)  # np.maximum's rule


@njit(cache=True, nogil=True)
def _small_logit_half(h, b, z):
    for i in range(z.shape[0]):
        z[i] = (h[i, 0] + b[0]) * np.float32(0.5)


@njit(cache=True, nogil=True)
def _small_finish(t, n, out):
    for i in range(n):
        out[i] = (t[i] + np.float32(1.0)) * np.float32(0.5)


class SmallForward:
    """:func:`mlp_forward` for a live batch of at most ``rows`` rows, padded to ``rows``, as
    few calls as it can be (relu models): one numba call for the cast, padding and
    normalisation, per layer BLAS's ``matmul`` on the same padded shape and one numba call
    for bias and activation, numpy's ``tanh`` for the sigmoid. The float32 operations are
    those of :func:`mlp_forward` on the same operands (IEEE add, multiply and max round the
    same in numba and numpy; no fused multiply-add), and the products are the same BLAS
    call on the same shape, so the output is the same to the bit (tested). It replaced ~20
    numpy calls, a copy, a pad and the checks around them: ~60 → ~15 µs a live row.
    """

    def __init__(self, ws: MLPWorkspace, rows: int) -> None:
        if ws.activation != "relu":
            raise ValueError("SmallForward covers relu models; others take mlp_forward")
        self.rows = rows
        widths = [ws.n_inputs, *(m.shape[1] for m in ws.mats)]
        self.h = [np.zeros((rows, w), dtype=F32) for w in widths]
        self.mean, self.inv_std = ws.mean, ws.inv_std
        self.mats, self.biases = ws.mats, ws.biases
        self.z = np.empty(rows, dtype=F32)

    def __call__(self, feats: np.ndarray, n: int, out: np.ndarray) -> None:
        """Probabilities of rows ``[0, n)`` of float64 ``feats`` [≥ n, k] into ``out[:n]``."""
        h = self.h
        _small_input(feats, n, self.mean, self.inv_std, h[0])
        last = len(self.mats) - 1
        for i in range(last):
            nxt = h[i + 1]
            np.matmul(h[i], self.mats[i], out=nxt)
            _small_bias_relu(nxt, self.biases[i])
        np.matmul(h[last], self.mats[last], out=h[last + 1])
        z = self.z
        _small_logit_half(h[last + 1], self.biases[last], z)
        np.tanh(z, out=z)
        _small_finish(z, n, out)
