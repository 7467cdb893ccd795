"""Calibrations are measured once per machine, libraries, code and inputs, then read back.

``calibration_cache.cached`` against a counted measurement; the risk stage's and the
inference stage's calibrated starts against the same starts measured afresh.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from model_helpers import SPEC, weights

from nautilus_pipeline import calibration_cache
from nautilus_pipeline.calibration_cache import cached
from nautilus_pipeline.model import runners
from nautilus_pipeline.model.runners import calibrate_cached


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", str(tmp_path))
    return tmp_path / "calibration"


class Counted:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_a_calibration_is_measured_once_then_read_back(cache):
    measure = Counted({"gpu_min_batch": 65_536, "table": [1.5, 2.0]})
    first = cached("features_gpu_min_batch", {"config": "a"}, "cuda:0", measure)
    again = cached("features_gpu_min_batch", {"config": "a"}, "cuda:0", measure)
    assert measure.calls == 1 and first == again == measure.value
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["features_gpu_min_batch"]


def test_other_inputs_another_device_or_changed_code_measure_again(cache, monkeypatch):
    measure = Counted(4096)
    cached("vpin_gpu_min_batch", {"window": 10}, "cuda:0", measure)
    cached("vpin_gpu_min_batch", {"window": 50}, "cuda:0", measure)
    assert measure.calls == 2
    cached("vpin_gpu_min_batch", {"window": 10}, None, measure)
    assert measure.calls == 3
    monkeypatch.setattr(calibration_cache, "code_digest", lambda: "another-kernel")
    cached("vpin_gpu_min_batch", {"window": 10}, "cuda:0", measure)
    assert measure.calls == 4


def test_an_upgraded_backend_library_measures_again_on_any_device(cache, monkeypatch):
    """A CPU route measured against mlx:cpu or torch:cpu depends on their versions too, imported
    or not: another installed mlx (or torch) measures again, device None included."""
    measure = Counted(1)
    cached("inference_route", {"rows": 1}, None, measure)
    cached("inference_route", {"rows": 1}, None, measure)
    assert measure.calls == 1
    real = calibration_cache._installed_version
    monkeypatch.setattr(calibration_cache, "_installed_version",
                        lambda dist: "99.0" if dist == "mlx" else real(dist))
    cached("inference_route", {"rows": 1}, None, measure)
    assert measure.calls == 2


def test_the_cache_keeps_the_answers_used_last(cache, monkeypatch):
    """Past MAX_ENTRIES a write removes the least recently used answers; a hit counts as a use,
    so an old answer read again outlives newer ones never read."""
    monkeypatch.setattr(calibration_cache, "MAX_ENTRIES", 3)
    monkeypatch.setattr(calibration_cache, "EVICT_EVERY_S", 0.0)  # at every write, not once an hour
    measure = Counted(1)
    old = time.time() - 100
    for i in range(3):  # written in order 0, 1, 2, seconds apart (set, not left to the clock's grain)
        before = set(cache.glob("*.json"))
        cached("risk_var_route", {"paths": i}, None, measure)
        (path,) = set(cache.glob("*.json")) - before
        os.utime(path, (old + i, old + i))
    cached("risk_var_route", {"paths": 0}, None, measure)  # a hit: 0 is now the newest
    assert measure.calls == 3
    cached("risk_var_route", {"paths": 3}, None, measure)  # the 4th answer: 1, the least recent, goes
    assert len(list(cache.glob("*.json"))) == 3
    for i, calls in ((0, 4), (2, 4), (3, 4), (1, 5)):  # 1 is measured again, the others read
        cached("risk_var_route", {"paths": i}, None, measure)
        assert measure.calls == calls, i


def test_a_process_looks_for_answers_to_remove_once_an_hour(cache, monkeypatch):
    """A batch of thousands of symbols writes thousands of answers: one listing, not one each."""
    listings = []
    monkeypatch.setattr(calibration_cache, "_evicted_at", float("-inf"))
    monkeypatch.setattr(calibration_cache, "evict", lambda folder: listings.append(folder))
    for i in range(5):
        cached("batch_bucket_volume", {"chain": i}, None, Counted(1))
    assert listings == [cache]


def test_a_dead_writers_temporary_file_is_removed_once_stale(cache):
    cache.mkdir(parents=True)
    fresh, stale = cache / "x-1.tmp123", cache / "x-2.tmp456"
    fresh.write_bytes(b"{")
    stale.write_bytes(b"{")
    old = time.time() - calibration_cache.STALE_TMP_S - 10
    os.utime(stale, (old, old))
    assert calibration_cache.evict(cache) == 1
    assert fresh.exists() and not stale.exists()


def test_off_measures_on_every_start(monkeypatch, tmp_path):
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")
    measure = Counted(1)
    for _ in range(3):
        assert cached("risk_var_backend", {}, None, measure) == 1
    assert measure.calls == 3 and calibration_cache.cache_dir() is None


def test_a_damaged_file_is_measured_again_and_replaced(cache):
    measure = Counted([ "torch", "cuda"])
    cached("risk_var_backend", {"paths": 100}, None, measure)
    (path,) = cache.iterdir()
    path.write_bytes(b"{not json")
    assert cached("risk_var_backend", {"paths": 100}, None, measure) == ["torch", "cuda"]
    assert cached("risk_var_backend", {"paths": 100}, None, measure) == ["torch", "cuda"]
    assert measure.calls == 2


def test_an_unwritable_cache_still_gives_the_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", str(blocker))
    measure = Counted(262_144)
    assert cached("features_gpu_min_batch", {}, None, measure) == 262_144
    assert cached("features_gpu_min_batch", {}, None, measure) == 262_144
    assert measure.calls == 2


async def test_the_risk_stage_measures_its_var_backend_once(cache, monkeypatch):
    pytest.importorskip("torch", reason="torch is not installed: no device stream to calibrate")
    from nautilus_pipeline.compute import create_stream
    from nautilus_pipeline.stages import RiskStage

    calls = []
    real = RiskStage._calibrate

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(RiskStage, "_calibrate", counted)
    chosen = []
    for _ in range(2):
        stream = create_stream("torch:cpu")
        risk = RiskStage(route="calibrated", var_paths=1000, var_horizon=10)
        await risk.start(None)
        await risk.bind(stream)
        chosen.append((risk._backend, risk._device))
        stream.close()
    assert len(calls) == 1 and chosen[0] == chosen[1]
    assert chosen[0] in (("numpy", None), ("torch", "cpu"))


def test_a_stored_model_route_builds_the_routed_runners_only(cache, monkeypatch):
    pytest.importorskip("torch", reason="torch is not installed: one backend only")
    w = weights(1)
    first = calibrate_cached(["numpy", "torch:cpu"], SPEC, w, batch_sizes=(1, 64), budget_s=0.002)
    measured = []
    monkeypatch.setattr(runners, "calibrate", lambda *a, **k: measured.append(1))
    again = calibrate_cached(["numpy", "torch:cpu"], SPEC, w, batch_sizes=(1, 64), budget_s=0.002)
    assert not measured
    assert again.route == first.route and again.latency_us == first.latency_us
    assert set(again.runners) == set(first.route.values())
    x = np.random.default_rng(0).standard_normal((64, SPEC.n_inputs)).astype(np.float32)
    for b in (1, 64):
        np.testing.assert_array_equal(again.runner_for(b).predict(x[:b]),
                                      first.runner_for(b).predict(x[:b]))
    assert "b=64" in again.format()
    name, runner = next(iter(again.runners.items()))  # one already built (the stage's bound one)
    reused = calibrate_cached(["numpy", "torch:cpu"], SPEC, w, batch_sizes=(1, 64),
                              budget_s=0.002, built=[runner])
    assert reused.runners[name] is runner
