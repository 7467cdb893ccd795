"""The numba parser of Tardis ``incremental_book_L2`` lines against the pyarrow path (the
reference): the same rows, verdicts, line numbers, symbols and raw fields for random files
with odd lines in them, and any block split."""

from __future__ import annotations

import gzip
from pathlib import Path
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nautilus_pipeline.io import tardis_book
from nautilus_pipeline.io.tardis_book import TardisIncrementalBookReader

DATA = Path(__file__).parent / "data"
HEADER = "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"


def rows(path: Path, fast: bool, chunk_rows: int = 7):
    r = TardisIncrementalBookReader(path, fast=fast)
    chunks = list(r.chunks(chunk_rows))
    assert chunks  # a file of refused lines still gives a chunk that carries them
    cols = {k: np.concatenate([c.column(k) for c in chunks]) for k in ("ts_ns", "ts_recv_ns", "price", "size", "side")}
    cols["records"] = np.concatenate([c.records for c in chunks])
    cols["bad"] = np.concatenate([c.bad if c.bad is not None else np.zeros(len(c.records), np.uint8) for c in chunks])
    names = [c.symbols[int(k)] for c in chunks for k in c.column("symbol_id")]
    dropped = [(b.record, b.reason, b.raw) for c in chunks for b in c.dropped]
    raw = [c.raw(i) for c in chunks for i in range(len(c.records))]
    return cols, names, dropped, raw


def same(path: Path) -> None:
    fast, slow = rows(path, True), rows(path, False)
    for k in fast[0]:
        assert np.array_equal(fast[0][k], slow[0][k], equal_nan=fast[0][k].dtype.kind == "f"), k
    assert fast[1:] == slow[1:]


def test_the_bundled_files_read_the_same() -> None:
    for path in (DATA / "tardis-binance-futures-incremental-book-l2-resnapshot.csv",
                 DATA / "tardis-deribit-incremental-book-l2-btc-perpetual.csv"):
        same(path)


plain = st.tuples(st.sampled_from(("deribit", "binance-futures")), st.sampled_from(("BTC-PERPETUAL", "ETHUSDT", "X")),
                  st.integers(1_585_699_200_000_000, 1_585_699_300_000_000), st.integers(0, 5000),
                  st.sampled_from(("true", "false")), st.sampled_from(("bid", "ask")),
                  st.sampled_from(("6421.5", "6421", "0.00012", "-1.5", "100.25", "99999.123456789")),
                  st.sampled_from(("0", "18640", "1.5", "0.001")))
ODD = ("deribit,NA,1585699200000001,1585699200000002,false,bid,1.0,1",  # a null symbol
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,FALSE,BID,1.0,1",
       "deribit,BTC-PERPETUAL,1585699200000001,,false,bid,1.0,1",  # no local timestamp
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,bid,NaN,1",
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,bid,1e3,1",
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,bid, 2.5,1",
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,bid,1.23456789012345678,1",
       "deribit,BTC-PERPETUAL,15856992000000010000,1585699200000002,false,bid,1.0,1",  # beyond int64 in ns
       "deribit,BTC-PERPETUAL,x,1585699200000002,true,ask,1.0,1",
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,maybe,ask,1.0,1",
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,middle,1.0,1",
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,ask,,1",
       'deribit,"BTC-PERPETUAL",1585699200000001,1585699200000002,false,ask,5.0,1',
       "deribit,BTC-PERPETUAL,1585699200000001,1585699200000002,false,ask,5.0,1,extra",
       "deribit,BTC-PERPETUAL,1",
       "deribit,BTC-PERP€,1585699200000001,1585699200000002,true,ask,5.0,1")


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.one_of(plain, plain, plain, st.sampled_from(ODD)), min_size=1, max_size=60),
       crlf=st.booleans(), last_newline=st.booleans(), block=st.sampled_from((80, 333, 1 << 22)), gz=st.booleans())
def test_random_files_read_as_the_pyarrow_path_reads_them(tmp_path_factory, lines, crlf, last_newline, block,
                                                          gz) -> None:
    """Plain files are memory-mapped, compressed ones streamed: both cut in blocks of ``block``."""
    text = [HEADER] + [x if isinstance(x, str) else ",".join(map(str, (*x[:3], x[2] + x[3], *x[4:]))) for x in lines]
    end = "\r\n" if crlf else "\n"
    path = tmp_path_factory.mktemp("l2") / ("l2.csv.gz" if gz else "l2.csv")
    body = (end.join(text) + (end if last_newline else "")).encode()
    path.write_bytes(gzip.compress(body) if gz else body)
    with mock.patch.object(tardis_book, "FAST_BLOCK", block):
        same(path)


def test_blank_lines_keep_the_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text(f"{HEADER}\ndex,X,1585699200000001,1585699200000002,false,bid,1.0,1\n\n"
                    "dex,X,1585699200000003,1585699200000004,false,bid,oops,1\n")
    cols = rows(path, True)[0]
    assert cols["records"].tolist() == [2, 4] and cols["bad"].tolist() == [0, 1]


def test_a_file_in_nanoseconds_reads_the_same(tmp_path: Path) -> None:
    lines = (DATA / "tardis-deribit-incremental-book-l2-btc-perpetual.csv").read_text().splitlines()
    out = [lines[0]]
    for ln in lines[1:]:
        f = ln.split(",")
        f[2], f[3] = f[2] + "123", f[3] + "456"  # 19 digits: ns
        out.append(",".join(f))
    path = tmp_path / "ns.csv"
    path.write_text("\n".join(out) + "\n")
    same(path)
    assert rows(path, True)[0]["ts_ns"][1] == 1_585_699_200_245_000_123
