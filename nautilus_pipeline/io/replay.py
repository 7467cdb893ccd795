"""Replay: several tick sources merged into one time-ordered stream, into buffer-pool slabs.

Order. Rows are ordered by each source's replay clock (``ts_ns`` or ``ts_recv_ns``, see
:class:`~nautilus_pipeline.io.formats.Source`), ties broken by source order, then by row order
in the file: a total order, so neither the readers' chunk size nor the output batch size can
change the merged sequence.

How the merge streams. Each source is read chunk by chunk (validated, see ``checks.py``) into
a small buffer. Every row with a key below the *horizon* (the smallest last-buffered key among
sources not yet exhausted) is final: no source can later yield an earlier row, because each
source is in time order. Those rows are taken from all buffers at once and put in order with
one stable ``argsort``; then the source holding the horizon reads its next chunk. Memory stays
at about one chunk per source; there is no per-row Python. A heap merge (``heapq.merge``) was
the alternative: simpler, but one Python object and comparison per tick, the per-row cost the
readers avoid. With one source left there is nothing to merge and its chunks pass through.

Each source must be in time order overall, not only per symbol: a multi-symbol file whose
symbols interleave out of order is refused with a DataError that says how to fix it (sort it,
or split it per symbol); a single symbol going backwards is a bad row under the source's
policy.

Symbols. One :class:`SymbolTable` for the replay: sources naming the same symbol share its
``symbol_id``; ids are given in order of first appearance as sources are read, or fixed up
front by passing a table.

Pacing. ``speed=None`` replays as fast as possible. ``speed=s`` releases a tick when
``(key - first_key) / s`` of clock time has passed since the start: a batch holds the ticks
that are due (at most ``batch_size``) and the replay sleeps on the injected :class:`Clock`
until the next one is due. Tests use :class:`ManualClock`, whose ``sleep`` only advances its
time, so no test really sleeps.

Accounting. ``Replay.accounting`` counts per source and symbol: read = delivered + rejected +
quarantined once the replay has run to the end (``delivered`` counts rows yielded).

Reading once. A run that must see its whole input before it starts (``bucket_volume =
"auto"`` sums each symbol's volume) calls :meth:`Replay.scan`: it reads, checks and merges the
sources as the replay would, and keeps the merged blocks (up to ``max_bytes``) so that the
replay that follows serves them instead of reading the files again; the accounting and the
quarantine files of that one read are the run's. An input larger than the budget is read
again by the replay (logged), as before.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog

from ..errors import ConfigError, DataError
from ..events import TICK_COLUMN_NAMES
from ..memory import BufferPool, Lease
from ..symbols import SymbolTable
from .checks import READER_ERRORS, Accounting, Validator, validated
from .chunk import SPECS, TickChunk, TickReader
from .formats import Source

log = structlog.get_logger("nautilus_pipeline.replay")

READ_ONCE_MAX_BYTES = 2 << 30
"""What :meth:`Replay.scan` keeps for the replay (merged columns, ~70 bytes a tick, counted in
full though columns a reader lacks are broadcast fill views: a trades file keeps ~30 bytes a
tick less; a 10M-trade ``default.toml`` run's peak RSS went from 1,487 to 1,079 MB)."""

READ_AHEAD_ROWS = 65_536
"""Rows a replay's reader thread reads ahead of the consumer, in one hand-off (see ``batches``).

One batch ahead, as before, the reader and the loop took turns: a reader chunk's parse and
conversion (the 65,536 rows of a chunk at once) ran while the loop had one batch to deliver,
then the loop delivered the chunk's other batches while the reader waited."""

_KEY = "_key"
_SRC = "_src"


class Clock(Protocol):
    """Time source for pacing: seconds (float), and an awaitable sleep."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock for tests: ``sleep`` advances the time at once and records the request."""

    def __init__(self, start: float = 0.0):
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Progress:
    """What the replay has done so far (for a progress bar): rows, ticks, market time."""

    rows_read: int = 0
    ticks_delivered: int = 0
    ts_reached_ns: int | None = None
    sources_done: int = 0
    sources: int = 0
    batches: int = 0


@dataclass
class _Lane:
    """One source being merged: its chunks and the rows buffered but not yet emitted."""

    index: int
    source: Source
    reader: TickReader
    validator: Validator
    chunks: Iterator[TickChunk]
    cols: dict[str, np.ndarray] = field(default_factory=dict)
    done: bool = False
    last_key: int | None = None
    last_record: int = 0

    @property
    def rows(self) -> int:
        return len(self.cols[_KEY]) if self.cols else 0


class Replay:
    """Merge ``sources`` (paths or :class:`Source`) into one stream; see the module docstring."""

    def __init__(
        self,
        sources: Sequence[Source | str | Path],
        speed: float | None = None,
        clock: Clock | None = None,
        *,
        symbols: SymbolTable | None = None,
        chunk_rows: int = 65_536,
    ):
        if not sources:
            raise ConfigError("a replay needs at least one source")
        if speed is not None and not speed > 0:
            raise ConfigError(f"speed must be > 0 (or None for as fast as possible), got {speed!r}")
        if chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.sources = [s if isinstance(s, Source) else Source(s) for s in sources]
        keys = [s.key for s in self.sources]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"two sources have the same name {keys}; give each a distinct name=")
        self.speed = speed
        self.clock: Clock = clock or MonotonicClock()
        self.symbols = symbols if symbols is not None else SymbolTable()
        self.chunk_rows = chunk_rows
        self.accounting = Accounting()
        self.progress = Progress(sources=len(self.sources))
        self._kept: list[dict[str, np.ndarray]] | None = None
        self.kept_rows: int | None = None
        """Rows kept by :meth:`scan` for the replay (exact, known before it starts), else None."""

    def scan(self, max_bytes: int = READ_ONCE_MAX_BYTES) -> Iterator[dict[str, np.ndarray]]:
        """Read the merged stream once before the replay (see "Reading once" above).

        Yields the merged blocks (tick columns, not yet counted as delivered); keeps them for
        the next :meth:`batches`/:meth:`iter_arrays` while they fit in ``max_bytes``.
        """
        kept: list[dict[str, np.ndarray]] | None = []
        size = 0
        self._kept = self.kept_rows = None
        for block in self._blocks():
            if kept is not None:
                size += sum(v.nbytes for v in block.values())
                if size <= max_bytes:
                    kept.append(block)
                else:
                    kept = None
                    log.info("replay_read_twice", sources=[str(s.path) for s in self.sources],
                             max_bytes=max_bytes, reason="the input does not fit the read-once budget")
            yield {k: v for k, v in block.items() if k not in (_KEY, _SRC)}
        if kept is not None:
            self._kept = kept
            self.kept_rows = sum(len(b[_KEY]) for b in kept)

    # --- merge -------------------------------------------------------------------------
    def _open(self) -> list[_Lane]:
        self.accounting = Accounting()
        self.progress = Progress(sources=len(self.sources))
        lanes = []
        for i, src in enumerate(self.sources):
            try:
                reader, validator = src.open(self.accounting)
            except READER_ERRORS as e:  # a decoder's own exception on a damaged file
                raise DataError(f"{src.path}: the file cannot be read ({type(e).__name__}: {e}); it is damaged, "
                                "or not in the format its reader expects") from e
            lanes.append(_Lane(i, src, reader, validator, validated(reader.chunks(self.chunk_rows), validator)))
        return lanes

    def _refill(self, lane: _Lane) -> None:
        """Read the lane's next non-empty chunk into its buffer (or mark it done)."""
        for chunk in lane.chunks:
            self._append(lane, chunk)
            return
        lane.done = True
        self.progress.sources_done += 1
        self.accounting.ignored[lane.source.key] += lane.reader.ignored
        for what in ("book_gaps", "unknown_orders"):  # book readers' own counts
            n = int(getattr(lane.reader, what, 0) or 0)
            if n:
                getattr(self.accounting, what)[lane.source.key] += n

    def _append(self, lane: _Lane, chunk: TickChunk) -> None:
        key = chunk.column(lane.validator.order_by)
        order_by = lane.validator.order_by
        if order_by == "ts_recv_ns" and (key < 0).any():
            i = int(np.flatnonzero(key < 0)[0])
            raise DataError(
                f"{lane.source.path}, line/record {int(chunk.records[i])}: no receive timestamp "
                "(ts_recv_ns) to replay by; use order_by='ts_ns' for this source",
                file=str(lane.source.path), line=int(chunk.records[i]), reason="no_ts_recv",
            )
        back = np.flatnonzero(np.diff(key) < 0)
        first_bad = int(back[0]) + 1 if len(back) else None
        if first_bad is None and lane.last_key is not None and len(key) and key[0] < lane.last_key:
            first_bad = 0
        if first_bad is not None:
            prev = int(key[first_bad - 1]) if first_bad else lane.last_key
            raise DataError(
                f"{lane.source.path}, line/record {int(chunk.records[first_bad])}: {order_by} "
                f"{int(key[first_bad])} is earlier than {prev} of the row before (another symbol); "
                f"a replay needs each source in {order_by} order across its symbols: sort the file, "
                "or split it into one source per symbol",
                file=str(lane.source.path), line=int(chunk.records[first_bad]), reason="source_out_of_order",
            )
        n = len(chunk)
        codes = chunk.column("symbol_id")
        lut = np.zeros(len(chunk.symbols), dtype=np.uint32)
        present = np.flatnonzero(np.bincount(codes, minlength=len(chunk.symbols))) if n else ()
        for k in present.tolist() if n else ():  # only names with rows left (not refused ones)
            lut[k] = self.symbols.id_of(chunk.symbols[k])
        # a column the reader does not have is its fill value, as a read-only broadcast view
        # (no memory per row; the slab fill in batches() writes it)
        new = {name: chunk.columns[name] if name in chunk.columns
               else np.broadcast_to(np.array(SPECS[name].fill, dtype=SPECS[name].dtype), (n,))
               for name in TICK_COLUMN_NAMES}
        new["symbol_id"] = lut[codes] if n else new["symbol_id"]
        new[_KEY] = key
        new[_SRC] = np.broadcast_to(np.uint16(lane.index), (n,))
        lane.cols = {k: np.concatenate([lane.cols[k], v]) for k, v in new.items()} if lane.rows else new
        lane.last_key = int(key[-1])
        self.progress.rows_read += n

    def _blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """Merged blocks (any size) in the final order; columns plus ``_key``/``_src``."""
        if self._kept is not None:  # read by scan(): serve those blocks, once
            kept, self._kept = self._kept, None
            self.progress = Progress(sources=len(self.sources), sources_done=len(self.sources),
                                     rows_read=self.progress.rows_read)
            yield from kept
            return
        lanes = self._open()
        try:
            for lane in lanes:
                self._refill(lane)
            while True:
                live = [ln for ln in lanes if not ln.done]
                if not live and not any(ln.rows for ln in lanes):
                    return
                horizon = min(ln.last_key for ln in live) if live else None  # type: ignore[type-var]
                if len(live) == 1 and not any(ln.rows for ln in lanes if ln is not live[0]):
                    horizon = None  # one source left: its file order is the order, no merge needed
                parts = []
                for ln in lanes:
                    if not ln.rows:
                        continue
                    k = ln.rows if horizon is None else int(np.searchsorted(ln.cols[_KEY], horizon, side="left"))
                    if k:
                        parts.append({c: v[:k] for c, v in ln.cols.items()})
                        ln.cols = {c: v[k:] for c, v in ln.cols.items()}
                if parts:
                    yield _merge(parts)
                for ln in live:
                    if ln.last_key == horizon or ln.rows == 0:
                        self._refill(ln)
        finally:
            for lane in lanes:
                lane.validator.close()

    def _deliver(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Count a block as delivered (per source and symbol) and strip internal columns."""
        n = len(block[_KEY])
        nsym = max(len(self.symbols), 1)
        pair = block[_SRC].astype(np.int64) * nsym + block["symbol_id"]
        counts = np.bincount(pair, minlength=len(self.sources) * nsym)
        for p in np.flatnonzero(counts):
            src, sym = divmod(int(p), nsym)
            self.accounting.add(self.sources[src].key, self.symbols.name_of(sym), "delivered", int(counts[p]))
        self.progress.ticks_delivered += n
        self.progress.ts_reached_ns = int(block[_KEY][-1])
        self.progress.batches += 1
        return {k: v for k, v in block.items() if k not in (_KEY, _SRC)}

    # --- outputs -----------------------------------------------------------------------
    def iter_arrays(self, batch_size: int = 65_536) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` rows (the last may be shorter) as dicts of numpy arrays.

        As fast as possible (no pacing); the tick columns of ``events.TICK_COLUMNS``. The
        columns a reader does not have (``bid``/``ask`` of a trades file, ``ts_recv_ns``, ...)
        are read-only views of their fill value (``np.broadcast_to``, no memory per row):
        ``np.array(col)`` before writing into one or handing it to code that needs
        contiguous memory.
        """
        for block in _rebatch(self._blocks(), batch_size):
            yield self._deliver(block)

    async def batches(self, pool: BufferPool, batch_size: int | None = None, *, holder: str = "replay",
                      timeout: float | None = None) -> AsyncIterator[Lease]:
        """Fill pool slabs with the merged stream, paced by ``speed``; the consumer releases each.

        ``batch_size`` defaults to (and may not exceed) the pool's slab capacity. Reading and
        parsing run in a worker thread so the event loop stays responsive, ``READ_AHEAD_ROWS``
        ahead of the consumer (the next rows are read while these are delivered; a batch is
        counted as delivered only when its lease is yielded). If the consumer stops or is
        cancelled, the generator waits for the read in flight to end before closing the files.
        """
        size = batch_size or pool.capacity
        if size > pool.capacity:
            raise ConfigError(f"batch_size {size} exceeds the pool's slab capacity {pool.capacity}")
        blocks = _rebatch(self._blocks(), size)
        ahead = max(READ_AHEAD_ROWS, size)
        loop = asyncio.get_running_loop()
        inflight: asyncio.Future[list[dict[str, np.ndarray]]] | None = None
        queued: collections.deque[dict[str, np.ndarray]] = collections.deque()
        pending: dict[str, np.ndarray] | None = None
        t0_wall: float | None = None
        t0_key = 0
        try:
            while True:
                if pending is None:
                    if not queued:
                        if inflight is None:
                            inflight = loop.run_in_executor(None, _take, blocks, ahead)
                        got = await asyncio.shield(inflight)  # a cancel must not orphan the thread
                        inflight = None
                        if not got:
                            return
                        queued.extend(got)
                        # read ahead: the next rows are read while these are delivered
                        inflight = loop.run_in_executor(None, _take, blocks, ahead)
                    pending = queued.popleft()
                keys = pending[_KEY]
                n = len(keys)
                if self.speed is not None:
                    if t0_wall is None:
                        t0_wall, t0_key = self.clock.now(), int(keys[0])
                    due = t0_key + (self.clock.now() - t0_wall) * self.speed * 1e9
                    n = int(np.searchsorted(keys, due, side="right"))
                    if n == 0:
                        wait = t0_wall + (int(keys[0]) - t0_key) / 1e9 / self.speed - self.clock.now()
                        if wait > 1e-9:
                            await self.clock.sleep(wait)
                            continue
                        n = int(np.searchsorted(keys, keys[0], side="right"))  # due up to rounding
                    n = min(n, len(keys))
                out = {k: v[:n] for k, v in pending.items()}
                pending = {k: v[n:] for k, v in pending.items()} if n < len(keys) else None
                lease = await pool.acquire(holder=holder, timeout=timeout)
                try:
                    cols = lease.columns
                    for name, arr in self._deliver(out).items():
                        cols[name][:n] = arr
                    lease.length = n
                except BaseException:
                    lease.release()
                    raise
                yield lease
        finally:
            # a read in flight (the read-ahead, or one a cancel interrupted) must end before the
            # files close: the thread is inside the generator. A second cancel while waiting is
            # held until then and raised after, so the files are always closed.
            cancelled = False
            while inflight is not None and not inflight.done():
                try:
                    await asyncio.wait([inflight])
                except asyncio.CancelledError:
                    cancelled = True
            if inflight is not None and not inflight.cancelled():
                inflight.exception()  # retrieved: a read error after the consumer stopped is moot
            blocks.close()
            if cancelled:
                raise asyncio.CancelledError


def _take(blocks: Iterator[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    """The next blocks of ``blocks`` up to at least ``rows`` rows (fewer at the end; [] when done)."""
    out: list[dict[str, np.ndarray]] = []
    n = 0
    while n < rows:
        block = next(blocks, None)
        if block is None:
            break
        out.append(block)
        n += len(block[_KEY])
    return out


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-source parts (in source order) and order them stably by key."""
    if len(parts) == 1:
        return parts[0]
    cat = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    order = np.argsort(cat[_KEY], kind="stable")
    return {c: v[order] for c, v in cat.items()}


def _rebatch(blocks: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Re-cut blocks of any size into blocks of exactly ``size`` rows (the last may be shorter).

    Full batches inside a block are views of it; only a batch that straddles two blocks is
    copied (joining the whole next block to the rest of this one copied every row once a
    block's length was not a multiple of ``size``).
    """
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {size}")
    held: list[dict[str, np.ndarray]] = []
    rows = 0
    try:
        for b in blocks:
            n = len(b[_KEY])
            start = 0
            if rows:
                start = min(size - rows, n)
                held.append({c: v[:start] for c, v in b.items()})
                rows += start
                if rows < size:
                    continue
                yield {c: np.concatenate([h[c] for h in held]) for c in b}
                held, rows = [], 0
            while n - start >= size:
                yield {c: v[start : start + size] for c, v in b.items()}
                start += size
            if start < n:
                held, rows = [{c: v[start:] for c, v in b.items()}], n - start
        if rows:
            yield held[0] if len(held) == 1 else {c: np.concatenate([h[c] for h in held]) for c in held[0]}
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
