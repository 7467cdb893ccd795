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
