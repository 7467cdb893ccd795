"""Tardis.dev order-book CSVs (incremental_book_L2, book_snapshot_N) as book rows, checked against
the files' own lines with a plain dict book."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from book_reference import reference

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.events import KIND_BOOK
from nautilus_pipeline.io import Replay, Source, detect_format
from nautilus_pipeline.kernels.book import ACTION_CLEAR, ACTION_SET, snapshot_deltas

DATA = Path(__file__).parent / "data"
SNAP5 = DATA / "tardis-binance-futures-book-snapshot-5-btcusdt.csv"
SNAP25 = DATA / "tardis-binance-futures-book-snapshot-25-btcusdt.csv"
L2 = DATA / "tardis-deribit-incremental-book-l2-btc-perpetual.csv"
RESNAP = DATA / "tardis-binance-futures-incremental-book-l2-resnapshot.csv"


def read(path: Path, **kw):
    r = Replay([Source(path, **kw)])
    blocks = list(r.iter_arrays())
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}, r


def books_after(cols, levels):
    action = np.where(cols["side"] == 0, ACTION_CLEAR, ACTION_SET)
    return reference(cols["side"].tolist(), cols["price"].tolist(), cols["size"].tolist(), action.tolist(),
                     levels=levels)[1]


def test_formats_are_detected() -> None:
    assert detect_format(SNAP5) == detect_format(SNAP25) == "tardis_book_snapshot"
    assert detect_format(L2) == detect_format(RESNAP) == "tardis_book_l2"


@pytest.mark.parametrize(("path", "depth"), [(SNAP5, 5), (SNAP25, 25)])
def test_after_each_snapshot_line_the_book_is_that_line(path: Path, depth: int) -> None:
    cols, r = read(path)
    assert (cols["kind"] == KIND_BOOK).all() and r.symbols.names == ["BTCUSDT"]
    lv = books_after(cols, depth)
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    ends = np.flatnonzero(np.r_[cols["ts_ns"][1:] != cols["ts_ns"][:-1], True])
    assert len(ends) == len(rows) == 10
    for line, end in zip(rows, ends, strict=True):
        for i in range(depth):
            assert lv[end, 0, i] == float(line[f"bids[{i}].price"]) and lv[end, 1, i] == float(line[f"bids[{i}].amount"])
            assert lv[end, 2, i] == float(line[f"asks[{i}].price"]) and lv[end, 3, i] == float(line[f"asks[{i}].amount"])
        assert cols["ts_ns"][end] == int(line["timestamp"]) * 1000
    assert cols["side"][0] == 0 and (cols["side"][1:] != 0).all()  # one clear, then changes only
    assert len(cols["side"]) < 10 * 4 * depth  # far fewer rows than rebuilding every line


def test_snapshot_deltas_rebuild_any_sequence_of_snapshots() -> None:
    rng = np.random.default_rng(5)
    d = 4
    book = np.full((30, 4, d), np.nan)
    for r in range(30):
        bids = np.sort(rng.choice(np.arange(90, 100), rng.integers(0, d + 1), replace=False))[::-1]
        asks = np.sort(rng.choice(np.arange(101, 111), rng.integers(0, d + 1), replace=False))
        book[r, 0, : len(bids)], book[r, 1, : len(bids)] = bids, rng.integers(1, 4, len(bids))
        book[r, 2, : len(asks)], book[r, 3, : len(asks)] = asks, rng.integers(1, 4, len(asks))
    prev = None
    sides, prices, sizes, owners = [], [], [], []
    for lo in (0, 7, 8, 20):  # any split into calls
        hi = {0: 7, 7: 8, 8: 20, 20: 30}[lo]
        s, p, q, o, prev = snapshot_deltas(prev, book[lo:hi], d)
        sides.append(s), prices.append(p), sizes.append(q), owners.append(o + lo)
    cols = {"side": np.concatenate(sides), "price": np.concatenate(prices), "size": np.concatenate(sizes)}
    owner = np.concatenate(owners)
    lv = books_after(cols, d)
    for r in range(30):
        rows = np.flatnonzero(owner == r)
        if not rows.size:  # an unchanged snapshot adds no row
            continue
        got = lv[rows[-1]]
        assert np.array_equal(got, book[r], equal_nan=True), r


def test_incremental_l2_snapshots_replace_the_book() -> None:
    cols, _ = read(RESNAP)
    assert cols["side"].tolist() == [0, 1, -1, 1, -1, 1, 0, 1, -1, 1, -1]
    lv = books_after(cols, 3)
    assert lv[5, 0, :2].tolist() == [50000.0, 49999.0] and np.isnan(lv[5, 0, 2])  # 49998 removed (amount 0)
    assert lv[8, 0, 0] == 50100.0 and np.isnan(lv[8, 0, 1])  # the second snapshot replaced the bids
    assert lv[8, 2, 0] == 50101.0 and np.isnan(lv[8, 2, 1])


def test_real_deribit_incremental_file_in_ns_or_us() -> None:
    cols, r = read(L2)
    assert r.symbols.names == ["BTC-PERPETUAL"] and len(cols["side"]) == 16
    assert cols["ts_ns"][1] == 1_585_699_200_245_000_000 and (cols["side"][1:] == -1).all()
    lv = books_after(cols, 15)
    assert lv[-1, 2, 0] == 6421.5 and lv[-1, 3, 0] == 18640


def test_bad_lines_are_refused_and_counted(tmp_path: Path) -> None:
    lines = RESNAP.read_text().splitlines()
    lines[3] = lines[3].replace("bid", "middle")
    lines[4] = lines[4].replace("50002.0", "5x")
    lines.insert(6, "binance-futures,BTCUSDT,1")
    p = tmp_path / "bad.csv"
    p.write_text("\n".join(lines) + "\n")
    r = Replay([Source(p, policy="reject")])
    n = sum(len(b["ts_ns"]) for b in r.iter_arrays())
    t = r.accounting.total
    assert n == 9 and t.read == 12 and t.rejected == 3
    assert dict(t.by_reason) == {"unknown_side": 1, "unparsable": 1, "wrong_field_count": 1}
    with pytest.raises(DataError, match=r"line/record 4"):
        list(Replay([Source(p)]).iter_arrays())
