"""The recorder writes ``trace.parquet`` while the run goes: row groups of a fixed row count,
on a writer thread the stage owns. The trace is the one written whole at the end (rows,
values and row groups the same for any batch size); a failed write or an abandoned run
leaves no file and no thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import nautilus_pipeline as nt
from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE
from nautilus_pipeline.stages.recorder import RecorderStage

COLUMNS = ("ts_ns", "symbol_id", "kind", "price", "bid", "ask")
SYMBOLS = ["AAA", "BBB"]


def frame(n: int = 3_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    kind = np.where(rng.random(n) < 0.8, KIND_TRADE, KIND_QUOTE).astype(np.uint8)
    price = 100 + np.cumsum(rng.normal(0, 0.01, n))
    trade = kind == KIND_TRADE
    return {
        "ts_ns": np.arange(1, n + 1, dtype=np.int64) * 1_000, "symbol_id": (np.arange(n) % 2).astype(np.int32),
        "kind": kind, "price": np.where(trade, price, np.nan), "size": np.where(trade, 1.0, np.nan),
        "side": np.where(trade, 1, 0).astype(np.int8), "trade_id": np.arange(n, dtype=np.int64),
        "bid": np.where(trade, np.nan, price - 0.01), "ask": np.where(trade, np.nan, price + 0.01),
        "bid_size": np.where(trade, np.nan, 1.0), "ask_size": np.where(trade, np.nan, 1.0),
    }


def writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("trace-writer")]


async def record(path: Path, batch: int, *, group: int, stream: bool = True, drain: bool = True,
                 rows: int = 3_000) -> RecorderStage:
    recorder = RecorderStage(path, every=2, available=COLUMNS)
    recorder.ROW_GROUP_ROWS = group
    recorder.stream_to_file = stream
    pipe = nt.Pipeline([recorder], batch_size=batch, execution="serial", memory="host")
    await pipe.start()
    try:
        for name in SYMBOLS:
            pipe.symbols.id_of(name)
        await pipe.ingest(frame(rows))
        await pipe.drain()
    finally:
        await pipe.close(drain=drain)
    return recorder


@pytest.mark.parametrize("batch", [1, 7, 4096])
async def test_the_trace_written_in_row_groups_is_the_one_written_whole_for_any_batch_size(tmp_path, batch):
    await record(tmp_path / "whole.parquet", 4096, group=1 << 20, stream=False)
    await record(tmp_path / "groups.parquet", batch, group=100)
    whole, groups = pq.ParquetFile(tmp_path / "whole.parquet"), pq.ParquetFile(tmp_path / "groups.parquet")
    rows = whole.metadata.num_rows
    assert rows > 1_000  # every other trade and quote of each symbol, the last trades
    assert whole.metadata.num_row_groups == 1
    sizes = [groups.metadata.row_group(i).num_rows for i in range(groups.metadata.num_row_groups)]
    assert sizes == [100] * (rows // 100) + ([rows % 100] if rows % 100 else [])
    got, want = groups.read(), whole.read()
    assert got.schema == want.schema
    for name in want.column_names:  # NaN where NaN (Table.equals has NaN != NaN)
        np.testing.assert_array_equal(got[name].to_numpy(), want[name].to_numpy(), err_msg=name, strict=True)
    assert got.column("symbol").unique().to_pylist() == SYMBOLS
    assert not (tmp_path / "groups.parquet.partial").exists()
    assert writer_threads() == []


async def test_a_trace_smaller_than_one_row_group_is_written_at_the_end(tmp_path):
    await record(tmp_path / "whole.parquet", 64, group=1 << 20, stream=False, rows=50)
    await record(tmp_path / "t.parquet", 64, group=65_536, rows=50)
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert meta.num_row_groups == 1 and meta.num_rows == pq.read_metadata(tmp_path / "whole.parquet").num_rows > 20
    assert writer_threads() == []


async def test_a_failed_write_fails_the_finish_and_leaves_no_trace_file(tmp_path, monkeypatch):
    def full_disk(self, table, row_group_size=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        await record(tmp_path / "t.parquet", 64, group=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert writer_threads() == []


async def test_a_run_closed_without_draining_leaves_no_partial_trace_and_no_thread(tmp_path):
    recorder = await record(tmp_path / "t.parquet", 64, group=100, drain=False)
    assert not recorder.partial_path.exists() and not recorder.path.exists()
    assert writer_threads() == []


async def test_taking_rows_after_row_groups_were_written_is_refused(tmp_path):
    recorder = RecorderStage(tmp_path / "t.parquet", available=COLUMNS)
    recorder.ROW_GROUP_ROWS = 10
    pipe = nt.Pipeline([recorder], batch_size=64, execution="serial", memory="host")
    async with pipe:
        for name in SYMBOLS:
            pipe.symbols.id_of(name)
        await pipe.ingest(frame(200))
        await pipe.drain()
        with pytest.raises(RuntimeError, match="stream_to_file = False"):
            recorder.take_rows(SYMBOLS)
    assert pq.read_table(recorder.path).num_rows == 200


def reference_trace(data: dict[str, np.ndarray], every: int) -> dict[str, list]:
    """The trace by hand, one row at a time: every ``every``-th trade and quote of each symbol,
    then each symbol's last trade when it was not kept, in the order symbols first traded."""
    seen: dict[tuple[int, int], int] = {}
    kept, last_trade = [], {}
    for i in range(data["kind"].size):
        key = (int(data["symbol_id"][i]), int(data["kind"][i]))
        if key[1] not in (KIND_TRADE, KIND_QUOTE):
            continue
        if seen.get(key, 0) % every == 0:
            kept.append(i)
        seen[key] = seen.get(key, 0) + 1
        if key[1] == KIND_TRADE:
            last_trade.setdefault(key[0], i)
            last_trade[key[0]] = i
    kept += [i for i in last_trade.values() if i not in set(kept)]
    rows = {c: [data[c][i] for i in kept] for c in COLUMNS if c != "symbol_id"}
    rows["symbol"] = [SYMBOLS[data["symbol_id"][i]] for i in kept]
    return rows


@pytest.mark.parametrize("batch", [1, 64, 4096])
async def test_the_trace_equals_one_written_by_hand_row_by_row(tmp_path, batch):
    data = frame(3_000)
    await record(tmp_path / "t.parquet", batch, group=128)
    got = pq.read_table(tmp_path / "t.parquet")
    want = reference_trace(data, every=2)
    assert got.column_names == [c for c in COLUMNS if c != "symbol_id"] + ["symbol"]
    assert got.num_rows == len(want["symbol"]) > 1_000
    for name, values in want.items():
        np.testing.assert_array_equal(got[name].to_numpy(zero_copy_only=False), np.array(values),
                                      err_msg=name)


async def test_a_symbol_first_seen_after_row_groups_were_written_keeps_its_name(tmp_path):
    recorder = RecorderStage(tmp_path / "t.parquet", available=COLUMNS)
    recorder.ROW_GROUP_ROWS = 50
    pipe = nt.Pipeline([recorder], batch_size=64, execution="serial", memory="host")
    async with pipe:
        data = frame(400)
        for name, start in (("AAA", 0), ("BBB", 200)):
            sid = pipe.symbols.id_of(name)
            part = {c: v[start:start + 200].copy() for c, v in data.items()}
            part["symbol_id"][:] = sid
            part["ts_ns"] += start  # (the part's own, increasing)
            await pipe.ingest(part)
            await pipe.drain()
    symbol = pq.read_table(recorder.path).column("symbol").to_pylist()
    assert symbol == ["AAA"] * 200 + ["BBB"] * 200
    assert pq.ParquetFile(recorder.path).metadata.num_row_groups == 8


async def test_batches_that_keep_no_row_write_a_trace_of_no_rows(tmp_path):
    """Quotes only, and no bid/ask column to record them by: every batch keeps nothing, and
    the trace is an empty table of the trace's columns (a report and a batch job expect it)."""
    available = ("ts_ns", "symbol_id", "kind", "price")
    recorder = RecorderStage(tmp_path / "t.parquet", available=available)
    pipe = nt.Pipeline([recorder], batch_size=64, execution="serial", memory="host")
    async with pipe:
        pipe.symbols.id_of("AAA")
        data = frame(1_000)
        quotes = data["kind"] == KIND_QUOTE
        data = {c: v[quotes] for c, v in data.items()}
        data["symbol_id"][:] = 0
        await pipe.ingest(data)
        await pipe.drain()
    table = pq.read_table(recorder.path)
    assert table.num_rows == 0 and table.column_names == ["ts_ns", "kind", "price", "symbol"]
    assert not recorder.partial_path.exists() and writer_threads() == []


async def test_a_stage_without_a_batch_writes_no_trace(tmp_path):
    recorder = RecorderStage(tmp_path / "t.parquet", available=COLUMNS)
    async with nt.Pipeline([recorder], batch_size=64, execution="serial", memory="host"):
        pass
    assert sorted(tmp_path.iterdir()) == [] and writer_threads() == []


@pytest.mark.parametrize("fault", ["writer", "folder", "rename"])
async def test_an_unwritable_trace_fails_the_finish_with_an_os_error_and_leaves_nothing(tmp_path, monkeypatch, fault):
    """The writer cannot open the file, its folder cannot be made (a file is in the way), or
    the final rename fails (a folder is in the way): the run's batches go on, the error is an
    OSError at the end (the run's write_error, not a stage failure), no partial file is left."""
    path = tmp_path / "t.parquet"
    if fault == "writer":
        def refuse(self, where, *args, **kwargs):
            raise OSError(13, "Permission denied")

        monkeypatch.setattr(pq.ParquetWriter, "__init__", refuse)
    elif fault == "folder":
        (tmp_path / "out").write_text("a file where the folder goes")
        path = tmp_path / "out" / "t.parquet"
    else:
        path.mkdir()
    with pytest.raises(OSError):
        await record(path, 64, group=100)
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert left == (["out"] if fault == "folder" else [])
    assert writer_threads() == []


async def test_a_slow_disk_holds_the_recorder_back_without_blocking_the_event_loop(tmp_path, monkeypatch):
    """The writer thread stuck on the disk: once its writes in flight are full the recorder
    waits for the oldest, and the event loop goes on meanwhile (this test's own sleeps
    return). Blocked, the loop would sit until the gate's safety timeout let the disk go."""
    import asyncio

    write, gate, timed_out = pq.ParquetWriter.write_table, threading.Event(), []

    def stuck(self, table, row_group_size=None):
        if not gate.wait(timeout=30):
            timed_out.append(True)
        write(self, table, row_group_size=row_group_size)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", stuck)
    run = asyncio.ensure_future(record(tmp_path / "t.parquet", 64, group=10))  # ~150 groups
    for _ in range(50):
        await asyncio.sleep(0.01)
    held_back = not run.done()
    gate.set()
    recorder = await run
    assert held_back and not timed_out
    assert pq.read_metadata(recorder.path).num_rows > 1_000


async def test_a_resumed_segment_without_a_batch_writes_the_restored_last_trades(tmp_path):
    """A chain's last job that delivers no tick: the last trade row of each symbol, kept in
    the state of the segment before (not sampled there), is that segment's trace."""
    async def segment(path: Path, state: bytes | None, data) -> bytes:
        recorder = RecorderStage(path, every=1_000, available=COLUMNS)
        pipe = nt.Pipeline([recorder], batch_size=64, execution="serial", memory="host")
        async with pipe:
            for name in SYMBOLS:
                pipe.symbols.id_of(name)
            if state is not None:
                pipe.restore(state)
            if data is not None:
                await pipe.ingest(data)
                await pipe.drain()
            snapshot = pipe.snapshot()
            if data is not None:
                pipe.end_segment()
        return snapshot

    data = frame(300)
    state = await segment(tmp_path / "1" / "trace.parquet", None, data)
    await segment(tmp_path / "2" / "trace.parquet", state, None)
    last = pq.read_table(tmp_path / "2" / "trace.parquet")
    trades = np.flatnonzero(data["kind"] == KIND_TRADE)
    want = [int(trades[data["symbol_id"][trades] == s][-1]) for s in range(len(SYMBOLS))]
    assert sorted(last.column("ts_ns").to_pylist()) == sorted(int(data["ts_ns"][i]) for i in want)
    assert sorted(last.column("symbol").to_pylist()) == SYMBOLS
    assert writer_threads() == []
