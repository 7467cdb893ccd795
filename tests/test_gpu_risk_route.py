"""The risk stage on a device stream takes the same fused per-row kernel as on the CPU.

One fused risk loop (``kernels.risk_rows``) for every stream: on ``torch:*`` and ``mlx:*``
the per-row state machine stays on the host and only the batch's VaR reports go to the
device, together (``kernels.var_batch``). Checked here:

- the fused path against the batch path on the same device stream and batch size: the same
  columns and the same risk events, bit for bit (the reports draw from the same generators
  in the same order), at batch sizes 1 (live, inline: the reports go to the stream's
  worker), 7 and 4,096 (reports inside batches), with a kill switch that trips;
- the device route against the CPU-only pipeline: signals, VPIN buckets and breaches
  identical; the parametric and historical VaR identical; the Monte Carlo VaR within its
  sampling error (another generator draws other paths).

``torch:cpu`` and ``mlx:cpu`` run everywhere; ``torch:cuda`` and ``mlx:gpu`` skip with the
reason where they are not usable.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from test_integration import COLUMNS, RULE, Capture, btc_trades

from nautilus_pipeline.compute import unusable_reason
from nautilus_pipeline.kernels.risk import RiskParams
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import NOT_NOW
from nautilus_pipeline.stages import (
    FeaturesStage,
    InferenceStage,
    RiskStage,
    SignalStage,
    VpinStage,
)


def _on(stream: str) -> list:
    why = unusable_reason(stream)
    marks = [pytest.mark.skipif(why is not None, reason=f"{stream}: {why}")]
    return [pytest.mark.gpu, *marks] if stream in ("torch:cuda", "mlx:gpu") else marks


STREAMS = [pytest.param(s, marks=_on(s)) for s in ("torch:cpu", "mlx:cpu", "torch:cuda", "mlx:gpu")]
LIMITS = {"loose": RiskParams(max_drawdown=500.0, fee_rate=4e-4),
          "tight": RiskParams(max_drawdown=0.05, fee_rate=4e-4)}


def _chain(risk_stream: str, limits: RiskParams) -> list:
    inference = InferenceStage(streams=("cpu",))
    return [FeaturesStage(inference.input_names), inference,
            VpinStage(5.0, window=10, bar_ns=1_000_000_000),
            RiskStage(limits, RULE, var_every=500, var_paths=2000, streams=(risk_stream, "cpu")),
            SignalStage()]


async def _run(data, risk_stream: str, batch_size: int, limits: RiskParams, fused: bool = True):
    stages = _chain(risk_stream, limits)
    risk = stages[3]
    if not fused:
        # every batch through the batch path: neither the live hop's fused call nor _fused's
        risk.process_now = lambda lease, stream, ctx: NOT_NOW
        risk._fused = lambda lease, inline=False: None
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*stages, capture], batch_size=batch_size, slabs=4, memory="host")
    events: dict[str, list] = {"signals": [], "vpin": [], "risk": []}
    async with pipe:
        for name, got in events.items():
            pipe.bus.subscribe(f"{name}.>", lambda e, got=got: got.append(e.payload),
                               maxsize=1 << 16)
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest(data)
    runner = next(r for r in pipe.runners if r.stage.name == "risk")
    assert runner.metrics.fallbacks == 0, "the device stream must have run every batch"
    return capture.result(), events, risk


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("batch_size", [1, 7, 4096])
@pytest.mark.parametrize("limits", ["loose", "tight"])
async def test_the_device_route_takes_the_fused_kernel_with_the_batch_paths_numbers(
        sample_dir, stream, batch_size, limits):
    data = btc_trades(sample_dir, 3000)
    # the same batch size on both sides: the model's bits at other batch sizes are
    # tests/test_engine_inline.py's subject, not this one's
    ref, ref_events, ref_risk = await _run(data, stream, batch_size, LIMITS[limits], fused=False)
    got, got_events, risk = await _run(data, stream, batch_size, LIMITS[limits])
    assert risk._backend != "numpy" and risk.var_reports == ref_risk.var_reports == 6
    assert ref_risk.fused_batches == 0
    assert risk.fused_batches == -(-3000 // batch_size)  # every batch, reports or not
    for name in ("signals", "vpin", "risk"):
        assert orjson.dumps(got_events[name]) == orjson.dumps(ref_events[name]), name
    for c in ("ts_ns", *COLUMNS):
        np.testing.assert_array_equal(got[c], ref[c], err_msg=c)
    if limits == "tight":
        assert any(e.kind == "breach" for e in got_events["risk"])


@pytest.mark.parametrize("stream", STREAMS)
async def test_the_device_route_gives_the_cpu_pipelines_outputs(sample_dir, stream):
    """Against every stage on the CPU: what does not come from Monte Carlo paths is equal;
    the Monte Carlo VaR agrees within its sampling error (2,000 paths: a few per cent)."""
    data = btc_trades(sample_dir, 3000)
    limits = LIMITS["tight"]
    cpu, cpu_events, _ = await _run(data, "cpu", 4096, limits)
    dev, dev_events, risk = await _run(data, stream, 4096, limits)
    assert risk._backend != "numpy"
    assert orjson.dumps(dev_events["signals"]) == orjson.dumps(cpu_events["signals"])
    assert orjson.dumps(dev_events["vpin"]) == orjson.dumps(cpu_events["vpin"])
    for c in ("ts_ns", *COLUMNS):
        np.testing.assert_array_equal(dev[c], cpu[c], err_msg=c)
    assert len(dev_events["risk"]) == len(cpu_events["risk"]) > 0
    for d, c in zip(dev_events["risk"], cpu_events["risk"], strict=True):
        assert (d.kind, d.ts_ns, d.breaches, d.position, d.equity) == (
            c.kind, c.ts_ns, c.breaches, c.position, c.equity)
        if d.kind != "var":
            continue
        assert d.var["parametric"] == c.var["parametric"]
        assert d.var["historical"] == c.var["historical"]
        for level, value in c.var["mc"].items():
            if value == 0.0:  # flat: no exposure, no loss on any path
                assert d.var["mc"][level] == 0.0
            else:
                assert d.var["mc"][level] == pytest.approx(value, rel=0.15), level
