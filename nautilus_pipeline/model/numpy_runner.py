"""The ``numpy`` / ``cpu`` backend: :mod:`nautilus_pipeline.kernels.mlp` behind the runner API.

Always usable (numpy is a core dependency), so it is the last entry of every fallback list.
"""

from __future__ import annotations

import numpy as np

from ..kernels.mlp import MLPWorkspace, RowOrderForward, mlp_forward
from .base import ModelRunner
from .spec import MLPWeights, ModelSpec


class NumpyRunner(ModelRunner):
    """float32 matrix products with preallocated buffers; one instance per thread."""

    backend = "numpy"

    def __init__(self, spec: ModelSpec, weights: MLPWeights, capacity: int = 256) -> None:
        weights.check(spec)
        self.spec = spec
        self.name = "numpy"
        self._ws = MLPWorkspace(
            weights.mean, weights.std, weights.weights, weights.biases, spec.activation, capacity
        )

        self._fixed: RowOrderForward | None = None

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """See :meth:`ModelRunner.predict`; allocates only the result (or nothing with ``out``)."""
        return mlp_forward(self._ws, self._features(x), out)

    def predict_tiled(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Through :class:`~nautilus_pipeline.kernels.mlp.RowOrderForward`, whose sums run
        in one written-down order: BLAS gives a row other bits in another position of a
        call of the same size (sgemv for the one-column output layer), so tiles do not
        suffice here."""
        a = self._features(x)
        if self._fixed is None:
            self._fixed = RowOrderForward(self._ws)
        self._fixed(a, a.shape[0], out)
        return out
