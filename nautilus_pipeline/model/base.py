"""The one interface every backend's model runner implements.

A runner is synchronous on purpose: the core runtime decides on which compute stream /
executor thread a call runs and wraps it into asyncio; a runner only turns a float32
``[n, k]`` batch of raw features into float32 ``[n]`` probabilities of an up move.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import ConfigError
from .spec import ModelSpec

# Rows per call in :meth:`ModelRunner.predict_tiled` unless a runner says otherwise. A matrix
# product's float32 sums for one row can take another order when the row count changes:
# cuBLAS picks its kernel by shape (a replay's predictions on an H200 differed in the last
# bits between a batch of a file's end and the same rows mid-file). With every call of one
# row count, cuBLAS, MKL's torch:cpu and MLX on the CPU give a row the same bits wherever it
# falls (tests/test_model_tiles.py checks each backend it finds, on each host it runs on);
# OpenBLAS does not (a row's bits moved with its position in a 64-row call: sgemv for the
# one-column output layer), so the numpy runner goes through a fixed-order kernel instead.
TILE_ROWS = 256


class ModelRunner(ABC):
    """Runs one model on one backend. ``name`` says which (``"torch:cuda/graphs"``)."""

    backend: str
    name: str
    spec: ModelSpec
    tile_rows: int = TILE_ROWS

    @abstractmethod
    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (float32 ``[n]``) for raw features ``x`` (float32 ``[n, k]``).

        ``out``, if given, is filled and returned (no allocation for the result). The
        returned array never aliases the runner's internal buffers.
        """

    def predict_tiled(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """:meth:`predict`, with every row computed in a call of exactly ``tile_rows`` rows
        (the last tile padded), so a row's bits do not depend on its batch (``TILE_ROWS``).
        What the inference stage calls; a runner that tiles inside ``predict`` overrides it."""
        a = self._features(x)
        n, t = a.shape[0], self.tile_rows
        if n == 0:
            return out
        pad = getattr(self, "_tile_pad", None)
        if pad is None or pad.shape != (t, a.shape[1]):
            pad = self._tile_pad = np.zeros((t, a.shape[1]), np.float32)
        for start in range(0, n, t):
            m = min(t, n - start)
            if m == t:
                self.predict(a[start:start + t], out[start:start + t])
            else:
                pad[:m] = a[start:]
                out[start:start + m] = self.predict(pad)[:m]
        return out

    def close(self) -> None:
        """Release device memory / graphs; the runner is unusable afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} inputs={self.spec.n_inputs}>"

    def _features(self, x: np.ndarray) -> np.ndarray:
        """``x`` as C-contiguous float32 ``[n, k]`` (copies only when it must)."""
        a = np.asarray(x)
        if a.ndim == 1 and a.shape[0] == self.spec.n_inputs:
            a = a.reshape(1, -1)
        if a.ndim != 2 or a.shape[1] != self.spec.n_inputs:
            raise ConfigError(
                f"{self.name}: features must be [n, {self.spec.n_inputs}] "
                f"({self.spec.input_names[0]}…{self.spec.input_names[-1]}), got {a.shape}"
            )
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=np.float32)
        return a


def write_out(result: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Return ``result`` as float32 ``[n]``, copied into ``out`` when one is given."""
    r = result.reshape(-1)
    if out is None:
        return r if r.dtype == np.float32 else r.astype(np.float32)
    np.copyto(out, r, casting="same_kind")
    return out


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest fixed batch shape ``>= n`` (CUDA graphs, Core ML enumerated shapes), or None."""
    for b in buckets:
        if b >= n:
            return b
    return None
