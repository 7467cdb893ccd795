"""The shipped default model: loads, takes exactly the default features, runs on the real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_helpers import FP32_ATOL, reference

from nautilus_pipeline.analytics import features_frame
from nautilus_pipeline.kernels.features import FEATURE_NAMES
from nautilus_pipeline.model.runners import make_runner, runner_usable
from nautilus_pipeline.model.spec import DEFAULT_MODEL_PATH, check_inputs, load_default_model


def test_default_model_takes_the_default_features_in_order() -> None:
    spec, _ = load_default_model()
    assert spec.input_names == FEATURE_NAMES
    check_inputs(spec, FEATURE_NAMES)


def test_default_model_is_the_documented_shape_and_small() -> None:
    spec, _w = load_default_model()
    assert spec.layer_sizes == (len(FEATURE_NAMES), 128, 64, 32, 1)
    assert DEFAULT_MODEL_PATH.stat().st_size < 100_000


def test_default_model_carries_its_training_card() -> None:
    _, w = load_default_model()
    card = json.loads(Path(DEFAULT_MODEL_PATH.with_suffix(".json")).read_text())
    assert w.metadata == card
    assert card["horizon_trades"] > 0
    assert 0.0 < card["results"]["test"]["accuracy"] < 1.0
    assert card["results"]["test"]["rows"] > 1000


def test_default_model_on_real_trades_gives_probabilities_on_every_backend(
    shared_data: Path,
) -> None:
    raw = np.genfromtxt(
        shared_data / "binance-spot-ethusdt-trades-20240808.csv",
        delimiter=",",
        dtype=str,
        max_rows=2000,
    )
    ts = raw[:, 4].astype(np.int64) * 1_000_000
    side = np.where(np.char.lower(raw[:, 5]) == "true", -1, 1).astype(np.int8)
    frame = features_frame(ts, raw[:, 1].astype(float), raw[:, 2].astype(float), side)
    x = np.column_stack([frame[n] for n in FEATURE_NAMES])
    x = x[np.all(np.isfinite(x), axis=1)].astype(np.float32)
    spec, w = load_default_model()
    want = reference(spec, w, x)
    assert np.all((want > 0) & (want < 1))
    assert want.std() > 1e-3  # the features move the output: not a constant model
    for backend in ("numpy", "torch:cpu", "mlx:cpu"):
        if not runner_usable(backend)[0]:
            continue
        got = make_runner(backend, spec, w).predict(x)
        np.testing.assert_allclose(got, want, atol=FP32_ATOL, rtol=0, err_msg=backend)


def test_a_features_config_with_other_names_fails_the_check() -> None:
    from nautilus_pipeline.errors import ConfigError
    from nautilus_pipeline.kernels.features import FeatureConfig, feature_names

    spec, _ = load_default_model()
    with pytest.raises(ConfigError, match="rsi_21"):
        check_inputs(spec, feature_names(FeatureConfig(rsi_period=21)))
