"""Silent loss: damaged copies of the bundled real samples never lose rows or deliver bad ones.

Each test damages a copy of a real file the way a disk, a transfer or a careless export does
(one byte, one digit, one unit) and checks the promise: every data line is a delivered row or a
refused row (rows delivered + refused = lines in the file), the damaged row is the refused one,
and under ``fail`` the error names it.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.io.parquet import write_parquet

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"
BINANCE = DATA / "binance-um-btcusdt-trades-20240808.csv"
LINES = BINANCE.read_text().splitlines()  # header + 21,313 trades
ROWS = len(LINES) - 1


def replay(path: Path, fmt: str, policy: str = "reject", chunk_rows: int = 65_536, **kw) -> tuple[dict, Replay]:
    """All delivered columns, and the replay (its accounting)."""
    r = Replay([Source(path, format=fmt, policy=policy, **kw)], chunk_rows=chunk_rows)
    blocks = list(r.iter_arrays())
    cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}
    return cols, r


def write_lines(path: Path, lines: list[str], codec: str = "none") -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if codec == "gzip" else data)
    return path


def set_field(line: str, col: int, value: str) -> str:
    f = line.split(",")
    f[col] = value
    return ",".join(f)


def expected_ids(skip: set[int]) -> list[int]:
    """Trade ids of the sample's data lines (1-based file line numbers), minus ``skip``."""
    return [int(LINES[i - 1].split(",")[0]) for i in range(2, ROWS + 2) if i not in skip]


# --- 1. a stray quote ------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize(("col", "name"), [(0, "id"), (1, "price"), (2, "qty"), (4, "time"), (5, "is_buyer_maker")])
def test_a_stray_quote_refuses_its_row_only(tmp_path: Path, codec: str, col: int, name: str) -> None:
    lines = list(LINES)
    lines[500] = set_field(lines[500], col, '"' + lines[500].split(",")[col][1:])  # line 501
    p = write_lines(tmp_path / "BTCUSDT-trades-2024-08-08.csv", lines, codec)
    cols, r = replay(p, "binance_trades")
    t = r.accounting.total
    assert (t.read, t.delivered, t.rejected) == (ROWS, ROWS - 1, 1)
    assert cols["trade_id"].tolist() == expected_ids({501})
    with pytest.raises(DataError, match=rf"line/record 501, field '{name}'"):
        replay(p, "binance_trades", policy="fail")


def test_a_bit_flipped_into_a_quote_in_an_unmapped_column_loses_nothing(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[9000] = set_field(lines[9000], 3, '"' + lines[9000].split(",")[3])  # quote_qty: not read
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades.csv", lines), "binance_trades", policy="fail")
    assert r.accounting.total.delivered == ROWS and cols["trade_id"].tolist() == expected_ids(set())


def test_a_quoted_export_reads_like_the_plain_file_and_a_stray_quote_in_it_is_one_row(tmp_path: Path) -> None:
    quoted = [",".join(f'"{f}"' for f in ln.split(",")) for ln in LINES[:3001]]
    plain_cols, _ = replay(write_lines(tmp_path / "BTCUSDT-trades-a.csv", LINES[:3001]), "binance_trades", policy="fail")
    cols, _ = replay(write_lines(tmp_path / "BTCUSDT-trades-b.csv", quoted), "binance_trades", policy="fail")
    for k in ("ts_ns", "price", "size", "side", "trade_id"):
        assert cols[k].tolist() == plain_cols[k].tolist(), k
    quoted[1200] = quoted[1200].replace('","', '",', 1)  # one quote lost: line 1201
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades-c.csv", quoted), "binance_trades")
    t = r.accounting.total
    assert (t.read, t.rejected) == (3000, 1)
    assert cols["trade_id"].tolist() == [i for i in expected_ids({1201}) if i <= int(LINES[3000].split(",")[0])]


@pytest.mark.parametrize("header", ["quoted", "plain"])
@pytest.mark.parametrize("exact", [False, True])
def test_quoted_strings_after_the_first_lines_are_read_without_their_quotes(tmp_path: Path, header: str,
                                                                         exact: bool) -> None:
    """pyarrow's ``write_csv`` quotes string values but leaves nulls empty: a string column
    null in the first lines (the head the reader looks at) and quoted later must not keep its
    quotes (a side ``"buy"`` unknown, a symbol ``"BTC"``), whether or not the header is quoted,
    on the fast path and on the exact one (``exact``: a stray carriage return sends the file
    there)."""
    n = 20_000
    sides = [""] * 5000 + ["buy" if i % 2 else "sell" for i in range(n - 5000)]
    syms = [""] * 5000 + ["BTC" if i % 3 else "ETH" for i in range(n - 5000)]
    names = ["time", "px", "qty", "side", "sym"]

    def write(path: Path, quote: bool) -> Path:
        q = (lambda v: f'"{v}"' if v else v) if quote else (lambda v: v)
        head = ",".join(f'"{c}"' for c in names) if quote and header == "quoted" else ",".join(names)
        body = [f"{1_700_000_000_000 + i},{100 + i * 0.01:.2f},0.5,{q(sides[i])},{q(syms[i])}" for i in range(n)]
        if exact:
            body[12_000] = body[12_000].replace(",0.5,", ",0.5\r,")
        path.write_text("\n".join([head, *body]) + "\n")
        return path

    mapping = {"ts": "time", "ts_unit": "ms", "price": "px", "size": "qty", "side": "side",
               "side_encoding": "buy_sell", "symbol": "sym"}
    opts = {"options": {"mapping": mapping}}
    want, want_r = replay(write(tmp_path / "plain.csv", False), "csv", **opts)
    got, got_r = replay(write(tmp_path / "quoted.csv", True), "csv", **opts)
    assert got_r.accounting.total.delivered == want_r.accounting.total.delivered
    assert got_r.accounting.total.rejected == want_r.accounting.total.rejected == (5000 + int(exact))
    for k in want:
        assert np.array_equal(got[k], want[k], equal_nan=got[k].dtype.kind == "f"), k
    assert sorted(got_r.symbols.names) == ["BTC", "ETH"]


def test_a_quote_pair_across_two_lines_and_a_bare_cr_in_one_block_lose_no_line(tmp_path: Path) -> None:
    """A quoted parse merges two lines at a stray quote pair; a bare CR splits one: in one
    block the row count would add up with a line lost (found in review). Every line is a
    row or a refused row, the quoted lines among the rows."""
    mapping = {"ts": "time", "ts_unit": "ms", "price": "px", "size": "qty", "side": "side", "side_encoding": "buy_sell"}
    body = [f"{1_700_000_000_000 + i},{100 + i * 0.01:.2f},0.5,buy,n" for i in range(3000)]
    body[2500] = body[2500][:-1] + '"x'  # an unmapped note column: "x ... y" on the next line
    body[2501] = body[2501][:-1] + 'y"'
    body[2600] = body[2600] + "\r" + body.pop(2601)  # two records joined by a bare CR
    p = tmp_path / "cr.csv"
    p.write_text("time,px,qty,side,note\n" + "\n".join(body) + "\n")
    cols, r = replay(p, "csv", options={"mapping": mapping})
    t = r.accounting.total
    assert (t.read, t.delivered, t.rejected) == (2999, 2998, 1) and dict(t.by_reason) == {"unparsable": 1}
    ts = set((cols["ts_ns"] // 1_000_000).tolist())
    assert {1_700_000_000_000 + 2500, 1_700_000_000_000 + 2501} <= ts


@pytest.mark.parametrize("exact", [False, True])
def test_an_empty_quoted_value_is_a_missing_field_on_both_paths(tmp_path: Path, exact: bool) -> None:
    """``""`` (pyarrow's writer for an empty string) is null on the fast path; the exact
    path's unquoting gave an empty symbol instead (found in review)."""
    mapping = {"ts": "time", "ts_unit": "ms", "price": "px", "size": "qty", "side": "side",
               "side_encoding": "buy_sell", "symbol": "sym"}
    body = [f'{1_700_000_000_000 + i},{100 + i * 0.01:.2f},0.5,"buy","BTC"' for i in range(3000)]
    body[100] = f'{1_700_000_000_000 + 100},101.00,0.5,"buy",""'
    if exact:  # a bare CR sends the file to the exact path
        body[2000] = body[2000].replace(",0.5,", ",0.5\r,")
    p = tmp_path / "empty.csv"
    p.write_text("time,px,qty,side,sym\n" + "\n".join(body) + "\n")
    _, r = replay(p, "csv", options={"mapping": mapping})
    t = r.accounting.total
    assert t.by_reason["missing_field"] == 1 and t.delivered == 3000 - 1 - int(exact)
    assert sorted(r.symbols.names) == ["BTC"]


@pytest.mark.parametrize("unit", ["ms", "auto"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_whole_times_written_as_floats_are_exact_and_kept(tmp_path: Path, unit: str, fmt: str) -> None:
    """A ms time written ``1723075200001.0`` (pandas, for a column that held a NaN) is the
    same nanosecond as ``1723075200001``: it was up to 128 ns off (a float product), and with
    ``ts_unit = "auto"`` it was taken for seconds and every row refused (found in review)."""
    ts = [1_723_075_200_000 + i for i in range(5)] + [1_723_075_200_123]
    mapping = {"ts": "timestamp", "price": "price", "size": "amount", "ts_unit": unit}
    if fmt == "csv":
        p = tmp_path / "ms.csv"
        p.write_text("timestamp,price,amount\n" + "".join(f"{t}.0,60000.1,0.5\n" for t in ts))
    else:
        p = tmp_path / "ms.jsonl"
        p.write_text("".join(orjson.dumps({"timestamp": float(t), "price": 60000.1, "amount": 0.5}).decode() + "\n"
                             for t in ts))
    cols, r = replay(p, fmt, options={"mapping": mapping})
    assert r.accounting.total.delivered == len(ts) and r.accounting.total.rejected == 0
    assert cols["ts_ns"].tolist() == [t * 1_000_000 for t in ts]


def test_one_time_written_as_a_float_costs_no_other_row_of_its_chunk(tmp_path: Path) -> None:
    """One ``1723161256400.0`` among integer ms times in a Binance file: its chunk went to the
    float path, read as seconds under ``auto``, and all 65,536 rows of it were refused."""
    lines = list(LINES)
    f = lines[200].split(",")
    lines[200] = ",".join([*f[:4], f[4] + ".0", *f[5:]])
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades-2024-08-08.csv", lines), "binance_trades")
    t = r.accounting.total
    assert (t.delivered, t.rejected) == (ROWS, 0)
    assert cols["trade_id"].tolist() == expected_ids(set())
    assert cols["ts_ns"][199] == int(f[4]) * 1_000_000


@pytest.mark.parametrize(("damage", "reason"), [("\r", "unparsable"), ("\r\r", "unparsable"), ("\x00", "unparsable")])
def test_stray_control_bytes_never_shift_the_line_count(tmp_path: Path, damage: str, reason: str) -> None:
    lines = list(LINES[:5001])
    lines[2000] = lines[2000][:9] + damage + lines[2000][9:]  # inside the price of line 2001
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades.csv", lines), "binance_trades")
    t = r.accounting.total
    assert (t.read, t.delivered, t.rejected) == (5000, 4999, 1) and dict(t.by_reason) == {reason: 1}
    assert cols["trade_id"].tolist() == [int(ln.split(",")[0]) for i, ln in enumerate(lines[1:], 2) if i != 2001]


def test_every_single_byte_overwrite_keeps_lines_equal_to_rows_plus_refused(tmp_path: Path) -> None:
    """Sweep: 300 random one-byte overwrites of the real file's first 3,000 trades (any byte value)."""
    rng = random.Random(12)
    base = ("\n".join(LINES[:3001]) + "\n").encode()
    header_end = base.index(b"\n") + 1
    for _ in range(300):
        data = bytearray(base)
        pos = rng.randrange(header_end, len(data) - 1)
        value = rng.choice([0x22, 0x0D, 0x00, 0xFF, 0x2C, 0x0A, rng.randrange(256)])
        data[pos] = value
        p = tmp_path / "BTCUSDT-trades.csv"
        p.write_bytes(bytes(data))
        lines = bytes(data)[header_end:].count(b"\n") + (0 if data.endswith(b"\n") else 1)
        cols, r = replay(p, "binance_trades")
        t = r.accounting.total
        assert t.read == lines == t.delivered + t.rejected, (pos, value)
        assert len(cols["ts_ns"]) == t.delivered


# --- 2. one corrupt future timestamp ---------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [65_536, 500, 499, 7])
def test_one_future_timestamp_refuses_itself_not_the_rest_of_the_file(tmp_path: Path, chunk_rows: int) -> None:
    lines = list(LINES)
    t = int(lines[500].split(",")[4])
    lines[500] = set_field(lines[500], 4, str(t + 100_000_000_000))  # a digit flipped: 3 years ahead
    p = write_lines(tmp_path / "BTCUSDT-trades.csv", lines)
    cols, r = replay(p, "binance_trades", chunk_rows=chunk_rows)
    tot = r.accounting.total
    assert (tot.delivered, tot.rejected, dict(tot.by_reason)) == (ROWS - 1, 1, {"ts_ahead": 1})
    assert cols["trade_id"].tolist() == expected_ids({501})
    with pytest.raises(DataError, match=r"line/record 501, field 'time'.*ts ahead"):
        replay(p, "binance_trades", policy="fail", chunk_rows=chunk_rows)


def test_three_corrupt_future_rows_in_a_row_are_the_three_refused(tmp_path: Path) -> None:
    lines = list(LINES)
    for i in (700, 701, 702):
        lines[i] = set_field(lines[i], 4, "1999999999999")
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades.csv", lines), "binance_trades", chunk_rows=701)
    assert r.accounting.total.by_reason == {"ts_ahead": 3}
    assert cols["trade_id"].tolist() == expected_ids({701, 702, 703})


def test_a_late_row_is_still_refused_as_backwards_and_a_real_gap_passes(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[800] = set_field(lines[800], 4, str(int(lines[2].split(",")[4])))  # a time from earlier
    day = 86_400_000
    for i in range(5000, len(lines)):  # a real gap: everything from line 5001 a day later
        lines[i] = set_field(lines[i], 4, str(int(lines[i].split(",")[4]) + day))
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades.csv", lines), "binance_trades")
    assert r.accounting.total.by_reason == {"ts_backwards": 1}
    assert cols["trade_id"].tolist() == expected_ids({801})


def test_a_future_timestamp_in_a_multi_symbol_file_is_refused_in_its_symbol(tmp_path: Path) -> None:
    src = (DATA / "tardis-bitmex-xbtusd-trades.csv").read_text().splitlines()
    rows = [src[0]]
    for i, ln in enumerate(src[1:] * 30):  # 300 rows of two symbols, in time order
        f = ln.split(",")
        f[1] = "XBTUSD" if i % 2 else "ETHUSD"
        f[2] = str(1583020803145000 + i * 1000)
        rows.append(",".join(f))
    rows[101] = set_field(rows[101], 2, str(1583020803145000 + 10**13))
    cols, r = replay(write_lines(tmp_path / "trades.csv", rows), "tardis_trades")
    assert r.accounting.total.by_reason == {"ts_ahead": 1} and len(cols["ts_ns"]) == 299


# --- 3. int64 overflow, a wrong unit ---------------------------------------------------
def test_tardis_export_in_nanoseconds_reads_the_same_times_as_microseconds(tmp_path: Path) -> None:
    src = (DATA / "tardis-bitmex-xbtusd-trades.csv").read_text().splitlines()
    ns = [src[0]] + [set_field(set_field(ln, 2, ln.split(",")[2] + "000"), 3, ln.split(",")[3] + "123")
                     for ln in src[1:]]
    us_cols, _ = replay(DATA / "tardis-bitmex-xbtusd-trades.csv", "tardis_trades", policy="fail")
    ns_cols, _ = replay(write_lines(tmp_path / "t.csv", ns), "tardis_trades", policy="fail")
    assert ns_cols["ts_ns"].tolist() == us_cols["ts_ns"].tolist()
    assert (ns_cols["ts_recv_ns"] - us_cols["ts_recv_ns"]).tolist() == [123] * len(src[1:])
    assert min(ns_cols["ts_ns"]) > 1_500_000_000 * 10**9  # not wrapped to 1862


def test_a_timestamp_in_the_wrong_unit_is_refused_never_wrapped(tmp_path: Path) -> None:
    src = (DATA / "tardis-bitmex-xbtusd-trades.csv").read_text().splitlines()
    src[4] = set_field(src[4], 2, src[4].split(",")[2] + "000")  # one row in ns among µs rows
    cols, r = replay(write_lines(tmp_path / "t.csv", src), "tardis_trades")
    assert r.accounting.total.by_reason == {"unparsable": 1} and len(cols["ts_ns"]) == 9
    assert cols["ts_ns"].min() > 1_500_000_000 * 10**9
    with pytest.raises(DataError, match=r"line/record 5, field 'timestamp'.*unparsable"):
        replay(write_lines(tmp_path / "t.csv", src), "tardis_trades", policy="fail")


@pytest.mark.parametrize("value", ["9999999999999999", "99999999999999999999", "-9999999999999999"])
def test_binance_times_beyond_int64_in_ns_are_refused(tmp_path: Path, value: str) -> None:
    lines = list(LINES[:1001])
    lines[300] = set_field(lines[300], 4, value)
    cols, r = replay(write_lines(tmp_path / "BTCUSDT-trades.csv", lines), "binance_trades")
    assert r.accounting.total.rejected == 1 and r.accounting.total.by_reason == {"unparsable": 1}
    assert cols["ts_ns"].min() >= int(LINES[1].split(",")[4]) * 10**6


def test_json_lines_ids_and_times_beyond_int64_are_refused_and_the_rest_keep_every_digit(tmp_path: Path) -> None:
    rows = [orjson.loads(x) for x in _jsonl_of_sample(200)]
    rows[10]["trade_id"] = 2**64 + 5
    rows[20]["ts_ns"] = 2**63 + 1
    rows[30]["ts_ns"] = 1.5e19
    rows[40]["trade_id"] = 2**70
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))  # stdlib json writes any integer
    q = tmp_path / "q.jsonl"
    cols, r = replay(p, "jsonl", policy="quarantine", quarantine=q)
    assert r.accounting.total.quarantined == 4 and len(cols["ts_ns"]) == 196
    good = [x["ts_ns"] for i, x in enumerate(rows) if i not in (10, 20, 30, 40)]
    assert cols["ts_ns"].tolist() == good  # exact to the ns: not rounded through float64
    assert [orjson.loads(x)["record"] for x in q.read_bytes().splitlines()] == [11, 21, 31, 41]


def _jsonl_of_sample(n: int) -> list[bytes]:
    cols, _r = replay(BINANCE, "binance_trades", policy="fail")
    out = []
    for i in range(n):
        out.append(orjson.dumps({"ts_ns": int(cols["ts_ns"][i]) + i, "symbol": "BTCUSDT", "kind": 0,
                                 "price": float(cols["price"][i]), "size": float(cols["size"][i]),
                                 "side": int(cols["side"][i]), "trade_id": int(cols["trade_id"][i])}))
    return out


def test_feed_capture_values_beyond_int64_are_bad_lines(sample_dir: Path, tmp_path: Path) -> None:
    src = gzip.decompress((sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes()).splitlines()
    trades = [i for i, ln in enumerate(src) if b"@trade" in ln][:3]
    damaged = list(src)
    for i, edit in zip(trades, ("T", "t", "recv"), strict=True):
        head, _, body = damaged[i].partition(b" ")
        msg = orjson.loads(body)
        if edit == "recv":
            head = b"99999999999999999999"
        else:
            msg["data"][edit] = 2**63
        damaged[i] = head + b" " + orjson.dumps(msg)
    p = tmp_path / "feed.jsonl"
    p.write_bytes(b"\n".join(damaged) + b"\n")
    _, good = replay(sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz", "binance_feed", policy="fail")
    _, r = replay(p, "binance_feed")
    t = r.accounting.total
    assert t.read == good.accounting.total.read and t.rejected == 3 and t.by_reason == {"unparsable": 3}


# --- 4. a flipped bit in a Parquet page --------------------------------------------------
def _own_parquet(path: Path, rows: int) -> Path:
    cols, r = replay(BINANCE, "binance_trades", policy="fail")
    write_parquet(path, {k: v[:rows] for k, v in cols.items()}, r.symbols.names)
    return path


@pytest.mark.parametrize("which", ["own", "nautilus"])
def test_a_flipped_bit_in_a_parquet_page_never_passes_as_fewer_rows(tmp_path: Path, which: str) -> None:
    src = _own_parquet(tmp_path / "own.parquet", 400) if which == "own" else DATA / "nautilus-binance-btcusdt-trades.parquet"
    meta = pq.ParquetFile(src).metadata
    rg = meta.row_group(0)
    spans = []
    for i in range(rg.num_columns):
        c = rg.column(i)
        start = c.dictionary_page_offset or c.data_page_offset
        spans.append((start, start + c.total_compressed_size))
    base = src.read_bytes()
    rng = random.Random(4)
    positions = sorted({rng.randrange(a, b) for a, b in spans for _ in range(60)})
    short = 0
    for pos in positions:
        data = bytearray(base)
        data[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / "flipped.parquet"
        p.write_bytes(bytes(data))
        try:
            _cols, r = replay(p, "parquet")
        except DataError as e:
            short += "metadata counts" in str(e)
            assert "row group 0" in str(e) or "not a readable Parquet file" in str(e)
            continue
        t = r.accounting.total
        assert t.read == meta.num_rows == t.delivered + t.rejected, pos
    if which == "own":
        assert short, "no flip hit a page header: the sweep no longer tests the row count"
