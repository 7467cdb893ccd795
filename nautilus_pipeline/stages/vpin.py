"""VPIN stage: flow toxicity per symbol, as of every row, and an event per completed bucket.

Orchestration around :func:`nautilus_pipeline.kernels.vpin.vpin_update_rows`. Each
completed bucket is published as a :class:`~nautilus_pipeline.events.VpinBucket` on
``vpin.<symbol>``. Every row of the batch also gets the symbol's latest VPIN, its CDF and
the toxicity flag *as of that row*: a bucket counts from the row at which it became known
(the trade that closed its last bar), never earlier, so the risk stage's rule sees the same
flags whatever the batch size. At the end of the stream the open bar is closed and the
buckets it completes are published.

The live path. A small batch whose trades all join one symbol's open bar (most live ticks
with time bars: nothing closes, no bucket can complete) is one numba call,
:func:`~nautilus_pipeline.kernels.vpin.vpin_rows_small`, that adds them to the bar in place
and writes the carried values; the batch path (``vpin_update`` per symbol, state copies,
output dicts) cost ~60-80 µs for such a tick in Python. Same additions in the same order,
so the same bits.

``bucket_volume`` V is per symbol (a number for all, or a mapping symbol → V); see
:func:`~nautilus_pipeline.kernels.vpin.propose_bucket_volume` to calibrate it.

GPU. On a torch stream (``torch:cuda``; ``torch:cpu`` for checking) with ``bar_ns = 0``, a
symbol's trades in a batch
of at least ``gpu_min_batch`` go through the torch variant of the kernel
(``kernels.vpin.vpin_update_torch``), smaller ones through the CPU kernel; both share one
state. The default threshold is the crossover measured on the lent H200
(``scripts/bench_kernels.py --gpu``, 4M trades): the GPU ran at 0.44× the CPU kernel's
speed with 16,384-trade batches and 1.5× with 65,536. The torch variant agrees with the
CPU kernel to ~1e-10 of V, not to the bit, so exact batch-size independence holds on the
CPU path only. ``route = "calibrated"`` re-measures the crossover on the stage's own device
when it binds (16,384 … 262,144 trades of a random walk, the smallest size at which the
torch kernel wins becomes ``gpu_min_batch``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import structlog

from .. import topics
from ..calibration_cache import cached
from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import KIND_TRADE, ColumnSpec, VpinBucket
from ..kernels.addresses import ArrayTable, column_addresses, entry_point
from ..kernels.rows import ffill_rows, fill_events_into, symbol_groups
from ..kernels.vpin import (
    LIVE_COLUMNS,
    VpinParams,
    VpinState,
    new_vpin_state,
    vpin_flush,
    vpin_rows_small,
    vpin_update,
    vpin_update_torch,
)
from ..memory import Lease
from ..params import param
from ..stage import (
    INLINE_CHAIN_MAX_ROWS,
    LIGHT_OFFLOAD_MIN_ROWS,
    NOT_NOW,
    Stage,
    StageContext,
    slab_addresses,
)

F64 = np.dtype(np.float64)
log = structlog.get_logger("nautilus_pipeline.vpin")


@dataclass(frozen=True, slots=True)
class VpinStageParams:
    """The VPIN stage's parameters; the per-symbol kernel parameters (:class:`VpinParams`) are
    made of these and each symbol's bucket volume."""

    bucket_volume: float | str | dict = param(doc="V in base units: a number, a table symbol = V, "
                                              "or 'auto' (total volume / buckets_per_source)")
    buckets_per_source: int = param(50, "with bucket_volume = 'auto': buckets per source file")
    window: int = param(50, "n: buckets in the VPIN window")
    bar_ns: int = param(60_000_000_000, "time bar length in ns (0 = one bar per trade)")
    sigma_window: int = param(100, "bars in the dP standard deviation")
    threshold: float = param(0.9, "CDF level above which flow is toxic")
    gpu_min_batch: int = param(65_536, "on a torch stream, trades per symbol and batch from which "
                               "the GPU kernel runs (bar_ns = 0)")
    route: Literal["first", "calibrated"] = param("first", "'calibrated': measure gpu_min_batch at start")

    def __post_init__(self) -> None:
        VpinParams(1.0, self.window, self.bar_ns, self.sigma_window, self.threshold)  # its checks
        v = self.bucket_volume
        if isinstance(v, str) and v != "auto":
            raise ConfigError(f"bucket_volume must be a number, a table or 'auto', got {v!r}")
        if isinstance(v, str) and self.buckets_per_source < 1:
            raise ConfigError(f"buckets_per_source must be >= 1, got {self.buckets_per_source}")
        if isinstance(v, dict):
            if not v:
                raise ConfigError("bucket_volume is an empty table; give symbol = V for each symbol")
            for sym, x in v.items():
                _volume(x, f"bucket_volume.{sym}")
        elif not isinstance(v, str):
            VpinParams(float(v), self.window, self.bar_ns, self.sigma_window, self.threshold)


def _volume(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive volume in base units, got {value!r}")
    return float(value)


class VpinStage(Stage):
    """Writes ``vpin``, ``vpin_cdf`` (float64) and ``toxic`` (uint8) per row; publishes buckets."""

    offload = LIGHT_OFFLOAD_MIN_ROWS  # a replay batch costs about a hop: inline (stage.py)

    reads = ("ts_ns", "symbol_id", "kind", "price", "size")
    writes = (
        ColumnSpec("vpin", F64, fill=np.nan),
        ColumnSpec("vpin_cdf", F64, fill=np.nan),
        ColumnSpec("toxic", np.dtype(np.uint8)),
    )

    Params = VpinStageParams

    @classmethod
    def from_params(cls, p: VpinStageParams, ctx: Any, *, name: str, streams: Sequence[str]) -> VpinStage:
        v = p.bucket_volume
        if v == "auto":
            v = ctx.propose_bucket_volumes(p.buckets_per_source)
        elif isinstance(v, dict):
            v = {str(sym): float(x) for sym, x in v.items()}
            names, _ = ctx.known_symbols()
            missing = sorted(names - set(v))
            if missing:
                raise ConfigError(f"bucket_volume has no entry for {missing} (given for {sorted(v)}); "
                                  "add them, or give one number for every symbol")
        return cls(v, window=p.window, bar_ns=p.bar_ns, sigma_window=p.sigma_window,
                   threshold=p.threshold, name=name, streams=streams,
                   gpu_min_batch=p.gpu_min_batch, route=p.route)

    def __init__(
        self,
        bucket_volume: float | Mapping[str, float],
        *,
        window: int = 50,
        bar_ns: int = 60_000_000_000,
        sigma_window: int = 100,
        threshold: float = 0.9,
        name: str = "vpin",
        streams: Sequence[str] = ("cpu",),
        topic_prefix: str = topics.VPIN,
        gpu_min_batch: int = 65_536,
        route: str = "first",
    ):
        if route not in ("first", "calibrated"):
            raise ConfigError(f"vpin: route must be 'first' or 'calibrated', got {route!r}")
        self.route = route
        self.name = name
        self.streams = tuple(streams)
        self.bucket_volume = bucket_volume
        self.params = {
            "window": window,
            "bar_ns": bar_ns,
            "sigma_window": sigma_window,
            "threshold": threshold,
        }
        new_vpin_state(1.0, **self.params)  # validates the parameters now, not at the first tick
        if not isinstance(bucket_volume, Mapping):
            new_vpin_state(float(bucket_volume), **self.params)
        self.topic_prefix = topic_prefix
        self.gpu_min_batch = gpu_min_batch
        self._torch_device: str | None = None
        self.gpu_batches = 0
        self.states: dict[int, VpinState] = {}
        self.last: dict[int, np.ndarray] = {}  # symbol → [vpin, cdf, toxic] as of its last row
        self.buckets = 0

    @property
    def threshold(self) -> float:
        """The CDF level above which a bucket's flow is flagged toxic."""
        return self.params["threshold"]

    def _volume_for(self, symbol: str) -> float:
        v = self.bucket_volume
        if isinstance(v, Mapping):
            if symbol not in v:
                raise ConfigError(
                    f"VPIN stage {self.name!r}: no bucket_volume for symbol {symbol!r} "
                    f"(given for {sorted(v)})"
                )
            return float(v[symbol])
        return float(v)

    async def start(self, ctx: StageContext) -> None:
        self.states, self.last, self.buckets = {}, {}, 0
        self.small_batches = 0
        self._slab_tables: dict = {}  # slab → its address table
        self._bar_ns = int(self.params["bar_ns"])
        # symbol → (its state, its carried values, their ArrayTable): the live kernel's
        # state argument, rebuilt when the batch path replaced either
        self._live: dict[int, tuple] = {}
        self._live_call = None  # vpin_rows_small's entry point (kernels.addresses.entry_point)

    async def bind(self, stream: ComputeStream) -> None:
        if stream.backend == "torch" and self.params["bar_ns"] == 0:
            self._torch_device = str(stream.device)
        await asyncio.to_thread(self._warm_up)
        if self._torch_device is not None and self.route == "calibrated":
            device = self._torch_device  # measured once per machine and code (calibration_cache)
            self.gpu_min_batch = await stream.run(
                cached, "vpin_gpu_min_batch", {"params": self.params}, device,
                lambda: self._calibrate(device))

    def _calibrate(self, device: str) -> int:
        """Smallest batch at which the torch kernel on ``device`` beats the CPU kernel."""
        rng = np.random.default_rng(0)
        n = 262_144
        ts = np.arange(n, dtype=np.int64)
        price = 100.0 * np.exp(np.cumsum(rng.standard_normal(n) * 1e-4))
        size = rng.exponential(1.0, n)
        params = {**self.params, "window": min(self.params["window"], 50)}
        speedup = {}
        for batch in (16_384, 65_536, 262_144):
            st = new_vpin_state(float(size[:batch].sum()) / 200, **params)
            args = (ts[:batch], price[:batch], size[:batch])
            times = []
            for fn in (lambda a=args, s=st: vpin_update(s, *a),
                       lambda a=args, s=st: vpin_update_torch(s, *a, device=device)):
                fn()
                t0 = time.perf_counter()
                for _ in range(3):
                    fn()
                times.append(time.perf_counter() - t0)
            speedup[batch] = times[0] / times[1]
        chosen = next((b for b, r in speedup.items() if r > 1.0), 1 << 62)
        log.info("vpin_calibrated", stage=self.name, device=device, gpu_min_batch=chosen,
                 speedup={b: round(r, 2) for b, r in speedup.items()})
        return chosen

    def _warm_up(self) -> None:
        _warm_vpin_kernels(self.params["bar_ns"])

    @classmethod
    def warm_ahead(cls, params: VpinStageParams, streams: Sequence[str], cuda: bool) -> None:
        """The numba kernels loaded while the run reads its input (``compute.warmup``)."""
        _warm_vpin_kernels(params.bar_ns)

    def warm_up(self, columns: dict[str, np.ndarray], stream: ComputeStream) -> None:
        """The live kernel (``vpin_rows_small``) on a scratch state (the batch path's kernels
        were warmed at bind)."""
        st = new_vpin_state(1.0, **self.params)
        state = _live_state(st, np.array([np.nan, np.nan, 0.0]))  # (holds the arrays it points to)
        vpin_rows_small(1, 0, column_addresses(columns, LIVE_COLUMNS), int(st.params.bar_ns), state.table)

    def _update(self, state: VpinState, ts, price, size):
        if self._torch_device is not None and ts.shape[0] >= self.gpu_min_batch:
            self.gpu_batches += 1
            return vpin_update_torch(state, ts, price, size, device=self._torch_device)
        return vpin_update(state, ts, price, size)

    def _compute(self, lease: Lease, ctx: StageContext):
        sym, kind = lease["symbol_id"], lease["kind"]
        ts, price, size = lease["ts_ns"], lease["price"], lease["size"]
        groups = symbol_groups(sym)
        if self._one_symbol_batch(groups, kind):
            return self._one_symbol(lease, ctx, groups[0][0], ts, price, size)
        new_states = dict(self.states)
        outputs: dict[int, dict[str, np.ndarray]] = {}
        for key, rows in groups:
            trade_rows = rows[kind[rows] == KIND_TRADE]
            if not trade_rows.size:
                continue
            state = new_states.get(key)
            if state is None:
                state = new_vpin_state(self._volume_for(ctx.symbol_name(key)), **self.params)
            new_states[key], out = self._update(
                state, ts[trade_rows], price[trade_rows], size[trade_rows]
            )
            if out["bucket"].size:
                out["row"] = trade_rows[out["row"]]
                outputs[key] = out
        cols = np.empty((sym.shape[0], 3))
        last = dict(self.last)
        for key, rows in groups:
            carry = last.get(key)
            if carry is None:
                carry = np.array([np.nan, np.nan, 0.0])
            out = outputs.get(key)
            if out is None:  # no bucket completed (most live ticks): every row carries
                cols[rows] = carry
                last[key] = carry
                continue
            values = np.empty((rows.shape[0], 3))
            has = np.zeros(rows.shape[0], dtype=bool)
            pos = np.searchsorted(rows, out["row"])
            final = np.append(pos[1:] != pos[:-1], True)  # the last bucket known at a row
            values[pos[final], 0] = out["vpin"][final]
            values[pos[final], 1] = out["cdf"][final]
            values[pos[final], 2] = out["toxic"][final]
            has[pos[final]] = True
            filled = ffill_rows(values, has, carry)
            cols[rows] = filled
            last[key] = filled[-1].copy()
        return new_states, outputs, cols, last

    @staticmethod
    def _one_symbol_batch(groups, kind) -> bool:
        return len(groups) == 1 and bool((kind == KIND_TRADE).all())

    def _one_symbol(self, lease: Lease, ctx: StageContext, key: int, ts, price, size):
        """A batch of one symbol's trades (most replay batches): the kernel on the slab's own
        columns (no gathers), the buckets carried forward straight into the slab's output
        columns (``kernels.rows.fill_events_into``); the same values as the general path.
        Returns what ``_compute`` does, with ``cols`` None (already written)."""
        state = self.states.get(key)
        if state is None:
            state = new_vpin_state(self._volume_for(ctx.symbol_name(key)), **self.params)
        state, out = self._update(state, ts, price, size)
        carry = self.last.get(key)
        carry = np.array([np.nan, np.nan, 0.0]) if carry is None else carry.copy()
        slab, n = lease.columns, lease.length
        fill_events_into(n, out["row"], out["vpin"], out["cdf"], out["toxic"].astype(np.float64),
                         carry, slab["vpin"], slab["vpin_cdf"], slab["toxic"])
        return ({**self.states, key: state}, {key: out} if out["bucket"].size else {}, None,
                {**self.last, key: carry})

    def process_now(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> object:
        """The live path (``kernels.vpin.vpin_rows_small``): one kernel call when the batch's
        trades all join the open bar of one symbol, updating its state in place."""
        n = lease.length
        if not 0 < n <= INLINE_CHAIN_MAX_ROWS:
            return NOT_NOW
        key = lease.slab.columns["symbol_id"].item(0)
        state = self.states.get(key)
        carry = self.last.get(key)
        if state is None or carry is None:
            return NOT_NOW
        slab = self._slab_tables.get(lease.slab)
        if slab is None:
            slab = slab_addresses(self._slab_tables, lease, LIVE_COLUMNS)
        live = self._live.get(key)
        if live is None or live[0] is not state or live[1] is not carry:
            live = self._live[key] = (state, carry, _live_state(state, carry))
        call = self._live_call
        if call is None:
            call = self._live_call = entry_point(vpin_rows_small, n, key, slab, self._bar_ns,
                                                 live[2].table)
        if not call(n, key, slab, self._bar_ns, live[2].table):
            return NOT_NOW
        self.small_batches += 1
        return None

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        if self.process_now(lease, stream, ctx) is None:
            return
        new_states, outputs, cols, last = await stream.run(self._compute, lease, ctx)
        if cols is not None:  # None: written in place (one symbol's trades)
            slab, n = lease.columns, lease.length
            slab["vpin"][:n] = cols[:, 0]
            slab["vpin_cdf"][:n] = cols[:, 1]
            slab["toxic"][:n] = cols[:, 2]
        self.states, self.last = new_states, last
        for key, out in outputs.items():
            await self._publish(ctx, key, out)

    async def finish(self, ctx: StageContext) -> None:
        for key in sorted(self.states):
            self.states[key], out = vpin_flush(self.states[key])
            if out["bucket"].size:
                await self._publish(ctx, key, out)

    async def _publish(self, ctx: StageContext, key: int, out: dict[str, np.ndarray]) -> None:
        symbol = ctx.symbol_name(key)
        topic = topics.event(self.topic_prefix, symbol)
        for i in range(out["bucket"].shape[0]):
            self.buckets += 1
            await ctx.publish(
                topic,
                VpinBucket(
                    symbol=symbol,
                    bucket=int(out["bucket"][i]),
                    ts_ns=int(out["ts_ns"][i]),
                    buy_volume=float(out["buy_volume"][i]),
                    sell_volume=float(out["sell_volume"][i]),
                    vpin=float(out["vpin"][i]),
                    cdf=float(out["cdf"][i]),
                    toxic=bool(out["toxic"][i]),
                ),
            )

    def stats(self) -> dict[str, object]:
        return {"buckets": self.buckets, "symbols": len(self.states), "gpu_batches": self.gpu_batches,
                "small_batches": self.small_batches}

    def snapshot_params(self) -> dict[str, object]:
        return {"bucket_volume": self.bucket_volume, **self.params}

    def snapshot_state(self) -> dict[str, object]:
        """Each symbol's VPIN state (the open bar and bucket, the window, the CDF history) and
        the values its next rows carry forward (copies: the live path adds to the open bar
        in place)."""
        states = {k: replace(st, bar_i=st.bar_i.copy(), bar_f=st.bar_f.copy())
                  for k, st in self.states.items()}
        return {"states": states, "last": {k: v.copy() for k, v in self.last.items()}}

    def restore_state(self, state: dict[str, object]) -> None:
        self.states = {k: replace(st, bar_i=st.bar_i.copy(), bar_f=st.bar_f.copy())
                       for k, st in state["states"].items()}
        self.last = dict(state["last"])

    def end_segment(self) -> None:
        """The open bar carries on in the next segment: nothing to close at this one's end."""
        self.states = {}


def _live_state(state: VpinState, carry: np.ndarray) -> ArrayTable:
    """A symbol's open bar and carried values as one table, for ``vpin_rows_small``."""
    return ArrayTable(((state.bar_i, np.int64), (state.bar_f, np.float64), (carry, np.float64)))


def _warm_vpin_kernels(bar_ns: int) -> None:
    """Load (or JIT-compile: seconds on a cold cache) every numba kernel before the first
    batch, off the event loop: 64 one-unit trades, one bar each, half-unit buckets and a
    window of 2 reach the bar scan, the bucket sums and the VPIN CDF."""
    n, step = 64, max(bar_ns, 1)
    warm = new_vpin_state(0.5, window=2, bar_ns=bar_ns, sigma_window=2)
    prices = 100.0 + np.sin(np.arange(n))
    warm, out = vpin_update(warm, np.arange(n, dtype=np.int64) * step, prices, np.ones(n))
    vpin_flush(warm)
    # the one-symbol batch's fill into the slab's columns (their dtypes: float64, float64, uint8)
    fill_events_into(n, out["row"], out["vpin"], out["cdf"], out["toxic"].astype(np.float64),
                     np.array([np.nan, np.nan, 0.0]), np.empty(n), np.empty(n),
                     np.empty(n, dtype=np.uint8))

