"""BufferPool: slabs, leases, reference counts, backpressure, leaks, zero copies."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import numpy as np
import pytest

from nautilus_pipeline.errors import ConfigError, LeaseError, PoolExhaustedError
from nautilus_pipeline.events import TICK_COLUMNS, ColumnSpec
from nautilus_pipeline.memory import BufferPool, Slab

FEATURES = ColumnSpec("features", np.dtype(np.float32), (8,))


FILL_SPECS = [ColumnSpec("nan", np.dtype(np.float64), fill=np.nan),
              ColumnSpec("neg_zero", np.dtype(np.float32), (3,), fill=-0.0),
              ColumnSpec("zero", np.dtype(np.float64), fill=0.0),
              ColumnSpec("minus_one", np.dtype(np.int8), fill=-1),
              ColumnSpec("false", np.dtype(np.bool_), fill=False),
              ColumnSpec("true", np.dtype(np.bool_), (2,), fill=True)]


def _holds_its_fills(columns: dict, capacity: int) -> bool:
    return all(columns[s.name].tobytes() == np.full((capacity, *s.shape), s.fill, dtype=s.dtype).tobytes()
               for s in FILL_SPECS)


@pytest.mark.parametrize("lazy", [False, True], ids=["filled-when-made", "filled-at-first-lease"])
async def test_every_slab_column_holds_its_fill_bit_for_bit(lazy, monkeypatch):
    """The layout skips the fill where the zeroed backing holds it already: each column
    still equals ``np.full`` of its fill, bytes and all (-0.0 and NaN filled, +0 and False
    left as zeroed), in every slab of the pool, from its first lease: a pool of small slabs
    filled when made, one of slabs from LAZY_FILL_BYTES at their first lease (here forced
    with the threshold at 0), through a waiter's hand-over too."""
    from nautilus_pipeline import memory

    if lazy:
        monkeypatch.setattr(memory, "LAZY_FILL_BYTES", 0)
    pool = BufferPool(FILL_SPECS, capacity=37, slabs=3)
    assert all((s.unfilled is not None) is lazy for s in pool.slabs)
    leases = [await pool.acquire("test") for _ in pool.slabs]
    assert sorted(lease.slab.index for lease in leases) == [0, 1, 2]
    assert all(_holds_its_fills(lease.columns, 37) for lease in leases)
    assert all(s.unfilled is None for s in pool.slabs)
    # a waiter: the slab released while it waits is handed to it, then leased
    waiting = asyncio.ensure_future(pool.acquire("waiter"))
    await asyncio.sleep(0)
    leases[1].release()
    assert (await waiting).slab.index == 1
    eager = Slab(0, FILL_SPECS, 37, "host")  # a slab made on its own is filled when made
    assert _holds_its_fills(eager.columns, 37)


async def test_kept_slabs_never_leased_are_filled_at_their_lease_in_the_next_pool(monkeypatch):
    from nautilus_pipeline import memory

    monkeypatch.setattr(memory, "LAZY_FILL_BYTES", 0)
    memory.keep_slabs()
    try:
        first = BufferPool(FILL_SPECS, capacity=37, slabs=3)
        (await first.acquire("only one")).release()
        first.close()
        again = BufferPool(FILL_SPECS, capacity=37, slabs=3)
        assert again.reused_slabs
        assert [s.unfilled is None for s in again.slabs] == [True, False, False]
        leases = [await again.acquire("test") for _ in range(3)]
        assert all(_holds_its_fills(lease.columns, 37) for lease in leases)
    finally:
        memory.keep_slabs(False)


async def test_a_pool_reuses_the_slab_released_last_and_never_writes_one_no_batch_took():
    """One batch at a time (a serial replay) takes the same slab again: the pool's other
    slabs keep their zeroed pages unwritten (a 262,144-row pool of 8 slabs is 566 MB), and
    with several in flight each slab is filled at its first lease; slabs under
    LAZY_FILL_BYTES are filled when the pool is made."""
    specs = [ColumnSpec("nan", np.dtype(np.float64), fill=np.nan)]
    pool = BufferPool(specs, capacity=1 << 20, slabs=8)  # 8 MiB a slab: filled at first lease
    small = BufferPool(specs, capacity=1 << 16, slabs=2)  # 0.5 MiB: filled when made
    assert all(s.unfilled is None and np.isnan(s.columns["nan"]).all() for s in small.slabs)
    for i in range(20):
        lease = await pool.acquire("serial")
        assert lease.slab.index == 0
        assert np.isnan(lease.columns["nan"][5:]).all() and (i > 0 or np.isnan(lease.columns["nan"]).all())
        lease.columns["nan"][:5] = 1.0  # a batch's rows (the next batch finds them, as ever)
        lease.release()
    assert [s.unfilled is None for s in pool.slabs] == [True] + [False] * 7
    assert all(not s.columns["nan"].any() for s in pool.slabs[1:])  # still the zeroed backing
    held = [await pool.acquire("pipelined") for _ in range(3)]
    assert [h.slab.index for h in held] == [0, 1, 2]
    assert all(np.isnan(h.columns["nan"]).all() for h in held[1:])
    assert [s.unfilled is None for s in pool.slabs] == [True] * 3 + [False] * 5


async def test_slabs_are_struct_of_arrays_with_declared_outputs():
    pool = BufferPool.with_outputs([FEATURES], capacity=100, slabs=2)
    lease = await pool.acquire("test")
    assert set(lease.columns) == {c.name for c in TICK_COLUMNS} | {"features"}
    assert lease.columns["ts_ns"].dtype == np.int64 and lease.columns["ts_ns"].shape == (100,)
    assert lease.columns["features"].shape == (100, 8)
    assert lease.columns["features"].dtype == np.float32
    assert np.isnan(lease.columns["bid"]).all(), "quote columns default to NaN"
    for col in lease.columns.values():
        assert col.ctypes.data % 64 == 0, "columns start on a cache line"
    lease.length = 10
    assert lease["price"].shape == (10,)
    lease.release("test")


async def test_lease_views_share_memory_with_the_slab():
    pool = BufferPool(capacity=16, slabs=1)
    lease = await pool.acquire("reader")
    lease.length = 4
    view = lease["price"]
    view[:] = [1.0, 2.0, 3.0, 4.0]
    assert np.shares_memory(view, lease.slab.columns["price"])
    assert lease.slab.columns["price"][:4].tolist() == [1.0, 2.0, 3.0, 4.0]
    lease.release("reader")


async def test_refcount_returns_the_slab_after_the_last_release():
    pool = BufferPool(capacity=4, slabs=1)
    lease = await pool.acquire("source")
    lease.retain("features").retain("vpin")
    assert lease.refcount == 3
    lease.release("source")
    lease.release("features")
    assert pool.in_use == 1
    lease.release("vpin")
    assert pool.in_use == 0
    with pytest.raises(LeaseError, match="released twice"):
        lease.release("vpin")
    with pytest.raises(LeaseError, match="used after"):
        lease["price"]


async def test_releasing_a_lease_one_does_not_hold_is_an_error():
    pool = BufferPool(capacity=4, slabs=1)
    lease = await pool.acquire("source")
    with pytest.raises(LeaseError, match="does not hold"):
        lease.release("someone_else")
    lease.release("source")


async def test_acquire_waits_when_all_slabs_are_in_use():
    pool = BufferPool(capacity=4, slabs=2)
    a = await pool.acquire("a")
    b = await pool.acquire("b")
    waiter = asyncio.ensure_future(pool.acquire("c"))
    await asyncio.sleep(0.01)
    assert not waiter.done(), "third acquire must wait: no unbounded growth"
    a.release("a")
    c = await asyncio.wait_for(waiter, 1)
    assert c.slab is a.slab
    assert pool.stats().acquire_waits == 1
    assert pool.stats().high_water == 2
    b.release("b")
    c.release("c")


async def test_acquire_timeout_names_who_holds_the_slabs():
    pool = BufferPool(capacity=4, slabs=2, name="ticks")
    await pool.acquire("stage:vpin")
    await pool.acquire("stage:risk")
    with pytest.raises(PoolExhaustedError, match=r"stage:risk.*stage:vpin|stage:vpin.*stage:risk"):
        await pool.acquire("reader", timeout=0.01)


async def test_a_cancelled_waiter_does_not_lose_a_slab():
    pool = BufferPool(capacity=4, slabs=1)
    a = await pool.acquire("a")
    waiter = asyncio.ensure_future(pool.acquire("b"))
    await asyncio.sleep(0)
    waiter.cancel()
    a.release("a")
    await asyncio.gather(waiter, return_exceptions=True)
    b = await asyncio.wait_for(pool.acquire("b"), 1)
    assert pool.in_use == 1
    b.release("b")


async def test_leaked_lease_is_reported_at_close_with_its_holder(capsys):
    pool = BufferPool(capacity=4, slabs=2)
    lease = await pool.acquire("source")
    lease.retain("stage:features")
    lease.release("source")
    leaked = pool.close()
    assert leaked == [lease]
    assert leaked[0].holders == ["stage:features"]


async def test_wait_idle_returns_when_every_lease_is_back():
    pool = BufferPool(capacity=4, slabs=2)
    lease = await pool.acquire("x")
    idle = asyncio.ensure_future(pool.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()
    lease.release("x")
    await asyncio.wait_for(idle, 1)


def test_bad_layouts_are_rejected():
    with pytest.raises(ConfigError, match="declared twice"):
        BufferPool.with_outputs([ColumnSpec("price", np.dtype(np.float64))])
    with pytest.raises(ConfigError):
        BufferPool(capacity=0)
    with pytest.raises(ConfigError, match="memory kind"):
        BufferPool(memory="gpu")


async def test_steady_state_allocates_nothing_per_tick():
    """A long run through acquire/fill/release keeps memory flat (tracemalloc)."""
    pool = BufferPool.with_outputs([FEATURES], capacity=1024, slabs=4)

    async def one_round():
        lease = await pool.acquire("src")
        lease.length = 1024
        lease["price"][:] = 1.5
        lease["features"][:] = 0.25
        lease.retain("sink")
        lease.release("src")
        lease.release("sink")

    for _ in range(200):  # warm up caches (asyncio, numpy)
        await one_round()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(5000):  # 5 million ticks
            await one_round()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 16 * 1024, f"memory grew by {growth} bytes over 5M ticks"


async def test_unified_memory_slabs_are_mlx_arrays_with_numpy_views():
    mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
    pool = BufferPool.with_outputs([FEATURES], capacity=8, slabs=1, memory="unified")
    lease = await pool.acquire("x")
    lease.length = 3
    lease["ts_ns"][:] = [10, 20, 30]
    lease["features"][:, 0] = [0.5, 1.5, 2.5]
    for name in ("ts_ns", "features"):
        arr = lease.slab.mlx_columns[name]
        assert isinstance(arr, mx.array)
        assert np.shares_memory(np.array(arr, copy=False), lease.columns[name])
    assert np.array(lease.slab.mlx_columns["ts_ns"][:3]).tolist() == [10, 20, 30], (
        "MLX sees what numpy wrote"
    )
    assert np.array(lease.slab.mlx_columns["features"][:3, 0]).tolist() == [0.5, 1.5, 2.5]
    lease.release("x")


async def test_unified_memory_keeps_float64_columns_on_the_host():
    pytest.importorskip("mlx.core", reason="mlx is not installed")
    pool = BufferPool(capacity=8, slabs=1, memory="unified")
    lease = await pool.acquire("x")
    assert "price" not in lease.slab.mlx_columns, "no MLX GPU has float64: price stays numpy"
    assert lease.columns["price"].dtype == np.float64
    assert np.isnan(lease.columns["bid"]).all(), "host columns get their fill too"
    lease.release("x")


@pytest.mark.parametrize("device", ["cpu", "gpu"])
async def test_mlx_stream_reads_a_float64_column_once_per_batch(device: str):
    mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
    from nautilus_pipeline.compute import create_stream, unusable_reason

    why = unusable_reason(f"mlx:{device}")
    if why is not None:
        pytest.skip(reason=f"mlx:{device}: {why}")
    stream = create_stream(f"mlx:{device}")
    pool = BufferPool(capacity=16, slabs=1, memory="unified")
    lease = await pool.acquire("x")
    lease.length = 4
    lease["price"][:] = [61_800.1, 61_800.2, 61_800.3, 61_800.4]
    first = stream.to_device(lease, "price")
    again = stream.to_device(lease, "price")
    assert again is first, "the second stage on the device takes the cached copy"
    want = mx.float32 if device == "gpu" else mx.float64
    assert first.dtype == want
    total = await stream.run(lambda a: mx.sum(a), first)
    np.testing.assert_allclose(float(total), lease["price"].sum(), rtol=1e-6)
    itemsize = 4 if device == "gpu" else 8
    assert pool.stats().bytes_copied_h2d == 4 * itemsize, "one counted copy of 4 rows"
    lease.release("x")
    stream.close()
