"""Features stage: the default feature vector per tick, written into the slab.

Thin orchestration around :func:`nautilus_pipeline.kernels.features.features_update_rows`:
per-symbol state is carried between batches and committed only after a batch succeeded,
so every row gets the same numbers whatever the batch size. The vector's width and order
are fixed when the pipeline is built (``names``, default: every trade and quote feature),
and the model that consumes it is told those names.

GPU. On a torch stream with a device (``torch:cuda``), a batch of one symbol's trades of at
least ``gpu_min_batch`` rows runs the scan form of the kernel
(:mod:`~nautilus_pipeline.kernels.features_torch`): the four input columns are copied to
the device through the stream (counted, cached on the lease), the features stay there in
the lease's device cache for the next stage on that device (the inference stage reads
them without a copy), and one device→host copy fills the slab column for the CPU stages.
Mixed or smaller batches run the CPU kernel; both share one state. Measured on the lent
H200 (``scripts/bench_gpu.py``, ``docs/measurements/gpu_bench_gpu_h200.txt``), one symbol's
trades, CPU kernel vs scan, M rows/s:

=========  =====  =====  =======
batch       cpu   cuda   gpu/cpu
=========  =====  =====  =======
4,096       5.61   2.65   0.47×
16,384      5.47   9.44   1.73×
65,536      5.36  26.39   4.92×
262,144     3.16  55.78  17.66×
=========  =====  =====  =======

hence the default ``gpu_min_batch = 16_384``; ``route = "calibrated"`` re-measures the
crossover on the stage's own device when it binds. The scan agrees with the CPU kernel to
``FEATURES_ATOL`` (1e-9, ~4e-14 seen), not to the bit, so exact batch-size independence holds
on the CPU path only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import structlog

from ..calibration_cache import cached
from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import KIND_TRADE, ColumnSpec
from ..kernels.addresses import column_addresses
from ..kernels.features import (
    DEFAULT_FEATURE_CONFIG,
    LIVE_COLUMNS,
    FeatureConfig,
    FeatureTable,
    all_feature_names,
    features_update,
    new_feature_state,
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

FEATURES_COLUMN = "features"
GPU_INPUTS = ("ts_ns", "price", "size", "side")

log = structlog.get_logger("nautilus_pipeline.features")


def on_device(stream: ComputeStream) -> str | None:
    """The torch device of ``stream`` when its data must be copied there (``cuda:0``), else None."""
    if stream.backend == "torch" and stream.needs_copy:
        return str(stream.device)
    return None


@dataclass(frozen=True, slots=True)
class FeaturesParams(FeatureConfig):
    """The features stage's parameters: the kernel's :class:`FeatureConfig` plus the columns
    and the GPU routing."""

    DOCS: ClassVar[dict[str, str]] = {
        "half_lives": "EWMA half-lives in trades",
        "intensity_half_life": "half-life of the inter-arrival EWMA",
        "vwap_half_life": "half-life of the EWMA VWAP",
        "rsi_period": "Wilder RSI period in price changes",
    }
    names: tuple[str, ...] | None = param(None, "feature columns in order (default: the model's "
                                          "inputs, or every trade and quote feature)")
    gpu_min_batch: int = param(16_384, "on a torch GPU stream, one symbol's trades per batch from "
                               "which the scan kernel runs on the device")
    route: Literal["first", "calibrated"] = param("first", "'calibrated': measure the CPU/GPU "
                                                  "crossover at start")

    def kernel_config(self) -> FeatureConfig:
        return FeatureConfig(self.half_lives, self.intensity_half_life, self.vwap_half_life,
                             self.rsi_period)


class FeaturesStage(Stage):
    """Writes ``features`` (float64[n, k]) for every row: trades and quotes, as of that row."""

    offload = LIGHT_OFFLOAD_MIN_ROWS  # a replay batch costs about a hop: inline (stage.py)

    reads = ("ts_ns", "symbol_id", "kind", "price", "size", "side", "bid", "ask", "bid_size", "ask_size")

    Params = FeaturesParams

    @classmethod
    def from_params(cls, p: FeaturesParams, ctx: Any, *, name: str, streams: Sequence[str]) -> FeaturesStage:
        names = p.names
        if names is not None and any(not isinstance(n, str) for n in names):
            raise ConfigError(f"names must be a list of feature names (strings), got {list(names)!r}")
        if names is None:
            names = ctx.model_inputs()  # the inference stage's model, when the pipeline has one
        return cls(names, config=p.kernel_config(), name=name, streams=streams,
                   gpu_min_batch=p.gpu_min_batch, route=p.route)

    def __init__(
        self,
        names: Sequence[str] | None = None,
        *,
        config: FeatureConfig = DEFAULT_FEATURE_CONFIG,
        name: str = "features",
        streams: Sequence[str] = ("cpu",),
        gpu_min_batch: int = 16_384,
        route: str = "first",
    ):
        if route not in ("first", "calibrated"):
            raise ConfigError(f"features: route must be 'first' or 'calibrated', got {route!r}")
        self.gpu_min_batch = gpu_min_batch
        self.route = route
        self.gpu_batches = 0
        available = all_feature_names(config)
        self.names: tuple[str, ...] = tuple(names) if names is not None else available
        unknown = [n for n in self.names if n not in available]
        if unknown or not self.names:
            raise ConfigError(
                f"features stage: unknown feature names {unknown or '(none given)'}; "
                f"available with this configuration: {list(available)}"
            )
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"features stage: a feature is listed twice in {list(self.names)}")
        self.name = name
        self.streams = tuple(streams)
        self.config = config
        self.writes = (ColumnSpec(FEATURES_COLUMN, np.dtype(np.float64), (len(self.names),), np.nan,
                                  labels=self.names),)
        index = [available.index(n) for n in self.names]
        self._index = None if index == list(range(len(available))) else np.asarray(index)
        self.table = FeatureTable(config)
        self._out = np.empty((0, len(available)))
        self._small_out = np.empty((INLINE_CHAIN_MAX_ROWS, len(available)))
        self._small_index = np.asarray(index, dtype=np.int64)
        self._live_layout = (*LIVE_COLUMNS, (FEATURES_COLUMN, np.float64, len(self.names)))
        self._slab_tables: dict = {}  # slab → its address table

    async def start(self, ctx: StageContext) -> None:
        self.table = FeatureTable(self.config)
        self._slab_tables = {}  # another pipeline's slabs

    async def bind(self, stream: ComputeStream) -> None:
        device = on_device(stream)
        if device is not None and self.route == "calibrated":
            # measured once per machine and code, then read back (calibration_cache)
            self.gpu_min_batch = await stream.run(
                cached, "features_gpu_min_batch", {"config": self.config}, device,
                lambda: self._calibrate(device))

    @classmethod
    def warm_ahead(cls, params: FeaturesParams, streams: Sequence[str], cuda: bool) -> None:
        """The batch kernel loaded while the run reads its input (``compute.warmup``)."""
        n = 64
        ts = np.arange(n, dtype=np.int64) * 1_000_000
        price = 100.0 + np.sin(np.arange(n))
        one = np.ones(n)
        nan = np.full(n, np.nan)
        config = params.kernel_config()
        table = FeatureTable(config)
        table.update(np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=np.uint8), ts, price, one,
                     np.ones(n, dtype=np.int8), nan, nan, nan, nan,
                     np.empty((n, len(all_feature_names(config)))))

    def warm_up(self, columns: dict[str, np.ndarray], stream: ComputeStream) -> None:
        """The live kernel (``FeatureTable.update_small``) on a scratch table."""
        out = np.empty((INLINE_CHAIN_MAX_ROWS, self._out.shape[1]))
        FeatureTable(self.config).update_small(1, column_addresses(columns, self._live_layout), out,
                                               self._small_index)

    def _calibrate(self, device: str) -> int:
        """Smallest batch (of 4,096 … 262,144) at which the scan on ``device`` beats the CPU
        kernel, timed here on a random walk; above all of them if it never does."""
        from ..kernels.features_torch import features_update_torch

        rng = np.random.default_rng(0)
        n = 262_144 + 64
        ts = np.cumsum(rng.integers(0, 3, n)).astype(np.int64) * 1_000_000
        price = 100.0 * np.exp(np.cumsum(rng.standard_normal(n) * 1e-4))
        size = rng.exponential(1.0, n)
        side = rng.choice(np.array([-1, 1], dtype=np.int8), n)
        st, _ = features_update(new_feature_state(self.config), ts[:64], price[:64], size[:64],
                                side[:64])
        table = {}
        for batch in (4096, 16_384, 65_536, 262_144):
            args = (ts[64 : 64 + batch], price[64 : 64 + batch], size[64 : 64 + batch],
                    side[64 : 64 + batch])
            best = []
            for fn in (lambda a=args: features_update(st, *a),
                       lambda a=args: features_update_torch(st, *a, device=device)):
                fn()
                t0 = time.perf_counter()
                for _ in range(3):
                    fn()
                best.append((time.perf_counter() - t0) / 3)
            table[batch] = best[0] / best[1]
        chosen = next((b for b, r in table.items() if r > 1.0), 1 << 62)
        log.info("features_calibrated", stage=self.name, device=device, gpu_min_batch=chosen,
                 speedup={b: round(r, 2) for b, r in table.items()})
        return chosen

    def _gpu_batch(self, lease: Lease, device: str | None) -> bool:
        if device is None or lease.length < self.gpu_min_batch:
            return False
        sym, kind = lease["symbol_id"], lease["kind"]
        if not (sym.min() == sym.max() and (kind == KIND_TRADE).all()):
            return False
        key = int(sym[0])  # a symbol's first trades and RSI seed: CPU kernel
        tab = self.table
        return (key < tab.ist.shape[0] and tab.ist[key, 0] > 0
                and tab.ist[key, 2] >= self.config.rsi_period)

    def _compute_device(self, lease: Lease, stream: ComputeStream) -> None:
        """One symbol's trades on the stream's device; the result stays cached there."""
        import torch

        from ..kernels.features_torch import features_update_device

        key = int(lease["symbol_id"][0])
        st = self.table.state(key)
        cols = [stream.to_device(lease, c) for c in GPU_INPUTS]
        new, trade = features_update_device(st, *cols, device=str(stream.device))
        quote = torch.as_tensor(st.last_quote, device=trade.device).expand(trade.shape[0], 3)
        full = torch.cat((trade, quote), dim=1)
        if self._index is not None:
            full = full[:, torch.as_tensor(self._index, device=trade.device)]
        stream.to_host(lease, FEATURES_COLUMN, full)
        self.gpu_batches += 1
        self.table.load(key, new)  # committed once the batch is through

    def _compute(self, lease: Lease, stream: ComputeStream | None = None) -> None:
        if stream is not None and self._gpu_batch(lease, on_device(stream)):
            self._compute_device(lease, stream)
            return
        n = lease.length
        if self._index is None:
            out = lease[FEATURES_COLUMN]
        else:
            if self._out.shape[0] < lease.capacity:
                self._out = np.empty((lease.capacity, self._out.shape[1]))
            out = self._out[:n]
        cols = lease.columns  # one liveness check, not one per column
        self.table.update(
            cols["symbol_id"][:n],
            cols["kind"][:n],
            cols["ts_ns"][:n],
            cols["price"][:n],
            cols["size"][:n],
            cols["side"][:n],
            cols["bid"][:n],
            cols["ask"][:n],
            cols["bid_size"][:n],
            cols["ask_size"][:n],
            out,
        )
        if self._index is not None:
            np.take(out, self._index, axis=1, out=lease[FEATURES_COLUMN])

    def process_now(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> object:
        """The live path (small batches never take the GPU scan): one kernel call over the
        slab's whole columns."""
        n = lease.length
        if 0 < n <= INLINE_CHAIN_MAX_ROWS:
            slab = self._slab_tables.get(lease.slab)
            if slab is None:
                slab = slab_addresses(self._slab_tables, lease, self._live_layout)
            if self.table.update_small(n, slab, self._small_out, self._small_index):
                return None
        return NOT_NOW

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        if self.process_now(lease, stream, ctx) is not None:
            await stream.run(self._compute, lease, stream)

    def stats(self) -> dict[str, object]:
        return {"symbols": self.table.symbols, "width": len(self.names),
                "gpu_batches": self.gpu_batches, "gpu_min_batch": self.gpu_min_batch}

    def snapshot_params(self) -> dict[str, object]:
        return {"names": self.names, "config": self.config}

    def snapshot_state(self) -> dict[str, np.ndarray]:
        """Each symbol's EWMAs, counters and last quote: the feature table's rows."""
        t = self.table
        return {"fs": t.fs.copy(), "ist": t.ist.copy(), "seen": t.seen.copy()}

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        t = FeatureTable(self.config)
        if state["fs"].shape[1:] != t.fs.shape[1:]:
            from ..snapshot import SnapshotError

            raise SnapshotError(f"features stage {self.name!r}: snapshot rows of width "
                                f"{state['fs'].shape[1]}, this table's {t.fs.shape[1]}")
        t.fs, t.ist, t.seen = state["fs"].copy(), state["ist"].copy(), state["seen"].copy()
        t._fs_scratch, t._ist_scratch = t.fs.copy(), t.ist.copy()
        self.table = t
