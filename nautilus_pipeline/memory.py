"""Buffer pool: preallocated slabs that carry a batch of ticks from source to sink.

Why a pool. A pipeline that allocates arrays per batch spends its time in the allocator
and the garbage collector, and its memory grows with load. Here every batch lives in a
*slab* allocated once: a struct of arrays (one column per field of ``events.TICK_COLUMNS``
plus the output columns that the stages declare when the pipeline is built). Stages read
and write views of that slab, so a batch is never copied between stages on the CPU; it
travels as one :class:`Lease` and returns to the pool when its last holder releases it.

Backpressure. ``acquire`` waits when every slab is in use: a fast reader cannot outrun a
slow stage by allocating. An optional timeout raises :class:`PoolExhaustedError` naming
who holds the slabs, which is almost always the answer to "why is my pipeline stuck".

Reference counts. A batch published to several subscribers is retained once per delivery
(the bus does this for any payload that is a ``Lease``) and returns to the pool when all
of them have released it. Holders are tracked by name, so a leak at close says which
stage kept the batch.

Memory kinds (chosen by ``memory=``):

- ``"host"``: plain numpy memory. The CPU path; copies counted: zero.
- ``"pinned"``: page-locked host memory from ``torch.empty(..., pin_memory=True)`` with a
  numpy view on it, so host→device copies can run asynchronously on a CUDA stream.
  Pinning once per slab, not per batch, is what makes it pay (pinning on the fly can be
  slower than a pageable copy; see ``../shared/BACKENDS.md``).
- ``"unified"``: MLX arrays (Apple silicon unified memory) with writable numpy views
  (``np.array(a, copy=False)``), so MLX, numpy and torch (via DLPack) see the same bytes.
  float64 columns are the exception: no MLX GPU (Metal, CUDA) has float64, so they stay
  numpy host arrays and a GPU stream reads them as float32 device copies (counted).
- ``"auto"``: for a pipeline, pinned where one of its stages runs on ``torch:cuda``,
  otherwise host (``auto_memory``). An all-CPU definition on a GPU host used to get pinned
  slabs too, which cost each process torch's import and a CUDA context (seconds per batch
  worker on the H200 host) for copies that never happen. In a batch of several workers
  ``auto`` is host (``batch.worker_memory``: measured faster there). A pool built alone, with no
  stages to ask, keeps the older rule: pinned where torch sees a CUDA device.

Every slab column is a view into one backing buffer per slab, each column aligned to 64
bytes (a cache line) so that vectorised kernels start on an aligned address.

Slabs kept between pools. A batch worker builds a pipeline, and so a pool, for every job;
zeroing and filling a new pool's slabs was most of a job's build (median 1.6-5.9 ms a job
for the default pipeline's 8 × 4,096 rows, ~1.0 ms with the slabs kept:
``scripts/bench_batch.py``, ``docs/measurements/dev_bench_batch_slab_reuse_quiet_1b2279c.txt``).
With :func:`keep_slabs` on (the batch executors' worker set-up turns it on), a host or
pinned pool closed with every slab free (none leased, none handed to a waiter yet to resume)
leaves its slabs for the next pool of the same layout, size and memory kind, which takes
them as they are. Stale rows are no different from those of a
slab's previous batch in one run: a stage writes every row of the columns it declares and
reads only what earlier stages wrote (the replay's equality for any batch size, 8 slabs
reused hundreds of times, depends on it already). One set of slabs is kept per key.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import structlog

from .errors import ConfigError, LeaseError, PoolExhaustedError
from .events import TICK_COLUMNS, ColumnSpec

log = structlog.get_logger("nautilus_pipeline.memory")

_ALIGN = 64
_kept_slabs: dict[tuple, list[Slab]] = {}  # keep_slabs(): the slabs of the last pool closed, per key
_keep = False


LAZY_FILL_BYTES = 8 << 20
"""A pool's slabs from this size on are filled at their first lease (:class:`Slab`'s
``lazy``); smaller ones when the pool is made, as before, so that a live pipeline's first
ticks do not pay for them. (Tried with every pool lazy: the live benchmark's row of
4,096-tick batches at full rate, 5,000 ticks or two batches, paid the default definition's
~1 MB slabs inside the run: 0.99-1.02M ticks/s against 1.22-1.25M,
``scripts/bench_pipeline.py --rows``.)"""


def keep_slabs(on: bool = True) -> None:
    """From now on a closed pool's slabs serve the next pool of the same layout (``False``:
    free them, and what is kept). Meant for a process that builds one pipeline after another
    (a batch worker); elsewhere a closed pool's memory goes back at once."""
    global _keep
    _keep = on
    if not on:
        _kept_slabs.clear()


def _slab_key(specs: Sequence[ColumnSpec], capacity: int, slabs: int, memory: str) -> tuple:
    return (tuple((c.name, c.dtype.str, c.shape, repr(c.fill)) for c in specs), capacity, slabs, memory)


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _allocate_backing(nbytes: int, memory: str) -> tuple[np.ndarray, Any]:
    """Return (uint8 numpy view, owner object keeping the memory alive)."""
    if memory == "host":
        buf = np.zeros(nbytes + _ALIGN, dtype=np.uint8)
        offset = (-buf.ctypes.data) % _ALIGN
        return buf[offset : offset + nbytes], buf
    if memory == "pinned":
        import torch

        owner = torch.zeros(nbytes + _ALIGN, dtype=torch.uint8, pin_memory=True)
        buf = owner.numpy()
        offset = (-buf.ctypes.data) % _ALIGN
        return buf[offset : offset + nbytes], owner
    raise ConfigError(f"unknown pool memory kind {memory!r}: use host, pinned, unified or auto")


def auto_memory(streams: Iterable[str]) -> str:
    """``"pinned"`` when one of ``streams`` (the streams a pipeline's stages run on) is a
    torch CUDA stream, the only consumer of pinned slabs; ``"host"`` otherwise (MLX's
    CUDA build and Core ML read host memory through their own copies)."""
    from .compute.registry import canonical

    return "pinned" if any(canonical(s).startswith("torch:cuda") for s in streams) else "host"


def _resolve_memory(memory: str) -> str:
    if memory not in ("auto", "host", "pinned", "unified"):
        raise ConfigError(f"unknown pool memory kind {memory!r}: use host, pinned, unified or auto")
    if memory != "auto":
        return memory
    # pinned host memory only where torch sees a CUDA device; asked through the registry,
    # which rules CUDA out without importing torch on a host with no NVIDIA driver
    from .compute.registry import unusable_reason

    return "pinned" if unusable_reason("torch:cuda") is None else "host"


class SlabLayout(NamedTuple):
    """Where each column of a slab lies in its backing buffer, worked out once per pool
    rather than once per slab (per column: two ``np.prod`` calls were most
    of a pool's build): ``(spec, start byte, stop byte, array shape, refill)``; ``refill``
    is False where the fill value's bytes are all zero, which a zeroed backing holds
    already (``+0``, ``False``; not ``-0.0`` or NaN)."""

    columns: tuple[tuple[ColumnSpec, int, int, tuple[int, ...], bool], ...]
    nbytes: int


def slab_layout(specs: Sequence[ColumnSpec], capacity: int) -> SlabLayout:
    columns = []
    offset = 0
    for spec in specs:
        n_items = capacity * math.prod(spec.shape)
        nbytes = n_items * spec.dtype.itemsize
        fill = spec.fill
        zero = fill == 0 and not (isinstance(fill, float) and math.copysign(1.0, fill) < 0)
        columns.append((spec, offset, offset + nbytes, (capacity, *spec.shape), not zero))
        offset += _aligned(nbytes)
    return SlabLayout(tuple(columns), max(offset, _ALIGN))


class Slab:
    """A preallocated struct of arrays for up to ``capacity`` rows.

    ``columns[name]`` is the whole capacity-sized array; row ``i`` of every column is tick
    ``i`` of the batch. The slab outlives every batch it carries.

    ``lazy`` (a pool's slabs from :data:`LAZY_FILL_BYTES` on): the columns whose fill is not
    zero are filled at the slab's first lease (:meth:`fill_pending`, called by the pool)
    instead of here, so that a slab no batch ever takes is never written and, in host
    memory, its zeroed pages are never faulted in (pinned memory is page-locked when made:
    there only the fill is saved). A pool of 8 slabs of 262,144 rows is 566 MB, and a serial
    replay, taking the slab released last, uses one or two of them. The first lease of each
    such slab pays its fill on the event loop instead of the pool's build. A batch worker on ``pipelines/gpu.toml``: peak RSS after its warm-up 726 ->
    284 MB, after a 1M-trade job 1145 -> 828 MB, the job 2.6 -> 2.1 s
    (``scripts/profile_worker_rss.py``, ``docs/measurements/dev_pool_lifo_lazy_fill_91efb65.txt``).
    """

    __slots__ = ("backing", "capacity", "columns", "index", "mlx_columns", "owner", "unfilled")

    def __init__(self, index: int, specs: Sequence[ColumnSpec], capacity: int, memory: str,
                 layout: SlabLayout | None = None, *, lazy: bool = False):
        self.index = index
        self.capacity = capacity
        self.mlx_columns: dict[str, Any] | None = None
        self.unfilled: list[tuple[np.ndarray, float | int]] | None = None
        if memory == "unified":
            self._allocate_unified(specs, capacity)
            return
        layout = layout if layout is not None else slab_layout(specs, capacity)
        self.backing, self.owner = _allocate_backing(layout.nbytes, memory)
        backing = self.backing
        self.columns: dict[str, np.ndarray] = {}
        pending = []
        for spec, start, stop, shape, refill in layout.columns:
            col = backing[start:stop].view(spec.dtype).reshape(shape)
            if refill:
                pending.append((col, spec.fill))
            self.columns[spec.name] = col
        self.unfilled = pending or None
        if not lazy:
            self.fill_pending()

    def fill_pending(self) -> None:
        """Write the fill of the columns a lazy slab has not filled yet (once)."""
        pending, self.unfilled = self.unfilled, None
        for col, fill in pending or ():
            col.fill(fill)

    def _allocate_unified(self, specs: Sequence[ColumnSpec], capacity: int) -> None:
        """One MLX array per column that a GPU can hold, with a numpy view onto each.

        float64 columns stay plain numpy host arrays: Metal and MLX's CUDA build have no
        float64 (``mx.zeros(..., float64)`` on the default GPU device fails with "float64 is
        not supported on the GPU"). A GPU stage reads them through
        ``MlxStream.to_device``, which converts to float32 once per batch and caches the
        device copy on the lease (counted as a host→device copy). The source values stay
        float64 on the host for the CPU stages.
        """
        import mlx.core as mx

        self.mlx_columns = {}
        self.columns = {}
        for spec in specs:
            shape = (capacity, *spec.shape)
            if spec.dtype == np.float64:
                view = np.empty(shape, dtype=spec.dtype)
            else:
                arr = mx.zeros(shape, dtype=getattr(mx, spec.dtype.name), stream=mx.cpu)
                mx.eval(arr)
                view = np.array(arr, copy=False)
                self.mlx_columns[spec.name] = arr
            view.fill(spec.fill)
            self.columns[spec.name] = view
        self.backing = None
        self.owner = (self.mlx_columns, self.columns)

    @property
    def nbytes(self) -> int:
        return sum(int(c.nbytes) for c in self.columns.values())


class Lease:
    """One batch held in one slab, reference counted by holder name.

    ``lease["price"]`` is a writable numpy view of the first ``length`` rows: no copy.
    ``device_cache`` keeps device copies of columns (keyed by ``(device, column)``) so that
    two consecutive GPU stages do not copy the same column twice; it is cleared when the
    slab returns to the pool.
    """

    __slots__ = ("_holders", "_meta", "_pool", "device_cache", "length", "on_release", "seq", "slab")

    def __init__(self, pool: BufferPool, slab: Slab, holder: str, seq: int):
        self._pool = pool
        self.slab = slab
        self.seq = seq
        self.length = 0
        self._meta: dict[str, Any] | None = None
        self.device_cache: dict[tuple[str, str], Any] = {}
        self._holders: dict[str, int] = {holder: 1}
        # Called with the lease once its slab is back in the pool (the NATS bridge acks then).
        self.on_release: Callable[[Lease], None] | None = None

    # --- data access -------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """Free-form annotations of the batch (made on first use: a live tick's lease has none)."""
        if self._meta is None:
            self._meta = {}
        return self._meta

    @property
    def columns(self) -> dict[str, np.ndarray]:
        self._check_live()
        return self.slab.columns

    @property
    def capacity(self) -> int:
        return self.slab.capacity

    @property
    def pool(self) -> BufferPool:
        return self._pool

    def mark_written(self, columns: Iterable[str], device: str | None = None) -> None:
        """Forget device copies of ``columns`` made stale by a write (except ``device``'s own)."""
        cache = self.device_cache
        if not cache:
            return
        names = set(columns)
        for key in [k for k in cache if k[1] in names and k[0] != device]:
            del cache[key]

    def __getitem__(self, name: str) -> np.ndarray:
        self._check_live()
        try:
            return self.slab.columns[name][: self.length]
        except KeyError:
            raise KeyError(
                f"slab has no column {name!r}; columns are {sorted(self.slab.columns)}"
            ) from None

    def __len__(self) -> int:
        return self.length

    def __contains__(self, name: str) -> bool:
        return name in self.slab.columns

    # --- reference counting ------------------------------------------------------------
    @property
    def refcount(self) -> int:
        return sum(self._holders.values())

    @property
    def holders(self) -> list[str]:
        return sorted(name for name, n in self._holders.items() for _ in range(n))

    @property
    def released(self) -> bool:
        return not self._holders

    def retain(self, holder: str) -> Lease:
        """Add a reference for ``holder`` (a stage or subscription name)."""
        holders = self._holders
        if not holders:
            self._check_live()
        holders[holder] = holders.get(holder, 0) + 1
        return self

    def release(self, holder: str | None = None) -> None:
        """Drop one reference of ``holder`` (or the only one); the last returns the slab."""
        holders = self._holders
        if len(holders) == 1 and holders.get(holder) == 1:
            # the last reference, the one it was acquired with (every live tick's lease): the
            # general path's checks all pass, so go straight to the return
            holders.clear()
            if self.device_cache:
                self.device_cache.clear()
            self._pool._return(self)
            if self.on_release is not None:
                self.on_release(self)
            return
        if not holders:
            raise LeaseError(f"lease of slab {self.slab.index} (batch {self.seq}) released twice")
        if holder is None:
            if len(self._holders) != 1:
                raise LeaseError(
                    f"lease of slab {self.slab.index} has several holders {self.holders}: "
                    "name the one releasing"
                )
            holder = next(iter(self._holders))
        count = self._holders.get(holder, 0)
        if count <= 0:
            raise LeaseError(
                f"{holder!r} releases a lease of slab {self.slab.index} it does not hold "
                f"(holders: {self.holders})"
            )
        if count == 1:
            del self._holders[holder]
        else:
            self._holders[holder] = count - 1
        if not self._holders:
            self.device_cache.clear()
            self._pool._return(self)
            if self.on_release is not None:
                self.on_release(self)

    def _check_live(self) -> None:
        if not self._holders:
            raise LeaseError(
                f"batch {self.seq} used after its lease returned slab {self.slab.index} "
                "to the pool: retain() it if a handler keeps it"
            )

    def __repr__(self) -> str:
        return f"Lease(batch={self.seq}, slab={self.slab.index}, rows={self.length}, holders={self.holders})"


@dataclass
class PoolStats:
    """Counters a user looks at when sizing a pipeline (all cumulative except in_use)."""

    slabs: int
    capacity: int
    slab_bytes: int
    memory: str
    in_use: int
    high_water: int
    acquired: int
    acquire_waits: int
    acquire_wait_s: float
    bytes_copied_h2d: int
    bytes_copied_d2h: int
    copies_h2d: int
    copies_d2h: int


class BufferPool:
    """A fixed set of slabs handed out as leases; ``acquire`` waits when all are in use."""

    def __init__(
        self,
        columns: Iterable[ColumnSpec] = TICK_COLUMNS,
        capacity: int = 4096,
        slabs: int = 8,
        *,
        memory: str = "host",
        name: str = "pool",
    ):
        if capacity < 1 or slabs < 1:
            raise ConfigError(f"pool {name!r}: capacity and slabs must be >= 1 (got {capacity}, {slabs})")
        specs = list(columns)
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"pool {name!r}: columns declared twice: {dupes}")
        self.name = name
        self.specs: tuple[ColumnSpec, ...] = tuple(specs)
        self.capacity = capacity
        self.memory = _resolve_memory(memory)
        self._key = _slab_key(self.specs, capacity, slabs, self.memory)
        kept = _kept_slabs.pop(self._key, None) if _keep else None
        if kept is not None:
            self._slabs = kept
        else:
            layout = None if self.memory == "unified" else slab_layout(self.specs, capacity)
            lazy = layout is not None and layout.nbytes >= LAZY_FILL_BYTES
            self._slabs = [Slab(i, self.specs, capacity, self.memory, layout, lazy=lazy)
                           for i in range(slabs)]
        self.reused_slabs = kept is not None
        """Whether the slabs came from a pool closed before (:func:`keep_slabs`)."""
        # taken from the right (the slab released last: its pages and cache lines are warm,
        # and a lazy slab no batch needs is never filled), slab 0 first
        self._free: collections.deque[Slab] = collections.deque(reversed(self._slabs))
        self._waiters: collections.deque[asyncio.Future[Slab]] = collections.deque()
        self._live: dict[int, Lease] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._seq = 0
        self._high_water = 0
        self._acquired = 0
        self._waits = 0
        self._wait_s = 0.0
        self._h2d = [0, 0]
        self._d2h = [0, 0]
        self._closed = False

    @classmethod
    def with_outputs(
        cls, outputs: Iterable[ColumnSpec], **kwargs: Any
    ) -> BufferPool:
        """A pool whose slabs carry the tick columns plus the stages' output columns."""
        return cls((*TICK_COLUMNS, *outputs), **kwargs)

    # --- leasing -----------------------------------------------------------------------
    def acquire_nowait(self, holder: str = "source") -> Lease | None:
        """A free slab now, or None (then ``acquire`` waits for one): the live ingress's fast
        path, without a coroutine per tick."""
        if self._closed or not self._free or self._waiters:
            return None
        return self._lease(self._free.pop(), holder)

    async def acquire(self, holder: str = "source", timeout: float | None = None) -> Lease:
        """Lease a free slab, waiting (backpressure) while all are in use."""
        if self._closed:
            raise LeaseError(f"pool {self.name!r} is closed")
        if self._free and not self._waiters:
            slab = self._free.pop()
        else:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Slab] = loop.create_future()
            self._waiters.append(fut)
            self._waits += 1
            t0 = loop.time()
            try:
                slab = await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
            except TimeoutError:
                raise PoolExhaustedError(
                    f"pool {self.name!r}: no slab free after {timeout}s; all {len(self._slabs)} "
                    f"are held by {self.holders()}. A stage is slow or keeps leases: release "
                    "them, or give the pool more slabs"
                ) from None
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._give(fut.result())
                raise
            finally:
                self._wait_s += loop.time() - t0
                if fut in self._waiters:
                    self._waiters.remove(fut)
        return self._lease(slab, holder)

    def _lease(self, slab: Slab, holder: str) -> Lease:
        if slab.unfilled is not None:
            slab.fill_pending()
        self._seq += 1
        lease = Lease(self, slab, holder, self._seq)
        live = self._live
        live[slab.index] = lease
        self._acquired += 1
        if len(live) > self._high_water:
            self._high_water = len(live)
        return lease

    def _return(self, lease: Lease) -> None:
        slab = lease.slab
        live = self._live
        del live[slab.index]
        if self._waiters or (not live and self._idle_waiters):
            self._give(slab)
        else:  # _give's common case: nobody waits
            self._free.append(slab)

    async def wait_idle(self) -> None:
        """Wait until every lease has returned (all in-flight batches are done)."""
        while self._live:
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    def _give(self, slab: Slab) -> None:
        if not self._live:
            while self._idle_waiters:
                fut = self._idle_waiters.pop()
                if not fut.done():
                    fut.set_result(None)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(slab)
                return
        self._free.append(slab)

    # --- copy accounting ---------------------------------------------------------------
    def count_copy(self, direction: str, nbytes: int) -> None:
        """Record a host→device (``"h2d"``) or device→host (``"d2h"``) copy of a column."""
        counter = self._h2d if direction == "h2d" else self._d2h
        counter[0] += 1
        counter[1] += int(nbytes)

    # --- introspection -----------------------------------------------------------------
    def holders(self) -> dict[str, int]:
        """Holder name → number of leases it holds a reference to."""
        out: collections.Counter[str] = collections.Counter()
        for lease in self._live.values():
            out.update(set(lease._holders))
        return dict(out)

    @property
    def in_use(self) -> int:
        return len(self._live)

    @property
    def slabs(self) -> list[Slab]:
        return list(self._slabs)

    def stats(self) -> PoolStats:
        return PoolStats(
            slabs=len(self._slabs),
            capacity=self.capacity,
            slab_bytes=self._slabs[0].nbytes,
            memory=self.memory,
            in_use=self.in_use,
            high_water=self._high_water,
            acquired=self._acquired,
            acquire_waits=self._waits,
            acquire_wait_s=self._wait_s,
            bytes_copied_h2d=self._h2d[1],
            bytes_copied_d2h=self._d2h[1],
            copies_h2d=self._h2d[0],
            copies_d2h=self._d2h[0],
        )

    def leaks(self) -> list[Lease]:
        """Leases not yet returned (at close: leaked)."""
        return list(self._live.values())

    def close(self) -> list[Lease]:
        """Close the pool; report (log and return) every lease still held, with its holders."""
        first_close = not self._closed
        self._closed = True
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        leaked = self.leaks()
        for lease in leaked:
            log.warning(
                "lease_leaked",
                pool=self.name,
                slab=lease.slab.index,
                batch=lease.seq,
                rows=lease.length,
                holders=lease.holders,
            )
        if (_keep and first_close and len(self._free) == len(self._slabs)
                and self.memory in ("host", "pinned")):
            # every slab back in the free list: none leased (a leaked lease may still be written
            # by its holder), none handed to a waiter that has not resumed yet (it would lease
            # it from this closed pool while the next pool uses it); MLX's unified slabs not kept
            _kept_slabs[self._key] = self._slabs
        return leaked
