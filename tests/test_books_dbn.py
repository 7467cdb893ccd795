"""Databento MBP-10 as book rows (the book after each record is its 10 levels), and BBO / CMBP-1
records as quotes, on Databento's own DBN test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from book_reference import reference

from nautilus_pipeline.events import KIND_BOOK, KIND_QUOTE, KIND_TRADE
from nautilus_pipeline.io.databento import DatabentoReader, scale_prices
from nautilus_pipeline.kernels.book import ACTION_CLEAR, ACTION_SET

DATA = Path(__file__).parent / "data"


def rows_of(path: Path, **kw):
    r = DatabentoReader(path, **kw)
    chunks = list(r.chunks())
    cols = {k: np.concatenate([c.column(k) for c in chunks]) for k in
            ("kind", "side", "price", "size", "bid", "ask", "bid_size", "ask_size", "ts_ns")}
    return cols, np.concatenate([c.records for c in chunks]), r


def test_mbp10_book_after_each_record_is_its_ten_levels() -> None:
    path = DATA / "databento-test-data-mbp-10.dbn.zst"
    cols, rec, _ = rows_of(path)
    assert (cols["kind"] == KIND_BOOK).all() and cols["side"][0] == 0
    action = np.where(cols["side"] == 0, ACTION_CLEAR, ACTION_SET)
    _, lv = reference(cols["side"].tolist(), cols["price"].tolist(), cols["size"].tolist(), action.tolist(), levels=10)
    records = list(DatabentoReader(path)._records())
    assert len(records) == 2
    for n, m in enumerate(records, start=1):
        end = np.flatnonzero(rec == n)[-1]
        want = np.array([[x.bid_px for x in m.levels], [x.bid_sz for x in m.levels],
                         [x.ask_px for x in m.levels], [x.ask_sz for x in m.levels]])
        assert np.array_equal(lv[end, 0], scale_prices(want[0])) and np.array_equal(lv[end, 1], want[1])
        assert np.array_equal(lv[end, 2], scale_prices(want[2])) and np.array_equal(lv[end, 3], want[3])
    assert (rec == 2).sum() == 1  # the second record changes one level (bid 3720.00: 31 -> 30)
    assert lv[-1, 0, 1] == 3720.0 and lv[-1, 1, 1] == 30


def test_mbp10_trades_only_when_asked() -> None:
    cols, _, _ = rows_of(DATA / "databento-test-data-mbp-10.dbn.zst", trades=True)
    assert (cols["kind"] == KIND_TRADE).sum() == 0  # both records are cancels (action C)


def test_bbo_and_cmbp1_records_are_quotes() -> None:
    for name, n in (("databento-test-data-bbo-1s.dbn.zst", 4), ("databento-test-data-cmbp-1.dbn.zst", 2)):
        path = DATA / name
        cols, _, _ = rows_of(path)
        recs = list(DatabentoReader(path)._records())
        assert (cols["kind"] == KIND_QUOTE).all() and len(cols["kind"]) == n == len(recs)
        assert np.array_equal(cols["bid"], scale_prices(np.array([x.bid_px_00 for x in recs])))
        assert np.array_equal(cols["ask_size"], np.array([x.ask_sz_00 for x in recs], dtype=float))
