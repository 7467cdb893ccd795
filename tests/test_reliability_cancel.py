"""Cancelling the task that runs a pipeline: the batches it discards are counted (issue 12, 12).

``Pipeline.close(drain=False)`` drops the batches in flight; ``stats()`` counts them as
``ticks_discarded`` (they used to be reported as ``in_flight`` forever).
"""

from __future__ import annotations

import asyncio

import numpy as np

from nautilus_pipeline.events import ColumnSpec
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import Stage


class Stuck(Stage):
    """Holds its first batch until cancelled."""

    name = "stuck"
    reads = ("price",)
    writes = (ColumnSpec("x", np.dtype(np.float64)),)

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def process(self, lease, stream, ctx):
        self.entered.set()
        await asyncio.Event().wait()


async def _run_and_cancel() -> dict:
    stage = Stuck()
    pipe = Pipeline([stage], batch_size=64, slabs=4, queue_size=2)
    rows = 64 * 3

    async def owner() -> None:
        async with pipe:
            n = len(np.arange(rows))
            await pipe.ingest({"ts_ns": np.arange(n, dtype=np.int64), "price": np.ones(n), "size": np.ones(n)})
            await asyncio.Event().wait()

    task = asyncio.create_task(owner())
    await asyncio.wait_for(stage.entered.wait(), 10)
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return pipe.stats()["ticks"]


async def test_cancelled_pipeline_accounts_every_published_tick_today() -> None:
    """What holds now: nothing reaches the sink, nothing failed, and the identity adds up."""
    t = await _run_and_cancel()
    assert t["ticks_in"] == 192 and t["ticks_out"] == 0 and t["ticks_failed"] == 0
    assert t["ticks_in"] == t["ticks_out"] + t["ticks_failed"] + t["in_flight"] + t.get("ticks_discarded", 0)


async def test_batches_dropped_by_a_cancel_are_counted_as_discarded_not_in_flight() -> None:
    t = await _run_and_cancel()
    assert t["in_flight"] == 0
    assert t["ticks_discarded"] == 192
