"""The inline hand-off: a small batch into an idle stage runs in the publisher's task (no queue
hop), gives the numbers of the queued path, keeps every stage's order, and a failure in it
is the failing stage's, isolated as on the queued path."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from test_integration import COLUMNS, Capture, btc_trades, chain

from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE, AggressorSide, QuoteTick, TradeTick
from nautilus_pipeline.kernels.risk import RiskParams
from nautilus_pipeline.model.runners import runner_usable
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import INLINE_CHAIN_MAX_ROWS, NOT_NOW, Stage
from nautilus_pipeline.stages import FeaturesStage, InferenceStage


def ticks_of(data, n):
    sides = {1: AggressorSide.BUY, -1: AggressorSide.SELL}
    return [TradeTick("BTCUSDT-PERP", int(data["ts_ns"][i]), float(data["price"][i]),
                      float(data["size"][i]), sides[int(data["side"][i])]) for i in range(n)]


async def run_live(data, n, batch_size, limits=None):
    """The default chain fed one tick at a time (the micro-batcher, inline hand-offs)."""
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*chain(limits), capture], batch_size=batch_size, slabs=4, memory="host")
    events: dict[str, list] = {"signals": [], "vpin": [], "risk": []}
    async with pipe:
        for name, got in events.items():
            pipe.bus.subscribe(f"{name}.>", lambda e, got=got: got.append(e.payload))
        for tick in ticks_of(data, n):
            await pipe.publish_tick(tick)
        await pipe.drain()
    inline = sum(r.subscription.delivered for r in pipe.runners)
    return capture.result(), {k: orjson.dumps(v) for k, v in events.items()}, pipe, inline


async def run_queued(data, n, limits=None):
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*chain(limits), capture], batch_size=4096, slabs=4, memory="host", execution="serial")
    events: dict[str, list] = {"signals": [], "vpin": [], "risk": []}
    async with pipe:
        for name, got in events.items():
            pipe.bus.subscribe(f"{name}.>", lambda e, got=got: got.append(e.payload))
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest({k: v[:n] for k, v in data.items()})
    return capture.result(), {k: orjson.dumps(v) for k, v in events.items()}


@pytest.mark.parametrize("batch_size", [1, 7])
async def test_ticks_fed_one_at_a_time_give_the_numbers_of_whole_batches(sample_dir, batch_size):
    data = btc_trades(sample_dir)
    n = 1500
    live, live_events, pipe, _ = await run_live(data, n, batch_size)
    ref, ref_events = await run_queued(data, n)
    assert live_events == ref_events and ref_events["risk"] != b"[]"
    for c in ("ts_ns", *COLUMNS):
        if c == "prediction":  # float32 model: BLAS rounding (see test_integration)
            np.testing.assert_allclose(live[c], ref[c], rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(live[c], ref[c], err_msg=c)
    t = pipe.tick_flow()
    assert t.ticks_in == t.ticks_out == n
    stats = {r.stage.name: r.stats() for r in pipe.runners}
    assert stats["risk"]["fused_batches"] > 0.9 * n / batch_size  # the stages' live kernels ran
    assert stats["vpin"]["small_batches"] > 0.5 * n / batch_size


async def _through_chain(ticks, batch_size):
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*chain(), capture], batch_size=batch_size, slabs=4, memory="host")
    events: dict[str, list] = {"signals": [], "vpin": [], "risk": []}
    async with pipe:
        for name, got in events.items():
            pipe.bus.subscribe(f"{name}.>", lambda e, got=got: got.append(e.payload))
        for tick in ticks:
            await pipe.publish_tick(tick)
        await pipe.drain()
    return capture.result(), {k: orjson.dumps(v) for k, v in events.items()}


async def test_quotes_among_live_trades_give_the_numbers_of_one_batch(sample_dir):
    """Quote rows in the live path: carried by the small kernels, or sent to the batch path."""
    data = btc_trades(sample_dir)
    ticks = []
    for i, t in enumerate(ticks_of(data, 1200)):
        ticks.append(t)
        if i % 3 == 0:
            ticks.append(QuoteTick(t.symbol, t.ts_ns, t.price - 0.1, t.price + 0.1, 1.0 + i % 5, 2.0))
    live, live_events = await _through_chain(ticks, 1)
    ref, ref_events = await _through_chain(ticks, 4096)
    assert live_events == ref_events
    for c in ("ts_ns", *COLUMNS):
        if c != "prediction":
            np.testing.assert_array_equal(live[c], ref[c], err_msg=c)


async def test_the_small_risk_path_trips_the_kill_switch_as_the_batch_path_does(sample_dir):
    """A drawdown limit the account breaches: the breach events, the kill switch and the flat
    signals after it are those of whole batches (the small kernel runs every live tick but
    the ones with a VaR report due)."""
    data = btc_trades(sample_dir)
    n = 1500
    limits = RiskParams(max_drawdown=0.05, fee_rate=4e-4)
    live, live_events, _, _ = await run_live(data, n, 1, limits)
    ref, ref_events = await run_queued(data, n, limits)
    assert b'"breach"' in ref_events["risk"] and live_events == ref_events
    assert ref["kill"].any()
    for c in ("ts_ns", *COLUMNS):
        if c != "prediction":
            np.testing.assert_array_equal(live[c], ref[c], err_msg=c)


class Order(Stage):
    """Records the batches it sees, and whether it ran in the task that published them."""

    reads = ("ts_ns",)

    def __init__(self, name, gate: asyncio.Event | None = None):
        self.name = name
        self.gate = gate
        self.seen: list[int] = []
        self.tasks: list[asyncio.Task | None] = []

    async def process(self, lease, stream, ctx):
        if self.gate is not None and not self.seen:
            await self.gate.wait()
        self.seen.append(int(lease["ts_ns"][0]))
        self.tasks.append(asyncio.current_task())


async def test_a_tick_into_an_idle_pipeline_runs_every_stage_in_the_publishing_task():
    first, last = Order("first"), Order("last")
    async with Pipeline([first, last], batch_size=1, memory="host") as pipe:
        await pipe.publish_tick(TradeTick("X", 5, 1.0, 1.0, 1))
        # batch_size 1: the batch left inside publish_tick and went through both stages there
        assert first.seen == last.seen == [5]
        assert first.tasks == last.tasks == [asyncio.current_task()]
    assert all(r.subscription.delivered == 1 for r in pipe.runners)


async def test_publish_tick_stores_what_numpy_would_store_whatever_the_scalar_types():
    """publish_tick writes a row through memoryviews, which refuse what numpy casts (a float
    time, a float side): such a tick falls back to numpy's writes, so every tick is stored
    as before, the first row's partial writes overwritten. Trades and quotes, into the
    same slab (a quote after a trade leaves no trade field behind)."""
    cols = ("ts_ns", "ts_recv_ns", "kind", "price", "size", "side", "trade_id", "bid", "ask",
            "bid_size", "ask_size")
    capture = Capture(cols)
    ticks = [TradeTick("X", 5, 100, 2, 1, trade_id=9, ts_recv_ns=6),
             TradeTick("X", 7.0, np.float32(1.5), np.float64(0.25), 1.0),
             QuoteTick("X", 8, 99.5, 100.5, 1.0, 2.0),
             TradeTick("X", np.int64(9), 3.0, 4.0, AggressorSide.SELL)]
    async with Pipeline([capture], batch_size=1, slabs=1, memory="host") as pipe:
        for tick in ticks:
            await pipe.publish_tick(tick)
    got = capture.result()
    assert got["ts_ns"].tolist() == [5, 7, 8, 9] and got["ts_recv_ns"].tolist() == [6, -1, -1, -1]
    assert got["kind"].tolist() == [KIND_TRADE, KIND_TRADE, KIND_QUOTE, KIND_TRADE]
    np.testing.assert_array_equal(got["price"], [100.0, 1.5, np.nan, 3.0])
    np.testing.assert_array_equal(got["size"], [2.0, 0.25, np.nan, 4.0])
    assert got["side"].tolist() == [1, 1, 0, -1] and got["trade_id"].tolist() == [9, -1, -1, -1]
    np.testing.assert_array_equal(got["bid"], [np.nan, np.nan, 99.5, np.nan])
    np.testing.assert_array_equal(got["ask_size"], [np.nan, np.nan, 2.0, np.nan])


async def test_live_ticks_take_one_slab_at_a_time_and_give_it_back():
    """publish_tick's slab fast path (``BufferPool.acquire_nowait``): each one-row batch
    takes a free slab and returns it, with two slabs for 200 ticks (a slab held one tick too
    long would exhaust the pool and hang: bounded here), and a micro-batch of 7 rows too."""
    for batch_size in (1, 7):
        last = Order("last")
        async with Pipeline([Order("first"), last], batch_size=batch_size, slabs=2,
                            memory="host") as pipe:
            async def feed(pipe=pipe):
                for i in range(200):
                    await pipe.publish_tick(TradeTick("X", i, 1.0, 1.0, 1))
                await pipe.drain()

            await asyncio.wait_for(feed(), timeout=60)
            stats = pipe.pool.stats()
            assert stats.in_use == 0 and stats.high_water <= 2
        assert pipe.tick_flow().ticks_out == 200 and not pipe.leaked
        if batch_size == 1:
            assert last.seen == list(range(200))


async def test_a_small_batch_does_not_overtake_one_queued_before_it():
    gate = asyncio.Event()
    first, last = Order("first", gate), Order("last")
    async with Pipeline([first, last], batch_size=INLINE_CHAIN_MAX_ROWS, memory="host") as pipe:
        # a queued batch that the first stage holds, then small live batches behind it
        await pipe.ingest({"ts_ns": np.array([1], dtype=np.int64), "price": np.ones(1),
                           "size": np.ones(1)})
        await asyncio.sleep(0.01)
        for ts in (2, 3):
            await pipe.publish_tick(TradeTick("X", ts, 1.0, 1.0, 1))
            await pipe.flush()
        gate.set()
        await pipe.drain()
    assert first.seen == last.seen == [1, 2, 3]


class Fails(Stage):
    name = "fails"
    reads = ("ts_ns",)

    async def process(self, lease, stream, ctx):
        raise ValueError("boom")


async def test_a_stage_failing_on_an_inline_batch_is_isolated_and_counted():
    last = Order("last")
    letters = []
    async with Pipeline([Fails(), last], batch_size=1, memory="host") as pipe:
        pipe.bus.subscribe("deadletter.>", letters.append)
        await pipe.publish_tick(TradeTick("X", 1, 1.0, 1.0, 1))  # does not raise in the publisher
        await pipe.drain()
        await asyncio.sleep(0.01)
    t = pipe.tick_flow()
    assert last.seen == [] and t.ticks_in == t.ticks_failed == 1 and t.in_flight == 0
    assert pipe.runners[0].metrics.failures == 1 and pipe.runners[0].subscription.errors == 1
    assert letters and "boom" in str(letters[0].payload)


async def _predictions(data, batch_size, stream="cpu"):
    inference = InferenceStage(streams=(stream,))
    capture = Capture(("prediction",))
    pipe = Pipeline([FeaturesStage(inference.input_names), inference, capture],
                    batch_size=batch_size, slabs=4, memory="host", execution="serial")
    async with pipe:
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest(data)
    backend = "numpy" if stream == "cpu" else stream
    assert {k.split("/")[0] for k in inference.rows_by_backend} == {backend}  # no fallback hid it
    return capture.result()["prediction"]


def _where_usable(stream: str, *marks):
    """``stream``'s case, skipped at collection with the reason it cannot run here."""
    ok, why = runner_usable(stream)
    return pytest.param(stream, marks=[pytest.mark.skipif(not ok, reason=f"{stream}: {why}"), *marks])


@pytest.mark.parametrize("stream", [
    "cpu",  # the fixed-order forward pass: every row's sums in one order whatever the batch
    _where_usable("torch:cpu"),  # these through ModelRunner.predict_tiled: calls of one shape
    _where_usable("mlx:cpu"),
    _where_usable("torch:cuda", pytest.mark.gpu),
])
async def test_the_model_gives_the_same_bits_for_batches_of_1_7_and_4096(sample_dir, stream):
    data = {k: v[:3000] for k, v in btc_trades(sample_dir).items()}
    big = await _predictions(data, 4096, stream)
    for batch_size in (1, 7):
        np.testing.assert_array_equal(await _predictions(data, batch_size, stream), big)


@pytest.mark.parametrize("sizes", [range(1, 18), (100, 4096, 5)])
def test_the_fixed_order_forward_pass_is_the_same_bits_at_any_batch_and_near_float64(sizes):
    """RowOrderForward: a batch's rows give the bits of the same rows one at a time (live
    sizes and replay sizes, every position in a tile), agree with the float64 reference to
    float32 rounding, write only rows [0, n), and keep NaN as NaN."""
    from nautilus_pipeline.kernels.mlp import MLPWorkspace, RowOrderForward, mlp_reference
    from nautilus_pipeline.model.spec import DEFAULT_MODEL_PATH, load_model

    spec, w = load_model(DEFAULT_MODEL_PATH)
    fwd = RowOrderForward(MLPWorkspace(w.mean, w.std, w.weights, w.biases, spec.activation, 16))
    rng = np.random.default_rng(3)
    for n in sizes:
        feats = rng.normal(0, 3, (n + 64, spec.n_inputs)) * np.asarray(w.std) + np.asarray(w.mean)
        if n == 5:
            feats[2, 3] = np.nan
        got = np.full(n + 64, -1.0, dtype=np.float32)
        fwd(feats, n, got)
        assert (got[n:] == -1.0).all()
        one = np.empty(1, dtype=np.float32)
        for i in range(n):
            fwd(feats[i : i + 1], 1, one)
            assert one.tobytes() == got[i : i + 1].tobytes(), (n, i)
        ref = mlp_reference(feats[:n].astype(np.float32), w.mean, w.std, w.weights, w.biases)
        np.testing.assert_allclose(got[:n], ref, rtol=0, atol=2e-6)
        if n == 5:
            assert np.isnan(got[2]) and not np.isnan(np.delete(got[:n], 2)).any()


async def _chain_outputs(data, batch_size, limits, fused: bool):
    stages = chain(limits)
    risk = stages[3]
    if not fused:
        # every batch through the batch path: neither the live hop's fused call nor _fused's
        risk.process_now = lambda lease, stream, ctx: NOT_NOW
        risk._fused = lambda lease, inline=False: None
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*stages, capture], batch_size=batch_size, slabs=4, memory="host")
    events: dict[str, list] = {"signals": [], "vpin": [], "risk": []}
    async with pipe:
        for name, got in events.items():
            pipe.bus.subscribe(f"{name}.>", lambda e, got=got: got.append(e.payload))
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest(data)
    return capture.result(), {k: orjson.dumps(v) for k, v in events.items()}, risk.stats()


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
@pytest.mark.parametrize("max_drawdown", [500.0, 0.05])
async def test_the_fused_risk_kernel_gives_the_batch_paths_numbers(sample_dir, batch_size, max_drawdown):
    """The fused kernel (split at every VaR report) against the batch path, on real trades,
    with VaR reports falling inside batches and a kill switch that trips (tight drawdown)."""
    data = btc_trades(sample_dir, 3000)
    limits = RiskParams(max_drawdown=max_drawdown, fee_rate=4e-4)
    ref, ref_events, ref_stats = await _chain_outputs(data, 4096, limits, fused=False)
    got, got_events, stats = await _chain_outputs(data, batch_size, limits, fused=True)
    assert ref_stats["fused_batches"] == 0 and stats["fused_batches"] > 0
    assert got_events == ref_events and ref_stats["var_reports"] == 6
    for c in ("ts_ns", *COLUMNS):
        if c != "prediction":
            np.testing.assert_array_equal(got[c], ref[c], err_msg=c)


async def test_the_live_chain_keeps_memory_flat_tick_after_tick():
    """The default chain fed one tick at a time, ``batch_size=1``, VaR reports off (their
    results are events the test would keep): after a warm-up, 20,000 more ticks leave
    Python's heap where it was (tracemalloc), the stages' pending durations folded before
    each look. A leak of one small object a tick would show as 20,000 of them."""
    import gc
    import tracemalloc

    stages = chain()
    stages[3].var_every = 0
    pipe = Pipeline(stages, batch_size=1, slabs=4, memory="host")
    rng = np.random.default_rng(2)
    prices = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 1e-4, 30_000)))
    ticks = [TradeTick("BTCUSDT-PERP", i * 1_000_000, float(p), 0.01, 1 if i % 2 else -1)
             for i, p in enumerate(prices)]
    async with pipe:
        for tick in ticks[:10_000]:
            await pipe.publish_tick(tick)
        pipe.stats()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for tick in ticks[10_000:]:
                await pipe.publish_tick(tick)
            pipe.stats()
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, grown
    t = pipe.tick_flow()
    assert t.ticks_in == t.ticks_out == len(ticks)
    assert stages[3].stats()["fused_batches"] == len(ticks)


class Live(Stage):
    """A stage with a live path: ``process_now`` does even rows' ticks at once, leaves odd
    ones to ``process`` (NOT_NOW), and returns an awaitable for every fourth (its event)."""

    reads = ("ts_ns",)

    def __init__(self, name="live"):
        self.name = name
        self.now: list[int] = []
        self.later: list[int] = []
        self.events: list[int] = []

    def process_now(self, lease, stream, ctx):
        ts = lease.slab.columns["ts_ns"].item(0)
        if ts % 2:
            return NOT_NOW
        if ts == 6:
            raise ValueError("boom at 6")
        self.now.append(ts)
        return self._event(ts, ctx) if ts % 4 == 0 else None

    async def _event(self, ts, ctx):
        await ctx.publish("live.events", ts)
        self.events.append(ts)

    async def process(self, lease, stream, ctx):
        self.later.append(int(lease["ts_ns"][0]))


async def test_process_now_does_a_live_batch_declines_to_process_or_hands_back_its_events():
    """``Stage.process_now`` (the inline hop): None is done, NOT_NOW runs ``process``, an
    awaitable is awaited before the next stage, a raise is the stage's isolated failure."""
    live, last = Live(), Order("last")
    got, letters = [], []
    async with Pipeline([live, last], batch_size=1, memory="host") as pipe:
        pipe.bus.subscribe("live.events", lambda e: got.append(e.payload))
        pipe.bus.subscribe("deadletter.>", letters.append)
        for ts in range(10):
            await pipe.publish_tick(TradeTick("X", ts, 1.0, 1.0, 1))
        await pipe.drain()
        await asyncio.sleep(0.01)
    assert live.now == [0, 2, 4, 8] and live.later == [1, 3, 5, 7, 9]
    assert live.events == [0, 4, 8] and got == [0, 4, 8]
    assert last.seen == [0, 1, 2, 3, 4, 5, 7, 8, 9]  # 6 failed in the first stage
    t = pipe.tick_flow()
    assert t.ticks_in == 10 and t.ticks_out == 9 and t.ticks_failed == 1 and t.in_flight == 0
    assert letters and "boom at 6" in str(letters[0].payload)
    assert pipe.runners[0].stats()["batches"] == 9 and pipe.runners[0].metrics.failures == 1


@pytest.mark.parametrize("where", ["ingress", "first stage's output"])
async def test_a_tap_subscribed_after_start_sees_every_live_tick(sample_dir, where):
    """A second subscriber of a stage's input topic turns the inline hand-off off for it:
    the tap sees every batch (review finding: a route not cached since the tap subscribed
    was taken for 'only this stage', and the tap got nothing)."""
    data = btc_trades(sample_dir)
    n = 200
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*chain(None), capture], batch_size=1, slabs=4, memory="host")
    seen: list[int] = []
    async with pipe:
        topic = pipe.ingress_topic if where == "ingress" else pipe.runners[0].output_topic
        pipe.bus.subscribe(topic, lambda e: seen.append(e.payload.length))
        for tick in ticks_of(data, n):
            await pipe.publish_tick(tick)
        await pipe.drain()
    assert sum(seen) == n
    assert len(capture.result()["ts_ns"]) == n  # and the chain itself still got every tick
