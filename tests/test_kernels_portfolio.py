"""Portfolio kernel: issue 17's definition, against the loop reference, split-independent."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_analytics import random_splits, ref_portfolio

from nautilus_pipeline.analytics import portfolio_frame
from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.kernels.portfolio import (
    PORTFOLIO_OUTPUT_FIELDS,
    concat_outputs,
    new_portfolio_state,
    portfolio_flush,
    portfolio_update,
)

RTOL = 1e-12
SECOND = 1_000_000_000
EPS = 2.0**-52
MATRIX_KEYS = ("mean", "cov", "eigenvalues", "explained_variance")
SCALAR_KEYS = ("variance_min_var", "variance_equal", "variance_target")
VAR_KEYS = ("var_min_var", "var_equal", "var_target")


def load_two_symbols(sample_dir: Path) -> dict[str, np.ndarray]:
    """The bundled BTCUSDT perpetual and ETHUSDT spot trades of 2024-08-08, merged by time."""
    import pyarrow.csv as pacsv

    btc = pacsv.read_csv(sample_dir / "binance-um-btcusdt-trades-20240808.csv")
    eth = pacsv.read_csv(
        sample_dir / "binance-spot-ethusdt-trades-20240808.csv",
        read_options=pacsv.ReadOptions(autogenerate_column_names=True),
    )
    ts = np.concatenate((btc["time"].to_numpy(), eth["f4"].to_numpy())).astype(np.int64)
    price = np.concatenate((btc["price"].to_numpy(), eth["f1"].to_numpy())).astype(np.float64)
    sym = np.concatenate((np.zeros(len(btc), np.int64), np.ones(len(eth), np.int64)))
    order = np.argsort(ts, kind="stable")
    return {
        "ts_ns": ts[order] * 1_000_000,
        "symbol_index": sym[order],
        "symbol": np.array(["BTCUSDT-PERP", "ETHUSDT"])[sym[order]],
        "price": price[order],
    }


@pytest.fixture(scope="module")
def two(sample_dir: Path) -> dict[str, np.ndarray]:
    return load_two_symbols(sample_dir)


def run_split(trades: dict, splits: list[tuple[int, int]], n: int, backend="numpy", **params):
    state = new_portfolio_state(n, **params)
    outs = []
    for lo, hi in splits:
        state, out = portfolio_update(
            state,
            trades["symbol_index"][lo:hi],
            trades["ts_ns"][lo:hi],
            trades["price"][lo:hi],
            backend=backend,
        )
        assert np.all((out["row"] >= 0) & (out["row"] < hi - lo))
        out["row"] = out["row"] + lo
        outs.append(out)
    state, out = portfolio_flush(state, backend=backend)
    outs.append(out)
    return state, concat_outputs(outs, state.params)


def reference(trades: dict, n: int, **params) -> dict:
    names = [str(j) for j in range(n)]
    return ref_portfolio(
        trades["ts_ns"].tolist(),
        [str(j) for j in trades["symbol_index"].tolist()],
        trades["price"].tolist(),
        symbols=names,
        **params,
    )


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Normwise relative difference of one bar's array: max |a − b| / max |b|."""
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


def assert_matches_reference(fast: dict, ref: dict, rtol: float = RTOL) -> None:
    """Every output bar agrees with the loop reference to ``rtol`` (normwise per bar).

    Eigenvectors are compared where they are defined: a column whose eigenvalue is within
    1e-8·λ_max of another spans a degenerate eigenspace (any basis of it is right), and a
    column whose two largest |components| are equal to within rounding (an exact tie in the
    definition) may be signed either way; ``V Λ Vᵀ = Σ`` is checked for every bar. Weights
    are compared to ``rtol · max(1, κ/1000)`` (κ the condition number of Σ_r: no solver does
    better than κ·eps), where neither side is within a factor 10 of the singularity test.
    """
    m = len(ref["ts_ns"])
    assert np.array_equal(fast["ts_ns"], np.array(ref["ts_ns"], dtype=np.int64))
    assert np.array_equal(fast["row"], np.array(ref["row"], dtype=np.int64))
    for t in range(m):
        cov = np.array(ref["cov"][t])
        n = cov.shape[0]
        for k in MATRIX_KEYS:
            r = np.array(ref[k][t])
            assert np.array_equal(np.isnan(fast[k][t]), np.isnan(r)), (k, t)
            ok = ~np.isnan(r)
            if ok.any():
                assert rel_err(fast[k][t][ok], r[ok]) <= rtol, (k, t)
        r_corr = np.array(ref["corr"][t])
        assert np.array_equal(np.isnan(fast["corr"][t]), np.isnan(r_corr)), t
        ok = ~np.isnan(r_corr)
        assert np.allclose(fast["corr"][t][ok], r_corr[ok], rtol=0, atol=RTOL), t
        lam = np.array(ref["eigenvalues"][t])
        vec, rvec = fast["eigenvectors"][t], np.array(ref["eigenvectors"][t])
        top = max(abs(lam[0]), 1e-300)
        recon = vec @ np.diag(fast["eigenvalues"][t]) @ vec.T
        assert rel_err(recon, cov) <= 10 * RTOL if np.any(cov) else np.all(recon == 0)
        for c in range(n):
            gap = min([abs(lam[c] - lam[d]) for d in range(n) if d != c])
            if gap <= 1e-8 * top:
                continue
            mags = np.sort(np.abs(rvec[:, c]))
            tie = mags[-1] - mags[-2] <= 1e-9
            a, b = vec[:, c], rvec[:, c]
            err = min(rel_err(a, b), rel_err(-a, b)) if tie else rel_err(a, b)
            assert err <= rtol * max(1.0, top / gap), (t, c)
        rs = bool(ref["singular"][t])
        fs = bool(fast["singular"][t])
        lam_f = fast["eigenvalues"][t]
        ratio = lam_f[-1] / lam_f[0] if lam_f[0] > 0 else 0.0
        borderline = 0.1 * n * EPS <= abs(ratio) <= 10 * n * EPS
        if not borderline:
            assert fs == rs, t
        if not (fs or rs or borderline):
            w, rw = fast["weights_min_var"][t], np.array(ref["weights_min_var"][t])
            kappa = lam_f[0] / lam_f[-1]
            tol = rtol * max(1.0, kappa / 1000.0)
            assert rel_err(w, rw) <= tol, t
            var_mv = np.array([ref["variance_min_var"][t]])
            assert rel_err(fast["variance_min_var"][t : t + 1], var_mv) <= tol, t
        for k in SCALAR_KEYS[1:]:
            assert rel_err(fast[k][t : t + 1], np.array([ref[k][t]])) <= rtol, (k, t)
        for k in VAR_KEYS[1:]:
            assert rel_err(fast[k][t], np.array(ref[k][t])) <= rtol, (k, t)


def assert_identical(a: dict, b: dict) -> None:
    for k in PORTFOLIO_OUTPUT_FIELDS:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


REAL_PARAMS = [
    {"bar_ns": SECOND, "window": 60},
    {"bar_ns": 5 * SECOND, "window": 12, "ridge": 0.1, "levels": (0.9, 0.975), "horizon_bars": 12,
     "target_weights": (0.7, 0.3)},
    {"bar_ns": 250_000_000, "window": 400},
]


@pytest.fixture(scope="module")
def real_cases(two) -> list[tuple[dict, dict]]:
    return [(p, reference(two, 2, **p)) for p in REAL_PARAMS]


def test_portfolio_matches_reference_on_bundled_btc_and_eth_trades(two, real_cases) -> None:
    n = two["price"].shape[0]
    for params, ref in real_cases:
        _, fast = run_split(two, [(0, n)], 2, **params)
        assert fast["ts_ns"].size > 20
        assert_matches_reference(fast, ref)


def test_portfolio_identical_under_random_splits_on_real_trades(two, real_cases) -> None:
    n = two["price"].shape[0]
    rng = np.random.default_rng(3)
    for params, _ in real_cases:
        _, whole = run_split(two, [(0, n)], 2, **params)
        for _ in range(2):
            _, split = run_split(two, random_splits(n, rng, max_size=3000), 2, **params)
            assert_identical(split, whole)
    params = REAL_PARAMS[1]
    _, whole = run_split(two, [(0, n)], 2, **params)
    _, ones = run_split(two, [(i, i + 1) for i in range(n)], 2, **params)
    assert_identical(ones, whole)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(-SECOND // 2, 3 * SECOND),  # some out of order: they join the open bar
            st.integers(0, 2),
            st.floats(50.0, 150.0, allow_nan=False),
        ),
        min_size=1,
        max_size=120,
    ),
    n=st.integers(2, 3),
    window=st.integers(5, 8),
    ridge=st.sampled_from([0.0, 0.0, 0.05]),
    cuts=st.lists(st.integers(1, 119), max_size=8),
)
def test_portfolio_matches_reference_on_arbitrary_streams(data, n, window, ridge, cuts) -> None:
    trades = {
        "ts_ns": np.cumsum([d[0] for d in data]).astype(np.int64) + 10**12,
        "symbol_index": np.array([d[1] % n for d in data], dtype=np.int64),
        "price": np.array([d[2] for d in data]),
    }
    params = {"bar_ns": SECOND, "window": window, "ridge": ridge, "horizon_bars": 3}
    bounds = sorted({c for c in cuts if c < len(data)})
    splits = list(zip([0, *bounds], [*bounds, len(data)], strict=True))
    _, fast = run_split(trades, splits, n, **params)
    assert_matches_reference(fast, reference(trades, n, **params))
    _, whole = run_split(trades, [(0, len(data))], n, **params)
    assert_identical(fast, whole)


def bars_stream(rows: list[tuple[float, int, float]]) -> dict[str, np.ndarray]:
    """Trades from (seconds, symbol index, price) rows."""
    return {
        "ts_ns": np.array([round(r[0] * SECOND) for r in rows], dtype=np.int64),
        "symbol_index": np.array([r[1] for r in rows], dtype=np.int64),
        "price": np.array([r[2] for r in rows], dtype=np.float64),
    }


def test_bars_wait_for_every_symbol_and_carry_closes_and_stamp_the_bar_end() -> None:
    # bar 0: only A; bar 1: A and B (first emitted bar); bar 2: only A (B carried);
    # bar 3: empty (no bar); bar 4: both
    t = bars_stream([(0.1, 0, 10.0), (1.2, 0, 11.0), (1.5, 1, 20.0), (1.9, 0, 12.0),
                     (2.5, 0, 13.0), (4.0, 1, 22.0), (4.5, 0, 13.0)])
    state, out = run_split(t, [(0, 7)], 2, bar_ns=SECOND, window=2)
    # returns: bar 2 vs 1: (13/12, 20/20); bar 4 vs 2: (13/13, 22/20): a window of 2
    assert out["ts_ns"].tolist() == [5 * SECOND]
    assert out["row"].tolist() == [-1]
    r = np.log(np.array([[13 / 12, 1.0], [1.0, 22 / 20]]))
    assert np.allclose(out["mean"][0], r.mean(axis=0), rtol=1e-15)
    assert np.allclose(out["cov"][0], np.cov(r.T, ddof=1), rtol=1e-14)
    assert state.returns == 2 and state.bars == 1


def test_a_bar_is_emitted_when_a_later_trade_of_any_symbol_arrives() -> None:
    state = new_portfolio_state(2, bar_ns=SECOND, window=2)
    t = bars_stream([(0.5, 0, 1.0), (0.6, 1, 2.0), (1.5, 0, 1.1), (2.5, 1, 2.2)])
    state, out = portfolio_update(state, t["symbol_index"], t["ts_ns"], t["price"])
    assert out["ts_ns"].size == 0  # bars 0, 1 closed: one return only
    state, out = portfolio_update(state, [1], [3 * SECOND], [2.0])
    assert out["ts_ns"].tolist() == [3 * SECOND] and out["row"].tolist() == [0]
    state, out = portfolio_flush(state)
    assert out["ts_ns"].tolist() == [4 * SECOND] and out["row"].tolist() == [-1]
    _, again = portfolio_flush(state)
    assert again["ts_ns"].size == 0


def test_factors_are_sorted_signed_and_explain_all_the_variance(two) -> None:
    out = portfolio_frame(two["ts_ns"], two["symbol"], two["price"], bar_ns=SECOND, window=60)
    assert out["symbols"] == ["BTCUSDT-PERP", "ETHUSDT"]
    lam, vec = out["eigenvalues"], out["eigenvectors"]
    assert np.all(np.diff(lam, axis=1) <= 0)
    lead = np.take_along_axis(vec, np.argmax(np.abs(vec), axis=1)[:, None, :], axis=1)
    assert np.all(lead > 0)
    assert np.allclose(out["explained_variance"].sum(axis=1), 1.0, rtol=1e-14)
    cov = out["cov"]
    assert np.allclose(vec @ (lam[:, :, None] * vec.transpose(0, 2, 1)), cov, rtol=1e-12,
                       atol=1e-12 * np.abs(cov).max())
    # BTC and ETH move together: the first factor explains most of the variance
    assert np.median(out["explained_variance"][:, 0]) > 0.6


def test_min_variance_weights_sum_to_one_and_beat_equal_weights(two) -> None:
    out = portfolio_frame(two["ts_ns"], two["symbol"], two["price"], bar_ns=SECOND, window=60)
    w = out["weights_min_var"]
    assert np.allclose(w.sum(axis=1), 1.0, rtol=1e-14)
    # first-order condition: Σ w is the same in every component (a multiple of 1)
    g = np.einsum("bij,bj->bi", out["cov"], w)
    assert np.allclose(g, g[:, :1], rtol=1e-10)
    assert np.all(out["variance_min_var"] <= out["variance_equal"] * (1 + 1e-12))


def test_ridge_shrinks_towards_equal_weights() -> None:
    rng = np.random.default_rng(5)
    r = rng.normal(0, 1e-3, (200, 3)) @ np.array([[1, 0.9, 0.8], [0, 0.4, 0.1], [0, 0, 0.3]])
    close = 100 * np.exp(np.cumsum(r, axis=0))
    ts = np.repeat(np.arange(200, dtype=np.int64) * SECOND, 3)
    sym = np.tile(np.array(["a", "b", "c"]), 200)
    for ridge in (0.0, 0.5, 1e6):
        out = portfolio_frame(ts, sym, close.reshape(-1), bar_ns=SECOND, window=50, ridge=ridge)
        cov = out["cov"][-1]
        sr = cov + ridge * np.trace(cov) / 3 * np.eye(3)
        x = np.linalg.solve(sr, np.ones(3))
        assert np.allclose(out["weights_min_var"][-1], x / x.sum(), rtol=1e-12)
    assert np.allclose(out["weights_min_var"][-1], 1 / 3, rtol=1e-5)


def test_var_is_normal_quantile_times_sqrt_of_horizon_variance(two) -> None:
    kw = {"bar_ns": SECOND, "window": 60, "levels": (0.95, 0.99), "horizon_bars": 10}
    out = portfolio_frame(two["ts_ns"], two["symbol"], two["price"], **kw)
    for level in (0.95, 0.99):
        z = statistics.NormalDist().inv_cdf(level)
        for key, variance in (("var_min_var", "variance_min_var"),
                              ("var_equal", "variance_equal")):
            assert np.allclose(out[key][level], z * np.sqrt(10 * out[variance]), rtol=1e-15)


def test_identical_prices_give_nan_weights_counted_not_an_exception() -> None:
    ts = np.repeat(np.arange(30, dtype=np.int64) * SECOND, 2)
    sym = np.tile(np.array([0, 1]), 30)
    price = np.where(sym == 0, 100.0, 50.0 + np.sin(np.arange(60)))
    state, out = run_split({"ts_ns": ts, "symbol_index": sym, "price": price}, [(0, 60)], 2,
                           bar_ns=SECOND, window=10)
    assert out["ts_ns"].size == 20
    assert np.all(out["singular"]) and state.singular == 20
    assert np.all(np.isnan(out["weights_min_var"])) and np.all(np.isnan(out["var_min_var"]))
    assert np.all(out["cov"][:, 0, :] == 0) and np.all(np.isnan(out["corr"][:, 0, 1]))
    assert np.all(np.isfinite(out["var_equal"]))
    # a ridge makes Σ_r invertible again
    _, ridged = run_split({"ts_ns": ts, "symbol_index": sym, "price": price}, [(0, 60)], 2,
                          bar_ns=SECOND, window=10, ridge=0.01)
    assert not ridged["singular"].any() and np.all(np.isfinite(ridged["weights_min_var"]))
    # every price identical: zero covariance, explained variance undefined
    _, flat = run_split({"ts_ns": ts, "symbol_index": sym, "price": np.full(60, 7.0)},
                        [(0, 60)], 2, bar_ns=SECOND, window=10)
    assert np.all(flat["singular"]) and np.all(np.isnan(flat["explained_variance"]))


def test_a_symbol_that_never_trades_gives_no_bars() -> None:
    ts = np.arange(100, dtype=np.int64) * SECOND
    state, out = run_split({"ts_ns": ts, "symbol_index": np.zeros(100, np.int64),
                            "price": 100 + np.arange(100.0)}, [(0, 50), (50, 100)], 3,
                           bar_ns=SECOND, window=5)
    assert out["ts_ns"].size == 0 and state.bars == 0 and state.returns == 0


def test_one_symbol_and_bad_parameters_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="at least two symbols"):
        new_portfolio_state(1)
    with pytest.raises(ConfigError, match="at least two symbols"):
        portfolio_frame(np.arange(5), np.array(["X"] * 5), np.ones(5), bar_ns=1, window=2)
    with pytest.raises(ConfigError, match="window"):
        new_portfolio_state(2, window=1)
    with pytest.raises(ConfigError, match="levels"):
        new_portfolio_state(2, levels=(1.0,))
    with pytest.raises(ConfigError, match="target_weights"):
        new_portfolio_state(2, target_weights=(1.0,))
    with pytest.raises(ConfigError, match="bar_ns"):
        new_portfolio_state(2, bar_ns=0)


def test_bad_prices_and_indices_are_data_errors() -> None:
    s = new_portfolio_state(2, bar_ns=SECOND, window=2)
    with pytest.raises(DataError, match="prices"):
        portfolio_update(s, [0], [1], [0.0])
    with pytest.raises(DataError, match="prices"):
        portfolio_update(s, [0], [1], [math.nan])
    with pytest.raises(DataError, match="symbol_index"):
        portfolio_update(s, [2], [1], [1.0])


def test_portfolio_frame_equals_the_streaming_kernel(two) -> None:
    kw = {"bar_ns": 2 * SECOND, "window": 30, "ridge": 0.01}
    frame = portfolio_frame(two["ts_ns"], two["symbol"], two["price"], **kw)
    n = two["price"].shape[0]
    _, streamed = run_split(two, random_splits(n, np.random.default_rng(8)), 2, **kw)
    assert np.array_equal(frame["ts_ns"], streamed["ts_ns"])
    for k in ("cov", "eigenvalues", "eigenvectors", "weights_min_var", "mean", "corr"):
        assert np.array_equal(frame[k], streamed[k]), k
    for i, level in enumerate((0.95, 0.99)):
        assert np.array_equal(frame["var_min_var"][level], streamed["var_min_var"][:, i])
        assert np.array_equal(frame["var_equal"][level], streamed["var_equal"][:, i])


def assert_close_backends(got: dict, ref: dict, rtol: float = 1e-11) -> None:
    assert np.array_equal(got["ts_ns"], ref["ts_ns"])
    assert np.array_equal(got["singular"], ref["singular"])
    for k in ("mean", "cov", "eigenvalues", "eigenvectors", "weights_min_var", "var_min_var"):
        for t in range(ref["ts_ns"].shape[0]):
            assert rel_err(got[k][t], ref[k][t]) <= rtol, (k, t)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_accelerated_paths_match_numpy_and_the_reference(two, real_cases, backend) -> None:
    pytest.importorskip("torch" if backend == "torch" else "mlx.core")
    n = two["price"].shape[0]
    params, ref = real_cases[0]
    _, numpy_out = run_split(two, [(0, n)], 2, **params)
    _, got = run_split(two, random_splits(n, np.random.default_rng(9)), 2, backend=backend,
                       **params)
    assert_close_backends(got, numpy_out)
    assert_matches_reference(got, ref)


def test_accelerated_paths_on_many_symbols_match_numpy() -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    k, bars = 40, 120
    r = rng.normal(0, 1e-3, (bars, k)) + rng.normal(0, 1e-3, (bars, 1))
    close = 100 * np.exp(np.cumsum(r, axis=0))
    t = {"ts_ns": np.repeat(np.arange(bars, dtype=np.int64) * SECOND, k),
         "symbol_index": np.tile(np.arange(k), bars), "price": close.reshape(-1)}
    _, base = run_split(t, [(0, bars * k)], k, bar_ns=SECOND, window=60)
    _, tor = run_split(t, [(0, bars * k)], k, backend="torch", bar_ns=SECOND, window=60)
    assert_close_backends(tor, base, rtol=1e-10)


@pytest.mark.gpu
def test_torch_cuda_path_matches_numpy(two) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU (torch sees none)")
    n = two["price"].shape[0]
    _, base = run_split(two, [(0, n)], 2, bar_ns=SECOND, window=60)
    state = new_portfolio_state(2, bar_ns=SECOND, window=60)
    state, body = portfolio_update(state, two["symbol_index"], two["ts_ns"], two["price"],
                                   backend="torch", device="cuda")
    _, tail = portfolio_flush(state, backend="torch", device="cuda")
    assert_close_backends(concat_outputs([body, tail], state.params), base)
