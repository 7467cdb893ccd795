"""Databento MBO to level deltas: the order bookkeeping and the flags, on real and rebuilt files."""

from __future__ import annotations

from pathlib import Path

import databento_dbn as dbn
import numpy as np
import pytest

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.events import KIND_BOOK
from nautilus_pipeline.io.mbo import F_BAD_TS_RECV, F_LAST, F_SNAPSHOT, mbo_level_deltas
from nautilus_pipeline.kernels.book import ACTION_CLEAR, book_update, new_book_state

HEAD = Path(__file__).parent / "data" / "databento-glbx-esh4-mbo-20231225-head.dbn.zst"


def write_mbo(path: Path, records: list) -> Path:
    meta = dbn.Metadata(dataset="GLBX.MDP3", schema=dbn.Schema.MBO, start=1, stype_in=dbn.SType.RAW_SYMBOL,
                        stype_out=dbn.SType.INSTRUMENT_ID, end=None, symbols=["X"], partial=[],
                        not_found=[], mappings=[])
    path.write_bytes(meta.encode() + b"".join(bytes(r) for r in records))
    return path


def mbo(action, side, price, size, oid, flags=F_LAST, ts=1):
    return dbn.MBOMsg(publisher_id=1, instrument_id=7, ts_event=ts, order_id=oid, price=int(price * 10**9),
                      size=size, flags=flags, channel_id=0, action=getattr(dbn.Action, action),
                      side=getattr(dbn.Side, side), ts_recv=ts + 5, ts_in_delta=0, sequence=ts)


def test_add_cancel_modify_keep_level_totals(tmp_path: Path) -> None:
    path = write_mbo(tmp_path / "m.dbn", [
        mbo("ADD", "BID", 100.0, 3, 1), mbo("ADD", "BID", 100.0, 2, 2), mbo("ADD", "ASK", 101.0, 4, 3),
        mbo("CANCEL", "BID", 100.0, 1, 1),  # partial cancel: 3 -> 2
        mbo("MODIFY", "BID", 99.5, 2, 2),  # moves: level 100 loses 2, level 99.5 gains 2
        mbo("FILL", "ASK", 101.0, 1, 3),  # no book change
        mbo("CANCEL", "ASK", 101.0, 4, 3),
        mbo("CANCEL", "ASK", 101.0, 1, 99),  # never seen: counted, no delta
    ])
    d = mbo_level_deltas(path)
    got = list(zip(d["side"].tolist(), d["price"].tolist(), d["size"].tolist(), strict=True))
    assert got == [(1, 100.0, 3.0), (1, 100.0, 5.0), (-1, 101.0, 4.0), (1, 100.0, 4.0),
                   (1, 100.0, 2.0), (1, 99.5, 2.0), (-1, 101.0, 0.0)]
    assert int(d["unknown_orders"]) == 1
    assert d["last"].tolist() == [True, True, True, True, False, True, True]


def test_snapshot_replaces_the_book_and_bad_ts_recv_is_unknown(tmp_path: Path) -> None:
    snap = F_SNAPSHOT | F_BAD_TS_RECV
    path = write_mbo(tmp_path / "s.dbn", [
        mbo("ADD", "BID", 100.0, 3, 1),
        mbo("CLEAR", "NONE", 0.0, 0, 0, flags=snap), mbo("ADD", "BID", 98.0, 1, 5, flags=snap | F_LAST),
        mbo("ADD", "ASK", 99.0, 1, 6, ts=4),
    ])
    d = mbo_level_deltas(path)
    assert d["action"].tolist() == [0, ACTION_CLEAR, 0, 0]
    assert d["ts_recv_ns"].tolist() == [6, -1, -1, 9]
    _, out = book_update(new_book_state(), d["side"], d["price"], d["size"], d["action"])
    assert out[-1, 0] == 1.0  # 99 - 98: the pre-snapshot bid at 100 is gone


def test_real_mbo_head_starts_with_its_snapshot() -> None:
    d = mbo_level_deltas(HEAD)
    assert d["action"][0] == ACTION_CLEAR and d["side"][0] == 0
    assert (d["ts_recv_ns"][:100] == -1).all()  # the snapshot's records carry BAD_TS_RECV
    assert int(d["unknown_orders"]) == 0
    _, out = book_update(new_book_state(), d["side"], d["price"], d["size"], d["action"])
    first_live = np.flatnonzero(d["ts_recv_ns"] != -1)[0]
    spread = out[first_live - 1, 0]
    assert 0 < spread < 5 and np.round(out[first_live - 1, 1] * 8) / 8 == out[first_live - 1, 1]


def test_a_non_mbo_file_is_refused(sample_dir: Path) -> None:
    with pytest.raises(DataError, match="no MBO records"):
        mbo_level_deltas(sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst")


def test_after_the_open_the_book_is_uncrossed_at_every_events_last_delta() -> None:
    d = mbo_level_deltas(HEAD)
    lv = np.empty((len(d["side"]), 4, 1))
    book_update(new_book_state(), d["side"], d["price"], d["size"], d["action"], levels_out=lv)
    bid, ask = lv[:, 0, 0], lv[:, 2, 0]
    opened = (d["ts_ns"] > 1_703_545_203 * 10**9) & np.isfinite(bid) & np.isfinite(ask)
    crossed = opened & (bid >= ask)
    assert opened.sum() > 1000 and crossed.sum() == 2  # inside one exchange event each
    assert not (crossed & d["last"]).any()


def _rows(path: Path, fast: bool, trades: bool):
    from nautilus_pipeline.io.databento import DatabentoReader

    r = DatabentoReader(path, fast_mbo=fast, trades=trades)
    chunks = list(r.chunks(5000))
    names = [c.symbols[int(k)] for c in chunks for k in c.column("symbol_id")]
    cols = {k: np.concatenate([c.column(k) for c in chunks])
            for k in ("ts_ns", "ts_recv_ns", "kind", "price", "size", "side", "trade_id")}
    cols["records"] = np.concatenate([c.records for c in chunks])
    return cols, names, r.ignored, r.unknown_orders


def _mbo_files(tmp_path: Path) -> list[Path]:
    snap = F_SNAPSHOT | F_BAD_TS_RECV
    rebuilt = write_mbo(tmp_path / "r.dbn", [
        mbo("ADD", "BID", 100.0, 3, 1), mbo("ADD", "BID", 100.0, 3, 1), mbo("ADD", "ASK", 101.0, 4, 3),
        mbo("CANCEL", "BID", 100.0, 5, 1), mbo("MODIFY", "ASK", 102.0, 2, 3), mbo("MODIFY", "NONE", 102.0, 7, 3),
        mbo("TRADE", "ASK", 101.0, 1, 0), mbo("FILL", "ASK", 101.0, 1, 3), mbo("CANCEL", "ASK", 1.0, 1, 99),
        mbo("CLEAR", "NONE", 0.0, 0, 0, flags=snap), mbo("ADD", "BID", 98.0, 1, 5, flags=snap | F_LAST),
        mbo("CLEAR", "NONE", 0.0, 0, 0), mbo("ADD", "ASK", 99.0, 1, 6, ts=4),
    ])
    return [HEAD, rebuilt]


@pytest.mark.parametrize("trades", [False, True])
def test_the_numba_path_gives_the_reference_rows(tmp_path: Path, trades: bool) -> None:
    for path in _mbo_files(tmp_path):
        fast, slow = _rows(path, True, trades), _rows(path, False, trades)
        for k in fast[0]:
            assert np.array_equal(fast[0][k], slow[0][k], equal_nan=fast[0][k].dtype.kind == "f"), (path.name, k)
        assert fast[1:] == slow[1:], path.name
    assert (_rows(HEAD, True, True)[0]["kind"] == 0).sum() == 122


@pytest.mark.slow
def test_the_numba_path_gives_the_reference_rows_on_the_whole_shared_file(shared_data: Path) -> None:
    path = shared_data / "databento-glbx-esh4-mbo-20231225.dbn.zst"
    fast, slow = _rows(path, True, True), _rows(path, False, True)
    for k in fast[0]:
        assert np.array_equal(fast[0][k], slow[0][k], equal_nan=fast[0][k].dtype.kind == "f"), k
    assert fast[1:] == slow[1:]


def test_a_non_mbo_file_takes_the_reference_path(sample_dir: Path) -> None:
    from nautilus_pipeline.io.databento import DatabentoReader

    r = DatabentoReader(sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst")
    assert sum(len(c) for c in r.chunks()) == 2_288 and r._fast is None


@pytest.mark.parametrize("fast", [True, False])
def test_f_last_travels_in_the_book_rows_trade_id(fast) -> None:
    """Both reader paths mark the last book row of each F_LAST record 1, other MBO book rows 0,
    exactly where the reference's ``last`` column is true."""
    from nautilus_pipeline.io.databento import DatabentoReader
    from nautilus_pipeline.io.mbo import mbo_level_deltas

    chunks = list(DatabentoReader(HEAD, fast_mbo=fast, trades=True).chunks(chunk_rows=1000))
    kind = np.concatenate([c.column("kind") for c in chunks])
    event = np.concatenate([c.column("trade_id") for c in chunks])
    d = mbo_level_deltas(HEAD)
    assert np.array_equal(event[kind == KIND_BOOK], d["last"].astype(np.int64))
    assert (event[kind != KIND_BOOK] == -1).all() and int(d["last"].sum()) == 2_867
