"""Ingress: a durable JetStream pull consumer feeding tick batches into a pipeline.

Flow control is the pool's: the consumer holds no more messages than the pool has free
slabs plus ``read_ahead`` (default: as many as the pool has slabs), so JetStream keeps what
the pipeline cannot hold yet, and ``max_ack_pending`` bounds what is delivered but not yet
acknowledged. A pull consumer rather than a push one for exactly that reason: the pipeline
asks when it has room, instead of a server pushing into a client-side buffer. The pull
request stays open across reads (:class:`~.pull.PullFeed`): a message is fed as soon as it
arrives, with no request, task or timer per read (the one-tick hop of
``scripts/bench_bridge.py``).

Read-ahead and acknowledgements in groups. Asked for exactly its free slabs, the consumer
made one pull request per message (241 for 244), each freed slab a round trip away from its
next batch, and nats-server woke up for every request and every ack.
``python scripts/profile_bridge.py`` (default pipeline, stream filled before, 2M ticks,
2-core dev VM loaded by other jobs, two runs, medians of 5 alternating; CPU per 4096-tick
message; ``docs/measurements/dev_profile_bridge_c96e753.txt``):

    ===============================  ===============  ================  ===========================
    flow                             a slab free and  nats-server CPU   this process (the pipeline
                                     nothing to fill                    included; in-process 4,181-4,292)
    ===============================  ===============  ================  ===========================
    free slabs only (b22cc61)        30-32 % of time  389-430 µs        4,760-5,064 µs
    read_ahead = slabs               4-5 %            328-369 µs        4,629-4,848 µs
    + ack_every = 4 (the defaults)   3-4 %            287 µs            4,551-4,667 µs
    ===============================  ===============  ================  ===========================

Throughput moved within the noise of the loaded VM (ratios to in-process 0.82-0.96 for
every flow); what these save is CPU that the stages share two cores with. Decoding a
message costs ~11 µs, its copy into a slab ~18 µs, its ack ~2 µs (same script). The
messages read ahead (≤ 8 x a message's size: ~0.8 MB of trades at 4096 ticks a message, ~3.3
MB at the publisher's default of 16384) are plain bytes; a slab is filled from one when it is
free (one copy, from the message's buffer into the slab).
Acks go out ``ack_every`` at a time, and all at once whenever the consumer is about to wait
for messages, so a slow or live stream is acknowledged as promptly as before.

Where a bridged run's extra CPU goes (``python scripts/profile_bridge_threads.py``: this
process's threads read by the scheduler, ns; 1M ticks in 16384-tick messages filled before,
alternating with in-process ``ingest``; 2-core dev VM, load 1.4-2.1;
``docs/measurements/dev_profile_bridge_threads_cb7a05a.txt``), µs per 4096 ticks:

    =========================  ==============  ===================  ===========
    pipeline, fed by            main thread     the stages' workers  nats-server
    =========================  ==============  ===================  ===========
    one stage doing nothing:
      in-process ``ingest``     82              0                    0
      bridge                    98-108          0                    104-114
    default:
      in-process ``ingest``     649-652         2,792-2,946          0
      bridge                    684-708         2,872-2,910          143-162
    =========================  ==============  ===================  ===========

The bridge's own code (read, parse, decode, fill, ack) costs the loop about what
``ingest``'s checks and copy do (+16-26 µs). What the default pipeline adds beyond that
(up to ~100 µs) is in the stages' own work, on the loop and on the workers, which no bridge
code runs: presumably the transport's copies and nats-server's threads sharing the two cores
and their caches with it. nats-server's CPU (~4 % of the pipeline's) is the largest single
part. Run to run, these move by as much as the differences.

Cumulative acks (``cumulative``: the consumer's policy is ``AckPolicy.ALL``): one ack, of the
newest message of the longest run of finished ones from the oldest still open, acknowledges
the whole run; a message still in a stage holds back the acks of those after it. Measured
against explicit acks 4 at a time (``scripts/bench_bridge.py --only bridge-cpu``, the bridge
into a pipeline that does nothing, loaded dev VM): 141 -> 132 µs of this process's CPU and
154 -> 164 µs of the server's per 4096-tick message, within the noise; so an option
(``NatsBridge(ack_policy="all")``), not the default. Larger messages are what cut both
(:mod:`~.publisher`).

Time order. The rows of a stream were checked where they were read (the file readers'
checks under ``publish``, the websocket source's under ``publish --ws``), but not their order
across messages: two feed handlers of one symbol, or one re-sending old rows after the
duplicate window, interleave in the stream. So the ingress drops the rows of a symbol that
go back in time on the clock their batch names (``order_by`` in the header: ``ts_ns``, or
``ts_recv_ns`` for a live feed), counts them (``rejected_out_of_order``) and logs them: the
policy ``reject`` of ``run --ws`` (``Pipeline.ingest(order_by=...)``), since a live consumer
must not stop on them and a message that stopped it would come back at every restart. Equal
times are in order. The rest of the ingest checks (prices, sizes, ids) ran at the
publisher; repeating them here cost ~450 µs per 4096-tick message (``IngestGate.admit``,
loaded dev VM), the order check a comparison of neighbours. The latest time per symbol is
not part of the stored state: after a restart the first message sets it again.

A message is acknowledged only when the last stage has released the lease of each batch it
became (``Lease.on_release``); a message larger than ``batch_size`` rows becomes several
batches and is acknowledged after the last of them. With a state store
(:mod:`~nautilus_pipeline.bridge.state`) the acknowledgement also waits until a stored
snapshot covers the message: a crash then redelivers exactly what the restored state has
not seen. A redelivered message already covered by the restored state is acknowledged and
dropped (``dropped_covered``); one redelivered while still in the pipeline or waiting for
its snapshot (a batch slower than ``ack_wait``), or just acknowledged, is dropped too
(``dropped_redelivered``), so no tick is processed twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from ..errors import ConfigError, PipelineError
from ..events import TICK_COLUMNS
from ..memory import Lease
from ..pipeline import Pipeline
from .pull import PullFeed, set_none
from .wire import Batch, WireError, decode_batch

log = structlog.get_logger("nautilus_pipeline.bridge.ingress")

HOLDER = "nats-ingress"


@dataclass
class IngressStats:
    """What the ingress did (cumulative)."""

    messages: int = 0
    batches: int = 0
    ticks: int = 0
    acked: int = 0
    redelivered: int = 0
    dropped_covered: int = 0
    dropped_redelivered: int = 0
    bad_messages: int = 0
    rejected_out_of_order: int = 0
    """Ticks dropped because they went back in time on their batch's clock (per symbol)."""
    fetches: int = 0
    last_seq: int = 0


class _Pending:
    """A fetched message and how many of its batches are still in the pipeline."""

    __slots__ = ("left", "msg", "seq")

    def __init__(self, msg: Any, seq: int, left: int):
        self.msg = msg
        self.seq = seq
        self.left = left


class Ingress:
    """Pull → decode → fill slabs → ``publish_batch``; ack when done (and covered).

    ``ack_on_release`` False defers acks to :meth:`ack_covered` (the state store's
    snapshots call it); ``after_message`` runs after each message is in the pipeline (the
    bridge takes its periodic snapshot there).
    """

    def __init__(self, pipe: Pipeline, feed: PullFeed, *, ack_on_release: bool = True,
                 covered_seq: int = 0, fetch_timeout: float = 0.25, read_ahead: int | None = None,
                 ack_every: int = 4, cumulative: bool = False,
                 on_idle: Callable[[], Awaitable[None]] | None = None,
                 after_message: Callable[[], Awaitable[None]] | None = None):
        self.pipe = pipe
        self.feed = feed
        self.ack_on_release = ack_on_release
        self.covered_seq = covered_seq
        self.fetch_timeout = fetch_timeout
        self.on_idle = on_idle
        self.after_message = after_message
        self.stats = IngressStats(last_seq=covered_seq)
        self._slabs = len(pipe.pool.slabs)
        self.read_ahead = self._slabs if read_ahead is None else read_ahead
        self.ack_every = max(ack_every, 1)
        self.cumulative = cumulative
        """The consumer's ack policy is ``all``: one ack covers every earlier message."""
        self._done: list[_Pending] = []  # released, waiting for an ack
        self._unacked: list[_Pending] = []  # all fetched, not yet acked (state mode)
        self._open: dict[int, _Pending] = {}  # stream sequence → fetched, not yet acked
        self._last_clock: dict[tuple[int, str], int] = {}  # (symbol id, clock) → latest time fed
        self._wake: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    # --- the fetch loop ----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: fetch what the pool can hold, feed it, ack what is done."""
        while not stop.is_set():
            free = self._slabs - self.pipe.pool.in_use
            done = len(self._done)
            if done and (done >= self.ack_every or (free > 0 and not self.feed.ready)):
                await self._ack_done()
            want = free + self.read_ahead
            await self.feed.ask(want)
            if free <= 0:
                await self._wait_release(self.fetch_timeout)
                continue
            msgs = await self.feed.get(want, self.fetch_timeout, limit=free)
            if not msgs:
                if self.on_idle is not None:
                    await self.on_idle()
                continue
            self.stats.fetches += 1
            for msg in msgs:
                await self._feed(msg)
                if self.after_message is not None:
                    await self.after_message()
        await self._ack_done()

    async def _feed(self, msg: Any) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        st = self.stats
        st.messages += 1
        if meta.num_delivered > 1:
            st.redelivered += 1
        if seq <= self.covered_seq:
            # processed and snapshotted before a crash, its ack lost: the state has it
            st.dropped_covered += 1
            await msg.ack()
            st.acked += 1
            return
        if seq <= st.last_seq:
            # redelivered after ack_wait while still in the pipeline (or waiting for its
            # snapshot), or just after its ack: processing it twice would count its ticks
            # twice. An open one is acknowledged later (this newest delivery), a done one now.
            st.dropped_redelivered += 1
            again = self._open.get(seq)
            if again is not None:
                again.msg = msg
            else:
                await msg.ack()
            return
        st.last_seq = seq
        try:
            batch = decode_batch(msg.data)
            sid = self.pipe.symbols.id_of(batch.symbol)
        except (WireError, ConfigError, ValueError) as exc:  # not a batch; a symbol not allowed
            st.bad_messages += 1
            log.error("bad_tick_message", subject=msg.subject, stream_seq=seq, error=str(exc))
            await msg.term()  # never redelivered; counted and logged
            return
        batch = self._in_time_order(batch, sid, seq)
        size = self.pipe.batch_size
        starts = range(0, batch.length, size)
        pending = _Pending(msg, seq, len(starts))
        self._open[seq] = pending
        if not self.ack_on_release:
            self._unacked.append(pending)
        if not starts:  # an empty batch: nothing to wait for
            if self.ack_on_release:
                self._done.append(pending)
            return
        for start in starts:
            stop = min(start + size, batch.length)
            lease = await self.pipe.acquire(HOLDER)
            lease.length = stop - start
            for spec in TICK_COLUMNS:
                col = lease[spec.name]
                if spec.name == "symbol_id":
                    col.fill(sid)
                elif spec.name in batch:
                    batch.copy_into(spec.name, col, start)
                else:
                    col.fill(spec.fill)
            lease.on_release = _ReleaseHook(self, pending)
            await self.pipe.publish_batch(lease, HOLDER)
            st.batches += 1
            st.ticks += stop - start

    def _in_time_order(self, batch: Batch, sid: int, seq: int) -> Batch:
        """``batch`` without the rows that go back in time on its clock (``order_by``), per
        symbol and across messages; those are dropped, counted and logged (policy "reject",
        as ``run --ws``: a live consumer does not stop on them, and a message that made it
        stop would come back at every restart). The fast path, every row in order, costs a
        comparison of neighbours and copies nothing."""
        if batch.length == 0 or batch.order_by not in batch:
            return batch  # no clock column
        clock = batch.raw.get(batch.order_by)
        if clock is None:  # it travelled as one value or a range (NPB2): checked all the same
            clock = batch.columns[batch.order_by]
        key = (sid, batch.order_by)
        prev = self._last_clock.get(key)
        if (prev is None or clock[0] >= prev) and not (clock[1:] < clock[:-1]).any():
            self._last_clock[key] = int(clock[-1])
            return batch
        floor = np.maximum.accumulate(clock)
        before = np.empty_like(floor)
        before[0] = floor[0] if prev is None else prev
        np.maximum(floor[:-1], before[0], out=before[1:])
        keep = clock >= before
        dropped = int(batch.length - keep.sum())
        self._last_clock[key] = int(max(floor[-1], before[0]))
        self.stats.rejected_out_of_order += dropped
        log.warning("ticks_out_of_order", symbol=batch.symbol, stream_seq=seq, rows=dropped,
                    clock=batch.order_by, effect="dropped")
        cols = {name: col[keep] for name, col in batch.columns.items()}
        return Batch(batch.symbol, int(keep.sum()), batch.first_seq, batch.last_seq, cols,
                     order_by=batch.order_by)

    async def _wait_release(self, timeout: float) -> None:
        """Until a lease is released or ``timeout`` s (a future and a timer, not a task)."""
        wake = self._wake = self._loop.create_future()
        timer = self._loop.call_later(timeout, set_none, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    # --- acknowledgements --------------------------------------------------------------
    def _released(self, pending: _Pending) -> None:
        if threading.get_ident() == self._thread:
            self._released_one(pending)
        else:
            self._loop.call_soon_threadsafe(self._released_one, pending)

    def _released_one(self, pending: _Pending) -> None:
        pending.left -= 1
        if pending.left == 0 and self.ack_on_release:
            self._done.append(pending)
        if self._wake is not None:
            set_none(self._wake)

    async def _ack_done(self) -> None:
        done, self._done = self._done, []
        if not done:
            return
        if not self.cumulative:
            for pending in done:
                del self._open[pending.seq]
                await pending.msg.ack()
            self.stats.acked += len(done)
            return
        # AckAll: the newest message of the longest run of done ones from the oldest open
        # (``_open`` is in stream order) acknowledges the whole run; one still in the
        # pipeline holds back the later ones, which wait for the next call.
        run: list[int] = []
        for seq, pending in self._open.items():
            if pending.left > 0:
                break
            run.append(seq)
        if not run:
            return
        last = self._open[run[-1]]
        for seq in run:
            del self._open[seq]
        await last.msg.ack()
        self.stats.acked += len(run)

    async def ack_drained(self) -> None:
        """Acknowledge the messages whose batches finished after the ingress stopped (the
        bridge's drain at close); without it a graceful stop left them for redelivery."""
        await self._ack_done()

    async def ack_covered(self, seq: int) -> None:
        """Acknowledge every fetched message up to stream sequence ``seq`` (now in the state):
        each one, or with a cumulative consumer the newest of them only."""
        self.covered_seq = max(self.covered_seq, seq)
        keep, covered = [], []
        for pending in self._unacked:
            if pending.seq <= seq:
                if pending.left > 0:
                    raise PipelineError(f"message {pending.seq} is still in the pipeline; "
                                        "snapshots are taken only when it is idle")
                del self._open[pending.seq]
                covered.append(pending)
            else:
                keep.append(pending)
        self._unacked = keep
        for pending in covered[-1:] if self.cumulative else covered:
            await pending.msg.ack()
        self.stats.acked += len(covered)


class _ReleaseHook:
    """``Lease.on_release`` for one batch of a message (a plain callable, no closure cycle)."""

    __slots__ = ("ingress", "pending")

    def __init__(self, ingress: Ingress, pending: _Pending):
        self.ingress = ingress
        self.pending = pending

    def __call__(self, lease: Lease) -> None:
        self.ingress._released(self.pending)

