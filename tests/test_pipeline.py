"""A toy 4-stage pipeline end to end: wiring, zero copies, accounting, fallback, shutdown."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from nautilus_pipeline.bus import EventBus
from nautilus_pipeline.errors import ConfigError, HandlerError
from nautilus_pipeline.events import ColumnSpec, TradeTick
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import Stage

F64 = np.dtype(np.float64)


class Notional(Stage):
    name = "notional"
    reads = ("price", "size")
    writes = (ColumnSpec("notional", F64, fill=np.nan),)

    def __init__(self):
        self.views = []

    async def process(self, lease, stream, ctx):
        out = lease["notional"]
        self.views.append(out)
        await stream.run(np.multiply, lease["price"], lease["size"], out=out)


class CumVolume(Stage):
    """Stateful across batches: cumulative size, committed only after success."""

    name = "cumvol"
    reads = ("size",)
    writes = (ColumnSpec("cum_size", F64),)

    def __init__(self):
        self.total = 0.0

    async def process(self, lease, stream, ctx):
        cum = np.cumsum(lease["size"]) + self.total
        lease["cum_size"][:] = cum
        self.total = float(cum[-1])


class Double(Stage):
    name = "double"
    reads = ("notional",)
    writes = (ColumnSpec("double", F64),)

    def __init__(self):
        self.views = []

    async def process(self, lease, stream, ctx):
        self.views.append(lease["notional"])
        np.multiply(lease["notional"], 2.0, out=lease["double"])


class Sink(Stage):
    name = "sink"
    reads = ("double", "cum_size", "ts_ns")

    def __init__(self):
        self.double = []
        self.cum = []
        self.ts = []
        self.finished = False

    async def process(self, lease, stream, ctx):
        self.double.append(lease["double"].copy())
        self.cum.append(lease["cum_size"].copy())
        self.ts.append(lease["ts_ns"].copy())

    async def finish(self, ctx):
        self.finished = True


def ticks(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "ts_ns": np.arange(n, dtype=np.int64) * 1_000_000,
        "price": 100 + rng.standard_normal(n).cumsum() * 0.01,
        "size": rng.exponential(1.0, n),
        "side": rng.choice([-1, 1], n).astype(np.int8),
    }


def toy(**kwargs):
    stages = [Notional(), CumVolume(), Double(), Sink()]
    return stages, Pipeline(stages, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
async def test_four_stages_give_the_same_numbers_for_any_batch_size(batch_size):
    data = ticks(3000)
    stages, pipe = toy(batch_size=batch_size, slabs=4, memory="host")
    async with pipe:
        await pipe.ingest(data)
    sink = stages[-1]
    np.testing.assert_array_equal(np.concatenate(sink.ts), data["ts_ns"])
    np.testing.assert_allclose(np.concatenate(sink.double), 2 * data["price"] * data["size"], rtol=0)
    np.testing.assert_allclose(np.concatenate(sink.cum), np.cumsum(data["size"]), rtol=1e-12)
    t = pipe.stats()["ticks"]
    assert t == {"ticks_in": 3000, "ticks_not_delivered": 0, "ticks_out": 3000, "ticks_failed": 0, "ticks_discarded": 0, "in_flight": 0}
    assert sink.finished
    assert pipe.pool.in_use == 0 and pipe.leaked == []


async def test_stages_read_what_the_previous_stage_wrote_without_copying():
    stages, pipe = toy(batch_size=64, slabs=2, memory="host")
    async with pipe:
        await pipe.ingest(ticks(64))
        await pipe.drain()
    notional, _, double, _ = stages
    assert np.shares_memory(notional.views[0], double.views[0])
    assert pipe.pool.stats().bytes_copied_h2d == 0


async def test_micro_batcher_sends_at_batch_size_or_deadline():
    stages, pipe = toy(batch_size=4, slabs=4, memory="host", max_delay_us=2000)
    sink = stages[-1]
    async with pipe:
        for i in range(9):
            await pipe.publish_tick(TradeTick("ETHUSDT", ts_ns=i, price=100.0 + i, size=1.0, side=1))
        await asyncio.sleep(0.05)  # the 9th tick goes out at the deadline, not at close
        assert [len(b) for b in sink.ts] == [4, 4, 1]
    assert pipe.symbols.name_of(0) == "ETHUSDT"


async def test_a_failing_stream_falls_back_and_no_tick_is_lost():
    class FlakyDevice(Notional):
        name = "flaky"
        streams = ("torch:cpu", "cpu")

        def __init__(self):
            super().__init__()
            self.fail_on = {2, 5}
            self.calls = 0

        async def process(self, lease, stream, ctx):
            self.calls += 1
            if stream.name == "torch:cpu" and self.calls in self.fail_on:
                raise RuntimeError("CUDA error: out of memory (simulated)")
            await super().process(lease, stream, ctx)

    pytest.importorskip("torch", reason="torch is not installed")
    flaky = FlakyDevice()
    stages = [flaky, CumVolume(), Double(), Sink()]
    data = ticks(100)
    async with Pipeline(stages, batch_size=10, slabs=3, memory="host") as pipe:
        await pipe.ingest(data)
    runner = pipe.runners[0]
    assert runner.stream.name == "torch:cpu"
    assert runner.metrics.fallbacks == 2
    np.testing.assert_allclose(np.concatenate(stages[-1].double), 2 * data["price"] * data["size"])
    assert pipe.stats()["ticks"]["ticks_out"] == 100


async def test_a_failing_stage_is_reported_with_context_and_does_not_hang_the_bus():
    class Broken(Double):
        name = "broken"

        async def process(self, lease, stream, ctx):
            if lease["ts_ns"][0] == 20 * 1_000_000:
                raise ValueError("bad batch")
            await super().process(lease, stream, ctx)

    letters = []
    stages = [Notional(), CumVolume(), Broken(), Sink()]
    bus = EventBus()
    async with bus:
        bus.subscribe("deadletter.>", lambda e: letters.append(e.payload))
        async with Pipeline(stages, batch_size=10, slabs=2, memory="host", bus=bus) as pipe:
            await asyncio.wait_for(pipe.ingest(ticks(50)), 5)
    assert pipe.stats()["ticks"] == {"ticks_in": 50, "ticks_not_delivered": 0, "ticks_out": 40, "ticks_failed": 10, "ticks_discarded": 0, "in_flight": 0}
    assert len(letters) == 1
    assert "stage 'broken' failed on batch" in str(letters[0].error)
    assert "10 rows" in str(letters[0].error)
    assert pipe.pool.in_use == 0


async def test_fail_fast_pipeline_surfaces_the_stage_error_to_its_owner():
    class Broken(Double):
        name = "broken"

        async def process(self, lease, stream, ctx):
            raise ValueError("kernel exploded")

    pipe = Pipeline([Notional(), CumVolume(), Broken(), Sink()], batch_size=8, slabs=2, memory="host",
                    on_error="fail_fast")
    with pytest.raises(HandlerError, match="kernel exploded"):
        async with pipe:
            await pipe.ingest(ticks(8))
            await pipe.drain()
    assert pipe.bus.tasks() == []
    assert pipe.pool.in_use == 0


async def test_close_leaves_no_task_behind():
    before = asyncio.all_tasks()
    _, pipe = toy(batch_size=16, slabs=2, memory="host", max_delay_us=10_000)
    async with pipe:
        await pipe.publish_tick(TradeTick("X", 1, 1.0, 1.0))  # arms the batcher's deadline
        await pipe.ingest(ticks(100))
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before


async def test_stats_are_served_over_the_bus():
    _, pipe = toy(batch_size=16, slabs=2, memory="host")
    async with pipe:
        await pipe.ingest(ticks(40))
        await pipe.drain()
        stats = await pipe.bus.request("control.default.stats", timeout=1)
    assert [s["stage"] for s in stats["stages"]] == ["notional", "cumvol", "double", "sink"]
    assert stats["stages"][0]["batches"] == 3
    assert stats["stages"][0]["batch_latency"]["count"] == 3
    assert stats["pool"]["high_water"] >= 1


def test_a_stage_reading_a_column_nobody_writes_fails_at_build():
    class NeedsFeatures(Sink):
        reads = ("features",)

    with pytest.raises(ConfigError, match=r"reads \['features'\]"):
        Pipeline([Notional(), NeedsFeatures()])


async def test_unknown_symbols_are_rejected_when_the_pipeline_lists_its_symbols():
    from nautilus_pipeline.symbols import SymbolTable

    _, pipe = toy(batch_size=4, slabs=2, memory="host", symbols=SymbolTable(allowed=["ETHUSDT"]))
    async with pipe:
        await pipe.publish_tick(TradeTick("ETHUSDT", 1, 1.0, 1.0))
        with pytest.raises(ConfigError, match="unknown symbol 'DOGEUSDT'"):
            await pipe.publish_tick(TradeTick("DOGEUSDT", 2, 1.0, 1.0))


class SlowSink(Stage):
    name = "slow"
    reads = ("ts_ns",)

    def __init__(self):
        self.rows = 0

    async def process(self, lease, stream, ctx):
        await asyncio.sleep(0.05)
        self.rows += lease.length


async def test_every_micro_batch_gets_its_deadline_even_behind_backpressure():
    sink = SlowSink()
    async with Pipeline([sink], batch_size=1000, max_delay_us=1000, queue_size=1, slabs=8,
                        memory="host") as pipe:
        for i in range(3):
            await pipe.publish_tick(TradeTick("X", 1_000 + i, 1.0, 1.0, 1))
            await asyncio.sleep(0.01)
        await pipe.publish_tick(TradeTick("X", 2_000, 1.0, 1.0, 1))  # the flusher is blocked now
        await asyncio.sleep(0.5)
        assert sink.rows == 4, "the last tick must not wait for more ticks to fill its batch"


async def test_closing_while_a_deadline_flush_waits_delivers_that_batch():
    sink = SlowSink()
    pipe = Pipeline([sink], batch_size=1000, max_delay_us=1000, queue_size=1, slabs=8, memory="host")
    async with pipe:
        for i in range(3):
            await pipe.publish_tick(TradeTick("X", 1_000 + i, 1.0, 1.0, 1))
            await asyncio.sleep(0.01)
    assert sink.rows == 3
    assert pipe.stats()["ticks"]["ticks_not_delivered"] == 0


async def test_ingest_refuses_columns_of_different_lengths():
    _, pipe = toy(batch_size=8, slabs=2, memory="host")
    async with pipe:
        with pytest.raises(ConfigError, match="differ in length"):
            await pipe.ingest({"ts_ns": np.arange(3), "price": np.ones(2)})


async def test_bad_data_is_not_rerun_on_the_fallback_stream():
    from nautilus_pipeline.errors import DataError

    class Picky(Notional):
        name = "picky"
        streams = ("torch:cpu", "cpu")

        async def process(self, lease, stream, ctx):
            raise DataError("price is NaN at row 3")

    pytest.importorskip("torch", reason="torch is not installed")
    async with Pipeline([Picky(), Double(), CumVolume(), Sink()], batch_size=10, slabs=2,
                        memory="host") as pipe:
        await pipe.ingest(ticks(10))
    runner = pipe.runners[0]
    assert runner.metrics.fallbacks == 0
    assert runner.metrics.failed_rows == 10


async def test_a_pipeline_on_a_shared_bus_leaves_no_subscription_behind():
    async with EventBus() as bus:
        before = set(asyncio.all_tasks())
        _, pipe = toy(batch_size=16, slabs=2, memory="host", bus=bus)
        async with pipe:
            await pipe.ingest(ticks(40))
        await asyncio.sleep(0)
        assert bus.subscriptions == []
        assert set(asyncio.all_tasks()) == before
        assert not bus.closed, "the owner's bus keeps running"


async def test_ingest_checks_the_order_on_the_clock_it_is_given():
    """A live spot stream: a quote stamped when received, then a trade stamped with its
    (earlier) exchange time. On ts_ns the trade is out of order and rejected; on the receive
    clock (``run --ws``) both pass."""
    cols = {"ts_ns": np.array([1_000_000, 990_000]), "ts_recv_ns": np.array([1_000_000, 1_000_500]),
            "kind": np.array([1, 0], np.uint8), "price": np.array([np.nan, 100.0]),
            "size": np.array([np.nan, 1.0]), "side": np.array([0, 1], np.int8),
            "bid": np.array([99.9, np.nan]), "ask": np.array([100.1, np.nan]),
            "bid_size": np.array([1.0, np.nan]), "ask_size": np.array([1.0, np.nan])}
    for order_by, delivered in (("ts_ns", 1), ("ts_recv_ns", 2)):
        _, pipe = toy(batch_size=8, slabs=2, memory="host")
        async with pipe:
            sent = await pipe.ingest(cols, symbol="BTCUSDT", policy="reject", order_by=order_by)
        assert sent == delivered, order_by
        total = pipe.ingest_accounting.total.as_dict()
        assert (total["delivered"], total["rejected"]) == (delivered, 2 - delivered), order_by
