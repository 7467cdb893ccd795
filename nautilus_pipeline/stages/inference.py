"""Inference stage: the model's probability of an up move for every row.

The model (an MLP over named features; the default one ships in ``models/``) runs on the
first usable stream of the stage's preference list, e.g. ``["coreml:ane", "mlx:gpu",
"torch:cuda", "cpu"]``: on a Mac the Neural Engine, on an NVIDIA box CUDA, elsewhere
numpy. The choice (and why the earlier entries were skipped) is logged at start; a batch
that fails on the accelerator is rerun on the fallback stream by the stage runner.

With ``route = "calibrated"`` the stage measures every usable backend of its list at
batch sizes 1…4096 at start (``model.runners.calibrate``), logs the table, and sends each
batch to the fastest backend for its size: small live batches to the CPU, large replay
batches to the GPU. Backends agree to float32 tolerance, not bit for bit, so a calibrated
stage trades exact batch-size independence of ``prediction`` for speed; the default
(``route = "first"``) keeps one backend and identical numbers (on the numpy runner by
construction; on the others as far as their library computes a row alike in any batch of
one tile size, which torch:cpu did not on an Intel host: the note on predict_tiled below).

Device-resident features. When the stage before left ``features`` on this stage's CUDA
device (the features stage's GPU path caches it on the lease), a ``torch:cuda`` runner
reads it there: no host→device copy, the model runs on the device tensor, and only
``prediction`` (4 bytes a row) comes back. Otherwise the features are cast to float32 on the
host and copied in (``k``·4 bytes a row), as before; both are counted in the pool's stats.

The model's input names must equal the feature stage's output names, in order: a mismatch
fails when the pipeline is built, listing both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from ..compute import ComputeStream, runner_backend, unusable_reason
from ..compute.executor import StreamThread
from ..errors import ConfigError
from ..events import ColumnSpec
from ..kernels.addresses import column_addresses
from ..kernels.mlp import RowOrderForward
from ..memory import Lease
from ..model.base import ModelRunner
from ..model.invariance import Invariance, probe_cached
from ..model.numpy_runner import NumpyRunner
from ..model.runners import Calibration, calibrate_cached
from ..model.shelf import give_back, take_runner
from ..model.spec import DEFAULT_MODEL_PATH, check_inputs, load_model
from ..params import param
from ..stage import NOT_NOW, OFFLOAD_MIN_ROWS, Stage, StageContext, slab_addresses, upstream_column
from .features import FEATURES_COLUMN

log = structlog.get_logger("nautilus_pipeline.inference")

DEFAULT_STREAMS = ("coreml:ane", "mlx:gpu", "torch:cuda", "torch:mps", "cpu")

# On the numpy runner every batch takes ``kernels.mlp.RowOrderForward``: one
# numba call whose sums run in one written-down order, so a row's prediction has the same
# bits at batch 1, 7 and 4096 by construction (tests/test_engine_inline.py); a live batch of
# at most LIVE_ROWS rows runs it inline (no stream call).
LIVE_ROWS = 16
# A batch of at least SPLIT_MIN_ROWS rows on an offloading CPU stream (concurrent execution)
# is cut in two: the second part runs on the stage's second lane (a thread of its own) while
# the stream's worker computes the first. Rows are independent in RowOrderForward and take
# the same operations wherever they fall, so the bits do not change (tests/test_engine_*);
# inference is the largest stage of the default chain (1.5-2.2 ms of ~3.2 ms per 4096-row
# batch on the dev VM), the one that kept a second core idle. Measured, two lanes against one
# (``scripts/bench_pipeline.py --lanes-ab``: rows "concurrent" vs "conc lanes1"): on the 2-core
# dev VM, quiet, 10M trades 1.311/1.316M vs 1.318M ticks/s (the other stages fill the second
# core already), 2M -7 %/+3 %; the H200 host's 16 cores 700K vs 646K (+8 %, within its spread;
# docs/measurements/gpu_lanes_ab_1b58444_h200.txt). Kept on by
# default for hosts with cores to spare: the lane starts only if the pipeline's core budget
# has a core left for it after every heavy stage took its worker's (``StageContext.cores``,
# none on 2 cores); ``lanes = 1`` where a second thread is never wanted.
SPLIT_MIN_ROWS = 1024
# The other runners (torch, MLX, Core ML, and numpy under calibrated routing) get their
# rows through ``ModelRunner.predict_tiled``: every row in a call of the runner's one tile
# size, so a prediction has the same bits whatever batch the row fell in (``model.base``),
# where the library computes a row alike in every call of one shape: tested on each host by
# tests/test_model_tiles.py; torch:cpu failed it on a lent H100's Intel host
# (``model.torch_runner.CPU_TILE_ROWS``). Where a runner may not keep them, the stage's start
# probes it and says so (``model.invariance``, ``InferenceStage._probe``).


@dataclass(frozen=True, slots=True)
class InferenceParams:
    """The inference stage's parameters: which model, and how to pick its backend."""

    model: str | None = param(None, "model file (.npz/.safetensors; default: the bundled model)")
    coreml_package: str | None = param(None, "exported .mlpackage for the coreml streams")
    route: Literal["first", "calibrated"] = param("first", "first usable backend, or calibrated "
                                                  "per batch size")
    lanes: Literal[1, 2] = param(2, "CPU threads for a batch of >= 1024 rows on the fixed-order "
                                 "model (concurrent execution; the same bits either way)")


class InferenceStage(Stage):
    """Reads ``features`` (float64[n, k]); writes ``prediction`` (float32[n], P(up))."""

    reads = (FEATURES_COLUMN,)
    writes = (ColumnSpec("prediction", np.dtype(np.float32), fill=np.nan),)

    Params = InferenceParams
    streams = DEFAULT_STREAMS

    @classmethod
    def from_params(cls, p: InferenceParams, ctx: Any, *, name: str,
                    streams: Sequence[str]) -> InferenceStage:
        return cls(ctx.path(p.model) if p.model else None, streams=streams, route=p.route,
                   coreml_package=ctx.path(p.coreml_package) if p.coreml_package else None, name=name,
                   lanes=p.lanes)

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        streams: Sequence[str] = DEFAULT_STREAMS,
        route: str = "first",
        coreml_package: str | Path | None = None,
        name: str = "inference",
        offload: bool | int = OFFLOAD_MIN_ROWS,
        lanes: int = 2,
    ):
        if lanes not in (1, 2):
            raise ConfigError(f"inference: lanes must be 1 or 2, got {lanes!r}")
        if route not in ("first", "calibrated"):
            raise ConfigError(f"inference: route must be 'first' or 'calibrated', got {route!r}")
        self.name = name
        self.streams = tuple(streams)
        self.route = route
        self.offload = offload
        self.model_path = Path(model) if model is not None else DEFAULT_MODEL_PATH
        self.spec, self.weights = load_model(self.model_path)
        self.coreml_package = coreml_package
        self.runners: dict[str, ModelRunner] = {}
        self.calibration: Calibration | None = None
        self.invariance: dict[str, Invariance] = {}  # backend → what the probe found
        self._probed = False
        self._x32: np.ndarray | None = None
        self._p32: np.ndarray | None = None
        self._primary: ComputeStream | None = None
        self._fixed: dict[str, RowOrderForward | None] = {}
        self.lanes = lanes
        self._lane: StreamThread | None = None
        self._no_lane_core = False  # the pipeline had no core left for the second lane
        self._lane_fwd: RowOrderForward | None = None
        self.split_batches = 0  # batches computed on both lanes
        self._slab_tables: dict = {}  # slab → its address table
        self._rows_by_backend: dict[str, int] = {}
        self._numpy_rows = 0  # the fixed-order pass's rows (a counter: live ticks pass here)
        self._runner_raised = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.spec.input_names

    def connect(self, upstream: Sequence[Stage]) -> None:
        feats = upstream_column(upstream, FEATURES_COLUMN)
        if feats is None:
            raise ConfigError(
                f"inference stage {self.name!r} needs a features stage before it "
                f"(its model takes {list(self.input_names)})"
            )
        check_inputs(self.spec, feats.labels)

    async def bind(self, stream: ComputeStream) -> None:
        backend = stream.runner_backend
        if backend in self.runners:
            return
        options = {"coreml_package": self.coreml_package} if backend.startswith("coreml") else {}
        self.runners[backend] = await stream.run(  # the runner a closed stage left, if any
            take_runner, backend, self.spec, self.weights, **options
        )
        log.info("inference_backend", stage=self.name, backend=self.runners[backend].name,
                 model=str(self.model_path))
        first_bind, self._probed = not self._probed, True
        if first_bind and self.route == "first" and not isinstance(self.runners[backend], NumpyRunner):
            await self._probe(self.runners[backend], stream)
        if self.route == "calibrated" and self.calibration is None:
            usable = [runner_backend(s) for s in self.streams if unusable_reason(s) is None]
            # 10 ms of calls per backend and size (at least 5, after 3 warm-ups): the start
            # counts in a run's wall time, and 50 ms made it ~1 s longer with four backends
            # measured once per machine, code and model, then read back (calibration_cache)
            self.calibration = calibrate_cached(list(dict.fromkeys(usable)), self.spec,
                                                self.weights, budget_s=0.01,
                                                built=tuple(self.runners.values()))
            log.info("inference_calibrated", stage=self.name, table="\n" + self.calibration.format(),
                     **{"route": self.calibration.to_dict()["route"]})

    async def _probe(self, runner: ModelRunner, stream: ComputeStream) -> None:
        """Whether ``runner`` gives a row the same bits in any batch here (``model.invariance``),
        said if not. The numpy runner keeps them by construction and is not asked; a fallback
        bound during a run is not asked either (the batch that fell back is waiting). A probe
        that fails is logged and the start goes on (what it would have said is then unknown),
        and the runner is closed at the end rather than shelved (``model.shelf``)."""
        try:
            found = await stream.run(probe_cached, runner, self.spec, self.weights)
        except Exception as exc:
            log.warning("inference_batch_probe_failed", stage=self.name, runner=runner.name,
                        error=f"{type(exc).__name__}: {exc}")
            self._runner_raised = True  # closed at the end, not shelved for another job
            return
        self.invariance[runner.backend] = found
        if not found.holds:
            log.warning("inference_batch_dependent", stage=self.name, runner=found.runner,
                        rows_off=found.rows_off, rows_probed=found.rows, cuts=list(found.cuts),
                        reference_rows=found.reference_rows, max_abs_diff=found.max_abs_diff,
                        why=f"on this machine {found.runner} gives some rows other last bits in a "
                            "batch of another size, so a prediction can depend on the batch size; "
                            "streams = [\"cpu\"] in this stage's table (numpy, slower on large "
                            "batches) gives the same bits at any batch size")

    def warm_up(self, columns: dict[str, np.ndarray], stream: ComputeStream) -> None:
        """The fixed-order forward pass of a live row (its numba kernel), where the stream has one."""
        fwd = self._fixed_for(stream)
        if fwd is not None:
            fwd(columns[FEATURES_COLUMN], 1, columns["prediction"])
            fwd.live(1, column_addresses(columns, fwd.live_columns))

    def _runner(self, stream: ComputeStream, n: int) -> ModelRunner:
        if self.calibration is not None and stream is self._primary:
            return self.calibration.runner_for(n)
        return self.runners[stream.runner_backend]

    async def start(self, ctx: StageContext) -> None:
        self._primary = None
        self._probed = False  # the first bind of a run (its primary stream) probes
        self.invariance = {}
        self._fixed = {}
        self._slab_tables = {}
        self._no_lane_core = False

    def _fixed_for(self, stream: ComputeStream) -> RowOrderForward | None:
        """The fixed-order forward pass on ``stream``, where it has one: the numpy runner,
        no calibrated routing. One per stream (a stage runs one batch at a
        time, inline or on the stream's worker, so its scratch is never shared)."""
        fwd = self._fixed.get(stream.name, False)
        if fwd is False:
            runner = self.runners.get(stream.runner_backend)
            fwd = None
            if isinstance(runner, NumpyRunner) and self.calibration is None:
                fwd = RowOrderForward(runner._ws)
            self._fixed[stream.name] = fwd
        return fwd

    def _predict_fixed(self, lease: Lease, fwd: RowOrderForward) -> None:
        cols = lease.columns
        fwd(cols[FEATURES_COLUMN], lease.length, cols["prediction"])

    def _predict_split(self, lease: Lease, fwd: RowOrderForward) -> None:
        """The rows in two parts, the second on the stage's second lane, both GIL-free; it
        returns when both are written (a failure in either raises here)."""
        assert self._lane is not None and self._lane_fwd is not None
        cols = lease.columns
        feats, out, n = cols[FEATURES_COLUMN], cols["prediction"], lease.length
        half = (n // 2 + 15) // 16 * 16
        second = self._lane.submit(self._lane_fwd, feats[half:], n - half, out[half:])
        try:
            fwd(feats, half, out)
        finally:
            second.result()

    def _split_lane(self, stream: ComputeStream, ctx: StageContext) -> bool:
        """Whether this batch may use the second lane (started on first use, if the
        pipeline has a core left for it: ``StageContext.cores``)."""
        if self.lanes < 2 or not getattr(stream, "offloads", False) or self._no_lane_core:
            return False
        if self._lane is None:  # (a fixed-order pass exists: the stream's runner is numpy's)
            if ctx.cores is not None and not ctx.cores.take(f"{self.name}-lane2"):
                self._no_lane_core = True
                return False
            self._lane_fwd = RowOrderForward(self.runners[stream.runner_backend]._ws)
            self._lane = StreamThread(f"np-{self.name}-lane2")
        return True

    def process_now(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> object:
        """A live batch of at most ``LIVE_ROWS`` rows through the fixed-order forward pass,
        inline (no stream call: a few µs matter here)."""
        n = lease.length
        if 0 < n <= LIVE_ROWS:
            fwd = self._fixed.get(stream.name)
            if fwd is not None:
                slab = self._slab_tables.get(lease.slab)
                if slab is None:
                    slab = slab_addresses(self._slab_tables, lease, fwd.live_columns)
                fwd.live(n, slab)
                self._numpy_rows += n
                return None
        return NOT_NOW

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        try:
            await self._process(lease, stream, ctx)
        except BaseException:
            self._runner_raised = True  # its runners are closed, not shelved (model.shelf)
            raise

    async def _process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        if self._primary is None:
            self._primary = stream
        n = lease.length
        if n:
            fwd = self._fixed_for(stream)
            if fwd is not None:
                if n <= LIVE_ROWS:
                    self._predict_fixed(lease, fwd)
                elif n >= SPLIT_MIN_ROWS and self._split_lane(stream, ctx):
                    await stream.run(self._predict_split, lease, fwd)
                    self.split_batches += 1
                else:
                    await stream.run(self._predict_fixed, lease, fwd)
                self._numpy_rows += n
                return
        k = self.spec.n_inputs
        runner = self._runner(stream, n)
        if self._on_device(lease, stream, runner):
            await stream.run(self._predict_on_device, lease, stream, runner)
            self._rows_by_backend[runner.name] = self._rows_by_backend.get(runner.name, 0) + n
            return
        if self._x32 is None or self._x32.shape[0] < n:
            self._x32 = np.zeros((max(n, lease.capacity), k), dtype=np.float32)
            self._p32 = np.empty(self._x32.shape[0], dtype=np.float32)
        x = self._x32[:n]
        np.copyto(x, lease[FEATURES_COLUMN], casting="same_kind")
        await stream.run(runner.predict_tiled, x, self._p32[:n])
        lease["prediction"][...] = self._p32[:n]
        if runner.name.startswith(("torch:cuda", "torch:mps", "mlx:gpu")):
            lease.pool.count_copy("h2d", n * k * 4)
            lease.pool.count_copy("d2h", n * 4)
        self._rows_by_backend[runner.name] = self._rows_by_backend.get(runner.name, 0) + n

    @staticmethod
    def _on_device(lease: Lease, stream: ComputeStream, runner: ModelRunner) -> bool:
        """Whether the features wait on ``stream``'s CUDA device and ``runner`` runs there."""
        has = getattr(stream, "has_on_device", None)
        return (
            has is not None
            and runner.backend == stream.runner_backend == "torch:cuda"
            and hasattr(runner, "predict_tensor")
            and has(lease, FEATURES_COLUMN)
        )

    def _predict_on_device(self, lease: Lease, stream, runner) -> None:
        x = stream.to_device(lease, FEATURES_COLUMN)  # cached: no copy
        stream.to_host(lease, "prediction", runner.predict_tensor(x))  # in tiles, as on the host

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
            self._lane = self._lane_fwd = None
        # in a batch worker, shelved for its next job (no CUDA graphs captured again);
        # elsewhere, and after a runner raised, closed (model.shelf)
        lent = {id(r): r for r in self.runners.values()}
        if self.calibration is not None:
            lent.update((id(r), r) for r in self.calibration.runners.values())
        for r in lent.values():
            give_back(r, broken=self._runner_raised)
        self.runners, self.calibration, self._fixed = {}, None, {}  # lent on: not this stage's now

    @property
    def rows_by_backend(self) -> dict[str, int]:
        """Rows predicted per backend so far."""
        rows = dict(self._rows_by_backend)
        if self._numpy_rows:
            rows["numpy"] = rows.get("numpy", 0) + self._numpy_rows
        return rows

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {"model": self.model_path.name, "rows_by_backend": self.rows_by_backend,
                                  "split_batches": self.split_batches}
        if self.invariance:  # what the probe found, per runner (model.invariance)
            out["batch_invariance"] = {
                i.runner: {"holds": i.holds, "rows_probed": i.rows, "rows_off": i.rows_off,
                           "cuts": list(i.cuts), "reference_rows": i.reference_rows}
                for i in self.invariance.values()}
        return out

    def snapshot_params(self) -> dict[str, object]:
        """The model's spec and weights: another model gives other predictions."""
        return {"spec": self.spec, "weights": self.weights}

    def snapshot_state(self) -> dict[str, object]:
        """Nothing: a prediction depends on its row's features only."""
        return {}

    def restore_state(self, state: dict[str, object]) -> None:
        """Nothing to restore (see ``snapshot_state``)."""
