"""A pipeline: stages wired in order over the bus, one buffer pool, an ingress, a shutdown.

Wiring. Batches enter on ``pipeline.<name>.ticks``; stage *i* subscribes to the output
topic of stage *i−1* and publishes the same lease on ``pipeline.<name>.<stage>``; the
last stage is the sink, after which the bus releases the lease back to the pool. Each
stage's subscription is bounded and blocking, so a slow stage slows its upstream instead of
queueing without limit; the pool's fixed number of slabs bounds everything in flight.

Ingress. Sources that already produce batches (the replay) fill slabs themselves and hand
leases to :meth:`Pipeline.publish_batch`. A live feed publishing one tick at a time goes
through the micro-batcher: ticks accumulate in a lease until the producer gives the loop
back (the end of the current burst: the batcher task, woken by the first tick, runs only
then), ``batch_size`` rows, or ``max_delay_us`` after the first row, whichever comes first.
A tick published into an idle pipeline so goes out at once. The first version waited for
a loop timer instead: loop timers run on a 1 ms grid, so every deadline from 500 to
2,000 µs became ~1.1 ms of latency (issue 9's measurements); ``max_delay_us`` is now only
the upper bound for a producer that publishes a long burst without yielding. A flushed
micro-batch of at most ``INLINE_CHAIN_MAX_ROWS`` rows goes into an idle first stage
without a queue hop, and on from stage to stage the same way (the inline hand-off, see
:mod:`nautilus_pipeline.stage`): a tick into an idle pipeline with ``batch_size=1`` is
through the whole chain when ``publish_tick`` returns (handed to the first stage's
``take_now`` directly: a plain call, no coroutine but ``publish_tick``'s own where no stage
awaits; the row written through memoryviews of the slab's tick columns). A batch that is
full at once does not wake the batcher task at all.

Execution. Each stage consumes its own bounded queue in its own task, so batch k+1 can be
in stage i while batch k is in stage i+1. With ``execution="concurrent"`` (the default) a
CPU stage runs the kernels of a large batch on its stream's worker thread (numpy, BLAS and
the numba kernels release the GIL), so stages run side by side on several cores while the
loop only routes leases; small batches stay inline (see ``OFFLOAD_MIN_ROWS`` in
:mod:`nautilus_pipeline.stage`), and so do the replay batches of the stages whose batch
costs about a hop (features, VPIN, the recorder: ``LIGHT_OFFLOAD_MIN_ROWS``, 65,536 rows),
which leaves the cores to the heavy stages. ``execution="serial"`` runs everything on the
loop thread, one kernel at a time: the same numbers, bit for bit (each stage still sees its
batches one at a time, in order), which the tests check.

Cores (``cores``, :class:`~nautilus_pipeline.stage.CoreBudget`). A worker thread pays only
where it has a core to run on: the loop's thread keeps one, each heavy CPU stage (``offload``
below ``LIGHT_OFFLOAD_MIN_ROWS``: inference, risk, a stage of yours) takes one for its
worker in chain order, then inference's second lane takes one; a heavy stage that finds
none left runs its replay batches on the loop, as the light stages do. ``cores = 0`` (the
default) is every core the process may run on (``machine.usable_cores``): on a 2-core host
inference gets the one worker, risk and the others run on the loop, and the second lane
waits for a third core; on 16 cores every heavy stage and the lane have theirs, as before
the budget. ``Pipeline.stats()["cores"]`` says what took them. A stage that never calls its
stream declares ``offload = False`` (the signal stage), so that it takes no core. Measured
on the 2-core dev VM (10M trades 1.41M → 1.78-1.99M ticks/s, 1.60 → 1.75-1.80 cores over
the run) with its table in :mod:`nautilus_pipeline.stage` ("Worker threads and cores").

The GIL bounds what threads give. A worker that leaves a GIL-free kernel waits for the GIL
while the loop thread runs Python (reading, routing), up to the interpreter's switch
interval (5 ms by default), so a concurrent pipeline lowers it to ``GIL_SWITCH_S`` while it
runs and the last one to close restores it, as it does the BLAS threads. ``scripts/bench_pipeline.py
--switch-interval`` on the lent H200 host (16 cores, 2M generated trades through
``default.toml``, two runs): serial 617K / 726K ticks/s, concurrent 737K / 765K,
concurrent with 500 µs 816K, with 100 µs 842K ticks/s; cores busy 1.6 → 1.8. Threads so
gain 10–30 % over serial, not a core per stage: the stages' Python, the reader and the
bus share one interpreter. Scaling past that is the job of several processes (one per
symbol group or file range), not of more threads.

Shutdown, in order: the ingress stops (a partial batch is flushed), in-flight batches
drain (the pool becomes idle), each stage's ``finish`` runs in pipeline order (emitting
end-of-stream results), the bus drains and closes, streams close, and the pool reports
leaked leases. Nothing is left running. Ownership is one ``contextlib.AsyncExitStack`` per
pipeline (structured concurrency): ``start`` enters the process-wide settings (BLAS threads,
GIL switch interval), the stages' streams and worker threads, the bus with its consumer
tasks (or, on a shared bus, the pipeline's subscriptions) and the batcher task, in that
order; ``close`` runs the drain and the stages' ``finish``, then unwinds the stack in
reverse, and a ``start`` that fails unwinds exactly what it had entered.

BLAS threads. While it runs, a pipeline limits BLAS (OpenBLAS/MKL) to ``blas_threads``
threads for the whole process (default 1, through threadpoolctl; ``None`` leaves them
alone, as an app with its own BLAS-heavy work may prefer). ``scripts/bench_blas_threads.py``
on the 2-core dev VM, the default model on 4096 rows: idle, two threads take 1.06 ms and
one 1.42 ms; beside another process doing matrix products, two threads take 24 ms and one
still 1.44 ms. Robust beats 25 % on an idle box.

Accounting: ``ticks_in`` = rows published into the pipeline = rows that reached the sink
+ rows of batches that a stage failed on (logged with context, sent to the dead-letter
topic) + rows discarded by a close without draining (a cancelled owner, a fail-fast stop)
+ rows still in flight. ``stats()["ticks"]`` holds the identity; the replay adds rejected/quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog

from . import topics
from .bus import EventBus
from .compute.registry import first_usable
from .errors import ConfigError, PipelineError
from .events import KIND_QUOTE, KIND_TRADE, TICK_COLUMN_NAMES, TICK_COLUMNS, QuoteTick, TradeTick
from .memory import BufferPool, Lease, Slab, auto_memory
from .stage import CoreBudget, Stage, StageContext, StageRunner
from .symbols import SymbolTable

log = structlog.get_logger("nautilus_pipeline.pipeline")

_TICK_WRITES = ("ts_ns", "ts_recv_ns", "symbol_id", "kind", "price", "size", "side", "trade_id",
                "bid", "ask", "bid_size", "ask_size")
_NAN = float("nan")

GIL_SWITCH_S = 0.0005
"""The GIL switch interval while a concurrent pipeline runs (see the module docstring)."""


def _write_tick(cols: tuple, i: int, tick: TradeTick | QuoteTick, symbol_id: int) -> None:
    """Row ``i`` of the tick columns ``cols`` (``_TICK_WRITES`` order) from ``tick``."""
    ts, recv, sym, kind, price, size, side, tid, bid, ask, bid_size, ask_size = cols
    ts[i] = tick.ts_ns
    recv[i] = tick.ts_recv_ns
    sym[i] = symbol_id
    if isinstance(tick, TradeTick):
        kind[i] = KIND_TRADE
        price[i] = tick.price
        size[i] = tick.size
        side[i] = tick.side
        tid[i] = tick.trade_id
        bid[i] = ask[i] = bid_size[i] = ask_size[i] = _NAN
    else:
        kind[i] = KIND_QUOTE
        price[i] = size[i] = _NAN
        side[i] = 0
        tid[i] = -1
        bid[i] = tick.bid
        ask[i] = tick.ask
        bid_size[i] = tick.bid_size
        ask_size[i] = tick.ask_size


class _SwitchInterval:
    """The process-wide GIL switch interval, lowered while *any* concurrent pipeline runs and
    restored when the last one closes (two pipelines in one process must not undo each other)."""

    _lock = threading.Lock()
    _holders = 0
    _saved: float | None = None

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._holders == 0 and sys.getswitchinterval() > GIL_SWITCH_S:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(GIL_SWITCH_S)
            cls._holders += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and cls._saved is not None:
                sys.setswitchinterval(cls._saved)
                cls._saved = None


@dataclasses.dataclass(frozen=True)
class TickFlow:
    """Where the ticks published into a pipeline are (``Pipeline.tick_flow()``):
    ``ticks_in = ticks_out + ticks_failed + ticks_discarded + in_flight``.

    - ``ticks_in``: rows published into the first stage;
    - ``ticks_not_delivered``: rows a publish was interrupted on (not in ``ticks_in``);
    - ``ticks_out``: rows that passed the last stage;
    - ``ticks_failed``: rows of batches a stage failed on (dead-lettered, logged);
    - ``ticks_discarded``: rows dropped by a close without draining (counted, not lost);
    - ``in_flight``: rows still inside the pipeline (0 after a drain).
    """

    ticks_in: int
    ticks_not_delivered: int
    ticks_out: int
    ticks_failed: int
    ticks_discarded: int
    in_flight: int


class Pipeline:
    """Stages in order over an event bus, with a pool sized for ``batch_size`` rows."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        name: str = "default",
        batch_size: int = 4096,
        slabs: int = 8,
        memory: str = "auto",
        max_delay_us: float = 1000.0,
        queue_size: int = 4,
        on_error: str = "isolate",
        bus: EventBus | None = None,
        symbols: SymbolTable | None = None,
        blas_threads: int | None = 1,
        execution: str = "concurrent",
        cores: int = 0,
    ):
        if not stages:
            raise ConfigError(f"pipeline {name!r} has no stages")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"pipeline {name!r}: stage names must be unique, got {names}")
        if batch_size < 1:
            raise ConfigError(f"pipeline {name!r}: batch_size must be >= 1, got {batch_size}")
        if execution not in ("concurrent", "serial"):
            raise ConfigError(
                f"pipeline {name!r}: execution must be 'concurrent' or 'serial', got {execution!r}"
            )
        if not (isinstance(cores, int) and cores >= 0):
            raise ConfigError(f"pipeline {name!r}: cores must be an int >= 0 (0 = every core this "
                              f"process may use), got {cores!r}")
        if not max_delay_us >= 0:
            raise ConfigError(f"pipeline {name!r}: max_delay_us must be >= 0, got {max_delay_us}")
        self.execution = execution
        self.cores = cores
        self.name = name
        self.stages = list(stages)
        self.batch_size = batch_size
        self.max_delay_s = max_delay_us / 1e6
        self.queue_size = queue_size
        self.blas_threads = blas_threads
        self._stack: contextlib.AsyncExitStack | None = None
        self._drain_bus = True
        self.symbols = symbols if symbols is not None else SymbolTable()
        self._own_bus = bus is None
        self.bus = bus or EventBus(on_error=on_error, name=f"bus:{name}")
        self._check_columns()
        outputs = [c for s in self.stages for c in s.writes]
        if memory == "auto":
            memory = auto_memory(first_usable(s.streams) for s in self.stages)
        self.pool = BufferPool.with_outputs(
            outputs, capacity=batch_size, slabs=slabs, memory=memory, name=f"pool:{name}"
        )
        self.ingress_topic = topics.ingress(name)
        self.ctx = StageContext(bus=self.bus, pipeline=name, symbols=self.symbols)
        self.runners: list[StageRunner] = []
        self._first: StageRunner | None = None
        self.ticks_in = 0
        self.ticks_not_delivered = 0
        self.ticks_discarded = 0
        self._pending: Lease | None = None
        self._pending_deadline = 0.0
        self._tick_cols: dict[Slab, tuple[tuple, tuple]] = {}  # per slab: memoryviews, arrays
        self._armed = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._stats_sub: Any = None
        self._started = False
        self._closed = False
        self.leaked: list[Lease] = []
        self._ingest_gate: Any = None

    def _check_columns(self) -> None:
        available = set(TICK_COLUMN_NAMES)
        for stage in self.stages:
            missing = [c for c in stage.reads if c not in available]
            if missing:
                raise ConfigError(
                    f"pipeline {self.name!r}: stage {stage.name!r} reads {missing}, which neither "
                    f"the ticks nor an earlier stage provide (available: {sorted(available)})"
                )
            clash = [c.name for c in stage.writes if c.name in available]
            if clash:
                raise ConfigError(
                    f"pipeline {self.name!r}: stage {stage.name!r} writes {clash}, which already "
                    "exist; give its outputs their own names"
                )
            available.update(c.name for c in stage.writes)
        for i, stage in enumerate(self.stages):
            stage.connect(self.stages[:i])

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close(drain=exc_type is None)

    async def start(self) -> None:
        """Start the bus (if owned) and every stage; a failure unwinds what was started."""
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            try:
                await self.close(drain=False)
            except Exception as exc:  # the start failure is the one to report
                log.warning("pipeline_unwind_failed", pipeline=self.name,
                            error=f"{type(exc).__name__}: {exc}")
            raise

    async def _start(self) -> None:
        # Everything the pipeline starts is entered on one exit stack, in an order whose
        # reverse is the shutdown's: the batcher, then the bus (its consumer tasks drain the
        # queued batches), then the stages' streams and worker threads, then the process-wide
        # settings. A failure here unwinds exactly what was entered.
        stack = self._stack = contextlib.AsyncExitStack()
        if self.blas_threads is not None:
            from threadpoolctl import threadpool_limits

            stack.callback(threadpool_limits(self.blas_threads, user_api="blas").restore_original_limits)
        if self.execution == "concurrent":
            _SwitchInterval.acquire()
            stack.callback(_SwitchInterval.release)
        stack.callback(self._close_runners)
        if self._own_bus:
            await self.bus.__aenter__()
            stack.push_async_callback(self._close_bus)
        else:
            stack.push_async_callback(self._leave_bus)
        stack.push_async_callback(self._stop_batcher)
        warm = self._warm_columns()
        topic = self.ingress_topic
        self.ctx.cores = CoreBudget(self.cores_in_use() - 1) if self.execution == "concurrent" else None
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            out = None if last else topics.stage_output(self.name, stage.name)
            runner = StageRunner(
                stage, input_topic=topic, output_topic=out, ctx=self.ctx,
                queue_size=self.queue_size, serial=self.execution == "serial",
            )
            if self.runners:
                self.runners[-1].downstream = runner
            self.runners.append(runner)  # closed by the stack even if its start fails
            self._first = self.runners[0]
            await runner.start(warm)
            topic = out
        self._stats_sub = self.bus.respond(topics.stats(self.name), lambda event: self.stats())
        log.info(
            "pipeline_started",
            pipeline=self.name,
            stages=[f"{r.stage.name}@{r.stream.name}" for r in self.runners],
            cores=self.cores_in_use(),
            worker_cores=self.ctx.cores.taken if self.ctx.cores is not None else [],
            batch_size=self.batch_size,
            pool_memory=self.pool.memory,
        )

    def cores_in_use(self) -> int:
        """The cores the stages may keep busy, the loop thread's included (``cores``, or
        every core this process may run on)."""
        from .machine import usable_cores

        return self.cores or usable_cores()

    def _warm_columns(self) -> dict[str, np.ndarray]:
        """A one-row scratch slab of the pool's columns (the same array types as the pool's
        slabs), row 0 a trade: what the stages warm their live kernels on at start."""
        cols = Slab(0, self.pool.specs, 1, "host").columns
        cols["kind"][0] = KIND_TRADE
        cols["ts_ns"][0] = cols["ts_recv_ns"][0] = 1
        cols["symbol_id"][0] = 0
        cols["price"][0] = 100.0
        cols["size"][0] = 1.0
        cols["side"][0] = 1
        return cols

    async def close(self, drain: bool = True) -> None:
        """Stop the ingress, drain in-flight batches, finish stages, close bus and streams."""
        if self._closed:
            return
        self._closed = True
        finish_error: BaseException | None = None
        try:
            await self._stop_batcher()
            if drain and self.bus.failure is None:
                await self.flush()
                await self._wait_idle()
                # Every stage gets to finish (write its outputs) and the bus is closed even
                # when one stage's finish fails (a recorder on a full disk): the first error is
                # raised once everything is shut down, the others are logged.
                for runner in self.runners:
                    try:
                        await runner.finish()
                    except Exception as exc:
                        log.error("stage_finish_failed", pipeline=self.name, stage=runner.stage.name,
                                  error=f"{type(exc).__name__}: {exc}")
                        finish_error = finish_error or exc
            elif self._pending is not None:
                self._pending.release("ingress")
                self._pending = None
        finally:
            self._drain_bus = drain and self.bus.failure is None
            try:
                if self._stack is not None:
                    await self._stack.aclose()  # bus, streams, BLAS and GIL settings
            finally:
                self.leaked = self.pool.close()
                if not drain or self.bus.failure is not None:
                    # batches cancelled in a stage or dropped from its queue: counted, not "in flight"
                    sink_rows = self.runners[-1].metrics.rows if self.runners else 0
                    failed = sum(r.metrics.failed_rows for r in self.runners)
                    self.ticks_discarded = self.ticks_in - sink_rows - failed
                log.info("pipeline_closed", pipeline=self.name, **dataclasses.asdict(self.tick_flow()))
        if self._own_bus and self.bus.failure is not None:
            raise self.bus.failure
        if finish_error is not None:
            raise finish_error

    async def _stop_batcher(self) -> None:
        if self._flusher is not None:
            # Cancelling is safe: a flush in progress is finished before the task ends.
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None

    async def _close_bus(self) -> None:
        await self.bus.close(drain=self._drain_bus)

    async def _leave_bus(self) -> None:
        """A shared bus outlives the pipeline: take our subscriptions (and their consumer
        tasks) off it."""
        if self.bus.closed:
            return
        subs = [r.subscription for r in self.runners if r.subscription is not None]
        for sub in [*subs, self._stats_sub]:
            if sub is not None:
                await self.bus.unsubscribe(sub, drain=self._drain_bus)

    def _close_runners(self) -> None:
        for runner in self.runners:
            runner.close()

    async def _wait_idle(self) -> None:
        idle = asyncio.ensure_future(self.pool.wait_idle())
        closed = asyncio.ensure_future(self.bus.wait_closed())
        try:
            await asyncio.wait({idle, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (idle, closed):
                f.cancel()
            await asyncio.gather(idle, closed, return_exceptions=True)

    async def drain(self) -> None:
        """Flush the micro-batcher and wait until every batch published so far is done."""
        await self.flush()
        await self._wait_idle()

    # --- ingress -----------------------------------------------------------------------
    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise PipelineError(
                f"pipeline {self.name!r} is not running: use 'async with pipeline:' first"
            )

    async def acquire(self, holder: str = "source", timeout: float | None = None) -> Lease:
        """A free slab for a source to fill (waits while all slabs are in flight)."""
        return await self.pool.acquire(holder, timeout=timeout)

    async def publish_batch(self, lease: Lease, holder: str = "source") -> None:
        """Send a filled lease into the first stage and drop the source's reference."""
        self._check_running()
        await self._send(lease, holder)

    async def _send(self, lease: Lease, holder: str, inline: bool = False) -> None:
        """Hand ``lease`` to the first stage: through its queue, or with ``inline`` (the
        micro-batcher's flushes) in this task when it is small and the stage idle (see
        :mod:`nautilus_pipeline.stage`). Sources of whole batches keep the queue, so that
        ``publish_batch``/``ingest`` return once a batch is queued."""
        rows = lease.length
        counted = False
        try:
            if rows:
                first = self.runners[0] if inline and self.runners else None
                if first is not None and first.can_take_inline(rows, self.ingress_topic):
                    self.ticks_in += rows  # in the pipeline from here on, as a queued batch is
                    counted = True
                    await first.take_inline(lease, self.ingress_topic)
                else:
                    await self.bus.publish(self.ingress_topic, lease)
                    self.ticks_in += rows
        except BaseException:
            if rows and not counted:
                self.ticks_not_delivered += rows
                log.warning("batch_not_delivered", pipeline=self.name, batch=lease.seq, rows=rows,
                            holder=holder)
            raise
        finally:
            lease.release(holder)

    async def ingest(self, columns: Any, *, symbol: str | None = None, policy: str = "fail",
                     quarantine: str | None = None, order_by: str = "ts_ns") -> int:
        """Copy ticks into slabs and publish them: a struct of arrays (tick column name → array)
        or a pandas, polars or pyarrow table with those column names.

        Missing columns take their defaults (``side`` 0, ``trade_id`` −1, NaN quotes).
        ``symbol`` names the instrument of every row (its ``symbol_id`` from the pipeline's
        symbol table); without it, ``symbol_id`` must be given or defaults to 0. The rows go
        through the readers' checks (``io/frames.py``) under ``policy`` (``fail`` raises a
        ``DataError`` naming the row; ``reject``/``quarantine`` drop and count them in
        ``ingest_accounting``). ``order_by`` is the clock the time-order check runs on
        (``ts_recv_ns`` for a live feed whose quotes carry no exchange time, as the capture
        readers replay). Returns the number of rows published.
        """
        self._check_running()
        sid = None if symbol is None else self.symbols.id_of(symbol)
        if self._ingest_gate is None:
            from .io.frames import IngestGate

            self._ingest_gate = IngestGate(self.symbols)
        columns = self._ingest_gate.admit(columns, symbol_id=sid, policy=policy, quarantine=quarantine,
                                          order_by=order_by)
        await self.flush()
        n = len(columns["ts_ns"])
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            lease = await self.pool.acquire("ingress")
            lease.length = stop - start
            for spec in TICK_COLUMNS:
                col = lease[spec.name]
                if spec.name in columns:
                    col[...] = columns[spec.name][start:stop]
                else:
                    col.fill(spec.fill)
            await self._send(lease, "ingress")
        return n

    async def publish_tick(self, tick: TradeTick | QuoteTick) -> None:
        """Add one tick to the current micro-batch (sent at ``batch_size`` or ``max_delay_us``)."""
        if not self._started or self._closed:
            self._check_running()
        lease = self._pending
        first = lease is None
        if first:
            lease = self.pool.acquire_nowait("ingress")  # (a Lease of 0 rows is falsy)
            if lease is None:
                lease = await self.pool.acquire("ingress")
            self._pending = lease
            if lease.slab.capacity > 1:  # a one-row batch is full at once: no deadline
                self._pending_deadline = time.monotonic() + self.max_delay_s
        i = lease.length
        views = self._tick_cols.get(lease.slab)
        if views is None:
            views = self._tick_views(lease.slab)
        sid = self.symbols.id_of(tick.symbol)
        try:
            _write_tick(views[0], i, tick, sid)
        except (TypeError, ValueError):  # a value a memoryview refuses (a float time): numpy's casts
            _write_tick(views[1], i, tick, sid)
        i += 1
        lease.length = i
        if i >= lease.slab.capacity:
            self._pending = None
            runner = self._first
            if runner is not None and runner.can_take_inline(i, self.ingress_topic):
                # _send's inline hand-off without its coroutines (a live tick's common case:
                # take_now leaves nothing to await)
                self.ticks_in += i
                try:
                    rest = runner.take_now(lease, self.ingress_topic)
                    if rest is not None:
                        await rest
                finally:
                    lease.release("ingress")
            else:
                await self._send(lease, "ingress", inline=True)
        elif time.monotonic() >= self._pending_deadline:
            await self.flush()
        elif first:
            # the batcher flushes it when this burst gives the loop back; a batch that is
            # already full (batch_size=1) went out above without waking it
            self._arm_flusher()

    def _tick_views(self, slab: Slab) -> tuple[tuple, tuple]:
        """The slab's tick columns as memoryviews and as arrays, in ``_TICK_WRITES`` order,
        cached per slab: a memoryview takes a Python scalar in about half the time numpy's
        ``__setitem__`` does (a row of 12 writes: ~190 against ~350 ns, AMD EPYC VM)."""
        arrays = tuple(slab.columns[name] for name in _TICK_WRITES)
        views = self._tick_cols[slab] = (tuple(memoryview(a) for a in arrays), arrays)
        return views

    async def flush(self) -> None:
        """Publish the partial micro-batch now."""
        lease = self._pending
        if lease is None:
            return
        self._pending = None
        await self._send(lease, "ingress", inline=True)

    def _arm_flusher(self) -> None:
        """Make sure the deadline task runs and knows a new micro-batch has started."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_at_deadlines(), name=f"{self.name}:batcher"
            )
        self._armed.set()

    async def _flush_at_deadlines(self) -> None:
        """Publish each micro-batch as soon as the producer gives the loop back.

        One long-lived task, owned by the pipeline (cancelled at close), woken by the first
        tick of each micro-batch: it runs when the producer's burst ends, so it flushes
        whatever the burst added. Each pending batch is flushed even when the previous
        flush is held up by backpressure, and a flush that has started is completed even
        if the task is cancelled meanwhile, so closing never drops a batch on its way.
        """
        while True:
            await self._armed.wait()
            self._armed.clear()
            while self._pending is not None:
                inflight = asyncio.ensure_future(self.flush())
                try:
                    await asyncio.shield(inflight)
                except asyncio.CancelledError:
                    await inflight
                    raise

    # --- introspection -----------------------------------------------------------------
    @property
    def ingest_accounting(self) -> Any:
        """Rows given to :meth:`ingest`: read = delivered + rejected + quarantined (None before any)."""
        return None if self._ingest_gate is None else self._ingest_gate.accounting

    def tick_flow(self) -> TickFlow:
        """The tick accounting now (see :class:`TickFlow`)."""
        sink_rows = self.runners[-1].metrics.rows if self.runners else 0
        failed = sum(r.metrics.failed_rows for r in self.runners)
        return TickFlow(self.ticks_in, self.ticks_not_delivered, sink_rows, failed, self.ticks_discarded,
                        self.ticks_in - sink_rows - failed - self.ticks_discarded)

    def stats(self) -> dict[str, Any]:
        """Everything a run reports, as plain data (JSON-ready): the tick flow, each stage's
        runner counters and latency, the pool, leaked leases."""
        return {
            "pipeline": self.name,
            "ticks": dataclasses.asdict(self.tick_flow()),
            "stages": [r.stats() for r in self.runners],
            "cores": {"in_use": self.cores_in_use(),
                      "workers": list(self.ctx.cores.taken) if self.ctx.cores is not None else []},
            "pool": dataclasses.asdict(self.pool.stats()),
            "leaked_leases": [repr(lease) for lease in self.leaked],
        }

    # --- snapshots (see nautilus_pipeline.snapshot) ------------------------------------
    def _check_boundary(self, what: str) -> None:
        from .snapshot import SnapshotError

        if not self._started or self._closed:
            raise SnapshotError(f"pipeline {self.name!r}: {what} needs a running pipeline "
                                "(inside 'async with pipeline:', before it closes)")
        flow = self.tick_flow()
        if self._pending is not None or flow.in_flight:
            raise SnapshotError(f"pipeline {self.name!r}: {what} at a batch boundary only: "
                                f"{flow.in_flight} rows in flight; 'await pipeline.drain()' first")

    def _layout(self) -> list[list[str]]:
        return [[s.name, f"{type(s).__module__}:{type(s).__qualname__}"] for s in self.stages]

    def snapshot(self) -> bytes:
        """Every stage's state and the symbol table, at a batch boundary (after ``drain()``):
        a new pipeline of the same definition resumes from it with :meth:`restore` and gives
        the outputs the uninterrupted run would have given."""
        from .snapshot import encode, fingerprint

        self._check_boundary("snapshot")
        stages = {s.name: np.frombuffer(s.snapshot(), dtype=np.uint8) for s in self.stages}
        return encode("pipeline", fingerprint(self._layout()),
                      {"symbols": self.symbols.names, "stages": stages},
                      pipeline=self.name, layout=self._layout())

    def restore(self, data: bytes) -> None:
        """Restore a :meth:`snapshot` of a pipeline of the same definition, after ``start`` and
        before the first batch. A snapshot of another definition, version or parameters is a
        :class:`~nautilus_pipeline.snapshot.SnapshotError` naming what differs."""
        from .snapshot import SnapshotError, decode

        self._check_boundary("restore")
        head = decode(data, kind="pipeline", what=f"pipeline {self.name!r}")
        layout = head.meta.get("layout")
        if layout != self._layout():
            theirs = [n for n, _ in layout or []]
            raise SnapshotError(
                f"pipeline {self.name!r}: the snapshot is of another pipeline definition "
                f"({head.meta.get('pipeline')!r}, stages {theirs}; this one "
                f"{[s.name for s in self.stages]}, or other stage types)")
        mine, theirs = self.symbols.names, list(head.state["symbols"])
        common = min(len(mine), len(theirs))
        if mine[:common] != theirs[:common]:
            raise SnapshotError(
                f"pipeline {self.name!r}: symbol ids differ (here {mine}, in the snapshot {theirs}); "
                "restore before any tick of another symbol is read")
        for name in theirs[common:]:
            self.symbols.id_of(name)
        for stage in self.stages:
            stage.restore(head.state["stages"][stage.name].tobytes())

    def end_segment(self) -> None:
        """After a :meth:`snapshot` whose stream goes on in another pipeline: the stages drop
        what closing would emit early (the open VPIN bar, the trace's last-row mark)."""
        for stage in self.stages:
            stage.end_segment()

