"""Databento DBN misreads of issue 13: TBBO trades, exact prices, one-sided books, replay clock.

Files: ``tests/data/databento-glbx-esh1-tbbo-20201228.dbn.zst`` is databento/dbn's
``tests/data/test_data.tbbo.v3.dbn.zst`` (Apache-2.0, see tests/data/README.md); the one-sided
and ICE files are rebuilt here with ``databento-dbn``'s own encoder, record by record.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import databento_dbn as dbn
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nautilus_pipeline.cli import main
from nautilus_pipeline.errors import DataError
from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE, SIDE_SELL
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.io.checks import Validator, validated
from nautilus_pipeline.io.databento import DatabentoReader, scale_prices

TBBO = Path(__file__).parent / "data" / "databento-glbx-esh1-tbbo-20201228.dbn.zst"


def all_rows(path: Path, policy: str = "fail", order_by: str = "ts_ns") -> tuple[dict, Validator]:
    v = Validator(str(path), policy, order_by=order_by)
    chunks = list(validated(DatabentoReader(path).chunks(), v))
    cols = {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns} if chunks else {}
    return cols, v


def write_dbn(path: Path, records: list, dataset: str = "GLBX.MDP3", schema=dbn.Schema.MBP_1) -> Path:
    meta = dbn.Metadata(dataset=dataset, schema=schema, start=1, stype_in=dbn.SType.RAW_SYMBOL,
                        stype_out=dbn.SType.INSTRUMENT_ID, end=None, symbols=["X"], partial=[],
                        not_found=[], mappings=[])
    path.write_bytes(meta.encode() + b"".join(bytes(r) for r in records))
    return path


def mbp1(ts: int, bid: int, ask: int, bid_sz: int, ask_sz: int) -> dbn.MBP1Msg:
    return dbn.MBP1Msg(publisher_id=1, instrument_id=7, ts_event=ts, price=bid, size=1,
                       action=dbn.Action.ADD, side=dbn.Side.BID, depth=0, flags=128, ts_recv=ts + 1,
                       ts_in_delta=0, sequence=ts,
                       levels=dbn.BidAskPair(bid_px=bid, ask_px=ask, bid_sz=bid_sz, ask_sz=ask_sz))


def trade(ts_event: int, ts_recv: int, price: int) -> dbn.TradeMsg:
    return dbn.TradeMsg(publisher_id=1, instrument_id=7, ts_event=ts_event, price=price, size=2,
                        action=dbn.Action.TRADE, side=dbn.Side.ASK, depth=0, flags=0, ts_recv=ts_recv,
                        ts_in_delta=0, sequence=ts_recv)


# --- item 1: TBBO -----------------------------------------------------------------------------


def test_tbbo_file_yields_its_trades_each_after_the_quote_before_it() -> None:
    cols, v = all_rows(TBBO)
    assert cols["kind"].tolist() == [KIND_QUOTE, KIND_TRADE, KIND_QUOTE, KIND_TRADE]
    trades = cols["kind"] == KIND_TRADE
    assert cols["price"][trades].tolist() == [3720.25, 3720.25]
    assert cols["size"][trades].tolist() == [5.0, 21.0]
    assert cols["side"][trades].tolist() == [SIDE_SELL, SIDE_SELL]
    assert cols["bid"][~trades].tolist() == [3720.25, 3720.25]
    assert cols["ask"][~trades].tolist() == [3720.5, 3720.5]
    assert cols["bid_size"][~trades].tolist() == [26.0, 21.0]
    assert v.accounting.total.read == 4


# --- item 4: exact prices ---------------------------------------------------------------------


def test_round_prices_scale_to_the_round_float() -> None:
    raw = np.array([3720250000000, 1_000_000_000, 100_000_000, 4_567_890_000_000_000], dtype=np.int64)
    assert scale_prices(raw).tolist() == [3720.25, 1.0, 0.1, 4_567_890.0]
    assert 3720250000000 * 1e-9 != 3720.25  # what the old scaling gave


@given(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1).filter(lambda r: r != dbn.UNDEF_PRICE))
def test_scaled_price_is_the_float_nearest_to_the_exact_value(raw: int) -> None:
    assert scale_prices(np.array([raw], dtype=np.int64))[0] == float(Fraction(raw, 10**9))


def test_undefined_price_is_nan() -> None:
    assert np.isnan(scale_prices(np.array([dbn.UNDEF_PRICE], dtype=np.int64))[0])


def test_real_es_quotes_are_exact_quarter_ticks(sample_dir: Path) -> None:
    cols, _ = all_rows(sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst", policy="reject")
    px = np.concatenate([cols["bid"], cols["ask"]])
    px = px[np.isfinite(px)]
    assert px.size > 1000
    assert (np.round(px * 4) / 4 == px).all()


# --- item 5: one-sided books ------------------------------------------------------------------


def test_one_sided_book_keeps_its_defined_side(tmp_path: Path) -> None:
    undef = dbn.UNDEF_PRICE
    path = write_dbn(tmp_path / "opt.dbn", [
        mbp1(10, 1_500_000_000, undef, 3, 0),  # bid only
        mbp1(20, undef, 1_750_000_000, 0, 4),  # ask only
        mbp1(30, 1_500_000_000, 1_750_000_000, 3, 4),
    ])
    cols, _ = all_rows(path)
    assert cols["bid"][0] == 1.5 and np.isnan(cols["ask"][0])
    assert cols["bid_size"][0] == 3.0 and np.isnan(cols["ask_size"][0])
    assert np.isnan(cols["bid"][1]) and np.isnan(cols["bid_size"][1]) and cols["ask"][1] == 1.75
    assert cols["bid"][2] == 1.5 and cols["ask"][2] == 1.75


def test_a_book_empty_on_both_sides_is_refused_and_counted(tmp_path: Path) -> None:
    undef = dbn.UNDEF_PRICE
    path = write_dbn(tmp_path / "empty.dbn", [mbp1(10, undef, undef, 0, 0), mbp1(20, 1_000_000_000, undef, 1, 0)])
    with pytest.raises(DataError, match=r"record 1.*price not finite"):
        all_rows(path)
    cols, v = all_rows(path, policy="reject")
    assert cols["bid"].tolist() == [1.0]
    total = v.accounting.total
    assert (total.read, total.rejected, dict(total.by_reason)) == (2, 1, {"price_not_finite": 1})


# --- item 3: replay clock ---------------------------------------------------------------------


def ice_file(tmp_path: Path) -> Path:
    """Four ICE trades whose event times go back while the receive times rise."""
    trades = [trade(400, 1000, 80_000_000_000), trade(100, 1001, 80_010_000_000),
              trade(200, 1002, 80_020_000_000), trade(300, 1003, 80_030_000_000)]
    return write_dbn(tmp_path / "ifeu.dbn", trades, dataset="IFEU.IMPACT", schema=dbn.Schema.TRADES)


def delivered(source: Source) -> list[float]:
    out: list[float] = []
    for block in Replay([source]).iter_arrays():
        out.extend(block["price"][block["kind"] == KIND_TRADE].tolist())
    return out


def test_ice_dbn_file_replays_by_receive_time_by_default(tmp_path: Path) -> None:
    path = ice_file(tmp_path)
    assert DatabentoReader(path).default_order_by == "ts_recv_ns"
    assert delivered(Source(path)) == [80.0, 80.01, 80.02, 80.03]


def test_ordering_the_ice_file_by_event_time_refuses_the_trade_that_looks_ahead(tmp_path: Path) -> None:
    # by event time the first trade (400) is ahead of the three after it: under the
    # ts_ahead policy (io/checks.py) it alone is refused, where the old check lost the rest
    path = ice_file(tmp_path)
    assert delivered(Source(path, order_by="ts_ns", policy="reject")) == [80.01, 80.02, 80.03]


def test_cme_file_keeps_event_time_order(sample_dir: Path) -> None:
    assert DatabentoReader(sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst").default_order_by == "ts_ns"


def test_cli_order_by_overrides_the_definition(tmp_path: Path, capsys) -> None:
    path = ice_file(tmp_path)
    definition = tmp_path / "p.toml"
    definition.write_text(
        '[pipeline]\nname = "t"\n[replay]\norder_by = "ts_event"\n'
        f'[[sources]]\npath = "{path}"\non_bad_row = "fail"\n'
        '[[stages]]\ntype = "vpin"\nbucket_volume = 1.0\n[outputs]\nformats = ["jsonl"]\n'
    )
    assert main(["run", str(definition), "--out", str(tmp_path / "a"), "--no-progress"]) == 4
    assert "ts_ahead" in capsys.readouterr().err.replace(" ", "_")  # record 1 is ahead of the rest
    assert main(["run", str(definition), "--out", str(tmp_path / "b"), "--no-progress",
                 "--order-by", "ts_recv"]) == 0
