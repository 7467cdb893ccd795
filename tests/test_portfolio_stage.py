"""Portfolio stage: the streaming events equal the batch API, on both bundled files at once."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from nautilus_pipeline import config
from nautilus_pipeline.analytics import portfolio_frame
from nautilus_pipeline.cli import main
from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.stages import PortfolioStage

REPO = Path(__file__).resolve().parents[1]
PORTFOLIO_TOML = REPO / "pipelines" / "portfolio.toml"
SECOND = 1_000_000_000
SYMBOLS = ("BTCUSDT-PERP", "ETHUSDT")


def two_sources(sample_dir: Path) -> list[Source]:
    return [
        Source(sample_dir / "binance-um-btcusdt-trades-20240808.csv", symbol="BTCUSDT-PERP"),
        Source(sample_dir / "binance-spot-ethusdt-trades-20240808.csv",
               format="binance_trades", symbol="ETHUSDT"),
    ]


@pytest.fixture(scope="module")
def merged(sample_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Both files in one replay, as the pipeline sees them (columns, symbol names by id)."""
    replay = Replay(two_sources(sample_dir))
    blocks = list(replay.iter_arrays())
    cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    return cols, list(replay.symbols.names)


async def run_stage(pipeline_from, collect, merged, batch_size, **kw):
    cols, names = merged
    stage = PortfolioStage(SYMBOLS, **kw)
    pipe = await pipeline_from([stage], batch_size=batch_size, slabs=4, memory="host",
                               name="book")
    events = collect(pipe, "portfolio.>")
    for name in names:
        pipe.symbols.id_of(name)
    await pipe.ingest(cols)
    await pipe.close()
    return stage, events


@pytest.mark.parametrize("batch_size", [4096, 333])
async def test_stage_events_equal_the_batch_api(pipeline_from, collect, merged, batch_size):
    kw = {"bar_ns": SECOND, "window": 60, "horizon_bars": 60}
    stage, events = await run_stage(pipeline_from, collect, merged, batch_size, **kw)
    assert {e.topic for e in events.events} == {"portfolio.book"}
    got = events.payloads
    cols, names = merged
    trades = cols["kind"] == 0
    frame = portfolio_frame(cols["ts_ns"][trades], np.asarray(names)[cols["symbol_id"][trades]],
                            cols["price"][trades], **kw)
    assert len(got) == frame["ts_ns"].size == stage.stats()["bars"] > 200
    assert [e.ts_ns for e in got] == frame["ts_ns"].tolist()
    assert all(e.symbols == SYMBOLS for e in got)
    np.testing.assert_array_equal([e.weights_min_var for e in got], frame["weights_min_var"])
    np.testing.assert_array_equal([e.eigenvalues for e in got], frame["eigenvalues"])
    np.testing.assert_array_equal([e.factor_1 for e in got], frame["eigenvectors"][:, :, 0])
    np.testing.assert_array_equal([e.explained_variance for e in got],
                                  frame["explained_variance"])
    np.testing.assert_array_equal([e.var_min_var["0.99"] for e in got],
                                  frame["var_min_var"][0.99])
    np.testing.assert_array_equal([e.var_target["0.95"] for e in got], frame["var_equal"][0.95])
    assert stage.stats()["symbols_without_trades"] == [] and "notes" not in stage.stats()


async def test_a_symbol_that_never_trades_means_no_events_and_a_note(pipeline_from, collect,
                                                                     merged):
    cols, names = merged
    stage = PortfolioStage(["BTCUSDT-PERP", "SOLUSDT"], bar_ns=SECOND, window=10)
    pipe = await pipeline_from([stage], batch_size=4096, slabs=4, memory="host")
    events = collect(pipe, "portfolio.>")
    for name in names:
        pipe.symbols.id_of(name)
    await pipe.ingest(cols)
    await pipe.close()
    assert events.payloads == []
    stats = stage.stats()
    assert stats["bars"] == 0 and stats["symbols_without_trades"] == ["SOLUSDT"]
    assert "SOLUSDT never traded" in stats["notes"][0]


async def test_torch_stream_runs_the_heavy_part_in_torch(pipeline_from, collect, merged):
    pytest.importorskip("torch", reason="torch is not installed")
    kw = {"bar_ns": SECOND, "window": 60}
    _, cpu = await run_stage(pipeline_from, collect, merged, 4096, **kw)
    stage, tor = await run_stage(pipeline_from, collect, merged, 4096, streams=("torch:cpu",),
                                 accel_min_symbols=2, **kw)
    assert stage.stats()["accelerated_batches"] == 7
    a = np.array([e.weights_min_var for e in tor.payloads])
    b = np.array([e.weights_min_var for e in cpu.payloads])
    assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-11 * np.max(np.abs(b))


def test_one_symbol_is_a_configuration_error(tmp_path):
    text = PORTFOLIO_TOML.read_text().replace('symbols = ["BTCUSDT-PERP", "ETHUSDT"]',
                                              'symbols = ["ETHUSDT"]')
    definition = config.loads(text, tmp_path / "one.toml")
    with pytest.raises(ConfigError, match="at least two symbols"):
        config.build_stages(definition)
    with pytest.raises(ConfigError, match="at least two symbols"):
        PortfolioStage(["ETHUSDT"])
    with pytest.raises(ConfigError, match="target_weights"):
        PortfolioStage(SYMBOLS, target_weights={"ETHUSDT": 1.0})


def test_symbols_default_to_the_sources_names(sample_dir):
    text = "\n".join(line for line in PORTFOLIO_TOML.read_text().splitlines()
                     if not line.startswith("symbols ="))
    definition = config.loads(text, PORTFOLIO_TOML)
    (stage,) = config.build_stages(definition, config.make_sources(definition, None, None))
    assert stage.symbols == SYMBOLS


def test_portfolio_toml_runs_both_files_and_writes_the_outputs(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(PORTFOLIO_TOML), "--out", str(out), "--no-progress"]) == 0
    lines = (out / "portfolio.jsonl").read_bytes().splitlines()
    table = pq.read_table(out / "portfolio.parquet").to_pydict()
    assert len(lines) == len(table["ts_ns"]) == 285
    first = orjson.loads(lines[0])
    assert first["topic"] == "portfolio.portfolio" and first["symbols"] == list(SYMBOLS)
    assert math.isclose(sum(first["weights_min_var"]), 1.0, rel_tol=1e-12)
    assert table["var_min_var"][0]["0.99"] == first["var_min_var"]["0.99"]
    summary = orjson.loads((out / "summary.json").read_bytes())
    stage = next(s for s in summary["stages"] if s["stage"] == "portfolio")
    assert stage["bars"] == 285 and stage["singular"] == 0
    assert summary["accounting"]  # both files read into one replay
    assert set(summary["symbols"]) == set(SYMBOLS)
