"""EventBus semantics: routing, overflow policies, ordering, errors, lifecycle, requests."""

from __future__ import annotations

import asyncio

import pytest

from nautilus_pipeline.bus import DeadLetter, EventBus, topic_matches, validate_pattern
from nautilus_pipeline.errors import (
    BusClosedError,
    ConfigError,
    HandlerError,
    NoResponderError,
    RequestTimeoutError,
)
from nautilus_pipeline.memory import BufferPool


def collect(into: list):
    def handler(event):
        into.append(event.payload)

    return handler


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("ticks.trades.BINANCE.ETHUSDT", "ticks.trades.BINANCE.ETHUSDT", True),
        ("ticks.trades.BINANCE.ETHUSDT", "ticks.trades.BINANCE.BTCUSDT", False),
        ("ticks.*.BINANCE.ETHUSDT", "ticks.quotes.BINANCE.ETHUSDT", True),
        ("ticks.*", "ticks.trades.BINANCE", False),
        ("ticks.>", "ticks.trades.BINANCE.ETHUSDT", True),
        ("ticks.**", "ticks.trades", True),
        ("ticks.>", "ticks", False),
        ("ticks.*.BINANCE.>", "ticks.trades.BINANCE.ETHUSDT", True),
        ("ticks.*.BINANCE.>", "ticks.trades.OKX.ETHUSDT", False),
        ("*", "ticks", True),
        ("*", "ticks.trades", False),
    ],
)
def test_topic_pattern_grammar(pattern, topic, expected):
    assert topic_matches(validate_pattern(pattern), topic) is expected


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a.tr*des", "a.**.b"])
def test_bad_patterns_are_rejected_with_a_reason(bad):
    with pytest.raises(ConfigError):
        validate_pattern(bad)


async def test_wildcard_subscriptions_receive_matching_topics_only():
    got_all, got_eth = [], []
    async with EventBus() as bus:
        bus.subscribe("ticks.>", collect(got_all))
        bus.subscribe("ticks.*.BINANCE.ETHUSDT", collect(got_eth))
        await bus.publish("ticks.trades.BINANCE.ETHUSDT", 1)
        await bus.publish("ticks.quotes.BINANCE.ETHUSDT", 2)
        await bus.publish("ticks.trades.BINANCE.BTCUSDT", 3)
        await bus.publish("signals.ETHUSDT", 4)
    assert got_all == [1, 2, 3]
    assert got_eth == [1, 2]


async def test_delivery_order_is_publish_order_for_async_and_sync_handlers():
    got_sync, got_async = [], []

    async def slow(event):
        if event.payload % 7 == 0:
            await asyncio.sleep(0)
        got_async.append(event.payload)

    async with EventBus() as bus:
        bus.subscribe("t", collect(got_sync), maxsize=4)
        bus.subscribe("t", slow, maxsize=4)
        for i in range(500):
            await bus.publish("t", i)
    assert got_sync == list(range(500))
    assert got_async == list(range(500))


async def test_block_policy_applies_backpressure_to_the_publisher():
    gate = asyncio.Event()
    got = []

    async def handler(event):
        await gate.wait()
        got.append(event.payload)

    async with EventBus() as bus:
        sub = bus.subscribe("t", handler, maxsize=2, overflow="block")
        await bus.publish("t", 0)
        await asyncio.sleep(0)  # consumer takes event 0 and waits on the gate
        await bus.publish("t", 1)
        await bus.publish("t", 2)
        third = asyncio.ensure_future(bus.publish("t", 3))
        await asyncio.sleep(0.01)
        assert not third.done(), "publisher must wait while the queue is full"
        assert sub.metrics.queue_high_water == 2
        gate.set()
        await third
    assert got == [0, 1, 2, 3]
    assert sub.metrics.dropped == 0


async def _fill_while_blocked(overflow: str, payloads, keys=None):
    gate = asyncio.Event()
    got = []

    async def handler(event):
        await gate.wait()
        got.append(event.payload)

    async with EventBus() as bus:
        sub = bus.subscribe("t", handler, maxsize=3, overflow=overflow)
        await bus.publish("t", "first")
        await asyncio.sleep(0)  # "first" is in the handler, the queue is empty
        for i, p in enumerate(payloads):
            await bus.publish("t", p, key=None if keys is None else keys[i])
        gate.set()
    return got, sub.metrics


async def test_drop_oldest_keeps_the_newest_and_counts_drops():
    got, m = await _fill_while_blocked("drop_oldest", [1, 2, 3, 4, 5])
    assert got == ["first", 3, 4, 5]
    assert m.dropped == 2
    assert m.published == 6
    assert m.delivered == 4


async def test_drop_newest_keeps_the_oldest_and_counts_drops():
    got, m = await _fill_while_blocked("drop_newest", [1, 2, 3, 4, 5])
    assert got == ["first", 1, 2, 3]
    assert m.dropped == 2


async def test_conflate_keeps_the_latest_per_key_in_place():
    got, m = await _fill_while_blocked(
        "conflate", ["a1", "b1", "c1", "a2", "b2", "a3"], keys=["a", "b", "c", "a", "b", "a"]
    )
    assert got == ["first", "a3", "b2", "c1"]
    assert m.dropped == 3


async def test_drops_of_leases_return_slabs_to_the_pool():
    pool = BufferPool(capacity=8, slabs=4)
    gate = asyncio.Event()

    async def handler(event):
        await gate.wait()

    async with EventBus() as bus:
        bus.subscribe("t", handler, maxsize=1, overflow="drop_oldest")
        for _ in range(4):
            lease = await pool.acquire("test")
            await bus.publish("t", lease)
            lease.release("test")
            await asyncio.sleep(0)
        assert pool.in_use == 2  # one in the handler, one queued; two dropped and returned
        gate.set()
    assert pool.in_use == 0


async def test_failing_handler_is_isolated_counted_and_dead_lettered():
    got, letters = [], []

    def flaky(event):
        if event.payload == 2:
            raise ValueError("bad tick")
        got.append(event.payload)

    async with EventBus(on_error="isolate") as bus:
        sub = bus.subscribe("ticks.x", flaky)
        bus.subscribe("deadletter.>", collect(letters))
        for i in range(4):
            await bus.publish("ticks.x", i)
    assert got == [0, 1, 3]
    assert sub.metrics.errors == 1
    assert sub.metrics.delivered == 3
    assert len(letters) == 1
    letter = letters[0]
    assert isinstance(letter, DeadLetter)
    assert letter.event.topic == "ticks.x" and letter.event.payload == 2
    assert letter.subscription == sub.name
    assert isinstance(letter.error, ValueError)


async def test_fail_fast_stops_the_bus_and_surfaces_the_error_to_the_owner():
    def boom(event):
        raise RuntimeError("stage exploded")

    with pytest.raises(HandlerError, match="stage exploded") as info:
        async with EventBus(on_error="fail_fast") as bus:
            bus.subscribe("t", boom, name="boom")
            await bus.publish("t", 1)
            await bus.wait_closed()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert bus.closed
    assert bus.tasks() == []


async def test_publish_after_fail_fast_raises_instead_of_hanging():
    def boom(event):
        raise RuntimeError("nope")

    bus = EventBus(on_error="fail_fast")
    with pytest.raises(HandlerError):
        async with bus:
            bus.subscribe("t", boom)
            await bus.publish("t", 1)
            await asyncio.sleep(0.01)
            with pytest.raises(HandlerError):
                await bus.publish("t", 2)
    assert bus.tasks() == []


async def test_close_drains_queued_events_by_default():
    got = []

    async def slow(event):
        await asyncio.sleep(0)
        got.append(event.payload)

    bus = EventBus()
    async with bus:
        bus.subscribe("t", slow, maxsize=1000)
        for i in range(100):
            bus.publish_nowait("t", i)
    assert got == list(range(100))


async def test_close_without_drain_cancels_and_counts_what_was_queued():
    got = []
    pool = BufferPool(capacity=4, slabs=8)

    async def slow(event):
        await asyncio.sleep(10)
        got.append(event)

    bus = EventBus()
    async with bus:
        sub = bus.subscribe("t", slow, maxsize=100)
        for _ in range(5):
            lease = await pool.acquire("src")
            await bus.publish("t", lease)
            lease.release("src")
        await asyncio.sleep(0)
        await bus.close(drain=False)
    assert got == []
    assert sub.metrics.discarded == 4  # one was in the handler when it was cancelled
    assert pool.in_use == 0, "cancelled and discarded events must release their leases"


async def test_no_task_of_the_bus_survives_close():
    before = asyncio.all_tasks()

    async def handler(event):
        await asyncio.sleep(0)

    async with EventBus() as bus:
        for i in range(10):
            bus.subscribe(f"t.{i}", handler)
            bus.subscribe("t.>", handler)
        for i in range(10):
            await bus.publish(f"t.{i}", i)
        assert len(bus.tasks()) == 20
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before
    assert bus.tasks() == []


async def test_publish_and_subscribe_after_close_are_errors():
    bus = EventBus()
    async with bus:
        pass
    with pytest.raises(BusClosedError):
        await bus.publish("t", 1)
    with pytest.raises(BusClosedError):
        bus.subscribe("t", print)


async def test_request_gets_the_responders_reply():
    async with EventBus() as bus:
        bus.respond("control.stats.features", lambda event: {"batches": 3, "asked": event.payload})
        reply = await bus.request("control.stats.features", "all", timeout=1)
    assert reply == {"batches": 3, "asked": "all"}


async def test_request_without_responder_and_request_timeout():
    async def never(event):
        await asyncio.sleep(10)

    async with EventBus() as bus:
        with pytest.raises(NoResponderError):
            await bus.request("control.nobody", timeout=0.1)
        bus.respond("control.slow", never)
        with pytest.raises(RequestTimeoutError, match=r"control\.slow"):
            await bus.request("control.slow", timeout=0.05)
        await bus.close(drain=False)


async def test_request_sees_the_responders_exception():
    def broken(event):
        raise KeyError("no such stage")

    async with EventBus() as bus:
        bus.respond("control.x", broken)
        with pytest.raises(KeyError):
            await bus.request("control.x", timeout=1)


async def test_metrics_count_published_delivered_and_latency():
    async with EventBus() as bus:
        sub = bus.subscribe("t", lambda e: None)
        for i in range(50):
            await bus.publish("t", i)
    stats = bus.stats()["subscriptions"][sub.name]
    assert stats["published"] == 50
    assert stats["delivered"] == 50
    assert stats["dropped"] == 0
    assert stats["handler_latency"]["count"] == 50
    assert stats["handler_latency"]["max_us"] >= stats["handler_latency"]["p50_us"] >= 0


async def test_a_lease_delivered_to_several_subscribers_returns_once_all_are_done():
    pool = BufferPool(capacity=16, slabs=2)
    gate = asyncio.Event()
    seen = []

    async def slow(event):
        await gate.wait()
        seen.append(event.payload.refcount)

    async with EventBus() as bus:
        bus.subscribe("batch", lambda e: seen.append(e.payload.refcount), name="fast")
        bus.subscribe("batch", slow, name="slow")
        lease = await pool.acquire("source")
        await bus.publish("batch", lease)
        lease.release("source")
        await asyncio.sleep(0.01)
        assert pool.in_use == 1, "the slow subscriber still holds the batch"
        assert lease.holders == ["slow"]
        gate.set()
    assert pool.in_use == 0
