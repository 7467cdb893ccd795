"""VPIN kernel: issue 4's definition, exact against the loop reference, split-independent."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_analytics import generated_trades, load_binance_um_trades, random_splits, ref_vpin

from nautilus_pipeline.analytics import vpin_frame
from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.kernels.vpin import (
    VPIN_OUTPUT_FIELDS,
    new_vpin_state,
    propose_bucket_volume,
    vpin_flush,
    vpin_update,
    vpin_update_rows,
    vpin_update_torch,
)

RTOL = 1e-12
SECOND = 1_000_000_000


def run_split(trades: dict[str, np.ndarray], splits: list[tuple[int, int]], **params) -> dict:
    state = new_vpin_state(**params)
    outs = []
    for lo, hi in splits:
        state, out = vpin_update(
            state, trades["ts_ns"][lo:hi], trades["price"][lo:hi], trades["size"][lo:hi]
        )
        assert np.all((out["row"] >= 0) & (out["row"] < hi - lo))
        out["row"] = out["row"] + lo  # batch index → stream index
        outs.append(out)
    state, out = vpin_flush(state)
    outs.append(out)
    return {k: np.concatenate([o[k] for o in outs]) for k in VPIN_OUTPUT_FIELDS}


def reference(trades: dict[str, np.ndarray], **params) -> dict:
    return ref_vpin(
        trades["ts_ns"].tolist(), trades["price"].tolist(), trades["size"].tolist(), **params
    )


def assert_matches_reference(fast: dict, ref: dict) -> None:
    assert np.array_equal(fast["bucket"], ref["bucket"])
    assert np.array_equal(fast["ts_ns"], ref["ts_ns"])
    assert np.array_equal(fast["row"], ref["row"])
    for k in ("buy_volume", "sell_volume", "vpin"):
        assert np.array_equal(np.isnan(fast[k]), np.isnan(ref[k])), k
        ok = ~np.isnan(ref[k])
        assert np.allclose(fast[k][ok], ref[k][ok], rtol=RTOL, atol=0.0), k
    # the empirical CDF counts values <= VPIN_j: where two VPIN values are equal to within
    # rounding, the two computations may order them differently; allow exactly those ties
    vp = ref["vpin"]
    for j in np.flatnonzero(~np.isnan(vp)):
        seen = vp[: j + 1][~np.isnan(vp[: j + 1])]
        ties = np.count_nonzero(np.abs(seen - vp[j]) <= 1e-12 * vp[j]) - 1
        assert abs(fast["cdf"][j] - ref["cdf"][j]) <= ties / seen.size + 1e-15
    assert np.array_equal(np.isnan(fast["cdf"]), np.isnan(ref["cdf"]))


def assert_identical(a: dict, b: dict) -> None:
    for k in VPIN_OUTPUT_FIELDS:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


@pytest.fixture(scope="module")
def real_trades(shared_data: Path) -> dict[str, np.ndarray]:
    return load_binance_um_trades(str(shared_data / "binance-um-btcusdt-trades-20240808.csv"))


def real_params(trades: dict[str, np.ndarray]) -> list[dict]:
    total = float(trades["size"].sum())
    return [
        # every trade its own bar, ~300 buckets
        {"bucket_volume": total / 300, "bar_ns": 0},
        # one-second bars, small windows so that VPIN is defined early
        {"bucket_volume": total / 50, "bar_ns": SECOND, "window": 10, "sigma_window": 20},
        # default one-minute bars: six bars, each spilling over many buckets
        {"bucket_volume": total / 50, "window": 5},
        # buckets much smaller than a trade: spill-over inside one trade, ties in VPIN
        {"bucket_volume": 0.37, "bar_ns": 0, "window": 20},
    ]


@pytest.fixture(scope="module")
def real_cases(real_trades: dict[str, np.ndarray]) -> list[tuple[dict, dict]]:
    return [(p, reference(real_trades, **p)) for p in real_params(real_trades)]


def test_vpin_matches_reference_on_real_trades(real_trades, real_cases) -> None:
    n = real_trades["price"].shape[0]
    for params, ref in real_cases:
        fast = run_split(real_trades, [(0, n)], **params)
        assert fast["bucket"].size > 0
        assert_matches_reference(fast, ref)


def test_vpin_identical_under_random_splits_on_real_trades(real_trades, real_cases) -> None:
    n = real_trades["price"].shape[0]
    rng = np.random.default_rng(1)
    for params, _ in real_cases:
        whole = run_split(real_trades, [(0, n)], **params)
        for _ in range(2):
            assert_identical(run_split(real_trades, random_splits(n, rng), **params), whole)
        ones = run_split(real_trades, [(i, i + 1) for i in range(n)], **params)
        assert_identical(ones, whole)


@pytest.mark.parametrize("seed", [0, 1])
def test_vpin_matches_reference_on_generated_trades_in_random_splits(seed: int) -> None:
    trades = generated_trades(20_000, seed=seed)
    total = float(trades["size"].sum())
    rng = np.random.default_rng(100 + seed)
    for params in (
        {"bucket_volume": total / 200, "bar_ns": 0, "window": 30, "sigma_window": 50},
        {"bucket_volume": total / 80, "bar_ns": 10 * SECOND, "window": 8, "sigma_window": 10},
    ):
        fast = run_split(trades, random_splits(20_000, rng), **params)
        assert_matches_reference(fast, reference(trades, **params))
        assert_identical(fast, run_split(trades, [(0, 20_000)], **params))


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(-SECOND, 3 * SECOND),  # some out of order: they join the open bar
            st.integers(-3, 3),
            st.sampled_from([0.0, 0.001, 0.5, 1.0, 2.5, 7.0]),
        ),
        min_size=1,
        max_size=80,
    ),
    bucket_volume=st.sampled_from([0.3, 1.0, 2.0, 10.0]),
    bar_ns=st.sampled_from([0, SECOND, 2 * SECOND]),
    cuts=st.lists(st.integers(1, 79), max_size=8),
)
def test_vpin_matches_reference_on_arbitrary_streams(data, bucket_volume, bar_ns, cuts) -> None:
    trades = {
        "ts_ns": np.cumsum([d[0] for d in data]).astype(np.int64),
        "price": 100.0 + 0.5 * np.cumsum([d[1] for d in data]),
        "size": np.array([d[2] for d in data]),
    }
    params = {"bucket_volume": bucket_volume, "bar_ns": bar_ns, "window": 3, "sigma_window": 4}
    bounds = sorted({c for c in cuts if c < len(data)})
    splits = list(zip([0, *bounds], [*bounds, len(data)], strict=True))
    fast = run_split(trades, splits, **params)
    assert_matches_reference(fast, reference(trades, **params))
    assert_identical(fast, run_split(trades, [(0, len(data))], **params))


def test_first_bar_is_split_evenly() -> None:
    # one bar of 10 units, V = 4: buckets 0 and 1 complete, each half buy
    out = vpin_frame(
        np.array([5, 6], dtype=np.int64), [100.0, 101.0], [4.0, 6.0], bucket_volume=4.0, window=1
    )
    assert out["bucket"].tolist() == [0, 1]
    assert out["buy_volume"].tolist() == [2.0, 2.0]
    assert out["sell_volume"].tolist() == [2.0, 2.0]
    assert out["ts_ns"].tolist() == [6, 6]
    assert out["vpin"].tolist() == [0.0, 0.0]


def test_bar_closes_only_when_a_later_bar_trades_or_at_end_of_stream() -> None:
    state = new_vpin_state(1.0, bar_ns=SECOND, window=1)
    state, out = vpin_update(state, np.array([0, SECOND - 1], np.int64), [1.0, 2.0], [3.0, 3.0])
    assert out["bucket"].size == 0
    state, out = vpin_update(state, np.array([SECOND], np.int64), [3.0], [0.5])
    assert out["bucket"].tolist() == [0, 1, 2, 3, 4, 5]
    assert set(out["ts_ns"].tolist()) == {SECOND - 1}
    assert set(out["row"].tolist()) == {0}  # known from the trade that closed the bar
    state, out = vpin_flush(state)
    assert out["bucket"].size == 0  # 6.5 units: bucket 6 is half full
    _, again = vpin_flush(state)
    assert again["bucket"].size == 0


def test_bars_are_aligned_to_epoch_multiples() -> None:
    # 0.9 s and 1.1 s are 0.2 s apart but in different one-second bars
    ts = np.array([900_000_000, 1_100_000_000, 1_200_000_000], np.int64)
    out = vpin_frame(
        ts, [10.0, 11.0, 12.0], [1.0, 1.0, 1.0], bucket_volume=1.0, bar_ns=SECOND, window=1
    )
    assert out["ts_ns"].tolist() == [900_000_000, 1_200_000_000, 1_200_000_000]
    # bar 1: f = 0.5 (one dP only): two buckets of 1.0 at 0.5 buy
    assert out["buy_volume"].tolist() == [0.5, 0.5, 0.5]


def test_buy_fraction_follows_bulk_volume_classification() -> None:
    prices = [100.0, 101.0, 100.0, 103.0]
    out = vpin_frame(
        np.arange(4, dtype=np.int64), prices, [1.0] * 4, bucket_volume=1.0, bar_ns=0, window=1
    )
    # bar 0: no dP; bar 1: one dP, sigma undefined; then Φ(dP / sigma of dP so far)
    phi = [
        0.5 * math.erfc(-z / math.sqrt(2)) for z in (-1.0 / math.sqrt(2.0), 3.0 / math.sqrt(4.0))
    ]
    assert out["buy_volume"][:2].tolist() == [0.5, 0.5]
    assert out["buy_volume"][2:].tolist() == pytest.approx(phi, rel=1e-15)


def test_constant_price_changes_give_an_even_split() -> None:
    # dP always +0.5: sigma is zero, so f = 0.5 everywhere
    n = 50
    out = vpin_frame(
        np.arange(n, dtype=np.int64),
        100.0 + 0.5 * np.arange(n),
        np.ones(n),
        bucket_volume=1.0,
        bar_ns=0,
        window=5,
    )
    assert np.all(out["buy_volume"] == 0.5)
    assert np.all(out["vpin"][4:] == 0.0)


def test_vpin_is_nan_until_the_window_fills_and_cdf_flags_the_top_decile() -> None:
    trades = generated_trades(30_000, seed=3)
    total = float(trades["size"].sum())
    out = vpin_frame(
        trades["ts_ns"],
        trades["price"],
        trades["size"],
        bucket_volume=total / 400,
        bar_ns=0,
        window=50,
    )
    assert np.all(np.isnan(out["vpin"][:49])) and not np.any(np.isnan(out["vpin"][49:]))
    v = out["vpin"][49:]
    assert np.all((v >= 0.0) & (v <= 1.0))
    cdf = out["cdf"][49:]
    expect = np.array([np.count_nonzero(v[: j + 1] <= v[j]) / (j + 1) for j in range(v.size)])
    assert np.array_equal(cdf, expect)
    assert np.array_equal(out["toxic"][49:], cdf > 0.9)
    assert not out["toxic"][:49].any()


def test_vpin_frame_equals_the_streaming_kernel() -> None:
    trades = generated_trades(10_000, seed=5)
    params = {"bucket_volume": float(trades["size"].sum()) / 60, "bar_ns": 5 * SECOND, "window": 10}
    frame = vpin_frame(trades["ts_ns"], trades["price"], trades["size"], **params)
    streamed = run_split(trades, random_splits(10_000, np.random.default_rng(2)), **params)
    assert_identical(frame, streamed)
    assert {"bucket", "ts_ns", "buy_volume", "sell_volume", "vpin"} <= set(frame)


def test_propose_bucket_volume_is_total_over_fifty() -> None:
    assert propose_bucket_volume(np.array([1.0, 2.0, 97.0])) == 2.0
    assert propose_bucket_volume(np.ones(10), n_buckets=5) == 2.0
    with pytest.raises(DataError):
        propose_bucket_volume(np.zeros(3))


def test_bad_input_and_parameters_are_refused() -> None:
    state = new_vpin_state(1.0)
    with pytest.raises(DataError, match="sizes"):
        vpin_update(state, np.array([1], np.int64), [1.0], [-1.0])
    with pytest.raises(DataError, match="sizes"):
        vpin_update(state, np.array([1], np.int64), [np.nan], [1.0])
    with pytest.raises(ConfigError, match="bucket_volume"):
        new_vpin_state(0.0)
    with pytest.raises(ConfigError, match="sigma_window"):
        new_vpin_state(1.0, sigma_window=1)


def test_rows_of_several_symbols_give_each_symbol_its_own_vpin() -> None:
    a, b = generated_trades(6000, seed=11), generated_trades(4000, seed=12)
    va, vb = float(a["size"].sum()) / 40, float(b["size"].sum()) / 30
    sym = np.concatenate((np.full(6000, 1), np.full(4000, 2), np.full(300, 1))).astype(np.uint32)
    kind = np.concatenate((np.zeros(10_000), np.ones(300))).astype(np.uint8)
    ts = np.concatenate((a["ts_ns"], b["ts_ns"], a["ts_ns"][::20]))
    price = np.concatenate((a["price"], b["price"], np.full(300, np.nan)))
    size = np.concatenate((a["size"], b["size"], np.full(300, np.nan)))
    order = np.argsort(ts, kind="stable")
    cols = [x[order] for x in (sym, ts, price, size, kind)]
    states = {1: new_vpin_state(va, bar_ns=0, window=5), 2: new_vpin_state(vb, bar_ns=0, window=5)}
    got: dict[int, list] = {1: [], 2: []}
    for lo, hi in random_splits(order.shape[0], np.random.default_rng(4), max_size=900):
        states, outs = vpin_update_rows(states, *(c[lo:hi] for c in cols))
        for key, out in outs.items():
            rows = out["row"] + lo
            assert np.all(cols[0][rows] == key) and np.all(cols[4][rows] == 0)
            got[key].append(out["vpin"])
    for key, trades, v in ((1, a, va), (2, b, vb)):
        alone = run_split(
            trades, [(0, trades["price"].shape[0])], bucket_volume=v, bar_ns=0, window=5
        )
        assert np.array_equal(np.concatenate(got[key]), alone["vpin"], equal_nan=True)
    with pytest.raises(ConfigError, match="no state for symbol_id 2"):
        vpin_update_rows({1: states[1]}, cols[0], cols[1], cols[2], cols[3], cols[4])


def run_mixed(trades: dict, splits: list, use_torch, device: str = "cpu", **params) -> dict:
    """Batches alternate between the CPU kernel and the torch variant as ``use_torch(i)`` says."""
    state = new_vpin_state(**params)
    outs = []
    for i, (lo, hi) in enumerate(splits):
        cols = (trades["ts_ns"][lo:hi], trades["price"][lo:hi], trades["size"][lo:hi])
        if use_torch(i):
            state, out = vpin_update_torch(state, *cols, device=device)
        else:
            state, out = vpin_update(state, *cols)
        out["row"] = out["row"] + lo
        outs.append(out)
    return {k: np.concatenate([o[k] for o in outs]) for k in VPIN_OUTPUT_FIELDS}


def assert_close_to_cpu(got: dict, cpu: dict, bucket_volume: float) -> None:
    for k in ("bucket", "ts_ns", "row"):
        assert np.array_equal(got[k], cpu[k]), k
    for k in ("buy_volume", "sell_volume"):
        assert np.max(np.abs(got[k] - cpu[k])) <= 1e-9 * bucket_volume, k
    ok = ~np.isnan(cpu["vpin"])
    assert np.array_equal(ok, ~np.isnan(got["vpin"]))
    assert np.allclose(got["vpin"][ok], cpu["vpin"][ok], rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("pattern", ["all", "alternate"])
def test_torch_variant_matches_the_cpu_kernel_and_shares_its_state(real_trades, pattern) -> None:
    pytest.importorskip("torch")
    n = 12_000
    trades = {k: v[:n] for k, v in real_trades.items()}
    # V chosen so that no bucket edge lands within rounding of a trade's cumulative volume
    params = {"bucket_volume": float(trades["size"].sum()) / 400.5, "bar_ns": 0, "window": 20}
    cpu = run_split(trades, [(0, n)], **params)
    splits = random_splits(n, np.random.default_rng(6))
    use = (lambda i: True) if pattern == "all" else (lambda i: i % 2 == 0)
    got = run_mixed(trades, splits, use, **params)
    assert_close_to_cpu(got, cpu, params["bucket_volume"])


def test_torch_variant_refuses_time_bars() -> None:
    pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="bar_ns = 0"):
        vpin_update_torch(new_vpin_state(1.0), np.array([1], np.int64), [1.0], [1.0], device="cpu")


@pytest.mark.gpu
def test_torch_variant_on_cuda_matches_the_cpu_kernel() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    trades = generated_trades(200_000, seed=21)
    params = {"bucket_volume": float(trades["size"].sum()) / 700.5, "bar_ns": 0, "window": 50}
    cpu = run_split(trades, [(0, 200_000)], **params)
    splits = random_splits(200_000, np.random.default_rng(7), max_size=65_536)
    got = run_mixed(trades, splits, lambda i: True, device="cuda", **params)
    assert_close_to_cpu(got, cpu, params["bucket_volume"])
