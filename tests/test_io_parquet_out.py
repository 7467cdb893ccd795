"""Our Parquet outputs carry a dictionary only on the columns whose values repeat (strings,
booleans, 8-bit integers), in every writer: the recorder's trace, the sinks' event files and
the batch merge's three paths (streamed, appended whole, sorted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import nautilus_pipeline as nt
from nautilus_pipeline.batch.job import JobResult
from nautilus_pipeline.batch.merge import StreamingMerge, _merge_all, merge_outputs
from nautilus_pipeline.io.parquet_out import dictionary_columns


def _dictionary_encoded(path: Path) -> set[str]:
    """The columns of a Parquet file with a dictionary page in any row group."""
    m = pq.ParquetFile(path).metadata
    return {m.row_group(g).column(c).path_in_schema.split(".")[0]
            for g in range(m.num_row_groups) for c in range(m.num_columns)
            if m.row_group(g).column(c).has_dictionary_page}


def test_the_rule_picks_strings_booleans_and_8_bit_integers():
    schema = pa.schema({"ts_ns": pa.int64(), "price": pa.float64(), "prediction": pa.float32(),
                        "kind": pa.uint8(), "side": pa.int8(), "qty": pa.int16(), "toxic": pa.bool_(),
                        "symbol": pa.string(), "venue": pa.large_string(),
                        "code": pa.dictionary(pa.int32(), pa.string()), "reasons": pa.list_(pa.string()),
                        "fills": pa.list_(pa.float64())})
    assert dictionary_columns(schema) == ["kind", "side", "toxic", "symbol", "venue", "code"]


def _parts(tmp: Path, overlapping: bool) -> list[JobResult]:
    rng = np.random.default_rng(1)
    out, t0 = [], 0
    for i in range(3):
        n = 5000
        ts = t0 + np.cumsum(rng.integers(1, 5, n))
        t0 = int(ts[-1]) if not overlapping else 0  # overlapping: each part starts at the beginning
        table = pa.table({"symbol": ["A"] * n, "ts_ns": ts, "price": 100 + rng.normal(size=n),
                          "kind": rng.integers(0, 3, n).astype(np.uint8), "topic": ["signals.A"] * n})
        path = tmp / f"part-{int(overlapping)}-{i}.parquet"
        pq.write_table(table, path)
        out.append(JobResult(f"A/{i:04d}", (), str(tmp), {"signals": str(path)}, {}, {}, {}, b""))
    return out


def test_every_merge_path_writes_dictionaries_on_those_columns_only(tmp_path):
    want = {"kind", "topic"}  # (symbol is the partition: not a column of the merged file)
    streamed = StreamingMerge(tmp_path / "streamed")
    parts = _parts(tmp_path, overlapping=False)
    for res in parts:
        streamed.add(res)
    assert streamed.finish(parts)["signals"]["streamed"]
    _merge_all(tmp_path / "whole", {"signals": [(r.job_id, r.paths["signals"]) for r in parts]}, {})
    merge_outputs(tmp_path / "sorted", _parts(tmp_path, overlapping=True))
    for name in ("streamed", "whole", "sorted"):
        path = tmp_path / name / "signals" / "symbol=A" / "part-0.parquet"
        assert _dictionary_encoded(path) == want, name
    ts = pq.read_table(tmp_path / "sorted" / "signals" / "symbol=A" / "part-0.parquet")["ts_ns"]
    assert ts.to_numpy().tolist() == sorted(ts.to_numpy().tolist())  # the sorted path was taken


def test_a_runs_trace_and_event_files_have_dictionaries_on_those_columns_only(sample_dir, tmp_path):
    sample = sample_dir / "binance-um-btcusdt-trades-20240808.csv"
    asyncio.run(nt.Run("default", ticks=[str(sample)], out_dir=tmp_path, trace_every=1).execute())
    trace = pq.ParquetFile(tmp_path / "trace.parquet").schema_arrow
    assert _dictionary_encoded(tmp_path / "trace.parquet") == set(dictionary_columns(trace)) == {
        "kind", "toxic", "kill", "signal_side", "symbol"}
    signals = pq.ParquetFile(tmp_path / "signals.parquet").schema_arrow
    assert _dictionary_encoded(tmp_path / "signals.parquet") == set(dictionary_columns(signals)) == {
        "symbol", "side", "topic"}
