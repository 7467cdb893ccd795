"""The device-resident chain: features and inference on one CUDA device share the features
on the device; host→device bytes are the columns the features read, device→host only
outputs. Needs a CUDA device (skipped with the reason elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
from model_helpers import FP32_ATOL
from reference_analytics import generated_trades

from nautilus_pipeline.compute import unusable_reason
from nautilus_pipeline.kernels.features_torch import FEATURES_ATOL
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import Stage
from nautilus_pipeline.stages import FeaturesStage, InferenceStage

_CUDA = unusable_reason("torch:cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_CUDA is not None, reason=f"torch:cuda: {_CUDA}")]

BATCH = 8192


class Capture(Stage):
    name = "capture"
    reads = ("features", "prediction")

    def __init__(self):
        self.rows: dict[str, list[np.ndarray]] = {c: [] for c in self.reads}

    async def process(self, lease, stream, ctx):
        for c in self.reads:
            self.rows[c].append(lease[c].copy())


async def _run(streams: tuple[str, ...], data: dict[str, np.ndarray]):
    inference = InferenceStage(streams=(*streams, "cpu"))
    features = FeaturesStage(inference.input_names, streams=(*streams, "cpu"), gpu_min_batch=4096)
    cap = Capture()
    pipe = Pipeline([features, inference, cap], batch_size=BATCH, slabs=4,
                    memory="pinned" if streams[0] == "torch:cuda" else "host")
    async with pipe:
        await pipe.ingest(data)
    out = {c: np.concatenate(v) for c, v in cap.rows.items()}
    return out, pipe.pool.stats(), features, inference


async def test_features_stay_on_the_device_for_inference_and_only_inputs_cross():
    n = 8 * BATCH
    data = generated_trades(n, seed=int(np.random.default_rng().integers(1 << 30)))
    data = {c: data[c] for c in ("ts_ns", "price", "size", "side")}
    cpu, _, _, _ = await _run(("cpu",), data)
    gpu, stats, features, inference = await _run(("torch:cuda",), data)

    assert features.gpu_batches == 7, "every batch after the first (the RSI seed) on the GPU"
    k = len(features.names)
    # the first batch: the CPU kernel, then its float32 features copied in for the model;
    # the other seven: ts_ns, price, size (8 bytes) and side (1 byte) in, nothing more
    assert stats.bytes_copied_h2d == BATCH * k * 4 + 7 * BATCH * 25
    # out: the features (float64) for the CPU stages, and the predictions (float32)
    assert stats.bytes_copied_d2h == 7 * BATCH * k * 8 + n * 4
    np.testing.assert_allclose(gpu["features"], cpu["features"], rtol=FEATURES_ATOL,
                               atol=FEATURES_ATOL)
    np.testing.assert_allclose(gpu["prediction"], cpu["prediction"], rtol=0, atol=FP32_ATOL)
    assert sum(inference.rows_by_backend.values()) == n
