"""Risk stage: the simulated account behind the pipeline's own signals, limits, kill switch, VaR.

Why the risk stage applies the signal rule. The account fills the target that the signal
rule sets on one trade at the next trade's price, and the kill switch that a fill can
trip forces the very next signals to flat: signal and risk are one recursion over the
rows. Computing it as (1) the rule's *intended* targets, a pure function of the model's
probability and the toxicity flag, then (2) the sequential account and limit scan
(``kernels.risk.risk_update``, which ignores intentions while the kill switch is on), then
(3) the rule again with the kill switch as of each row, gives the exact per-row result
whatever the batch size. The stage owns the rule (its ``signal`` table, ``SignalParams``)
and writes the final ``signal_side``, ``signal_strength``, ``signal_target``,
``signal_reasons`` and ``signal_emit`` columns; the signal stage after it only publishes.

Rows: the account moves on trade rows; quote rows carry the symbol's latest values.
Events on ``risk.<symbol>``: a ``breach`` :class:`~nautilus_pipeline.events.RiskEvent`
when the set of breached limits changes to a non-empty one (the kill switch trips), and a
``var`` report every ``var_every`` trades of a
symbol (parametric from the features' EWMA volatility, historical from the last
``var_window`` log returns, Monte Carlo with ``var_paths`` paths over ``var_horizon``
trades on the stage's compute stream: numpy, torch or MLX).

The fused path. A batch of one symbol's trades (every live tick, most replay batches) runs
as one numba call per stretch between VaR reports (``kernels.risk_rows``), over the slab's
columns and the symbol's state arrays (``SymbolBook``), calling the batch path's own scans:
the same numbers, without the ~150 µs of Python the batch path spent on a live tick.
Mixed batches (several symbols, quotes) and bad prices take the batch path.
On a GPU stream too: the per-row state machine stays on the host (numba), and only the
batch's VaR reports go to the device, all of them in one ``kernels.var_batch`` call (one
copy of the windows in, one fused Monte Carlo launch, one copy of the quantiles out), on
the stream's worker, never on the loop's thread. There is one fused risk loop for every
stream; the batch path is left to the batches it covers alone.

``route = "calibrated"``: when the stage binds to a GPU stream, one Monte Carlo VaR of the
stage's ``var_paths`` × ``var_horizon`` is timed on the host (numpy) and on the stream's
device, and the reports run on the faster. Measured on the lent H200 at 1M × 10 paths
(``scripts/bench_gpu.py``): numpy 176 ms, torch CUDA 0.51 ms, MLX GPU 1.41 ms; at a few
hundred paths the host wins (launches and one synchronisation per report).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import structlog

from .. import topics
from ..calibration_cache import cached
from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import KIND_TRADE, ColumnSpec, RiskEvent
from ..kernels.addresses import ArrayTable, column_addresses, entry_point
from ..kernels.risk import (
    RiskParams,
    breach_names,
    mc_var,
    new_generator,
    new_risk_state,
    return_window,
    risk_update,
)
from ..kernels.risk_rows import I_TRADES, SymbolBook, live_columns, risk_rows_small
from ..kernels.rows import ffill_rows, symbol_groups
from ..kernels.signal import SignalParams, signal_update
from ..kernels.var_batch import VarRequest, var_reports
from ..memory import Lease
from ..params import param
from ..stage import (
    INLINE_CHAIN_MAX_ROWS,
    NOT_NOW,
    Stage,
    StageContext,
    slab_addresses,
    upstream_column,
)
from .features import FEATURES_COLUMN

log = structlog.get_logger("nautilus_pipeline.risk")

F64 = np.dtype(np.float64)
RISK_COLUMNS = ("position", "equity", "pnl", "drawdown")
SIGNAL_COLUMNS = (  # the final signal per row; quote rows: side 0, target NaN, no emit
    ColumnSpec("signal_side", np.dtype(np.int8)),
    ColumnSpec("signal_strength", F64),
    ColumnSpec("signal_target", F64, fill=np.nan),
    ColumnSpec("signal_reasons", np.dtype(np.int64)),
    ColumnSpec("signal_emit", np.dtype(np.uint8)),
)
SMALL_MAX_ROWS = INLINE_CHAIN_MAX_ROWS
"""Batches of one symbol's trades take the fused kernel (``kernels.risk_rows``): inline up to
this many rows (the live path, no stream call), on the stage's stream above."""
ON_STREAM = object()
"""``RiskStage._fused``'s answer for a live batch whose VaR reports are due on a device."""


@dataclass(frozen=True, slots=True)
class RiskStageParams(RiskParams):
    """The risk stage's parameters: the kernel's limits and fees (:class:`RiskParams`) plus
    Monte Carlo VaR, and the signal rule (the ``signal`` table)."""

    DOCS: ClassVar[dict[str, str]] = {
        "max_position": "limit on |position| (base units)",
        "max_notional": "limit on |position|·price (quote currency)",
        "max_drawdown": "limit on peak-to-trough equity (quote currency)",
        "max_orders": "limit on orders per order_window_ns (0 = none)",
        "order_window_ns": "window of the order-rate limit",
        "fee_rate": "fee as a fraction of notional (1 bp = 1e-4)",
        "fee_per_order": "fixed fee per fill (quote currency)",
        "initial_cash": "starting cash (quote currency)",
    }
    var_every: int = param(1000, "trades of a symbol between VaR reports (0 = off)")
    var_levels: tuple[float, ...] = param((0.95, 0.99), "VaR confidence levels")
    var_horizon: int = param(100, "VaR horizon in trades")
    var_window: int = param(1000, "returns in the historical VaR window")
    var_paths: int = param(10_000, "Monte Carlo paths per VaR report")
    vol_feature: str = param("vol_ewma_100", "feature used as the per-trade volatility")
    seed: int = param(0, "Monte Carlo seed")
    route: Literal["first", "calibrated"] = param("first", "'calibrated': Monte Carlo VaR on the "
                                                  "faster of the host and the stage's device, timed at start")
    signal: SignalParams = param(SignalParams(), "the signal rule, a table: "
                                 "signal = { long_threshold = 0.55, max_position = 0.01 }")

    def __post_init__(self) -> None:
        RiskParams.__post_init__(self)
        levels = self.var_levels
        if not levels or any(isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x < 1
                             for x in levels):
            raise ConfigError(f"var_levels must be confidence levels between 0 and 1 (e.g. [0.95, 0.99]), "
                              f"got {list(levels)!r}")

    def limits(self) -> RiskParams:
        return RiskParams(self.max_position, self.max_notional, self.max_drawdown, self.max_orders,
                          self.order_window_ns, self.fee_rate, self.fee_per_order, self.initial_cash)


class RiskStage(Stage):
    """Writes ``position``, ``equity``, ``pnl``, ``drawdown`` (float64), ``kill`` (uint8),
    ``breach`` (int64 bit mask) and the ``signal_*`` columns per row; publishes breaches
    and VaR reports."""

    reads = ("ts_ns", "symbol_id", "kind", "price", "prediction", "toxic", FEATURES_COLUMN)
    writes = (
        *(ColumnSpec(c, F64, fill=np.nan) for c in RISK_COLUMNS),
        ColumnSpec("kill", np.dtype(np.uint8)),
        ColumnSpec("breach", np.dtype(np.int64)),
        *SIGNAL_COLUMNS,
    )

    Params = RiskStageParams

    @classmethod
    def from_params(cls, p: RiskStageParams, ctx: Any, *, name: str, streams: Sequence[str]) -> RiskStage:
        return cls(p.limits(), p.signal, var_every=p.var_every,
                   var_levels=tuple(float(x) for x in p.var_levels), var_horizon=p.var_horizon,
                   var_window=p.var_window, var_paths=p.var_paths, vol_feature=p.vol_feature,
                   seed=p.seed, name=name, streams=streams, route=p.route)

    def __init__(
        self,
        limits: RiskParams | None = None,
        rule: SignalParams | None = None,
        *,
        var_every: int = 1000,
        var_levels: Sequence[float] = (0.95, 0.99),
        var_horizon: int = 100,
        var_window: int = 1000,
        var_paths: int = 10_000,
        vol_feature: str = "vol_ewma_100",
        seed: int = 0,
        name: str = "risk",
        streams: Sequence[str] = ("cpu",),
        topic_prefix: str = topics.RISK,
        route: str = "first",
    ):
        if route not in ("first", "calibrated"):
            raise ConfigError(f"risk: route must be 'first' or 'calibrated', got {route!r}")
        self.route = route
        if var_every < 0 or var_horizon < 1 or var_window < 2 or var_paths < 100:
            raise ConfigError(
                "risk: need var_every >= 0 (0 = off), var_horizon >= 1, var_window >= 2, "
                f"var_paths >= 100; got {var_every}, {var_horizon}, {var_window}, {var_paths}"
            )
        self.name = name
        self.streams = tuple(streams)
        self.limits = limits or RiskParams()
        self.rule = rule or SignalParams()
        self.var_every = var_every
        self.var_levels = tuple(var_levels)
        self.var_horizon = var_horizon
        self.var_window = var_window
        self.var_paths = var_paths
        self.vol_feature = vol_feature
        self.seed = seed
        self.topic_prefix = topic_prefix
        self._vol_col = self._ret_col = None
        self._n_features = 0

    def connect(self, upstream: Sequence[Stage]) -> None:
        feats = upstream_column(upstream, FEATURES_COLUMN)
        names = feats.labels if feats is not None else ()
        missing = [n for n in ("log_return", self.vol_feature) if n not in names]
        if missing:
            raise ConfigError(
                f"risk stage {self.name!r} needs the features {missing} for VaR; the features "
                f"stage before it gives {list(names) or 'nothing'}"
            )
        self._ret_col = names.index("log_return")
        self._vol_col = names.index(self.vol_feature)
        self._n_features = len(names)
        self._live_layout = live_columns(len(names))

    async def start(self, ctx: StageContext) -> None:
        self.books: dict[int, SymbolBook] = {}
        self.fused_batches = 0
        self.breaches = 0
        self.var_reports = 0
        self.generators: dict[int, object] = {}
        self._backend = "numpy"
        self._device: str | None = None
        lim, rule = self.limits, self.rule
        self._consts_f = np.array([lim.max_position, lim.max_notional, lim.max_drawdown, lim.fee_rate,
                                   lim.fee_per_order, lim.initial_cash, rule.long_threshold,
                                   rule.short_threshold, rule.max_position])
        self._consts_i = np.array([lim.max_orders, lim.order_window_ns, rule.sizing == "proportional",
                                   rule.step_aside_on_toxic, self.var_every, self._ret_col or 0,
                                   self.var_window, self._n_features], dtype=np.int64)
        self._consts_table = ArrayTable(((self._consts_f, np.float64), (self._consts_i, np.int64)))
        self._consts = self._consts_table.table
        self._slab_tables: dict = {}  # slab → its address table
        self._live_call = None  # risk_rows_small's entry point (kernels.addresses.entry_point)

    async def bind(self, stream: ComputeStream) -> None:
        # Load (or JIT-compile) the numba account scan before the first batch, off the loop.
        await asyncio.to_thread(
            risk_update, new_risk_state(self.limits), np.arange(2, dtype=np.int64), np.ones(2), np.zeros(2)
        )
        backend, device = ((stream.backend, stream.kernel_device)
                           if stream.backend in ("torch", "mlx") else ("numpy", None))
        if (backend, device) != (self._backend, self._device) and self.generators:
            # Bound again, on the fallback stream after a device error: the generators of
            # the old backend cannot run here. Each symbol's new one starts from the seed,
            # as on a run that used this stream from the start.
            self.generators = {}
        self._backend, self._device = backend, device
        if self.route == "calibrated" and self._backend != "numpy":
            # measured once per machine and code, then read back (calibration_cache)
            inputs = {"paths": self.var_paths, "horizon": self.var_horizon,
                      "levels": self.var_levels, "candidate": [self._backend, self._device]}
            backend, device = await stream.run(cached, "risk_var_backend", inputs, self._device,
                                               self._calibrate)
            self._backend, self._device = backend, device
        if self._backend != "numpy":  # compile var_batch's fused kernel (Triton) before the first batch
            await stream.run(self._warm_var_reports)

    def warm_up(self, columns: dict[str, np.ndarray], stream: ComputeStream) -> None:
        """The fused kernel (``risk_rows_small``) on a scratch book, the batch path (mixed
        live batches take it: its kernels are called from Python with other argument
        types) on a scratch row, and on the host the Monte Carlo sampler of a report
        (bootstrap and normal paths): a live tick's first VaR report loaded it from numba's
        cache inside the hot path (~0.1-1 s)."""
        book = SymbolBook.new(self.limits, self.var_window)
        risk_rows_small(0, 1, 0, column_addresses(columns, self._live_layout), self._consts,
                        book.table)
        generators, self.generators = self.generators, {}  # a report (var_every = 1) draws
        try:
            self._compute(_ScratchRows(columns, 1))  # returns new books: discarded
        finally:
            self.generators = generators
        if self._backend == "numpy" and self.var_every:
            gen = new_generator("numpy", self.seed)
            var_reports([VarRequest(1.0, 1e-3, np.array([0.0, 1e-3]), gen),
                         VarRequest(1.0, 1e-3, np.empty(0), gen)], self.var_horizon,
                        self.var_levels, n_paths=100)

    def _warm_var_reports(self) -> None:
        _warm_var_reports(self._backend, self._device, self.seed, self.var_horizon,
                          self.var_levels, self.var_paths)

    @classmethod
    def warm_ahead(cls, params: RiskStageParams, streams: Sequence[str], cuda: bool) -> None:
        """While the run reads its input (``compute.warmup``): the numba kernels loaded, and
        on CUDA the fused VaR kernel (Triton) compiled for these reports; the stage's own
        warm-up at bind then finds them in the process."""
        risk_update(new_risk_state(params.limits()), np.arange(2, dtype=np.int64), np.ones(2),
                    np.zeros(2))
        if cuda and params.var_every and any(s.startswith("torch:cuda") for s in streams[:1]):
            _warm_var_reports("torch", "cuda", params.seed, params.var_horizon,
                              tuple(float(x) for x in params.var_levels), params.var_paths)

    def _calibrate(self) -> tuple[str, str | None]:
        """The faster of numpy and the stream's device for one VaR report of this stage."""
        timed = {}
        for backend, device in (("numpy", None), (self._backend, self._device)):
            def once(b: str = backend, d: str | None = device) -> None:
                mc_var(0.001, 1e6, self.var_horizon, self.var_paths, self.var_levels,
                       seed=self.seed, backend=b, device=d)

            once()  # warm-up: generators, kernels, handles
            t0 = time.perf_counter()  # one timed call each: the start counts in a run's wall time
            once()
            timed[(backend, device)] = time.perf_counter() - t0
        best = min(timed, key=timed.__getitem__)
        log.info("risk_calibrated", stage=self.name, chosen=f"{best[0]}:{best[1] or 'cpu'}",
                 ms={f"{b}:{d or 'cpu'}": round(t * 1e3, 3) for (b, d), t in timed.items()})
        return best

    def _compute(self, lease: Lease):
        sym, kind = lease["symbol_id"], lease["kind"]
        ts, price = lease["ts_ns"], lease["price"]
        prob, toxic = lease["prediction"], lease["toxic"]
        feats = lease[FEATURES_COLUMN]
        n = sym.shape[0]
        cols = np.empty((n, 6))
        sig_side = np.zeros(n, dtype=np.int8)
        sig_strength = np.zeros(n)
        sig_target = np.full(n, np.nan)
        sig_reasons = np.zeros(n, dtype=np.int64)
        sig_emit = np.zeros(n, dtype=np.uint8)
        books = dict(self.books)  # the touched symbols' books are replaced by new ones
        events: list[tuple[int, int, dict[str, np.ndarray] | None]] = []
        for key, rows in symbol_groups(sym):
            is_trade = kind[rows] == KIND_TRADE
            trade_rows = rows[is_trade]
            old = books.get(key) or SymbolBook.new(self.limits, self.var_window)
            book = books[key] = old.copy()
            values = np.full((rows.shape[0], 6), np.nan)
            carry = old.last
            if trade_rows.size:
                intent, final = old.rule_state(self.rule, False), old.rule_state(self.rule, True)
                p_trades, tox_trades = prob[trade_rows], toxic[trade_rows].astype(bool)
                intent, plan = signal_update(
                    intent, p_trades, tox_trades, np.zeros(trade_rows.size, dtype=bool),
                )
                acct, out = risk_update(old.account(self.limits), ts[trade_rows], price[trade_rows],
                                        plan["target"])
                # the final signals: the rule again, with the kill switch as of each row
                final, sig = signal_update(final, p_trades, tox_trades, out["kill"])
                sig_side[trade_rows] = sig["side"]
                sig_strength[trade_rows] = sig["strength"]
                sig_target[trade_rows] = sig["target"]
                sig_reasons[trade_rows] = sig["reasons"]
                sig_emit[trade_rows] = sig["emit"]
                values[is_trade] = np.column_stack(
                    (out["position"], out["equity"], out["pnl"], out["drawdown"],
                     out["kill"], out["breach"])
                )
                # An event when a symbol's set of breached limits changes to a non-empty one
                # (the kill switch just tripped, or another limit joined), not on every row
                # a limit stays breached.
                breach = out["breach"]
                prev = np.concatenate(([int(carry[5])], breach[:-1]))
                for i in np.flatnonzero((breach != 0) & (breach != prev)):
                    events.append((key, int(trade_rows[i]), None))
                before = old.trades
                after = before + trade_rows.size
                window = old.window()
                # the return window: the last var_window returns up to each row, as views of
                # one array (return_window's result, without a copy per report)
                ext = return_window(window, feats[trade_rows, self._ret_col],
                                    window.shape[0] + trade_rows.size)
                if self.var_every:
                    due = np.arange((before // self.var_every + 1) * self.var_every, after + 1,
                                    self.var_every) - before - 1
                    ends = (due + 1 + window.shape[0]).tolist()
                    for row, end in zip(trade_rows[due].tolist(), ends, strict=True):
                        events.append((key, row, {"window": ext[max(end - self.var_window, 0) : end]}))
                filled = ffill_rows(values, is_trade, carry)
                book.store(acct, intent, final, ext, after, filled[-1])
            else:
                filled = ffill_rows(values, is_trade, carry)
            cols[rows] = filled
        due = [var for _, _, var in events if var is not None]
        requests = [self._var_request(key, float(cols[row, 0]), float(price[row]),
                                      float(feats[row, self._vol_col]), var["window"])
                    for key, row, var in events if var is not None]
        # the batch's reports together: on a device one copy in and one out for all of them
        reports = self._reports(requests, lease)
        for var, report in zip(due, reports, strict=True):
            var["report"] = report
        signal_cols = (sig_side, sig_strength, sig_target, sig_reasons, sig_emit)
        return books, cols, signal_cols, events

    def _reports(self, requests: list[VarRequest], lease: Lease) -> list[dict[str, np.ndarray]]:
        """The batch's VaR reports; a failure rewinds the generators they drew from.

        The stage commits its state only when a batch succeeds, but the generators advance
        inside the kernels: without the rewind a batch rerun on the fallback stream (or a
        batch that failed) would leave them where the failed draws took them.
        """
        if not requests:
            return []
        before = {}
        for q in requests:  # one state per generator (a symbol's reports share one)
            if id(q.generator) not in before:
                before[id(q.generator)] = (q.generator, _generator_state(q.generator))
        try:
            return var_reports(requests, self.var_horizon, self.var_levels, n_paths=self.var_paths,
                               count_copy=lease.pool.count_copy)
        except BaseException:
            for gen, (kind, value) in before.values():
                _set_generator_state(gen, kind, value, self.name)
            raise

    def _fused(self, lease: Lease, inline: bool = False):
        """The fused path (``kernels.risk_rows``): one kernel call per stretch of the batch
        between VaR reports, over the slab's columns and the symbol's book, in place; the
        batch's VaR reports then go to the stage's stream together (``kernels.var_batch``:
        on a GPU one round trip for all of them), whichever backend that is.
        Returns (symbol id, its breach mask before the batch, breach events in it, the VaR
        events with their reports), None where the batch path must run, or ``ON_STREAM``
        for an ``inline`` batch whose reports are due on a device (the caller runs it on
        the stream's worker instead)."""
        cols = lease.slab.columns
        key = cols["symbol_id"].item(0)
        book = self.books.get(key)
        if book is None:  # a symbol's first batch (a new book is what the batch path starts from)
            book = self.books[key] = SymbolBook.new(self.limits, self.var_window)
        n, every = lease.length, self.var_every
        trades = book.i.item(I_TRADES)
        reporting = every and (trades + n) // every > trades // every
        slab = slab_addresses(self._slab_tables, lease, self._live_layout)
        if not reporting:  # one call, in place, nothing to publish but breaches
            events, _, breach_before = risk_rows_small(0, n, key, slab, self._consts, book.table)
            if events < 0:
                return None  # checked before any row changed
            self.fused_batches += 1
            return key, breach_before, events, ()
        if inline and self._backend != "numpy":
            return ON_STREAM  # device reports: not on the event loop's thread
        # a report can fail (on a device: the batch reruns on the fallback stream): work on
        # a copy, committed once the reports are in
        book = book.copy()
        events, start, due = 0, 0, []
        breach_before = 0
        while start < n:
            found, stop, before = risk_rows_small(start, n, key, slab, self._consts, book.table)
            if found < 0:
                return None  # checked before any row changed
            if start == 0:
                breach_before = before
            events += found
            if book.trades % every == 0:
                due.append((stop - 1, book.window().copy()))
            start = stop
        var_events = []
        if due:
            feats, price, position = cols[FEATURES_COLUMN], cols["price"], cols["position"]
            requests = [self._var_request(key, float(position[row]), float(price[row]),
                                          float(feats[row, self._vol_col]), window)
                        for row, window in due]
            reports = self._reports(requests, lease)
            var_events = [(key, row, {"window": window, "report": report})
                          for (row, window), report in zip(due, reports, strict=True)]
        self.books[key] = book
        self.fused_batches += 1
        return key, breach_before, events, var_events

    def _var_request(self, key: int, position: float, price: float, sigma: float,
                     window: np.ndarray) -> VarRequest:
        """What the VaR report of one symbol at one row needs (parametric, historical and
        Monte Carlo, run on the stage's stream: off the loop for a large batch)."""
        exposure = position * price
        if not math.isfinite(sigma):
            sigma = 0.0
        gen = self.generators.get(key)
        if gen is None:
            # one generator per symbol, advancing from report to report: a symbol's
            # numbers do not depend on which other symbols shared its batches
            gen = self.generators[key] = new_generator(
                self._backend, self.seed, self._device, stream=key
            )
        return VarRequest(exposure, sigma, window, gen)

    def process_now(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> object:
        """A live batch through the fused kernel, inline; its events, if any, published by
        the awaitable returned. The common case (a known symbol, no VaR report due) is
        one kernel call here, in place; the rest goes through :meth:`_fused`."""
        n = lease.length
        if not 0 < n <= SMALL_MAX_ROWS:
            return NOT_NOW
        key = lease.slab.columns["symbol_id"].item(0)
        book = self.books.get(key)
        every = self.var_every
        if book is not None and not (every and ((t := book.i.item(I_TRADES)) + n) // every > t // every):
            slab = self._slab_tables.get(lease.slab)
            if slab is None:
                slab = slab_addresses(self._slab_tables, lease, self._live_layout)
            call = self._live_call
            if call is None:
                call = self._live_call = entry_point(risk_rows_small, 0, n, key, slab, self._consts,
                                                     book.table)
            events, _, before = call(0, n, key, slab, self._consts, book.table)
            if events < 0:
                return NOT_NOW  # checked before any row changed: the batch path's
            self.fused_batches += 1
            return self._publish_fused(lease, stream, ctx, (key, before, events, ())) if events else None
        done = self._fused(lease, inline=True)
        if done is None or done is ON_STREAM:
            return NOT_NOW
        return self._publish_fused(lease, stream, ctx, done) if done[2] or done[3] else None

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        n = lease.length
        if n:
            # a live batch inline (no stream call), a replay batch on the stream's worker
            done = self._fused(lease, inline=True) if n <= SMALL_MAX_ROWS else ON_STREAM
            if done is ON_STREAM:
                done = await stream.run(self._fused, lease)
            if done is not None:
                await self._publish_fused(lease, stream, ctx, done)
                return
        books, cols, signal_cols, events = await stream.run(self._compute, lease)
        slab = lease.columns  # one liveness check for the 11 writes
        for j, c in enumerate(RISK_COLUMNS):
            slab[c][:n] = cols[:, j]
        slab["kill"][:n] = cols[:, 4]
        slab["breach"][:n] = cols[:, 5]
        for spec, values in zip(SIGNAL_COLUMNS, signal_cols, strict=True):
            slab[spec.name][:n] = values
        self.books = books
        for key, row, var in events:
            await self._publish(lease, stream, ctx, key, row, var)

    async def _publish_fused(self, lease: Lease, stream: ComputeStream, ctx: StageContext,
                             done: tuple) -> None:
        """The events of a batch the fused path did: a symbol's breaches, then its reports
        (the batch path's order)."""
        key, breach_before, breaches, var_events = done
        if breaches:
            breach = lease["breach"]
            prev = np.concatenate(([breach_before], breach[:-1]))
            for row in np.flatnonzero((breach != 0) & (breach != prev)).tolist():
                await self._publish(lease, stream, ctx, key, row, None)
        for key, row, var in var_events:
            await self._publish(lease, stream, ctx, key, row, var)

    async def _publish(self, lease, stream, ctx, key, row, var) -> None:
        symbol = ctx.symbol_name(key)
        pos, eq, dd = float(lease["position"][row]), float(lease["equity"][row]), float(lease["drawdown"][row])
        ts = int(lease["ts_ns"][row])
        if var is None:
            self.breaches += 1
            event = RiskEvent(ts, symbol, "breach", pos, eq, dd,
                              breaches=breach_names(int(lease["breach"][row])))
        else:
            self.var_reports += 1
            report = var["report"]
            levels = [f"{lv:g}" for lv in self.var_levels]
            event = RiskEvent(
                ts, symbol, "var", pos, eq, dd,
                var={method: dict(zip(levels, map(float, values), strict=True))
                     for method, values in report.items()},
            )
        await ctx.publish(topics.event(self.topic_prefix, symbol), event)

    def stats(self) -> dict[str, object]:
        return {
            "breaches": self.breaches,
            "var_reports": self.var_reports,
            "fused_batches": self.fused_batches,
            "kill_switch_on": sorted(k for k, b in self.books.items() if b.i[0]),
        }

    def snapshot_params(self) -> dict[str, object]:
        return {"limits": self.limits, "rule": self.rule, "var_every": self.var_every,
                "var_levels": self.var_levels, "var_horizon": self.var_horizon,
                "var_window": self.var_window, "var_paths": self.var_paths,
                "vol_feature": self.vol_feature, "seed": self.seed}

    def snapshot_state(self) -> dict[str, object]:
        """Each symbol's account and limits, intended and final signal, VaR return window,
        trade count, carried row values and Monte Carlo generator position (copies: the
        small path updates the books in place)."""
        books = self.books
        return {"accounts": {k: b.account(self.limits) for k, b in books.items()},
                "intents": {k: b.rule_state(self.rule, False) for k, b in books.items()},
                "signals": {k: b.rule_state(self.rule, True) for k, b in books.items()},
                "returns": {k: b.window().copy() for k, b in books.items()},
                "trades": {k: b.trades for k, b in books.items()},
                "last": {k: b.last.copy() for k, b in books.items()},
                "generators": {k: _generator_state(g) for k, g in self.generators.items()}}

    def restore_state(self, state: dict[str, object]) -> None:
        self.books = {}
        for key, acct in state["accounts"].items():
            book = SymbolBook.new(self.limits, self.var_window)
            book.store(acct, state["intents"][key], state["signals"][key], state["returns"][key],
                       int(state["trades"][key]), state["last"][key])
            self.books[key] = book
        self.generators = {}
        for key, (kind, value) in state["generators"].items():
            gen = new_generator(self._backend, self.seed, self._device, stream=key)
            _set_generator_state(gen, kind, value, self.name)
            self.generators[key] = gen


class _ScratchRows:
    """Rows ``[0, length)`` of scratch columns, read as the batch path reads a lease."""

    def __init__(self, columns: dict[str, np.ndarray], length: int):
        self.columns, self.length = columns, length
        self.pool = self  # ``lease.pool.count_copy`` of a report: nothing to count

    def count_copy(self, direction: str, nbytes: int) -> None:
        pass

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name][: self.length]


def _warm_var_reports(backend: str, device: str | None, seed: int, horizon: int,
                      levels: Sequence[float], paths: int) -> None:
    """One report of these paths and horizon on a throwaway generator: the kernels compiled."""
    gen = new_generator(backend, seed, device)
    var_reports([VarRequest(1.0, 0.0, np.array([0.0, 1e-3]), gen)], horizon, levels, n_paths=paths)


def _generator_state(gen: Any) -> tuple[str, np.ndarray]:
    """(kind, position) of a Monte Carlo generator: xoshiro (numpy), torch or mlx."""
    from ..kernels.montecarlo import McSampler

    if isinstance(gen, McSampler):
        return "xoshiro", gen.get_state()
    if hasattr(gen, "gen"):  # torch.Generator
        return "torch", gen.gen.get_state().numpy().copy()
    return "mlx", np.array(gen.key)


def _set_generator_state(gen: Any, kind: str, value: np.ndarray, stage: str) -> None:
    from ..kernels.montecarlo import McSampler
    from ..snapshot import SnapshotError

    have = _generator_state(gen)[0]
    if have != kind:
        raise SnapshotError(f"risk stage {stage!r}: the snapshot's Monte Carlo generator is {kind}, "
                            f"this stage's is {have} (another compute stream); restore on the same one")
    if isinstance(gen, McSampler):
        gen.set_state(value)
    elif kind == "torch":
        gen.gen.set_state(gen.torch.from_numpy(np.ascontiguousarray(value)))
    else:
        gen.key = gen.mx.array(value)
