"""Risk and signal kernels: simulated account, limits and kill switch, VaR, the signal rule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from reference_analytics import (
    generated_trades,
    load_binance_um_trades,
    random_splits,
    ref_historical_var,
    ref_parametric_var,
    ref_risk,
    ref_signal,
)

from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.kernels.risk import (
    BREACH_DRAWDOWN,
    BREACH_ORDER_RATE,
    BREACH_POSITION,
    RISK_OUTPUT_FIELDS,
    RiskParams,
    breach_names,
    historical_var,
    mc_var,
    new_risk_state,
    parametric_var,
    reset_kill_switch,
    return_window,
    risk_update,
    var_report,
)
from nautilus_pipeline.kernels.signal import (
    SignalParams,
    new_signal_state,
    reason_names,
    signal_update,
)

SECOND = 1_000_000_000


def run_risk(ts, price, target, splits, params: RiskParams) -> dict[str, np.ndarray]:
    state = new_risk_state(params)
    outs = []
    for lo, hi in splits:
        state, out = risk_update(state, ts[lo:hi], price[lo:hi], target[lo:hi])
        outs.append(out)
    return {k: np.concatenate([o[k] for o in outs]) for k in RISK_OUTPUT_FIELDS}


def random_targets(n: int, seed: int, every: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tgt = np.full(n, np.nan)
    at = rng.random(n) < every
    tgt[at] = rng.choice([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0], at.sum())
    return tgt


PARAM_SETS = [
    RiskParams(fee_rate=2e-4, fee_per_order=0.1, initial_cash=10_000.0),
    RiskParams(max_position=1.5, max_notional=1e9, fee_rate=1e-4),
    RiskParams(max_drawdown=25.0, fee_rate=5e-4),
    RiskParams(max_orders=3, order_window_ns=5 * SECOND),
]


@pytest.fixture(scope="module")
def real_trades(shared_data: Path) -> dict[str, np.ndarray]:
    return load_binance_um_trades(str(shared_data / "binance-um-btcusdt-trades-20240808.csv"))


def assert_account_matches(fast: dict, ref: dict) -> None:
    for k in RISK_OUTPUT_FIELDS:
        if fast[k].dtype.kind == "f":
            assert np.array_equal(np.isnan(fast[k]), np.isnan(ref[k])), k
            ok = ~np.isnan(ref[k])
            assert np.allclose(fast[k][ok], ref[k][ok], rtol=1e-12, atol=1e-9), k
        else:
            assert np.array_equal(fast[k], ref[k]), k


@pytest.mark.parametrize("params", PARAM_SETS)
def test_account_matches_reference_on_real_prices_in_random_splits(real_trades, params) -> None:
    ts, price = real_trades["ts_ns"], real_trades["price"]
    n = ts.shape[0]
    tgt = random_targets(n, seed=1)
    ref = ref_risk(ts.tolist(), price.tolist(), tgt.tolist(), **_kwargs(params))
    whole = run_risk(ts, price, tgt, [(0, n)], params)
    assert_account_matches(whole, ref)
    split = run_risk(ts, price, tgt, random_splits(n, np.random.default_rng(3)), params)
    for k in RISK_OUTPUT_FIELDS:
        assert np.array_equal(split[k], whole[k], equal_nan=True), k


def test_account_matches_reference_on_generated_prices() -> None:
    trades = generated_trades(20_000, seed=2)
    tgt = random_targets(20_000, seed=4, every=0.2)
    params = RiskParams(max_position=2.5, max_drawdown=400.0, max_orders=20, fee_rate=1e-4)
    ref = ref_risk(
        trades["ts_ns"].tolist(), trades["price"].tolist(), tgt.tolist(), **_kwargs(params)
    )
    fast = run_risk(
        trades["ts_ns"],
        trades["price"],
        tgt,
        random_splits(20_000, np.random.default_rng(5)),
        params,
    )
    assert_account_matches(fast, ref)
    assert fast["kill"].any()


def _kwargs(p: RiskParams) -> dict:
    return {name: getattr(p, name) for name in RiskParams.__dataclass_fields__}


def test_signal_fills_at_the_next_trade_price_with_fees() -> None:
    params = RiskParams(fee_rate=0.001, fee_per_order=1.0)
    ts = np.arange(3, dtype=np.int64)
    _, out = risk_update(new_risk_state(params), ts, [100.0, 110.0, 120.0], [2.0, np.nan, np.nan])
    assert out["position"].tolist() == [0.0, 2.0, 2.0]
    assert out["fill_price"][1] == 110.0 and out["fill_qty"][1] == 2.0
    cash = -2.0 * 110.0 - 0.001 * 2.0 * 110.0 - 1.0
    assert out["cash"][1] == pytest.approx(cash, rel=1e-15)
    assert out["pnl"][2] == pytest.approx(cash + 2.0 * 120.0, rel=1e-15)


def test_position_limit_breach_turns_the_kill_switch_on_until_reset() -> None:
    params = RiskParams(max_position=1.0)
    state = new_risk_state(params)
    ts = np.arange(4, dtype=np.int64)
    state, out = risk_update(state, ts, [10.0] * 4, [1.0, np.nan, 3.0, 1.0])
    assert out["position"].tolist() == [0.0, 1.0, 1.0, 0.0]  # flattened after the breach
    assert out["breach"][2] == BREACH_POSITION
    assert breach_names(int(out["breach"][2])) == ("max_position",)
    assert out["kill"].tolist() == [False, False, True, True]
    assert state.kill
    state, out = risk_update(state, ts + 4, [10.0] * 4, [1.0, np.nan, np.nan, np.nan])
    assert out["position"].tolist() == [0.0] * 4  # signals ignored while killed
    state = reset_kill_switch(state)
    state, out = risk_update(state, ts[:2] + 8, [10.0] * 2, [1.0, np.nan])
    assert out["position"].tolist() == [0.0, 1.0]
    assert not state.kill


def test_drawdown_breach_flattens_the_position() -> None:
    params = RiskParams(max_drawdown=5.0)
    prices = [100.0, 100.0, 104.0, 97.0, 90.0, 80.0]
    _, out = risk_update(
        new_risk_state(params), np.arange(6, dtype=np.int64), prices, [1.0] + [np.nan] * 5
    )
    assert out["drawdown"][3] == 7.0
    assert out["breach"][3] == BREACH_DRAWDOWN
    assert out["position"].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert out["fill_price"][4] == 90.0


def test_order_rate_breach_drops_the_order() -> None:
    params = RiskParams(max_orders=2, order_window_ns=SECOND)
    ts = np.array([0, 100, 200, 300, 400], dtype=np.int64) * 1_000_000
    _, out = risk_update(new_risk_state(params), ts, [10.0] * 5, [1.0, 2.0, 3.0, np.nan, np.nan])
    assert out["breach"].tolist() == [0, 0, BREACH_ORDER_RATE, 0, 0]
    assert out["position"].tolist() == [0.0, 1.0, 2.0, 0.0, 0.0]


def test_parametric_var_is_the_closed_form() -> None:
    for sigma, exposure, h in ((0.001, 60_000.0, 1), (0.02, -1e6, 10), (0.0, 5.0, 3)):
        got = parametric_var(sigma, exposure, h, (0.95, 0.99))
        for g, lv in zip(got, (0.95, 0.99), strict=True):
            assert g == pytest.approx(
                ref_parametric_var(sigma, exposure, h, lv), rel=1e-12, abs=0.0
            )
    per_row = parametric_var(np.array([0.01, 0.02]), np.array([1.0, 2.0]))
    assert per_row.shape == (2, 2)


def test_historical_var_is_the_sorted_loss_quantile(real_trades) -> None:
    r = np.diff(np.log(real_trades["price"]))
    for window in (10, 100, 1000, r.size):
        w = r[-window:]
        for exposure in (1e5, -3e4):
            got = historical_var(w, exposure, (0.95, 0.99))
            ref = [ref_historical_var(w.tolist(), exposure, lv) for lv in (0.95, 0.99)]
            assert got.tolist() == ref


def _gpu(stream: str) -> list:
    from nautilus_pipeline.compute import unusable_reason

    why = unusable_reason(stream)
    return [pytest.mark.gpu, pytest.mark.skipif(why is not None, reason=f"{stream}: {why}")]


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("numpy", None),
        ("torch", "cpu"),
        ("mlx", "cpu"),
        pytest.param("torch", "cuda", marks=_gpu("torch:cuda")),
        pytest.param("mlx", "gpu", marks=_gpu("mlx:gpu")),
    ],
)
def test_mc_var_of_normal_returns_converges_to_parametric(backend: str, device: str | None) -> None:
    """Every backend and device, float64 on CPUs and CUDA, float32 on MLX's GPU."""
    if backend != "numpy":
        pytest.importorskip(backend, reason=f"{backend} is not installed")
    sigma, exposure, horizon = 0.002, 250_000.0, 10
    got = mc_var(
        sigma, exposure, horizon, 400_000, (0.95, 0.99), seed=7, backend=backend, device=device
    )
    ref = [ref_parametric_var(sigma, exposure, horizon, lv) for lv in (0.95, 0.99)]
    # quantile standard error at 400k paths is ~0.3% of the 99% VaR
    assert got == pytest.approx(ref, rel=0.015)
    again = mc_var(
        sigma, exposure, horizon, 400_000, (0.95, 0.99), seed=7, backend=backend, device=device
    )
    assert np.array_equal(got, again)


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("mlx", "cpu"),
        pytest.param("torch", "cuda", marks=_gpu("torch:cuda")),
        pytest.param("mlx", "gpu", marks=_gpu("mlx:gpu")),
    ],
)
def test_mc_var_bootstrap_on_every_device_matches_numpy_within_mc_error(
    backend: str, device: str
) -> None:
    pytest.importorskip(backend, reason=f"{backend} is not installed")
    r = np.random.default_rng(11).standard_t(4, size=2000) * 1e-3
    want = mc_var(r, 1e6, 5, 400_000, (0.95, 0.99), seed=1)
    got = mc_var(r, 1e6, 5, 400_000, (0.95, 0.99), seed=1, backend=backend, device=device)
    assert got == pytest.approx(want, rel=0.02), "quantile error at 400k paths is <0.5%"


def test_mc_var_bootstrap_of_one_step_converges_to_historical(real_trades) -> None:
    r = np.diff(np.log(real_trades["price"]))[-1000:]
    exposure = 1e6
    got = mc_var(r, exposure, 1, 500_000, (0.95, 0.99), seed=3)
    losses = np.sort(-exposure * r)
    for g, lv in zip(got, (0.95, 0.99), strict=True):
        k = math.ceil(lv * r.size) - 1
        # the bootstrap quantile lands on the historical order statistic or a neighbour
        assert losses[max(k - 2, 0)] <= g <= losses[min(k + 2, r.size - 1)]


def test_mc_var_bootstrap_over_a_horizon_scales_like_sqrt_time() -> None:
    r = np.random.default_rng(0).standard_normal(5000) * 0.001
    one = mc_var(r, 1e6, 1, 200_000, (0.99,), seed=1)
    sixteen = mc_var(r, 1e6, 16, 200_000, (0.99,), seed=1)
    assert sixteen[0] / one[0] == pytest.approx(4.0, rel=0.05)


def test_mc_var_small_chunks_give_the_same_numbers() -> None:
    a = mc_var(0.01, 1e4, 5, 10_000, seed=2)
    b = mc_var(0.01, 1e4, 5, 10_000, seed=2, chunk_elements=5 * 999)
    # the generator's stream is the same numbers in the same order, cut differently
    assert np.allclose(a, b, rtol=1e-12)


@pytest.mark.gpu
def test_mc_var_on_cuda_matches_cpu_to_monte_carlo_error() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu = mc_var(0.002, 1e5, 10, 1_000_000, seed=1, backend="torch", device="cuda")
    cpu = mc_var(0.002, 1e5, 10, 1_000_000, seed=1, backend="numpy")
    assert gpu == pytest.approx(cpu, rel=0.01)


def test_var_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="levels"):
        parametric_var(0.01, 1.0, 1, (1.5,))
    with pytest.raises(ConfigError, match="backend"):
        mc_var(0.01, 1.0, backend="jax")


# ----------------------------------------------------------------------------- signal


def test_signal_matches_reference_and_is_split_independent() -> None:
    rng = np.random.default_rng(8)
    n = 5000
    prob = rng.random(n)
    prob[rng.random(n) < 0.3] = np.nan
    prob[:10] = np.nan
    toxic = rng.random(n) < 0.1
    kill = np.zeros(n, dtype=bool)
    kill[4000:4500] = True
    for params in (SignalParams(), SignalParams(0.6, 0.3, 2.0, "proportional", False)):
        ref = ref_signal(
            prob.tolist(),
            toxic.tolist(),
            kill.tolist(),
            long_threshold=params.long_threshold,
            short_threshold=params.short_threshold,
            max_position=params.max_position,
            sizing=params.sizing,
            step_aside_on_toxic=params.step_aside_on_toxic,
        )
        state = new_signal_state(params)
        outs = []
        for lo, hi in random_splits(n, rng, max_size=300):
            state, out = signal_update(state, prob[lo:hi], toxic[lo:hi], kill[lo:hi])
            outs.append(out)
        got = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        assert got["side"].tolist() == [r[0] for r in ref]
        assert np.allclose(got["strength"], [r[1] for r in ref], rtol=1e-15, atol=0)
        assert got["target"].tolist() == [r[2] for r in ref]
        assert [set(reason_names(int(m))) for m in got["reasons"]] == [set(r[3]) for r in ref]
        assert got["emit"].tolist() == [r[4] for r in ref]


def test_signal_steps_aside_on_toxic_flow_and_kill_switch() -> None:
    _, out = signal_update(
        new_signal_state(),
        np.array([0.9, 0.9, 0.9, 0.1]),
        np.array([False, True, False, False]),
        np.array([False, False, True, False]),
    )
    assert out["side"].tolist() == [1, 0, 0, -1]
    assert reason_names(int(out["reasons"][1])) == ("model_long", "toxic_flow")
    assert "risk_kill_switch" in reason_names(int(out["reasons"][2]))
    assert out["emit"].tolist() == [True, True, False, True]
    assert out["target"].tolist() == [1.0, 0.0, 0.0, -1.0]


def test_signal_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        SignalParams(long_threshold=0.4, short_threshold=0.6)


def test_var_report_gives_three_estimates_that_agree_on_normal_returns() -> None:
    r = np.random.default_rng(5).standard_normal(20_000) * 0.002
    window = return_window(r[:15_000], r[15_000:], 10_000)
    assert np.array_equal(window, r[-10_000:])
    rep = var_report(50_000.0, 0.002, window, horizon=4, n_paths=200_000)
    expect = [ref_parametric_var(0.002, 50_000.0, 4, lv) for lv in (0.95, 0.99)]
    assert rep["parametric"] == pytest.approx(expect, rel=1e-12)
    assert rep["historical"] == pytest.approx(expect, rel=0.06)
    assert rep["mc"] == pytest.approx(expect, rel=0.06)
