"""Slabs kept between pools (``memory.keep_slabs``, on in batch workers): a closed pool's slabs
serve the next pool of the same layout as they are, and a job on them writes what it writes
on fresh ones, whatever the job before them left in the slabs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from nautilus_pipeline import memory
from nautilus_pipeline.batch import replay_job
from nautilus_pipeline.memory import BufferPool


@pytest.fixture
def keep():
    memory.keep_slabs(False)
    memory.keep_slabs()
    yield
    memory.keep_slabs(False)


def slabs_of(pool: BufferPool) -> set[int]:
    return {id(s) for s in pool._slabs}


def test_a_closed_pools_slabs_serve_the_next_pool_of_the_same_layout_only(keep):
    a = BufferPool(capacity=64, slabs=3)
    a.close()
    other_size = BufferPool(capacity=128, slabs=3)
    other_count = BufferPool(capacity=64, slabs=2)
    b = BufferPool(capacity=64, slabs=3)
    assert b.reused_slabs and slabs_of(b) == slabs_of(a)
    assert not other_size.reused_slabs and not other_count.reused_slabs
    c = BufferPool(capacity=64, slabs=3)  # b still open: c gets its own
    assert not c.reused_slabs and not slabs_of(c) & slabs_of(b)


def test_a_pool_closed_twice_or_with_a_lease_out_hands_its_slabs_on_once_or_never(keep):
    a = BufferPool(capacity=64, slabs=2)
    a.close()
    b = BufferPool(capacity=64, slabs=2)
    a.close()  # again: a's slabs are b's now, not kept a second time
    assert b.reused_slabs and not BufferPool(capacity=64, slabs=2).reused_slabs
    c = BufferPool(capacity=32, slabs=2)
    lease = c.acquire_nowait()
    assert lease is not None
    assert c.close() == [lease]  # leaked: its holder may still write the slab
    assert not BufferPool(capacity=32, slabs=2).reused_slabs


def test_with_keeping_off_every_pool_has_fresh_slabs():
    memory.keep_slabs(False)
    a = BufferPool(capacity=64, slabs=2)
    a.close()
    assert not BufferPool(capacity=64, slabs=2).reused_slabs


def test_jobs_on_kept_slabs_write_what_they_write_on_fresh_ones(keep, sample_dir, tmp_path, monkeypatch):
    """Two files of other symbols, prices and sizes one after another in one process, then the
    first again: each job's outputs equal those of its job on fresh slabs, bit for bit."""
    files = [sample_dir / "binance-um-btcusdt-trades-20240808.csv", sample_dir / "binance-spot-ethusdt-trades-20240808.csv"]
    memory.keep_slabs(False)
    fresh = [replay_job("default", [f], tmp_path / f"fresh{i}", None) for i, f in enumerate(files)]
    memory.keep_slabs()
    reused: list[bool] = []
    init = BufferPool.__init__

    def noting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        reused.append(self.reused_slabs)

    monkeypatch.setattr(BufferPool, "__init__", noting)
    kept = [replay_job("default", [f], tmp_path / f"kept{i}", None) for i, f in enumerate([*files, files[0]])]
    assert reused == [False, True, True]  # one pool a job: the second and third on the first's slabs
    for want, got in zip([*fresh, fresh[0]], kept, strict=True):
        for kind in ("signals", "vpin", "risk", "trace"):
            a, b = pq.read_table(want.paths[kind]), pq.read_table(got.paths[kind])
            assert a.num_rows == b.num_rows > 0, kind
            for name in a.column_names:  # NaN where NaN
                assert a[name].to_pylist() == b[name].to_pylist() or _same_nan(a[name], b[name]), (kind, name)


def _same_nan(a, b) -> bool:
    import numpy as np

    x, y = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
    return x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


async def test_a_slab_handed_to_a_waiter_that_has_not_resumed_is_not_kept(keep):
    """Closed between a release that hands the slab to a waiting acquire and that task
    resuming: the waiter still gets its lease from the closed pool, so the slabs must not
    serve the next pool (one slab live in two pools)."""
    import asyncio

    a = BufferPool(capacity=8, slabs=1)
    first = a.acquire_nowait("t1")
    waiter = asyncio.ensure_future(a.acquire("t2"))
    await asyncio.sleep(0)  # t2 waits
    first.release("t1")  # the slab goes to t2's future; t2 has not run yet
    assert a.close() == []
    b = BufferPool(capacity=8, slabs=1)
    assert not b.reused_slabs
    try:
        lease = await waiter
    except Exception:  # (a closed pool may refuse it instead: either way not b's slab)
        return
    assert lease.slab not in b._slabs
    lease.release("t2")
