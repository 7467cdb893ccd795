"""The risk stage on its fallback stream: a failed batch leaves no trace in the generators.

A stage commits its state only when a batch succeeds, so that the batch rerun on the
fallback stream gives the numbers a run on that stream alone would. The Monte Carlo
generators advance inside the kernels, so the risk stage rewinds them on a failure and,
bound again to a stream of another backend, starts that backend's generators from the seed.
"""

from __future__ import annotations

import numpy as np
import pytest

import nautilus_pipeline as nt
from nautilus_pipeline.events import KIND_TRADE
from nautilus_pipeline.kernels.montecarlo import McSampler
from nautilus_pipeline.kernels.risk import new_generator
from nautilus_pipeline.kernels.var_batch import VarRequest
from nautilus_pipeline.stages import (
    FeaturesStage,
    InferenceStage,
    RiskStage,
    SignalStage,
    VpinStage,
)
from nautilus_pipeline.stages import risk as risk_module


def trades(n: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "ts_ns": 1_700_000_000_000_000_000 + np.cumsum(rng.exponential(2e7, n)).astype(np.int64),
        "symbol_id": np.zeros(n, dtype=np.uint32),
        "kind": np.full(n, KIND_TRADE, dtype=np.uint8),
        "price": 100.0 * np.exp(np.cumsum(rng.normal(0, 5e-4, n))),
        "size": rng.exponential(0.5, n),
        "side": rng.choice(np.array([-1, 1], dtype=np.int8), n),
    }


async def risk_events(streams: tuple[str, ...]) -> tuple[list[str], nt.Pipeline]:
    inference = InferenceStage()
    stages = [FeaturesStage(inference.input_names), inference,
              VpinStage(4.0, window=5, bar_ns=1_000_000_000, sigma_window=10),
              RiskStage(var_every=150, var_paths=500, var_horizon=10, var_window=200, seed=5,
                        streams=streams),
              SignalStage()]
    seen: list[str] = []
    pipe = nt.Pipeline(stages, batch_size=256, execution="serial")
    async with pipe:
        pipe.bus.subscribe("risk.**", lambda e: seen.append(repr(e.payload)), maxsize=1 << 16)
        pipe.symbols.id_of("X")
        await pipe.ingest(trades(1_000))
        await pipe.drain()
    return seen, pipe


async def test_a_batch_rerun_on_the_fallback_gives_the_fallback_streams_own_numbers(monkeypatch):
    pytest.importorskip("torch", reason="torch is not installed: no torch stream to fail over from")
    expected, _ = await risk_events(("cpu",))
    assert any("mc" in e or "var" in e.lower() for e in expected), "the run must make VaR reports"

    real = risk_module.var_reports
    failed: list[int] = []

    def device_lost_after_drawing(requests, *args, **kwargs):
        warm_up = len(requests) == 1 and requests[0].exposure == 1.0  # bind's first call
        if not isinstance(requests[0].generator, McSampler) and not warm_up and not failed:
            real(requests, *args, **kwargs)  # the draws happen, then the device goes away
            failed.append(len(requests))
            raise RuntimeError("CUDA error: device lost (injected by the test)")
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(risk_module, "var_reports", device_lost_after_drawing)
    got, pipe = await risk_events(("torch:cpu", "cpu"))
    assert failed, "the injected failure must have happened"
    runner = next(r for r in pipe.runners if r.stage.name == "risk")
    assert runner.metrics.fallbacks == 1
    assert got == expected


def test_a_failed_report_rewinds_the_generators_it_drew_from(monkeypatch):
    stage = RiskStage(var_paths=500, var_horizon=10)
    gen = new_generator("numpy", seed=7, stream=1)
    before = gen.get_state().copy()
    window = np.random.default_rng(0).normal(0, 1e-3, 200)
    requests = [VarRequest(1000.0, 1e-3, window, gen)]
    real = risk_module.var_reports

    def draw_then_fail(requests, *args, **kwargs):
        real(requests, *args, **kwargs)
        raise RuntimeError("injected")

    class Pool:
        count_copy = None

    class FakeLease:
        pool = Pool()

    monkeypatch.setattr(risk_module, "var_reports", draw_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        stage._reports(requests, FakeLease())
    np.testing.assert_array_equal(gen.get_state(), before)
    monkeypatch.setattr(risk_module, "var_reports", real)
    first = stage._reports(requests, FakeLease())[0]["mc"]
    gen.set_state(before)
    again = stage._reports(requests, FakeLease())[0]["mc"]
    np.testing.assert_array_equal(first, again)
