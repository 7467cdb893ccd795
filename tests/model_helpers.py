"""Shared inputs for the model tests: a 50-input spec, random weights, realistic rows."""

from __future__ import annotations

import numpy as np

from nautilus_pipeline.kernels.mlp import mlp_reference
from nautilus_pipeline.model.spec import MLPWeights, ModelSpec, random_weights

FP32_ATOL = 1e-5
"""float32 backends vs the float64 reference, probability units (seen: ≤ 1.2e-6)."""
FP16_ATOL = 5e-3
"""float16 weights/compute vs float64 (seen: ≤ 2.8e-3 for inputs within ±3σ)."""
BF16_ATOL = 3e-2
"""bfloat16 compute vs float64 (seen: ≤ 2.2e-2)."""
INT8_ATOL = 0.1
"""int8 per-row weights, max over rows within ±3σ (seen: ≤ 0.052); mean stays < INT8_MEAN."""
INT8_MEAN = 0.01

SPEC = ModelSpec(tuple(f"f{i}" for i in range(50)))


def weights(seed: int = 0, spec: ModelSpec = SPEC) -> MLPWeights:
    return random_weights(spec, seed)


def rows(w: MLPWeights, n: int, seed: int = 1, spread: float = 3.0) -> np.ndarray:
    """``n`` float32 raw feature rows around the model's mean, ``spread`` standard deviations wide."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, w.mean.shape[0])) * spread
    return (z * w.std + w.mean).astype(np.float32)


def reference(spec: ModelSpec, w: MLPWeights, x: np.ndarray) -> np.ndarray:
    return mlp_reference(x, w.mean, w.std, w.weights, w.biases, spec.activation)
