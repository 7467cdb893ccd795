"""The analytics chain on real trades: batch-size independence, determinism, exactness
against the notebook batch API, the kill switch, and tick accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from nautilus_pipeline.analytics import features_frame, vpin_frame
from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.events import ColumnSpec, Side
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.kernels.features import FEATURE_NAMES
from nautilus_pipeline.kernels.risk import RiskParams
from nautilus_pipeline.kernels.signal import SignalParams
from nautilus_pipeline.stage import Stage
from nautilus_pipeline.stages import (
    FeaturesStage,
    InferenceStage,
    RiskStage,
    SignalStage,
    VpinStage,
)
from nautilus_pipeline.testing import run_replay

DEFAULT_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "default.toml"
COLUMNS = ("features", "prediction", "vpin", "vpin_cdf", "toxic", "position", "equity", "pnl",
           "drawdown", "kill", "breach", "signal_side", "signal_target")
RULE = SignalParams(long_threshold=0.55, short_threshold=0.45, max_position=0.01)


class Capture(Stage):
    """Copies every column of every row it sees (the test's window into the slabs)."""

    name = "capture"
    offload = False  # copies on the loop, never calls its stream: no worker thread, no core

    def __init__(self, columns):
        self.reads = tuple(columns)
        self.rows: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        self.batch_sizes: list[int] = []

    async def process(self, lease, stream, ctx):
        self.batch_sizes.append(lease.length)
        for c in self.reads:
            self.rows[c].append(lease[c].copy())

    def result(self) -> dict[str, np.ndarray]:
        return {c: np.concatenate(v) for c, v in self.rows.items()}


def btc_trades(sample_dir, n: int | None = None) -> dict[str, np.ndarray]:
    replay = Replay([Source(sample_dir / "binance-um-btcusdt-trades-20240808.csv", symbol="BTCUSDT-PERP")])
    data = {k: np.concatenate(v) for k, v in _stack(replay.iter_arrays()).items()}
    return {k: v[:n] for k, v in data.items()} if n else data


def _stack(blocks):
    out: dict[str, list[np.ndarray]] = {}
    for block in blocks:
        for k, v in block.items():
            out.setdefault(k, []).append(v)
    return out


def chain(limits: RiskParams | None = None, bucket_volume: float = 5.0):
    inference = InferenceStage(streams=("cpu",))
    return [
        FeaturesStage(inference.input_names),
        inference,
        VpinStage(bucket_volume, window=10, bar_ns=1_000_000_000),
        RiskStage(limits or RiskParams(max_drawdown=500.0, fee_rate=4e-4), RULE, var_every=500,
                  var_paths=2000),
        SignalStage(),
    ]


async def run_chain(pipeline_from, collect, data, batch_size, limits=None):
    stages = chain(limits)
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = await pipeline_from([*stages, capture], batch_size=batch_size, slabs=4, memory="host")
    signals, vpin, risk = collect(pipe, "signals.>"), collect(pipe, "vpin.>"), collect(pipe, "risk.>")
    pipe.symbols.id_of("BTCUSDT-PERP")
    await pipe.ingest(data)
    await pipe.close()
    return pipe, capture, signals.payloads, vpin.payloads, risk.payloads


def _nan_safe(events) -> bytes:
    """Events as JSON (NaN → null), so that equal NaN fields compare equal."""
    return orjson.dumps(events)


def assert_same(a, b):
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


async def test_every_number_is_the_same_for_batch_sizes_1_7_and_4096(sample_dir, pipeline_from, collect):
    data = btc_trades(sample_dir, 3000)
    runs = {b: await run_chain(pipeline_from, collect, data, b) for b in (1, 7, 4096)}
    _, cap4096, sig, vp, rk = runs[4096]
    assert len(sig) > 10 and len(vp) > 10 and len(rk) >= 6, "the run must exercise every stage"
    ref = cap4096.result()
    for b in (1, 7):
        _, cap, sig_b, vp_b, rk_b = runs[b]
        assert max(cap.batch_sizes) == b
        got = cap.result()
        assert_same(got, ref)  # the model's float32 probability too: its sums run in one order
        assert [(s.ts_ns, s.side, s.target_position, s.reasons, s.strength) for s in sig_b] == [
            (s.ts_ns, s.side, s.target_position, s.reasons, s.strength) for s in sig
        ]
        assert _nan_safe(vp_b) == _nan_safe(vp)
        assert [(e.ts_ns, e.kind, e.position, e.breaches) for e in rk_b] == [
            (e.ts_ns, e.kind, e.position, e.breaches) for e in rk
        ]


async def test_streaming_stages_equal_the_notebook_batch_api(sample_dir, pipeline_from, collect):
    data = btc_trades(sample_dir)
    _, cap, _, vp, _ = await run_chain(pipeline_from, collect, data, 1000)
    frame = features_frame(data["ts_ns"], data["price"], data["size"], data["side"])
    feats = cap.result()["features"]
    for i, name in enumerate(FEATURE_NAMES):
        np.testing.assert_array_equal(feats[:, i], frame[name], err_msg=name)
    ref = vpin_frame(data["ts_ns"], data["price"], data["size"], bucket_volume=5.0, window=10,
                     bar_ns=1_000_000_000)
    assert [b.bucket for b in vp] == ref["bucket"].tolist()
    assert [b.ts_ns for b in vp] == ref["ts_ns"].tolist()
    np.testing.assert_array_equal([b.buy_volume for b in vp], ref["buy_volume"])
    np.testing.assert_array_equal([b.vpin for b in vp], ref["vpin"])


async def test_every_tick_reaches_the_sink(sample_dir, pipeline_from, collect):
    data = btc_trades(sample_dir)
    pipe, cap, *_ = await run_chain(pipeline_from, collect, data, 4096)
    assert pipe.stats()["ticks"] == {"ticks_in": 21313, "ticks_not_delivered": 0, "ticks_out": 21313, "ticks_failed": 0, "ticks_discarded": 0, "in_flight": 0}
    assert sum(cap.batch_sizes) == 21313
    assert pipe.leaked == []


async def test_a_drawdown_breach_turns_the_kill_switch_on_and_signals_go_flat(sample_dir, pipeline_from, collect):
    data = btc_trades(sample_dir, 6000)
    _, cap, signals, _, risk = await run_chain(
        pipeline_from, collect, data, 512, limits=RiskParams(max_drawdown=2.0, fee_rate=4e-4)
    )
    breaches = [e for e in risk if e.kind == "breach"]
    assert breaches and breaches[0].breaches == ("max_drawdown",)
    assert len(breaches) == len({e.breaches for e in breaches}), "one event per change, not per row"
    first = breaches[0].ts_ns
    after = [s for s in signals if s.ts_ns >= first]
    assert after, "a signal follows the breach"
    assert after[0].side is Side.FLAT and "risk_kill_switch" in after[0].reasons
    assert all(s.side is Side.FLAT for s in after)
    rows = cap.result()
    killed = rows["kill"].astype(bool)
    assert killed.any()
    np.testing.assert_array_equal(rows["signal_side"][killed], 0)


async def test_var_reports_every_n_trades_with_three_estimates(sample_dir, pipeline_from, collect):
    data = btc_trades(sample_dir, 3000)
    *_, risk = await run_chain(pipeline_from, collect, data, 4096)
    reports = [e for e in risk if e.kind == "var"]
    assert len(reports) == 6  # every 500 trades
    for r in reports:
        assert set(r.var) == {"parametric", "historical", "mc"}
        for method in r.var.values():
            assert set(method) == {"0.95", "0.99"}
            assert method["0.99"] >= method["0.95"] >= 0.0
            assert math.isfinite(method["0.99"])


def test_a_model_whose_inputs_differ_from_the_features_fails_at_build():
    from nautilus_pipeline.pipeline import Pipeline

    with pytest.raises(ConfigError, match="model inputs missing from the features"):
        Pipeline([FeaturesStage(["log_return", "rsi_14"]), InferenceStage(streams=("cpu",))])


def test_risk_needs_the_volatility_feature():
    from nautilus_pipeline.pipeline import Pipeline

    inference = InferenceStage(streams=("cpu",))
    with pytest.raises(ConfigError, match="vol_ewma_7"):
        Pipeline([FeaturesStage(inference.input_names), inference,
                  VpinStage(5.0), RiskStage(vol_feature="vol_ewma_7"), SignalStage()])


def test_the_signal_stage_needs_the_risk_stage_before_it():
    from nautilus_pipeline.pipeline import Pipeline

    inference = InferenceStage(streams=("cpu",))
    with pytest.raises(ConfigError, match="signal_emit"):
        Pipeline([FeaturesStage(inference.input_names), inference, VpinStage(5.0), SignalStage()])


def _definition(risk: str, signal: str = "") -> str:
    return (f'[pipeline]\nname = "t"\n\n[[stages]]\ntype = "features"\n\n[[stages]]\ntype = "risk"\n{risk}\n'
            f'[[stages]]\ntype = "signal"\n{signal}\n')


def test_the_rule_is_a_table_of_the_risk_stage():
    from nautilus_pipeline.config import loads

    d = loads(_definition("max_position = 2.0\nsignal = { long_threshold = 0.6, max_position = 0.01 }"))
    risk = d.stages[1].params
    assert risk.max_position == 2.0  # the account's limit ...
    assert risk.signal == SignalParams(long_threshold=0.6, max_position=0.01)  # ... and the rule's size
    assert loads(_definition("")).stages[1].params.signal == SignalParams()


@pytest.mark.parametrize(("risk", "signal", "message"), [
    ("", "long_threshold = 0.6", r"stages\[2\]\.long_threshold is no longer a key of a 'signal' stage.*risk stage"),
    ("signal = { long_treshold = 0.6 }", "", r"unknown key stages\[1\]\.signal\.long_treshold \(did you mean 'long_threshold'\?\)"),
    ("signal = { sizing = 'half' }", "", r"stages\[1\]\.signal\.sizing = 'half' is not allowed"),
    ("signal = { max_position = 'big' }", "", r"stages\[1\]\.signal\.max_position must be a number"),
    ("signal = 0.5", "", r"stages\[1\]\.signal must be a table"),
])
def test_rule_keys_in_the_wrong_place_or_shape_are_refused_with_their_location(risk, signal, message):
    from nautilus_pipeline.config import loads

    with pytest.raises(ConfigError, match=message):
        loads(_definition(risk, signal))


def test_a_rule_the_kernel_refuses_is_refused_at_build():
    from nautilus_pipeline.config import build_stages, loads

    d = loads(_definition("signal = { long_threshold = 0.4, short_threshold = 0.6 }"))
    with pytest.raises(ConfigError, match=r"stages\[1\] \(risk\).*short_threshold < long_threshold"):
        build_stages(d)


async def test_replay_to_pipeline_accounts_for_every_row_read(sample_dir, pipeline_from, collect, tmp_path):
    src = tmp_path / "trades.csv"
    lines = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_text().splitlines()
    lines[10] = lines[10].replace(lines[10].split(",")[1], "-5", 1)  # a negative price
    lines[20] = "garbage,row"
    src.write_text("\n".join(lines[:2001]) + "\n")
    stages = chain()
    pipe = await pipeline_from(stages, batch_size=256, slabs=4, memory="host")
    replay = Replay([Source(src, format="binance_trades", symbol="BTCUSDT-PERP", policy="quarantine",
                            quarantine=tmp_path / "q.jsonl")], symbols=pipe.symbols)
    await run_replay(pipe, replay)
    total = replay.accounting.total
    assert total.read == 2000
    assert total.quarantined == 2 and total.delivered == 1998
    assert pipe.stats()["ticks"]["ticks_out"] == 1998
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 2


def test_features_column_is_float64_of_the_declared_width():
    stage = FeaturesStage(["log_return", "spread"])
    assert stage.writes == (ColumnSpec("features", np.dtype(np.float64), (2,), np.nan,
                                       labels=("log_return", "spread")),)


async def test_vpin_on_a_torch_stream_matches_the_cpu_kernel(sample_dir, pipeline_from, collect):
    pytest.importorskip("torch", reason="torch is not installed")
    data = btc_trades(sample_dir)
    results = {}
    for streams in (("cpu",), ("torch:cpu",)):
        stage = VpinStage(5.0, window=10, bar_ns=0, streams=streams, gpu_min_batch=1000)
        pipe = await pipeline_from([stage], batch_size=4096, slabs=2, memory="host")
        buckets = collect(pipe, "vpin.>")
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest(data)
        await pipe.close()
        results[streams[0]] = buckets.payloads
        if streams[0] == "torch:cpu":
            assert stage.gpu_batches == 5, "5 full batches on torch, the last 833 trades on the CPU"
    cpu, torch_ = results["cpu"], results["torch:cpu"]
    assert [b.bucket for b in torch_] == [b.bucket for b in cpu]
    np.testing.assert_allclose([b.buy_volume for b in torch_], [b.buy_volume for b in cpu], rtol=0, atol=1e-9 * 5.0)
    np.testing.assert_allclose([b.vpin for b in torch_], [b.vpin for b in cpu], rtol=0, atol=1e-9)


async def test_the_testing_kit_example_from_its_docstring(pipeline_from, collect):
    from nautilus_pipeline.testing import trades_frame

    pipe = await pipeline_from(DEFAULT_PIPELINE, batch_size=256)
    signals = collect(pipe, "signals.>")
    await pipe.ingest(trades_frame(5000, seed=1), symbol="BTCUSDT-PERP")
    await pipe.drain()
    assert signals.payloads
    assert pipe.batch_size == 256
    assert pipe.stats()["ticks"]["ticks_failed"] == 0


def test_stages_agree_on_labelled_columns_not_on_each_others_classes():
    """A features stage of one's own feeds the inference stage when its ``features`` column
    carries the model's input names as labels; wrong labels are refused at build."""
    from nautilus_pipeline.events import ColumnSpec
    from nautilus_pipeline.pipeline import Pipeline
    from nautilus_pipeline.stage import Stage, upstream_column

    inference = InferenceStage(streams=("cpu",))
    names = inference.input_names

    class MyFeatures(Stage):
        def __init__(self, labels):
            self.name = "my_features"
            self.writes = (ColumnSpec("features", np.dtype(np.float64), (len(labels),), np.nan,
                                      labels=tuple(labels)),)

        async def process(self, lease, stream, ctx):
            lease["features"][...] = 0.0

    mine = MyFeatures(names)
    pipe = Pipeline([mine, inference])
    assert upstream_column(pipe.stages[:1], "features").labels == tuple(names)
    assert upstream_column(pipe.stages[:1], "prediction") is None
    with pytest.raises(ConfigError, match="model inputs missing from the features"):
        Pipeline([MyFeatures(["log_return"]), InferenceStage(streams=("cpu",))])
