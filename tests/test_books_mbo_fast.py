"""The MBO fast path (our DBN record walk, open-addressing order/level tables) against the
reference (``DBNDecoder`` records through ``io/mbo.MboBooks``): identical rows and accounting
for random record sequences, tables grown from tiny, other record types, damaged streams."""

from __future__ import annotations

import io
from pathlib import Path
from unittest import mock

import databento_dbn as dbn
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_books_mbo import HEAD, _rows, write_mbo

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import mbo_fast
from nautilus_pipeline.io.databento import DatabentoReader
from nautilus_pipeline.io.files import byte_blocks
from nautilus_pipeline.io.mbo import F_BAD_TS_RECV, F_LAST, F_SNAPSHOT

ACTIONS = ("ADD",) * 6 + ("CANCEL",) * 4 + ("MODIFY",) * 4 + ("TRADE", "FILL", "NONE") * 2 + ("CLEAR",)
PRICES = (100.0, 100.25, 100.5, 99.75, 101.0, 2.0**54 / 1e9 * 3, None)  # beyond 2**53 raw; None: undefined


def _record(iid, action, side, price, size, oid, flags, ts):
    raw = dbn.UNDEF_PRICE if price is None else round(price * 10**9)
    return dbn.MBOMsg(publisher_id=1, instrument_id=iid, ts_event=ts, order_id=oid, price=raw, size=size,
                      flags=flags, channel_id=0, action=getattr(dbn.Action, action), side=getattr(dbn.Side, side),
                      ts_recv=ts + 5, ts_in_delta=0, sequence=ts)


FLAGS = (0, F_LAST) * 20 + (F_BAD_TS_RECV, F_SNAPSHOT, F_SNAPSHOT | F_LAST, F_SNAPSHOT | F_BAD_TS_RECV)
"""Snapshots rare: each one clears the instrument's orders, and the interesting cases (a cancel
or modify of an order filled, cancelled or moved before) need orders that live a while."""
records = st.lists(st.one_of(
    st.tuples(st.sampled_from((7, 7, 8, 9)), st.sampled_from(ACTIONS), st.sampled_from(("BID", "ASK", "NONE")),
              st.sampled_from(PRICES), st.sampled_from((0, 1, 2, 3, 7, dbn.UNDEF_ORDER_SIZE)),
              st.integers(1, 4), st.sampled_from(FLAGS)),
    st.just("system")), min_size=30, max_size=150)  # hypothesis keeps lists short unless told


def _file(path: Path, recs: list) -> Path:
    out = []
    for ts, r in enumerate(recs, start=1):
        out.append(dbn.SystemMsg(ts_event=ts, msg="heartbeat") if r == "system" else _record(*r, ts=ts))
    return write_mbo(path, out)


def _same(path: Path, trades: bool) -> None:
    fast, slow = _rows(path, True, trades), _rows(path, False, trades)
    for k in fast[0]:
        assert np.array_equal(fast[0][k], slow[0][k], equal_nan=fast[0][k].dtype.kind == "f"), k
    assert fast[1:] == slow[1:]


def _tiny():
    """Tables of 4 slots, so that growth and tombstone clean-ups happen all the time."""
    real = mbo_fast.MboState
    return mock.patch.object(mbo_fast, "MboState", lambda: real(orders=4, levels=4))


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(recs=records, trades=st.booleans(), block=st.sampled_from((56, 100, 1 << 22)))
def test_random_mbo_sequences_give_the_reference_rows(tmp_path_factory, recs, trades, block) -> None:
    path = _file(tmp_path_factory.mktemp("mbo") / "r.dbn", recs)
    with _tiny(), mock.patch.object(mbo_fast, "READ_BYTES", block):
        try:
            _same(path, trades)
        except DataError as e:  # no MBO row at all: both paths refuse the same way
            assert "no trade, MBP-1" in str(e)
            with pytest.raises(DataError, match="no trade, MBP-1"):
                _rows(path, False, trades)


def test_the_real_head_file_with_tiny_tables_and_small_blocks() -> None:
    with _tiny(), mock.patch.object(mbo_fast, "READ_BYTES", 1000):
        _same(HEAD, True)


def test_a_zstd_file_of_several_frames_reads_whole(tmp_path: Path) -> None:
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(HEAD.read_bytes()), read_across_frames=True).read()
    cut = len(plain) // 3
    c = zstandard.ZstdCompressor()
    path = tmp_path / "frames.dbn.zst"
    path.write_bytes(c.compress(plain[:cut]) + c.compress(plain[cut:]))
    assert b"".join(byte_blocks(path)) == plain
    assert _rows(path, True, True)[1:] == _rows(HEAD, True, True)[1:]


def test_a_truncated_zstd_stream_is_an_error_not_a_short_file(tmp_path: Path) -> None:
    data = HEAD.read_bytes()
    path = tmp_path / "cut.dbn.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        list(byte_blocks(path))
    with pytest.raises(DataError, match="truncated"):
        list(DatabentoReader(path).chunks())


def test_a_record_cut_at_the_end_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path / "c.dbn", [(7, "ADD", "BID", 100.0, 1, 1, F_LAST)] * 3)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="ends in the middle of a record"):
        list(DatabentoReader(path).chunks())


def _trade(ts: int):
    return dbn.TradeMsg(publisher_id=1, instrument_id=7, ts_event=ts, price=100 * 10**9, size=1,
                        action=dbn.Action.TRADE, side=dbn.Side.ASK, depth=0, ts_recv=ts + 1, ts_in_delta=0,
                        sequence=ts, flags=0)


def test_other_tick_records_in_the_first_block_take_the_reference_path(tmp_path: Path) -> None:
    path = write_mbo(tmp_path / "m.dbn", [_record(7, "ADD", "BID", 100.0, 1, 1, F_LAST, 1), _trade(2),
                                          _record(7, "CANCEL", "BID", 100.0, 1, 1, F_LAST, 3)])
    r = DatabentoReader(path)
    kinds = np.concatenate([c.column("kind") for c in r.chunks()])
    assert r._fast is None and kinds.tolist() == [2, 0, 2]  # the trade is read, not misread as MBO


def test_other_tick_records_after_the_first_block_are_a_clear_error(tmp_path: Path) -> None:
    recs = [_record(7, "ADD", "BID", 100.0, 1, i, F_LAST, i) for i in range(1, 40)]
    path = write_mbo(tmp_path / "m.dbn", [*recs, _trade(50)])
    with mock.patch.object(mbo_fast, "READ_BYTES", 56 * 8), pytest.raises(DataError, match="record 40 is of rtype 0x00"):
        list(DatabentoReader(path).chunks())


REAL_DBN = sorted((Path(__file__).parent / "data").glob("*.dbn.zst")) + sorted(
    (Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data").glob("*.dbn.zst"))


@pytest.mark.parametrize("path", REAL_DBN, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_real_dbn_file_reads_as_the_reference_reads_it(path: Path) -> None:
    """MBO files take the fast path, the others (TBBO, MBP-1/10, BBO, CMBP-1, trades) the
    reference; either way the rows, symbols, ignored and unseen-order counts are the reference's."""
    fast, slow = DatabentoReader(path), DatabentoReader(path, fast_mbo=False)
    a, b = list(fast.chunks(5000)), list(slow.chunks(5000))
    assert (fast._fast is not None) == ("-mbo-" in path.name)
    for key in ("ts_ns", "ts_recv_ns", "kind", "price", "size", "side", "trade_id", "bid", "ask", "bid_size",
                "ask_size"):
        x, y = np.concatenate([c.column(key) for c in a]), np.concatenate([c.column(key) for c in b])
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), key
    assert np.array_equal(np.concatenate([c.records for c in a]), np.concatenate([c.records for c in b]))
    assert [c.symbols[int(k)] for c in a for k in c.column("symbol_id")] == \
        [c.symbols[int(k)] for c in b for k in c.column("symbol_id")]
    assert (fast.ignored, fast.unknown_orders) == (slow.ignored, slow.unknown_orders)


def test_an_order_cancelled_in_full_is_gone_for_the_next_cancel_and_modify(tmp_path: Path) -> None:
    path = _file(tmp_path / "g.dbn", [(7, "ADD", "BID", 100.0, 3, 1, F_LAST), (7, "CANCEL", "BID", 100.0, 3, 1, F_LAST),
                                      (7, "CANCEL", "BID", 100.0, 1, 1, F_LAST), (7, "MODIFY", "BID", 101.0, 2, 1, F_LAST),
                                      (7, "ADD", "ASK", 102.0, 2, 2, F_LAST), (7, "CANCEL", "ASK", 102.0, 7, 2, F_LAST),
                                      (7, "MODIFY", "ASK", 103.0, 1, 2, F_LAST)])
    with _tiny():
        _same(path, False)
    cols, _, ignored, unknown = _rows(path, True, False)
    assert len(cols["side"]) == 4 and unknown == 3 and ignored == 3
