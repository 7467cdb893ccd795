"""model.invariance: the probe finds a runner whose rows' bits depend on the batch, and the
inference stage says so in its log and its stats (a user who needs the bits learns it at start,
not from two replays that disagree)."""

from __future__ import annotations

import numpy as np
import pytest
from model_helpers import SPEC, weights
from structlog.testing import capture_logs
from test_integration import btc_trades

from nautilus_pipeline.model.base import ModelRunner
from nautilus_pipeline.model.invariance import PROBE_ROWS, probe, probe_cached
from nautilus_pipeline.model.numpy_runner import NumpyRunner
from nautilus_pipeline.model.runners import runner_usable
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stages import FeaturesStage, InferenceStage


def _off_in_small_batches(predict_tiled):
    """``predict_tiled`` whose batches under 8 rows give every third row one ulp more: what a
    library that computes a short call another way would do."""
    def wrapped(self, x, out):
        predict_tiled(self, x, out)
        if len(x) < 8:
            out[::3] = np.nextafter(out[::3], np.float32(1))
        return out
    return wrapped


class _SmallBatchesOff(NumpyRunner):
    predict_tiled = _off_in_small_batches(NumpyRunner.predict_tiled)


def test_the_numpy_runner_keeps_every_rows_bits():
    w = weights(1)
    found = probe(NumpyRunner(SPEC, w), SPEC, w)
    assert found.holds and found.rows == PROBE_ROWS and found.rows_off == 0 and found.max_abs_diff == 0


def test_a_runner_that_computes_short_batches_otherwise_is_found_out():
    w = weights(1)
    found = probe(_SmallBatchesOff(SPEC, w), SPEC, w)
    # batches of one row: every row is the first of its batch, so every row is off
    assert not found.holds and found.rows_off == PROBE_ROWS
    assert 0 < found.max_abs_diff < 1e-6  # one float32 ulp of a probability


def test_the_probe_is_measured_once_and_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", str(tmp_path))
    w = weights(2)

    class Counted(_SmallBatchesOff):
        calls = 0

        def predict_tiled(self, x, out):
            Counted.calls += 1
            return super().predict_tiled(x, out)

    runner = Counted(SPEC, w)
    first = probe_cached(runner, SPEC, w)
    n = Counted.calls
    again = probe_cached(runner, SPEC, w)
    assert n > PROBE_ROWS and Counted.calls == n  # the second answer came from the file
    assert again == first and not again.holds
    assert len(list(tmp_path.rglob("inference_batch_invariance-*.json"))) == 1


TORCH_CPU = pytest.mark.skipif(not runner_usable("torch:cpu")[0],
                               reason=f"torch:cpu: {runner_usable('torch:cpu')[1]}")


@TORCH_CPU
async def test_the_inference_stage_warns_when_its_backend_changes_a_rows_bits_with_the_batch(
        sample_dir, monkeypatch):
    from nautilus_pipeline.model.torch_runner import TorchRunner

    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")  # probe this broken runner, not a stored answer
    monkeypatch.setattr(TorchRunner, "predict_tiled", _off_in_small_batches(TorchRunner.predict_tiled))
    data = {k: v[:500] for k, v in btc_trades(sample_dir).items()}
    inference = InferenceStage(streams=("torch:cpu",))
    pipe = Pipeline([FeaturesStage(inference.input_names), inference], batch_size=256, slabs=4,
                    memory="host", execution="serial")
    with capture_logs() as logs:
        async with pipe:
            pipe.symbols.id_of("BTCUSDT-PERP")
            await pipe.ingest(data)
    said = [e for e in logs if e["event"] == "inference_batch_dependent"]
    assert len(said) == 1 and said[0]["log_level"] == "warning"
    assert said[0]["backend"].startswith("torch:cpu") and said[0]["rows_off"] == PROBE_ROWS
    assert "numpy" in said[0]["why"]
    stats = inference.stats()["batch_invariance"]
    assert list(stats.values()) == [{"rows": PROBE_ROWS, "rows_off": PROBE_ROWS}]


@TORCH_CPU
async def test_the_stage_warns_exactly_when_its_probe_found_a_row_off(sample_dir, monkeypatch):
    """torch:cpu as it is on this machine (it keeps the bits on the dev VM's AMD EPYC, not on a
    lent H100's Intel host: tests/test_model_tiles.py): a warning if and only if rows were off."""
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")
    data = {k: v[:500] for k, v in btc_trades(sample_dir).items()}
    inference = InferenceStage(streams=("torch:cpu",))
    pipe = Pipeline([FeaturesStage(inference.input_names), inference], batch_size=256, slabs=4,
                    memory="host", execution="serial")
    with capture_logs() as logs:
        async with pipe:
            pipe.symbols.id_of("BTCUSDT-PERP")
            await pipe.ingest(data)
    found = next(iter(inference.invariance.values()))
    said = [e for e in logs if e["event"] == "inference_batch_dependent"]
    assert found.rows == PROBE_ROWS and len(said) == (0 if found.holds else 1)
    assert inference.stats()["batch_invariance"] == {found.runner: {"rows": PROBE_ROWS,
                                                                   "rows_off": found.rows_off}}


def test_a_runner_class_without_its_own_tiles_is_probed_through_the_base_tiles():
    """ModelRunner.predict_tiled (the base tiles) through the probe: a plain predict that is
    row-wise gives every row its bits."""
    class RowWise(ModelRunner):
        backend = name = "rowwise"
        spec = SPEC

        def predict(self, x, out=None):
            y = (np.asarray(x, np.float32).sum(axis=1) * np.float32(1e-3)).astype(np.float32)
            if out is None:
                return y
            out[:] = y
            return out

    w = weights(3)
    assert probe(RowWise(), SPEC, w).holds
