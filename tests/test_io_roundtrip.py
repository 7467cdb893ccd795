"""Round trips: ticks written as Parquet or JSON lines read back identical (trades and quotes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nautilus_pipeline.events import TICK_COLUMN_NAMES
from nautilus_pipeline.io import Replay, Source, detect_format
from nautilus_pipeline.io.jsonl import write_jsonl
from nautilus_pipeline.io.parquet import write_parquet

WRITERS = {"parquet": write_parquet, "jsonl": write_jsonl}


def replayed(sources: list[Source | Path]) -> tuple[dict[str, np.ndarray], list[str]]:
    replay = Replay(sources)
    batches = list(replay.iter_arrays(8192))
    return {k: np.concatenate([b[k] for b in batches]) for k in TICK_COLUMN_NAMES}, replay.symbols.names


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for k in TICK_COLUMN_NAMES:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_real_trades_and_quotes_round_trip(sample_dir: Path, tmp_path: Path, fmt: str) -> None:
    sources = [sample_dir / "binance-spot-ethusdt-trades-20240808.csv",
               sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst",
               sample_dir / "tardis-huobi-btcusd-quotes.csv"]
    original, names = replayed(sources)
    path = tmp_path / f"ticks.{fmt}"
    WRITERS[fmt](path, original, names)
    assert detect_format(path) == fmt
    back, back_names = replayed([Source(path, format=fmt)])
    assert sorted(back_names) == sorted(names)
    # ids are given in order of first sight: compare symbols by name
    original["symbol_id"] = np.array([back_names.index(names[i]) for i in original["symbol_id"]], dtype=np.uint32)
    assert_same(original, back)


tick_rows = st.lists(
    st.tuples(
        st.integers(0, 10**6),  # ts step (ns)
        st.booleans(),  # trade or quote
        st.floats(1e-6, 1e9, allow_nan=False),
        st.floats(1e-9, 1e6, allow_nan=False),
        st.sampled_from([-1, 0, 1]),
        st.sampled_from(["AAA", "BB/B", "Ç-1"]),
        st.integers(0, 2**62),  # receive time offset
    ),
    min_size=1,
    max_size=60,
)


@given(rows=tick_rows, fmt=st.sampled_from(["parquet", "jsonl"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_generated_ticks_round_trip(tmp_path: Path, rows: list[tuple], fmt: str) -> None:
    n = len(rows)
    steps, is_trade, px, sz, side, sym, recv = (list(c) for c in zip(*rows, strict=True))
    trade = np.array(is_trade)
    names = sorted(set(sym))
    nan = np.full(n, np.nan)
    px_a, sz_a = np.array(px), np.array(sz)
    cols = {
        "ts_ns": 1_700_000_000_000_000_000 + np.cumsum(steps).astype(np.int64),
        "ts_recv_ns": np.array(recv, dtype=np.int64),
        "symbol_id": np.array([names.index(s) for s in sym], dtype=np.uint32),
        "kind": np.where(trade, 0, 1).astype(np.uint8),
        "price": np.where(trade, px_a, nan), "size": np.where(trade, sz_a, nan),
        "side": np.where(trade, np.array(side), 0).astype(np.int8),
        "trade_id": np.where(trade, np.arange(n), -1).astype(np.int64),
        "bid": np.where(trade, nan, px_a), "ask": np.where(trade, nan, px_a * 1.001),
        "bid_size": np.where(trade, nan, sz_a), "ask_size": np.where(trade, nan, sz_a),
    }
    path = tmp_path / f"gen.{fmt}"
    WRITERS[fmt](path, cols, names)
    back, back_names = replayed([Source(path, format=fmt)])
    expected = dict(cols)  # ids are given in order of appearance on reading: compare by name
    expected["symbol_id"] = np.array([back_names.index(names[i]) for i in cols["symbol_id"]], dtype=np.uint32)
    assert_same(expected, back)
