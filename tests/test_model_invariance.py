"""model.invariance: the probe finds a runner whose rows' bits depend on the batch, and the
inference stage says so in its log and its stats (a user who needs the bits learns it at start,
not from two replays that disagree)."""

from __future__ import annotations

import numpy as np
import pytest
from model_helpers import SPEC, weights
from structlog.testing import capture_logs
from test_integration import btc_trades

from nautilus_pipeline.model import invariance
from nautilus_pipeline.model.base import ModelRunner
from nautilus_pipeline.model.invariance import PROBE_ROWS, REFERENCE_ROWS, probe, probe_cached
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


async def _run(sample_dir, stream, route="first"):
    """The features and inference stages (``stream``) on 500 bundled trades; the inference
    stage and the log events of the run."""
    data = {k: v[:500] for k, v in btc_trades(sample_dir).items()}
    stage = InferenceStage(streams=(stream,), route=route)
    pipe = Pipeline([FeaturesStage(stage.input_names), stage], batch_size=256, slabs=4,
                    memory="host", execution="serial")
    with capture_logs() as logs:
        async with pipe:
            pipe.symbols.id_of("BTCUSDT-PERP")
            await pipe.ingest(data)
        assert pipe.tick_flow().ticks_out == 500
    return stage, logs


def _said(logs, event):
    return [e for e in logs if e["event"] == event]


TORCH_CPU = pytest.mark.skipif(not runner_usable("torch:cpu")[0],
                               reason=f"torch:cpu: {runner_usable('torch:cpu')[1]}")


@TORCH_CPU
async def test_the_inference_stage_warns_when_its_backend_changes_a_rows_bits_with_the_batch(
        sample_dir, monkeypatch):
    from nautilus_pipeline.model.torch_runner import TorchRunner

    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")  # probe this broken runner, not a stored answer
    monkeypatch.setattr(TorchRunner, "predict_tiled", _off_in_small_batches(TorchRunner.predict_tiled))
    inference, logs = await _run(sample_dir, "torch:cpu")
    said = _said(logs, "inference_batch_dependent")
    assert len(said) == 1 and said[0]["log_level"] == "warning"
    assert said[0]["runner"].startswith("torch:cpu") and said[0]["rows_off"] == PROBE_ROWS
    assert said[0]["rows_probed"] == PROBE_ROWS and said[0]["cuts"] == [1, 7]
    assert 'streams = ["cpu"]' in said[0]["why"]
    stats = inference.stats()["batch_invariance"]
    assert list(stats.values()) == [{"holds": False, "rows_probed": PROBE_ROWS, "rows_off": PROBE_ROWS,
                                     "cuts": [1, 7], "reference_rows": REFERENCE_ROWS}]


class _Wrapped(ModelRunner):
    """A runner that is not numpy's (so the stage probes it) around numpy's model."""

    def __init__(self, inner: NumpyRunner, off: bool = False):
        self.inner, self.off = inner, off
        self.backend, self.spec, self.tile_rows = "fake:cpu", inner.spec, inner.tile_rows
        self.name = f"fake:cpu/{'off' if off else 'exact'}"

    def predict(self, x, out=None):
        return self.inner.predict(x, out)

    def predict_tiled(self, x, out):
        self.inner.predict_tiled(x, out)
        if self.off and len(x) < 8:
            out[::3] = np.nextafter(out[::3], np.float32(1))
        return out


async def _run_with(monkeypatch, sample_dir, runner_for, route="first"):
    """The features and inference stages on the bundled trades, ``take_runner`` giving the
    stage ``runner_for(numpy runner)``; the stage, its log events."""
    from nautilus_pipeline.model.shelf import take_runner as real
    from nautilus_pipeline.stages import inference as stage_module

    monkeypatch.setattr(stage_module, "take_runner",
                        lambda backend, spec, w, **kw: runner_for(real(backend, spec, w, **kw)))
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")
    return await _run(sample_dir, "cpu", route)


async def test_a_backend_that_changes_a_rows_bits_is_warned_about_and_one_that_does_not_is_not(
        sample_dir, monkeypatch):
    stage, logs = await _run_with(monkeypatch, sample_dir, lambda r: _Wrapped(r, off=True))
    assert len(_said(logs, "inference_batch_dependent")) == 1
    assert stage.stats()["batch_invariance"]["fake:cpu/off"]["rows_off"] == PROBE_ROWS
    stage, logs = await _run_with(monkeypatch, sample_dir, lambda r: _Wrapped(r, off=False))
    assert _said(logs, "inference_batch_dependent") == []
    assert stage.stats()["batch_invariance"] == {"fake:cpu/exact": {
        "holds": True, "rows_probed": PROBE_ROWS, "rows_off": 0, "cuts": [1, 7],
        "reference_rows": REFERENCE_ROWS}}


async def test_a_probe_that_fails_is_logged_and_the_pipeline_runs(sample_dir, monkeypatch):
    from nautilus_pipeline.stages import inference as stage_module

    def broken(*_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(stage_module, "probe_cached", broken)
    stage, logs = await _run_with(monkeypatch, sample_dir, lambda r: _Wrapped(r))
    failed = _said(logs, "inference_batch_probe_failed")
    assert len(failed) == 1 and "device lost" in failed[0]["error"]
    assert "batch_invariance" not in stage.stats()
    assert stage._runner_raised  # closed, not shelved for another job


async def test_numpy_and_calibrated_stages_are_not_probed(sample_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(invariance, "probe", lambda *a, **k: calls.append(a) or None)
    stage, _ = await _run_with(monkeypatch, sample_dir, lambda r: r)  # numpy's own runner
    assert stage.invariance == {} and calls == []
    stage, _ = await _run_with(monkeypatch, sample_dir, lambda r: r, route="calibrated")
    assert stage.invariance == {} and calls == []


def test_another_model_or_runner_gets_its_own_stored_answer(monkeypatch, tmp_path):
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", str(tmp_path))
    w1, w2 = weights(4), weights(5)
    assert probe_cached(_Wrapped(NumpyRunner(SPEC, w1)), SPEC, w1).holds
    assert not probe_cached(_Wrapped(NumpyRunner(SPEC, w1), off=True), SPEC, w1).holds
    assert probe_cached(_Wrapped(NumpyRunner(SPEC, w2)), SPEC, w2).holds
    assert len(list(tmp_path.rglob("inference_batch_invariance-*.json"))) == 3


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
