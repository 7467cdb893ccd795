"""Features kernel: exact against the loop reference, independent of batch splits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_analytics import (
    generated_trades,
    load_binance_um_trades,
    random_splits,
    ref_features,
    ref_quote_features,
)

from nautilus_pipeline.analytics import features_frame
from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE
from nautilus_pipeline.kernels.features import (
    ALL_FEATURE_NAMES,
    FEATURE_NAMES,
    QUOTE_FEATURE_NAMES,
    FeatureConfig,
    feature_names,
    features_update,
    features_update_rows,
    new_feature_state,
    quote_features,
)

RTOL = 1e-12


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to 1e-12 relative per value; NaN where the reference has NaN.

    Near a zero crossing of a column (an EWMA of returns), the relative error is taken
    against the column's scale (1e-12 of its largest magnitude times 1e-3).
    """
    assert actual.shape == expected.shape
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    ok = ~np.isnan(expected)
    scale = np.nanmax(np.abs(expected), axis=0, keepdims=True) * 1e-3
    tol = RTOL * np.maximum(np.abs(expected), np.broadcast_to(scale, expected.shape))
    err = np.abs(actual - expected)
    assert np.all(err[ok] <= tol[ok]), f"max error {np.max(err[ok] - tol[ok])} above tolerance"


def run_split(trades: dict[str, np.ndarray], splits: list[tuple[int, int]]) -> np.ndarray:
    state = new_feature_state()
    outs = []
    for lo, hi in splits:
        state, out = features_update(
            state,
            trades["ts_ns"][lo:hi],
            trades["price"][lo:hi],
            trades["size"][lo:hi],
            trades["side"][lo:hi],
        )
        outs.append(out)
    return np.vstack(outs)


def reference(trades: dict[str, np.ndarray]) -> np.ndarray:
    return ref_features(
        trades["ts_ns"].tolist(),
        trades["price"].tolist(),
        trades["size"].tolist(),
        trades["side"].tolist(),
    )


@pytest.fixture(scope="module")
def real_trades(shared_data: Path) -> dict[str, np.ndarray]:
    return load_binance_um_trades(str(shared_data / "binance-um-btcusdt-trades-20240808.csv"))


def test_feature_names_fix_width_and_order() -> None:
    assert len(FEATURE_NAMES) == 13
    assert FEATURE_NAMES[0] == "log_return"
    assert FEATURE_NAMES[1:4] == ("ret_ewma_10", "ret_ewma_100", "ret_ewma_1000")
    assert ALL_FEATURE_NAMES == FEATURE_NAMES + QUOTE_FEATURE_NAMES
    assert feature_names(FeatureConfig(half_lives=(5,)))[:4] == (
        "log_return",
        "ret_ewma_5",
        "vol_ewma_5",
        "imbalance_5",
    )


def test_features_match_reference_on_real_trades(real_trades: dict[str, np.ndarray]) -> None:
    n = real_trades["price"].shape[0]
    fast = run_split(real_trades, [(0, n)])
    assert_close(fast, reference(real_trades))


def test_features_identical_under_random_splits_on_real_trades(
    real_trades: dict[str, np.ndarray],
) -> None:
    n = real_trades["price"].shape[0]
    whole = run_split(real_trades, [(0, n)])
    for seed in range(3):
        split = run_split(real_trades, random_splits(n, np.random.default_rng(seed)))
        assert np.array_equal(split, whole, equal_nan=True)
    ones = run_split(real_trades, [(i, i + 1) for i in range(2000)])
    assert np.array_equal(ones, whole[:2000], equal_nan=True)


def test_features_match_reference_on_generated_trades_in_random_splits() -> None:
    trades = generated_trades(20_000, seed=7)
    splits = random_splits(20_000, np.random.default_rng(11))
    assert_close(run_split(trades, splits), reference(trades))


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(-1_000_000_000, 5_000_000_000),  # some out of order: dt clamps to 0
            st.floats(1.0, 1e5),
            # zero or realistic sizes: subnormal ones (< 2.2e-308) underflow differently in
            # scipy's lfilter and in a Python loop, and no venue reports such sizes
            st.one_of(st.just(0.0), st.floats(1e-9, 10.0)),
            st.sampled_from([-1, 0, 1]),
        ),
        min_size=1,
        max_size=60,
    ),
    cuts=st.lists(st.integers(1, 59), max_size=6),
)
def test_features_match_reference_on_arbitrary_streams(
    data: list[tuple[int, float, float, int]], cuts: list[int]
) -> None:
    ts = np.cumsum([d[0] for d in data]).astype(np.int64)
    trades = {
        "ts_ns": ts,
        "price": np.array([d[1] for d in data]),
        "size": np.array([d[2] for d in data]),
        "side": np.array([d[3] for d in data], dtype=np.int8),
    }
    bounds = sorted({c for c in cuts if c < len(data)})
    splits = list(zip([0, *bounds], [*bounds, len(data)], strict=True))
    fast = run_split(trades, splits)
    ref = reference(trades)
    assert np.array_equal(np.isnan(fast), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.allclose(fast[ok], ref[ok], rtol=RTOL, atol=1e-300)
    assert np.array_equal(fast, run_split(trades, [(0, len(data))]), equal_nan=True)


def test_first_trade_has_zero_return_and_no_rsi() -> None:
    _, out = features_update(
        new_feature_state(), np.array([10], dtype=np.int64), [100.0], [1.0], np.array([1], np.int8)
    )
    row = dict(zip(FEATURE_NAMES, out[0], strict=True))
    assert row["log_return"] == 0.0
    assert row["dt_ewma_100"] == 0.0
    assert math.isnan(row["rsi_14"])
    assert row["imbalance_10"] == 1.0
    assert row["vwap_dist_100"] == 0.0


def test_rsi_is_fifty_without_movement_and_hundred_when_only_rising() -> None:
    n = 30
    ts = np.arange(n, dtype=np.int64)
    flat = features_frame(ts, np.full(n, 100.0), np.ones(n), np.ones(n, np.int8))["rsi_14"]
    assert np.all(np.isnan(flat[:14])) and np.all(flat[14:] == 50.0)
    rising = features_frame(ts, 100.0 + np.arange(n), np.ones(n), np.ones(n, np.int8))["rsi_14"]
    assert np.all(rising[14:] == 100.0)


def test_quote_features_match_reference() -> None:
    rng = np.random.default_rng(3)
    bid = 100.0 + rng.random(50)
    ask = bid + rng.random(50) * 0.5
    bs, az = rng.exponential(1.0, 50), rng.exponential(1.0, 50)
    fast = quote_features(bid, ask, bs, az)
    ref = np.array([ref_quote_features(*row) for row in zip(bid, ask, bs, az, strict=True)])
    assert np.allclose(fast, ref, rtol=RTOL, atol=1e-15)
    assert np.all(np.abs(fast[:, 2]) <= 1.0)


def test_rows_of_several_symbols_get_their_own_features_as_of_each_row() -> None:
    a, b = generated_trades(3000, seed=1), generated_trades(2000, seed=2)
    rng = np.random.default_rng(5)
    # interleave: symbol 7 and symbol 3 trades, plus quotes for symbol 7
    n_q = 500
    sym = np.concatenate((np.full(3000, 7), np.full(2000, 3), np.full(n_q, 7))).astype(np.uint32)
    kind = np.concatenate((np.full(5000, KIND_TRADE), np.full(n_q, KIND_QUOTE))).astype(np.uint8)
    ts = np.concatenate((a["ts_ns"], b["ts_ns"], np.sort(rng.choice(a["ts_ns"], n_q))))
    price = np.concatenate((a["price"], b["price"], np.full(n_q, np.nan)))
    size = np.concatenate((a["size"], b["size"], np.full(n_q, np.nan)))
    side = np.concatenate((a["side"], b["side"], np.zeros(n_q, np.int8)))
    bid = np.concatenate((np.full(5000, np.nan), 60_000.0 + rng.random(n_q)))
    ask = bid + 0.1
    bsz = np.concatenate((np.full(5000, np.nan), rng.random(n_q)))
    asz = np.concatenate((np.full(5000, np.nan), rng.random(n_q)))
    # stream order: by timestamp, symbol 7's quotes after its trades of the same time
    order = np.lexsort((kind, ts))
    cols = [x[order] for x in (sym, kind, ts, price, size, side, bid, ask, bsz, asz)]

    states: dict = {}
    outs = []
    for lo, hi in random_splits(order.shape[0], rng, max_size=700):
        states, out = features_update_rows(states, *[c[lo:hi] for c in cols])
        outs.append(out)
    out = np.vstack(outs)
    sym_s, kind_s = cols[0], cols[1]
    kt = len(FEATURE_NAMES)
    for key, trades in ((7, a), (3, b)):
        rows = np.flatnonzero((sym_s == key) & (kind_s == KIND_TRADE))
        _, alone = features_update(new_feature_state(), *trades.values())
        assert np.array_equal(out[rows, :kt], alone, equal_nan=True)
    # a quote row carries its own quote features and its symbol's latest trade features
    q_rows = np.flatnonzero(kind_s == KIND_QUOTE)
    expect_q = quote_features(*(c[q_rows] for c in cols[6:]))
    assert np.array_equal(out[q_rows, kt:], expect_q)
    for r in q_rows[:50]:
        prev = np.flatnonzero((sym_s[:r] == 7) & (kind_s[:r] == KIND_TRADE))
        if prev.size:
            assert np.array_equal(out[r, :kt], out[prev[-1], :kt], equal_nan=True)
        else:
            assert np.all(np.isnan(out[r, :kt]))
    # symbol 3 never had a quote
    assert np.all(np.isnan(out[sym_s == 3, kt:]))


def test_features_frame_equals_the_streaming_kernel() -> None:
    trades = generated_trades(5000, seed=4)
    frame = features_frame(*trades.values())
    streamed = run_split(trades, random_splits(5000, np.random.default_rng(0)))
    assert list(frame) == list(FEATURE_NAMES)
    for i, name in enumerate(FEATURE_NAMES):
        assert np.array_equal(frame[name], streamed[:, i], equal_nan=True)


def test_state_is_not_modified_by_an_update() -> None:
    trades = generated_trades(100, seed=9)
    s0 = new_feature_state()
    s1, out1 = features_update(s0, *(v[:50] for v in trades.values()))
    ewma_before = s1.ewma.copy()
    features_update(s1, *(v[50:] for v in trades.values()))
    assert np.array_equal(s1.ewma, ewma_before)
    _, again = features_update(s0, *(v[:50] for v in trades.values()))
    assert np.array_equal(again, out1, equal_nan=True)


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="half-lives"):
        FeatureConfig(half_lives=(0, 10))


def test_bad_trades_are_refused_with_what_to_do() -> None:
    ts = np.array([1, 2], dtype=np.int64)
    side = np.array([1, -1], dtype=np.int8)
    with pytest.raises(DataError, match="prices must be finite and > 0"):
        features_update(new_feature_state(), ts, [100.0, 0.0], [1.0, 1.0], side)
    with pytest.raises(DataError, match="sizes finite"):
        features_update(new_feature_state(), ts, [100.0, 101.0], [1.0, np.nan], side)


def test_the_live_path_follows_its_state_through_batch_updates_and_growth() -> None:
    """``FeatureTable.update_small`` passes the state as one table of addresses; the batch
    path rebinds the state arrays (its commit swaps them, a new symbol id grows them), and a
    restore assigns them: the live path must then read the new arrays. Rows fed one at a
    time alternating live, batch and a growth-forcing symbol give the bits of the batch path
    alone."""
    from nautilus_pipeline.kernels.addresses import column_addresses
    from nautilus_pipeline.kernels.features import LIVE_COLUMNS, FeatureTable, all_feature_names

    width = len(all_feature_names(FeatureConfig()))
    rng = np.random.default_rng(5)
    n = 60
    sym = np.where(np.arange(n) % 5 == 3, 1 + (np.arange(n) // 20) * 9, 0).astype(np.uint32)
    cols = {"symbol_id": np.zeros(1, np.uint32), "kind": np.zeros(1, np.uint8),
            "ts_ns": np.zeros(1, np.int64), "price": np.zeros(1), "size": np.zeros(1),
            "side": np.zeros(1, np.int8), "bid": np.full(1, np.nan), "ask": np.full(1, np.nan),
            "bid_size": np.full(1, np.nan), "ask_size": np.full(1, np.nan),
            "dest": np.zeros((1, width))}
    slab = column_addresses(cols, (*LIVE_COLUMNS, ("dest", np.float64, width)))
    index = np.arange(width, dtype=np.int64)
    out = np.empty((1, width))
    live, batch = FeatureTable(), FeatureTable()
    paths = []
    for i in range(n):
        row = dict(symbol_id=sym[i], kind=KIND_TRADE, ts_ns=(i + 1) * 1_000_000,
                   price=100.0 * math.exp(rng.normal(0, 1e-3) + i * 1e-4), size=0.01 + i * 1e-3,
                   side=1 if i % 2 else -1)
        for k, v in row.items():
            cols[k][0] = v
        args = [cols[k] for k in ("symbol_id", "kind", "ts_ns", "price", "size", "side", "bid",
                                  "ask", "bid_size", "ask_size")]
        expected = np.empty((1, width))
        batch.update(*args, expected)
        if i % 3 == 2 or not live.update_small(1, slab, out, index):
            live.update(*args, cols["dest"])
            paths.append("batch")
        else:
            paths.append("live")
        if i == 40:  # a restore assigns the arrays, as FeaturesStage.restore_state does
            live.fs, live.ist, live.seen = live.fs.copy(), live.ist.copy(), live.seen.copy()
        assert cols["dest"].tobytes() == expected.tobytes(), (i, paths[-1])
    assert paths.count("live") > 20 and paths.count("batch") > 15 and live.fs.shape[0] > 8
    assert live.fs.tobytes() == batch.fs.tobytes() and live.ist.tobytes() == batch.ist.tobytes()
