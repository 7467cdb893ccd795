"""Every backend usable here gives the float64 reference's outputs for the same weights.

Tolerances (probability units, max over rows; see ``model_helpers``): float32 backends
1e-5; float16 5e-3; bfloat16 3e-2; int8 weights 0.1 max and 0.01 mean. GPU backends are
marked ``gpu`` and skip with the reason where the device is absent.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from model_helpers import (
    BF16_ATOL,
    FP16_ATOL,
    FP32_ATOL,
    INT8_ATOL,
    INT8_MEAN,
    SPEC,
    reference,
    rows,
    weights,
)

from nautilus_pipeline.errors import BackendUnavailableError, ConfigError
from nautilus_pipeline.kernels.mlp import MLPWorkspace, mlp_forward
from nautilus_pipeline.model.runners import (
    BACKENDS,
    calibrate,
    make_runner,
    runner_usable,
)
from nautilus_pipeline.model.spec import ModelSpec, random_weights, with_weight_precision

CPU_BACKENDS = [
    ("numpy", {}),
    ("cpu", {}),
    ("torch:cpu", {}),
    ("torch:cpu", {"mode": "script"}),
    ("mlx:cpu", {}),
    ("mlx:cpu", {"compile": True}),
]


def _usable(backend: str) -> bool:
    return runner_usable(backend)[0]


def _skip_unless(backend: str) -> pytest.MarkDecorator:
    ok, why = runner_usable(backend)
    return pytest.mark.skipif(not ok, reason=f"{backend}: {why}")


@pytest.mark.parametrize(("backend", "options"), CPU_BACKENDS, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [1, 7, 300])
def test_cpu_backends_match_the_reference_in_float32(backend: str, options: dict, n: int) -> None:
    if not _usable(backend):
        pytest.skip(reason=f"{backend}: {runner_usable(backend)[1]}")
    w = weights(1)
    x = rows(w, n)
    got = make_runner(backend, SPEC, w, **options).predict(x)
    assert got.dtype == np.float32
    assert got.shape == (n,)
    np.testing.assert_allclose(got, reference(SPEC, w, x), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("activation", ["tanh", "silu"])
@pytest.mark.parametrize("backend", ["numpy", "torch:cpu", "mlx:cpu"])
def test_every_activation_agrees_across_backends(activation: str, backend: str) -> None:
    if not _usable(backend):
        pytest.skip(reason=f"{backend}: {runner_usable(backend)[1]}")
    spec = ModelSpec(SPEC.input_names, hidden=(32, 16), activation=activation)
    w = random_weights(spec, 2)
    x = rows(w, 64)
    got = make_runner(backend, spec, w).predict(x)
    np.testing.assert_allclose(got, reference(spec, w, x), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("backend", "dtype", "atol"),
    [
        ("torch:cpu", "float16", FP16_ATOL),
        ("torch:cpu", "bfloat16", BF16_ATOL),
        ("mlx:cpu", "float16", FP16_ATOL),
        ("mlx:cpu", "bfloat16", BF16_ATOL),
    ],
)
def test_reduced_precision_compute_stays_within_its_tolerance(
    backend: str, dtype: str, atol: float
) -> None:
    if not _usable(backend):
        pytest.skip(reason=f"{backend}: {runner_usable(backend)[1]}")
    w = weights(3)
    x = rows(w, 2048)
    got = make_runner(backend, SPEC, w, dtype=dtype).predict(x)
    err = np.abs(got - reference(SPEC, w, x))
    assert err.max() <= atol
    assert err.max() > FP32_ATOL  # the variant really computed in reduced precision


@pytest.mark.parametrize(("storage", "atol"), [("float16", FP16_ATOL), ("int8", INT8_ATOL)])
def test_reduced_precision_weights_stay_within_their_tolerance(storage: str, atol: float) -> None:
    w = weights(3)
    x = rows(w, 2048)
    err = np.abs(
        make_runner("numpy", SPEC, with_weight_precision(w, storage)).predict(x)
        - reference(SPEC, w, x)
    )
    assert err.max() <= atol
    assert err.mean() <= (INT8_MEAN if storage == "int8" else FP16_ATOL / 5)


def test_raw_features_in_the_thousands_keep_their_precision_in_float16() -> None:
    """Normalisation runs in float32 before the cast, so BTC-sized inputs do not collapse."""
    if not _usable("torch:cpu"):
        pytest.skip(reason=f"torch:cpu: {runner_usable('torch:cpu')[1]}")
    w0 = weights(6)
    errs = []
    for shift in (0.0, 60_000.0):
        w = type(w0)(w0.mean + shift, w0.std * 5.0, w0.weights, w0.biases)
        x = rows(w, 512, spread=1.0)
        got = make_runner("torch:cpu", SPEC, w, dtype="float16").predict(x)
        errs.append(np.abs(got - reference(SPEC, w, x)).max())
    assert errs[1] <= max(2 * errs[0], 1e-3)


def test_predict_fills_out_and_returns_it() -> None:
    w = weights()
    x = rows(w, 5)
    for backend in ("numpy", "torch:cpu", "mlx:cpu"):
        if not _usable(backend):
            continue
        out = np.full(5, -1.0, np.float32)
        r = make_runner(backend, SPEC, w)
        assert r.predict(x, out=out) is out
        np.testing.assert_allclose(out, reference(SPEC, w, x), atol=FP32_ATOL, rtol=0)


def test_results_do_not_alias_the_numpy_workspace() -> None:
    w = weights()
    r = make_runner("numpy", SPEC, w)
    first = r.predict(rows(w, 3, seed=1))
    kept = first.copy()
    r.predict(rows(w, 3, seed=2))
    np.testing.assert_array_equal(first, kept)


def test_numpy_workspace_grows_once_and_then_reuses_its_buffers() -> None:
    w = weights()
    ws = MLPWorkspace(w.mean, w.std, w.weights, w.biases, capacity=1)
    mlp_forward(ws, rows(w, 64))
    buffers = [id(b) for b in ws.scratch]
    assert ws.capacity == 64
    mlp_forward(ws, rows(w, 1))
    mlp_forward(ws, rows(w, 64))
    assert [id(b) for b in ws.scratch] == buffers


def test_empty_batch_gives_an_empty_result() -> None:
    w = weights()
    for backend in ("numpy", "torch:cpu", "mlx:cpu"):
        if _usable(backend):
            got = make_runner(backend, SPEC, w).predict(np.empty((0, 50), np.float32))
            assert got.shape == (0,)


def test_a_wrong_width_is_rejected_with_the_expected_shape() -> None:
    r = make_runner("numpy", SPEC, weights())
    with pytest.raises(ConfigError, match=r"\[n, 50\]"):
        r.predict(np.zeros((2, 49), np.float32))


def test_float64_input_is_accepted_and_converted() -> None:
    w = weights()
    x = rows(w, 4)
    r = make_runner("numpy", SPEC, w)
    np.testing.assert_array_equal(r.predict(x.astype(np.float64)), r.predict(x))


def test_compiled_mlx_runner_survives_batch_sizes_that_shrink_and_grow() -> None:
    """Shapeless mx.compile corrupted the heap on 300 → 1 rows (MLX 0.32.4); per-shape must not."""
    if not _usable("mlx:cpu"):
        pytest.skip(reason=f"mlx:cpu: {runner_usable('mlx:cpu')[1]}")
    w = weights()
    r = make_runner("mlx:cpu", SPEC, w, compile=True)
    for n in (300, 1, 7, 300, 1):
        x = rows(w, n, seed=n)
        np.testing.assert_allclose(r.predict(x), reference(SPEC, w, x), atol=FP32_ATOL, rtol=0)


def test_mlx_runner_works_from_another_thread() -> None:
    """The runtime may call predict from an executor thread; MLX streams are thread-bound."""
    if not _usable("mlx:cpu"):
        pytest.skip(reason=f"mlx:cpu: {runner_usable('mlx:cpu')[1]}")
    w = weights()
    x = rows(w, 16)
    r = make_runner("mlx:cpu", SPEC, w)
    got: list[np.ndarray] = []
    t = threading.Thread(target=lambda: got.append(r.predict(x)))
    t.start()
    t.join()
    np.testing.assert_allclose(got[0], reference(SPEC, w, x), atol=FP32_ATOL, rtol=0)


def test_unknown_backend_is_unusable_and_names_the_known_ones() -> None:
    ok, why = runner_usable("tpu")
    assert not ok
    assert "torch:cuda" in why
    with pytest.raises(ConfigError, match="unknown inference backend"):
        make_runner("tpu", SPEC, weights())


def test_every_registered_backend_answers_usable_with_a_reason() -> None:
    for backend in BACKENDS:
        ok, why = runner_usable(backend)
        assert isinstance(ok, bool)
        assert why


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS answer")
@pytest.mark.parametrize("backend", ["coreml:ane", "coreml:all", "coreml:cpu"])
def test_coreml_is_unusable_off_macos_with_the_reason(backend: str) -> None:
    ok, why = runner_usable(backend)
    assert not ok and why.startswith("Core ML prediction needs macOS")
    with pytest.raises(BackendUnavailableError, match="Core ML prediction needs macOS"):
        make_runner(backend, SPEC, weights())


def test_calibration_routes_every_batch_size_to_a_usable_runner() -> None:
    w = weights()
    cal = calibrate(
        ["numpy", "torch:cpu", "mlx:cpu", "coreml:ane", "torch:cuda"],
        SPEC,
        w,
        batch_sizes=(1, 64, 1024),
        budget_s=0.01,
    )
    assert set(cal.route) == {1, 64, 1024}
    for b, name in cal.route.items():
        assert cal.latency_us[name][b] == min(row[b] for row in cal.latency_us.values())
    assert "numpy" in cal.latency_us
    if sys.platform != "darwin":
        assert "Core ML prediction needs macOS" in cal.unusable["coreml:ane"]
    assert cal.choose(3) == cal.route[64]
    assert cal.choose(10_000) == cal.route[1024]
    x = rows(w, 3)
    np.testing.assert_allclose(
        cal.runner_for(3).predict(x), reference(SPEC, w, x), atol=FP32_ATOL, rtol=0
    )
    assert "b=1024" in cal.format()


def test_calibration_excludes_a_runner_whose_outputs_are_wrong() -> None:
    w = weights()
    wrong = make_runner("numpy", SPEC, weights(seed=9))
    wrong.name = "numpy-wrong-weights"
    cal = calibrate(["numpy", wrong], SPEC, w, batch_sizes=(1, 8), budget_s=0.005)
    assert "differs from the reference" in cal.unusable["numpy-wrong-weights"]
    assert set(cal.route.values()) == {"numpy"}


@pytest.mark.gpu
@_skip_unless("torch:cuda")
@pytest.mark.parametrize("n", [1, 5, 64, 300, 5000])
def test_torch_cuda_graphs_and_eager_match_the_reference(n: int) -> None:
    w = weights(1)
    x = rows(w, n)
    want = reference(SPEC, w, x)
    graphs = make_runner("torch:cuda", SPEC, w)
    eager = make_runner("torch:cuda", SPEC, w, cuda_graphs=False)
    one_tile = make_runner("torch:cuda", SPEC, w, graph_tiles=(1, 3), tile_rows=8)  # n > 8: several graphs
    assert graphs.name == "torch:cuda/graphs"
    for r in (graphs, eager, one_tile):
        np.testing.assert_allclose(r.predict(x), want, atol=1e-4, rtol=0)  # TF32 off by default
    x2 = rows(w, n, seed=5)  # replay with new data in the same static buffers
    want2 = reference(SPEC, w, x2)
    out = np.empty(n, np.float32)
    assert graphs.predict(x2, out=out) is out
    np.testing.assert_allclose(out, want2, atol=1e-4, rtol=0)


@pytest.mark.gpu
@_skip_unless("mlx:gpu")
def test_mlx_gpu_matches_the_reference() -> None:
    """float32 tolerance: the runner keeps MLX off TF32 (5.3e-4 measured on the H200 with it)."""
    w = weights(1)
    x = rows(w, 300)
    runner = make_runner("mlx:gpu", SPEC, w)
    assert not runner.tf32, "MLX_ENABLE_TF32=0 took effect before the first MLX matmul"
    np.testing.assert_allclose(runner.predict(x), reference(SPEC, w, x), atol=FP32_ATOL, rtol=0)


@pytest.mark.gpu
@_skip_unless("mlx:gpu")
def test_mlx_gpu_matmul_runs_in_float32_not_tf32() -> None:
    from nautilus_pipeline.model.mlx_runner import mlx_tf32_error

    assert mlx_tf32_error("gpu") < 1e-5, "TF32 gives ~5e-4; float32 ~1e-7"


@pytest.mark.gpu
@_skip_unless("torch:mps")
def test_torch_mps_matches_the_reference() -> None:
    w = weights(1)
    x = rows(w, 300)
    np.testing.assert_allclose(
        make_runner("torch:mps", SPEC, w).predict(x), reference(SPEC, w, x), atol=1e-4, rtol=0
    )


def test_fixed_shape_backends_pad_to_the_smallest_bucket_that_fits() -> None:
    """CUDA graphs and Core ML enumerated shapes share this choice; None means 'chunk it'."""
    from nautilus_pipeline.model.base import bucket_for

    buckets = (1, 8, 64)
    assert [bucket_for(n, buckets) for n in (1, 2, 8, 9, 64)] == [1, 8, 8, 64, 64]
    assert bucket_for(65, buckets) is None
