"""Portfolio stage: cross-symbol covariance, factors, min-variance weights and VaR per bar.

Orchestration around :func:`nautilus_pipeline.kernels.portfolio.portfolio_update` (the
definition is there). The stage takes the portfolio's symbols (at least two; sorted, the
order of every vector it publishes), feeds their trades to the kernel in stream order and
publishes each output bar as a :class:`~nautilus_pipeline.events.PortfolioEvent` on
``portfolio.<pipeline>``, which the command line's sink writes to ``portfolio.jsonl`` and
``portfolio.parquet``. Trades of other symbols and quotes are ignored. It adds no slab
column: a bar's numbers are about the book, not about a row. At the end of the stream the
open bar is closed and published.

Bad input is counted, not raised: a portfolio symbol that never trades means no bar is
ever emitted (the definition waits for every symbol), which ``stats()`` states in the run's
summary (``symbols_without_trades`` and a note) and a warning logs; a singular covariance
(identical prices) gives NaN weights, counted in ``singular``.

Compute streams. The heavy part (covariance and ``eigh`` of every window) can run on the
stage's stream: torch on ``torch:*`` from ``accel_min_symbols`` symbols on (default 200),
numpy below it and on ``cpu``. MLX (CPU, float64: its GPU has no float64 and its ``eigh``
is CPU-only) ran at 0.17-0.75× numpy here, so an ``mlx:*`` stream uses numpy unless
``accel_min_symbols`` is given explicitly. Measured with ``scripts/bench_kernels.py
--portfolio-only`` (window 500, one thread, 2-core Xeon VM; output bars/s):

=======  =======  =========  =====
symbols  numpy    torch cpu  mlx
=======  =======  =========  =====
10       18,694   26,611     14,068
100      648      467        190
500      23.4     24.2       3.9
=======  =======  =========  =====

Torch CPU and numpy are within this shared VM's noise of each other (both call LAPACK's
``syevd``). On the lent H200 (``docs/measurements/gpu_bench_portfolio_h200.txt``, same
command with ``--portfolio-device cuda --portfolio-symbols 10,50,100,200,500``; one host
thread; bars/s, the whole call with its host<->device copies):

=======  =======  =========  ==========
symbols  numpy    torch cpu  torch cuda
=======  =======  =========  ==========
10       25,582   30,501     79,013
50       2,565    3,052      1,458
100      805      909        654
200      226      237        349
500      21.6     22.9       98.8
=======  =======  =========  ==========

CUDA loses at 50-100 symbols and wins from 200 on (1.5x, 4.3x at 500), so the default
threshold is 200. It also wins at 10 symbols, where the stage costs ~40 µs a bar anyway
and a GPU stream is not worth binding for it. Not measured: 101-199 symbols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from .. import topics
from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import KIND_TRADE, PortfolioEvent
from ..kernels.portfolio import (
    PortfolioState,
    new_portfolio_state,
    portfolio_flush,
    portfolio_update,
)
from ..memory import Lease
from ..params import param
from ..stage import Stage, StageContext

log = structlog.get_logger("nautilus_pipeline.stages.portfolio")

ACCEL_MIN_SYMBOLS = 200


@dataclass(frozen=True, slots=True)
class PortfolioParams:
    """The portfolio stage's parameters."""

    symbols: tuple[str, ...] | None = param(None, "the portfolio's symbols, at least two (default: "
                                            "the sources' symbol names)")
    bar_ns: int = param(60_000_000_000, "time bar length in ns")
    window: int = param(500, "returns in the rolling covariance window (>= 2)")
    ridge: float = param(0.0, "shrinkage: Σ + ridge·(tr Σ / n)·I before the min-variance solve")
    levels: tuple[float, ...] = param((0.95, 0.99), "VaR confidence levels")
    horizon_bars: int = param(1, "VaR horizon in bars")
    target_weights: dict[str, float] | None = param(None, "table symbol = weight for the target "
                                                    "portfolio's variance and VaR (default: equal weights)")
    accel_min_symbols: int | None = param(None, f"on a torch stream, symbols from which covariance and "
                                          f"eigh run there (default {ACCEL_MIN_SYMBOLS}; mlx streams use "
                                          "numpy unless this is given: MLX did not pay)")


class PortfolioStage(Stage):
    """Publishes ``portfolio.<pipeline>`` events per bar of the portfolio of ``symbols``."""

    reads = ("ts_ns", "symbol_id", "kind", "price")
    writes = ()

    Params = PortfolioParams

    @classmethod
    def from_params(cls, p: PortfolioParams, ctx: Any, *, name: str, streams: Sequence[str]) -> PortfolioStage:
        symbols = p.symbols
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
        return cls([str(s) for s in symbols], bar_ns=p.bar_ns, window=p.window, ridge=p.ridge,
                   levels=tuple(float(x) for x in p.levels), horizon_bars=p.horizon_bars,
                   target_weights=p.target_weights, name=name, streams=streams,
                   accel_min_symbols=p.accel_min_symbols)

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        bar_ns: int = 60_000_000_000,
        window: int = 500,
        ridge: float = 0.0,
        levels: Sequence[float] = (0.95, 0.99),
        horizon_bars: int = 1,
        target_weights: Mapping[str, float] | None = None,
        name: str = "portfolio",
        streams: Sequence[str] = ("cpu",),
        topic_prefix: str = topics.PORTFOLIO,
        accel_min_symbols: int | None = None,
    ):
        names = [str(s) for s in symbols]
        if len(set(names)) != len(names):
            raise ConfigError(f"portfolio stage {name!r}: symbols listed twice in {names}")
        self.symbols = tuple(sorted(names))
        target = None
        if target_weights is not None:
            extra = sorted(set(target_weights) - set(self.symbols))
            missing = sorted(set(self.symbols) - set(target_weights))
            if extra or missing:
                raise ConfigError(
                    f"portfolio stage {name!r}: target_weights needs one weight per symbol "
                    f"{list(self.symbols)}; missing {missing}, not in the portfolio {extra}"
                )
            target = [float(target_weights[s]) for s in self.symbols]
        self.params = {
            "bar_ns": bar_ns,
            "window": window,
            "ridge": ridge,
            "levels": tuple(levels),
            "horizon_bars": horizon_bars,
            "target_weights": target,
        }
        new_portfolio_state(len(self.symbols), **self.params)  # validates now, not at a tick
        self.name = name
        self.streams = tuple(streams)
        self.topic_prefix = topic_prefix
        self._mlx_allowed = accel_min_symbols is not None
        self.accel_min_symbols = ACCEL_MIN_SYMBOLS if accel_min_symbols is None else accel_min_symbols
        self._backend: tuple[str, str | None] = ("numpy", None)
        self._reset()

    def _reset(self) -> None:
        self.state: PortfolioState = new_portfolio_state(len(self.symbols), **self.params)
        self._index: dict[int, int] = {}  # symbol_id → position in the portfolio, −1: not in it
        self.traded: set[str] = set()
        self.events = 0
        self.accelerated_batches = 0

    async def start(self, ctx: StageContext) -> None:
        self._reset()

    async def bind(self, stream: ComputeStream) -> None:
        if stream.backend == "torch":
            self._backend = ("torch", str(getattr(stream, "device", "cpu")))
        elif stream.backend == "mlx" and self._mlx_allowed:
            self._backend = ("mlx", None)
        else:
            self._backend = ("numpy", None)
        await asyncio.to_thread(self._warm_up)

    def _warm_up(self) -> None:
        """Load (or JIT-compile: seconds on a cold cache) the numba bar scan and run one
        window through the routed backend before the first batch, off the event loop."""
        n = len(self.symbols)
        backend, device = self._route()
        state = new_portfolio_state(n, bar_ns=1, window=2)
        ts = np.repeat(np.arange(4, dtype=np.int64), n)
        price = 1.0 + 0.01 * np.arange(4 * n) ** 2
        state, _ = portfolio_update(state, np.tile(np.arange(n), 4), ts, price,
                                    backend=backend, device=device)
        portfolio_flush(state, backend=backend, device=device)

    def _route(self) -> tuple[str, str | None]:
        if len(self.symbols) >= self.accel_min_symbols:
            return self._backend
        return ("numpy", None)

    def _positions(self, sym: np.ndarray, ctx: StageContext) -> np.ndarray:
        lookup = {s: j for j, s in enumerate(self.symbols)}
        ids = np.unique(sym)
        for sid in ids.tolist():
            if sid not in self._index:
                self._index[sid] = lookup.get(ctx.symbol_name(sid), -1)
        table = np.array([self._index[sid] for sid in ids.tolist()], dtype=np.int64)
        return table[np.searchsorted(ids, sym)]

    def _compute(self, lease: Lease, ctx: StageContext):
        sym, kind = lease["symbol_id"], lease["kind"]
        pos = self._positions(sym, ctx) if sym.shape[0] else np.zeros(0, np.int64)
        rows = np.flatnonzero((kind == KIND_TRADE) & (pos >= 0))
        backend, device = self._route()
        state, out = portfolio_update(
            self.state, pos[rows], lease["ts_ns"][rows], lease["price"][rows],
            backend=backend, device=device,
        )
        traded = {self.symbols[j] for j in np.unique(pos[rows]).tolist()}
        return state, out, traded, backend != "numpy"

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        state, out, traded, accelerated = await stream.run(self._compute, lease, ctx)
        self.state = state
        self.traded |= traded
        self.accelerated_batches += int(accelerated)
        await self._publish(ctx, out)

    async def finish(self, ctx: StageContext) -> None:
        backend, device = self._route()
        self.state, out = portfolio_flush(self.state, backend=backend, device=device)
        await self._publish(ctx, out)
        silent = self.silent_symbols()
        if silent:
            log.warning("portfolio_symbols_without_trades", stage=self.name, symbols=silent,
                        bars=0, note=self._note(silent))

    def silent_symbols(self) -> list[str]:
        return [s for s in self.symbols if s not in self.traded]

    def _note(self, silent: list[str]) -> str:
        return (f"no portfolio bars: {', '.join(silent)} never traded (a bar needs every "
                "symbol's close)")

    async def _publish(self, ctx: StageContext, out: dict[str, np.ndarray]) -> None:
        m = out["ts_ns"].shape[0]
        if not m:
            return
        topic = topics.event(self.topic_prefix, ctx.pipeline)
        levels = [f"{lv:g}" for lv in self.params["levels"]]
        n = len(self.symbols)
        target = self.params["target_weights"] or [1.0 / n] * n
        vol = np.sqrt(np.diagonal(out["cov"], axis1=1, axis2=2))
        for t in range(m):
            self.events += 1
            await ctx.publish(
                topic,
                PortfolioEvent(
                    ts_ns=int(out["ts_ns"][t]),
                    pipeline=ctx.pipeline,
                    symbols=self.symbols,
                    weights_min_var=tuple(out["weights_min_var"][t].tolist()),
                    weights_target=tuple(target),
                    eigenvalues=tuple(out["eigenvalues"][t].tolist()),
                    explained_variance=tuple(out["explained_variance"][t].tolist()),
                    factor_1=tuple(out["eigenvectors"][t][:, 0].tolist()),
                    volatility=tuple(vol[t].tolist()),
                    variance_min_var=float(out["variance_min_var"][t]),
                    variance_target=float(out["variance_target"][t]),
                    var_min_var=dict(zip(levels, out["var_min_var"][t].tolist(), strict=True)),
                    var_target=dict(zip(levels, out["var_target"][t].tolist(), strict=True)),
                    singular=bool(out["singular"][t]),
                ),
            )

    def stats(self) -> dict[str, object]:
        silent = self.silent_symbols()
        stats: dict[str, object] = {
            "symbols": list(self.symbols),
            "bars": self.state.bars,
            "events": self.events,
            "singular": self.state.singular,
            "accelerated_batches": self.accelerated_batches,
            "symbols_without_trades": silent,
        }
        if silent:
            stats["notes"] = [self._note(silent)]
        elif self.state.singular:
            stats["notes"] = [f"{self.state.singular} bars with a singular covariance: NaN weights"]
        return stats

    def snapshot_params(self) -> dict[str, object]:
        return {"symbols": self.symbols, **self.params}

    def snapshot_state(self) -> dict[str, object]:
        """The open bar, each symbol's close, the returns window; which symbols have traded."""
        return {"state": self.state, "traded": set(self.traded)}

    def restore_state(self, state: dict[str, object]) -> None:
        self.state = state["state"]
        self.traded = set(state["traded"])

    def end_segment(self) -> None:
        """The open bar closes in the next segment, not at this one's end."""
        self.state = new_portfolio_state(len(self.symbols), **self.params)
        self.traded = set(self.symbols)
