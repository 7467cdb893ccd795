"""Every reader against the real sample files: row counts, first and last records, units.

Expected values are read off the files by eye (see nautilus_pipeline/data/README.md), and
timestamps are computed with ``datetime``, independently of the readers' own conversion.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest

from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE, TICK_COLUMN_NAMES
from nautilus_pipeline.io import Validator, detect_format, open_reader
from nautilus_pipeline.io.checks import validated


def ns(text: str) -> int:
    """ISO time (UTC unless an offset is given) to ns since the epoch."""
    t = dt.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    d = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (d.days * 86_400 + d.seconds) * 10**9 + d.microseconds * 1000


def read_all(path: Path, policy: str = "fail", order_by: str = "ts_ns", **options: object) -> tuple[dict[str, np.ndarray], list[str], np.ndarray, Validator, object]:
    """All rows of a file through reader + checks, as concatenated columns."""
    reader = open_reader(path, **options)
    v = Validator(str(path), policy, order_by=order_by)
    chunks = list(validated(reader.chunks(4096), v))
    names = chunks[0].symbols
    cols = {k: np.concatenate([c.column(k) for c in chunks]) for k in TICK_COLUMN_NAMES}
    records = np.concatenate([c.records for c in chunks])
    return cols, names, records, v, reader


def row(cols: dict[str, np.ndarray], i: int) -> dict[str, object]:
    return {k: v[i].item() for k, v in cols.items()}


EXPECTED_FORMATS = {
    "binance-um-btcusdt-trades-20240808.csv": "binance_trades",
    "binance-spot-ethusdt-trades-20240808.csv": "binance_trades",
    "binance-feed-spot-ethusdt_20240808.jsonl.gz": "binance_feed",
    "tardis-bitmex-xbtusd-trades.csv": "tardis_trades",
    "tardis-huobi-btcusd-quotes.csv": "tardis_quotes",
    "nautilus-binance-btcusdt-trades.parquet": "parquet",
    "nautilus-binance-btcusdt-quotes.parquet": "parquet",
    "databento-glbx-futures-trades-20240701.dbn.zst": "databento",
    "databento-glbx-futures-mbp1-20240701.dbn.zst": "databento",
    "databento-glbx-esh4-mbo-20231225-head.dbn.zst": "databento",
    "truefx-usdjpy-quotes.csv": "truefx",
    "histdata-eurusd-quotes.csv": "histdata",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMATS))
def test_detect_format_recognises_every_bundled_file(sample_dir: Path, name: str) -> None:
    assert detect_format(sample_dir / name) == EXPECTED_FORMATS[name]


def test_bundled_samples_are_all_known(sample_dir: Path) -> None:
    files = {p.name for p in sample_dir.iterdir() if p.name != "README.md" and not p.name.startswith("__")}
    assert files == set(EXPECTED_FORMATS)


def test_binance_usdm_trades_with_header(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "binance-um-btcusdt-trades-20240808.csv")
    assert names == ["BTCUSDT"]
    assert len(records) == 21_313
    assert records[0] == 2 and records[-1] == 21_314  # line numbers after the header
    first, last = row(cols, 0), row(cols, -1)
    assert first["trade_id"] == 5266583935 and first["price"] == 61800.30 and first["size"] == 0.006
    assert first["ts_ns"] == 1723161256322 * 10**6
    assert first["side"] == 1  # is_buyer_maker false: the buyer was the aggressor
    assert last["trade_id"] == 5266605247 and last["price"] == 61659.80 and last["size"] == 0.076
    assert last["ts_ns"] == 1723161599643 * 10**6
    assert (np.diff(cols["trade_id"]) == 1).all()  # ids contiguous, as the README says
    assert (np.diff(cols["ts_ns"]) >= 0).all()
    assert np.mean(np.diff(cols["ts_ns"]) == 0) > 0.7  # sweeps: most trades share a timestamp
    assert (cols["kind"] == KIND_TRADE).all()


def test_binance_spot_trades_without_header(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "binance-spot-ethusdt-trades-20240808.csv")
    assert names == ["ETHUSDT"]
    assert len(records) == 6_106 and records[0] == 1
    first, last = row(cols, 0), row(cols, -1)
    assert first["trade_id"] == 1520538925 and first["price"] == 2683.8 and first["size"] == 0.002
    assert first["side"] == -1  # is_buyer_maker True: seller-initiated
    assert first["ts_ns"] == 1723161255611 * 10**6
    assert last["trade_id"] == 1520545030 and last["price"] == 2682.51 and last["side"] == 1
    assert last["ts_ns"] == 1723161600982 * 10**6


def test_binance_microsecond_times_are_detected_by_magnitude(tmp_path: Path) -> None:
    p = tmp_path / "ETHUSDT-trades-2025-01-02.csv"
    p.write_text("1,3300.5,0.1,330.05,1735776000123456,true,true\n2,3300.6,0.2,660.12,1735776000123999,false,true\n")
    cols, names, _, _, _ = read_all(p)
    assert names == ["ETHUSDT"]
    assert cols["ts_ns"].tolist() == [1735776000123456000, 1735776000123999000]


def test_binance_agg_trades(tmp_path: Path) -> None:
    p = tmp_path / "BTCUSDT-aggTrades-2024-08-08.csv"
    p.write_text(
        "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker\n"
        "100,61800.3,0.5,1000,1003,1723161256322,false\n101,61800.2,0.1,1004,1004,1723161256344,true\n"
    )
    assert detect_format(p) == "binance_agg_trades"
    cols, names, records, _, _ = read_all(p)
    assert names == ["BTCUSDT"] and records.tolist() == [2, 3]
    assert cols["trade_id"].tolist() == [100, 101] and cols["side"].tolist() == [1, -1]
    assert cols["size"].tolist() == [0.5, 0.1]


def test_binance_feed_capture_counts_trades_quotes_and_ignored_lines(sample_dir: Path) -> None:
    cols, names, records, v, reader = read_all(sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz", order_by="ts_recv_ns")
    assert names == ["ETHUSDT"]
    assert int((cols["kind"] == KIND_TRADE).sum()) == 6_106
    assert int((cols["kind"] == KIND_QUOTE).sum()) == 24_077
    assert reader.ignored == 33_618 - 6_106 - 24_077  # depth updates and the snapshot line
    first = row(cols, 0)  # line 1 is a bookTicker: spot quotes carry no exchange time
    assert records[0] == 1 and first["kind"] == KIND_QUOTE
    assert first["ts_recv_ns"] == first["ts_ns"] == 1723161254024619568
    assert (first["bid"], first["ask"], first["bid_size"], first["ask_size"]) == (2683.80, 2683.81, 3.0292, 31.4395)
    trades = np.flatnonzero(cols["kind"] == KIND_TRADE)
    t0 = row(cols, int(trades[0]))
    assert t0["trade_id"] == 1520538925 and t0["price"] == 2683.8 and t0["side"] == -1
    assert t0["ts_ns"] == 1723161255611 * 10**6 and t0["ts_recv_ns"] > 0
    assert (np.diff(cols["ts_recv_ns"]) >= 0).all()
    assert v.accounting.sources[str(sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz")].read == 30_183


@pytest.mark.parametrize(
    ("name", "trades", "quotes"),
    [
        ("binance-feed-usdm-btcusdt_20240808.jsonl.gz", 21_313, 66_089),
        ("binance-feed-usdm-ethusdt_20240808.jsonl.gz", 14_076, 53_992),
        ("binance-feed-spot-btcusdt_20240808.jsonl.gz", 9_757, 28_040),
        ("binance-feed-cm-btcusd_perp_20240809.jsonl.gz", 2_949, 29_219),
    ],
)
def test_binance_feed_captures_in_shared_data(shared_data: Path, name: str, trades: int, quotes: int) -> None:
    cols, _, _, _, _ = read_all(shared_data / name, order_by="ts_recv_ns")
    assert int((cols["kind"] == KIND_TRADE).sum()) == trades
    assert int((cols["kind"] == KIND_QUOTE).sum()) == quotes


def test_usdm_feed_trades_equal_the_usdm_trades_csv(sample_dir: Path, shared_data: Path) -> None:
    feed, _, _, _, _ = read_all(shared_data / "binance-feed-usdm-btcusdt_20240808.jsonl.gz", order_by="ts_recv_ns")
    csv, _, _, _, _ = read_all(sample_dir / "binance-um-btcusdt-trades-20240808.csv")
    t = feed["kind"] == KIND_TRADE
    order = np.argsort(feed["trade_id"][t], kind="stable")
    for k in ("trade_id", "price", "size", "side", "ts_ns"):
        assert np.array_equal(feed[k][t][order], csv[k]), k


def test_tardis_trades(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "tardis-bitmex-xbtusd-trades.csv")
    assert names == ["XBTUSD"] and len(records) == 10
    first, last = row(cols, 0), row(cols, -1)
    assert first["ts_ns"] == 1583020803145000 * 1000 and first["ts_recv_ns"] == 1583020803307160 * 1000
    assert (first["price"], first["size"], first["side"]) == (8531.5, 2152.0, -1)
    assert last["ts_ns"] == 1583020803276000 * 1000 and last["size"] == 1.0
    assert (cols["trade_id"] == -1).all()  # BitMEX ids are UUIDs: not kept


def test_tardis_quotes(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "tardis-huobi-btcusd-quotes.csv")
    assert names == ["BTC-USD"] and len(records) == 10
    first, last = row(cols, 0), row(cols, -1)
    assert (first["bid"], first["ask"], first["bid_size"], first["ask_size"]) == (8629.2, 8629.3, 806.0, 5494.0)
    assert first["ts_ns"] == 1588291201099000 * 1000 and first["ts_recv_ns"] == 1588291201234268 * 1000
    assert (last["bid_size"], last["ask_size"]) == (847.0, 5411.0)
    assert (cols["kind"] == KIND_QUOTE).all() and np.isnan(cols["price"]).all()


def test_nautilus_trades_parquet(sample_dir: Path) -> None:
    cols, _, records, _, _ = read_all(sample_dir / "nautilus-binance-btcusdt-trades.parquet", symbol="BTCUSDT")
    assert len(records) == 2_001 and records[0] == 1
    first, last = row(cols, 0), row(cols, -1)
    assert first["ts_ns"] == ns("2021-01-08T00:00:00.278")
    assert (first["trade_id"], first["price"], first["size"], first["side"]) == (553287559, 39432.48, 0.000263, -1)
    assert last["ts_ns"] == ns("2021-01-08T00:00:46.355") and last["trade_id"] == 553289559
    assert last["price"] == 39491.76


def test_nautilus_quotes_parquet(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "nautilus-binance-btcusdt-quotes.parquet")
    assert names == ["BTC/USDT"] and len(records) == 451
    first, last = row(cols, 0), row(cols, -1)
    assert first["ts_ns"] == ns("2021-01-08T00:00:01.076")
    assert (first["bid"], first["ask"], first["bid_size"], first["ask_size"]) == (39432.99, 39433.62, 0.0031, 0.066851)
    assert last["ts_ns"] == ns("2021-01-08T00:00:46.674") and (last["bid"], last["ask"]) == (39490.97, 39490.98)


def test_databento_trades(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst")
    assert names == ["ESU4"] and len(records) == 120
    first, last = row(cols, 0), row(cols, -1)
    assert (first["ts_ns"], first["ts_recv_ns"]) == (1719878281218218853, 1719878281218485389)
    assert (first["price"], first["size"], first["side"]) == (5528.75, 2.0, 1)
    assert (last["ts_ns"], last["price"], last["size"], last["side"]) == (1719878512813445903, 5529.25, 1.0, -1)


def test_databento_mbp1_as_quotes_and_optionally_trades(sample_dir: Path) -> None:
    path = sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst"
    cols, _, records, _, _ = read_all(path)
    assert len(records) == 2_288 and (cols["kind"] == KIND_QUOTE).all()
    first, last = row(cols, 0), row(cols, -1)
    assert (first["bid"], first["ask"], first["bid_size"], first["ask_size"]) == (5528.5, 5528.75, 29.0, 6.0)
    assert (last["ts_ns"], last["bid"], last["ask"]) == (1719878519824330531, 5529.0, 5529.25)
    both, _, rec2, _, _ = read_all(path, trades=True)
    trades = both["kind"] == KIND_TRADE
    assert int(trades.sum()) == 120 and len(rec2) == 2_408
    dbn_trades, _, _, _, _ = read_all(sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst")
    assert np.array_equal(both["price"][trades], dbn_trades["price"])
    assert np.array_equal(both["ts_ns"][trades], dbn_trades["ts_ns"])


def test_databento_mbo_is_read_as_book_rows(shared_data: Path) -> None:
    from nautilus_pipeline.events import KIND_BOOK

    cols, names, records, _, reader = read_all(shared_data / "databento-glbx-esh4-mbo-20231225.dbn.zst")
    assert names == ["ESH4"] and (cols["kind"] == KIND_BOOK).all() and len(records) == 69_346
    assert cols["side"][0] == 0 and np.isnan(cols["price"][0])  # the snapshot's clear
    assert set(np.unique(cols["side"][1:]).tolist()) == {-1, 1} and (cols["size"] >= 0).all()
    assert reader.unknown_orders == 0 and reader.ignored > 0  # fills and trades change no level


def test_truefx_iso_quotes(sample_dir: Path) -> None:
    cols, names, records, _, _ = read_all(sample_dir / "truefx-usdjpy-quotes.csv", symbol="USD/JPY")
    assert names == ["USD/JPY"] and len(records) == 1_000
    first, last = row(cols, 0), row(cols, -1)
    assert first["ts_ns"] == ns("2013-01-01T22:00:00.295+00:00") and (first["bid"], first["ask"]) == (86.655, 86.728)
    assert last["ts_ns"] == ns("2013-01-01T22:35:13.494+00:00") and (last["bid"], last["ask"]) == (86.836, 86.854)
    assert math.isnan(first["bid_size"])


def test_truefx_raw_layout(tmp_path: Path) -> None:
    p = tmp_path / "USDJPY-2013-01.csv"
    p.write_text("USD/JPY,20130101 22:00:00.295,86.655,86.728\nUSD/JPY,20130101 22:02:35.907,86.657,86.728\n")
    assert detect_format(p) == "truefx"
    cols, names, _, _, _ = read_all(p)
    assert names == ["USD/JPY"]
    assert cols["ts_ns"].tolist() == [ns("2013-01-01T22:00:00.295"), ns("2013-01-01T22:02:35.907")]


def test_histdata_times_are_est_without_dst_converted_to_utc(sample_dir: Path) -> None:
    cols, _, records, _, _ = read_all(sample_dir / "histdata-eurusd-quotes.csv", symbol="EUR/USD")
    assert len(records) == 9_500
    first, last = row(cols, 0), row(cols, -1)
    assert first["ts_ns"] == ns("2020-01-01T17:00:00.065-05:00") and (first["bid"], first["ask"]) == (1.1212, 1.12172)
    assert last["ts_ns"] == ns("2020-01-01T23:00:52.125-05:00") and (last["bid"], last["ask"]) == (1.1213, 1.12132)


def test_histdata_summer_time_is_still_utc_minus_5(tmp_path: Path) -> None:
    p = tmp_path / "eurusd-july.csv"
    p.write_text("20200701 120000000,1.1,1.2,0\n")
    cols, _, _, _, _ = read_all(p, format="histdata")
    assert cols["ts_ns"][0] == ns("2020-07-01T17:00:00")  # no daylight saving: +5 h all year


def test_generic_csv_with_mapping_iso_times_and_symbols(tmp_path: Path) -> None:
    p = tmp_path / "trades.csv"
    p.write_text(
        "when,sym,px,qty,aggressor,tid\n"
        "2024-01-02T03:04:05.123456789Z,AAA,10.5,3,B,7\n"
        "2024-01-02T03:04:05.2Z,BBB,20,1,S,8\n"
        "2024-01-02T03:04:06Z,AAA,10.6,2,B,9\n"
    )
    mapping = {"ts": "when", "ts_unit": "iso", "symbol": "sym", "price": "px", "size": "qty", "side": "aggressor", "trade_id": "tid"}
    cols, names, records, _, _ = read_all(p, format="csv", mapping=mapping)
    assert names == ["AAA", "BBB"] and records.tolist() == [2, 3, 4]
    assert cols["ts_ns"][0] == ns("2024-01-02T03:04:05.123456") + 789
    assert [names[i] for i in cols["symbol_id"]] == ["AAA", "BBB", "AAA"]
    assert cols["side"].tolist() == [1, -1, 1] and cols["trade_id"].tolist() == [7, 8, 9]


@pytest.mark.parametrize(
    ("unit", "values", "expected_ns"),
    [
        ("s", ["1700000000", "1700000001.5"], [1700000000 * 10**9, 1700000001500000000]),
        ("ms", ["1700000000000", "1700000000001"], [1700000000000 * 10**6, 1700000000001 * 10**6]),
        ("us", ["1700000000000000", "1700000000000001"], [1700000000000000 * 1000, 1700000000000001 * 1000]),
        ("ns", ["1700000000000000000", "1700000000000000001"], [1700000000000000000, 1700000000000000001]),
    ],
)
def test_generic_csv_timestamp_units(tmp_path: Path, unit: str, values: list[str], expected_ns: list[int]) -> None:
    p = tmp_path / "q.csv"
    p.write_text("t,bid,ask\n" + "".join(f"{v},1.0,1.1\n" for v in values))
    cols, _, _, _, _ = read_all(p, format="csv", mapping={"ts": "t", "ts_unit": unit, "bid": "bid", "ask": "ask"})
    assert cols["ts_ns"].tolist() == expected_ns


@pytest.mark.parametrize(
    ("encoding", "codes"),
    [("buy_sell", ["buy", "SELL", "unknown"]), ("buy_sell", ["B", "S", "N"]), ("sign", ["1", "-1", "0"]), ("is_buyer_maker", ["false", "true", None])],
)
def test_generic_csv_side_encodings(tmp_path: Path, encoding: str, codes: list[str | None]) -> None:
    p = tmp_path / "t.csv"
    rows = [f"{i},10.0,1.0,{c}" for i, c in enumerate(codes) if c is not None]
    p.write_text("t,p,q,side\n" + "\n".join(rows) + "\n")
    mapping = {"ts": "t", "ts_unit": "s", "price": "p", "size": "q", "side": "side", "side_encoding": encoding}
    cols, _, _, _, _ = read_all(p, format="csv", mapping=mapping)
    assert cols["side"].tolist() == [1, -1, 0][: len(rows)]


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_compressed_csv_reads_the_same_rows(sample_dir: Path, tmp_path: Path, codec: str) -> None:
    import gzip

    import zstandard

    raw = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_bytes()
    p = tmp_path / "BTCUSDT-trades-2024-08-08.data"  # a name without extension: magic bytes decide
    p.write_bytes(gzip.compress(raw) if codec == "gzip" else zstandard.ZstdCompressor().compress(raw))
    plain, _, rec1, _, _ = read_all(sample_dir / "binance-um-btcusdt-trades-20240808.csv")
    packed, _, rec2, _, _ = read_all(p)
    assert np.array_equal(rec1, rec2)
    for k in plain:
        assert np.array_equal(plain[k], packed[k], equal_nan=plain[k].dtype.kind == "f"), k


def test_nautilus_catalog_style_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "trade_tick.parquet"
    pq.write_table(pa.table({
        "price": [100.5, 100.25], "size": [2.0, 1.0],
        "aggressor_side": pa.array([1, 2], pa.uint8()), "trade_id": ["T-1", "T-2"],
        "ts_event": pa.array([1_700_000_000_000_000_001, 1_700_000_000_000_000_002], pa.uint64()),
        "ts_init": pa.array([1_700_000_000_000_000_011, 1_700_000_000_000_000_012], pa.uint64()),
    }), p)
    cols, _, records, _, _ = read_all(p, symbol="ETHUSDT.BINANCE")
    assert records.tolist() == [1, 2]
    assert cols["ts_ns"].tolist() == [1_700_000_000_000_000_001, 1_700_000_000_000_000_002]
    assert cols["ts_recv_ns"].tolist() == [1_700_000_000_000_000_011, 1_700_000_000_000_000_012]
    assert cols["side"].tolist() == [1, -1] and cols["trade_id"].tolist() == [-1, -1]
    assert cols["price"].tolist() == [100.5, 100.25]


def test_generic_jsonl_with_mapping_and_text_numbers(tmp_path: Path) -> None:
    p = tmp_path / "ws.jsonl"
    p.write_text(
        '{"E": 1723161256322, "s": "BTCUSDT", "p": "61800.30", "q": "0.006", "m": false, "t": 5}\n'
        "\n"
        '{"E": 1723161256344, "s": "BTCUSDT", "p": "61800.20", "q": "0.5", "m": true, "t": 6}\n'
    )
    mapping = {"ts": "E", "ts_unit": "ms", "symbol": "s", "price": "p", "size": "q", "side": "m",
               "side_encoding": "is_buyer_maker", "trade_id": "t"}
    cols, names, records, _, _ = read_all(p, format="jsonl", mapping=mapping)
    assert names == ["BTCUSDT"] and records.tolist() == [1, 3]
    assert cols["price"].tolist() == [61800.3, 61800.2] and cols["side"].tolist() == [1, -1]
    assert cols["ts_ns"].tolist() == [1723161256322 * 10**6, 1723161256344 * 10**6]


@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("block_size", [37, 1000, 1 << 23])
def test_block_boundaries_never_change_rows_or_line_numbers(sample_dir: Path, tmp_path: Path, codec: str, block_size: int) -> None:
    import gzip

    from nautilus_pipeline.io.csv import CsvOptions, CsvReader
    from nautilus_pipeline.io.table import FieldMap

    text = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_bytes()[:60_000]
    text = text[: text.rfind(b"\n")]  # no newline at the end of the last line
    p = tmp_path / "t.csv"
    p.write_bytes(gzip.compress(text) if codec == "gzip" else text)
    fmap = FieldMap(ts="time", ts_unit="ms", price="price", size="qty", trade_id="id")
    reader = CsvReader(p, fmap, CsvOptions(block_size=block_size), symbol="BTCUSDT")
    chunks = list(reader.chunks(500))
    ids = np.concatenate([c.columns["trade_id"] for c in chunks])
    records = np.concatenate([c.records for c in chunks])
    expected = [int(line.split(b",")[0]) for line in text.splitlines()[1:]]
    assert ids.tolist() == expected
    assert records.tolist() == list(range(2, len(expected) + 2))


@pytest.mark.parametrize("damage", ["garbage", "x", ""])
def test_restart_after_rows_were_delivered_loses_and_repeats_nothing(sample_dir: Path, tmp_path: Path, damage: str) -> None:
    from nautilus_pipeline.io.csv import CsvOptions, CsvReader
    from nautilus_pipeline.io.table import FieldMap

    lines = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_text().splitlines()[:3000]
    bad = 2500  # 0-based index in the file: line 2501, well past the first blocks
    lines[bad] = damage if damage != "x" else lines[bad].replace(",", ",x", 1)
    p = tmp_path / "t.csv"
    p.write_text("\n".join(lines) + "\n")
    fmap = FieldMap(ts="time", ts_unit="ms", price="price", size="qty", trade_id="id")
    reader = CsvReader(p, fmap, CsvOptions(block_size=4096), symbol="BTCUSDT")
    v = Validator(str(p), "reject")
    chunks = list(validated(reader.chunks(300), v))
    records = np.concatenate([c.records for c in chunks]).tolist()
    assert records == [n for n in range(2, 3001) if n != bad + 1]
    assert v.accounting.total.read == 2999 and v.accounting.total.rejected == 1
