"""Pipeline stages (orchestration around ``kernels/``) and their pipeline-definition schemas.

Each ``register_stage`` below names a stage type usable in ``pipelines/*.toml``, the keys
its table accepts (type, default, meaning: unknown keys are errors), and how to build it.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import BuildContext, Key, register_stage
from ..errors import ConfigError
from ..kernels.features import FeatureConfig
from ..kernels.risk import RiskParams
from ..kernels.signal import SignalParams
from .features import FeaturesStage
from .inference import DEFAULT_STREAMS, InferenceStage
from .portfolio import ACCEL_MIN_SYMBOLS, PortfolioStage
from .risk import RiskStage
from .signal import SignalStage
from .vpin import VpinStage

__all__ = [
    "FeaturesStage",
    "InferenceStage",
    "PortfolioStage",
    "RiskStage",
    "SignalStage",
    "VpinStage",
]

STREAMS = Key(list, ["cpu"], "compute stream preference list, first usable wins")
NAME = Key(str, None, "stage name (default: its type)")


def _positive_ints(values: list[Any], key: str) -> tuple[int, ...]:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ConfigError(f"{key} must be a non-empty list of positive integers, got {values!r}")
    return tuple(values)


def _volume(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive volume in base units, got {value!r}")
    return float(value)


def _levels(values: list[Any]) -> tuple[float, ...]:
    if not values or any(isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x < 1 for x in values):
        raise ConfigError(f"var_levels must be confidence levels between 0 and 1 (e.g. [0.95, 0.99]), got {values!r}")
    return tuple(float(x) for x in values)


@register_stage(
    "features",
    {
        "name": NAME,
        "streams": STREAMS,
        "names": Key(list, None, "feature columns in order (default: the model's inputs, "
                     "or every trade and quote feature)"),
        "half_lives": Key(list, [10, 100, 1000], "EWMA half-lives in trades"),
        "intensity_half_life": Key(int, 100, "half-life of the inter-arrival EWMA"),
        "vwap_half_life": Key(int, 100, "half-life of the EWMA VWAP"),
        "rsi_period": Key(int, 14, "Wilder RSI period in price changes"),
        "gpu_min_batch": Key(int, 16_384, "on a torch GPU stream, one symbol's trades per batch "
                             "from which the scan kernel runs on the device"),
        "route": Key(str, "first", "'calibrated': measure the CPU/GPU crossover at start",
                     choices=("first", "calibrated")),
    },
)
def _features(p: dict[str, Any], ctx: BuildContext) -> FeaturesStage:
    config = FeatureConfig(
        half_lives=_positive_ints(p["half_lives"], "half_lives"),
        intensity_half_life=p["intensity_half_life"],
        vwap_half_life=p["vwap_half_life"],
        rsi_period=p["rsi_period"],
    )
    names = p["names"]
    if names is not None and any(not isinstance(n, str) for n in names):
        raise ConfigError(f"names must be a list of feature names (strings), got {names!r}")
    if names is None:
        inference = ctx.params_of("inference")
        if inference is not None:
            try:
                names = list(_inference(inference, ctx).input_names)
            except ConfigError:
                names = None  # a bad model: the inference stage's own build names it
    return FeaturesStage(names, config=config, name=p["name"] or "features", streams=p["streams"],
                         gpu_min_batch=p["gpu_min_batch"], route=p["route"])


@register_stage(
    "inference",
    {
        "name": NAME,
        "streams": Key(list, list(DEFAULT_STREAMS), "compute stream preference list"),
        "model": Key(str, None, "model file (.npz/.safetensors; default: the bundled model)"),
        "coreml_package": Key(str, None, "exported .mlpackage for the coreml streams"),
        "route": Key(str, "first", "first usable backend, or calibrated per batch size",
                     choices=("first", "calibrated")),
    },
)
def _inference(p: dict[str, Any], ctx: BuildContext) -> InferenceStage:
    return InferenceStage(
        ctx.path(p["model"]) if p["model"] else None,
        streams=p["streams"],
        route=p["route"],
        coreml_package=ctx.path(p["coreml_package"]) if p["coreml_package"] else None,
        name=p["name"] or "inference",
    )


@register_stage(
    "vpin",
    {
        "name": NAME,
        "streams": STREAMS,
        "bucket_volume": Key((float, str, dict), None, "V in base units: a number, a table "
                             "symbol = V, or 'auto' (total volume / buckets_per_source)",
                             required=True),
        "buckets_per_source": Key(int, 50, "with bucket_volume = 'auto': buckets per source file"),
        "window": Key(int, 50, "n: buckets in the VPIN window"),
        "bar_ns": Key(int, 60_000_000_000, "time bar length in ns (0 = one bar per trade)"),
        "sigma_window": Key(int, 100, "bars in the dP standard deviation"),
        "threshold": Key(float, 0.9, "CDF level above which flow is toxic"),
        "gpu_min_batch": Key(int, 65_536, "on a torch stream, trades per symbol and batch "
                             "from which the GPU kernel runs (bar_ns = 0)"),
        "route": Key(str, "first", "'calibrated': measure gpu_min_batch at start",
                     choices=("first", "calibrated")),
    },
)
def _vpin(p: dict[str, Any], ctx: BuildContext) -> VpinStage:
    v = p["bucket_volume"]
    if isinstance(v, str):
        if v != "auto":
            raise ConfigError(f"bucket_volume must be a number, a table or 'auto', got {v!r}")
        if p["buckets_per_source"] < 1:
            raise ConfigError(f"buckets_per_source must be >= 1, got {p['buckets_per_source']}")
        v = ctx.propose_bucket_volumes(p["buckets_per_source"])
    elif isinstance(v, dict):
        if not v:
            raise ConfigError("bucket_volume is an empty table; give symbol = V for each symbol")
        v = {str(sym): _volume(x, f"bucket_volume.{sym}") for sym, x in v.items()}
        names, _ = ctx.known_symbols()
        missing = sorted(names - set(v))
        if missing:
            raise ConfigError(f"bucket_volume has no entry for {missing} (given for {sorted(v)}); "
                              "add them, or give one number for every symbol")
    return VpinStage(
        v,
        window=p["window"],
        bar_ns=p["bar_ns"],
        sigma_window=p["sigma_window"],
        threshold=p["threshold"],
        name=p["name"] or "vpin",
        streams=p["streams"],
        gpu_min_batch=p["gpu_min_batch"],
        route=p["route"],
    )


SIGNAL_KEYS = {
    "name": NAME,
    "streams": STREAMS,
    "long_threshold": Key(float, 0.55, "P(up) at or above which the signal is BUY"),
    "short_threshold": Key(float, 0.45, "P(up) at or below which the signal is SELL"),
    "max_position": Key(float, 1.0, "target position size in base units"),
    "sizing": Key(str, "fixed", "fixed or proportional to strength", choices=("fixed", "proportional")),
    "step_aside_on_toxic": Key(bool, True, "go flat while VPIN flags toxic flow"),
}


def signal_rule(p: dict[str, Any] | None) -> SignalParams:
    if p is None:
        return SignalParams()
    return SignalParams(
        long_threshold=p["long_threshold"],
        short_threshold=p["short_threshold"],
        max_position=p["max_position"],
        sizing=p["sizing"],
        step_aside_on_toxic=p["step_aside_on_toxic"],
    )


@register_stage("signal", SIGNAL_KEYS)
def _signal(p: dict[str, Any], ctx: BuildContext) -> SignalStage:
    return SignalStage(signal_rule(p), name=p["name"] or "signal", streams=p["streams"])


INF = math.inf


@register_stage(
    "risk",
    {
        "name": NAME,
        "streams": STREAMS,
        "max_position": Key(float, INF, "limit on |position| (base units)"),
        "max_notional": Key(float, INF, "limit on |position|·price (quote currency)"),
        "max_drawdown": Key(float, INF, "limit on peak-to-trough equity (quote currency)"),
        "max_orders": Key(int, 0, "limit on orders per order_window_ns (0 = none)"),
        "order_window_ns": Key(int, 1_000_000_000, "window of the order-rate limit"),
        "fee_rate": Key(float, 0.0, "fee as a fraction of notional (1 bp = 1e-4)"),
        "fee_per_order": Key(float, 0.0, "fixed fee per fill (quote currency)"),
        "initial_cash": Key(float, 0.0, "starting cash (quote currency)"),
        "var_every": Key(int, 1000, "trades of a symbol between VaR reports (0 = off)"),
        "var_levels": Key(list, [0.95, 0.99], "VaR confidence levels"),
        "var_horizon": Key(int, 100, "VaR horizon in trades"),
        "var_window": Key(int, 1000, "returns in the historical VaR window"),
        "var_paths": Key(int, 10_000, "Monte Carlo paths per VaR report"),
        "vol_feature": Key(str, "vol_ewma_100", "feature used as the per-trade volatility"),
        "seed": Key(int, 0, "Monte Carlo seed"),
        "route": Key(str, "first", "'calibrated': Monte Carlo VaR on the faster of the host "
                     "and the stage's device, timed at start", choices=("first", "calibrated")),
    },
)
def _risk(p: dict[str, Any], ctx: BuildContext) -> RiskStage:
    limits = RiskParams(
        max_position=p["max_position"],
        max_notional=p["max_notional"],
        max_drawdown=p["max_drawdown"],
        max_orders=p["max_orders"],
        order_window_ns=p["order_window_ns"],
        fee_rate=p["fee_rate"],
        fee_per_order=p["fee_per_order"],
        initial_cash=p["initial_cash"],
    )
    return RiskStage(
        limits,
        signal_rule(ctx.params_of("signal")),
        var_every=p["var_every"],
        var_levels=_levels(p["var_levels"]),
        var_horizon=p["var_horizon"],
        var_window=p["var_window"],
        var_paths=p["var_paths"],
        vol_feature=p["vol_feature"],
        seed=p["seed"],
        name=p["name"] or "risk",
        streams=p["streams"],
        route=p["route"],
    )


@register_stage(
    "portfolio",
    {
        "name": NAME,
        "streams": STREAMS,
        "symbols": Key(list, None, "the portfolio's symbols, at least two (default: the "
                       "sources' symbol names)"),
        "bar_ns": Key(int, 60_000_000_000, "time bar length in ns"),
        "window": Key(int, 500, "returns in the rolling covariance window (>= 2)"),
        "ridge": Key(float, 0.0, "shrinkage: Σ + ridge·(tr Σ / n)·I before the min-variance solve"),
        "levels": Key(list, [0.95, 0.99], "VaR confidence levels"),
        "horizon_bars": Key(int, 1, "VaR horizon in bars"),
        "target_weights": Key(dict, None, "table symbol = weight for the target portfolio's "
                              "variance and VaR (default: equal weights)"),
        "accel_min_symbols": Key(int, None, f"on a torch stream, symbols from which covariance "
                                 f"and eigh run there (default {ACCEL_MIN_SYMBOLS}; mlx streams "
                                 "use numpy unless this is given: MLX did not pay)"),
    },
)
def _portfolio(p: dict[str, Any], ctx: BuildContext) -> PortfolioStage:
    symbols = p["symbols"]
    if symbols is None:
        named = [getattr(s, "symbol", None) for s in ctx.sources]
        if not named or any(s is None for s in named):
            raise ConfigError(
                "portfolio: list the portfolio's symbols (symbols = [\"A\", \"B\"]); they can "
                "be taken from the sources only when every source names its symbol"
            )
        symbols = list(dict.fromkeys(named))
    if len(set(symbols)) < 2:
        raise ConfigError(
            f"portfolio: needs at least two symbols, got {sorted(set(symbols))}; add a second "
            "source (or list symbols = [...]) to build a portfolio"
        )
    return PortfolioStage(
        [str(s) for s in symbols],
        bar_ns=p["bar_ns"],
        window=p["window"],
        ridge=p["ridge"],
        levels=tuple(float(x) for x in p["levels"]),
        horizon_bars=p["horizon_bars"],
        target_weights=p["target_weights"],
        name=p["name"] or "portfolio",
        streams=p["streams"],
        accel_min_symbols=p["accel_min_symbols"],
    )
