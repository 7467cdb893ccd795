"""The MLX backends: ``mlx:gpu`` (Metal on a Mac, CUDA with the ``mlx[cuda]`` build) and ``mlx:cpu``.

The model is an ``mlx.nn.Module`` holding the same tensors as the safetensors file
(``layers.{i}.weight`` ``(out, in)``, like ``mlx.nn.Linear``). Ops are issued with
``stream=<device>``, the device's default stream, rather than a stream made by
``mx.new_stream``: recent MLX ties a new stream to the thread that created it
(BACKENDS.md), and the runtime may call ``predict`` from an executor thread.

float32 on a GPU. MLX runs float32 matrix products as TF32 on GPUs with matrix units
(``MLX_ENABLE_TF32``, default 1: its CUDA build on the H200, M5-class Macs), a 10-bit
mantissa for the operands: that was the 5.3e-4 (``bench_inference`` ``max err``) of
``mlx:gpu`` against float64 where every float32 backend lands at ~4e-7. Measured on the
lent H200, MLX 0.32.4, a fresh process each (``scripts/gpu_check.sh``,
``docs/measurements/gpu_tests_mlx_h200.txt``):

=================  ========================  ===============================
MLX_ENABLE_TF32    128×128 matmul rel. err   this model, max err, 4096 rows
=================  ========================  ===============================
1 (MLX default)    2.4e-4                    1.3e-3
0 (set here)       3.3e-7                    5.3e-7
=================  ========================  ===============================

So this module sets ``MLX_ENABLE_TF32=0`` unless the user set it. MLX reads the variable at
its first matrix product and keeps it for the process, so it must be set before any MLX
GEMM; :func:`mlx_tf32_error` measures which mode the process got, and a float32 GPU runner
logs ``mlx_tf32_active`` when it finds TF32 (an earlier MLX matmul latched it on).
``tests/test_model_backends.py`` holds ``mlx:gpu`` to the float32 tolerance, 1e-5. With it
off, ``mlx:gpu`` ran 3.3M rows/s at batch 4096 on the H200 (TF32's speed on this model was
not measured beside it).

``compile=True`` wraps the forward in ``mx.compile`` (one trace per batch shape, ~0.5 s for
the first, cached after). ``shapeless=True`` was tried and rejected: with MLX 0.32.4 on Linux
CPU a shapeless-compiled pair of ``Linear`` layers corrupts the heap when a smaller batch
follows a larger one (``double free or corruption``). Measured here, compiling saved ~10 %
at batch 1 and nothing at large batches, so it is off by default. ``predict`` evaluates
before converting, so the numpy result is final.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
import structlog

from ..errors import BackendUnavailableError, ConfigError
from .base import ModelRunner, write_out
from .spec import MLPWeights, ModelSpec

# Before the first MLX matrix product of the process (see the module docstring).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

log = structlog.get_logger("nautilus_pipeline.mlx_runner")

try:
    import mlx.core as mx
    import mlx.nn as mnn
except ImportError:  # pragma: no cover - exercised where mlx is not installed
    mx = None  # type: ignore[assignment]
    mnn = None  # type: ignore[assignment]


def mlx_usable(device: str) -> tuple[bool, str]:
    """Whether ``mlx:<device>`` can run here, and why not (``compute.registry`` decides)."""
    from ..compute import usable

    return usable(f"mlx:{device}")


def mlx_tf32_error(device: str = "gpu") -> float:
    """Relative error of a float32 128×128 MLX matmul on ``device`` against float64.

    ~1e-7 when the product runs in float32, ~5e-4 when it runs in TF32. Fresh random inputs
    each call, scaled so the product's entries are of order one.
    """
    rng = np.random.default_rng()
    a = rng.standard_normal((128, 128)).astype(np.float32)
    b = rng.standard_normal((128, 128)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    dev = mx.cpu if device == "cpu" else mx.gpu
    got = mx.matmul(mx.array(a), mx.array(b), stream=dev)
    mx.eval(got)
    err = np.abs(np.array(got).astype(np.float64) - exact).max()
    return float(err / np.abs(exact).max())


if mnn is not None:

    class MLXMLP(mnn.Module):
        """``(x - mean) / std`` → Linear/act … → Linear → sigmoid, output ``[n, 1]``."""

        def __init__(self, spec: ModelSpec, dtype: Any) -> None:
            super().__init__()
            k = spec.n_inputs
            self.norm = {"mean": mx.zeros((k,)), "std": mx.ones((k,))}
            sizes = spec.layer_sizes
            self.layers = [mnn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
            self.activation = {"relu": mnn.relu, "tanh": mx.tanh, "silu": mnn.silu}[spec.activation]
            self.compute_dtype = dtype

        def __call__(self, x: mx.array) -> mx.array:
            h = ((x - self.norm["mean"]) / self.norm["std"]).astype(self.compute_dtype)
            for layer in self.layers[:-1]:
                h = self.activation(layer(h))
            return mx.sigmoid(self.layers[-1](h)).astype(mx.float32)


def build_mlx_mlp(spec: ModelSpec, weights: MLPWeights, dtype: str = "float32") -> MLXMLP:
    """The model as an MLX module; ``dtype`` float16/bfloat16 applies to the dense layers."""
    ok, why = mlx_usable("cpu")
    if not ok:
        raise BackendUnavailableError(why)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"mlx dtype {dtype!r} is not float32, float16 or bfloat16")
    weights.check(spec)
    mdtype = getattr(mx, dtype)
    model = MLXMLP(spec, mdtype)
    params: dict[str, Any] = {
        "norm": {"mean": mx.array(weights.mean), "std": mx.array(weights.std)},
        "layers": [
            {"weight": mx.array(w).astype(mdtype), "bias": mx.array(b).astype(mdtype)}
            for w, b in zip(weights.weights, weights.biases, strict=True)
        ],
    }
    model.update(params)
    mx.eval(model.parameters())
    return model


class MLXRunner(ModelRunner):
    """MLX on ``cpu`` or ``gpu``, eager or ``mx.compile``-d per batch shape."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: MLPWeights,
        device: str = "cpu",
        *,
        dtype: str = "float32",
        compile: bool = False,
    ) -> None:
        ok, why = mlx_usable(device)
        if not ok:
            raise BackendUnavailableError(f"mlx:{device}: {why}")
        self.spec = spec
        self.backend = f"mlx:{device}"
        self.name = self.backend + ("/compiled" if compile else "/eager")
        if dtype != "float32":
            self.name += f"/{dtype}"
        self._device = mx.cpu if device == "cpu" else mx.gpu
        self._model = build_mlx_mlp(spec, weights, dtype)
        self._fn = mx.compile(self._model) if compile else self._model
        self.tf32 = False
        if device == "gpu" and dtype == "float32":
            err = mlx_tf32_error(device)
            self.tf32 = err > 1e-5
            if self.tf32:
                log.warning(
                    "mlx_tf32_active", runner=self.name, matmul_rel_err=err,
                    env=os.environ.get("MLX_ENABLE_TF32"),
                    why="MLX runs float32 matmuls as TF32: outputs ~5e-4 from float64; set "
                    "MLX_ENABLE_TF32=0 before the process's first MLX matmul",
                )

    def predict_tiled(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """See :meth:`ModelRunner.predict_tiled`: the tiles built lazily, then one evaluation
        for all of them (the base class's loop paid a synchronisation per tile)."""
        a = self._features(x)
        n, t = a.shape[0], self.tile_rows
        if n == 0:
            return out
        if n % t:
            a = np.concatenate((a, np.zeros((t - n % t, a.shape[1]), np.float32)))
        with mx.stream(self._device):
            xs = mx.array(a)
            ys = [self._fn(xs[i:i + t]) for i in range(0, a.shape[0], t)]
            mx.eval(*ys)
        for i, y in enumerate(ys):
            m = min(t, n - i * t)
            out[i * t:i * t + m] = np.array(y).reshape(-1)[:m]
        return out

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """See :meth:`ModelRunner.predict`; evaluates on this runner's device before returning."""
        a = self._features(x)
        if a.shape[0] == 0:
            return write_out(np.empty(0, np.float32), out)
        with mx.stream(self._device):
            y = self._fn(mx.array(a))
            mx.eval(y)
        return write_out(np.array(y), out)
