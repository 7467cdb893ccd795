"""Silent loss hunted in the Tardis, FX, Parquet/Nautilus, DBN, MBO and LOBSTER readers.

Each test is one way a file these readers take was read short, or with values it does not
hold, without a word: damaged copies of the bundled samples or files built here, and the
promise checked: every row read is delivered or refused (counted, with its line or record),
and no value is delivered that the file does not say.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import databento_dbn as dbn
import numpy as np
import pytest
from test_books_lobster import simulate

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"


def replay(path: Path, fmt: str, policy: str = "reject", chunk_rows: int = 65_536, **kw) -> tuple[dict, Replay]:
    """All delivered columns, and the replay (its accounting, checked to close)."""
    r = Replay([Source(path, format=fmt, policy=policy, **kw)], chunk_rows=chunk_rows)
    blocks = list(r.iter_arrays())
    cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}
    r.accounting.check()
    return cols, r


def utc_ns(*args: int) -> int:
    t = dt.datetime(*args, tzinfo=dt.UTC) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (t.days * 86_400 + t.seconds) * 10**9 + t.microseconds * 1000


# --- FX: times that do not exist -------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "good", "bad"), [
    ("histdata", "20200101 170000000,1.1212,1.1217,0", ["20200101 250000000,1.1212,1.1217,0",
                                                         "20200101 176100000,1.1212,1.1217,0",
                                                         "20200101 170061000,1.1212,1.1217,0",
                                                         "20200230 170000000,1.1212,1.1217,0",
                                                         "20210229 170000000,1.1212,1.1217,0",
                                                         "20200431 170000000,1.1212,1.1217,0"]),
    ("truefx", "USD/JPY,20200101 17:00:00.000,86.81,86.83", ["USD/JPY,20200101 24:00:00.000,86.81,86.83",
                                                             "USD/JPY,20200101 17:60:00.000,86.81,86.83",
                                                             "USD/JPY,20200101 17:00:60.000,86.81,86.83",
                                                             "USD/JPY,20200230 17:00:00.000,86.81,86.83",
                                                             "USD/JPY,20200631 17:00:00.000,86.81,86.83",
                                                             "USD/JPY,19000229 17:00:00.000,86.81,86.83"]),
])
def test_fx_times_that_do_not_exist_are_refused_not_carried_into_the_next_day(tmp_path: Path, fmt: str, good: str,
                                                                              bad: list[str]) -> None:
    """Hour 25, minute 61 or February 30 were added up as they stood: ``25:00`` on Jan 1 became
    01:00 on Jan 2 and ``0230`` became March 1, delivered as real quotes (found in this hunt)."""
    p = tmp_path / "EURUSD.csv"
    p.write_text("\n".join([good, *bad]) + "\n")
    cols, r = replay(p, fmt)
    t = r.accounting.total
    assert (t.read, t.delivered, t.rejected, dict(t.by_reason)) == (1 + len(bad), 1, len(bad), {"unparsable": len(bad)})
    offset = 5 if fmt == "histdata" else 0  # HistData: EST without DST
    assert cols["ts_ns"].tolist() == [utc_ns(2020, 1, 1, 17 + offset)]
    with pytest.raises(DataError, match=r"line/record 2, field '(datetime|timestamp)'.*unparsable"):
        replay(p, fmt, policy="fail")


def test_fx_leap_days_and_the_last_second_of_a_day_are_real_times(tmp_path: Path) -> None:
    p = tmp_path / "EURUSD.csv"
    p.write_text("20000229 000000000,1.1212,1.1217,0\n20001231 235959000,1.1212,1.1217,0\n"
                 "20200229 235959999,1.1212,1.1217,0\n")
    cols, _ = replay(p, "histdata", policy="fail")
    assert cols["ts_ns"].tolist() == [utc_ns(2000, 2, 29, 5), utc_ns(2001, 1, 1, 4, 59, 59),
                                      utc_ns(2020, 3, 1, 4, 59, 59, 999_000)]


# --- DBN: undefined timestamps ---------------------------------------------------------------
UNDEF_TS = dbn.UNDEF_TIMESTAMP  # u64::MAX: "no time" in DBN


def write_dbn(path: Path, records: list, schema: dbn.Schema) -> Path:
    meta = dbn.Metadata(dataset="GLBX.MDP3", schema=schema, start=1, stype_in=dbn.SType.RAW_SYMBOL,
                        stype_out=dbn.SType.INSTRUMENT_ID, end=None, symbols=["X"], partial=[], not_found=[],
                        mappings=[])
    path.write_bytes(meta.encode() + b"".join(bytes(r) for r in records))
    return path


def dbn_trade(ts: int, recv: int, price: int = 100 * 10**9) -> dbn.TradeMsg:
    return dbn.TradeMsg(publisher_id=1, instrument_id=7, ts_event=ts, price=price, size=2, action=dbn.Action.TRADE,
                        side=dbn.Side.ASK, depth=0, flags=0, ts_recv=recv, ts_in_delta=0, sequence=1)


def dbn_add(ts: int, oid: int, price: float, side: str = "BID") -> dbn.MBOMsg:
    return dbn.MBOMsg(publisher_id=1, instrument_id=7, ts_event=ts, order_id=oid, price=round(price * 10**9), size=1,
                      flags=128, channel_id=0, action=dbn.Action.ADD, side=getattr(dbn.Side, side), ts_recv=ts + 5 if ts < 1 << 62 else 999,
                      ts_in_delta=0, sequence=1)


def test_a_dbn_trade_with_an_undefined_event_time_is_one_refused_record(tmp_path: Path) -> None:
    """``ts_event = UNDEF_TIMESTAMP`` (u64::MAX) did not fit the int64 column: the whole file was
    refused as unreadable, naming no record, under every policy (found in this hunt). An undefined
    receive time is an unknown one (-1), as with ``F_BAD_TS_RECV``."""
    p = write_dbn(tmp_path / "t.dbn", [dbn_trade(1000, 1001), dbn_trade(UNDEF_TS, 1002), dbn_trade(1003, UNDEF_TS),
                                      dbn_trade(1004, 1005)], dbn.Schema.TRADES)
    cols, r = replay(p, "databento")
    t = r.accounting.total
    assert (t.read, t.delivered, dict(t.by_reason)) == (4, 3, {"unparsable": 1})
    assert cols["ts_ns"].tolist() == [1000, 1003, 1004] and cols["ts_recv_ns"].tolist() == [1001, -1, 1005]
    with pytest.raises(DataError, match=r"line/record 2, field 'ts_event'.*unparsable"):
        replay(p, "databento", policy="fail")


@pytest.mark.parametrize("fast_mbo", [True, False])
def test_an_mbo_record_with_an_undefined_event_time_is_refused_on_both_paths(tmp_path: Path, fast_mbo: bool) -> None:
    """The numba path viewed u64::MAX as int64 -1 and delivered the book row at 1969-12-31; the
    reference path refused the whole file (found in this hunt)."""
    recs = [dbn_add(UNDEF_TS, 1, 100.0), dbn_add(1000, 2, 100.25), dbn_add(1001, 3, 101.0, "ASK")]
    p = write_dbn(tmp_path / "m.dbn", recs, dbn.Schema.MBO)
    cols, r = replay(p, "databento", options={"fast_mbo": fast_mbo})
    t = r.accounting.total
    assert (t.read, t.delivered, dict(t.by_reason)) == (3, 2, {"unparsable": 1})
    assert cols["ts_ns"].tolist() == [1000, 1001] and cols["price"].tolist() == [100.25, 101.0]
    with pytest.raises(DataError, match=r"line/record 1, field 'ts_event'.*unparsable"):
        replay(p, "databento", policy="fail", options={"fast_mbo": fast_mbo})


# --- LOBSTER: the two files of a sample, and times after midnight ------------------------------
def lobster_sample(tmp_path: Path) -> tuple[Path, Path]:
    msg, _, _ = simulate(tmp_path, 300)
    return msg, Path(str(msg).replace("message", "orderbook"))


def edit_line(path: Path, i: int, fn) -> None:
    lines = path.read_text().splitlines()
    lines[i] = fn(lines[i])
    path.write_text("\n".join(lines) + "\n")


def test_a_lobster_message_file_cut_short_at_a_line_end_is_refused(tmp_path: Path) -> None:
    """The orderbook file has a row per event: one with rows left over means the message file
    lost its last events (or the files are of two samples). They were dropped without a word."""
    msg, _ = lobster_sample(tmp_path)
    whole, r = replay(msg, "lobster", policy="fail")
    assert r.accounting.total.delivered == len(whole["ts_ns"])
    msg.write_text("\n".join(msg.read_text().splitlines()[:250]) + "\n")
    with pytest.raises(DataError, match=r"orderbook_3\.csv: more rows than .*message_3\.csv \(250 messages\).*cut short"):
        replay(msg, "lobster")


@pytest.mark.parametrize("time", ["1e12", "-5.5", "86400.0", "nan"])
def test_a_lobster_time_outside_the_day_is_one_unparsable_event(tmp_path: Path, time: str) -> None:
    """Seconds after midnight beyond int64 once in ns wrapped to a time in 1677 (refused as
    going backwards with its book rows, or passing as the first event); any time outside the
    day is not a time of the trading date."""
    msg, _ = lobster_sample(tmp_path)
    edit_line(msg, 100, lambda ln: time + ln[ln.index(","):])
    _, r = replay(msg, "lobster")
    t = r.accounting.total
    assert (t.rejected, dict(t.by_reason)) == (1, {"unparsable": 1})
    with pytest.raises(DataError, match=r"line/record 101\b.*unparsable"):
        replay(msg, "lobster", policy="fail")


def test_a_bad_value_in_the_lobster_orderbook_file_refuses_its_event_not_the_file(tmp_path: Path) -> None:
    """pyarrow's cast of the orderbook column raised on it: the whole sample was unreadable."""
    msg, ob = lobster_sample(tmp_path)
    edit_line(ob, 100, lambda ln: "abc" + ln[ln.index(","):])
    _, r = replay(msg, "lobster")
    t = r.accounting.total
    assert (t.rejected, dict(t.by_reason)) == (1, {"unparsable": 1}) and t.read == t.delivered + 1
    with pytest.raises(DataError, match=r"line/record 101\b.*unparsable"):
        replay(msg, "lobster", policy="fail")


# --- Tardis incremental_book_L2: line numbers on the pyarrow path ------------------------------
def tardis_l2_lines(n: int = 2000) -> list[str]:
    rows = []
    for i in range(n):
        side = "bid" if i % 2 else "ask"
        price = (100 if i % 2 else 200) + i % 50
        rows.append(f"binance,BTCUSDT,{1_600_000_000_000_000 + i},{1_600_000_000_000_100 + i},"
                    f"{'true' if i < 10 else 'false'},{side},{price}.5,{i % 7}")
    return rows


@pytest.mark.parametrize("block", [1 << 22, 4096, 1000])
def test_tardis_l2_reference_path_numbers_lines_as_the_file_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 block: int) -> None:
    """pyarrow skips blank lines and numbers rows without them, and it parses a block ahead, so
    a refused row of the next block was taken for one of this block: every line after a blank
    line, or after a refused row at a block's end, was named one line early (in errors and the
    quarantine), by an amount that depended on the block size. The numba path had them right."""
    from nautilus_pipeline.io import tardis_book
    from nautilus_pipeline.io.tardis_book import TardisIncrementalBookReader

    lines = tardis_l2_lines()
    lines[300] = ""
    lines[301] = "\r"
    lines[701] = lines[701].replace(",bid,", ",bod,")
    lines[900] = "binance,BTCUSDT,1600000000000900"
    for i in range(1000, 2000, 97):
        lines[i] = lines[i] + ",extra"
    p = tmp_path / "incremental_book_L2.csv"
    p.write_text("exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount\n" + "\n".join(lines) + "\n")
    monkeypatch.setattr(tardis_book, "_BLOCK", block)
    monkeypatch.setattr(tardis_book, "FAST_BLOCK", block)
    got = {}
    for fast in (True, False):
        chunks = list(TardisIncrementalBookReader(p, fast=fast).chunks(333))
        records = np.concatenate([c.records for c in chunks]).tolist()
        refused = sorted([d.record for c in chunks for d in c.dropped]
                         + [int(c.records[i]) for c in chunks if c.bad is not None for i in np.flatnonzero(c.bad)])
        got[fast] = (records, refused)
    assert got[False] == got[True]
    records, refused = got[False]
    assert refused == [703, 902, *range(1002, 2002, 97)]  # 1-based, the header is line 1
    assert 302 not in records and 303 not in records and records[-1] == 2001
    assert records.count(2) == 2  # the snapshot's clear shares the line of its first level
    assert len(records) == 1 + 2000 - 2 - 12  # a clear, the lines less two blank and 12 of a wrong field count
