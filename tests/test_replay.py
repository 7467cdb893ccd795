"""Replay: merge order, stability, batch-size invariance, symbols, pacing, pool slabs, accounting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE, TICK_COLUMN_NAMES, TICK_COLUMNS
from nautilus_pipeline.io import ManualClock, Replay, Source
from nautilus_pipeline.memory import BufferPool
from nautilus_pipeline.symbols import SymbolTable

UM = "binance-um-btcusdt-trades-20240808.csv"
SPOT = "binance-spot-ethusdt-trades-20240808.csv"
FEED = "binance-feed-spot-ethusdt_20240808.jsonl.gz"


def collect(replay: Replay, batch_size: int = 4096) -> dict[str, np.ndarray]:
    batches = list(replay.iter_arrays(batch_size))
    return {k: np.concatenate([b[k] for b in batches]) for k in TICK_COLUMN_NAMES}


def alone(path: Path, **kw: object) -> dict[str, np.ndarray]:
    return collect(Replay([Source(path, **kw)]))


def test_two_files_merge_in_time_order_keeping_each_files_order(sample_dir: Path) -> None:
    replay = Replay([sample_dir / UM, sample_dir / SPOT])
    out = collect(replay)
    assert len(out["ts_ns"]) == 21_313 + 6_106
    assert (np.diff(out["ts_ns"]) >= 0).all()
    btc, eth = replay.symbols.id_of("BTCUSDT"), replay.symbols.id_of("ETHUSDT")
    for sid, name in ((btc, UM), (eth, SPOT)):
        own = alone(sample_dir / name)
        mine = out["symbol_id"] == sid
        for k in ("trade_id", "price", "size", "side", "ts_ns"):
            assert np.array_equal(out[k][mine], own[k]), k


def test_equal_timestamps_keep_source_order_then_row_order(sample_dir: Path) -> None:
    a = Source(sample_dir / UM, symbol="A", name="a")
    b = Source(sample_dir / UM, symbol="B", name="b")
    out = collect(Replay([a, b]))
    ts, sym, tid = out["ts_ns"], out["symbol_id"], out["trade_id"]
    assert len(ts) == 2 * 21_313
    # every timestamp group: all of source a (symbol 0), in file order, then all of source b
    starts = np.flatnonzero(np.r_[True, ts[1:] != ts[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(ts)], strict=True):
        group_sym, group_tid = sym[s:e], tid[s:e]
        assert (np.diff(group_sym.astype(int)) >= 0).all()
        for k in (0, 1):
            assert (np.diff(group_tid[group_sym == k]) > 0).all()


@pytest.mark.parametrize(("batch_size", "chunk_rows"), [(1, 65_536), (7, 333), (4096, 1000), (1_000_000, 50)])
def test_batch_and_chunk_sizes_never_change_the_merged_sequence(sample_dir: Path, batch_size: int, chunk_rows: int) -> None:
    sources = [sample_dir / SPOT, sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst",
               sample_dir / "tardis-bitmex-xbtusd-trades.csv", Source(sample_dir / FEED, symbol="ETHUSDT-FEED")]
    reference = collect(Replay(sources), 4096)
    other = collect(Replay(sources, chunk_rows=chunk_rows), batch_size)
    for k in TICK_COLUMN_NAMES:
        assert np.array_equal(reference[k], other[k], equal_nan=reference[k].dtype.kind == "f"), k


def test_batches_have_the_requested_size(sample_dir: Path) -> None:
    sizes = [len(b["ts_ns"]) for b in Replay([sample_dir / SPOT]).iter_arrays(1000)]
    assert sizes == [1000] * 6 + [106]


def test_trades_and_quotes_replay_together(sample_dir: Path) -> None:
    trades = Source(sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst")
    quotes = Source(sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst")
    replay = Replay([trades, quotes])
    out = collect(replay)
    assert int((out["kind"] == KIND_TRADE).sum()) == 120 and int((out["kind"] == KIND_QUOTE).sum()) == 2_288
    assert (np.diff(out["ts_ns"]) >= 0).all()
    assert replay.symbols.names == ["ESU4"] and (out["symbol_id"] == 0).all()
    t = out["kind"] == KIND_TRADE
    assert np.isnan(out["bid"][t]).all() and np.isnan(out["price"][~t]).all()


def test_sources_naming_the_same_symbol_share_its_id(sample_dir: Path) -> None:
    table = SymbolTable(["ETHUSDT", "BTCUSDT"])
    replay = Replay([sample_dir / UM, Source(sample_dir / FEED), sample_dir / SPOT], symbols=table)
    out = collect(replay)
    assert replay.symbols is table and table.names == ["ETHUSDT", "BTCUSDT"]
    assert set(np.unique(out["symbol_id"]).tolist()) == {0, 1}
    assert int((out["symbol_id"] == 0).sum()) == 6_106 + 30_183


def test_feed_replays_on_receive_time_and_merges_with_event_time_sources(sample_dir: Path) -> None:
    feed = alone(sample_dir / FEED)
    assert (np.diff(feed["ts_recv_ns"]) >= 0).all()
    bad = Replay([Source(sample_dir / FEED, order_by="ts_ns", policy="reject")])
    collect(bad)
    assert bad.accounting.total.by_reason["ts_backwards"] > 0  # trade times and receive times interleave


def test_receive_time_order_needs_receive_times(sample_dir: Path) -> None:
    with pytest.raises(DataError, match="no receive timestamp"):
        collect(Replay([Source(sample_dir / UM, order_by="ts_recv_ns")]))


def test_multi_symbol_source_out_of_order_across_symbols_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "two.csv"
    p.write_text("t,s,p,q\n5,A,1,1\n6,A,1,1\n1,B,1,1\n2,B,1,1\n")
    src = Source(p, format="csv", options={"mapping": {"ts": "t", "ts_unit": "s", "symbol": "s", "price": "p", "size": "q"}})
    with pytest.raises(DataError, match=r"line/record 4: ts_ns 1000000000 is earlier.*split it into one source per symbol"):
        collect(Replay([src]))


def test_progress_and_accounting_on_every_bundled_file(sample_dir: Path) -> None:
    names = sorted(p.name for p in sample_dir.iterdir() if p.name != "README.md")
    sources = [Source(sample_dir / n, symbol=n, policy="reject") for n in names]
    replay = Replay(sources)
    out = collect(replay, 10_000)
    total = len(out["ts_ns"])
    counts = replay.accounting.total
    replay.accounting.check()
    assert counts.read == total + counts.rejected and counts.rejected == 0
    assert replay.progress.ticks_delivered == total == replay.progress.rows_read
    assert replay.progress.ts_reached_ns == int(max(out["ts_ns"].max(), out["ts_recv_ns"].max()))
    assert replay.progress.sources_done == len(names)
    expected = {UM: 21_313, SPOT: 6_106, FEED: 30_183, "tardis-bitmex-xbtusd-trades.csv": 10,
                "tardis-huobi-btcusd-quotes.csv": 10, "nautilus-binance-btcusdt-trades.parquet": 2_001,
                "nautilus-binance-btcusdt-quotes.parquet": 451, "databento-glbx-futures-trades-20240701.dbn.zst": 120,
                "databento-glbx-futures-mbp1-20240701.dbn.zst": 2_288, "truefx-usdjpy-quotes.csv": 1_000,
                "histdata-eurusd-quotes.csv": 9_500, "databento-glbx-esh4-mbo-20231225-head.dbn.zst": 12_058}
    assert {n: replay.accounting.sources[str(sample_dir / n)].delivered for n in names} == expected
    assert replay.accounting.ignored[str(sample_dir / FEED)] == 3_435


def test_rejected_rows_balance_the_accounting_per_symbol(sample_dir: Path, tmp_path: Path) -> None:
    lines = (sample_dir / UM).read_text().splitlines()
    for i in (100, 2000, 15000):
        lines[i] = lines[i].replace(",false", ",0").replace(",true", ",0")
        lines[i] = ",".join(f if k != 1 else "-1" for k, f in enumerate(lines[i].split(",")))
    p = tmp_path / "BTCUSDT-trades.csv"
    p.write_text("\n".join(lines) + "\n")
    replay = Replay([Source(p, policy="quarantine", quarantine=tmp_path / "q.jsonl"), sample_dir / SPOT])
    out = collect(replay)
    replay.accounting.check()
    btc = replay.accounting.symbols[(str(p), "BTCUSDT")]
    assert (btc.read, btc.delivered, btc.quarantined) == (21_313, 21_310, 3)
    assert len(out["ts_ns"]) == 21_310 + 6_106


def test_stopping_early_leaves_the_accounting_unbalanced_and_says_so(sample_dir: Path) -> None:
    replay = Replay([sample_dir / UM])
    next(iter(replay.iter_arrays(100)))
    with pytest.raises(DataError, match="stopped early"):
        replay.accounting.check()


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        Replay([])
    with pytest.raises(ConfigError, match="speed"):
        Replay(["x.csv"], speed=0)
    with pytest.raises(ConfigError, match="same name"):
        Replay([Source("a.csv"), Source("a.csv")])


async def test_batches_fill_pool_slabs_identically_to_iter_arrays(sample_dir: Path) -> None:
    pool = BufferPool(TICK_COLUMNS, capacity=1000, slabs=2)
    sources = [sample_dir / UM, sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst"]
    got: dict[str, list[np.ndarray]] = {k: [] for k in TICK_COLUMN_NAMES}
    lengths = []
    async for lease in Replay(sources).batches(pool):
        lengths.append(lease.length)
        for k in TICK_COLUMN_NAMES:
            got[k].append(lease[k].copy())
        lease.release()
    assert pool.in_use == 0
    assert set(lengths[:-1]) == {1000}
    expected = collect(Replay(sources), 333)
    for k in TICK_COLUMN_NAMES:
        assert np.array_equal(np.concatenate(got[k]), expected[k], equal_nan=expected[k].dtype.kind == "f"), k


async def test_batches_wait_for_a_free_slab(sample_dir: Path) -> None:
    pool = BufferPool(TICK_COLUMNS, capacity=500, slabs=1)
    held = []
    async for lease in Replay([sample_dir / SPOT]).batches(pool):
        held.append(lease.length)
        if len(held) == 1:
            waiter = asyncio.get_running_loop().call_later(0.01, lease.release)
            # the next acquire can only succeed after the release above
            continue
        lease.release()
    waiter.cancel()
    assert sum(held) == 6_106 and pool.in_use == 0


async def test_pacing_follows_event_time_divided_by_speed(sample_dir: Path) -> None:
    clock = ManualClock(start=1000.0)
    pool = BufferPool(TICK_COLUMNS, capacity=4096, slabs=2)
    replay = Replay([sample_dir / UM], speed=10.0, clock=clock)
    first_ts: int | None = None
    delivered = 0
    async for lease in replay.batches(pool):
        ts = lease["ts_ns"]
        if first_ts is None:
            first_ts = int(ts[0])
        elapsed = clock.now() - 1000.0
        due = (ts - first_ts) / 1e9 / 10.0
        assert (due <= elapsed + 1e-6).all()  # nothing is released before it is due
        assert due[-1] >= elapsed - 1e-6 or delivered == 0  # and nothing later than needed
        delivered += lease.length
        lease.release()
    span = (1723161599643 - 1723161256322) / 1e3
    assert delivered == 21_313
    assert clock.now() - 1000.0 == pytest.approx(span / 10.0, abs=1e-6)
    assert sum(clock.sleeps) == pytest.approx(span / 10.0, abs=1e-6)


async def test_no_pacing_means_no_sleeping(sample_dir: Path) -> None:
    clock = ManualClock()
    pool = BufferPool(TICK_COLUMNS, capacity=4096, slabs=2)
    n = 0
    async for lease in Replay([sample_dir / UM], clock=clock).batches(pool):
        n += lease.length
        lease.release()
    assert n == 21_313 and clock.sleeps == []


async def test_late_consumer_gets_everything_that_is_due_in_one_batch(sample_dir: Path) -> None:
    clock = ManualClock()
    pool = BufferPool(TICK_COLUMNS, capacity=100_000, slabs=2)
    replay = Replay([sample_dir / SPOT], speed=1.0, clock=clock)
    sizes = []
    async for lease in replay.batches(pool):
        sizes.append(lease.length)
        lease.release()
        if len(sizes) == 1:
            clock.advance(10_000.0)  # the consumer stalls far beyond the file's 345 s
    assert sizes[1] == 6_106 - sizes[0] and len(sizes) == 2


async def test_stopping_a_replay_early_returns_every_slab(sample_dir: Path) -> None:
    from contextlib import aclosing

    pool = BufferPool(TICK_COLUMNS, capacity=100, slabs=2)
    replay = Replay([sample_dir / UM, sample_dir / SPOT])
    async with aclosing(replay.batches(pool)) as batches:
        async for lease in batches:
            lease.release()
            break
    assert pool.in_use == 0 and replay.progress.ticks_delivered == 100


@pytest.mark.parametrize("after", range(0, 40, 3))
async def test_cancelling_the_consumer_at_any_point_closes_cleanly(sample_dir: Path, after: int) -> None:
    pool = BufferPool(TICK_COLUMNS, capacity=512, slabs=2)
    replay = Replay([sample_dir / UM, sample_dir / SPOT], chunk_rows=2048)

    async def consume() -> None:
        from contextlib import aclosing

        async with aclosing(replay.batches(pool)) as batches:
            async for lease in batches:
                lease.release()
                await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    for _ in range(after):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.in_use == 0
