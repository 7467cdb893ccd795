"""A row's prediction has the same bits whatever batch it falls in, on every backend.

Why: a matrix product's float32 sums for a row may take another order when the row count
changes (BLAS tail kernels, cuBLAS's choice of kernel by shape). On an H200 the per-batch-size
CUDA graphs gave a batch replay's merged signals other last bits than one sequential run over
the same files. ``ModelRunner.predict_tiled`` (what the inference stage calls) computes every
row in a call of one tile size; here 5,000 rows are predicted whole and cut into batches of
1, 7, 300, 4,096 rows and at an odd offset, and every cut must give the whole run's bits.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_helpers import SPEC, reference, rows, weights

from nautilus_pipeline.model.runners import make_runner, runner_usable
from nautilus_pipeline.model.spec import ModelSpec


def _on(backend: str, options: dict, id: str, gpu: bool = False):
    """A backend's case, skipped at collection with the reason it cannot run here (no
    device of that kind, a library missing, Core ML prediction off macOS)."""
    ok, why = runner_usable(backend)
    marks = [pytest.mark.skipif(not ok, reason=f"{backend}: {why}")] + ([pytest.mark.gpu] if gpu else [])
    return pytest.param(backend, options, id=id, marks=marks)


BACKENDS = [
    _on("numpy", {}, "numpy"),
    _on("torch:cpu", {}, "torch-cpu"),
    _on("torch:cpu", {"mode": "script"}, "torch-cpu-script"),
    _on("mlx:cpu", {}, "mlx-cpu"),
    _on("mlx:cpu", {"compile": True}, "mlx-cpu-compiled"),
    _on("torch:cuda", {}, "torch-cuda", gpu=True),
    _on("torch:cuda", {"cuda_graphs": False}, "torch-cuda-eager", gpu=True),
    # 8-row tiles, graphs of 1 and 3 tiles: every path of the graph choice and the partial tile
    _on("torch:cuda", {"tile_rows": 8, "graph_tiles": (1, 3)}, "torch-cuda-small-tiles", gpu=True),
    _on("mlx:gpu", {}, "mlx-gpu", gpu=True),
    _on("torch:mps", {}, "torch-mps", gpu=True),
    _on("coreml:all", {}, "coreml-all"),
]
CUTS = [1, 7, 300, 4096]


def _tiled(runner, x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], np.float32)
    assert runner.predict_tiled(x, out) is out
    return out


def _cut(runner, x: np.ndarray, sizes) -> np.ndarray:
    parts, start = [], 0
    for size in sizes:
        parts.append(_tiled(runner, x[start:start + size].copy()))
        start += size
    return np.concatenate(parts)


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "silu"])
def test_a_rows_prediction_does_not_depend_on_its_batch(backend: str, options: dict, activation: str) -> None:
    spec = ModelSpec(input_names=SPEC.input_names, hidden=SPEC.hidden, activation=activation)
    w = weights(1, spec)
    x = rows(w, 5000)
    runner = make_runner(backend, spec, w, **options)
    whole = _tiled(runner, x)
    np.testing.assert_allclose(whole, reference(spec, w, x), atol=1e-4, rtol=0)
    for size in CUTS:
        sizes = [size] * (len(x) // size) + ([len(x) % size] if len(x) % size else [])
        got = _cut(runner, x, sizes)
        assert np.array_equal(got, whole), (
            f"{runner.name}, batches of {size}: {int(np.sum(got != whole))} rows differ, "
            f"max {float(np.abs(got - whole).max()):.1e}")
    odd = _cut(runner, x, [13, 4096 - 13, 904])  # every tile boundary shifted
    assert np.array_equal(odd, whole), f"{runner.name}: shifted tiles differ"


NO_CUDA = pytest.mark.skipif(not runner_usable("torch:cuda")[0],
                             reason=f"torch:cuda: {runner_usable('torch:cuda')[1]}")


@pytest.mark.gpu
@NO_CUDA
def test_cuda_batches_through_every_graph_have_the_same_bits() -> None:
    """40,000 rows: the default tile's largest graph (4 tiles of 4096), then smaller ones,
    then a partial tile; cut in batches of 1, 4095, 16384 and 40000."""
    w = weights(1)
    x = rows(w, 40_000, seed=7)
    runner = make_runner("torch:cuda", SPEC, w)
    whole = _tiled(runner, x)
    np.testing.assert_allclose(whole, reference(SPEC, w, x), atol=1e-4, rtol=0)
    for size in (1, 4095, 16384):
        sizes = [size] * (len(x) // size) + ([len(x) % size] if len(x) % size else [])
        if size == 1:
            sizes = [1] * 300 + [len(x) - 300]  # 300 single rows, then the rest at once
        assert np.array_equal(_cut(runner, x, sizes), whole), f"batches of {size}"


@pytest.mark.gpu
@NO_CUDA
def test_cuda_predictions_from_device_features_have_the_host_paths_bits() -> None:
    """The device-resident path (features left on the GPU by the stage before) and the host
    path take the same tiles and graphs."""
    runner = make_runner("torch:cuda", SPEC, weights(1))
    import torch

    w = weights(1)
    x = rows(w, 5000)
    whole = _tiled(runner, x)
    for size in (1, 300, 5000):
        got = np.concatenate([runner.predict_tensor(torch.from_numpy(x[i:i + size].copy()).cuda()).cpu().numpy()
                              for i in range(0, len(x), size)])
        assert np.array_equal(got, whole), f"device path, batches of {size}"
