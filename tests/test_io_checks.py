"""Bad input: each check under each policy, the messages, quarantine files, broken files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
import zstandard

from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.io import Policy, Source, Validator, open_reader
from nautilus_pipeline.io.checks import IdSet, validated

HEADER = "id,price,qty,quote_qty,time,is_buyer_maker\n"
GOOD = [
    "1,100.0,1.0,100.0,1000,false",
    "2,100.5,2.0,201.0,1000,true",
    "3,101.0,0.5,50.5,1001,false",
    "4,101.5,1.5,152.25,1002,true",
]


def trades_file(tmp_path: Path, lines: list[str], name: str = "TEST-trades-2024-01-01.csv") -> Path:
    p = tmp_path / name
    p.write_text(HEADER + "\n".join(lines) + "\n")
    return p


def run(path: Path, policy: str = "reject", quarantine: Path | None = None, allow_equal_ts: bool = True,
        order_by: str = "ts_ns", chunk_rows: int = 2, **options: object) -> tuple[list[int], Validator]:
    """Records delivered, and the validator (its accounting) after reading the whole file."""
    v = Validator(str(path), policy, quarantine=quarantine, allow_equal_ts=allow_equal_ts, order_by=order_by)
    reader = open_reader(path, **options)
    delivered = [int(r) for c in validated(reader.chunks(chunk_rows), v) for r in c.records]
    return delivered, v


@pytest.mark.parametrize(
    ("bad_line", "reason", "field"),
    [
        ("9,abc,1.0,1.0,1003,false", "unparsable", "price"),
        ("9,,1.0,1.0,1003,false", "missing_field", "price"),
        ("9,nan,1.0,1.0,1003,false", "price_not_finite", "price"),
        ("9,inf,1.0,1.0,1003,false", "price_not_finite", "price"),
        ("9,0,1.0,1.0,1003,false", "price_not_positive", "price"),
        ("9,-5,1.0,1.0,1003,false", "price_not_positive", "price"),
        ("9,100,0,1.0,1003,false", "size_not_positive", "qty"),
        ("9,100,-1,1.0,1003,false", "size_not_positive", "qty"),
        ("9,100,1.0,1.0,999,false", "ts_backwards", "time"),
        ("2,100,1.0,1.0,1003,false", "duplicate_trade_id", "id"),
        ("9,100,1.0,1.0,1003,maybe", "unknown_side", "is_buyer_maker"),
        ("9,100,1.0,1003,false", "wrong_field_count", None),
        ("", "missing_field", "time"),
    ],
)
def test_each_check_rejects_the_row_and_names_it(tmp_path: Path, bad_line: str, reason: str, field: str | None) -> None:
    p = trades_file(tmp_path, [*GOOD[:2], bad_line, *GOOD[2:]])
    q = tmp_path / "q.jsonl"
    delivered, v = run(p, "quarantine", quarantine=q)
    assert delivered == [2, 3, 5, 6]  # the bad row was line 4
    counts = v.accounting.sources[str(p)]
    assert (counts.read, counts.delivered + len(delivered), counts.quarantined) == (5, 4, 1)
    assert dict(counts.by_reason) == {reason: 1}
    (entry,) = [orjson.loads(x) for x in q.read_bytes().splitlines()]
    assert entry["record"] == 4 and entry["reason"] == reason and entry["field"] == field
    assert entry["raw"] == bad_line  # the line as it is in the file

    with pytest.raises(DataError) as err:
        run(p, "fail")
    msg = str(err.value)
    assert str(p) in msg and "line/record 4" in msg and reason.replace("_", " ") in msg
    if field:
        assert repr(field) in msg


def test_fail_message_names_value_and_what_to_do(tmp_path: Path) -> None:
    p = trades_file(tmp_path, [*GOOD[:2], "9,-5,1.0,1.0,1003,false"])
    with pytest.raises(DataError, match=r"line/record 4, field 'price', symbol 'TEST': price not positive \(found -5.0\); prices must be > 0"):
        run(p, "fail")


def test_backwards_message_gives_the_earlier_timestamp(tmp_path: Path) -> None:
    p = trades_file(tmp_path, [*GOOD, "9,100,1.0,1.0,1001,false"])
    with pytest.raises(DataError, match=r"line/record 6, field 'time'.*ts backwards.*1001000000.*1002000000.*sort the file"):
        run(p, "fail")


def test_equal_timestamps_pass_unless_disallowed(tmp_path: Path) -> None:
    p = trades_file(tmp_path, GOOD)  # lines 2 and 3 share time 1000
    assert run(p)[0] == [2, 3, 4, 5]
    delivered, v = run(p, allow_equal_ts=False)
    assert delivered == [2, 4, 5]
    assert v.accounting.sources[str(p)].by_reason == {"ts_backwards": 1}


def test_rejected_rows_do_not_move_the_time_line(tmp_path: Path) -> None:
    # a rejected row (here a bad price) with a far-future time must not refuse the rows after it
    p = trades_file(tmp_path, [GOOD[0], "9,-1,1.0,1.0,999999,false", *GOOD[1:]])
    assert run(p)[0] == [2, 4, 5, 6]


def test_crossed_quotes_are_refused_locked_quotes_pass(tmp_path: Path) -> None:
    p = tmp_path / "q.csv"
    p.write_text("t,bid,ask\n1,10.0,10.1\n2,10.2,10.1\n3,10.1,10.1\n")
    delivered, v = run(p, format="csv", mapping={"ts": "t", "ts_unit": "s", "bid": "bid", "ask": "ask"})
    assert delivered == [2, 4]
    assert v.accounting.sources[str(p)].by_reason == {"crossed_quote": 1}


def test_duplicate_ids_are_checked_per_symbol_only(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("t,s,p,q,id\n1,A,10,1,5\n2,B,10,1,5\n3,A,10,1,5\n")
    mapping = {"ts": "t", "ts_unit": "s", "symbol": "s", "price": "p", "size": "q", "trade_id": "id"}
    delivered, v = run(p, format="csv", mapping=mapping)
    assert delivered == [2, 3]
    assert v.accounting.symbols[(str(p), "A")].by_reason == {"duplicate_trade_id": 1}
    assert v.accounting.symbols[(str(p), "B")].rejected == 0


def test_duplicates_across_chunks_and_out_of_order_ids(tmp_path: Path) -> None:
    lines = [f"{i},100,1,100,{1000 + k},false" for k, i in enumerate((10, 12, 11, 13, 12, 10, 14))]
    delivered, _ = run(trades_file(tmp_path, lines))
    assert delivered == [2, 3, 4, 5, 8]


def test_idset_keeps_ranges() -> None:
    s = IdSet()
    s.add(np.arange(100, 200))
    s.add(np.arange(200, 300))
    s.add(np.array([500, 502, 50]))
    assert len(s.starts) == 4 and len(s) == 203
    assert s.contains(np.array([99, 100, 299, 300, 501, 502, 50])).tolist() == [False, True, True, False, False, True, True]
    s.add(np.array([300, 301, 499, 501]))
    assert s.starts.tolist() == [50, 100, 499] and s.ends.tolist() == [50, 301, 502]


def test_quarantine_policy_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quarantine file"):
        Validator("x", "quarantine")
    with pytest.raises(ConfigError, match="not one of"):
        Policy.parse("ignore")


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        open_reader(p, format="binance_trades")
    with pytest.raises(DataError, match="empty"):
        Source(p).open()


def test_header_only_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "TEST-trades.csv"
    p.write_text(HEADER)
    with pytest.raises(DataError, match="header but no rows"):
        open_reader(p, format="binance_trades")
    with pytest.raises(DataError, match="header but no rows"):
        open_reader(p, format="csv", mapping={"ts": "time", "price": "price", "size": "qty"})


def test_wrong_columns_are_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match=r"wrong columns: \['ts_col'\] not found in the header \['a', 'b', 'c'\]"):
        open_reader(p, format="csv", mapping={"ts": "ts_col", "price": "b", "size": "c"})
    with pytest.raises(DataError, match="Binance trades row has 6 or 7 fields, this one has 3"):
        open_reader(p, format="binance_trades")
    with pytest.raises(DataError, match="wrong columns"):
        open_reader(p, format="histdata")
    with pytest.raises(ConfigError, match="needs a column mapping"):
        open_reader(p, format="csv")


def test_wrong_parquet_columns_are_a_clear_error(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"a": [1], "b": [2.0]}), p)
    with pytest.raises(DataError, match="no timestamp column"):
        open_reader(p)


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_truncated_compressed_csv_is_a_clear_error(sample_dir: Path, tmp_path: Path, codec: str) -> None:
    raw = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_bytes()
    packed = gzip.compress(raw) if codec == "gzip" else zstandard.ZstdCompressor().compress(raw)
    p = tmp_path / f"BTCUSDT-trades.csv.{'gz' if codec == 'gzip' else 'zst'}"
    p.write_bytes(packed[: len(packed) // 2])
    reader = open_reader(p)
    with pytest.raises(DataError, match=r"truncated or corrupt.*re-download"):
        for _ in reader.chunks():
            pass


def test_truncated_feed_capture_is_a_clear_error(sample_dir: Path, tmp_path: Path) -> None:
    src = (sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes()
    p = tmp_path / "feed.jsonl.gz"
    p.write_bytes(src[: len(src) // 3])
    with pytest.raises(DataError, match="truncated"):
        for _ in open_reader(p).chunks():
            pass


def test_truncated_dbn_is_a_clear_error(sample_dir: Path, tmp_path: Path) -> None:
    src = (sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst").read_bytes()
    p = tmp_path / "cut.dbn.zst"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match="truncated"):
        for _ in open_reader(p).chunks():
            pass
    with pa.input_stream(str(sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst"), compression="zstd") as s:
        raw = s.read()  # pyarrow: the file is several zstd frames
    p2 = tmp_path / "cut.dbn"
    p2.write_bytes(raw[: len(raw) - 7])  # cut inside the last record
    with pytest.raises(DataError, match="middle of a record"):
        for _ in open_reader(p2).chunks():
            pass


def test_truncated_parquet_is_a_clear_error(sample_dir: Path, tmp_path: Path) -> None:
    src = (sample_dir / "nautilus-binance-btcusdt-trades.parquet").read_bytes()
    p = tmp_path / "cut.parquet"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match="Parquet"):
        open_reader(p, format="parquet")


def test_unparsable_values_deep_in_a_big_file_keep_exact_line_numbers(sample_dir: Path, tmp_path: Path) -> None:
    lines = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_text().splitlines()
    lines[15_000] = lines[15_000].replace(",false", ",maybe").replace(",true", ",maybe")
    lines[20_000] = lines[20_000].split(",", 1)[0] + ",x" + "," + lines[20_000].split(",", 2)[2]
    lines[5] = "garbage"
    p = tmp_path / "BTCUSDT-trades.csv"
    p.write_text("\n".join(lines) + "\n")
    q = tmp_path / "q.jsonl"
    delivered, v = run(p, "quarantine", quarantine=q, chunk_rows=4096)
    entries = [orjson.loads(x) for x in q.read_bytes().splitlines()]
    assert sorted((e["record"], e["reason"]) for e in entries) == [(6, "wrong_field_count"), (15_001, "unknown_side"), (20_001, "unparsable")]
    assert len(delivered) == 21_310 and 15_001 not in delivered and 15_002 in delivered
    counts = v.accounting.sources[str(p)]
    assert (counts.read, counts.quarantined) == (21_313, 3) and counts.read == len(delivered) + 3


def test_feed_capture_bad_json_line_is_a_counted_row(sample_dir: Path, tmp_path: Path) -> None:
    with gzip.open(sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz", "rb") as fh:
        lines = fh.read().splitlines()[:50]
    lines[10] = lines[10][:40]
    p = tmp_path / "feed.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    delivered, v = run(p, "reject", order_by="ts_recv_ns")
    assert 11 not in delivered
    assert v.accounting.total.by_reason == {"unparsable": 1}


def test_source_shares_policy_and_quarantine_with_the_replay(sample_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    shutil.copy(sample_dir / "tardis-bitmex-xbtusd-trades.csv", p)
    text = p.read_text().splitlines()
    text[3] = text[3].replace(",sell,", ",sideways,")
    p.write_text("\n".join(text) + "\n")
    q = tmp_path / "quarantine" / "t.jsonl"
    reader, v = Source(p, policy="quarantine", quarantine=q).open()
    n = sum(len(c) for c in validated(reader.chunks(), v))
    assert n == 9
    (entry,) = [orjson.loads(x) for x in q.read_bytes().splitlines()]
    assert entry["record"] == 4 and entry["field"] == "side" and entry["value"] == "sideways"


def test_dbn_undefined_price_sentinel_is_refused_as_not_finite(sample_dir: Path, tmp_path: Path) -> None:
    import struct

    import databento_dbn as dbn

    with pa.input_stream(str(sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst"), compression="zstd") as s:
        raw = s.read()
    first_price = struct.pack("<q", 5_528_750_000_000)  # record 1: 5528.75 as fixed-point 1e-9
    at = raw.find(first_price)
    assert at > 0
    p = tmp_path / "undef.dbn"
    p.write_bytes(raw[:at] + struct.pack("<q", dbn.UNDEF_PRICE) + raw[at + 8 :])
    delivered, v = run(p, "reject", chunk_rows=4096)
    assert 1 not in delivered and len(delivered) == 119
    assert v.accounting.total.by_reason == {"price_not_finite": 1}


def test_a_file_of_only_refused_lines_counts_each_with_its_line(tmp_path: Path) -> None:
    p = trades_file(tmp_path, ["garbage", "1,2", "a,b,c"])
    mapping = {"ts": "time", "ts_unit": "ms", "price": "price", "size": "qty"}
    delivered, v = run(p, "reject", format="csv", mapping=mapping)
    assert delivered == []
    assert v.accounting.total.read == 3 and v.accounting.total.by_reason == {"wrong_field_count": 3}
    with pytest.raises(DataError, match=r"line/record 2\b"):
        run(p, "fail", format="csv", mapping=mapping)
    with pytest.raises(DataError, match="wrong columns"):
        open_reader(p, format="binance_trades")  # the layout is told by the first row


def test_unknown_reader_options_are_a_config_error(sample_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"format 'binance_trades' takes no option \['mapping'\]"):
        Source(sample_dir / "binance-um-btcusdt-trades-20240808.csv", options={"mapping": {}}).open()
    reader, _ = Source(sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst", options={"trades": True}).open()
    assert reader.trades is True
