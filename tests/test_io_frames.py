"""Pipeline.ingest takes frames (pyarrow, and whatever speaks the Arrow stream interface) as well
as dicts, through the readers' row checks and policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.io.frames import frame_columns
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import Stage

UM = "binance-um-btcusdt-trades-20240808.csv"


class Capture(Stage):
    name = "capture"
    reads = ("ts_ns", "price", "size", "side", "symbol_id")

    def __init__(self):
        self.rows: list[dict[str, np.ndarray]] = []

    async def process(self, lease, stream, ctx):
        self.rows.append({c: lease[c].copy() for c in self.reads})

    def column(self, name):
        return np.concatenate([r[name] for r in self.rows])


def real_trades(sample_dir: Path) -> dict[str, np.ndarray]:
    blocks = list(Replay([Source(sample_dir / UM)]).iter_arrays())
    return {k: np.concatenate([b[k] for b in blocks]) for k in ("ts_ns", "price", "size", "side", "trade_id")}


class ArrowStreamOnly:
    """A frame library's object that only speaks the Arrow PyCapsule stream interface (polars
    and pandas >= 2.2 do; neither is installed here)."""

    def __init__(self, table: pa.Table):
        self._t = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self._t.__arrow_c_stream__(requested_schema)


async def ingest_all(data, **kw):
    cap = Capture()
    async with Pipeline([cap], batch_size=4096, memory="host") as pipe:
        await pipe.ingest(data, **kw)
        await pipe.drain()
    return cap, pipe


@pytest.mark.parametrize("kind", ["dict", "table", "record_batch", "stream"])
async def test_every_frame_kind_delivers_the_same_rows(sample_dir: Path, kind: str) -> None:
    cols = real_trades(sample_dir)
    table = pa.table(cols)
    data = {"dict": cols, "table": table, "record_batch": table.combine_chunks().to_batches()[0],
            "stream": ArrowStreamOnly(table)}[kind]
    cap, pipe = await ingest_all(data, symbol="BTCUSDT-PERP")
    for k in ("ts_ns", "price", "size", "side"):
        assert np.array_equal(cap.column(k), cols[k])
    acct = pipe.ingest_accounting.total
    assert acct.read == acct.delivered == 21_313


async def test_a_timestamp_column_becomes_int64_ns(sample_dir: Path) -> None:
    cols = real_trades(sample_dir)
    table = pa.table({**cols, "ts_ns": pa.array(cols["ts_ns"], pa.timestamp("ns", tz="UTC"))})
    cap, _ = await ingest_all(table, symbol="X")
    assert np.array_equal(cap.column("ts_ns"), cols["ts_ns"])
    ms = pa.table({"ts_ns": pa.array(cols["ts_ns"] // 1_000_000, pa.timestamp("ms")), "price": cols["price"],
                   "size": cols["size"]})
    cap, _ = await ingest_all(ms, symbol="X")
    assert np.array_equal(cap.column("ts_ns"), cols["ts_ns"] // 1_000_000 * 1_000_000)


async def test_a_negative_price_is_refused_with_its_row_not_a_stage_failure(sample_dir: Path) -> None:
    cols = real_trades(sample_dir)
    cols["price"][1234] = -cols["price"][1234]
    with pytest.raises(DataError, match=r"ingest \(call 1\), line/record 1235, field 'price'.*price not positive"):
        await ingest_all(cols, symbol="BTCUSDT-PERP")
    cap, pipe = await ingest_all(cols, symbol="BTCUSDT-PERP", policy="reject")
    assert len(cap.column("ts_ns")) == 21_312
    acct = pipe.ingest_accounting.total
    assert (acct.read, acct.delivered, acct.rejected) == (21_313, 21_312, 1)
    assert dict(acct.by_reason) == {"price_not_positive": 1}


async def test_quarantine_writes_the_refused_rows(sample_dir: Path, tmp_path: Path) -> None:
    cols = real_trades(sample_dir)
    cols["ts_ns"][500] -= 10**12  # back in time by 1000 s
    q = tmp_path / "q.jsonl"
    cap, pipe = await ingest_all(cols, symbol="BTCUSDT-PERP", policy="quarantine", quarantine=str(q))
    lines = [orjson.loads(x) for x in q.read_bytes().splitlines()]
    assert [(x["record"], x["reason"]) for x in lines] == [(501, "ts_backwards")]
    assert len(cap.column("ts_ns")) == 21_312 and pipe.ingest_accounting.total.quarantined == 1


async def test_time_order_is_checked_across_calls() -> None:
    cap = Capture()
    async with Pipeline([cap], batch_size=64, memory="host") as pipe:
        await pipe.ingest({"ts_ns": np.array([10, 20]), "price": np.ones(2), "size": np.ones(2)}, symbol="A")
        with pytest.raises(DataError, match=r"ingest \(call 2\), line/record 1.*ts backwards"):
            await pipe.ingest({"ts_ns": np.array([15]), "price": np.ones(1), "size": np.ones(1)}, symbol="A")
        await pipe.ingest({"ts_ns": np.array([15]), "price": np.ones(1), "size": np.ones(1)}, symbol="B")
        await pipe.drain()
    assert cap.column("ts_ns").tolist() == [10, 20, 15]


async def test_frames_without_ts_or_with_unknown_columns_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"the ts_ns column is required .* got columns \['price', 'size'\]"):
        await ingest_all(pa.table({"price": [1.0], "size": [1.0]}), symbol="X")
    with pytest.raises(ConfigError, match=r"unknown tick columns \['qty'\]"):
        await ingest_all({"ts_ns": np.arange(2), "qty": np.ones(2)}, symbol="X")
    with pytest.raises(ConfigError, match="a dict of arrays or a pandas/polars/pyarrow table, got list"):
        await ingest_all([1, 2, 3])
    with pytest.raises(ConfigError, match="column 'price' holds"):
        frame_columns(pa.table({"ts_ns": [1], "price": ["1.5"]}))


@pytest.mark.parametrize(("name", "values", "first"), [
    ("ts_ns", np.array([1.0, 1_700_000_000_123_456_789.0]), "row 1"),  # past float64's 53 bits
    ("side", np.array([1.0, np.nan, -1.0]), "row 1"),                  # no int for NaN
    ("trade_id", np.array([1.0, 2.5]), "row 1"),                       # a fraction
])
def test_a_column_that_a_cast_would_change_is_refused_with_its_first_row(name, values, first) -> None:
    cols = {"ts_ns": np.arange(len(values)), name: values}
    with pytest.raises(ConfigError, match=rf"column {name!r} cannot be held exactly as .*{first}"):
        frame_columns(cols)


def test_exact_casts_go_through() -> None:
    cols = frame_columns({"ts_ns": np.array([1.0, 2.0, 2.0**52]), "side": np.array([1.0, -1.0, 0.0]),
                          "price": np.array([1, 2, 3], dtype=np.int32)})
    assert cols["ts_ns"].dtype == np.int64 and cols["ts_ns"][2] == 2**52
    np.testing.assert_array_equal(cols["side"], [1, -1, 0])
    assert cols["price"].dtype == np.float64
