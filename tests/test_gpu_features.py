"""The torch scan form of the trade features equals the CPU kernel within FEATURES_ATOL.

Runs on ``torch:cpu`` everywhere (the same code as on a GPU) and on ``torch:cuda`` where a
CUDA device is present (skipped with the reason elsewhere).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from reference_analytics import generated_trades

torch = pytest.importorskip("torch", reason="torch is not installed")

from nautilus_pipeline.compute import unusable_reason  # noqa: E402
from nautilus_pipeline.kernels.features import features_update, new_feature_state  # noqa: E402
from nautilus_pipeline.kernels.features_torch import (  # noqa: E402
    FEATURES_ATOL,
    ewma_scan,
    features_update_torch,
)

COLS = ("ts_ns", "price", "size", "side")
_CUDA = unusable_reason("torch:cuda")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(_CUDA is not None, reason=f"torch:cuda: {_CUDA}")],
    ),
]


def _chunks(t: dict[str, np.ndarray], bounds: list[int]):
    for lo, hi in itertools.pairwise(bounds):
        yield [t[c][lo:hi] for c in COLS]


@pytest.mark.parametrize("device", DEVICES)
def test_ewma_scan_is_the_recurrence_for_any_length_and_decay(device: str) -> None:
    rng = np.random.default_rng()
    for n in (1, 7, 128, 129, 5000, 20_000):
        a = rng.uniform(0.0, 0.9999, size=3)
        u = rng.standard_normal((n, 3))
        y0 = rng.standard_normal(3)
        want = np.empty_like(u)
        y = y0.copy()
        for i in range(n):
            y = a * y + u[i]
            want[i] = y
        got = ewma_scan(
            torch.as_tensor(u, device=device), torch.as_tensor(a, device=device),
            torch.as_tensor(y0, device=device),
        ).cpu().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_features_match_the_cpu_kernel_batch_after_batch(device: str) -> None:
    t = generated_trades(40_000, seed=np.random.default_rng().integers(1 << 30))
    bounds = [0, 3, 20, 21, 4117, 4118, 20_000, 40_000]  # first trades and RSI seed included
    cpu = gpu = new_feature_state()
    for args in _chunks(t, bounds):
        cpu, want = features_update(cpu, *args)
        gpu, got = features_update_torch(gpu, *args, device=device)
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=FEATURES_ATOL, atol=FEATURES_ATOL)
    np.testing.assert_allclose(gpu.ewma, cpu.ewma, rtol=FEATURES_ATOL, atol=FEATURES_ATOL)
    assert (gpu.n_trades, gpu.rsi_changes, gpu.last_ts_ns) == (
        cpu.n_trades, cpu.rsi_changes, cpu.last_ts_ns
    )
    assert gpu.rsi_avg_gain == pytest.approx(cpu.rsi_avg_gain, rel=1e-12, abs=1e-15)


def test_bad_prices_are_rejected_as_on_the_cpu() -> None:
    from nautilus_pipeline.errors import DataError

    t = generated_trades(100, seed=1)
    st, _ = features_update(new_feature_state(), *[t[c][:50] for c in COLS])
    args = [t[c][50:].copy() for c in COLS]
    args[1][3] = -1.0
    with pytest.raises(DataError, match="prices must be finite"):
        features_update_torch(st, *args, device="cpu")


@pytest.mark.parametrize("device", DEVICES)
async def test_calibrated_routes_measure_a_crossover_on_the_stage_device(device: str) -> None:
    from nautilus_pipeline.compute import create_stream
    from nautilus_pipeline.stages import FeaturesStage, RiskStage, VpinStage

    stream = create_stream(f"torch:{device}")
    vpin = VpinStage(5.0, bar_ns=0, window=10, route="calibrated", gpu_min_batch=-1)
    await vpin.bind(stream)
    assert vpin.gpu_min_batch in (16_384, 65_536, 262_144, 1 << 62), "a size measured, or never"
    risk = RiskStage(route="calibrated", var_paths=1000, var_horizon=10)
    await risk.start(None)
    await risk.bind(stream)
    assert (risk._backend, risk._device) in (("numpy", None), ("torch", device)), (
        "VaR on the faster of the host and the stream's device"
    )
    if device == "cuda":
        feats = FeaturesStage(route="calibrated", gpu_min_batch=-1)
        await feats.bind(stream)
        assert feats.gpu_min_batch in (4096, 16_384, 65_536, 262_144, 1 << 62)
    stream.close()
