"""NautilusTrader catalog Parquet (fixed-point int64/int128 columns) and catalog folders."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nautilus_pipeline import config
from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.io.nautilus import catalog_files, fixed_point_to_float

DATA = Path(__file__).parent / "data"
SCALE = {8: 9, 16: 16}


def independent(path: Path, column: str) -> np.ndarray:
    """Each raw value as an exact fraction, then the nearest float (Python's own rounding)."""
    col = pq.read_table(path, columns=[column]).column(column)
    width = col.type.byte_width
    return np.array([float(Fraction(int.from_bytes(b, "little", signed=True), 10 ** SCALE[width]))
                     for b in col.to_pylist()])


def read(path: Path) -> dict[str, np.ndarray]:
    blocks = list(Replay([Source(path)]).iter_arrays())
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@pytest.mark.parametrize("bits", [64, 128])
def test_fixed_point_trades_and_quotes_decode_to_the_nearest_float(bits) -> None:
    trades = DATA / f"nautilus-{bits}-bit-trades.parquet"
    quotes = DATA / f"nautilus-{bits}-bit-quotes.parquet"
    t, q = read(trades), read(quotes)
    assert len(t["price"]) == 100 and len(q["bid"]) == 9_500
    assert np.array_equal(t["price"], independent(trades, "price"))
    assert np.array_equal(t["size"], independent(trades, "size"))
    for ours, theirs in (("bid", "bid_price"), ("ask", "ask_price"), ("bid_size", "bid_size")):
        assert np.array_equal(q[ours], independent(quotes, theirs))
    assert t["price"][0] == 123.4 and q["bid"][:3].tolist() == [112.12, 112.12, 112.117]
    assert (t["side"] == 1).all()  # aggressor_side 1 = buyer


def test_64_and_128_bit_files_read_the_same() -> None:
    for kind in ("trades", "quotes"):
        a, b = read(DATA / f"nautilus-64-bit-{kind}.parquet"), read(DATA / f"nautilus-128-bit-{kind}.parquet")
        for k in a:
            assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def test_the_instrument_id_in_the_metadata_names_the_symbol() -> None:
    r = Replay([Source(DATA / "nautilus-64-bit-quotes.parquet")])
    list(r.iter_arrays())
    assert r.symbols.names == ["EUR/USD.SIM"]


def test_undefined_and_unaligned_raw_values() -> None:
    raw64 = [1_121_200_000, np.iinfo(np.int64).max, 1_000_000_001, -2_500_000_000]
    arr = pa.array([int(v).to_bytes(8, "little", signed=True) for v in raw64], pa.binary(8))
    got = fixed_point_to_float(arr, precision=4).to_numpy(zero_copy_only=False)
    assert got[0] == 1.1212 and np.isnan(got[1]) and got[2] == 1.000000001 and got[3] == -2.5
    raw128 = [11_212 * 10**12, (1 << 127) - 1, 10**16 + 1, -(25 * 10**15), 10**30]
    arr = pa.array([int(v).to_bytes(16, "little", signed=True) for v in raw128], pa.binary(16))
    got = fixed_point_to_float(arr, precision=4).to_numpy(zero_copy_only=False)
    assert got[0] == 1.1212 and np.isnan(got[1]) and got[2] == float(Fraction(10**16 + 1, 10**16))
    assert got[3] == -2.5 and got[4] == 1e14


def test_a_catalog_folder_becomes_its_tick_files(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    for kind, name in (("trade_tick", "trades"), ("quote_tick", "quotes")):
        d = root / "data" / kind / "EURUSD.SIM"
        d.mkdir(parents=True)
        shutil.copy(DATA / f"nautilus-64-bit-{name}.parquet", d / "part-0.parquet")
    files = catalog_files(root)
    assert [f.parent.parent.name for f in files] == ["trade_tick", "quote_tick"]
    definition = config.load("quotes")
    sources = config.make_sources(definition, [str(root)], tmp_path)
    assert [Path(s.path) for s in sources] == files
    r = Replay(sources)
    n = sum(len(b["ts_ns"]) for b in r.iter_arrays())
    assert n == 9_600 and r.accounting.total.delivered == 9_600
    assert catalog_files(root / "data" / "trade_tick") == files[:1]  # one data type's folder
    assert catalog_files(root / "data") == files
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NautilusTrader catalog tick files"):
        catalog_files(tmp_path / "empty")


def test_order_book_deltas_are_refused_not_read_as_trades(tmp_path: Path) -> None:
    """A deltas file's price/size columns would map to trades; it is refused with the reason."""
    t = pq.read_table(DATA / "nautilus-64-bit-trades.parquet")
    n = t.num_rows
    deltas = pa.table({"action": pa.array([2] * n, pa.uint8()), "side": pa.array([1] * n, pa.uint8()),
                       "price": t.column("price"), "size": t.column("size"),
                       "order_id": pa.array(range(n), pa.uint64()), "flags": pa.array([0] * n, pa.uint8()),
                       "sequence": pa.array([0] * n, pa.uint64()), "ts_event": t.column("ts_event"),
                       "ts_init": t.column("ts_init")}).replace_schema_metadata(t.schema.metadata)
    p = tmp_path / "deltas.parquet"
    pq.write_table(deltas, p)
    with pytest.raises(DataError, match="order-book deltas"):
        read(p)
    d = tmp_path / "catalog" / "data" / "order_book_delta" / "X"
    d.mkdir(parents=True)
    pq.write_table(deltas, d / "part-0.parquet")
    with pytest.raises(DataError, match="holds order-book deltas only"):
        catalog_files(tmp_path / "catalog")


def _with_sizes(src: Path, dst: Path, sizes: list[int], width: int) -> Path:
    """``src`` with its first ``len(sizes)`` raw sizes replaced (unsigned, as NautilusTrader writes them)."""
    t = pq.read_table(src)
    raw = t.column("size").to_pylist()
    raw[: len(sizes)] = [v.to_bytes(width, "little", signed=False) for v in sizes]
    t = t.set_column(t.schema.get_field_index("size"), t.schema.field("size"),
                     pa.array(raw, pa.binary(width)))
    pq.write_table(t, dst)
    return dst


@pytest.mark.parametrize("bits", [64, 128])
def test_quantities_are_unsigned_and_quantity_undef_is_refused_with_a_reason(bits, tmp_path: Path) -> None:
    """u64 quantities above i64::MAX raw are valid sizes (64-bit QUANTITY_MAX is 18,446,744,073);
    QUANTITY_UNDEF (all bits set) becomes NaN and the trade is refused as size_not_positive."""
    width, scale = bits // 8, SCALE[bits // 8]
    big = 18_000_000_000 * 10**scale  # 1.8e19 raw at 64 bits: above i64::MAX, read negative when signed
    undef = (1 << bits) - 1
    path = _with_sizes(DATA / f"nautilus-{bits}-bit-trades.parquet", tmp_path / "t.parquet", [big, undef], width)
    got = fixed_point_to_float(pq.read_table(path).column("size"), 4, unsigned=True).to_numpy(zero_copy_only=False)
    assert got[0] == 18_000_000_000.0 and np.isnan(got[1])
    assert np.array_equal(got[2:], independent(path, "size")[2:])
    r = Replay([Source(path, policy="reject")])
    sizes = np.concatenate([b["size"] for b in r.iter_arrays()])
    assert sizes[0] == 18_000_000_000.0 and len(sizes) == 99  # the undefined-size trade refused
    total = r.accounting.total
    assert (total.read, total.rejected, dict(total.by_reason)) == (100, 1, {"size_not_positive": 1})
    with pytest.raises(DataError, match="size"):
        list(Replay([Source(path)]).iter_arrays())  # policy fail: the file, row and field named


def test_signed_prices_stay_signed_at_both_widths() -> None:
    for width in (8, 16):
        arr = pa.array([(-25 * 10 ** (SCALE[width] - 1)).to_bytes(width, "little", signed=True)], pa.binary(width))
        assert fixed_point_to_float(arr, 4).to_numpy(zero_copy_only=False)[0] == -2.5
