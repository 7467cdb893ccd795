"""Stages and the runner that binds a stage to the bus, a compute stream and a fallback.

A :class:`Stage` is a small processor (as in structlog): it declares the slab columns it
reads and writes, the compute streams it prefers, and processes one batch at a time
through views of the lease. The math lives in pure kernels (``kernels/``); a stage moves
batches, calls its kernel on its stream, and commits its state only when the batch
succeeded, so that a batch rerun on the fallback stream after a device error starts
from the same state and gives the same numbers.

The :class:`StageRunner` owns what every stage needs and none should write twice: the
subscription on the bus, the stream selection and fallback, per-batch latency and
throughput metrics, and error context (stage, topic, batch, rows) for failures.

Where a stage's kernels run (``Stage.offload``, ``OFFLOAD_MIN_ROWS``). Each stage consumes
its own queue in its own task, so stages overlap as soon as their kernels leave the event
loop: a CPU stream runs a batch of at least ``OFFLOAD_MIN_ROWS`` rows on the stage's own
worker thread (one per stage: a stage's batches stay in order, and no stage waits behind
another's kernel), smaller batches inline (features, VPIN and the recorder from
``LIGHT_OFFLOAD_MIN_ROWS``: "Light stages stay on the loop" below). The threshold comes from
``python scripts/bench_pipeline.py --offload``: one batch of the default chain per stage,
inline, beside the worker round trip (2-core dev VM, µs, medians; the machine was shared
with other jobs, so absolute numbers are high, the crossover is what counts)::

      rows   features  inference       vpin       risk     signal     (round trip 52 µs)
         1       26.1       74.9       62.3       90.2       34.8
        64       41.6       94.8       89.7      146.8       54.8
       256       72.1      218.8      131.1      185.2       63.7
      1024      201.2      825.9      610.7     1470.4      320.7
      4096      702.0     3480.3     1265.0     6162.4     1844.8

and again with the live kernels and the fixed-order model (engine branch, AMD EPYC VM at
load ~6, ``docs/measurements/dev_bench_pipeline_engine_ab.txt``)::

      rows   features  inference       vpin       risk     signal     (round trip 26.5 µs)
         1        3.3        3.6        2.3        4.6        0.7
        64        7.1       31.2        2.6        6.1        5.6
       256       18.1      117.7        6.2       12.7        3.5
      1024       97.9      473.3      322.8      499.8       74.4
      4096      323.8     7390.2      779.9     1712.9      456.4

and with the live hop (``process_now``, address tables; live branch at 1594e70, same VM at
load ~1-2, ``docs/measurements/dev_live_ab_1594e70.txt``; the parent's 1-row row beside it
in that run: 3.2, 3.5, 2.3, 4.7, 0.7)::

      rows   features  inference       vpin       risk     signal     (round trip 26-54 µs)
         1        1.5        2.5        1.3        2.0        0.6
        64        3.8       31.5        1.5        3.0        4.8
       256       10.9      121.4        2.7        6.4        2.8
      1024       59.2      476.9      113.5      332.5       62.5
      4096      183.8     1864.4      174.8     1286.4      275.4

Below ~256 rows a hop costs as much as the batch (the small-batch kernels made that so for
every stage but inference), so a live batch of one row stays inline; from 1024 rows every
stage's batch is several round trips long, and running it beside the others pays (the
4,096-row inference figure of the second table is one swing of the load; 1.1-2.5 ms in
other runs). One worker shared by all stages was the alternative: it would serialise the
stages' kernels again, which is what this replaces.

The inline hand-off (``INLINE_CHAIN_MAX_ROWS``). A queue hop costs a publish, a future and
a task switch: ~6-7 µs on the dev VM (``bench_pipeline.py``: 4 ``asyncio.Queue`` hops
25-29 µs), so a live tick through five stages and a sink paid ~40 µs in hops alone, plus
the batcher's wake-up. A batch of at most ``INLINE_CHAIN_MAX_ROWS`` rows now goes from a
stage straight into the next one, in the same task, when that stage is idle: nothing
queued for it, no batch inside it, and it is the only subscriber of the topic (a user's
tap on a stage topic keeps the bus path). The micro-batcher's flushes enter the first
stage the same way, so a tick into an idle pipeline runs the whole chain inside
``publish_tick`` (``batch_size=1``) or the batcher's flush. Order holds: the only
producer of a stage's input is the stage before it, which is blocked in the hand-off, and
a batch that arrives through the queue while an inline one is inside a stage waits for it.
Whole-batch sources (``publish_batch``, ``ingest``, the replay) keep the queue: they must
not wait for the chain, and their batches are large. 256 rows is where the offload table
says a hop stops being small beside the batch.

Live paths. With the hop gone, a live tick's cost was each stage's per-batch Python
(symbol groups, output dicts, state objects, ``np.full``/``column_stack``, ~20 numpy calls
in the model). The default stages now run a small batch as one numba call with few
arguments over the slab's whole columns and state arrays allocated once (``features``:
``FeatureTable.update_small``; ``vpin``: ``vpin_rows_small`` while trades join the open
bar; ``risk``: ``kernels.risk_rows``; ``inference``: ``kernels.mlp.RowOrderForward``;
``signal``: one scalar read), each calling the batch path's own kernels (the model: one
fixed order of sums for every batch size) so the numbers are the same bits
(``tests/test_engine_inline.py``). One row per stage, ``scripts/profile_stages.py --rows 1``
on the shared dev VM, p50 µs, before → after: features 39 → 12, inference 104 → 32 (three
16-row products) → 3.6 (the fixed-order kernel, AMD EPYC VM, ``bench_pipeline.py
--offload``), VPIN 83 → 8, risk 241 → 12, signal 61 → 2-16 (16 when it publishes). The
runner's own cost per hop was ~1.4 µs (five null stages against one, AMD EPYC VM).

The live hop (``Stage.process_now``, issue 9's ≥ 100K ticks/s at ``batch_size=1``). At
~3 µs a stage, the rest of a live tick's ~19 µs was the framework's: a coroutine created
and awaited per stage (``take_inline`` → ``_handle_lease`` → ``process``, ~0.2 µs each),
a histogram update per stage, and numba's unboxing of 14-27 array arguments per kernel
call (~45 ns each: 1.3 µs for the risk kernel's 27, ``bench_pipeline.py --dispatch``).
Now ``take_inline`` is one loop over the stages that calls each stage's ``process_now``,
a plain method doing a live batch in place (the default stages' live paths above) and
returning None; only a batch it declines (``NOT_NOW``: the stage's ``process`` runs, its
state untouched) or one with events to publish (it returns the awaitable) awaits. The
clock is read once per hop, durations wait in a list and join the histogram in bulk
(``StageMetrics``), the live kernels take the slab's columns as one table of addresses
(:mod:`~nautilus_pipeline.kernels.addresses`), and the model computes one row, not a
tile of four. Loaded dev VM (AMD EPYC, load 3-5), min of 5×20,000 calls, µs, before →
after: per hop 0.67 → 0.34 (five null stages against one), ``process_now`` of one row:
features 2.2 → 1.0, inference 2.5 → 1.3, VPIN 1.4 → 0.7, risk 3.4 → 0.8 (no VaR report
due), signal 0.2. ``bench_pipeline.py --rows --live-ticks 3000 --live-repeats 5``, parent
and branch alternating (load 1-3, ``docs/measurements/dev_live_ab_1594e70.txt``), full
chain at ``batch_size=1``, max rate: publish → last stage p50 16.8-17.0 → 7.5-7.9 µs,
50K → 97-109K ticks/s, 20 → 10.2 CPU µs a tick (its three VaR reports, ~0.5 ms each,
included); paced 1,000/s p50 25 → 9-22 µs, p99 86-123 → 60-90 µs. What remains per tick:
the model's arithmetic (~0.8 µs, one fixed order of float32 sums), the other kernels'
dispatch and work (~1.2 µs), six hops (~2 µs), ``publish_tick`` with the pool's lease
(~1.8 µs, of which acquire + release 0.6).

The live hop, second round (aiming at issue 9's target with margin, ≤ ~8.5 CPU µs a tick).
What was left was spread thin, so each part was measured (``bench_pipeline.py --hops``) and
cut: ``take_inline``'s loop is now a plain call (:meth:`StageRunner.take_now`) that returns
what is left to await, or None, so that ``publish_tick`` awaits nothing more for a live
tick; a stage the loop is in needs no busy mark while nothing awaits (no other task runs),
so it is set only where :meth:`StageRunner._finish_inline` awaits; the next stage's
``can_take_inline`` is answered inline in the common case (the route last checked, nothing
in or queued for it); the live kernels are called through their compiled entry points
(:func:`~nautilus_pipeline.kernels.addresses.entry_point`, no type dispatch), the features
and VPIN state as one table each; ``publish_tick`` writes the row through memoryviews and
the pool's last release takes a short path. Loaded dev VM (AMD EPYC, load 1.6-1.8), min of
9×2,000 calls, ns, parent → this (``docs/measurements/dev_live_hops_ab_62b6216.txt``): lease
acquire + release 680 → 490-520, ``publish_tick`` into one null stage 2,090-2,230 →
1,640-1,690, one hop 380-420 → 280-320, ``process_now`` of one row: features 950-1,000 →
530-560, inference 1,330-1,360 → 1,200-1,250, VPIN 660-690 → 460-480, risk 900-930 →
780-790, signal 80. ``bench_pipeline.py --rows --live-ticks 3000 --live-repeats 5``, parent
and this alternating, five rounds (load 1.8-4.5,
``docs/measurements/dev_live_ab_62b6216.txt``), full chain at ``batch_size=1``, max rate:
9.9-10.5 → 8.6-9.5 CPU µs a tick, publish → last stage p50 7.9-8.2 → 6.4-6.9 µs, 72-101K →
32-115K ticks/s (the wall clock of a loaded VM: the slow runs stalled 12-16 ms at a time
beside other jobs); paced 1,000/s p50 12-33 → 15-31 µs, p99 62-115 → 71-104 µs. What remains
per tick: the model's arithmetic (~1 µs), the other kernels and their stages' Python (~1.9
µs), six hops (~1.8 µs), ``publish_tick`` and its lease (~1.3 µs), a VaR report every 2,000
trades (~0.5 ms). Measured and not kept: the live wrappers compiled without ``nogil`` (the
loop thread that calls them holds the GIL anyway): 20-40 ns a call less, not worth kernels
that would hold the GIL wherever else they were called.

Light stages stay on the loop (``LIGHT_OFFLOAD_MIN_ROWS``). Once the kernels had reached
their floor, a 4,096-row replay batch of features, VPIN and the recorder cost 213, 86 and
119 µs inline, inference 1,704 and risk 1,245 µs (the signal stage, 4 µs, never calls its
stream; ``bench_pipeline.py --rows 10000000``, serial row, per-stage p50, quiet dev VM,
``docs/measurements/dev_bench_pipeline_quiet_44fe592.txt``). On their workers the three
light ones took 1,114, 1,245 and 1,442 µs a batch (the concurrent row of the quiet round
before, all stages offloaded, ``dev_bench_pipeline_quiet_ae3ab91.txt``): a hop, then waits
for the GIL and a core behind the other stages' threads on 2 cores. Run inline, they cost
the loop ~0.4 ms a batch (213, 123 and 123 µs in the concurrent row at 44fe592) and leave
the cores to inference's two lanes and risk. Between those two rounds nothing else in the
replay's path changed: 10M generated trades 1.33M → 1.68M ticks/s, whole-process cores
busy 1.53 → 1.60 (two quiet rounds three hours apart, not an interleaved A/B). Beside other jobs (load 3-4, the command line with a temporary switch
naming the stages kept inline, three runs each, alternating,
``docs/measurements/dev_inline_stages_ab_loaded_3dd3fe3.txt``) all offloaded, light inline
and light plus risk inline were level (1.01-1.23M ticks/s), and the light-inline runs took
less CPU for the same ticks/s (1.07-1.19 cores over the run against 1.30-1.41). Risk kept
its worker then; it now has one where the host has a core for it (the core budget below).
The threshold is 65,536 rows, so ``gpu.toml``'s 262,144-row batches run on the workers as
before, where a 16-core host has cores for them.

Worker threads and cores (:class:`CoreBudget`, ``Pipeline(cores=...)``). A worker pays only
where a core is free to run it: with more runnable threads than cores, every stage's batch
waits for a core, and the per-stage p50s of the concurrent run grew to 1.3-2x the serial
run's while the kernels themselves do not slow down beside each other (two cores, each
kernel alone and two at once on two threads: inference 1.02x, VaR 1.05x, a pure-integer
loop 1.01x; ``scripts/bench_core_sharing.py``, quiet dev VM,
``docs/measurements/dev_bench_core_sharing_quiet_e3d8805.txt``). So the loop's thread keeps
a core, each heavy CPU stage takes one for its worker in chain order, inference's second
lane takes one after them, and a heavy stage that finds none left runs its replay batches
inline like the light ones. On the 2-core dev VM that is inference on its worker and
everything else on the loop: ``bench_pipeline.py --cores-ab 16`` (the placement before, a
worker for inference, its lane and risk, between two runs of the budget; quiet,
``docs/measurements/dev_bench_pipeline_quiet_e3d8805.txt``), 10M trades 1.78M / 1.99M ticks/s
at 1.75 / 1.80 cores over the run against 1.41M at 1.60, 2M trades 1.46M / 1.71M against
1.20M; risk's batch 1,180-1,245 µs inline against 2,753 µs on its worker. The outputs are
serial execution's, bit for bit, whatever the budget (``tests/test_engine.py``, cores 1-4).

Warm-up (``Stage.warm_up``). A numba kernel's first call in a process loads it from the
cache (or compiles it): ~5-20 ms each warm, ~0.1-1 s for the first one (numba's CPU
target) and for a cold cache seconds. The live kernels used to pay that on the first live
tick, the Monte Carlo sampler on the first VaR report (~1 s seen). At start, after
``bind``, each runner now gives its stage a one-row scratch slab of the pipeline's columns
(the same array types as the pool's) on the stream's worker, and the stage runs its live
kernels there on scratch state (``tests/test_engine_warm.py``: no kernel loads after start,
checked in a fresh interpreter).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from .bus import Event
from .compute import ComputeStream, choose, create_stream
from .errors import PipelineError, StageError
from .events import ColumnSpec
from .memory import Lease
from .metrics import LatencyHistogram

if TYPE_CHECKING:
    from .bus import EventBus, Subscription

log = structlog.get_logger("nautilus_pipeline.stage")

OFFLOAD_MIN_ROWS = 1024
"""Batches of at least this many rows run on the stage's worker thread (see the module doc)."""

LIGHT_OFFLOAD_MIN_ROWS = 65_536
"""The threshold of the stages whose replay batch costs about a hop (features, VPIN, the
recorder: "Light stages stay on the loop" in the module doc)."""

NOT_NOW = object()
"""What :meth:`Stage.process_now` returns for a batch it leaves to :meth:`Stage.process`."""

_UNCHECKED = (None,)
"""A runner's ``_sole_route`` before its first check: never a route of the bus (those hold
subscriptions), so never taken for one."""

INLINE_CHAIN_MAX_ROWS = 256
"""Batches of at most this many rows go from stage to stage without a queue hop when the
next stage is idle (see the module doc)."""


CPU_WORKER_STREAMS = ("cpu", "torch:cpu")
"""Streams whose worker thread computes on a CPU core (a GPU stream's worker mostly waits)."""


class CoreBudget:
    """The CPU cores a pipeline's stages may keep busy beside the event loop's own.

    A heavy CPU stage takes one for its worker thread when the pipeline starts, in chain
    order; inference's second lane takes one at its first split batch (after every stage
    took its worker). A stage that finds none left runs its replay batches on the loop, as
    the light stages do: a thread without a core of its own only waits for one (see
    "Cores" in the module docstring).
    """

    def __init__(self, cores: int):
        self.left = max(int(cores), 0)
        self.taken: list[str] = []

    def take(self, what: str) -> bool:
        """One core for ``what`` (a name for the log and stats), if one is left."""
        if self.left <= 0:
            return False
        self.left -= 1
        self.taken.append(what)
        return True


@dataclass
class StageContext:
    """What a running stage may use besides its batch: the bus, the symbol table and the
    cores left for worker threads (None: no limit, e.g. a stage run outside a pipeline)."""

    bus: EventBus
    pipeline: str
    symbols: Any = None
    cores: CoreBudget | None = None

    async def publish(self, topic: str, payload: Any) -> None:
        await self.bus.publish(topic, payload)

    def symbol_name(self, symbol_id: int) -> str:
        """The instrument name of a slab's ``symbol_id`` (the id itself if the table lacks it)."""
        table = self.symbols
        if table is not None and 0 <= symbol_id < len(table):
            return table.name_of(symbol_id)
        return str(symbol_id)


class Stage:
    """Base class of pipeline stages. Subclasses set the class attributes and ``process``.

    - ``reads``: slab columns the stage reads (checked at build: someone must provide them).
    - ``writes``: output columns the stage adds to every slab (name, dtype, per-row shape).
    - ``streams``: compute stream preference list, first usable wins.
    - ``offload``: where a CPU stream runs the stage's kernels: a row count, on the stream's
      worker thread for batches of at least that many rows and inline on the loop below
      (``OFFLOAD_MIN_ROWS`` by default, ``LIGHT_OFFLOAD_MIN_ROWS`` for the light stages);
      ``True`` always on the worker; ``False`` always inline.
    """

    name: str = "stage"
    reads: tuple[str, ...] = ()
    writes: tuple[ColumnSpec, ...] = ()
    streams: Sequence[str] = ("cpu",)
    offload: bool | int = OFFLOAD_MIN_ROWS

    def connect(self, upstream: Sequence[Stage]) -> None:
        """Check, when the pipeline is built, that the stages before this one suit it
        (:func:`upstream_column` says what an earlier stage wrote)."""

    async def start(self, ctx: StageContext) -> None:
        """Called once before the first batch (reset state, open outputs)."""

    async def bind(self, stream: ComputeStream) -> None:
        """Prepare to run on ``stream`` (load a model onto its device). Called for the primary
        stream at start, and for the fallback stream before its first batch."""

    def warm_up(self, columns: dict[str, Any], stream: ComputeStream) -> None:
        """Run the live path's kernels once on ``columns`` (a scratch slab of the pipeline's
        columns, row 0 a trade) and on scratch state, so that the first live tick neither
        compiles nor loads a kernel from numba's cache (tens of ms each, seconds cold).
        Called at start after ``bind``, on a worker thread; must leave the stage's state as
        it was."""

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        """Process rows ``[0, lease.length)`` of the batch, writing the declared columns."""
        raise NotImplementedError

    def process_now(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> Any:
        """The live path of a small batch handed over inline, as a plain call (no coroutine
        to create and await: a live tick crosses five stages, and each await cost about as
        much as a stage's kernel). Returns None when the batch is done, an awaitable that
        finishes it (events to publish, the state already committed), or ``NOT_NOW``,
        having changed nothing, where :meth:`process` must run instead (the default)."""
        return NOT_NOW

    async def finish(self, ctx: StageContext) -> None:
        """End of stream: emit what only the end can close (the last VPIN bar, say)."""

    def close(self) -> None:
        """Release what the stage holds (models on devices, files) after the last batch."""

    def stats(self) -> dict[str, Any]:
        """Stage-specific counters, merged into the runner's stats."""
        return {}

    # --- snapshots (see nautilus_pipeline.snapshot) --------------------------------------
    def snapshot_state(self) -> Any:
        """The state carried between batches, as arrays, scalars, containers and this
        package's dataclasses (what ``restore_state`` takes back). A stage that keeps state
        defines it; the default refuses, so that no state is silently left behind."""
        from .snapshot import SnapshotError

        raise SnapshotError(f"stage {self.name!r} ({type(self).__qualname__}) cannot be snapshotted: "
                            "it defines no snapshot_state()/restore_state()")

    def restore_state(self, state: Any) -> None:
        """Take back what ``snapshot_state`` returned (called after ``start``)."""
        from .snapshot import SnapshotError

        raise SnapshotError(f"stage {self.name!r} ({type(self).__qualname__}) cannot be restored: "
                            "it defines no snapshot_state()/restore_state()")

    def snapshot_params(self) -> Any:
        """What shapes the stage's numbers (its parameters): a snapshot restores only into a
        stage with the same ones."""
        return {}

    def end_segment(self) -> None:
        """The stream goes on elsewhere from a snapshot just taken (the next file of a chain):
        drop what ``finish`` would close early (an open bar, a last-row mark), since the next
        segment carries it on. Called after the snapshot, before the pipeline closes."""

    def snapshot(self) -> bytes:
        """The stage's state between batches as versioned bytes (see :mod:`..snapshot`)."""
        from .snapshot import encode, fingerprint

        return encode(f"stage:{type(self).__module__}:{type(self).__qualname__}",
                      fingerprint(self.snapshot_params()), self.snapshot_state(), name=self.name)

    def restore(self, data: bytes) -> None:
        """Restore a snapshot of a stage of this type and parameters (after ``start``); another
        version, type or parameters is a :class:`~nautilus_pipeline.snapshot.SnapshotError`."""
        from .snapshot import decode, fingerprint

        decoded = decode(data, kind=f"stage:{type(self).__module__}:{type(self).__qualname__}",
                         params=fingerprint(self.snapshot_params()), what=f"stage {self.name!r}")
        self.restore_state(decoded.state)


class StageMetrics:
    """A stage's counters. Rows and failures count at once (the tick accounting reads
    them); batch durations wait in ``pending`` and join the histogram in bulk
    (``LatencyHistogram.record_many``) when it is read or ``PENDING_MAX`` of them wait: a
    live hop pays a list append, not a histogram update (~0.2 µs a hop on the dev VM)."""

    __slots__ = ("_latency", "failed_rows", "failures", "fallbacks", "pending", "rows")

    PENDING_MAX = 4096

    def __init__(self) -> None:
        self.rows = 0
        self.fallbacks = 0
        self.failures = 0
        self.failed_rows = 0
        self.pending: list[int] = []  # one list for the metrics' life (the live hop holds it)
        self._latency = LatencyHistogram()

    def add(self, rows: int, ns: int) -> None:
        """One batch of ``rows`` done in ``ns``."""
        self.rows += rows
        self.pending.append(ns)
        if len(self.pending) >= self.PENDING_MAX:
            self.fold()

    def fold(self) -> None:
        """Move the pending durations into the histogram."""
        if self.pending:
            self._latency.record_many(self.pending)
            self.pending.clear()

    @property
    def latency(self) -> LatencyHistogram:
        self.fold()
        return self._latency

    @property
    def batches(self) -> int:
        return self.latency.count

    @property
    def busy_ns(self) -> int:
        return self.latency.total_ns

    def summary(self) -> dict[str, Any]:
        latency = self.latency
        busy = latency.total_ns
        return {
            "batches": latency.count,
            "rows": self.rows,
            "fallbacks": self.fallbacks,
            "failures": self.failures,
            "failed_rows": self.failed_rows,
            "rows_per_s": self.rows / (busy / 1e9) if busy else 0.0,
            "batch_latency": latency.summary(),
            "batch_latency_buckets": latency.buckets(),
        }


class StageRunner:
    """Runs one stage: subscribes to its input topic, processes, forwards, measures."""

    def __init__(
        self,
        stage: Stage,
        *,
        input_topic: str,
        output_topic: str | None,
        ctx: StageContext,
        queue_size: int = 16,
        serial: bool = False,
    ):
        self.stage = stage
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.ctx = ctx
        self.queue_size = queue_size
        self.metrics = StageMetrics()
        self.selection = choose(list(stage.streams), stage=stage.name)
        self._offload = False if serial else self._placement(stage, ctx.cores)
        self.stream: ComputeStream = create_stream(self.selection.primary, offload=self._offload)
        self._fallback: ComputeStream | None = None
        self._fallback_bound = False
        self.subscription: Subscription | None = None
        self._write_names = tuple(c.name for c in stage.writes)
        #: The next stage's runner (set by the pipeline), for the inline hand-off.
        self.downstream: StageRunner | None = None
        #: Batches up to this many rows skip the queue hop when this stage is idle.
        self.inline_max_rows = INLINE_CHAIN_MAX_ROWS
        self._inside = 0
        self._inline_busy = False
        self._inline_waiters: list[asyncio.Future] = []  # bus consumers behind an inline batch
        self._bus = ctx.bus
        self._sole_route: tuple = _UNCHECKED  # the input topic's route, checked: this stage alone

    def _placement(self, stage: Stage, cores: CoreBudget | None) -> bool | int:
        """The stage's ``offload``, unless it is a heavy CPU stage that finds no core left
        for its worker: then the light stages' threshold (its replay batches inline)."""
        offload = stage.offload
        heavy = offload is True or (offload is not False and offload < LIGHT_OFFLOAD_MIN_ROWS)
        if cores is None or not heavy or self.selection.primary not in CPU_WORKER_STREAMS:
            return offload
        if cores.take(stage.name):
            return offload
        return LIGHT_OFFLOAD_MIN_ROWS

    @property
    def fallback_stream(self) -> ComputeStream | None:
        if self._fallback is None and self.selection.fallback is not None:
            self._fallback = create_stream(self.selection.fallback, offload=self._offload)
        return self._fallback

    async def start(self, warm: dict[str, Any] | None = None) -> None:
        """Start and bind the stage, warm its live kernels on the scratch columns ``warm``
        (off the loop), and subscribe it to its input topic."""
        await self.stage.start(self.ctx)
        await self.stage.bind(self.stream)
        if warm is not None:
            # on the stream's worker where it has one, inline in serial execution
            await self.stream.run_setup(self.stage.warm_up, warm, self.stream)
        self.subscription = self.ctx.bus.subscribe(
            self.input_topic,
            self._on_batch,
            name=f"stage:{self.stage.name}",
            maxsize=self.queue_size,
            overflow="block",
        )
        self._hop = (self.subscription, self.stage.process_now, self.stream, self.ctx,
                     self.output_topic, self.metrics, self.metrics.pending, self._write_names)

    async def _on_batch(self, event: Event) -> None:
        """A batch from the bus consumer; waits while an inline batch is in this stage."""
        self._inside += 1
        try:
            while self._inline_busy:
                waiter = asyncio.get_running_loop().create_future()
                self._inline_waiters.append(waiter)
                await waiter
            await self._handle(event)
        finally:
            self._inside -= 1

    def can_take_inline(self, rows: int, topic: str) -> bool:
        """Whether a batch of ``rows`` published on ``topic`` may run here now, called from
        the publisher (no queue hop): it is small, nothing else is in or queued for this
        stage (so it cannot overtake a batch), and this stage is the topic's only subscriber."""
        sub = self.subscription
        bus = self._bus
        if (rows > self.inline_max_rows or self._inside or self._inline_busy or sub is None
                or sub._queue or bus._refuse):
            return False
        subs = bus._routes.get(topic)
        if subs is None or subs is not self._sole_route:
            # no cached route yet (the bus drops them all when a subscription comes or goes),
            # or another one than last checked: look at who subscribes now
            if subs is None:
                subs = bus._route(topic)
            if len(subs) != 1 or subs[0] is not sub:
                return False
            self._sole_route = subs
        return True

    async def take_inline(self, lease: Lease, topic: str) -> None:
        """Run ``lease`` through this stage and on through every next stage that can take it
        inline, in the caller's task (:meth:`take_now`, awaiting what it leaves)."""
        rest = self.take_now(lease, topic)
        if rest is not None:
            await rest

    def take_now(self, lease: Lease, topic: str) -> Any:
        """:meth:`take_inline` as a plain call: None when the chain is done, else the
        awaitable that finishes it (a stage's ``process``, an event to publish, a bus hop,
        a failure to report), which the caller awaits at once. With the bus's accounting
        and error isolation: a failure is the failing stage's, reported on the bus as a
        consumer's would be, not the caller's. The bus event is only built for a failure's
        report: the live path pays a sequence number and two counters per hop, not an object.

        One loop over the stages: each stage's ``process_now`` does a live batch where the
        stage has one, and only what it declines (or an event to publish) leaves the loop
        for :meth:`_finish_inline`. No other task runs while the loop does (it never awaits),
        so a stage it is in needs no busy mark; the clock is read once per hop, the end of
        one stage being the start of the next, and what a hop needs of a runner is one tuple
        (``_hop``, built at start)."""
        runner = self
        bus = self._bus
        routes = bus._routes  # (cleared in place when a subscription comes or goes, never rebound)
        rows = lease.length
        most = StageMetrics.PENDING_MAX
        clock = time.perf_counter_ns
        t0 = clock()
        while True:
            sub, process_now, stream, ctx, out, metrics, pending, writes = runner._hop
            seq = bus._seq = bus._seq + 1
            sub.published += 1
            try:
                done = process_now(lease, stream, ctx)
            except Exception as exc:
                return runner._finish_inline(lease, topic, seq, t0, None, exc)
            if done is not None:
                return runner._finish_inline(lease, topic, seq, t0, done, None)
            if writes and lease.device_cache:
                lease.mark_written(writes, device=getattr(stream, "_cache_tag", None))
            t1 = clock()
            metrics.rows += rows
            pending.append(t1 - t0)
            if len(pending) >= most:
                metrics.fold()
            if out is None:
                sub.delivered += 1
                return None
            nxt = runner.downstream
            # can_take_inline, its common answer inlined: the route last checked unchanged,
            # nothing in or queued for the next stage
            if nxt is None or ((routes.get(out) is not nxt._sole_route or nxt._inside
                                or nxt._inline_busy or nxt.subscription._queue or bus._refuse
                                or rows > nxt.inline_max_rows)
                               and not nxt.can_take_inline(rows, out)):
                return runner._forward(lease, topic, seq, out)
            sub.delivered += 1
            runner, topic, t0 = nxt, out, t1

    async def _finish_inline(self, lease: Lease, topic: str, seq: int, t0: int, done: Any,
                             exc: Exception | None) -> None:
        """The rest of :meth:`take_now` from this stage on, where it must await: the batch
        ``process_now`` declined (``done`` is ``NOT_NOW``), the awaitable it returned, or its
        error ``exc`` (the fallback stream's rerun, else the failure's report)."""
        sub = self.subscription
        rows = lease.length
        stream = self.stream
        self._inline_busy = True  # bus consumers of this stage wait behind it from here
        try:
            try:
                try:
                    if exc is not None:
                        raise exc
                    if done is NOT_NOW:
                        stream.batch_rows = rows
                        await self.stage.process(lease, stream, self.ctx)
                    else:
                        await done
                except Exception as exc2:
                    try:
                        await self._rerun_on_fallback(lease, exc2)
                    except Exception as exc3:
                        raise self._failed(lease, topic, exc3) from exc3
                else:
                    if lease.device_cache and self._write_names:
                        lease.mark_written(self._write_names,
                                           device=getattr(stream, "_cache_tag", None))
                metrics = self.metrics
                metrics.rows += rows
                metrics.pending.append(time.perf_counter_ns() - t0)
                if len(metrics.pending) >= StageMetrics.PENDING_MAX:
                    metrics.fold()
                out = self.output_topic
                nxt = self.downstream
                forward = out is not None and (nxt is None or not nxt.can_take_inline(rows, out))
                if forward:
                    await self._bus.publish(out, lease)
            except Exception as exc4:
                await self._report_inline(sub, lease, topic, seq, exc4)
                return
        finally:
            self._inline_busy = False
            if self._inline_waiters:
                self._wake_waiters()
        sub.delivered += 1
        if out is not None and not forward:
            await nxt.take_inline(lease, out)

    async def _forward(self, lease: Lease, topic: str, seq: int, out: str) -> None:
        """The end of :meth:`take_now` at a stage whose next one cannot take the batch
        inline: through the bus, a failure of the publish being this stage's."""
        sub = self.subscription
        self._inline_busy = True
        try:
            await self._bus.publish(out, lease)
        except Exception as exc:
            await self._report_inline(sub, lease, topic, seq, exc)
            return
        finally:
            self._inline_busy = False
            if self._inline_waiters:
                self._wake_waiters()
        sub.delivered += 1

    async def _report_inline(self, sub: Subscription, lease: Lease, topic: str, seq: int,
                             exc: Exception) -> None:
        """An inline batch failed in this stage: counted and reported as a consumer's failure."""
        sub.errors += 1
        bus = self._bus
        try:
            await bus._handler_failed(sub, Event(topic, lease, seq, topic, None), exc)
        except Exception:  # as in the consumer: reporting must not fail the publisher
            bus._report_errors += 1

    def _wake_waiters(self) -> None:
        """Let the bus consumers that waited behind an inline batch go on."""
        waiters = self._inline_waiters
        while waiters:
            w = waiters.pop()
            if not w.done():
                w.set_result(None)

    async def _handle(self, event: Event) -> None:
        await self._handle_lease(event.payload, event.topic)

    async def _handle_lease(self, lease: Lease, topic: str) -> None:
        """Process one batch from the queue (primary stream, the fallback after a device
        error), measure it, and forward it: inline into an idle next stage, else through
        the bus."""
        t0 = time.perf_counter_ns()
        stream = self.stream
        try:
            stream.batch_rows = lease.length
            try:
                await self.stage.process(lease, stream, self.ctx)
            except Exception as exc:
                await self._rerun_on_fallback(lease, exc)
            else:
                if self._write_names and lease.device_cache:
                    lease.mark_written(self._write_names, device=getattr(stream, "_cache_tag", None))
        except Exception as exc:
            raise self._failed(lease, topic, exc) from exc
        self.metrics.add(lease.length, time.perf_counter_ns() - t0)
        out = self.output_topic
        if out is not None:
            nxt = self.downstream
            if nxt is not None and nxt.can_take_inline(lease.length, out):
                await nxt.take_inline(lease, out)
            else:
                await self.ctx.bus.publish(out, lease)

    def _failed(self, lease: Lease, topic: str, exc: Exception) -> StageError:
        """Count a failed batch; the error to raise, with its context."""
        self.metrics.failures += 1
        self.metrics.failed_rows += lease.length
        return StageError(
            f"stage {self.stage.name!r} failed on batch {lease.seq} ({lease.length} rows, "
            f"topic {topic!r}, stream {self.stream.name}): {type(exc).__name__}: {exc}",
            stage=self.stage.name, topic=topic, batch=lease.seq, rows=lease.length,
            stream=self.stream.name,
        )

    async def _process(self, lease: Lease) -> None:
        """One batch on the primary stream, on the fallback after a device error (what
        ``_handle_lease`` does, without measuring or forwarding: the profiling scripts')."""
        try:
            await self._process_on(lease, self.stream)
        except Exception as exc:
            await self._rerun_on_fallback(lease, exc)

    async def _rerun_on_fallback(self, lease: Lease, exc: Exception) -> None:
        """The primary stream failed with ``exc``: rerun on the fallback stream, or re-raise."""
        # Our own errors (bad data, bad configuration) fail the same way on any device:
        # only other failures (device errors, out of memory) are worth a rerun.
        fallback = None if isinstance(exc, PipelineError) else self.fallback_stream
        if fallback is None:
            raise exc
        self.metrics.fallbacks += 1
        log.warning(
            "stage_fallback",
            stage=self.stage.name,
            stream=self.stream.name,
            fallback=fallback.name,
            batch=lease.seq,
            rows=lease.length,
            error=f"{type(exc).__name__}: {exc}",
        )
        if not self._fallback_bound:
            await self.stage.bind(fallback)
            self._fallback_bound = True
        await self._process_on(lease, fallback)

    async def _process_on(self, lease: Lease, stream: ComputeStream) -> None:
        stream.batch_rows = lease.length
        await self.stage.process(lease, stream, self.ctx)
        if self._write_names:
            lease.mark_written(self._write_names, device=getattr(stream, "_cache_tag", None))

    async def finish(self) -> None:
        await self.stage.finish(self.ctx)

    def close(self) -> None:
        # the streams first: their workers joined, no call of the stage is still running
        # when it closes (the inference stage hands its runners on: model.shelf)
        try:
            self.stream.close()
            if self._fallback is not None:
                self._fallback.close()
        finally:
            self.stage.close()

    def stats(self) -> dict[str, Any]:
        """The runner's counters (which win) and the stage's own; a stage key that would
        overwrite one of the runner's is kept as ``stage.<key>`` instead."""
        own = self._runner_stats()
        extra = self.stage.stats()
        return {**own, **{(f"stage.{k}" if k in own else k): v for k, v in extra.items()}}

    def _runner_stats(self) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "stream": self.stream.name,
            "fallback": self.selection.fallback,
            "skipped_streams": [f"{n}: {r}" for n, r in self.selection.skipped],
            "offloaded_calls": getattr(self.stream, "offloaded", 0),
            **self.metrics.summary(),
        }


def slab_addresses(cache: dict, lease, layout: Sequence[tuple]):
    """The address table (:func:`~nautilus_pipeline.kernels.addresses.column_addresses`) of
    the lease's slab's columns ``layout``, cached per slab: keyed by the slab itself, which
    so stays alive (and its memory with it) as long as the table, and which a slab of
    another pool under the same index is not."""
    table = cache.get(lease.slab)
    if table is None:
        from .kernels.addresses import column_addresses

        table = cache[lease.slab] = column_addresses(lease.slab.columns, layout)
    return table


def upstream_column(upstream: Sequence[Stage], name: str) -> ColumnSpec | None:
    """The spec of column ``name`` as the last of ``upstream`` that writes it declared it,
    or None. Stages agree on columns (name, dtype, labels), never on each other's classes."""
    for stage in reversed(upstream):
        for spec in stage.writes:
            if spec.name == name:
                return spec
    return None
