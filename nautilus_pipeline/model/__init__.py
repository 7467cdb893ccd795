"""The inference model: one MLP spec + weights, run on numpy, torch, MLX or Core ML.

``ModelSpec``/``MLPWeights`` describe the model; ``make_runner(backend, spec, weights)``
runs it on a backend; ``calibrate`` measures the backends and routes each batch size to the
fastest; ``export`` turns a user's torch module into Core ML / ``.npz`` / safetensors.
"""

from .base import ModelRunner
from .runners import (
    BACKENDS,
    Calibration,
    calibrate,
    make_runner,
    runner_usable,
)
from .spec import (
    MLPWeights,
    ModelSpec,
    check_inputs,
    load_default_model,
    load_model,
    random_weights,
    save_model,
)

__all__ = [
    "BACKENDS",
    "Calibration",
    "MLPWeights",
    "ModelRunner",
    "ModelSpec",
    "calibrate",
    "check_inputs",
    "load_default_model",
    "load_model",
    "make_runner",
    "random_weights",
    "runner_usable",
    "save_model",
]
